"""The Kubernetes API source: list, then watch, Services and EndpointSlices of all namespaces.

``KubernetesSource(configuration).run(sink)`` runs one task per resource (a TaskGroup), each in the style of
client-go's reflector and kopf's watcher, forever:

1. list, paged (``limit``/``continue``, one consistent snapshot), and diff the result against the
   ``(namespace, name) -> resourceVersion`` it keeps: new and changed objects are upserted, vanished ones
   deleted, unchanged ones (same resourceVersion) not mentioned. The first complete list is followed by
   ``sink.mark_listed(kind)``; the core applies nothing before both kinds are listed.
2. watch from the list's resourceVersion (``allowWatchBookmarks``, ``timeoutSeconds`` 300-600 s): each line is
   decoded with orjson into a plain dict, trimmed to the fields translation reads, and fed to the sink.
   Bookmarks only move the resourceVersion on.
3. when the watch ends (server timeout, stream cut, stall), watch again from the newest resourceVersion seen;
   on 410 Gone (an ERROR event or an HTTP 410), go back to 1: the relist is diffed like any list, so only
   real differences reach the sink (no flush, no re-apply of unchanged objects).

Failures never drop state: the sink keeps the last objects it was given while the source reconnects.
Connection errors, 5xx, 429 and other refusals are retried with tenacity's exponential backoff with jitter,
capped (``RetryPolicy``; a Retry-After header is a lower bound); 401/403 are logged as an RBAC problem naming
the verb and resource, and retried slowly. The backoff starts over once a watch delivers something.

Label selection happens at the server, as kube-proxy does it: objects labelled
``service.kubernetes.io/service-proxy-name`` (another proxy's) or ``service.kubernetes.io/headless`` are not
listed; an object gaining such a label arrives as DELETED, one losing it as ADDED.

Malformed watch lines (not JSON, no type/object, an object without namespace/name/resourceVersion, an
unknown type) are logged, counted in ``malformed_events`` and skipped; they never end the watch.

``watch_node(name, on_change)`` follows this node's Node object with the same loop (one object, selected by
``metadata.name`` at the server, no label selector): ``on_change`` gets a ``NodeInfo`` (addresses, zone,
``eligibility``) whenever it changes, and None when the Node does not exist or is deleted. The Node never
counts towards ``listed``: the services/slices gate does not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import aiohttp
import orjson
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, DiscoveryV1Api
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)
from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from aproxy.core.model import IPAddress
from aproxy.core.objects import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, parse_ip
from aproxy.sources.base import ListedKind, ObjectSink
from aproxy.sources.credentials import DEFAULT_RENEWAL_INTERVAL, CredentialRenewal, bearer_token

logger = logging.getLogger(__name__)

# kube-proxy's informers select both kinds with this selector (cmd/kube-proxy/app/server.go).
LABEL_SELECTOR: Final = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
DEFAULT_KUBECONFIG: Final = "~/.kube/config"
ZONE_LABEL: Final = "topology.kubernetes.io/zone"
# The cluster autoscaler's taint on a node it is about to remove (any effect): /healthz fails then.
TO_BE_DELETED_TAINT: Final = "ToBeDeletedByClusterAutoscaler"
NODE_ADDRESS_TYPES: Final = frozenset({"InternalIP", "ExternalIP"})

DEFAULT_PAGE_SIZE: Final = 500
DEFAULT_WATCH_TIMEOUT: Final = 300  # seconds; each watch asks for this plus up to as much again (jitter)
# A watch that delivers nothing (not even a bookmark) for this long is presumed stalled and reopened from the
# last resourceVersion. Servers send bookmarks every minute; a false alarm only costs a re-watch.
DEFAULT_STALL_TIMEOUT: Final = 120.0
DEFAULT_LIST_TIMEOUT: Final = 60.0  # seconds for one list page
CONNECT_TIMEOUT: Final = 10.0
# A watch that ends cleanly faster than this without a single line counts as a failure, so a server (or
# proxy) that closes every watch at once gets the backoff instead of a busy loop.
MIN_QUIET_WATCH: Final = 1.0
# Far above the largest object etcd stores (1.5 MiB) and aiohttp's default line limit.
MAX_LINE_BYTES: Final = 16 * 1024 * 1024
_EXCERPT: Final = 200  # bytes of a malformed line that go into the log

_Key = tuple[str, str]  # (namespace, name)


# --- errors -------------------------------------------------------------------------------------------------


class KubernetesSourceError(Exception):
    """Base of the source's errors. ``kind`` labels ``errors_total``."""

    kind = "error"


