"""Which set entries a service wants (core/datapath.py), per type and policy; membership follows changes."""

from __future__ import annotations

from collections import Counter
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aproxy.core.datapath import SetDelta, SetEntry, SetKind, SetMembership, service_entries
from aproxy.core.model import L4Protocol, ServiceKey
from aproxy.core.objects import ServiceInfo, parse_service
from tests.core import k8s

TCP, UDP = L4Protocol.TCP, L4Protocol.UDP
CIP, EIP, LBIP = ip_address("10.96.0.10"), ip_address("192.0.2.50"), ip_address("198.51.100.7")
K = SetKind


def parsed(**kwargs: Any) -> ServiceInfo:
    info = parse_service(
        k8s.service(
            cluster_ips="10.96.0.10",
            ports=[k8s.port("http", 80, kwargs.pop("protocol", "TCP"), node_port=30080)],
            **kwargs,
        )
    )
    assert isinstance(info, ServiceInfo)
    return info


def e(
    kind: SetKind, address: Any = None, port: int = 80, protocol: L4Protocol = TCP, source: Any = None
) -> SetEntry:
    return SetEntry(kind, address, protocol, port, ip_network(source) if source else None)


CLUSTER = e(K.CLUSTER_IP, CIP)
EXTERNAL = {e(K.EXTERNAL_IP, EIP)}
LB = {e(K.LOAD_BALANCER, LBIP)}
NODE = {e(K.NODE_PORT, None, 30080)}


def ranged(ranges: list[str], sources: list[str]) -> tuple[dict[str, Any], set[SetEntry]]:
    """A LoadBalancer service with these source ranges, and its entries given the allowed sources."""
    fields = {
        "type_": "LoadBalancer",
        "lb_ips": [str(LBIP)],
        "spec_extra": {"loadBalancerSourceRanges": ranges},
    }
    allowed = {e(K.LOAD_BALANCER_SOURCE, LBIP, source=source) for source in sources}
    return fields, {CLUSTER, *NODE, *LB, e(K.LOAD_BALANCER_FW, LBIP), *allowed}


# (what the service is, its fields, the entries it wants): the table of set contents per type and policy.
TABLE = [
    ("ClusterIP", {}, {CLUSTER}),
    ("ClusterIP with an external IP", {"external_ips": [str(EIP)]}, {CLUSTER, *EXTERNAL}),
    (
        "ClusterIP, external IP, Local",
        {"external_ips": [str(EIP)], "external_policy": "Local"},
        {CLUSTER, *EXTERNAL, e(K.EXTERNAL_IP_LOCAL, EIP)},
    ),
    ("NodePort", {"type_": "NodePort"}, {CLUSTER, *NODE}),
    (
        "NodePort, Local",
        {"type_": "NodePort", "external_policy": "Local"},
        {CLUSTER, *NODE, e(K.NODE_PORT_LOCAL, None, 30080)},
    ),
    (
        "NodePort over UDP",
        {"type_": "NodePort", "protocol": "UDP"},
        {e(K.CLUSTER_IP, CIP, protocol=UDP), e(K.NODE_PORT, None, 30080, UDP)},
    ),
    (
        "NodePort over SCTP: no port set",
        {"type_": "NodePort", "protocol": "SCTP"},
        {e(K.CLUSTER_IP, CIP, protocol=L4Protocol.SCTP)},
    ),
    ("ClusterIP keeps no node port", {"type_": "ClusterIP"}, {CLUSTER}),
    ("LoadBalancer", {"type_": "LoadBalancer", "lb_ips": [str(LBIP)]}, {CLUSTER, *NODE, *LB}),
    (
        "LoadBalancer, Local",
        {"type_": "LoadBalancer", "lb_ips": [str(LBIP)], "external_policy": "Local"},
        {CLUSTER, *NODE, *LB, e(K.NODE_PORT_LOCAL, None, 30080), e(K.LOAD_BALANCER_LOCAL, LBIP)},
    ),
    (
        "LoadBalancer with source ranges",
        *ranged(["203.0.113.0/24", "10.1.2.3/32", "fd00::/8"], ["203.0.113.0/24", "10.1.2.3/32"]),
    ),
    (
        "source range 0.0.0.0/0 is written as two halves (hash:ip,port,net refuses /0)",
        *ranged(["0.0.0.0/0"], ["0.0.0.0/1", "128.0.0.0/1"]),
    ),
    ("only malformed source ranges: closed to everyone, not open", *ranged(["office"], ["0.0.0.0/32"])),
    ("headless: nothing", {"cluster_ips": "None"}, set()),
]


