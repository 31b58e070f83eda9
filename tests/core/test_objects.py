"""Parsing raw Services and EndpointSlices: what is kept, what is defaulted, and what becomes a Skip."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aproxy.core.model import L4Protocol, ServiceKey
from aproxy.core.objects import (
    Endpoint,
    ServiceInfo,
    ServicePort,
    Severity,
    Skip,
    SliceInfo,
    SlicePort,
    parse_ip,
    parse_service,
    parse_slice,
)
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port


def parsed_service(raw: Any) -> ServiceInfo:
    info = parse_service(raw)
    assert isinstance(info, ServiceInfo), info
    return info


def parsed_slice(raw: Any) -> SliceInfo:
    info = parse_slice(raw)
    assert isinstance(info, SliceInfo), info
    return info


def without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    """A deep copy of ``obj`` with the key at ``path`` removed."""
    result = copy.deepcopy(obj)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return result


def replaced(obj: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    """A deep copy of ``obj`` with the value at ``path`` replaced."""
    result = copy.deepcopy(obj)
    parent: Any = result
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return result


# --- Services: what is kept ---------------------------------------------------------------------------------

V4 = IPv4Address
V6 = IPv6Address


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(service(), {"cluster_ips": (V4("10.96.0.1"),)}, id="cluster-ip"),
        pytest.param(
            service(cluster_ips=["10.96.0.20", "fd00:10:96::20"]),
            {"cluster_ips": (V4("10.96.0.20"), V6("fd00:10:96::20"))},
            id="dual-stack-cluster-ips-in-order",
        ),
        pytest.param(
            without(service(cluster_ips="10.96.0.7"), "spec", "clusterIPs"),
            {"cluster_ips": (V4("10.96.0.7"),)},
            id="clusterIP-when-clusterIPs-absent",
        ),
        pytest.param(
            service(cluster_ips="fd00:10:96:0:0::000a"),
            {"cluster_ips": (V6("fd00:10:96::a"),)},
            id="ipv6-normalised",
        ),
        pytest.param(service(cluster_ips="None"), {"headless": True, "ports": ()}, id="headless"),
        pytest.param(
            service(cluster_ips=None), {"headless": False, "cluster_ips": ()}, id="no-cluster-ip-yet"
        ),
        pytest.param(
            service(type_="ExternalName", cluster_ips=None, spec_extra={"externalName": "db.example.com"}),
            {"external_name": True, "cluster_ips": ()},
            id="external-name",
        ),
        pytest.param(
            service(labels={"service.kubernetes.io/service-proxy-name": "other"}),
            {"proxy_name_label": True, "cluster_ips": ()},
            id="proxy-name-label",
        ),
        pytest.param(
            service(), {"ports": (ServicePort("http", L4Protocol.TCP, 80),)}, id="protocol-defaults-tcp"
        ),
        pytest.param(
            service(ports=[port(None, 53, "UDP")]),
            {"ports": (ServicePort("", L4Protocol.UDP, 53),)},
            id="unnamed-port-is-empty-name",
        ),
        pytest.param(
            service(ports=[port("sctp", 9999, "SCTP")]),
            {"ports": (ServicePort("sctp", L4Protocol.SCTP, 9999),)},
            id="sctp-port",
        ),
        pytest.param(
            service(type_="NodePort", ports=[port(node_port=30080)]),
            {"node_ports": True, "ports": (ServicePort("http", L4Protocol.TCP, 80, 30080),)},
            id="node-port",
        ),
        pytest.param(
            service(type_="NodePort", ports=[port(node_port=0)]),
            {"ports": (ServicePort("http", L4Protocol.TCP, 80, 0),)},
            id="node-port-zero-means-none",
        ),
        pytest.param(
            service(type_="LoadBalancer"), {"node_ports": True}, id="load-balancer-serves-node-ports"
        ),
        pytest.param(service(type_="ClusterIP"), {"node_ports": False}, id="cluster-ip-type-no-node-ports"),
        pytest.param(service(affinity=True), {"affinity_timeout": 10800}, id="affinity-default-timeout"),
        pytest.param(service(affinity=600), {"affinity_timeout": 600}, id="affinity-timeout"),
        pytest.param(service(), {"affinity_timeout": 0}, id="no-affinity"),
        pytest.param(
            service(external_policy="Local", internal_policy="Local"),
            {"external_local": True, "internal_local": True},
            id="traffic-policies-local",
        ),
        pytest.param(
            service(external_policy="Cluster", internal_policy="Cluster"),
            {"external_local": False, "internal_local": False},
            id="traffic-policies-cluster",
        ),
        pytest.param(service(scheduler="wrr"), {"scheduler": "wrr", "skips": ()}, id="scheduler-annotation"),
        pytest.param(
            service(external_ips=["203.0.113.7", "203.0.113.7"]),
            {"external_ips": (V4("203.0.113.7"),)},
            id="external-ips-deduplicated",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ips=["203.0.113.9"]),
            {"lb_ips": (V4("203.0.113.9"),), "skips": ()},
            id="lb-ingress-ip",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ingress=[{"hostname": "lb.example.com"}]),
            {"lb_ips": (), "skips": ()},
            id="lb-hostname-only-ignored",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ingress=[{"ip": "203.0.113.9", "ipMode": "Proxy"}]),
            {"lb_ips": (), "skips": ()},
            id="lb-ip-mode-proxy-ignored",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ingress=[{"ip": "203.0.113.9", "ipMode": "VIP"}]),
            {"lb_ips": (V4("203.0.113.9"),)},
            id="lb-ip-mode-vip",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ips=["2001:db8::9"]),
            {"lb_ips": (), "skips": ()},
            id="lb-ip-other-family-dropped-silently",
        ),
    ],
)
def test_service_kept(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    info = parsed_service(raw)
    assert info.key == ServiceKey("default", "web")
    assert {name: getattr(info, name) for name in expected} == expected


def test_service_resource_version_is_kept_but_not_compared() -> None:
    first = parsed_service(service(resource_version="1"))
    second = parsed_service(service(resource_version="2"))
    assert (first.resource_version, second.resource_version) == ("1", "2")
    assert first == second


# --- Services: skipped whole --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(
            service(cluster_ips="10.0.0.300"), 'invalid clusterIP "10.0.0.300"', id="bad-cluster-ip"
        ),
        pytest.param(
            service(cluster_ips=["10.96.0.1", "fd00::zz"]),
            'invalid clusterIP "fd00::zz"',
            id="bad-second-cluster-ip",
        ),
        pytest.param(
            service(cluster_ips="::ffff:10.96.0.1"),
            'invalid clusterIP "::ffff:10.96.0.1"',
            id="ipv4-mapped-cluster-ip",
        ),
        pytest.param(
            service(cluster_ips="fe80::1%eth0"), 'invalid clusterIP "fe80::1%eth0"', id="zoned-cluster-ip"
        ),
        pytest.param(
            service(cluster_ips="010.96.0.1"), 'invalid clusterIP "010.96.0.1"', id="leading-zero-ip"
        ),
        pytest.param(
            replaced(without(service(), "spec", "clusterIPs"), 5, "spec", "clusterIP"),
            "spec.clusterIP is not a string: 5",
            id="cluster-ip-not-string",
        ),
        pytest.param(
            replaced(service(), "10.96.0.1", "spec", "clusterIPs"),
            'spec.clusterIPs is not a list: "10.96.0.1"',
            id="cluster-ips-not-list",
        ),
        pytest.param(service(ports=[port(port=0)]), "invalid port 0 in spec.ports[0]", id="port-zero"),
        pytest.param(
            service(ports=[port(port=65536)]), "invalid port 65536 in spec.ports[0]", id="port-too-big"
        ),
        pytest.param(
            service(ports=[port(port="80")]),
            'invalid port "80" in spec.ports[0] (must be an integer 1..65535, got a string)',
            id="port-not-int",
        ),
        pytest.param(
            service(ports=[port(port=True)]),
            "invalid port True in spec.ports[0] (must be an integer 1..65535, got a boolean)",
            id="port-bool",
        ),
        pytest.param(
            service(ports=[port(port=80.0)]),
            "invalid port 80.0 in spec.ports[0] (must be an integer 1..65535, got a float)",
            id="port-float",
        ),
        pytest.param(
            service(ports=[{"name": "http"}]),
            "invalid port None in spec.ports[0] (must be an integer 1..65535, got null)",
            id="port-missing",
        ),
        pytest.param(
            service(type_="NodePort", ports=[port(node_port=70000)]),
            "invalid nodePort 70000 in spec.ports[0]",
            id="node-port-too-big",
        ),
        pytest.param(
            service(type_="NodePort", ports=[port(node_port=-1)]),
            "invalid nodePort -1 in spec.ports[0]",
            id="node-port-negative",
        ),
        pytest.param(
            service(ports=[port(protocol="ICMP")]),
            'unknown protocol "ICMP" in spec.ports[0]',
            id="unknown-protocol",
        ),
        pytest.param(
            service(ports=[port(protocol="tcp")]),
            'unknown protocol "tcp" in spec.ports[0]',
            id="lowercase-protocol",
        ),
        pytest.param(
            service(ports=[port("a", 80), port("b", 80)]), "duplicate port 80/TCP", id="duplicate-port"
        ),
        pytest.param(
            service(type_="NodePort", ports=[port("a", 80, node_port=30001), port("b", 81, node_port=30001)]),
            "duplicate nodePort 30001/TCP",
            id="duplicate-node-port",
        ),
        pytest.param(
            replaced(service(), "x", "spec", "ports"), 'spec.ports is not a list: "x"', id="ports-not-list"
        ),
        pytest.param(service(ports=[80]), "spec.ports[0] is not an object: 80", id="port-not-object"),
        pytest.param(
            service(ports=[port(name=7)]), "spec.ports[0].name is not a string: 7", id="port-name-not-string"
        ),
        pytest.param(without(service(), "metadata", "name"), "missing metadata.name", id="missing-name"),
        pytest.param(service(ns=None), "missing metadata.namespace", id="missing-namespace"),
        pytest.param(service(ns=""), "missing metadata.namespace", id="empty-namespace"),
        pytest.param(without(service(), "spec"), "spec is not an object: None", id="missing-spec"),
        pytest.param(replaced(service(), [], "spec"), "spec is not an object: []", id="spec-not-object"),
        pytest.param(
            replaced(service(), "x", "metadata"), 'metadata is not an object: "x"', id="metadata-not-object"
        ),
        pytest.param([service()], "object is not an object", id="not-an-object"),
        pytest.param(None, "object is not an object: None", id="none"),
        pytest.param(
            replaced(service(), ["a"], "metadata", "labels"),
            "metadata.labels is not an object",
            id="labels-not-object",
        ),
        pytest.param(
            replaced(service(), 3, "metadata", "annotations"),
            "metadata.annotations is not an object: 3",
            id="annotations-not-object",
        ),
        pytest.param(service(type_="Weird"), 'unknown type "Weird"', id="unknown-type"),
        pytest.param(
            service(spec_extra={"sessionAffinity": "Cookie"}),
            'unknown sessionAffinity "Cookie"',
            id="unknown-session-affinity",
        ),
        pytest.param(
            service(affinity=0),
            "invalid sessionAffinityConfig.clientIP.timeoutSeconds 0",
            id="affinity-timeout-zero",
        ),
        pytest.param(
            service(affinity=86401),
            "invalid sessionAffinityConfig.clientIP.timeoutSeconds 86401",
            id="affinity-timeout-too-big",
        ),
        pytest.param(
            service(spec_extra={"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": []}}),
            "spec.sessionAffinityConfig.clientIP is not an object: []",
            id="affinity-config-wrong-type",
        ),
        pytest.param(
            service(external_policy="Global"),
            'unknown externalTrafficPolicy "Global"',
            id="unknown-external-policy",
        ),
        pytest.param(
            service(internal_policy="Nearby"),
            'unknown internalTrafficPolicy "Nearby"',
            id="unknown-internal-policy",
        ),
        pytest.param(
            replaced(service(), 3, "spec", "externalIPs"),
            "spec.externalIPs is not a list: 3",
            id="external-ips-not-list",
        ),
        pytest.param(
            service(type_="LoadBalancer") | {"status": {"loadBalancer": {"ingress": {"ip": "203.0.113.1"}}}},
            "status.loadBalancer.ingress is not a list",
            id="lb-ingress-not-list",
        ),
    ],
)
def test_service_skipped_whole(raw: Any, reason: str) -> None:
    skip = parse_service(raw)
    assert isinstance(skip, Skip)
    assert (skip.kind, skip.severity) == ("Service", Severity.ERROR)
    assert reason in skip.reason


def test_service_skip_names_the_object() -> None:
    skip = parse_service(service("api", "shop", cluster_ips="10.0.0.300"))
    assert skip == Skip("Service", "shop", "api", 'invalid clusterIP "10.0.0.300"')
    assert str(skip) == 'error: Service shop/api: invalid clusterIP "10.0.0.300"'


def test_skip_reason_is_cut_short_for_huge_values() -> None:
    skip = parse_service(service(cluster_ips="x" * 10_000))
    assert isinstance(skip, Skip)
    assert len(skip.reason) < 120


# --- Services: a part ignored, the rest used ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "reason"),
    [
        pytest.param(
            service(external_ips=["203.0.113.7", "203.0.113.300"]),
            {"external_ips": (V4("203.0.113.7"),)},
            'invalid externalIP "203.0.113.300" ignored',
            id="bad-external-ip-alone",
        ),
        pytest.param(
            service(external_ips=["2001:db8::7", "203.0.113.7"]),
            {"external_ips": (V4("203.0.113.7"),)},
            'externalIP "2001:db8::7" ignored: no IPv6 cluster IP',
            id="external-ip-other-family",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ips=["203.0.113.9", "lb!"]),
            {"lb_ips": (V4("203.0.113.9"),)},
            'invalid load-balancer ingress IP "lb!" ignored',
            id="bad-lb-ip-alone",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ips=["203.0.113.9"], lb_ingress=["x"]),
            {"lb_ips": (V4("203.0.113.9"),)},
            'status.loadBalancer.ingress[1] is not an object: "x"',
            id="lb-ingress-entry-not-object",
        ),
        pytest.param(
            service(scheduler="fastest"),
            {"scheduler": None, "ports": (ServicePort("http", L4Protocol.TCP, 80),)},
            'annotation aproxy.io/scheduler: unknown scheduler "fastest", using the default',
            id="unknown-scheduler-annotation",
        ),
        pytest.param(
            service(annotations={"aproxy.io/scheduler": ["rr"]}),
            {"scheduler": None},
            "annotation aproxy.io/scheduler: unknown scheduler ['rr'], using the default",
            id="scheduler-annotation-not-string",
        ),
    ],
)
def test_service_part_ignored(raw: dict[str, Any], expected: dict[str, Any], reason: str) -> None:
    info = parsed_service(raw)
    assert {name: getattr(info, name) for name in expected} == expected
    assert info.skips == (Skip("Service", "default", "web", reason, Severity.WARNING),)


# --- EndpointSlices -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            endpoint_slice(endpoints=[endpoint("10.244.1.5")]),
            {"endpoints": (Endpoint(V4("10.244.1.5"), ready=True, serving=True, terminating=False),)},
            id="conditions-unset-mean-ready-serving-not-terminating",
        ),
        pytest.param(
            endpoint_slice(endpoints=[endpoint("10.244.1.5", ready=False, serving=True, terminating=True)]),
            {"endpoints": (Endpoint(V4("10.244.1.5"), ready=False, serving=True, terminating=True),)},
            id="conditions-explicit",
        ),
        pytest.param(
            endpoint_slice(endpoints=[endpoint(["10.244.1.5", "10.244.1.6"], node="node-b", zone="z1")]),
            {"endpoints": (Endpoint(V4("10.244.1.5"), node_name="node-b"),)},
            id="first-address-and-node-name",
        ),
        pytest.param(
            endpoint_slice(endpoints=[endpoint("10.244.1.5", hints=["z1", "z2"])]),
            {"endpoints": (Endpoint(V4("10.244.1.5"), zone_hints=frozenset({"z1", "z2"})),)},
            id="zone-hints",
        ),
        pytest.param(
            endpoint_slice(address_type="IPv6", endpoints=[endpoint("fd00:10:244:1:0::5")]),
            {"endpoints": (Endpoint(V6("fd00:10:244:1::5")),)},
            id="ipv6-endpoint-normalised",
        ),
        pytest.param(
            endpoint_slice(ports=[slice_port(None, 53, "UDP"), slice_port("dns-tcp", 53, "TCP")]),
            {"ports": (SlicePort("", L4Protocol.UDP, 53), SlicePort("dns-tcp", L4Protocol.TCP, 53))},
            id="slice-ports-unnamed-and-protocols",
        ),
        pytest.param(
            endpoint_slice(ports=[slice_port("all", None), slice_port()]),
            {"ports": (SlicePort("http", L4Protocol.TCP, 8080),), "skips": ()},
            id="slice-port-without-number-ignored",
        ),
        pytest.param(
            endpoint_slice(address_type="FQDN", endpoints=[endpoint("db.example.com")]),
            {"address_type": "FQDN", "family": 0, "endpoints": (), "skips": ()},
            id="fqdn-slice-kept-empty",
        ),
        pytest.param(
            endpoint_slice(labels={"service.kubernetes.io/headless": ""}),
            {"ignored": True, "endpoints": ()},
            id="headless-label-ignored",
        ),
        pytest.param(
            endpoint_slice(labels={"service.kubernetes.io/service-proxy-name": "other"}),
            {"ignored": True, "endpoints": ()},
            id="proxy-name-label-ignored",
        ),
        pytest.param(
            endpoint_slice(endpoints=None) | {"endpoints": None, "ports": None},
            {"endpoints": (), "ports": ()},
            id="null-endpoints-and-ports",
        ),
    ],
)
def test_slice_kept(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    info = parsed_slice(raw)
    assert (info.namespace, info.service_name, info.service_key) == (
        "default",
        "web",
        ServiceKey("default", "web"),
    )
    assert {name: getattr(info, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(
            endpoint_slice(service=None),
            "missing label kubernetes.io/service-name",
            id="missing-service-label",
        ),
        pytest.param(
            endpoint_slice(service=""), "missing label kubernetes.io/service-name", id="empty-service-label"
        ),
        pytest.param(endpoint_slice(ns=None), "missing metadata.namespace", id="slice-missing-namespace"),
        pytest.param(
            without(endpoint_slice(), "metadata", "name"), "missing metadata.name", id="slice-missing-name"
        ),
        pytest.param(
            endpoint_slice(address_type="IPX"), 'unknown addressType "IPX"', id="unknown-address-type"
        ),
        pytest.param(
            endpoint_slice(address_type=None), "unknown addressType None", id="missing-address-type"
        ),
        pytest.param(["x"], "object is not an object", id="slice-not-object"),
        pytest.param(
            replaced(endpoint_slice(), {"a": 1}, "endpoints"),
            "endpoints is not a list",
            id="endpoints-not-list",
        ),
        pytest.param(
            replaced(endpoint_slice(), "p", "ports"), 'ports is not a list: "p"', id="slice-ports-not-list"
        ),
    ],
)
def test_slice_skipped_whole(raw: Any, reason: str) -> None:
    skip = parse_slice(raw)
    assert isinstance(skip, Skip)
    assert (skip.kind, skip.severity) == ("EndpointSlice", Severity.ERROR)
    assert reason in skip.reason


GOOD = endpoint("10.244.1.5")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(
            endpoint_slice(endpoints=[endpoint("10.244.1.300"), GOOD]),
            'invalid endpoint address "10.244.1.300" in endpoints[0]',
            id="invalid-endpoint-address-alone",
        ),
        pytest.param(
            endpoint_slice(endpoints=[GOOD, endpoint("fe80::1%eth0")], address_type="IPv4"),
            'invalid endpoint address "fe80::1%eth0" in endpoints[1]',
            id="zoned-endpoint-address-alone",
        ),
        pytest.param(
            endpoint_slice(endpoints=[GOOD, endpoint("fd00:10:244::5")]),
            'endpoint address "fd00:10:244::5" in endpoints[1] is not IPv4',
            id="endpoint-address-wrong-family",
        ),
        pytest.param(
            endpoint_slice(endpoints=[GOOD, endpoint([])]),
            "endpoints[1] has no addresses: []",
            id="endpoint-no-addresses",
        ),
        pytest.param(
            endpoint_slice(endpoints=[GOOD, endpoint("10.244.1.6", ready="yes")]),
            'endpoints[1].conditions.ready is not a boolean: "yes"',
            id="endpoint-condition-not-boolean",
        ),
        pytest.param(
            endpoint_slice(endpoints=[GOOD, 7]), "endpoints[1] is not an object: 7", id="endpoint-not-object"
        ),
        pytest.param(
            endpoint_slice(endpoints=[GOOD, endpoint("10.244.1.6") | {"nodeName": 3}]),
            "endpoints[1].nodeName is not a string: 3",
            id="endpoint-node-name-not-string",
        ),
    ],
)
def test_slice_endpoint_skipped_alone(raw: dict[str, Any], reason: str) -> None:
    info = parsed_slice(raw)
    assert info.endpoints == (Endpoint(V4("10.244.1.5")),)
    assert info.skips == (Skip("EndpointSlice", "default", "web-ipv4", reason, Severity.WARNING),)


@pytest.mark.parametrize(
    ("bad_port", "reason"),
    [
        pytest.param(
            slice_port("metrics", 0), "invalid port 0 in ports[0] (must be 1..65535)", id="slice-port-zero"
        ),
        pytest.param(
            slice_port("metrics", 65536),
            "invalid port 65536 in ports[0] (must be 1..65535)",
            id="slice-port-out-of-range",
        ),
        pytest.param(
            slice_port("metrics", 9090, "ICMP"),
            'unknown protocol "ICMP" in ports[0]',
            id="slice-port-protocol",
        ),
        pytest.param("metrics", 'ports[0] is not an object: "metrics"', id="slice-port-not-object"),
    ],
)
def test_slice_port_skipped_alone(bad_port: Any, reason: str) -> None:
    info = parsed_slice(endpoint_slice(ports=[bad_port, slice_port()]))
    assert info.ports == (SlicePort("http", L4Protocol.TCP, 8080),)
    assert len(info.endpoints) == 1
    assert info.skips == (Skip("EndpointSlice", "default", "web-ipv4", reason, Severity.WARNING),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("10.0.0.1", ip_address("10.0.0.1"), id="ipv4"),
        pytest.param("FD00::0:1", ip_address("fd00::1"), id="ipv6-canonical"),
        pytest.param("::ffff:10.0.0.1", None, id="ipv4-mapped-invalid"),
        pytest.param("fe80::1%eth0", None, id="zoned-invalid"),
        pytest.param("10.0.0.1/32", None, id="prefix-invalid"),
        pytest.param(" 10.0.0.1", None, id="whitespace-invalid"),
        pytest.param(167772161, None, id="integer-invalid"),
        pytest.param(None, None, id="none-invalid"),
    ],
)
def test_parse_ip(text: Any, expected: Any) -> None:
    assert parse_ip(text) == expected


# --- Nothing raises on cluster data -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
# Strings that reach deeper code paths than random text does.
interesting = st.sampled_from(
    [
        "None",
        "",
        "10.96.0.1",
        "fd00::1",
        "::ffff:1.2.3.4",
        "fe80::1%lo",
        "TCP",
        "UDP",
        "SCTP",
        "Local",
        "ClientIP",
        "NodePort",
        "LoadBalancer",
        "ExternalName",
        "IPv4",
        "IPv6",
        "FQDN",
        "mh",
        "Proxy",
    ]
)
leaf_or_interesting = json_values | interesting | st.integers(min_value=-2, max_value=70000)


def mutation_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``obj`` (dict keys and list indexes)."""
    paths = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            paths += mutation_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            paths += mutation_paths(value, (*prefix, index))
    return paths


