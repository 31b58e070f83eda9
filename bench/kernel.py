"""Benchmark of aproxy on a real IPVS (not a test), in the user-mode Linux guest of the kernel test tier.

    .venv/bin/python bench/kernel.py

On the host this boots the guest once with tests/kernel/run.py's machinery. The guest's init runs pytest
and nothing else, so the measurement travels as this very file with ``guest_main`` as its only item
(``-o python_functions=guest_main``); it writes its figures to the run folder and the host prints them.
In one guest boot:

1. 1,000 services x 10 endpoints (11,000 IPVS operations, planned by the Planner from empty) written once
   with ``ipvsadm -R`` (the restore text made from the same planned operations) and three times with
   ``IPVSBackend.apply`` (masquerade off: IPVS alone, like ipvsadm), then once more with the hairpin set
   kept as the daemon does (masquerade on). Both writers must leave the same table (checked with
   ``ipvsadm -Ln``). ``ip_vs`` is reloaded before each timed write: the kernel keeps deleted real servers on a
   trash list for minutes, and every add scans it.
2. One endpoint change (``Syncer.sync`` after a tracker update) at 100 and at 1,000 services: operations,
   IPVS requests and time (median of 20 changes: add an endpoint, remove it, return it, ...).
3. A full audit (``Syncer.audit``: kernel dump + comparison) at 1,000 services, and the dump alone.
4. A state mismatch: a real server deleted behind aproxy's back (``ipvsadm -d``), then removed from its
   slice. The sync that meets ENOENT re-reads that one virtual server (``Backend.read``), the next sync
   converges: their time and IPVS read requests, against the full dump of figure 3.

``.venv/bin/python bench/kernel.py datapath`` measures the machinery around IPVS instead (its own guest
boot, ``guest_datapath``): services that are LoadBalancers with an external IP and a NodePort, half of them
``externalTrafficPolicy: Local`` with a health-check port, a quarter with ``loadBalancerSourceRanges``,
masquerade, source ranges and the service-IP filter on:

5. one endpoint change at 1,000 such services: operations, IPVS requests, ipset netlink batches and members,
   processes started (none), time (median of 20); and one service change (its node port moved);
6. the iptables rule count (both families, every table) and the set member count at 100 and at 10,000 of
   them: the rules stay a constant, only the sets grow.

Every syscall costs about 1 ms in the guest: these are user-mode Linux figures, good for ratios between
writers in the same boot, not as absolute performance.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.backends.masquerade import Masquerade
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    L4Protocol,
    Operation,
    RealServerKey,
    UnbindAddress,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.plan import Planner
from aproxy.core.state import IPVSState
from aproxy.core.translate import TranslationContext
from aproxy.syncer import Syncer, desired_all
from tests.core import k8s
from tests.kernel import netlab
from tests.kernel import run as guest

FIGURES_FILE = "kernel-bench.json"
COMMAND = ".venv/bin/python bench/kernel.py"
GUEST_PYTEST_ARGS = ("-o", "python_functions=guest_main", str(Path(__file__).resolve()))
DATAPATH_FILE = "kernel-datapath-bench.json"
DATAPATH_PYTEST_ARGS = ("-o", "python_functions=guest_datapath", str(Path(__file__).resolve()))
DATAPATH_SIZES = (100, 10_000)

SERVICES = 1000
ENDPOINTS = 10
SMALL_CLUSTER = 100
# Best of several runs: the guest is one process on a shared host, and a burst of 0.1 s is easily disturbed.
IPVSADM_RUNS = 2
APROXY_RUNS = 5
CHANGES = 20
# (services, masquerade) of the endpoint-change and audit runs: IPVS alone at both sizes, then as the daemon
# runs by default (the hairpin set follows every real server added or removed).
CHANGE_RUNS = ((SMALL_CLUSTER, False), (SERVICES, False), (SERVICES, True))
# Service i: cluster IP 10.100.0.0 + i; its endpoints from 10.150.0.0 + 32 i on (room for the changes).
FIRST_CLUSTER_IP = IPv4Address("10.100.0.0")
FIRST_ENDPOINT = IPv4Address("10.150.0.0")
ENDPOINT_BLOCK = 32
SERVICE_PORT = 80
TARGET_PORT = 8080
NODE_IP = IPv4Address("192.0.2.10")
GOAL, AIM = 10, 50
CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({NODE_IP}))


# --- figures (written by the guest, printed by the host) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteFigure:
    operations: int
    seconds: float
    batches: int = 0

    @property
    def rate(self) -> float:
        return self.operations / self.seconds


@dataclass(frozen=True, slots=True)
class ChangeFigure:
    services: int
    masquerade: bool
    operations: int  # per change (every change of the series is asserted to cost the same)
    messages: int
    median_seconds: float
    start_seconds: float


@dataclass(frozen=True, slots=True)
class AuditFigure:
    services: int
    masquerade: bool
    seconds: float
    dump_seconds: float
    repairs: int


@dataclass(frozen=True, slots=True)
class ReconcileFigure:
    services: int
    masquerade: bool
    seconds: float  # the sync that met the mismatch, its read included
    retry_seconds: float  # the next sync, which converges
    gets: int  # IPVS requests for one virtual server
    dumps: int  # IPVS dump requests (service dump, or real servers of one virtual server)


@dataclass(frozen=True, slots=True)
class Figures:
    kernel: str
    ipvsadm: list[WriteFigure]  # one per run
    aproxy: list[WriteFigure]  # masquerade off, one per run
    aproxy_masquerade: WriteFigure
    changes: list[ChangeFigure]
    audits: list[AuditFigure]
    reconciles: list[ReconcileFigure]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figures:
        return cls(
            kernel=data["kernel"],
            ipvsadm=[WriteFigure(**run) for run in data["ipvsadm"]],
            aproxy=[WriteFigure(**run) for run in data["aproxy"]],
            aproxy_masquerade=WriteFigure(**data["aproxy_masquerade"]),
            changes=[ChangeFigure(**change) for change in data["changes"]],
            audits=[AuditFigure(**audit) for audit in data["audits"]],
            reconciles=[ReconcileFigure(**reconcile) for reconcile in data["reconciles"]],
        )

    @property
    def ipvsadm_best(self) -> WriteFigure:
        return min(self.ipvsadm, key=lambda figure: figure.seconds)

    @property
    def aproxy_best(self) -> WriteFigure:
        return min(self.aproxy, key=lambda figure: figure.seconds)

    @property
    def aproxy_median(self) -> WriteFigure:
        return sorted(self.aproxy, key=lambda figure: figure.seconds)[len(self.aproxy) // 2]


def _masquerade(on: bool) -> str:
    return "masquerade on" if on else "masquerade off"


def render(figures: Figures) -> str:
    ipvsadm, aproxy, masq = figures.ipvsadm_best, figures.aproxy_best, figures.aproxy_masquerade
    median = figures.aproxy_median
    rows = [
        (
            f"program {SERVICES:,} services x {ENDPOINTS} endpoints ({ipvsadm.operations:,} IPVS operations) "
            f"with `ipvsadm -R` (best of {len(figures.ipvsadm)})",
            f"{ipvsadm.seconds:.2f} s = {ipvsadm.rate:,.0f} ops/s",
        ),
        (
            f"the same with aproxy (`IPVSBackend.apply`, masquerade off, best of {len(figures.aproxy)})",
            f"{aproxy.seconds:.3f} s = {aproxy.rate:,.0f} ops/s, {aproxy.batches} batches "
            f"(median {median.rate:,.0f} ops/s)",
        ),
        (
            "aproxy / `ipvsadm -R`",
            f"{aproxy.rate / ipvsadm.rate:.0f}x, median {median.rate / ipvsadm.rate:.0f}x "
            f"(goal >= {GOAL}x, aim {AIM}x)",
        ),
        (
            "the same with aproxy, masquerade on (the hairpin ipset follows every batch)",
            f"{masq.seconds:.3f} s = {masq.rate:,.0f} ops/s = {masq.rate / ipvsadm.rate:.1f}x `ipvsadm -R`",
        ),
        *(
            (
                f"one endpoint change at {change.services:,} services (`Syncer.sync`, "
                f"{_masquerade(change.masquerade)})",
                f"{change.operations} operation, {change.messages} netlink request, "
                f"{change.median_seconds * 1000:.1f} ms (median of {CHANGES})",
            )
            for change in figures.changes
        ),
        *(
            (
                f"`Syncer.start` from empty at {change.services:,} services "
                f"({_masquerade(change.masquerade)})",
                f"{change.start_seconds:.2f} s",
            )
            for change in figures.changes
        ),
        *(
            (
                f"full audit at {audit.services:,} services (`Syncer.audit`, "
                f"{_masquerade(audit.masquerade)})",
                f"{audit.seconds:.2f} s, {audit.repairs} repairs; "
                f"`IPVSBackend.dump` alone {audit.dump_seconds:.2f} s",
            )
            for audit in figures.audits
        ),
        *(
            (
                f"a real server deleted behind aproxy's back at {reconcile.services:,} services "
                f"({_masquerade(reconcile.masquerade)}): the sync meeting ENOENT + the converging one",
                f"{reconcile.seconds * 1000:.1f} ms + {reconcile.retry_seconds * 1000:.1f} ms; the re-read: "
                f"{reconcile.gets} get + {reconcile.dumps} real-server dump (a full dump: "
                f"{audit.dump_seconds:.2f} s)",
            )
            for reconcile, audit in zip(figures.reconciles, figures.audits, strict=True)
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"aproxy kernel benchmark: user-mode Linux {figures.kernel} guest figures (syscalls and process "
        "starts are slow there: compare within this table, not with real hardware)",
        f"reproduce: {COMMAND}",
        "",
        f"| {'figure'.ljust(width)} | value |",
        f"|{'-' * (width + 2)}|-------|",
        *(f"| {name.ljust(width)} | {value} |" for name, value in rows),
    ]
    return "\n".join(lines)


# --- the host side ------------------------------------------------------------------------------------------


def main() -> int:
    datapath = sys.argv[1:] == ["datapath"]
    settings = guest.Settings.from_environment()
    reason = guest.unavailable_reason(settings)
    if reason is not None:
        print(f"kernel benchmark cannot run here: {reason}", file=sys.stderr)
        return guest.EXIT_UNAVAILABLE
    try:
        run = guest.run_guest(DATAPATH_PYTEST_ARGS if datapath else GUEST_PYTEST_ARGS, settings)
    except guest.GuestError as exc:
        print(f"kernel benchmark: {exc}", file=sys.stderr)
        return guest.EXIT_NO_RESULT
    figures = run.run_dir / (DATAPATH_FILE if datapath else FIGURES_FILE)
    if run.exit_code != 0 or not figures.exists():
        why = run.error or f"guest pytest exit code {run.exit_code}"
        print(f"kernel benchmark failed in the guest: {why}\n{run.log_tail()}", file=sys.stderr)
        return guest.EXIT_NO_RESULT
    data = json.loads(figures.read_text())
    print(render_datapath(data) if datapath else render(Figures.from_json(data)))
    return 0


# --- the guest side -----------------------------------------------------------------------------------------


class NotInGuest(RuntimeError):
    """The measurement reloads kernel modules and flushes IPVS: it runs only inside the kernel-test guest."""


def guest_main() -> None:
    """The measurement (pytest's only item in the guest): writes the figures into the run folder."""
    if not netlab.in_guest():
        raise NotInGuest(f"run it from the host: {COMMAND}")
    figures = asyncio.run(measure())
    run_dir = Path(os.environ["APROXY_GUEST_RUN_DIR"])
    (run_dir / FIGURES_FILE).write_text(json.dumps(asdict(figures)))


async def measure() -> Figures:
    tracker = cluster(SERVICES)
    plan = Planner().plan_full(desired_all(tracker, CTX))
    ipvsadm = [write_with_ipvsadm(plan.operations) for _ in range(IPVSADM_RUNS)]
    aproxy = [await write_with_aproxy(plan.operations, masquerade=False) for _ in range(APROXY_RUNS)]
    aproxy_masquerade = await write_with_aproxy(plan.operations, masquerade=True)
    measured = [await changes_and_audit(size, masquerade) for size, masquerade in CHANGE_RUNS]
    changes = [change for change, _, _ in measured]
    audits = [audit for _, audit, _ in measured]
    reconciles = [reconcile for _, _, reconcile in measured]
    return Figures(os.uname().release, ipvsadm, aproxy, aproxy_masquerade, changes, audits, reconciles)


# --- the cluster --------------------------------------------------------------------------------------------


def slice_object(index: int, endpoints: int) -> k8s.Obj:
    first = FIRST_ENDPOINT + index * ENDPOINT_BLOCK
    addresses = [k8s.endpoint(str(first + number), node="node-a") for number in range(endpoints)]
    return k8s.endpoint_slice(f"svc-{index}", endpoints=addresses)


def cluster(size: int) -> ChangeTracker:
    tracker = ChangeTracker()
    for index in range(size):
        port = k8s.port("http", SERVICE_PORT, target_port=TARGET_PORT)
        service = k8s.service(f"svc-{index}", cluster_ips=str(FIRST_CLUSTER_IP + index), ports=[port])
        tracker.upsert_service(service)
        tracker.upsert_slice(slice_object(index, ENDPOINTS))
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    return tracker


# --- (1) writing the whole table ----------------------------------------------------------------------------


def reload_ipvs() -> None:
    """A fresh ip_vs module: no trash list of deleted real servers for the next writer's adds to scan."""

    netlab.ipvsadm("-C")
    users = ipvs_module_users()
    netlab.run("modprobe", "-r", *users, "ip_vs")
    netlab.run("modprobe", "-a", "ip_vs", *users)


def ipvs_module_users() -> list[str]:
    """The modules that use ip_vs (schedulers, xt_ipvs), from /proc/modules' "used by" column."""
    for line in Path("/proc/modules").read_text().splitlines():
        name, _size, _count, users, *_ = line.split()
        if name == "ip_vs":
            return [user for user in users.split(",") if user and user != "-"]
    return []


def ipvs_operations(operations: Iterable[Operation]) -> list[Operation]:
    return [op for op in operations if not isinstance(op, BindAddress | UnbindAddress)]


def restore_text(operations: Iterable[Operation]) -> str:
    """``ipvsadm -R`` input for the planned adds (NAT forwarding, as aproxy programs them)."""
    flags = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}
    lines = []
    for op in ipvs_operations(operations):
        match op:
            case AddVirtualServer(key=key, spec=spec):
                target = f"{flags[key.protocol.value]} {netlab.endpoint_text(key.address, key.port)}"
                persistent = f" -p {spec.persistence_timeout}" if spec.persistence_timeout else ""
                lines.append(f"-A {target} -s {spec.scheduler}{persistent}")
            case AddRealServer(virtual=key, real=real):
                target = f"{flags[key.protocol.value]} {netlab.endpoint_text(key.address, key.port)}"
                real_text = netlab.endpoint_text(real.address, real.port)
                lines.append(f"-a {target} -r {real_text} -m -w {real.weight}")
            case _:
                raise ValueError(f"not an add: {op}")
    return "".join(f"{line}\n" for line in lines)


