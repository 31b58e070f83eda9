"""What the API client's requests did, counted as client-go counts them (kube-proxy exports client-go's
``rest_client_requests_total{code,method,host}`` and ``rest_client_request_duration_seconds{verb,url}``, and
the standard proxy dashboard charts both).

kubernetes_asyncio offers no per-request hook: ``instrument`` wraps the ``request`` method of one
``ApiClient``'s REST client, the single call every API method (and every watch) goes through. The duration
is the time to the response's headers (a watch's stream is not included), as client-go's is. A request that
gets no response counts under code ``<error>``, client-go's label for it.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from aproxy.sources.kube.client import ApiClient, ApiException

# client-go's buckets for rest_client_request_duration_seconds (component-base/metrics/prometheus/restclient).
DURATION_BUCKETS: Final = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
NO_RESPONSE: Final = "<error>"


@dataclass(slots=True)
class DurationHistogram:
    """One label set's observations: per-bucket counts (not cumulative; the last is +Inf), sum, count."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


@dataclass(slots=True)
class RequestStats:
    """Counts by (code, method, host) and durations by (verb, url): the URL without its query, so one series
    per resource path rather than one per resourceVersion."""

    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    durations: dict[tuple[str, str], DurationHistogram] = field(default_factory=dict)

    def record(self, method: str, url: str, code: str, seconds: float) -> None:
        parts = urlsplit(url)
        self.requests[(code, method, parts.netloc)] += 1
        key = (method, f"{parts.scheme}://{parts.netloc}{parts.path}")
        self.durations.setdefault(key, DurationHistogram()).observe(seconds)


def instrument(client: ApiClient, stats: RequestStats) -> ApiClient:
    """``client``, its every request recorded in ``stats``."""
    rest = client.rest_client
    original: Callable[..., Awaitable[Any]] = rest.request

    async def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        code = NO_RESPONSE
        try:
            response = await original(method, url, *args, **kwargs)
            code = str(response.status)
            return response
        except ApiException as exc:
            code = str(exc.status) if exc.status else NO_RESPONSE
            raise
        finally:
            stats.record(method, url, code, time.monotonic() - started)

    rest.request = request  # type: ignore[method-assign]
    return client
