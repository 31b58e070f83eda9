"""The file source: initial feed, diffs on re-read, bad reads kept out, and the real watchfiles path."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import watchfiles
import yaml

from aproxy.core.changes import ChangeTracker
from aproxy.core.model import ServiceKey
from aproxy.sources.base import ListedKind, ObjectSink, Source
from aproxy.sources.file import FileSource
from aproxy.sources.file_watch import WatchedPaths
from tests.sources.calls import CallLog

T = TypeVar("T")
TIMEOUT = 20.0  # seconds; a bound against hanging, never an assertion


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


@dataclass
class RecordingSink(CallLog):
    """Records every call as (method, "namespace/name" or kind); keeps the last raw object fed per name."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def upsert_service(self, raw: dict[str, Any]) -> None:
        self._upsert("upsert_service", raw)

    def delete_service(self, namespace: str, name: str) -> None:
        self._record("delete_service", f"{namespace}/{name}")

    def upsert_slice(self, raw: dict[str, Any]) -> None:
        self._upsert("upsert_slice", raw)

    def delete_slice(self, namespace: str, name: str) -> None:
        self._record("delete_slice", f"{namespace}/{name}")

    def mark_listed(self, kind: ListedKind) -> None:
        self._record("mark_listed", kind)

    def _upsert(self, method: str, raw: dict[str, Any]) -> None:
        name = f"{raw['metadata']['namespace']}/{raw['metadata']['name']}"
        self.objects[name] = raw
        self._record(method, name)


def service(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }


def endpoint_slice(service_name: str, *addresses: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-1",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address]} for address in addresses],
    }


def cluster() -> list[dict[str, Any]]:
    return [
        service("web", "10.96.0.10"),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}},
        service("api", "10.96.0.11"),
        endpoint_slice("web", "10.244.1.5", "10.244.2.6"),
        endpoint_slice("api", "10.244.1.7"),
    ]


def write(path: Path, objects: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump_all(objects))


INITIAL_FEED = [
    ("upsert_service", "shop/web"),
    ("upsert_service", "shop/api"),
    ("upsert_slice", "shop/web-1"),
    ("upsert_slice", "shop/api-1"),
    ("mark_listed", "services"),
    ("mark_listed", "endpointslices"),
]


def test_initial_feed_then_listed_marks(tmp_path: Path) -> None:
    write(tmp_path / "c.yaml", cluster())
    source, sink = FileSource([tmp_path / "c.yaml"]), RecordingSink()
    assert not source.listed
    assert run(source.reload(sink)) is True
    assert sink.take() == INITIAL_FEED
    assert source.listed
    assert (source.reloads, source.reload_errors) == (1, 0)


def _edited(edit: str) -> list[dict[str, Any]]:
    objects = cluster()
    if edit == "unchanged":
        pass
    elif edit == "endpoint-added":
        objects[3]["endpoints"].append({"addresses": ["10.244.3.8"]})
    elif edit == "service-changed":
        objects[2]["spec"]["ports"][0]["port"] = 8443
    elif edit == "slice-removed":
        del objects[4]
    elif edit == "service-and-slice-removed":
        del objects[4], objects[2]
    elif edit == "object-added":
        objects.append(service("new", "10.96.0.12"))
    elif edit == "other-kind-changed":
        objects[1]["spec"] = {"replicas": 3}
    elif edit == "reordered":
        objects.reverse()
    return objects


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param("unchanged", [], id="unchanged-reread-emits-nothing"),
        pytest.param("reordered", [], id="reordering-emits-nothing"),
        pytest.param("other-kind-changed", [], id="ignored-kind-change-emits-nothing"),
        pytest.param("endpoint-added", [("upsert_slice", "shop/web-1")], id="one-endpoint-one-slice-upsert"),
        pytest.param("service-changed", [("upsert_service", "shop/api")], id="one-service-one-upsert"),
        pytest.param("slice-removed", [("delete_slice", "shop/api-1")], id="removed-slice-one-delete"),
        pytest.param(
            "service-and-slice-removed",
            [("delete_slice", "shop/api-1"), ("delete_service", "shop/api")],
            id="removed-service-deletes-slice-first",
        ),
        pytest.param("object-added", [("upsert_service", "shop/new")], id="added-object-one-upsert"),
    ],
)
def test_reread_emits_only_the_diff(tmp_path: Path, edit: str, expected: list[tuple[str, str]]) -> None:
    path = tmp_path / "c.yaml"
    write(path, cluster())
    source, sink = FileSource([path]), RecordingSink()

    async def scenario() -> None:
        await source.reload(sink)
        sink.take()
        write(path, _edited(edit))
        assert await source.reload(sink) is True

    run(scenario())
    assert sink.take() == expected


