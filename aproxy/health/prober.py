"""One TCP health check: a non-blocking connect on the running loop, closed with an RST.

Success is a completed handshake; failure is a refusal (RST to the SYN), a reset, an unreachable network or
host, or no answer within the timeout. Each check is a socket, a writer callback and a timer handle on the
event loop: no task, no future, no stream objects. Measured on loopback (docs/benchmarks.md, bench/health.py)
this is not yet cheaper than ``asyncio.open_connection`` plus a close: about 90 us of CPU per check, most of
it the kernel's handshake inside ``connect()``; the issue's CPU and lateness targets are missed.

Every probe socket has ``SO_LINGER`` on with a zero timeout, so ``close()`` aborts the connection with an RST
instead of the FIN handshake: the node keeps no TIME_WAIT socket per check (HAProxy closes its checks the
same way), and thousands of checks a second exhaust neither ephemeral ports nor memory.

An error that is the node's own (out of file descriptors, buffers or ephemeral ports) is reported as
``error``: it says nothing about the backend, and the checker does not count it against it.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections.abc import Callable
from typing import Final

from aproxy.core.verdicts import CheckTarget

# struct linger {int l_onoff; int l_linger;}: on, 0 s = close() sends an RST and frees the socket at once.
_LINGER_RST: Final = struct.pack("ii", 1, 0)

OK: Final = "ok"
REFUSED: Final = "refused"
RESET: Final = "reset"
UNREACHABLE: Final = "unreachable"
TIMEOUT: Final = "timeout"
ERROR: Final = "error"  # the node's own trouble: not the backend's fault, not counted against it
FAILED: Final = "failed"  # any other answer from the network
RESULTS: Final = (OK, REFUSED, RESET, UNREACHABLE, TIMEOUT, FAILED, ERROR)

_BY_ERRNO: Final = {
    errno.ECONNREFUSED: REFUSED,
    errno.ECONNRESET: RESET,
    errno.ECONNABORTED: RESET,
    errno.EHOSTUNREACH: UNREACHABLE,
    errno.ENETUNREACH: UNREACHABLE,
    errno.EHOSTDOWN: UNREACHABLE,
    errno.ENETDOWN: UNREACHABLE,
    errno.ETIMEDOUT: TIMEOUT,
    errno.EMFILE: ERROR,
    errno.ENFILE: ERROR,
    errno.ENOBUFS: ERROR,
    errno.ENOMEM: ERROR,
    errno.EADDRNOTAVAIL: ERROR,  # no ephemeral port left
    errno.EAGAIN: ERROR,
}

# (target, result, seconds from connect to answer)
Done = Callable[[CheckTarget, str, float], None]


def classify(code: int) -> str:
    """The result of a connect that ended with ``code`` (0: success)."""
    return OK if code == 0 else _BY_ERRNO.get(code, FAILED)


class _Probe:
    __slots__ = ("began", "done", "sock", "target", "timer")

    def __init__(self, target: CheckTarget, sock: socket.socket, began: float, done: Done) -> None:
        self.target = target
        self.sock = sock
        self.began = began
        self.done = done
        self.timer: asyncio.TimerHandle | None = None


class Prober:
    """Starts checks on the running loop; each ends in exactly one ``done`` call, within ``timeout``."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._inflight: dict[int, _Probe] = {}

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def start(self, target: CheckTarget, sockaddr: tuple[str, int], done: Done) -> None:
        """Connect to ``sockaddr`` (``target``'s address and port, as text and number)."""
        began = time.perf_counter()
        family = socket.AF_INET6 if target.address.version == 6 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            done(target, ERROR if exc.errno in _BY_ERRNO else FAILED, 0.0)
            return
        probe = _Probe(target, sock, began, done)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            code = sock.connect_ex(sockaddr)
        except OSError as exc:
            code = exc.errno or errno.EINVAL
        if code != errno.EINPROGRESS:
            self._finish(probe, classify(code))
            return
        fd = sock.fileno()
        self._inflight[fd] = probe
        self._loop.add_writer(fd, self._writable, fd)
        probe.timer = self._loop.call_later(self._timeout, self._expired, fd)

    def close(self) -> None:
        """Abort every check in flight (the daemon is stopping); their ``done`` is not called."""
        for fd, probe in list(self._inflight.items()):
            self._release(fd, probe)

    def _writable(self, fd: int) -> None:
        probe = self._inflight.get(fd)
        if probe is None:
            return
        code = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._release(fd, probe)
        self._report(probe, classify(code))

    def _expired(self, fd: int) -> None:
        probe = self._inflight.get(fd)
        if probe is None:
            return
        probe.timer = None
        self._release(fd, probe)
        self._report(probe, TIMEOUT)

    def _release(self, fd: int, probe: _Probe) -> None:
        del self._inflight[fd]
        self._loop.remove_writer(fd)
        if probe.timer is not None:
            probe.timer.cancel()
        probe.sock.close()  # SO_LINGER 0: an RST, no TIME_WAIT

    def _finish(self, probe: _Probe, result: str) -> None:
        probe.sock.close()
        self._report(probe, result)

    @staticmethod
    def _report(probe: _Probe, result: str) -> None:
        probe.done(probe.target, result, time.perf_counter() - probe.began)
