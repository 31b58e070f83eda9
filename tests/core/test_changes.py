"""ChangeTracker: what marks a service dirty, what it answers, and how skips are reported."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aproxy.core.changes import ChangeTracker, UnknownKindError
from aproxy.core.model import ServiceKey, ServiceState
from aproxy.core.objects import ServiceInfo, Severity, Skip, SliceInfo, parse_service, parse_slice
from aproxy.core.translate import TranslationContext, translate_all, translate_service
from tests.core.k8s import endpoint, endpoint_slice, service

CTX = TranslationContext("node-a", frozenset({ip_address("192.0.2.10")}))
WEB = ServiceKey("default", "web")
API = ServiceKey("default", "api")
PROXY_LABEL = {"service.kubernetes.io/service-proxy-name": "other"}
HEADLESS_LABEL = {"service.kubernetes.io/headless": ""}

# A step: ("service", raw) | ("slice", raw) | ("delete_service", ns, name) | ("delete_slice", ns, name)
Step = tuple[Any, ...]


def apply(tracker: ChangeTracker, step: Step) -> bool:
    match step:
        case ("service", raw):
            return tracker.upsert_service(raw)
        case ("slice", raw):
            return tracker.upsert_slice(raw)
        case ("delete_service", namespace, name):
            return tracker.delete_service(namespace, name)
        case ("delete_slice", namespace, name):
            return tracker.delete_slice(namespace, name)
    raise AssertionError(f"bad step {step!r}")


def tracker_after(steps: Sequence[Step]) -> ChangeTracker:
    """A tracker that has taken ``steps`` in, with its dirty set and skip reports drained."""
    tracker = ChangeTracker()
    for step in steps:
        apply(tracker, step)
    tracker.take_dirty()
    tracker.new_skips()
    return tracker


def web_slice(
    *addresses: str, name: str = "web-1", service_name: str = "web", **kwargs: Any
) -> dict[str, Any]:
    return endpoint_slice(service_name, name=name, endpoints=[endpoint(a) for a in addresses], **kwargs)


BAD_SERVICE = service(cluster_ips="10.0.0.300")


@pytest.mark.parametrize(
    ("before", "step", "dirty"),
    [
        pytest.param([], ("service", service()), {WEB}, id="new-service-dirty"),
        pytest.param(
            [("service", service(resource_version="1"))],
            ("service", service(resource_version="1")),
            set(),
            id="same-resource-version-not-dirty",
        ),
        pytest.param(
            [("service", service(resource_version="1"))],
            ("service", service(resource_version="2", labels={"team": "x"}, annotations={"note": "y"})),
            set(),
            id="same-content-new-resource-version-not-dirty",
        ),
        pytest.param(
            [("service", service())], ("service", service()), set(), id="same-content-no-version-not-dirty"
        ),
        pytest.param(
            [("service", service())],
            ("service", service(cluster_ips="10.96.0.2")),
            {WEB},
            id="changed-service-dirty",
        ),
        pytest.param(
            [("service", service())],
            ("service", service(scheduler="wrr")),
            {WEB},
            id="scheduler-annotation-dirty",
        ),
        pytest.param(
            [("service", service())], ("delete_service", "default", "web"), {WEB}, id="delete-service-dirty"
        ),
        pytest.param([], ("delete_service", "default", "web"), set(), id="delete-unknown-service-not-dirty"),
        pytest.param(
            [("service", service())], ("service", BAD_SERVICE), {WEB}, id="bad-update-makes-service-absent"
        ),
        pytest.param([], ("service", BAD_SERVICE), set(), id="bad-new-service-not-dirty"),
        pytest.param(
            [("service", service())],
            ("service", service(labels=PROXY_LABEL)),
            {WEB},
            id="proxy-name-label-gained",
        ),
        pytest.param(
            [("service", service(labels=PROXY_LABEL))],
            ("service", service()),
            {WEB},
            id="proxy-name-label-lost",
        ),
        pytest.param(
            [("service", service(labels=PROXY_LABEL, resource_version="1"))],
            ("service", service(labels=PROXY_LABEL, resource_version="2", cluster_ips="10.96.0.9")),
            set(),
            id="proxy-name-service-changes-not-dirty",
        ),
        pytest.param(
            [("service", service())], ("slice", web_slice("10.244.1.5")), {WEB}, id="new-slice-dirty"
        ),
        pytest.param(
            [("slice", web_slice("10.244.1.5", resource_version="1"))],
            ("slice", web_slice("10.244.1.5", resource_version="1")),
            set(),
            id="slice-same-resource-version-not-dirty",
        ),
        pytest.param(
            [("slice", web_slice("10.244.1.5", resource_version="1"))],
            ("slice", web_slice("10.244.1.5", resource_version="2")),
            set(),
            id="slice-same-content-not-dirty",
        ),
        pytest.param(
            [("slice", web_slice("10.244.1.5"))],
            ("slice", web_slice("10.244.1.5", "10.244.1.6")),
            {WEB},
            id="slice-endpoint-change-dirty",
        ),
        pytest.param(
            [("slice", web_slice("10.244.1.5"))],
            ("slice", web_slice("10.244.1.5", service_name="api")),
            {WEB, API},
            id="slice-relabel-dirties-old-and-new-service",
        ),
        pytest.param(
            [("slice", web_slice("10.244.1.5"))],
            ("delete_slice", "default", "web-1"),
            {WEB},
            id="slice-delete-dirty",
        ),
        pytest.param([], ("delete_slice", "default", "web-1"), set(), id="delete-unknown-slice-not-dirty"),
        pytest.param(
            [("slice", web_slice("10.244.1.5"))],
            ("slice", web_slice("10.244.1.5", labels=HEADLESS_LABEL)),
            {WEB},
            id="slice-gains-headless-label-like-delete",
        ),
        pytest.param(
            [], ("slice", web_slice("10.244.1.5", labels=HEADLESS_LABEL)), set(), id="headless-slice-ignored"
        ),
        pytest.param(
            [], ("slice", web_slice("10.244.1.5", labels=PROXY_LABEL)), set(), id="proxy-name-slice-ignored"
        ),
        pytest.param(
            [("slice", web_slice("10.244.1.5"))],
            ("slice", web_slice("10.244.1.5", address_type="IPX")),
            {WEB},
            id="bad-slice-update-drops-it",
        ),
        pytest.param(
            [("service", service()), ("slice", web_slice("10.244.1.5"))],
            ("slice", web_slice("10.244.1.5", name="api-1", service_name="api")),
            {API},
            id="other-service-slice-leaves-web-clean",
        ),
    ],
)
def test_dirty(before: list[Step], step: Step, dirty: set[ServiceKey]) -> None:
    tracker = tracker_after(before)
    changed = apply(tracker, step)
    assert tracker.dirty_count == len(dirty)
    assert tracker.take_dirty() == dirty
    assert changed == bool(dirty)
    assert tracker.take_dirty() == set()  # taken once


def summary(state: ServiceState | None) -> dict[str, list[str]] | None:
    if state is None:
        return None
    return {str(vs.key): [str(real.key) for real in vs.real_servers] for vs in state.virtual_servers}


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(
            [("service", service()), ("slice", web_slice("10.244.1.5"))],
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]},
            id="present-service-translated",
        ),
        pytest.param(
            [
                ("service", service()),
                ("slice", web_slice("10.244.1.5")),
                ("delete_service", "default", "web"),
            ],
            None,
            id="deleted-service-with-slices-absent",
        ),
        pytest.param([("slice", web_slice("10.244.1.5"))], None, id="slices-without-service-absent"),
        pytest.param([("service", service(labels=PROXY_LABEL))], None, id="proxy-name-service-absent"),
        pytest.param(
            [("service", service()), ("service", BAD_SERVICE)], None, id="unparseable-service-absent"
        ),
        pytest.param([("service", service(cluster_ips="None"))], {}, id="headless-service-present-and-empty"),
        pytest.param(
            [
                ("service", service()),
                ("slice", web_slice("10.244.1.5")),
                ("slice", web_slice("10.244.1.5", service_name="api")),
            ],
            {"TCP 10.96.0.1:80": []},
            id="relabelled-slice-leaves-old-service",
        ),
        pytest.param(
            [
                ("service", service()),
                ("slice", web_slice("10.244.1.5")),
                ("slice", web_slice("10.244.1.6", name="web-2")),
                ("slice", web_slice("10.244.1.5", labels=HEADLESS_LABEL)),
            ],
            {"TCP 10.96.0.1:80": ["10.244.1.6:8080"]},
            id="headless-labelled-slice-dropped",
        ),
    ],
)
def test_desired(steps: list[Step], expected: dict[str, list[str]] | None) -> None:
    tracker = tracker_after(steps)
    state, _ = tracker.desired(WEB, CTX)
    assert summary(state) == expected
    assert (WEB in tracker.services()) == (expected is not None)


def test_inputs_are_the_services_own_slices_sorted_by_name() -> None:
    tracker = tracker_after(
        [
            ("service", service()),
            ("slice", web_slice("10.244.1.7", name="web-b")),
            ("slice", web_slice("10.244.1.6", name="web-a")),
            ("slice", web_slice("10.244.9.9", name="api-a", service_name="api")),
            ("slice", endpoint_slice("web", "elsewhere", name="web-c")),
        ]
    )
    service_info, slices = tracker.inputs(WEB)
    assert isinstance(service_info, ServiceInfo)
    assert [s.name for s in slices] == ["web-a", "web-b"]
    state, skips = tracker.desired(WEB, CTX)
    assert state == translate_service(service_info, slices, CTX).state
    assert skips == ()


def test_deleted_service_keeps_its_slices_for_a_later_add() -> None:
    tracker = tracker_after(
        [("service", service()), ("slice", web_slice("10.244.1.5")), ("delete_service", "default", "web")]
    )
    assert tracker.inputs(WEB)[0] is None
    assert [s.name for s in tracker.inputs(WEB)[1]] == ["web-1"]
    tracker.upsert_service(service())
    assert summary(tracker.desired(WEB, CTX)[0]) == {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]}


# --- skips: each reported once ---------------------------------------------------------------------------


def bad_endpoint_slice(**kwargs: Any) -> dict[str, Any]:
    return web_slice("10.244.1.5", "10.244.1.300", **kwargs)


@pytest.mark.parametrize(
    ("steps", "reported"),
    [
        pytest.param(
            [("service", BAD_SERVICE), ("service", BAD_SERVICE)],
            [1, 0],
            id="skip-reported-once",
        ),
        pytest.param(
            [("service", BAD_SERVICE), ("service", BAD_SERVICE | {"status": {"x": 1}})],
            [1, 0],
            id="same-skip-other-content-not-new",
        ),
        pytest.param(
            [("service", BAD_SERVICE), ("service", service()), ("service", BAD_SERVICE)],
            [1, 0, 1],
            id="skip-reported-again-after-fix",
        ),
        pytest.param(
            [("service", BAD_SERVICE), ("delete_service", "default", "web"), ("service", BAD_SERVICE)],
            [1, 0, 1],
            id="skip-reported-again-after-delete",
        ),
        pytest.param(
            [("service", service(scheduler="x", resource_version="1")), ("service", service(scheduler="x"))],
            [1, 0],
            id="warning-reported-once",
        ),
        pytest.param(
            [("service", service(scheduler="x")), ("service", service(scheduler="y"))],
            [1, 1],
            id="changed-warning-is-new",
        ),
        pytest.param(
            [("slice", bad_endpoint_slice()), ("slice", bad_endpoint_slice(resource_version="2"))],
            [1, 0],
            id="endpoint-skip-reported-once",
        ),
        pytest.param(
            [
                ("slice", web_slice("10.244.1.5", address_type="IPX")),
                ("slice", web_slice("10.244.1.5", address_type="IPX")),
            ],
            [1, 0],
            id="slice-skip-reported-once",
        ),
        pytest.param(
            [("service", service(labels=PROXY_LABEL, scheduler="x", external_ips=["bad"]))],
            [0],
            id="other-proxys-service-not-reported",
        ),
    ],
)
def test_skips_reported_once(steps: list[Step], reported: list[int]) -> None:
    tracker = ChangeTracker()
    counts = []
    for step in steps:
        apply(tracker, step)
        counts.append(len(tracker.new_skips()))
    assert counts == reported


def test_skip_reports_and_counts() -> None:
    tracker = ChangeTracker()
    tracker.upsert_service(BAD_SERVICE)
    tracker.upsert_service(service("api", scheduler="fastest"))
    tracker.upsert_slice(bad_endpoint_slice())
    tracker.upsert_slice(["not", "a", "slice"])
    assert tracker.new_skips() == [
        Skip("Service", "default", "web", 'invalid clusterIP "10.0.0.300"'),
        Skip(
            "Service",
            "default",
            "api",
            'annotation aproxy.io/scheduler: unknown scheduler "fastest", using the default',
            Severity.WARNING,
        ),
        Skip(
            "EndpointSlice",
            "default",
            "web-1",
            'invalid endpoint address "10.244.1.300" in endpoints[1]',
            Severity.WARNING,
        ),
        Skip("EndpointSlice", "", "", "object is not an object: ['not', 'a', 'slice']"),
    ]
    assert tracker.new_skips() == []
    assert tracker.skipped_total == {"Service": 2, "EndpointSlice": 2}
    assert tracker.skip_counts == {
        ("Service", Severity.ERROR): 1,
        ("Service", Severity.WARNING): 1,
        ("EndpointSlice", Severity.WARNING): 1,
        ("EndpointSlice", Severity.ERROR): 1,
    }


def test_change_and_object_counts() -> None:
    tracker = ChangeTracker()
    tracker.upsert_service(service())
    tracker.upsert_service(service())  # unchanged: not a change
    tracker.upsert_slice(web_slice("10.244.1.5"))
    tracker.upsert_slice(web_slice("10.244.1.5", service_name="api"))  # one event, two services dirty
    assert (tracker.service_changes_total, tracker.slice_changes_total) == (1, 2)
    assert (tracker.service_count, tracker.slice_count) == (1, 1)


# --- the initialized gate -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listed", "initialized"),
    [
        pytest.param([], False, id="nothing-listed"),
        pytest.param(["services"], False, id="only-services-listed"),
        pytest.param(["endpointslices"], False, id="only-slices-listed"),
        pytest.param(["services", "endpointslices"], True, id="both-listed"),
        pytest.param(["services", "services"], False, id="services-twice"),
    ],
)
def test_initialized_after_both_lists(listed: list[Any], initialized: bool) -> None:
    tracker = ChangeTracker()
    for kind in listed:
        tracker.mark_listed(kind)
    assert tracker.initialized is initialized


def test_mark_listed_rejects_unknown_kind() -> None:
    with pytest.raises(UnknownKindError, match="pods"):
        ChangeTracker().mark_listed("pods")  # type: ignore[arg-type]


# --- incremental == from scratch ---------------------------------------------------------------------------

SERVICE_NAMES = ("web", "api")
SLICE_NAMES = ("s1", "s2", "s3")
service_variants = st.sampled_from(
    [
        {},
        {"cluster_ips": "10.96.0.2"},
        {"cluster_ips": ["10.96.0.3", "fd00:10:96::3"]},
        {"type_": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
        {"internal_policy": "Local"},
        {"external_ips": ["203.0.113.7", "bad"]},
        {"scheduler": "mh", "affinity": 60},
        {"cluster_ips": "None"},
        {"labels": PROXY_LABEL},
        {"cluster_ips": "10.0.0.300"},
    ]
)
endpoints = st.lists(
    st.builds(
        lambda last, ready, node: endpoint(f"10.244.0.{last}", ready=ready, node=node),
        st.integers(1, 4),
        st.sampled_from([None, True, False]),
        st.sampled_from([None, "node-a", "node-b"]),
    ),
    max_size=3,
)
slice_variants = st.sampled_from(
    [{}, {"labels": HEADLESS_LABEL}, {"address_type": "IPX"}, {"address_type": "FQDN"}]
)
steps = st.one_of(
    st.tuples(st.just("service"), st.sampled_from(SERVICE_NAMES), service_variants),
    st.tuples(
        st.just("slice"),
        st.sampled_from(SLICE_NAMES),
        st.sampled_from(SERVICE_NAMES),
        endpoints,
        slice_variants,
    ),
    st.tuples(st.just("delete_service"), st.sampled_from(SERVICE_NAMES)),
    st.tuples(st.just("delete_slice"), st.sampled_from(SLICE_NAMES)),
)


def from_scratch(services: dict[str, Any], slices: dict[str, Any]) -> dict[ServiceKey, ServiceState]:
    service_infos = [info for info in map(parse_service, services.values()) if isinstance(info, ServiceInfo)]
    slice_infos = [info for info in map(parse_slice, slices.values()) if isinstance(info, SliceInfo)]
    states, _ = translate_all(service_infos, slice_infos, CTX)
    return states


@settings(max_examples=300)
@given(st.lists(steps, max_size=25))
def test_incremental_equals_from_scratch(sequence: list[tuple[Any, ...]]) -> None:
    """After every step, a service not marked dirty wants what it wanted before; at the end every service
    wants exactly what a from-scratch translation of the last-seen objects gives."""
    tracker = ChangeTracker()
    services: dict[str, Any] = {}
    slices: dict[str, Any] = {}
    keys = [ServiceKey("default", name) for name in SERVICE_NAMES]
    last = {key: None for key in keys}
    for step in sequence:
        match step:
            case ("service", name, variant):
                services[name] = service(name, **variant)
                tracker.upsert_service(services[name])
            case ("slice", name, service_name, eps, variant):
                slices[name] = endpoint_slice(service_name, name=name, endpoints=eps, **variant)
                tracker.upsert_slice(slices[name])
            case ("delete_service", name):
                services.pop(name, None)
                tracker.delete_service("default", name)
            case ("delete_slice", name):
                slices.pop(name, None)
                tracker.delete_slice("default", name)
        dirty = tracker.take_dirty()
        for key in keys:
            now = tracker.desired(key, CTX)[0]
            if key not in dirty:
                assert now == last[key], f"{key} changed without being marked dirty"
            last[key] = now  # type: ignore[assignment]
    expected = from_scratch(services, slices)
    assert {key: tracker.desired(key, CTX)[0] for key in keys} == {key: expected.get(key) for key in keys}
