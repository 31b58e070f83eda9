"""This node's Node: the pure eligibility decision, ``fetch_node`` and ``watch_node`` against the fake API.

The watch tests drive the real kubernetes-asyncio client over real HTTP, like the services/slices tests; a
recorder stands in for the daemon's callback and keeps every ``on_change`` call, so a test can say exactly
what was reported (nothing lost, nothing twice). Waits are bounded by ``fake_api.run``'s timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
from kubernetes_asyncio.client import Configuration

from aproxy.sources.kube.errors import NotFoundError, PermissionDeniedError
from aproxy.sources.kube.node import (
    ELIGIBLE,
    TO_BE_DELETED_TAINT,
    NodeEligibility,
    NodeInfo,
    ThisNode,
    fetch_node,
    node_eligibility,
    node_info,
    watch_node,
)
from aproxy.sources.kube.resources import LABEL_SELECTOR, identity
from aproxy.sources.kube.watch import KubernetesSource
from tests.fakeapi.server import FakeApiServer
from tests.sources.kube.helpers import (
    FAST,
    FAST_LIMITS,
    TIMEOUT,
    RecordingSink,
    create_service,
    eventually,
    queries,
    running,
    synced,
)

Obj = dict[str, Any]
NODE = "node-a"
ADDRESS = ip_address("192.0.2.10")
TAINTED = NodeEligibility(eligible=False, reason=f"tainted {TO_BE_DELETED_TAINT}")
DELETING = NodeEligibility(eligible=False, reason="being deleted")


# --- the pure decision ----------------------------------------------------------------------------------


def taint(key: str, effect: str = "NoSchedule") -> Obj:
    return {"key": key, "value": "1700000000", "effect": effect}


def node(
    name: str = NODE,
    *,
    taints: object = None,
    deletion: object = None,
    meta: object = None,
    spec: object = None,
) -> Obj:
    metadata: Obj = {"name": name}
    if deletion is not None:
        metadata["deletionTimestamp"] = deletion
    obj: Obj = {
        "metadata": metadata if meta is None else meta,
        "status": {"addresses": [{"type": "InternalIP", "address": str(ADDRESS)}]},
    }
    if spec is not None:
        obj["spec"] = spec
    elif taints is not None:
        obj["spec"] = {"taints": taints}
    return obj


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(node(), ELIGIBLE, id="plain-node"),
        pytest.param(node(taints=[]), ELIGIBLE, id="no-taints"),
        pytest.param(node(taints=[taint("node.kubernetes.io/unreachable")]), ELIGIBLE, id="other-taint"),
        pytest.param(node(taints=[taint(TO_BE_DELETED_TAINT)]), TAINTED, id="autoscaler-taint"),
        pytest.param(node(taints=[taint(TO_BE_DELETED_TAINT, "NoExecute")]), TAINTED, id="any-effect"),
        pytest.param(
            node(taints=[taint("a"), taint(TO_BE_DELETED_TAINT, "PreferNoSchedule")]),
            TAINTED,
            id="autoscaler-taint-among-others",
        ),
        pytest.param(node(deletion="2024-05-01T10:00:00Z"), DELETING, id="being-deleted"),
        pytest.param(
            node(deletion="2024-05-01T10:00:00Z", taints=[taint(TO_BE_DELETED_TAINT)]),
            DELETING,
            id="deletion-named-first",
        ),
        pytest.param(node(deletion=""), ELIGIBLE, id="empty-deletion-timestamp"),
        pytest.param(node(deletion=1714557600), ELIGIBLE, id="malformed-deletion-timestamp-ignored"),
        pytest.param(node(taints={"key": TO_BE_DELETED_TAINT}), ELIGIBLE, id="taints-not-a-list-ignored"),
        pytest.param(node(taints=TO_BE_DELETED_TAINT), ELIGIBLE, id="taints-a-string-ignored"),
        pytest.param(
            node(taints=["oops", None, 3, taint(TO_BE_DELETED_TAINT)]),
            TAINTED,
            id="malformed-entries-skipped-the-rest-read",
        ),
        pytest.param(node(taints=[{"effect": "NoSchedule"}]), ELIGIBLE, id="taint-without-key"),
        pytest.param(node(spec="not-a-spec"), ELIGIBLE, id="spec-not-a-mapping"),
        pytest.param(node(meta=["not", "metadata"]), ELIGIBLE, id="metadata-not-a-mapping"),
        pytest.param("not a node", ELIGIBLE, id="not-an-object"),
    ],
)
def test_node_eligibility(raw: object, expected: NodeEligibility) -> None:
    assert node_eligibility(raw) == expected


def test_node_info_carries_eligibility_with_addresses() -> None:
    info = node_info(node(taints=[taint(TO_BE_DELETED_TAINT)]))
    assert info == NodeInfo(addresses=(ADDRESS,), zone=None, eligibility=TAINTED)


@pytest.mark.parametrize(
    ("obj", "namespaced", "expected"),
    [
        pytest.param(
            {"metadata": {"name": NODE, "resourceVersion": "7"}},
            False,
            (("", NODE), "7"),
            id="cluster-scoped-keyed-without-namespace",
        ),
        pytest.param(
            {"metadata": {"name": "web", "resourceVersion": "7"}},
            True,
            "web without namespace",
            id="namespaced-still-needs-a-namespace",
        ),
        pytest.param(
            {"metadata": {"namespace": "", "name": "web", "resourceVersion": "7"}},
            True,
            "web without namespace",
            id="namespaced-empty-namespace-refused",
        ),
        pytest.param(
            {"metadata": {"resourceVersion": "7"}}, False, "without name", id="cluster-scoped-needs-a-name"
        ),
        pytest.param(
            {"metadata": {"name": NODE}},
            False,
            f"{NODE} without resourceVersion",
            id="cluster-scoped-needs-a-resource-version",
        ),
    ],
)
def test_identity_of_cluster_scoped_and_namespaced_objects(
    obj: Obj, namespaced: bool, expected: object
) -> None:
    assert identity(obj, namespaced) == expected


# --- reading it once -----------------------------------------------------------------------------------


def test_fetch_node_returns_its_addresses_and_zone(fake_api: FakeApiServer) -> None:
    fake_api.create(
        "nodes",
        {
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}},
            "status": {
                "addresses": [
                    {"type": "Hostname", "address": "node-a"},
                    {"type": "InternalIP", "address": "192.0.2.10"},
                    {"type": "InternalIP", "address": "2001:db8::10"},
                    {"type": "ExternalIP", "address": "203.0.113.7"},
                    {"type": "InternalDNS", "address": "node-a.internal"},
                    {"type": "ExternalIP", "address": "not-an-ip"},
                ]
            },
        },
    )
    fake_api.create("nodes", {"metadata": {"name": "bare"}})

    async def scenario() -> tuple[NodeInfo, NodeInfo]:
        configuration = fake_api.configuration()
        return await fetch_node(configuration, "node-a"), await fetch_node(configuration, "bare")

    node, bare = fake_api.run(scenario(), timeout=TIMEOUT)
    assert node == NodeInfo(
        addresses=(ip_address("192.0.2.10"), ip_address("2001:db8::10"), ip_address("203.0.113.7")),
        zone="zone-1",
    )
    assert bare == NodeInfo(addresses=(), zone=None)


def test_fetch_node_errors_name_the_problem(fake_api: FakeApiServer) -> None:
    async def scenario() -> tuple[str, str]:
        with pytest.raises(NotFoundError) as missing:
            await fetch_node(fake_api.configuration(), "ghost")
        fake_api.forbid("nodes", "get")
        with pytest.raises(PermissionDeniedError) as denied:
            await fetch_node(fake_api.configuration(), "ghost")
        return str(missing.value), str(denied.value)

    missing, denied = fake_api.run(scenario(), timeout=TIMEOUT)
    assert "ghost" in missing and "404" in missing
    assert denied.startswith("RBAC: aproxy cannot get nodes at the cluster scope; grant get on nodes")


def test_fetch_node_with_a_policy_retries_until_it_can_read_the_node(
    fake_api: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake_api.create("nodes", node())
    fake_api.fail_next(2, 500, verb="get", resource="nodes")

    with caplog.at_level(logging.ERROR, logger="aproxy.sources.kube.node"):
        info = fake_api.run(fetch_node(fake_api.configuration(), NODE, FAST), timeout=TIMEOUT)
    assert info == NodeInfo(addresses=(ADDRESS,), zone=None)
    assert fake_api.count("get", "nodes") == 3
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert retries == ["cannot read this node from the API; retrying"] * 2


def test_this_node_follows_eligibility_and_warns_when_watched_addresses_move(
    caplog: pytest.LogCaptureFixture,
) -> None:
    moved_to = ip_address("192.0.2.20")
    watched = ThisNode(NODE, Configuration(), fixed_addresses=False)
    fixed = ThisNode(NODE, Configuration(), fixed_addresses=True)  # --node-ip: the Node's do not matter
    with caplog.at_level(logging.INFO, logger="aproxy.sources.kube.node"):
        for this in (watched, fixed):
            this.changed(NodeInfo((ADDRESS,), None))
            this.changed(NodeInfo((moved_to,), None, TAINTED))
            assert (this.eligible, this.reason) == (False, TAINTED.reason)
            this.changed(None)
            assert (this.eligible, this.reason) == (False, "gone (no Node object)")
    transitions = [r.getMessage() for r in caplog.records if "eligible" in r.getMessage()]
    assert transitions == ["this node is not eligible: /healthz answers 503"] * 4
    moved = [r for r in caplog.records if "addresses changed" in r.getMessage()]
    assert [(r.old, r.new) for r in moved] == [("192.0.2.10", "192.0.2.20")]


# --- the watch ------------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """The ``on_change`` callback: every NodeInfo (or None) reported, in order."""

    seen: list[NodeInfo | None] = field(default_factory=list)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, info: NodeInfo | None) -> None:
        self.seen.append(info)
        self.called.set()

    async def until(self, condition: Callable[[list[NodeInfo | None]], bool]) -> None:
        while not condition(self.seen):
            self.called.clear()
            await self.called.wait()

    async def reports(self, count: int) -> None:
        await self.until(lambda seen: len(seen) >= count)

    def eligibility(self) -> list[NodeEligibility | None]:
        return [None if info is None else info.eligibility for info in self.seen]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@contextlib.asynccontextmanager
async def watching(source: KubernetesSource, recorder: Recorder, name: str = NODE) -> AsyncIterator[None]:
    """``watch_node`` runs for the block's duration; cancelled after, a crash surfaces here."""
    task = asyncio.create_task(watch_node(source, name, recorder))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def watched(api: FakeApiServer, source: KubernetesSource, recorder: Recorder) -> AsyncIterator[None]:
    """``watching``, with the block starting once the first report is in and the watch is open."""
    async with watching(source, recorder):
        await recorder.reports(1)
        await api.wait_for_watches(1, "nodes")
        yield