Table = dict[VirtualServerKey, tuple[VirtualServerSpec | None, dict[RealServerKey, int]]]


def expected_table(operations: Iterable[Operation]) -> Table:
    state = IPVSState()
    for op in ipvs_operations(operations):
        state.apply(op)
    return {key: (state.spec(key), dict(state.real_servers(key))) for key in state.virtual_keys()}


def kernel_table() -> Table:
    return {entry.key: (entry.spec, entry.weights) for entry in netlab.read_ipvs().virtual_servers}


class WrongTable(AssertionError):
    """A writer did not leave the planned table in the kernel: its figure would mean nothing."""


def check_table(writer: str, operations: Sequence[Operation]) -> None:
    if kernel_table() != expected_table(operations):
        raise WrongTable(f"{writer} did not program the planned table")


def write_with_ipvsadm(operations: Sequence[Operation]) -> WriteFigure:
    text = restore_text(operations)
    reload_ipvs()
    started = time.perf_counter()
    subprocess.run(["ipvsadm", "-R"], input=text, text=True, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    check_table("ipvsadm -R", operations)
    return WriteFigure(len(ipvs_operations(operations)), seconds)


async def write_with_aproxy(operations: Sequence[Operation], *, masquerade: bool) -> WriteFigure:
    reload_ipvs()
    ipvs_ops = ipvs_operations(operations)
    with tempfile.TemporaryDirectory() as scratch:
        settings = IPVSSettings(state_file=Path(scratch) / "owned.json", masquerade=masquerade)
        async with IPVSBackend(settings) as backend:
            # The addresses first, untimed: ipvsadm -R binds none, and the plan binds before it adds.
            await backend.apply([op for op in operations if isinstance(op, BindAddress)])
            batches = backend_batches(backend)
            started = time.perf_counter()
            results = await backend.apply(ipvs_ops)
            seconds = time.perf_counter() - started
            batches = backend_batches(backend) - batches
            if not all(result.ok for result in results):
                raise WrongTable(f"aproxy: {sum(not result.ok for result in results)} operations refused")
            check_table("aproxy", operations)
            # Leaves nothing that pins the module (its iptables rules use xt_ipvs) for the next reload.
            await backend.cleanup()
    return WriteFigure(len(ipvs_ops), seconds, batches)


def backend_batches(backend: IPVSBackend) -> int:
    return backend.netlink_batches_sent  # how many sendmsg calls the writes took


# --- (2) one endpoint change, (3) the audit, (4) a state mismatch -------------------------------------------


async def changes_and_audit(size: int, masquerade: bool) -> tuple[ChangeFigure, AuditFigure, ReconcileFigure]:
    reload_ipvs()
    tracker = cluster(size)
    with tempfile.TemporaryDirectory() as scratch:
        settings = IPVSSettings(state_file=Path(scratch) / "owned.json", masquerade=masquerade)
        async with IPVSBackend(settings) as backend:
            syncer = Syncer(tracker, CTX, backend)
            started = time.perf_counter()
            report = await syncer.start()
            start_seconds = time.perf_counter() - started
            if not report.ok:
                raise WrongTable(f"start at {size} services: {len(report.failures)} operations refused")
            changes = await _change_series(tracker, syncer, backend, start_seconds)
            audit = await _audit(syncer, backend)
            reconcile = await _state_mismatch(tracker, syncer, backend)
            await backend.cleanup()
    return changes, audit, reconcile


async def _change_series(
    tracker: ChangeTracker, syncer: Syncer, backend: IPVSBackend, start_seconds: float
) -> ChangeFigure:
    """A new endpoint (a pod scaled up) for the middle service, CHANGES times: one operation each."""
    size = len(tracker.services())
    index = size // 2
    seconds: list[float] = []
    costs: set[tuple[int, int]] = set()
    for number in range(CHANGES):
        tracker.upsert_slice(slice_object(index, ENDPOINTS + number + 1))
        messages = backend.netlink_messages_sent
        started = time.perf_counter()
        report = await syncer.sync()
        seconds.append(time.perf_counter() - started)
        if not report.ok:
            raise WrongTable(f"endpoint change at {size} services refused: {report.failures}")
        costs.add((len(report.results), backend.netlink_messages_sent - messages))
    if len(costs) != 1:
        raise WrongTable(f"endpoint changes at {size} services cost differently: {costs}")
    ((operations, messages),) = costs
    masquerade = backend.settings.masquerade
    return ChangeFigure(size, masquerade, operations, messages, statistics.median(seconds), start_seconds)


async def _audit(syncer: Syncer, backend: IPVSBackend) -> AuditFigure:
    started = time.perf_counter()
    report = await syncer.audit()
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    await backend.dump()
    dump_seconds = time.perf_counter() - started
    size = len(list(syncer.planner.services()))
    return AuditFigure(size, backend.settings.masquerade, seconds, dump_seconds, len(report.results))


async def _state_mismatch(tracker: ChangeTracker, syncer: Syncer, backend: IPVSBackend) -> ReconcileFigure:
    """The last endpoint of a service untouched so far, deleted with ipvsadm, then from its slice."""
    size = len(tracker.services())
    index = size // 3
    virtual = f"{FIRST_CLUSTER_IP + index}:{SERVICE_PORT}"
    victim = FIRST_ENDPOINT + index * ENDPOINT_BLOCK + ENDPOINTS - 1
    netlab.ipvsadm("-d", "-t", virtual, "-r", f"{victim}:{TARGET_PORT}")
    tracker.upsert_slice(slice_object(index, ENDPOINTS - 1))
    gets, dumps = backend.netlink_gets_sent, backend.netlink_dumps_sent
    started = time.perf_counter()
    mismatched = await syncer.sync()
    seconds = time.perf_counter() - started
    if [result.errno for result in mismatched.failures] != [errno.ENOENT]:
        raise WrongTable(f"expected one ENOENT at {size} services, got {mismatched.failures}")
    read = (backend.netlink_gets_sent - gets, backend.netlink_dumps_sent - dumps)
    started = time.perf_counter()
    retried = await syncer.sync()
    retry_seconds = time.perf_counter() - started
    if not retried.ok:
        raise WrongTable(f"the sync after the mismatch at {size} services failed: {retried.failures}")
    key = VirtualServerKey(L4Protocol.TCP, FIRST_CLUSTER_IP + index, SERVICE_PORT)
    _spec, weights = kernel_table()[key]
    if RealServerKey(victim, TARGET_PORT) in weights or len(weights) != ENDPOINTS - 1:
        raise WrongTable(f"after the mismatch at {size} services the kernel holds {weights}")
    return ReconcileFigure(size, backend.settings.masquerade, seconds, retry_seconds, *read)


# --- (5, 6) the machinery around IPVS -----------------------------------------------------------------------

FIRST_EXTERNAL_IP = IPv4Address("10.120.0.0")
FIRST_LB_IP = IPv4Address("10.140.0.0")
FIRST_NODE_PORT = 30000
FIRST_HEALTH_PORT = 20000


def datapath_service(index: int) -> k8s.Obj:
    """LoadBalancer ``svc-i`` with an external IP and a node port; odd ones Local with a health-check port,
    every fourth with source ranges."""
    node_port = FIRST_NODE_PORT + index % 30_000
    extra: dict[str, Any] = {}
    if index % 2:
        extra["healthCheckNodePort"] = FIRST_HEALTH_PORT + index % 10_000
    if index % 4 == 0:
        extra["loadBalancerSourceRanges"] = ["192.0.2.0/24", "198.51.100.0/24"]
    return k8s.service(
        f"svc-{index}",
        type_="LoadBalancer",
        cluster_ips=str(FIRST_CLUSTER_IP + index),
        ports=[k8s.port("http", SERVICE_PORT, target_port=TARGET_PORT, node_port=node_port)],
        external_ips=[str(FIRST_EXTERNAL_IP + index)],
        lb_ips=[str(FIRST_LB_IP + index)],
        external_policy="Local" if index % 2 else "Cluster",
        spec_extra=extra,
    )


def datapath_cluster(size: int, endpoints: int) -> ChangeTracker:
    tracker = ChangeTracker()
    for index in range(size):
        tracker.upsert_service(datapath_service(index))
        tracker.upsert_slice(slice_object(index, endpoints))
    tracker.mark_listed("services")
    tracker.mark_listed("endpointslices")
    return tracker


def iptables_rules() -> int:
    """Rules (``-A`` lines) of every table of both families: aproxy's and the jumps into its chains."""
    saved = netlab.run("iptables-save") + netlab.run("ip6tables-save")
    return sum(1 for line in saved.splitlines() if line.startswith("-A ") and "APROXY" in line)


def set_members() -> int:
    return sum(1 for line in netlab.run("ipset", "save").splitlines() if line.startswith("add APROXY"))


def guest_datapath() -> None:
    """The data-path measurement (pytest's only item in the guest with ``datapath``)."""
    if not netlab.in_guest():
        raise NotInGuest(f"run it from the host: {COMMAND} datapath")
    figures = asyncio.run(measure_datapath())
    run_dir = Path(os.environ["APROXY_GUEST_RUN_DIR"])
    (run_dir / DATAPATH_FILE).write_text(json.dumps(figures))


async def measure_datapath() -> dict[str, Any]:
    figures: dict[str, Any] = {"kernel": os.uname().release, "rules": {}}
    for size in DATAPATH_SIZES:
        reload_ipvs()
        with tempfile.TemporaryDirectory() as scratch:
            async with IPVSBackend(IPVSSettings(state_file=Path(scratch) / "owned.json")) as backend:
                syncer = Syncer(datapath_cluster(size, 1), CTX, backend)
                started = time.perf_counter()
                if not (await syncer.start()).ok:
                    raise WrongTable(f"start at {size} services refused operations")
                figures["rules"][size] = {
                    "rules": iptables_rules(),
                    "members": set_members(),
                    "start_seconds": time.perf_counter() - started,
                }
                await backend.cleanup()
    reload_ipvs()
    with tempfile.TemporaryDirectory() as scratch:
        async with IPVSBackend(IPVSSettings(state_file=Path(scratch) / "owned.json")) as backend:
            tracker = datapath_cluster(SERVICES, ENDPOINTS)
            syncer = Syncer(tracker, CTX, backend)
            await syncer.start()
            figures["change"] = await _datapath_change(tracker, syncer, backend)
            await backend.cleanup()
    return figures


def _datapath_counters(backend: IPVSBackend, masquerade: Masquerade) -> tuple[int, int, int, int]:
    """IPVS requests, ipset batches, set members written, processes started: so far."""
    return (
        backend.netlink_messages_sent,
        masquerade.set_writes,
        masquerade.entries_written,
        masquerade.commands_run,
    )


async def _datapath_change(tracker: ChangeTracker, syncer: Syncer, backend: IPVSBackend) -> dict[str, Any]:
    """An endpoint added to a Local service (its 3 external virtual servers and cluster IP each gain a real
    server), CHANGES times; then one service's node port moved."""
    masquerade = backend.masquerade
    assert masquerade is not None
    index = SERVICES // 2 + 1
    seconds: list[float] = []
    costs = set()
    for number in range(CHANGES):
        tracker.upsert_slice(slice_object(index, ENDPOINTS + number + 1))
        before = _datapath_counters(backend, masquerade)
        started = time.perf_counter()
        report = await syncer.sync()
        seconds.append(time.perf_counter() - started)
        if not report.ok:
            raise WrongTable(f"endpoint change refused: {report.failures}")
        after = _datapath_counters(backend, masquerade)
        costs.add((len(report.results), *(b - a for a, b in zip(before, after, strict=True))))
    if len(costs) != 1:
        raise WrongTable(f"endpoint changes cost differently: {costs}")
    ((operations, messages, set_batches, members, processes),) = costs
    moved = dict(datapath_service(index))
    moved["spec"] = {
        **moved["spec"],
        "ports": [k8s.port("http", SERVICE_PORT, target_port=TARGET_PORT, node_port=32767)],
    }
    tracker.upsert_service(moved)
    entries, commands = masquerade.entries_written, masquerade.commands_run
    started = time.perf_counter()
    report = await syncer.sync()
    service_seconds = time.perf_counter() - started
    return {
        "operations": operations,
        "messages": messages,
        "set_batches": set_batches,
        "members": members,
        "commands": processes,
        "median_seconds": statistics.median(seconds),
        "service_operations": len(report.results),
        "service_members": masquerade.entries_written - entries,
        "service_commands": masquerade.commands_run - commands,
        "service_seconds": service_seconds,
    }


def render_datapath(data: dict[str, Any]) -> str:
    change = data["change"]
    rules = {int(size): figure for size, figure in data["rules"].items()}
    rows = [
        (
            f"one endpoint change at {SERVICES:,} services, masquerade, ranges, filter (`Syncer.sync`)",
            f"{change['operations']} IPVS operations in {change['messages']} requests, "
            f"{change['set_batches']} ipset batch of {change['members']} members, "
            f"{change['commands']} processes, "
            f"{change['median_seconds'] * 1000:.1f} ms (median of {CHANGES})",
        ),
        (
            "one service change at the same size (its node port moved)",
            f"{change['service_operations']} IPVS operations, {change['service_members']} set members, "
            f"{change['service_commands']} processes, {change['service_seconds'] * 1000:.1f} ms",
        ),
        *(
            (
                f"iptables rules (both families, all tables) / set members at {size:,} services",
                f"{figure['rules']} rules / {figure['members']:,} members (`Syncer.start`: "
                f"{figure['start_seconds']:.2f} s)",
            )
            for size, figure in sorted(rules.items())
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        [
            f"aproxy data-path benchmark: user-mode Linux {data['kernel']} guest figures",
            f"reproduce: {COMMAND} datapath",
            "",
            f"| {'figure'.ljust(width)} | value |",
            f"|{'-' * (width + 2)}|-------|",
            *(f"| {name.ljust(width)} | {value} |" for name, value in rows),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
