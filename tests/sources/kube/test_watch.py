"""The Kubernetes source's list/watch loop against the fake API server: the real kubernetes-asyncio client
over real HTTP, feeding a recording sink (helpers.py)."""

from __future__ import annotations

import logging

import pytest

from aproxy.backends.memory import MemoryBackend
from aproxy.core.model import ServiceKey, ServiceState
from aproxy.core.plan import Planner
from aproxy.sources.kube.resources import LABEL_SELECTOR
from aproxy.sources.kube.watch import KubernetesSource, snapshot
from tests.fakeapi.protocol import bool_param
from tests.fakeapi.server import CutMode, FakeApiServer
from tests.sources.kube.helpers import (
    CTX,
    NS,
    TIMEOUT,
    RecordingSink,
    create_service,
    create_services,
    endpoint_slice,
    eventually,
    key,
    make_source,
    queries,
    reals,
    running,
    running_synced,
    service,
    synced,
)

# --- initial sync ---------------------------------------------------------------------------------------


def test_initial_sync_lists_in_pages_and_initializes_only_after_both_lists(
    fake_api: FakeApiServer, sink: RecordingSink
) -> None:
    for index in range(7):
        create_service(fake_api, f"s{index}", [f"10.244.0.{index + 1}"])
    fake_api.forbid("endpointslices", "list")
    source = make_source(fake_api, page_size=3)

    async def scenario() -> None:
        async with running(source, sink):
            await sink.until(lambda: ("mark_listed", "services") in sink.calls)
            await fake_api.wait_for_requests(2, "list", "endpointslices")  # refused, and retried
            assert not sink.tracker.initialized
            assert not source.listed
            fake_api.allow("endpointslices", "list")
            await synced(fake_api, sink)
            assert source.listed

    fake_api.run(scenario(), timeout=TIMEOUT)
    names = [f"s{index}" for index in range(7)]
    assert sink.tracker.services() == {key(name) for name in names}
    assert all(reals(sink.tracker, name) == [(f"10.244.0.{i + 1}", 8080)] for i, name in enumerate(names))
    assert sorted(sink.calls) == sorted(
        [("upsert_service", f"{NS}/{name}") for name in names]
        + [("upsert_slice", f"{NS}/{name}-1") for name in names]
        + [("mark_listed", "services"), ("mark_listed", "endpointslices")]
    )
    service_lists = queries(fake_api, "list", "services")
    assert [(q["limit"], "continue" in q) for q in service_lists] == [("3", False), ("3", True), ("3", True)]
    assert {q["labelSelector"] for q in service_lists} == {LABEL_SELECTOR}
    slice_lists = queries(fake_api, "list", "endpointslices")
    assert [("continue" in q) for q in slice_lists[-3:]] == [False, True, True]
    watches = queries(fake_api, "watch", "services")
    assert len(watches) == 1
    assert watches[0]["resourceVersion"] == source.resource_version("services")
    assert bool_param(watches[0]["allowWatchBookmarks"])  # the client sends "True": the server's ParseBool
    assert int(watches[0]["timeoutSeconds"]) >= 300
    assert source.relists_total == 0


def test_snapshot_lists_both_kinds_once_into_the_sink(fake_api: FakeApiServer, sink: RecordingSink) -> None:
    for index in range(5):
        create_service(fake_api, f"s{index}", [f"10.244.0.{index + 1}"])

    async def scenario() -> None:
        await snapshot(fake_api.configuration(), sink, page_size=2)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert sink.tracker.initialized
    assert sink.tracker.services() == {key(f"s{index}") for index in range(5)}
    assert fake_api.count("list", "services") == 3
    assert fake_api.count("watch") == 0


# --- watch ----------------------------------------------------------------------------------------------


