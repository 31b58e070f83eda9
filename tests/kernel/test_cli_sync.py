"""``aproxy sync`` and ``aproxy cleanup`` as an operator runs them: the real command, on uvloop."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import orjson
import pytest
import yaml

from aproxy.core.model import IPAddress
from tests.kernel import netlab

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
NODE = ("--node-name", "node-a", "--node-ip", "192.0.2.10")


def aproxy(*args: str, state_file: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "aproxy.cli", *args, "--state-file", str(state_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def sync_json(state_file: Path) -> list[dict[str, object]]:
    done = aproxy("sync", "--source", str(EXAMPLE), *NODE, "--output", "json", state_file=state_file)
    assert done.returncode == 0, done.stderr
    return [orjson.loads(line) for line in done.stdout.splitlines()]


def endpoints_on(node: str, manifest: Path = EXAMPLE) -> set[IPAddress]:
    """The endpoint addresses a manifest's EndpointSlices put on ``node`` (read without aproxy's code)."""
    return {
        ip_address(endpoint["addresses"][0])
        for obj in yaml.safe_load_all(manifest.read_text())
        if obj and obj.get("kind") == "EndpointSlice"
        for endpoint in obj.get("endpoints") or ()
        if endpoint.get("nodeName") == node
    }


def test_sync_puts_only_this_nodes_endpoints_in_the_hairpin_set(tmp_path: Path) -> None:
    state_file = tmp_path / "owned.json"

    sync_json(state_file)
    members = netlab.hairpin_addresses()
    reals = netlab.real_server_addresses()
    done = aproxy("cleanup", state_file=state_file)

    assert done.returncode == 0, done.stderr
    assert members  # the example has node-a pods behind services
    assert members == reals & endpoints_on("node-a")
    assert reals - members  # node-b's and node-c's real servers are in IPVS, not in the set


def test_sync_twice_then_cleanup(tmp_path: Path) -> None:
    state_file = tmp_path / "owned.json"

    first = sync_json(state_file)
    second = sync_json(state_file)

    operations = first[:-1]
    assert {"op", "protocol", "address", "port", "real_address", "real_port", "weight", "ok"} <= {
        key for record in operations for key in record
    }
    assert all(record["ok"] for record in operations)
    assert first[-1] == {"summary": {"services": 7, "operations": len(operations), "failed": 0}}
    added_virtual = sum(record["op"] == "add_virtual_server" for record in operations)
    assert added_virtual == len(netlab.read_ipvs()) > 0
    assert second == [{"summary": {"services": 7, "operations": 0, "failed": 0}}]

    done = aproxy("cleanup", state_file=state_file)

    assert done.returncode == 0, done.stderr
    assert len(netlab.read_ipvs()) == 0
    assert "kube-ipvs0" not in netlab.run("ip", "-o", "link", "show")
