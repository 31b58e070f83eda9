"""Intake's fast paths give exactly what the general paths give.

The hot paths of intake and translation take shortcuts: plain, well-formed endpoints, ports and headers
are read inline instead of through the validating accessors; dotted-quad IPv4 addresses skip ``ipaddress``'
parser; an update reuses what its slice's previous version already made; a translation of a service reuses
what its previous translation derived from the service alone, and a port served by one slice alone skips the
general merge of candidates. Each test here runs the shortcut and the general path on the same random input
and compares everything, derived fields included.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aproxy.core import translate as translate_module
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import IPAddress, ServiceKey, ServiceState, VirtualServer
from aproxy.core.objects import ServiceInfo, Skip, SliceInfo, parse_ip, parse_service, parse_slice
from aproxy.core.translate import TranslationContext, translate_service
from tests.core.k8s import endpoint_slice, port, service

# --- random raw slices, from small pools so that versions overlap ------------------------------------------

ABSENT = object()  # a key left out
V4 = ["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.1.1", "10.244.1.200"]
V6 = ["fd00::1", "fd00::2", "fd00::3"]
ODD_ADDRESSES: list[object] = ["010.244.0.1", "10.244.0.256", "10.244.0", "1.2.3.4.5", " 10.244.0.1"]
ODD_ADDRESSES += ["10.244.0.01", "10.244.00.1", "10.244.0.00", "10.244.0.1 ", "10.244.0.+1", "10.244.0.٣"]
ODD_ADDRESSES += ["::ffff:10.0.0.1", "fe80::1%eth0", "", "10.244.0.1/32", "+1.2.3.4", "1.2.3.٤", 7, None]


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """A valid value three times in four: a slice with every field odd somewhere exercises little."""
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(invalid)
    )


conditions_values = mostly([ABSENT, None, True, False], [1, 0, "true"])
addresses = mostly(
    [[address] for address in V4] + [[address] for address in V6] + [V4[:2], V6[1:]],
    [[], "10.244.0.1", None, ABSENT] + [[address] for address in ODD_ADDRESSES],
)
node_names = mostly([ABSENT, None, "node-a", "node-b", ""], [7, ["node-a"]])
ZONE_HINTS = [{"forZones": [{"name": "z1"}]}, {"forZones": [{"name": "z2"}]}, {"forZones": [{"name": "z1"}]}]
ZONE_HINTS += [{"forZones": [{"name": "z1"}, {"name": "z2"}, {"name": "z1"}]}]
NO_ZONE_HINTS = [ABSENT, None, {}, {"forZones": None}, {"forZones": []}, {"forZones": [{"name": ""}, {}]}]
hints = mostly(
    ZONE_HINTS + NO_ZONE_HINTS,
    [{"forZones": "z1"}, {"forZones": [{"name": 3}]}, {"forZones": ["z1"]}, "z1", {"forZones": [None]}],
)


def _put(obj: dict[str, Any], key: str, value: Any) -> None:
    if value is not ABSENT:
        obj[key] = value


@st.composite
def raw_conditions(draw: st.DrawFn) -> Any:
    conditions = draw(mostly([ABSENT, None, "dict", "dict"], ["ready", 1]))
    if conditions == "dict":
        conditions = {}
        for name in ("ready", "serving", "terminating"):
            _put(conditions, name, draw(conditions_values))
    return conditions


@st.composite
def raw_endpoints(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(["x", None, [], 5]))  # not an object at all
    obj: dict[str, Any] = {}
    _put(obj, "addresses", draw(addresses))
    _put(obj, "conditions", draw(raw_conditions()))
    _put(obj, "nodeName", draw(node_names))
    _put(obj, "hints", draw(hints))
    _put(obj, "zone", "zone-a")  # read by nobody
    return obj


@st.composite
def raw_ports(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(["x", None, 5]))
    obj: dict[str, Any] = {}
    _put(obj, "name", draw(mostly([ABSENT, None, "http", "dns", ""], [5])))
    _put(obj, "protocol", draw(mostly([ABSENT, None, "TCP", "UDP"], ["XX", 6])))
    _put(obj, "port", draw(mostly([8080, 53], [ABSENT, None, 0, 70000, True, "80"])))
    return obj


@st.composite
def raw_slices(draw: st.DrawFn) -> dict[str, Any]:
    raw = endpoint_slice(
        name="web-abc",
        address_type=draw(st.sampled_from(["IPv4", "IPv4", "IPv4", "IPv6"])),
        endpoints=draw(st.lists(raw_endpoints(), max_size=6)),
        ports=draw(st.lists(raw_ports(), max_size=3)),
        resource_version=draw(st.sampled_from([None, "1", "2"])),
    )
    if draw(st.integers(0, 9)) == 0:  # an odd header: the fast header path must decline it
        field = draw(st.sampled_from(["name", "namespace", "resourceVersion", "labels"]))
        raw["metadata"][field] = draw(st.sampled_from([None, "", 5, ["x"], {"x": 1}]))
    if draw(st.integers(0, 19)) == 0:
        raw["ports"] = draw(st.sampled_from([None, "x", {}]))
    if draw(st.integers(0, 19)) == 0:
        raw["endpoints"] = draw(st.sampled_from([None, "x", {}]))
    return raw


@st.composite
def edited(draw: st.DrawFn, before: dict[str, Any]) -> dict[str, Any]:
    """The next version of ``before``: some endpoints edited (one field each), moved, dropped or added."""
    after = copy.deepcopy(before)
    endpoints = after["endpoints"]
    if not isinstance(endpoints, list):
        return after
    for item in endpoints:
        if isinstance(item, dict) and draw(st.booleans()):
            field = draw(st.sampled_from(["addresses", "conditions", "nodeName", "hints"]))
            value = {
                "addresses": addresses,
                "conditions": raw_conditions(),
                "nodeName": node_names,
                "hints": hints,
            }[field]
            item.pop(field, None)
            _put(item, field, draw(value))
    if draw(st.booleans()) and endpoints:
        endpoints.insert(draw(st.integers(0, len(endpoints) - 1)), endpoints.pop())
    if draw(st.booleans()) and endpoints:
        endpoints.pop(draw(st.integers(0, len(endpoints) - 1)))
    if draw(st.booleans()):
        endpoints.append(draw(raw_endpoints()))
    return after


class ReadOnly(Mapping[str, Any]):
    """A mapping that is not a dict (and shows like one, for the reasons that quote it)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


