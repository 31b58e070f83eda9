"""The daemon's Prometheus metrics, in a private registry (importing aproxy never touches the global one).

Names follow kube-proxy's (``kubeproxy_*`` becomes ``aproxy_*``) where the meaning is the same, so existing
dashboards need only the prefix changed. Only the sync duration histograms are observed as they happen;
everything else is read from the live objects when scraped (``_LiveCollector``): the tracker's change and
skip counts, the syncer's operation counters, the sources' counters. The counts live in one place and cannot
drift from what the code did.

Metrics:

- ``aproxy_sync_proxy_rules_duration_seconds`` (histogram, 1 ms x 2^k, 15 buckets): start-up and incremental
  sync passes. ``aproxy_audit_duration_seconds`` (same buckets): the periodic full comparison.
- ``aproxy_sync_proxy_rules_last_timestamp_seconds``: wall-clock time of the last successful sync;
  ``aproxy_sync_proxy_rules_last_queued_timestamp_seconds``: of the last change queued for a sync.
- ``aproxy_sync_proxy_rules_service_changes_total`` / ``_endpoint_changes_total``: Service and EndpointSlice
  events that changed what a service translates to; ``aproxy_sync_proxy_rules_changes_pending``: services
  changed and not yet taken by a sync.
- ``aproxy_sync_passes_total{kind}`` and ``aproxy_sync_failures_total{kind}`` (kind: start, sync, audit,
  drain; a failure is a pass with a refused operation or one that could not reach the kernel at all);
  ``aproxy_sync_retry_delay_seconds``: the backoff before the next retry (0 when the last sync succeeded).
- ``aproxy_ipvs_operations_total{op,result}``; ``aproxy_audit_repairs_total``;
  ``aproxy_virtual_server_conflicts_total``; ``aproxy_draining_real_servers``.
- ``aproxy_objects_skipped_total{kind}``; ``aproxy_services``, ``aproxy_endpoint_slices`` (objects held).
- ``aproxy_source_*``: whichever counters the source keeps (see ``SOURCE_COUNTERS``); the file source's
  ``aproxy_source_objects_held`` (gauge).
- ``process_*`` from prometheus_client's process collector.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aproxy.core.changes import ChangeTracker
from aproxy.kernel_loop import LoopStats
from aproxy.syncer import Syncer

PREFIX: Final = "aproxy"
# kube-proxy's buckets: 1 ms x 2^k, 15 of them (up to ~16 s).
DURATION_BUCKETS: Final = tuple(0.001 * 2**k for k in range(15))

# Counters a source may keep as plain attributes: (attribute, metric name without prefix, help, label).
# An int attribute becomes one sample; a Counter (or any str -> int mapping) one sample per key, under label.
# FileSource keeps reloads/reload_errors; KubernetesSource the watch counters.
SOURCE_COUNTERS: Final[tuple[tuple[str, str, str, str | None], ...]] = (
    ("reloads", "source_reloads", "Successful reads of the manifest files.", None),
    ("reload_errors", "source_reload_errors", "Reads of the manifest files that failed (state kept).", None),
    ("events_total", "source_events", "Watch events received, by type (bookmarks included).", "type"),
    ("relists_total", "source_relists", "Lists after the first complete one (410 Gone, errors).", None),
    ("watch_restarts_total", "source_watch_restarts", "Watches opened after the first one.", None),
    ("errors_total", "source_errors", "Failed requests to the API server, by kind.", "kind"),
    ("malformed_events", "source_malformed_events", "Watch lines skipped as malformed.", None),
    ("credential_renewals", "source_credential_renewals", "Kubeconfig token renewals that changed it.", None),
    (
        "credential_renewal_failures",
        "source_credential_renewal_failures",
        "Kubeconfig token renewals that failed (the current token is kept).",
        None,
    ),
)


class DaemonMetrics:
    """The registry, the histograms the kernel loop observes, and the exposition for ``/metrics``."""

    content_type: Final = CONTENT_TYPE_LATEST

    def __init__(
        self,
        *,
        tracker: ChangeTracker,
        syncer: Callable[[], Syncer | None],
        source: Callable[[], object],
        stats: LoopStats,
    ) -> None:
        self.registry = CollectorRegistry()
        self.sync_duration = Histogram(
            f"{PREFIX}_sync_proxy_rules_duration_seconds",
            "Duration of a sync pass (start-up or incremental): translate, plan, apply.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.audit_duration = Histogram(
            f"{PREFIX}_audit_duration_seconds",
            "Duration of an audit: dump the kernel's owned state, compare, repair.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(tracker, syncer, source, stats))
        ProcessCollector(registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Reads the current values at scrape time (on the event loop's thread: no torn reads)."""

    def __init__(
        self,
        tracker: ChangeTracker,
        syncer: Callable[[], Syncer | None],
        source: Callable[[], object],
        stats: LoopStats,
    ) -> None:
        self._tracker = tracker
        self._syncer = syncer
        self._source = source
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from self._tracker_metrics()
        yield from self._loop_metrics()
        yield from self._syncer_metrics(self._syncer())
        yield from source_metrics(self._source())
        yield from file_source_gauges(self._source())

    def _tracker_metrics(self) -> Iterator[Metric]:
        tracker = self._tracker
        yield _counter(
            "sync_proxy_rules_service_changes",
            "Service events that changed what a service translates to.",
            tracker.service_changes_total,
        )
        yield _counter(
            "sync_proxy_rules_endpoint_changes",
            "EndpointSlice events that changed what a service translates to.",
            tracker.slice_changes_total,
        )
        yield _gauge(
            "sync_proxy_rules_changes_pending",
            "Services whose Service or EndpointSlices changed and that no sync has taken yet.",
            tracker.dirty_count,
        )
        yield _labelled_counter(
            "objects_skipped",
            "Objects (or parts) skipped as unusable, by kind.",
            "kind",
            tracker.skipped_total,
        )
        yield _gauge("services", "Services held (parsed).", tracker.service_count)
        yield _gauge("endpoint_slices", "EndpointSlices held.", tracker.slice_count)

    def _loop_metrics(self) -> Iterator[Metric]:
        stats = self._stats
        yield _gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "Wall-clock time of the last successful sync (0: none yet).",
            stats.last_sync_wall or 0.0,
        )
        yield _gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "Wall-clock time of the last change queued for a sync (0: none yet).",
            stats.last_queued_wall or 0.0,
        )
        yield _labelled_counter(
            "sync_failures",
            "Passes with a refused operation, or that could not reach the kernel, by kind.",
            "kind",
            stats.failures,
        )
        yield _gauge(
            "sync_retry_delay_seconds",
            "Backoff before the next retry of a failed sync (0 when the last sync succeeded).",
            stats.retry_delay,
        )

    def _syncer_metrics(self, syncer: Syncer | None) -> Iterator[Metric]:
        counters = syncer.counters if syncer is not None else None
        operations = CounterMetricFamily(
            f"{PREFIX}_ipvs_operations",
            "Kernel operations attempted, by operation and result (ok, error).",
            labels=["op", "result"],
        )
        for (op, result), count in sorted((counters.operations if counters else Counter()).items()):
            operations.add_metric([op, result], count)
        yield operations
        yield _labelled_counter(
            "sync_passes",
            "Passes run, by kind (start, sync, audit, drain).",
            "kind",
            counters.passes if counters else {},
        )
        yield _counter(
            "audit_repairs",
            "Operations the audit issued to repair drift.",
            counters.audit_repairs if counters else 0,
        )
        yield _counter(
            "virtual_server_conflicts",
            "Virtual servers wanted by two services (the second one skipped).",
            counters.conflicts if counters else 0,
        )
        draining = sum(1 for _ in syncer.planner.draining()) if syncer is not None and syncer.started else 0
        yield _gauge(
            "draining_real_servers", "TCP real servers at weight 0 waiting for their connections.", draining
        )


