"""aproxy's command line: argument parsing and exit codes; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import re
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
from aproxy.backends.memory import MemoryBackend
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import DEFAULT_SCHEDULER, SCHEDULERS, IPAddress, operation_to_dict
from aproxy.core.node_addresses import NodePortAddresses
from aproxy.core.translate import TranslationContext
from aproxy.settings import Settings, SettingsError, period_floor_problems
from aproxy.sources.manifest import ManifestError, load_manifests
from aproxy.syncer import Syncer, SyncReport, desired_all, log_skips
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
    parser.add_argument("--node-name", required=True, help="this node's name (for traffic policy Local)")
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
    run.set_defaults(handler=_run)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """Seconds: a plain number, or Go-style units as kube-proxy's flags take them ("1m30s", "500ms")."""
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
        raise argparse.ArgumentTypeError(f"invalid duration: {text!r}")
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
        "--strict-arp",
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
    states = desired_all(tracker, _context(args))
    log_skips(tracker.new_skips())
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


def _sync(args: argparse.Namespace) -> int:
    tracker = tracker_from_manifests(args.source)
    ctx = _context(args)

    async def run() -> list[SyncReport]:
        backend: AbstractAsyncContextManager[Backend] = (
            IPVSBackend(_settings(args)) if args.backend == "ipvs" else nullcontext(MemoryBackend())
        )
        async with backend as opened:
            syncer = Syncer(tracker, ctx, opened)
            return [await syncer.start(), await syncer.drain()]

    reports = uvloop.run(run())
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
            sys.stdout.write(f"{result.operation.name} {fields}{status}\n")
        sys.stdout.write(f"synced {services} services: {len(results)} operations, {failed} failed\n")
    return EXIT_OK if failed == 0 else EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
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
            ipvs=_settings(args),
            healthz_address=args.healthz_bind_address,
            metrics_address=args.metrics_bind_address,
        )
    except SettingsError as exc:
        print(f"aproxy run: {exc}", file=sys.stderr)
        return EXIT_USAGE
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.handler(args))
    except ManifestError as exc:
        print(f"aproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except IPVSUnavailable as exc:
        print(f"aproxy: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
