"""Translation rules: one table case per Kubernetes semantic rule (kube-proxy's, as documented)."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from aproxy.core.model import IPAddress, ServiceKey, ServiceState, VirtualServerSpec
from aproxy.core.objects import ServiceInfo, Severity, Skip, SliceInfo, parse_service, parse_slice
from aproxy.core.translate import (
    MH_SOURCE_PORT_FLAG,
    Translation,
    TranslationContext,
    UnknownSchedulerError,
    translate_all,
    translate_service,
)
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port

NODE = "node-a"
NODE_IP = "192.0.2.10"
NODE_IP6 = "2001:db8::10"


def context(
    addresses: Sequence[str] = (NODE_IP,), zone: str | None = None, scheduler: str = "rr"
) -> TranslationContext:
    return TranslationContext(NODE, frozenset(ip_address(a) for a in addresses), zone, scheduler)


def parsed(
    raw_service: dict[str, Any], raw_slices: Sequence[dict[str, Any]]
) -> tuple[ServiceInfo, list[SliceInfo]]:
    info = parse_service(raw_service)
    assert isinstance(info, ServiceInfo), info
    slices = [parse_slice(raw) for raw in raw_slices]
    assert all(isinstance(s, SliceInfo) for s in slices), slices
    return info, [s for s in slices if isinstance(s, SliceInfo)]


def translate(
    raw_service: dict[str, Any], raw_slices: Sequence[dict[str, Any]], ctx: TranslationContext | None = None
) -> Translation:
    info, slices = parsed(raw_service, raw_slices)
    return translate_service(info, slices, ctx or context())


def summary(state: ServiceState) -> dict[str, list[str]]:
    """``{"TCP 10.96.0.1:80": ["10.244.1.5:8080", ...]}``: virtual servers and real servers, in order."""
    return {str(vs.key): [str(real.key) for real in vs.real_servers] for vs in state.virtual_servers}


def addresses(*texts: str) -> frozenset[IPAddress]:
    return frozenset(ip_address(text) for text in texts)


def ep(address: str, node: str = "node-b", **conditions: Any) -> dict[str, Any]:
    return endpoint(address, node=node, **conditions)


def pod_slice(*endpoints: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return endpoint_slice(endpoints=list(endpoints), **kwargs)


TWO_PODS = pod_slice(ep("10.244.1.5", NODE), ep("10.244.2.5"))
NP: dict[str, Any] = {"type_": "NodePort", "ports": [port(node_port=30080)]}


@pytest.mark.parametrize(
    ("raw_service", "raw_slices", "ctx", "expected", "bind"),
    [
        pytest.param(
            service(),
            [TWO_PODS],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="cluster-ip",
        ),
        pytest.param(
            service(cluster_ips=["10.96.0.20", "fd00:10:96::20"]),
            [TWO_PODS, pod_slice(ep("fd00:10:244:1::5", NODE), address_type="IPv6")],
            None,
            {
                "TCP 10.96.0.20:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP [fd00:10:96::20]:80": ["[fd00:10:244:1::5]:8080"],
            },
            {"10.96.0.20", "fd00:10:96::20"},
            id="dual-stack-each-family-its-endpoints",
        ),
        pytest.param(
            service(ports=[port("http", 80), port("metrics", 9090)]),
            [pod_slice(ep("10.244.1.5"), ports=[slice_port("http", 8080), slice_port("metrics", 9091)])],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080"], "TCP 10.96.0.1:9090": ["10.244.1.5:9091"]},
            {"10.96.0.1"},
            id="port-matched-by-name-target-port-differs",
        ),
        pytest.param(
            service(ports=[port(None, 80)]),
            [pod_slice(ep("10.244.1.5"), ports=[slice_port(None, 8080), slice_port("other", 9000)])],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]},
            {"10.96.0.1"},
            id="unnamed-port-matches-unnamed-slice-port",
        ),
        pytest.param(
            service(ports=[port("dns", 53, "TCP")]),
            [pod_slice(ep("10.244.1.5"), ports=[slice_port("dns", 53, "UDP")])],
            None,
            {"TCP 10.96.0.1:53": []},
            {"10.96.0.1"},
            id="protocol-must-match",
        ),
        pytest.param(
            service(),
            [
                pod_slice(ep("10.244.1.5"), ep("10.244.2.5"), name="web-a"),
                pod_slice(ep("10.244.2.5"), ep("10.244.3.5"), name="web-b"),
            ],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080", "10.244.3.5:8080"]},
            {"10.96.0.1"},
            id="duplicate-endpoints-across-slices-once",
        ),
        pytest.param(
            service(),
            [
                pod_slice(ep("10.244.2.5", ready=False), name="web-a"),
                pod_slice(ep("10.244.2.5", ready=True), name="web-b"),
            ],
            None,
            {"TCP 10.96.0.1:80": ["10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="duplicate-endpoint-ready-copy-wins",
        ),
        pytest.param(
            service(),
            [TWO_PODS, pod_slice(endpoint("db.example.com"), address_type="FQDN", name="web-fqdn")],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="fqdn-slice-ignored",
        ),
        pytest.param(
            service(),
            [pod_slice(ep("10.244.1.5"), ep("10.244.1.6", ready=False))],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]},
            {"10.96.0.1"},
            id="ready-unset-counts-as-ready-not-ready-excluded",
        ),
        pytest.param(
            service(),
            [
                pod_slice(
                    ep("10.244.1.5", ready=False, serving=True, terminating=True),
                    ep("10.244.1.6", ready=False, serving=False, terminating=True),
                    ep("10.244.1.7", ready=False, terminating=False),
                )
            ],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]},
            {"10.96.0.1"},
            id="serving-terminating-when-none-ready",
        ),
        pytest.param(
            service(),
            [pod_slice(ep("10.244.1.5", ready=False, serving=True, terminating=True), ep("10.244.1.6"))],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.6:8080"]},
            {"10.96.0.1"},
            id="terminating-unused-while-one-ready",
        ),
        pytest.param(
            service(),
            [],
            None,
            {"TCP 10.96.0.1:80": []},
            {"10.96.0.1"},
            id="no-endpoints-keeps-virtual-servers",
        ),
        pytest.param(
            service(),
            [pod_slice(ep("10.244.0.10"), ep("10.244.0.9"), ep("10.244.0.100"))],
            None,
            {"TCP 10.96.0.1:80": ["10.244.0.9:8080", "10.244.0.10:8080", "10.244.0.100:8080"]},
            {"10.96.0.1"},
            id="real-servers-sorted-numerically",
        ),
        pytest.param(
            service(**NP),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.10:30080": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1"},
            id="node-port-on-node-address-never-bound",
        ),
        pytest.param(
            service(**NP),
            [TWO_PODS],
            context([NODE_IP, "192.0.2.11", NODE_IP6]),
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.10:30080": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.11:30080": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1"},
            id="node-port-per-node-address-of-the-service-family",
        ),
        pytest.param(
            service(
                type_="NodePort", cluster_ips=["10.96.0.1", "fd00:10:96::1"], ports=[port(node_port=30080)]
            ),
            [TWO_PODS, pod_slice(ep("fd00:10:244:1::5"), address_type="IPv6")],
            context([NODE_IP, NODE_IP6]),
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.10:30080": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP [2001:db8::10]:30080": ["[fd00:10:244:1::5]:8080"],
                "TCP [fd00:10:96::1]:80": ["[fd00:10:244:1::5]:8080"],
            },
            {"10.96.0.1", "fd00:10:96::1"},
            id="dual-stack-node-port",
        ),
        pytest.param(
            service(type_="ClusterIP", ports=[port(node_port=30080)]),
            [TWO_PODS],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="cluster-ip-type-ignores-node-port",
        ),
        pytest.param(
            service(type_="LoadBalancer", ports=[port(node_port=30080)], lb_ips=["203.0.113.9"]),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.10:30080": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 203.0.113.9:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1", "203.0.113.9"},
            id="load-balancer-ingress-and-node-port",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ips=["203.0.113.9"]),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 203.0.113.9:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1", "203.0.113.9"},
            id="load-balancer-without-node-port",
        ),
        pytest.param(
            service(external_ips=["203.0.113.7", "203.0.113.8"]),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 203.0.113.7:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 203.0.113.8:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1", "203.0.113.7", "203.0.113.8"},
            id="external-ips",
        ),
        pytest.param(
            service(external_ips=[NODE_IP]),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.10:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1"},
            id="external-ip-on-node-address-served-not-bound",
        ),
        pytest.param(
            service(type_="LoadBalancer", lb_ips=[NODE_IP]),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.10:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1"},
            id="lb-ip-on-node-address-served-not-bound",
        ),
        pytest.param(
            service(type_="LoadBalancer", external_ips=["203.0.113.9"], lb_ips=["203.0.113.9"]),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 203.0.113.9:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1", "203.0.113.9"},
            id="external-ip-equal-to-lb-ip-one-virtual-server",
        ),
        pytest.param(
            service(
                type_="LoadBalancer",
                ports=[port(node_port=30080)],
                external_ips=["203.0.113.7"],
                lb_ips=["203.0.113.9"],
                external_policy="Local",
            ),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"],
                "TCP 192.0.2.10:30080": ["10.244.1.5:8080"],
                "TCP 203.0.113.7:80": ["10.244.1.5:8080"],
                "TCP 203.0.113.9:80": ["10.244.1.5:8080"],
            },
            {"10.96.0.1", "203.0.113.7", "203.0.113.9"},
            id="external-traffic-policy-local",
        ),
        pytest.param(
            service(
                type_="LoadBalancer",
                ports=[port(node_port=30080)],
                lb_ips=["203.0.113.9"],
                external_policy="Local",
            ),
            [pod_slice(ep("10.244.2.5"), ep("10.244.3.5", node="node-c"))],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.2.5:8080", "10.244.3.5:8080"],
                "TCP 192.0.2.10:30080": [],
                "TCP 203.0.113.9:80": [],
            },
            {"10.96.0.1", "203.0.113.9"},
            id="external-local-without-local-endpoints-no-fallback",
        ),
        pytest.param(
            service(internal_policy="Local", **NP),
            [TWO_PODS],
            None,
            {
                "TCP 10.96.0.1:80": ["10.244.1.5:8080"],
                "TCP 192.0.2.10:30080": ["10.244.1.5:8080", "10.244.2.5:8080"],
            },
            {"10.96.0.1"},
            id="internal-traffic-policy-local",
        ),
        pytest.param(
            service(internal_policy="Local"),
            [pod_slice(ep("10.244.2.5"))],
            None,
            {"TCP 10.96.0.1:80": []},
            {"10.96.0.1"},
            id="internal-local-without-local-endpoints-no-fallback",
        ),
        pytest.param(
            service(internal_policy="Local"),
            [
                pod_slice(
                    ep("10.244.1.5", NODE, ready=False, serving=True, terminating=True), ep("10.244.2.5")
                )
            ],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]},
            {"10.96.0.1"},
            id="local-serving-terminating-when-no-local-ready",
        ),
        pytest.param(
            service(),
            [pod_slice(ep("10.244.1.5", hints=["z1"]), ep("10.244.2.5", hints=["z2"]))],
            context(zone="z1"),
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]},
            {"10.96.0.1"},
            id="zone-hints-applied",
        ),
        pytest.param(
            service(),
            [pod_slice(ep("10.244.1.5", hints=["z1"]), ep("10.244.2.5"))],
            context(zone="z1"),
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="zone-hints-ignored-when-one-ready-endpoint-lacks-them",
        ),
        pytest.param(
            service(),
            [pod_slice(ep("10.244.1.5", hints=["z2"]), ep("10.244.2.5", hints=["z3"]))],
            context(zone="z1"),
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="zone-hints-ignored-when-none-for-this-zone",
        ),
        pytest.param(
            service(),
            [pod_slice(ep("10.244.1.5", hints=["z1"]), ep("10.244.2.5", hints=["z2"]))],
            context(zone=None),
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="zone-hints-ignored-without-node-zone",
        ),
        pytest.param(
            service(),
            [
                TWO_PODS,
                pod_slice(ep("10.244.9.9"), service="other"),
                pod_slice(ep("10.244.8.8"), ns="elsewhere"),
            ],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="slices-of-other-services-ignored",
        ),
        pytest.param(
            service(),
            [
                TWO_PODS,
                pod_slice(ep("10.244.9.9"), name="web-h", labels={"service.kubernetes.io/headless": ""}),
            ],
            None,
            {"TCP 10.96.0.1:80": ["10.244.1.5:8080", "10.244.2.5:8080"]},
            {"10.96.0.1"},
            id="headless-labelled-slice-ignored",
        ),
        pytest.param(service(cluster_ips="None"), [TWO_PODS], None, {}, set(), id="headless-nothing"),
        pytest.param(
            service(cluster_ips="None", type_="NodePort", ports=[port(node_port=30080)]),
            [TWO_PODS],
            None,
            {},
            set(),
            id="headless-node-port-nothing",
        ),
        pytest.param(
            service(type_="ExternalName", cluster_ips=None, external_ips=["203.0.113.7"]),
            [TWO_PODS],
            None,
            {},
            set(),
            id="external-name-nothing",
        ),
        pytest.param(
            service(labels={"service.kubernetes.io/service-proxy-name": "other"}, **NP),
            [TWO_PODS],
            None,
            {},
            set(),
            id="proxy-name-label-nothing",
        ),
        pytest.param(service(cluster_ips=None), [TWO_PODS], None, {}, set(), id="no-cluster-ip-nothing"),
        pytest.param(service(ports=[]), [TWO_PODS], None, {}, set(), id="no-ports-nothing"),
    ],
)
def test_rule(
    raw_service: dict[str, Any],
    raw_slices: list[dict[str, Any]],
    ctx: TranslationContext | None,
    expected: dict[str, list[str]],
    bind: set[str],
) -> None:
    state = translate(raw_service, raw_slices, ctx).state
    assert state.service == ServiceKey("default", "web")
    assert summary(state) == expected
    assert state.bind_addresses == addresses(*bind)


def test_virtual_servers_sorted_by_protocol_address_port() -> None:
    raw = service(
        type_="NodePort",
        cluster_ips=["10.96.0.9", "fd00:10:96::9"],
        ports=[port("b", 9000, "UDP", node_port=30002), port("a", 80, "TCP", node_port=30001)],
        external_ips=["10.96.0.10"],
    )
    state = translate(raw, [], context([NODE_IP, NODE_IP6])).state
    keys = [vs.key for vs in state.virtual_servers]
    assert keys == sorted(keys, key=lambda key: key.sort_key())
    assert [str(key) for key in keys][:3] == ["TCP 10.96.0.9:80", "TCP 10.96.0.10:80", "TCP 192.0.2.10:30001"]


@pytest.mark.parametrize(
    ("raw_service", "ctx", "expected"),
    [
        pytest.param(
            service(), context(), VirtualServerSpec("rr", 0, frozenset()), id="default-scheduler-rr"
        ),
        pytest.param(
            service(),
            context(scheduler="lc"),
            VirtualServerSpec("lc", 0, frozenset()),
            id="default-scheduler-from-context",
        ),
        pytest.param(
            service(scheduler="wrr"),
            context(scheduler="lc"),
            VirtualServerSpec("wrr", 0, frozenset()),
            id="scheduler-annotation",
        ),
        pytest.param(
            service(scheduler="fastest"),
            context(scheduler="lc"),
            VirtualServerSpec("lc", 0, frozenset()),
            id="unknown-scheduler-annotation-uses-default",
        ),
        pytest.param(
            service(scheduler="mh"),
            context(),
            VirtualServerSpec("mh", 0, frozenset({MH_SOURCE_PORT_FLAG})),
            id="mh-gets-source-port-flag",
        ),
        pytest.param(
            service(),
            context(scheduler="mh"),
            VirtualServerSpec("mh", 0, frozenset({"flag-2"})),
            id="default-mh-flag",
        ),
        pytest.param(
            service(affinity=True),
            context(),
            VirtualServerSpec("rr", 10800, frozenset()),
            id="session-affinity-default",
        ),
        pytest.param(
            service(affinity=600, scheduler="mh"),
            context(),
            VirtualServerSpec("mh", 600, frozenset({"flag-2"})),
            id="session-affinity-timeout-with-mh",
        ),
    ],
)
def test_virtual_server_spec(
    raw_service: dict[str, Any], ctx: TranslationContext, expected: VirtualServerSpec
) -> None:
    raw_service = raw_service | {"spec": raw_service["spec"] | {"type": "NodePort"}}
    raw_service["spec"]["ports"] = [port(node_port=30080)]
    state = translate(raw_service, [], ctx).state
    assert len(state.virtual_servers) == 2  # the cluster IP and the node port: every one gets the spec
    assert {vs.spec for vs in state.virtual_servers} == {expected}


@pytest.mark.parametrize(
    ("raw_port", "expected"),
    [
        pytest.param(port("http", 80), "shop/api:http", id="port-name-with-port"),
        pytest.param(port(None, 80), "shop/api", id="port-name-unnamed"),
    ],
)
def test_port_name(raw_port: dict[str, Any], expected: str) -> None:
    state = translate(service("api", "shop", ports=[raw_port]), []).state
    assert [vs.port_name for vs in state.virtual_servers] == [expected]


def test_warnings_of_service_and_its_slices_are_returned() -> None:
    bad_slice = pod_slice(ep("10.244.1.5"), endpoint("10.244.1.300"))
    translation = translate(service(scheduler="fastest"), [bad_slice])
    assert summary(translation.state) == {"TCP 10.96.0.1:80": ["10.244.1.5:8080"]}
    assert [(s.kind, s.severity) for s in translation.skips] == [
        ("Service", Severity.WARNING),
        ("EndpointSlice", Severity.WARNING),
    ]
    assert "fastest" in translation.skips[0].reason
    assert "10.244.1.300" in translation.skips[1].reason


def test_slice_order_does_not_change_the_result() -> None:
    slices = [
        pod_slice(ep("10.244.2.5", ready=False, serving=True, terminating=True), name="web-a"),
        pod_slice(ep("10.244.2.5", node=NODE), ep("10.244.3.5"), name="web-b"),
        pod_slice(ep("10.244.3.5", NODE, ready=False), name="web-c"),
    ]
    info, parsed_slices = parsed(service(internal_policy="Local"), slices)
    results = {
        translate_service(info, order, context()).state for order in (parsed_slices, parsed_slices[::-1])
    }
    assert len(results) == 1
    assert summary(results.pop()) == {"TCP 10.96.0.1:80": ["10.244.2.5:8080"]}


def test_context_rejects_unknown_default_scheduler() -> None:
    with pytest.raises(UnknownSchedulerError, match="fastest"):
        TranslationContext(NODE, frozenset(), default_scheduler="fastest")


# --- translate_all ------------------------------------------------------------------------------------------


def test_translate_all_groups_slices_by_service_in_namespace() -> None:
    raw_services = [
        service("web", "a", cluster_ips="10.96.0.1"),
        service("web", "b", cluster_ips="10.96.0.2"),
        service("dns", "a", cluster_ips="10.96.0.3", ports=[port("dns", 53, "UDP")]),
        service(
            "other", "a", cluster_ips="10.96.0.4", labels={"service.kubernetes.io/service-proxy-name": "x"}
        ),
        service("headless", "a", cluster_ips="None"),
    ]
    raw_slices = [
        pod_slice(ep("10.244.1.1"), service="web", ns="a"),
        pod_slice(ep("10.244.2.2"), service="web", ns="b"),
        pod_slice(ep("10.244.3.3"), service="dns", ns="a", ports=[slice_port("dns", 53, "UDP")]),
        pod_slice(ep("10.244.4.4"), service="other", ns="a"),
        pod_slice(ep("10.244.5.5"), endpoint("10.244.5.300"), service="gone", ns="a"),
    ]
    services = [parse_service(raw) for raw in raw_services]
    slices = [parse_slice(raw) for raw in raw_slices]
    states, skips = translate_all(
        [s for s in services if isinstance(s, ServiceInfo)],
        [s for s in slices if isinstance(s, SliceInfo)],
        context(),
    )
    assert {str(key): summary(state) for key, state in states.items()} == {
        "a/web": {"TCP 10.96.0.1:80": ["10.244.1.1:8080"]},
        "b/web": {"TCP 10.96.0.2:80": ["10.244.2.2:8080"]},
        "a/dns": {"UDP 10.96.0.3:53": ["10.244.3.3:53"]},
        "a/headless": {},
    }
    # The warning of a slice whose service is absent is still reported.
    assert skips == (
        Skip(
            "EndpointSlice",
            "a",
            "gone-ipv4",
            'invalid endpoint address "10.244.5.300" in endpoints[1]',
            Severity.WARNING,
        ),
    )


def test_translate_all_equals_translate_service_per_service() -> None:
    infos = [parse_service(service(f"s{i}", cluster_ips=f"10.96.1.{i}")) for i in range(5)]
    slice_infos = [parse_slice(pod_slice(ep(f"10.244.7.{i}"), service=f"s{i}")) for i in range(5)]
    services = [s for s in infos if isinstance(s, ServiceInfo)]
    slices = [s for s in slice_infos if isinstance(s, SliceInfo)]
    states, _ = translate_all(services, slices, context())
    assert states == {s.key: translate_service(s, slices, context()).state for s in services}


# --- the bundled example ----------------------------------------------------------------------------------


def test_example_cluster_translates_cleanly() -> None:
    """examples/cluster.yaml (what ``make run`` shows) parses without a skip and shows each rule it is for."""
    yaml = pytest.importorskip("yaml")
    with open(Path(__file__).parents[2] / "examples" / "cluster.yaml") as file:
        documents = [doc for doc in yaml.safe_load_all(file) if doc]
    services = [parse_service(doc) for doc in documents if doc["kind"] == "Service"]
    slices = [parse_slice(doc) for doc in documents if doc["kind"] == "EndpointSlice"]
    assert not [x for x in services + slices if isinstance(x, Skip)]
    service_infos = [s for s in services if isinstance(s, ServiceInfo)]
    states, skips = translate_all(service_infos, [s for s in slices if isinstance(s, SliceInfo)], context())
    assert skips == ()
    by_name = {key.name: summary(state) for key, state in states.items()}
    assert set(by_name["kube-dns"]) == {"UDP 10.96.0.10:53", "TCP 10.96.0.10:53", "TCP 10.96.0.10:9153"}
    # Named target port; the terminating pod 10.244.2.12 is left out while ready ones exist.
    assert by_name["web"]["TCP 10.96.10.20:80"] == [f"10.244.{n}.11:8080" for n in range(3)]
    assert by_name["frontend"]["TCP 192.0.2.10:30080"] == ["10.244.0.21:3000", "10.244.1.21:3000"]
    assert by_name["checkout"]["TCP 203.0.113.10:443"] == ["10.244.0.31:8443"]  # externalTrafficPolicy Local
    assert by_name["checkout"]["TCP 192.0.2.10:31443"] == ["10.244.0.31:8443"]
    assert len(by_name["checkout"]["TCP 10.96.10.40:443"]) == 3
    echo_v6 = by_name["echo"]["TCP [fd00:10:96::50]:80"]
    assert echo_v6 == ["[fd00:10:244::51]:5678", "[fd00:10:244:1::51]:5678"]
    assert by_name["postgres"] == {}
    specs = {key.name: {vs.spec for vs in state.virtual_servers} for key, state in states.items()}
    assert specs["web"] == {VirtualServerSpec("rr", 3600)}
    assert specs["prometheus"] == {VirtualServerSpec("wrr", 0)}


@pytest.mark.parametrize("ports", [3, 40])  # below and above the count where slice ports are indexed
def test_many_ports_match_slice_ports_by_name_protocol_and_family(ports: int) -> None:
    # Slice ports in another order than the service's, a UDP twin with the same name, a second slice that
    # repeats some names, an IPv6 slice for an IPv4-only service and an FQDN slice: only (name, protocol,
    # family) matches count, each slice in name order, whether the lookup scans or uses the index.
    names = [f"p{i}" for i in range(ports)]
    raw_service = service(ports=[port(name, 1000 + i) for i, name in enumerate(names)])
    first = pod_slice(
        ep("10.244.1.5"),
        name="web-a",
        ports=[slice_port(name, 8000 + i) for i, name in reversed(list(enumerate(names)))]
        + [slice_port("p0", 9999, protocol="UDP")],
    )
    second = pod_slice(ep("10.244.2.5"), name="web-b", ports=[slice_port(n, 7000) for n in names[::2]])
    ipv6 = pod_slice(ep("2001:db8::5"), name="web-c", address_type="IPv6", ports=[slice_port("p1", 6000)])
    fqdn = pod_slice(ep("example.com"), name="web-d", address_type="FQDN", ports=[slice_port("p1", 6000)])
    state = translate(raw_service, [fqdn, second, ipv6, first]).state
    expected = {
        f"TCP 10.96.0.1:{1000 + i}": sorted(
            [f"10.244.1.5:{8000 + i}"] + ([f"10.244.2.5:{7000}"] if i % 2 == 0 else [])
        )
        for i in range(ports)
    }
    assert summary(state) == expected
