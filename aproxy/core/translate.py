"""One Service and its EndpointSlices, on this node -> the IPVS state it wants (kube-proxy's semantics).

Virtual servers, per service port:

- one per cluster IP (``clusterIPs``: dual-stack), with real servers chosen by ``internalTrafficPolicy``;
- one per external IP and per load-balancer ingress IP, chosen by ``externalTrafficPolicy``;
- for type NodePort and LoadBalancer, one per node address of a family the service has, on the node port,
  chosen by ``externalTrafficPolicy``.

Real servers of a virtual server: the endpoints of the slices of its address family, on the slice port with
the service port's name and protocol (that port's number: ``targetPort`` may differ from ``port``), each
(address, port) once. Ready endpoints; when none is ready, the serving-and-terminating ones. Policy ``Local``
keeps only endpoints on this node, and with none there the virtual server has no real servers (the documented
semantics; kube-proxy's IPVS mode falls back to remote endpoints instead). Policy ``Cluster`` applies zone
hints the way kube-proxy does when the node's zone is known and every ready endpoint has hints. A service
without usable endpoints keeps its virtual servers, empty: connections are refused rather than leak to
whatever else listens on the address.

Headless and ExternalName services, services without a cluster IP, and services of another proxy
(``service-proxy-name``) want nothing.

Scheduler: the service's valid ``aproxy.io/scheduler`` annotation, else the node's default. Like kube-proxy
(``if scheduler == "mh" { Flags |= FlagSourceHash }``, with or without affinity), ``mh`` always gets
IP_VS_SVC_F_SCHED2 (0x10; ipvsadm shows it as ``mh-port``): Maglev hashing on the source port as well as the
address. It is written ``flag-2``, the canonical name the backends use, so a kernel dump compares equal.
``sessionAffinity: ClientIP`` becomes the persistence timeout.

Everything IP-related was parsed at intake (``objects``); translation only compares and groups, so a full
translation of 10,000 services is fast and one service's costs only what that service has. A service
translated again (its endpoints changed, the service did not) reuses its previous state's keys, port names
and bind addresses, and only chooses real servers.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from dataclasses import dataclass

from aproxy.core.model import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    IPAddress,
    L4Protocol,
    RealServer,
    ServiceKey,
    ServiceState,
    VirtualServer,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.objects import Endpoint, ServiceInfo, Skip, SliceInfo, SlicePort

MH_SOURCE_PORT_FLAG = "flag-2"  # IP_VS_SVC_F_SCHED2, "mh-port" for the mh scheduler
_MH_FLAGS = frozenset({MH_SOURCE_PORT_FLAG})
_NO_FLAGS: frozenset[str] = frozenset()


class UnknownSchedulerError(ValueError):
    """The node's default scheduler is not an IPVS scheduler (a configuration error, not cluster data)."""


@dataclass(frozen=True, slots=True)
class TranslationContext:
    """This node, as translation needs it."""

    node_name: str
    node_addresses: frozenset[IPAddress]  # NodePort virtual servers live here; never bound
    node_zone: str | None = None  # topology.kubernetes.io/zone; None: zone hints are not used
    default_scheduler: str = DEFAULT_SCHEDULER

    def __post_init__(self) -> None:
        if self.default_scheduler not in SCHEDULERS:
            raise UnknownSchedulerError(f"unknown IPVS scheduler {self.default_scheduler!r}")


@dataclass(frozen=True, slots=True)
class Translation:
    state: ServiceState
    # The service's and its slices' warnings (parts ignored). Whole-object skips never get this far: a
    # skipped object has no ServiceInfo/SliceInfo.
    skips: tuple[Skip, ...] = ()


# A group: the endpoints one service port has in one address family (the slice ports of its name and
# protocol, in slices of that family).
# int(address) << 16 | port -> (real server, endpoint): the de-duplicated candidates of one group. Within a
# group all addresses have one family, so the integer orders like RealServerKey.sort_key() and, unlike an
# address, hashes fast.
_Candidates = dict[int, tuple[RealServer, Endpoint]]


def translate_service(
    service: ServiceInfo, slices: Iterable[SliceInfo], ctx: TranslationContext
) -> Translation:
    """The desired state of ``service`` on this node. Only the slices labelled for it (same namespace, name)
    are used, whatever else ``slices`` holds."""
    if service.proxy_name_label:
        return Translation(ServiceState(service.key))
    key = service.key
    namespace, name = key.namespace, key.name
    own = [s for s in slices if not s.ignored and s.namespace == namespace and s.service_name == name]
    if len(own) > 1:
        # A deterministic winner among duplicate endpoints, whatever the input order.
        own.sort(key=_slice_name)
    skips = service.skips
    for endpoint_slice in own:
        if endpoint_slice.skips:
            skips += endpoint_slice.skips
    if service.yields_nothing:
        return Translation(ServiceState(key), skips)
    return Translation(_Builder(service, own, ctx).state(), skips)


