"""What the health checks are told: ``HealthCheckSettings``, the ``--health-check-*`` flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Scope = Literal["all", "used"]
SCOPES: Final = ("all", "used")

# The shortest interval and timeout an operator may ask for: every node checks every backend.
MIN_INTERVAL: Final = 0.1
MIN_TIMEOUT: Final = 0.01


@dataclass(frozen=True, slots=True)
class HealthCheckSettings:
    """Active TCP checks of the real servers aproxy programs (aproxy/health/)."""

    enabled: bool = True
    interval: float = 2.0  # seconds between two checks of one backend (before any stretching)
    timeout: float = 1.0  # a handshake not done by then is a failure
    fall: int = 3  # consecutive failures that make a backend unhealthy (weight 0)
    rise: int = 2  # consecutive successes that make an unhealthy backend healthy again
    concurrency: int = 1000  # checks in flight at once
    max_rate: float = 5000.0  # checks per second from this node; beyond it, intervals stretch
    scope: Scope = "all"
    used_window: float = 300.0  # scope "used": a backend that carried connections this recently
    fail_closed: bool = False  # every backend of a virtual server unhealthy: weight 0 all the same

    def problems(self) -> list[str]:
        """What is wrong with these settings, one flag each (empty: usable)."""
        problems = []
        if self.interval < MIN_INTERVAL:
            problems.append(f"--health-check-interval ({self.interval:g}s) must be >= {MIN_INTERVAL:g}s")
        if self.timeout < MIN_TIMEOUT:
            problems.append(f"--health-check-timeout ({self.timeout:g}s) must be >= {MIN_TIMEOUT:g}s")
        for flag, value in (("fall", self.fall), ("rise", self.rise), ("concurrency", self.concurrency)):
            if value < 1:
                problems.append(f"--health-check-{flag} ({value}) must be >= 1")
        if not self.max_rate > 0:
            problems.append(f"--health-check-max-rate ({self.max_rate:g}) must be > 0")
        if self.scope not in SCOPES:
            problems.append(f"--health-check-scope ({self.scope}) must be one of {', '.join(SCOPES)}")
        if not self.used_window > 0:
            problems.append(f"--health-check-used-window ({self.used_window:g}s) must be > 0")
        return problems
