"""The file source against hostile writers and layouts (issue 14): files written in place, objects that turn
invalid, directories deleted and recreated, symlinked directories swapped, reads that fail to open a file.

Real files on disk and the real watch; the change tracker is the sink, as in the daemon. Timing-sensitive
cases use a fake clock and ``FileSource.step``; cases about the watch itself wait (bounded) for the
tracker to reach the expected state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from aproxy.core.backoff import RetryPolicy
from aproxy.core.changes import ChangeTracker
from aproxy.core.model import ServiceKey
from aproxy.core.translate import TranslationContext
from aproxy.sources.file import FileSource
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port

T = TypeVar("T")
TIMEOUT = 30.0  # seconds for a whole scenario: a bound against hanging, never an assertion
STEP = 10.0  # seconds for one awaited state
CTX = TranslationContext(node_name="node-a", node_addresses=frozenset())


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


def web(port_number: int = 80) -> dict[str, Any]:
    return service("web", cluster_ips="10.96.0.1", ports=[port("http", port_number)])


def named(name: str, address: str) -> dict[str, Any]:
    return service(name, cluster_ips=address, ports=[port("http", 80)])


def web_slice() -> dict[str, Any]:
    return endpoint_slice("web", endpoints=[endpoint("10.244.1.5")], ports=[slice_port("http", 8080)])


def text(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects)


def services(tracker: ChangeTracker) -> set[str]:
    return {str(key) for key in tracker.services()}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counting(ChangeTracker):
    """The tracker, recording the fewest services it held after a delete, and signalling every intake call
    (so that a test awaits a state instead of polling for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fewest: int | None = None
        self.called = asyncio.Event()

    def upsert_service(self, raw: object) -> bool:
        self.called.set()
        return super().upsert_service(raw)

    def delete_service(self, namespace: str, name: str) -> bool:
        changed = super().delete_service(namespace, name)
        if self.initialized:
            held = len(self.services())
            self.fewest = held if self.fewest is None else min(self.fewest, held)
        self.called.set()
        return changed

    def mark_listed(self, kind: Any) -> None:
        super().mark_listed(kind)
        self.called.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(STEP):
            while not condition():
                self.called.clear()
                await self.called.wait()
        assert condition(), what


# --- a file written in place --------------------------------------------------------------------------------


def test_a_slow_in_place_write_is_read_whole_and_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    before = [named(f"s{i}", f"10.96.1.{i}") for i in range(15)]
    after = [*before, named("new", "10.96.2.1")]
    path.write_text(text(before))
    tracker, stop = Counting(), asyncio.Event()
    source = FileSource([path], settle_period=1.0, stop_event=stop)
    # Cut at a document boundary: the first part alone parses, as 8 of the 16 services.
    head, tail = text(after[:8]).encode(), ("---\n" + text(after[8:])).encode()

    async def scenario() -> None:
        task = asyncio.create_task(source.run(tracker))
        await tracker.until(lambda: tracker.initialized, "the first read")
        # `cat > file` from a slow producer: truncated, half written, a pause, the rest. The watch starts
        # unobservably after the first read: write until the new service shows, each time the same way.
        while "default/new" not in services(tracker):
            with path.open("wb") as out:
                out.write(head)
                out.flush()
                await asyncio.sleep(0.3)
                out.write(tail)
            await asyncio.sleep(1.2)
        stop.set()
        await task

    run(scenario())
    assert tracker.fewest is None, "an empty or half-written read deleted services"
    assert len(services(tracker)) == 16


def test_a_change_is_read_only_after_the_settle_period(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text([web()]))
    clock, tracker = FakeClock(), ChangeTracker()
    source = FileSource([path], settle_period=1.0, clock=clock)

    async def scenario() -> list[float | None]:
        assert await source.reload(tracker)
        path.write_text("")  # truncated: a writer has just opened it
        source.changed()
        waits = [await source.step(tracker)]
        clock.now += 0.6
        path.write_text(text([web(), named("api", "10.96.0.2")]))  # still writing: another event
        source.changed()
        waits.append(await source.step(tracker))
        clock.now += 1.0
        waits.append(await source.step(tracker))
        return waits

    assert run(scenario()) == [1.0, 1.0, None]
    assert services(tracker) == {"default/web", "default/api"}
    assert source.reloads == 2
    assert source.pending_since is None


# --- an object that turns invalid ---------------------------------------------------------------------------


def test_an_object_turned_invalid_keeps_its_last_good_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text([web(), web_slice()]))
    tracker, source = ChangeTracker(), FileSource([path])
    good = None

    async def scenario() -> None:
        nonlocal good
        await source.reload(tracker)
        good, _ = tracker.desired(ServiceKey("default", "web"), CTX)
        tracker.take_dirty()
        path.write_text(text([web(70000), web_slice()]))
        await source.reload(tracker)
        await source.reload(tracker)  # again: still held, not logged twice
        assert tracker.take_dirty() == set(), "the invalid version reached the tracker"
        assert tracker.desired(ServiceKey("default", "web"), CTX)[0] == good
        assert source.objects_held == 1
        assert "70000" in source.held[0].reason
        assert source.pending_since is None, "a held object is not a change waiting to be applied"
        path.write_text(text([web(8443), web_slice()]))
        await source.reload(tracker)
        assert source.objects_held == 0
        state, _ = tracker.desired(ServiceKey("default", "web"), CTX)
        assert state is not None and {vs.key.port for vs in state.virtual_servers} == {8443}
        path.write_text(text([web(0), web_slice()]))
        await source.reload(tracker)
        assert source.objects_held == 1
        path.write_text(text([web_slice()]))  # deleted from the file while held: deleted
        await source.reload(tracker)
        assert source.objects_held == 0
        assert services(tracker) == set()

    with caplog.at_level(logging.INFO, logger="aproxy.sources.file"):
        run(scenario())
    held_logs = [r for r in caplog.records if r.getMessage().startswith("invalid object")]
    assert [r.__dict__["object"] for r in held_logs] == ["Service default/web", "Service default/web"]
    assert "70000" in held_logs[0].__dict__["reason"]


