"""One TCP health check: a non-blocking connect on the running loop, closed with an RST.

Success is a completed handshake; failure is a refusal (RST to the SYN), a reset, an unreachable network or
host, or no answer within the timeout.

What a check costs is what bench/health.py measures (docs/benchmarks.md), so each one is kept to its system
calls and a few dictionary operations: no task, no future, no stream objects, and nothing per check on the
event loop itself.

- The sockets are ``_socket.socket``, the C type under ``socket.socket``: its Python wrapper's constructor
  and ``close()`` are a few microseconds a check that nothing here uses.
- A connect whose handshake is already done when ``connect()`` returns (on loopback and to a pod on this node
  the kernel runs the whole handshake inside the call) is judged at once from ``TCP_INFO``: no readiness wait.
- The others wait in one ``epoll`` set of the prober's own, which the loop watches as a single reader: one
  ``epoll_wait`` collects every connect that finished since the last wake-up (a per-socket ``add_writer``
  costs a loop handle and two ``epoll_ctl`` calls per check). Closing a socket drops it from the set.
- Timeouts: every check has the same timeout, so deadlines come in start order: a FIFO and one timer for its
  head replace a timer handle per check.

Every probe socket has ``SO_LINGER`` on with a zero timeout, so ``close()`` aborts the connection with an RST
instead of the FIN handshake: the node keeps no TIME_WAIT socket per check (HAProxy closes its checks the
same way), and thousands of checks a second exhaust neither ephemeral ports nor memory.

An error that is the node's own (out of file descriptors, buffers or ephemeral ports) is reported as
``error``: it says nothing about the backend, and the checker does not count it against it.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import errno
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

# struct linger {int l_onoff; int l_linger;}: on, 0 s = close() sends an RST and frees the socket at once.
_LINGER_RST: Final = struct.pack("ii", 1, 0)
# The first byte of struct tcp_info is the connection's state (include/net/tcp_states.h).
_STREAM_NONBLOCK: Final = int(socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
_TCP_CLOSE: Final = 7
# Handshake done: ESTABLISHED, or CLOSE_WAIT when the backend has already accepted and closed (a check of a
# backend on this node that closes at once sees that state about as often as ESTABLISHED).
_CONNECTED: Final = frozenset({1, 8})

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

# What the caller names a check by (the checker: its schedule entry; the one-shot judge: the target).
K = TypeVar("K")


def classify(code: int) -> str:
    """The result of a connect that ended with ``code`` (0: success)."""
    return OK if code == 0 else _BY_ERRNO.get(code, FAILED)


class _Probe(Generic[K]):
    __slots__ = ("began", "deadline", "done", "key", "sock")

    def __init__(
        self, key: K, sock: _socket.socket, began: float, done: Callable[[K, str, float], None]
    ) -> None:
        self.key = key
        self.sock = sock
        self.began = began
        self.done = done
        self.deadline = 0.0


class Prober(Generic[K]):
    """Starts checks on the running loop; each ends in exactly one ``done(key, result, seconds)`` call,
    within ``timeout`` (seconds: from the connect to the answer).

    ``done`` may be called from inside ``start`` (a connect that was answered at once). ``close()`` when the
    prober is no longer used: it holds an epoll descriptor.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._epoll: select.epoll | None = None
        self._inflight: dict[int, _Probe[K]] = {}  # waiting for the handshake, by descriptor
        self._deadlines: collections.deque[_Probe[K]] = collections.deque()  # in start order = deadline order
        self._timer: asyncio.TimerHandle | None = None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def start(self, key: K, sockaddr: tuple[str, int], done: Callable[[K, str, float], None]) -> None:
        """Connect to ``sockaddr`` (an address as text and a port)."""
        began = time.perf_counter()
        family = socket.AF_INET6 if ":" in sockaddr[0] else socket.AF_INET
        try:
            sock = _socket.socket(family, _STREAM_NONBLOCK)
        except OSError as exc:
            done(key, ERROR if exc.errno in _BY_ERRNO else FAILED, 0.0)
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            code = sock.connect_ex(sockaddr)
            if code == errno.EINPROGRESS:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                if state in _CONNECTED:
                    code = 0
                elif state == _TCP_CLOSE:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
                else:
                    self._wait(_Probe(key, sock, began, done))
                    return
        except OSError as exc:
            code = exc.errno or errno.EINVAL
        sock.close()  # SO_LINGER 0: an RST, no TIME_WAIT
        done(key, classify(code), time.perf_counter() - began)

    def close(self) -> None:
        """Abort every check in flight (the daemon is stopping); their ``done`` is not called."""
        for probe in self._inflight.values():
            probe.sock.close()
        self._inflight.clear()
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _wait(self, probe: _Probe[K]) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop.add_reader(self._epoll.fileno(), self._ready)
        fd = probe.sock.fileno()
        self._epoll.register(fd, select.EPOLLOUT)
        self._inflight[fd] = probe
        probe.deadline = self._loop.time() + self._timeout
        self._deadlines.append(probe)
        if self._timer is None:
            self._timer = self._loop.call_at(probe.deadline, self._expire)

    def _ready(self) -> None:
        """The epoll set has finished connects: judge each by ``SO_ERROR``."""
        assert self._epoll is not None
        for fd, _events in self._epoll.poll(0):  # EPOLLOUT: connected; EPOLLERR/HUP: failed
            probe = self._inflight.pop(fd, None)
            if probe is None:
                continue  # aborted by close() while its event was pending
            code = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._end(probe, classify(code))

    def _expire(self) -> None:
        """The oldest checks reached their deadline: those still waiting are timeouts."""
        self._timer = None
        deadlines, now = self._deadlines, self._loop.time()
        while deadlines and deadlines[0].deadline <= now:
            probe = deadlines.popleft()
            if self._inflight.get(probe.sock.fileno()) is probe:
                del self._inflight[probe.sock.fileno()]
                self._end(probe, TIMEOUT)
        # Probes that ended already (a closed socket's fileno() is -1) are dropped as they reach the head.
        while deadlines and deadlines[0].sock.fileno() == -1:
            deadlines.popleft()
        if deadlines:
            self._timer = self._loop.call_at(deadlines[0].deadline, self._expire)

    @staticmethod
    def _end(probe: _Probe[K], result: str) -> None:
        probe.sock.close()  # SO_LINGER 0: an RST, no TIME_WAIT; it leaves the epoll set with its descriptor
        probe.done(probe.key, result, time.perf_counter() - probe.began)
