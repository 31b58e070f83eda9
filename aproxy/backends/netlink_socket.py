"""Raw netlink sockets set up for batched requests: what the IPVS and the ipset sockets both need."""

from __future__ import annotations

import socket
from typing import Final

SOL_NETLINK: Final = 270
NETLINK_NETFILTER: Final = 12  # not in typeshed's socket module
NETLINK_GENERIC: Final = 16
NETLINK_CAP_ACK: Final = 10
# Enough for every message of a batch to fail without the kernel dropping an error (ENOBUFS).
SOCKET_BUFFER: Final = 16 * 1024 * 1024
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33


def open_netlink_socket(protocol: int) -> socket.socket:
    """A non-blocking, bound netlink socket of ``protocol`` with 16 MiB buffers (forced when privileged)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.setblocking(False)
        # Errors then carry only the header of the failing request, not its whole payload.
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        for option, forced in ((socket.SO_RCVBUF, _SO_RCVBUFFORCE), (socket.SO_SNDBUF, _SO_SNDBUFFORCE)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
            except PermissionError:  # without CAP_NET_ADMIN: capped by net.core.{r,w}mem_max
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock
