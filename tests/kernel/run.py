"""Boot the user-mode Linux guest once and run the kernel tests (tests/kernel) inside it.

The host kernel usually has no IPVS; Debian's ``user-mode-linux`` package is a Linux 6.1 kernel that runs as
an ordinary process and has IPVS, dummy and veth as modules. The guest's root filesystem is the host's
(hostfs), so the checkout, its ``.venv`` and pytest run inside unchanged. The guest writes everything it
produces under ``build/uml/runs/<id>/`` (pytest's junit XML and output, its init log, dmesg) and the host
reads it back; the UML console is slow, so nothing large goes through it.

Standalone use (for debugging)::

    python tests/kernel/run.py [pytest args...]      # default args: tests/kernel

boots the guest, runs pytest with the given arguments inside it, prints the guest's pytest output and a
summary, and exits with the guest pytest's exit code (77 when the tier cannot run here, 3 when the guest
failed to produce a result). ``.venv/bin/pytest tests/kernel`` on the host does the same through
tests/kernel/conftest.py and reports every kernel test individually.

Environment:
    APROXY_UML            the UML kernel to boot (default /usr/bin/linux.uml). Point it at a missing file to
                          exercise the "cannot run here" branch: skipped, or failed when CI=true.
    APROXY_UML_MODULES    the directory holding <version>/ module trees (default /usr/lib/uml/modules).
    APROXY_UML_TIMEOUT    seconds before the guest is killed (default 900).
    APROXY_UML_MEM        guest memory (default 1G).
    CI                    "true" turns "cannot run here" from a skip into a failure: CI must run this tier.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = Path(__file__).resolve().parent
BUILD_DIR = REPO_ROOT / "build" / "uml"
RUNS_DIR = BUILD_DIR / "runs"
INIT_SCRIPT = KERNEL_TESTS / "guest_init.sh"

DEFAULT_UML = "/usr/bin/linux.uml"
DEFAULT_MODULES = "/usr/lib/uml/modules"
DEFAULT_TIMEOUT = 900.0
DEFAULT_MEM = "1G"
# Exit codes of this script besides the guest pytest's own.
EXIT_UNAVAILABLE = 77
EXIT_NO_RESULT = 3
# Run folders older than this are pruned at the next run (they are only debugging aids).
KEEP_RUNS_SECONDS = 24 * 3600
# The name junit's <property> carries the pytest node id under (set by the guest side of conftest.py).
NODEID_PROPERTY = "nodeid"
# Options of every guest pytest run. No cache folder written into the checkout from the guest. The hypothesis
# and anyio plugins cost ~3 s of start-up in the guest (every import reads through hostfs) and kernel tests
# use neither; a kernel test that needs one must remove it here.
# A module that fails to import in the guest fails its own tests only (--continue-on-collection-errors).
GUEST_PYTEST_OPTIONS = (
    *("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio"),
    *("-v", "--continue-on-collection-errors"),
)
# Names the file listing the node ids to run, in the guest's environment (read by conftest.py there).
SELECTED_ENV = "APROXY_GUEST_SELECTED"
# Host tools the tier needs (the guest runs the host's binaries: ip, ipvsadm, iptables-legacy, ...).
REQUIRED_TOOLS = ("depmod", "modprobe", "ip", "ipvsadm", "iptables-legacy", "poweroff")


class GuestError(Exception):
    """The guest could not be prepared, booted, or produced no readable result."""


@dataclass(frozen=True, slots=True)
class Settings:
    uml: Path
    modules: Path
    timeout: float
    mem: str

    @classmethod
    def from_environment(cls) -> Settings:
        return cls(
            uml=Path(os.environ.get("APROXY_UML", DEFAULT_UML)),
            modules=Path(os.environ.get("APROXY_UML_MODULES", DEFAULT_MODULES)),
            timeout=float(os.environ.get("APROXY_UML_TIMEOUT", DEFAULT_TIMEOUT)),
            mem=os.environ.get("APROXY_UML_MEM", DEFAULT_MEM),
        )


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One guest test's outcome, read from the junit XML.

    ``outcome`` is one of passed, failed, error, skipped, xfailed; ``text`` is the guest's report (traceback
    or skip reason).
    """

    nodeid: str
    outcome: str
    message: str
    text: str


