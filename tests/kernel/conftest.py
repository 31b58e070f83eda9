"""The kernel tier's pytest glue: one guest boot on the host, ordinary fixtures inside the guest.

On the host (``APROXY_IN_GUEST`` unset; what ``make test`` runs) the kernel tests are collected as usual,
then, after ``-k``/``-m``/``--deselect`` have chosen, each one is replaced by a ``GuestItem`` with the same
node id. No fixture and no test body runs on the host (it has no IPVS). The first ``GuestItem`` to run boots
the guest once (``run.run_guest``) with the node ids of every selected kernel test; each ``GuestItem`` then
passes, fails (with the guest's traceback), skips or xfails exactly as its test did in the guest. Where the
tier cannot run (not Linux, no user-mode Linux, not root) every kernel test is skipped with the reason, or
fails with it when ``CI=true``.

Inside the guest (``APROXY_IN_GUEST=1``, set by guest_init.sh) this is an ordinary conftest: it tags each test
with its node id for the junit XML the host reads, and provides the fixtures below. After every test the node
is reset (IPVS flushed, kube-ipvs0 and all namespaces deleted, iptables and sysctls restored) so tests are
independent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPVS

from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.backends.ipvs_socket import IPVSSocket
from tests.kernel import netlab
from tests.kernel import run as guest
from tests.kernel.opened import opened_backend

IN_GUEST = os.environ.get("APROXY_IN_GUEST") == "1"
KERNEL_DIR = Path(__file__).resolve().parent


def _is_kernel_item(item: pytest.Item) -> bool:
    return item.path.resolve().is_relative_to(KERNEL_DIR)


def pytest_itemcollected(item: pytest.Item) -> None:
    if not _is_kernel_item(item):
        return
    # Marked before selection, so that `-m "not kernel"` leaves the tier out on the host too.
    item.add_marker(pytest.mark.kernel)
    if IN_GUEST:
        item.user_properties.append((guest.NODEID_PROPERTY, item.nodeid))


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect: only the selected tests go to the guest
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        _keep_selected(config, items)
        return
    for index, item in enumerate(items):
        if _is_kernel_item(item):
            assert item.parent is not None  # a test item always has its module (or class) as parent
            items[index] = GuestItem.from_parent(item.parent, name=item.name, original=item)


def _keep_selected(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In the guest: run only the tests the host selected (run.py lists their node ids in a file)."""
    listing = os.environ.get(guest.SELECTED_ENV)
    if not listing:
        return
    selected = set(Path(listing).read_text().splitlines())
    deselected = [item for item in items if item.nodeid not in selected]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.nodeid in selected]


def pytest_sessionstart(session: pytest.Session) -> None:
    if IN_GUEST and not netlab.in_guest():
        raise pytest.UsageError(
            f"APROXY_IN_GUEST=1 but {netlab.GUEST_MARKER} is missing: refusing to flush this machine's IPVS "
            "and iptables. Run the kernel tests with `.venv/bin/pytest tests/kernel` or tests/kernel/run.py."
        )


# --- host side ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verdict:
    """The one guest run of this session, or why there is none."""

    run: guest.GuestRun | None = None
    unavailable: str | None = None
    error: str | None = None


_VERDICT = pytest.StashKey[_Verdict]()


class GuestFailure(Exception):
    """A kernel test failed (or erred) inside the guest; the message is the guest's report."""


class GuestItem(pytest.Item):
    """Stands in on the host for one kernel test and reports what that test did in the guest."""

    def __init__(self, *, original: pytest.Item, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reportinfo = original.reportinfo()
        self.own_markers = list(original.own_markers)
        self.keywords.update(original.keywords)

    def reportinfo(self) -> tuple[os.PathLike[str] | str, int | None, str]:
        return self._reportinfo

    def runtest(self) -> None:
        verdict = _guest_verdict(self.config, self.session)
        if verdict.unavailable is not None:
            if guest.is_ci():
                pytest.fail(f"{verdict.unavailable} (CI=true: the kernel tier must run)", pytrace=False)
            pytest.skip(verdict.unavailable)
        if verdict.run is None:
            pytest.fail(f"kernel tier: {verdict.error}", pytrace=False)
        result = verdict.run.results.get(self.nodeid)
        if result is None:
            module_error = verdict.run.results.get(self.nodeid.split("::", 1)[0])
            if module_error is not None:
                raise GuestFailure(f"its module could not be collected in the guest:\n\n{module_error.text}")
            why = verdict.run.error or "the guest reported no result for this test"
            pytest.fail(f"kernel tier: {why}\n{verdict.run.log_tail()}", pytrace=False)
        if result.outcome == "skipped":
            # Reported at the test's own location, not at this line.
            raise pytest.skip.Exception(result.message, _use_item_location=True)
        if result.outcome == "xfailed":
            pytest.xfail(result.message)
        if result.outcome in {"failed", "error"}:
            where = "in the guest" if result.outcome == "failed" else "in the guest, outside the test body"
            # The message's first line first: it is what pytest's short summary (-r) shows.
            headline = result.message.partition("\n")[0]
            raise GuestFailure(
                f"{headline}\n\n{result.text}\n\n(failed {where}; logs in {verdict.run.run_dir})"
            )

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: str | None = None) -> str:
        if isinstance(excinfo.value, GuestFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))


def _guest_verdict(config: pytest.Config, session: pytest.Session) -> _Verdict:
    """Boot the guest on first use, once per session, for every selected kernel test."""
    if _VERDICT not in config.stash:
        settings = guest.Settings.from_environment()
        reason = guest.unavailable_reason(settings)
        if reason is not None:
            config.stash[_VERDICT] = _Verdict(unavailable=reason)
        else:
            nodeids = [item.nodeid for item in session.items if isinstance(item, GuestItem)]
            files = sorted({nodeid.split("::", 1)[0] for nodeid in nodeids})
            try:
                config.stash[_VERDICT] = _Verdict(run=guest.run_guest(files, settings, selected=nodeids))
            except guest.GuestError as exc:
                config.stash[_VERDICT] = _Verdict(error=str(exc))
    return config.stash[_VERDICT]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    verdict = config.stash.get(_VERDICT, None)
    if verdict is not None and verdict.run is not None:
        terminalreporter.write_line(guest.summary(verdict.run))


# --- guest side ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_baseline() -> netlab.NodeBaseline:
    """The guest node's pristine iptables and sysctls, captured before the first test changes anything."""
    return netlab.capture_baseline()


@pytest.fixture(autouse=True)
def clean_node(node_baseline: netlab.NodeBaseline) -> Iterator[None]:
    """Every kernel test starts from, and leaves, an empty node."""
    yield
    netlab.reset_node(node_baseline)


@pytest.fixture
def lab() -> Iterator[netlab.Lab]:
    """Pods, clients and virtual IPs for one test (see netlab.Lab); removed afterwards."""
    with netlab.Lab() as created:
        yield created


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for a synchronous test body that drives the backend's coroutines."""
    with asyncio.Runner() as created:
        yield created


@pytest.fixture
def backend(runner: asyncio.Runner, settings: IPVSSettings) -> Iterator[IPVSBackend]:
    """An opened IPVSBackend with the test module's own ``settings`` fixture, closed afterwards."""
    with opened_backend(runner, settings) as opened:
        yield opened


@pytest.fixture
def raw_socket() -> Iterator[IPVSSocket]:
    """An IPVS socket of the code under test of its own, on the family id pyroute2 resolves."""
    with IPVS() as ipvs:
        family_id = ipvs.prid
    sock = IPVSSocket(family_id)
    try:
        yield sock
    finally:
        sock.close()
