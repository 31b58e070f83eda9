"""``aproxy sync`` and ``aproxy cleanup`` as an operator runs them: the real command, on uvloop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

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
