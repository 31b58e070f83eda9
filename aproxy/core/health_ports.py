"""Health-check node ports: which ports this node answers on, and what (kube-proxy's service_health.go).

For every ``type: LoadBalancer`` service with ``externalTrafficPolicy: Local`` and a ``healthCheckNodePort``,
the node answers HTTP on that port: 200 when it has ready endpoints of the service (cloud load balancers then
send it traffic), 503 when it has none, or while the proxy itself is unhealthy. The body is kube-proxy's:
``{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": bool}``.

``HealthPortTable`` follows the services incrementally (one changed service costs one update); a port two
services claim stays with the one that had it first (the API server never allocates one twice). The web
side (web/health_ports.py) opens and closes listeners to match ``ports()``, poked by ``on_change``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aproxy.core.model import ServiceKey
from aproxy.core.objects import ServiceInfo, SliceInfo

CONTENT_TYPE = "application/json"
HEADERS = {"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True, slots=True)
class HealthCheckPort:
    port: int
    service: ServiceKey
    local_endpoints: int


def health_check_port(
    service: ServiceInfo | None, slices: Iterable[SliceInfo], node_name: str
) -> HealthCheckPort | None:
    """The port ``service`` wants answered on this node (None: none), with its local ready endpoints: the
    distinct ready endpoints on ``node_name`` in the service's slices of its primary family."""
    if service is None or service.yields_nothing or not service.health_check_node_port:
        return None
    family = service.cluster_ips[0].version
    local = {
        endpoint.address
        for endpoint_slice in slices
        if not endpoint_slice.ignored
        and endpoint_slice.family == family
        and endpoint_slice.namespace == service.key.namespace
        and endpoint_slice.service_name == service.key.name
        for endpoint in endpoint_slice.endpoints
        if endpoint.ready and endpoint.node_name == node_name
    }
    return HealthCheckPort(service.health_check_node_port, service.key, len(local))


def answer(port: HealthCheckPort, proxy_healthy: bool) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of a probe of ``port``."""
    body = {
        "service": {"namespace": port.service.namespace, "name": port.service.name},
        "localEndpoints": port.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    return (200 if proxy_healthy and port.local_endpoints > 0 else 503), body


@dataclass(slots=True)
class HealthPortTable:
    """Each service's health-check port; ``ports()`` by port number (first claimant wins)."""

    on_change: Callable[[], None] | None = None
    _by_service: dict[ServiceKey, HealthCheckPort] = field(default_factory=dict)
    _by_port: dict[int, ServiceKey] = field(default_factory=dict)

    def ports(self) -> Mapping[int, HealthCheckPort]:
        return {number: self._by_service[key] for number, key in self._by_port.items()}

    def update(self, key: ServiceKey, port: HealthCheckPort | None) -> bool:
        """The service now wants ``port`` (None: nothing); True when what is served changed."""
        old = self._by_service.get(key)
        if old == port:
            return False
        if port is None:
            del self._by_service[key]
        else:
            self._by_service[key] = port
        if old is not None and self._by_port.get(old.port) == key and (port is None or port.port != old.port):
            del self._by_port[old.port]
            self._reassign(old.port)
        if port is not None:
            self._by_port.setdefault(port.port, key)
        if self.on_change is not None:
            self.on_change()
        return True

    def reset(self, ports: Iterable[HealthCheckPort]) -> None:
        """Start again from every service's port (start-up)."""
        self._by_service = {port.service: port for port in ports}
        self._by_port = {}
        for key in sorted(self._by_service, key=lambda k: (k.namespace, k.name)):
            self._by_port.setdefault(self._by_service[key].port, key)
        if self.on_change is not None:
            self.on_change()

    def _reassign(self, number: int) -> None:
        """A freed port goes to another service that wants it, if any (O(services), rare)."""
        for key, port in self._by_service.items():
            if port.port == number:
                self._by_port[number] = key
                return
