"""The command line's options: their value types, the option groups the commands share, the settings they
build, and kube-proxy's interface (``--config`` files, its flag spellings). aproxy/cli.py builds the parser
and runs the commands with them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import ipaddress
import math
import re
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aproxy.backends.ipvs import IPVSSettings, check_device_name
from aproxy.backends.ipvs_wire import IPVSTimeouts
from aproxy.config_file import load_config_files
from aproxy.core.model import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    IPAddress,
)
from aproxy.core.node_addresses import NodePortAddresses
from aproxy.health.config import SCOPES, HealthCheckSettings
from aproxy.settings import SettingsError
from aproxy.sources.file import FileSourceSettings
from aproxy.web.server import ListenAddress, ListenAddressError


def ip_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IP address: {text!r}") from None


def scheduler(text: str) -> str:
    if text not in SCHEDULERS:
        raise argparse.ArgumentTypeError(
            f"unknown IPVS scheduler {text!r} (one of {', '.join(sorted(SCHEDULERS))})"
        )
    return text


def add_node_options(parser: argparse.ArgumentParser, *, source_required: bool = True) -> None:
    parser.add_argument(
        "--source",
        action="append",
        type=Path,
        required=source_required,
        default=None if source_required else [],
        metavar="FILE",
        help="Kubernetes manifests (YAML or JSON: Service, EndpointSlice, List); a directory means its "
        "*.yaml, *.yml and *.json files; repeatable",
    )
    parser.add_argument(
        "--node-name",
        "--hostname-override",
        default=None,
        help="this node's name (for traffic policy Local; default: the host name, as kube-proxy's)",
    )
    parser.add_argument(
        "--node-ip",
        action="append",
        type=ip_address,
        default=[],
        metavar="IP",
        help="an address of this node, where NodePort virtual servers listen; repeatable",
    )
    parser.add_argument("--node-zone", default=None, help="this node's topology zone (for topology hints)")
    parser.add_argument(
        "--ipvs-scheduler",
        type=scheduler,
        default=DEFAULT_SCHEDULER,
        help=f"default IPVS scheduler (default: {DEFAULT_SCHEDULER}); "
        "a service's aproxy.io/scheduler annotation overrides it",
    )


def add_cluster_options(parser: argparse.ArgumentParser, *, kubeconfig_help: str) -> None:
    """Where a live cluster is (``plan`` and ``run``; each explains --kubeconfig in its own terms)."""
    parser.add_argument("--kubeconfig", type=Path, default=None, help=kubeconfig_help)
    parser.add_argument("--master", default=None, help="API server URL, overriding the kubeconfig's")


def add_backend_option(parser: argparse.ArgumentParser, *, dry_run_table: str) -> None:
    """The kernel or an in-memory table (``sync`` and ``run``, which say whether the table starts empty)."""
    parser.add_argument(
        "--backend",
        choices=["ipvs", "dry-run"],
        default="ipvs",
        help=f"ipvs (default) programs the kernel; dry-run applies to {dry_run_table}",
    )


def add_health_check_options(run: argparse.ArgumentParser) -> None:
    """Active TCP checks of the backends (aproxy/health/): unhealthy ones are drained at weight 0."""
    defaults = HealthCheckSettings()
    group = run.add_argument_group(
        "backend health checks",
        "every node checks every TCP real server it programs with a TCP connect; a backend failing --fall "
        "checks in a row gets weight 0 until --rise succeed. Per service: annotations "
        "aproxy.io/health-check (false: off), aproxy.io/health-check-interval, aproxy.io/health-check-port",
    )
    group.add_argument(
        "--no-health-checks", dest="health_checks", action="store_false", help="trust readiness alone"
    )
    for flag, default, text in (
        ("--health-check-interval", defaults.interval, "time between two checks of a backend"),
        ("--health-check-timeout", defaults.timeout, "a handshake not done by then is a failure"),
        ("--health-check-used-window", defaults.used_window, "scope used: connections this recent count"),
    ):
        group.add_argument(
            flag, type=duration, default=default, metavar="DURATION", help=f"{text} ({default:g} s)"
        )
    for flag, number, text in (
        ("--health-check-fall", defaults.fall, "consecutive failures that drain a backend"),
        ("--health-check-rise", defaults.rise, "consecutive successes that restore it"),
        ("--health-check-concurrency", defaults.concurrency, "checks in flight at most"),
    ):
        group.add_argument(flag, type=int, default=number, metavar="N", help=f"{text} ({number})")
    group.add_argument(
        "--health-check-max-rate",
        type=float,
        default=defaults.max_rate,
        metavar="CHECKS_PER_S",
        help=f"checks per second from this node at most; beyond it intervals stretch ({defaults.max_rate:g})",
    )
    group.add_argument(
        "--health-check-scope",
        choices=SCOPES,
        default=defaults.scope,
        help="all (default): every TCP real server; used: those that carried this node's connections "
        "within --health-check-used-window, and the unhealthy ones",
    )
    group.add_argument(
        "--health-check-fail-closed",
        action="store_true",
        help="when every backend of a virtual server is unhealthy, drain them all (default: keep them all)",
    )


def add_one_shot_health_option(parser: argparse.ArgumentParser) -> None:
    defaults = HealthCheckSettings()
    parser.add_argument(
        "--health-checks",
        action="store_true",
        help=f"check every TCP backend now (a TCP connect, up to {defaults.fall} tries of "
        f"{defaults.timeout:g} s) and give the unhealthy ones weight 0, as the daemon would",
    )


def health_check_settings(args: argparse.Namespace) -> HealthCheckSettings:
    fields = ("interval", "timeout", "fall", "rise", "concurrency", "max_rate", "scope", "used_window")
    return HealthCheckSettings(
        enabled=args.health_checks,
        fail_closed=args.health_check_fail_closed,
        **{name: getattr(args, f"health_check_{name}") for name in fields},
    )


def add_file_source_options(parser: argparse.ArgumentParser) -> None:
    defaults = FileSourceSettings()
    parser.add_argument(
        "--source-settle-period",
        type=duration,
        default=defaults.settle_period,
        metavar="DURATION",
        help="how long manifest files must be quiet before a change is read, so that a file written in "
        f"place is not read half-written ({defaults.settle_period:g} s)",
    )


def file_source_settings(args: argparse.Namespace) -> FileSourceSettings:
    return FileSourceSettings(settle_period=args.source_settle_period)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """Seconds: a plain number, or Go-style units as kube-proxy's flags take them ("1m30s", "500ms")."""
    if text.startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid duration: {text!r} (must not be negative)")
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            raise argparse.ArgumentTypeError(
                f"invalid duration: {text!r} (e.g. 30, 30s, 500ms, 15m)"
            ) from None
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"invalid duration: {text!r} (must be finite and >= 0)")
    return seconds


