"""IPVS_CMD_SET_CONFIG as ``ipvsadm --set`` sends it: only the timeouts given, whole seconds."""

from __future__ import annotations

import struct

import pytest

from aproxy.backends import ipvs_wire
from aproxy.backends.ipvs_wire import IPVSTimeouts


def attributes(request: bytes) -> dict[int, int]:
    """The u32 attributes after the netlink (16 bytes) and generic netlink (4 bytes) headers."""
    length, _kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", request)
    assert length == len(request)
    command, _version, _reserved = struct.unpack_from("=BBH", request, 16)
    assert command == ipvs_wire.CMD_SET_CONFIG
    found: dict[int, int] = {}
    offset = 20
    while offset < length:
        size, kind = struct.unpack_from("=HH", request, offset)
        assert size == 8
        (found[kind],) = struct.unpack_from("=I", request, offset + 4)
        offset += 8
    return found


def test_all_three_timeouts() -> None:
    request = ipvs_wire.set_timeouts_request(30, 7, IPVSTimeouts(900, 120, 300), ack=True)
    assert attributes(request) == {
        ipvs_wire.ATTR_TIMEOUT_TCP: 900,
        ipvs_wire.ATTR_TIMEOUT_TCP_FIN: 120,
        ipvs_wire.ATTR_TIMEOUT_UDP: 300,
    }


def test_zero_means_unchanged_and_is_not_sent_fractions_round_up() -> None:
    request = ipvs_wire.set_timeouts_request(30, 7, IPVSTimeouts(udp=0.5), ack=True)
    assert attributes(request) == {ipvs_wire.ATTR_TIMEOUT_UDP: 1}
    assert IPVSTimeouts().unchanged and not IPVSTimeouts(tcp=1).unchanged


@pytest.mark.parametrize("seconds", [-1.0, ipvs_wire.MAX_TIMEOUT_SECONDS + 1])
def test_out_of_range(seconds: float) -> None:
    with pytest.raises(ValueError, match=r"IPVS tcp timeout .* out of range"):
        IPVSTimeouts(tcp=seconds)