def test_upsert_carries_the_new_content(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write(path, cluster())
    source, sink = FileSource([path]), RecordingSink()

    async def scenario() -> None:
        await source.reload(sink)
        write(path, _edited("endpoint-added"))
        await source.reload(sink)

    run(scenario())
    endpoints = sink.objects["shop/web-1"]["endpoints"]
    assert [e["addresses"][0] for e in endpoints] == ["10.244.1.5", "10.244.2.6", "10.244.3.8"]


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda path: path.write_text("kind: Service\nmetadata: {name: [\n"), id="syntax-error"),
        pytest.param(lambda path: path.write_text("'just a string'\n"), id="not-a-mapping"),
        pytest.param(lambda path: path.unlink(), id="file-removed"),
    ],
)
def test_bad_read_keeps_last_good_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, break_it: Callable[[Path], object]
) -> None:
    path = tmp_path / "c.yaml"
    write(path, cluster())
    source, sink = FileSource([path]), RecordingSink()
    good_then_fixed = cluster()
    good_then_fixed[3]["endpoints"].pop()

    async def scenario() -> list[bool]:
        results = [await source.reload(sink)]
        sink.take()
        break_it(path)
        results.append(await source.reload(sink))
        results.append(await source.reload(sink))
        assert sink.take() == [], "a bad read must emit nothing, least of all deletes"
        write(path, good_then_fixed)
        results.append(await source.reload(sink))
        return results

    with caplog.at_level(logging.ERROR, logger="aproxy.sources.file"):
        assert run(scenario()) == [True, False, False, True]
    assert sink.take() == [("upsert_slice", "shop/web-1")]
    assert (source.reloads, source.reload_errors, source.last_error) == (2, 2, None)
    failures = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [record.__dict__["reload_errors"] for record in failures] == [1, 2]
    assert all(str(path) in record.__dict__["error"] for record in failures)


