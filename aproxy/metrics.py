"""The daemon's Prometheus metrics, in a private registry (importing aproxy never touches the global one).

kube-proxy's exact names (``kubeproxy_*``, ``rest_client_*``) where the meaning is the same, so the dashboards
and alerts operators run for kube-proxy keep working; ``aproxy_*`` for aproxy's own. No metric is exported
under two names. Only the sync duration histograms are observed as they happen;
everything else is read from the live objects when scraped (``_LiveCollector``): the tracker's change and
skip counts, the syncer's operation counters, the sources' counters. The counts live in one place and cannot
drift from what the code did.

Metrics:

- ``kubeproxy_sync_proxy_rules_duration_seconds`` (histogram, 1 ms x 2^k, 15 buckets): start-up and
  incremental sync passes. ``aproxy_audit_duration_seconds`` (same buckets): the periodic full comparison
  (a round of slices, summed).
- ``kubeproxy_network_programming_duration_seconds`` (histogram, kube-proxy's buckets): from a change's
  trigger time (an EndpointSlice's ``endpoints.kubernetes.io/last-change-trigger-time``, a Service change's
  arrival) to the end of the sync pass that programmed it (aproxy/core/latency.py).
- ``kubeproxy_sync_proxy_rules_last_timestamp_seconds``: wall-clock time of the last successful sync;
  ``kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds``: of the last change queued for a sync.
- ``kubeproxy_sync_proxy_rules_service_changes_total`` / ``_endpoint_changes_total``: Service and
  EndpointSlice events that changed what a service translates to;
  ``aproxy_sync_proxy_rules_changes_pending``: services changed and not yet taken by a sync (kube-proxy
  counts pending Service and endpoint changes apart: not the same meaning, so aproxy's name).
- ``kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`` (internal, external; a gauge, as
  kube-proxy's): services whose Local policy leaves this node without endpoints while they have some.
- ``rest_client_requests_total{code,method,host}`` and ``rest_client_request_duration_seconds{verb,url}``
  (client-go's buckets): the Kubernetes API client's requests, when the source keeps ``request_stats``.
- ``aproxy_sync_passes_total{kind}`` and ``aproxy_sync_failures_total{kind}`` (kind: start, sync, audit,
  drain; a failure is a pass with a refused operation or one that could not reach the kernel at all);
  ``aproxy_sync_retry_delay_seconds``: the backoff before the next retry (0 when the last sync succeeded).
- ``aproxy_ipvs_operations_total{op,result}``; ``aproxy_audit_repairs_total``;
  ``aproxy_virtual_server_conflicts_total``; ``aproxy_draining_real_servers``.
- ``aproxy_objects_skipped_total{kind}``; ``aproxy_services``, ``aproxy_endpoint_slices`` (objects held).
- Backend health checks (``health_metrics``): ``aproxy_health_checks_total{result}`` (ok, refused, reset,
  unreachable, timeout, failed; error: the node's own trouble), ``aproxy_health_check_duration_seconds``
  (histogram, 0.1 ms x 2^k), ``aproxy_health_transitions_total{to}`` (healthy, unhealthy),
  ``aproxy_backends_unhealthy``, ``aproxy_virtual_servers_failing_open``,
  ``aproxy_health_check_interval_stretch_ratio`` (1: every check on time; 2: the rate limit doubled the
  intervals), ``aproxy_health_check_targets``.
- ``aproxy_source_*``: whichever counters the source keeps (see ``SOURCE_COUNTERS``); the file source's
  ``aproxy_source_objects_held`` (gauge).
- ``process_*`` from prometheus_client's process collector.
"""

from __future__ import annotations

import itertools
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from aproxy.core.changes import ChangeTracker
from aproxy.core.locality import without_local_endpoints
from aproxy.core.verdicts import HealthView
from aproxy.health.checker import DURATION_BOUNDS, HealthStats
from aproxy.kernel_loop import LoopStats
from aproxy.syncer import Syncer