def edit(api: FakeApiServer, change: Callable[[Obj], None], name: str = NODE) -> None:
    """Read the stored Node, change it, write it back (a MODIFIED event)."""
    obj = api.get("nodes", None, name)
    assert obj is not None
    change(obj)
    api.update("nodes", obj)


def add_taint(obj: Obj) -> None:
    obj.setdefault("spec", {}).setdefault("taints", []).append(taint(TO_BE_DELETED_TAINT))


def remove_taints(obj: Obj) -> None:
    obj["spec"]["taints"] = []


def mark_deleting(obj: Obj) -> None:
    # What the API server does to an object with finalizers on DELETE: it stays, with a deletionTimestamp.
    obj["metadata"]["deletionTimestamp"] = "2024-05-01T10:00:00Z"


def annotate(obj: Obj) -> None:
    obj["metadata"]["annotations"] = {"example.com/heartbeat": "1"}


def test_node_watch_follows_taint_removal_deletion_and_reports_each_change_once(
    fake_api: FakeApiServer, source: KubernetesSource, recorder: Recorder
) -> None:
    fake_api.create("nodes", node())
    fake_api.create("nodes", node("node-b"))

    async def scenario() -> None:
        async with watched(fake_api, source, recorder):
            edit(fake_api, add_taint, "node-b")  # another node: not even sent (field selector)
            edit(fake_api, annotate)  # a new resourceVersion, nothing NodeInfo holds: not reported
            edit(fake_api, add_taint)
            await recorder.reports(2)
            edit(fake_api, remove_taints)
            await recorder.reports(3)
            edit(fake_api, mark_deleting)
            await recorder.reports(4)
            fake_api.delete("nodes", None, NODE)
            await recorder.reports(5)
            await eventually(lambda: source.events_total["DELETED"] == 1)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert recorder.eligibility() == [ELIGIBLE, TAINTED, ELIGIBLE, DELETING, None]
    assert recorder.seen[0] == NodeInfo(addresses=(ADDRESS,), zone=None)
    assert source.events_total["MODIFIED"] == 4  # the annotation included: seen, just not reported
    assert source.listed is False  # the services/slices gate: the node watch has no say in it
    for verb in ("list", "watch"):
        (request,) = queries(fake_api, verb, "nodes")
        assert request["fieldSelector"] == f"metadata.name={NODE}"
        assert "labelSelector" not in request


