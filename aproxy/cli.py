"""aproxy's command line: argument parsing and exit codes; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from aproxy import logs, render
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import DEFAULT_SCHEDULER, SCHEDULERS, IPAddress, ServiceState
from aproxy.core.objects import Skip
from aproxy.core.translate import TranslationContext
from aproxy.sources.manifest import ManifestError, load_manifests

log = logging.getLogger("aproxy")

EXIT_OK = 0
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


def _add_node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        action="append",
        type=Path,
        required=True,
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
        description="Print the desired IPVS state for the manifests given. Skipped objects are reported on "
        "stderr. Exit status 0 when the manifests parse, 2 when a file cannot be read or parsed.",
    )
    _add_node_options(plan)
    plan.add_argument("--output", choices=["json", "text"], default="json", help="json (default) or text")
    plan.set_defaults(handler=_plan)
    return parser


def desired_states(args: argparse.Namespace) -> tuple[list[ServiceState], list[Skip]]:
    """Read the manifests and translate every service: what ``plan`` prints and ``sync`` programs."""
    manifests = load_manifests(args.source)
    tracker = ChangeTracker()
    for service in manifests.services:
        tracker.upsert_service(service)
    for endpoint_slice in manifests.slices:
        tracker.upsert_slice(endpoint_slice)
    ctx = TranslationContext(
        node_name=args.node_name,
        node_addresses=frozenset(args.node_ip),
        node_zone=args.node_zone,
        default_scheduler=args.ipvs_scheduler,
    )
    states = []
    for key in sorted(tracker.services(), key=lambda k: (k.namespace, k.name)):
        state, _already_reported = tracker.desired(key, ctx)
        if state is not None:
            states.append(state)
    return states, tracker.new_skips()


def report_skips(skips: Sequence[Skip]) -> None:
    for skip in skips:
        log.warning(
            "skipped" if skip.severity.value == "error" else "ignored part",
            extra={
                "kind": skip.kind,
                "object": f"{skip.namespace}/{skip.name}",
                "reason": skip.reason,
            },
        )


def _plan(args: argparse.Namespace) -> int:
    states, skips = desired_states(args)
    report_skips(skips)
    view = render.node_view(states)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.handler(args))
    except ManifestError as exc:
        print(f"aproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