def _slice_name(endpoint_slice: SliceInfo) -> str:
    return endpoint_slice.name


def unmatched_slice_ports(service: ServiceInfo, endpoint_slice: SliceInfo) -> tuple[SlicePort, ...]:
    """The slice's ports that no port of ``service`` names (same name and protocol): translation never
    reads them, so their endpoints serve nothing. None for a service that yields nothing anyway."""
    if service.yields_nothing or endpoint_slice.ignored or not endpoint_slice.family:
        return ()
    ports = service.ports
    if len(ports) > _SCANNED_PORTS:  # indexed: 10,000 ports against 10,000 would be 10^8 comparisons
        wanted = {(port.name, port.protocol) for port in ports}
        return tuple(port for port in endpoint_slice.ports if (port.name, port.protocol) not in wanted)
    unmatched: tuple[SlicePort, ...] = ()
    for slice_port in endpoint_slice.ports:  # every slice update comes here: no set, no generator
        for port in ports:
            if port.name == slice_port.name and port.protocol is slice_port.protocol:
                break
        else:
            unmatched += (slice_port,)
    return unmatched


def translate_all(
    services: Iterable[ServiceInfo], slices: Iterable[SliceInfo], ctx: TranslationContext
) -> tuple[dict[ServiceKey, ServiceState], tuple[Skip, ...]]:
    """From scratch: every service's desired state, and every warning of the services and slices given.

    Services of another proxy are left out (absent); a later service with the same key replaces an earlier
    one. Slices are grouped by (namespace, service-name label); the warnings of slices whose service is
    absent are reported too.
    """
    by_key: dict[ServiceKey, ServiceInfo] = {service.key: service for service in services}
    slices_by_service: dict[ServiceKey, list[SliceInfo]] = {}
    for endpoint_slice in slices:
        if not endpoint_slice.ignored:
            slices_by_service.setdefault(endpoint_slice.service_key, []).append(endpoint_slice)
    states: dict[ServiceKey, ServiceState] = {}
    skips: list[Skip] = []
    for key, service in by_key.items():
        own = slices_by_service.pop(key, [])
        if service.proxy_name_label:
            continue
        translation = translate_service(service, own, ctx)
        states[key] = translation.state
        skips.extend(translation.skips)
    for orphans in slices_by_service.values():
        skips.extend(skip for endpoint_slice in orphans for skip in endpoint_slice.skips)
    return states, tuple(skips)


# ServiceInfo.translation_memo: (context, the service's last state translated in it, and per virtual server
# of that state its code: service port index << 2 | 2 if IPv6 | 1 if policy Local). Translating the
# service again (its endpoints changed) takes keys, spec, port names and bind addresses from that state and
# only chooses real servers. Memory: a tuple of codes per service; the state is the one the Planner keeps.
_Memo = tuple[TranslationContext, ServiceState, tuple[int, ...]]
_CODES: dict[tuple[int, ...], tuple[int, ...]] = {}
_CODES_MAX = 1 << 12


