"""The dummy device's addresses read over a raw rtnetlink socket (``AddressReader``, rtnl_wire.py), on a real
kernel.

Every cluster IP is bound on kube-ipvs0, so the backend reads one address message per service at every
``dump`` and every ``read``. What it reads is checked against ``ip -o addr show`` (iproute2, parsed here) and
against pyroute2's decoder, never against the code under test; how much it reads is counted: one address
dump per ``dump``/``read``, and only the device's own addresses on the wire (the kernel filters by
interface index once strict checking is on).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from aproxy.backends.ipvs import AddressReader, IPVSBackend, IPVSSettings
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    IPAddress,
    L4Protocol,
    Operation,
    RealServer,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.state import IPVSState
from tests.kernel import netlab

pytestmark = pytest.mark.kernel

DEVICE = netlab.DUMMY_DEVICE
OTHER_DEVICE = "aprx-other"
BOUND = (
    IPv4Address("10.96.8.1"),
    IPv4Address("10.96.8.2"),
    IPv4Address("192.0.2.80"),
    IPv6Address("fd00:10:96::8:1"),
    IPv6Address("fd00:10:96::8:2"),
    IPv6Address("2001:db8::80"),
)
# On another dummy device: never reported as kube-ipvs0's, even where the address is the same as one of its.
ELSEWHERE = (IPv4Address("10.96.8.100"), IPv6Address("fd00:10:96::8:100"), BOUND[0])
MANY = 300
VIRTUAL = VirtualServerKey(L4Protocol.TCP, IPv4Address("10.97.0.7"), 80)
REAL = RealServer(ip_address("10.244.8.1"), 8080, 2)


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json", masquerade=False)


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as created:
        yield created


@pytest.fixture
def backend(runner: asyncio.Runner, settings: IPVSSettings) -> Iterator[IPVSBackend]:
    opened = runner.run(IPVSBackend(settings).__aenter__())
    try:
        yield opened
    finally:
        runner.run(opened.__aexit__(None, None, None))


@pytest.fixture
def reader() -> Iterator[AddressReader]:
    """A reader of the code under test of its own (the backend's is private)."""
    created = AddressReader(IPVSSettings())
    try:
        yield created
    finally:
        created.close()


@pytest.fixture
def other_device() -> None:
    """A second dummy device, up (so it also has an IPv6 link-local address), with addresses of its own."""
    netlab.run("ip", "link", "add", OTHER_DEVICE, "type", "dummy")
    netlab.run("ip", "link", "set", OTHER_DEVICE, "up")
    for address in ELSEWHERE:
        netlab.run("ip", "addr", "add", f"{address}/{address.max_prefixlen}", "dev", OTHER_DEVICE)


def ip_shows(device: str) -> frozenset[IPAddress]:
    """Every address ``ip -o addr show dev <device>`` lists, link-local ones included."""
    output = netlab.run("ip", "-o", "addr", "show", "dev", device)
    return frozenset(ip_address(text) for text in re.findall(r"\binet6? ([0-9a-f.:]+)/\d+", output))


def link_index(device: str) -> int:
    return int(Path("/sys/class/net", device, "ifindex").read_text())


def bind(runner: asyncio.Runner, backend: IPVSBackend, operations: list[Operation]) -> None:
    results = runner.run(backend.apply(operations))
    assert all(result.ok for result in results), [result for result in results if not result.ok]


@pytest.mark.usefixtures("other_device")
def test_dump_reports_exactly_the_addresses_ip_shows_on_the_device(
    runner: asyncio.Runner, backend: IPVSBackend
) -> None:
    bind(runner, backend, [BindAddress(address) for address in BOUND])
    address_dumps, ipvs_dumps = backend.netlink_address_dumps_sent, backend.netlink_dumps_sent

    state = runner.run(backend.dump())

    assert state.addresses() == ip_shows(DEVICE) == frozenset(BOUND)
    assert ip_shows(OTHER_DEVICE) >= frozenset(ELSEWHERE)  # the other device's are there, and left out
    assert backend.netlink_address_dumps_sent - address_dumps == 1
    assert backend.netlink_dumps_sent - ipvs_dumps == 1  # the service dump; address dumps are apart


@pytest.mark.usefixtures("other_device")
def test_the_kernel_sends_only_the_device_addresses(
    runner: asyncio.Runner, backend: IPVSBackend, reader: AddressReader
) -> None:
    bind(runner, backend, [BindAddress(address) for address in BOUND])
    index = link_index(DEVICE)

    found = runner.run(reader.addresses(index))

    assert {address.address for address in found} == ip_shows(DEVICE)
    assert {address.index for address in found} == {index}
    assert {(a.address.version, a.prefixlen) for a in found} == {(4, 32), (6, 128)}
    # Strict checking (Linux 4.20+) filters in the kernel: not one message of the other device on the wire.
    assert (reader.dumps_sent, reader.dump_messages) == (1, len(BOUND))


def pyroute2_addresses(index: int) -> frozenset[tuple[int, int, IPAddress]]:
    """pyroute2's decoding of the same interface's addresses (the reference decoder)."""
    with IPRoute() as ipr:
        messages = list(ipr.addr("dump", index=index))
    return frozenset(
        (
            message["family"],
            message["prefixlen"],
            ip_address(message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")),
        )
        for message in messages
    )


@pytest.mark.usefixtures("other_device")
def test_every_interface_reads_as_pyroute2_decodes_it(
    runner: asyncio.Runner, backend: IPVSBackend, reader: AddressReader
) -> None:
    bind(runner, backend, [BindAddress(address) for address in BOUND])
    indexes = [link_index(device.name) for device in Path("/sys/class/net").iterdir()]

    ours = {
        index: frozenset((a.family, a.prefixlen, a.address) for a in runner.run(reader.addresses(index)))
        for index in indexes
    }

    assert ours == {index: pyroute2_addresses(index) for index in indexes}
    assert ours[link_index("lo")] >= {(2, 8, ip_address("127.0.0.1")), (10, 128, ip_address("::1"))}
    assert reader.dumps_sent == len(indexes)


def test_an_interface_that_does_not_exist_has_no_addresses(
    runner: asyncio.Runner, reader: AddressReader
) -> None:
    missing = max(link_index(device.name) for device in Path("/sys/class/net").iterdir()) + 1000
    # Made with ip, left down (as aproxy leaves it): an up device would get an IPv6 link-local address too.
    netlab.run("ip", "link", "add", DEVICE, "type", "dummy")
    netlab.run("ip", "addr", "add", "10.96.8.9/32", "dev", DEVICE)

    assert runner.run(reader.addresses(missing)) == []  # the kernel's ENODEV, read as "none"
    # The socket still serves the next dump.
    assert [a.address for a in runner.run(reader.addresses(link_index(DEVICE)))] == [ip_address("10.96.8.9")]


def test_read_at_300_bound_addresses_sends_one_address_dump_one_get_and_one_real_server_dump(
    runner: asyncio.Runner, backend: IPVSBackend
) -> None:
    many = [IPv4Address("10.98.0.1") + number for number in range(MANY - 1)]
    bind(runner, backend, [BindAddress(address) for address in (*many, VIRTUAL.address)])
    programmed: list[Operation] = [
        AddVirtualServer(VIRTUAL, VirtualServerSpec()),
        AddRealServer(VIRTUAL, REAL),
    ]
    bind(runner, backend, programmed)
    assert len(ip_shows(DEVICE)) == MANY
    before = (backend.netlink_address_dumps_sent, backend.netlink_gets_sent, backend.netlink_dumps_sent)

    state = runner.run(backend.read([VIRTUAL], [VIRTUAL.address, many[0]]))

    after = (backend.netlink_address_dumps_sent, backend.netlink_gets_sent, backend.netlink_dumps_sent)
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (1, 1, 1)
    expected = IPVSState()
    for operation in (BindAddress(VIRTUAL.address), BindAddress(many[0]), *programmed):
        expected.apply(operation)
    assert state == expected