class KubernetesConfigError(KubernetesSourceError):
    """No usable cluster configuration (no kubeconfig, not in a pod, or an invalid file)."""

    kind = "config"


class ApiConnectionError(KubernetesSourceError):
    """The API server could not be reached, or the connection broke before an answer."""

    kind = "connection"


class StreamInterruptedError(KubernetesSourceError):
    """A watch stream broke (or ended at once) before delivering anything."""

    kind = "stream"


class ApiProtocolError(KubernetesSourceError):
    """A list answer that is not a list (no items, no resourceVersion)."""

    kind = "protocol"


class ApiStatusError(KubernetesSourceError):
    """The API server refused a request: its HTTP code, Status reason and message, and any Retry-After."""

    kind = "request"

    def __init__(
        self, message: str, *, code: int, reason: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


class ServerError(ApiStatusError):
    """5xx: the server (or etcd) is in trouble."""

    kind = "server"


class ThrottledError(ApiStatusError):
    """429 Too Many Requests (API priority and fairness)."""

    kind = "throttled"


class PermissionDeniedError(ApiStatusError):
    """401/403: aproxy's credentials or RBAC do not allow the request."""

    kind = "permission"


class ResourceExpiredError(ApiStatusError):
    """410 Gone: the resourceVersion (or continue token) is older than the server's history."""

    kind = "expired"


class NotFoundError(ApiStatusError):
    """404: the object (a Node) or the API does not exist."""

    kind = "not_found"


_RETRYABLE: Final = (KubernetesSourceError,)


# --- configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The client configuration and, when it came from a kubeconfig, what keeps its token current (run it
    beside the clients that use ``configuration``: ``KubernetesSource`` does). In a pod, kubernetes_asyncio
    re-reads the service-account token by itself."""

    configuration: Configuration
    renewal: CredentialRenewal | None = None


async def load_config(
    kubeconfig: Path | None = None,
    master: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    token_file: Path = Path(SERVICE_TOKEN_FILENAME),
    cert_file: Path = Path(SERVICE_CERT_FILENAME),
    renewal_interval: float = DEFAULT_RENEWAL_INTERVAL,
) -> ClusterConfig:
    """The client configuration, from the first of:

    1. ``kubeconfig`` (``--kubeconfig``), then the ``KUBECONFIG`` variable (paths joined by ``os.pathsep``):
       an explicit kubeconfig wins even inside a pod;
    2. the pod's service account, when ``KUBERNETES_SERVICE_HOST`` is set and the token file exists;
    3. ``~/.kube/config`` when it exists;
    4. ``master`` alone (an unauthenticated URL, e.g. ``kubectl proxy``).

    ``master`` (``--master``) replaces the server URL in every case. Files are read in a worker thread.
    From a kubeconfig (1 or 3), ``ClusterConfig.renewal`` re-reads its token every ``renewal_interval``
    seconds once it runs (``KubernetesSource`` runs it; see credentials.py).
    """
    env = os.environ if environ is None else environ
    explicit = str(kubeconfig) if kubeconfig is not None else env.get("KUBECONFIG", "")
    # Existence checks and file reads happen in a worker thread: the loop never waits on the disk.
    origin = await asyncio.to_thread(_config_origin, explicit, env, token_file)
    configuration = Configuration()
    renewal = None
    try:
        if origin == "in-cluster":
            loader = InClusterConfigLoader(str(token_file), str(cert_file), environ=dict(env))
            await asyncio.to_thread(loader.load_and_set, configuration)
        elif origin:
            kubeconfig_loader = await _load_kubeconfig(origin, configuration)
            renewal = CredentialRenewal(kubeconfig_loader, configuration, renewal_interval)
        elif not master:
            raise KubernetesConfigError(
                "no cluster configuration: not running in a pod, no --kubeconfig, KUBECONFIG or "
                f"{DEFAULT_KUBECONFIG}, and no --master"
            )
    except ConfigException as error:
        raise KubernetesConfigError(f"invalid cluster configuration: {error}") from error
    if master:
        configuration.host = master.rstrip("/")
    return ClusterConfig(configuration, renewal)


def _config_origin(explicit: str, env: Mapping[str, str], token_file: Path) -> str:
    """Kubeconfig path(s) to load, "in-cluster", or "" for none."""
    if explicit:
        return explicit
    if env.get(SERVICE_HOST_ENV_NAME) and token_file.exists():
        return "in-cluster"
    default = Path(DEFAULT_KUBECONFIG).expanduser()
    return str(default) if default.exists() else ""


async def _load_kubeconfig(paths: str, configuration: Configuration) -> KubeConfigLoader:
    merger = await asyncio.to_thread(KubeConfigMerger, paths)
    if merger.config is None:
        raise KubernetesConfigError(f"kubeconfig not found: {paths}")
    loader = KubeConfigLoader(config_dict=merger.config, config_base_path=None)
    await loader.load_and_set(configuration)
    bearer_token(configuration)  # strips a token file's trailing newline
    return loader


# --- resources ----------------------------------------------------------------------------------------------


def _trim_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    # managedFields, ownerReferences, uid, timestamps... are dropped: translation never reads them.
    return {
        key: meta[key]
        for key in ("name", "namespace", "resourceVersion", "labels", "annotations")
        if key in meta
    }


def trim_service(obj: dict[str, Any]) -> dict[str, Any]:
    """A Service reduced to what translation reads: metadata, spec, status.loadBalancer.

    Values of an unexpected type are passed on untouched, for the core to report."""
    meta = obj.get("metadata")
    trimmed: dict[str, Any] = {"metadata": _trim_metadata(meta) if isinstance(meta, dict) else meta}
    if "spec" in obj:
        trimmed["spec"] = obj["spec"]
    status = obj.get("status")
    if isinstance(status, dict):
        if "loadBalancer" in status:
            trimmed["status"] = {"loadBalancer": status["loadBalancer"]}
    elif status is not None:
        trimmed["status"] = status
    return trimmed


def trim_slice(obj: dict[str, Any]) -> dict[str, Any]:
    """An EndpointSlice reduced to metadata, addressType, endpoints and ports."""
    meta = obj.get("metadata")
    trimmed: dict[str, Any] = {"metadata": _trim_metadata(meta) if isinstance(meta, dict) else meta}
    for key in ("addressType", "endpoints", "ports"):
        if key in obj:
            trimmed[key] = obj[key]
    return trimmed


def _untrimmed(obj: dict[str, Any]) -> dict[str, Any]:
    return obj  # the Node: its consumer keeps only a NodeInfo, nothing to slim down first


def _list_services(client: ApiClient) -> Callable[..., Awaitable[Any]]:
    return CoreV1Api(client).list_service_for_all_namespaces


def _list_slices(client: ApiClient) -> Callable[..., Awaitable[Any]]:
    return DiscoveryV1Api(client).list_endpoint_slice_for_all_namespaces


def _list_nodes(client: ApiClient) -> Callable[..., Awaitable[Any]]:
    return CoreV1Api(client).list_node


@dataclass(frozen=True, slots=True)
class _Resource:
    """One collection the loop lists and watches, and the selectors that narrow it at the server."""

    kind: str  # services, endpointslices, nodes: task names and logs
    qualified: str  # as RBAC and the API server's messages name it
    trim: Callable[[dict[str, Any]], dict[str, Any]]
    # The list call; with watch=True, the same call watches.
    lister: Callable[[ApiClient], Callable[..., Awaitable[Any]]]
    label_selector: str = ""
    field_selector: str = ""
    namespaced: bool = True  # cluster-scoped objects (Nodes) are keyed ("", name)

    def endpoint(self, client: ApiClient) -> Callable[..., Awaitable[Any]]:
        return self.lister(client)

    def selectors(self) -> dict[str, str]:
        """The request options for the selectors that are set (an empty selector is not sent)."""
        options = {"label_selector": self.label_selector, "field_selector": self.field_selector}
        return {option: value for option, value in options.items() if value}


SERVICES: Final = _Resource(
    "services", "services", trim_service, _list_services, label_selector=LABEL_SELECTOR
)
ENDPOINT_SLICES: Final = _Resource(
    "endpointslices",
    "endpointslices.discovery.k8s.io",
    trim_slice,
    _list_slices,
    label_selector=LABEL_SELECTOR,
)


def _node_resource(name: str) -> _Resource:
    # One Node by name: the services/slices label selector must not apply to it.
    return _Resource(
        "nodes", "nodes", _untrimmed, _list_nodes, field_selector=f"metadata.name={name}", namespaced=False
    )


@dataclass(frozen=True, slots=True)
class _Feed:
    """Where one resource's changes go; the list/watch loop knows its consumer only through these."""

    upsert: Callable[[dict[str, Any]], object]
    delete: Callable[[str, str], object]
    listed: Callable[[], object]  # the first complete list has been fed


