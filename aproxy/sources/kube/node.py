"""This node's Node object: its addresses and zone, whether load balancers may send it traffic, and the watch
that keeps the daemon's view of it current.

``fetch_node`` GETs the Node once (``aproxy plan --kubeconfig``) or until it can be read (the daemon, through
``ThisNode.fetch``: it needs the addresses to program NodePorts). ``watch_node`` follows it with the source's
list/watch loop (one object, selected by ``metadata.name`` at the server, no label selector): ``on_change``
gets a ``NodeInfo`` whenever what it holds changes, and None when the Node does not exist or is deleted.
``ThisNode`` is the daemon's callback: it keeps the eligibility ``/healthz`` reports (kube-proxy's
``nodeEligible``) and warns when the Node's addresses move away from the ones NodePorts were programmed on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from aproxy.core.backoff import RetryPolicy
from aproxy.core.model import IPAddress
from aproxy.core.objects import parse_ip
from aproxy.sources.kube.client import ApiClient, Configuration, CoreV1Api
from aproxy.sources.kube.errors import (
    ApiConnectionError,
    ApiProtocolError,
    KubernetesSourceError,
    describe,
    raise_for_status,
)
from aproxy.sources.kube.resources import CONNECT_TIMEOUT, DEFAULT_LIST_TIMEOUT, Resource
from aproxy.sources.kube.watch import Feed, KubernetesSource

log = logging.getLogger(__name__)

ZONE_LABEL: Final = "topology.kubernetes.io/zone"
# The cluster autoscaler's taint on a node it is about to remove (any effect): /healthz fails then.
TO_BE_DELETED_TAINT: Final = "ToBeDeletedByClusterAutoscaler"
NODE_ADDRESS_TYPES: Final = frozenset({"InternalIP", "ExternalIP"})


# --- what a Node says ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeEligibility:
    """kube-proxy's ``nodeEligible``: may load balancers send this node traffic? ``reason`` says why not."""

    eligible: bool
    reason: str = ""  # "being deleted", "tainted ToBeDeletedByClusterAutoscaler"


ELIGIBLE: Final = NodeEligibility(eligible=True)
GONE: Final = NodeEligibility(eligible=False, reason="gone (no Node object)")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """This node as translation and health need it: its addresses (InternalIP and ExternalIP, in the Node's
    order), its zone (label ``topology.kubernetes.io/zone``; None when unset) and its eligibility."""

    addresses: tuple[IPAddress, ...]
    zone: str | None
    eligibility: NodeEligibility = ELIGIBLE


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


# --- reading it once ----------------------------------------------------------------------------------------


async def fetch_node(configuration: Configuration, name: str, retry: RetryPolicy | None = None) -> NodeInfo:
    """GET the Node ``name``. With no ``retry``, one attempt: a failure raises ``NotFoundError``,
    ``PermissionDeniedError`` (RBAC: get nodes), another ``ApiStatusError`` or ``ApiConnectionError``. With a
    policy, every failure is logged and retried after ``retry``'s backoff, until the Node can be read."""
    async with ApiClient(configuration) as client:
        api = CoreV1Api(client)
        if retry is None:
            return await _read_node(api, name)
        async for attempt in AsyncRetrying(
            wait=lambda state: retry.delay(state.attempt_number),
            retry=retry_if_exception_type(KubernetesSourceError),
            before_sleep=_log_retry,
            reraise=True,
        ):
            with attempt:
                return await _read_node(api, name)
    raise AssertionError("unreachable: AsyncRetrying without a stop either returns or raises")


async def _read_node(api: CoreV1Api, name: str) -> NodeInfo:
    try:
        response = cast(
            aiohttp.ClientResponse,
            await api.read_node(
                name,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(
                    total=DEFAULT_LIST_TIMEOUT, sock_connect=CONNECT_TIMEOUT
                ),
            ),
        )
        async with response:
            await raise_for_status(response, "get", "nodes", grant="get")
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as error:
        raise ApiConnectionError(f"cannot get node {name}: {describe(error)}") from error
    try:
        node = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ApiProtocolError(f"node {name} is not JSON: {error}") from error
    return node_info(node)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.error("cannot read this node from the API; retrying", extra={"error": str(error), "retry_in": delay})


