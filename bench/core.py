"""Benchmark of the pure core (not a test): translation, incremental planning and memory at cluster scale.

    .venv/bin/python bench/core.py            # 1k and 10k services x 10 endpoints
    .venv/bin/python bench/core.py --quick    # 100 and 1k, for a smoke run

Prints each figure next to its target and the ratio. Targets (issue 2): one endpoint change planned in under
200 µs at 10k services and within 2x of its time at 100 services; full translation of 10k x 10 under 1 s;
under 150 MB RSS for the 10k x 10 state (measured in a fresh process, so one run does not inflate the next).
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aproxy.core.changes import ChangeTracker
from aproxy.core.model import ServiceKey
from aproxy.core.plan import Planner
from aproxy.core.translate import TranslationContext, translate_all

CTX = TranslationContext(node_name="node-a", node_addresses=frozenset())
ENDPOINTS = 10


def service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": "bench", "resourceVersion": str(i)},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }


def endpoint_slice(i: int, version: int = 0, extra: int = 0) -> dict[str, Any]:
    base = i * (ENDPOINTS + 1)
    addresses = [
        f"10.{128 + (base + e) // 65536}.{(base + e) // 256 % 256}.{(base + e) % 256}"
        for e in range(ENDPOINTS + extra)
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-abc",
            "namespace": "bench",
            "resourceVersion": f"{i}-{version}",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True}, "nodeName": "node-b"} for a in addresses
        ],
    }


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def build(count: int) -> tuple[ChangeTracker, float, float]:
    """Intake (parse) and full translation times of a cluster of ``count`` services."""
    tracker = ChangeTracker()
    services = [service(i) for i in range(count)]
    slices = [endpoint_slice(i) for i in range(count)]
    intake = timed(
        lambda: [tracker.upsert_service(s) for s in services] + [tracker.upsert_slice(s) for s in slices]
    )
    infos = [tracker.inputs(key) for key in tracker.services()]
    translation = min(
        timed(
            lambda: translate_all(
                [info for info, _ in infos if info], [s for _, sl in infos for s in sl], CTX
            )
        )
        for _ in range(3)
    )
    return tracker, intake, translation


def programmed(tracker: ChangeTracker) -> Planner:
    """A planner whose applied state holds every service of ``tracker``, programmed from scratch."""
    states, _ = translate_all(
        [info for key in tracker.services() if (info := tracker.inputs(key)[0])],
        [s for key in tracker.services() for s in tracker.inputs(key)[1]],
        CTX,
    )
    planner = Planner()
    for op in planner.plan_full(states):
        planner.record(op)
    return planner


def one_change_costs(tracker: ChangeTracker, count: int, rounds: int = 400) -> tuple[float, float, int]:
    """Median seconds of plan() alone, and of intake + translate + plan, for one endpoint added/removed."""
    planner = programmed(tracker)
    tracker.take_dirty()
    target = ServiceKey("bench", f"svc-{count // 2}")
    plan_times, path_times, ops = [], [], 0
    for round_ in range(rounds):
        raw = endpoint_slice(
            count // 2, version=round_ + 1, extra=(round_ + 1) % 2
        )  # alternately one endpoint more, then back
        start = time.perf_counter()
        tracker.upsert_slice(raw)
        dirty = tracker.take_dirty()
        desired = {key: tracker.desired(key, CTX)[0] for key in dirty}
        planned_at = time.perf_counter()
        plan = planner.plan(desired)
        end = time.perf_counter()
        for op in plan:
            planner.record(op)
        for real in list(planner.draining()):
            for op in planner.finish_drain(*real):
                planner.record(op)
        assert dirty == {target}, dirty
        plan_times.append(end - planned_at)
        path_times.append(end - start)
        ops = max(ops, len(plan))
    return statistics.median(plan_times), statistics.median(path_times), ops


def rss_probe(count: int) -> None:
    """In a fresh process: build the state (tracker + applied planner state); print RSS now and at peak, MB.

    The peak includes the synthetic raw objects that exist only while the benchmark builds them all at once
    (a watch streams them); the resident size afterwards is what aproxy keeps for that cluster.
    """
    tracker, _, _ = build(count)
    planner = programmed(tracker)
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    current = pages * resource.getpagesize() / 2**20
    print(current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    del tracker, planner  # the measured state: alive until measured


def line(name: str, value: float, unit: str, target: float | None = None) -> None:
    verdict = ""
    if target is not None:
        status = "OK" if value < target else "MISSED"
        verdict = f"  target < {target:g} {unit}  ratio {value / target:.2f}  {status}"
    print(f"  {name:<52} {value:10.3f} {unit}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return
    sizes = [100, 1_000] if args.quick else [100, 1_000, 10_000]
    print(f"aproxy core benchmark: {ENDPOINTS} endpoints per service, Python {sys.version.split()[0]}")
    plan_us: dict[int, float] = {}
    for count in sizes:
        tracker, intake, translation = build(count)
        plan_s, path_s, ops = one_change_costs(tracker, count)
        plan_us[count] = plan_s * 1e6
        print(f"{count} services x {ENDPOINTS} endpoints:")
        line("intake (parse + index every object)", intake, "s")
        line("full translation (translate_all)", translation, "s", 1.0 if count == 10_000 else None)
        line(
            f"plan one endpoint change (plan() alone, {ops} ops)",
            plan_us[count],
            "µs",
            200 if count == 10_000 else None,
        )
        line("one endpoint change: intake + translate + plan", path_s * 1e6, "µs")
    largest = sizes[-1]
    line(f"plan time ratio {largest} / 100 services", plan_us[largest] / plan_us[100], "x", 2.0)
    probe = subprocess.run(
        [sys.executable, __file__, "--rss-probe", str(largest)], capture_output=True, text=True, check=True
    )
    current, peak = map(float, probe.stdout.split())
    target = 150 if largest == 10_000 else None
    line(f"RSS holding the {largest} x {ENDPOINTS} state (fresh process)", current, "MB", target)
    line("peak RSS while building it from raw objects", peak, "MB")


if __name__ == "__main__":
    main()
