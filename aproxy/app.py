"""aproxy's daemon (``aproxy run``): the composition root that wires a source, the change tracker, the kernel
loop, the kernel backend and the health/metrics server together, on uvloop.

Tasks, all in one ``asyncio.TaskGroup`` (SIGTERM, SIGINT or ``stop`` cancels them all and ``run`` returns 0;
any task failing cancels the others and ``run`` returns 1 after logging which task failed and why):

- ``source``: the manifest files or the Kubernetes API feed the ``ChangeTracker`` through ``_Intake``, which
  nudges the kernel loop on every change (``KernelLoop.changed``).
- ``kernel``: reads this node's addresses (from the Node object when not given), builds the ``Syncer`` and
  runs the kernel loop (aproxy.kernel_loop): the one owner of kernel changes, which decides when to sync,
  audit and check drains, and backs off after a failure. With the IPVS backend it also follows the node's
  NodePort addresses (``--nodeport-addresses``) through rtnetlink address events.
- ``web``: ``/healthz``, ``/livez``, ``/readyz`` and ``/metrics`` (aproxy.web.server).
- ``health-ports``: the health-check node ports of LoadBalancer services with policy Local
  (aproxy.web.health_ports), opened and closed as the syncer's table changes; on every address, or on the
  NodePort addresses when ``--nodeport-addresses`` selects some (moved with them, as kube-proxy's).
- ``health`` (unless ``--no-health-checks``): the backend checks (aproxy.health); a verdict change marks the
  services of that backend dirty, and the kernel loop drains or restores it like any other change.
- ``node`` (Kubernetes source only): watches this node's Node object; while it is being deleted, tainted
  ``ToBeDeletedByClusterAutoscaler`` or gone, ``/healthz`` answers 503 with ``nodeEligible: false``.
- ``stop``: waits for the stop event.

Stopping leaves the kernel rules in place: a restart must not drop traffic (and performs zero operations).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Final

import uvloop

from aproxy.backends.base import Backend
from aproxy.backends.ipvs import IPVSBackend, IPVSUnavailable
from aproxy.backends.masquerade import MasqueradeError
from aproxy.backends.memory import MemoryBackend
from aproxy.backends.node_addresses import NodePortAddressFollower
from aproxy.core.changes import ChangeTracker
from aproxy.core.debounce import SyncScheduler
from aproxy.core.drain import DrainClock
from aproxy.core.health_ports import HealthPortTable
from aproxy.core.latency import ProgrammingLatency, service_key, slice_service, trigger_time
from aproxy.core.model import IPAddress, ServiceKey
from aproxy.core.node_addresses import NodePortAddresses
from aproxy.core.translate import TranslationContext
from aproxy.core.verdicts import HealthView
from aproxy.health.checker import HealthChecker, HealthStats
from aproxy.kernel_loop import KernelLoop, LoopSettings, LoopStats
from aproxy.metrics import DaemonMetrics
from aproxy.settings import Settings
from aproxy.sources.base import ListedKind, Pending, Source
from aproxy.sources.file import FileSource
from aproxy.startup_gc import StartupCollection
from aproxy.syncer import Syncer
from aproxy.web.health_ports import HealthCheckListeners
from aproxy.web.healthz import decide
from aproxy.web.server import Exposition, HealthSnapshot, ListenError, WebServer

if TYPE_CHECKING:
    from aproxy.sources.kube.node import ThisNode

log = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


class StartupError(RuntimeError):
    """The daemon cannot start: the backend or the source could not be opened."""


class DaemonTaskFailed(Exception):
    """One of the daemon's tasks raised; it has been logged, and the daemon stops."""


class StopRequested(Exception):
    """The stop event was set (SIGTERM, SIGINT or the caller): the normal end of the daemon."""