PREFIX: Final = "aproxy"
# kube-proxy's prefix, for the metrics that mean what kube-proxy's mean.
KUBE_PROXY: Final = "kubeproxy"
# kube-proxy's buckets: 1 ms x 2^k, 15 of them (up to ~16 s).
DURATION_BUCKETS: Final = tuple(0.001 * 2**k for k in range(15))
# kube-proxy's network programming buckets: 0.25 s, 0.5 s, 1-59 s by 1, 60-115 s by 5, 120-300 s by 30.
PROGRAMMING_BUCKETS: Final = (
    0.25,
    0.5,
    *range(1, 60),
    *range(60, 120, 5),
    *range(120, 301, 30),
)
# client-go's, as aproxy.sources.kube.requests counts them (metrics must not import the Kubernetes source).
REST_CLIENT_BUCKETS: Final = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)

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
        health: tuple[HealthView, HealthStats] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.sync_duration = Histogram(
            f"{KUBE_PROXY}_sync_proxy_rules_duration_seconds",
            "Duration of a sync pass (start-up or incremental): translate, plan, apply.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.programming_duration = Histogram(
            f"{KUBE_PROXY}_network_programming_duration_seconds",
            "From a change's trigger time to the kernel accepting it (kube-proxy's SLI).",
            buckets=PROGRAMMING_BUCKETS,
            registry=self.registry,
        )
        self.audit_duration = Histogram(
            f"{PREFIX}_audit_duration_seconds",
            "Duration of an audit round in the kernel loop (its slices summed): read, compare, repair.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(tracker, syncer, source, stats))
        if health is not None:
            self.registry.register(_HealthCollector(*health))
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
        yield from rest_client_metrics(self._source())
        yield from file_source_gauges(self._source())

    def _tracker_metrics(self) -> Iterator[Metric]:
        tracker = self._tracker
        yield _counter(
            "sync_proxy_rules_service_changes",
            "Service events that changed what a service translates to.",
            tracker.service_changes_total,
            prefix=KUBE_PROXY,
        )
        yield _counter(
            "sync_proxy_rules_endpoint_changes",
            "EndpointSlice events that changed what a service translates to.",
            tracker.slice_changes_total,
            prefix=KUBE_PROXY,
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
        syncer = self._syncer()
        if syncer is not None:
            yield _no_local_endpoints(tracker, syncer.context.node_name)
        yield _gauge("services", "Services held (parsed).", tracker.service_count)
        yield _gauge("endpoint_slices", "EndpointSlices held.", tracker.slice_count)

    def _loop_metrics(self) -> Iterator[Metric]:
        stats = self._stats
        yield _gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "Wall-clock time of the last successful sync (0: none yet).",
            stats.last_sync_wall or 0.0,
            prefix=KUBE_PROXY,
        )
        yield _gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "Wall-clock time of the last change queued for a sync (0: none yet).",
            stats.last_queued_wall or 0.0,
            prefix=KUBE_PROXY,
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


class _HealthCollector:
    """The health checks' counts, read at scrape time."""

    def __init__(self, view: HealthView, stats: HealthStats) -> None:
        self._view = view
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from health_metrics(self._view, self._stats)


def health_metrics(view: HealthView, stats: HealthStats) -> Iterator[Metric]:
    yield _labelled_counter("health_checks", "Backend health checks, by result.", "result", stats.checks)
    yield _labelled_counter(
        "health_transitions", "Backend health state changes, by new state.", "to", stats.transitions
    )
    yield _gauge(
        "backends_unhealthy",
        "Backends judged unhealthy (weight 0 unless failing open).",
        view.unhealthy_count,
    )
    yield _gauge(
        "virtual_servers_failing_open",
        "Virtual servers whose every real server is unhealthy, kept at their weights (fail open).",
        view.failing_open_count,
    )
    yield _gauge(
        "health_check_interval_stretch_ratio",
        "How much the per-node rate limit stretches the check intervals (1: not at all).",
        stats.stretch_ratio,
    )
    yield _gauge("health_check_targets", "Backends (address, checked port) being checked.", stats.targets)
    durations = stats.durations
    cumulative = list(itertools.accumulate(durations.counts))  # one more than the bounds: the +Inf bucket
    bounds = [*map(floatToGoString, DURATION_BOUNDS), "+Inf"]
    yield HistogramMetricFamily(
        f"{PREFIX}_health_check_duration_seconds",
        "Duration of a backend health check: connect to answer, or the timeout.",
        buckets=list(zip(bounds, cumulative, strict=True)),
        sum_value=durations.total,
    )


def source_metrics(source: object) -> Iterator[Metric]:
    """The ``SOURCE_COUNTERS`` the source has (sources are duck-typed: each keeps its own counters)."""
    for attribute, name, help_text, label in SOURCE_COUNTERS:
        value = getattr(source, attribute, None)
        if label is not None and isinstance(value, Mapping):
            yield _labelled_counter(name, help_text, label, value)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield _counter(name, help_text, value)


def _no_local_endpoints(tracker: ChangeTracker, node_name: str) -> Metric:
    """kube-proxy's gauge (a _total gauge, as kube-proxy names it): services whose Local policy leaves this
    node without endpoints while they have some elsewhere (aproxy/core/locality.py)."""
    inputs = (tracker.inputs(key) for key in tracker.services())
    held = ((info, slices) for info, slices in inputs if info is not None)
    counts = without_local_endpoints(held, node_name)
    family = GaugeMetricFamily(
        f"{KUBE_PROXY}_sync_proxy_rules_no_local_endpoints_total",
        "Number of services with a Local traffic policy and no endpoints on this node.",
        labels=["traffic_policy"],
    )
    for policy, count in sorted(counts.items()):
        family.add_metric([policy], count)
    return family


def rest_client_metrics(source: object) -> Iterator[Metric]:
    """client-go's ``rest_client_*`` from the source's ``request_stats`` (the Kubernetes source's)."""
    stats = getattr(source, "request_stats", None)
    if stats is None:
        return
    requests = CounterMetricFamily(
        "rest_client_requests",
        "Number of HTTP requests, partitioned by status code, method, and host.",
        labels=["code", "method", "host"],
    )
    for labels, count in sorted(stats.requests.items()):
        requests.add_metric(list(labels), count)
    yield requests
    durations = HistogramMetricFamily(
        "rest_client_request_duration_seconds",
        "Request latency in seconds. Broken down by verb, and URL.",
        labels=["verb", "url"],
    )
    for labels, histogram in sorted(stats.durations.items()):
        cumulative = list(itertools.accumulate(histogram.buckets))
        bounds = [*(f"{bound:g}" for bound in REST_CLIENT_BUCKETS), "+Inf"]
        durations.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)), histogram.total)
    yield durations


def file_source_gauges(source: object) -> Iterator[Metric]:
    """The file source's objects held at their last good version (a file has them invalid)."""
    held = getattr(source, "objects_held", None)
    if isinstance(held, int) and not isinstance(held, bool):
        yield _gauge(
            "source_objects_held",
            "Objects whose file version is invalid, kept at their last good version.",
            held,
        )


def _counter(name: str, help_text: str, value: float, *, prefix: str = PREFIX) -> Metric:
    return CounterMetricFamily(f"{prefix}_{name}", help_text, value=value)


def _gauge(name: str, help_text: str, value: float, *, prefix: str = PREFIX) -> Metric:
    return GaugeMetricFamily(f"{prefix}_{name}", help_text, value=value)


def _labelled_counter(name: str, help_text: str, label: str, values: Mapping[Any, Any]) -> Metric:
    """One sample per ``str -> number`` entry (other entries, from a duck-typed source, are left out)."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=[label])
    for key, count in sorted(values.items(), key=lambda item: str(item[0])):
        if isinstance(key, str) and isinstance(count, int | float):
            family.add_metric([key], count)
    return family
