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
import operator
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Final, NamedTuple, TypeGuard, TypeVar

from aproxy.core.model import SCHEDULERS, IPAddress, L4Protocol, RealServer, ServiceKey

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
# kube-proxy's informers select objects WITHOUT these labels; aproxy treats labelled objects as absent.
SERVICE_PROXY_NAME_LABEL: Final = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL: Final = "service.kubernetes.io/headless"
SCHEDULER_ANNOTATION: Final = "aproxy.io/scheduler"
# Per-service health-check settings (aproxy/health/): off, another interval, another TCP port to check.
HEALTH_CHECK_ANNOTATION: Final = "aproxy.io/health-check"
HEALTH_CHECK_INTERVAL_ANNOTATION: Final = "aproxy.io/health-check-interval"
HEALTH_CHECK_PORT_ANNOTATION: Final = "aproxy.io/health-check-port"
# The shortest interval an annotation may ask for: every node checks every backend that often.
MIN_HEALTH_CHECK_INTERVAL: Final = 0.1

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
_T = TypeVar("_T")
_NO_SKIPS: Final[tuple[Skip, ...]] = ()


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
class HealthOverride:
    """A service's health-check annotations, validated (a bad value is a warning and the default)."""

    enabled: bool = True  # aproxy.io/health-check: "false" turns checks off for this service's backends
    interval: float | None = None  # seconds; None: the node's --health-check-interval
    port: int | None = None  # check this TCP port instead of each real server's (also for UDP services)


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
    # The aproxy.io/health-check* annotations; None (nearly every service): the node's settings.
    health: HealthOverride | None = None
    # loadBalancerSourceRanges (valid ones, each once): () = no restriction. Only meaningful for lb_ips.
    source_ranges: tuple[IPv4Network | IPv6Network, ...] = ()
    # healthCheckNodePort of a LoadBalancer service with externalTrafficPolicy Local; 0 = none.
    health_check_node_port: int = 0
    skips: tuple[Skip, ...] = ()  # warnings: parts ignored, the rest stands
    # Not part of the value: aproxy.core.translate keeps here what it derives from this service alone (its
    # virtual server keys, port names, bind addresses, for one TranslationContext), so that translating the
    # service again after a change of its endpoints only chooses real servers.
    translation_memo: object = field(default=None, init=False, compare=False, repr=False)

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
    # Derived, computed here unless given (parse_slice gives them, partly reused from the previous version).
    # real_servers[i][j]: endpoint j as a real server on ports[i]. Made once, at intake, so that a
    # translation selects ready-made objects instead of allocating 100,000 of them for a big cluster (and
    # every translation of this slice shares them).
    real_servers: tuple[tuple[RealServer, ...], ...] = field(default=(), compare=False, repr=False)
    # address_ids[j]: int(endpoints[j].address). Translation sorts and de-duplicates on these (an int hashes
    # and compares in C; an address does both in Python), and the next version of the slice finds its
    # unchanged endpoints by them.
    address_ids: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # frozen: object.__setattr__ is the documented way to set a derived field
        if len(self.real_servers) != len(self.ports):
            object.__setattr__(self, "real_servers", _real_servers(self.ports, self.endpoints))
        if len(self.address_ids) != len(self.endpoints):
            object.__setattr__(self, "address_ids", tuple(int(e.address) for e in self.endpoints))

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
    if type(value) is dict:  # what JSON and YAML decode to, checked without the ABC machinery
        return value
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


# JSON's names for the types a port number is not (YAML's quoted "80" arrives as a str).
_JSON_TYPES = {str: "a string", bool: "a boolean", float: "a float", type(None): "null"}


def _port_number(obj: Mapping[str, Any], key: str, path: str) -> int:
    value = obj.get(key)
    if not _is_int(value):
        got = _JSON_TYPES.get(type(value), "an object or a list")
        raise _Invalid(
            f"invalid {key} {_show(value)} in {path} (must be an integer 1..{MAX_PORT}, got {got})"
        )
    if not 1 <= value <= MAX_PORT:
        raise _Invalid(f"invalid {key} {_show(value)} in {path} (must be 1..{MAX_PORT})")
    return value


