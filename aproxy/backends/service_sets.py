"""aproxy's per-purpose ipsets (core/datapath.py decides their members): names, types, members on the wire.

One set per purpose and family (IPv6 sets end in ``6``), except node ports: ``bitmap:port`` sets have no
family and serve both. Members go out as the hairpin set's do (masquerade.py): only the entries that
appeared or disappeared, over netlink from this process, many per ``sendmsg``; ``resync`` reads the sets
with ``ipset save`` (start-up, audit) and writes only the differences.

=============================  ===========================  ==================================
kind                           IPv4 set (IPv6: name + "6")  type
=============================  ===========================  ==================================
CLUSTER_IP                     APROXY-CLUSTER-IP            hash:ip,port
EXTERNAL_IP                    APROXY-EXTERNAL-IP           hash:ip,port
EXTERNAL_IP_LOCAL              APROXY-EXTERNAL-IP-LOCAL     hash:ip,port
LOAD_BALANCER                  APROXY-LOAD-BALANCER         hash:ip,port
LOAD_BALANCER_LOCAL            APROXY-LOAD-BALANCER-LOCAL   hash:ip,port
LOAD_BALANCER_FW               APROXY-LOAD-BALANCER-FW      hash:ip,port
LOAD_BALANCER_SOURCE           APROXY-LOAD-BALANCER-SRC     hash:ip,port,net
NODE_PORT (TCP, UDP)           APROXY-NODE-PORT-TCP/-UDP    bitmap:port (both families)
NODE_PORT_LOCAL (TCP, UDP)     APROXY-NODE-PORT-LOCAL-TCP   bitmap:port (both families)
HEALTH_CHECK_NODE_PORT (TCP)   APROXY-HEALTH-CHECK-TCP      bitmap:port (both families)
IPVS_IP                        APROXY-IPVS-IPS              hash:ip
=============================  ===========================  ==================================
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address, ip_network

from aproxy.backends import ipset_wire
from aproxy.backends.ipset_socket import IPSetSocket
from aproxy.backends.ipvs_wire import PROTOCOL_NUMBERS
from aproxy.core.datapath import NODE_PORT_PROTOCOLS, SetDelta, SetEntry, SetKind
from aproxy.core.model import IPAddress, L4Protocol

log = logging.getLogger(__name__)

LOGGED_FAILURES = 10

_HASH_TYPES = {
    SetKind.CLUSTER_IP: ("APROXY-CLUSTER-IP", "hash:ip,port"),
    SetKind.EXTERNAL_IP: ("APROXY-EXTERNAL-IP", "hash:ip,port"),
    SetKind.EXTERNAL_IP_LOCAL: ("APROXY-EXTERNAL-IP-LOCAL", "hash:ip,port"),
    SetKind.LOAD_BALANCER: ("APROXY-LOAD-BALANCER", "hash:ip,port"),
    SetKind.LOAD_BALANCER_LOCAL: ("APROXY-LOAD-BALANCER-LOCAL", "hash:ip,port"),
    SetKind.LOAD_BALANCER_FW: ("APROXY-LOAD-BALANCER-FW", "hash:ip,port"),
    SetKind.LOAD_BALANCER_SOURCE: ("APROXY-LOAD-BALANCER-SRC", "hash:ip,port,net"),
    SetKind.IPVS_IP: ("APROXY-IPVS-IPS", "hash:ip"),
}
_PORT_SETS = {
    SetKind.NODE_PORT: ("APROXY-NODE-PORT", NODE_PORT_PROTOCOLS),
    SetKind.NODE_PORT_LOCAL: ("APROXY-NODE-PORT-LOCAL", NODE_PORT_PROTOCOLS),
    SetKind.HEALTH_CHECK_NODE_PORT: ("APROXY-HEALTH-CHECK", (L4Protocol.TCP,)),
}
_FAMILY_NAMES = {4: "inet", 6: "inet6"}


def set_name(kind: SetKind, version: int | None = 4, protocol: L4Protocol | None = None) -> str:
    """The set of ``kind`` for one family (hash sets) or one protocol (node-port sets)."""
    if kind in _PORT_SETS:
        assert protocol is not None, "a node-port set is per protocol"
        return f"{_PORT_SETS[kind][0]}-{protocol.value}"
    base = _HASH_TYPES[kind][0]
    return base if version == 4 else f"{base}6"


def entry_set(entry: SetEntry) -> str:
    return set_name(entry.kind, entry.version, entry.protocol)


@dataclass(frozen=True, slots=True)
class SetDefinition:
    name: str
    type: str
    kind: SetKind
    version: int | None  # None: a family-less port set
    protocol: L4Protocol | None  # the protocol of a port set


def definitions(versions: Iterable[int]) -> tuple[SetDefinition, ...]:
    """Every set of the given families (and the family-less port sets)."""
    found = [
        SetDefinition(set_name(kind, version), set_type, kind, version, None)
        for version in sorted(versions)
        for kind, (_base, set_type) in _HASH_TYPES.items()
    ]
    found += [
        SetDefinition(set_name(kind, None, protocol), "bitmap:port", kind, None, protocol)
        for kind, (_base, protocols) in _PORT_SETS.items()
        for protocol in protocols
    ]
    return tuple(found)


def create_text(sets: Iterable[SetDefinition]) -> str:
    """``ipset restore`` input creating the sets that do not exist yet."""
    lines = []
    for definition in sets:
        if definition.version is None:
            lines.append(f"create {definition.name} {definition.type} range 0-65535 -exist\n")
        else:
            family = _FAMILY_NAMES[definition.version]
            lines.append(f"create {definition.name} {definition.type} family {family} -exist\n")
    return "".join(lines)


def wire(entry: SetEntry) -> ipset_wire.Member:
    name = entry_set(entry)
    if entry.kind is SetKind.IPVS_IP:
        return ipset_wire.Member(name, entry.address, None, None)
    assert entry.protocol is not None
    if entry.address is None:  # a node port
        return ipset_wire.Member(name, None, None, entry.port)
    protocol = PROTOCOL_NUMBERS[entry.protocol]
    if entry.source is not None:
        return ipset_wire.Member(
            name, entry.address, protocol, entry.port, entry.source.network_address, entry.source.prefixlen
        )
    return ipset_wire.Member(name, entry.address, protocol, entry.port)


_SAVED = re.compile(r"^add (\S+) (\S+)$")
_IP_PORT = re.compile(r"^([0-9a-fA-F.:]+),(tcp|udp|sctp):(\d+)(?:,([0-9a-fA-F.:/]+))?$")


def parse_saved(text: str, sets: Sequence[SetDefinition]) -> set[SetEntry]:
    """The members of ``sets`` in ``ipset save`` output (other sets and foreign shapes are ignored)."""
    by_name = {definition.name: definition for definition in sets}
    found: set[SetEntry] = set()
    for line in text.splitlines():
        match = _SAVED.match(line.strip())
        definition = by_name.get(match[1]) if match else None
        if match is None or definition is None:
            continue
        entry = _parse_member(definition, match[2])
        if entry is not None:
            found.add(entry)
    return found


def _parse_member(definition: SetDefinition, text: str) -> SetEntry | None:
    kind = definition.kind
    try:
        if definition.version is None:
            return SetEntry(kind, None, definition.protocol, int(text))
        if kind is SetKind.IPVS_IP:
            return SetEntry(kind, ip_address(text))
        match = _IP_PORT.match(text)
        if match is None:
            return None
        address: IPAddress = ip_address(match[1])
        source = ip_network(match[4], strict=False) if match[4] else None
        return SetEntry(kind, address, L4Protocol(match[2].upper()), int(match[3]), source)
    except ValueError:
        return None


class SetWriteError(RuntimeError):
    """The netlink socket failed (not one member: those are counted and logged)."""


class SetWriter:
    """Writes set members in netlink batches; counts what it wrote and what the kernel refused.

    The owner keeps one writer (one socket) open between syncs; ``close()`` when done.
    """

    def __init__(self) -> None:
        self._socket = IPSetSocket()
        self.batches = 0
        self.entries_written = 0
        self.entries_failed = 0

    def close(self) -> None:
        self._socket.close()

    async def send(self, requests: Sequence[tuple[int, ipset_wire.Member]]) -> None:
        """Apply (CMD_ADD or CMD_DEL, member) requests in order. A member the kernel refuses is logged and
        counted (the next resync writes it again); SetWriteError when the socket itself fails."""
        if not requests:
            return
        batches = self._socket.batches_sent
        try:
            if not self._socket.is_open:
                self._socket.open()
            codes = await self._socket.send(requests)
        except (OSError, TimeoutError, ipset_wire.ProtocolMismatch) as exc:
            self._socket.close()  # a fresh socket next time: no late reply can meet the next batch
            raise SetWriteError(f"set write over netlink failed: {exc!r}") from exc
        finally:
            self.batches += self._socket.batches_sent - batches
        self.entries_written += len(requests)
        # IPSET_ERR_EXIST is what -exist forgives; without NLM_F_EXCL the kernel should not send it at all.
        failed = [
            (command, member, code)
            for (command, member), code in zip(requests, codes, strict=True)
            if code and code != ipset_wire.ERR_EXIST
        ]
        self.entries_failed += len(failed)
        for command, member, code in failed[:LOGGED_FAILURES]:
            log.error(
                "set member refused",
                extra={
                    "operation": "add" if command == ipset_wire.CMD_ADD else "del",
                    "set": member.set_name,
                    "member": ipset_wire.member_text(member),
                    "error": ipset_wire.describe_error(code),
                    "errno": code,
                },
            )
        if len(failed) > LOGGED_FAILURES:
            log.error("more set members refused", extra={"count": len(failed) - LOGGED_FAILURES})


def requests(delta: SetDelta, versions: set[int]) -> list[tuple[int, ipset_wire.Member]]:
    """A delta's netlink requests, removals first; entries of a family not in ``versions`` left out."""
    return [
        (command, wire(entry))
        for command, entries in ((ipset_wire.CMD_DEL, delta.removed), (ipset_wire.CMD_ADD, delta.added))
        for entry in entries
        if entry.version is None or entry.version in versions
    ]
