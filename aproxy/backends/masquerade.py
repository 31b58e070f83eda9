"""Source NAT, load-balancer source ranges and the service-IP filter: iptables around IPVS, kube-proxy's way.
This module is the adapter (commands, sets, repair); the rules and set lines themselves are pure, in
nat_rules.py.

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
entries matched as ``dst,dst,src``: a packet going to a real server *from that same address*. Only real
servers whose address is an endpoint on this node are members (kube-proxy's KUBE-LOOP-BACK holds only local
endpoints): a remote pod's packets never arrive here from its own address with a service destination, and a
member for every real server of the cluster would fill the set (``maxelem`` 65536) at ~6,500 services of 10
endpoints. The syncer hands its ``is_local_endpoint`` over (``set_local_endpoints``); without it
every real server counts. Limitation: an endpoint whose ``nodeName`` appears (or turns to this node) after
its real server was added joins the set at the next audit, as the membership follows IPVS operations and
that change is none. Entries from an older aproxy that held every real server are dropped by the start-up
``resync``. The entries follow the IPVS operations the kernel accepted (``observe``): only the entries that
appeared or disappeared, written over netlink from this process in one ``sendmsg`` per batch
(ipset_socket.py), not by an ``ipset`` process: that cost ~80 ms per endpoint change and ~0.4 ms per member.
A member the kernel refuses is logged and left to the next audit. An entry is refcounted over the virtual
servers that have that real server (a pod behind a ClusterIP and a NodePort stays until its last virtual
server lets it go). ``resync`` rebuilds the membership from an IPVS state (the start-up dump; the audit's
applied state, once its slices have repaired IPVS), writing only the differences.
The dummy-device set (``APROXY-IPVS-IPS``) follows the binds and unbinds the same way; the service sets
follow what the sync loop hands over (``update_services``, ``resync_services``). Rare operations (creating,
reading and destroying the sets, the iptables rules) still run the commands (command.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from aproxy.backends import ipset_wire, service_sets
from aproxy.backends.base import OperationResult
from aproxy.backends.command import COMMAND_TIMEOUT, CommandResult, run_command, succeeds
from aproxy.backends.nat_rules import (
    CHAIN,
    FAMILIES,
    IP_SET_MODULE,
    IPV6_PROC,
    JUMPS,
    Delta,
    Family,
    LoopBackEntry,
    LoopBackMembers,
    MasqueradeSettings,
    create_sets_text,
    every_address,
    parse_saved_members,
    removal_text,
    restore_text,
    set_requests,
)
from aproxy.backends.service_sets import SetWriteError, SetWriter
from aproxy.core.datapath import SetDelta, SetEntry, SetKind
from aproxy.core.model import (
    BindAddress,
    IPAddress,
    UnbindAddress,
)
from aproxy.core.state import IPVSState

log = logging.getLogger(__name__)


class MasqueradeError(RuntimeError):
    """iptables, ip6tables or ipset refused a change (or is not installed)."""


# --- the adapter --------------------------------------------------------------------------------------------


class Masquerade:
    """aproxy's chains and sets on this node (see the module docstring)."""

    def __init__(
        self,
        settings: MasqueradeSettings | None = None,
        is_local: Callable[[IPAddress], bool] = every_address,
    ) -> None:
        self.settings = settings or MasqueradeSettings()
        for version in (4, 6):
            self.settings.networks(version)  # a bad CIDR fails here, at start-up, not at the first sync
        self.families = available_families()
        self._members = LoopBackMembers(is_local)
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

    def set_local_endpoints(self, is_local: Callable[[IPAddress], bool]) -> None:
        """Which real server addresses are endpoints on this node (the syncer's ``is_local_endpoint``): only
        those join the hairpin set from now on, and the next ``resync`` drops the others."""
        self._members.is_local = is_local

    def _set_definitions(self) -> tuple[service_sets.SetDefinition, ...]:
        return service_sets.definitions(self._versions())

    async def ensure(self) -> None:
        """Create or repair the sets, chains and jumps (idempotent: the audit calls it again)."""
        async for _ in self.ensure_steps():
            pass

    async def ensure_steps(self) -> AsyncIterator[None]:
        """``ensure``, one command a step: the audit lets due syncs run between two steps (in the guest a
        command is a process of a tenth of a second or more; syncs never touch the chains, and the sets they
        write exist already)."""
        sets = create_sets_text(self.families) + service_sets.create_text(self._set_definitions())
        await self._must("ipset", "restore", stdin=sets)
        yield
        for family in self.families:
            await self._must(family.restore, "-w", "--noflush", stdin=restore_text(family, self.settings))
            yield
            for jump in JUMPS:
                rule = jump.rule()
                if not await self._succeeds(family.iptables, "-w", "-t", jump.table, "-C", *rule):
                    # Inserted first, so that no RETURN or ACCEPT another tool put there hides our chain.
                    await self._must(
                        family.iptables, "-w", "-t", jump.table, "-I", jump.chain, "1", *rule[1:]
                    )
                    log.info("hooked chain", extra={"command": family.iptables, "chain": jump.target})
                yield

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
        """Make the hairpin and dummy-device sets match an IPVS state (the start-up dump, the audit's applied
        state), writing only the differences; returns the hairpin part."""
        # ``state`` is read here, before the first await: the audit hands over the live applied state.
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
        self._members = LoopBackMembers(self._members.is_local)
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
