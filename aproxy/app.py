"""aproxy's daemon (``aproxy run``): the composition root that wires a source, the change tracker, the sync
loop, the kernel backend and the health/metrics server together, on uvloop.

Tasks, all in one ``asyncio.TaskGroup`` (SIGTERM, SIGINT or ``stop`` cancels them all and ``run`` returns 0;
any task failing cancels the others and ``run`` returns 1 after logging which task failed and why):

- ``source``: the manifest files or the Kubernetes API feed the ``ChangeTracker`` through ``_Intake``, which
  wakes the kernel task and, once both kinds are listed, asks the ``SyncScheduler`` for a sync. Nothing is
  requested, so nothing is applied, before both initial lists are complete.
- ``kernel``: the one owner of kernel changes. A single loop runs, one at a time and never overlapping:
  scheduler-driven syncs (the first one is ``Syncer.start``: adopt the kernel's owned state, plan the whole
  cluster), then, between syncs, the audit every ``audit_period`` and the drain check every
  ``drain_check_period`` while anything drains. A due sync always goes first, so an audit or a drain check
  delays a sync by at most its own duration.
- ``web``: ``/healthz``, ``/livez``, ``/readyz`` and ``/metrics`` (aproxy.web.server).
- ``node`` (Kubernetes source only): watches this node's Node object; while it is being deleted, tainted
  ``ToBeDeletedByClusterAutoscaler`` or gone, ``/healthz`` answers 503 with ``nodeEligible: false``.
- ``stop``: waits for the stop event.

A failed sync is retried after tenacity's exponential backoff with jitter (``SyncRetry``: 1 s, 2 s, 4 s, ...
at most 30 s by default), fed to the scheduler as its retry interval; the backoff starts over after a
success. A pass that could not reach the kernel at all (``BackendError``, ``OSError``) makes the next sync a
full one (``start`` again), because the changes it had taken from the tracker were lost with it.

Stopping leaves the kernel rules in place: a restart must not drop traffic (and performs zero operations).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import uvloop
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from aproxy.backends.base import Backend, BackendError
from aproxy.backends.ipvs import IPVSBackend, IPVSSettings, IPVSUnavailable
from aproxy.backends.masquerade import MasqueradeError
from aproxy.backends.memory import MemoryBackend
from aproxy.core.changes import ChangeTracker
from aproxy.core.debounce import SyncScheduler
from aproxy.core.drain import DEFAULT_GRACE_PERIOD, DrainClock
from aproxy.core.model import DEFAULT_SCHEDULER, SCHEDULERS, IPAddress
from aproxy.core.translate import TranslationContext
from aproxy.metrics import DaemonMetrics, LoopStats
from aproxy.sources.base import ListedKind, Source
from aproxy.sources.file import FileSource
from aproxy.syncer import Syncer, SyncReport
from aproxy.web.healthz import decide
from aproxy.web.server import Exposition, HealthSnapshot, ListenAddress, WebServer

if TYPE_CHECKING:
    from kubernetes_asyncio.client import Configuration

    from aproxy.sources.kubernetes import NodeInfo

log = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1

BackendKind = Literal["ipvs", "dry-run"]
PassKind = Literal["sync", "audit", "drain"]

# kube-proxy's defaults: health for the node's load balancers, metrics for a local scraper.
DEFAULT_HEALTHZ_ADDRESS: Final = ListenAddress("0.0.0.0", 10256)
DEFAULT_METRICS_ADDRESS: Final = ListenAddress("127.0.0.1", 10249)

# A pass that could not be attempted at all: nothing per operation to report, retry the whole thing.
_WHOLESALE_FAILURES: Final = (BackendError, OSError)
# Until the initial sync is done, the collector's young generation is collected this rarely (the default is
# 700 allocations): the initial list builds about a million long-lived objects at 10k services, and the
# default thresholds walk them again and again as they pile up (about 30% of the time to the first desired
# state, bench/watch.py (c)). Collections still run, so a long API outage at start-up piles up no garbage.
STARTUP_GC_THRESHOLD: Final = 100_000


class StartupCollection:
    """Fewer garbage collections while the initial state is built: ``begin`` at start, ``end`` after."""

    def __init__(self) -> None:
        self._saved: tuple[int, int, int] | None = None

    def begin(self) -> None:
        if self._saved is None:
            self._saved = gc.get_threshold()
            gc.set_threshold(STARTUP_GC_THRESHOLD, *self._saved[1:])

    def end(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None


class SettingsError(ValueError):
    """Settings that cannot work together (a period out of range, two sources, ...)."""


class StartupError(RuntimeError):
    """The daemon cannot start: the backend or the source could not be opened."""


class DaemonTaskFailed(Exception):
    """One of the daemon's tasks raised; it has been logged, and the daemon stops."""