def _sink_feed(kind: ListedKind, sink: ObjectSink) -> _Feed:
    if kind == "services":
        return _Feed(sink.upsert_service, sink.delete_service, lambda: sink.mark_listed("services"))
    return _Feed(sink.upsert_slice, sink.delete_slice, lambda: sink.mark_listed("endpointslices"))


@dataclass(slots=True)
class _ResourceState:
    """What the source keeps per resource: each object's resourceVersion, not the object."""

    resource: _Resource
    versions: dict[_Key, str] = field(default_factory=dict)
    resource_version: str = ""  # the newest one seen: the list's, then events' and bookmarks'
    listed: bool = False  # the first complete list was fed and marked
    needs_list: bool = True
    watches: int = 0


# --- retries ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between failed attempts: ``multiplier * 2**(n-1) + uniform(0, jitter)``, at most ``cap``.

    A Retry-After (429, some 5xx) is a lower bound, itself at most ``max_retry_after``. Permission errors
    (401/403) are retried every ``permission_interval`` seconds: an operator has to fix RBAC first.
    """

    multiplier: float = 0.5
    cap: float = 30.0
    jitter: float = 1.0
    max_retry_after: float = 120.0
    permission_interval: float = 30.0


# --- the source ---------------------------------------------------------------------------------------------


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
        retry: RetryPolicy | None = None,
        renewal: CredentialRenewal | None = None,
    ) -> None:
        self._configuration = configuration
        self._renewal = renewal
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._stall_timeout = stall_timeout
        self._list_timeout = list_timeout
        self._retry = retry or RetryPolicy()
        self._backoff = wait_exponential_jitter(
            multiplier=self._retry.multiplier, max=self._retry.cap, jitter=self._retry.jitter
        )
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
        async with ApiClient(self._configuration) as client, asyncio.TaskGroup() as group:
            if self._renewal is not None:
                # The node watch shares the configuration: the token renewed here serves it too.
                group.create_task(self._renewal.run(), name="aproxy-credentials")
            for kind, state in self._states.items():
                group.create_task(
                    self._follow(client, state, _sink_feed(kind, sink)), name=f"aproxy-watch-{kind}"
                )

    async def watch_node(self, name: str, on_change: Callable[[NodeInfo | None], object]) -> None:
        """Follow the Node ``name`` until cancelled: ``on_change(NodeInfo)`` on the first list and whenever
        what ``NodeInfo`` holds changes (not on every new resourceVersion: status heartbeats say nothing new),
        ``on_change(None)`` when the Node does not exist or is deleted. Retries, bookmarks, 410 relists and
        counters are the services' and slices' (RBAC: list and watch on nodes)."""
        state = _ResourceState(_node_resource(name))
        reporter = _NodeReporter(on_change)
        feed = _Feed(reporter.upsert, reporter.delete, reporter.listed)
        async with ApiClient(self._configuration) as client:
            await self._follow(client, state, feed)

    # --- the loop -------------------------------------------------------------------------------------

    async def _follow(self, client: ApiClient, state: _ResourceState, feed: _Feed) -> None:
        while True:
            # A fresh AsyncRetrying per round: a round that got somewhere starts the backoff over.
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(_RETRYABLE),
                wait=self._wait,
                before_sleep=lambda retry_state: self._report_retry(state, retry_state),
                reraise=True,
            )
            await retrying(self._round, client, state, feed)

    async def _round(self, client: ApiClient, state: _ResourceState, feed: _Feed) -> None:
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
            delay = self._retry.permission_interval
        else:
            delay = self._backoff(retry_state)
            if isinstance(error, ApiStatusError) and error.retry_after is not None:
                delay = max(delay, min(error.retry_after, self._retry.max_retry_after))
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

    async def _list_into(self, client: ApiClient, state: _ResourceState, feed: _Feed) -> None:
        """One complete paged list, diffed into the feed; then mark listed (first time) and watch from it."""
        resource = state.resource
        upsert, delete = feed.upsert, feed.delete
        seen: set[_Key] = set()
        token = ""
        while True:
            page = await self._list_page(client, resource, token)
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
        seen: set[_Key],
    ) -> None:
        ident = _identity(item, state.resource.namespaced)
        if isinstance(ident, str):
            self._malformed(state, f"listed object {ident}", orjson.dumps(item))
            return
        key, version = ident
        seen.add(key)
        if state.versions.get(key) != version:
            state.versions[key] = version
            upsert(state.resource.trim(cast(dict[str, Any], item)))

    async def _list_page(self, client: ApiClient, resource: _Resource, token: str) -> _Page:
        options: dict[str, Any] = {
            **resource.selectors(),
            "limit": self._page_size,
            "_preload_content": False,
            "_request_timeout": aiohttp.ClientTimeout(total=self._list_timeout, sock_connect=CONNECT_TIMEOUT),
        }
        if token:
            options["_continue"] = token
        try:
            response = cast(aiohttp.ClientResponse, await resource.endpoint(client)(**options))
            async with response:
                await _raise_for_status(response, "list", resource.qualified)
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiConnectionError(f"cannot list {resource.qualified}: {_describe(error)}") from error
        return _Page.parse(body, resource)

    # --- watch ----------------------------------------------------------------------------------------

    async def _watch(self, client: ApiClient, state: _ResourceState, feed: _Feed) -> None:
        resource = state.resource
        if state.watches:
            self.watch_restarts_total += 1
        state.watches += 1
        started = time.monotonic()
        try:
            response = cast(
                aiohttp.ClientResponse,
                await resource.endpoint(client)(
                    watch=True,
                    resource_version=state.resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=int(self._watch_timeout * (1 + random.random())),
                    **resource.selectors(),
                    _preload_content=False,
                    _request_timeout=aiohttp.ClientTimeout(
                        sock_connect=CONNECT_TIMEOUT, sock_read=self._stall_timeout
                    ),
                ),
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiConnectionError(f"cannot watch {resource.qualified}: {_describe(error)}") from error
        async with response:
            await _raise_for_status(response, "watch", resource.qualified)
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
        self, response: aiohttp.ClientResponse, state: _ResourceState, feed: _Feed
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
            return lines, _describe(error)
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
            raise _Status.of(obj).error("watch", state.resource.qualified)
        if event_type == "BOOKMARK":
            self._bookmark(obj, state, line)
            return
        ident = _identity(obj, state.resource.namespaced)
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


@dataclass(frozen=True, slots=True)
class _Page:
    items: list[Any]
    resource_version: str
    continue_token: str

    @classmethod
    def parse(cls, body: bytes, resource: _Resource) -> _Page:
        try:
            page = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise ApiProtocolError(f"the {resource.qualified} list is not JSON: {error}") from error
        items = page.get("items") if isinstance(page, dict) else None
        meta = page.get("metadata") if isinstance(page, dict) else None
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if items is None:
            items = []  # Go's nil slice: an empty list may say "items": null
        if not isinstance(items, list) or not isinstance(version, str) or not version:
            raise ApiProtocolError(f"the {resource.qualified} list has no items or no resourceVersion")
        token = cast(dict[str, Any], meta).get("continue")
        return cls(items, version, token if isinstance(token, str) else "")


def _identity(obj: object, namespaced: bool = True) -> tuple[_Key, str] | str:
    """((namespace, name), resourceVersion) of an object, or what is wrong with it.

    A cluster-scoped object (``namespaced`` False: a Node) has no namespace; its key is ("", name)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return "without metadata"
    name, version = meta.get("name"), meta.get("resourceVersion")
    namespace = meta.get("namespace") if namespaced else ""
    if not isinstance(name, str) or not name:
        return "without name"
    if not isinstance(namespace, str) or (namespaced and not namespace):
        return f"{name} without namespace"
    if not isinstance(version, str) or not version:
        return f"{f'{namespace}/' if namespace else ''}{name} without resourceVersion"
    # Interned: every object of a namespace shares one string.
    return (sys.intern(namespace), name), version


