"""Proof that the kernel tier works: IPVS is there, pyroute2 drives it, and real traffic flows through it.

These run inside the user-mode Linux guest (see conftest.py and run.py).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, ip_address
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pyroute2 import AsyncIPVS, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from aproxy.core.model import L4Protocol, RealServerKey, VirtualServerKey, VirtualServerSpec
from tests.kernel import netlab
from tests.kernel.netlab import SERVICE_ADDRESS, Lab, Namespace

REQUIRED_MODULES = frozenset(
    {
        "ip_vs",
        *(
            f"ip_vs_{name}"
            for name in ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")
        ),
        "dummy",
        "veth",
        "nf_conntrack",
        "nf_conntrack_netlink",
        "ip_tables",
        "iptable_nat",
        "iptable_filter",
        "xt_ipvs",
        "xt_nat",
        "xt_MASQUERADE",
        "xt_mark",
        "xt_comment",
        "xt_conntrack",
        "xt_statistic",
        "xt_recent",
        "xt_tcpudp",
        "ipt_REJECT",
    }
)
# IPVS masquerading (NAT) forwarding method; pyroute2's IPVSDest defaults to 3 (direct routing).
FWD_MASQ = 0
IP_VS_SVC_F_PERSISTENT = 0x1
# An IPv6 virtual server needs netmask (prefix length) 128, which the kernel reads as a native-endian u32 and
# pyroute2 encodes as an IPv4 address: "128.0.0.0" on little-endian machines. Without it: EINVAL.
IPV6_NETMASK = str(IPv4Address(struct.pack("=I", 128)))
VIP_PORT = 80
T = TypeVar("T")


def loaded_modules() -> set[str]:
    with open("/proc/modules") as modules:
        return {line.split()[0] for line in modules}


def test_guest_has_ipvs_modules_and_an_empty_table() -> None:
    assert REQUIRED_MODULES - loaded_modules() == set()
    assert len(netlab.read_ipvs()) == 0
    assert netlab.read_sysctl("net/ipv4/vs/conntrack") == "0"


def test_ipvsadm_output_parses_into_every_option() -> None:
    netlab.ipvsadm("-A", "-t", "10.96.0.1:80", "-s", "rr")
    netlab.ipvsadm("-a", "-t", "10.96.0.1:80", "-r", "10.244.1.10:8080", "-m", "-w", "5")
    netlab.ipvsadm("-a", "-t", "10.96.0.1:80", "-r", "10.244.1.11:80", "-g", "-w", "0")
    netlab.ipvsadm("-A", "-t", "10.96.0.2:443", "-s", "sh", "-b", "sh-fallback,sh-port")
    netlab.ipvsadm("-A", "-u", "10.96.0.3:53", "-s", "wrr", "-p", "300", "-M", "255.255.255.0", "-o")
    netlab.ipvsadm("-A", "-t", "[fd00:10:96::1]:80", "-s", "mh", "-b", "mh-port")
    netlab.ipvsadm("-a", "-t", "[fd00:10:96::1]:80", "-r", "[fd00:10:244:1::10]:8080", "-m")
    netlab.ipvsadm("-A", "-f", "7", "-s", "lc")

    table = netlab.read_ipvs()

    first = table.find("TCP", "10.96.0.1", 80)
    assert first.spec == VirtualServerSpec("rr", 0, frozenset())
    assert first.weights == {
        RealServerKey(IPv4Address("10.244.1.10"), 8080): 5,
        # Direct routing cannot change the port: the kernel keeps the virtual port.
        RealServerKey(IPv4Address("10.244.1.11"), 80): 0,
    }
    assert [real.forward for real in first.real_servers] == ["Masq", "Route"]
    assert table.find("TCP", "10.96.0.2", 443).spec == VirtualServerSpec(
        "sh", 0, frozenset({"flag-1", "flag-2"})
    )
    persistent = table.find("UDP", "10.96.0.3", 53)
    assert persistent.spec == VirtualServerSpec("wrr", 300, frozenset())
    assert (persistent.netmask, persistent.one_packet) == ("255.255.255.0", True)
    six = table.find("TCP", "fd00:10:96::1", 80)
    assert six.spec == VirtualServerSpec("mh", 0, frozenset({"flag-2"}))
    assert six.real("fd00:10:244:1::10", 8080).forward == "Masq"
    assert [(entry.fwmark, entry.scheduler) for entry in table.fwmark_servers] == [(7, "lc")]
    assert len(table) == 5


def with_ipvs(body: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``body(ipvs)`` with a ready pyroute2 AsyncIPVS socket."""

    async def main() -> T:
        async with AsyncIPVS() as ipvs:
            # pyroute2 0.9.7: entering the context does not bind the generic netlink family; this does.
            await ipvs.setup_endpoint()
            return await body(ipvs)

    return asyncio.run(main())