def test_missing_node_is_reported_as_none_until_it_appears(
    fake_api: FakeApiServer, source: KubernetesSource, recorder: Recorder
) -> None:

    async def scenario() -> None:
        async with watched(fake_api, source, recorder):
            fake_api.create("nodes", node(taints=[taint(TO_BE_DELETED_TAINT)]))
            await recorder.reports(2)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert recorder.eligibility() == [None, TAINTED]


@pytest.mark.parametrize(
    ("expiry", "gap", "expected"),
    [
        pytest.param("history-compacted", "taint", TAINTED, id="410-error-event-tainted-in-the-gap"),
        pytest.param("http-410", "taint", TAINTED, id="410-on-the-watch-request-tainted-in-the-gap"),
        pytest.param("history-compacted", "delete", None, id="410-error-event-deleted-in-the-gap"),
    ],
)
def test_expired_node_watch_relists_and_reports_what_changed_in_the_gap(
    fake_api: FakeApiServer,
    source: KubernetesSource,
    recorder: Recorder,
    expiry: str,
    gap: str,
    expected: NodeEligibility | None,
) -> None:
    fake_api.create("nodes", node())

    async def scenario() -> None:
        async with watched(fake_api, source, recorder):
            await fake_api.go_down()
            if gap == "taint":
                edit(fake_api, add_taint)
            else:
                fake_api.delete("nodes", None, NODE)
            if expiry == "history-compacted":
                fake_api.compact()
            else:
                fake_api.fail_next(1, status=410, verb="watch", resource="nodes")
            await fake_api.come_back()
            await recorder.reports(2)
            await eventually(lambda: source.relists_total == 1)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert recorder.eligibility() == [ELIGIBLE, expected]
    assert source.errors_total["expired"] == 1
    lists = queries(fake_api, "list", "nodes")
    assert len(lists) == 2 and all(q["fieldSelector"] == f"metadata.name={NODE}" for q in lists)


