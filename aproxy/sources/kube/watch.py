"""The list/watch loop of the Kubernetes source: list, then watch, Services and EndpointSlices of all
namespaces.

``KubernetesSource(configuration).run(sink)`` runs one task per resource (a TaskGroup), each in the style of
client-go's reflector and kopf's watcher, forever:

1. list, paged (``limit``/``continue``, one consistent snapshot), and diff the result against the
   ``(namespace, name) -> resourceVersion`` it keeps: new and changed objects are upserted, vanished ones
   deleted, unchanged ones (same resourceVersion) not mentioned. The first complete list is followed by
   ``sink.mark_listed(kind)``; the core applies nothing before both kinds are listed.
2. watch from the list's resourceVersion (``allowWatchBookmarks``, ``timeoutSeconds`` 300-600 s): each line is
   decoded with orjson into a plain dict, trimmed to the fields translation reads (resources.py), and fed to
   the sink. Bookmarks only move the resourceVersion on.
3. when the watch ends (server timeout, stream cut, stall), watch again from the newest resourceVersion seen;
   on 410 Gone (an ERROR event or an HTTP 410), go back to 1: the relist is diffed like any list, so only
   real differences reach the sink (no flush, no re-apply of unchanged objects).

Failures never drop state: the sink keeps the last objects it was given while the source reconnects.
Connection errors, 5xx, 429 and other refusals are retried with tenacity, waiting as the core's
``RetryPolicy`` says (exponential with jitter, capped; a Retry-After header is a lower bound, at most
``WatchLimits.max_retry_after``); 401/403 are logged as an RBAC problem naming the verb and resource
(errors.py), and retried every ``WatchLimits.permission_interval``. The backoff starts over once a watch
delivers something.

Malformed watch lines (not JSON, no type/object, an object without namespace/name/resourceVersion, an
unknown type) are logged, counted in ``malformed_events`` and skipped; they never end the watch.

``follow(resource, feed)`` runs the same loop for one more resource into any ``Feed``: node.py follows this
node's Node object with it. ``snapshot`` lists both kinds once, without a watch (``aproxy plan``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from aproxy.core.backoff import RetryPolicy
from aproxy.sources.base import ListedKind, ObjectSink
from aproxy.sources.kube.client import ApiClient, Configuration
from aproxy.sources.kube.config import CredentialRenewal
from aproxy.sources.kube.errors import (
    RETRYABLE,
    ApiStatusError,
    KubernetesSourceError,
    PermissionDeniedError,
    ResourceExpiredError,
    Status,
    StreamInterruptedError,
    describe,
    raise_for_status,
)
from aproxy.sources.kube.requests import RequestStats, instrument
from aproxy.sources.kube.resources import (
    DEFAULT_LIST_TIMEOUT,
    ENDPOINT_SLICES,
    SERVICES,
    Key,
    Resource,
    identity,
)

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE: Final = 500
DEFAULT_WATCH_TIMEOUT: Final = 300  # seconds; each watch asks for this plus up to as much again (jitter)
# A watch that delivers nothing (not even a bookmark) for this long is presumed stalled and reopened from the
# last resourceVersion. Servers send bookmarks every minute; a false alarm only costs a re-watch.
DEFAULT_STALL_TIMEOUT: Final = 120.0
# A watch that ends cleanly faster than this without a single line counts as a failure, so a server (or
# proxy) that closes every watch at once gets the backoff instead of a busy loop.
MIN_QUIET_WATCH: Final = 1.0
# Far above the largest object etcd stores (1.5 MiB) and aiohttp's default line limit.
MAX_LINE_BYTES: Final = 16 * 1024 * 1024
_EXCERPT: Final = 200  # bytes of a malformed line that go into the log
# Backoff between failed attempts: 0.5 s, 1 s, 2 s, ... (plus up to 1 s of jitter), at most 30 s.
DEFAULT_RETRY: Final = RetryPolicy(initial=0.5, cap=30.0, jitter=1.0)


@dataclass(frozen=True, slots=True)
class WatchLimits:
    """What bends the backoff: a Retry-After (429, some 5xx) is a lower bound, itself at most
    ``max_retry_after``; permission errors (401/403) are retried every ``permission_interval`` seconds,
    whatever the backoff says: an operator has to fix RBAC first."""

    max_retry_after: float = 120.0
    permission_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class Feed:
    """Where one resource's changes go; the list/watch loop knows its consumer only through these."""

    upsert: Callable[[dict[str, Any]], object]
    delete: Callable[[str, str], object]
    listed: Callable[[], object]  # the first complete list has been fed