def tcp_service(address: str = str(SERVICE_ADDRESS), **attributes: Any) -> Any:
    return IPVSService(addr=address, port=VIP_PORT, protocol=socket.IPPROTO_TCP, **attributes)


def masq_dest(address: str, weight: int = 1) -> Any:
    # fwd_method must always be given: pyroute2's default is 3 (direct routing), also on "set".
    return IPVSDest(addr=address, port=8080, weight=weight, fwd_method=FWD_MASQ)


async def _add_then_edit(ipvs: Any) -> None:
    await ipvs.service("add", service=tcp_service(sched_name="wrr"))
    await ipvs.dest("add", service=tcp_service(), dest=masq_dest("10.244.1.10", weight=3))
    await ipvs.dest("add", service=tcp_service(), dest=masq_dest("10.244.1.11"))
    await ipvs.dest("set", service=tcp_service(), dest=masq_dest("10.244.1.11", weight=0))
    # A "set" replaces every attribute: those not given fall back to pyroute2's defaults (wlc, no flags).
    persistent = {"flags": IP_VS_SVC_F_PERSISTENT, "mask": 0xFFFF}
    await ipvs.service("set", service=tcp_service(sched_name="rr", timeout=600, flags=persistent))


def test_pyroute2_async_ipvs_programs_what_ipvsadm_shows() -> None:
    with_ipvs(_add_then_edit)

    entry = netlab.read_ipvs().get(VirtualServerKey(L4Protocol.TCP, SERVICE_ADDRESS, VIP_PORT))

    assert entry.spec == VirtualServerSpec("rr", 600, frozenset())
    assert entry.weights == {
        RealServerKey(IPv4Address("10.244.1.10"), 8080): 3,
        RealServerKey(IPv4Address("10.244.1.11"), 8080): 0,
    }
    assert {real.forward for real in entry.real_servers} == {"Masq"}


async def _errno_of(operation: Awaitable[Any]) -> int:
    try:
        await operation
    except NetlinkError as error:
        return int(error.code)
    return 0


async def _errors(ipvs: Any) -> dict[str, int]:
    await ipvs.service("add", service=tcp_service(sched_name="rr"))
    await ipvs.dest("add", service=tcp_service(), dest=masq_dest("10.244.1.10"))
    present, missing = tcp_service(sched_name="rr"), tcp_service(address="10.96.9.9", sched_name="rr")
    return {
        "add existing service": await _errno_of(ipvs.service("add", service=present)),
        "add existing real server": await _errno_of(
            ipvs.dest("add", service=present, dest=masq_dest("10.244.1.10"))
        ),
        "set missing real server": await _errno_of(
            ipvs.dest("set", service=present, dest=masq_dest("10.244.1.99"))
        ),
        "delete missing real server": await _errno_of(
            ipvs.dest("del", service=present, dest=masq_dest("10.244.1.99"))
        ),
        "real server of missing service": await _errno_of(
            ipvs.dest("add", service=missing, dest=masq_dest("10.244.1.10"))
        ),
        "set missing service": await _errno_of(ipvs.service("set", service=missing)),
        "delete missing service": await _errno_of(ipvs.service("del", service=missing)),
        "unknown scheduler": await _errno_of(
            ipvs.service("add", service=tcp_service(address="10.96.0.11", sched_name="nosuch"))
        ),
    }


def test_pyroute2_errors_carry_the_kernels_errno() -> None:
    errors = with_ipvs(_errors)

    # ESRCH, not ENOENT, for a missing virtual server.
    assert errors == {
        "add existing service": errno.EEXIST,
        "add existing real server": errno.EEXIST,
        "set missing real server": errno.ENOENT,
        "delete missing real server": errno.ENOENT,
        "real server of missing service": errno.ESRCH,
        "set missing service": errno.ESRCH,
        "delete missing service": errno.ESRCH,
        "unknown scheduler": errno.ENOENT,
    }


