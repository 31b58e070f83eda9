"""Benchmark of the backend health checks (not a test): 10,000 backends on loopback, checked every 2 s.

    .venv/bin/python bench/health.py                 # 10,000 backends for 60 s
    .venv/bin/python bench/health.py --backends 2000 --seconds 10    # a smoke run

The backends are listening ports on 127.0.0.1 in a few processes (each accepts and closes, with epoll). The
checker is the daemon's (``HealthChecker``: prober, schedule, rate and concurrency limits, state machine,
the duration histogram it keeps) on uvloop, fed a ``HealthView`` holding one virtual server with every
backend. Prints, next to the targets of
issue 11: the checker process's CPU as a share of one core, the p99 lateness of checks against their schedule,
and the sockets in TIME_WAIT on the host (before, during, after: not growing). Then the CPU cost per check, of
the checker alone and with the accepting side, against ``asyncio.open_connection`` plus a close.
"""

from __future__ import annotations

import _socket
import argparse
import asyncio
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import resource
import selectors
import socket
import statistics
import struct
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aproxy.core import model
from aproxy.core.verdicts import HealthView
from aproxy.health.checker import HealthChecker
from aproxy.health.config import HealthCheckSettings

LOOPBACK = "127.0.0.1"
TARGET_CPU = 0.25  # share of one core
TARGET_P99_LATENESS = 0.100  # seconds
OPEN_CONNECTION_ROUNDS = 3000
BARE_ROUNDS = 20000