def general(raw: Any) -> Any:
    """``raw`` with every object a ``ReadOnly`` mapping instead of a dict: the fast paths take dicts only,
    so parsing this goes through the general, validating code all the way."""
    if isinstance(raw, dict):
        return ReadOnly({key: general(value) for key, value in raw.items()})
    if isinstance(raw, list):
        return [general(item) for item in raw]
    return raw


def assert_same_slice(fast: SliceInfo | Skip, reference: SliceInfo | Skip) -> None:
    """Equal, and equal in what equality leaves out: the version and the derived fields."""
    assert fast == reference
    if isinstance(fast, SliceInfo) and isinstance(reference, SliceInfo):
        assert fast.resource_version == reference.resource_version
        assert fast.real_servers == reference.real_servers
        assert fast.address_ids == reference.address_ids
        # ...and what the public constructor derives from the fields.
        rebuilt = dataclasses.replace(fast)
        assert (rebuilt.real_servers, rebuilt.address_ids) == (fast.real_servers, fast.address_ids)
        assert repr(fast) == repr(reference)


# --- parsing ------------------------------------------------------------------------------------------------


@settings(max_examples=600)
@given(raw_slices())
def test_fast_paths_parse_like_the_general_ones(raw: dict[str, Any]) -> None:
    assert_same_slice(parse_slice(raw), parse_slice(general(raw)))


@settings(max_examples=800)
@given(raw_slices().flatmap(lambda before: st.tuples(st.just(before), edited(before) | raw_slices())))
def test_parsing_against_the_previous_version_changes_nothing(versions: tuple[Any, Any]) -> None:
    before, after = versions
    previous = parse_slice(before)
    if isinstance(previous, SliceInfo):
        assert_same_slice(parse_slice(after, previous), parse_slice(after))


@settings(max_examples=300)
@given(st.lists(raw_slices(), min_size=1, max_size=6))
def test_the_tracker_keeps_what_a_fresh_parse_gives(versions: list[dict[str, Any]]) -> None:
    """Each version parsed against the one the tracker kept equals that version parsed alone."""
    tracker = ChangeTracker()
    for version, raw in enumerate(versions):
        # The same slice each time (an odd header would name another object, or none), with a new version
        # each time, as the API server does.
        raw["metadata"] = endpoint_slice(name="web-abc", resource_version=str(version))["metadata"]
        tracker.upsert_slice(raw)
        kept = tracker.inputs(ServiceKey("default", "web"))[1]
        fresh = parse_slice(raw)
        if isinstance(fresh, SliceInfo) and not fresh.ignored:
            assert len(kept) == 1
            assert_same_slice(kept[0], fresh)
        else:
            assert kept == []


