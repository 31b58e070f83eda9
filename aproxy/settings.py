"""What ``aproxy run`` is told (``Settings``), checked as a whole when built: settings that cannot work
together raise ``SettingsError`` before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from aproxy.backends.ipvs import IPVSSettings
from aproxy.core.backoff import RetryPolicy
from aproxy.core.drain import DEFAULT_GRACE_PERIOD
from aproxy.core.model import DEFAULT_SCHEDULER, SCHEDULERS, IPAddress
from aproxy.health.config import HealthCheckSettings
from aproxy.sources.file import FileSourceSettings
from aproxy.web.server import ListenAddress

BackendKind = Literal["ipvs", "dry-run"]

# kube-proxy's defaults: health for the node's load balancers, metrics for a local scraper.
DEFAULT_HEALTHZ_ADDRESS: Final = ListenAddress("0.0.0.0", 10256)
DEFAULT_METRICS_ADDRESS: Final = ListenAddress("127.0.0.1", 10249)


class SettingsError(ValueError):
    """Settings that cannot work together (a period out of range, two sources, ...)."""


# The shortest periods an operator may ask for (tests go below them through Settings): an audit reads the
# whole owned table (--audit-period 1ms ran 3,881 of them in 8 s), a drain check reads connection counts.
MINIMUM_PERIODS = {"audit_period": 1.0, "drain_check_period": 0.1}


def period_floor_problems(periods: dict[str, float]) -> list[str]:
    """The periods of ``periods`` (setting name -> seconds) below their ``MINIMUM_PERIODS``."""
    return [
        f"{_flag(name, periods[name])} must be >= {minimum:g}s"
        for name, minimum in MINIMUM_PERIODS.items()
        if name in periods and periods[name] < minimum
    ]


def _flag(name: str, seconds: float) -> str:
    """``--audit-period (0.001s)``: the flag of a setting, with the value it was given."""
    return f"--{name.replace('_', '-')} ({seconds:g}s)"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``aproxy run`` is told. ``sources`` (manifest files or directories) or, when empty, the
    Kubernetes API (``kubeconfig``/``master``, else in-cluster, KUBECONFIG or ~/.kube/config)."""

    node_name: str
    sources: tuple[Path, ...] = ()
    kubeconfig: Path | None = None
    master: str | None = None
    # Empty with the Kubernetes source: read from the Node object (and the zone too, if unset).
    node_ips: tuple[IPAddress, ...] = ()
    node_zone: str | None = None
    default_scheduler: str = DEFAULT_SCHEDULER
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    audit_period: float = 60.0
    drain_check_period: float = 5.0
    drain_grace_period: float = DEFAULT_GRACE_PERIOD
    # How often a kubeconfig's token is re-read (exec plugin, tokenFile: aproxy/sources/kube/config.py).
    credential_renewal_period: float = 60.0
    # The backoff of every retry loop: a failed sync, the Node read.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    backend: BackendKind = "ipvs"
    ipvs: IPVSSettings = field(default_factory=IPVSSettings)
    healthz_address: ListenAddress = DEFAULT_HEALTHZ_ADDRESS
    metrics_address: ListenAddress = DEFAULT_METRICS_ADDRESS
    health_checks: HealthCheckSettings = field(default_factory=HealthCheckSettings)
    # How manifest files are re-read (the settle period); unused with the Kubernetes source.
    file_source: FileSourceSettings = field(default_factory=FileSourceSettings)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise SettingsError("; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not self.node_name:
            problems.append("a node name is required")
        if self.sources and (self.kubeconfig is not None or self.master):
            problems.append("use manifest sources or the Kubernetes API (kubeconfig/master), not both")
        if self.default_scheduler not in SCHEDULERS:
            problems.append(f"unknown IPVS scheduler {self.default_scheduler!r}")
        if self.backend not in ("ipvs", "dry-run"):
            problems.append(f"unknown backend {self.backend!r}")
        if self.min_sync_period < 0:
            problems.append(f"{_flag('min_sync_period', self.min_sync_period)} must be >= 0")
        if self.sync_period <= 0:
            problems.append(f"{_flag('sync_period', self.sync_period)} must be > 0")
        elif self.sync_period < self.min_sync_period:
            problems.append(
                f"{_flag('sync_period', self.sync_period)} must be >= "
                f"{_flag('min_sync_period', self.min_sync_period)}"
            )
        for name in ("audit_period", "drain_check_period", "credential_renewal_period"):
            value = getattr(self, name)
            if value <= 0:
                problems.append(f"{_flag(name, value)} must be > 0")
        if self.drain_grace_period < 0:
            problems.append("the drain grace period must be >= 0")
        problems.extend(self.retry.problems())
        problems.extend(self.health_checks.problems())
        problems.extend(self.file_source.problems())
        return problems
