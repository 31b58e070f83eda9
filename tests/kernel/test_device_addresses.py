"""The dummy device's addresses bound, unbound and read over a raw rtnetlink socket (``AddressSocket``,
rtnl_wire.py), on a real kernel.

Every cluster IP is bound on kube-ipvs0, so the backend binds one address per service and reads one
address message per service at every ``dump`` and every ``read``. What it reads and writes is checked
against ``ip -o addr show`` (iproute2, parsed here), pyroute2's decoder and ipvsadm, never against the code
under test; how much it sends is counted: binds and unbinds in as few buffers as the batch limits allow, one
address dump per ``dump``/``read``, and only the device's own addresses on the wire (the kernel filters by
interface index once strict checking is on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import math
import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from aproxy.backends import rtnl_wire
from aproxy.backends.address_socket import AddressSocket
from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    IPAddress,
    L4Protocol,
    Operation,
    RealServer,
    UnbindAddress,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.state import IPVSState
from tests.kernel import netlab
from tests.kernel.opened import opened_backend

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
def reader() -> Iterator[AddressSocket]:
    """An address socket of the code under test of its own (the backend's is private)."""
    created = AddressSocket()
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
    runner: asyncio.Runner, backend: IPVSBackend, reader: AddressSocket
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
    runner: asyncio.Runner, backend: IPVSBackend, reader: AddressSocket
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
    runner: asyncio.Runner, reader: AddressSocket
) -> None:
    missing = max(link_index(device.name) for device in Path("/sys/class/net").iterdir()) + 1000
    # Made with ip, left down (as aproxy leaves it): an up device would get an IPv6 link-local address too.
    netlab.run("ip", "link", "add", DEVICE, "type", "dummy")
    netlab.run("ip", "addr", "add", "10.96.8.9/32", "dev", DEVICE)

    assert runner.run(reader.addresses(missing)) == []  # the kernel's ENODEV, read as "none"
    # The socket still serves the next dump.
    assert [a.address for a in runner.run(reader.addresses(link_index(DEVICE)))] == [ip_address("10.96.8.9")]


def programmed_among_many(
    runner: asyncio.Runner, backend: IPVSBackend
) -> tuple[list[IPAddress], list[Operation]]:
    """MANY addresses bound, one of them VIRTUAL's, which has one real server: (the others, VIRTUAL's
    operations)."""
    many: list[IPAddress] = [IPv4Address("10.98.0.1") + number for number in range(MANY - 1)]
    bind(runner, backend, [BindAddress(address) for address in (*many, VIRTUAL.address)])
    programmed: list[Operation] = [
        AddVirtualServer(VIRTUAL, VirtualServerSpec()),
        AddRealServer(VIRTUAL, REAL),
    ]
    bind(runner, backend, programmed)
    return many, programmed


def reads_sent(backend: IPVSBackend) -> tuple[int, int, int]:
    """Address dumps, IPVS gets and IPVS dumps sent so far."""
    return backend.netlink_address_dumps_sent, backend.netlink_gets_sent, backend.netlink_dumps_sent


def test_read_at_300_bound_addresses_sends_one_address_dump_one_get_and_one_real_server_dump(
    runner: asyncio.Runner, backend: IPVSBackend
) -> None:
    many, programmed = programmed_among_many(runner, backend)
    assert len(ip_shows(DEVICE)) == MANY
    before = reads_sent(backend)

    state = runner.run(backend.read([VIRTUAL], [VIRTUAL.address, many[0]]))

    assert tuple(a - b for a, b in zip(reads_sent(backend), before, strict=True)) == (1, 1, 1)
    expected = IPVSState()
    for operation in (BindAddress(VIRTUAL.address), BindAddress(many[0]), *programmed):
        expected.apply(operation)
    assert state == expected


