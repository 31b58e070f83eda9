"""What a source of cluster state is, and the intake it feeds.

A source (the Kubernetes watch, the manifest file) turns whatever it reads into raw Service and
EndpointSlice dicts and hands them to an ``ObjectSink``; it knows nothing about IPVS. The core's
``ChangeTracker`` is the sink in the daemon: it satisfies ``ObjectSink`` structurally, without importing this
module (the core never imports adapters).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

# The two resources the "initialized" gate waits for.
ListedKind: TypeAlias = Literal["services", "endpointslices"]


class ObjectSink(Protocol):
    """The intake a source feeds: the newest version of each object, deletions, and "fully listed" marks.

    Parameter types are the narrowest a source passes (a ``dict``, the two literal kinds) so that an
    implementation accepting wider ones (``Mapping``, ``str``) still satisfies the protocol. Return types are
    ``object`` because sources ignore them: a tracker that reports whether anything changed still fits.
    """

    def upsert_service(self, raw: dict[str, Any]) -> object:
        """A Service was added or changed (``raw`` is the whole object as decoded JSON/YAML)."""
        ...

    def delete_service(self, namespace: str, name: str) -> object:
        """The Service ``namespace/name`` is gone."""
        ...

    def upsert_slice(self, raw: dict[str, Any]) -> object:
        """An EndpointSlice was added or changed."""
        ...

    def delete_slice(self, namespace: str, name: str) -> object:
        """The EndpointSlice ``namespace/name`` is gone."""
        ...

    def mark_listed(self, kind: ListedKind) -> object:
        """Every object of ``kind`` that existed when the source started has now been fed."""
        ...


class Source(Protocol):
    """Something that feeds cluster state into a sink until it is cancelled."""

    async def run(self, sink: ObjectSink) -> None:
        """Feed the initial state, ``mark_listed`` each kind, then feed every change until stopped.

        Cancellation is the normal way to stop; a source must leave no task of its own behind.
        """
        ...


@runtime_checkable
class Pending(Protocol):
    """A source that knows when it last fell behind its input (the file source: a change seen, not yet
    applied). The daemon's ``/healthz`` fails when that is older than twice the sync period."""

    @property
    def pending_since(self) -> float | None:
        """When (the event loop's ``time()``) the oldest change not yet fed was seen; None: up to date."""
        ...
