"""Source NAT where IPVS needs it, with iptables and one ipset per family, as kube-proxy's IPVS mode does.

IPVS (NAT forwarding) rewrites only the destination. Three kinds of traffic then need their source rewritten
too (masqueraded to the node's address on the outgoing interface), or the answer never finds its way back:

- the node itself talking to a virtual IP: its source is a local address (often the virtual IP itself,
  picked because it is bound on kube-ipvs0), which a pod on another node would answer to itself;
- hairpin: a pod reaching itself through its service; without masquerade it answers itself directly and
  drops the reply as unexpected;
- optionally all IPVS traffic (``masquerade_all``), or IPVS traffic from outside the pod network
  (``cluster_cidrs``, kube-proxy's ``--cluster-cidr``).

Everything lives in aproxy's own objects: the nat chain ``APROXY-POSTROUTING`` (per family), jumped to from
POSTROUTING by one rule added only when missing, and the sets ``APROXY-LOOP-BACK`` (IPv4) and
``APROXY-LOOP-BACK6`` (IPv6). Only those are ever created, rewritten or removed; other chains are never
flushed or rewritten (``iptables-restore --noflush`` declaring only aproxy's chain). Plain ``iptables`` /
``ip6tables`` from PATH are called, so both the nft and the legacy variants work.

The chain (IPv4; IPv6 the same with its own set), a fixed handful of rules whatever the cluster's size::

    -A APROXY-POSTROUTING -m ipvs --vdir ORIGINAL --vmethod MASQ -m addrtype --src-type LOCAL -j MASQUERADE
    -A APROXY-POSTROUTING -m ipvs --vdir ORIGINAL --vmethod MASQ \
        -m set --match-set APROXY-LOOP-BACK dst,dst,src -j MASQUERADE
    # cluster_cidrs, after those two:
    #   -A APROXY-POSTROUTING -s <cidr> -j RETURN   (one per CIDR of the family)
    #   -A APROXY-POSTROUTING -m ipvs --vdir ORIGINAL --vmethod MASQ -j MASQUERADE
    # masquerade_all, instead of all the above:
    #   -A APROXY-POSTROUTING -m ipvs --vdir ORIGINAL --vmethod MASQ -j MASQUERADE

``-m ipvs`` matches only packets IPVS has forwarded (in POSTROUTING their destination is already the real
server), and ``--vmethod MASQ`` only NAT forwarding: direct-routing traffic must keep its source. This needs
``net/ipv4/vs/conntrack=1`` (see sysctl.py), without which IPVS traffic bypasses the nat table. The match
cannot tell whose virtual server forwarded a packet: node, cluster-CIDR and masquerade-all rules also apply
to a foreign NAT virtual server's traffic (the hairpin set holds only aproxy's real servers).

Hairpin detection is kube-proxy's: a ``hash:ip,port,ip`` set of (real server, protocol:port, real server)
entries matched as ``dst,dst,src``: a packet going to a real server *from that same address*. Its entries
follow the IPVS operations the kernel accepted (``observe``): only the entries that appeared or disappeared,
written over netlink from this process in one ``sendmsg`` per batch (ipset_socket.py), not by an ``ipset``
process: that cost ~80 ms per endpoint change and ~0.4 ms per member. A member the kernel refuses is logged
and left to the next audit. An entry is refcounted over the virtual servers that have that real
server (a pod behind a ClusterIP and a NodePort stays until its last virtual server lets it go).
``resync`` rebuilds the membership from a kernel dump (start-up and audit), writing only the differences.
Rare operations (creating, reading and destroying the sets, the iptables rules) still run the commands
(command.py).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

from aproxy.backends import ipset_wire
from aproxy.backends.base import OperationResult
from aproxy.backends.command import COMMAND_TIMEOUT, CommandResult, run_command, succeeds
from aproxy.backends.ipset_socket import IPSetSocket
from aproxy.backends.ipvs_wire import PROTOCOL_NUMBERS
from aproxy.core.model import (
    AddRealServer,
    DeleteRealServer,
    DeleteVirtualServer,
    IPAddress,
    L4Protocol,
    RealServerKey,
    VirtualServerKey,
)
from aproxy.core.state import IPVSState

log = logging.getLogger(__name__)

CHAIN = "APROXY-POSTROUTING"
SET_NAMES = {4: "APROXY-LOOP-BACK", 6: "APROXY-LOOP-BACK6"}
JUMP_COMMENT = "aproxy: source NAT for IPVS traffic"
IPV6_PROC = Path("/proc/net/if_inet6")
IPVS_NAT = ("-m", "ipvs", "--vdir", "ORIGINAL", "--vmethod", "MASQ")
# Failed members logged one by one per write; past that, only counted (a missing set fails them all).
LOGGED_FAILURES = 10
# ipset: 'add APROXY-LOOP-BACK 10.244.1.5,tcp:8080,10.244.1.5' as `ipset save` prints members.
_SAVED_MEMBER = re.compile(r"^add (\S+) ([0-9a-fA-F.:]+),(tcp|udp|sctp):(\d+),([0-9a-fA-F.:]+)$")


class MasqueradeError(RuntimeError):
    """iptables, ip6tables or ipset refused a change (or is not installed)."""


@dataclass(frozen=True, slots=True)
class Family:
    """The commands and objects of one address family."""

    version: int
    iptables: str
    restore: str
    set_name: str
    set_family: str


FAMILIES = (
    Family(4, "iptables", "iptables-restore", SET_NAMES[4], "inet"),
    Family(6, "ip6tables", "ip6tables-restore", SET_NAMES[6], "inet6"),
)


@dataclass(frozen=True, slots=True)
class MasqueradeSettings:
    masquerade_all: bool = False
    # kube-proxy's --cluster-cidr: IPVS traffic from outside these (either family) is masqueraded.
    cluster_cidrs: tuple[str, ...] = ()

    def networks(self, version: int) -> list[IPv4Network | IPv6Network]:
        """The cluster CIDRs of one family (ValueError for one that is not a CIDR)."""
        networks = [ip_network(cidr, strict=False) for cidr in self.cluster_cidrs]
        return [network for network in networks if network.version == version]


# --- pure: rules, set lines, membership ---------------------------------------------------------------------


def chain_rules(family: Family, settings: MasqueradeSettings) -> list[list[str]]:
    """The rules of aproxy's nat chain for one family, as argument lists."""
    if settings.masquerade_all:
        return [[*IPVS_NAT, *_comment("masquerade all"), "-j", "MASQUERADE"]]
    rules = [
        [*IPVS_NAT, "-m", "addrtype", "--src-type", "LOCAL", *_comment("from the node"), "-j", "MASQUERADE"],
        [
            *IPVS_NAT,
            *("-m", "set", "--match-set", family.set_name, "dst,dst,src"),
            *_comment("hairpin"),
            *("-j", "MASQUERADE"),
        ],
    ]
    networks = settings.networks(family.version)
    if networks:
        rules += [["-s", str(network), "-j", "RETURN"] for network in networks]
        rules.append([*IPVS_NAT, *_comment("from outside the cluster CIDRs"), "-j", "MASQUERADE"])
    return rules


