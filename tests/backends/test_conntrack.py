"""Which conntrack entries a batch of IPVS results makes stale, and the command that deletes them."""

from __future__ import annotations

from errno import ENOENT
from ipaddress import ip_address

import pytest

from aproxy.backends.base import OperationResult
from aproxy.backends.command import CommandResult
from aproxy.backends.conntrack import StaleFlows, is_success, stale_flows
from aproxy.core.model import (
    AddRealServer,
    DeleteRealServer,
    DeleteVirtualServer,
    L4Protocol,
    RealServer,
    RealServerKey,
    UpdateRealServer,
    VirtualServerKey,
)

DNS = VirtualServerKey(L4Protocol.UDP, ip_address("10.96.0.10"), 53)
DNS6 = VirtualServerKey(L4Protocol.UDP, ip_address("fd00:10:96::a"), 53)
DNS_TCP = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.10"), 53)
SCTP = VirtualServerKey(L4Protocol.SCTP, ip_address("10.96.0.11"), 9000)
POD = RealServerKey(ip_address("10.244.1.5"), 5353)
POD6 = RealServerKey(ip_address("fd00:10:244::5"), 5353)


def test_a_removed_udp_real_server_leaves_its_flows_stale() -> None:
    results = [OperationResult(DeleteRealServer(DNS, POD))]

    assert stale_flows(results) == [StaleFlows(DNS, POD)]


def test_only_accepted_udp_deletions_count() -> None:
    results = [
        OperationResult(DeleteRealServer(DNS_TCP, POD)),  # TCP: drained, not flushed
        OperationResult(DeleteRealServer(SCTP, POD)),
        OperationResult(DeleteRealServer(DNS, POD), "No such file or directory", ENOENT),
        OperationResult(AddRealServer(DNS, RealServer(POD.address, POD.port))),
        OperationResult(UpdateRealServer(DNS, RealServer(POD.address, POD.port, 0))),
    ]

    assert stale_flows(results) == []


def test_a_removed_udp_virtual_server_covers_its_real_servers_once() -> None:
    results = [
        OperationResult(DeleteRealServer(DNS, POD)),
        OperationResult(DeleteRealServer(DNS6, POD6)),
        OperationResult(DeleteRealServer(DNS6, POD6)),
        OperationResult(DeleteVirtualServer(DNS)),
    ]

    assert stale_flows(results) == [StaleFlows(DNS6, POD6), StaleFlows(DNS)]


@pytest.mark.parametrize(
    ("flows", "argv"),
    [
        pytest.param(
            StaleFlows(DNS, POD),
            "conntrack -D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 "
            "--reply-src 10.244.1.5 --reply-port-src 5353",
            id="real-server",
        ),
        pytest.param(
            StaleFlows(DNS6),
            "conntrack -D -f ipv6 -p udp --orig-dst fd00:10:96::a --orig-port-dst 53",
            id="whole-virtual-server-ipv6",
        ),
    ],
)
def test_the_conntrack_command(flows: StaleFlows, argv: str) -> None:
    assert flows.command() == argv.split()


@pytest.mark.parametrize(
    ("returncode", "stderr", "success"),
    [
        pytest.param(
            0, "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n", True, id="deleted"
        ),
        pytest.param(
            1,
            "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n",
            True,
            id="none-matched",
        ),
        pytest.param(
            1, "conntrack v1.4.7 (conntrack-tools): Operation failed: invalid parameters\n", False, id="error"
        ),
    ],
)
def test_nothing_to_delete_is_not_an_error(returncode: int, stderr: str, success: bool) -> None:
    assert is_success(CommandResult(("conntrack", "-D"), returncode, "", stderr)) is success
