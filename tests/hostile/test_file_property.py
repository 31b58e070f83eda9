"""A property of the file source (issue 14): any sequence of writes to a manifest file (whole, truncated,
half-written, with invalid objects, deleted, recreated) ends, once the file is whole and valid again, in the
state a fresh ``aproxy plan`` of that file gives, and never passes through a state with fewer services than
the last whole file had unless that file removed them.

Real files on disk, the real reader and change tracker; time is a fake clock driving ``FileSource.step``,
so a sequence of settle periods and backoffs runs in milliseconds. A half-written or truncated file is one
whose writer finishes within the settle period: the source must never apply it. A whole file is one left
quiet for the settle period: the source must apply it, except that an object it has invalid keeps its last
good version (or stays absent if it never had one).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from aproxy.cli import tracker_from_manifests
from aproxy.core.backoff import RetryPolicy
from aproxy.core.changes import ChangeTracker
from aproxy.core.translate import TranslationContext
from aproxy.sources.file import FileSource
from aproxy.syncer import desired_all
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port

SETTLE = 1.0
RETRY = RetryPolicy(initial=1.0, cap=4.0, jitter=0.0)
QUIET = SETTLE + RETRY.cap  # long enough for any pending read, settle or retry, to be due
CTX = TranslationContext(node_name="node-a", node_addresses=frozenset())
NAMES = ("a", "b", "c", "d", "e")
INVALID_PORT = 70000

# A file: service name -> its port (INVALID_PORT: the core refuses the Service).
Content = dict[str, int]
contents = st.dictionaries(
    st.sampled_from(NAMES), st.sampled_from([80, 81, INVALID_PORT]), max_size=len(NAMES)
)
valid_contents = st.dictionaries(st.sampled_from(NAMES), st.sampled_from([80, 81]), max_size=len(NAMES))
writes = st.one_of(
    st.tuples(st.just("whole"), contents, st.just(0.0)),
    st.tuples(st.just("half"), contents, st.floats(0.0, 1.0)),
    st.tuples(st.just("truncated"), contents, st.just(0.0)),
    st.tuples(st.just("deleted"), st.just({}), st.just(0.0)),
)


def render(content: Content) -> str:
    objects: list[dict[str, Any]] = []
    for index, (name, number) in enumerate(sorted(content.items())):
        objects.append(service(name, cluster_ips=f"10.96.0.{index + 1}", ports=[port("http", number)]))
        objects.append(
            endpoint_slice(
                name, endpoints=[endpoint(f"10.244.0.{index + 1}")], ports=[slice_port("http", 8080)]
            )
        )
    return yaml.safe_dump_all(objects)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def held_names(tracker: ChangeTracker) -> set[str]:
    return {key.name for key in tracker.services()}


class Scenario:
    """The file, the source reading it, and the model: the services the tracker must hold."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "c.yaml"
        self.clock = FakeClock()
        self.tracker = ChangeTracker()
        self.source = FileSource([self.path], settle_period=SETTLE, retry=RETRY, clock=self.clock)
        self.expected: set[str] = set()

    async def write(self, text: str) -> None:
        await asyncio.to_thread(self.path.write_text, text)
        self.source.changed()

    async def settle(self, seconds: float) -> None:
        self.clock.now += seconds
        await self.source.step(self.tracker)

    async def whole(self, content: Content) -> None:
        await self.write(render(content))
        await self.settle(QUIET)
        # Applied: valid objects as written; invalid ones at their last good version if they had one.
        self.expected = {
            name for name, number in content.items() if number != INVALID_PORT or name in self.expected
        }

    async def unfinished(self, text: str, content: Content) -> None:
        """A writer that has written ``text`` so far and finishes (``content``) within the settle period."""
        await self.write(text)
        await self.settle(SETTLE * 0.9)
        assert held_names(self.tracker) == self.expected, "a file being written was applied"
        await self.whole(content)

    async def apply(self, kind: str, content: Content, cut: float) -> None:
        if kind == "whole":
            await self.whole(content)
        elif kind == "half":
            text = render(content)
            await self.unfinished(text[: int(len(text) * cut)], content)
        elif kind == "truncated":
            await self.unfinished("", content)
        else:
            await asyncio.to_thread(self.path.unlink, True)
            self.source.changed()
            await self.settle(QUIET)
        assert held_names(self.tracker) == self.expected, f"after a {kind} write"


@given(first=valid_contents, sequence=st.lists(writes, max_size=8), last=valid_contents)
@settings(max_examples=60, deadline=None)
def test_any_sequence_of_writes_ends_in_a_fresh_plan_and_never_loses_services(
    first: Content, sequence: list[tuple[str, Content, float]], last: Content
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        scenario = Scenario(Path(directory))

        async def run() -> None:
            scenario.path.write_text(render(first))
            assert await scenario.source.reload(scenario.tracker)
            scenario.expected = set(first)
            for kind, content, cut in sequence:
                await scenario.apply(kind, content, cut)
            await scenario.whole(last)  # the file whole and valid again

        asyncio.run(run())
        fresh = tracker_from_manifests([scenario.path])
        assert desired_all(scenario.tracker, CTX) == desired_all(fresh, CTX)
        assert held_names(scenario.tracker) == set(last)
        assert scenario.source.objects_held == 0
        assert scenario.source.pending_since is None
