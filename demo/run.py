"""`make run`: boot the user-mode Linux guest and tell demo/scenario.py's story inside it, live.

The guest is the kernel tests' (tests/kernel/run.py: Linux 6.1 with IPVS, the host's filesystem as its root);
instead of pytest it runs ``python -m demo.scenario``, whose narration lines reach this terminal as the guest
writes them (a file in the run folder, synced line by line). Where the guest cannot run, this says exactly why
and tells the same story with aproxy's dry-run backend instead (no kernel, no traffic).

Exit status: the scenario's (0 when the story ran to its end), or 1 when the guest failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import scenario  # noqa: E402 - after the checkout is on the path
from tests.kernel import run as guest  # noqa: E402


def in_guest(settings: guest.Settings) -> int:
    print(f"make run: booting user-mode Linux ({settings.uml}) with IPVS; the story follows", flush=True)
    python = str(ROOT / ".venv" / "bin" / "python")

    def program(run_dir: Path) -> list[str]:
        return [python, "-m", "demo.scenario", "--narration", str(run_dir / "narration.log")]

    run = guest.run_program(settings, program)
    if run.error is not None or run.exit_code is None:
        print(f"make run: the guest failed: {run.error}; logs in {run.run_dir}", file=sys.stderr)
        return 1
    if run.exit_code != 0:
        stopped = f"the story stopped early (exit {run.exit_code}); logs in {run.run_dir}"
        print(f"make run: {stopped}", file=sys.stderr)
    return run.exit_code


def main() -> int:
    settings = guest.Settings.from_environment()
    reason = guest.unavailable_reason(settings)
    if reason is not None:
        print(f"make run: no IPVS kernel here: {reason}.", flush=True)
        print("make run: telling the same story with aproxy's dry-run backend instead.", flush=True)
        return scenario.main(["--dry-run"])
    return in_guest(settings)


if __name__ == "__main__":
    sys.exit(main())