def mutated(base: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """A valid object with one to three values somewhere inside replaced by arbitrary JSON."""
    result = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(mutation_paths(result)))
        parent: Any = result
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = data.draw(leaf_or_interesting)
    return result


RICH_SERVICE = service(
    type_="LoadBalancer",
    cluster_ips=["10.96.0.20", "fd00:10:96::20"],
    ports=[port("http", 80, "TCP", target_port="web", node_port=30080), port("dns", 53, "UDP")],
    external_ips=["203.0.113.7"],
    lb_ips=["203.0.113.9"],
    lb_ingress=[{"hostname": "x", "ipMode": "VIP"}],
    affinity=600,
    external_policy="Local",
    internal_policy="Cluster",
    scheduler="mh",
    labels={"app": "web"},
    resource_version="7",
)
RICH_SLICE = endpoint_slice(
    endpoints=[
        endpoint(
            "10.244.1.5", ready=True, serving=True, terminating=False, node="node-a", zone="z", hints=["z"]
        ),
        endpoint("10.244.2.5", ready=False, serving=True, terminating=True, node="node-b"),
    ],
    ports=[slice_port("http", 8080, "TCP"), slice_port("dns", 53, "UDP")],
    labels={"app": "web"},
    resource_version="9",
)


@settings(max_examples=400)
@given(json_values)
def test_parse_never_raises_on_arbitrary_json(raw: Any) -> None:
    assert isinstance(parse_service(raw), ServiceInfo | Skip)
    assert isinstance(parse_slice(raw), SliceInfo | Skip)


@settings(max_examples=600)
@given(st.data())
def test_parse_service_never_raises_on_mutated_service(data: st.DataObject) -> None:
    assert isinstance(parse_service(mutated(RICH_SERVICE, data)), ServiceInfo | Skip)


@settings(max_examples=600)
@given(st.data())
def test_parse_slice_never_raises_on_mutated_slice(data: st.DataObject) -> None:
    assert isinstance(parse_slice(mutated(RICH_SLICE, data)), SliceInfo | Skip)


def test_rich_objects_parse_cleanly() -> None:
    """The fuzzers' seeds are valid, so their mutations explore from a working object."""
    info = parsed_service(RICH_SERVICE)
    assert (info.scheduler, info.affinity_timeout, info.external_local, info.skips) == ("mh", 600, True, ())
    assert parsed_slice(RICH_SLICE).skips == ()
