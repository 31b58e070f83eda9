"""``--config FILE``: kube-proxy's ``KubeProxyConfiguration`` and aproxy's ``AproxyConfiguration``, parsed
into the values of ``aproxy run``'s options.

Public API::

    load_config_files(paths: Sequence[Path]) -> ConfigFile       # raises ConfigFileError or ManifestError
    parse_documents(documents: Sequence[object], origin: str) -> ConfigFile
    ConfigFile(values: Mapping[str, object], warnings: tuple[str, ...])

A file holds one or more YAML documents, each one of:

- ``apiVersion: kubeproxy.config.k8s.io/v1alpha1``, ``kind: KubeProxyConfiguration``: the file kubeadm writes
  into the ``kube-proxy`` ConfigMap (``config.conf``), unchanged. kubeadm marshals every field, zero values
  included (``syncPeriod: 0s``, ``scheduler: ""``, ``masqueradeBit: null``): a zero value means "unset", as
  kube-proxy's defaulting reads it, and leaves aproxy's default in place.
- ``apiVersion: aproxy.io/v1alpha1``, ``kind: AproxyConfiguration``: aproxy's own settings (manifest sources,
  audit and drain periods, device, ...). Here every value given is used, zero included.

Each field is one of: a setting (its value becomes an option of ``aproxy run``, ``values`` is keyed by the
option's argparse ``dest``), unimplemented (a value other than the zero one is a warning naming the field:
it would change kube-proxy's behaviour and aproxy does not do it), or irrelevant to IPVS mode (nftables,
winkernel, ...: accepted and ignored). An unknown field, a value of the wrong type or an invalid value is a
``ConfigFileError`` with one line naming the file and the field (``aproxy run`` prints it and exits 2).
``mode`` must be ``ipvs`` or empty. Two documents setting the same option is an error too.
The command line wins over the file, the file over aproxy's defaults (``cli.py`` applies ``values`` to the
options not given).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from aproxy.core.model import SCHEDULERS
from aproxy.core.node_addresses import NodePortAddresses
from aproxy.sources.manifest import read_documents
from aproxy.web.server import ListenAddress, ListenAddressError

KUBE_PROXY_API: Final = ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
APROXY_API: Final = ("aproxy.io/v1alpha1", "AproxyConfiguration")
# kube-proxy's ports, appended to a bind address given without one (as kube-proxy's defaulting does).
HEALTHZ_PORT: Final = 10256
METRICS_PORT: Final = 10249


class ConfigFileError(ValueError):
    """A configuration file aproxy cannot use: one line naming the file and the field."""


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """The options the files set (argparse ``dest`` -> value, typed as the option's own parser types it) and
    one warning per unimplemented field set."""

    values: Mapping[str, object]
    warnings: tuple[str, ...] = ()


Kind = Literal["str", "bool", "int", "number", "duration", "strings", "bools", "mapping", "any"]
Convert = Callable[[object], object]


@dataclass(frozen=True, slots=True)
class _Field:
    """One field: its type, and what it does. ``dest`` set: a setting (``convert`` turns the file's value
    into the option's). ``unimplemented`` set: a non-zero value is a warning with that explanation. Neither:
    ignored (``convert`` alone only validates)."""

    kind: Kind
    dest: str | None = None
    convert: Convert | None = None
    unimplemented: str | None = None
    nested: Mapping[str, _Field] | None = None
    nullable: bool = False


class _Invalid(ValueError):
    """A value of the right type that is still unusable (a converter's; the caller names the field)."""


# --- converters (value already type-checked) ----------------------------------------------------------------

_GO_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def go_duration(text: str) -> float:
    """Seconds from a Go ``time.Duration`` string (``metav1.Duration``'s JSON form): ``0``, ``1m30s``,
    ``500ms``. Raises ValueError."""
    if text == "0":
        return 0.0
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"invalid duration {text!r} (e.g. 30s, 500ms, 1m30s)")
    seconds = sum(float(number) * _GO_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {text!r}")
    return seconds


def _seconds(value: object) -> object:
    assert isinstance(value, str)
    return go_duration(value)


def _scheduler(value: object) -> object:
    if value not in SCHEDULERS:
        raise _Invalid(f"unknown IPVS scheduler {value!r} (one of {', '.join(sorted(SCHEDULERS))})")
    return value


def _bind_address(default_port: int) -> Convert:
    """kube-proxy accepts ``IP:PORT`` or a bare IP (its port appended)."""

    def convert(value: object) -> object:
        text = str(value)
        try:
            ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            text = f"[{text}]:{default_port}" if ":" in text else f"{text}:{default_port}"
        try:
            return ListenAddress.parse(text)
        except ListenAddressError as exc:
            raise _Invalid(str(exc)) from None

    return convert


def _ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise _Invalid(f"{value!r} is not an IP address") from None


def _node_ips_from_bind_address(value: object) -> object:
    """kube-proxy's ``bindAddress``: the node's primary IP, unless it is 0.0.0.0 or :: (then: the Node's)."""
    address = _ip(value)
    return None if address.is_unspecified else [address]


def _ips(value: object) -> object:
    assert isinstance(value, list)
    return [_ip(item) for item in value]


def _nodeport_addresses(value: object) -> object:
    """kube-proxy's nodePortAddresses: CIDRs, or ``primary`` (checked as --nodeport-addresses is)."""
    assert isinstance(value, list)
    addresses = tuple(str(item).strip() for item in value)
    try:
        NodePortAddresses.parse(addresses)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return addresses


def _cidrs(value: object) -> object:
    """A list of CIDRs, or kube-proxy's comma-separated dual-stack pair in one string."""
    items = value.split(",") if isinstance(value, str) else value
    assert isinstance(items, list)
    cidrs = []
    for item in items:
        try:
            cidrs.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise _Invalid(f"{item!r} is not a CIDR") from None
    return tuple(cidrs)  # as --cluster-cidr gives them


def _log_format(value: object) -> object:
    if value not in ("text", "json"):
        raise _Invalid(f"unknown log format {value!r} (text or json)")
    return "logfmt" if value == "text" else "json"


def _choice(*choices: str) -> Convert:
    def convert(value: object) -> object:
        if value not in choices:
            raise _Invalid(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return convert


def _ipvs_mode(value: object) -> object:
    if value != "ipvs":
        raise _Invalid(f"{value!r}: aproxy implements only the ipvs mode (mode: ipvs, or empty)")
    return value


def _paths(value: object) -> object:
    assert isinstance(value, list)
    return [Path(item) for item in value]


def _path(value: object) -> object:
    return Path(str(value))


# --- the schemas --------------------------------------------------------------------------------------------

_IGNORED_STR = _Field("str")
_IGNORED_DURATION = _Field("duration")


def _unimplemented(kind: Kind, why: str, *, nullable: bool = False) -> _Field:
    return _Field(kind, unimplemented=why, nullable=nullable)


_CONNTRACK = "aproxy leaves the conntrack table's size and timeouts as they are"

KUBE_PROXY_FIELDS: Final[Mapping[str, _Field]] = {
    "featureGates": _unimplemented("bools", "aproxy has no feature gates"),
    "clientConnection": _Field(
        "mapping",
        nested={
            "kubeconfig": _Field("str", dest="kubeconfig", convert=_path),
            "acceptContentTypes": _IGNORED_STR,
            "contentType": _IGNORED_STR,
            "qps": _unimplemented("number", "aproxy does not rate-limit its few API requests"),
            "burst": _unimplemented("int", "aproxy does not rate-limit its few API requests"),
        },
    ),
    "logging": _Field(
        "mapping",
        nested={
            "format": _Field("str", dest="log_format", convert=_log_format),
            "flushFrequency": _Field("any"),
            "verbosity": _Field("int", dest="verbosity"),
            "vmodule": _Field("any"),
            "options": _Field("mapping"),
        },
    ),
    "hostnameOverride": _Field("str", dest="node_name"),
    "bindAddress": _Field("str", dest="node_ip", convert=_node_ips_from_bind_address),
    "healthzBindAddress": _Field("str", dest="healthz_bind_address", convert=_bind_address(HEALTHZ_PORT)),
    "metricsBindAddress": _Field("str", dest="metrics_bind_address", convert=_bind_address(METRICS_PORT)),
    # aproxy always fails when it cannot bind: the behaviour this asks for.
    "bindAddressHardFail": _Field("bool"),
    "enableProfiling": _unimplemented("bool", "aproxy serves no profiling endpoint"),
    "showHiddenMetricsForVersion": _unimplemented("str", "aproxy has no hidden metrics"),
    "mode": _Field("str", convert=_ipvs_mode),
    "iptables": _Field(
        "mapping",
        nested={
            "masqueradeBit": _unimplemented("int", "aproxy's source NAT marks no packets", nullable=True),
            "masqueradeAll": _Field("bool", dest="masquerade_all"),
            # iptables mode only:
            "localhostNodePorts": _Field("bool", nullable=True),
            "snatNodeInternalIP": _Field("bool", nullable=True),
            "syncPeriod": _IGNORED_DURATION,
            "minSyncPeriod": _IGNORED_DURATION,
        },
    ),
    "ipvs": _Field(
        "mapping",
        nested={
            "syncPeriod": _Field("duration", dest="sync_period", convert=_seconds),
            "minSyncPeriod": _Field("duration", dest="min_sync_period", convert=_seconds),
            "scheduler": _Field("str", dest="ipvs_scheduler", convert=_scheduler),
            "excludeCIDRs": _Field("strings", dest="exclude_cidrs", convert=_cidrs, nullable=True),
            "strictARP": _Field("bool", dest="strict_arp"),
            "tcpTimeout": _Field("duration", dest="ipvs_tcp_timeout", convert=_seconds),
            "tcpFinTimeout": _Field("duration", dest="ipvs_tcpfin_timeout", convert=_seconds),
            "udpTimeout": _Field("duration", dest="ipvs_udp_timeout", convert=_seconds),
        },
    ),
    "nftables": _Field(
        "mapping",
        nested={
            "masqueradeBit": _Field("int", nullable=True),
            "masqueradeAll": _Field("bool"),
            "syncPeriod": _IGNORED_DURATION,
            "minSyncPeriod": _IGNORED_DURATION,
        },
    ),
    "winkernel": _Field(
        "mapping",
        nested={
            "networkName": _IGNORED_STR,
            "sourceVip": _IGNORED_STR,
            "enableDSR": _Field("bool"),
            "rootHnsEndpointName": _IGNORED_STR,
            "forwardHealthCheckVip": _Field("bool"),
        },
    ),
    "detectLocalMode": _unimplemented("str", "aproxy tells local traffic by clusterCIDR only"),
    "detectLocal": _Field(
        "mapping",
        nested={
            "bridgeInterface": _unimplemented("str", "aproxy tells local traffic by clusterCIDR only"),
            "interfaceNamePrefix": _unimplemented("str", "aproxy tells local traffic by clusterCIDR only"),
        },
    ),
    "clusterCIDR": _Field("str", dest="cluster_cidr", convert=_cidrs),
    "nodePortAddresses": _Field(
        "strings", dest="nodeport_addresses", convert=_nodeport_addresses, nullable=True
    ),
    "oomScoreAdj": _unimplemented("int", "aproxy leaves its OOM score alone", nullable=True),
    "conntrack": _Field(
        "mapping",
        nested={
            "maxPerCore": _unimplemented("int", _CONNTRACK, nullable=True),
            "min": _unimplemented("int", _CONNTRACK, nullable=True),
            "tcpEstablishedTimeout": _unimplemented("duration", _CONNTRACK, nullable=True),
            "tcpCloseWaitTimeout": _unimplemented("duration", _CONNTRACK, nullable=True),
            "tcpBeLiberal": _unimplemented("bool", _CONNTRACK),
            "udpTimeout": _unimplemented("duration", _CONNTRACK),
            "udpStreamTimeout": _unimplemented("duration", _CONNTRACK),
        },
    ),
    # The informers' resync: aproxy's watch needs none.
    "configSyncPeriod": _IGNORED_DURATION,
    "portRange": _IGNORED_STR,
    "windowsRunAsService": _Field("bool"),
}

APROXY_FIELDS: Final[Mapping[str, _Field]] = {
    "sources": _Field("strings", dest="source", convert=_paths),
    "nodeIPs": _Field("strings", dest="node_ip", convert=_ips),
    "nodeZone": _Field("str", dest="node_zone"),
    "auditPeriod": _Field("duration", dest="audit_period", convert=_seconds),
    "drainCheckPeriod": _Field("duration", dest="drain_check_period", convert=_seconds),
    "drainGracePeriod": _Field("duration", dest="drain_grace_period", convert=_seconds),
    "device": _Field("str", dest="device"),
    "stateFile": _Field("str", dest="state_file", convert=_path),
    "backend": _Field("str", dest="backend", convert=_choice("ipvs", "dry-run")),
}

_SCHEMAS: Final = {KUBE_PROXY_API: KUBE_PROXY_FIELDS, APROXY_API: APROXY_FIELDS}
_EXPECTED: Final[Mapping[Kind, str]] = {
    "str": "a string",
    "bool": "true or false",
    "int": "an integer",
    "number": "a number",
    "duration": 'a duration string such as "30s"',
    "strings": "a list of strings",
    "bools": "a mapping of names to true/false",
    "mapping": "a mapping",
    "any": "anything",
}


# --- parsing ------------------------------------------------------------------------------------------------


def load_config_files(paths: Sequence[Path]) -> ConfigFile:
    """Every document of every file, in order (reading errors: ManifestError; content: ConfigFileError)."""
    values: dict[str, object] = {}
    setters: dict[str, str] = {}
    warnings: list[str] = []
    for path in paths:
        _merge(_parse(read_documents(path), str(path)), values, setters, warnings)
    return ConfigFile(values, tuple(warnings))


def parse_documents(documents: Sequence[object], origin: str) -> ConfigFile:
    """The documents of one file named ``origin`` in messages."""
    values: dict[str, object] = {}
    warnings: list[str] = []
    _merge(_parse(documents, origin), values, {}, warnings)
    return ConfigFile(values, tuple(warnings))


def _merge(
    parsed: list[tuple[str, str, object | None, str | None]],
    values: dict[str, object],
    setters: dict[str, str],
    warnings: list[str],
) -> None:
    for where, dest, value, warning in parsed:
        if warning is not None:
            warnings.append(warning)
            continue
        if dest in setters:
            raise ConfigFileError(f"{where}: sets what {setters[dest]} already set")
        setters[dest] = where
        values[dest] = value


def _parse(documents: Sequence[object], origin: str) -> list[tuple[str, str, object | None, str | None]]:
    """(where, dest, value, None) per setting, ("", "", None, warning) per unimplemented field set."""
    found: list[tuple[str, str, object | None, str | None]] = []
    documents = [document for document in documents if document is not None]
    if not documents:
        raise ConfigFileError(f"{origin}: no configuration in the file")
    for index, document in enumerate(documents, 1):
        label = origin if len(documents) == 1 else f"{origin}: document {index}"
        if not isinstance(document, dict):
            raise ConfigFileError(f"{label}: expected a mapping, got {type(document).__name__}")
        api = (str(document.get("apiVersion")), str(document.get("kind")))
        schema = _SCHEMAS.get(api)
        if schema is None:
            wanted = " or ".join(f"{version} {kind}" for version, kind in _SCHEMAS)
            raise ConfigFileError(f"{label}: apiVersion/kind {api[0]!r}/{api[1]!r}: expected {wanted}")
        body = {key: value for key, value in document.items() if key not in ("apiVersion", "kind")}
        _walk(body, schema, label, "", zero_is_unset=schema is KUBE_PROXY_FIELDS, found=found)
    return found


def _walk(
    body: dict[object, object],
    schema: Mapping[str, _Field],
    label: str,
    prefix: str,
    *,
    zero_is_unset: bool,
    found: list[tuple[str, str, object | None, str | None]],
) -> None:
    for key, value in body.items():
        name = f"{prefix}{key}"
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            raise ConfigFileError(f"{label}: {name}: unknown field")
        if value is None and (spec.nullable or spec.kind in ("strings", "bools", "mapping", "any")):
            continue
        if not _has_kind(value, spec.kind):
            shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
            raise ConfigFileError(f"{label}: {name}: expected {_EXPECTED[spec.kind]}, got {shown}")
        if spec.nested is not None:
            assert isinstance(value, dict)
            _walk(value, spec.nested, label, f"{name}.", zero_is_unset=zero_is_unset, found=found)
            continue
        _check_value(value, spec, label, name)
        if zero_is_unset and _is_zero(value):
            continue
        if spec.unimplemented is not None:
            found.append(("", "", None, f"{label}: {name}={_shown(value)} is ignored: {spec.unimplemented}"))
        elif spec.dest is not None:
            try:
                converted = spec.convert(value) if spec.convert is not None else value
            except _Invalid as exc:
                raise ConfigFileError(f"{label}: {name}: {exc}") from None
            if converted is not None:
                found.append((f"{label}: {name}", spec.dest, converted, None))
        elif spec.convert is not None:  # validated only (mode)
            try:
                spec.convert(value)
            except _Invalid as exc:
                raise ConfigFileError(f"{label}: {name}: {exc}") from None


def _check_value(value: object, spec: _Field, label: str, name: str) -> None:
    """Durations must parse whatever the field does with them."""
    if spec.kind == "duration":
        try:
            seconds = go_duration(str(value))
        except ValueError as exc:
            raise ConfigFileError(f"{label}: {name}: {exc}") from None
        if seconds < 0:
            raise ConfigFileError(f"{label}: {name}: must not be negative")


def _has_kind(value: object, kind: Kind) -> bool:
    if kind == "any":
        return True
    if kind in ("str", "duration"):
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "strings":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if kind == "bools":
        return isinstance(value, dict) and all(
            isinstance(key, str) and isinstance(item, bool) for key, item in value.items()
        )
    return isinstance(value, dict)  # mapping


def _is_zero(value: object) -> bool:
    """kube-proxy's zero values, which kubeadm writes for every field it leaves to the defaults."""
    if isinstance(value, str):
        return value == "" or (value[:1].isdigit() and _zero_duration(value))
    return value is False or value == 0 or value == [] or value == {}


def _zero_duration(text: str) -> bool:
    try:
        return go_duration(text) == 0
    except ValueError:
        return False


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