def test_read_of_its_own_virtual_servers_alone_sends_no_address_dump(
    runner: asyncio.Runner, backend: IPVSBackend
) -> None:
    """The audit's slices of real servers: keys on addresses aproxy bound need no ownership check against
    the bound addresses, whose dump at 10,000 services was most of each slice's time."""
    _many, programmed = programmed_among_many(runner, backend)
    before = reads_sent(backend)

    state = runner.run(backend.read([VIRTUAL], []))

    assert tuple(a - b for a, b in zip(reads_sent(backend), before, strict=True)) == (0, 1, 1)
    expected = IPVSState()
    for operation in programmed:
        expected.apply(operation)
    assert state == expected


# --- binding and unbinding in batches -----------------------------------------------------------------------


def counters(backend: IPVSBackend) -> dict[str, int]:
    """What the backend has sent so far: address binds/unbinds and IPVS writes apart."""
    return {
        "address_messages": backend.netlink_address_messages_sent,
        "address_batches": backend.netlink_address_batches_sent,
        "ipvs_messages": backend.netlink_messages_sent,
        "ipvs_batches": backend.netlink_batches_sent,
    }


def sent_since(backend: IPVSBackend, before: dict[str, int]) -> dict[str, int]:
    return {name: count - before[name] for name, count in counters(backend).items()}