def test_first_read_failing_marks_nothing_listed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kind: [\n")
    source, sink = FileSource([path]), RecordingSink()

    async def scenario() -> None:
        assert await source.reload(sink) is False
        assert sink.take() == []
        assert not source.listed
        assert source.last_error is not None and source.last_error.startswith(f"{path}: invalid YAML")
        write(path, cluster())
        assert await source.reload(sink) is True

    run(scenario())
    assert sink.take() == INITIAL_FEED


def test_emptied_directory_deletes_everything(tmp_path: Path) -> None:
    # Unlike a broken file, a directory whose manifests were removed is a real, good read of nothing.
    write(tmp_path / "c.yaml", cluster())
    source, sink = FileSource([tmp_path]), RecordingSink()

    async def scenario() -> None:
        await source.reload(sink)
        sink.take()
        (tmp_path / "c.yaml").rename(tmp_path / "c.yaml.disabled")
        assert await source.reload(sink) is True

    run(scenario())
    assert sorted(sink.take()) == [
        ("delete_service", "shop/api"),
        ("delete_service", "shop/web"),
        ("delete_slice", "shop/api-1"),
        ("delete_slice", "shop/web-1"),
    ]


def _write_in_place(path: Path, objects: list[dict[str, Any]]) -> None:
    write(path, objects)


def _write_and_rename(path: Path, objects: list[dict[str, Any]]) -> None:
    # What editors and the ConfigMap writer do: a new file renamed over the old one.
    temporary = path.with_name(path.name + ".tmp")
    write(temporary, objects)
    os.replace(temporary, path)


@pytest.mark.parametrize(
    "save",
    [
        pytest.param(_write_in_place, id="file-written-in-place"),
        pytest.param(_write_and_rename, id="file-replaced-by-rename"),
    ],
)
def test_watchfiles_event_triggers_a_reread(
    tmp_path: Path, save: Callable[[Path, list[dict[str, Any]]], None]
) -> None:
    path = tmp_path / "c.yaml"
    write(path, cluster())
    stop = asyncio.Event()
    source = FileSource([path], debounce_ms=50, settle_period=0.05, stop_event=stop)
    sink = RecordingSink()
    edited = _edited("endpoint-added")

    async def scenario() -> None:
        task = asyncio.create_task(source.run(sink))
        await sink.until(lambda: len(sink.calls) == len(INITIAL_FEED))
        sink.take()
        # The watch starts some time after the first read and its start is not observable: save the same edit
        # until an event lands. Re-reads of identical content emit nothing, so the counts stay exact.
        while not sink.calls:
            save(path, edited)
            try:
                await asyncio.wait_for(sink.until(lambda: bool(sink.calls)), 0.5)
            except TimeoutError:
                continue
        stop.set()
        await task

    run(scenario())
    assert sink.take() == [("upsert_slice", "shop/web-1")]
    assert source.reloads >= 2
    assert source.reload_errors == 0


def test_run_stops_on_cancellation(tmp_path: Path) -> None:
    write(tmp_path / "c.yaml", cluster())
    recording = RecordingSink()
    # Typed as the protocols the daemon holds them by (mypy checks that both fit).
    source: Source = FileSource([tmp_path], debounce_ms=50)
    sink: ObjectSink = recording

    async def scenario() -> bool:
        task = asyncio.create_task(source.run(sink))
        await recording.until(lambda: len(recording.calls) == len(INITIAL_FEED))
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert run(scenario()) is True
    assert recording.calls == INITIAL_FEED


@pytest.mark.parametrize(
    ("event", "relevant"),
    [
        pytest.param("src/c.yaml", True, id="the-source-file"),
        pytest.param("src/other.yaml", False, id="a-sibling-file"),
        pytest.param("src/.c.yaml.swp", False, id="editor-swap-file"),
        pytest.param("src/..data", True, id="configmap-data-swap"),
        pytest.param("dir/new.yml", True, id="manifest-in-source-directory"),
        pytest.param("dir/new.json", True, id="json-in-source-directory"),
        pytest.param("dir/notes.txt", False, id="non-manifest-in-source-directory"),
        pytest.param("dir/.hidden.yaml", False, id="hidden-file-in-source-directory"),
        pytest.param("dir/sub/x.yaml", False, id="subdirectory-not-watched"),
    ],
)
def test_watch_filter(tmp_path: Path, event: str, relevant: bool) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dir").mkdir()
    (tmp_path / "src" / "c.yaml").write_text("")
    watched = WatchedPaths.of([tmp_path / "src" / "c.yaml", tmp_path / "dir"])
    assert watched.roots == (tmp_path, tmp_path / "dir", tmp_path / "src")
    assert watched.relevant(watchfiles.Change.modified, str(tmp_path / event)) is relevant


def test_symlinked_file_watches_its_target_too(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "real" / "c.yaml").write_text("")
    (tmp_path / "etc" / "c.yaml").symlink_to(tmp_path / "real" / "c.yaml")
    watched = WatchedPaths.of([tmp_path / "etc" / "c.yaml"])
    assert watched.roots == (tmp_path, tmp_path / "etc", tmp_path / "real")
    assert watched.relevant(watchfiles.Change.modified, str(tmp_path / "real" / "c.yaml"))


def test_stale_resource_version_does_not_hide_an_edit_from_the_tracker(tmp_path: Path) -> None:
    # A hand-edited `kubectl get -o yaml` dump keeps its resourceVersion; the tracker must still see the edit.
    path = tmp_path / "c.yaml"
    objects = cluster()
    for obj in objects:
        obj["metadata"]["resourceVersion"] = "7"
    write(path, objects)
    tracker = ChangeTracker()
    source = FileSource([path])

    async def scenario() -> set[ServiceKey]:
        await source.reload(tracker)
        assert tracker.initialized
        assert tracker.take_dirty() == {ServiceKey("shop", "web"), ServiceKey("shop", "api")}
        objects[3]["endpoints"].append({"addresses": ["10.244.3.8"]})
        write(path, objects)
        await source.reload(tracker)
        return tracker.take_dirty()

    assert run(scenario()) == {ServiceKey("shop", "web")}


def test_resource_version_is_not_fed_and_not_a_change(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    objects = cluster()
    objects[0]["metadata"]["resourceVersion"] = "1"
    write(path, objects)
    source, sink = FileSource([path]), RecordingSink()

    async def scenario() -> None:
        await source.reload(sink)
        sink.take()
        objects[0]["metadata"]["resourceVersion"] = "2"
        write(path, objects)
        await source.reload(sink)

    run(scenario())
    assert sink.take() == []
    assert "resourceVersion" not in sink.objects["shop/web"]["metadata"]
