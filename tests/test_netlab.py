"""The kernel tier's reading of ``ipvsadm -Ln``, checked on the host: its assertions rest on it."""

from __future__ import annotations

from ipaddress import ip_address

from tests.kernel import netlab

LISTING = """\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.10:80 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.1.3:8080              Masq    0      2          1
UDP  [fd00::a]:53 wlc persistent 60
FWM  7 lc
  -> 10.244.1.9:0                 Masq    1      0          0
FWM  8 IPv6 sh
"""


def test_virtual_servers_and_their_real_servers_are_read() -> None:
    table = netlab.parse_ipvs(LISTING)

    tcp, udp = table.virtual_servers
    assert (tcp.protocol.value, tcp.address, tcp.port, tcp.scheduler) == (
        "TCP",
        ip_address("10.96.0.10"),
        80,
        "rr",
    )
    assert [(r.address, r.port, r.weight, r.active, r.inactive) for r in tcp.real_servers] == [
        (ip_address("10.244.1.2"), 8080, 1, 0, 0),
        (ip_address("10.244.1.3"), 8080, 0, 2, 1),
    ]
    assert (udp.address, udp.port, udp.scheduler, udp.persistence_timeout, udp.real_servers) == (
        ip_address("fd00::a"),
        53,
        "wlc",
        60,
        (),
    )


def test_firewall_mark_lines_name_their_scheduler_after_the_ipv6_family() -> None:
    table = netlab.parse_ipvs(LISTING)

    assert [(entry.fwmark, entry.scheduler, len(entry.real_servers)) for entry in table.fwmark_servers] == [
        (7, "lc", 1),
        (8, "sh", 0),
    ]