class _Builder:
    """Builds one service's state; real-server tuples are computed once per code and shared."""

    __slots__ = ("_ctx", "_port_index", "_reals", "_service", "_slices")

    def __init__(self, service: ServiceInfo, slices: list[SliceInfo], ctx: TranslationContext) -> None:
        self._service = service
        self._slices = slices
        self._ctx = ctx
        self._reals: dict[int, tuple[RealServer, ...]] = {}
        self._port_index: _PortIndex | None = None

    def state(self) -> ServiceState:
        service, ctx, real_servers = self._service, self._ctx, self._real_servers
        memo = service.translation_memo
        if isinstance(memo, tuple) and (memo[0] is ctx or memo[0] == ctx):
            _, previous, codes = memo
            virtuals = tuple(
                [
                    VirtualServer(virtual.key, virtual.spec, virtual.port_name, real_servers(code))
                    for virtual, code in zip(previous.virtual_servers, codes, strict=True)
                ]
            )
            bind = previous.bind_addresses
        else:
            targets, bind = _targets(service, ctx)
            spec = _spec(service.scheduler or ctx.default_scheduler, service.affinity_timeout)
            virtuals = tuple(
                [VirtualServer(key, spec, name, real_servers(code)) for key, name, code in targets]
            )
            codes = tuple([code for _, _, code in targets])
            codes = _CODES.setdefault(codes, codes)  # a cluster has a few distinct ones: share them
            if len(_CODES) > _CODES_MAX:
                _CODES.clear()
        state = ServiceState(service.key, virtuals, bind)
        new_memo: _Memo = (ctx, state, codes)
        # A cache on a frozen value (see ServiceInfo.translation_memo): not compared, not part of the value.
        object.__setattr__(service, "translation_memo", new_memo)
        return state

    def _real_servers(self, code: int) -> tuple[RealServer, ...]:
        cached = self._reals.get(code)
        if cached is None:
            port = self._service.ports[code >> 2]
            contributors = self._contributors(port.name, port.protocol, 6 if code & 2 else 4)
            local = bool(code & 1)
            if not local and len(contributors) == 1:
                endpoint_slice, port_index = contributors[0]
                cached = _single_slice(endpoint_slice, port_index, self._ctx.node_zone)
            if cached is None:
                candidates = _candidates(contributors, self._ctx.node_name)
                chosen = _local(candidates, self._ctx.node_name) if local else _cluster(candidates, self._ctx)
                cached = tuple([chosen[ident][0] for ident in sorted(chosen)])
            self._reals[code] = cached
        return cached

    def _contributors(self, name: str, protocol: L4Protocol, family: int) -> list[tuple[SliceInfo, int]]:
        if len(self._service.ports) <= _SCANNED_PORTS:
            return _contributors(name, protocol, family, self._slices)
        if self._port_index is None:
            self._port_index = _index_ports(self._slices)
        return self._port_index.get((name, protocol, family), [])


def _targets(
    service: ServiceInfo, ctx: TranslationContext
) -> tuple[list[tuple[VirtualServerKey, str, int]], frozenset[IPAddress]]:
    """The service's virtual servers in state order (sorted by key, each key once) as (key, port name,
    code; see _Memo), and its bind addresses."""
    families = {address.version for address in service.cluster_ips}
    external = service.external_ips + service.lb_ips
    node_addresses = [a for a in ctx.node_addresses if a.version in families] if service.node_ports else []
    targets: dict[VirtualServerKey, tuple[VirtualServerKey, str, int]] = {}
    for index, port in enumerate(service.ports):
        port_name = f"{service.key}:{port.name}" if port.name else str(service.key)
        addresses = [(address, port.port, service.internal_local) for address in service.cluster_ips]
        addresses += [(address, port.port, service.external_local) for address in external]
        if port.node_port:
            addresses += [(address, port.node_port, service.external_local) for address in node_addresses]
        for address, number, local in addresses:
            vs_key = VirtualServerKey(port.protocol, address, number)
            # An address listed twice (externalIP == LB IP) is one virtual server: the first one wins.
            if vs_key not in targets:
                code = index << 2 | (2 if address.version == 6 else 0) | (1 if local else 0)
                targets[vs_key] = (vs_key, port_name, code)
    bind = set(service.cluster_ips)
    # An external or LB IP that is a node address is served but not bound: binding it on the dummy
    # device would steal the node's own address.
    bind.update(address for address in external if address not in ctx.node_addresses)
    return [targets[vs_key] for vs_key in sorted(targets, key=VirtualServerKey.sort_key)], frozenset(bind)


@functools.lru_cache(maxsize=1024)
def _spec(scheduler: str, persistence_timeout: int) -> VirtualServerSpec:
    """Shared specs: a cluster has a handful of distinct ones, so 10,000 services need not hold 10,000."""
    flags = _MH_FLAGS if scheduler == "mh" else _NO_FLAGS
    return VirtualServerSpec(scheduler, persistence_timeout, flags)


# A service with more ports than this looks its slice ports up in an index: scanning every slice port for
# every service port made a service with 10,000 ports take 4.7 s to plan (the ports x slice ports loop).
# Below it the scan is cheaper than building the index, and it is the path of nearly every service.
_SCANNED_PORTS = 8
_PortIndex = dict[tuple[str, L4Protocol, int], list[tuple[SliceInfo, int]]]