def test_burst_of_updates_coalesces_in_the_tracker(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource
) -> None:
    create_services(fake_api, "a", "b")

    async def scenario() -> None:
        async with running_synced(fake_api, source, sink):
            sink.tracker.take_dirty()
            for index in range(2, 22):
                fake_api.update("endpointslices", endpoint_slice("a-1", "a", [f"10.244.1.{index}"]))
            last = fake_api.update("endpointslices", endpoint_slice("b-1", "b", ["10.244.2.2"]))
            version = last["metadata"]["resourceVersion"]
            await sink.until(lambda: sink.versions.get(f"upsert_slice {NS}/b-1") == version)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert sink.tracker.take_dirty() == {key("a"), key("b")}
    assert reals(sink.tracker, "a") == [("10.244.1.21", 8080)]
    assert reals(sink.tracker, "b") == [("10.244.2.2", 8080)]
    assert sink.count("upsert_slice", f"{NS}/a-1") == 1 + 20
    assert source.events_total["MODIFIED"] == 21


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(CutMode.ABORT, id="connection-dropped-mid-line"),
        pytest.param(CutMode.EOF, id="stream-ends-mid-line"),
    ],
)
def test_dropped_stream_resumes_from_the_last_resource_version(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource, mode: CutMode
) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])

    async def scenario() -> str:
        async with running_synced(fake_api, source, sink):
            created = fake_api.create("services", service("b"))
            await sink.until(lambda: sink.count("upsert_service", f"{NS}/b") == 1)
            assert fake_api.close_streams_mid_event(mode) == 2
            fake_api.create("services", service("c"))  # its line is cut in half
            fake_api.create("services", service("d"))
            await sink.until(lambda: sink.count("upsert_service", f"{NS}/d") == 1)
            return str(created["metadata"]["resourceVersion"])

    last_good = fake_api.run(scenario(), timeout=TIMEOUT)
    watches = queries(fake_api, "watch", "services")
    assert len(watches) == 2
    assert watches[1]["resourceVersion"] == last_good
    service_upserts = [call for call in sink.calls if call[0] == "upsert_service"]
    assert service_upserts == [("upsert_service", f"{NS}/{name}") for name in "abcd"]
    assert sink.tracker.services() == {key(name) for name in "abcd"}
    assert source.relists_total == 0
    assert source.errors_total["stream"] == 1
    assert source.malformed_events == 0  # the half line is a broken stream, not a bad event


def test_stalled_stream_is_abandoned_and_resumed(fake_api: FakeApiServer, sink: RecordingSink) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])
    source = make_source(fake_api, stall_timeout=0.3)

    async def scenario() -> None:
        async with running_synced(fake_api, source, sink):
            watches = fake_api.count("watch", "services")
            fake_api.stall_streams()  # open streams go silent; new watches get no answer either
            fake_api.create("services", service("b"))
            await fake_api.wait_for_requests(watches + 1, "watch", "services")  # gave up on the silent one
            fake_api.unstall()
            await sink.until(lambda: sink.count("upsert_service", f"{NS}/b") == 1)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert sink.tracker.services() == {key("a"), key("b")}
    assert sink.count("upsert_service", f"{NS}/b") == 1
    assert source.relists_total == 0


def test_server_side_timeout_rewatches_from_the_newest_bookmark(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource
) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])

    async def scenario() -> str:
        async with running_synced(fake_api, source, sink):
            fake_api.create("nodes", {"metadata": {"name": "other-resource-write"}})  # moves the global RV on
            assert fake_api.bookmark_now() == 2
            bookmark = str(fake_api.current_rv)
            await eventually(
                lambda: (
                    source.resource_version("services")
                    == source.resource_version("endpointslices")
                    == bookmark
                )
            )
            fake_api.end_streams()
            await fake_api.wait_for_requests(2, "watch", "services")
            return bookmark

    bookmark = fake_api.run(scenario(), timeout=TIMEOUT)
    assert queries(fake_api, "watch", "services")[1]["resourceVersion"] == bookmark
    assert source.events_total["BOOKMARK"] == 2
    assert source.watch_restarts_total >= 1
    assert not any(obj["metadata"].get("name") in (None, "") for obj in sink.objects)  # bookmarks never fed


# --- 410: relist with only the real differences ---------------------------------------------------------


async def apply(
    planner: Planner, backend: MemoryBackend, desired: dict[ServiceKey, ServiceState | None]
) -> int:
    plan = planner.plan(desired)
    results = await backend.apply(plan.operations)
    assert all(result.ok for result in results), [r.error for r in results if not r.ok]
    for result in results:
        planner.record(result.operation)
    return len(results)