def _sink_feed(kind: ListedKind, sink: ObjectSink) -> Feed:
    if kind == "services":
        return Feed(sink.upsert_service, sink.delete_service, lambda: sink.mark_listed("services"))
    return Feed(sink.upsert_slice, sink.delete_slice, lambda: sink.mark_listed("endpointslices"))


@dataclass(slots=True)
class _ResourceState:
    """What the source keeps per resource: each object's resourceVersion, not the object."""

    resource: Resource
    versions: dict[Key, str] = field(default_factory=dict)
    resource_version: str = ""  # the newest one seen: the list's, then events' and bookmarks'
    listed: bool = False  # the first complete list was fed and marked
    needs_list: bool = True
    watches: int = 0


class KubernetesSource:
    """Feeds a sink from the API server (see the module docstring); ``run`` until cancelled.

    Counters, plain attributes for metrics: ``events_total`` (by event type, bookmarks included),
    ``relists_total`` (lists after the first complete one), ``watch_restarts_total`` (watches opened after
    the first, per resource), ``errors_total`` (by kind: connection, stream, server, throttled, permission,
    expired, request, protocol, not_found), ``malformed_events``; ``listed`` (both kinds listed once),
    ``last_event_time`` (``time.time()`` of the last list, event or bookmark: staleness) and
    ``last_retry_delay`` (the last backoff chosen, seconds); ``credential_renewals`` and
    ``credential_renewal_failures`` when given a kubeconfig's ``renewal``, which ``run`` keeps running.
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        watch_timeout: int = DEFAULT_WATCH_TIMEOUT,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        list_timeout: float = DEFAULT_LIST_TIMEOUT,
        retry: RetryPolicy = DEFAULT_RETRY,
        limits: WatchLimits | None = None,
        renewal: CredentialRenewal | None = None,
    ) -> None:
        self._configuration = configuration
        self._renewal = renewal
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._stall_timeout = stall_timeout
        self._list_timeout = list_timeout
        self._retry = retry
        self._limits = limits or WatchLimits()
        self._states: dict[ListedKind, _ResourceState] = {
            "services": _ResourceState(SERVICES),
            "endpointslices": _ResourceState(ENDPOINT_SLICES),
        }
        self.events_total: Counter[str] = Counter()
        self.relists_total = 0
        self.watch_restarts_total = 0
        self.errors_total: Counter[str] = Counter()
        self.malformed_events = 0
        self.last_event_time: float | None = None
        self.last_retry_delay: float | None = None
        # The API client's requests, for rest_client_* (requests.py).
        self.request_stats = RequestStats()

    def _client(self) -> ApiClient:
        return instrument(ApiClient(self._configuration), self.request_stats)

    @property
    def listed(self) -> bool:
        """Both Services and EndpointSlices have been listed completely once."""
        return all(state.listed for state in self._states.values())

    def resource_version(self, kind: ListedKind) -> str:
        """The newest resourceVersion seen for ``kind`` (where its next watch starts)."""
        return self._states[kind].resource_version

    def tracked(self, kind: ListedKind) -> int:
        """How many objects of ``kind`` the source knows (and the sink was given)."""
        return len(self._states[kind].versions)

    @property
    def credential_renewals(self) -> int:
        """Renewals that changed the kubeconfig's token (``load_config``'s ``ClusterConfig.renewal``)."""
        return self._renewal.renewals if self._renewal is not None else 0

    @property
    def credential_renewal_failures(self) -> int:
        return self._renewal.failures if self._renewal is not None else 0

    async def run(self, sink: ObjectSink) -> None:
        async with self._client() as client, asyncio.TaskGroup() as group:
            if self._renewal is not None:
                # The node watch shares the configuration: the token renewed here serves it too.
                group.create_task(self._renewal.run(), name="aproxy-credentials")
            for kind, state in self._states.items():
                group.create_task(
                    self._follow(client, state, _sink_feed(kind, sink)), name=f"aproxy-watch-{kind}"
                )

    async def follow(self, resource: Resource, feed: Feed) -> None:
        """Follow one more ``resource`` (node.py: this node's Node) into ``feed`` until cancelled, on a client
        of its own. Retries, bookmarks, 410 relists and counters are the services' and slices'; its list
        never counts towards ``listed``: the services/slices gate does not wait for it."""
        async with self._client() as client:
            await self._follow(client, _ResourceState(resource), feed)

    async def list_once(self, sink: ObjectSink) -> None:
        """One complete paged list of Services and EndpointSlices into ``sink``, each marked listed; no watch
        and no retry: a failure raises a ``KubernetesSourceError``."""
        async with self._client() as client:
            for kind, state in self._states.items():
                await self._list_into(client, state, _sink_feed(kind, sink))

    # --- the loop -------------------------------------------------------------------------------------

    async def _follow(self, client: ApiClient, state: _ResourceState, feed: Feed) -> None:
        while True:
            # A fresh AsyncRetrying per round: a round that got somewhere starts the backoff over.
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(RETRYABLE),
                wait=self._wait,
                before_sleep=lambda retry_state: self._report_retry(state, retry_state),
                reraise=True,
            )
            await retrying(self._round, client, state, feed)

    async def _round(self, client: ApiClient, state: _ResourceState, feed: Feed) -> None:
        """List if needed, then one watch. Returns to watch again; raises to back off first."""
        fresh = state.needs_list
        if fresh:
            await self._list_into(client, state, feed)
        try:
            await self._watch(client, state, feed)
        except ResourceExpiredError as error:
            state.needs_list = True
            if fresh:
                raise  # expired right after a list: back off before listing again
            self.errors_total[error.kind] += 1
            logger.info(
                "watch expired, relisting",
                extra={"resource": state.resource.qualified, "reason": str(error)},
            )

    def _wait(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        if isinstance(error, PermissionDeniedError):
            delay = self._limits.permission_interval
        else:
            delay = self._retry.delay(retry_state.attempt_number)
            if isinstance(error, ApiStatusError) and error.retry_after is not None:
                delay = max(delay, min(error.retry_after, self._limits.max_retry_after))
        self.last_retry_delay = delay
        return delay

    def _report_retry(self, state: _ResourceState, retry_state: RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        delay = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        kind = error.kind if isinstance(error, KubernetesSourceError) else "unknown"
        self.errors_total[kind] += 1
        fields = {
            "resource": state.resource.qualified,
            "error_kind": kind,
            "attempt": retry_state.attempt_number,
            "retry_in": round(delay, 3),
        }
        if isinstance(error, PermissionDeniedError):
            logger.error(str(error), extra=fields)
        else:
            logger.warning(f"{state.resource.qualified}: {error}; retrying", extra=fields)

    # --- list -----------------------------------------------------------------------------------------

    async def _list_into(self, client: ApiClient, state: _ResourceState, feed: Feed) -> None:
        """One complete paged list, diffed into the feed; then mark listed (first time) and watch from it."""
        resource = state.resource
        upsert, delete = feed.upsert, feed.delete
        seen: set[Key] = set()
        token = ""
        while True:
            page = await resource.list_page(client, token, self._page_size, self._list_timeout)
            for item in page.items:
                self._take_listed(item, state, upsert, seen)
            token = page.continue_token
            if not token:
                break
        gone = [key for key in state.versions if key not in seen]
        for key in gone:
            del state.versions[key]
            delete(*key)
        state.resource_version = page.resource_version
        state.needs_list = False
        self.last_event_time = time.time()
        if state.listed:
            self.relists_total += 1
        else:
            state.listed = True
            feed.listed()
        logger.info(
            "listed",
            extra={"resource": resource.qualified, "objects": len(seen), "deleted": len(gone)},
        )

    def _take_listed(
        self,
        item: object,
        state: _ResourceState,
        upsert: Callable[[dict[str, Any]], object],
        seen: set[Key],
    ) -> None:
        ident = identity(item, state.resource.namespaced)
        if isinstance(ident, str):
            self._malformed(state, f"listed object {ident}", orjson.dumps(item))
            return
        key, version = ident
        seen.add(key)
        if state.versions.get(key) != version:
            state.versions[key] = version
            upsert(state.resource.trim(cast(dict[str, Any], item)))

    # --- watch ----------------------------------------------------------------------------------------

    async def _watch(self, client: ApiClient, state: _ResourceState, feed: Feed) -> None:
        resource = state.resource
        if state.watches:
            self.watch_restarts_total += 1
        state.watches += 1
        started = time.monotonic()
        timeout_seconds = int(self._watch_timeout * (1 + random.random()))
        response = await resource.open_watch(
            client, state.resource_version, timeout_seconds, self._stall_timeout
        )
        async with response:
            await raise_for_status(response, "watch", resource.qualified)
            lines, broken = await self._read_stream(response, state, feed)
        if lines == 0 and time.monotonic() - started < MIN_QUIET_WATCH:
            # Nothing at all, at once: back off rather than spin against a server that drops every watch.
            raise StreamInterruptedError(
                f"the {resource.qualified} watch ended at once: {broken or 'no event'}"
            )
        if broken is not None:
            self.errors_total[StreamInterruptedError.kind] += 1
            logger.info(
                "watch stream broke, resuming",
                extra={"resource": resource.qualified, "cause": broken, "from": state.resource_version},
            )

    async def _read_stream(
        self, response: aiohttp.ClientResponse, state: _ResourceState, feed: Feed
    ) -> tuple[int, str | None]:
        """Handle lines until the stream ends: how many, and why it broke (None: a clean end).

        A cut, a reset or a stall (no byte for ``stall_timeout``) ends the stream like the server's own
        timeout does: the next watch resumes from the last event handled whole."""
        upsert, delete = feed.upsert, feed.delete
        lines = 0
        try:
            while line := await response.content.readline(max_line_length=MAX_LINE_BYTES):
                if not line.endswith(b"\n"):
                    return lines, "the stream ended in the middle of a line"
                lines += 1
                self._handle_line(line, state, upsert, delete)
        except (aiohttp.ClientError, TimeoutError) as error:
            return lines, describe(error)
        return lines, None

    def _handle_line(
        self,
        line: bytes,
        state: _ResourceState,
        upsert: Callable[[dict[str, Any]], object],
        delete: Callable[[str, str], object],
    ) -> None:
        """The hot path: one watch event."""
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._malformed(state, "line is not JSON", line)
            return
        event_type = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(event_type, str) or not isinstance(obj, dict):
            if not line.strip():
                return  # a blank keep-alive line
            self._malformed(state, "event without type or object", line)
            return
        if event_type == "ERROR":
            raise Status.of(obj).error("watch", state.resource.qualified)
        if event_type == "BOOKMARK":
            self._bookmark(obj, state, line)
            return
        ident = identity(obj, state.resource.namespaced)
        if isinstance(ident, str):
            self._malformed(state, f"{event_type} object {ident}", line)
            return
        key, version = ident
        if event_type == "ADDED" or event_type == "MODIFIED":
            # An equal resourceVersion is the same object (a replay after a resume): nothing to tell.
            if state.versions.get(key) != version:
                state.versions[key] = version
                upsert(state.resource.trim(obj))
        elif event_type == "DELETED":
            if state.versions.pop(key, None) is not None:
                delete(*key)
        else:
            self._malformed(state, f"unknown event type {event_type!r}", line)
            return
        state.resource_version = version
        self.events_total[event_type] += 1
        self.last_event_time = time.time()

    def _bookmark(self, obj: dict[str, Any], state: _ResourceState, line: bytes) -> None:
        # A bookmark's object is an empty shell with only a resourceVersion: never fed to the sink.
        meta = obj.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version:
            self._malformed(state, "BOOKMARK without resourceVersion", line)
            return
        state.resource_version = version
        self.events_total["BOOKMARK"] += 1
        self.last_event_time = time.time()

    def _malformed(self, state: _ResourceState, reason: str, data: bytes) -> None:
        self.malformed_events += 1
        logger.warning(
            "malformed watch event skipped",
            extra={
                "resource": state.resource.qualified,
                "reason": reason,
                "excerpt": data[:_EXCERPT].decode("utf-8", "replace"),
                "malformed_events": self.malformed_events,
            },
        )


async def snapshot(
    configuration: Configuration, sink: ObjectSink, *, page_size: int = DEFAULT_PAGE_SIZE
) -> None:
    """List Services and EndpointSlices once (paged) into ``sink`` and mark both listed (``aproxy plan``).

    No retry: a failure raises a ``KubernetesSourceError`` whose message is fit for a one-line error.
    """
    await KubernetesSource(configuration, page_size=page_size).list_once(sink)
