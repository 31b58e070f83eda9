"""The DaemonSet's split of privilege, on a real kernel: a container without ``privileged`` sees /proc/sys
read-only, so ``aproxy prepare-node`` (run once by a privileged init container) sets the sysctls IPVS needs,
and the daemon, which only reads them when they are right, then works with /proc/sys read-only.

The read-only /proc/sys is made as a container runtime makes it: a read-only bind mount, in a mount namespace
of the command's own (unshare -m), so nothing else in the guest sees it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel import netlab

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"


def aproxy(*args: str, read_only_proc_sys: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "aproxy.cli", *args]
    if read_only_proc_sys:
        quoted = " ".join(f"'{part}'" for part in command)
        command = ["unshare", "-m", "sh", "-c", f"mount -o bind,ro /proc/sys /proc/sys && exec {quoted}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def test_prepare_node_lets_the_daemon_run_with_a_read_only_proc_sys(tmp_path: Path) -> None:
    netlab.write_sysctl("net/ipv4/ip_forward", "0")  # a node nobody prepared
    sync = ("sync", "--source", str(EXAMPLE), "--node-name", "node-a", "--node-ip", "192.0.2.10")
    sync += ("--state-file", str(tmp_path / "owned.json"), "--nodeport-addresses", "primary")

    refused = aproxy(*sync, read_only_proc_sys=True)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    last = refused.stderr.splitlines()[-1]  # after the log lines of what it opened first
    assert last.startswith("aproxy: sysctl "), refused.stderr
    assert "Read-only file system" in last and "aproxy prepare-node" in last
    assert netlab.read_sysctl("net/ipv4/ip_forward") == "0"

    prepared = aproxy("prepare-node")
    assert prepared.returncode == 0, prepared.stderr
    assert netlab.read_sysctl("net/ipv4/ip_forward") == "1"
    assert netlab.read_sysctl("net/ipv4/vs/conntrack") == "1"

    synced = aproxy(*sync, read_only_proc_sys=True)
    assert synced.returncode == 0, synced.stderr
    assert "0 failed" in synced.stdout