def listen_address(text: str) -> ListenAddress:
    try:
        return ListenAddress.parse(text)
    except ListenAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_kernel_options(parser: argparse.ArgumentParser) -> None:
    defaults = IPVSSettings()
    parser.add_argument(
        "--device",
        type=device_name,
        default=defaults.device,
        help=f"dummy device for service addresses (default: {defaults.device})",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=defaults.state_file,
        help=f"record of owned virtual servers on unbound addresses (default: {defaults.state_file})",
    )


def ipvs_settings(args: argparse.Namespace) -> IPVSSettings:
    return IPVSSettings(device=args.device, state_file=args.state_file, **_datapath_settings(args))


def cidrs(text: str) -> tuple[str, ...]:
    """kube-proxy's --cluster-cidr: one CIDR, or a comma-separated pair for dual-stack."""
    cidrs = tuple(part.strip() for part in text.split(",") if part.strip())
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a CIDR: {cidr!r}") from None
    return cidrs


def nodeport_addresses(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(","))
    try:
        NodePortAddresses.parse(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def add_datapath_options(parser: argparse.ArgumentParser) -> None:
    """What surrounds IPVS on the node: source NAT, ARP, sysctls (backends/masquerade.py, sysctl.py)."""
    parser.add_argument(
        "--masquerade-all",
        action="store_true",
        help="source-NAT all traffic IPVS forwards (kube-proxy's --masquerade-all)",
    )
    parser.add_argument(
        "--cluster-cidr",
        type=cidrs,
        default=(),
        metavar="CIDR[,CIDR]",
        help="the pod network: cluster-IP traffic from outside it is source-NATed (kube-proxy's meaning)",
    )
    parser.add_argument(
        "--nodeport-addresses",
        type=nodeport_addresses,
        default=(),
        metavar="CIDR[,CIDR]|primary",
        help="NodePorts on the local addresses in these CIDRs, or on the node's primary IPs (default: every "
        "local address but loopback and the device's), followed as addresses come and go (run); health-check "
        "node ports listen there too (default, or 0.0.0.0/0 or ::/0 given: on every address)",
    )
    parser.add_argument(
        "--ipvs-strict-arp",
        "--strict-arp",
        dest="strict_arp",
        action="store_true",
        help="arp_ignore=1, arp_announce=2: no ARP answers for kube-ipvs0's addresses (MetalLB)",
    )
    parser.add_argument(
        "--manage-sysctls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="set the sysctls IPVS needs (net/ipv4/vs/conntrack, ip_forward, ...) at start (default: yes)",
    )


def _datapath_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The IPVSSettings fields of ``add_datapath_options`` (their defaults for commands without them)."""
    defaults = IPVSSettings()
    return {
        "masquerade_all": getattr(args, "masquerade_all", defaults.masquerade_all),
        "cluster_cidrs": getattr(args, "cluster_cidr", defaults.cluster_cidrs),
        "strict_arp": getattr(args, "strict_arp", defaults.strict_arp),
        "manage_sysctls": getattr(args, "manage_sysctls", defaults.manage_sysctls),
        "nodeport_addresses": getattr(args, "nodeport_addresses", defaults.nodeport_addresses),
    }


_NEGATIVE_VALUE = re.compile(r"-[\d.]")


def negative_values_attached(argv: Sequence[str]) -> list[str]:
    """``--flag -1s`` as ``--flag=-1s``: argparse takes ``-1s`` for an option (``expected one argument``);
    attached, the flag's own type check names the flag and the value. aproxy has no option that looks like
    ``-<digit>`` and no positional argument a negative number could be."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _NEGATIVE_VALUE.match(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def version() -> str:
    try:
        return importlib.metadata.version("aproxy")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def add_kube_proxy_options(run: argparse.ArgumentParser) -> None:
    """kube-proxy's flags where aproxy does the same thing (its other spellings are on the options
    themselves: --hostname-override, --kubeconfig, --master, --ipvs-scheduler, the bind addresses)."""
    run.add_argument(
        "--config",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1, as in kubeadm's kube-proxy "
        "ConfigMap) and/or an AproxyConfiguration (aproxy.io/v1alpha1); repeatable; flags override it",
    )
    # Aliases: SUPPRESS keeps them from overwriting the default their twin sets.
    for alias, dest in (("--ipvs-sync-period", "sync_period"), ("--ipvs-min-sync-period", "min_sync_period")):
        run.add_argument(
            alias,
            dest=dest,
            type=duration,
            default=argparse.SUPPRESS,
            metavar="DURATION",
            help=f"kube-proxy's name for --{dest.replace('_', '-')}",
        )
    for flag, what in (
        ("--ipvs-tcp-timeout", "idle TCP connections"),
        ("--ipvs-tcpfin-timeout", "TCP connections after a FIN"),
        ("--ipvs-udp-timeout", "UDP flows"),
    ):
        run.add_argument(
            flag,
            type=duration,
            default=0.0,
            metavar="DURATION",
            help=f"IPVS's timeout for {what}, set at start like `ipvsadm --set` (0, the default: unchanged)",
        )
    run.add_argument(
        "--ipvs-exclude-cidrs",
        dest="exclude_cidrs",
        type=cidrs,
        default=(),
        metavar="CIDR[,CIDR]",
        help="accepted for kube-proxy's sake, and nothing to do: kube-proxy needs it to spare other "
        "programs' virtual servers, aproxy never changes a virtual server it does not own",
    )
    run.add_argument(
        "--proxy-mode", choices=["ipvs"], default="ipvs", help="kube-proxy's mode: only ipvs (the default)"
    )
    run.add_argument(
        "--cleanup", action="store_true", help="as `aproxy cleanup`: remove what aproxy owns and exit"
    )
    run.add_argument(
        "-v",
        "--v",
        dest="verbosity",
        type=int,
        default=0,
        metavar="N",
        help="kube-proxy's log verbosity: 4 or more logs at debug level (unless --log-level is given)",
    )


def _explicit_dests(argv: Sequence[str], build_parser: Callable[[], argparse.ArgumentParser]) -> set[str]:
    """The options given on the command line (their dests): a new parser, every default suppressed."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return set(vars(parser.parse_args(argv)))


def apply_config_files(
    args: argparse.Namespace, argv: Sequence[str], build_parser: Callable[[], argparse.ArgumentParser]
) -> list[str]:
    """Precedence flag > file > default: the files' values replace the options not given (``build_parser``
    makes the command line's parser, to tell them). Returns the files' warnings (logged once logging is
    configured). Raises ConfigFileError, ManifestError."""
    warnings: list[str] = []
    explicit = _explicit_dests(argv, build_parser)
    if getattr(args, "config", None):
        config = load_config_files(args.config)
        warnings.extend(config.warnings)
        for dest, value in config.values.items():
            if dest not in explicit:
                setattr(args, dest, value)
    if getattr(args, "verbosity", 0) >= 4 and "log_level" not in explicit:
        args.log_level = "debug"
    if hasattr(args, "node_name") and not args.node_name:
        # kube-proxy's default: the host name, lower-cased (as the kubelet registers the Node).
        args.node_name = socket.gethostname().lower()
    return warnings


def kube_proxy_ipvs_settings(args: argparse.Namespace, ipvs: IPVSSettings) -> IPVSSettings:
    """The backend settings only the config file (or kube-proxy's flags) set."""
    try:
        timeouts = IPVSTimeouts(args.ipvs_tcp_timeout, args.ipvs_tcpfin_timeout, args.ipvs_udp_timeout)
    except ValueError as exc:
        raise SettingsError(f"--ipvs-*-timeout: {exc}") from None
    # masqueradeAll, clusterCIDR, strictARP and nodePortAddresses set the flags' own options: ipvs_settings.
    return dataclasses.replace(ipvs, timeouts=timeouts)
