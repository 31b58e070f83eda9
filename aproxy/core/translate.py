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
translation of 10,000 services is fast and one service's costs only what that service has.
"""

from __future__ import annotations

import functools
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
from aproxy.core.objects import Endpoint, ServiceInfo, Skip, SliceInfo

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


# (port name, protocol, address family): the endpoints one service port has in one family.
_Group = tuple[str, L4Protocol, int]
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
    own = sorted(
        (s for s in slices if not s.ignored and s.namespace == key.namespace and s.service_name == key.name),
        key=lambda s: s.name,  # a deterministic winner among duplicate endpoints, whatever the input order
    )
    skips = service.skips + tuple(skip for s in own for skip in s.skips)
    if service.yields_nothing:
        return Translation(ServiceState(key), skips)
    return Translation(_Builder(service, own, ctx).state(), skips)


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


class _Builder:
    """Builds one service's state; real-server tuples are computed once per (group, policy) and shared."""

    __slots__ = ("_candidates", "_ctx", "_reals", "_service")

    def __init__(self, service: ServiceInfo, slices: list[SliceInfo], ctx: TranslationContext) -> None:
        self._service = service
        self._ctx = ctx
        self._candidates = _candidates(service, slices, ctx.node_name)
        self._reals: dict[tuple[_Group, bool], tuple[RealServer, ...]] = {}

    def state(self) -> ServiceState:
        service, ctx = self._service, self._ctx
        spec = _spec(service.scheduler or ctx.default_scheduler, service.affinity_timeout)
        families = {address.version for address in service.cluster_ips}
        external = service.external_ips + service.lb_ips
        node_addresses = (
            [a for a in ctx.node_addresses if a.version in families] if service.node_ports else []
        )
        virtuals: dict[VirtualServerKey, VirtualServer] = {}
        for port in service.ports:
            port_name = f"{service.key}:{port.name}" if port.name else str(service.key)
            targets = [(address, port.port, service.internal_local) for address in service.cluster_ips]
            targets += [(address, port.port, service.external_local) for address in external]
            if port.node_port:
                targets += [(address, port.node_port, service.external_local) for address in node_addresses]
            for address, number, local in targets:
                vs_key = VirtualServerKey(port.protocol, address, number)
                # An address listed twice (externalIP == LB IP) is one virtual server: the first one wins.
                if vs_key not in virtuals:
                    reals = self._real_servers((port.name, port.protocol, address.version), local)
                    virtuals[vs_key] = VirtualServer(vs_key, spec, port_name, reals)
        bind = set(service.cluster_ips)
        # An external or LB IP that is a node address is served but not bound: binding it on the dummy
        # device would steal the node's own address.
        bind.update(address for address in external if address not in ctx.node_addresses)
        return ServiceState(
            service.key,
            tuple(sorted(virtuals.values(), key=lambda vs: vs.key.sort_key())),
            frozenset(bind),
        )

    def _real_servers(self, group: _Group, local: bool) -> tuple[RealServer, ...]:
        cached = self._reals.get((group, local))
        if cached is None:
            candidates = self._candidates.get(group, {})
            chosen = _local(candidates, self._ctx.node_name) if local else _cluster(candidates, self._ctx)
            cached = tuple(chosen[ident][0] for ident in sorted(chosen))
            self._reals[(group, local)] = cached
        return cached


@functools.lru_cache(maxsize=1024)
def _spec(scheduler: str, persistence_timeout: int) -> VirtualServerSpec:
    """Shared specs: a cluster has a handful of distinct ones, so 10,000 services need not hold 10,000."""
    flags = _MH_FLAGS if scheduler == "mh" else _NO_FLAGS
    return VirtualServerSpec(scheduler, persistence_timeout, flags)


def _candidates(service: ServiceInfo, slices: list[SliceInfo], node_name: str) -> dict[_Group, _Candidates]:
    """Endpoints per group, each (address, port) once: the copy that is ready wins, then one that is
    serving and terminating, then one on this node (kube-proxy's tie-break), then the first slice by name."""
    wanted = {(port.name, port.protocol) for port in service.ports}
    families = {address.version for address in service.cluster_ips}
    groups: dict[_Group, _Candidates] = {}
    for endpoint_slice in slices:
        family = endpoint_slice.family
        if family not in families:  # FQDN (0) too
            continue
        for slice_port, reals in zip(endpoint_slice.ports, endpoint_slice.real_servers, strict=True):
            if (slice_port.name, slice_port.protocol) not in wanted:
                continue
            group = groups.setdefault((slice_port.name, slice_port.protocol, family), {})
            for real, endpoint in zip(reals, endpoint_slice.endpoints, strict=True):
                ident = int(real.address) << 16 | real.port
                previous = group.get(ident)
                if previous is None or _rank(endpoint, node_name) > _rank(previous[1], node_name):
                    group[ident] = (real, endpoint)
    return groups


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
