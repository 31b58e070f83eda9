"""The netlink helpers every family shares: acknowledgements and errors mapped back to their requests.

The splitting of replies into messages and attributes (``parse_messages``, ``parse_attributes``) is tested
with IPVS replies in test_ipvs_wire.py and address replies in test_rtnl_wire.py.
"""

from __future__ import annotations

import struct

from aproxy.backends import netlink_wire

REQUEST_TYPE = 0x1D  # any family's message type: the error answers the request whatever it was


def test_parse_acks_maps_each_error_to_its_sequence_number() -> None:
    def error_message(seq: int, errno: int) -> bytes:
        # NLMSG_ERROR: header, negative errno, then the header of the request it answers.
        payload = struct.pack("=i", -errno) + struct.pack("=IHHII", 16, REQUEST_TYPE, 1, seq, 0)
        return struct.pack("=IHHII", 16 + len(payload), 2, 0, seq, 0) + payload

    done = struct.pack("=IHHII", 20, 3, 0, 9, 0) + b"\0\0\0\0"
    data = error_message(7, 17) + done + error_message(8, 2) + error_message(9, 0)
    assert list(netlink_wire.parse_acks(data)) == [
        netlink_wire.Ack(seq=7, error=17),
        netlink_wire.Ack(seq=8, error=2),
        netlink_wire.Ack(seq=9, error=0),
    ]


def test_parse_acks_stops_at_a_corrupt_header() -> None:
    assert list(netlink_wire.parse_acks(struct.pack("=IHHII", 3, 2, 0, 1, 0) + b"\0" * 8)) == []
