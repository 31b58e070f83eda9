"""`make run`: boot the user-mode Linux guest and tell demo/scenario.py's story inside it, live.

The guest is the kernel tests' (tests/kernel/run.py: Linux 6.1 with IPVS, the host's filesystem as its root);
instead of pytest it runs ``python -m demo.scenario``, whose narration lines reach this terminal as the guest
writes them (a file in the run folder, synced line by line). Where the guest cannot run, this says exactly why
and tells the same story with aproxy's dry-run backend instead (no kernel, no traffic).

Exit status: the scenario's (0 when the story ran to its end), or 1 when the guest failed.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import scenario  # noqa: E402 - after the checkout is on the path
from tests.kernel import run as guest  # noqa: E402

POLL = 0.1  # seconds between reads of the narration while the guest runs


def follow(path: Path, done: threading.Event) -> None:
    """Print what is appended to ``path`` until ``done`` is set and nothing more comes."""
    position = 0
    while True:
        finished = done.is_set()
        if path.exists():
            with path.open("rb") as narration:
                narration.seek(position)
                chunk = narration.read()
            # Only whole lines: the guest may be in the middle of writing one.
            complete = chunk[: chunk.rfind(b"\n") + 1]
            if complete:
                sys.stdout.write(complete.decode(errors="replace"))
                sys.stdout.flush()
                position += len(complete)
        if finished:
            return
        time.sleep(POLL)


def in_guest(settings: guest.Settings) -> int:
    print(f"make run: booting user-mode Linux ({settings.uml}) with IPVS; the story follows", flush=True)
    guest.prepare_modules(settings)
    guest.prune_old_runs()
    umid, run_dir = guest.new_run_dir()
    narration = run_dir / "narration.log"
    program = [str(ROOT / ".venv" / "bin" / "python"), "-m", "demo.scenario", "--narration", str(narration)]
    init = guest.write_guest_files(run_dir, (), None, program=program)
    done = threading.Event()
    reader = threading.Thread(target=follow, args=(narration, done), daemon=True)
    reader.start()
    try:
        error = guest.boot_guest(guest.boot_command(settings, umid, init), run_dir, settings.timeout)
    finally:
        done.set()
        reader.join()
        shutil.rmtree(guest.BUILD_DIR / "umldir" / umid, ignore_errors=True)
    code = guest.read_exit_code(run_dir)
    if error is not None or code is None:
        print(f"make run: the guest failed: {error or 'no exit code'}; logs in {run_dir}", file=sys.stderr)
        return 1
    if code != 0:
        print(f"make run: the story stopped early (exit {code}); logs in {run_dir}", file=sys.stderr)
    return code


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
