"""``aproxy run`` as an operator runs it, on a real kernel: the command in a subprocess, checked with ipvsadm.

The daemon programs the example cluster, applies an added manifest incrementally (counted on /metrics), exits
0 on SIGTERM leaving every rule in place, and a restart on the unchanged cluster performs zero operations.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aproxy import render
from aproxy.cli import tracker_from_manifests
from aproxy.core.model import L4Protocol, RealServerKey, VirtualServerKey
from aproxy.core.translate import TranslationContext
from aproxy.syncer import desired_all
from tests.kernel import netlab
from tests.kernel.test_cli_sync import endpoints_on

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({ip_address("192.0.2.10")}))
# The guest is slow to start Python (every import reads through hostfs): generous bounds, never assertions.
START_TIMEOUT = 90.0
STEP_TIMEOUT = 30.0
EXTRA = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.7.7"), 80)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_port(self) -> int:
        found = re.search(r"metrics=127\.0\.0\.1:(\d+)", self.text())
        assert found is not None, self.text()
        return int(found.group(1))

    def operations(self) -> Counter[str]:
        """``aproxy_ipvs_operations_total`` with result "ok", by operation, from /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port()}/metrics"
        with urllib.request.urlopen(url, timeout=STEP_TIMEOUT) as response:
            body = response.read().decode()
        found: Counter[str] = Counter()
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "aproxy_ipvs_operations_total" and sample.labels["result"] == "ok":
                    found[sample.labels["op"]] = int(sample.value)
        return found

    def wait_for(self, text: str) -> None:
        netlab.wait_until(
            lambda: text in self.text() or self.process.poll() is not None,
            what=f"{text!r} in the daemon's log",
            timeout=START_TIMEOUT,
        )
        assert text in self.text(), f"the daemon ended ({self.process.returncode}):\n{self.text()}"

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STEP_TIMEOUT)


@contextmanager
def daemon(manifests: Path, state_file: Path, log: Path) -> Iterator[Daemon]:
    command = [
        sys.executable,
        "-m",
        "aproxy.cli",
        "run",
        "--source",
        str(manifests),
        "--node-name",
        "node-a",
        "--node-ip",
        "192.0.2.10",
        "--nodeport-addresses",  # NodePorts on --node-ip only: the kernel is compared with a plan for it
        "primary",
        "--backend",
        "ipvs",
        "--state-file",
        str(state_file),
        "--min-sync-period",
        "100ms",
        "--healthz-bind-address",
        "127.0.0.1:0",
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--no-health-checks",  # these tests are about syncing; tests/kernel/test_health.py checks backends
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    running = Daemon(process, log)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STEP_TIMEOUT)


def assert_kernel_matches(manifests: Path) -> None:
    view = render.node_view(desired_all(tracker_from_manifests([manifests]), CTX).values())
    table = netlab.read_ipvs()
    assert table.keys() == {vs.key for vs in view.virtual_servers}
    for vs in view.virtual_servers:
        entry = next(entry for entry in table.virtual_servers if entry.key == vs.key)
        assert entry.spec == vs.spec, vs.key
        assert entry.weights == {real.key: real.weight for real in vs.real_servers}, vs.key
    assert netlab.device_addresses() == frozenset(view.addresses)


def extra_service() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "extra", "namespace": "default"},
            "spec": {"clusterIP": "10.96.7.7", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "extra-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "extra"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.7.1"]}, {"addresses": ["10.244.7.2"]}],
        },
    ]


def test_daemon_programs_edits_incrementally_and_keeps_the_rules_on_sigterm(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    shutil.copy(EXAMPLE, manifests / "cluster.yaml")
    state_file = tmp_path / "owned.json"

    with daemon(manifests, state_file, tmp_path / "first.log") as first:
        first.wait_for("initial sync done")
        assert_kernel_matches(manifests)
        # Hairpin only for this node's pods: the daemon hands its syncer's filter to the backend.
        local = netlab.real_server_addresses() & endpoints_on("node-a")
        assert local
        assert netlab.hairpin_addresses() == local
        initial = first.operations()
        assert initial["add_virtual_server"] == len(netlab.read_ipvs()) > 0

        # A new manifest, written atomically: one service, one address, two real servers, and nothing else.
        # The file watch starts some time after the first read, unobservably: write the same file until the
        # operations are counted (identical re-reads change nothing). The kernel shows the virtual server
        # while the pass still runs; the pass counts its operations when the batch returns.
        def counted() -> bool:
            temporary = manifests / ".extra.yaml.tmp"
            temporary.write_text(yaml.safe_dump_all(extra_service()))
            os.replace(temporary, manifests / "extra.yaml")
            try:
                return bool(
                    netlab.wait_until(
                        lambda: (first.operations() - initial).total() >= 4, what="operations", timeout=2.0
                    )
                )
            except TimeoutError:
                return False

        netlab.wait_until(counted, what="the added service's operations counted", timeout=STEP_TIMEOUT)
        assert first.operations() - initial == {
            "bind_address": 1,
            "add_virtual_server": 1,
            "add_real_server": 2,
        }
        assert_kernel_matches(manifests)
        assert netlab.hairpin_addresses() == local  # the extra endpoints have no nodeName: not local
        entry = next(entry for entry in netlab.read_ipvs().virtual_servers if entry.key == EXTRA)
        assert set(entry.weights) == {
            RealServerKey(ip_address("10.244.7.1"), 8080),
            RealServerKey(ip_address("10.244.7.2"), 8080),
        }

        assert first.terminate() == 0
        assert "signal=SIGTERM" in first.text()

    assert_kernel_matches(manifests)  # the rules stay: stopping must not drop traffic

    with daemon(manifests, state_file, tmp_path / "second.log") as second:
        second.wait_for("initial sync done")
        assert "operations=0" in next(
            line for line in second.text().splitlines() if "initial sync done" in line
        )
        assert second.operations() == Counter()
        assert second.terminate() == 0
    assert_kernel_matches(manifests)
