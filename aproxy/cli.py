"""aproxy's command line: argument parsing and exit codes; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import ipaddress
import logging
import math
import re
import socket
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import Any

import orjson
import uvloop

from aproxy import app, logs, render
from aproxy.backends.base import Backend
from aproxy.backends.ipvs import IPVSBackend, IPVSSettings, IPVSUnavailable, check_device_name
from aproxy.backends.ipvs_wire import IPVSTimeouts
from aproxy.backends.memory import MemoryBackend
from aproxy.config_file import ConfigFileError, load_config_files
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    AddRealServer,
    IPAddress,
    Operation,
    RealServerKey,
    UpdateRealServer,
    VirtualServerKey,
    operation_to_dict,
)
from aproxy.core.node_addresses import NodePortAddresses
from aproxy.core.translate import TranslationContext
from aproxy.core.verdicts import HealthView
from aproxy.health.config import SCOPES, HealthCheckSettings
from aproxy.health.oneshot import judge_once
from aproxy.settings import Settings, SettingsError, period_floor_problems
from aproxy.sources.file import FileSourceSettings
from aproxy.sources.manifest import ManifestError, load_manifests
from aproxy.syncer import Syncer, SyncReport, desired_all, log_fail_open, log_skips
from aproxy.web.server import ListenAddress, ListenAddressError

log = logging.getLogger("aproxy")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IP address: {text!r}") from None


def _scheduler(text: str) -> str:
    if text not in SCHEDULERS:
        raise argparse.ArgumentTypeError(
            f"unknown IPVS scheduler {text!r} (one of {', '.join(sorted(SCHEDULERS))})"
        )
    return text


def _add_node_options(parser: argparse.ArgumentParser, *, source_required: bool = True) -> None:
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
        type=_ip,
        default=[],
        metavar="IP",
        help="an address of this node, where NodePort virtual servers listen; repeatable",
    )
    parser.add_argument("--node-zone", default=None, help="this node's topology zone (for topology hints)")
    parser.add_argument(
        "--ipvs-scheduler",
        type=_scheduler,
        default=DEFAULT_SCHEDULER,
        help=f"default IPVS scheduler (default: {DEFAULT_SCHEDULER}); "
        "a service's aproxy.io/scheduler annotation overrides it",
    )


def _add_cluster_options(parser: argparse.ArgumentParser, *, kubeconfig_help: str) -> None:
    """Where a live cluster is (``plan`` and ``run``; each explains --kubeconfig in its own terms)."""
    parser.add_argument("--kubeconfig", type=Path, default=None, help=kubeconfig_help)
    parser.add_argument("--master", default=None, help="API server URL, overriding the kubeconfig's")


def _add_backend_option(parser: argparse.ArgumentParser, *, dry_run_table: str) -> None:
    """The kernel or an in-memory table (``sync`` and ``run``, which say whether the table starts empty)."""
    parser.add_argument(
        "--backend",
        choices=["ipvs", "dry-run"],
        default="ipvs",
        help=f"ipvs (default) programs the kernel; dry-run applies to {dry_run_table}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aproxy", description="An incremental Kubernetes service proxy that programs Linux IPVS."
    )
    parser.add_argument("--version", action="version", version=f"aproxy {_version()}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="logfmt", choices=["logfmt", "json"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = commands.add_parser(
        "plan",
        help="print the IPVS state the manifests want on this node, without touching the kernel",
        description=(
            "Print the desired IPVS state for the manifests given (--source), or for a live cluster "
            "(--kubeconfig/--master; with neither, the pod's service account, KUBECONFIG or ~/.kube/config). "
            "Skipped objects are reported on stderr. Exit status 0 when the manifests parse, 1 when the "
            "cluster cannot be read, 2 when a file cannot be read or parsed."
        ),
    )
    _add_node_options(plan, source_required=False)
    _add_cluster_options(
        plan,
        kubeconfig_help="plan from a live cluster (instead of --source); without --node-ip, the addresses of "
        "the Node --node-name are read from the API",
    )
    plan.add_argument("--output", choices=["json", "text"], default="json", help="json (default) or text")
    _add_one_shot_health_option(plan)
    plan.set_defaults(handler=_plan)

    sync = commands.add_parser(
        "sync",
        help="program the kernel once from the manifests, print each operation, exit",
        description=(
            "One sync of the manifests to IPVS through the daemon's code path: read the kernel's owned "
            "state, apply only the differences, finish drains that are over. Run twice with the same input, "
            "the second run performs zero operations. Exit 0 when every operation succeeded, 1 otherwise, "
            "2 when a file cannot be read or parsed."
        ),
    )
    _add_node_options(sync)
    _add_kernel_options(sync)
    _add_datapath_options(sync)
    _add_backend_option(sync, dry_run_table="an empty in-memory table")
    sync.add_argument(
        "--output", choices=["json", "text"], default="text", help="text (default) or json lines"
    )
    _add_one_shot_health_option(sync)
    sync.set_defaults(handler=_sync)

    _add_run_command(commands)

    cleanup = commands.add_parser(
        "cleanup",
        help="remove every virtual server, address and device aproxy owns, and nothing else",
    )
    _add_kernel_options(cleanup)
    cleanup.set_defaults(handler=_cleanup)
    return parser


def _add_run_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = Settings(node_name="-")
    run = commands.add_parser(
        "run",
        help="the daemon: follow the cluster and keep IPVS in step, with health and metrics endpoints",
        description=(
            "Run until SIGTERM or SIGINT (exit 0; the kernel rules stay in place). Cluster state comes from "
            "manifest files (--source, re-read when they change) or from the Kubernetes API (--kubeconfig "
            "or --master; with neither, the pod's service account, KUBECONFIG or ~/.kube/config). Nothing is "
            "applied before both Services and EndpointSlices are listed. Durations are seconds, or Go-style "
            "(500ms, 30s, 15m, 1h). Exit 1 when the daemon cannot start or one of its tasks fails, 2 on bad "
            "arguments."
        ),
    )
    _add_node_options(run, source_required=False)
    _add_cluster_options(run, kubeconfig_help="kubeconfig file (instead of --source)")
    _add_kernel_options(run)
    _add_datapath_options(run)
    _add_backend_option(run, dry_run_table="an in-memory table")
    _add_kube_proxy_options(run)
    periods = (
        ("--min-sync-period", defaults.min_sync_period, "shortest time between two syncs"),
        ("--sync-period", defaults.sync_period, "longest time without a sync; /healthz fails after twice it"),
        ("--audit-period", defaults.audit_period, "time between audits (kernel compared with applied state)"),
        ("--drain-check-period", defaults.drain_check_period, "time between checks of draining servers"),
        ("--drain-grace-period", defaults.drain_grace_period, "longest drain of a removed TCP real server"),
    )
    for flag, default, text in periods:
        run.add_argument(
            flag, type=_duration, default=default, metavar="DURATION", help=f"{text} ({default:g} s)"
        )
    for flag, address, what in (
        ("--healthz-bind-address", defaults.healthz_address, "/healthz, /livez and /readyz"),
        ("--metrics-bind-address", defaults.metrics_address, "/metrics"),
    ):
        run.add_argument(
            flag,
            type=_listen_address,
            default=address,
            metavar="HOST:PORT",
            help=f"{what} (default: {address})",
        )
    _add_health_check_options(run)
    _add_file_source_options(run)
    run.set_defaults(handler=_run)


def _add_health_check_options(run: argparse.ArgumentParser) -> None:
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
            flag, type=_duration, default=default, metavar="DURATION", help=f"{text} ({default:g} s)"
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


def _add_one_shot_health_option(parser: argparse.ArgumentParser) -> None:
    defaults = HealthCheckSettings()
    parser.add_argument(
        "--health-checks",
        action="store_true",
        help=f"check every TCP backend now (a TCP connect, up to {defaults.fall} tries of "
        f"{defaults.timeout:g} s) and give the unhealthy ones weight 0, as the daemon would",
    )


def _judged(tracker: ChangeTracker, ctx: TranslationContext, args: argparse.Namespace) -> HealthView | None:
    """With --health-checks: a view holding the verdicts of one round of checks of every target."""
    if not args.health_checks:
        return None
    settings = HealthCheckSettings()
    view = HealthView(fail_closed=settings.fail_closed)
    desired_all(tracker, ctx, view)  # indexes the targets
    for target in uvloop.run(judge_once(view.targets(settings.interval).keys(), settings)):
        view.set_unhealthy(target, True)
    return view


def _health_check_settings(args: argparse.Namespace) -> HealthCheckSettings:
    fields = ("interval", "timeout", "fall", "rise", "concurrency", "max_rate", "scope", "used_window")
    return HealthCheckSettings(
        enabled=args.health_checks,
        fail_closed=args.health_check_fail_closed,
        **{name: getattr(args, f"health_check_{name}") for name in fields},
    )


def _add_file_source_options(parser: argparse.ArgumentParser) -> None:
    defaults = FileSourceSettings()
    parser.add_argument(
        "--source-settle-period",
        type=_duration,
        default=defaults.settle_period,
        metavar="DURATION",
        help="how long manifest files must be quiet before a change is read, so that a file written in "
        f"place is not read half-written ({defaults.settle_period:g} s)",
    )


def _file_source_settings(args: argparse.Namespace) -> FileSourceSettings:
    return FileSourceSettings(settle_period=args.source_settle_period)


def _check_sources_exist(sources: Sequence[Path]) -> None:
    """A --source that does not exist is a ManifestError (exit 2), not a daemon waiting for it forever."""
    for path in sources:
        if not path.exists():
            raise ManifestError(f"--source {path}: No such file or directory")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
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


def _listen_address(text: str) -> ListenAddress:
    try:
        return ListenAddress.parse(text)
    except ListenAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_kernel_options(parser: argparse.ArgumentParser) -> None:
    defaults = IPVSSettings()
    parser.add_argument(
        "--device",
        type=_device_name,
        default=defaults.device,
        help=f"dummy device for service addresses (default: {defaults.device})",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=defaults.state_file,
        help=f"record of owned virtual servers on unbound addresses (default: {defaults.state_file})",
    )


def _settings(args: argparse.Namespace) -> IPVSSettings:
    return IPVSSettings(device=args.device, state_file=args.state_file, **_datapath_settings(args))


def _cidrs(text: str) -> tuple[str, ...]:
    """kube-proxy's --cluster-cidr: one CIDR, or a comma-separated pair for dual-stack."""
    cidrs = tuple(part.strip() for part in text.split(",") if part.strip())
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a CIDR: {cidr!r}") from None
    return cidrs


