"""render: the node's view merged from per-service states, and the JSON shape ``aproxy plan`` prints."""

from __future__ import annotations

import json
from ipaddress import ip_address

from aproxy import render
from aproxy.core.model import (
    L4Protocol,
    RealServer,
    ServiceKey,
    ServiceState,
    VirtualServer,
    VirtualServerKey,
    VirtualServerSpec,
)

RR = VirtualServerSpec()
DNS = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.10"), 53)


def test_to_json_shape_and_order() -> None:
    v6 = ip_address("fd00:0:0::a")
    services = [
        ServiceState(
            ServiceKey("kube-system", "kube-dns"),
            (
                VirtualServer(
                    DNS,
                    RR,
                    "kube-system/kube-dns:dns-tcp",
                    # The translation sorts real servers (numerically); the view keeps that order.
                    (RealServer(ip_address("10.244.1.9"), 53), RealServer(ip_address("10.244.1.10"), 53)),
                ),
            ),
            frozenset({ip_address("10.96.0.10"), ip_address("10.96.0.9")}),
        ),
        ServiceState(
            ServiceKey("default", "v6"),
            (
                VirtualServer(
                    VirtualServerKey(L4Protocol.TCP, v6, 80),
                    VirtualServerSpec("sh", 10800, frozenset({"sh-port", "sh-fallback"})),
                    "default/v6",
                ),
                VirtualServer(
                    VirtualServerKey(L4Protocol.UDP, ip_address("10.96.0.9"), 53), RR, "default/v6:u"
                ),
            ),
            frozenset({v6}),
        ),
    ]
    document = render.to_json(render.node_view(services))
    assert document == {
        "addresses": ["10.96.0.9", "10.96.0.10", "fd00::a"],
        "virtual_servers": [
            {
                "protocol": "TCP",
                "address": "10.96.0.10",
                "port": 53,
                "scheduler": "rr",
                "persistence_timeout": 0,
                "service": "kube-system/kube-dns:dns-tcp",
                "real_servers": [
                    {"address": "10.244.1.9", "port": 53, "weight": 1},
                    {"address": "10.244.1.10", "port": 53, "weight": 1},
                ],
            },
            {
                # Scheduler flags are not part of the documented shape (docs/interfaces.md).
                "protocol": "TCP",
                "address": "fd00::a",
                "port": 80,
                "scheduler": "sh",
                "persistence_timeout": 10800,
                "service": "default/v6",
                "real_servers": [],
            },
            {
                "protocol": "UDP",
                "address": "10.96.0.9",
                "port": 53,
                "scheduler": "rr",
                "persistence_timeout": 0,
                "service": "default/v6:u",
                "real_servers": [],
            },
        ],
    }
    assert list(document["virtual_servers"][0]) == [
        "protocol",
        "address",
        "port",
        "scheduler",
        "persistence_timeout",
        "service",
        "real_servers",
    ]
    json.dumps(document)  # plain JSON types only


def test_the_first_service_by_namespace_and_name_keeps_a_contested_key() -> None:
    first = ServiceState(ServiceKey("a", "first"), (VirtualServer(DNS, RR, "a/first"),))
    second = ServiceState(ServiceKey("b", "second"), (VirtualServer(DNS, RR, "b/second"),))
    view = render.node_view([second, first])
    assert [vs.port_name for vs in view.virtual_servers] == ["a/first"]
    assert view.conflicts == (render.VirtualServerConflict(DNS, "a/first", ServiceKey("b", "second")),)
