"""One TCP health check: a non-blocking connect on the running loop, ended with an RST.

Success is a completed handshake; failure is a refusal (RST to the SYN), a reset, an unreachable network or
host, or no answer within the timeout.

What a check costs is what bench/health.py measures (docs/benchmarks.md), so each one is kept to its system
calls and a few dictionary operations: no task, no future, no stream objects, and nothing per check on the
event loop itself.

- The sockets are ``_socket.socket``, the C type under ``socket.socket``: its Python wrapper's constructor
  and ``close()`` are a few microseconds a check that nothing here uses.
- Sockets are reused, not opened and closed per check: after its check a socket is disconnected with
  ``connect()`` to an AF_UNSPEC address (the kernel's ``tcp_disconnect``: an RST if it had connected, its
  ephemeral port released; a refused one must be disconnected too, or its next connect fails with
  ECONNABORTED) and kept, up to ``IDLE_CAP`` per address family. A check then costs connect, ``TCP_INFO``
  and the disconnect, instead of socket, ``SO_LINGER``, connect, ``TCP_INFO`` and close: about a quarter
  less CPU (docs/benchmarks.md). Python's ``socket.connect`` takes no AF_UNSPEC address on an AF_INET
  socket, so the disconnect is libc's ``connect`` through ctypes; where that is not Linux's, a socket per
  check, as with ``reuse=False``.
- A connect whose handshake is already done when ``connect()`` returns (on loopback and to a pod on this node
  the kernel runs the whole handshake inside the call) is judged at once from ``TCP_INFO``: no readiness wait.
- The others wait in one ``epoll`` set of the prober's own, which the loop watches as a single reader: one
  ``epoll_wait`` collects every connect that finished since the last wake-up (a per-socket ``add_writer``
  costs a loop handle and two ``epoll_ctl`` calls per check). A socket joins the set at its first wait and
  stays while it is kept; it is armed with EPOLLONESHOT, so its event disarms it (a disconnected socket
  would report EPOLLHUP for as long as it is armed, and the loop would spin), and its next wait re-arms it:
  one ``epoll_ctl`` a wait, where registering and unregistering would be two.
- A check that times out closes its socket instead of keeping it: its answer may still come, and must not
  judge a later check on the same descriptor.
- Timeouts: every check has the same timeout, so deadlines come in start order: a FIFO and one timer for its
  head replace a timer handle per check.

Every probe socket also has ``SO_LINGER`` on with a zero timeout, so a ``close()`` of a connected one aborts
the connection with an RST instead of the FIN handshake. Either way the node keeps no TIME_WAIT socket per
check (HAProxy ends its checks with an RST too), and thousands of checks a second exhaust neither ephemeral
ports nor memory.

An error that is the node's own (out of file descriptors, buffers or ephemeral ports) is reported as
``error``: it says nothing about the backend, and the checker does not count it against it.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import ctypes
import errno
import select
import socket
import struct
import sys
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
# A waiting probe's events, armed once per wait: a pooled socket stays in the epoll set, and an unconnected
# TCP socket reports EPOLLHUP for as long as it is armed (level-triggered: the loop would spin).
_WAIT_EVENTS: Final = select.EPOLLOUT | select.EPOLLONESHOT
# Idle sockets kept per address family: a check judged inside start() needs one; those waiting in epoll
# one each, so a burst of slow answers leaves more behind than the next one reuses (and each holds a
# descriptor).
IDLE_CAP: Final = 64
# A struct sockaddr of family AF_UNSPEC (0): connect() to it disconnects a TCP socket (tcp_disconnect).
_SOCKADDR_UNSPEC: Final = bytes(16)


def _libc_connect() -> Callable[[int, bytes, int], int] | None:
    """libc's ``connect()``, which takes the AF_UNSPEC address that ``socket.connect`` refuses; None where it
    does not disconnect a TCP socket (not Linux) or cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        connect: Callable[[int, bytes, int], int] = ctypes.CDLL(None).connect
    except (OSError, AttributeError):
        return None
    # No argtypes: ctypes passes an int and a bytes object as int and char* itself, 0.4 us a call cheaper.
    return connect


