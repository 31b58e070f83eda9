"""`make run`'s story without a kernel (the fallback where the guest cannot run): it runs to its end, and each
change arrives as the operations the narration claims. The kernel version is tests/kernel/test_demo.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_story_runs_to_its_end() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "demo.scenario", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    story = done.stdout
    steps = [line for line in story.splitlines() if line.startswith("== ")]
    assert [step.split(":")[0] for step in steps] == [
        "== Dry run",
        "== Start aproxy run on a copy of examples/cluster.yaml (node-a, this node's address 172.30.0.2)",
        "== The programmed table (aproxy plan)",
        "== Real connections through shop/frontend's virtual IP are spread over its backends (rr)",
        "== Scale up",
        "== Remove a backend that holds an open connection",
        "== No connection holds it in a dry run",
        "== Scale down",
        "== Stop",
        "== Done",
    ]
    # One endpoint added to shop/frontend: one real server on each of its two virtual servers (cluster IP and
    # node port), nothing else.
    scale_up = story.split("== Scale up")[1].split("== ")[0]
    assert "kind=sync services=1 operations=2 failed=0" in scale_up
    assert "aproxy_ipvs_operations_total{op=add_real_server,result=ok} +2" in scale_up
    removal = story.split("== Remove a backend")[1].split("== ")[0]
    assert "aproxy_ipvs_operations_total{op=update_real_server,result=ok} +2" in removal  # weight 0
    drained = story.split("== No connection holds it")[1].split("== ")[0]
    assert "aproxy_ipvs_operations_total{op=delete_real_server,result=ok} +2" in drained
    assert "aproxy run exited with 0" in story
