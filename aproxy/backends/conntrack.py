"""Stale UDP conntrack entries: deleted after their real server is, so DNS does not keep going to a dead pod.

With ``net/ipv4/vs/conntrack=1`` every IPVS connection also has a conntrack entry: original direction
client -> virtual IP:port, reply direction real server -> client. UDP has no end of connection, so a client
that reuses its source port (a resolver) keeps that entry, and the NAT bindings on it, alive. When the real
server goes, IPVS (``expire_nodest_conn=1``) expires the client's connection at its next datagram but drops
that datagram while it still belongs to the old conntrack entry (k8s #71514, #125467). Linux 5.9 and later
expire such connections, with their conntrack entries, right after the deletion; older kernels, and nodes
where ``expire_nodest_conn`` is off, leave them. Deleting the entries here covers every kernel.

The deletion runs the ``conntrack`` tool (kube-router's approach), one process per removed real server,
a few at a time, after the IPVS batch that removed them (deleting before would let a datagram in between
re-create the entry). A removed UDP virtual server loses every entry to it, whatever the real server::

    conntrack -D -f ipv4 -p udp --orig-dst VIP --orig-port-dst PORT [--reply-src REAL --reply-port-src RPORT]

The tool, not pyroute2's NFCTSocket: ipvs.py stays the only module that imports pyroute2's netlink classes.
Failures are logged, never raised: a stale entry costs the client a retry, not the node its proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aproxy.backends.base import OperationResult
from aproxy.backends.command import CommandResult, run_command
from aproxy.core.model import (
    DeleteRealServer,
    DeleteVirtualServer,
    L4Protocol,
    RealServerKey,
    VirtualServerKey,
)

log = logging.getLogger(__name__)

# conntrack -D walks the whole table once per call: a few at a time keeps a large cleanup from
# hogging the CPU while still overlapping the process start-ups.
CONCURRENCY = 4
NOTHING_DELETED = "0 flow entries have been deleted"


@dataclass(frozen=True, slots=True)
class StaleFlows:
    """The conntrack entries to a UDP virtual server, all of them (``real`` None) or to one real server."""

    virtual: VirtualServerKey
    real: RealServerKey | None = None

    def command(self) -> list[str]:
        family = "ipv6" if self.virtual.address.version == 6 else "ipv4"
        argv = ["conntrack", "-D", "-f", family, "-p", "udp"]
        argv += ["--orig-dst", str(self.virtual.address), "--orig-port-dst", str(self.virtual.port)]
        if self.real is not None:
            argv += ["--reply-src", str(self.real.address), "--reply-port-src", str(self.real.port)]
        return argv


def stale_flows(results: Iterable[OperationResult]) -> list[StaleFlows]:
    """What the accepted UDP deletions of a batch leave behind, once each (a virtual server's deletion
    covers the deletions of its real servers)."""
    whole: set[VirtualServerKey] = set()
    reals: list[StaleFlows] = []
    for result in results:
        if not result.ok:
            continue
        match result.operation:
            case DeleteVirtualServer(key=key) if key.protocol is L4Protocol.UDP:
                whole.add(key)
            case DeleteRealServer(virtual=key, real=real) if key.protocol is L4Protocol.UDP:
                reals.append(StaleFlows(key, real))
    kept = dict.fromkeys(flows for flows in reals if flows.virtual not in whole)
    return [*kept, *(StaleFlows(key) for key in sorted(whole, key=VirtualServerKey.sort_key))]


def is_success(result: CommandResult) -> bool:
    """conntrack exits 1 when nothing matched: not an error here."""
    return result.ok or (result.returncode == 1 and NOTHING_DELETED in result.stderr)


class ConntrackCleaner:
    """Deletes the conntrack entries of removed UDP real servers (see the module docstring)."""

    def __init__(self, concurrency: int = CONCURRENCY) -> None:
        self._limit = asyncio.Semaphore(concurrency)
        self._missing_tool_logged = False
        self.deletions = 0  # conntrack runs that succeeded (metrics, tests)
        self.failures = 0

    async def observe(self, results: Sequence[OperationResult]) -> None:
        flows = stale_flows(results)
        if not flows:
            return
        async with asyncio.TaskGroup() as group:
            for flow in flows:
                group.create_task(self._delete(flow))

    async def _delete(self, flows: StaleFlows) -> None:
        async with self._limit:
            try:
                result = await run_command(*flows.command())
            except FileNotFoundError:
                self.failures += 1
                if not self._missing_tool_logged:
                    self._missing_tool_logged = True
                    log.error("conntrack tool not installed: stale UDP conntrack entries are not deleted")
                return
            except TimeoutError:
                self.failures += 1
                log.warning("conntrack timed out", extra={"command": " ".join(flows.command())})
                return
        if is_success(result):
            self.deletions += 1
            log.debug("deleted stale UDP conntrack entries", extra={"command": " ".join(result.argv)})
        else:
            self.failures += 1
            log.warning("conntrack failed", extra={"error": result.describe()})