class StopRequested(Exception):
    """The stop event was set (SIGTERM, SIGINT or the caller): the normal end of the daemon."""


@dataclass(frozen=True, slots=True)
class SyncRetry:
    """Backoff before retrying a failed sync: ``initial * 2**(n-1) + uniform(0, jitter)``, at most ``cap``."""

    initial: float = 1.0
    cap: float = 30.0
    jitter: float = 1.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``aproxy run`` is told. ``sources`` (manifest files or directories) or, when empty, the
    Kubernetes API (``kubeconfig``/``master``, else in-cluster, KUBECONFIG or ~/.kube/config)."""

    node_name: str
    sources: tuple[Path, ...] = ()
    kubeconfig: Path | None = None
    master: str | None = None
    # Empty with the Kubernetes source: read from the Node object (and the zone too, if unset).
    node_ips: tuple[IPAddress, ...] = ()
    node_zone: str | None = None
    default_scheduler: str = DEFAULT_SCHEDULER
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    audit_period: float = 60.0
    drain_check_period: float = 5.0
    drain_grace_period: float = DEFAULT_GRACE_PERIOD
    # How often a kubeconfig's token is re-read (exec plugin, tokenFile: aproxy/sources/credentials.py).
    credential_renewal_period: float = 60.0
    retry: SyncRetry = field(default_factory=SyncRetry)
    backend: BackendKind = "ipvs"
    ipvs: IPVSSettings = field(default_factory=IPVSSettings)
    healthz_address: ListenAddress = DEFAULT_HEALTHZ_ADDRESS
    metrics_address: ListenAddress = DEFAULT_METRICS_ADDRESS

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise SettingsError("; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not self.node_name:
            problems.append("a node name is required")
        if self.sources and (self.kubeconfig is not None or self.master):
            problems.append("use manifest sources or the Kubernetes API (kubeconfig/master), not both")
        if self.default_scheduler not in SCHEDULERS:
            problems.append(f"unknown IPVS scheduler {self.default_scheduler!r}")
        if self.backend not in ("ipvs", "dry-run"):
            problems.append(f"unknown backend {self.backend!r}")
        if self.min_sync_period < 0:
            problems.append("the minimum sync period must be >= 0")
        if self.sync_period <= 0 or self.sync_period < self.min_sync_period:
            problems.append("the sync period must be > 0 and >= the minimum sync period")
        for name in ("audit_period", "drain_check_period", "credential_renewal_period"):
            if getattr(self, name) <= 0:
                problems.append(f"{name.replace('_', ' ')} must be > 0")
        if self.drain_grace_period < 0:
            problems.append("the drain grace period must be >= 0")
        if self.retry.initial <= 0 or self.retry.cap < self.retry.initial or self.retry.jitter < 0:
            problems.append("retry backoff: need initial > 0, cap >= initial and jitter >= 0")
        return problems


class RetryBackoff:
    """The delay before retrying a failed sync, from tenacity's ``wait_exponential_jitter``.

    The sync loop is not one function call tenacity could wrap (each retry picks up whatever changed
    meanwhile), so the loop counts consecutive failures itself and asks the wait strategy for the delay of
    that attempt.
    """

    def __init__(self, policy: SyncRetry) -> None:
        self._wait = wait_exponential_jitter(multiplier=policy.initial, max=policy.cap, jitter=policy.jitter)
        self._state = RetryCallState(Retrying(), None, (), {})
        self.failures = 0

    def failed(self) -> float:
        """One more consecutive failure: the delay before the next attempt."""
        self.failures += 1
        self._state.attempt_number = self.failures
        return float(self._wait(self._state))

    def succeeded(self) -> None:
        self.failures = 0


class _Intake:
    """The ``ObjectSink`` the source feeds: the tracker, plus a nudge to the kernel task on every change."""

    def __init__(self, tracker: ChangeTracker, changed: Callable[[], None]) -> None:
        self._tracker = tracker
        self._changed = changed

    def upsert_service(self, raw: dict[str, Any]) -> bool:
        return self._nudge(self._tracker.upsert_service(raw))

    def delete_service(self, namespace: str, name: str) -> bool:
        return self._nudge(self._tracker.delete_service(namespace, name))

    def upsert_slice(self, raw: dict[str, Any]) -> bool:
        return self._nudge(self._tracker.upsert_slice(raw))

    def delete_slice(self, namespace: str, name: str) -> bool:
        return self._nudge(self._tracker.delete_slice(namespace, name))

    def mark_listed(self, kind: ListedKind) -> None:
        was_initialized = self._tracker.initialized
        self._tracker.mark_listed(kind)
        if self._tracker.initialized and not was_initialized:
            log.info(
                "services and endpoint slices listed: syncing",
                extra={"services": self._tracker.service_count, "endpoint_slices": self._tracker.slice_count},
            )
        self._changed()

    def _nudge(self, dirty: bool) -> bool:
        if dirty:
            self._changed()
        return dirty


class Daemon:
    """One run of the daemon. ``run()`` once; the attributes are for metrics, health and tests.

    ``source`` and ``backend`` replace the ones the settings describe (tests); an injected backend is not
    opened or closed here.
    """

    def __init__(self, settings: Settings, *, source: Source | None = None, backend: Backend | None = None):
        self.settings = settings
        self.tracker = ChangeTracker()
        self.scheduler = SyncScheduler(
            min_interval=settings.min_sync_period,
            max_interval=settings.sync_period,
            retry_interval=settings.retry.initial,
        )
        self.stats = LoopStats()
        self.backoff = RetryBackoff(settings.retry)
        self.syncer: Syncer | None = None
        self.source: Source | None = source
        self.initial_sync_done = False
        self.metrics = DaemonMetrics(
            tracker=self.tracker, syncer=lambda: self.syncer, source=lambda: self.source, stats=self.stats
        )
        self.web = WebServer(
            healthz_address=settings.healthz_address,
            metrics_address=settings.metrics_address,
            health=self.health,
            metrics=lambda: Exposition(self.metrics.exposition(), self.metrics.content_type),
        )
        self._backend = backend
        self._intake = _Intake(self.tracker, self._changed)
        self._kube_config: Configuration | None = None  # with the Kubernetes source
        # The node watch (Kubernetes source only) and what it last said; manifest sources: always eligible.
        self._watch_node: Callable[[], Coroutine[Any, Any, None]] | None = None
        self.node_eligible = True
        self.node_reason = ""
        self._node_addresses: frozenset[IPAddress] | None = None  # the last seen (or programmed) ones
        self._wake = asyncio.Event()
        self._pass_done = asyncio.Event()
        self._needs_full = True  # the next sync is Syncer.start: the first one, or after a wholesale failure
        self._next_audit: float | None = None
        self._next_drain: float | None = None
        self._startup_collection = StartupCollection()

    # --- running ----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, *, handle_signals: bool = True) -> int:
        """Run until ``stop`` is set (or SIGTERM/SIGINT with ``handle_signals``): 0; a task failed: 1."""
        stop = stop if stop is not None else asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = _install_signal_handlers(loop, stop) if handle_signals else []
        self._startup_collection.begin()
        try:
            async with AsyncExitStack() as resources:
                try:
                    backend = await self._open_backend(resources)
                    self.source = await self._open_source()
                except StartupError as exc:
                    log.error("aproxy cannot start", extra={"reason": str(exc)})
                    return EXIT_FAILED
                return await self._run_tasks(self.source, backend, stop)
        finally:
            self._startup_collection.end()
            for signum in handled:
                loop.remove_signal_handler(signum)

    async def _run_tasks(self, source: Source, backend: Backend, stop: asyncio.Event) -> int:
        failed = False
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._guard("web", self.web.serve()), name="aproxy-web")
                group.create_task(self._guard("source", self._feed(source)), name="aproxy-source")
                group.create_task(self._guard("kernel", self._kernel(backend)), name="aproxy-kernel")
                group.create_task(_stop_on(stop), name="aproxy-stop")
                if self._watch_node is not None:
                    group.create_task(self._guard("node", self._watch_node()), name="aproxy-node")
        except* StopRequested:
            log.info("stopped; the kernel rules stay in place")
        except* DaemonTaskFailed:
            failed = True
        return EXIT_FAILED if failed else EXIT_OK

    async def _guard(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as exc:
            log.error(f"the {name} task failed; stopping", exc_info=True, extra={"task": name})
            raise DaemonTaskFailed(name) from exc

    async def _open_backend(self, resources: AsyncExitStack) -> Backend:
        if self._backend is not None:
            return self._backend
        if self.settings.backend == "dry-run":
            log.warning("dry run: changes go to an in-memory table, not the kernel")
            return MemoryBackend()
        try:
            return await resources.enter_async_context(IPVSBackend(self.settings.ipvs))
        except (IPVSUnavailable, MasqueradeError, OSError, ValueError) as exc:
            raise StartupError(f"cannot open the IPVS backend: {exc}") from exc

    async def _open_source(self) -> Source:
        if self.source is not None:
            return self.source
        if self.settings.sources:
            return FileSource(self.settings.sources)
        try:
            from aproxy.sources import kubernetes
        except ImportError as exc:
            raise StartupError(f"the Kubernetes source is not available: {exc}") from exc
        try:
            cluster = await kubernetes.load_config(
                self.settings.kubeconfig,
                self.settings.master,
                renewal_interval=self.settings.credential_renewal_period,
            )
        except kubernetes.KubernetesConfigError as exc:
            raise StartupError(str(exc)) from exc
        self._kube_config = cluster.configuration
        source = kubernetes.KubernetesSource(self._kube_config, renewal=cluster.renewal)
        self._watch_node = functools.partial(source.watch_node, self.settings.node_name, self._node_changed)
        return source

    async def _feed(self, source: Source) -> None:
        await source.run(self._intake)
        log.warning("the source stopped; the last state it gave stays applied")

    # --- the kernel task ---------------------------------------------------------------------------------

    async def _kernel(self, backend: Backend) -> None:
        ctx = await self._translation_context()
        syncer = Syncer(self.tracker, ctx, backend, DrainClock(self.settings.drain_grace_period))
        self.syncer = syncer
        passes: dict[PassKind, Callable[[Syncer, float], Awaitable[None]]] = {
            "sync": self._sync_pass,
            "audit": self._audit_pass,
            "drain": self._drain_pass,
        }
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            kind = self._due(now)
            if kind is not None:
                await passes[kind](syncer, now)
                self._after_pass(syncer, loop.time())
                continue
            # No await between clear() and wait(): a change cannot slip in unnoticed.
            self._wake.clear()
            try:
                async with asyncio.timeout_at(self._next_deadline(now)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _due(self, now: float) -> PassKind | None:
        # Syncs first: an audit or a drain check never makes a due sync wait for more than one pass.
        if self.tracker.initialized and self.scheduler.due(now):
            return "sync"
        if self._needs_full:
            return None  # the full pass that is due anyway does what an audit or a drain check would
        if self._next_audit is not None and now >= self._next_audit:
            return "audit"
        if self._next_drain is not None and now >= self._next_drain:
            return "drain"
        return None

    def _next_deadline(self, now: float) -> float | None:
        sync_at = self.scheduler.next_wakeup(now) if self.tracker.initialized else None
        others = (self._next_audit, self._next_drain) if not self._needs_full else ()
        times = [t for t in (sync_at, *others) if t is not None]
        return min(times) if times else None

    async def _sync_pass(self, syncer: Syncer, now: float) -> None:
        full = self._needs_full
        kind = "start" if full else "sync"
        self.scheduler.started(now)
        began = time.perf_counter()
        report: SyncReport | None = None
        try:
            report = await (syncer.start() if full else syncer.sync())
        except _WHOLESALE_FAILURES as exc:
            self._needs_full = True
            log.error(
                "sync could not reach the kernel; the next sync is a full one", extra={"error": str(exc)}
            )
        else:
            self._needs_full = False
        self.metrics.sync_duration.observe(time.perf_counter() - began)
        ok = report is not None and report.ok
        if ok:
            self.backoff.succeeded()
            self.stats.retry_delay = 0.0
            self.stats.last_sync_wall = time.time()
        else:
            self.stats.failures[kind] += 1
            self.stats.retry_delay = self.backoff.failed()
            self.scheduler.retry_interval = self.stats.retry_delay
        self.scheduler.finished(asyncio.get_running_loop().time(), ok)
        if report is not None:
            _log_report(report, self.stats.retry_delay)
            if full and not self.initial_sync_done:
                self._initial_sync_finished(report)

    def _initial_sync_finished(self, report: SyncReport) -> None:
        self.initial_sync_done = True
        self._next_audit = asyncio.get_running_loop().time() + self.settings.audit_period
        # The tracker's objects live as long as the process: move them out of the collector's sight, or
        # every full collection walks them all (pauses of several ms at 10k services).
        gc.collect()
        gc.freeze()
        self._startup_collection.end()
        log.info(
            "initial sync done",
            extra={
                "services": report.services,
                "operations": len(report.results),
                "failed": len(report.failures),
            },
        )

    async def _audit_pass(self, syncer: Syncer, now: float) -> None:
        began = time.perf_counter()
        report: SyncReport | None = None
        try:
            report = await syncer.audit()
        except _WHOLESALE_FAILURES as exc:
            log.error("audit could not read the kernel", extra={"error": str(exc)})
        self.metrics.audit_duration.observe(time.perf_counter() - began)
        self._next_audit = asyncio.get_running_loop().time() + self.settings.audit_period
        self._after_repair("audit", syncer, report)

    async def _drain_pass(self, syncer: Syncer, now: float) -> None:
        report: SyncReport | None = None
        try:
            report = await syncer.drain()
        except _WHOLESALE_FAILURES as exc:
            log.error("drain check could not reach the kernel", extra={"error": str(exc)})
        self._next_drain = None  # re-armed by _after_pass while anything still drains
        self._after_repair("drain", syncer, report)

    def _after_repair(self, kind: str, syncer: Syncer, report: SyncReport | None) -> None:
        if report is not None and report.ok:
            return
        self.stats.failures[kind] += 1
        if syncer.pending_retries:
            self._request()  # the services it failed for are retried by the sync loop, with its backoff

    def _after_pass(self, syncer: Syncer, now: float) -> None:
        if self._next_drain is None and syncer.started and next(syncer.planner.draining(), None) is not None:
            self._next_drain = now + self.settings.drain_check_period
        done, self._pass_done = self._pass_done, asyncio.Event()
        done.set()

    async def _translation_context(self) -> TranslationContext:
        settings = self.settings
        addresses, zone = settings.node_ips, settings.node_zone
        if not addresses and self._kube_config is not None:
            node = await self._read_node()
            addresses, zone = node.addresses, zone or node.zone
            # What is programmed: the node watch warns when the Node's addresses move away from it.
            self._node_addresses = frozenset(addresses)
        if not addresses:
            log.warning("no node address known: NodePort virtual servers are not programmed")
        log.info(
            "node",
            extra={"node": settings.node_name, "addresses": ",".join(map(str, addresses)), "zone": zone},
        )
        return TranslationContext(
            node_name=settings.node_name,
            node_addresses=frozenset(addresses),
            node_zone=zone,
            default_scheduler=settings.default_scheduler,
        )

    async def _read_node(self) -> NodeInfo:
        """This node's addresses and zone from the API, retried with backoff until they can be read."""
        from kubernetes_asyncio.client import ApiClient, CoreV1Api
        from tenacity import AsyncRetrying, retry_if_exception_type

        from aproxy.sources import kubernetes

        retry = self.settings.retry
        async with ApiClient(self._kube_config) as client:
            async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=retry.initial, max=retry.cap, jitter=retry.jitter),
                retry=retry_if_exception_type(kubernetes.KubernetesSourceError),
                before_sleep=_log_node_retry,
                reraise=True,
            ):
                with attempt:
                    return await kubernetes.read_node(CoreV1Api(client), self.settings.node_name)
        raise AssertionError("unreachable: AsyncRetrying without a stop either returns or raises")

    # --- the node watch ------------------------------------------------------------------------------------

    def _node_changed(self, node: NodeInfo | None) -> None:
        """The node watch's callback: eligibility for /healthz, and a warning when the addresses move."""
        if node is None:
            eligible, reason = False, "gone (no Node object)"
        else:
            eligible, reason = node.eligibility.eligible, node.eligibility.reason
            self._node_addresses_seen(frozenset(node.addresses))
        if (eligible, reason) == (self.node_eligible, self.node_reason):
            return
        self.node_eligible, self.node_reason = eligible, reason
        if eligible:
            log.info(
                "this node is eligible again: /healthz follows the sync loop",
                extra={"node": self.settings.node_name},
            )
        else:
            log.info(
                "this node is not eligible: /healthz answers 503",
                extra={"node": self.settings.node_name, "reason": reason},
            )

    def _node_addresses_seen(self, addresses: frozenset[IPAddress]) -> None:
        if self.settings.node_ips:
            return  # addresses given by flag: the Node's do not matter
        previous, self._node_addresses = self._node_addresses, addresses
        if previous is not None and addresses != previous:
            # Like kube-proxy, NodePorts are not moved live: that would need a full reprogramming.
            log.warning(
                "this node's addresses changed; NodePorts stay on the old ones until aproxy restarts",
                extra={"old": _joined(previous), "new": _joined(addresses)},
            )

    # --- intake side ---------------------------------------------------------------------------------------

    def _changed(self) -> None:
        # Before both lists are complete nothing is requested: no sync may run, and /healthz must not count
        # the time spent listing as a change waiting for a sync.
        if self.tracker.initialized:
            self._request()
        self._wake.set()

    def _request(self) -> None:
        self.scheduler.request(asyncio.get_running_loop().time())
        self.stats.last_queued_wall = time.time()
        self._wake.set()

    # --- observation ---------------------------------------------------------------------------------------

    def health(self) -> HealthSnapshot:
        """What the health endpoints say now."""
        scheduler = self.scheduler
        verdict = decide(
            asyncio.get_running_loop().time(),
            scheduler.pending_since,
            scheduler.last_success,
            self.settings.sync_period,
            self.initial_sync_done,
            node_eligible=self.node_eligible,
            node_reason=self.node_reason,
        )
        return HealthSnapshot(verdict, self.stats.last_sync_wall, time.time())

    async def next_pass(self) -> None:
        """Return after the kernel task's next pass (sync, audit or drain check) has finished."""
        await self._pass_done.wait()


