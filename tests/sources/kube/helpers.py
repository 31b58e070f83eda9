"""What the Kubernetes source's tests share: objects, a recording sink, the source under test with fast
retries, and ways to run it for a scenario's duration.

Every scenario feeds a real ``ChangeTracker`` through ``RecordingSink``, which also records the calls, so
tests can say both what the tracker ended up with and exactly what the source told it (nothing lost, nothing
twice).
Waits are bounded by ``fake_api.run``'s timeout; no assertion is about wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from aproxy.core.backoff import RetryPolicy
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import ServiceKey
from aproxy.core.translate import TranslationContext
from aproxy.sources.base import ListedKind, ObjectSink, Source
from aproxy.sources.kube.watch import KubernetesSource, WatchLimits
from tests.fakeapi.server import FakeApiServer
from tests.sources.calls import CallLog

Obj = dict[str, Any]
TIMEOUT = 20.0  # seconds: a bound against hanging, never an assertion
NS = "shop"
CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({ip_address("192.0.2.10")}))
# Retries in milliseconds, so that failure scenarios run fast; the logic is the production one.
FAST = RetryPolicy(initial=0.005, cap=0.05, jitter=0.005)
FAST_LIMITS = WatchLimits(max_retry_after=5.0, permission_interval=0.05)


# --- objects --------------------------------------------------------------------------------------------


def service(name: str, labels: dict[str, str] | None = None, port: int = 80) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": NS, "name": name, "labels": labels or {}},
        "spec": {"ports": [{"name": "http", "port": port}]},
    }


def endpoint_slice(
    name: str, service_name: str, addresses: list[str], labels: dict[str, str] | None = None
) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": NS,
            "name": name,
            "labels": {"kubernetes.io/service-name": service_name, **(labels or {})},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}} for address in addresses],
        "ports": [{"name": "http", "port": 8080}],
    }


def create_service(api: FakeApiServer, name: str, addresses: list[str]) -> None:
    api.create("services", service(name))
    api.create("endpointslices", endpoint_slice(f"{name}-1", name, addresses))


def create_services(api: FakeApiServer, *names: str) -> None:
    """One Service per name, the n-th (from 1) with one endpoint, 10.244.n.1."""
    for index, name in enumerate(names, start=1):
        create_service(api, name, [f"10.244.{index}.1"])


def key(name: str) -> ServiceKey:
    return ServiceKey(NS, name)


# --- the sink and the source under test ------------------------------------------------------------------


@dataclass
class RecordingSink(CallLog):
    """Forwards every call to a ChangeTracker and records it as (method, "namespace/name" or kind)."""

    tracker: ChangeTracker = field(default_factory=ChangeTracker)
    versions: dict[str, str] = field(default_factory=dict)  # "kind ns/name" -> resourceVersion last fed
    objects: list[Obj] = field(default_factory=list)

    def upsert_service(self, raw: dict[str, Any]) -> None:
        self._upsert("upsert_service", raw)
        self.tracker.upsert_service(raw)

    def delete_service(self, namespace: str, name: str) -> None:
        self.tracker.delete_service(namespace, name)
        self._record("delete_service", f"{namespace}/{name}")

    def upsert_slice(self, raw: dict[str, Any]) -> None:
        self._upsert("upsert_slice", raw)
        self.tracker.upsert_slice(raw)

    def delete_slice(self, namespace: str, name: str) -> None:
        self.tracker.delete_slice(namespace, name)
        self._record("delete_slice", f"{namespace}/{name}")

    def mark_listed(self, kind: ListedKind) -> None:
        self.tracker.mark_listed(kind)
        self._record("mark_listed", kind)

    def count(self, method: str, subject: str) -> int:
        return self.calls.count((method, subject))

    def _upsert(self, method: str, raw: dict[str, Any]) -> None:
        meta = raw["metadata"]
        subject = f"{meta['namespace']}/{meta['name']}"
        self.versions[f"{method} {subject}"] = meta["resourceVersion"]
        self.objects.append(raw)
        self._record(method, subject)


def make_source(api: FakeApiServer, **options: Any) -> KubernetesSource:
    options.setdefault("retry", FAST)
    options.setdefault("limits", FAST_LIMITS)
    return KubernetesSource(api.configuration(), **options)


@contextlib.asynccontextmanager
async def running(source: Source, sink: ObjectSink) -> AsyncIterator[asyncio.Task[None]]:
    """The source runs for the block's duration; it is cancelled after, and a crash surfaces here."""
    task = asyncio.create_task(source.run(sink))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(condition: Callable[[], bool]) -> None:
    """For counters that change without a sink call; bounded by the scenario's timeout."""
    while not condition():  # noqa: ASYNC110 - the source exposes plain counters, not events
        await asyncio.sleep(0.005)


async def synced(api: FakeApiServer, sink: RecordingSink) -> None:
    await sink.until(lambda: sink.tracker.initialized)
    await api.wait_for_watches(2)


@contextlib.asynccontextmanager
async def running_synced(api: FakeApiServer, source: Source, sink: RecordingSink) -> AsyncIterator[None]:
    """``running``, with the block starting once both kinds are listed and both watches are open."""
    async with running(source, sink):
        await synced(api, sink)
        yield


def reals(tracker: ChangeTracker, name: str) -> list[tuple[str, int]]:
    state, _ = tracker.desired(key(name), CTX)
    assert state is not None
    return [
        (str(real.address), real.port) for virtual in state.virtual_servers for real in virtual.real_servers
    ]


def queries(api: FakeApiServer, verb: str, resource: str) -> list[dict[str, str]]:
    return [dict(r.query) for r in api.requests if r.verb == verb and r.resource == resource]
