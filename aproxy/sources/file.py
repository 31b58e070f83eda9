"""The manifest-file source: Services and EndpointSlices from YAML/JSON files, re-read when they change.

``FileSource(paths).run(sink)`` feeds every object, marks both kinds listed, then watches the files
(aproxy.sources.file_watch, which survives directories recreated and symlinks swapped) and, on each change,
re-reads everything and feeds only the differences against what it fed last: new or changed objects are
upserted, vanished ones deleted, identical ones not mentioned. So the sink sees the same add/update/delete
stream the Kubernetes source produces.

When a change is read (aproxy.sources.reload_schedule): once the files have been quiet for the settle
period (``--source-settle-period``, 1 s), so that a file written in place (``cat > file``: truncated, then
written) is read whole rather than empty or cut short. Write manifests atomically all the same (a new file
renamed over the old one, as editors and ConfigMap mounts do): a writer that pauses longer than the settle
period in the middle of a file can still be caught half-way, and a truncated file that parses (empty, or
cut at a ``---``) is a good read of fewer objects.

A read that fails (a syntax error, a file removed) is logged, counted in ``reload_errors`` and otherwise
ignored: the last good state stays, nothing is deleted. A failure to open a file (too many open files) is
retried with backoff; bad content waits for the next change. ``pending_since`` says since when a change has
not been applied (the daemon's ``/healthz`` fails after twice the sync period). If the very first read
fails nothing is marked listed, so the daemon applies nothing until a read succeeds.

An object that turns invalid (aproxy.sources.last_good) keeps its last good version: it is logged once,
counted in ``objects_held``, and released when the file has it valid again or no longer has it. A Service
or EndpointSlice of another apiVersion is logged once while the files hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from aproxy.core.backoff import RetryPolicy
from aproxy.sources.base import ObjectSink
from aproxy.sources.file_watch import watch
from aproxy.sources.last_good import Choice, Held, LastGood
from aproxy.sources.manifest import ManifestError, ManifestReadError, Manifests, load_manifests
from aproxy.sources.reload_schedule import DEFAULT_SETTLE_PERIOD, ReloadSchedule

logger = logging.getLogger(__name__)

SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"

# (kind, namespace, name). Namespace or name is None when the object lacks a usable one: such objects are
# still fed (the core reports them as skips) but can never be deleted by name.
ObjectKey: TypeAlias = tuple[str, str | None, str | None]
Objects: TypeAlias = dict[ObjectKey, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Changes:
    """What differs between two reads: objects to upsert (new or changed) and keys to delete."""

    upserts: tuple[tuple[ObjectKey, dict[str, Any]], ...]
    deletes: tuple[ObjectKey, ...]


def index_objects(manifests: Manifests) -> Objects:
    """Key every object; when the same object appears twice the later one wins, as it would in the tracker."""
    objects: Objects = {}
    for raw in manifests.services:
        objects[object_key(SERVICE, raw)] = without_resource_version(raw)
    for raw in manifests.slices:
        objects[object_key(ENDPOINT_SLICE, raw)] = without_resource_version(raw)
    return objects


def without_resource_version(raw: dict[str, Any]) -> dict[str, Any]:
    """Drop ``metadata.resourceVersion``: in a file it is whatever was pasted (often a ``kubectl get`` dump,
    edited by hand without touching it), not the API server's promise that an equal version means an equal
    object. The change tracker relies on that promise to ignore relisted objects, so a file's stale version
    would hide real edits; without one, the tracker compares content."""
    metadata = raw.get("metadata")
    if isinstance(metadata, dict) and "resourceVersion" in metadata:
        kept = {key: value for key, value in metadata.items() if key != "resourceVersion"}
        return {**raw, "metadata": kept}
    return raw


def object_key(kind: str, raw: dict[str, Any]) -> ObjectKey:
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        return (kind, None, None)
    namespace, name = metadata.get("namespace"), metadata.get("name")
    return (kind, namespace if isinstance(namespace, str) else None, name if isinstance(name, str) else None)


def diff_objects(previous: Objects, current: Objects) -> Changes:
    """Upserts in read order (Services first), then deletes (EndpointSlices before their Services)."""
    upserts = tuple((key, raw) for key, raw in current.items() if previous.get(key) != raw)
    gone = [key for key in previous if key not in current]
    deletes = tuple(sorted(gone, key=lambda key: (key[0] == SERVICE, str(key[1]), str(key[2]))))
    return Changes(upserts=upserts, deletes=deletes)


def feed(sink: ObjectSink, changes: Changes) -> None:
    for (kind, _, _), raw in changes.upserts:
        if kind == SERVICE:
            sink.upsert_service(raw)
        else:
            sink.upsert_slice(raw)
    for kind, namespace, name in changes.deletes:
        if namespace is None or name is None:
            continue  # never accepted by the tracker under a name, so there is nothing to delete
        if kind == SERVICE:
            sink.delete_service(namespace, name)
        else:
            sink.delete_slice(namespace, name)


@dataclass(frozen=True, slots=True)
class FileSourceSettings:
    """How ``aproxy run`` reads manifest files: ``settle_period``, the seconds a file must be quiet before a
    change is read (``--source-settle-period``)."""

    settle_period: float = DEFAULT_SETTLE_PERIOD

    def problems(self) -> list[str]:
        if not 0 <= self.settle_period <= MAX_SETTLE_PERIOD:
            return [f"--source-settle-period ({self.settle_period:g}s) must be 0..{MAX_SETTLE_PERIOD:g}s"]
        return []


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


# Longer would only hide edits: /healthz reports a change unapplied for twice the sync period as stale.
MAX_SETTLE_PERIOD = 60.0


class FileSource:
    """Feeds a sink from manifest files and keeps it up to date as the files change.

    ``paths``: files or directories (see ``aproxy.sources.manifest``). ``settle_period``: seconds without an
    event before a change is read. ``retry``: the backoff of a read that failed to open a file.
    ``debounce_ms``: how long watchfiles gathers events into one batch. ``stop_event``: when set, ``run``
    returns (cancelling ``run`` works too). ``force_polling``: poll instead of inotify (network
    filesystems); None lets watchfiles decide. ``clock``: seconds, by default the running event loop's (the
    daemon's ``/healthz`` compares ``pending_since`` with it); tests pass a fake one.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        settle_period: float = DEFAULT_SETTLE_PERIOD,
        retry: RetryPolicy | None = None,
        debounce_ms: int = 50,
        stop_event: asyncio.Event | None = None,
        force_polling: bool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._paths = tuple(paths)
        self._debounce_ms = debounce_ms
        self._stop_event = stop_event
        self._force_polling = force_polling
        self._retry = retry
        self._clock = clock or _loop_time
        self._schedule = ReloadSchedule(settle_period, retry)
        self._wakeup = asyncio.Event()
        self._objects: Objects | None = None  # what the sink was fed last
        self._last_good = LastGood()
        self._reported_ignored: frozenset[str] = frozenset()
        self._lock = asyncio.Lock()  # one re-read at a time, so each diff starts from the one before
        self.reloads = 0
        self.reload_errors = 0
        self.last_error: str | None = None

    @property
    def listed(self) -> bool:
        """Whether a read has succeeded (and both kinds were marked listed)."""
        return self._objects is not None

    @property
    def pending_since(self) -> float | None:
        """When (on ``clock``) the oldest change not yet applied was seen; None: the sink has the files'
        current content (objects held at their last good version count as applied)."""
        return self._schedule.pending_since

    @property
    def held(self) -> tuple[Held, ...]:
        """Objects whose file version is invalid, kept at their last good version."""
        return tuple(self._last_good.held.values())

    @property
    def objects_held(self) -> int:
        return len(self._last_good.held)

    def changed(self) -> None:
        """A file event: read again once the files have been quiet for the settle period."""
        self._schedule.changed(self._clock())
        self._wakeup.set()

    async def run(self, sink: ObjectSink) -> None:
        self._schedule.start(self._clock())
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(self._read_when_due(sink), name="aproxy-file-reader")
            await watch(
                self._paths,
                self.changed,
                stop_event=self._stop_event,
                debounce_ms=self._debounce_ms,
                force_polling=self._force_polling,
                retry=self._retry,
            )
            reader.cancel()

    async def step(self, sink: ObjectSink) -> float | None:
        """Read if a read is due now; then the seconds until the next one (None: none until an event)."""
        delay = self._schedule.due_in(self._clock())
        if delay == 0:
            await self.reload(sink)
            delay = self._schedule.due_in(self._clock())
        return delay

    async def _read_when_due(self, sink: ObjectSink) -> None:
        while True:
            self._wakeup.clear()
            delay = await self.step(sink)
            if delay == 0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), delay)

    async def reload(self, sink: ObjectSink) -> bool:
        """Re-read every file now and feed the sink the differences; False (state kept) when it failed."""
        async with self._lock:
            self._schedule.started()
            try:
                manifests = await asyncio.to_thread(load_manifests, self._paths)
            except ManifestError as exc:
                self._failed(exc)
                return False
            self._apply(sink, manifests)
            self._schedule.applied()
            return True

    def _failed(self, exc: ManifestError) -> None:
        self.reload_errors += 1
        self.last_error = str(exc)
        retry_in = self._schedule.failed(self._clock(), transient=isinstance(exc, ManifestReadError))
        logger.error(
            "manifest read failed, keeping the last good state",
            extra={
                "error": str(exc),
                "reload_errors": self.reload_errors,
                "listed": self.listed,
                "retry_in": "next change" if retry_in is None else round(retry_in, 3),
            },
        )

    def _apply(self, sink: ObjectSink, manifests: Manifests) -> None:
        current = index_objects(manifests)
        first = self._objects is None
        choice = self._last_good.choose(self._objects or {}, current)
        changes = diff_objects(self._objects or {}, choice.objects)
        feed(sink, changes)
        self._objects = choice.objects
        self.reloads += 1
        self.last_error = None
        self._report(manifests, choice)
        if first:
            sink.mark_listed("services")
            sink.mark_listed("endpointslices")
        logger.info(
            "manifests read",
            extra={
                "objects": len(current),
                "upserts": len(changes.upserts),
                "deletes": len(changes.deletes),
                "held": len(self._last_good.held),
                "initial": first,
            },
        )

    def _report(self, manifests: Manifests, choice: Choice) -> None:
        """Each problem once: while it lasts, it is not logged again."""
        for hold in choice.new:
            logger.warning(
                "invalid object: its last good version stays applied until it is fixed or deleted",
                extra={"object": f"{hold.key[0]} {hold.key[1]}/{hold.key[2]}", "reason": hold.reason},
            )
        for kind, namespace, name in choice.released:
            logger.info(
                "object no longer held at its last good version",
                extra={"object": f"{kind} {namespace}/{name}"},
            )
        ignored = frozenset(manifests.ignored)
        for line in manifests.ignored:
            if line not in self._reported_ignored:
                logger.warning("object ignored", extra={"reason": line})
        self._reported_ignored = ignored
