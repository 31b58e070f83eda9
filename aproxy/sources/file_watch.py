"""Watching manifest paths so that updates never silently stop: ``watch(paths, changed, ...)``.

Directories are watched, not files, because editors and Kubernetes ConfigMap mounts replace files by renaming
over them, which a watch on the file itself would not survive. A directory's watch does not survive the
directory itself being deleted and recreated, or a symlink to it being swapped (``ln -sfn v2 tmp; mv -T tmp
current``: the watch follows the old target). So each directory holding sources is watched together with its
nearest existing ancestor, which sees it vanish, reappear or be swapped; after every batch of events the
layout (which directories exist, what each path resolves to, and their inode numbers) is computed again, and
when it differs the watch is restarted on the new layout (and one more change reported, for whatever
happened while nothing watched). A watch that cannot start (a directory removed meanwhile) is retried with
backoff.

An event counts when it names a source file, a manifest in a source directory, a ``..name`` entry next to the
sources (the ConfigMap writer swaps its ``..data`` link), or a directory on the way to a source.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from aproxy.core.backoff import Backoff, RetryPolicy
from aproxy.sources.manifest import MANIFEST_SUFFIXES

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WatchedPaths:
    """Which directories to watch for a set of source paths, and which events in them matter.

    ``files``/``directories``: the sources, as given (absolute) and resolved. ``holders``: the directories
    that hold sources. ``anchors``: those and every directory above them, whose own events may change the
    layout. ``roots``: the existing directories to watch. ``identities``: (root, device, inode) of each, so
    that a directory deleted and recreated under the same name counts as a new layout.
    """

    files: frozenset[Path]
    directories: frozenset[Path]
    holders: frozenset[Path]
    anchors: frozenset[Path]
    roots: tuple[Path, ...]
    identities: tuple[tuple[Path, int, int], ...]

    @classmethod
    def of(cls, paths: Iterable[Path]) -> WatchedPaths:
        """Reads the filesystem (``stat``, symlinks): call it off the event loop."""
        files: set[Path] = set()
        directories: set[Path] = set()
        for path in paths:
            absolute = Path(os.path.abspath(path))
            # A symlinked file or directory changes where its target lives too.
            if absolute.is_dir():
                directories.update({absolute, absolute.resolve()})
            else:
                files.update({absolute, absolute.resolve()})
        holders = directories | {file.parent for file in files}
        anchors = set(holders)
        for holder in holders:
            anchors.update(holder.parents)
        roots: set[Path] = set()
        for holder in holders:
            if holder.is_dir():
                roots.add(holder)
            roots.add(_nearest_existing(holder.parent))
        identities = []
        for root in sorted(roots):
            try:
                status = root.stat()
            except OSError:
                continue  # gone since: the watch fails to start and is retried
            identities.append((root, status.st_dev, status.st_ino))
        return cls(
            files=frozenset(files),
            directories=frozenset(directories),
            holders=frozenset(holders),
            anchors=frozenset(anchors),
            roots=tuple(sorted(roots)),
            identities=tuple(identities),
        )

    def relevant(self, change: watchfiles.Change, path: str) -> bool:
        event = Path(path)
        if event in self.files or event in self.anchors:
            return True
        if event.parent not in self.holders:
            return False
        if event.name.startswith(".."):
            return True
        return (
            event.parent in self.directories
            and event.suffix in MANIFEST_SUFFIXES
            and not event.name.startswith(".")
        )


def _nearest_existing(directory: Path) -> Path:
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    return directory


async def watch(
    paths: Sequence[Path],
    changed: Callable[[], None],
    *,
    stop_event: asyncio.Event | None = None,
    debounce_ms: int = 50,
    force_polling: bool | None = None,
    retry: RetryPolicy | None = None,
) -> None:
    """Call ``changed()`` after every batch of relevant events until ``stop_event`` is set (or cancelled)."""
    backoff = Backoff(retry or RetryPolicy())
    first = True
    while stop_event is None or not stop_event.is_set():
        watched = await asyncio.to_thread(WatchedPaths.of, paths)
        if not first:
            changed()  # whatever happened while nothing was watching
        first = False
        try:
            stopped = await _watch_layout(watched, paths, changed, stop_event, debounce_ms, force_polling)
        except OSError as exc:
            delay = backoff.failed()
            logger.warning(
                "cannot watch the manifest directories; retrying",
                extra={"error": str(exc), "retry_in": round(delay, 3)},
            )
            await _sleep_unless_stopped(delay, stop_event)
            continue
        backoff.succeeded()
        if stopped:
            return


async def _watch_layout(
    watched: WatchedPaths,
    paths: Sequence[Path],
    changed: Callable[[], None],
    stop_event: asyncio.Event | None,
    debounce_ms: int,
    force_polling: bool | None,
) -> bool:
    """Watch one layout: True when stopped, False when the layout changed (watch again)."""
    stream = watchfiles.awatch(
        *watched.roots,
        watch_filter=watched.relevant,
        debounce=debounce_ms,
        stop_event=stop_event,
        recursive=False,
        force_polling=force_polling,
    )
    async with aclosing(stream):
        async for events in stream:
            logger.debug("manifest files changed", extra={"events": len(events)})
            changed()
            now = await asyncio.to_thread(WatchedPaths.of, paths)
            if now != watched:
                logger.info(
                    "manifest directories replaced: watching the new ones",
                    extra={"watching": ",".join(map(str, now.roots))},
                )
                return False
    return True


async def _sleep_unless_stopped(delay: float, stop_event: asyncio.Event | None) -> None:
    if stop_event is None:
        await asyncio.sleep(delay)
        return
    with suppress(TimeoutError):
        await asyncio.wait_for(stop_event.wait(), delay)