# --- following it -------------------------------------------------------------------------------------------


def _list_nodes(client: ApiClient) -> Callable[..., Awaitable[Any]]:
    return CoreV1Api(client).list_node


def _untrimmed(obj: dict[str, Any]) -> dict[str, Any]:
    return obj  # its consumer keeps only a NodeInfo: nothing to slim down first


def _node_resource(name: str) -> Resource:
    # One Node by name: the services/slices label selector must not apply to it.
    return Resource(
        "nodes", "nodes", _untrimmed, _list_nodes, field_selector=f"metadata.name={name}", namespaced=False
    )


async def watch_node(
    source: KubernetesSource, name: str, on_change: Callable[[NodeInfo | None], object]
) -> None:
    """Follow the Node ``name`` with ``source``'s loop until cancelled: ``on_change(NodeInfo)`` on the first
    list and whenever what ``NodeInfo`` holds changes (not on every new resourceVersion: status heartbeats say
    nothing new), ``on_change(None)`` when the Node does not exist or is deleted. Retries, bookmarks, 410
    relists and counters are the services' and slices' (RBAC: list and watch on nodes)."""
    reporter = _NodeReporter(on_change)
    await source.follow(_node_resource(name), Feed(reporter.upsert, reporter.delete, reporter.listed))


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


class ThisNode:
    """What the daemon knows of its own Node: ``eligible`` and ``reason`` for ``/healthz`` (eligible until the
    watch says otherwise) and the addresses last seen. ``changed`` is ``watch_node``'s callback.

    ``fixed_addresses``: the addresses were given by flag, so the Node's do not matter."""

    def __init__(self, name: str, configuration: Configuration, *, fixed_addresses: bool) -> None:
        self.name = name
        self.eligible = True
        self.reason = ""
        self._configuration = configuration
        self._fixed_addresses = fixed_addresses
        self._addresses: frozenset[IPAddress] | None = None  # the last seen (or programmed) ones

    async def fetch(self, retry: RetryPolicy) -> NodeInfo:
        """The Node, read by ``fetch_node`` and retried under ``retry`` until it can be. Its addresses are the
        ones NodePorts get programmed on: the watch warns when the Node's move away from them."""
        node = await fetch_node(self._configuration, self.name, retry)
        self._addresses = frozenset(node.addresses)
        return node

    def changed(self, node: NodeInfo | None) -> None:
        """The node watch's callback: eligibility for /healthz, and a warning when the addresses move."""
        eligibility = GONE if node is None else node.eligibility
        if node is not None:
            self._addresses_seen(frozenset(node.addresses))
        if (eligibility.eligible, eligibility.reason) == (self.eligible, self.reason):
            return
        self.eligible, self.reason = eligibility.eligible, eligibility.reason
        if self.eligible:
            log.info("this node is eligible again: /healthz follows the sync loop", extra={"node": self.name})
        else:
            log.info(
                "this node is not eligible: /healthz answers 503",
                extra={"node": self.name, "reason": self.reason},
            )

    def _addresses_seen(self, addresses: frozenset[IPAddress]) -> None:
        if self._fixed_addresses:
            return
        previous, self._addresses = self._addresses, addresses
        if previous is not None and addresses != previous:
            # Like kube-proxy, NodePorts are not moved live: that would need a full reprogramming.
            log.warning(
                "this node's addresses changed; NodePorts stay on the old ones until aproxy restarts",
                extra={"old": _joined(previous), "new": _joined(addresses)},
            )


def _joined(addresses: frozenset[IPAddress]) -> str:
    return ",".join(str(address) for address in sorted(addresses, key=lambda a: (a.version, a)))
