"""kube-proxy's drop-in, end to end on a real kernel: ``aproxy run --config`` with kubeadm's
KubeProxyConfiguration against the test API server programs IPVS as the file says, and
``kubeproxy_network_programming_duration_seconds`` observes each change from its trigger stamp."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aproxy.core.latency import TRIGGER_ANNOTATION
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port
from tests.fakeapi.server import FakeApiServer
from tests.kernel import netlab

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
CONFIGMAP = ROOT / "tests" / "config" / "kubeadm-kube-proxy-configmap.yaml"
START_TIMEOUT = 90.0  # Python starts slowly in the guest: generous bounds, never assertions about speed
STEP_TIMEOUT = 30.0
T = TypeVar("T")


class ThreadedApi:
    """The fake API server on a loop of its own thread, so this synchronous test can run a subprocess."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = FakeApiServer()
        self._await(self.server.start())

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the server's loop (its handle is not thread-safe)."""
        result: Future[T] = Future()

        def run() -> None:
            try:
                result.set_result(function(*args))
            except Exception as exc:  # handed to the test thread
                result.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return result.result(timeout=STEP_TIMEOUT)

    def _await(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=STEP_TIMEOUT)

    def close(self) -> None:
        self._await(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=STEP_TIMEOUT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stamped(raw: dict[str, Any], seconds_ago: float) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(time.time() - seconds_ago, UTC).isoformat().replace("+00:00", "Z")
    raw["metadata"].setdefault("annotations", {})[TRIGGER_ANNOTATION] = stamp
    return raw


def web_slice(*addresses: str) -> dict[str, Any]:
    endpoints = [endpoint(address, node="node-b") for address in addresses]
    return endpoint_slice("web", endpoints=endpoints, ports=[slice_port()])


def kube_proxy_configuration(tmp_path: Path, kubeconfig: Path, metrics: int, healthz: int) -> Path:
    """kubeadm's config.conf, as its ConfigMap holds it, pointed at the test API server."""
    document = yaml.safe_load(yaml.safe_load(CONFIGMAP.read_text())["data"]["config.conf"])
    document["clientConnection"]["kubeconfig"] = str(kubeconfig)
    document["mode"] = "ipvs"
    document["ipvs"]["scheduler"] = "wrr"
    document["metricsBindAddress"] = f"127.0.0.1:{metrics}"
    document["healthzBindAddress"] = f"127.0.0.1:{healthz}"
    path = tmp_path / "config.conf"
    path.write_text(yaml.safe_dump(document))
    return path


@contextmanager
def aproxy_run(config: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    command = [
        *(
            sys.executable,
            "-m",
            "aproxy.cli",
            "run",
            "--config",
            str(config),
            "--hostname-override",
            "node-a",
        ),
        # The endpoints are addresses without pods: nothing to probe.
        *("--no-health-checks", "--state-file", str(tmp_path / "owned.json")),
    ]
    with (tmp_path / "aproxy.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield process
    except TimeoutError as exc:
        pytest.fail(f"{exc}; aproxy's log:\n{(tmp_path / 'aproxy.log').read_text()[-4000:]}")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STEP_TIMEOUT) == 0, (tmp_path / "aproxy.log").read_text()


def programming(metrics_port: int) -> tuple[float, float]:
    """(count, sum) of kubeproxy_network_programming_duration_seconds."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    name = "kubeproxy_network_programming_duration_seconds"
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
    }
    return values.get(f"{name}_count", 0.0), values.get(f"{name}_sum", 0.0)


def real_servers(vip: str) -> tuple[str, list[str]] | None:
    """(scheduler, real servers) of TCP vip:80 in the kernel, or None."""
    table = netlab.ipvsadm("-Ln", "-t", f"{vip}:80") if vip in netlab.ipvsadm("-Ln") else ""
    header = re.search(rf"TCP\s+{re.escape(vip)}:80 (\S+)", table)
    if header is None:
        return None
    return header.group(1), sorted(re.findall(r"->\s+(\d+\.\d+\.\d+\.\d+):\d+", table))


def test_run_config_programs_the_kernel_and_observes_programming_latency(tmp_path: Path) -> None:
    api = ThreadedApi()
    try:
        api.call(api.server.create, "nodes", {"metadata": {"name": "node-a"}, "status": {"addresses": []}})
        api.call(
            api.server.create, "services", service("web", cluster_ips="10.96.5.5", ports=[port("http", 80)])
        )
        api.call(api.server.create, "endpointslices", web_slice("10.244.7.1"))
        kubeconfig = api.call(api.server.write_kubeconfig, tmp_path / "kubeconfig")
        metrics, healthz = free_port(), free_port()
        config = kube_proxy_configuration(tmp_path, kubeconfig, metrics, healthz)
        with aproxy_run(config, tmp_path):
            netlab.wait_until(
                lambda: real_servers("10.96.5.5") == ("wrr", ["10.244.7.1"]),
                what="the initial sync, with the file's scheduler",
                timeout=START_TIMEOUT,
            )
            assert programming(metrics) == (0.0, 0.0)  # the initial list is not a change
            # A change stamped half a second before it reaches the API server, after aproxy started.
            changed = stamped(web_slice("10.244.7.1", "10.244.7.2"), 0.5)
            api.call(api.server.update, "endpointslices", changed)
            netlab.wait_until(
                lambda: real_servers("10.96.5.5") == ("wrr", ["10.244.7.1", "10.244.7.2"]),
                what="the new endpoint",
                timeout=STEP_TIMEOUT,
            )
            count, total = netlab.wait_until(
                lambda: programming(metrics) if programming(metrics)[0] else None,
                what="the change observed",
                timeout=STEP_TIMEOUT,
            )
            assert count == 1.0
            assert 0.5 <= total < 0.5 + STEP_TIMEOUT
    finally:
        api.close()
