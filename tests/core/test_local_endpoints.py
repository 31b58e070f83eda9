"""Which addresses are endpoints on this node (the hairpin set's filter), and their refcounted union."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address
from typing import Any

from aproxy.core.local_endpoints import LocalEndpoints, local_endpoint_addresses
from aproxy.core.model import ServiceKey
from aproxy.core.objects import Endpoint, SliceInfo, parse_slice
from tests.core.k8s import endpoint, endpoint_slice

NODE = "node-a"
WEB = ServiceKey("default", "web")
API = ServiceKey("default", "api")


def parsed(*endpoints: dict[str, Any], **options: Any) -> SliceInfo:
    info = parse_slice(endpoint_slice(endpoints=list(endpoints), **options))
    assert isinstance(info, SliceInfo)
    return info


def test_only_endpoints_on_this_node_are_local() -> None:
    slices = [
        parsed(
            endpoint("10.244.1.5", node=NODE),
            endpoint("10.244.2.5", node="node-b"),
            endpoint("10.244.1.6", node=NODE, ready=False),  # not ready still backs a draining real server
        ),
        parsed(endpoint("fd00:10:244:1::5", node=NODE), address_type="IPv6"),
    ]

    assert local_endpoint_addresses(slices, NODE) == {
        ip_address("10.244.1.5"),
        ip_address("10.244.1.6"),
        ip_address("fd00:10:244:1::5"),
    }


def test_an_endpoint_without_a_node_name_is_not_local() -> None:
    slices = [parsed(endpoint("10.244.1.5"), endpoint("10.244.1.6", node=""))]

    assert local_endpoint_addresses(slices, NODE) == frozenset()
    assert local_endpoint_addresses(slices, "") == frozenset()  # a node without a name owns nothing


def test_an_ignored_slice_counts_as_absent() -> None:
    # parse_slice keeps no endpoints of an ignored slice; one built with some still yields nothing.
    ignored = SliceInfo(
        "default",
        "web-other",
        "web",
        "IPv4",
        ignored=True,
        endpoints=(Endpoint(ip_address("10.244.1.5"), node_name=NODE),),
    )

    assert local_endpoint_addresses([ignored], NODE) == frozenset()
    assert local_endpoint_addresses([dataclasses.replace(ignored, ignored=False)], NODE) == {
        ip_address("10.244.1.5")
    }


def test_an_address_stays_local_until_the_last_service_it_backs_lets_it_go() -> None:
    pod, other = ip_address("10.244.1.5"), ip_address("10.244.1.6")
    local = LocalEndpoints()
    local.replace(WEB, frozenset({pod}))
    local.replace(API, frozenset({pod, other}))

    local.replace(API, frozenset())
    after_api = (pod in local, other in local)
    local.replace(WEB, frozenset())

    assert after_api == (True, False)
    assert pod not in local
    assert len(local) == 0


def test_reset_starts_again_from_every_service() -> None:
    pod, other = ip_address("10.244.1.5"), ip_address("10.244.1.6")
    local = LocalEndpoints()
    local.replace(WEB, frozenset({other}))

    local.reset({WEB: frozenset({pod}), API: frozenset({pod})})
    local.replace(WEB, frozenset())

    assert (pod in local, other in local) == (True, False)