def _comment(text: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", text)


def _quote(argument: str) -> str:
    return f'"{argument}"' if " " in argument else argument


def restore_text(family: Family, settings: MasqueradeSettings) -> str:
    """``iptables-restore --noflush`` input that (re)writes aproxy's chain and nothing else."""
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    lines += [" ".join(["-A", CHAIN, *map(_quote, rule)]) for rule in chain_rules(family, settings)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def removal_text() -> str:
    """``iptables-restore --noflush`` input that empties and deletes aproxy's chain (unhooked first)."""
    return f"*nat\n:{CHAIN} - [0:0]\n-X {CHAIN}\nCOMMIT\n"


JUMP_RULE = ("POSTROUTING", "-m", "comment", "--comment", JUMP_COMMENT, "-j", CHAIN)


@dataclass(frozen=True, slots=True)
class LoopBackEntry:
    """One hairpin set member: packets to ``address:port`` (``protocol``) from ``address`` itself."""

    address: IPAddress
    protocol: L4Protocol
    port: int

    @property
    def set_name(self) -> str:
        return SET_NAMES[self.address.version]

    def member(self) -> str:
        return f"{self.address},{self.protocol.value.lower()}:{self.port},{self.address}"

    def wire(self) -> ipset_wire.Member:
        return ipset_wire.Member(
            self.set_name, self.address, PROTOCOL_NUMBERS[self.protocol], self.port, self.address
        )


def set_requests(
    added: Iterable[LoopBackEntry], removed: Iterable[LoopBackEntry]
) -> list[tuple[int, LoopBackEntry]]:
    """The netlink (command, entry) requests of a change: removals first, then additions."""
    return [(ipset_wire.CMD_DEL, entry) for entry in removed] + [
        (ipset_wire.CMD_ADD, entry) for entry in added
    ]


def create_sets_text(families: Iterable[Family] = FAMILIES) -> str:
    """``ipset restore`` input creating the hairpin sets that do not exist yet."""
    return "".join(
        f"create {family.set_name} hash:ip,port,ip family {family.set_family} -exist\n" for family in families
    )


def parse_saved_members(text: str) -> set[LoopBackEntry]:
    """The hairpin entries in ``ipset save`` output (other sets' lines and foreign shapes are ignored)."""
    found = set()
    for line in text.splitlines():
        match = _SAVED_MEMBER.match(line.strip())
        if match is None or match[1] not in SET_NAMES.values() or match[2] != match[5]:
            continue
        found.add(LoopBackEntry(ip_address(match[2]), L4Protocol(match[3].upper()), int(match[4])))
    return found


@dataclass(frozen=True, slots=True)
class Delta:
    added: tuple[LoopBackEntry, ...] = ()
    removed: tuple[LoopBackEntry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def _entry(virtual: VirtualServerKey, real: RealServerKey) -> LoopBackEntry:
    return LoopBackEntry(real.address, virtual.protocol, real.port)


@dataclass(slots=True)
class LoopBackMembers:
    """Which real servers each virtual server has, and how many virtual servers hold each set entry."""

    _by_virtual: dict[VirtualServerKey, set[RealServerKey]] = field(default_factory=dict)
    _counts: Counter[LoopBackEntry] = field(default_factory=Counter)

    def entries(self) -> frozenset[LoopBackEntry]:
        return frozenset(self._counts)

    def observe(self, results: Iterable[OperationResult]) -> Delta:
        """Follow the accepted operations; the entries that appeared and disappeared (net, per batch)."""
        touched: dict[LoopBackEntry, bool] = {}
        for result in results:
            if not result.ok:
                continue
            match result.operation:
                case AddRealServer(virtual=virtual, real=real):
                    self._add(virtual, real.key, touched)
                case DeleteRealServer(virtual=virtual, real=real_key):
                    self._remove(virtual, real_key, touched)
                case DeleteVirtualServer(key=virtual):
                    for real_key in list(self._by_virtual.get(virtual, ())):
                        self._remove(virtual, real_key, touched)
                    self._by_virtual.pop(virtual, None)
        return self._delta(touched)

    def replace(self, state: IPVSState) -> None:
        """Take the membership of a kernel dump (start-up, audit): O(cluster), like the dump itself."""
        self._by_virtual = {key: set(state.real_servers(key)) for key in state.virtual_keys()}
        self._counts = Counter(
            _entry(virtual, real) for virtual, reals in self._by_virtual.items() for real in reals
        )

    def _add(
        self, virtual: VirtualServerKey, real: RealServerKey, touched: dict[LoopBackEntry, bool]
    ) -> None:
        reals = self._by_virtual.setdefault(virtual, set())
        if real in reals:
            return
        entry = _entry(virtual, real)
        touched.setdefault(entry, entry in self._counts)
        reals.add(real)
        self._counts[entry] += 1

    def _remove(
        self, virtual: VirtualServerKey, real: RealServerKey, touched: dict[LoopBackEntry, bool]
    ) -> None:
        reals = self._by_virtual.get(virtual)
        if reals is None or real not in reals:
            return
        entry = _entry(virtual, real)
        touched.setdefault(entry, True)
        reals.discard(real)
        self._counts[entry] -= 1
        if self._counts[entry] <= 0:
            del self._counts[entry]

    def _delta(self, touched: dict[LoopBackEntry, bool]) -> Delta:
        added = tuple(entry for entry, before in touched.items() if not before and entry in self._counts)
        removed = tuple(entry for entry, before in touched.items() if before and entry not in self._counts)
        return Delta(added, removed)


# --- the adapter --------------------------------------------------------------------------------------------


class Masquerade:
    """aproxy's source-NAT chains and hairpin sets on this node (see the module docstring)."""

    def __init__(self, settings: MasqueradeSettings | None = None) -> None:
        self.settings = settings or MasqueradeSettings()
        for version in (4, 6):
            self.settings.networks(version)  # a bad CIDR fails here, at start-up, not at the first sync
        self.families = available_families()
        self._members = LoopBackMembers()
        # Netlink batches (one sendmsg each) that changed members, how many members they carried, how many
        # the kernel refused, and the commands run: tests assert a sync writes only changes, with no process.
        self.set_writes = 0
        self.entries_written = 0
        self.entries_failed = 0
        self.commands_run = 0
        self._socket = IPSetSocket()  # opened at the first write, kept until close() or a socket error

    def close(self) -> None:
        """Close the netlink socket (the kernel objects stay: ``cleanup`` removes those)."""
        self._socket.close()

    @property
    def entries(self) -> frozenset[LoopBackEntry]:
        return self._members.entries()

    async def ensure(self) -> None:
        """Create or repair the sets, chains and jumps (idempotent: the audit calls it again)."""
        await self._must("ipset", "restore", stdin=create_sets_text(self.families))
        for family in self.families:
            await self._must(family.restore, "-w", "--noflush", stdin=restore_text(family, self.settings))
            if not await self._succeeds(family.iptables, "-w", "-t", "nat", "-C", *JUMP_RULE):
                # Inserted first, so that no RETURN another tool put in POSTROUTING hides our chain.
                await self._must(family.iptables, "-w", "-t", "nat", "-I", "POSTROUTING", "1", *JUMP_RULE[1:])
                log.info("hooked source NAT chain", extra={"command": family.iptables, "chain": CHAIN})

    async def observe(self, results: Sequence[OperationResult]) -> None:
        """Update the hairpin sets after a batch: one netlink batch of what appeared or disappeared."""
        delta = self._members.observe(results)
        if delta:
            await self._write(delta)

    async def resync(self, state: IPVSState) -> Delta:
        """Make the hairpin sets match a kernel dump, writing only the differences (start-up, audit)."""
        self._members.replace(state)
        present: set[LoopBackEntry] = set()
        for family in self.families:
            present |= parse_saved_members((await self._must("ipset", "save", family.set_name)).stdout)
        wanted = {entry for entry in self._members.entries() if entry.address.version in self._versions()}
        delta = Delta(tuple(wanted - present), tuple(present - wanted))
        if delta:
            log.info("hairpin set repaired", extra={"added": len(delta.added), "removed": len(delta.removed)})
            await self._write(delta)
        return delta

    async def cleanup(self) -> None:
        """Remove the jumps, then the chains, then the sets: whatever of them exists (missing tools: none)."""
        for family in self.families:
            while await self._succeeds(family.iptables, "-w", "-t", "nat", "-C", *JUMP_RULE):
                await self._must(family.iptables, "-w", "-t", "nat", "-D", *JUMP_RULE)
            if await self._succeeds(family.iptables, "-w", "-t", "nat", "-S", CHAIN):
                await self._must(family.restore, "-w", "--noflush", stdin=removal_text())
        for family in self.families:
            if await self._succeeds("ipset", "list", "-n", family.set_name):
                await self._must("ipset", "destroy", family.set_name)
        self._members = LoopBackMembers()
        self.close()

    def _versions(self) -> set[int]:
        return {family.version for family in self.families}

    async def _write(self, delta: Delta) -> None:
        versions = self._versions()
        added = [entry for entry in delta.added if entry.address.version in versions]
        removed = [entry for entry in delta.removed if entry.address.version in versions]
        if not (added or removed):
            return
        requests = set_requests(added, removed)
        batches = self._socket.batches_sent
        try:
            if not self._socket.is_open:
                self._socket.open()
            codes = await self._socket.send([(command, entry.wire()) for command, entry in requests])
        except (OSError, TimeoutError, ipset_wire.ProtocolMismatch) as exc:
            self._socket.close()  # a fresh socket next time: no late reply can meet the next batch
            raise MasqueradeError(f"hairpin set write over netlink failed: {exc!r}") from exc
        finally:
            self.set_writes += self._socket.batches_sent - batches
        self.entries_written += len(requests)
        self._report_failures(requests, codes)

    def _report_failures(self, requests: Sequence[tuple[int, LoopBackEntry]], codes: Sequence[int]) -> None:
        """Log the members the kernel refused; the next audit's resync writes them again."""
        # IPSET_ERR_EXIST is what -exist forgives; without NLM_F_EXCL the kernel should not send it at all.
        failed = [
            (command, entry, code)
            for (command, entry), code in zip(requests, codes, strict=True)
            if code and code != ipset_wire.ERR_EXIST
        ]
        self.entries_failed += len(failed)
        for command, entry, code in failed[:LOGGED_FAILURES]:
            log.error(
                "hairpin set member refused",
                extra={
                    "operation": "add" if command == ipset_wire.CMD_ADD else "del",
                    "set": entry.set_name,
                    "member": entry.member(),
                    "error": ipset_wire.describe_error(code),
                    "errno": code,
                },
            )
        if len(failed) > LOGGED_FAILURES:
            log.error("more hairpin set members refused", extra={"count": len(failed) - LOGGED_FAILURES})

    async def _must(self, *argv: str, stdin: str | None = None) -> CommandResult:
        """Run a command that must succeed: MasqueradeError when it fails, is missing or hangs."""
        self.commands_run += 1
        try:
            result = await run_command(*argv, stdin=stdin)
        except FileNotFoundError as exc:
            raise MasqueradeError(f"{argv[0]} is not installed (needed for IPVS source NAT)") from exc
        except TimeoutError as exc:
            raise MasqueradeError(f"{' '.join(argv)} did not finish within {COMMAND_TIMEOUT:.0f} s") from exc
        if not result.ok:
            raise MasqueradeError(result.describe())
        return result

    async def _succeeds(self, *argv: str) -> bool:
        self.commands_run += 1
        return await succeeds(*argv)


def available_families() -> tuple[Family, ...]:
    """IPv4 always; IPv6 unless the kernel has it disabled (then ip6tables has no nat table to hook)."""
    if IPV6_PROC.exists():
        return FAMILIES
    log.warning("IPv6 is disabled in this kernel: IPv6 source NAT left out")
    return FAMILIES[:1]