def test_an_update_shares_what_did_not_change() -> None:
    """Unchanged endpoints are the previous version's objects; a changed one keeps its address and real
    servers; an update that changes nothing translation reads shares everything."""
    eps = [
        {"addresses": ["10.244.0.1"], "conditions": {"ready": True}, "nodeName": "node-a"},
        {"addresses": ["10.244.0.2"], "conditions": {"ready": True}, "nodeName": "node-a"},
    ]
    first = parse_slice(endpoint_slice(endpoints=eps, resource_version="1"))
    assert isinstance(first, SliceInfo)
    eps[1] = {**eps[1], "conditions": {"ready": False}}
    second = parse_slice(endpoint_slice(endpoints=eps, resource_version="2"), first)
    assert isinstance(second, SliceInfo)
    assert second.endpoints[0] is first.endpoints[0]
    assert second.endpoints[1] is not first.endpoints[1]
    assert second.endpoints[1].address is first.endpoints[1].address
    assert all(new is old for new, old in zip(second.real_servers[0], first.real_servers[0], strict=True))
    third = parse_slice(endpoint_slice(endpoints=eps, resource_version="3"), second)
    assert isinstance(third, SliceInfo)
    assert third.resource_version == "3"
    assert (third.endpoints, third.real_servers, third.address_ids) == (
        second.endpoints,
        second.real_servers,
        second.address_ids,
    )
    assert third.endpoints is second.endpoints and third.real_servers is second.real_servers


def reference_ip(value: object) -> IPAddress | None:
    """parse_ip as documented, straight from ipaddress."""
    if not isinstance(value, str):
        return None
    try:
        address = ip_address(value)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and (address.scope_id is not None or address.ipv4_mapped is not None):
        return None
    return address


octet_texts = st.one_of(
    st.integers(0, 255).map(str),
    st.sampled_from(["00", "01", "010", "256", "999", "0x1", "+1", "-1", " 1", "1 ", "", "٣", "1e2"]),
)


@settings(max_examples=1500)
@given(
    st.one_of(
        st.lists(octet_texts, min_size=1, max_size=5).map(".".join),
        st.ip_addresses().map(str),
        st.text(alphabet="0123456789.:abcdef%/x ", max_size=20),
        st.integers(),
        st.none(),
    )
)
def test_parse_ip_is_ipaddress_for_every_text(value: object) -> None:
    parsed = parse_ip(value)
    expected = reference_ip(value)
    assert parsed == expected
    assert type(parsed) is type(expected)
    if isinstance(parsed, IPv4Address):
        assert str(parsed) == value


# --- translation --------------------------------------------------------------------------------------------