def parse_ip(value: object) -> IPAddress | None:
    """A canonical address, or None for anything else (zoned and IPv4-mapped IPv6 addresses included)."""
    if not isinstance(value, str):
        return None
    number = _ipv4_int(value)
    return _parse_ip_text(value) if number is None else IPv4Address(number)


# Dotted-quad IPv4, the common case, without ipaddress' general parser (about 2 µs an address). A canonical
# octet is exactly one of the strings "0".."255": the table also rejects what ipaddress rejects (leading
# zeros, signs, spaces, non-ASCII digits). The first three octets are looked up whole: a cluster's pod and
# service addresses share a few thousand /24 prefixes, so the table stays small however many addresses
# there are (an address cache would have to hold every address, text included, to help a large cluster).
_OCTETS: Final[dict[str, int]] = {str(octet): octet for octet in range(256)}
_IPV4_PREFIXES: dict[str, int] = {}  # "10.244.1" -> 0x0AF40100
_IPV4_PREFIXES_MAX: Final = 1 << 14


def _ipv4_int(text: str) -> int | None:
    """The integer value of ``text`` if it is a canonical dotted-quad IPv4 address; None for anything else
    (which may still be an IPv6 address: ``_parse_ip_text`` decides)."""
    prefix, _, last = text.rpartition(".")
    low = _OCTETS.get(last)
    if low is None:
        return None
    high = _IPV4_PREFIXES.get(prefix)
    if high is None:
        high = _ipv4_prefix(prefix)
        if high is None:
            return None
    return high | low


def _ipv4_prefix(prefix: str) -> int | None:
    parts = prefix.split(".")
    if len(parts) != 3:
        return None
    value = 0
    for part in parts:
        octet = _OCTETS.get(part)
        if octet is None:
            return None
        value = value << 8 | octet
    if len(_IPV4_PREFIXES) >= _IPV4_PREFIXES_MAX:
        _IPV4_PREFIXES.clear()  # bounded against a hostile stream; rebuilt at a few µs a prefix
    _IPV4_PREFIXES[prefix] = value << 8
    return value << 8


# Cached: IPv6 addresses (and invalid text) take ipaddress' general parser; the same addresses come back with
# every update of their slice, and the cache also makes equal addresses share one object.
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
    if raw.__class__ is dict:
        # The common, well-formed case, read inline (every watch event comes here): the same result as below.
        meta = raw.get("metadata")
        if meta.__class__ is dict:
            name, namespace = meta.get("name"), meta.get("namespace")
            version, labels = meta.get("resourceVersion"), meta.get("labels")
            if (
                name.__class__ is str
                and name
                and namespace.__class__ is str
                and namespace
                and (version is None or version.__class__ is str)
                and (labels is None or labels.__class__ is dict)
            ):
                return _Header(raw, meta, namespace, name, version or "", {} if labels is None else labels)
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
        health=_health_override(annotations, warnings),
        source_ranges=_source_ranges(spec.get("loadBalancerSourceRanges"), warnings),
        health_check_node_port=_health_check_node_port(spec, service_type, warnings),
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
        ports.append(_shared(_SERVICE_PORTS, port))
    return _shared(_SERVICE_PORT_TUPLES, tuple(ports))


# Equal service ports (and port lists) share one object: most services of a cluster have one of a few.
_SERVICE_PORTS: dict[ServicePort, ServicePort] = {}
_SERVICE_PORT_TUPLES: dict[tuple[ServicePort, ...], tuple[ServicePort, ...]] = {}


def _shared(table: dict[_T, _T], value: _T) -> _T:
    """``value``, or an equal one met before (immutable values only). The table is bounded."""
    shared = table.get(value)
    if shared is None:
        if len(table) >= _SHARED_MAX:
            table.clear()
        table[value] = shared = value
    return shared


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


