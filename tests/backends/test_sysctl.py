"""The sysctls aproxy sets: which ones (kernel release, settings), and that only differences are written."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from aproxy.backends.sysctl import (
    Sysctl,
    SysctlChange,
    SysctlError,
    apply_sysctls,
    needs_conn_reuse_mode_zero,
    parse_kernel_version,
    wanted_sysctls,
)

ALWAYS = {
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}


@pytest.mark.parametrize(
    ("release", "version"),
    [
        pytest.param("6.1.176", (6, 1, 176), id="plain"),
        pytest.param("6.1.0-18-amd64", (6, 1, 0), id="debian"),
        pytest.param("4.19.112+", (4, 19, 112), id="gke-plus"),
        pytest.param("3.10.0-1160.el7.x86_64", (3, 10, 0), id="rhel7"),
        pytest.param("5.9", (5, 9, 0), id="no-patch"),
        pytest.param("5.10.0-rc1", (5, 10, 0), id="release-candidate"),
        pytest.param("generic", None, id="garbage"),
        pytest.param("", None, id="empty"),
    ],
)
def test_kernel_release_parses_to_its_version(release: str, version: tuple[int, int, int] | None) -> None:
    assert parse_kernel_version(release) == version


@pytest.mark.parametrize(
    ("version", "needed"),
    [
        pytest.param((4, 0, 9), False, id="before-4.1"),
        pytest.param((4, 1, 0), True, id="4.1-first-affected"),
        pytest.param((4, 19, 112), True, id="4.19"),
        pytest.param((5, 8, 18), True, id="5.8-last-affected"),
        pytest.param((5, 9, 0), False, id="5.9-fixed"),
        pytest.param((6, 1, 0), False, id="6.1"),
        pytest.param(None, False, id="unknown-left-alone"),
    ],
)
def test_conn_reuse_mode_only_on_affected_kernels(version: tuple[int, int, int] | None, needed: bool) -> None:
    assert needs_conn_reuse_mode_zero(version) is needed


def test_kube_proxys_sysctls_on_a_fixed_kernel() -> None:
    wanted = wanted_sysctls("6.1.0-18-amd64", strict_arp=False)

    assert {s.name: s.value for s in wanted} == ALWAYS


def test_conn_reuse_mode_zero_on_an_affected_kernel() -> None:
    wanted = wanted_sysctls("4.19.0-26-amd64", strict_arp=False)

    assert {s.name: s.value for s in wanted} == {**ALWAYS, "net/ipv4/vs/conn_reuse_mode": "0"}


def test_strict_arp_adds_arp_ignore_and_announce_on_all() -> None:
    wanted = wanted_sysctls("6.1.0", strict_arp=True)

    assert {s.name: s.value for s in wanted} == {
        **ALWAYS,
        "net/ipv4/conf/all/arp_ignore": "1",
        "net/ipv4/conf/all/arp_announce": "2",
    }


def _proc(root: Path, values: dict[str, str]) -> None:
    for name, value in values.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")


def test_only_differing_sysctls_are_written_and_each_change_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _proc(tmp_path, {"net/ipv4/vs/conntrack": "0", "net/ipv4/ip_forward": "1"})
    wanted = [Sysctl("net/ipv4/vs/conntrack", "1"), Sysctl("net/ipv4/ip_forward", "1")]

    with caplog.at_level(logging.INFO, logger="aproxy.backends.sysctl"):
        changes = asyncio.run(apply_sysctls(wanted, root=tmp_path))

    assert changes == [SysctlChange("net/ipv4/vs/conntrack", "0", "1")]
    assert (tmp_path / "net/ipv4/vs/conntrack").read_text() == "1\n"
    logged = [(vars(record)["sysctl"], vars(record)["old"], vars(record)["new"]) for record in caplog.records]
    assert logged == [("net/ipv4/vs/conntrack", "0", "1")]


def test_a_second_run_changes_nothing(tmp_path: Path) -> None:
    _proc(tmp_path, dict.fromkeys(ALWAYS, "0"))
    wanted = wanted_sysctls("6.1.0", strict_arp=False)

    first = asyncio.run(apply_sysctls(wanted, root=tmp_path))
    second = asyncio.run(apply_sysctls(wanted, root=tmp_path))

    assert len(first) == len(ALWAYS)
    assert second == []


def test_a_missing_sysctl_is_a_sysctl_error(tmp_path: Path) -> None:
    with pytest.raises(SysctlError, match="net/ipv4/vs/conntrack"):
        asyncio.run(apply_sysctls([Sysctl("net/ipv4/vs/conntrack", "1")], root=tmp_path))
