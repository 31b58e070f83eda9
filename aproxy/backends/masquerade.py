"""Source NAT, load-balancer source ranges and the service-IP filter: iptables around IPVS, kube-proxy's way.

IPVS (NAT forwarding) rewrites only the destination. Traffic then needs its source rewritten too (masqueraded
to the node's address on the outgoing interface), or the answer never finds its way back, when:

- it arrives from outside the node for a NodePort, external IP or load-balancer IP of a service with
  ``externalTrafficPolicy: Cluster``: a pod on another node would answer the client directly, from an
  address the client never talked to (policy ``Local`` is exempt: its pods are on this node and see the
  client's address);
- the node itself talks to a virtual IP: its source is a local address (often the virtual IP itself);
- hairpin: a pod reaching itself through its service;
- optionally all IPVS traffic (``masquerade_all``), or IPVS traffic from outside the pod network
  (``cluster_cidrs``, kube-proxy's ``--cluster-cidr``).

Everything lives in aproxy's own objects, per family, hooked by one rule each (added only when missing,
first in its chain): nat ``APROXY-SERVICES`` (from PREROUTING) marks external traffic for masquerading,
nat ``APROXY-POSTROUTING`` (from POSTROUTING) masquerades, filter ``APROXY-INPUT`` (from INPUT, which runs
before IPVS) drops load-balancer traffic from outside ``loadBalancerSourceRanges`` and rejects new
connections to a dummy-device address on a port none of its services has (kube-proxy's KUBE-IPVS-FILTER,
kubernetes#72236: a host sshd must not answer on every cluster IP). Only those are ever created, rewritten
or removed (``iptables-restore --noflush`` declaring only aproxy's chains). Plain ``iptables`` /
``ip6tables`` from PATH are called, so both the nft and the legacy variants work.

The rules match sets, one per purpose (service_sets.py; core/datapath.py decides their members from the
services), so their number is a constant whatever the cluster's size (IPv4; IPv6 the same with its sets)::

    nat APROXY-SERVICES:  cluster IP -> RETURN; LB-LOCAL -> RETURN; LB -> mark; EXTERNAL-IP-LOCAL -> RETURN;
                          EXTERNAL-IP -> mark; local address and NODE-PORT-LOCAL-<proto> -> RETURN;
                          local address and NODE-PORT-<proto> -> mark       (mark: APROXY-MARK-MASQ, 0x4000)
    nat APROXY-POSTROUTING:
        -m mark --mark 0x4000/0x4000 -j APROXY-MASQ      (clear the mark, MASQUERADE --random-fully)
        -m ipvs --vdir ORIGINAL --vmethod MASQ -m addrtype --src-type LOCAL -j MASQUERADE
        -m ipvs --vdir ORIGINAL --vmethod MASQ -m set --match-set APROXY-LOOP-BACK dst,dst,src -j MASQUERADE
        # cluster_cidrs, after those:
        #   -s <cidr> -j RETURN   (one per CIDR of the family)
        #   -m ipvs --vdir ORIGINAL --vmethod MASQ -j MASQUERADE
        # masquerade_all, instead of the node and hairpin rules:
        #   -m ipvs --vdir ORIGINAL --vmethod MASQ -j MASQUERADE
    filter APROXY-INPUT:  LB-FW and source not in LB-SRC -> DROP; CLUSTER-IP, EXTERNAL-IP, LB and
                          HEALTH-CHECK-TCP -> RETURN; NEW to an address in IPVS-IPS -> REJECT

The mark is set in PREROUTING, while the destination is still the virtual IP, and read in POSTROUTING,
after IPVS chose a real server. ``-m ipvs`` matches only packets IPVS has forwarded, and ``--vmethod MASQ``
only NAT forwarding: direct-routing traffic must keep its source. All of it needs ``net/ipv4/vs/conntrack=1``
(see sysctl.py), without which IPVS traffic bypasses the nat table. The ipvs match cannot tell whose
virtual server forwarded a packet: node, cluster-CIDR and masquerade-all rules also apply to a foreign NAT
virtual server's traffic (the sets hold only aproxy's services and real servers).

Hairpin detection is kube-proxy's: a ``hash:ip,port,ip`` set of (real server, protocol:port, real server)
entries matched as ``dst,dst,src``: a packet going to a real server *from that same address*. Its entries
follow the IPVS operations the kernel accepted (``observe``): only the entries that appeared or disappeared,
written over netlink from this process in one ``sendmsg`` per batch (ipset_socket.py), not by an ``ipset``
process: that cost ~80 ms per endpoint change and ~0.4 ms per member. A member the kernel refuses is logged
and left to the next audit. An entry is refcounted over the virtual servers that have that real
server (a pod behind a ClusterIP and a NodePort stays until its last virtual server lets it go).
``resync`` rebuilds the membership from a kernel dump (start-up and audit), writing only the differences.
The dummy-device set (``APROXY-IPVS-IPS``) follows the binds and unbinds the same way; the service sets
follow what the sync loop hands over (``update_services``, ``resync_services``). Rare operations (creating,
reading and destroying the sets, the iptables rules) still run the commands (command.py).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

from aproxy.backends import ipset_wire, service_sets
from aproxy.backends.base import OperationResult
from aproxy.backends.command import COMMAND_TIMEOUT, CommandResult, run_command, succeeds
from aproxy.backends.ipvs_wire import PROTOCOL_NUMBERS
from aproxy.backends.service_sets import SetWriteError, SetWriter
from aproxy.core.datapath import NODE_PORT_PROTOCOLS, SetDelta, SetEntry, SetKind
from aproxy.core.model import (
    AddRealServer,
    BindAddress,
    DeleteRealServer,
    DeleteVirtualServer,
    IPAddress,
    L4Protocol,
    RealServerKey,
    UnbindAddress,
    VirtualServerKey,
)
from aproxy.core.state import IPVSState

log = logging.getLogger(__name__)

CHAIN = "APROXY-POSTROUTING"
SERVICES_CHAIN = "APROXY-SERVICES"
MARK_CHAIN = "APROXY-MARK-MASQ"
MASQ_CHAIN = "APROXY-MASQ"
FILTER_CHAIN = "APROXY-INPUT"
NAT_CHAINS = (CHAIN, SERVICES_CHAIN, MARK_CHAIN, MASQ_CHAIN)
# kube-proxy's masquerade bit (--iptables-masquerade-bit 14): traffic marked in PREROUTING is masqueraded
# in POSTROUTING, after IPVS chose its real server.
MASQ_MARK = "0x4000"
SET_NAMES = {4: "APROXY-LOOP-BACK", 6: "APROXY-LOOP-BACK6"}
JUMP_COMMENT = "aproxy: source NAT for IPVS traffic"
IPV6_PROC = Path("/proc/net/if_inet6")
IP_SET_MODULE = Path("/sys/module/ip_set")
IPVS_NAT = ("-m", "ipvs", "--vdir", "ORIGINAL", "--vmethod", "MASQ")
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
    """The rules of aproxy's nat POSTROUTING chain for one family, as argument lists."""
    rules = [["-m", "mark", "--mark", f"{MASQ_MARK}/{MASQ_MARK}", *_comment("marked"), "-j", MASQ_CHAIN]]
    if settings.masquerade_all:
        return [*rules, [*IPVS_NAT, *_comment("masquerade all"), "-j", "MASQUERADE"]]
    rules += [
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


def _match(kind: SetKind, family: Family, directions: str, protocol: L4Protocol | None = None) -> list[str]:
    return ["-m", "set", "--match-set", service_sets.set_name(kind, family.version, protocol), directions]


def services_rules(family: Family) -> list[list[str]]:
    """nat APROXY-SERVICES (from PREROUTING): mark what arrives for external, LB and node-port virtual
    servers of policy Cluster; Local ones (and cluster IPs) keep their source."""
    mark = ["-j", MARK_CHAIN]
    rules = [
        [*_match(SetKind.CLUSTER_IP, family, "dst,dst"), "-j", "RETURN"],
        [*_match(SetKind.LOAD_BALANCER_LOCAL, family, "dst,dst"), "-j", "RETURN"],
        [*_match(SetKind.LOAD_BALANCER, family, "dst,dst"), *_comment("load balancer"), *mark],
        [*_match(SetKind.EXTERNAL_IP_LOCAL, family, "dst,dst"), "-j", "RETURN"],
        [*_match(SetKind.EXTERNAL_IP, family, "dst,dst"), *_comment("external IP"), *mark],
    ]
    for protocol in NODE_PORT_PROTOCOLS:
        local = ["-p", protocol.value.lower(), "-m", "addrtype", "--dst-type", "LOCAL"]
        rules.append([*local, *_match(SetKind.NODE_PORT_LOCAL, family, "dst", protocol), "-j", "RETURN"])
        rules.append(
            [*local, *_match(SetKind.NODE_PORT, family, "dst", protocol), *_comment("node port"), *mark]
        )
    return rules


def input_rules(family: Family) -> list[list[str]]:
    """filter APROXY-INPUT (from INPUT, before IPVS sees the packet): load-balancer source ranges, then the
    service-IP filter (kube-proxy's KUBE-IPVS-FILTER, kubernetes#72236): a new connection to an address on
    the dummy device is rejected unless it is for one of the services on it."""
    source = service_sets.set_name(SetKind.LOAD_BALANCER_SOURCE, family.version)
    return [
        [
            *_match(SetKind.LOAD_BALANCER_FW, family, "dst,dst"),
            *("-m", "set", "!", "--match-set", source, "dst,dst,src"),
            *_comment("outside loadBalancerSourceRanges"),
            *("-j", "DROP"),
        ],
        [*_match(SetKind.CLUSTER_IP, family, "dst,dst"), "-j", "RETURN"],
        [*_match(SetKind.EXTERNAL_IP, family, "dst,dst"), "-j", "RETURN"],
        [*_match(SetKind.LOAD_BALANCER, family, "dst,dst"), "-j", "RETURN"],
        ["-p", "tcp", *_match(SetKind.HEALTH_CHECK_NODE_PORT, family, "dst", L4Protocol.TCP), "-j", "RETURN"],
        [
            *("-m", "conntrack", "--ctstate", "NEW"),
            *_match(SetKind.IPVS_IP, family, "dst"),
            *_comment("not a service port"),
            *("-j", "REJECT"),
        ],
    ]


def _comment(text: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", text)


def _quote(argument: str) -> str:
    return f'"{argument}"' if " " in argument else argument


def _lines(chain: str, rules: list[list[str]]) -> list[str]:
    return [" ".join(["-A", chain, *map(_quote, rule)]) for rule in rules]


def restore_text(family: Family, settings: MasqueradeSettings) -> str:
    """``iptables-restore --noflush`` input that (re)writes aproxy's chains and nothing else."""
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in NAT_CHAINS)]
    lines += _lines(CHAIN, chain_rules(family, settings))
    lines += _lines(SERVICES_CHAIN, services_rules(family))
    lines += _lines(MARK_CHAIN, [["-j", "MARK", "--or-mark", MASQ_MARK]])
    lines += _lines(
        MASQ_CHAIN, [["-j", "MARK", "--xor-mark", MASQ_MARK], ["-j", "MASQUERADE", "--random-fully"]]
    )
    lines += [
        "COMMIT",
        "*filter",
        f":{FILTER_CHAIN} - [0:0]",
        *_lines(FILTER_CHAIN, input_rules(family)),
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def removal_text() -> str:
    """``iptables-restore --noflush`` input that empties and deletes aproxy's chains (unhooked first)."""
    nat = [f":{chain} - [0:0]" for chain in NAT_CHAINS] + [f"-X {chain}" for chain in NAT_CHAINS]
    return (
        "\n".join(
            ["*nat", *nat, "COMMIT", "*filter", f":{FILTER_CHAIN} - [0:0]", f"-X {FILTER_CHAIN}", "COMMIT"]
        )
        + "\n"
    )


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of aproxy's chains."""

    table: str
    chain: str
    target: str

    def rule(self) -> tuple[str, ...]:
        return (self.chain, "-m", "comment", "--comment", JUMP_COMMENT, "-j", self.target)


JUMPS = (
    Jump("nat", "POSTROUTING", CHAIN),
    Jump("nat", "PREROUTING", SERVICES_CHAIN),
    Jump("filter", "INPUT", FILTER_CHAIN),
)
JUMP_RULE = JUMPS[0].rule()


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
    """aproxy's chains and sets on this node (see the module docstring)."""

    def __init__(self, settings: MasqueradeSettings | None = None) -> None:
        self.settings = settings or MasqueradeSettings()
        for version in (4, 6):
            self.settings.networks(version)  # a bad CIDR fails here, at start-up, not at the first sync
        self.families = available_families()
        self._members = LoopBackMembers()
        self._bound: set[IPAddress] = set()  # the IPVS_IP set's members: the dummy device's addresses
        self._writer = SetWriter()  # its socket is opened at the first write, kept until close()
        self.commands_run = 0  # tests assert a sync writes only changes, with no process started

    # Netlink batches (one sendmsg each) that changed members, how many members they carried, how many the
    # kernel refused.
    @property
    def set_writes(self) -> int:
        return self._writer.batches

    @property
    def entries_written(self) -> int:
        return self._writer.entries_written

    @property
    def entries_failed(self) -> int:
        return self._writer.entries_failed

    def close(self) -> None:
        """Close the netlink socket (the kernel objects stay: ``cleanup`` removes those)."""
        self._writer.close()

    @property
    def entries(self) -> frozenset[LoopBackEntry]:
        return self._members.entries()

    def _set_definitions(self) -> tuple[service_sets.SetDefinition, ...]:
        return service_sets.definitions(self._versions())

    async def ensure(self) -> None:
        """Create or repair the sets, chains and jumps (idempotent: the audit calls it again)."""
        sets = create_sets_text(self.families) + service_sets.create_text(self._set_definitions())
        await self._must("ipset", "restore", stdin=sets)
        for family in self.families:
            await self._must(family.restore, "-w", "--noflush", stdin=restore_text(family, self.settings))
            for jump in JUMPS:
                rule = jump.rule()
                if not await self._succeeds(family.iptables, "-w", "-t", jump.table, "-C", *rule):
                    # Inserted first, so that no RETURN or ACCEPT another tool put there hides our chain.
                    await self._must(
                        family.iptables, "-w", "-t", jump.table, "-I", jump.chain, "1", *rule[1:]
                    )
                    log.info("hooked chain", extra={"command": family.iptables, "chain": jump.target})

    async def observe(self, results: Sequence[OperationResult]) -> None:
        """Update the hairpin and dummy-device sets after a batch: one netlink batch of what changed."""
        delta = self._members.observe(results)
        bound = self._follow_binds(results)
        requests = self._loop_back_requests(delta) + service_sets.requests(bound, self._versions())
        await self._send(requests)

    async def update_services(self, delta: SetDelta) -> None:
        """Write one sync's change of the service sets (core/datapath.py decided it)."""
        await self._send(service_sets.requests(delta, self._versions()))

    async def resync(self, state: IPVSState) -> Delta:
        """Make the hairpin and dummy-device sets match a kernel dump, writing only the differences (start-up,
        audit); returns the hairpin part."""
        self._members.replace(state)
        self._bound = set(state.addresses())
        saved = (await self._must("ipset", "save")).stdout
        present = parse_saved_members(saved)
        wanted = {entry for entry in self._members.entries() if entry.address.version in self._versions()}
        delta = Delta(tuple(wanted - present), tuple(present - wanted))
        addresses = {SetEntry(SetKind.IPVS_IP, address) for address in self._bound}
        bound = self._difference(saved, {SetKind.IPVS_IP}, addresses)
        if delta or bound:
            log.info("hairpin set repaired", extra={"added": len(delta.added), "removed": len(delta.removed)})
            await self._send(self._loop_back_requests(delta) + service_sets.requests(bound, self._versions()))
        return delta

    async def resync_services(self, entries: frozenset[SetEntry]) -> SetDelta:
        """Make the service sets hold exactly ``entries`` (start-up, audit), writing only the differences."""
        saved = (await self._must("ipset", "save")).stdout
        kinds: set[SetKind] = {kind for kind in SetKind if kind is not SetKind.IPVS_IP}
        delta = self._difference(saved, kinds, entries)
        if delta:
            log.info(
                "service sets repaired", extra={"added": len(delta.added), "removed": len(delta.removed)}
            )
            await self.update_services(delta)
        return delta

    def _difference(self, saved: str, kinds: set[SetKind], wanted: Iterable[SetEntry]) -> SetDelta:
        """What to write so that the sets of ``kinds`` (as ``ipset save`` printed them) hold ``wanted``."""
        definitions = [definition for definition in self._set_definitions() if definition.kind in kinds]
        present = service_sets.parse_saved(saved, definitions)
        versions = self._versions()
        goal = {entry for entry in wanted if entry.version is None or entry.version in versions}
        return SetDelta(tuple(goal - present), tuple(present - goal))

    async def cleanup(self) -> None:
        """Remove the jumps, then the chains, then the sets: whatever of them exists (missing tools: none)."""
        for family in self.families:
            for jump in JUMPS:
                rule = jump.rule()
                while await self._succeeds(family.iptables, "-w", "-t", jump.table, "-C", *rule):
                    await self._must(family.iptables, "-w", "-t", jump.table, "-D", *rule)
            if await self._succeeds(family.iptables, "-w", "-t", "nat", "-S", CHAIN):
                await self._must(family.restore, "-w", "--noflush", stdin=removal_text())
        if not _ip_set_loaded():
            return self._forget()  # no set can exist; asking ipset would load the module
        present = set((await self._must("ipset", "list", "-n")).stdout.split())
        names = [family.set_name for family in self.families]
        names += [definition.name for definition in service_sets.definitions((4, 6))]
        for name in names:
            if name in present:
                await self._must("ipset", "destroy", name)
        self._forget()

    def _forget(self) -> None:
        self._members = LoopBackMembers()
        self._bound = set()
        self.close()

    def _versions(self) -> set[int]:
        return {family.version for family in self.families}

    def _follow_binds(self, results: Iterable[OperationResult]) -> SetDelta:
        added: list[SetEntry] = []
        removed: list[SetEntry] = []
        for result in results:
            match result.operation:
                case BindAddress(address=address) if result.ok and address not in self._bound:
                    self._bound.add(address)
                    added.append(SetEntry(SetKind.IPVS_IP, address))
                case UnbindAddress(address=address) if result.ok and address in self._bound:
                    self._bound.discard(address)
                    removed.append(SetEntry(SetKind.IPVS_IP, address))
        return SetDelta(tuple(added), tuple(removed))

    def _loop_back_requests(self, delta: Delta) -> list[tuple[int, ipset_wire.Member]]:
        versions = self._versions()
        added = [entry for entry in delta.added if entry.address.version in versions]
        removed = [entry for entry in delta.removed if entry.address.version in versions]
        return [(command, entry.wire()) for command, entry in set_requests(added, removed)]

    async def _send(self, requests: Sequence[tuple[int, ipset_wire.Member]]) -> None:
        try:
            await self._writer.send(requests)
        except SetWriteError as exc:
            raise MasqueradeError(str(exc)) from exc

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


def _ip_set_loaded() -> bool:
    return IP_SET_MODULE.exists()  # a sysfs stat: instant


def available_families() -> tuple[Family, ...]:
    """IPv4 always; IPv6 unless the kernel has it disabled (then ip6tables has no nat table to hook)."""
    if IPV6_PROC.exists():
        return FAMILIES
    log.warning("IPv6 is disabled in this kernel: IPv6 source NAT left out")
    return FAMILIES[:1]