def _source_ranges(value: object, warnings: list[str]) -> tuple[IPv4Network | IPv6Network, ...]:
    """loadBalancerSourceRanges: CIDRs (host bits allowed, as the API server allows them; surrounding
    spaces too, as kube-proxy trims them). A malformed one is a warning: dropping it narrows the ranges
    (more is refused), never widens them. All malformed: the service is closed, not opened to the world."""
    ranges: dict[IPv4Network | IPv6Network, None] = {}
    items = _optional_list(value, "spec.loadBalancerSourceRanges")
    for text in items:
        try:
            if not isinstance(text, str) or "/" not in text:
                raise ValueError(text)
            ranges[ip_network(text.strip(), strict=False)] = None
        except ValueError:
            warnings.append(f"invalid loadBalancerSourceRanges entry {_show(text)} ignored")
    if items and not ranges:
        # Every entry was invalid: the user meant to restrict. An empty tuple would mean "open to all".
        return (_NOBODY,)
    return tuple(ranges)


def _health_check_node_port(spec: Mapping[str, Any], service_type: str, warnings: list[str]) -> int:
    """kube-proxy serves it only for type LoadBalancer with externalTrafficPolicy Local (the API server
    allocates it only then); elsewhere it is ignored. An invalid one is a warning: no health checks."""
    if service_type != "LoadBalancer" or _optional_str(spec, "externalTrafficPolicy", "spec") != "Local":
        return 0
    value = spec.get("healthCheckNodePort")
    if value is None:
        return 0
    if not _is_int(value) or not 1 <= value <= 65535:
        warnings.append(f"invalid healthCheckNodePort {_show(value)} ignored")
        return 0
    return value


# Stands for "restricted, but nobody allowed": a host route no client can be (the unspecified address).
_NOBODY = IPv4Network("0.0.0.0/32")


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


_GO_DURATION: Final = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h))+")
_GO_UNIT: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_SECONDS_PER: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _health_override(annotations: Mapping[str, Any], warnings: list[str]) -> HealthOverride | None:
    enabled_text = annotations.get(HEALTH_CHECK_ANNOTATION)
    interval_text = annotations.get(HEALTH_CHECK_INTERVAL_ANNOTATION)
    port_text = annotations.get(HEALTH_CHECK_PORT_ANNOTATION)
    if enabled_text is None and interval_text is None and port_text is None:
        return None
    enabled = True
    if enabled_text is not None:
        if enabled_text in ("true", "false"):
            enabled = enabled_text == "true"
        else:
            warnings.append(
                f'annotation {HEALTH_CHECK_ANNOTATION}: {_show(enabled_text)} is not "true" or "false", '
                "checking (the default)"
            )
    interval = None
    if interval_text is not None:
        interval = _annotation_seconds(interval_text)
        if interval is None or interval < MIN_HEALTH_CHECK_INTERVAL:
            warnings.append(
                f"annotation {HEALTH_CHECK_INTERVAL_ANNOTATION}: {_show(interval_text)} is not a duration of "
                f"at least {MIN_HEALTH_CHECK_INTERVAL:g}s (e.g. 5s, 500ms), using the node's interval"
            )
            interval = None
    port = None
    if port_text is not None:
        if isinstance(port_text, str) and port_text.isascii() and port_text.isdigit() and len(port_text) <= 5:
            port = int(port_text)
        if port is None or not 1 <= port <= MAX_PORT:
            warnings.append(
                f"annotation {HEALTH_CHECK_PORT_ANNOTATION}: {_show(port_text)} is not a port (1-65535), "
                "checking each real server's own port"
            )
            port = None
    return HealthOverride(enabled, interval, port)


def _annotation_seconds(value: object) -> float | None:
    """A Go-style duration ("5s", "1m30s", "500ms") or plain seconds ("5"); None if it is neither."""
    if not isinstance(value, str) or len(value) > 32:
        return None
    if _GO_DURATION.fullmatch(value):
        seconds = sum(float(number) * _SECONDS_PER[unit] for number, unit in _GO_UNIT.findall(value))
    else:
        try:
            seconds = float(value)
        except ValueError:
            return None
    return seconds if seconds == seconds and seconds != float("inf") else None