@dataclass(frozen=True, slots=True)
class GuestRun:
    run_dir: Path
    exit_code: int | None
    results: dict[str, CaseResult]
    boot_seconds: float | None
    total_seconds: float
    error: str | None

    @property
    def pytest_log(self) -> Path:
        return self.run_dir / "pytest.log"

    def log_tail(self, lines: int = 60) -> str:
        """The end of every log the guest wrote: what a failed boot or a missing result is explained by."""
        parts = []
        for name in ("console.log", "init.log", "pytest.log"):
            path = self.run_dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) if parts else f"(no log in {self.run_dir})"


def is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable_reason(settings: Settings) -> str | None:
    """Why the tier cannot run on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"the kernel test tier needs Linux (this is {sys.platform})"
    if not os.access(settings.uml, os.X_OK):
        return f"user-mode Linux kernel not found at {settings.uml} (apt-get install user-mode-linux)"
    if os.geteuid() != 0:
        return (
            "the kernel test tier needs root (the guest's root filesystem is the host's, mounted read-write)"
        )
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the kernel test tier needs these tools: {', '.join(missing)} (see Makefile APT_PACKAGES)"
    if not module_versions(settings.modules):
        return f"no user-mode Linux modules under {settings.modules}"
    if REPO_ROOT.is_relative_to("/run"):
        return f"the checkout {REPO_ROOT} is under /run, which the guest replaces with its own tmpfs"
    return None


def module_versions(modules: Path) -> list[str]:
    if not modules.is_dir():
        return []
    return sorted(entry.name for entry in modules.iterdir() if (entry / "modules.dep").exists())


def prepare_modules(settings: Settings) -> None:
    """Make ``build/uml/modroot-<version>/lib/modules/<version>`` for every installed UML kernel version.

    ``modprobe -d DIR`` looks in ``DIR/lib/modules/<uname -r>``, and the package installs its modules
    elsewhere; the tree links the package's ``kernel/`` folder and carries its own depmod output. Built in a
    scratch folder and renamed into place, so concurrent runs never see a half-built tree.
    """
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    for version in module_versions(settings.modules):
        source = settings.modules / version
        final = BUILD_DIR / f"modroot-{version}"
        stamp = final / "lib" / "modules" / version / "modules.dep"
        if stamp.exists() and stamp.stat().st_mtime >= (source / "modules.dep").stat().st_mtime:
            continue
        scratch = BUILD_DIR / f"modroot-{version}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tree = scratch / "lib" / "modules" / version
        tree.mkdir(parents=True)
        (tree / "kernel").symlink_to(source / "kernel")
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (source / name).exists():
                shutil.copy2(source / name, tree / name)
        _run_host(["depmod", "-b", str(scratch), version])
        if final.exists():
            shutil.rmtree(final)  # stale: the package was upgraded
        try:
            scratch.rename(final)
        except OSError:
            # Another run renamed its tree into place first: theirs is as good as ours.
            shutil.rmtree(scratch)


def _run_host(command: Sequence[str]) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise GuestError(f"{shlex.join(command)} failed ({completed.returncode}): {completed.stderr.strip()}")


def prune_old_runs() -> None:
    if not RUNS_DIR.is_dir():
        return
    cutoff = time.time() - KEEP_RUNS_SECONDS
    for entry in RUNS_DIR.iterdir():
        if entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)


def new_run_dir() -> tuple[str, Path]:
    """A unique UML id and its run folder: concurrent runs (CI, the lead, a helper) never collide."""
    umid = f"aproxy-{os.getpid()}-{secrets.token_hex(4)}"
    run_dir = RUNS_DIR / umid
    run_dir.mkdir(parents=True)
    return umid, run_dir


def write_guest_files(
    run_dir: Path,
    pytest_args: Sequence[str],
    selected: Collection[str] | None,
    program: Sequence[str] | None = None,
) -> Path:
    """The init script (a private executable copy: git may not keep the source's mode) and its inputs.

    ``program``: a whole command line to run instead of pytest (``make run``'s demo), in program.args; its
    output goes to program.log."""
    if any(char.isspace() for char in str(run_dir)):
        raise GuestError(
            f"the run folder {run_dir} contains whitespace, which the kernel command line cannot carry"
        )
    init = run_dir / "init"
    shutil.copyfile(INIT_SCRIPT, init)
    init.chmod(0o755)
    env = {"APROXY_REPO": str(REPO_ROOT), "APROXY_BUILD": str(BUILD_DIR)}
    if selected is not None:
        (run_dir / "selected").write_text("".join(f"{nodeid}\n" for nodeid in sorted(selected)))
        env[SELECTED_ENV] = str(run_dir / "selected")
    (run_dir / "guest.env").write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items()))
    if program is None:
        name = "pytest.args"
        args = [*GUEST_PYTEST_OPTIONS, f"--junitxml={run_dir / 'junit.xml'}", *pytest_args]
    else:
        name, args = "program.args", list(program)
    if any("\n" in arg for arg in args):
        raise GuestError(f"an argument contains a line break, which {name} cannot carry: {args}")
    (run_dir / name).write_text("".join(f"{arg}\n" for arg in args))
    return init


def boot_command(settings: Settings, umid: str, init: Path) -> list[str]:
    return [
        str(settings.uml),
        f"mem={settings.mem}",
        "rootfstype=hostfs",
        "rootflags=/",
        "rw",
        f"init={init}",
        "con=null",
        "con0=fd:0,fd:1",
        f"umid={umid}",
        # UML's pid file and management socket go to the build folder instead of ~/.uml.
        f"uml_dir={BUILD_DIR / 'umldir'}",
    ]


def run_guest(
    pytest_args: Sequence[str], settings: Settings | None = None, selected: Collection[str] | None = None
) -> GuestRun:
    """Boot the guest once, run ``pytest <pytest_args>`` inside it, and read the results back.

    ``selected``: run only the tests with these node ids (from the files in ``pytest_args``). Node ids are
    not passed as arguments: pytest aborts the whole run when one of them cannot be collected.
    """
    settings = settings or Settings.from_environment()
    started = time.monotonic()
    prepare_modules(settings)
    prune_old_runs()
    umid, run_dir = new_run_dir()
    init = write_guest_files(run_dir, pytest_args, selected)
    error = boot_guest(boot_command(settings, umid, init), run_dir, settings.timeout)
    shutil.rmtree(BUILD_DIR / "umldir" / umid, ignore_errors=True)
    exit_code = read_exit_code(run_dir)
    if error is None and exit_code is None:
        error = "the guest powered off without writing pytest's exit code"
    results: dict[str, CaseResult] = {}
    junit = run_dir / "junit.xml"
    if junit.exists():
        try:
            results = parse_junit(junit)
        except ET.ParseError as exc:
            error = error or f"unreadable junit XML {junit}: {exc}"
    return GuestRun(
        run_dir=run_dir,
        exit_code=exit_code,
        results=results,
        boot_seconds=_boot_seconds(run_dir),
        total_seconds=time.monotonic() - started,
        error=error,
    )


@dataclass(frozen=True, slots=True)
class ProgramRun:
    """What ``run_program`` left: the run folder (logs), the program's exit code, why the guest failed."""

    run_dir: Path
    exit_code: int | None
    error: str | None


def run_program(
    settings: Settings, program: Callable[[Path], Sequence[str]], live: str = "narration.log"
) -> ProgramRun:
    """Boot the guest once and run ``program(run_dir)`` (a command line) in it instead of pytest, copying
    what it appends to ``run_dir/live`` (written and synced line by line) to standard output as it comes:
    ``make run``'s demo and bench/e2e.py."""
    prepare_modules(settings)
    prune_old_runs()
    umid, run_dir = new_run_dir()
    init = write_guest_files(run_dir, (), None, program=program(run_dir))
    done = threading.Event()
    reader = threading.Thread(target=_follow, args=(run_dir / live, done), daemon=True)
    reader.start()
    try:
        error = boot_guest(boot_command(settings, umid, init), run_dir, settings.timeout)
    finally:
        done.set()
        reader.join()
        shutil.rmtree(BUILD_DIR / "umldir" / umid, ignore_errors=True)
    exit_code = read_exit_code(run_dir)
    if error is None and exit_code is None:
        error = "the guest powered off without writing the program's exit code"
    return ProgramRun(run_dir, exit_code, error)


def _follow(path: Path, done: threading.Event, poll: float = 0.1) -> None:
    """Print what is appended to ``path`` until ``done`` is set and nothing more comes."""
    position = 0
    while True:
        finished = done.is_set()
        if path.exists():
            with path.open("rb") as growing:
                growing.seek(position)
                chunk = growing.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # only whole lines: the guest may be mid-line
            if complete:
                sys.stdout.write(complete.decode(errors="replace"))
                sys.stdout.flush()
                position += len(complete)
        if finished:
            return
        time.sleep(poll)


def boot_guest(command: list[str], run_dir: Path, timeout: float) -> str | None:
    """Run the guest to completion; the error text when it failed or overran, else None."""
    with (run_dir / "console.log").open("wb") as console:
        (run_dir / "boot-started").write_text(f"{time.time():.3f}\n")
        # A session of its own: on timeout the whole UML process group (it forks helpers) is killed at once.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"the guest did not finish within {timeout:.0f} s and was killed"
    if returncode != 0:
        return f"the UML kernel exited with status {returncode}"
    return None


def read_exit_code(run_dir: Path) -> int | None:
    path = run_dir / "exit-code"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _boot_seconds(run_dir: Path) -> float | None:
    """Host launch to the guest init's first line: both clocks are the host's (UML reads the host time)."""
    try:
        launched = float((run_dir / "boot-started").read_text())
        init_started = float((run_dir / "init-started").read_text())
    except (OSError, ValueError):
        return None
    return init_started - launched


def parse_junit(path: Path) -> dict[str, CaseResult]:
    """Map each guest test's node id to its outcome. Only our own, trusted file is parsed here."""
    results: dict[str, CaseResult] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        nodeid = _case_nodeid(case)
        results[nodeid] = _case_result(nodeid, case)
    return results


def _case_nodeid(case: ET.Element) -> str:
    for prop in case.iter("property"):
        if prop.get("name") == NODEID_PROPERTY:
            return prop.get("value", "")
    # A module's collection error has no item (and so no property); junit names it by the module's dotted
    # path, with an empty classname: map it back to the module's file, which is how the host looks it up.
    classname = case.get("classname", "")
    name = case.get("name", "")
    return f"{name.replace('.', '/')}.py" if not classname else f"{classname}::{name}"


def _case_result(nodeid: str, case: ET.Element) -> CaseResult:
    # A failed call followed by a failing teardown carries both a <failure> and an <error>: show both.
    problems = case.findall("failure") + case.findall("error")
    if problems:
        texts = [element.text or element.get("message") or "" for element in problems]
        outcome = "failed" if problems[0].tag == "failure" else "error"
        return CaseResult(nodeid, outcome, problems[0].get("message") or "", "\n\n".join(texts))
    skipped = case.find("skipped")
    if skipped is not None:
        outcome = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        return CaseResult(nodeid, outcome, skipped.get("message", ""), skipped.text or "")
    return CaseResult(nodeid, "passed", "", "")


def summary(run: GuestRun) -> str:
    counts: dict[str, int] = {}
    for result in run.results.values():
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    outcome_text = (
        ", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items())) or "no results"
    )
    boot = f"{run.boot_seconds:.1f} s" if run.boot_seconds is not None else "unknown"
    return (
        f"kernel tier: {outcome_text}; guest pytest exit code {run.exit_code}; boot {boot}, "
        f"total {run.total_seconds:.1f} s; logs in {run.run_dir}"
    )


def with_default_path(args: Sequence[str]) -> list[str]:
    """Add tests/kernel unless a test path is given: pytest alone would run every test under testpaths."""
    names_a_path = any(
        (REPO_ROOT / arg.split("::", 1)[0]).exists() for arg in args if not arg.startswith("-")
    )
    return list(args) if names_a_path else [*args, "tests/kernel"]


def main(argv: Sequence[str]) -> int:
    settings = Settings.from_environment()
    reason = unavailable_reason(settings)
    if reason is not None:
        print(f"kernel tier {'FAILED' if is_ci() else 'skipped'}: {reason}", file=sys.stderr)
        return 1 if is_ci() else EXIT_UNAVAILABLE
    try:
        run = run_guest(with_default_path(argv), settings)
    except GuestError as exc:
        print(f"kernel tier: {exc}", file=sys.stderr)
        return EXIT_NO_RESULT
    if run.pytest_log.exists():
        sys.stdout.write(run.pytest_log.read_text(errors="replace"))
    if run.error is not None:
        print(f"kernel tier: {run.error}\n{run.log_tail()}", file=sys.stderr)
    print(summary(run))
    return run.exit_code if run.exit_code is not None else EXIT_NO_RESULT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