_DISCONNECT: Final = _libc_connect()

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
    prober is no longer used: it holds an epoll descriptor and idle sockets. ``reuse=False`` (or a platform
    where a socket cannot be disconnected): a new socket per check.
    """

    def __init__(self, timeout: float, *, reuse: bool = True) -> None:
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._epoll: select.epoll | None = None
        self._inflight: dict[int, _Probe[K]] = {}  # waiting for the handshake, by descriptor
        self._deadlines: collections.deque[_Probe[K]] = collections.deque()  # in start order = deadline order
        self._timer: asyncio.TimerHandle | None = None
        self._disconnect = _DISCONNECT if reuse else None
        # Disconnected sockets, by family; each one the epoll set may hold (disarmed) is in _registered.
        self._idle: dict[int, list[_socket.socket]] = {socket.AF_INET: [], socket.AF_INET6: []}
        self._registered: set[int] = set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def idle(self) -> int:
        """Sockets kept for the next checks."""
        return sum(map(len, self._idle.values()))

    def start(self, key: K, sockaddr: tuple[str, int], done: Callable[[K, str, float], None]) -> None:
        """Connect to ``sockaddr`` (an address as text and a port)."""
        began = time.perf_counter()
        family = socket.AF_INET6 if ":" in sockaddr[0] else socket.AF_INET
        idle = self._idle[family]
        try:
            sock = idle.pop() if idle else self._new_socket(family)
        except OSError as exc:
            done(key, ERROR if exc.errno in _BY_ERRNO else FAILED, 0.0)
            return
        try:
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
        self._release(sock, idle)
        done(key, classify(code), time.perf_counter() - began)

    def close(self) -> None:
        """Abort every check in flight (the daemon is stopping); their ``done`` is not called."""
        for probe in self._inflight.values():
            probe.sock.close()
        for idle in self._idle.values():
            for sock in idle:
                sock.close()
            idle.clear()
        self._registered.clear()
        self._inflight.clear()
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    @staticmethod
    def _new_socket(family: int) -> _socket.socket:
        sock = _socket.socket(family, _STREAM_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        return sock

    def _release(self, sock: _socket.socket, idle: list[_socket.socket]) -> None:
        """A judged check's socket: disconnected (an RST if it connected: no TIME_WAIT) and kept, or closed
        (an RST too, through SO_LINGER 0)."""
        disconnect = self._disconnect
        if (
            disconnect is not None
            and len(idle) < IDLE_CAP
            and disconnect(sock.fileno(), _SOCKADDR_UNSPEC, 16) == 0
        ):
            idle.append(sock)
        else:
            self._registered.discard(sock.fileno())  # closing drops it from the epoll set
            sock.close()

    def _wait(self, probe: _Probe[K]) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop.add_reader(self._epoll.fileno(), self._ready)
        fd = probe.sock.fileno()
        if fd in self._registered:
            self._epoll.modify(fd, _WAIT_EVENTS)  # a pooled socket, disarmed since its last wait: re-armed
        else:
            self._epoll.register(fd, _WAIT_EVENTS)
            self._registered.add(fd)
        self._inflight[fd] = probe
        probe.deadline = self._loop.time() + self._timeout
        self._deadlines.append(probe)
        if self._timer is None:
            self._timer = self._loop.call_at(probe.deadline, self._expire)

    def _ready(self) -> None:
        """The epoll set has finished connects: judge each by ``SO_ERROR``. (Each event disarmed its socket:
        a pooled one reports nothing until its next wait re-arms it.)"""
        assert self._epoll is not None
        for fd, _events in self._epoll.poll(0):  # EPOLLOUT: connected; EPOLLERR/HUP: failed
            probe = self._inflight.pop(fd, None)
            if probe is None:
                continue  # aborted by close() while its event was pending
            sock = probe.sock
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._release(sock, self._idle[sock.family])
            probe.done(probe.key, classify(code), time.perf_counter() - probe.began)

    def _expire(self) -> None:
        """The oldest checks reached their deadline: those still waiting are timeouts. Their sockets are
        closed, never kept: an answer still on its way must not judge a later check on the same socket."""
        self._timer = None
        deadlines, inflight, now = self._deadlines, self._inflight, self._loop.time()
        while deadlines and deadlines[0].deadline <= now:
            probe = deadlines.popleft()
            fd = probe.sock.fileno()
            if inflight.get(fd) is probe:
                del inflight[fd]
                self._registered.discard(fd)
                probe.sock.close()  # SYN_SENT: nothing to abort; it leaves the epoll set with its descriptor
                probe.done(probe.key, TIMEOUT, time.perf_counter() - probe.began)
        # Probes that ended already (their socket closed, or kept and maybe waiting for another check) are
        # dropped as they reach the head.
        while deadlines and inflight.get(deadlines[0].sock.fileno()) is not deadlines[0]:
            deadlines.popleft()
        if deadlines:
            self._timer = self._loop.call_at(deadlines[0].deadline, self._expire)