def _nodeport_addresses(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(","))
    try:
        NodePortAddresses.parse(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def _add_datapath_options(parser: argparse.ArgumentParser) -> None:
    """What surrounds IPVS on the node: source NAT, ARP, sysctls (backends/masquerade.py, sysctl.py)."""
    parser.add_argument(
        "--masquerade-all",
        action="store_true",
        help="source-NAT all traffic IPVS forwards (kube-proxy's --masquerade-all)",
    )
    parser.add_argument(
        "--cluster-cidr",
        type=_cidrs,
        default=(),
        metavar="CIDR[,CIDR]",
        help="the pod network: cluster-IP traffic from outside it is source-NATed (kube-proxy's meaning)",
    )
    parser.add_argument(
        "--nodeport-addresses",
        type=_nodeport_addresses,
        default=(),
        metavar="CIDR[,CIDR]|primary",
        help="NodePorts on the local addresses in these CIDRs, or on the node's primary IPs (default: every "
        "local address but loopback and the device's), followed as addresses come and go (run)",
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
    """The IPVSSettings fields of ``_add_datapath_options`` (their defaults for commands without them)."""
    defaults = IPVSSettings()
    return {
        "masquerade_all": getattr(args, "masquerade_all", defaults.masquerade_all),
        "cluster_cidrs": getattr(args, "cluster_cidr", defaults.cluster_cidrs),
        "strict_arp": getattr(args, "strict_arp", defaults.strict_arp),
        "manage_sysctls": getattr(args, "manage_sysctls", defaults.manage_sysctls),
        "nodeport_addresses": getattr(args, "nodeport_addresses", defaults.nodeport_addresses),
    }


def tracker_from_manifests(paths: Sequence[Path]) -> ChangeTracker:
    """A tracker holding the manifests' Services and EndpointSlices, both listed (raises ManifestError)."""
    manifests = load_manifests(paths)
    for line in manifests.ignored:
        log.warning("object ignored", extra={"reason": line})
    tracker = ChangeTracker()
    for service in manifests.services:
        tracker.upsert_service(service)
    for endpoint_slice in manifests.slices:
        tracker.upsert_slice(endpoint_slice)
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    return tracker


def _context(args: argparse.Namespace) -> TranslationContext:
    return TranslationContext(
        node_name=args.node_name,
        node_addresses=frozenset(args.node_ip),
        node_zone=args.node_zone,
        default_scheduler=args.ipvs_scheduler,
    )


async def tracker_from_cluster(args: argparse.Namespace) -> ChangeTracker:
    """One paged list of Services and EndpointSlices from the API into a tracker. Without --node-ip, the
    node's addresses (and zone) are read from its Node object into ``args``."""
    from aproxy.sources.kube.config import load_config
    from aproxy.sources.kube.node import fetch_node
    from aproxy.sources.kube.watch import snapshot

    config = (await load_config(args.kubeconfig, args.master)).configuration
    tracker = ChangeTracker()
    await snapshot(config, tracker)
    if not args.node_ip:
        node = await fetch_node(config, args.node_name)
        args.node_ip = list(node.addresses)
        args.node_zone = args.node_zone or node.zone
    return tracker


def _plan(args: argparse.Namespace) -> int:
    if args.source:
        tracker = tracker_from_manifests(args.source)
    else:
        from aproxy.sources.kube.errors import KubernetesSourceError

        try:
            tracker = uvloop.run(tracker_from_cluster(args))
        except KubernetesSourceError as exc:
            print(f"aproxy: {exc}", file=sys.stderr)
            return EXIT_FAILED
    health = _judged(tracker, _context(args), args)
    states = desired_all(tracker, _context(args), health)
    log_skips(tracker.new_skips())
    if health is not None:
        log_fail_open(health)
    _warn_node_ports_unplanned(tracker, args)
    view = render.node_view(states.values())
    for conflict in view.conflicts:
        log.warning(
            "virtual server claimed twice",
            extra={
                "virtual_server": str(conflict.key),
                "kept_by": conflict.owner,
                "skipped": str(conflict.loser),
            },
        )
    if args.output == "json":
        sys.stdout.buffer.write(orjson.dumps(render.to_json(view), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(render.to_text(view))
    return EXIT_OK


def _warn_node_ports_unplanned(tracker: ChangeTracker, args: argparse.Namespace) -> None:
    """Without a node address a NodePort has nowhere to listen: say so once, not silently plan without it."""
    if args.node_ip:
        return
    services = [key for key in tracker.services() if (info := tracker.inputs(key)[0]) and info.node_ports]
    if services:
        log.warning(
            "NodePort virtual servers are not planned: no --node-ip given",
            extra={"services": len(services), "example": min(map(str, services))},
        )


def _sync(args: argparse.Namespace) -> int:
    tracker = tracker_from_manifests(args.source)
    ctx = _context(args)
    health = _judged(tracker, ctx, args)

    async def run() -> list[SyncReport]:
        backend: AbstractAsyncContextManager[Backend] = (
            IPVSBackend(_settings(args)) if args.backend == "ipvs" else nullcontext(MemoryBackend())
        )
        async with backend as opened:
            syncer = Syncer(tracker, ctx, opened, health=health)
            return [await syncer.start(), await syncer.drain()]

    reports = uvloop.run(run())
    # The real servers the health checks drained (a removed endpoint's drain is weight 0 too, and unmarked).
    drained = (
        {
            (virtual.key, real.key)
            for state in desired_all(tracker, ctx, health).values()
            for virtual in state.virtual_servers
            for real in virtual.real_servers
            if real.weight == 0
        }
        if health is not None
        else set()
    )
    results = [result for report in reports for result in report.results]
    failed = sum(not result.ok for result in results)
    services = reports[0].services
    if args.output == "json":
        for result in results:
            record: dict[str, object] = {**operation_to_dict(result.operation), "ok": result.ok}
            if not result.ok:
                record["error"] = result.error
            sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
        summary = {"services": services, "operations": len(results), "failed": failed}
        sys.stdout.buffer.write(orjson.dumps({"summary": summary}) + b"\n")
    else:
        for result in results:
            fields = " ".join(
                f"{key}={value}" for key, value in operation_to_dict(result.operation).items() if key != "op"
            )
            status = "" if result.ok else f"  FAILED: {result.error}"
            if _health_drained(result.operation, drained):
                status += "  # unhealthy: drained"
            sys.stdout.write(f"{result.operation.name} {fields}{status}\n")
        sys.stdout.write(f"synced {services} services: {len(results)} operations, {failed} failed\n")
    return EXIT_OK if failed == 0 else EXIT_FAILED


def _health_drained(operation: Operation, drained: set[tuple[VirtualServerKey, RealServerKey]]) -> bool:
    return isinstance(operation, UpdateRealServer | AddRealServer) and (
        (operation.virtual, operation.real.key) in drained
    )


def _run(args: argparse.Namespace) -> int:
    if args.cleanup:
        return _cleanup(args)
    floors = period_floor_problems(
        {"audit_period": args.audit_period, "drain_check_period": args.drain_check_period}
    )
    if floors:
        print(f"aproxy run: {'; '.join(floors)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = Settings(
            node_name=args.node_name,
            sources=tuple(args.source),
            kubeconfig=args.kubeconfig,
            master=args.master,
            node_ips=tuple(args.node_ip),
            node_zone=args.node_zone,
            default_scheduler=args.ipvs_scheduler,
            min_sync_period=args.min_sync_period,
            sync_period=args.sync_period,
            audit_period=args.audit_period,
            drain_check_period=args.drain_check_period,
            drain_grace_period=args.drain_grace_period,
            backend=args.backend,
            ipvs=_kube_proxy_ipvs_settings(args, _settings(args)),
            healthz_address=args.healthz_bind_address,
            metrics_address=args.metrics_bind_address,
            health_checks=_health_check_settings(args),
            file_source=_file_source_settings(args),
        )
    except SettingsError as exc:
        print(f"aproxy run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _check_sources_exist(settings.sources)
    return app.main(settings)


def _cleanup(args: argparse.Namespace) -> int:
    async def run() -> int:
        backend = IPVSBackend(_settings(args))
        await backend.open(prepare=False)  # cleanup creates nothing and writes no sysctl on its way
        try:
            return await backend.cleanup()
        finally:
            await backend.close()

    removed = uvloop.run(run())
    sys.stdout.write(f"removed {removed} virtual servers and the device {args.device}\n")
    return EXIT_OK


_NEGATIVE_VALUE = re.compile(r"-[\d.]")


def _negative_values_attached(argv: Sequence[str]) -> list[str]:
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = _negative_values_attached(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config_warnings = _apply_config_files(args, argv)
    except (ConfigFileError, ManifestError) as exc:
        print(f"aproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_level, args.log_format)
    for warning in config_warnings:
        log.warning(warning)
    try:
        return int(args.handler(args))
    except ManifestError as exc:
        print(f"aproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except IPVSUnavailable as exc:
        print(f"aproxy: {exc}", file=sys.stderr)
        return EXIT_FAILED


# --- kube-proxy's interface: --config, its flag spellings --------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("aproxy")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _add_kube_proxy_options(run: argparse.ArgumentParser) -> None:
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
            type=_duration,
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
            type=_duration,
            default=0.0,
            metavar="DURATION",
            help=f"IPVS's timeout for {what}, set at start like `ipvsadm --set` (0, the default: unchanged)",
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


def _explicit_dests(argv: Sequence[str]) -> set[str]:
    """The options given on the command line (their dests): the parser again, every default suppressed."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return set(vars(parser.parse_args(argv)))


def _apply_config_files(args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """Precedence flag > file > default: the files' values replace the options not given. Returns the
    files' warnings (logged once logging is configured). Raises ConfigFileError, ManifestError."""
    warnings: list[str] = []
    explicit = _explicit_dests(argv)
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


def _kube_proxy_ipvs_settings(args: argparse.Namespace, ipvs: IPVSSettings) -> IPVSSettings:
    """The backend settings only the config file (or kube-proxy's flags) set."""
    try:
        timeouts = IPVSTimeouts(args.ipvs_tcp_timeout, args.ipvs_tcpfin_timeout, args.ipvs_udp_timeout)
    except ValueError as exc:
        raise SettingsError(f"--ipvs-*-timeout: {exc}") from None
    changes: dict[str, object] = {"timeouts": timeouts}
    # masqueradeAll, clusterCIDR, strictARP and nodePortAddresses set the flags' own options: _settings.
    return dataclasses.replace(ipvs, **changes)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
