"""The manifest-file source: Services and EndpointSlices from YAML/JSON files, re-read when they change.

``FileSource(paths).run(sink)`` feeds every object, marks both kinds listed, then watches the files with
watchfiles and, on each change, re-reads everything and feeds only the differences against the last good read:
new or changed objects are upserted, vanished ones deleted, identical ones not mentioned. So the sink sees the
same add/update/delete stream the Kubernetes source produces.

A read that fails (a file half-written by an editor, a syntax error, a file removed) is logged, counted in
``reload_errors`` and otherwise ignored: the last good state stays, nothing is deleted, and the next good read
is diffed against the last good one. If the very first read fails nothing is marked listed, so the daemon
applies nothing until a read succeeds.

Watching: the directories holding the files are watched (not the files), because editors and Kubernetes
ConfigMap mounts replace files by renaming over them, which a watch on the file itself would not survive.
An event counts when it names a source file, a manifest in a source directory, or a ``..name`` entry (the
ConfigMap atomic writer swaps its ``..data`` link). Reads run in a worker thread.

Write manifests atomically (a new file renamed over the old one, as editors and ConfigMap mounts do): a file
rewritten in place can be caught half-written, and a truncated file that still parses (empty, or cut at a
``---``) is a good read of fewer objects. watchfiles' grouping of events (``debounce_ms``) narrows that window
but cannot close it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import watchfiles

from aproxy.sources.base import ObjectSink
from aproxy.sources.manifest import MANIFEST_SUFFIXES, ManifestError, Manifests, load_manifests

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


class FileSource:
    """Feeds a sink from manifest files and keeps it up to date as the files change.

    ``paths``: files or directories (see ``aproxy.sources.manifest``). ``debounce_ms``: how long watchfiles
    gathers events into one re-read. ``stop_event``: when set, ``run`` returns (cancelling ``run`` works too).
    ``force_polling``: poll instead of inotify (network filesystems); None lets watchfiles decide.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        debounce_ms: int = 300,
        stop_event: asyncio.Event | None = None,
        force_polling: bool | None = None,
    ) -> None:
        self._paths = tuple(paths)
        self._debounce_ms = debounce_ms
        self._stop_event = stop_event
        self._force_polling = force_polling
        self._objects: Objects | None = None  # the last good read
        self._lock = asyncio.Lock()  # one re-read at a time, so each diff starts from the one before
        self.reloads = 0
        self.reload_errors = 0
        self.last_error: str | None = None

    @property
    def listed(self) -> bool:
        """Whether a read has succeeded (and both kinds were marked listed)."""
        return self._objects is not None

    async def run(self, sink: ObjectSink) -> None:
        await self.reload(sink)
        await self._watch(sink)

    async def reload(self, sink: ObjectSink) -> bool:
        """Re-read every file and feed the sink the differences; False (state kept) when the read failed."""
        async with self._lock:
            try:
                manifests = await asyncio.to_thread(load_manifests, self._paths)
            except ManifestError as exc:
                self.reload_errors += 1
                self.last_error = str(exc)
                logger.error(
                    "manifest read failed, keeping the last good state",
                    extra={"error": str(exc), "reload_errors": self.reload_errors, "listed": self.listed},
                )
                return False
            current = index_objects(manifests)
            first = self._objects is None
            changes = diff_objects(self._objects or {}, current)
            feed(sink, changes)
            self._objects = current
            self.reloads += 1
            self.last_error = None
            if first:
                sink.mark_listed("services")
                sink.mark_listed("endpointslices")
            logger.info(
                "manifests read",
                extra={
                    "objects": len(current),
                    "upserts": len(changes.upserts),
                    "deletes": len(changes.deletes),
                    "initial": first,
                },
            )
            return True

    async def _watch(self, sink: ObjectSink) -> None:
        watched = WatchedPaths.of(self._paths)
        roots = [root for root in watched.roots if root.is_dir()]
        for missing in sorted(set(watched.roots) - set(roots)):
            logger.error("cannot watch a directory that does not exist", extra={"path": str(missing)})
        if not roots:
            # Nothing can ever change: stay alive like any source until stopped.
            await (self._stop_event.wait() if self._stop_event else asyncio.Event().wait())
            return
        async for events in watchfiles.awatch(
            *roots,
            watch_filter=watched.relevant,
            debounce=self._debounce_ms,
            stop_event=self._stop_event,
            recursive=False,
            force_polling=self._force_polling,
        ):
            logger.debug("manifest files changed", extra={"events": len(events)})
            await self.reload(sink)


@dataclass(frozen=True, slots=True)
class WatchedPaths:
    """Which directories to watch for a set of source paths, and which events in them matter."""

    files: frozenset[Path]
    directories: frozenset[Path]

    @classmethod
    def of(cls, paths: Iterable[Path]) -> WatchedPaths:
        files: set[Path] = set()
        directories: set[Path] = set()
        for path in paths:
            absolute = path.absolute()
            if absolute.is_dir():
                directories.add(absolute)
            else:
                # A symlinked file changes where its target lives too.
                files.update({absolute, absolute.resolve()})
        return cls(files=frozenset(files), directories=frozenset(directories))

    @property
    def roots(self) -> list[Path]:
        return sorted(self.directories | {file.parent for file in self.files})

    def relevant(self, change: watchfiles.Change, path: str) -> bool:
        event = Path(path)
        if event.name.startswith(".."):
            return True
        if event in self.files:
            return True
        return (
            event.parent in self.directories
            and event.suffix in MANIFEST_SUFFIXES
            and not event.name.startswith(".")
        )
