"""The decision behind ``/healthz``, ``/livez`` and ``/readyz``: a pure function of the sync loop's clock.

kube-proxy's rule, which operators' probes and alerts already encode: a node proxy is unhealthy when a change
has waited longer than ``2 x syncPeriod`` without being programmed. Here that is: the oldest request not yet
confirmed by a successful sync (``pending_since``) is older than the limit, *and* no sync has succeeded within
the limit either. The second half matters when a request arrived during a sync that then succeeded: the
request is still pending, but the loop is demonstrably alive; it turns unhealthy only once syncs stop
succeeding for the whole limit.

- ``/healthz``: also unhealthy before the initial sync has completed (a node that has not programmed the
  cluster yet must not receive traffic from a load balancer that checks it), and, as kube-proxy's, while the
  node is not eligible (being deleted, or tainted ``ToBeDeletedByClusterAutoscaler``): load balancers of
  ``externalTrafficPolicy: Cluster`` services probe it to drain a node before it is removed.
  Also unhealthy when the source has not applied its input's current content for longer than the same
  limit (a manifest file that does not parse, cannot be read, or never stops changing): the node
  programs an old state, as surely as when syncs fail.
- ``/livez``: the sync staleness rule only. Waiting for the first list (the API server unreachable at
  start-up) is not a reason for the kubelet to restart the process, nor is the node's removal, nor a
  manifest file aproxy cannot apply (a restart would read the same file).
- ``/readyz``: ready once a sync (the initial one, or a retry of it) has succeeded.

All times are seconds on one monotonic clock; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

STALENESS_FACTOR = 2.0


@dataclass(frozen=True, slots=True)
class Health:
    """One decision for the three endpoints, and why (for the log and the response)."""

    healthz: bool
    livez: bool
    ready: bool
    reason: str
    node_eligible: bool  # kube-proxy's ``nodeEligible``, as the JSON body shows it


def decide(
    now: float,
    pending_since: float | None,
    last_success: float | None,
    sync_period: float,
    initialized: bool,
    *,
    node_eligible: bool = True,
    node_reason: str = "",
    source_pending_since: float | None = None,
) -> Health:
    """The endpoints' verdicts at ``now`` (see the module docstring for the rules).

    ``node_reason`` says why the node is not eligible ("being deleted"); it is read only when it is not.
    ``source_pending_since``: since when the source has not applied its input's current content."""
    limit = STALENESS_FACTOR * sync_period
    waited = now - pending_since if pending_since is not None else 0.0
    stale = waited > limit and (last_success is None or now - last_success > limit)
    behind = now - source_pending_since if source_pending_since is not None else 0.0
    source_stale = behind > limit
    ready = initialized and last_success is not None
    if stale:
        reason = f"a change has waited {waited:.1f} s without a successful sync"
    elif source_stale:
        reason = f"the source has not applied its files' current content for {behind:.1f} s"
    elif not initialized:
        reason = "the initial sync has not completed"
    elif not node_eligible:
        reason = f"node is {node_reason or 'not eligible'}"
    else:
        reason = "ok"
    return Health(
        healthz=initialized and not stale and not source_stale and node_eligible,
        livez=not stale,
        ready=ready,
        reason=reason,
        node_eligible=node_eligible,
    )


def rfc3339(wall: float) -> str:
    """A wall-clock time (``time.time()``) as RFC 3339 in UTC, as kube-proxy's JSON shows it."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def health_body(last_updated: float | None, current_time: float, node_eligible: bool) -> dict[str, Any]:
    """kube-proxy's ``/healthz`` JSON: ``lastUpdated`` (null before the first successful sync),
    ``currentTime`` and ``nodeEligible`` (false while the node is being deleted or tainted
    ``ToBeDeletedByClusterAutoscaler``; always true with manifest sources)."""
    return {
        "lastUpdated": rfc3339(last_updated) if last_updated is not None else None,
        "currentTime": rfc3339(current_time),
        "nodeEligible": node_eligible,
    }