@pytest.mark.parametrize(("what", "fields", "wanted"), TABLE, ids=[row[0] for row in TABLE])
def test_entries_per_service_type_and_policy(
    what: str, fields: dict[str, Any], wanted: set[SetEntry]
) -> None:
    if "cluster_ips" in fields:
        info = parse_service(k8s.service(cluster_ips=fields["cluster_ips"]))
        assert isinstance(info, ServiceInfo)
    else:
        info = parsed(**fields)

    assert service_entries(info) == wanted


def test_a_malformed_source_range_is_a_warning_and_the_rest_stands() -> None:
    info = parsed(
        type_="LoadBalancer",
        lb_ips=[str(LBIP)],
        spec_extra={"loadBalancerSourceRanges": ["203.0.113.0/24", "not-a-cidr", 7, "10.0.0.0/33"]},
    )

    assert info.source_ranges == (ip_network("203.0.113.0/24"),)
    assert [skip.reason for skip in info.skips] == [
        'invalid loadBalancerSourceRanges entry "not-a-cidr" ignored',
        "invalid loadBalancerSourceRanges entry 7 ignored",
        'invalid loadBalancerSourceRanges entry "10.0.0.0/33" ignored',
    ]


def test_source_ranges_that_are_not_a_list_skip_the_service() -> None:
    skipped = parse_service(k8s.service(spec_extra={"loadBalancerSourceRanges": "10.0.0.0/8"}))

    assert not isinstance(skipped, ServiceInfo)


# --- membership ---------------------------------------------------------------------------------------------

A, B = ServiceKey("default", "a"), ServiceKey("default", "b")


def test_an_entry_two_services_want_stays_until_both_let_go() -> None:
    members = SetMembership()
    assert members.replace(A, frozenset(NODE)) == SetDelta(tuple(NODE), ())
    assert members.replace(B, frozenset(NODE)) == SetDelta()
    assert members.replace(A, frozenset()) == SetDelta()
    assert members.replace(B, frozenset()) == SetDelta((), tuple(NODE))
    assert members.entries() == frozenset()


def test_one_service_change_costs_its_own_entries_whatever_the_cluster() -> None:
    members = SetMembership()
    members.reset(
        {
            ServiceKey("default", f"s{i}"): {e(K.CLUSTER_IP, ip_address(f"10.96.{i // 256}.{i % 256}"))}
            for i in range(5000)
        }
    )

    delta = members.replace(ServiceKey("default", "s7"), frozenset({e(K.CLUSTER_IP, CIP, 81)}))

    assert delta == SetDelta((e(K.CLUSTER_IP, CIP, 81),), (e(K.CLUSTER_IP, ip_address("10.96.0.7")),))


_ENTRIES = [e(K.CLUSTER_IP, CIP), e(K.NODE_PORT, None, 30080), e(K.NODE_PORT, None, 30081), *LB, *EXTERNAL]
_KEYS = [A, B, ServiceKey("other", "c")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYS), st.frozensets(st.sampled_from(_ENTRIES))), max_size=30))
def test_membership_equals_a_from_scratch_computation_after_any_changes(
    changes: list[tuple[ServiceKey, frozenset[SetEntry]]],
) -> None:
    """Applying every delta to a model of the kernel set gives what the services want now, from scratch."""
    members = SetMembership()
    kernel: Counter[SetEntry] = Counter()
    latest: dict[ServiceKey, frozenset[SetEntry]] = {}
    for key, entries in changes:
        delta = members.replace(key, entries)
        latest[key] = entries
        for entry in delta.removed:
            assert kernel[entry] == 1, "removed an entry that was not in the set"
            del kernel[entry]
        for entry in delta.added:
            assert not kernel[entry], "added an entry that was already in the set"
            kernel[entry] = 1
    scratch = frozenset().union(*latest.values()) if latest else frozenset()

    assert members.entries() == scratch
    assert set(kernel) == scratch
