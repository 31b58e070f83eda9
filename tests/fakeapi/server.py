"""A faithful test Kubernetes API server for the parts of the API aproxy uses, over real HTTP on loopback.

Serves GET list / watch / get for v1 Services, discovery.k8s.io/v1 EndpointSlices and v1 Nodes, with the real
server's behaviour where a client can observe it:

- lists: `{kind: XList, apiVersion, metadata: {resourceVersion}, items}` whose items carry no kind/apiVersion;
  the list's resourceVersion is the global revision, not the newest item's; `limit`/`continue` pages are a
  consistent snapshot (continue tokens encode the snapshot revision and the next key, base64 JSON as the real
  server's) and a continue token older than the history answers 410 Expired with a fresh token;
  `labelSelector` and `fieldSelector` with the real grammar; `resourceVersion`/`resourceVersionMatch` rules.
- watches: a chunked `application/json` stream of one JSON event per line; from resourceVersion N every event
  after N (history permitting, else one ERROR event with a 410 Expired Status, then the end), from ""/"0" a
  synthetic ADDED per object first; objects entering or leaving a selector arrive as ADDED/DELETED like the
  watch cache makes them; BOOKMARKs (zero-value objects with only the resourceVersion set) every
  `bookmark_interval` and `bookmark_before_timeout` seconds before the server-side timeout;
  `sendInitialEvents`.
- errors: metav1.Status bodies worded like the real ones (403 names the user, verb, resource, group, scope).

The test-side handle (create/update/delete, fault injection, the request log) is synchronous and must be
called on the server's event loop (from a test coroutine or between `run()` calls).
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson
from aiohttp import web
from kubernetes_asyncio.client import ApiClient, Configuration

from tests.fakeapi import status as statuses
from tests.fakeapi.protocol import (
    ListOptions,
    Target,
    bool_param,
    decode_continue,
    discovery_documents,
    encode_continue,
    list_options,
    parse_revision,
    route,
)
from tests.fakeapi.resources import Obj, ResourceType, resolve
from tests.fakeapi.selectors import FieldSelector, LabelSelector
from tests.fakeapi.status import DEFAULT_USER, Status, StatusError
from tests.fakeapi.store import (
    ADDED,
    DELETED,
    MODIFIED,
    Event,
    ExpiredError,
    Record,
    Store,
    typed_body,
    with_resource_version,
)

T = TypeVar("T")

# The real server's --min-request-timeout is 1800 s; it picks a watch timeout in [1800, 3600) when the client
# gives none. One fixed value is enough here.
DEFAULT_WATCH_TIMEOUT = 1800.0
# The cacher's bookmarkFrequency and its "2 s before the deadline" bookmark.
DEFAULT_BOOKMARK_INTERVAL = 60.0
DEFAULT_BOOKMARK_BEFORE_TIMEOUT = 2.0
# How long a list for a resourceVersion newer than the store waits for it before answering 504.
DEFAULT_TOO_LARGE_WAIT = 3.0
DEFAULT_RUN_TIMEOUT = 10.0
# Queued lines are written together up to this size (one chunk), as the real server flushes only when idle.
_WRITE_BATCH_BYTES = 256 * 1024


class CutMode(enum.Enum):
    """How `close_streams_mid_event` ends a stream after writing half a line."""

    ABORT = "abort"  # the connection closes without the chunked terminator: a dropped connection
    EOF = "eof"  # the chunked stream ends cleanly right after the partial line


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the server received (failed and faulted ones too)."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str  # list, watch, get, discovery, unknown
    resource: str | None  # plural, e.g. "services"
    namespace: str | None = None
    name: str | None = None
    token: str | None = None  # the bearer token of its Authorization header


@dataclass(slots=True)
class _Failure:
    remaining: int
    status: Status
    verb: str | None
    resource: str | None

    def applies(self, record: RequestRecord) -> bool:
        return self.verb in (None, record.verb) and self.resource in (None, record.resource)


class _End:
    """Queue sentinel: end the stream cleanly once everything queued before it is written."""


_END = _End()


@dataclass(frozen=True, slots=True)
class _Selection:
    """What a list or watch asks for: a resource, maybe one namespace, label and field selectors."""

    resource: ResourceType
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector

    def passes(self, record: Record) -> bool:
        obj = record.obj
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels.matches(record.labels()) and self.fields.matches(self.resource.fields(obj))


@dataclass(eq=False, slots=True)
class _Watch:
    """One open watch stream: what it selects and the lines waiting to be written to it."""

    selection: _Selection
    allow_bookmarks: bool
    after: int = 0  # only events with a newer revision are sent (the cacheWatcher's resourceVersion)
    queue: asyncio.Queue[bytes | _End] = field(default_factory=asyncio.Queue)
    cut: CutMode | None = None
    ending: bool = False

    @property
    def resource(self) -> ResourceType:
        return self.selection.resource

    def convert(self, event: Event) -> tuple[str, Record] | None:
        """The watch cache's convertToWatchEvent: selector transitions become ADDED/DELETED."""
        passes = self.selection.passes
        current_passes = event.type != DELETED and passes(event.current)
        previous_passes = event.previous is not None and passes(event.previous)
        if current_passes and previous_passes:
            return MODIFIED, event.current
        if current_passes:
            return ADDED, event.current
        if previous_passes and event.previous is not None:
            if event.type == DELETED:
                return DELETED, event.current
            return DELETED, with_resource_version(event.previous, event.revision)
        return None