NODE_A = TranslationContext("node-a", frozenset({ip_address("192.0.2.10")}))
CONTEXTS = [
    NODE_A,
    TranslationContext("node-b", frozenset({ip_address("192.0.2.11"), ip_address("2001:db8::11")}), "z1"),
    TranslationContext("node-a", frozenset({ip_address("203.0.113.7")}), None, "mh"),
    TranslationContext("node-a", frozenset({ip_address("192.0.2.10")}), "z2"),
]
SERVICES = [
    service(),
    service(cluster_ips=["10.96.0.3", "fd00:10:96::3"]),
    service(ports=[port("http", 80), port("dns", 53, "UDP"), port("", 81)]),
    service(type_="NodePort", ports=[port("http", 80, node_port=30080)], external_policy="Local"),
    service(internal_policy="Local"),
    service(external_ips=["203.0.113.7", "203.0.113.8"], lb_ips=["203.0.113.8"]),
    service(scheduler="mh", affinity=60),
    service(cluster_ips="None"),
]
slice_ports = st.sampled_from(
    [
        [{"name": "http", "port": 8080}],
        [{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        [{"name": "", "port": 8081}, {"name": "http", "port": 8080}],
        [{"name": "http", "port": 8080}, {"name": "http", "port": 8082}],
    ]
)


@st.composite
def translation_slice(draw: st.DrawFn) -> dict[str, Any]:
    """A valid slice whose endpoints differ where translation looks: readiness, node, zone hints (none, on
    some endpoints, or on all of them: what decides whether hints apply), duplicate addresses."""
    address_type = draw(st.sampled_from(["IPv4", "IPv4", "IPv6"]))
    pool = V4 if address_type == "IPv4" else V6  # mostly distinct addresses, sometimes copies
    hinting = draw(st.sampled_from(["none", "some", "all", "all"]))
    endpoints = []
    for _ in range(draw(st.integers(0, 4))):
        ready = draw(st.sampled_from([True, True, True, False]))
        zones = draw(st.sampled_from([["z1"], ["z2"], ["z1", "z2"]]))
        if hinting == "none" or (hinting == "some" and draw(st.booleans())):
            zones = []
        item: dict[str, Any] = {
            "addresses": [draw(st.sampled_from(pool))],
            "conditions": {
                "ready": ready,
                "serving": draw(st.booleans()),
                "terminating": draw(st.booleans()),
            },
            "nodeName": draw(st.sampled_from(["node-a", "node-b"])),
        }
        if zones:
            item["hints"] = {"forZones": [{"name": zone} for zone in zones]}
        endpoints.append(item)
    return endpoint_slice(
        name=draw(st.sampled_from(["web-a", "web-b"])),
        address_type=address_type,
        endpoints=endpoints,
        ports=draw(slice_ports),
    )


translation_slices = st.lists(translation_slice(), max_size=3)


@contextmanager
def general_rules_only() -> Iterator[None]:
    """Translation without its single-slice shortcut: every group through the general candidate rules."""
    with mock.patch.object(translate_module, "_single_slice", return_value=None):
        yield


def fresh(info: ServiceInfo) -> ServiceInfo:
    """An equal ServiceInfo without the memo of earlier translations."""
    copy = dataclasses.replace(info)
    assert copy.translation_memo is None
    return copy


def assert_plain_objects(state: ServiceState) -> None:
    """The objects made by translation's fast constructors equal the ones their constructors make."""
    rebuilt = ServiceState(
        state.service,
        tuple(VirtualServer(v.key, v.spec, v.port_name, v.real_servers) for v in state.virtual_servers),
        state.bind_addresses,
    )
    assert rebuilt == state and repr(rebuilt) == repr(state)


@settings(max_examples=400)
@given(
    st.sampled_from(SERVICES),
    st.lists(st.tuples(translation_slices, st.sampled_from(CONTEXTS)), min_size=1, max_size=4),
)
def test_translation_shortcuts_change_nothing(raw_service: dict[str, Any], runs: list[Any]) -> None:
    """One ServiceInfo translated again and again (its memo in use), with other slices and contexts, gives
    what a fresh one gives under the general rules alone."""
    info = parse_service(raw_service)
    assert isinstance(info, ServiceInfo)
    for raw_slices_, ctx in runs:
        slices = [s for s in map(parse_slice, raw_slices_) if isinstance(s, SliceInfo)]
        result = translate_service(info, slices, ctx)
        with general_rules_only():
            expected = translate_service(fresh(info), slices, ctx)
        assert result == expected
        assert_plain_objects(result.state)


@pytest.mark.parametrize(
    "ctx",
    [pytest.param(NODE_A, id="same-context"), pytest.param(CONTEXTS[1], id="other-context")],
)
def test_a_service_translated_again_follows_its_endpoints(ctx: TranslationContext) -> None:
    info = parse_service(service())
    assert isinstance(info, ServiceInfo)
    one = parse_slice(endpoint_slice(endpoints=[{"addresses": ["10.244.0.1"]}]))
    two_endpoints = [{"addresses": ["10.244.0.2"]}, {"addresses": ["10.244.0.1"]}]
    two = parse_slice(endpoint_slice(endpoints=two_endpoints))
    assert isinstance(one, SliceInfo) and isinstance(two, SliceInfo)
    first = translate_service(info, [one], NODE_A).state
    second = translate_service(info, [two], ctx).state
    assert [str(r.key) for r in first.virtual_servers[0].real_servers] == ["10.244.0.1:8080"]
    assert [str(r.key) for r in second.virtual_servers[0].real_servers] == [
        "10.244.0.1:8080",
        "10.244.0.2:8080",
    ]
    assert second == translate_service(fresh(info), [two], ctx).state
