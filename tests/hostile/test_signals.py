"""SIGHUP (a closed terminal, or an operator used to daemons that reload on it) does not end aproxy: before,
the daemon died silently with status 129. It is logged and ignored; SIGTERM still stops it with 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sighup_is_logged_and_ignored() -> None:
    command = [
        *(sys.executable, "-m", "aproxy.cli", "run", "--source", "examples/cluster.yaml"),
        *("--node-name", "node-a", "--node-ip", "192.0.2.10", "--backend", "dry-run"),
        *("--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"),
        "--no-health-checks",  # the example's endpoints are not hosts of this test
    ]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any("initial sync done" in line for line in lines):
            assert time.monotonic() < deadline, lines
            line = process.stderr.readline()
            assert line, f"aproxy run ended early: {lines}"
            lines.append(line)
        process.send_signal(signal.SIGHUP)
        while not any("SIGHUP" in line for line in lines):
            line = process.stderr.readline()
            assert line, f"aproxy run ended on SIGHUP: {lines}"
            lines.append(line)
        time.sleep(0.2)
        assert process.poll() is None, "aproxy run ended after SIGHUP"
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0, rest
    hup = next(line for line in lines if "SIGHUP" in line)
    assert "ignored" in hup