# --- EndpointSlices -----------------------------------------------------------------------------------------


def parse_slice(raw: object, previous: SliceInfo | None = None) -> SliceInfo | Skip:
    """An EndpointSlice (discovery.k8s.io/v1) -> ``SliceInfo``, or a ``Skip`` (never raises).

    Bad endpoints and ports are skipped alone: they are left out and listed in ``SliceInfo.skips``.

    ``previous`` (the last parsed version of the same slice) only saves work, never changes the result: an
    update usually changes a few endpoints of many, and for the others the values already made (endpoint,
    address, real servers) are taken from it instead of being made again.
    """
    try:
        return _parse_slice(raw, previous)
    except _Invalid as invalid:
        namespace, name = _identity(raw)
        return Skip(SLICE_KIND, namespace, name, invalid.reason)


def _parse_slice(raw: object, previous: SliceInfo | None) -> SliceInfo:
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
    if previous is not None and previous.address_type != address_type:
        previous = None  # its addresses are of the other family: nothing to share
    warnings: list[str] = []
    ports = _slice_ports(obj.get("ports"), warnings)
    endpoints = _endpoints(obj.get("endpoints"), _ADDRESS_FAMILIES[address_type], previous, warnings)
    skips = _NO_SKIPS
    if warnings:
        skips = tuple(Skip(SLICE_KIND, namespace, name, reason, Severity.WARNING) for reason in warnings)
    if previous is not None and ports == previous.ports and endpoints.same_as(previous.endpoints):
        # Nothing translation reads changed (a relist, or an update of fields aproxy ignores): share it all.
        ports, made, real_servers, address_ids = (
            previous.ports,
            previous.endpoints,
            previous.real_servers,
            previous.address_ids,
        )
    else:
        made = tuple(endpoints.endpoints)
        real_servers = _real_servers(ports, endpoints.endpoints, endpoints.origins, previous)
        address_ids = tuple(endpoints.ids)
    return SliceInfo(
        namespace,
        name,
        service_name,
        address_type,
        resource_version,
        ports=ports,
        endpoints=made,
        skips=skips,
        real_servers=real_servers,
        address_ids=address_ids,
    )


def _slice_ports(value: object, warnings: list[str]) -> tuple[SlicePort, ...]:
    items = _optional_list(value, "ports")
    if len(items) == 1:
        known = _known_slice_port(items[0])
        if known is not None:
            return known  # the common case: one port, and a tuple shared by every slice with that port
    ports: list[SlicePort] = []
    for index, item in enumerate(items):
        known = _known_slice_port(item)
        if known is not None:
            ports.append(known[0])
            continue
        try:
            port = _slice_port(item, f"ports[{index}]")
        except _Invalid as invalid:
            warnings.append(invalid.reason)
            continue
        if port is not None:
            ports.append(port)
    return tuple(ports)


# (name, protocol, port) as written -> (the SlicePort,): a cluster has a few distinct slice ports, and every
# slice update re-sends its own. Only well-typed values are keys (True == 1 must not find port 1), only valid
# ports are stored, and the table is bounded.
_SLICE_PORTS: dict[tuple[str, str, int], tuple[SlicePort]] = {}
_SHARED_MAX: Final = 1 << 12


def _known_slice_port(item: object) -> tuple[SlicePort] | None:
    """``(SlicePort,)`` for ``item`` if it is a plain, valid port; None: ``_slice_port`` decides (to the same
    result, to "all ports", or to the reason it is skipped)."""
    if type(item) is not dict:
        return None
    name, protocol, number = item.get("name"), item.get("protocol"), item.get("port")
    if name is None:
        name = ""
    if protocol is None:
        protocol = L4Protocol.TCP.value
    if type(name) is not str or type(protocol) is not str or type(number) is not int:
        return None
    key = (name, protocol, number)
    known = _SLICE_PORTS.get(key)
    if known is None and protocol in _PROTOCOLS and 1 <= number <= MAX_PORT:
        known = (SlicePort(sys.intern(name), _PROTOCOLS[protocol], number),)
        if len(_SLICE_PORTS) >= _SHARED_MAX:
            _SLICE_PORTS.clear()
        _SLICE_PORTS[key] = known
    return known


