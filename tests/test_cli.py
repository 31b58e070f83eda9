"""``aproxy plan`` and ``aproxy sync --backend dry-run`` as scripts use them: output shape and exit codes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from aproxy.sources.manifest import load_manifests
from tests.fakeapi import fixtures
from tests.fakeapi.server import FakeApiServer

fake_api = fixtures.fake_api

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
NODE = ["--node-name", "node-a", "--node-ip", "192.0.2.10"]


def aproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aproxy.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def plan_json(*args: str) -> dict[str, Any]:
    done = aproxy("plan", *args, *NODE, "--output", "json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def test_plan_prints_the_documented_json_shape_sorted() -> None:
    plan = plan_json("--source", str(EXAMPLE))

    assert set(plan) == {"addresses", "virtual_servers"}
    assert plan["addresses"][0] == "10.96.0.10" and "fd00:10:96::50" in plan["addresses"]
    assert "192.0.2.10" not in plan["addresses"]  # node addresses are never bound
    dns = next(vs for vs in plan["virtual_servers"] if vs["service"] == "kube-system/kube-dns:dns-tcp")
    assert dns == {
        "protocol": "TCP",
        "address": "10.96.0.10",
        "port": 53,
        "scheduler": "rr",
        "persistence_timeout": 0,
        "service": "kube-system/kube-dns:dns-tcp",
        "real_servers": [
            {"address": "10.244.0.2", "port": 53, "weight": 1},
            {"address": "10.244.1.2", "port": 53, "weight": 1},
        ],
    }
    keys = [(vs["protocol"], vs["address"], vs["port"]) for vs in plan["virtual_servers"]]
    assert keys[0] == ("TCP", "10.96.0.10", 53) and keys[-1] == ("UDP", "10.96.0.10", 53)
    web = next(vs for vs in plan["virtual_servers"] if vs["service"] == "shop/web:http")
    assert web["persistence_timeout"] == 3600
    assert any(vs["scheduler"] == "wrr" for vs in plan["virtual_servers"])


def test_plan_text_is_ipvsadm_like_and_names_services() -> None:
    done = aproxy("plan", "--source", str(EXAMPLE), *NODE, "--output", "text")

    assert done.returncode == 0, done.stderr
    assert "UDP  10.96.0.10:53 rr" in done.stdout
    assert "# kube-system/kube-dns:dns" in done.stdout
    assert "  -> 10.244.0.2:53" in done.stdout
    assert "persistent 3600" in done.stdout


def test_plan_reads_a_directory_and_a_scheduler_default(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text(EXAMPLE.read_text())

    plan = plan_json("--source", str(tmp_path), "--ipvs-scheduler", "lc")

    schedulers = {vs["service"]: vs["scheduler"] for vs in plan["virtual_servers"]}
    assert schedulers["kube-system/kube-dns:dns"] == "lc"
    assert schedulers["monitoring/prometheus:web"] == "wrr"  # the annotation wins


BAD_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec: {clusterIP: 10.0.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: fine, namespace: default}
spec: {clusterIP: 10.96.5.5, ports: [{name: http, port: 80}]}
"""


def test_a_bad_object_is_skipped_on_stderr_and_the_rest_planned(tmp_path: Path) -> None:
    source = tmp_path / "bad.yaml"
    source.write_text(BAD_SERVICE)

    done = aproxy("plan", "--source", str(source), *NODE)

    assert done.returncode == 0
    assert "default/broken" in done.stderr and "10.0.0.300" in done.stderr
    assert [vs["service"] for vs in orjson.loads(done.stdout)["virtual_servers"]] == ["default/fine:http"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "cannot read", id="missing-file"),
        pytest.param("kind: [unclosed\n", "invalid YAML at line", id="not-yaml"),
        pytest.param("- 1\n- 2\n", "expected a mapping", id="not-objects"),
    ],
)
def test_an_unusable_file_exits_2_with_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    source = tmp_path / "cluster.yaml"
    if content is not None:
        source.write_text(content)

    done = aproxy("plan", "--source", str(source), *NODE)

    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr


def test_an_unknown_scheduler_option_is_a_usage_error() -> None:
    done = aproxy("plan", "--source", str(EXAMPLE), *NODE, "--ipvs-scheduler", "fastest")

    assert done.returncode == 2
    assert "unknown IPVS scheduler 'fastest'" in done.stderr


@pytest.mark.parametrize(
    ("device", "why"),
    [
        pytest.param("kube-ipvs0-too-long", "1 to 15 bytes", id="longer-than-ifnamsiz"),
        pytest.param("kube/ipvs", "no '/'", id="slash"),
        pytest.param("kube ipvs", "whitespace", id="space"),
        pytest.param("..", "not '.' or '..'", id="dot-dot"),
    ],
)
def test_a_device_name_the_kernel_refuses_is_a_usage_error(device: str, why: str) -> None:
    done = aproxy("cleanup", "--device", device)

    assert done.returncode == 2
    assert f"invalid device name {device!r}" in done.stderr and why in done.stderr


def test_dry_run_sync_prints_operations_and_a_summary() -> None:
    done = aproxy("sync", "--backend", "dry-run", "--source", str(EXAMPLE), *NODE, "--output", "json")

    assert done.returncode == 0, done.stderr
    records = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert records[-1] == {"summary": {"services": 7, "operations": len(records) - 1, "failed": 0}}
    assert records[0] == {"op": "bind_address", "address": "10.96.0.10", "ok": True}
    adds = [r for r in records if r.get("op") == "add_real_server"]
    assert adds and {"protocol", "address", "port", "real_address", "real_port", "weight"} <= set(adds[0])


def test_plan_from_a_live_cluster_equals_the_plan_from_its_manifests(
    fake_api: FakeApiServer, tmp_path: Path
) -> None:
    manifests = load_manifests([EXAMPLE])
    fake_api.apply_many("services", manifests.services)
    fake_api.apply_many("endpointslices", manifests.slices)
    fake_api.create(
        "nodes",
        {
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
        },
    )
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig")

    async def plan_from_cluster() -> tuple[int, bytes, bytes]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aproxy.cli", "plan",
            "--kubeconfig", str(kubeconfig), "--node-name", "node-a",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await process.communicate()
        return process.returncode or 0, stdout, stderr

    code, stdout, stderr = fake_api.run(plan_from_cluster(), timeout=60)

    assert code == 0, stderr.decode()
    assert orjson.loads(stdout) == plan_json("--source", str(EXAMPLE))
    assert fake_api.count(verb="list", resource="services") == 1


def test_plan_from_an_unreachable_cluster_exits_1_with_one_line(tmp_path: Path) -> None:
    done = aproxy(
        "plan", "--master", "http://127.0.0.1:9", "--node-name", "node-a", "--node-ip", "192.0.2.10"
    )

    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("aproxy: ")
