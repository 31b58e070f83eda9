"""The health checks' surface: flags, `aproxy plan`/`sync --health-checks` on loopback backends, the
metrics, and the destination usage behind scope "used"."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from aproxy import cli
from aproxy.app import Daemon
from aproxy.backends.base import DestinationUsage, RealServerConnections
from aproxy.backends.memory import MemoryBackend
from aproxy.core.model import L4Protocol, RealServerKey, VirtualServerKey
from aproxy.flags import health_check_settings
from aproxy.health.checker import HealthChecker
from aproxy.health.config import HealthCheckSettings
from aproxy.health.states import Health
from aproxy.settings import Settings, SettingsError
from aproxy.web.server import ListenAddress
from tests.core import k8s
from tests.health.test_prober import accepting, eventually, view_of

ROOT = Path(__file__).resolve().parents[2]
VIRTUAL = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.1"), 80)


def parse(*flags: str) -> HealthCheckSettings:
    args = cli.build_parser().parse_args(["run", "--source", "x", "--node-name", "n", *flags])
    return health_check_settings(args)


def test_flags_defaults_are_the_documented_ones() -> None:
    assert parse() == HealthCheckSettings(
        enabled=True, interval=2.0, timeout=1.0, fall=3, rise=2, scope="all", fail_closed=False
    )


def test_flags() -> None:
    assert parse(
        "--no-health-checks",
        "--health-check-interval", "500ms",
        "--health-check-timeout", "250ms",
        "--health-check-fall", "5",
        "--health-check-rise", "4",
        "--health-check-concurrency", "10",
        "--health-check-max-rate", "100",
        "--health-check-scope", "used",
        "--health-check-used-window", "10m",
        "--health-check-fail-closed",
    ) == HealthCheckSettings(False, 0.5, 0.25, 5, 4, 10, 100.0, "used", 600.0, True)  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--health-check-fall", "0"], "--health-check-fall (0) must be >= 1"),
        (["--health-check-interval", "10ms"], "--health-check-interval (0.01s) must be >= 0.1s"),
        (["--health-check-max-rate", "0"], "--health-check-max-rate (0) must be > 0"),
        (["--health-check-timeout", "0"], "--health-check-timeout (0s) must be >= 0.01s"),
    ],
)
def test_bad_flag_values_are_usage_errors(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "aproxy.cli", "run", "--source", "x.yaml", "--node-name", "n", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_settings_refuse_bad_health_settings() -> None:
    with pytest.raises(SettingsError, match="--health-check-rise"):
        Settings(node_name="n", health_checks=HealthCheckSettings(rise=0))


# --- one-shot commands -------------------------------------------------------------------------------------


@contextmanager
def two_backends(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """127.0.0.2 accepts on a port, 127.0.0.1 refuses on it; a manifest with both behind default/web."""
    with accepting("127.0.0.2", 0) as server:
        port = server.getsockname()[1]
        objects = [
            k8s.service(),
            k8s.endpoint_slice(
                endpoints=[k8s.endpoint("127.0.0.1"), k8s.endpoint("127.0.0.2")],
                ports=[k8s.slice_port(port=port)],
            ),
        ]
        manifest = tmp_path / "cluster.json"
        manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        with socket.socket() as closed:
            try:
                closed.bind(("127.0.0.1", port))  # nobody listens there during the test
            except OSError:
                pytest.skip("the port is taken on 127.0.0.1")
            yield manifest, port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aproxy.cli", *args, "--node-name", "node-a"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_plan_with_health_checks_drains_and_marks_the_refusing_backend(tmp_path: Path) -> None:
    with two_backends(tmp_path) as (manifest, port):
        text = run_cli("plan", "--source", str(manifest), "--output", "text", "--health-checks")
        plain = run_cli("plan", "--source", str(manifest), "--output", "text")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert f"  -> 127.0.0.1:{port:<18} Masq    0       # unhealthy: drained" in lines
    assert f"  -> 127.0.0.2:{port:<18} Masq    1" in lines
    assert "unhealthy" not in plain.stdout  # without the flag, no check and no mark


def test_sync_with_health_checks_marks_the_drained_operation(tmp_path: Path) -> None:
    with two_backends(tmp_path) as (manifest, port):
        done = run_cli(
            "sync",
            "--source",
            str(manifest),
            "--backend",
            "dry-run",
            "--health-checks",
            "--node-ip",
            "192.0.2.1",
        )
    assert done.returncode == 0, done.stderr
    marked = [line for line in done.stdout.splitlines() if line.endswith("# unhealthy: drained")]
    assert marked == [
        f"add_real_server protocol=TCP address=10.96.0.1 port=80 real_address=127.0.0.1 real_port={port} "
        "weight=0  # unhealthy: drained"
    ]


# --- metrics -----------------------------------------------------------------------------------------------


def test_the_daemon_exposes_the_health_metrics(tmp_path: Path) -> None:
    with two_backends(tmp_path) as (manifest, port):
        settings = Settings(
            node_name="node-a",
            sources=(manifest,),
            backend="dry-run",
            healthz_address=ListenAddress("127.0.0.1", 0),
            metrics_address=ListenAddress("127.0.0.1", 0),
            min_sync_period=0.05,
            health_checks=HealthCheckSettings(interval=0.1, timeout=0.2, fall=2),
        )
        backend = MemoryBackend()
        daemon = Daemon(settings, backend=backend)
        refusing = RealServerKey(ip_address("127.0.0.1"), port)

        async def scenario() -> str:
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop, handle_signals=False))
            await eventually(lambda: backend.dump_sync().weight(VIRTUAL, refusing) == 0)
            checker = daemon.health_checker
            assert checker is not None and checker.book.state(refusing) is Health.UNHEALTHY
            text = daemon.metrics.exposition().decode()
            stop.set()
            assert await asyncio.wait_for(task, 10) == 0
            return text

        text = asyncio.run(scenario())
    samples = dict(
        (line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("aproxy_") and not line.startswith("#")
    )
    assert samples['aproxy_health_checks_total{result="refused"}'] >= 2
    assert samples['aproxy_health_checks_total{result="ok"}'] >= 1
    assert samples['aproxy_health_transitions_total{to="unhealthy"}'] == 1
    assert samples['aproxy_health_transitions_total{to="healthy"}'] == 1
    assert samples["aproxy_backends_unhealthy"] == 1
    assert samples["aproxy_virtual_servers_failing_open"] == 0
    assert samples["aproxy_health_check_interval_stretch_ratio"] == 1
    assert samples["aproxy_health_check_targets"] == 2
    assert samples["aproxy_health_check_duration_seconds_count"] >= 3


# --- scope "used" ------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_destination_usage_remembers_addresses_with_connections() -> None:
    clock = FakeClock()
    usage = DestinationUsage(clock)
    a, b = ip_address("10.244.1.5"), ip_address("10.244.1.6")
    usage.observe(a, RealServerConnections(active=0, inactive=2))
    usage.observe(b, RealServerConnections(active=0, inactive=0))
    assert usage.used_addresses(since=900.0) == {a}
    clock.now = 1300.0
    usage.observe(b, RealServerConnections(active=1, inactive=0))
    assert usage.used_addresses(since=1200.0) == {b}  # a is older than the window: forgotten


def test_scope_used_checks_only_used_and_unhealthy_backends() -> None:
    view = view_of(*(RealServerKey(ip_address(f"127.0.0.{i}"), 9) for i in (1, 2, 3)))
    view.set_unhealthy(RealServerKey(ip_address("127.0.0.3"), 9), True)

    class Used:
        def used_addresses(self, since: float) -> Any:
            return {ip_address("127.0.0.1")}

    checker = HealthChecker(HealthCheckSettings(scope="used"), view, lambda _: None, usage=Used())

    async def scenario() -> None:
        task = asyncio.create_task(checker.run())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert checker.stats.targets == 2  # 127.0.0.1 (used) and 127.0.0.3 (unhealthy); not 127.0.0.2


def test_the_check_duration_histogram_counts_each_check_in_its_bucket() -> None:
    from prometheus_client.samples import Sample

    from aproxy.core.verdicts import HealthView
    from aproxy.health.checker import DURATION_BOUNDS, HealthStats
    from aproxy.metrics import health_metrics

    stats = HealthStats()
    for seconds in (0.00005, 0.0001, 0.0003, 0.5, 10.0):  # 0.0001 is its bucket's bound: counted in it
        stats.durations.observe(seconds)

    (family,) = [f for f in health_metrics(HealthView(), stats) if f.name.endswith("check_duration_seconds")]
    samples: dict[tuple[str, str], float] = {
        (s.name, s.labels.get("le", "")): s.value for s in family.samples if isinstance(s, Sample)
    }
    assert samples[("aproxy_health_check_duration_seconds_bucket", "0.0001")] == 2
    assert samples[("aproxy_health_check_duration_seconds_bucket", "0.0004")] == 3
    assert samples[("aproxy_health_check_duration_seconds_bucket", "0.8192")] == 4
    assert samples[("aproxy_health_check_duration_seconds_bucket", str(DURATION_BOUNDS[-1]))] == 4
    assert samples[("aproxy_health_check_duration_seconds_bucket", "+Inf")] == 5
    assert samples[("aproxy_health_check_duration_seconds_count", "")] == 5
    assert samples[("aproxy_health_check_duration_seconds_sum", "")] == pytest.approx(10.50045)
