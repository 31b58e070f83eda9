"""What every netlink family shares on the wire: the message and attribute headers, and packing one attribute.

The IPVS (generic netlink), ipset (nfnetlink) and address (rtnetlink) modules build their requests from these;
each adds only its own family header and attribute numbers.
"""

from __future__ import annotations

import struct
from typing import Final

# struct nlmsghdr: length, type, flags, sequence number, port id (host order).
NLMSGHDR: Final = struct.Struct("=IHHII")
# struct nlattr: length, type (host order); the payload follows, padded to 4 bytes.
NLAHDR: Final = struct.Struct("=HH")


def attribute(kind: int, payload: bytes) -> bytes:
    """One attribute: its header, ``payload``, and the padding to the next 4-byte boundary."""
    length = NLAHDR.size + len(payload)
    return NLAHDR.pack(length, kind) + payload + b"\0" * (-length % 4)