async def _ipv6_without_then_with_netmask(ipvs: Any) -> int:
    address = str(netlab.SERVICE_ADDRESS6)
    without = await _errno_of(ipvs.service("add", service=tcp_service(address=address, sched_name="rr")))
    service = tcp_service(address=address, sched_name="rr", netmask=IPV6_NETMASK)
    await ipvs.service("add", service=service)
    await ipvs.dest("add", service=service, dest=masq_dest("fd00:10:244::1:10"))
    return without


def test_pyroute2_ipv6_virtual_server_needs_netmask_128() -> None:
    without_netmask = with_ipvs(_ipv6_without_then_with_netmask)

    entry = netlab.read_ipvs().find("TCP", netlab.SERVICE_ADDRESS6, VIP_PORT)
    assert without_netmask == errno.EINVAL
    assert entry.weights == {RealServerKey(ip_address("fd00:10:244::1:10"), 8080): 1}


async def _update_real_server_then_service(ipvs: Any) -> netlab.IPVSTable:
    await ipvs.service("add", service=tcp_service(sched_name="rr"))
    await ipvs.dest("add", service=tcp_service(), dest=masq_dest("10.244.1.10"))
    await ipvs.dest("add", service=tcp_service(), dest=masq_dest("10.244.1.11"))
    await ipvs.dest("update", service=tcp_service(), dest=masq_dest("10.244.1.10", weight=5))
    after_real_server_update = netlab.read_ipvs()
    await ipvs.service("update", service=tcp_service(sched_name="wrr"))
    return after_real_server_update


def test_pyroute2_update_command_deletes() -> None:
    """pyroute2 0.9.7 maps "update" to IPVS_CMD_DEL_*: edits must use "set"."""
    after_real_server_update = with_ipvs(_update_real_server_then_service)

    key = VirtualServerKey(L4Protocol.TCP, SERVICE_ADDRESS, VIP_PORT)
    assert after_real_server_update.get(key).weights == {RealServerKey(IPv4Address("10.244.1.11"), 8080): 1}
    assert len(netlab.read_ipvs()) == 0


def _masquerading_service(protocol: str, pods: list[Namespace], version: int = 4) -> tuple[str, str]:
    """A NAT virtual server on a virtual IP bound to kube-ipvs0 with the pods as real servers.

    Returns ipvsadm's name for it: (address:port, -t or -u).
    """
    vip = SERVICE_ADDRESS if version == 4 else netlab.SERVICE_ADDRESS6
    netlab.bind_service_address(vip)
    flag = "-t" if protocol == "tcp" else "-u"
    target = netlab.endpoint_text(vip, VIP_PORT)
    netlab.ipvsadm("-A", flag, target, "-s", "rr")
    for pod in pods:
        address = pod.address if version == 4 else pod.address6
        netlab.ipvsadm("-a", flag, target, "-r", netlab.endpoint_text(address, netlab.ECHO_PORT), "-m")
    return target, flag


@pytest.mark.parametrize(
    ("protocol", "version"),
    [
        pytest.param("tcp", 4, id="tcp-ipv4"),
        pytest.param("udp", 4, id="udp-ipv4"),
        pytest.param("tcp", 6, id="tcp-ipv6"),
    ],
)
def test_client_sees_every_pod_round_robin_with_its_source_kept(
    lab: Lab, protocol: str, version: int
) -> None:
    pods = [lab.add_pod("pod-a"), lab.add_pod("pod-b")]
    client = lab.add_client()
    _masquerading_service(protocol, pods, version)
    vip = SERVICE_ADDRESS if version == 4 else netlab.SERVICE_ADDRESS6
    request = netlab.tcp_replies if protocol == "tcp" else netlab.udp_replies

    replies = request(vip, VIP_PORT, 6, netns=client.netns)

    assert netlab.backends(replies) == {"pod-a": 3, "pod-b": 3}
    assert {reply.source for reply in replies} == {client.address if version == 4 else client.address6}


