"""Kubernetes Service and EndpointSlice objects, validated once into slim immutable values.

Sources hand the core raw objects exactly as decoded from JSON or YAML. ``parse_service`` and ``parse_slice``
check everything translation reads and keep only that: addresses become ``ipaddress`` objects, numbers are
range-checked, defaults are filled in. Nothing here raises on cluster data; a problem becomes a ``Skip``:

- ``Severity.ERROR``: the whole object is unusable and skipped (``parse_*`` returns the ``Skip`` itself).
  A Service with an invalid cluster IP, port, node port, protocol, type, policy or affinity, a missing
  name/namespace/spec, or a wrong type anywhere it is read; a slice without namespace, name, the
  ``kubernetes.io/service-name`` label or a known ``addressType``.
- ``Severity.WARNING``: one part of the object is dropped or replaced by a default and the rest is used. The
  parsed value carries these in ``skips``: an invalid external or load-balancer IP, an invalid
  ``aproxy.io/scheduler`` annotation (the default scheduler is used), an endpoint with an invalid address or
  conditions, a slice port out of range or with an unknown protocol.

Values are frozen and slotted, and no raw dict survives parsing: a 10,000-service cluster is held in a few
tens of megabytes. ``resource_version`` is excluded from equality, so ``old == new`` answers "did anything
translation reads change?".
"""

from __future__ import annotations

import enum
import functools
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import Any, Final, NamedTuple, TypeGuard

from aproxy.core.model import SCHEDULERS, IPAddress, L4Protocol, RealServer, ServiceKey

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
# kube-proxy's informers select objects WITHOUT these labels; aproxy treats labelled objects as absent.
SERVICE_PROXY_NAME_LABEL: Final = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL: Final = "service.kubernetes.io/headless"
SCHEDULER_ANNOTATION: Final = "aproxy.io/scheduler"

DEFAULT_AFFINITY_TIMEOUT: Final = 10800  # seconds: Kubernetes' default for sessionAffinity ClientIP
MAX_AFFINITY_TIMEOUT: Final = 86400  # the API server's upper bound
MAX_PORT: Final = 65535

SERVICE_KIND: Final = "Service"
SLICE_KIND: Final = "EndpointSlice"

_SERVICE_TYPES: Final = frozenset({"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"})
_PROTOCOLS: Final = {protocol.value: protocol for protocol in L4Protocol}
_ADDRESS_FAMILIES: Final = {"IPv4": 4, "IPv6": 6, "FQDN": 0}
# Shared: an empty frozenset is not a singleton in CPython and costs 216 bytes per endpoint otherwise.
_NO_HINTS: Final[frozenset[str]] = frozenset()


class Severity(enum.StrEnum):
    """How much of an object a ``Skip`` cost."""

    ERROR = "error"  # the whole object is skipped
    WARNING = "warning"  # one part was dropped or defaulted; the rest of the object is used


@dataclass(frozen=True, slots=True)
class Skip:
    """One problem with cluster data, reported once (by the ChangeTracker) and counted.

    ``reason`` names the field and quotes the offending value, e.g. ``invalid clusterIP "10.0.0.300"``.
    Equal skips are the same report: that is what makes "report once" work.
    """

    kind: str
    namespace: str
    name: str
    reason: str
    severity: Severity = Severity.ERROR

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.kind} {self.namespace}/{self.name}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str  # "" for an unnamed port
    protocol: L4Protocol
    port: int
    node_port: int = 0  # 0: no node port


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What translation needs from a Service, validated.

    A service that yields nothing (``proxy_name_label``, ``external_name``, headless, or no cluster IP yet)
    carries no ports or addresses: they are not even validated, so another proxy's or a DNS-only service's
    oddities are never reported as ours.
    """

    key: ServiceKey
    resource_version: str = field(default="", compare=False)
    proxy_name_label: bool = False  # labelled service.kubernetes.io/service-proxy-name: another proxy's
    external_name: bool = False
    headless: bool = False  # clusterIP "None"
    cluster_ips: tuple[IPAddress, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    node_ports: bool = False  # type NodePort or LoadBalancer: node ports of ``ports`` are served
    # Only addresses of a family the service has a cluster IP of: IPVS cannot NAT across families.
    external_ips: tuple[IPAddress, ...] = ()
    lb_ips: tuple[IPAddress, ...] = ()
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 = none
    external_local: bool = False  # externalTrafficPolicy: Local
    internal_local: bool = False  # internalTrafficPolicy: Local
    scheduler: str | None = None  # a valid aproxy.io/scheduler annotation; None = the node's default
    skips: tuple[Skip, ...] = ()  # warnings: parts ignored, the rest stands

    @property
    def yields_nothing(self) -> bool:
        return self.proxy_name_label or self.external_name or not self.cluster_ips or not self.ports


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str  # "" for an unnamed port
    protocol: L4Protocol
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a slice (its first address, as kube-proxy uses)."""

    address: IPAddress
    ready: bool = True  # unset counts as ready
    serving: bool = True  # unset counts as serving
    terminating: bool = False
    node_name: str | None = None
    zone_hints: frozenset[str] = _NO_HINTS  # hints.forZones[].name


