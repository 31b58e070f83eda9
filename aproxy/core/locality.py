"""Services whose Local traffic policy leaves this node without endpoints (kube-proxy's
``kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}``).

A service counts for ``internal`` when its ``internalTrafficPolicy`` is Local, and for ``external`` when its
``externalTrafficPolicy`` is Local and it is reachable from outside (node ports, external or load-balancer
IPs), while it has usable endpoints somewhere and none of them on this node: traffic for it that reaches this
node is refused. A service with no usable endpoint at all is not counted (that is not a locality problem).
Usable means what translation uses: ready, or serving and terminating when no endpoint is ready.

Pure: parsed objects in, counts out.
"""

from __future__ import annotations

from collections.abc import Iterable

from aproxy.core.objects import Endpoint, ServiceInfo, SliceInfo


def without_local_endpoints(
    services: Iterable[tuple[ServiceInfo, list[SliceInfo]]], node_name: str
) -> dict[str, int]:
    """``{"internal": n, "external": m}`` over ``services`` (each with its slices)."""
    counts = {"internal": 0, "external": 0}
    for service, slices in services:
        if not (service.internal_local or service.external_local):
            continue
        usable = _usable(endpoint for endpoint_slice in slices for endpoint in endpoint_slice.endpoints)
        if not usable or any(endpoint.node_name == node_name for endpoint in usable):
            continue
        if service.internal_local and service.cluster_ips:
            counts["internal"] += 1
        if service.external_local and (service.node_ports or service.external_ips or service.lb_ips):
            counts["external"] += 1
    return counts


def _usable(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """Ready endpoints; when none is ready, those serving and terminating (translation's rule)."""
    candidates = list(endpoints)
    ready = [endpoint for endpoint in candidates if endpoint.ready]
    return ready or [endpoint for endpoint in candidates if endpoint.serving and endpoint.terminating]
