"""kube-proxy's --ipvs-tcp-timeout / --ipvs-tcpfin-timeout / --ipvs-udp-timeout: set when the backend opens,
read back with ``ipvsadm -L --timeout``; zero leaves the kernel's value alone."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.backends.ipvs_wire import IPVSTimeouts
from tests.kernel import netlab

pytestmark = pytest.mark.kernel


def kernel_timeouts() -> tuple[int, int, int]:
    text = netlab.ipvsadm("-L", "--timeout")
    found = re.search(r"Timeout \(tcp tcpfin udp\): (\d+) (\d+) (\d+)", text)
    assert found is not None, text
    tcp, tcp_fin, udp = (int(number) for number in found.groups())
    return tcp, tcp_fin, udp


@pytest.fixture
def restored() -> Iterator[tuple[int, int, int]]:
    before = kernel_timeouts()
    yield before
    netlab.ipvsadm("--set", *(str(seconds) for seconds in before))


def open_with(tmp_path: Path, timeouts: IPVSTimeouts) -> None:
    async def main() -> None:
        async with IPVSBackend(IPVSSettings(state_file=tmp_path / "owned.json", timeouts=timeouts)):
            pass

    asyncio.run(main())


def test_opening_sets_the_timeouts_like_ipvsadm_set(tmp_path: Path, restored: tuple[int, int, int]) -> None:
    open_with(tmp_path, IPVSTimeouts(tcp=901, tcp_fin=121, udp=301))
    assert kernel_timeouts() == (901, 121, 301)


def test_zero_leaves_a_timeout_unchanged(tmp_path: Path, restored: tuple[int, int, int]) -> None:
    netlab.ipvsadm("--set", "902", "122", "302")
    open_with(tmp_path, IPVSTimeouts(udp=5))
    assert kernel_timeouts() == (902, 122, 5)
    open_with(tmp_path, IPVSTimeouts())
    assert kernel_timeouts() == (902, 122, 5)