@dataclass(frozen=True, slots=True)
class SliceInfo:
    namespace: str
    name: str
    service_name: str  # label kubernetes.io/service-name
    address_type: str  # IPv4, IPv6 or FQDN (FQDN slices are kept, empty, and ignored by translation)
    resource_version: str = field(default="", compare=False)
    ignored: bool = False  # labelled headless or service-proxy-name: treated as absent
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    skips: tuple[Skip, ...] = ()  # warnings: endpoints and ports skipped alone
    # real_servers[i][j]: endpoint j as a real server on ports[i]. Made once here, at intake, so that a
    # translation selects ready-made objects instead of allocating 100,000 of them for a big cluster (and
    # every translation of this slice shares them).
    real_servers: tuple[tuple[RealServer, ...], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        reals = tuple(tuple(RealServer(e.address, p.port) for e in self.endpoints) for p in self.ports)
        object.__setattr__(self, "real_servers", reals)  # frozen: the documented way to set a derived field

    @property
    def service_key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.service_name)

    @property
    def family(self) -> int:
        """4 or 6 for an IP slice, 0 for FQDN."""
        return _ADDRESS_FAMILIES[self.address_type]


class _Invalid(Exception):
    """Internal: the object being parsed is unusable. Never leaves this module."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- Small typed accessors --------------------------------------------------------------------------------
# Each raises _Invalid with a reason naming the field; paths are formatted only on failure.


def _show(value: object) -> str:
    """A value for a reason: strings quoted and escaped, everything cut short (fuzzed input can be huge)."""
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"{path} is not an object: {_show(value)}")
    return value


def _optional_mapping(value: object, path: str) -> Mapping[str, Any]:
    return {} if value is None else _mapping(value, path)


def _optional_list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"{path} is not a list: {_show(value)}")
    return value


def _optional_str(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"{path}.{key} is not a string: {_show(value)}")
    return value


def _required_name(meta: Mapping[str, Any], key: str) -> str:
    value = _optional_str(meta, key, "metadata")
    if not value:
        raise _Invalid(f"missing metadata.{key}")
    return value


def _optional_bool(obj: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Invalid(f"{path}.{key} is not a boolean: {_show(value)}")
    return value


def _protocol(obj: Mapping[str, Any], path: str) -> L4Protocol:
    value = obj.get("protocol")
    if value is None:
        return L4Protocol.TCP  # the API server's default
    protocol = _PROTOCOLS.get(value) if isinstance(value, str) else None
    if protocol is None:
        raise _Invalid(f"unknown protocol {_show(value)} in {path}")
    return protocol


def _port_number(obj: Mapping[str, Any], key: str, path: str) -> int:
    value = obj.get(key)
    if not _is_int(value) or not 1 <= value <= MAX_PORT:
        raise _Invalid(f"invalid {key} {_show(value)} in {path} (must be 1..{MAX_PORT})")
    return value


def parse_ip(value: object) -> IPAddress | None:
    """A canonical address, or None for anything else (zoned and IPv4-mapped IPv6 addresses included)."""
    return _parse_ip_text(value) if isinstance(value, str) else None


# Cached: a slice update re-sends all its endpoints, and the same few thousand pod and service addresses come
# back again and again; the cache also makes equal addresses share one object.
@functools.lru_cache(maxsize=1 << 15)
def _parse_ip_text(text: str) -> IPAddress | None:
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and (address.scope_id is not None or address.ipv4_mapped is not None):
        return None
    return address


def _identity(raw: object) -> tuple[str, str]:
    """Best-effort namespace and name of an object that may be malformed, for its Skip."""
    meta = raw.get("metadata") if isinstance(raw, Mapping) else None
    if not isinstance(meta, Mapping):
        return "", ""
    namespace, name = meta.get("namespace"), meta.get("name")
    return (namespace if isinstance(namespace, str) else ""), (name if isinstance(name, str) else "")


class _Header(NamedTuple):
    obj: Mapping[str, Any]
    meta: Mapping[str, Any]
    namespace: str
    name: str
    resource_version: str
    labels: Mapping[str, Any]


def _header(raw: object) -> _Header:
    obj = _mapping(raw, "object")
    meta = _mapping(obj.get("metadata"), "metadata")
    name = _required_name(meta, "name")
    namespace = _required_name(meta, "namespace")
    resource_version = _optional_str(meta, "resourceVersion", "metadata")
    labels = _optional_mapping(meta.get("labels"), "metadata.labels")
    return _Header(obj, meta, namespace, name, resource_version, labels)


# --- Services -----------------------------------------------------------------------------------------------


def parse_service(raw: object) -> ServiceInfo | Skip:
    """A Service v1 object as decoded from JSON/YAML -> ``ServiceInfo``, or a ``Skip`` (never raises)."""
    try:
        return _parse_service(raw)
    except _Invalid as invalid:
        namespace, name = _identity(raw)
        return Skip(SERVICE_KIND, namespace, name, invalid.reason)


def _parse_service(raw: object) -> ServiceInfo:
    obj, meta, namespace, name, resource_version, labels = _header(raw)
    key = ServiceKey(namespace, name)
    if SERVICE_PROXY_NAME_LABEL in labels:
        return ServiceInfo(key, resource_version, proxy_name_label=True)
    spec = _mapping(obj.get("spec"), "spec")
    service_type = _optional_str(spec, "type", "spec") or "ClusterIP"
    if service_type not in _SERVICE_TYPES:
        raise _Invalid(f"unknown type {_show(service_type)}")
    if service_type == "ExternalName":
        return ServiceInfo(key, resource_version, external_name=True)
    cluster_ips = _cluster_ips(spec)
    if cluster_ips is None:
        return ServiceInfo(key, resource_version, headless=True)
    if not cluster_ips:
        # Not allocated yet (a hand-written manifest): kube-proxy serves nothing for it either.
        return ServiceInfo(key, resource_version)
    families: set[int] = {address.version for address in cluster_ips}
    warnings: list[str] = []
    annotations = _optional_mapping(meta.get("annotations"), "metadata.annotations")
    return ServiceInfo(
        key,
        resource_version,
        cluster_ips=cluster_ips,
        ports=_service_ports(spec.get("ports")),
        node_ports=service_type in ("NodePort", "LoadBalancer"),
        external_ips=_external_ips(spec.get("externalIPs"), families, warnings),
        lb_ips=_lb_ips(obj.get("status"), families, warnings),
        affinity_timeout=_affinity_timeout(spec),
        external_local=_local_policy(spec, "externalTrafficPolicy"),
        internal_local=_local_policy(spec, "internalTrafficPolicy"),
        scheduler=_scheduler(annotations, warnings),
        skips=tuple(Skip(SERVICE_KIND, namespace, name, reason, Severity.WARNING) for reason in warnings),
    )


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[IPAddress, ...] | None:
    """The cluster IPs in order (dual-stack: ``clusterIPs``, else ``clusterIP``); None if headless."""
    texts = _optional_list(spec.get("clusterIPs"), "spec.clusterIPs")
    if not texts:
        single = _optional_str(spec, "clusterIP", "spec")
        texts = [single] if single else []
    if texts and texts[0] == "None":
        return None
    addresses: dict[IPAddress, None] = {}  # ordered and de-duplicated
    for text in texts:
        address = parse_ip(text)
        if address is None:
            raise _Invalid(f"invalid clusterIP {_show(text)}")
        addresses[address] = None
    return tuple(addresses)


def _service_ports(value: object) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen_ports: set[tuple[L4Protocol, int]] = set()
    seen_node_ports: set[tuple[L4Protocol, int]] = set()
    for index, item in enumerate(_optional_list(value, "spec.ports")):
        port = _service_port(item, f"spec.ports[{index}]")
        # Two ports on one (protocol, port) would be two virtual servers with one key: the API rejects it.
        if (port.protocol, port.port) in seen_ports:
            raise _Invalid(f"duplicate port {port.port}/{port.protocol.value}")
        seen_ports.add((port.protocol, port.port))
        if port.node_port:
            if (port.protocol, port.node_port) in seen_node_ports:
                raise _Invalid(f"duplicate nodePort {port.node_port}/{port.protocol.value}")
            seen_node_ports.add((port.protocol, port.node_port))
        ports.append(port)
    return tuple(ports)


def _service_port(item: object, path: str) -> ServicePort:
    obj = _mapping(item, path)
    name = _optional_str(obj, "name", path)
    protocol = _protocol(obj, path)
    port = _port_number(obj, "port", path)
    # An absent or zero nodePort means "none" (Go's zero value, as kube-proxy reads it).
    node_port_value = obj.get("nodePort")
    unset = node_port_value is None or (_is_int(node_port_value) and node_port_value == 0)
    node_port = 0 if unset else _port_number(obj, "nodePort", path)
    return ServicePort(sys.intern(name), protocol, port, node_port)


def _external_ips(value: object, families: set[int], warnings: list[str]) -> tuple[IPAddress, ...]:
    addresses: dict[IPAddress, None] = {}
    for text in _optional_list(value, "spec.externalIPs"):
        address = parse_ip(text)
        if address is None:
            warnings.append(f"invalid externalIP {_show(text)} ignored")
        elif address.version not in families:
            warnings.append(f"externalIP {_show(text)} ignored: no IPv{address.version} cluster IP")
        else:
            addresses[address] = None
    return tuple(addresses)


def _lb_ips(value: object, families: set[int], warnings: list[str]) -> tuple[IPAddress, ...]:
    status = _optional_mapping(value, "status")
    load_balancer = _optional_mapping(status.get("loadBalancer"), "status.loadBalancer")
    addresses: dict[IPAddress, None] = {}
    for index, item in enumerate(_optional_list(load_balancer.get("ingress"), "status.loadBalancer.ingress")):
        if not isinstance(item, Mapping):
            warnings.append(f"status.loadBalancer.ingress[{index}] is not an object: {_show(item)}")
            continue
        text = item.get("ip")
        # Hostname-only entries are not ours to resolve; ipMode Proxy means the load balancer proxies to
        # the nodes itself and kube-proxy leaves the IP alone.
        if text in (None, "") or item.get("ipMode") == "Proxy":
            continue
        address = parse_ip(text)
        if address is None:
            warnings.append(f"invalid load-balancer ingress IP {_show(text)} ignored")
        elif address.version in families:
            # Another family's ingress IP is legitimate (a dual-stack load balancer in front of a
            # single-stack service), so kube-proxy drops it silently, and so do we.
            addresses[address] = None
    return tuple(addresses)


def _affinity_timeout(spec: Mapping[str, Any]) -> int:
    affinity = _optional_str(spec, "sessionAffinity", "spec") or "None"
    if affinity == "None":
        return 0
    if affinity != "ClientIP":
        raise _Invalid(f"unknown sessionAffinity {_show(affinity)}")
    config = _optional_mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = _optional_mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if not _is_int(timeout) or not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
        raise _Invalid(f"invalid sessionAffinityConfig.clientIP.timeoutSeconds {_show(timeout)}")
    return timeout


def _local_policy(spec: Mapping[str, Any], key: str) -> bool:
    policy = _optional_str(spec, key, "spec") or "Cluster"
    if policy not in ("Cluster", "Local"):
        raise _Invalid(f"unknown {key} {_show(policy)}")
    return policy == "Local"


def _scheduler(annotations: Mapping[str, Any], warnings: list[str]) -> str | None:
    value = annotations.get(SCHEDULER_ANNOTATION)
    if value is None:
        return None
    if isinstance(value, str) and value in SCHEDULERS:
        return sys.intern(value)
    warnings.append(f"annotation {SCHEDULER_ANNOTATION}: unknown scheduler {_show(value)}, using the default")
    return None


# --- EndpointSlices -----------------------------------------------------------------------------------------


def parse_slice(raw: object) -> SliceInfo | Skip:
    """An EndpointSlice (discovery.k8s.io/v1) -> ``SliceInfo``, or a ``Skip`` (never raises).

    Bad endpoints and ports are skipped alone: they are left out and listed in ``SliceInfo.skips``.
    """
    try:
        return _parse_slice(raw)
    except _Invalid as invalid:
        namespace, name = _identity(raw)
        return Skip(SLICE_KIND, namespace, name, invalid.reason)


def _parse_slice(raw: object) -> SliceInfo:
    obj, _, namespace, name, resource_version, labels = _header(raw)
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not isinstance(service_name, str) or not service_name:
        raise _Invalid(f"missing label {SERVICE_NAME_LABEL}")
    address_type = obj.get("addressType")
    if not isinstance(address_type, str) or address_type not in _ADDRESS_FAMILIES:
        raise _Invalid(f"unknown addressType {_show(address_type)}")
    ignored = HEADLESS_LABEL in labels or SERVICE_PROXY_NAME_LABEL in labels
    if ignored or address_type == "FQDN":
        return SliceInfo(namespace, name, service_name, address_type, resource_version, ignored=ignored)
    warnings: list[str] = []
    ports = _slice_ports(obj.get("ports"), warnings)
    endpoints = _endpoints(obj.get("endpoints"), _ADDRESS_FAMILIES[address_type], warnings)
    return SliceInfo(
        namespace,
        name,
        service_name,
        address_type,
        resource_version,
        ports=ports,
        endpoints=endpoints,
        skips=tuple(Skip(SLICE_KIND, namespace, name, reason, Severity.WARNING) for reason in warnings),
    )


def _slice_ports(value: object, warnings: list[str]) -> tuple[SlicePort, ...]:
    ports: list[SlicePort] = []
    for index, item in enumerate(_optional_list(value, "ports")):
        try:
            port = _slice_port(item, f"ports[{index}]")
        except _Invalid as invalid:
            warnings.append(invalid.reason)
            continue
        if port is not None:
            ports.append(port)
    return tuple(ports)


def _slice_port(item: object, path: str) -> SlicePort | None:
    obj = _mapping(item, path)
    name = _optional_str(obj, "name", path)
    protocol = _protocol(obj, path)
    if obj.get("port") is None:
        return None  # "all ports": nothing a virtual server can forward to
    return SlicePort(sys.intern(name), protocol, _port_number(obj, "port", path))


def _endpoints(value: object, family: int, warnings: list[str]) -> tuple[Endpoint, ...]:
    endpoints: list[Endpoint] = []
    for index, item in enumerate(_optional_list(value, "endpoints")):
        try:
            endpoints.append(_endpoint(item, family, f"endpoints[{index}]"))
        except _Invalid as invalid:
            warnings.append(invalid.reason)
    return tuple(endpoints)


def _endpoint(item: object, family: int, path: str) -> Endpoint:
    obj = _mapping(item, path)
    addresses = obj.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise _Invalid(f"{path} has no addresses: {_show(addresses)}")
    address = parse_ip(addresses[0])
    if address is None:
        raise _Invalid(f"invalid endpoint address {_show(addresses[0])} in {path}")
    if address.version != family:
        raise _Invalid(f"endpoint address {_show(addresses[0])} in {path} is not IPv{family}")
    conditions_path = f"{path}.conditions"
    conditions = _optional_mapping(obj.get("conditions"), conditions_path)
    node_name = _optional_str(obj, "nodeName", path)
    hints = obj.get("hints")
    return Endpoint(
        address,
        ready=_optional_bool(conditions, "ready", conditions_path, True),
        serving=_optional_bool(conditions, "serving", conditions_path, True),
        terminating=_optional_bool(conditions, "terminating", conditions_path, False),
        # Interned: thousands of endpoints share a handful of node and zone names.
        node_name=sys.intern(node_name) if node_name else None,
        zone_hints=_NO_HINTS if hints is None else _zone_hints(hints, f"{path}.hints"),
    )


def _zone_hints(value: object, path: str) -> frozenset[str]:
    hints = _mapping(value, path)
    zones = _optional_list(hints.get("forZones"), f"{path}.forZones")
    names: set[str] = set()
    for index, zone in enumerate(zones):
        zone_path = f"{path}.forZones[{index}]"
        name = _optional_str(_mapping(zone, zone_path), "name", zone_path)
        if name:
            names.add(sys.intern(name))
    return frozenset(names) if names else _NO_HINTS