# --- HTTP statuses ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Status:
    """The parts of a metav1.Status (or an HTTP error answer) the source acts on."""

    code: int
    reason: str = ""
    message: str = ""
    retry_after: float | None = None

    @classmethod
    def of(cls, body: object) -> _Status:
        """From a decoded Status object; anything else gives empty fields."""
        status = body if isinstance(body, dict) else {}
        details = status.get("details")
        code = status.get("code")
        return cls(
            code=code if isinstance(code, int) else 0,
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            retry_after=_seconds(details.get("retryAfterSeconds") if isinstance(details, dict) else None),
        )

    def error(self, verb: str, resource: str, grant: str = "list and watch") -> ApiStatusError:
        """The exception for this status on ``verb resource``; ``grant``: the RBAC verbs to ask for."""
        said = f" (server: {self.message})" if self.message else ""
        if self.code == 403:
            text = (
                f"RBAC: aproxy cannot {verb} {resource} at the cluster scope; grant {grant} on {resource} "
                f"to aproxy's service account{said}"
            )
        elif self.code == 401:
            text = (
                f"authentication failed: the API server rejected aproxy's credentials to {verb} {resource} "
                f"(401 Unauthorized); check the service account token or kubeconfig{said}"
            )
        else:
            text = f"{verb} {resource}: {self.code} {self.reason or 'refused'}{said}"
        return _error_class(self.code)(text, code=self.code, reason=self.reason, retry_after=self.retry_after)


