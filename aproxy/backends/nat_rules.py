"""The pure half of aproxy's iptables and ipset machinery around IPVS (the adapter is masquerade.py): chain
names and rules, the iptables-restore text, the hairpin set's members and their membership as virtual servers
change. No I/O: every function turns values into rules or set lines, so the tables in
tests/backends/test_masquerade_rules.py can check them directly."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

from aproxy.backends import ipset_wire, service_sets
from aproxy.backends.base import OperationResult
from aproxy.backends.ipvs_wire import PROTOCOL_NUMBERS
from aproxy.core.datapath import NODE_PORT_PROTOCOLS, SetKind
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


def every_address(_address: IPAddress) -> bool:
    """The hairpin filter of a caller that knows no node: every real server counts as local."""
    return True


@dataclass(slots=True)
class LoopBackMembers:
    """Which local real servers each virtual server has, and how many virtual servers hold each set entry.

    ``is_local`` says which real server addresses are endpoints on this node (the daemon's syncer knows): only
    those can be reached by a hairpin, so only those are members (kube-proxy's KUBE-LOOP-BACK alike). It is
    asked when a real server is added (``observe``) or adopted (``replace``); a removal drops whatever entry
    is held, local now or not. The default, every address, is the membership of a caller that knows no node
    (the pure tests of the refcounting, a tool without a syncer).
    """

    is_local: Callable[[IPAddress], bool] = every_address
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
        is_local = self.is_local
        self._by_virtual = {
            key: reals
            for key in state.virtual_keys()
            if (reals := {real for real in state.real_servers(key) if is_local(real.address)})
        }
        self._counts = Counter(
            _entry(virtual, real) for virtual, reals in self._by_virtual.items() for real in reals
        )

    def _add(
        self, virtual: VirtualServerKey, real: RealServerKey, touched: dict[LoopBackEntry, bool]
    ) -> None:
        if not self.is_local(real.address):
            return  # a remote pod's packets never come back here from its own address: no hairpin
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
