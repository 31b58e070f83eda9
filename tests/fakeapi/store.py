"""A versioned object store with etcd's semantics: one global revision, a bounded event history, snapshots.

Every write (to any resource) bumps the single global resourceVersion, like an etcd revision. The history
holds the last `history_limit` writes; a watch or a paged list can only be served from a revision the history
still covers (`floor` and above), which is what makes too-old resourceVersions and continue tokens answer 410.
Objects are kept without kind/apiVersion (list items carry none); each stored object keeps its JSON encoding
so large lists and fan-out to many watchers do not re-encode.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from tests.fakeapi.resources import (
    ENDPOINTSLICES,
    RESOURCES,
    SERVICES,
    ClusterIPAllocator,
    Defaulter,
    NodePortAllocator,
    Obj,
    ResourceType,
    carry_allocations,
)

ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"


class StoreError(Exception):
    """A test-side write the real server would refuse."""


class AlreadyExistsError(StoreError):
    pass


class NotFoundError(StoreError):
    pass


class ConflictError(StoreError):
    """The object's metadata.resourceVersion is set and is not the stored one (optimistic concurrency)."""


class InvalidObjectError(StoreError):
    """The object lacks what the server needs to store it at all (a name, a namespace)."""


class ExpiredError(Exception):
    """The requested revision is older than the history covers."""

    def __init__(self, requested: int, floor: int) -> None:
        super().__init__(f"too old resource version: {requested} ({floor})")
        self.requested = requested
        self.floor = floor


@dataclass(frozen=True, slots=True)
class Record:
    """A stored object and its JSON encoding (list-item form: no kind/apiVersion)."""

    obj: Obj
    body: bytes

    @classmethod
    def of(cls, obj: Obj) -> Record:
        return cls(obj, orjson.dumps(obj))

    @property
    def resource_version(self) -> int:
        return int(self.obj["metadata"]["resourceVersion"])

    def labels(self) -> dict[str, str]:
        labels = self.obj["metadata"].get("labels")
        return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


@dataclass(frozen=True, slots=True)
class Event:
    """One write. For DELETED, `current` is the last state with the deletion's resourceVersion."""

    revision: int
    type: str
    resource: ResourceType
    key: str
    current: Record
    previous: Record | None


def object_key(resource: ResourceType, namespace: str | None, name: str) -> str:
    """The etcd key suffix; lists are ordered by it, as etcd returns keys in byte order."""
    return f"{namespace}/{name}" if resource.namespaced else name


def json_copy(obj: Obj) -> Obj:
    """A deep copy through JSON (many times faster than copy.deepcopy); the server stores JSON only."""
    try:
        copied: Obj = orjson.loads(orjson.dumps(obj))
    except TypeError as error:
        raise InvalidObjectError(f"object is not JSON: {error}") from None
    return copied


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _metadata(obj: Obj) -> dict[str, Any]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) or not metadata["name"]:
        raise InvalidObjectError("metadata.name is required")
    return metadata