def alternating(count: int) -> list[IPAddress]:
    """IPv4 and IPv6 service addresses in turn, IPv4 first."""
    v4, v6 = IPv4Address("10.99.0.1"), IPv6Address("fd00:10:99::1")
    return [v4 + number // 2 if number % 2 == 0 else v6 + number // 2 for number in range(count)]


def request_bytes(address: IPAddress) -> int:
    return len(rtnl_wire.address_request(1, BindAddress(address), 1, ack=False))


V4 = IPv4Address("10.99.1.1")
V6 = IPv6Address("fd00:10:99:1::1")
# A pair of requests, one IPv4 and one IPv6 (40 + 44 bytes): batch_bytes below is a whole number of pairs.
PAIR_BYTES = request_bytes(V4) + request_bytes(V6)


@pytest.mark.parametrize(
    ("limits", "per_batch"),
    [
        # 300 requests of at most 44 bytes: under both the 512 messages and the 128 KiB of a buffer.
        pytest.param({}, MANY, id="default-limits-one-batch"),
        pytest.param({"batch_messages": 128}, 128, id="message-limit"),
        # 50 IPv4 and 50 IPv6 requests fill a buffer exactly: the 101st would pass the limit.
        pytest.param({"batch_bytes": 50 * PAIR_BYTES}, 100, id="byte-limit"),
    ],
)
def test_300_binds_go_out_in_as_few_batches_as_the_limits_allow(
    runner: asyncio.Runner, settings: IPVSSettings, limits: dict[str, Any], per_batch: int
) -> None:
    limited = dataclasses.replace(settings, **limits)
    addresses = alternating(MANY)
    batches = math.ceil(MANY / per_batch)  # 1, 3 (128 + 128 + 44), 3 (100 each)
    with opened_backend(runner, limited) as backend:
        before = counters(backend)

        results = runner.run(backend.apply([BindAddress(address) for address in addresses]))

        assert [result.errno for result in results] == [None] * MANY
        assert ip_shows(DEVICE) == frozenset(addresses) == backend._bound
        assert sent_since(backend, before) == {
            "address_messages": MANY,
            "address_batches": batches,
            "ipvs_messages": 0,
            "ipvs_batches": 0,
        }
        assert runner.run(backend.dump()).addresses() == frozenset(addresses)
        before = counters(backend)

        results = runner.run(backend.apply([UnbindAddress(address) for address in addresses]))

        assert [result.errno for result in results] == [None] * MANY
        assert ip_shows(DEVICE) == frozenset() == backend._bound
        assert sent_since(backend, before)["address_batches"] == batches


@pytest.mark.parametrize(
    "addresses",
    [
        pytest.param((V4, V4 + 1, V4 + 2, V4 + 3), id="ipv4"),
        pytest.param((V6, V6 + 1, V6 + 2, V6 + 3), id="ipv6"),
        pytest.param((V4, V6 + 1, V4 + 2, V6 + 3), id="mixed"),
    ],
)
@pytest.mark.parametrize(
    "order",
    [
        pytest.param((0, 1, 2, 3), id="refusals-inside"),
        pytest.param((3, 0, 2, 1), id="refusal-last"),  # the refused request is the one asking the ack
    ],
)
def test_one_batch_reports_each_refusal_with_its_own_errno(
    runner: asyncio.Runner,
    backend: IPVSBackend,
    addresses: tuple[IPAddress, IPAddress, IPAddress, IPAddress],
    order: tuple[int, int, int, int],
) -> None:
    new, bound, never_bound, bound_too = addresses
    bind(runner, backend, [BindAddress(bound), BindAddress(bound_too)])
    cases: list[tuple[Operation, int | None]] = [
        (BindAddress(new), None),
        (BindAddress(bound), errno.EEXIST),
        (UnbindAddress(never_bound), errno.EADDRNOTAVAIL),
        (UnbindAddress(bound_too), None),
    ]
    operations = [cases[index][0] for index in order]
    before = counters(backend)

    results = runner.run(backend.apply(operations))

    assert [result.operation for result in results] == operations
    assert [result.errno for result in results] == [cases[index][1] for index in order]
    assert all(result.error for result in results if result.errno is not None)
    assert ip_shows(DEVICE) == {new, bound} == backend._bound
    assert sent_since(backend, before) == {
        "address_messages": 4,
        "address_batches": 1,
        "ipvs_messages": 0,
        "ipvs_batches": 0,
    }


def owned_record(settings: IPVSSettings) -> list[Any]:
    """The ownership record the backend keeps of virtual servers on addresses it does not bind."""
    if not settings.state_file.exists():
        return []
    entries: list[Any] = json.loads(settings.state_file.read_text())
    return entries


def test_address_and_ipvs_runs_are_applied_in_the_order_given(
    runner: asyncio.Runner, backend: IPVSBackend, settings: IPVSSettings
) -> None:
    other = IPv6Address("fd00:10:99:2::1")
    bind(runner, backend, [BindAddress(other)])
    operations: list[Operation] = [
        BindAddress(VIRTUAL.address),
        AddVirtualServer(VIRTUAL, VirtualServerSpec()),
        UnbindAddress(other),
    ]
    before = counters(backend)

    results = runner.run(backend.apply(operations))

    assert [(result.operation, result.errno) for result in results] == [(op, None) for op in operations]
    assert sent_since(backend, before) == {
        "address_messages": 2,
        "address_batches": 2,  # the bind, then the unbind after the IPVS batch
        "ipvs_messages": 1,
        "ipvs_batches": 1,
    }
    # The bind went out first: the virtual server was added on an address already bound, so it is owned
    # through the device, not written to the record of virtual servers on addresses aproxy does not bind.
    assert owned_record(settings) == []
    assert netlab.read_ipvs().keys() == {VIRTUAL}
    assert ip_shows(DEVICE) == {VIRTUAL.address} == backend._bound


@pytest.mark.parametrize(
    ("bound_before", "operations"),
    [
        pytest.param(
            True,
            [UnbindAddress(V4), BindAddress(V4)],
            id="unbind-then-bind",  # reversed, the bind would be refused with EEXIST
        ),
        pytest.param(
            False,
            [BindAddress(V6), UnbindAddress(V6)],
            id="bind-then-unbind",  # reversed, the unbind would be refused with EADDRNOTAVAIL
        ),
    ],
)
def test_a_batch_is_applied_in_its_order(
    runner: asyncio.Runner, backend: IPVSBackend, bound_before: bool, operations: list[Operation]
) -> None:
    (address,) = {op.address for op in operations if isinstance(op, BindAddress | UnbindAddress)}
    if bound_before:
        bind(runner, backend, [BindAddress(address)])
    before = counters(backend)

    results = runner.run(backend.apply(operations))

    assert [result.errno for result in results] == [None, None]
    assert sent_since(backend, before)["address_batches"] == 1
    expected = {address} if isinstance(operations[-1], BindAddress) else set()
    assert ip_shows(DEVICE) == expected == backend._bound
