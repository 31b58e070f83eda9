"""Which addresses are endpoints on this node: the only real servers a hairpin can reach.

A pod reaching itself through its service is a pod on this node: a remote pod's packets never arrive here
with a service destination and its own source. So the hairpin set (backends/nat_rules.py) holds only the real
servers whose address is a local endpoint, like kube-proxy's KUBE-LOOP-BACK (``ep.IsLocal()``: the endpoint's
``nodeName`` is this node's). An endpoint without a ``nodeName`` is not local, as in kube-proxy.

Pure: parsed slices in, addresses out; ``LocalEndpoints`` keeps the union over services (the syncer feeds it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aproxy.core.model import IPAddress, ServiceKey
from aproxy.core.objects import SliceInfo


def local_endpoint_addresses(slices: Iterable[SliceInfo], node_name: str) -> frozenset[IPAddress]:
    """The addresses of the endpoints in ``slices`` that are on ``node_name``, whatever their conditions (a
    terminating endpoint still backs a draining real server, and hairpin connections to it must work)."""
    if not node_name:
        return frozenset()  # no endpoint is on a node without a name
    return frozenset(
        endpoint.address
        for endpoint_slice in slices
        if not endpoint_slice.ignored
        for endpoint in endpoint_slice.endpoints
        if endpoint.node_name == node_name
    )


@dataclass(slots=True)
class LocalEndpoints:
    """Each service's local endpoint addresses, and how many services each address backs (a pod can back
    several services: it stays local until the last of them lets it go)."""

    _by_service: dict[ServiceKey, frozenset[IPAddress]] = field(default_factory=dict)
    _counts: Counter[IPAddress] = field(default_factory=Counter)

    def __contains__(self, address: object) -> bool:
        return address in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    def replace(self, key: ServiceKey, addresses: frozenset[IPAddress]) -> None:
        """The service's local endpoints are now ``addresses`` (empty: it has none, or is gone)."""
        old = self._by_service.pop(key, frozenset())
        if addresses:
            self._by_service[key] = addresses
        for address in old - addresses:
            self._counts[address] -= 1
            if self._counts[address] <= 0:
                del self._counts[address]
        for address in addresses - old:
            self._counts[address] += 1

    def reset(self, by_service: Mapping[ServiceKey, frozenset[IPAddress]]) -> None:
        """Start again from every service's local endpoints (start-up): O(cluster), once."""
        self._by_service = {key: addresses for key, addresses in by_service.items() if addresses}
        self._counts = Counter(address for addresses in self._by_service.values() for address in addresses)