class _Intake:
    """The ``ObjectSink`` the source feeds: the tracker, plus a nudge to the kernel loop on every change, and
    the change's trigger time for the network programming latency."""

    def __init__(
        self, tracker: ChangeTracker, changed: Callable[[], None], latency: ProgrammingLatency
    ) -> None:
        self._tracker = tracker
        self._changed = changed
        self._latency = latency

    def upsert_service(self, raw: dict[str, Any]) -> bool:
        dirty = self._nudge(self._tracker.upsert_service(raw))
        # A Service has no trigger stamp: its arrival, once listing is over (the list's are not changes).
        if dirty and self._tracker.initialized and (key := service_key(raw)) is not None:
            self._latency.record(key, time.time())
        return dirty

    def delete_service(self, namespace: str, name: str) -> bool:
        return self._nudge(self._tracker.delete_service(namespace, name))

    def upsert_slice(self, raw: dict[str, Any]) -> bool:
        dirty = self._nudge(self._tracker.upsert_slice(raw))
        if dirty:
            key, trigger = slice_service(raw), trigger_time(raw)
            if key is not None and trigger is not None:
                self._latency.record(key, trigger)
        return dirty

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
        self.latency = ProgrammingLatency(started=time.time())
        self.source: Source | None = source
        # Backend health checks: verdicts reach the kernel only as dirty services (aproxy/health/).
        self.health_view = HealthView(fail_closed=settings.health_checks.fail_closed)
        self.health_stats = HealthStats()
        self.metrics = DaemonMetrics(
            tracker=self.tracker,
            syncer=lambda: self.loop.syncer,
            source=lambda: self.source,
            stats=self.stats,
            health=(self.health_view, self.health_stats) if settings.health_checks.enabled else None,
        )
        self._startup_collection = StartupCollection()
        self.loop = KernelLoop(
            self.tracker,
            self.scheduler,
            LoopSettings(
                audit_period=settings.audit_period,
                drain_check_period=settings.drain_check_period,
                retry=settings.retry,
            ),
            stats=self.stats,
            sync_duration=self.metrics.sync_duration,
            audit_duration=self.metrics.audit_duration,
            collection=self._startup_collection,
            latency=self.latency,
            programming_duration=self.metrics.programming_duration,
        )
        self.web = WebServer(
            healthz_address=settings.healthz_address,
            metrics_address=settings.metrics_address,
            health=self.health,
            metrics=lambda: Exposition(self.metrics.exposition(), self.metrics.content_type),
        )
        self._backend = backend
        # Health-check node ports (LoadBalancer services with policy Local): the syncer fills the table.
        self.health_ports = HealthPortTable()
        self.health_check = HealthCheckListeners(self.health_ports, lambda: self.health().health.healthz)
        self._intake = _Intake(self.tracker, self.loop.changed, self.latency)
        self.health_checker = (
            HealthChecker(
                settings.health_checks,
                self.health_view,
                self._health_changed,
                stats=self.health_stats,
            )
            if settings.health_checks.enabled
            else None
        )
        # This node's Node and its watch (Kubernetes source only); manifest sources: always eligible.
        self.node: ThisNode | None = None
        self._watch_node: Callable[[], Coroutine[Any, Any, None]] | None = None

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
                    await _listen(self.web, resources)
                    backend = self._backend  # an injected one (tests) is not opened here
                    if backend is None:
                        backend = await _open_backend(self.settings, resources)
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
                health_ports = self._guard("health-ports", self.health_check.serve())
                group.create_task(health_ports, name="aproxy-health-ports")
                if self._watch_node is not None:
                    group.create_task(self._guard("node", self._watch_node()), name="aproxy-node")
                if self.health_checker is not None:
                    group.create_task(self._guard("health", self.health_checker.run()), name="aproxy-health")
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

    async def _open_source(self) -> Source:
        if self.source is not None:
            return self.source
        if self.settings.sources:
            return FileSource(
                self.settings.sources,
                settle_period=self.settings.file_source.settle_period,
                retry=self.settings.retry,
            )
        try:
            from aproxy.sources.kube.connect import connect
            from aproxy.sources.kube.errors import KubernetesConfigError
        except ImportError as exc:
            raise StartupError(f"the Kubernetes source is not available: {exc}") from exc
        settings = self.settings
        try:
            cluster = await connect(
                settings.kubeconfig,
                settings.master,
                node_name=settings.node_name,
                fixed_addresses=bool(settings.node_ips),
                renewal_interval=settings.credential_renewal_period,
            )
        except KubernetesConfigError as exc:
            raise StartupError(str(exc)) from exc
        self.node, self._watch_node = cluster.node, cluster.watch_node
        return cluster.source

    async def _feed(self, source: Source) -> None:
        await source.run(self._intake)
        log.warning("the source stopped; the last state it gave stays applied")

    # --- the kernel task ---------------------------------------------------------------------------------

    async def _kernel(self, backend: Backend) -> None:
        context = await translation_context(self.settings, self.node)
        drains = DrainClock(self.settings.drain_grace_period)
        health = self.health_view if self.health_checker is not None else None
        if self.health_checker is not None and isinstance(backend, IPVSBackend):
            self.health_checker.usage = backend.usage  # scope "used": what the kernel's dumps saw
        # NodePorts on the node's addresses, chosen by --nodeport-addresses and followed live (real kernel).
        follower = _node_port_follower(self.settings, context) if self.settings.backend == "ipvs" else None
        # Health-check node ports on those addresses too, unless they are every address (as kube-proxy).
        listeners = self.health_check if follower is not None and not follower.every_address else None
        if follower is not None:
            context = dataclasses.replace(context, node_addresses=await follower.current())
        if listeners is not None:
            listeners.set_addresses(context.node_addresses)
        syncer = Syncer(self.tracker, context, backend, drains, health=health, health_ports=self.health_ports)
        async with asyncio.TaskGroup() as group:
            if follower is not None:
                moved = functools.partial(_move_node_ports, syncer, self.loop, listeners)
                group.create_task(follower.follow(moved), name="aproxy-node-addresses")
            await self.loop.run(syncer)

    def _health_changed(self, services: frozenset[ServiceKey]) -> None:
        self.tracker.mark_dirty(services)
        self.loop.changed()

    # --- observation ---------------------------------------------------------------------------------------

    def health(self) -> HealthSnapshot:
        """What the health endpoints say now."""
        scheduler = self.scheduler
        verdict = decide(
            asyncio.get_running_loop().time(),
            scheduler.pending_since,
            scheduler.last_success,
            self.settings.sync_period,
            self.loop.initial_sync_done,
            node_eligible=self.node is None or self.node.eligible,
            node_reason=self.node.reason if self.node is not None else "",
            source_pending_since=self.source.pending_since if isinstance(self.source, Pending) else None,
        )
        return HealthSnapshot(verdict, self.stats.last_sync_wall, time.time())