def serve(count: int, ports: multiprocessing.connection.Connection, stop: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    """A backend process: ``count`` listening ports, every connection accepted and closed."""
    selector = selectors.DefaultSelector()
    listeners = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        sock.listen(64)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        listeners.append(sock)
    ports.send([sock.getsockname()[1] for sock in listeners])
    while not stop.is_set():  # type: ignore[attr-defined]
        for key, _ in selector.select(timeout=0.2):
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            while True:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    break
                conn.close()


def time_wait() -> int:
    """Sockets in TIME_WAIT on the host."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            count += sum(1 for line in lines if line.split()[3] == "06")
    return count


class Samples:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float) -> None:
        self.values.append(amount)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def check_for(
    ports: list[int], seconds: float, interval: float
) -> tuple[HealthChecker, Samples, float, list[int]]:
    view = HealthView()
    virtual = model.VirtualServer(
        model.VirtualServerKey(model.L4Protocol.TCP, ip_address("10.96.0.1"), 80),
        model.VirtualServerSpec(),
        "bench/web",
        tuple(model.RealServer(ip_address(LOOPBACK), port) for port in ports),
    )
    key = model.ServiceKey("bench", "web")
    view.apply(key, None, model.ServiceState(key, (virtual,)))
    lateness = Samples()
    checker = HealthChecker(HealthCheckSettings(interval=interval), view, lambda _: None, lateness=lateness)
    waits = [time_wait()]
    began = cpu()
    task = asyncio.create_task(checker.run())
    reading = 0.0  # CPU of reading /proc/net/tcp (10,000 listeners' lines): the bench's, not the checker's
    for _ in range(int(seconds / 10)):
        await asyncio.sleep(10)
        before = cpu()
        waits.append(time_wait())
        reading += cpu() - before
    await asyncio.sleep(seconds % 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    spent = cpu() - began - reading
    waits.append(time_wait())
    return checker, lateness, spent, waits


def bare_cost(ports: list[int], *, reuse: bool) -> float:
    """CPU seconds of this process per check made of the system calls alone, in a plain loop: the floor under
    the checker on this machine, now (it moves with the machine's load by a quarter or more between runs),
    paced like the checker (a batch every 5 ms). With ``reuse``, the prober's: connect, TCP_INFO and a
    disconnect (libc's ``connect()`` to an AF_UNSPEC address) on one kept socket; without, a socket per
    check (socket, SO_LINGER, connect, TCP_INFO, close), as the prober did before it kept its sockets."""
    linger = struct.pack("ii", 1, 0)
    disconnect, unspec = ctypes.CDLL(None).connect, bytes(16)
    kept = _socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    began = cpu()
    for index in range(BARE_ROUNDS):
        sock = kept if reuse else _socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        if not reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.connect_ex((LOOPBACK, ports[index % len(ports)]))
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
        if reuse:
            disconnect(sock.fileno(), unspec, 16)
        else:
            sock.close()
        if index % 25 == 24:
            time.sleep(0.005)
    spent = cpu() - began
    kept.close()
    return spent / BARE_ROUNDS


async def open_connection_cost(ports: list[int]) -> float:
    """CPU seconds of this process per ``asyncio.open_connection`` plus close (the naive prober)."""
    began = cpu()
    for index in range(OPEN_CONNECTION_ROUNDS):
        _, writer = await asyncio.open_connection(LOOPBACK, ports[index % len(ports)])
        writer.close()
        await writer.wait_closed()
    return (cpu() - began) / OPEN_CONNECTION_ROUNDS


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stop = multiprocessing.Event()
    per_process = -(-args.backends // args.processes)
    workers, ports = [], []
    for index in range(args.processes):
        count = min(per_process, args.backends - index * per_process)
        receiver, sender = multiprocessing.Pipe(duplex=False)
        worker = multiprocessing.Process(target=serve, args=(count, sender, stop), daemon=True)
        worker.start()
        ports.extend(receiver.recv())
        workers.append(worker)

    accepting_before = children_cpu()
    print(
        f"aproxy health-check benchmark: {len(ports)} backends on loopback in {args.processes} processes, "
        f"every {args.interval:g} s for {args.seconds:g} s, Python {sys.version.split()[0]}, uvloop"
    )
    checker, lateness, spent, waits = uvloop.run(check_for(ports, args.seconds, args.interval))
    naive = uvloop.run(open_connection_cost(ports))
    bare = bare_cost(ports, reuse=True)
    bare_fresh = bare_cost(ports, reuse=False)
    stop.set()
    for worker in workers:
        worker.join(timeout=10)
    accepting = children_cpu() - accepting_before  # both phases: apportioned by check count below

    checks = sum(checker.stats.checks.values())
    share = spent / args.seconds
    values = sorted(lateness.values)
    p99 = values[int(len(values) * 0.99)] if values else float("nan")
    per_check = spent / checks
    accepting_per = accepting / (checks + OPEN_CONNECTION_ROUNDS + 2 * BARE_ROUNDS)
    expected = len(ports) / args.interval * args.seconds
    rows = [
        (f"checks run (expected ~{expected:,.0f})", f"{checks:,}", ""),
        ("results", ", ".join(f"{k}={v:,}" for k, v in sorted(checker.stats.checks.items())), ""),
        ("interval stretch ratio", f"{checker.stats.stretch_ratio:.2f}", ""),
        ("checker CPU, share of one core", f"{share:.1%}", _verdict(share, TARGET_CPU, "%")),
        (
            "lateness p50 / p99 / max (ms)",
            f"{statistics.median(values) * 1e3:.2f} / {p99 * 1e3:.2f} / {values[-1] * 1e3:.2f}",
            _verdict(p99, TARGET_P99_LATENESS, "s"),
        ),
        (
            "TIME_WAIT sockets every 10 s",
            " ".join(map(str, waits)),
            "not growing" if waits[-1] <= waits[0] + 10 else "GROWING",
        ),
        ("CPU per check, checker", f"{per_check * 1e6:.1f} µs", ""),
        ("CPU per check, its system calls alone", f"{bare * 1e6:.1f} µs", _floor(per_check, bare)),
        ("  the same, a socket per check", f"{bare_fresh * 1e6:.1f} µs", _floor(per_check, bare_fresh)),
        ("CPU per check, accepting side (approx.)", f"{accepting_per * 1e6:.1f} µs", ""),
        (
            "CPU per open_connection + close, this side",
            f"{naive * 1e6:.1f} µs",
            f"ratio {per_check / naive:.2f}",
        ),
    ]
    for name, value, note in rows:
        print(f"  {name:<44} {value:>28}  {note}")


def _floor(per_check: float, floor: float) -> str:
    return f"checker/floor {per_check / floor:.2f}; floor at 5,000/s: {floor * 5000:.1%} of a core"


def _verdict(value: float, target: float, unit: str) -> str:
    shown = f"{target:.0%}" if unit == "%" else f"{target * 1e3:.0f} ms"
    return f"target < {shown}  ratio {value / target:.2f}  {'OK' if value < target else 'MISSED'}"


if __name__ == "__main__":
    main()