@pytest.mark.parametrize(
    "expiry",
    [
        pytest.param("history-compacted", id="410-error-event"),
        pytest.param("http-410", id="410-on-the-watch-request"),
    ],
)
def test_expired_watch_relists_and_emits_only_real_differences(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource, expiry: str
) -> None:
    for name in "abcd":
        create_service(fake_api, name, [f"10.244.{ord(name)}.1", f"10.244.{ord(name)}.2"])
    planner = Planner()
    backend = MemoryBackend()

    async def scenario() -> tuple[set[ServiceKey], set[ServiceKey]]:
        async with running_synced(fake_api, source, sink):
            tracker = sink.tracker
            initial = {k: tracker.desired(k, CTX)[0] for k in tracker.take_dirty()}
            assert await apply(planner, backend, initial) > 0
            backend.applied.clear()
            sink.take()
            await fake_api.go_down()
            # The gap: changes no watch will deliver.
            fake_api.update("services", service("b", labels={"team": "payments"}))  # new RV, same translation
            fake_api.update("endpointslices", endpoint_slice("c-1", "c", ["10.244.99.1"]))
            fake_api.delete("endpointslices", NS, "d-1")
            fake_api.delete("services", NS, "d")
            create_service(fake_api, "e", ["10.244.101.1"])
            if expiry == "history-compacted":
                fake_api.compact()
            else:
                for kind in ("services", "endpointslices"):
                    fake_api.fail_next(1, status=410, verb="watch", resource=kind)
            await fake_api.come_back()
            await eventually(lambda: source.relists_total == 2)
            dirty = tracker.take_dirty()
            plan = planner.plan({k: tracker.desired(k, CTX)[0] for k in dirty})
            await apply(planner, backend, {k: tracker.desired(k, CTX)[0] for k in dirty})
            return dirty, plan.services_of(plan.operations)

    dirty, planned = fake_api.run(scenario(), timeout=TIMEOUT)
    assert dirty == {key("c"), key("d"), key("e")}
    assert planned == {key("c"), key("d"), key("e")}  # zero operations for a and b
    assert sorted(sink.calls) == sorted(
        [
            ("upsert_service", f"{NS}/b"),  # its RV changed: the tracker compares content and ignores it
            ("upsert_slice", f"{NS}/c-1"),
            ("delete_slice", f"{NS}/d-1"),
            ("delete_service", f"{NS}/d"),
            ("upsert_service", f"{NS}/e"),
            ("upsert_slice", f"{NS}/e-1"),
        ]
    )
    assert not any(subject.startswith(f"{NS}/a") for _, subject in sink.calls)
    assert source.errors_total["expired"] == 2
    lists = queries(fake_api, "list", "services")
    assert len(lists) == 2 and "resourceVersion" not in lists[1]  # a consistent relist, not from the cache


# --- outages and refusals -------------------------------------------------------------------------------


def test_api_down_keeps_the_last_state_then_catches_up(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource
) -> None:
    create_services(fake_api, "a", "b")

    async def scenario() -> None:
        async with running_synced(fake_api, source, sink):
            sink.take()
            refused = fake_api.count("watch")
            await fake_api.go_down()
            fake_api.update("endpointslices", endpoint_slice("a-1", "a", ["10.244.1.2"]))
            fake_api.delete("services", NS, "b")
            await eventually(lambda: source.errors_total["connection"] >= 3)
            # Down for several retries: nothing was dropped, nothing changed.
            assert sink.calls == []
            assert sink.tracker.services() == {key("a"), key("b")}
            assert reals(sink.tracker, "a") == [("10.244.1.1", 8080)]
            assert fake_api.count("watch") == refused  # the server saw none of the failed attempts
            await fake_api.come_back()
            await sink.until(lambda: ("delete_service", f"{NS}/b") in sink.calls)
            await sink.until(lambda: ("upsert_slice", f"{NS}/a-1") in sink.calls)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert sink.tracker.services() == {key("a")}
    assert reals(sink.tracker, "a") == [("10.244.1.2", 8080)]
    assert source.relists_total == 0  # the history still had the gap: resumed by watch alone
    assert sorted(sink.calls) == [("delete_service", f"{NS}/b"), ("upsert_slice", f"{NS}/a-1")]


@pytest.mark.parametrize(
    ("verb", "resource", "expected"),
    [
        pytest.param(
            "watch",
            "endpointslices",
            "RBAC: aproxy cannot watch endpointslices.discovery.k8s.io at the cluster scope",
            id="watch-endpointslices",
        ),
        pytest.param(
            "list", "services", "RBAC: aproxy cannot list services at the cluster scope", id="list-services"
        ),
    ],
)
def test_forbidden_is_reported_clearly_and_recovers_once_allowed(
    fake_api: FakeApiServer,
    sink: RecordingSink,
    source: KubernetesSource,
    caplog: pytest.LogCaptureFixture,
    verb: str,
    resource: str,
    expected: str,
) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])
    fake_api.forbid(resource, verb)

    async def scenario() -> None:
        async with running(source, sink):
            await eventually(lambda: source.errors_total["permission"] >= 2)
            fake_api.allow(resource, verb)
            await synced(fake_api, sink)
            fake_api.update("endpointslices", endpoint_slice("a-1", "a", ["10.244.1.2"]))
            await sink.until(lambda: sink.count("upsert_slice", f"{NS}/a-1") == 2)

    with caplog.at_level(logging.ERROR, logger="aproxy.sources.kube.watch"):
        fake_api.run(scenario(), timeout=TIMEOUT)
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert errors
    assert all(expected in record.getMessage() for record in errors)
    assert "grant list and watch" in errors[0].getMessage()
    assert reals(sink.tracker, "a") == [("10.244.1.2", 8080)]


