"""Network programming latency: from a change's trigger time to the kernel accepting it.

kube-proxy's ``kubeproxy_network_programming_duration_seconds``, the figure of the Kubernetes networking
SLO: for an EndpointSlice change, from the time the EndpointSlice controller stamped in its
``endpoints.kubernetes.io/last-change-trigger-time`` annotation (when the pod or service change that caused
it happened); for a Service change, from when aproxy received it (a Service carries no such stamp). The
moment of acceptance is the end of the sync pass that programmed the service, unless the pass failed for that
service: then its changes stay pending and are counted when a later pass succeeds.

Like kube-proxy, triggers from before this process started are not counted: the initial list brings objects
changed hours ago, and their "latency" would say nothing about aproxy.

Pure: wall-clock times (``time.time()`` seconds) come from the caller.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any, Final

from aproxy.core.model import ServiceKey

TRIGGER_ANNOTATION: Final = "endpoints.kubernetes.io/last-change-trigger-time"
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
# Per service: a service whose syncs keep failing must not collect trigger times without end.
MAX_PENDING_PER_SERVICE: Final = 64


def trigger_time(raw: Mapping[str, Any]) -> float | None:
    """The slice's trigger annotation as seconds since the epoch, or None when absent or unreadable."""
    metadata = raw.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    text = annotations.get(TRIGGER_ANNOTATION) if isinstance(annotations, dict) else None
    if not isinstance(text, str):
        return None
    try:
        stamp = datetime.fromisoformat(text)  # RFC 3339, nanoseconds included (cut to microseconds)
    except ValueError:
        return None
    return stamp.timestamp() if stamp.tzinfo is not None else None


def service_key(raw: Mapping[str, Any]) -> ServiceKey | None:
    """A Service's own key (its namespace and name), or None when the object does not carry them."""
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        return None
    namespace, name = metadata.get("namespace"), metadata.get("name")
    if isinstance(namespace, str) and namespace and isinstance(name, str) and name:
        return ServiceKey(namespace, name)
    return None


def slice_service(raw: Mapping[str, Any]) -> ServiceKey | None:
    """The service an EndpointSlice belongs to (its namespace and service-name label)."""
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        return None
    labels = metadata.get("labels")
    name = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    namespace = metadata.get("namespace")
    if isinstance(name, str) and name and isinstance(namespace, str) and namespace:
        return ServiceKey(namespace, name)
    return None


class ProgrammingLatency:
    """Trigger times of changes not yet programmed, per service: ``take`` before a sync pass, ``settle``
    after it."""

    __slots__ = ("_pending", "_started")

    def __init__(self, started: float) -> None:
        self._started = started
        self._pending: dict[ServiceKey, list[float]] = {}

    def record(self, service: ServiceKey, trigger: float) -> None:
        if trigger < self._started:
            return
        times = self._pending.setdefault(service, [])
        if trigger not in times and len(times) < MAX_PENDING_PER_SERVICE:
            times.append(trigger)

    @property
    def started(self) -> float:
        """Triggers before this time are not counted."""
        return self._started

    @property
    def pending(self) -> int:
        return sum(map(len, self._pending.values()))

    def take(self) -> dict[ServiceKey, list[float]]:
        """The changes a sync pass starting now will program (the pass takes every dirty service)."""
        taken, self._pending = self._pending, {}
        return taken

    def settle(
        self, taken: Mapping[ServiceKey, list[float]], failed: Collection[ServiceKey], now: float
    ) -> list[float]:
        """The latencies of the taken changes the pass programmed (``now`` is when it ended); the changes of
        ``failed`` services go back to pending, for the pass that retries them."""
        durations: list[float] = []
        for service, times in taken.items():
            if service in failed:
                for trigger in times:
                    self.record(service, trigger)
            else:
                durations.extend(max(0.0, now - trigger) for trigger in times)
        return durations

    def abandon(self, taken: Mapping[ServiceKey, list[float]]) -> None:
        """A pass that could not reach the kernel at all: everything it took stays pending."""
        self.settle(taken, taken.keys(), 0.0)
