"""What a service wants in aproxy's ipsets: the per-purpose set entries around IPVS (kube-proxy's design).

IPVS rewrites only destinations; source NAT, source ranges and the service-IP filter are iptables rules
(backends/masquerade.py) that match *sets*, one per purpose, so the number of rules never grows with the
cluster. This module decides the members, from a service alone (its addresses, ports, policy and source
ranges; not its endpoints: those are the hairpin set's business, which follows the real servers):

================================  ============================================================================
set (kind)                        members
================================  ============================================================================
CLUSTER_IP                        cluster IP, protocol:port, of every port
EXTERNAL_IP (+ _LOCAL)            external IP, protocol:port (``_LOCAL``: also when the policy is Local)
LOAD_BALANCER (+ _LOCAL)          load-balancer IP, protocol:port (``_LOCAL``: also when the policy is Local)
LOAD_BALANCER_FW                  load-balancer IP, protocol:port of services with source ranges
LOAD_BALANCER_SOURCE              load-balancer IP, protocol:port, allowed source CIDR (same family)
NODE_PORT (+ _LOCAL)              protocol and node port (TCP and UDP; ``_LOCAL``: also when Local)
HEALTH_CHECK_NODE_PORT            TCP and the healthCheckNodePort (LoadBalancer, policy Local)
================================  ============================================================================

The rules then say: traffic to a member of EXTERNAL_IP, LOAD_BALANCER or NODE_PORT that is not in the
``_LOCAL`` set is marked for masquerading; traffic to a LOAD_BALANCER_FW member from a source that is not
in LOAD_BALANCER_SOURCE is dropped; a new connection to an address on the dummy device is rejected unless
its destination is a CLUSTER_IP, EXTERNAL_IP or LOAD_BALANCER member or a health-check node port (the
service-IP filter).

``SetMembership`` keeps each service's entries and a count per entry (two services may want the same one):
replacing one service's entries returns only the entries that appeared or disappeared, so one changed
service costs its own entries, whatever the cluster's size.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from aproxy.core.model import IPAddress, L4Protocol, ServiceKey
from aproxy.core.objects import ServiceInfo

Network = IPv4Network | IPv6Network


class SetKind(enum.Enum):
    CLUSTER_IP = "cluster-ip"
    EXTERNAL_IP = "external-ip"
    EXTERNAL_IP_LOCAL = "external-ip-local"
    LOAD_BALANCER = "load-balancer"
    LOAD_BALANCER_LOCAL = "load-balancer-local"
    LOAD_BALANCER_FW = "load-balancer-fw"
    LOAD_BALANCER_SOURCE = "load-balancer-source"
    NODE_PORT = "node-port"
    NODE_PORT_LOCAL = "node-port-local"
    HEALTH_CHECK_NODE_PORT = "health-check-node-port"
    # Not a service's: every address bound on the dummy device (the backend follows its binds).
    IPVS_IP = "ipvs-ip"


# Node ports live in bitmap:port sets, one per protocol; SCTP node ports are not in any set (kube-proxy
# keeps those in hash:ip,port sets per node address; aproxy does not masquerade SCTP node ports yet).
NODE_PORT_PROTOCOLS = (L4Protocol.TCP, L4Protocol.UDP)


@dataclass(frozen=True, slots=True)
class SetEntry:
    """One member of one of aproxy's sets. ``address`` is None for node ports (bitmap:port sets, whose
    protocol picks the set); ``source`` only for LOAD_BALANCER_SOURCE; ``protocol``/``port`` unset for
    IPVS_IP."""

    kind: SetKind
    address: IPAddress | None = None
    protocol: L4Protocol | None = None
    port: int = 0
    source: Network | None = None

    @property
    def version(self) -> int | None:
        """The address family of the set this entry goes to; None for the family-less port sets."""
        return self.address.version if self.address is not None else None


def _split_everything(network: Network) -> tuple[Network, ...]:
    """hash:ip,port,net refuses a /0: "everyone" is written as the family's two halves."""
    if network.prefixlen:
        return (network,)
    return tuple(network.subnets(prefixlen_diff=1))


def service_entries(service: ServiceInfo) -> frozenset[SetEntry]:
    """Every set entry ``service`` wants (none for a service that yields nothing)."""
    if service.yields_nothing:
        return frozenset()
    local = service.external_local
    entries: set[SetEntry] = set()
    for port in service.ports:
        protocol, number = port.protocol, port.port
        for address in service.cluster_ips:
            entries.add(SetEntry(SetKind.CLUSTER_IP, address, protocol, number))
        for address in service.external_ips:
            entries.add(SetEntry(SetKind.EXTERNAL_IP, address, protocol, number))
            if local:
                entries.add(SetEntry(SetKind.EXTERNAL_IP_LOCAL, address, protocol, number))
        for address in service.lb_ips:
            entries.add(SetEntry(SetKind.LOAD_BALANCER, address, protocol, number))
            if local:
                entries.add(SetEntry(SetKind.LOAD_BALANCER_LOCAL, address, protocol, number))
            if service.source_ranges:
                entries.add(SetEntry(SetKind.LOAD_BALANCER_FW, address, protocol, number))
                entries.update(
                    SetEntry(SetKind.LOAD_BALANCER_SOURCE, address, protocol, number, part)
                    for network in service.source_ranges
                    if network.version == address.version
                    for part in _split_everything(network)
                )
        if service.node_ports and port.node_port and protocol in NODE_PORT_PROTOCOLS:
            entries.add(SetEntry(SetKind.NODE_PORT, None, protocol, port.node_port))
            if local:
                entries.add(SetEntry(SetKind.NODE_PORT_LOCAL, None, protocol, port.node_port))
    if service.health_check_node_port:
        entries.add(
            SetEntry(SetKind.HEALTH_CHECK_NODE_PORT, None, L4Protocol.TCP, service.health_check_node_port)
        )
    return frozenset(entries)


@dataclass(frozen=True, slots=True)
class SetDelta:
    added: tuple[SetEntry, ...] = ()
    removed: tuple[SetEntry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(slots=True)
class SetMembership:
    """Each service's entries, and how many services want each entry (see the module docstring)."""

    _by_service: dict[ServiceKey, frozenset[SetEntry]] = field(default_factory=dict)
    _counts: Counter[SetEntry] = field(default_factory=Counter)

    def entries(self) -> frozenset[SetEntry]:
        return frozenset(self._counts)

    def replace(self, key: ServiceKey, entries: frozenset[SetEntry]) -> SetDelta:
        """The service now wants ``entries`` (empty: it is gone); the net change of the sets."""
        old = self._by_service.get(key, frozenset())
        if old == entries:
            return SetDelta()
        if entries:
            self._by_service[key] = entries
        else:
            self._by_service.pop(key, None)
        removed = []
        for entry in old - entries:
            self._counts[entry] -= 1
            if self._counts[entry] <= 0:
                del self._counts[entry]
                removed.append(entry)
        added = []
        for entry in entries - old:
            if not self._counts[entry]:
                added.append(entry)
            self._counts[entry] += 1
        return SetDelta(tuple(added), tuple(removed))

    def reset(self, by_service: Mapping[ServiceKey, Iterable[SetEntry]]) -> None:
        """Start again from every service's entries (start-up): O(cluster), once."""
        self._by_service = {key: frozenset(entries) for key, entries in by_service.items() if entries}
        self._counts = Counter(entry for entries in self._by_service.values() for entry in entries)