class _Changes:
    """Wakes coroutines waiting for the server's state (revision, requests, watches) to reach a predicate."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


def _decode(body: bytes) -> Obj:
    """A fresh copy of a stored object for the test (mutating it cannot change the store)."""
    obj: Obj = orjson.loads(body)
    return obj


def _json_line(obj: object) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _event_line(event_type: str, body: bytes) -> bytes:
    return b'{"type":"%s","object":%s}\n' % (event_type.encode(), body)


def _error_line(failure: Status) -> bytes:
    return _event_line("ERROR", orjson.dumps(failure.to_dict()))


class FakeApiServer:
    """The server and its test-side handle. Start with `async with FakeApiServer() as api:` or `start()`."""

    def __init__(
        self,
        *,
        history_limit: int = 1000,
        initial_resource_version: int = 1000,
        apply_defaults: bool = True,
        bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
        bookmark_before_timeout: float = DEFAULT_BOOKMARK_BEFORE_TIMEOUT,
        watch_timeout: float = DEFAULT_WATCH_TIMEOUT,
        watch_buffer_limit: int | None = None,
        too_large_wait: float = DEFAULT_TOO_LARGE_WAIT,
        user: str = DEFAULT_USER,
        runner: asyncio.Runner | None = None,
    ) -> None:
        self.store = Store(
            initial_revision=initial_resource_version,
            history_limit=history_limit,
            apply_defaults=apply_defaults,
        )
        # Tunables, read on every use so a test may change them on a running server.
        self.bookmark_interval = bookmark_interval
        self.bookmark_before_timeout = bookmark_before_timeout
        self.watch_timeout = watch_timeout
        self.watch_buffer_limit = watch_buffer_limit
        self.too_large_wait = too_large_wait
        self.user = user
        self._loop_runner = runner
        self._requests: list[RequestRecord] = []
        self._failures: list[_Failure] = []
        self._forbidden: set[tuple[str, str]] = set()
        self._tokens: frozenset[str] | None = None  # None: credentials are not checked
        self._expire_watches: list[str | None] = []
        self._watches: set[_Watch] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._changes = _Changes()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port = 0

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a watch handler is cancelled when its client goes away, as the real server's
        # request context is.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen(0)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", port)
        await self._site.start()
        self._port = self._site.port

    async def stop(self) -> None:
        self._flowing.set()
        for watch in list(self._watches):
            self._end(watch)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def configuration(self) -> Configuration:
        """A kubernetes_asyncio Configuration for this server: plain HTTP, no credentials."""
        return Configuration(host=self.url)

    def api_client(self) -> ApiClient:
        """A new ApiClient for this server; use `async with` (it owns an aiohttp session)."""
        return ApiClient(configuration=self.configuration())

    def write_kubeconfig(
        self, path: Path, token: str = "fake-token", *, user: Mapping[str, Any] | None = None
    ) -> Path:
        """A kubeconfig naming this server (JSON is valid YAML), for code that takes `--kubeconfig PATH`.

        Its user has ``token``, or is ``user`` (a kubeconfig user entry: tokenFile, exec, ...). The server
        ignores credentials unless a test calls ``require_tokens``.
        """
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fakeapi", "cluster": {"server": self.url}}],
            "users": [{"name": "aproxy", "user": dict(user) if user is not None else {"token": token}}],
            "contexts": [{"name": "fakeapi", "context": {"cluster": "fakeapi", "user": "aproxy"}}],
            "current-context": "fakeapi",
        }
        path.write_bytes(orjson.dumps(kubeconfig, option=orjson.OPT_INDENT_2))
        return path

    def run(self, coro: Awaitable[T], timeout: float = DEFAULT_RUN_TIMEOUT) -> T:
        """Run a coroutine on the server's loop (fixture-owned servers), failing after `timeout` seconds."""
        if self._loop_runner is None:
            raise RuntimeError("this server has no loop runner: use it inside `async with FakeApiServer()`")
        return self._loop_runner.run(_bounded(coro, timeout))

    # --- objects --------------------------------------------------------------------------------------

    @property
    def current_rv(self) -> int:
        """The global resourceVersion: the revision of the newest write to any resource."""
        return self.store.revision

    @property
    def history_limit(self) -> int:
        return self.store.history_limit

    @history_limit.setter
    def history_limit(self, limit: int) -> None:
        self.store.history_limit = limit

    def create(self, kind: str, obj: Obj) -> Obj:
        """Store a new object (defaulted like the real server); returns it with uid and resourceVersion."""
        return self._dispatch(self.store.create(resolve(kind), obj))

    def update(self, kind: str, obj: Obj) -> Obj:
        """Replace an object; a no-op update keeps its resourceVersion and sends no event, like the server."""
        resource = resolve(kind)
        event = self.store.update(resource, obj)
        if event is None:
            metadata = obj["metadata"]
            record = self.store.get(resource, metadata.get("namespace") or "default", metadata["name"])
            assert record is not None
            return _decode(record.body)
        return self._dispatch(event)

    def apply(self, kind: str, obj: Obj) -> Obj:
        """Create or update."""
        metadata = obj["metadata"]
        exists = self.store.get(resolve(kind), metadata.get("namespace") or "default", metadata["name"])
        return self.update(kind, obj) if exists else self.create(kind, obj)

    def apply_many(self, kind: str, objs: Iterable[Obj]) -> list[Obj]:
        return [self.apply(kind, obj) for obj in objs]

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj:
        """Delete; watchers get DELETED with the last state and a new resourceVersion. Returns that state."""
        return self._dispatch(self.store.delete(resolve(kind), namespace, name))

    def delete_many(self, kind: str, keys: Iterable[tuple[str | None, str]]) -> int:
        count = 0
        for namespace, name in keys:
            self.delete(kind, namespace, name)
            count += 1
        return count

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        record = self.store.get(resolve(kind), namespace or "default", name)
        return None if record is None else _decode(record.body)

    def objects(self, kind: str) -> list[Obj]:
        return [_decode(record.body) for _, record in self.store.records(resolve(kind))]

    def compact(self, keep: int = 0) -> int:
        """Drop the history but the newest `keep` events: watches from older revisions get 410. New floor."""
        return self.store.compact(keep)

    def _dispatch(self, event: Event) -> Obj:
        # Encode each distinct line once for all watchers; a DELETED for an object leaving a selector is the
        # previous state at this event's revision, the same for every watcher.
        lines: dict[tuple[str, bool], bytes] = {}
        for watch in list(self._watches):
            if watch.resource is not event.resource or event.revision <= watch.after:
                continue
            converted = watch.convert(event)
            if converted is None:
                continue
            event_type, record = converted
            cache_key = (event_type, record is event.current)
            line = lines.get(cache_key)
            if line is None:
                line = _event_line(event_type, typed_body(event.resource, record))
                lines[cache_key] = line
            self._enqueue(watch, line)
        self._changes.notify()
        return _decode(event.current.body)

    def _enqueue(self, watch: _Watch, line: bytes) -> None:
        if watch.ending:
            return
        limit = self.watch_buffer_limit
        if limit is not None and watch.queue.qsize() >= limit:
            # The cacher closes a watcher that cannot keep up; the client must re-watch from its last RV.
            while not watch.queue.empty():
                watch.queue.get_nowait()
            self._end(watch)
            return
        watch.queue.put_nowait(line)

    def _end(self, watch: _Watch) -> None:
        if not watch.ending:
            watch.ending = True
            watch.queue.put_nowait(_END)

    # --- streams and faults ---------------------------------------------------------------------------

    def bookmark_now(self) -> int:
        """Queue a BOOKMARK at the current revision on every watch that allows bookmarks; how many."""
        count = 0
        for watch in list(self._watches):
            if watch.allow_bookmarks:
                self._enqueue(watch, self._bookmark_line(watch.resource))
                count += 1
        return count

    def send_raw_line(self, data: bytes) -> int:
        """Write `data` (a newline is added if missing) as its own line on every active watch; how many."""
        line = data if data.endswith(b"\n") else data + b"\n"
        for watch in list(self._watches):
            self._enqueue(watch, line)
        return len(self._watches)

    def close_streams_mid_event(self, mode: CutMode = CutMode.ABORT) -> int:
        """Arm every active watch: the next line it writes is cut in half, then the stream ends per `mode`."""
        for watch in self._watches:
            watch.cut = mode
        return len(self._watches)

    def end_streams(self) -> int:
        """End every active watch cleanly after what is queued, like a server-side timeout; how many."""
        for watch in list(self._watches):
            self._end(watch)
        return len(self._watches)

    def stall_streams(self) -> None:
        """Stop writing on watches without closing them; new watches hang before their response headers."""
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    def fail_next(
        self,
        n: int,
        status: int = 500,
        retry_after: int | None = None,
        *,
        verb: str | None = None,
        resource: str | None = None,
        message: str = "injected failure",
    ) -> None:
        """Answer the next `n` matching requests (any, or of one verb/resource) with `status` and a Status."""
        plural = resolve(resource).plural if resource else None
        self._failures.append(_Failure(n, statuses.injected(status, retry_after, message), verb, plural))

    def expire_next_watch(self, resource: str | None = None) -> None:
        """The next watch (of `resource`, or any) gets a 410 Expired ERROR event instead of events."""
        self._expire_watches.append(resolve(resource).plural if resource else None)

    def forbid(self, resource: str, verb: str = "*") -> None:
        """Answer `verb` (list, watch, get, or * for all) on `resource` with 403 Forbidden."""
        self._forbidden.add((resolve(resource).plural, verb))

    def allow(self, resource: str, verb: str = "*") -> None:
        self._forbidden.discard((resolve(resource).plural, verb))

    def require_tokens(self, *tokens: str) -> None:
        """Answer 401 Unauthorized to every new request whose bearer token is not one of ``tokens``, as the
        real server's authentication does before anything else; no tokens: accept any again (the default).
        Streams already open are not cut: the real server checks credentials once per request."""
        self._tokens = frozenset(tokens) if tokens else None

    async def go_down(self) -> None:
        """Stop listening and drop every connection: clients get connection refused until `come_back()`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server if self._runner is not None else None
        for connection in server.connections if server is not None else []:
            if connection.transport is not None:
                connection.transport.abort()

    async def come_back(self) -> None:
        """Listen again on the same port."""
        if self._site is None:
            await self._listen(self._port)

    # --- observation ----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        return list(self._requests)

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        plural = resolve(resource).plural if resource else None
        return sum(
            1
            for record in self._requests
            if verb in (None, record.verb) and plural in (None, record.resource)
        )

    def clear_requests(self) -> None:
        self._requests.clear()

    def active_watches(self, resource: str | None = None) -> int:
        plural = resolve(resource).plural if resource else None
        return sum(1 for watch in self._watches if plural in (None, watch.resource.plural))

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until `predicate()` holds; re-checked after every request, write, and watch start or end."""
        await self._changes.until(predicate)

    async def wait_for_watches(self, count: int, resource: str | None = None) -> None:
        """Until at least `count` watches (of `resource`) are open and registered."""
        await self.wait_until(lambda: self.active_watches(resource) >= count)

    async def wait_for_requests(
        self, count: int, verb: str | None = None, resource: str | None = None
    ) -> None:
        """Until the request log holds at least `count` requests (of `verb`, of `resource`)."""
        await self.wait_until(lambda: self.count(verb, resource) >= count)

    # --- HTTP -----------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        target = route(request.path)
        record = self._record(request, target)
        try:
            self._admit(request, record, target)
            if target.verb == "discovery":
                return self._discovery(request.path)
            assert target.resource is not None
            if target.verb == "item":
                assert target.name is not None
                return self._get(target.resource, target.namespace, target.name)
            options = list_options(request.query, target.resource)
            if options.watch:
                return await self._watch(request, target.resource, target.namespace, options)
            return await self._list(target.resource, target.namespace, options)
        except StatusError as error:
            return _status_response(error.status)

    def _record(self, request: web.Request, target: Target) -> RequestRecord:
        verb = target.verb
        if verb == "collection":
            verb = "watch" if bool_param(request.query.get("watch")) else "list"
        elif verb == "item":
            verb = "get"
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=dict(request.query.items()),
            verb=verb,
            resource=target.resource.plural if target.resource else None,
            namespace=target.namespace,
            name=target.name,
            token=_bearer_token(request.headers.get("Authorization", "")),
        )
        self._requests.append(record)
        self._changes.notify()
        return record

    def _admit(self, request: web.Request, record: RequestRecord, target: Target) -> None:
        if self._tokens is not None and record.token not in self._tokens:
            raise StatusError(statuses.unauthorized())
        for failure in self._failures:
            if failure.applies(record):
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                raise StatusError(failure.status)
        if target.verb == "unknown":
            raise StatusError(statuses.path_not_found())
        if request.method != "GET":
            raise StatusError(statuses.method_not_allowed())
        accept = request.headers.get("Accept", "")
        if accept and not any(media in accept for media in ("application/json", "*/*", "application/*")):
            raise StatusError(statuses.not_acceptable(accept))
        resource = target.resource
        if resource is not None and (
            (resource.plural, record.verb) in self._forbidden or (resource.plural, "*") in self._forbidden
        ):
            raise StatusError(
                statuses.forbidden(resource, record.verb, target.namespace, target.name or "", self.user)
            )

    def _get(self, resource: ResourceType, namespace: str | None, name: str) -> web.Response:
        record = self.store.get(resource, namespace, name)
        if record is None:
            raise StatusError(statuses.not_found(resource, name))
        return _json_response(typed_body(resource, record) + b"\n")

    # --- list -----------------------------------------------------------------------------------------

    async def _list(
        self, resource: ResourceType, namespace: str | None, options: ListOptions
    ) -> web.Response:
        revision, start = await self._list_revision(options)
        records = self.store.records(resource, revision if revision != self.current_rv else None)
        selection = _Selection(resource, namespace, options.labels, options.fields)
        prefix = f"{namespace}/" if namespace is not None and resource.namespaced else ""
        candidates = [(key, record) for key, record in records if key.startswith(prefix) and key >= start]
        items: list[bytes] = []
        last_index = len(candidates) - 1
        for index, (_, record) in enumerate(candidates):
            if selection.passes(record):
                items.append(record.body)
                if options.limit and len(items) == options.limit:
                    last_index = index
                    break
        metadata: Obj = {"resourceVersion": str(revision)}
        remaining = len(candidates) - 1 - last_index
        if remaining > 0:
            # Like etcd: more keys after the page means a continue token, even if none of them match.
            metadata["continue"] = encode_continue(revision, candidates[last_index][0] + "\x00")
            if options.labels.empty and options.fields.empty:
                metadata["remainingItemCount"] = remaining
        head = b'{"kind":"%s","apiVersion":"%s","metadata":%s,"items":[' % (
            resource.list_kind.encode(),
            resource.api_version.encode(),
            orjson.dumps(metadata),
        )
        return _json_response(head + b",".join(items) + b"]}\n")

    async def _list_revision(self, options: ListOptions) -> tuple[int, str]:
        """The revision a list is served at, and the first key (from a continue token)."""
        if options.continue_token:
            revision, start = decode_continue(options.continue_token)
            if revision == -1:  # an inconsistent continuation handed out with a 410: read the latest
                return self.current_rv, start
            if revision < self.store.floor:
                fresh = encode_continue(-1, start)
                raise StatusError(statuses.expired(statuses.CONTINUE_EXPIRED, continue_token=fresh))
            return revision, start
        if options.resource_version in ("", "0"):
            return self.current_rv, ""
        requested = parse_revision(options.resource_version)
        exact = options.resource_version_match == "Exact" or (
            not options.resource_version_match and options.limit > 0
        )
        if requested > self.current_rv:
            await self._wait_for_revision(requested)
        if not exact:
            return self.current_rv, ""
        if requested < self.store.floor:
            raise StatusError(statuses.too_old_resource_version(requested, self.store.floor))
        return requested, ""

    async def _wait_for_revision(self, requested: int) -> None:
        try:
            async with asyncio.timeout(self.too_large_wait):
                await self._changes.until(lambda: self.current_rv >= requested)
        except TimeoutError:
            raise StatusError(statuses.too_large_resource_version(requested, self.current_rv)) from None

    # --- watch ----------------------------------------------------------------------------------------

    async def _watch(
        self, request: web.Request, resource: ResourceType, namespace: str | None, options: ListOptions
    ) -> web.StreamResponse:
        # A stalled server does not even answer the headers of a new watch.
        await self._flowing.wait()
        response = web.StreamResponse(status=200, headers=_headers())
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        await response.prepare(request)
        selection = _Selection(resource, namespace, options.labels, options.fields)
        watch = _Watch(selection, options.allow_bookmarks)
        self._open(watch, options)
        self._changes.notify()
        loop = asyncio.get_running_loop()
        timeout = options.timeout_seconds if options.timeout_seconds > 0 else self.watch_timeout
        try:
            await self._pump(request, response, watch, loop.time() + timeout)
        finally:
            self._watches.discard(watch)
            self._changes.notify()
        return response

    def _open(self, watch: _Watch, options: ListOptions) -> None:
        """Queue the watch's first lines and register it for live events, in one step (no await)."""
        resource = watch.resource
        if self._take_expiry(resource):
            failure = statuses.too_old_resource_version(
                parse_revision(options.resource_version or "0"), self.current_rv
            )
            watch.queue.put_nowait(_error_line(failure))
            self._end(watch)
            return
        initial = options.send_initial_events
        if initial is None:
            initial = options.resource_version in ("", "0")
        # A watch from a revision newer than the store (a future one) skips everything up to it.
        watch.after = max(self.current_rv, parse_revision(options.resource_version or "0"))
        if initial:
            for _, record in self.store.records(resource):
                if watch.selection.passes(record):
                    watch.queue.put_nowait(_event_line(ADDED, typed_body(resource, record)))
            if options.send_initial_events and watch.allow_bookmarks:
                annotations = {"k8s.io/initial-events-end": "true"}
                watch.queue.put_nowait(self._bookmark_line(resource, annotations))
        elif options.resource_version not in ("", "0"):
            try:
                events = list(self.store.events_since(parse_revision(options.resource_version)))
            except ExpiredError as error:
                watch.queue.put_nowait(
                    _error_line(statuses.too_old_resource_version(error.requested, error.floor))
                )
                self._end(watch)
                return
            for event in events:
                if event.resource is resource and (converted := watch.convert(event)) is not None:
                    event_type, record = converted
                    watch.queue.put_nowait(_event_line(event_type, typed_body(resource, record)))
        self._watches.add(watch)

    def _take_expiry(self, resource: ResourceType) -> bool:
        for index, wanted in enumerate(self._expire_watches):
            if wanted in (None, resource.plural):
                del self._expire_watches[index]
                return True
        return False

    def _bookmark_line(self, resource: ResourceType, annotations: Mapping[str, str] | None = None) -> bytes:
        return _event_line("BOOKMARK", orjson.dumps(resource.bookmark_object(self.current_rv, annotations)))

    def _next_bookmark(self, now: float, deadline: float) -> float | None:
        """The cacher's nextBookmarkTime: each interval, but 2 s before the deadline; none if that is past."""
        when = min(now + self.bookmark_interval, deadline - self.bookmark_before_timeout)
        return None if when < now else when

    async def _pump(
        self, request: web.Request, response: web.StreamResponse, watch: _Watch, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        next_bookmark = self._next_bookmark(loop.time(), deadline) if watch.allow_bookmarks else None
        while True:
            await self._flowing.wait()
            wake = deadline if next_bookmark is None else min(deadline, next_bookmark)
            try:
                async with asyncio.timeout_at(wake):
                    item = await watch.queue.get()
            except TimeoutError:
                await self._flowing.wait()
                if not watch.queue.empty():
                    continue  # lines queued while stalled go first; a bookmark must not overtake them
                now = loop.time()
                if now >= deadline:
                    item = _END
                else:
                    item = self._bookmark_line(watch.resource)
                    next_bookmark = self._next_bookmark(now, deadline)
            await self._flowing.wait()
            if isinstance(item, _End):
                await response.write_eof()
                return
            if watch.cut is not None:
                await _cut(request, response, item, watch.cut)
                return
            # Like the real server, which flushes only when no further event is pending, lines that are
            # already queued go out in one write.
            batch = [item]
            size = len(item)
            while size < _WRITE_BATCH_BYTES and not watch.queue.empty() and watch.cut is None:
                queued = watch.queue.get_nowait()
                if isinstance(queued, _End):
                    watch.queue.put_nowait(queued)  # the only item left: it ends the stream next round
                    break
                batch.append(queued)
                size += len(queued)
            await response.write(b"".join(batch))

    # --- discovery ------------------------------------------------------------------------------------

    def _discovery(self, path: str) -> web.StreamResponse:
        path = path.rstrip("/") or "/"
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok", content_type="text/plain")
        document = discovery_documents(self.url.removeprefix("http://")).get(path)
        if document is None:
            raise StatusError(statuses.path_not_found())
        return _json_response(_json_line(document))


async def _bounded(coro: Awaitable[T], seconds: float) -> T:
    async with asyncio.timeout(seconds):
        return await coro


def _bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def _cut(request: web.Request, response: web.StreamResponse, line: bytes, mode: CutMode) -> None:
    await response.write(line[: max(1, len(line) // 2)])
    if mode is CutMode.EOF:
        await response.write_eof()
        return
    transport = request.transport
    if transport is not None:
        transport.close()
    # Returning would let aiohttp finish the response with the chunked terminator: wait instead to be
    # cancelled, which handler_cancellation does as soon as the connection is lost.
    await asyncio.Event().wait()


def _headers() -> dict[str, str]:
    return {"Audit-Id": str(uuid.uuid4()), "Cache-Control": "no-cache, private"}


def _json_response(body: bytes, code: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=code, body=body, content_type="application/json", headers={**_headers(), **(headers or {})}
    )


def _status_response(failure: Status) -> web.Response:
    return _json_response(_json_line(failure.to_dict()), failure.code, failure.headers)
