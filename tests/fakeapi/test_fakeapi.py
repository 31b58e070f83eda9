"""The fake API server driven by the real kubernetes-asyncio 36.1.0 client over HTTP on loopback.

Each test proves one protocol feature behaves for the client as it does against a real API server, and
pins down what the client library does with it (the Kubernetes source is built on these observations):

- `Watch` yields dicts {type, object, raw_object}; BOOKMARK objects stay raw dicts and update
  `Watch.resource_version`; a line that is not JSON is yielded as the raw `str` line; JSON without
  type/object raises a bare `Exception`; an ERROR event raises `ApiException(status=code)`.
- With `timeout_seconds` the iteration stops at the stream's end and a 410 raises at once; without it
  `Watch` re-watches from its last resourceVersion after every clean end and retries a 410 once.
- A connection cut mid-line raises `aiohttp.ClientPayloadError` out of `Watch`, never retried.
- `_preload_content=False` returns the raw `aiohttp.ClientResponse` for lists and watches, and then an HTTP
  error status does not raise: the caller checks `.status` and decodes the Status body itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.fakeapi.fixtures import run
from tests.fakeapi.server import CutMode, FakeApiServer
from tests.fakeapi.store import ConflictError

Obj = dict[str, Any]
USER = "system:serviceaccount:kube-system:aproxy"


def service(namespace: str, name: str, labels: dict[str, str] | None = None, **spec: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "labels": labels or {}},
        "spec": {"ports": [{"name": "http", "port": 80}], **spec},
    }


def endpoint_slice(namespace: str, name: str, service_name: str, addresses: list[str]) -> Obj:
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}} for address in addresses],
        "ports": [{"name": "http", "port": 8080}],
    }


def node(name: str, zone: str) -> Obj:
    return {
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
    }


async def take(events: AsyncIterator[Any], count: int) -> list[Any]:
    taken: list[Any] = []
    async for event in events:
        taken.append(event)
        if len(taken) == count:
            break
    return taken


class ClosingApiClient(client.ApiClient):
    """An ApiClient that also closes the raw (`_preload_content=False`) responses opened through it."""

    def __init__(self, configuration: client.Configuration) -> None:
        super().__init__(configuration=configuration)
        self.raw_responses: list[aiohttp.ClientResponse] = []

    async def close(self) -> None:
        for response in self.raw_responses:
            response.close()
        await super().close()


def connect(server: FakeApiServer) -> ClosingApiClient:
    return ClosingApiClient(server.configuration())


async def raw_watch(api_client: ClosingApiClient, **params: Any) -> aiohttp.ClientResponse:
    """A services watch read by the caller: the way a source can decode lines itself with orjson."""
    api = client.CoreV1Api(api_client)
    # The stubs type every call by its preloaded model; with _preload_content=False it is the raw response.
    params.setdefault("watch", True)
    response = cast(
        aiohttp.ClientResponse, await api.list_service_for_all_namespaces(_preload_content=False, **params)
    )
    api_client.raw_responses.append(response)
    return response


async def raw_slice_watch(api_client: ClosingApiClient) -> aiohttp.ClientResponse:
    api = client.DiscoveryV1Api(api_client)
    response = cast(
        aiohttp.ClientResponse,
        await api.list_endpoint_slice_for_all_namespaces(
            watch=True, allow_watch_bookmarks=True, resource_version="0", _preload_content=False
        ),
    )
    api_client.raw_responses.append(response)
    return response


async def next_event(response: aiohttp.ClientResponse) -> Obj:
    line = await response.content.readline()
    event: Obj = orjson.loads(line)
    return event


def status_body(error: ApiException) -> Obj:
    assert error.body is not None
    body: Obj = orjson.loads(error.body)
    return body


def header(error: ApiException, name: str) -> str | None:
    return None if error.headers is None else cast(str | None, error.headers.get(name))


@pytest.fixture
def fast_bookmarks(fake_api: FakeApiServer) -> Iterator[FakeApiServer]:
    fake_api.bookmark_interval = 0.02
    fake_api.bookmark_before_timeout = 0.0
    yield fake_api


# --- lists ----------------------------------------------------------------------------------------------


def test_paged_list_returns_every_item_once(fake_api: FakeApiServer) -> None:
    names = {(ns, f"svc-{i}") for ns in ("alpha", "beta") for i in range(4)}
    for namespace, name in sorted(names):
        fake_api.create("services", service(namespace, name))

    async def scenario() -> None:
        async with connect(fake_api) as api_client:
            api = client.CoreV1Api(api_client)
            seen: list[tuple[str, str]] = []
            versions: set[str] = set()
            page = await api.list_service_for_all_namespaces(limit=3)
            while True:
                seen += [(item.metadata.namespace, item.metadata.name) for item in page.items]
                versions.add(page.metadata.resource_version)
                token = page.metadata._continue
                if not token:
                    break
                page = await api.list_service_for_all_namespaces(limit=3, _continue=token)
            assert sorted(seen) == sorted(names)
            assert len(seen) == len(names)
            assert versions == {str(fake_api.current_rv)}

    fake_api.run(scenario())
    assert fake_api.count("list", "services") == 3
    assert [r.query.get("limit") for r in fake_api.requests] == ["3", "3", "3"]


def test_paged_list_is_a_consistent_snapshot(fake_api: FakeApiServer) -> None:
    for name in ("a", "b", "c", "d"):
        fake_api.create("services", service("default", name))

    async def scenario() -> None:
        async with connect(fake_api) as api_client:
            api = client.CoreV1Api(api_client)
            first = await api.list_namespaced_service("default", limit=2)
            assert first.metadata.remaining_item_count == 2
            fake_api.update("services", service("default", "c", {"changed": "yes"}))
            fake_api.delete("services", "default", "d")
            fake_api.create("services", service("default", "e"))
            rest = await api.list_namespaced_service("default", _continue=first.metadata._continue)
            assert [item.metadata.name for item in rest.items] == ["c", "d"]
            assert rest.items[0].metadata.labels == {}
            assert rest.metadata.resource_version == first.metadata.resource_version
            fresh = await api.list_namespaced_service("default")
            assert [item.metadata.name for item in fresh.items] == ["a", "b", "c", "e"]

    fake_api.run(scenario())


def test_continue_token_older_than_history_is_410_with_a_fresh_token(fake_api: FakeApiServer) -> None:
    for name in ("a", "b", "c"):
        fake_api.create("services", service("default", name))

    async def scenario() -> None:
        async with connect(fake_api) as api_client:
            api = client.CoreV1Api(api_client)
            first = await api.list_service_for_all_namespaces(limit=1)
            fake_api.create("services", service("default", "z"))
            fake_api.compact()
            with pytest.raises(ApiException) as caught:
                await api.list_service_for_all_namespaces(limit=1, _continue=first.metadata._continue)
            body = status_body(caught.value)
            assert caught.value.status == 410
            assert (body["reason"], body["code"]) == ("Expired", 410)
            assert body["message"].startswith("The provided continue parameter is too old")
            # The token in the 410 continues inconsistently, from the latest state.
            rest = await api.list_service_for_all_namespaces(_continue=body["metadata"]["continue"])
            assert [item.metadata.name for item in rest.items] == ["b", "c", "z"]
            assert rest.metadata.resource_version == str(fake_api.current_rv)

    fake_api.run(scenario())


LABELLED = {
    "web": {"app": "web", "tier": "front", "version": "3"},
    "web2": {"app": "web", "tier": "back"},
    "db": {"app": "db", "version": "1"},
    "plain": {},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        pytest.param("app", {"web", "web2", "db"}, id="exists"),
        pytest.param("!app", {"plain"}, id="does-not-exist"),
        pytest.param("app=web", {"web", "web2"}, id="equals"),
        pytest.param("app==db", {"db"}, id="double-equals"),
        pytest.param("app!=web", {"db", "plain"}, id="not-equals-includes-unlabelled"),
        pytest.param("app in (web, db)", {"web", "web2", "db"}, id="in"),
        pytest.param("app notin (web)", {"db", "plain"}, id="notin-includes-unlabelled"),
        pytest.param("app=web,tier!=back", {"web"}, id="comma-is-and"),
        pytest.param("version>2", {"web"}, id="greater-than"),
        pytest.param("app=nothing", set(), id="no-match"),
    ],
)
def test_label_selector_filters_like_the_server(
    fake_api: FakeApiServer, selector: str, expected: set[str]
) -> None:
    for name, labels in LABELLED.items():
        fake_api.create("services", service("default", name, labels))

    async def scenario() -> set[str]:
        async with connect(fake_api) as api_client:
            page = await client.CoreV1Api(api_client).list_service_for_all_namespaces(label_selector=selector)
            return {item.metadata.name for item in page.items}

    assert fake_api.run(scenario()) == expected


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        pytest.param("metadata.name=b", {"default/b"}, id="name"),
        pytest.param("metadata.name!=b", {"default/a", "other/c"}, id="name-not"),
        pytest.param("metadata.namespace==other", {"other/c"}, id="namespace"),
        pytest.param("spec.type=NodePort", {"other/c"}, id="service-type"),
        pytest.param("metadata.namespace=default,metadata.name=a", {"default/a"}, id="comma-is-and"),
    ],
)
def test_field_selector_filters_like_the_server(
    fake_api: FakeApiServer, selector: str, expected: set[str]
) -> None:
    fake_api.create("services", service("default", "a"))
    fake_api.create("services", service("default", "b"))
    fake_api.create("services", service("other", "c", type="NodePort"))

    async def scenario() -> set[str]:
        async with connect(fake_api) as api_client:
            page = await client.CoreV1Api(api_client).list_service_for_all_namespaces(field_selector=selector)
            return {f"{item.metadata.namespace}/{item.metadata.name}" for item in page.items}

    assert fake_api.run(scenario()) == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"label_selector": "app in web"}, "expected: '('", id="label-syntax"),
        pytest.param({"label_selector": "a b=c"}, "found 'b', expected: in, notin, =", id="label-space"),
        pytest.param(
            {"field_selector": "spec.foo=x"}, "field label not supported: spec.foo", id="field-unsupported"
        ),
        pytest.param({"field_selector": "metadata.name"}, "invalid selector", id="field-syntax"),
    ],
)
def test_bad_selector_is_400_bad_request(
    fake_api: FakeApiServer, params: dict[str, Any], message: str
) -> None:
    async def scenario() -> ApiException:
        async with connect(fake_api) as api_client:
            with pytest.raises(ApiException) as caught:
                await client.CoreV1Api(api_client).list_service_for_all_namespaces(**params)
            return caught.value

    error = fake_api.run(scenario())
    body = status_body(error)
    assert (error.status, body["reason"]) == (400, "BadRequest")
    assert message in body["message"]


def test_list_is_raw_json_with_global_rv_and_kindless_defaulted_items(fake_api: FakeApiServer) -> None:
    fake_api.create("services", service("default", "web"))
    slice_rv = fake_api.create("endpointslices", endpoint_slice("default", "web-1", "web", ["10.0.0.1"]))

    async def scenario() -> tuple[int, Obj, Obj]:
        async with connect(fake_api) as api_client:
            api = client.CoreV1Api(api_client)
            listing = await api.list_service_for_all_namespaces(_preload_content=False)
            async with cast(aiohttp.ClientResponse, listing) as response:
                listed = orjson.loads(await response.read())
            reading = await api.read_namespaced_service("web", "default", _preload_content=False)
            async with cast(aiohttp.ClientResponse, reading) as one:
                return response.status, listed, orjson.loads(await one.read())

    code, listed, single = fake_api.run(scenario())
    assert code == 200
    assert (listed["kind"], listed["apiVersion"]) == ("ServiceList", "v1")
    # The list's resourceVersion is the global revision (here the slice's write), not the newest service's.
    assert listed["metadata"] == {"resourceVersion": slice_rv["metadata"]["resourceVersion"]}
    [item] = listed["items"]
    assert "kind" not in item and "apiVersion" not in item
    assert item["spec"]["type"] == "ClusterIP"
    assert item["spec"]["ports"] == [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]
    assert item["spec"]["clusterIPs"] == [item["spec"]["clusterIP"]]
    assert (single["kind"], single["apiVersion"]) == ("Service", "v1")
    assert single["metadata"]["uid"] == item["metadata"]["uid"]


def test_endpointslices_and_nodes_through_their_apis(fake_api: FakeApiServer) -> None:
    fake_api.create("endpointslices", endpoint_slice("default", "web-1", "web", ["10.0.0.1", "10.0.0.2"]))
    fake_api.create("endpointslices", endpoint_slice("other", "db-1", "db", ["10.0.1.1"]))
    fake_api.create("nodes", node("node-a", "zone-1"))
    fake_api.create("nodes", node("node-b", "zone-2"))

    async def scenario() -> None:
        async with connect(fake_api) as api_client:
            discovery = client.DiscoveryV1Api(api_client)
            everything = await discovery.list_endpoint_slice_for_all_namespaces()
            assert [item.metadata.name for item in everything.items] == ["web-1", "db-1"]
            namespaced = await discovery.list_namespaced_endpoint_slice(
                "default", label_selector="kubernetes.io/service-name=web"
            )
            [web] = namespaced.items
            assert [endpoint.addresses for endpoint in web.endpoints] == [["10.0.0.1"], ["10.0.0.2"]]
            assert web.ports[0].protocol == "TCP"
            assert web.metadata.generation == 1
            core = client.CoreV1Api(api_client)
            found = await core.read_node("node-b")
            assert found.metadata.labels["topology.kubernetes.io/zone"] == "zone-2"
            nodes = await core.list_node(field_selector="metadata.name=node-a")
            assert [item.metadata.name for item in nodes.items] == ["node-a"]

    fake_api.run(scenario())


def test_missing_object_is_404_not_found(fake_api: FakeApiServer) -> None:
    async def scenario() -> ApiException:
        async with connect(fake_api) as api_client:
            with pytest.raises(ApiException) as caught:
                await client.DiscoveryV1Api(api_client).read_namespaced_endpoint_slice("nope", "default")
            return caught.value

    error = fake_api.run(scenario())
    body = status_body(error)
    assert (error.status, body["reason"]) == (404, "NotFound")
    assert body["message"] == 'endpointslices.discovery.k8s.io "nope" not found'


def test_list_for_a_future_resource_version_times_out_504(fake_api: FakeApiServer) -> None:
    fake_api.too_large_wait = 0.05

    async def scenario() -> ApiException:
        async with connect(fake_api) as api_client:
            with pytest.raises(ApiException) as caught:
                await client.CoreV1Api(api_client).list_service_for_all_namespaces(
                    resource_version=str(fake_api.current_rv + 5)
                )
            return caught.value

    error = fake_api.run(scenario())
    assert (error.status, header(error, "Retry-After")) == (504, "1")
    assert status_body(error)["message"].startswith("Timeout: Too large resource version")


@pytest.mark.parametrize("watching", [pytest.param(False, id="list"), pytest.param(True, id="watch")])
def test_unparsable_resource_version_is_400(fake_api: FakeApiServer, watching: bool) -> None:
    async def scenario() -> tuple[int, Obj]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, resource_version="abc", watch=watching)
            return response.status, orjson.loads(await response.read())

    code, body = fake_api.run(scenario())
    assert (code, body["reason"]) == (400, "BadRequest")
    assert body["message"].startswith('resourceVersion: Invalid value: "abc"')


def test_discovery_documents_for_the_client(fake_api: FakeApiServer) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with connect(fake_api) as api_client:
            version = await client.VersionApi(api_client).get_code()
            versions = await client.CoreApi(api_client).get_api_versions()
            return version, versions

    version, versions = fake_api.run(scenario())
    assert version.major == "1"
    assert versions.versions == ["v1"]


# --- watches --------------------------------------------------------------------------------------------


def test_watch_from_list_rv_sees_later_changes_in_order(fake_api: FakeApiServer) -> None:
    fake_api.create("services", service("default", "existing"))

    async def change() -> None:
        await fake_api.wait_for_watches(1, "services")
        fake_api.create("services", service("default", "web"))
        fake_api.create("endpointslices", endpoint_slice("default", "web-1", "web", ["10.0.0.1"]))
        fake_api.update("services", service("default", "web", {"v": "2"}))
        fake_api.delete("services", "default", "web")

    async def scenario() -> tuple[str, list[Any]]:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            listed = await api.list_service_for_all_namespaces()
            async with asyncio.TaskGroup() as group:
                group.create_task(change())
                events = await take(
                    stream.stream(
                        api.list_service_for_all_namespaces,
                        resource_version=listed.metadata.resource_version,
                        timeout_seconds=30,
                    ),
                    3,
                )
            return listed.metadata.resource_version, events

    list_rv, events = fake_api.run(scenario())
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "web"),
        ("MODIFIED", "web"),
        ("DELETED", "web"),
    ]
    versions = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in events]
    # Strictly increasing, and the slice write in between took a revision of the shared sequence.
    assert [int(list_rv) + 1, int(list_rv) + 3, int(list_rv) + 4] == versions
    deleted = events[2]["raw_object"]
    assert deleted["metadata"]["labels"] == {"v": "2"}  # the last state
    assert (deleted["kind"], deleted["apiVersion"]) == ("Service", "v1")  # watch objects carry their kind
    assert fake_api.count("watch", "services") == 1


def test_watch_from_an_old_rv_replays_the_history(fake_api: FakeApiServer) -> None:
    start = fake_api.current_rv
    fake_api.create("services", service("default", "a"))
    fake_api.create("services", service("default", "b"))
    fake_api.delete("services", "default", "a")

    async def scenario() -> list[Obj]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, resource_version=str(start))
            return [await next_event(response) for _ in range(3)]

    events = fake_api.run(scenario())
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("DELETED", "a"),
    ]


def test_watch_from_a_future_rv_skips_events_up_to_it(fake_api: FakeApiServer) -> None:
    future = fake_api.current_rv + 2

    async def scenario() -> Obj:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, resource_version=str(future))
            await fake_api.wait_for_watches(1)
            for name in ("a", "b", "c"):
                fake_api.create("services", service("default", name))
            return await next_event(response)

    event = fake_api.run(scenario())
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "c")


@pytest.mark.parametrize(
    "resource_version", [pytest.param("0", id="rv-0"), pytest.param(None, id="rv-unset")]
)
def test_watch_without_rv_starts_with_synthetic_added(
    fake_api: FakeApiServer, resource_version: str | None
) -> None:
    fake_api.create("services", service("default", "a"))
    fake_api.create("services", service("default", "b"))
    fake_api.update("services", service("default", "a", {"v": "2"}))

    async def scenario() -> list[Obj]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, resource_version=resource_version)
            initial = [await next_event(response) for _ in range(2)]
            fake_api.update("services", service("default", "b", {"v": "2"}))
            return [*initial, await next_event(response)]

    events = fake_api.run(scenario())
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("MODIFIED", "b"),
    ]
    assert events[0]["object"]["metadata"]["labels"] == {"v": "2"}


def test_watch_with_selector_turns_entering_and_leaving_into_added_and_deleted(
    fake_api: FakeApiServer,
) -> None:
    fake_api.create("services", service("default", "a", {"app": "web"}))

    async def scenario() -> list[Obj]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(
                api_client,
                resource_version=str(fake_api.current_rv),
                label_selector="app=web",
            )
            await fake_api.wait_for_watches(1)
            fake_api.update("services", service("default", "a", {"app": "other"}))
            fake_api.update("services", service("default", "a", {"app": "web", "v": "3"}))
            return [await next_event(response) for _ in range(2)]

    left, entered = fake_api.run(scenario())
    assert left["type"] == "DELETED"
    assert left["object"]["metadata"]["labels"] == {"app": "web"}  # the state that matched...
    assert int(left["object"]["metadata"]["resourceVersion"]) == fake_api.current_rv - 1  # ...at the new RV
    assert entered["type"] == "ADDED"
    assert entered["object"]["metadata"]["labels"] == {"app": "web", "v": "3"}


def test_namespaced_watch_sees_only_its_namespace(fake_api: FakeApiServer) -> None:
    async def scenario() -> Obj:
        async with connect(fake_api) as api_client:
            api = client.DiscoveryV1Api(api_client)
            watching = await api.list_namespaced_endpoint_slice(
                "team-b", watch=True, resource_version=str(fake_api.current_rv), _preload_content=False
            )
            response = cast(aiohttp.ClientResponse, watching)
            api_client.raw_responses.append(response)
            await fake_api.wait_for_watches(1, "endpointslices")
            fake_api.create("endpointslices", endpoint_slice("team-a", "web-1", "web", ["10.0.0.1"]))
            fake_api.create("endpointslices", endpoint_slice("team-b", "web-1", "web", ["10.0.0.2"]))
            return await next_event(response)

    event = fake_api.run(scenario())
    assert event["object"]["metadata"]["namespace"] == "team-b"
    assert event["object"]["apiVersion"] == "discovery.k8s.io/v1"
    assert fake_api.requests[0].path == "/apis/discovery.k8s.io/v1/namespaces/team-b/endpointslices"


def test_send_initial_events_ends_with_an_annotated_bookmark(fake_api: FakeApiServer) -> None:
    fake_api.create("services", service("default", "a"))

    async def scenario() -> list[Obj]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(
                api_client,
                send_initial_events=True,
                resource_version_match="NotOlderThan",
                allow_watch_bookmarks=True,
            )
            return [await next_event(response) for _ in range(2)]

    added, bookmark = fake_api.run(scenario())
    assert added["type"] == "ADDED"
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert bookmark["object"]["metadata"]["resourceVersion"] == str(fake_api.current_rv)


def test_send_initial_events_without_match_is_422_invalid(fake_api: FakeApiServer) -> None:
    async def scenario() -> tuple[int, Obj]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, send_initial_events=True)
            return response.status, orjson.loads(await response.read())

    code, body = fake_api.run(scenario())
    assert (code, body["reason"]) == (422, "Invalid")
    assert "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan" in body["message"]


def test_bookmarks_arrive_only_with_allow_watch_bookmarks(fast_bookmarks: FakeApiServer) -> None:
    api_server = fast_bookmarks

    async def scenario() -> tuple[list[Any], str | None, Obj]:
        async with connect(api_server) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            start = str(api_server.current_rv)
            plain = await raw_watch(api_client, resource_version=start)
            bookmarks = await take(
                stream.stream(
                    api.list_service_for_all_namespaces,
                    resource_version=start,
                    allow_watch_bookmarks=True,
                    timeout_seconds=30,
                ),
                3,
            )
            api_server.create("services", service("default", "a"))
            # The watch without allowWatchBookmarks had bookmarks due too: its first line is the ADDED.
            return bookmarks, stream.resource_version, await next_event(plain)

    bookmarks, tracked_rv, first_plain = fast_bookmarks.run(scenario())
    assert [event["type"] for event in bookmarks] == ["BOOKMARK"] * 3
    # Bookmark objects stay raw dicts: the kind's zero value with only the resourceVersion set.
    assert bookmarks[0]["object"] == {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": str(api_server.current_rv - 1), "creationTimestamp": None},
        "spec": {},
        "status": {"loadBalancer": {}},
    }
    assert tracked_rv == str(api_server.current_rv - 1)
    assert first_plain["type"] == "ADDED"


def test_bookmark_now_carries_the_global_rv(fake_api: FakeApiServer) -> None:
    async def scenario() -> tuple[int, Obj]:
        async with connect(fake_api) as api_client:
            response = await raw_slice_watch(api_client)
            await fake_api.wait_for_watches(1)
            fake_api.create("services", service("default", "elsewhere"))  # advances the shared revision
            sent = fake_api.bookmark_now()
            return sent, await next_event(response)

    sent, bookmark = fake_api.run(scenario())
    assert sent == 1
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"] == {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": str(fake_api.current_rv), "creationTimestamp": None},
        "addressType": "",
        "endpoints": None,
    }


def test_server_timeout_ends_the_raw_stream_cleanly(fake_api: FakeApiServer) -> None:
    fake_api.watch_timeout = 0.1  # the server's own limit when the client sends no timeoutSeconds

    async def scenario() -> tuple[bytes, bool]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, resource_version=str(fake_api.current_rv))
            return await response.content.readline(), response.content.at_eof()

    assert fake_api.run(scenario()) == (b"", True)


def test_watch_with_timeout_seconds_stops_iterating_at_the_end(fake_api: FakeApiServer) -> None:
    async def scenario() -> list[Any]:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            return [
                event
                async for event in stream.stream(
                    api.list_service_for_all_namespaces,
                    resource_version=str(fake_api.current_rv),
                    timeout_seconds=1,
                )
            ]

    assert fake_api.run(scenario()) == []
    assert fake_api.count("watch") == 1  # no reconnect when timeout_seconds is given


def test_watch_without_timeout_seconds_rewatches_from_its_last_rv(fake_api: FakeApiServer) -> None:
    fake_api.watch_timeout = 0.1

    async def scenario() -> list[Any]:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            events = stream.stream(
                api.list_service_for_all_namespaces, resource_version=str(fake_api.current_rv)
            )
            fake_api.create("services", service("default", "a"))
            first = await take(events, 1)
            await fake_api.wait_until(lambda: fake_api.active_watches() == 0)  # the server ended the stream
            fake_api.create("services", service("default", "b"))
            return first + await take(events, 1)

    events = fake_api.run(scenario())
    assert [e["object"].metadata.name for e in events] == ["a", "b"]
    # Watch re-watched (lazily, on the next iteration) from the last resourceVersion it had seen.
    first, second = [r for r in fake_api.requests if r.verb == "watch"]
    assert second.query["resourceVersion"] == events[0]["raw_object"]["metadata"]["resourceVersion"]
    assert first.query["resourceVersion"] != second.query["resourceVersion"]


def test_watch_from_a_compacted_rv_gets_a_410_error_event(fake_api: FakeApiServer) -> None:
    start = fake_api.current_rv
    fake_api.create("services", service("default", "a"))
    fake_api.compact()

    async def scenario() -> tuple[Obj, bytes]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, resource_version=str(start))
            return await next_event(response), await response.content.readline()

    error, after = fake_api.run(scenario())
    assert error == {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {start} ({fake_api.current_rv})",
            "reason": "Expired",
            "code": 410,
        },
    }
    assert after == b""  # and the stream ends


@pytest.mark.parametrize(
    ("timeout_seconds", "watch_requests"),
    [
        pytest.param({"timeout_seconds": 30}, 1, id="with-timeout-raises-at-once"),
        pytest.param({}, 2, id="watch-forever-retries-once"),
    ],
)
def test_watch_raises_api_exception_410_for_expired(
    fake_api: FakeApiServer, timeout_seconds: dict[str, int], watch_requests: int
) -> None:
    start = fake_api.current_rv
    fake_api.create("services", service("default", "a"))
    fake_api.compact()

    async def scenario() -> ApiException:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            with pytest.raises(ApiException) as caught:
                await take(
                    stream.stream(
                        api.list_service_for_all_namespaces, resource_version=str(start), **timeout_seconds
                    ),
                    1,
                )
            return caught.value

    error = fake_api.run(scenario())
    assert (error.status, error.reason) == (
        410,
        f"Expired: too old resource version: {start} ({fake_api.current_rv})",
    )
    assert fake_api.count("watch") == watch_requests


def test_expire_next_watch_then_watches_work(fake_api: FakeApiServer) -> None:
    fake_api.expire_next_watch("services")
    current = str(fake_api.current_rv)

    async def scenario() -> tuple[Obj, Obj]:
        async with connect(fake_api) as api_client:
            expired = await next_event(await raw_watch(api_client, resource_version=current))
            response = await raw_watch(api_client, resource_version=current)
            fake_api.create("services", service("default", "a"))
            return expired, await next_event(response)

    expired, added = fake_api.run(scenario())
    assert (expired["type"], expired["object"]["code"]) == ("ERROR", 410)
    assert added["type"] == "ADDED"


# --- faults ---------------------------------------------------------------------------------------------


def test_stream_cut_mid_line_raises_payload_error_and_resumes_without_loss(fake_api: FakeApiServer) -> None:
    async def scenario() -> tuple[Obj, Obj]:
        async with connect(fake_api) as api_client:
            start = str(fake_api.current_rv)
            response = await raw_watch(api_client, resource_version=start)
            await fake_api.wait_for_watches(1)
            assert fake_api.close_streams_mid_event() == 1
            created = fake_api.create("services", service("default", "a"))
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.content.readline()
            resumed = await raw_watch(api_client, resource_version=start)
            event = await next_event(resumed)
            assert fake_api.active_watches() == 1  # the cut stream is gone on the server too
            return created, event

    created, resumed = fake_api.run(scenario())
    assert resumed["type"] == "ADDED"
    assert resumed["object"]["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_watch_does_not_retry_a_cut_stream(fake_api: FakeApiServer) -> None:
    async def cut() -> None:
        await fake_api.wait_for_watches(1)
        fake_api.close_streams_mid_event()
        fake_api.create("services", service("default", "a"))

    async def scenario() -> None:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            events = stream.stream(
                api.list_service_for_all_namespaces, resource_version=str(fake_api.current_rv)
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(cut())
                with pytest.raises(aiohttp.ClientPayloadError):
                    await take(events, 1)

    fake_api.run(scenario())
    assert fake_api.count("watch") == 1


def test_stream_ending_cleanly_mid_line_yields_the_fragment(fake_api: FakeApiServer) -> None:
    async def scenario() -> tuple[list[bytes], list[Any]]:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            start = str(fake_api.current_rv)
            response = await raw_watch(api_client, resource_version=start)
            await fake_api.wait_for_watches(1)
            fake_api.close_streams_mid_event(CutMode.EOF)
            fake_api.create("services", service("default", "a"))
            raw = [await response.content.readline(), await response.content.readline()]
            await fake_api.wait_until(lambda: fake_api.active_watches() == 0)
            events = stream.stream(
                api.list_service_for_all_namespaces, resource_version=start, timeout_seconds=30
            )
            await_cut = asyncio.create_task(take(events, 5))
            await fake_api.wait_for_watches(1)
            fake_api.close_streams_mid_event(CutMode.EOF)
            fake_api.update("services", service("default", "a", {"v": "2"}))
            return raw, await await_cut

    raw, events = fake_api.run(scenario())
    assert raw[0].startswith(b'{"type":"ADDED","object":{"kind":"Service"') and not raw[0].endswith(b"\n")
    assert raw[1] == b""
    # Watch yields the history's ADDED, then the fragment as a plain str, then stops (timeout_seconds given).
    assert events[0]["type"] == "ADDED"
    assert isinstance(events[1], str) and events[1].startswith('{"type":"MODIFIED"')
    assert len(events) == 2


def test_fail_next_500_then_success(fake_api: FakeApiServer) -> None:
    fake_api.fail_next(1, status=500)

    async def scenario() -> tuple[ApiException, int]:
        async with connect(fake_api) as api_client:
            api = client.CoreV1Api(api_client)
            with pytest.raises(ApiException) as caught:
                await api.list_service_for_all_namespaces()
            listed = await api.list_service_for_all_namespaces()
            return caught.value, len(listed.items)

    error, items = fake_api.run(scenario())
    body = status_body(error)
    assert (error.status, body["reason"], body["message"]) == (
        500,
        "InternalError",
        "Internal error occurred: injected failure",
    )
    assert items == 0
    assert fake_api.count("list") == 2


def test_fail_next_429_carries_retry_after(fake_api: FakeApiServer) -> None:
    fake_api.fail_next(2, status=429, retry_after=3, resource="endpointslices")

    async def scenario() -> list[ApiException]:
        async with connect(fake_api) as api_client:
            api = client.DiscoveryV1Api(api_client)
            errors = []
            for _ in range(2):
                with pytest.raises(ApiException) as caught:
                    await api.list_endpoint_slice_for_all_namespaces()
                errors.append(caught.value)
            await client.CoreV1Api(api_client).list_service_for_all_namespaces()  # another resource: fine
            await api.list_endpoint_slice_for_all_namespaces()
            return errors

    errors = fake_api.run(scenario())
    assert [(e.status, header(e, "Retry-After")) for e in errors] == [(429, "3"), (429, "3")]
    body = status_body(errors[0])
    assert (body["reason"], body["details"]) == ("TooManyRequests", {"retryAfterSeconds": 3})


def test_failed_watch_request_reaches_watch_as_api_exception_without_headers(fake_api: FakeApiServer) -> None:
    fake_api.fail_next(1, status=429, retry_after=5, verb="watch")

    async def scenario() -> ApiException:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            with pytest.raises(ApiException) as caught:
                await take(stream.stream(api.list_service_for_all_namespaces, timeout_seconds=30), 1)
            return caught.value

    error = fake_api.run(scenario())
    # Watch reads the error body as if it were an event line: the status survives, Retry-After does not.
    assert (error.status, error.reason, error.headers) == (
        429,
        "TooManyRequests: Too many requests, please try again later.",
        None,
    )


@pytest.mark.parametrize(
    ("resource", "call", "message"),
    [
        pytest.param(
            "services",
            lambda c: client.CoreV1Api(c).list_service_for_all_namespaces(),
            f'services is forbidden: User "{USER}" cannot list resource "services" in API group "" at the '
            "cluster scope",
            id="cluster-list",
        ),
        pytest.param(
            "endpointslices",
            lambda c: client.DiscoveryV1Api(c).list_namespaced_endpoint_slice("default"),
            f'endpointslices.discovery.k8s.io is forbidden: User "{USER}" cannot list resource '
            '"endpointslices" in API group "discovery.k8s.io" in the namespace "default"',
            id="namespaced-grouped-list",
        ),
        pytest.param(
            "nodes",
            lambda c: client.CoreV1Api(c).read_node("node-a"),
            f'nodes "node-a" is forbidden: User "{USER}" cannot get resource "nodes" in API group "" at the '
            "cluster scope",
            id="get-node",
        ),
    ],
)
def test_forbidden_is_403_with_the_rbac_message(
    fake_api: FakeApiServer, resource: str, call: Any, message: str
) -> None:
    fake_api.forbid(resource)

    async def scenario() -> ApiException:
        async with connect(fake_api) as api_client:
            with pytest.raises(ApiException) as caught:
                await call(api_client)
            return caught.value

    error = fake_api.run(scenario())
    body = status_body(error)
    assert (error.status, body["reason"], body["message"]) == (403, "Forbidden", message)
    assert body["details"]["kind"] == resource


def test_required_tokens_answer_401_to_other_credentials_and_log_the_token(fake_api: FakeApiServer) -> None:
    fake_api.require_tokens("good")

    async def scenario() -> tuple[int, int]:
        configuration = fake_api.configuration()
        async with ClosingApiClient(configuration) as api_client:
            api = client.CoreV1Api(api_client)
            with pytest.raises(ApiException) as caught:
                await api.list_service_for_all_namespaces()
            configuration.api_key["BearerToken"] = "Bearer good"
            listed = await api.list_service_for_all_namespaces()
            return caught.value.status, len(listed.items)

    status, items = fake_api.run(scenario())
    assert (status, items) == (401, 0)
    first, second = fake_api.requests
    assert (first.token, second.token) == (None, "good")


def test_forbidden_watch_reaches_watch_as_api_exception(fake_api: FakeApiServer) -> None:
    fake_api.forbid("services", "watch")

    async def scenario() -> ApiException:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            await api.list_service_for_all_namespaces()  # list is still allowed
            with pytest.raises(ApiException) as caught:
                await take(stream.stream(api.list_service_for_all_namespaces, timeout_seconds=30), 1)
            return caught.value

    error = fake_api.run(scenario())
    assert error.status == 403
    assert 'cannot watch resource "services"' in str(error.reason)


def test_malformed_lines_reach_the_raw_stream_and_watch(fake_api: FakeApiServer) -> None:
    async def scenario() -> tuple[list[bytes], list[Any], Exception]:
        async with connect(fake_api) as api_client, watch.Watch() as stream:
            api = client.CoreV1Api(api_client)
            current = str(fake_api.current_rv)
            response = await raw_watch(api_client, resource_version=current)
            events = stream.stream(
                api.list_service_for_all_namespaces, resource_version=current, timeout_seconds=30
            )
            pending = asyncio.create_task(take(events, 2))
            await fake_api.wait_for_watches(2)
            assert fake_api.send_raw_line(b'{"type":"MODIFIED","object":') == 2
            fake_api.create("services", service("default", "a"))
            raw = [await response.content.readline(), await response.content.readline()]
            yielded = await pending
            fake_api.send_raw_line(b'{"kind":"Status"}')
            with pytest.raises(Exception) as caught:  # Watch raises a bare Exception here
                await take(events, 1)
            return raw, yielded, caught.value

    raw, yielded, error = fake_api.run(scenario())
    assert raw[0] == b'{"type":"MODIFIED","object":\n'
    assert orjson.loads(raw[1])["type"] == "ADDED"
    assert yielded[0] == '{"type":"MODIFIED","object":\n'  # Watch yields what json.loads rejects as a str
    assert yielded[1]["type"] == "ADDED"
    assert type(error) is Exception and "Malformed JSON response" in str(error)


def test_stalled_stream_is_detected_by_a_client_read_timeout(fake_api: FakeApiServer) -> None:
    async def scenario() -> Obj:
        async with connect(fake_api) as api_client:
            start = str(fake_api.current_rv)
            stalled = await raw_watch(
                api_client, resource_version=start, _request_timeout=aiohttp.ClientTimeout(sock_read=0.05)
            )
            await fake_api.wait_for_watches(1)
            fake_api.stall_streams()
            fake_api.create("services", service("default", "a"))
            with pytest.raises(asyncio.TimeoutError):
                await stalled.content.readline()
            fake_api.unstall()
            resumed = await raw_watch(api_client, resource_version=start)
            return await next_event(resumed)

    event = fake_api.run(scenario())
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "a")


def test_unstall_delivers_what_was_held_in_order(fast_bookmarks: FakeApiServer) -> None:
    api_server = fast_bookmarks

    async def scenario() -> list[Obj]:
        async with connect(api_server) as api_client:
            response = await raw_watch(
                api_client,
                resource_version=str(api_server.current_rv),
                allow_watch_bookmarks=True,
            )
            await api_server.wait_for_watches(1)
            api_server.stall_streams()
            api_server.create("services", service("default", "a"))
            api_server.create("services", service("default", "b"))
            await asyncio.sleep(0.1)  # bookmark deadlines pass while stalled
            api_server.unstall()
            return [await next_event(response) for _ in range(3)]

    events = fast_bookmarks.run(scenario())
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions)


def test_slow_watcher_over_the_buffer_limit_is_closed_and_resumes(fake_api: FakeApiServer) -> None:
    fake_api.watch_buffer_limit = 5
    start = str(fake_api.current_rv)

    async def scenario() -> tuple[bytes, list[Obj]]:
        async with connect(fake_api) as api_client:
            response = await raw_watch(api_client, resource_version=start)
            await fake_api.wait_for_watches(1)
            fake_api.stall_streams()
            for index in range(10):
                fake_api.create("services", service("default", f"s{index}"))
            fake_api.unstall()
            end = await response.content.readline()
            resumed = await raw_watch(api_client, resource_version=start)
            return end, [await next_event(resumed) for _ in range(5)]

    end, events = fake_api.run(scenario())
    assert end == b""  # closed cleanly, nothing written
    assert [e["object"]["metadata"]["name"] for e in events] == ["s0", "s1", "s2", "s3", "s4"]


def test_api_down_refuses_connections_until_it_comes_back(fake_api: FakeApiServer) -> None:
    url = fake_api.url

    async def scenario() -> int:
        async with connect(fake_api) as api_client:
            api = client.CoreV1Api(api_client)
            response = await raw_watch(api_client, resource_version=str(fake_api.current_rv))
            await fake_api.wait_for_watches(1)
            await fake_api.go_down()
            with pytest.raises(aiohttp.ClientError):
                await response.content.readline()
            with pytest.raises(aiohttp.ClientConnectorError):
                await api.list_service_for_all_namespaces()
            fake_api.create("services", service("default", "a"))
            await fake_api.come_back()
            listed = await api.list_service_for_all_namespaces()
            return len(listed.items)

    assert fake_api.run(scenario()) == 1
    assert fake_api.url == url


# --- the handle -----------------------------------------------------------------------------------------


def test_no_op_update_keeps_the_rv_and_sends_nothing(fake_api: FakeApiServer) -> None:
    created = fake_api.create("services", service("default", "a"))
    unchanged = fake_api.update("services", service("default", "a"))
    assert unchanged == created
    assert fake_api.current_rv == int(created["metadata"]["resourceVersion"])


def test_update_keeps_allocations_and_checks_a_given_rv(fake_api: FakeApiServer) -> None:
    created = fake_api.create("services", service("default", "a", type="NodePort"))
    updated = fake_api.update("services", service("default", "a", {"v": "2"}, type="NodePort"))
    assert updated["spec"]["clusterIP"] == created["spec"]["clusterIP"]
    assert updated["spec"]["ports"][0]["nodePort"] == created["spec"]["ports"][0]["nodePort"]
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    with pytest.raises(ConflictError):
        fake_api.update("services", created)  # carries the old resourceVersion


def test_kubeconfig_points_the_client_at_the_server(fake_api: FakeApiServer, tmp_path: Path) -> None:
    path = fake_api.write_kubeconfig(tmp_path / "kubeconfig")
    fake_api.create("nodes", node("node-a", "zone-1"))

    async def scenario() -> str:
        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(path), client_configuration=configuration)
        async with client.ApiClient(configuration) as api_client:
            found = await client.CoreV1Api(api_client).read_node("node-a")
            return str(found.metadata.name)

    assert fake_api.run(scenario()) == "node-a"


def test_async_context_manager_and_run_helper() -> None:
    async def scenario() -> list[str]:
        async with FakeApiServer(initial_resource_version=5) as api_server, connect(api_server) as api_client:
            api_server.apply_many("services", [service("default", "a"), service("default", "b")])
            listed = await client.CoreV1Api(api_client).list_service_for_all_namespaces()
            return [listed.metadata.resource_version, *(item.metadata.name for item in listed.items)]

    assert run(scenario()) == ["7", "a", "b"]