class Store:
    """Objects per resource, the global revision and the bounded history."""

    def __init__(
        self, *, initial_revision: int = 1000, history_limit: int = 1000, apply_defaults: bool = True
    ):
        self._revision = initial_revision
        self._history: deque[Event] = deque(maxlen=history_limit)
        self._compacted_at = initial_revision
        self._objects: dict[str, dict[str, Record]] = {resource.plural: {} for resource in RESOURCES}
        self._sorted_keys: dict[str, list[str] | None] = {resource.plural: None for resource in RESOURCES}
        self.apply_defaults = apply_defaults
        self._cluster_ips: Counter[str] = Counter()
        self._defaulter = Defaulter(ClusterIPAllocator(), NodePortAllocator(), self._cluster_ip_in_use)

    # --- revision and history -------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def floor(self) -> int:
        """The oldest revision N a watch may start from and still get every event after N."""
        if self._history:
            return self._history[0].revision - 1
        return max(self._compacted_at, self._revision)

    @property
    def history_limit(self) -> int:
        return self._history.maxlen or 0

    @history_limit.setter
    def history_limit(self, limit: int) -> None:
        kept = list(self._history)[-limit:] if limit else []
        self._history = deque(kept, maxlen=limit)

    def compact(self, keep: int = 0) -> int:
        """Forget all but the newest `keep` events; returns the new floor."""
        kept = list(self._history)[-keep:] if keep else []
        self._history = deque(kept, maxlen=self._history.maxlen)
        self._compacted_at = self._revision
        return self.floor

    def events_since(self, revision: int) -> Iterator[Event]:
        """Every event after `revision`, oldest first; ExpiredError if the history no longer reaches back."""
        if revision < self.floor:
            raise ExpiredError(revision, self.floor)
        # Revisions in the history are consecutive: every write appends one, compaction drops the oldest.
        start = revision + 1 - self._history[0].revision if self._history else 0
        return itertools.islice(self._history, max(start, 0), None)

    # --- reads ----------------------------------------------------------------------------------------

    def get(self, resource: ResourceType, namespace: str | None, name: str) -> Record | None:
        return self._objects[resource.plural].get(object_key(resource, namespace, name))

    def records(self, resource: ResourceType, at_revision: int | None = None) -> list[tuple[str, Record]]:
        """(key, record) sorted by key, as of `at_revision` (default: now), rebuilt from the history."""
        current = self._objects[resource.plural]
        if at_revision is None or at_revision >= self._revision:
            return [(key, current[key]) for key in self._keys(resource)]
        later = [event for event in self.events_since(at_revision) if event.resource is resource]
        if not later:
            return [(key, current[key]) for key in self._keys(resource)]
        snapshot = dict(current)
        for event in reversed(later):
            if event.previous is None:
                del snapshot[event.key]
            else:
                snapshot[event.key] = event.previous
        return sorted(snapshot.items())

    def _keys(self, resource: ResourceType) -> list[str]:
        keys = self._sorted_keys[resource.plural]
        if keys is None:
            keys = sorted(self._objects[resource.plural])
            self._sorted_keys[resource.plural] = keys
        return keys

    def _cluster_ip_in_use(self, address: str) -> bool:
        return self._cluster_ips[address] > 0

    def _track_cluster_ips(
        self, resource: ResourceType, removed: Record | None, added: Record | None
    ) -> None:
        if resource is not SERVICES:
            return
        for record, change in ((removed, -1), (added, 1)):
            spec = record.obj.get("spec") if record is not None else None
            if isinstance(spec, dict) and isinstance(spec.get("clusterIP"), str):
                self._cluster_ips[spec["clusterIP"]] += change

    # --- writes ---------------------------------------------------------------------------------------

    def create(self, resource: ResourceType, obj: Obj) -> Event:
        new = self._prepare(resource, obj)
        metadata = new["metadata"]
        key = object_key(resource, metadata.get("namespace"), metadata["name"])
        if key in self._objects[resource.plural]:
            raise AlreadyExistsError(f'{resource.qualified_name} "{metadata["name"]}" already exists')
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = _now()
        if resource is ENDPOINTSLICES:
            metadata["generation"] = 1
        return self._write(resource, ADDED, key, new, None)

    def update(self, resource: ResourceType, obj: Obj) -> Event | None:
        """Replace an object; None when nothing changed (the server skips no-op writes: no new revision)."""
        metadata = _metadata(obj)
        key = object_key(resource, metadata.get("namespace") or "default", metadata["name"])
        old = self._objects[resource.plural].get(key)
        if old is None:
            raise NotFoundError(f'{resource.qualified_name} "{metadata["name"]}" not found')
        new = self._prepare(resource, obj, old.obj)
        metadata = new["metadata"]
        requested = metadata.get("resourceVersion")
        if requested and str(requested) != old.obj["metadata"]["resourceVersion"]:
            raise ConflictError(
                f'Operation cannot be fulfilled on {resource.qualified_name} "{metadata["name"]}": the '
                "object has been modified; please apply your changes to the latest version and try again"
            )
        for preserved in ("uid", "creationTimestamp", "generation", "resourceVersion"):
            if preserved in old.obj["metadata"]:
                metadata[preserved] = old.obj["metadata"][preserved]
            else:
                metadata.pop(preserved, None)
        if new == old.obj:
            return None
        if resource is ENDPOINTSLICES:
            metadata["generation"] = int(old.obj["metadata"].get("generation", 0)) + 1
        return self._write(resource, MODIFIED, key, new, old)

    def delete(self, resource: ResourceType, namespace: str | None, name: str) -> Event:
        key = object_key(resource, namespace or "default", name)
        old = self._objects[resource.plural].get(key)
        if old is None:
            raise NotFoundError(f'{resource.qualified_name} "{name}" not found')
        return self._write(resource, DELETED, key, json_copy(old.obj), old)

    def _prepare(self, resource: ResourceType, obj: Obj, old: Obj | None = None) -> Obj:
        new = json_copy(obj)
        new.pop("kind", None)
        new.pop("apiVersion", None)
        metadata = _metadata(new)
        if resource.namespaced:
            metadata.setdefault("namespace", "default")
        else:
            metadata.pop("namespace", None)
        if self.apply_defaults:
            if old is not None:
                carry_allocations(resource, new, old)
            self._defaulter.apply(resource, new)
        # Go's field order: metadata first after the type fields.
        return {"metadata": new.pop("metadata"), **new}

    def _write(self, resource: ResourceType, kind: str, key: str, obj: Obj, previous: Record | None) -> Event:
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        record = Record.of(obj)
        objects = self._objects[resource.plural]
        if kind == DELETED:
            del objects[key]
        else:
            objects[key] = record
        self._track_cluster_ips(resource, previous, None if kind == DELETED else record)
        if kind != MODIFIED:
            self._sorted_keys[resource.plural] = None
        event = Event(self._revision, kind, resource, key, record, previous)
        self._history.append(event)
        return event


def with_resource_version(record: Record, revision: int) -> Record:
    """The record's object as of another revision (a DELETED event sent for an object leaving a selector)."""
    obj = json_copy(record.obj)
    obj["metadata"]["resourceVersion"] = str(revision)
    return Record.of(obj)


def typed_body(resource: ResourceType, record: Record) -> bytes:
    """The object's JSON with kind and apiVersion first, as a GET or a watch event carries it."""
    head = b'{"kind":"%s","apiVersion":"%s"' % (resource.kind.encode(), resource.api_version.encode())
    return head + (b"," + record.body[1:] if record.body != b"{}" else b"}")