def source_metrics(source: object) -> Iterator[Metric]:
    """The ``SOURCE_COUNTERS`` the source has (sources are duck-typed: each keeps its own counters)."""
    for attribute, name, help_text, label in SOURCE_COUNTERS:
        value = getattr(source, attribute, None)
        if label is not None and isinstance(value, Mapping):
            yield _labelled_counter(name, help_text, label, value)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield _counter(name, help_text, value)


def file_source_gauges(source: object) -> Iterator[Metric]:
    """The file source's objects held at their last good version (a file has them invalid)."""
    held = getattr(source, "objects_held", None)
    if isinstance(held, int) and not isinstance(held, bool):
        yield _gauge(
            "source_objects_held",
            "Objects whose file version is invalid, kept at their last good version.",
            held,
        )


def _counter(name: str, help_text: str, value: float) -> Metric:
    return CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=value)


def _gauge(name: str, help_text: str, value: float) -> Metric:
    return GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value)


def _labelled_counter(name: str, help_text: str, label: str, values: Mapping[Any, Any]) -> Metric:
    """One sample per ``str -> number`` entry (other entries, from a duck-typed source, are left out)."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=[label])
    for key, count in sorted(values.items(), key=lambda item: str(item[0])):
        if isinstance(key, str) and isinstance(count, int | float):
            family.add_metric([key], count)
    return family