def _error_class(code: int) -> type[ApiStatusError]:
    if code in (401, 403):
        return PermissionDeniedError
    if code >= 500:
        return ServerError
    return {410: ResourceExpiredError, 429: ThrottledError, 404: NotFoundError}.get(code, ApiStatusError)


async def _raise_for_status(
    response: aiohttp.ClientResponse, verb: str, resource: str, grant: str = "list and watch"
) -> None:
    if response.status == 200:
        return
    body = await response.read()
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        decoded = None
    status = _Status.of(decoded)
    header = _seconds(response.headers.get("Retry-After"))
    # The HTTP code wins over whatever the body says; the header over the body's retryAfterSeconds.
    status = _Status(response.status, status.reason, status.message, header or status.retry_after)
    raise status.error(verb, resource, grant)


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    if isinstance(value, str) and value.strip().isdigit():
        return float(value.strip())
    return None  # an HTTP-date Retry-After is not worth parsing: the backoff still applies


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --- one-shot helpers ---------------------------------------------------------------------------------------


async def snapshot(
    configuration: Configuration, sink: ObjectSink, *, page_size: int = DEFAULT_PAGE_SIZE
) -> None:
    """List Services and EndpointSlices once (paged) into ``sink`` and mark both listed (``aproxy plan``).

    No retry: a failure raises a ``KubernetesSourceError`` whose message is fit for a one-line error.
    """
    source = KubernetesSource(configuration, page_size=page_size)
    async with ApiClient(configuration) as client:
        for kind, state in source._states.items():
            await source._list_into(client, state, _sink_feed(kind, sink))


