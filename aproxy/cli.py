"""aproxy's command line: argument parsing and exit codes; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path

import orjson
import uvloop

from aproxy import app, flags, logs, render
from aproxy.backends.base import Backend
from aproxy.backends.ipvs import IPVSBackend, IPVSUnavailable
from aproxy.backends.masquerade import MasqueradeError
from aproxy.backends.memory import MemoryBackend
from aproxy.backends.sysctl import SysctlError, apply_sysctls, wanted_sysctls
from aproxy.config_file import ConfigFileError
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import (
    AddRealServer,
    Operation,
    RealServerKey,
    UpdateRealServer,
    VirtualServerKey,
    operation_to_dict,
)
from aproxy.core.translate import TranslationContext
from aproxy.core.verdicts import HealthView
from aproxy.health.config import HealthCheckSettings
from aproxy.health.oneshot import judge_once
from aproxy.settings import Settings, SettingsError, period_floor_problems
from aproxy.sources.manifest import ManifestError, load_manifests
from aproxy.syncer import Syncer, SyncReport, desired_all, log_fail_open, log_skips

log = logging.getLogger("aproxy")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aproxy", description="An incremental Kubernetes service proxy that programs Linux IPVS."
    )
    parser.add_argument("--version", action="version", version=f"aproxy {flags.version()}")
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
    flags.add_node_options(plan, source_required=False)
    flags.add_cluster_options(
        plan,
        kubeconfig_help="plan from a live cluster (instead of --source); without --node-ip, the addresses of "
        "the Node --node-name are read from the API",
    )
    plan.add_argument("--output", choices=["json", "text"], default="json", help="json (default) or text")
    flags.add_one_shot_health_option(plan)
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
    flags.add_node_options(sync)
    flags.add_kernel_options(sync)
    flags.add_datapath_options(sync)
    flags.add_backend_option(sync, dry_run_table="an empty in-memory table")
    sync.add_argument(
        "--output", choices=["json", "text"], default="text", help="text (default) or json lines"
    )
    flags.add_one_shot_health_option(sync)
    sync.set_defaults(handler=_sync)

    _add_run_command(commands)

    prepare = commands.add_parser(
        "prepare-node",
        help="set the kernel settings IPVS needs (sysctls; loads IPVS) and exit: for a privileged init "
        "container, so that the daemon's own container needs only NET_ADMIN",
    )
    prepare.add_argument(
        "--ipvs-strict-arp",
        dest="strict_arp",
        action="store_true",
        help="also arp_ignore=1, arp_announce=2 (as the daemon's --ipvs-strict-arp)",
    )
    prepare.set_defaults(handler=_prepare_node)
    cleanup = commands.add_parser(
        "cleanup",
        help="remove every virtual server, address and device aproxy owns, and nothing else",
    )
    flags.add_kernel_options(cleanup)
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
    flags.add_node_options(run, source_required=False)
    flags.add_cluster_options(run, kubeconfig_help="kubeconfig file (instead of --source)")
    flags.add_kernel_options(run)
    flags.add_datapath_options(run)
    flags.add_backend_option(run, dry_run_table="an in-memory table")
    flags.add_kube_proxy_options(run)
    periods = (
        ("--min-sync-period", defaults.min_sync_period, "shortest time between two syncs"),
        ("--sync-period", defaults.sync_period, "longest time without a sync; /healthz fails after twice it"),
        ("--audit-period", defaults.audit_period, "time between audits (kernel compared with applied state)"),
        ("--drain-check-period", defaults.drain_check_period, "time between checks of draining servers"),
        ("--drain-grace-period", defaults.drain_grace_period, "longest drain of a removed TCP real server"),
    )
    for flag, default, text in periods:
        run.add_argument(
            flag, type=flags.duration, default=default, metavar="DURATION", help=f"{text} ({default:g} s)"
        )
    for flag, address, what in (
        ("--healthz-bind-address", defaults.healthz_address, "/healthz, /livez and /readyz"),
        ("--metrics-bind-address", defaults.metrics_address, "/metrics"),
    ):
        run.add_argument(
            flag,
            type=flags.listen_address,
            default=address,
            metavar="HOST:PORT",
            help=f"{what} (default: {address})",
        )
    flags.add_health_check_options(run)
    flags.add_file_source_options(run)
    run.set_defaults(handler=_run)


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


def _check_sources_exist(sources: Sequence[Path]) -> None:
    """A --source that does not exist is a ManifestError (exit 2), not a daemon waiting for it forever."""
    for path in sources:
        if not path.exists():
            raise ManifestError(f"--source {path}: No such file or directory")


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
            IPVSBackend(flags.ipvs_settings(args)) if args.backend == "ipvs" else nullcontext(MemoryBackend())
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
    if args.exclude_cidrs:
        log.info(
            "--ipvs-exclude-cidrs: nothing to exclude, aproxy changes only the virtual servers it owns",
            extra={"cidrs": ",".join(args.exclude_cidrs)},
        )
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
            ipvs=flags.kube_proxy_ipvs_settings(args, flags.ipvs_settings(args)),
            healthz_address=args.healthz_bind_address,
            metrics_address=args.metrics_bind_address,
            health_checks=flags.health_check_settings(args),
            file_source=flags.file_source_settings(args),
        )
    except SettingsError as exc:
        print(f"aproxy run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _check_sources_exist(settings.sources)
    return app.main(settings)


def _prepare_node(args: argparse.Namespace) -> int:
    """IPVS loaded (its sysctls exist only then: resolving its netlink family makes the kernel load it), then
    the sysctls the daemon would set; the daemon then finds them right and writes nothing."""
    from pyroute2 import IPVS  # only this command needs the synchronous API
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPVS():
            pass
    except (NetlinkError, OSError) as exc:
        raise IPVSUnavailable(f"IPVS generic netlink family not available: {exc}") from exc
    wanted = wanted_sysctls(os.uname().release, strict_arp=args.strict_arp)
    changes = uvloop.run(apply_sysctls(wanted))
    sys.stdout.write(f"{len(changes)} of {len(wanted)} sysctls changed\n")
    return EXIT_OK


def _cleanup(args: argparse.Namespace) -> int:
    async def run() -> int:
        backend = IPVSBackend(flags.ipvs_settings(args))
        await backend.open(prepare=False)  # cleanup creates nothing and writes no sysctl on its way
        try:
            return await backend.cleanup()
        finally:
            await backend.close()

    removed = uvloop.run(run())
    sys.stdout.write(f"removed {removed} virtual servers and the device {args.device}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = flags.negative_values_attached(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config_warnings = flags.apply_config_files(args, argv, build_parser)
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
    except (IPVSUnavailable, SysctlError, MasqueradeError) as exc:
        print(f"aproxy: {exc}", file=sys.stderr)  # the node cannot take aproxy's state: one line
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