def _index_ports(slices: list[SliceInfo]) -> _PortIndex:
    """``_contributors`` for every (name, protocol, family) at once, in the same order."""
    index: _PortIndex = {}
    for endpoint_slice in slices:
        if endpoint_slice.family:  # FQDN slices (0) never match
            for port_index, slice_port in enumerate(endpoint_slice.ports):
                key = (slice_port.name, slice_port.protocol, endpoint_slice.family)
                index.setdefault(key, []).append((endpoint_slice, port_index))
    return index


def _contributors(
    name: str, protocol: L4Protocol, family: int, slices: list[SliceInfo]
) -> list[tuple[SliceInfo, int]]:
    """A group's sources: (slice, index of the slice port with the name and protocol of the service port),
    slices in name order. (Compared, not hashed: a service has a few ports.)"""
    return [
        (endpoint_slice, index)
        for endpoint_slice in slices
        if endpoint_slice.family == family  # FQDN slices (0) never match
        for index, slice_port in enumerate(endpoint_slice.ports)
        if slice_port.protocol is protocol and slice_port.name == name
    ]


_ready = operator.attrgetter("ready")
_zone_hints = operator.attrgetter("zone_hints")


def _single_slice(
    endpoint_slice: SliceInfo, port_index: int, zone: str | None
) -> tuple[RealServer, ...] | None:
    """The real servers of a group that one slice port alone provides, under policy Cluster, in the common
    case: each address once, some endpoint ready, zone hints not in play. None otherwise (the general rules
    below apply). Equal to what they give in that case: the ready endpoints, sorted by address."""
    ids, endpoints = endpoint_slice.address_ids, endpoint_slice.endpoints
    if len(set(ids)) != len(ids):
        return None  # copies of an address: the general rules choose one
    if all(map(_ready, endpoints)):
        ready: Iterable[int] = range(len(endpoints))
        if zone is not None and endpoints and all(map(_zone_hints, endpoints)):
            return None  # every endpoint hinted: the hints may apply
    else:
        ready = [index for index, endpoint in enumerate(endpoints) if endpoint.ready]
        if not ready:
            return None  # the serving-and-terminating fallback
        if zone is not None and all(endpoints[index].zone_hints for index in ready):
            return None
    reals = endpoint_slice.real_servers[port_index]
    return tuple(map(reals.__getitem__, sorted(ready, key=ids.__getitem__)))


def _candidates(contributors: Iterable[tuple[SliceInfo, int]], node_name: str) -> _Candidates:
    """A group's endpoints, each (address, port) once: the copy that is ready wins, then one that is serving
    and terminating, then one on this node (kube-proxy's tie-break), then the first slice by name."""
    group: _Candidates = {}
    for endpoint_slice, port_index in contributors:
        reals, endpoints = endpoint_slice.real_servers[port_index], endpoint_slice.endpoints
        for real, endpoint, address_id in zip(reals, endpoints, endpoint_slice.address_ids, strict=True):
            ident = address_id << 16 | real.port
            previous = group.get(ident)
            if previous is None or _rank(endpoint, node_name) > _rank(previous[1], node_name):
                group[ident] = (real, endpoint)
    return group


def _rank(endpoint: Endpoint, node_name: str) -> tuple[bool, bool, bool]:
    return (endpoint.ready, endpoint.serving and endpoint.terminating, endpoint.node_name == node_name)


def _usable(candidates: _Candidates) -> _Candidates:
    """Ready endpoints; when none is ready, those serving and terminating (kube-proxy's fallback)."""
    if all(c[1].ready for c in candidates.values()):
        return candidates  # the common case, without a copy
    ready = {ident: c for ident, c in candidates.items() if c[1].ready}
    if ready:
        return ready
    return {ident: c for ident, c in candidates.items() if c[1].serving and c[1].terminating}


def _local(candidates: _Candidates, node_name: str) -> _Candidates:
    return _usable({ident: c for ident, c in candidates.items() if c[1].node_name == node_name})


def _cluster(candidates: _Candidates, ctx: TranslationContext) -> _Candidates:
    return _usable(_zone_filtered(candidates, ctx.node_zone))


def _zone_filtered(candidates: _Candidates, zone: str | None) -> _Candidates:
    """kube-proxy's topology-aware routing: keep the endpoints hinted for this zone, but only when every
    ready endpoint carries hints and at least one is hinted for this zone (otherwise hints are ignored)."""
    if zone is None:
        return candidates
    ready = [c[1] for c in candidates.values() if c[1].ready]
    if not ready or any(not e.zone_hints for e in ready) or not any(zone in e.zone_hints for e in ready):
        return candidates
    return {ident: c for ident, c in candidates.items() if zone in c[1].zone_hints}