@pytest.mark.parametrize(
    ("status", "retry_after", "verb", "kind"),
    [
        pytest.param(500, None, "list", "server", id="500-on-list"),
        pytest.param(503, None, "watch", "server", id="503-on-watch"),
        pytest.param(429, 1, "list", "throttled", id="429-with-retry-after"),
    ],
)
def test_server_errors_and_throttling_are_retried(
    fake_api: FakeApiServer,
    sink: RecordingSink,
    source: KubernetesSource,
    status: int,
    retry_after: int | None,
    verb: str,
    kind: str,
) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])
    fake_api.fail_next(2, status=status, retry_after=retry_after, verb=verb, resource="services")

    async def scenario() -> None:
        async with running(source, sink):
            await synced(fake_api, sink)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert source.errors_total[kind] == 2
    assert fake_api.count(verb, "services") == 3
    assert fake_api.count("list", "services") == (
        3 if verb == "list" else 1
    )  # a failed watch is not a relist
    assert sink.tracker.services() == {key("a")}
    if retry_after is not None:
        assert source.last_retry_delay is not None and source.last_retry_delay >= retry_after


def test_malformed_events_are_skipped_and_counted_while_later_events_arrive(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource
) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])
    bad_lines = [
        b"this is not json",
        b'{"type":"ADDED"}',
        b'{"type":"MODIFIED","object":{"metadata":{"namespace":"shop","resourceVersion":"1"}}}',
        b'{"type":"SURPRISE","object":{"metadata":{"namespace":"shop","name":"x","resourceVersion":"1"}}}',
        b"[1, 2, 3]",
    ]

    async def scenario() -> None:
        async with running_synced(fake_api, source, sink):
            for line in bad_lines:
                assert fake_api.send_raw_line(line) == 2  # both watches get every line
            fake_api.create("services", service("b"))
            await sink.until(lambda: sink.count("upsert_service", f"{NS}/b") == 1)
            await eventually(lambda: source.malformed_events == 2 * len(bad_lines))

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert source.malformed_events == 2 * len(bad_lines)
    assert sink.tracker.services() == {key("a"), key("b")}
    assert fake_api.count("watch") == 2  # never fatal: the same two watches carried on
    assert source.relists_total == 0


# --- label selection ------------------------------------------------------------------------------------


def test_service_proxy_name_and_headless_labels_are_filtered_at_the_server(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource
) -> None:
    other_proxy = {"service.kubernetes.io/service-proxy-name": "other"}
    create_service(fake_api, "mine", ["10.244.1.1"])
    fake_api.create("services", service("theirs", labels=other_proxy))
    fake_api.create(
        "endpointslices", endpoint_slice("theirs-1", "theirs", ["10.244.2.1"], labels=other_proxy)
    )
    fake_api.create(
        "endpointslices",
        endpoint_slice("headless-1", "headless", ["10.244.3.1"], {"service.kubernetes.io/headless": ""}),
    )

    async def scenario() -> None:
        async with running_synced(fake_api, source, sink):
            assert sink.tracker.services() == {key("mine")}
            assert source.tracked("endpointslices") == 1
            sink.take()
            fake_api.update("services", service("mine", labels=other_proxy))  # leaves the selection
            fake_api.update("services", service("theirs"))  # enters it
            await sink.until(lambda: len(sink.calls) == 2)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert sink.calls == [("delete_service", f"{NS}/mine"), ("upsert_service", f"{NS}/theirs")]
    assert sink.tracker.services() == {key("theirs")}
    assert {q["labelSelector"] for q in queries(fake_api, "list", "endpointslices")} == {LABEL_SELECTOR}
    assert LABEL_SELECTOR == "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


def test_objects_are_trimmed_to_what_translation_reads(fake_api: FakeApiServer, sink: RecordingSink) -> None:
    fake_api.create(
        "services",
        {
            **service("a"),
            "metadata": {
                "namespace": NS,
                "name": "a",
                "annotations": {"aproxy.io/scheduler": "wrr"},
                "managedFields": [{"manager": "kubectl"}],
            },
        },
    )

    async def scenario() -> None:
        await snapshot(fake_api.configuration(), sink)

    fake_api.run(scenario(), timeout=TIMEOUT)
    (obj,) = sink.objects
    assert set(obj) == {"metadata", "spec", "status"}
    assert set(obj["metadata"]) == {"name", "namespace", "resourceVersion", "annotations"}
    assert obj["status"] == {"loadBalancer": {}}
    assert sink.tracker.desired(key("a"), CTX)[0] is not None


# --- shutdown -------------------------------------------------------------------------------------------


def test_cancelling_the_source_closes_its_watches(
    fake_api: FakeApiServer, sink: RecordingSink, source: KubernetesSource
) -> None:
    create_service(fake_api, "a", ["10.244.1.1"])

    async def scenario() -> None:
        async with running(source, sink):
            await synced(fake_api, sink)
        await fake_api.wait_until(lambda: fake_api.active_watches() == 0)

    fake_api.run(scenario(), timeout=TIMEOUT)
    assert fake_api.active_watches() == 0
    assert source.listed
