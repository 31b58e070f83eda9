"""What the Kubernetes source lists and watches, the requests that do it, and how objects are trimmed.

Services and EndpointSlices of all namespaces are selected at the server, as kube-proxy does it: objects
labelled ``service.kubernetes.io/service-proxy-name`` (another proxy's) or ``service.kubernetes.io/headless``
are not listed; an object gaining such a label arrives as DELETED, one losing it as ADDED. Each object is
trimmed to the fields translation reads before it reaches the sink, and known by its
``(namespace, name)`` key and resourceVersion (``identity``). ``Resource.list_page`` and
``Resource.open_watch`` make the requests (the loop that repeats them is watch.py's); a list answer is read as
a ``Page``, a refusal raised as errors.py's exception for its status.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast

import aiohttp
import orjson

from aproxy.core.objects import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL
from aproxy.sources.kube.client import ApiClient, CoreV1Api, DiscoveryV1Api
from aproxy.sources.kube.errors import ApiConnectionError, ApiProtocolError, describe, raise_for_status

# kube-proxy's informers select both kinds with this selector (cmd/kube-proxy/app/server.go).
LABEL_SELECTOR: Final = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
DEFAULT_LIST_TIMEOUT: Final = 60.0  # seconds for one list page (or one GET)
CONNECT_TIMEOUT: Final = 10.0

Key: TypeAlias = tuple[str, str]  # (namespace, name)
Lister: TypeAlias = Callable[[ApiClient], Callable[..., Awaitable[Any]]]


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


def _list_services(client: ApiClient) -> Callable[..., Awaitable[Any]]:
    return CoreV1Api(client).list_service_for_all_namespaces


def _list_slices(client: ApiClient) -> Callable[..., Awaitable[Any]]:
    return DiscoveryV1Api(client).list_endpoint_slice_for_all_namespaces


@dataclass(frozen=True, slots=True)
class Resource:
    """One collection the loop lists and watches, and the selectors that narrow it at the server."""

    kind: str  # services, endpointslices, nodes: task names and logs
    qualified: str  # as RBAC and the API server's messages name it
    trim: Callable[[dict[str, Any]], dict[str, Any]]
    lister: Lister  # the list call; with watch=True, the same call watches
    label_selector: str = ""
    field_selector: str = ""
    namespaced: bool = True  # cluster-scoped objects (Nodes) are keyed ("", name)

    def selectors(self) -> dict[str, str]:
        """The request options for the selectors that are set (an empty selector is not sent)."""
        options = {"label_selector": self.label_selector, "field_selector": self.field_selector}
        return {option: value for option, value in options.items() if value}

    async def list_page(self, client: ApiClient, token: str, page_size: int, request_timeout: float) -> Page:
        """One page of the list (the first when ``token`` is ""), within ``request_timeout`` seconds."""
        options: dict[str, Any] = {
            **self.selectors(),
            "limit": page_size,
            "_preload_content": False,
            "_request_timeout": aiohttp.ClientTimeout(total=request_timeout, sock_connect=CONNECT_TIMEOUT),
        }
        if token:
            options["_continue"] = token
        try:
            response = cast(aiohttp.ClientResponse, await self.lister(client)(**options))
            async with response:
                await raise_for_status(response, "list", self.qualified)
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiConnectionError(f"cannot list {self.qualified}: {describe(error)}") from error
        return Page.parse(body, self)

    async def open_watch(
        self, client: ApiClient, resource_version: str, timeout_seconds: int, stall_timeout: float
    ) -> aiohttp.ClientResponse:
        """A watch from ``resource_version`` with bookmarks, which the server ends after ``timeout_seconds``;
        reading it fails after ``stall_timeout`` seconds without a byte. Its status is the caller's to check
        (``raise_for_status``) inside ``async with`` the response."""
        try:
            return cast(
                aiohttp.ClientResponse,
                await self.lister(client)(
                    watch=True,
                    resource_version=resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=timeout_seconds,
                    **self.selectors(),
                    _preload_content=False,
                    _request_timeout=aiohttp.ClientTimeout(
                        sock_connect=CONNECT_TIMEOUT, sock_read=stall_timeout
                    ),
                ),
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiConnectionError(f"cannot watch {self.qualified}: {describe(error)}") from error


SERVICES: Final = Resource(
    "services", "services", trim_service, _list_services, label_selector=LABEL_SELECTOR
)
ENDPOINT_SLICES: Final = Resource(
    "endpointslices",
    "endpointslices.discovery.k8s.io",
    trim_slice,
    _list_slices,
    label_selector=LABEL_SELECTOR,
)


def identity(obj: object, namespaced: bool = True) -> tuple[Key, str] | str:
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


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list answer: its items, the list's resourceVersion and the continue token ("": last)."""

    items: list[Any]
    resource_version: str
    continue_token: str

    @classmethod
    def parse(cls, body: bytes, resource: Resource) -> Page:
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
