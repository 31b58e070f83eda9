"""The kernel settings IPVS needs, as kube-proxy's IPVS mode sets them.

``wanted_sysctls`` (pure) decides what to set from the kernel release and the settings; ``apply_sysctls``
reads each one and writes only those that differ, logging every change with its old and new value.

- ``net/ipv4/vs/conntrack=1``: IPVS traffic gets conntrack entries, so the iptables masquerade sees it.
- ``net/ipv4/vs/expire_nodest_conn=1``: a packet for a removed real server expires its connection
  (instead of being dropped for as long as the client keeps it alive; k8s #71358).
- ``net/ipv4/vs/expire_quiescent_template=1``: affinity templates to weight-0 servers expire.
- ``net/ipv4/ip_forward=1``: the node forwards to pods.
- ``net/ipv4/vs/conn_reuse_mode=0`` only on kernels >= 4.1 and < 5.9, where mode 1 stalls connects that
  reuse a port for a second (k8s #70747); 5.9 fixed it and mode 0 there would keep sending reused
  connections to weight-0 servers (#81775, #93297), so newer kernels keep their default.
- ``net/ipv4/conf/all/arp_ignore=1`` and ``arp_announce=2`` with strict ARP only (MetalLB needs the node
  not to answer ARP for kube-ipvs0's addresses).

The writes are plain file writes under /proc/sys: a handful of tiny, non-blocking-in-practice calls, still
done in a worker thread (``asyncio.to_thread``) so that the event loop never waits on the filesystem.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys")
# conn_reuse_mode=1 stalls reused-port connects for a second on these kernels; 5.9 fixed it (k8s #93297).
CONN_REUSE_MODE_BROKEN_FROM = (4, 1)
CONN_REUSE_MODE_FIXED_IN = (5, 9)
_RELEASE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


# An unprivileged container sees /proc/sys read-only (kube-proxy runs privileged for this alone).
READ_ONLY_HINT = (
    " (/proc/sys is read-only here: run `aproxy prepare-node` once in a privileged init container, as"
    " deploy/daemonset.yaml does, or set the sysctls yourself and pass --no-manage-sysctls)"
)


class SysctlError(OSError):
    """A sysctl could not be read or written (missing: the module that provides it is not loaded)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message, without OSError's "[Errno N]" prefix


@dataclass(frozen=True, slots=True)
class Sysctl:
    name: str  # path under /proc/sys, e.g. "net/ipv4/vs/conntrack"
    value: str


@dataclass(frozen=True, slots=True)
class SysctlChange:
    name: str
    old: str
    new: str


def parse_kernel_version(release: str) -> tuple[int, int, int] | None:
    """``os.uname().release`` ("6.1.0-18-amd64", "4.19.112+", "5.10") -> (major, minor, patch), or None."""
    match = _RELEASE.match(release)
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def needs_conn_reuse_mode_zero(version: tuple[int, int, int] | None) -> bool:
    """True only for kernels >= 4.1 and < 5.9; an unknown version is left alone."""
    if version is None:
        return False
    return CONN_REUSE_MODE_BROKEN_FROM <= version[:2] < CONN_REUSE_MODE_FIXED_IN


def wanted_sysctls(kernel_release: str, *, strict_arp: bool) -> tuple[Sysctl, ...]:
    """The sysctls to set, in the order to set them."""
    wanted = [
        Sysctl("net/ipv4/vs/conntrack", "1"),
        Sysctl("net/ipv4/vs/expire_nodest_conn", "1"),
        Sysctl("net/ipv4/vs/expire_quiescent_template", "1"),
        Sysctl("net/ipv4/ip_forward", "1"),
    ]
    if needs_conn_reuse_mode_zero(parse_kernel_version(kernel_release)):
        wanted.append(Sysctl("net/ipv4/vs/conn_reuse_mode", "0"))
    if strict_arp:
        wanted += [Sysctl("net/ipv4/conf/all/arp_ignore", "1"), Sysctl("net/ipv4/conf/all/arp_announce", "2")]
    return tuple(wanted)


def _set_all(wanted: Sequence[Sysctl], root: Path) -> list[SysctlChange]:
    changes = []
    for sysctl in wanted:
        path = root / sysctl.name
        try:
            old = path.read_text().strip()
            if old == sysctl.value:
                continue
            path.write_text(f"{sysctl.value}\n")
        except OSError as exc:
            hint = READ_ONLY_HINT if exc.errno == errno.EROFS else ""
            raise SysctlError(exc.errno, f"sysctl {sysctl.name}: {exc.strerror}{hint}") from exc
        log.info("set sysctl", extra={"sysctl": sysctl.name, "old": old, "new": sysctl.value})
        changes.append(SysctlChange(sysctl.name, old, sysctl.value))
    return changes


async def apply_sysctls(wanted: Sequence[Sysctl], root: Path = PROC_SYS) -> list[SysctlChange]:
    """Write the sysctls that differ from ``wanted``; return what changed (empty when all were right)."""
    return await asyncio.to_thread(_set_all, wanted, root)