def test_node_watch_resumes_from_a_bookmark_without_relisting(
    fake_api: FakeApiServer, source: KubernetesSource, recorder: Recorder
) -> None:
    fake_api.create("nodes", node())

    async def scenario() -> str:
        async with watched(fake_api, source, recorder):
            fake_api.create("nodes", node("node-b"))  # moves the global resourceVersion on, unseen here
            assert fake_api.bookmark_now() == 1
            bookmark = str(fake_api.current_rv)
            await eventually(lambda: source.events_total["BOOKMARK"] == 1)
            fake_api.end_streams()
            await fake_api.wait_for_requests(2, "watch", "nodes")
            edit(fake_api, add_taint)
            await recorder.reports(2)
            return bookmark

    bookmark = fake_api.run(scenario(), timeout=TIMEOUT)
    assert queries(fake_api, "watch", "nodes")[1]["resourceVersion"] == bookmark
    assert recorder.eligibility() == [ELIGIBLE, TAINTED]
    assert source.relists_total == 0
    assert source.watch_restarts_total == 1


def test_forbidden_node_watch_names_the_rbac_grant_and_recovers(
    fake_api: FakeApiServer, source: KubernetesSource, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    fake_api.create("nodes", node())
    fake_api.forbid("nodes", "watch")

    async def scenario() -> None:
        async with watching(source, recorder):
            await eventually(lambda: source.errors_total["permission"] >= 2)
            fake_api.allow("nodes", "watch")
            await fake_api.wait_for_watches(1, "nodes")
            edit(fake_api, add_taint)
            await recorder.until(lambda seen: len(seen) == 2)

    with caplog.at_level(logging.ERROR, logger="aproxy.sources.kube.watch"):
        fake_api.run(scenario(), timeout=TIMEOUT)
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert errors
    assert all(
        message.startswith(
            "RBAC: aproxy cannot watch nodes at the cluster scope; grant list and watch on nodes"
        )
        for message in errors
    )
    # One list, then watches refused and retried from its resourceVersion: the node was reported once.
    assert recorder.eligibility() == [ELIGIBLE, TAINTED]
    assert source.relists_total == 0
    assert source.last_retry_delay == FAST_LIMITS.permission_interval


def test_services_and_slices_gate_does_not_wait_for_the_node(
    fake_api: FakeApiServer, source: KubernetesSource, recorder: Recorder, sink: RecordingSink
) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])
    fake_api.create("nodes", node())
    fake_api.forbid("nodes")

    async def scenario() -> None:
        async with running(source, sink), watching(source, recorder):
            await synced(fake_api, sink)
            await eventually(lambda: source.errors_total["permission"] >= 1)
            assert source.listed
            assert recorder.seen == []  # the node is not known yet; the services and slices flow regardless
            fake_api.allow("nodes")
            await recorder.reports(1)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert recorder.eligibility() == [ELIGIBLE]
    assert source.tracked("services") == 1 and source.tracked("endpointslices") == 1
    assert {q["labelSelector"] for q in queries(fake_api, "list", "services")} == {LABEL_SELECTOR}
    assert all("fieldSelector" not in q for q in queries(fake_api, "list", "services"))
