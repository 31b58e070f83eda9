"""How long to wait before retrying something that failed: one policy for every retry loop in aproxy.

The kernel loop (a failed sync), the Kubernetes watch (a failed list or watch) and the Node read all back off
the same way: ``initial * 2**(n-1) + uniform(0, jitter)`` before attempt ``n + 1``, at most ``cap``. This is
tenacity's ``wait_exponential_jitter`` formula; it is written here as a pure function so that a loop which
tenacity cannot wrap (the kernel loop: each retry picks up whatever changed meanwhile) computes it without
building tenacity's call state by hand, and so that a test can check a delay without sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with additive jitter, capped: see the module docstring."""

    initial: float = 1.0
    cap: float = 30.0
    jitter: float = 1.0

    def problems(self) -> list[str]:
        """What makes this policy unusable, as sentences (empty when it is fine)."""
        if self.initial <= 0 or self.cap < self.initial or self.jitter < 0:
            return ["retry backoff: need initial > 0, cap >= initial and jitter >= 0"]
        return []

    def delay(self, attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait after the ``attempt``-th consecutive failure (``attempt`` >= 1)."""
        # min() before the power would overflow: 2**1100 is too large for a float.
        exponent = min(max(attempt, 1) - 1, 64)
        return min(self.initial * 2.0**exponent + uniform(0.0, self.jitter), self.cap)


class Backoff:
    """Consecutive failures of one loop, and the delay each one earns under ``policy``."""

    __slots__ = ("failures", "policy")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0

    def failed(self) -> float:
        """One more consecutive failure: the delay before the next attempt."""
        self.failures += 1
        return self.policy.delay(self.failures)

    def succeeded(self) -> None:
        self.failures = 0
