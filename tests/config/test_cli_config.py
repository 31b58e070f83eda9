"""``aproxy run --config``: flag > file > default, exit 2 with one line on a bad file, warnings logged, and
kube-proxy's flag spellings. The daemon itself is not started: ``app.main`` receives the Settings."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from aproxy import app, cli
from aproxy.backends.ipvs_wire import IPVSTimeouts
from aproxy.settings import Settings
from aproxy.web.server import ListenAddress
from tests.config.test_config_file import CONFIGMAP


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Settings]:
    """The Settings ``aproxy run`` would start the daemon with (from tmp_path, where --source x.yaml exists:
    a source missing at start is refused before the daemon would start)."""
    (tmp_path / "x.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    seen: list[Settings] = []

    def main(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(app, "main", main)
    return seen


def write(tmp_path: Path, name: str, *documents: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(documents))
    return str(path)


def kubeadm(tmp_path: Path, **changes: Any) -> str:
    document = yaml.safe_load(yaml.safe_load(CONFIGMAP.read_text())["data"]["config.conf"])
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = document
        for parent in parents:
            target = target[parent]
        target[last] = value
    return write(tmp_path, "config.conf", document)


def test_kubeadm_configmap_runs_with_its_settings_and_aproxy_defaults(
    tmp_path: Path, started: list[Settings]
) -> None:
    config = kubeadm(tmp_path, mode="ipvs")
    assert cli.main(["run", "--config", config, "--hostname-override", "node-a"]) == 0
    (settings,) = started
    assert settings.node_name == "node-a"
    assert settings.kubeconfig == Path("/var/lib/kube-proxy/kubeconfig.conf")
    assert settings.ipvs.cluster_cidrs == ("10.244.0.0/16",)
    assert settings.node_ips == ()  # bindAddress 0.0.0.0: the Node's addresses
    defaults = Settings(node_name="x")
    assert (settings.sync_period, settings.min_sync_period) == (
        defaults.sync_period,
        defaults.min_sync_period,
    )
    assert settings.healthz_address == defaults.healthz_address
    assert settings.default_scheduler == defaults.default_scheduler
    assert settings.ipvs.timeouts == IPVSTimeouts()


def test_flag_beats_file_beats_default(tmp_path: Path, started: list[Settings]) -> None:
    config = kubeadm(
        tmp_path,
        hostnameOverride="from-file",
        healthzBindAddress="127.0.0.1:20256",
        ipvs__scheduler="lc",
        ipvs__syncPeriod="1m",
        ipvs__minSyncPeriod="2s",
        ipvs__strictARP=True,
        ipvs__tcpTimeout="900s",
        iptables__masqueradeAll=True,
    )
    own = write(
        tmp_path,
        "aproxy.yaml",
        {
            "apiVersion": "aproxy.io/v1alpha1",
            "kind": "AproxyConfiguration",
            "auditPeriod": "2m",
            "nodeIPs": ["192.0.2.10"],
        },
    )
    argv = [
        "run",
        "--config",
        config,
        "--config",
        own,
        "--ipvs-scheduler",
        "wrr",
        "--ipvs-sync-period",
        "45s",
        "--ipvs-udp-timeout",
        "10s",
    ]
    assert cli.main(argv) == 0
    (settings,) = started
    assert settings.node_name == "from-file"
    assert settings.healthz_address == ListenAddress("127.0.0.1", 20256)
    assert settings.default_scheduler == "wrr"  # flag
    assert settings.sync_period == 45.0  # flag (kube-proxy's spelling)
    assert settings.min_sync_period == 2.0  # file
    assert settings.audit_period == 120.0  # aproxy's own section
    assert settings.node_ips == (ipaddress.ip_address("192.0.2.10"),)
    assert settings.ipvs.strict_arp is True and settings.ipvs.masquerade_all is True
    assert settings.ipvs.timeouts == IPVSTimeouts(tcp=900.0, udp=10.0)
    assert settings.drain_check_period == Settings(node_name="x").drain_check_period  # default


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ipvs__tcpTimout": "1s"}, "ipvs.tcpTimout: unknown field"),
        (
            {"mode": "iptables"},
            "mode: 'iptables': aproxy implements only the ipvs mode (mode: ipvs, or empty)",
        ),
        ({"ipvs__strictARP": "true"}, "ipvs.strictARP: expected true or false, got 'true' (str)"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(
    tmp_path: Path,
    started: list[Settings],
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    message: str,
) -> None:
    config = kubeadm(tmp_path, **changes)
    assert cli.main(["run", "--config", config, "--node-name", "n"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == f"aproxy: {config}: {message}\n"
    assert started == []


def test_an_unreadable_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--config", str(tmp_path / "missing.conf")]) == cli.EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err


def test_unimplemented_fields_are_logged_warnings(
    tmp_path: Path, started: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    config = kubeadm(tmp_path, oomScoreAdj=-999, conntrack__maxPerCore=32768)
    assert cli.main(["run", "--config", config, "--node-name", "n"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("level=warning")]
    assert any("oomScoreAdj=-999 is ignored" in w for w in warnings)
    assert any("conntrack.maxPerCore=32768 is ignored" in w for w in warnings)
    assert len(started) == 1


def test_verbosity_4_means_debug_unless_log_level_is_given(started: list[Settings]) -> None:
    assert cli.main(["run", "--source", "x.yaml", "--node-name", "n", "-v", "4"]) == 0
    assert logging.getLogger("aproxy").getEffectiveLevel() == logging.DEBUG
    assert cli.main(["--log-level", "warning", "run", "--source", "x.yaml", "--node-name", "n", "--v=4"]) == 0
    assert logging.getLogger("aproxy").getEffectiveLevel() == logging.WARNING


def test_node_name_defaults_to_the_host_name(started: list[Settings]) -> None:
    import socket

    assert cli.main(["run", "--source", "x.yaml"]) == 0
    assert started[0].node_name == socket.gethostname().lower()


def test_proxy_mode_other_than_ipvs_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--source", "x.yaml", "--proxy-mode", "iptables"])
    assert exited.value.code == 2
    assert "--proxy-mode: invalid choice: 'iptables'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("aproxy ")


def test_an_ipvs_timeout_out_of_range_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--source", "x.yaml", "--node-name", "n", "--ipvs-tcp-timeout", "1000000h"])
    assert code == cli.EXIT_USAGE
    assert "aproxy run: --ipvs-*-timeout: IPVS tcp timeout 3.6e+09s out of range" in capsys.readouterr().err


def test_ipvs_exclude_cidrs_is_accepted_and_says_there_is_nothing_to_exclude(
    started: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--source", "x.yaml", "--node-name", "n", "--ipvs-exclude-cidrs", "10.0.0.0/8,fd00::/8"]
    assert cli.main(argv) == 0
    assert len(started) == 1
    assert "nothing to exclude" in capsys.readouterr().err