async def translation_context(settings: Settings, node: ThisNode | None) -> TranslationContext:
    """This node for translation: its name, zone and addresses (by flag, else from its Node object)."""
    addresses, zone = settings.node_ips, settings.node_zone
    if not addresses and node is not None:
        found = await node.fetch(settings.retry)
        addresses, zone = found.addresses, zone or found.zone
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


async def _listen(web: WebServer, resources: AsyncExitStack) -> None:
    """Bind the health and metrics addresses first: one that cannot be bound stops the daemon before it has
    touched the kernel."""
    try:
        await web.start()
    except ListenError as exc:
        raise StartupError(f"--{exc.listener}-bind-address {exc.address}: {exc.reason}") from exc
    resources.push_async_callback(web.close)


async def _open_backend(settings: Settings, resources: AsyncExitStack) -> Backend:
    if settings.backend == "dry-run":
        log.warning("dry run: changes go to an in-memory table, not the kernel")
        return MemoryBackend()
    try:
        return await resources.enter_async_context(IPVSBackend(settings.ipvs))
    except (IPVSUnavailable, MasqueradeError, OSError, ValueError) as exc:
        raise StartupError(f"cannot open the IPVS backend: {exc}") from exc


def _node_port_follower(settings: Settings, context: TranslationContext) -> NodePortAddressFollower:
    ipvs = settings.ipvs
    choice = NodePortAddresses.parse(ipvs.nodeport_addresses)
    return NodePortAddressFollower(choice, ipvs.device, context.node_addresses)


def _move_node_ports(
    syncer: Syncer, loop: KernelLoop, listeners: HealthCheckListeners | None, addresses: frozenset[IPAddress]
) -> None:
    if listeners is not None:
        listeners.set_addresses(addresses)
    if syncer.set_node_addresses(addresses):
        loop.changed()


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> list[signal.Signals]:
    def stopping(signum: signal.Signals) -> None:
        log.info("stopping", extra={"signal": signum.name})
        stop.set()

    def ignoring(signum: signal.Signals) -> None:
        # A closed terminal, or an operator used to daemons that reload on SIGHUP: aproxy follows its sources
        # by itself, and ending (the default action, status 129) would only drop its health endpoints.
        log.warning("ignored: aproxy reloads nothing on this signal", extra={"signal": signum.name})

    handled = []
    for signum, handler in ((signal.SIGTERM, stopping), (signal.SIGINT, stopping), (signal.SIGHUP, ignoring)):
        loop.add_signal_handler(signum, handler, signum)
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