def _slice_port(item: object, path: str) -> SlicePort | None:
    obj = _mapping(item, path)
    name = _optional_str(obj, "name", path)
    protocol = _protocol(obj, path)
    if obj.get("port") is None:
        return None  # "all ports": nothing a virtual server can forward to
    return SlicePort(sys.intern(name), protocol, _port_number(obj, "port", path))


class _Endpoints(NamedTuple):
    """A slice's valid endpoints, parsed against the previous version of the slice (``_endpoints``)."""

    endpoints: list[Endpoint]
    ids: list[int]  # int(address) of each
    # The index of the previous version's endpoint with the same address (-1: none). An endpoint equal to
    # that one is that very object; a changed one shares its address object, and ``_real_servers`` shares
    # its real servers.
    origins: list[int]

    def same_as(self, earlier: tuple[Endpoint, ...]) -> bool:
        """The very endpoints of ``earlier``, in its order."""
        return len(self.endpoints) == len(earlier) and all(map(operator.is_, self.endpoints, earlier))


# What ``_plain_endpoint`` reads: (address or None, address id, ready, serving, terminating, node name or
# None (not yet interned), zone hints). The address is None for IPv4: it is made only if no previous
# endpoint has it.
_PlainEndpoint = tuple[IPAddress | None, int, bool, bool, bool, str | None, frozenset[str]]


def _endpoints(value: object, family: int, previous: SliceInfo | None, warnings: list[str]) -> _Endpoints:
    """The valid endpoints of ``value``; each invalid one becomes a warning. Intake's hottest loop: a watch
    event of a 100-endpoint slice runs it 100 times."""
    endpoints: list[Endpoint] = []
    ids: list[int] = []
    origins: list[int] = []
    earlier = previous.endpoints if previous is not None else ()
    earlier_ids = previous.address_ids if previous is not None else ()
    known: dict[int, int] | None = None  # address id -> index in earlier, made when first needed
    for index, item in enumerate(_optional_list(value, "endpoints")):
        plain = _plain_endpoint(item, family) if item.__class__ is dict else None
        if plain is None:
            try:
                parsed = _endpoint(item, family, f"endpoints[{index}]")
            except _Invalid as invalid:
                warnings.append(invalid.reason)
                continue
            address: IPAddress | None = parsed.address
            ident = int(parsed.address)
            ready, serving, terminating = parsed.ready, parsed.serving, parsed.terminating
            node, zone_hints = parsed.node_name, parsed.zone_hints
        else:
            address, ident, ready, serving, terminating, node, zone_hints = plain
        # The previous version's endpoint with this address: usually the one at the same position (an
        # update rarely reorders a slice).
        position = len(ids)
        if position < len(earlier_ids) and earlier_ids[position] == ident:
            origin = position
        else:
            if known is None:
                known = dict(zip(earlier_ids, range(len(earlier_ids)), strict=True))
            origin = known.get(ident, -1)
        if origin < 0:
            if address is None:
                address = IPv4Address(ident)
            # Node names interned: thousands of endpoints share a handful.
            node = node and sys.intern(node)
            endpoint = Endpoint(address, ready, serving, terminating, node, zone_hints)
        else:
            endpoint = earlier[origin]
            if not (
                endpoint.ready is ready
                and endpoint.serving is serving
                and endpoint.terminating is terminating
                and endpoint.node_name == node
                and endpoint.zone_hints == zone_hints
            ):
                endpoint = Endpoint(
                    endpoint.address, ready, serving, terminating, node and sys.intern(node), zone_hints
                )
        endpoints.append(endpoint)
        ids.append(ident)
        origins.append(origin)
    return _Endpoints(endpoints, ids, origins)