@dataclass(frozen=True, slots=True)
class NodeEligibility:
    """kube-proxy's ``nodeEligible``: may load balancers send this node traffic? ``reason`` says why not."""

    eligible: bool
    reason: str = ""  # "being deleted", "tainted ToBeDeletedByClusterAutoscaler"


ELIGIBLE: Final = NodeEligibility(eligible=True)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node as translation and health need it: its addresses (InternalIP and ExternalIP, in the Node's
    order), its zone (label ``topology.kubernetes.io/zone``; None when unset) and its eligibility."""

    addresses: tuple[IPAddress, ...]
    zone: str | None
    eligibility: NodeEligibility = ELIGIBLE


async def read_node(api: CoreV1Api, name: str, *, request_timeout: float = DEFAULT_LIST_TIMEOUT) -> NodeInfo:
    """GET the Node ``name``. Raises ``NotFoundError``, ``PermissionDeniedError`` (RBAC: get nodes),
    another ``ApiStatusError`` or ``ApiConnectionError``; no retry."""
    try:
        response = cast(
            aiohttp.ClientResponse,
            await api.read_node(
                name,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=request_timeout, sock_connect=CONNECT_TIMEOUT),
            ),
        )
        async with response:
            await _raise_for_status(response, "get", "nodes", grant="get")
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as error:
        raise ApiConnectionError(f"cannot get node {name}: {_describe(error)}") from error
    try:
        node = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiProtocolError(f"node {name} is not JSON: {error}") from error
    return node_info(node)


def node_eligibility(node: object) -> NodeEligibility:
    """Not eligible while the Node is being deleted (``metadata.deletionTimestamp`` set) or carries the
    cluster autoscaler's ``ToBeDeletedByClusterAutoscaler`` taint (any effect), as kube-proxy decides.

    Fields of the wrong type (taints not a list, an entry not a mapping, a timestamp not a string) are
    ignored: the API server never sends them, and a malformed object must not fail health checks."""
    obj = node if isinstance(node, dict) else {}
    meta = obj.get("metadata")
    deletion = meta.get("deletionTimestamp") if isinstance(meta, dict) else None
    if isinstance(deletion, str) and deletion:
        return NodeEligibility(eligible=False, reason="being deleted")
    spec = obj.get("spec")
    taints = spec.get("taints") if isinstance(spec, dict) else None
    for taint in taints if isinstance(taints, list) else ():
        if isinstance(taint, dict) and taint.get("key") == TO_BE_DELETED_TAINT:
            return NodeEligibility(eligible=False, reason=f"tainted {TO_BE_DELETED_TAINT}")
    return ELIGIBLE


def node_info(node: object) -> NodeInfo:
    """The addresses, zone and eligibility of a Node object; unusable entries are left out."""
    obj = node if isinstance(node, dict) else {}
    status = obj.get("status")
    entries = status.get("addresses") if isinstance(status, dict) else None
    addresses: dict[IPAddress, None] = {}  # ordered, de-duplicated
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and entry.get("type") in NODE_ADDRESS_TYPES:
            address = parse_ip(entry.get("address"))
            if address is not None:
                addresses[address] = None
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    zone = labels.get(ZONE_LABEL) if isinstance(labels, dict) else None
    return NodeInfo(tuple(addresses), zone if isinstance(zone, str) and zone else None, node_eligibility(obj))


class _NodeReporter:
    """The node resource's feed: upserts and deletes become ``on_change`` calls, each distinct state once."""

    def __init__(self, on_change: Callable[[NodeInfo | None], object]) -> None:
        self._on_change = on_change
        self._reported = False
        self._last: NodeInfo | None = None

    def upsert(self, raw: dict[str, Any]) -> None:
        self._report(node_info(raw))

    def delete(self, namespace: str, name: str) -> None:
        self._report(None)

    def listed(self) -> None:
        if not self._reported:
            self._report(None)  # the first list found no such Node

    def _report(self, node: NodeInfo | None) -> None:
        if self._reported and node == self._last:
            return
        self._reported, self._last = True, node
        self._on_change(node)