def test_a_new_object_invalid_from_the_start_is_the_core_s_skip(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text([web(70000)]))
    tracker, source = ChangeTracker(), FileSource([path])
    run(source.reload(tracker))
    assert source.objects_held == 0
    assert [skip.name for skip in tracker.new_skips()] == ["web"]


# --- the watch survives its directories being replaced ------------------------------------------------------


async def _seen(tracker: Counting, path: Path, name: str, objects: list[Any]) -> None:
    """Save ``objects`` into ``path`` until the tracker holds ``name`` (the watch starts unobservably)."""
    while f"default/{name}" not in services(tracker):
        await asyncio.to_thread(path.write_text, text(objects))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await tracker.until(lambda: f"default/{name}" in services(tracker), name)


def test_the_watched_directory_deleted_and_recreated(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "c.yaml").write_text(text([web()]))
    tracker, stop = Counting(), asyncio.Event()
    source = FileSource([directory], settle_period=0.05, stop_event=stop)

    async def scenario() -> None:
        task = asyncio.create_task(source.run(tracker))
        await tracker.until(lambda: tracker.initialized, "the first read")
        await _seen(tracker, directory / "c.yaml", "probe", [web(), named("probe", "10.96.0.9")])
        shutil.rmtree(directory)
        await asyncio.sleep(0.3)
        directory.mkdir()
        (directory / "c.yaml").write_text(text([web(), named("after", "10.96.0.3")]))
        await tracker.until(lambda: "default/after" in services(tracker), "the recreated directory's content")
        (directory / "c.yaml").write_text(text([web(), named("later", "10.96.0.4")]))
        await tracker.until(lambda: "default/later" in services(tracker), "a later edit")
        stop.set()
        await task

    run(scenario())
    assert services(tracker) == {"default/web", "default/later"}


def test_a_symlinked_directory_swapped(tmp_path: Path) -> None:
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
    (tmp_path / "v1" / "c.yaml").write_text(text([web()]))
    (tmp_path / "v2" / "c.yaml").write_text(text([web(), named("v2", "10.96.0.2")]))
    current = tmp_path / "current"
    current.symlink_to("v1")
    tracker, stop = Counting(), asyncio.Event()
    source = FileSource([current], settle_period=0.05, stop_event=stop)

    async def scenario() -> None:
        task = asyncio.create_task(source.run(tracker))
        await tracker.until(lambda: tracker.initialized, "the first read")
        await _seen(tracker, tmp_path / "v1" / "c.yaml", "probe", [web(), named("probe", "10.96.0.9")])
        # ln -sfn v2 tmp; mv -T tmp current
        (tmp_path / "tmp").symlink_to("v2")
        os.replace(tmp_path / "tmp", current)
        await tracker.until(lambda: "default/v2" in services(tracker), "the new target's content")
        (tmp_path / "v2" / "c.yaml").write_text(text([web(), named("edited", "10.96.0.5")]))
        await tracker.until(lambda: "default/edited" in services(tracker), "an edit in the new target")
        stop.set()
        await task

    run(scenario())
    assert services(tracker) == {"default/web", "default/edited"}


# --- a read that fails to open a file -----------------------------------------------------------------------


def test_a_read_failing_with_too_many_open_files_is_retried_with_backoff(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text([web()]))
    clock, tracker = FakeClock(), ChangeTracker()
    source = FileSource(
        [path], settle_period=0.0, clock=clock, retry=RetryPolicy(initial=2.0, cap=8.0, jitter=0)
    )

    async def scenario() -> list[float | None]:
        await source.reload(tracker)
        path.write_text(text([web(), named("api", "10.96.0.2")]))
        source.changed()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            waits = [await source.step(tracker)]  # EMFILE: retry in 2 s
            clock.now += 2.0
            waits.append(await source.step(tracker))  # EMFILE again: 4 s
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert source.last_error is not None and "Too many open files" in source.last_error
        waits.append(await source.step(tracker))  # not due yet: nothing read, no event needed
        clock.now += 4.0
        waits.append(await source.step(tracker))  # read, applied
        return waits

    assert run(scenario()) == [2.0, 4.0, 4.0, None]
    assert (source.reload_errors, source.reloads) == (2, 2)
    assert services(tracker) == {"default/web", "default/api"}
    assert source.pending_since is None


def test_bad_content_is_not_retried_and_stays_pending(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text([web()]))
    clock, tracker = FakeClock(), ChangeTracker()
    source = FileSource([path], settle_period=0.0, clock=clock)

    async def scenario() -> list[float | None]:
        await source.reload(tracker)
        path.write_text("kind: [\n")
        source.changed()
        seen = clock.now
        waits = [await source.step(tracker)]
        clock.now += 100.0
        waits.append(await source.step(tracker))
        assert source.pending_since == seen
        return waits

    assert run(scenario()) == [None, None]
    assert source.reload_errors == 1
