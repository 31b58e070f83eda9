"""Which services a Local traffic policy leaves without endpoints on this node."""

from __future__ import annotations

from typing import Any

import pytest

from aproxy.core.locality import without_local_endpoints
from aproxy.core.objects import ServiceInfo, SliceInfo, parse_service, parse_slice
from tests.core.k8s import endpoint, endpoint_slice, port, service

NODE = "node-a"


def parsed(raw_service: dict[str, Any], *endpoints: dict[str, Any]) -> tuple[ServiceInfo, list[SliceInfo]]:
    info = parse_service(raw_service)
    slices = [parse_slice(endpoint_slice(endpoints=list(endpoints)))] if endpoints else []
    assert isinstance(info, ServiceInfo)
    return info, [s for s in slices if isinstance(s, SliceInfo)]


LOCAL_NODE_PORT: dict[str, Any] = {
    "type_": "NodePort",
    "ports": [port(node_port=30080)],
    "external_policy": "Local",
}


@pytest.mark.parametrize(
    ("raw", "endpoints", "expected"),
    [
        pytest.param(service(), [endpoint("10.244.2.5", node="node-b")], (0, 0), id="cluster-policies"),
        pytest.param(
            service(internal_policy="Local"),
            [endpoint("10.244.2.5", node="node-b")],
            (1, 0),
            id="internal-remote",
        ),
        pytest.param(
            service(internal_policy="Local"), [endpoint("10.244.1.5", node=NODE)], (0, 0), id="internal-local"
        ),
        pytest.param(service(internal_policy="Local"), [], (0, 0), id="no-endpoints-at-all"),
        pytest.param(
            service(**LOCAL_NODE_PORT), [endpoint("10.244.2.5", node="node-b")], (0, 1), id="external-remote"
        ),
        pytest.param(
            service(external_policy="Local"),  # a ClusterIP service: nothing external to serve
            [endpoint("10.244.2.5", node="node-b")],
            (0, 0),
            id="external-policy-on-cluster-ip",
        ),
        pytest.param(
            service(**LOCAL_NODE_PORT, internal_policy="Local"),
            [endpoint("10.244.2.5", node="node-b"), endpoint("10.244.1.6", node=NODE, ready=False)],
            (1, 1),
            id="the-local-one-is-not-ready",
        ),
        pytest.param(
            service(**LOCAL_NODE_PORT),
            [endpoint("10.244.1.6", node=NODE, ready=False, serving=True, terminating=True)],
            (0, 0),
            id="terminating-local-is-used-when-none-is-ready",
        ),
    ],
)
def test_without_local_endpoints(
    raw: dict[str, Any], endpoints: list[dict[str, Any]], expected: tuple[int, int]
) -> None:
    counts = without_local_endpoints([parsed(raw, *endpoints)], NODE)
    assert (counts["internal"], counts["external"]) == expected