def _plain_endpoint(item: dict[str, Any], family: int) -> _PlainEndpoint | None:
    """What ``_endpoint`` reads from ``item``, if ``item`` has the common, well-formed shape (plain dicts and
    lists, strings, booleans, a dotted-quad IPv4 or a cached address) and is valid. None for anything else:
    ``_endpoint`` then gives the same result or the precise reason to skip it. So this accepts exactly what
    ``_endpoint`` accepts, in a fraction of the time (it is read inline: no helper calls on the way)."""
    addresses = item.get("addresses")
    if addresses.__class__ is not list or not addresses:
        return None
    text = addresses[0]
    if text.__class__ is not str:
        return None
    conditions = item.get("conditions")
    if conditions is None:
        ready = serving = True
        terminating = False
    elif conditions.__class__ is dict:
        # Unset (absent or null) conditions take their defaults; anything but a boolean is invalid.
        ready = conditions.get("ready", True)
        if ready is not True and ready is not False:
            if ready is not None:
                return None
            ready = True
        serving = conditions.get("serving", True)
        if serving is not True and serving is not False:
            if serving is not None:
                return None
            serving = True
        terminating = conditions.get("terminating", False)
        if terminating is not True and terminating is not False:
            if terminating is not None:
                return None
            terminating = False
    else:
        return None
    node = item.get("nodeName")
    if node is not None:
        if node.__class__ is not str:
            return None
        node = node or None  # "": none
    hints = item.get("hints")
    zone_hints = _NO_HINTS if hints is None else _plain_zone_hints(hints)
    if zone_hints is None:
        return None
    if family == 4:
        prefix, _, last = text.rpartition(".")
        high, low = _IPV4_PREFIXES.get(prefix), _OCTETS.get(last)
        if high is None or low is None:
            ident = _ipv4_int(text)  # a new /24 (or not an IPv4 address)
            if ident is None:
                return None
        else:
            ident = high | low
        return None, ident, ready, serving, terminating, node, zone_hints
    address = _parse_ip_text(text)
    if address is None or address.version != family:
        return None
    return address, int(address), ready, serving, terminating, node, zone_hints


def _plain_zone_hints(value: object) -> frozenset[str] | None:
    """``_zone_hints`` of plain, valid hints; None for anything else (``_zone_hints`` decides)."""
    if type(value) is not dict:
        return None
    zones = value.get("forZones")
    if zones is None:
        return _NO_HINTS
    if type(zones) is not list:
        return None
    names: set[str] = set()
    for zone in zones:
        if type(zone) is not dict:
            return None
        name = zone.get("name")
        if name is None:
            continue
        if type(name) is not str:
            return None
        if name:
            names.add(sys.intern(name))
    return frozenset(names) if names else _NO_HINTS


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


def _real_servers(
    ports: tuple[SlicePort, ...],
    endpoints: Sequence[Endpoint],
    origins: Sequence[int] = (),
    previous: SliceInfo | None = None,
) -> tuple[tuple[RealServer, ...], ...]:
    """``SliceInfo.real_servers``: each endpoint as a real server on each port. The real server of an
    endpoint whose origin (see ``_Endpoints``) had one on the same port number is that one; ports with one
    number (DNS: 53/UDP and 53/TCP) share one tuple."""
    earlier: dict[int, tuple[RealServer, ...]] = {}
    if previous is not None and origins:
        earlier = {
            port.port: reals for port, reals in zip(previous.ports, previous.real_servers, strict=True)
        }
    made: dict[int, tuple[RealServer, ...]] = {}
    for port in ports:
        number = port.port
        if number in made:
            continue
        old = earlier.get(number)
        if old is None:
            made[number] = tuple([RealServer(e.address, number) for e in endpoints])
        else:
            made[number] = tuple(
                [
                    old[origin] if origin >= 0 else RealServer(e.address, number)
                    for e, origin in zip(endpoints, origins, strict=True)
                ]
            )
    return tuple(made[port.port] for port in ports)
