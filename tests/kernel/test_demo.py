"""`make run`'s story in the kernel-test guest, as demo/run.py tells it: real IPVS, real connections."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]


def answered_by(section: str) -> dict[str, int]:
    return {name: int(count) for name, count in re.findall(r"^ {5}(\S+) +#+ (\d+)$", section, re.MULTILINE)}


def test_make_run_story() -> None:
    command = [sys.executable, "-m", "demo.scenario"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = {part.split("\n", 1)[0]: part for part in done.stdout.split("\n== ")}

    def part(title: str) -> str:
        return next(text for heading, text in parts.items() if heading.startswith(title))

    # Round robin over shop/frontend's two pods, then three after the scale-up.
    assert sorted(answered_by(part("Real connections")).values()) == [6, 6]
    assert sorted(answered_by(part("Scale up")).values()) == [4, 4, 4]
    removal = part("Remove a backend")
    held = re.search(r"a connection is open to (\S+) \((\S+)\)", removal)
    assert held is not None
    # The removed backend stays at weight 0 with the held connection active, which keeps working, and new
    # connections go to the others only.
    assert re.search(rf"-> {re.escape(held[2])}:3000 +Masq +0 +1 ", removal)
    assert f"the held connection still answers: {held[1]}" in removal
    assert held[1] not in answered_by(removal)
    assert held[2] not in part("The held connection closes")
    assert len(answered_by(part("Scale down"))) == 1
    assert "virtual servers left: 0; kube-ipvs0 present: False" in part("aproxy cleanup")