def _log_report(report: SyncReport, retry_delay: float) -> None:
    fields = {
        "kind": report.kind,
        "services": report.services,
        "operations": len(report.results),
        "failed": len(report.failures),
    }
    if not report.ok:
        failed = sorted(f"{key.namespace}/{key.name}" for key in report.failed_services)
        log.warning(
            "sync failed; retrying",
            extra={**fields, "failed_services": ",".join(failed[:10]), "retry_in": round(retry_delay, 3)},
        )
    elif report.results:
        log.info("synced", extra=fields)
    else:
        log.debug("synced", extra=fields)


def _joined(addresses: frozenset[IPAddress]) -> str:
    return ",".join(str(address) for address in sorted(addresses, key=lambda a: (a.version, a)))


def _log_node_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.error("cannot read this node from the API; retrying", extra={"error": str(error), "retry_in": delay})


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> list[signal.Signals]:
    def stopping(signum: signal.Signals) -> None:
        log.info("stopping", extra={"signal": signum.name})
        stop.set()

    handled = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping, signum)
        handled.append(signum)
    return handled


async def _stop_on(stop: asyncio.Event) -> None:
    await stop.wait()
    raise StopRequested


async def run(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT or ``stop``: 0; 1 when it could not start or a task failed."""
    return await Daemon(settings).run(stop)


def main(settings: Settings) -> int:
    """The ``aproxy run`` entry point: the daemon on uvloop."""
    return int(uvloop.run(run(settings)))