def test_node_itself_reaches_the_virtual_ip(lab: Lab) -> None:
    pod = lab.add_pod("pod-a")
    _masquerading_service("tcp", [pod])

    reply = netlab.tcp_request(SERVICE_ADDRESS, VIP_PORT)

    assert reply == netlab.Reply("pod-a", SERVICE_ADDRESS)
    assert netlab.device_addresses() == {SERVICE_ADDRESS}


def test_hairpin_works_only_with_the_masquerade_rule(lab: Lab) -> None:
    pod = lab.add_pod("pod-a")
    _masquerading_service("tcp", [pod])
    with pytest.raises(netlab.NoReply):
        netlab.tcp_request(SERVICE_ADDRESS, VIP_PORT, netns=pod.netns, timeout=1.0)

    netlab.write_sysctl("net/ipv4/vs/conntrack", "1")
    netlab.run(
        "iptables", "-t", "nat", "-A", "POSTROUTING", "-m", "ipvs", "--vaddr", f"{SERVICE_ADDRESS}/32",
        "--vport", str(VIP_PORT), "-j", "MASQUERADE",
    )  # fmt: skip
    reply = netlab.tcp_request(SERVICE_ADDRESS, VIP_PORT, netns=pod.netns)

    assert reply == netlab.Reply("pod-a", netlab.POD_GATEWAY)


def _stats_once_counted(connections: int) -> netlab.VirtualServerStats | None:
    stats = netlab.read_ipvs_stats()[VirtualServerKey(L4Protocol.TCP, SERVICE_ADDRESS, VIP_PORT)]
    return stats if stats.total.connections == connections else None


def test_held_connection_keeps_its_pod_after_weight_zero(lab: Lab) -> None:
    pods = [lab.add_pod("pod-a"), lab.add_pod("pod-b")]
    client = lab.add_client()
    target, flag = _masquerading_service("tcp", pods)

    with netlab.hold(SERVICE_ADDRESS, VIP_PORT, netns=client.netns) as held:
        drained, other = sorted(pods, key=lambda pod: pod.name != held.backend)
        real = netlab.endpoint_text(drained.address, netlab.ECHO_PORT)
        netlab.ipvsadm("-e", flag, target, "-r", real, "-m", "-w", "0")
        fresh = netlab.tcp_replies(SERVICE_ADDRESS, VIP_PORT, 3, netns=client.netns)
        still = held.exchange()
        entry = (
            netlab.read_ipvs().find("TCP", SERVICE_ADDRESS, VIP_PORT).real(drained.address, netlab.ECHO_PORT)
        )
        established = [c for c in netlab.read_ipvs_connections() if c.state == "ESTABLISHED"]
        stats = netlab.wait_until(lambda: _stats_once_counted(4), what="IPVS counting 4 connections")

    assert netlab.backends(fresh) == {other.name: 3}
    assert still.backend == drained.name
    assert (entry.weight, entry.active) == (0, 1)
    assert [(c.source[0], c.destination) for c in established] == [(client.address, (drained.address, 8080))]
    assert stats.real_servers[RealServerKey(drained.address, 8080)].connections == 1


def test_reset_node_removes_what_a_test_leaves(node_baseline: netlab.NodeBaseline) -> None:
    lab = netlab.Lab()
    try:
        pod = lab.add_pod("pod-a")
        _masquerading_service("udp", [pod])
        netlab.udp_request(SERVICE_ADDRESS, VIP_PORT)  # leaves a conntrack entry
        netlab.run("iptables", "-t", "nat", "-N", "LEFTOVER")
        netlab.write_sysctl("net/ipv4/vs/expire_nodest_conn", "1")

        netlab.reset_node(node_baseline)  # before the lab is closed: it must cope on its own

        ipvs = netlab.read_ipvs()
        links = {
            name
            for name in (netlab.DUMMY_DEVICE, pod.host_interface)
            if Path("/sys/class/net", name).exists()
        }
        namespaces = list(netlab.NETNS_DIR.iterdir())
        nat = netlab.run("iptables-save", "-t", "nat")
    finally:
        lab.close()  # by now it has only its echo-server thread to stop

    assert len(ipvs) == 0
    assert links == set()
    assert namespaces == []
    assert "LEFTOVER" not in nat
    assert netlab.read_sysctl("net/ipv4/vs/expire_nodest_conn") == "0"
    assert netlab.read_sysctl("net/netfilter/nf_conntrack_count") == "0"
