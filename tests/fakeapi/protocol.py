"""The request side of the API: what a path names, and the list/watch options as the server reads them.

Option parsing and validation follow apimachinery (ValidateListOptions, the query-to-bool conversion) so that
a client sending what the real server would refuse gets the same refusal here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from tests.fakeapi import status as statuses
from tests.fakeapi.resources import RESOURCES, Obj, ResourceType
from tests.fakeapi.selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)
from tests.fakeapi.status import StatusError


@dataclass(frozen=True, slots=True)
class Target:
    verb: str  # collection, item, discovery, unknown
    resource: ResourceType | None = None
    namespace: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ListOptions:
    watch: bool
    resource_version: str
    resource_version_match: str
    send_initial_events: bool | None
    allow_bookmarks: bool
    timeout_seconds: int
    limit: int
    continue_token: str
    labels: LabelSelector
    fields: FieldSelector


def bool_param(value: str | None) -> bool:
    # apimachinery's Convert_Slice_string_To_bool: only "0" and "false" are false (Python's "True" is true).
    return value is not None and value != "0" and value.lower() != "false"


def int_param(query: Mapping[str, str], name: str) -> int:
    raw = query.get(name, "")
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise StatusError(statuses.bad_request(f'{name}: Invalid value: "{raw}": not an integer')) from None


def encode_continue(revision: int, start: str) -> str:
    """The real server's token: base64url (unpadded) of {"v":"meta.k8s.io/v1","rv":N,"start":"key\\x00"}."""
    raw = orjson.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": start})
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        decoded = orjson.loads(raw)
        if decoded.get("v") != "meta.k8s.io/v1":
            raise ValueError("continue key is not valid: incorrect encoded start resourceVersion (version)")
        return int(decoded["rv"]), str(decoded["start"])
    except (binascii.Error, orjson.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise StatusError(statuses.bad_request(f"continue key is not valid: {error}")) from None


def parse_revision(raw: str) -> int:
    try:
        revision = int(raw)
    except ValueError:
        raise StatusError(
            statuses.bad_request(f'resourceVersion: Invalid value: "{raw}": invalid value')
        ) from None
    if revision < 0:
        raise StatusError(statuses.bad_request(f'resourceVersion: Invalid value: "{raw}": invalid value'))
    return revision


def list_options(query: Mapping[str, str], resource: ResourceType) -> ListOptions:
    try:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), resource.selectable_fields)
    except SelectorError as error:
        raise StatusError(statuses.bad_request(str(error))) from None
    send_initial = query.get("sendInitialEvents")
    options = ListOptions(
        watch=bool_param(query.get("watch")),
        resource_version=query.get("resourceVersion", ""),
        resource_version_match=query.get("resourceVersionMatch", ""),
        send_initial_events=None if send_initial is None else bool_param(send_initial),
        allow_bookmarks=bool_param(query.get("allowWatchBookmarks")),
        timeout_seconds=int_param(query, "timeoutSeconds"),
        limit=max(int_param(query, "limit"), 0),
        continue_token=query.get("continue", ""),
        labels=labels,
        fields=fields,
    )
    if options.resource_version:
        parse_revision(options.resource_version)  # a bad one is refused before a watch sends its headers
    errors = _watch_option_errors(options) if options.watch else _list_option_errors(options)
    if errors:
        raise StatusError(statuses.invalid_list_options(errors))
    if options.continue_token and options.resource_version and not options.watch:
        raise StatusError(
            statuses.bad_request("specifying resource version is not allowed when using continue")
        )
    return options


_MATCH_FORBIDDEN = "resourceVersionMatch: Forbidden: "
_MATCH_UNSUPPORTED = 'resourceVersionMatch: Unsupported value: "{}": supported values: '


def _list_option_errors(options: ListOptions) -> list[str]:
    """apimachinery's ValidateListOptions for a list."""
    errors: list[str] = []
    match = options.resource_version_match
    if match:
        if not options.resource_version:
            errors.append(
                _MATCH_FORBIDDEN + "resourceVersionMatch is forbidden unless resourceVersion is provided"
            )
        if options.continue_token:
            errors.append(_MATCH_FORBIDDEN + "resourceVersionMatch is forbidden when continue is provided")
        if match not in ("Exact", "NotOlderThan"):
            errors.append(_MATCH_UNSUPPORTED.format(match) + '"Exact", "NotOlderThan", ""')
        if match == "Exact" and options.resource_version == "0":
            errors.append(
                _MATCH_FORBIDDEN + 'resourceVersionMatch "exact" is forbidden for resourceVersion "0"'
            )
    if options.send_initial_events is not None:
        errors.append("sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list")
    return errors


def _watch_option_errors(options: ListOptions) -> list[str]:
    """apimachinery's validateWatchOptions."""
    errors: list[str] = []
    match = options.resource_version_match
    if options.send_initial_events is not None and match != "NotOlderThan":
        errors.append(
            _MATCH_FORBIDDEN + "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"
        )
    if match:
        if options.send_initial_events is None:
            errors.append(
                _MATCH_FORBIDDEN
                + "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"
            )
        if match != "NotOlderThan":
            errors.append(_MATCH_UNSUPPORTED.format(match) + '"NotOlderThan"')
    return errors


def route(path: str) -> Target:
    """Map a request path to what it names: a collection, one object, a discovery document, or nothing."""
    segments = [segment for segment in path.split("/") if segment]
    if (
        not segments
        or segments[0] not in ("api", "apis")
        or len(segments) <= (2 if segments[0] == "api" else 3)
    ):
        return Target("discovery")
    if segments[0] == "api":
        group, version, rest = "", segments[1], segments[2:]
    else:
        group, version, rest = segments[1], segments[2], segments[3:]
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    by_plural = {r.plural: r for r in RESOURCES if r.group == group and r.version == version}
    resource = by_plural.get(rest[0])
    if resource is None or len(rest) > 2 or (namespace is not None and not resource.namespaced):
        return Target("unknown")
    if len(rest) == 2:
        if resource.namespaced and namespace is None:
            return Target("unknown")
        return Target("item", resource, namespace, rest[1])
    return Target("collection", resource, namespace)


def discovery_documents(address: str) -> dict[str, Any]:
    def resources(group: str) -> list[Obj]:
        return [
            {
                "name": r.plural,
                "singularName": r.kind.lower(),
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "list", "watch"],
            }
            for r in RESOURCES
            if r.group == group
        ]

    discovery_version = {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
    discovery_group = {
        "name": "discovery.k8s.io",
        "versions": [discovery_version],
        "preferredVersion": discovery_version,
    }
    return {
        "/version": {
            "major": "1",
            "minor": "34",
            "gitVersion": "v1.34.0-fakeapi",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        },
        "/api": {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
        },
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group]},
        "/apis/discovery.k8s.io": {"kind": "APIGroup", "apiVersion": "v1", **discovery_group},
        "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources("")},
        "/apis/discovery.k8s.io/v1": {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "discovery.k8s.io/v1",
            "resources": resources("discovery.k8s.io"),
        },
    }
