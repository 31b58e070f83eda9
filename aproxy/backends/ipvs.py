"""The Linux IPVS backend: the only module that speaks netlink (through pyroute2 and raw sockets).

- Writes go out in batches (:meth:`NetlinkSocket.send_batches`): many requests per ``sendmsg``, each with its
  own sequence number, an acknowledgement asked only on the last; every error comes back with the sequence
  number of its request, so each failure is attributed to its operation. IPVS operations go through
  :class:`BatchSocket` (generic netlink), binding and unbinding the dummy device's addresses through
  :class:`AddressSocket` (rtnetlink, packed in rtnl_wire.py): every cluster IP is one address, and one
  pyroute2 request and acknowledgement each made binding 1,000 of them take forty times as long as the
  11,000 IPVS operations beside them.
- IPVS reads go through the same raw socket, parsed by hand (ipvs_wire.py). A full dump (start-up, audit):
  one service dump, then one destination dump per owned virtual server; pyroute2's decoding made a
  1,000-service dump take seconds. A read of a few virtual servers (reconciling after EEXIST, ENOENT, ...):
  one get request per virtual server and one destination dump per one that exists, whatever the node holds.
- The dummy device's addresses are read through that rtnetlink socket too (parsed in rtnl_wire.py): every
  cluster IP is bound there, and pyroute2's decoding of them made even the read of one virtual server grow
  with the cluster. Only creating, finding and deleting the device go through pyroute2's asyncio API
  (``AsyncIPRoute``); ``AsyncIPVS`` only resolves the IPVS generic-netlink family at open.
- Ownership: aproxy changes only virtual servers whose address is bound on its dummy device, or that it
  created on another address (NodePorts on node addresses, external IPs that are node addresses) and recorded
  in its state file. Everything else in the kernel (keepalived's, an operator's) is invisible to it.
- Around IPVS: the sysctls it needs (sysctl.py, at open), source NAT for node, hairpin and optionally other
  traffic (masquerade.py: chains at open, hairpin set after every batch, both repaired at every full dump),
  and stale UDP conntrack entries deleted after every batch that removed UDP real servers (conntrack.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, ClassVar, Final, TypeAlias, TypeVar

from pyroute2 import AsyncIPRoute, AsyncIPVS
from pyroute2.netlink.exceptions import NetlinkError

from aproxy.backends import ipvs_wire, rtnl_wire
from aproxy.backends.base import BackendError, OperationResult, RealServerConnections
from aproxy.backends.conntrack import ConntrackCleaner
from aproxy.backends.masquerade import Masquerade, MasqueradeError, MasqueradeSettings
from aproxy.backends.netlink_socket import NETLINK_GENERIC, SOL_NETLINK, open_netlink_socket
from aproxy.backends.sysctl import apply_sysctls, wanted_sysctls
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteVirtualServer,
    IPAddress,
    L4Protocol,
    Operation,
    RealServer,
    RealServerKey,
    UnbindAddress,
    VirtualServerKey,
    VirtualServerSpec,
    virtual_server_of,
)
from aproxy.core.state import IPVSState

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Op = TypeVar("_Op")
AddressOperation: TypeAlias = BindAddress | UnbindAddress

# One receive of a dump: the kernel fills at most 32 KiB per part (netlink_dump), more would be truncated.
DUMP_RECEIVE_BYTES = 64 * 1024
# Linux 4.20+: the kernel checks a dump request's header strictly and honours its filters (ifa_index).
NETLINK_GET_STRICT_CHK: Final = 12
_PROTOCOLS_BY_NUMBER = {number: protocol for protocol, number in ipvs_wire.PROTOCOL_NUMBERS.items()}


class NetlinkThread:
    """A private standard-library event loop in its own thread, for pyroute2's asyncio sockets.

    pyroute2 opens netlink sockets with ``loop.create_datagram_endpoint``, which uvloop refuses for AF_NETLINK
    ("cannot open a UDP handle, invalid family 16"). So pyroute2's objects are created and awaited on this
    loop, and the daemon's uvloop awaits the results. The raw sockets need no such detour: they use
    ``sock_sendall``/``sock_recv``, which every loop supports.
    """

    def __init__(self) -> None:
        self._loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aproxy-netlink", daemon=True)
        self._thread.start()

    async def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._loop.close()


async def _open_pyroute2() -> tuple[AsyncIPVS, AsyncIPRoute]:
    ipvs = AsyncIPVS()
    try:
        await ipvs.setup_endpoint()
    except (NetlinkError, OSError) as exc:
        ipvs.close()
        raise IPVSUnavailable(f"IPVS generic netlink family not available: {exc}") from exc
    return ipvs, AsyncIPRoute()


async def _close_pyroute2(*sockets: AsyncIPVS | AsyncIPRoute | None) -> None:
    for sock in sockets:
        if sock is not None:
            sock.close()


class IPVSUnavailable(RuntimeError):
    """The kernel has no IPVS (module not loaded, or not permitted)."""


# The kernel's rule for an interface name (dev_valid_name): 1-15 bytes, not "." or "..", no "/", ":" or
# whitespace.
_IFNAMSIZ: Final = 16


def check_device_name(name: str) -> str:
    """``name`` if the kernel would take it for an interface, else ValueError saying why."""
    if not name or len(name.encode()) >= _IFNAMSIZ:
        raise ValueError(f"invalid device name {name!r}: 1 to {_IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(char == "/" or char == ":" or char.isspace() for char in name):
        raise ValueError(f"invalid device name {name!r}: no '/', ':' or whitespace, not '.' or '..'")
    return name


@dataclass(frozen=True, slots=True)
class IPVSSettings:
    device: str = "kube-ipvs0"
    # Where the record of owned virtual servers on addresses not bound on the device is kept.
    state_file: Path = Path("/run/aproxy/owned-virtual-servers.json")
    batch_messages: int = 512
    batch_bytes: int = 128 * 1024
    ack_timeout: float = 10.0
    manage_sysctls: bool = True
    strict_arp: bool = False
    # Source NAT (iptables + ipset): node-to-VIP and hairpin traffic always, once ``masquerade`` is on.
    masquerade: bool = True
    masquerade_all: bool = False
    cluster_cidrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_device_name(self.device)


class IPVSDumpError(BackendError):
    """A dump (or get) reply that could not be parsed: nothing of that reply is used."""


class AddressDumpError(BackendError):
    """An address dump reply that could not be parsed: nothing of that reply is used."""


class NetlinkSocket:
    """A raw netlink socket of one protocol that sends requests in batches and reads dumps to their
    NLMSG_DONE: what the IPVS socket (:class:`BatchSocket`) and the address socket (:class:`AddressSocket`)
    share.

    One request (or batch) at a time: the backend's callers never overlap (the daemon's kernel task runs one
    pass after another), and replies are told from leftovers of a timed-out request by their sequence number.
    """

    # What an unreadable reply raises, and what the error message calls the dump.
    _dump_error: ClassVar[type[BackendError]] = BackendError
    _dump_name: ClassVar[str] = "netlink"

    def __init__(self, protocol: int, settings: IPVSSettings) -> None:
        self._protocol = protocol
        self._settings = settings
        self._seq = itertools.count(1)
        # Totals for tests, benchmarks and metrics: incrementality is asserted on these, not on time.
        self.dumps_sent = 0
        self.dump_receives = 0  # receives the dumps took: more than one per dump once a reply is large
        self.dump_messages = 0  # messages of the dumped type received, before any filtering here
        self.messages_sent = 0  # requests sent in batches: one per operation
        self.batches_sent = 0  # buffers of them sent (one sendmsg each)
        self._sock = self._open_socket()
        self._dump_unfinished = False

    def _open_socket(self) -> socket.socket:
        return open_netlink_socket(self._protocol)

    def close(self) -> None:
        self._sock.close()

    def _replace_socket_after_unfinished_dump(self) -> None:
        """A dump left unfinished (timeout, unreadable part, cancellation) would keep running on this socket,
        and the kernel refuses a second dump on it (EBUSY) until the first is read to its end: the next
        request replaces the socket instead (not at once: the event loop may still hold the old one's
        reader)."""
        if self._dump_unfinished:
            self._sock.close()
            self._sock = self._open_socket()
            self._dump_unfinished = False

    async def send_batches(
        self, operations: Sequence[_Op], encode: Callable[[int, _Op, bool], bytes]
    ) -> list[int]:
        """Send the operations in order, as few buffers as the batch limits allow; return each one's errno
        (0 = applied). ``encode(seq, operation, ack)`` packs one request.

        Each buffer asks an acknowledgement of its last request only: the kernel handles a buffer's requests
        in order and answers every refused one (NLMSG_ERROR with its sequence number) whether asked or not,
        so the last one's acknowledgement means every earlier one without an error was applied.
        """
        results: list[int] = []
        for chunk in self._chunks(operations, encode):
            results.extend(await self._send_chunk(chunk, encode))
        return results

    def _chunks(
        self, operations: Sequence[_Op], encode: Callable[[int, _Op, bool], bytes]
    ) -> Iterator[list[tuple[int, _Op, bytes]]]:
        """The operations with their sequence numbers and requests (no acknowledgement asked yet), cut where a
        buffer would pass ``batch_messages`` requests or ``batch_bytes`` bytes (a single larger request still
        goes alone)."""
        chunk: list[tuple[int, _Op, bytes]] = []
        size = 0
        for op in operations:
            seq = next(self._seq)
            request = encode(seq, op, False)
            if chunk and (
                len(chunk) >= self._settings.batch_messages
                or size + len(request) > self._settings.batch_bytes
            ):
                yield chunk
                chunk, size = [], 0
            chunk.append((seq, op, request))
            size += len(request)
        if chunk:
            yield chunk

    async def _send_chunk(
        self, chunk: list[tuple[int, _Op, bytes]], encode: Callable[[int, _Op, bool], bytes]
    ) -> list[int]:
        last_seq, last_op, _unacknowledged = chunk[-1]
        # The last request packed again, asking the acknowledgement: only the flags differ, not the size.
        buffer = b"".join(request for _seq, _op, request in chunk[:-1]) + encode(last_seq, last_op, True)
        outcome = {seq: 0 for seq, _op, _request in chunk}
        loop = asyncio.get_running_loop()
        self._replace_socket_after_unfinished_dump()
        await loop.sock_sendall(self._sock, buffer)
        self.messages_sent += len(chunk)
        self.batches_sent += 1
        async with asyncio.timeout(self._settings.ack_timeout):
            while True:
                data = await loop.sock_recv(self._sock, 65536)
                for ack in ipvs_wire.parse_acks(data):
                    if ack.seq in outcome:
                        outcome[ack.seq] = ack.error
                    if ack.seq == last_seq:
                        return list(outcome.values())

    async def _dump(self, request: bytes, seq: int, kind: int) -> list[ipvs_wire.Message]:
        """Send one dump request; gather its messages of type ``kind`` from as many receives as it takes, to
        NLMSG_DONE.

        The timeout bounds each receive (no answer for that long), not the whole dump, whatever its size.
        """
        loop = asyncio.get_running_loop()
        self._replace_socket_after_unfinished_dump()
        self._dump_unfinished = True
        finished = False
        try:
            await loop.sock_sendall(self._sock, request)
            self.dumps_sent += 1
            messages: list[ipvs_wire.Message] = []
            while not finished:
                async with asyncio.timeout(self._settings.ack_timeout):
                    data = await loop.sock_recv(self._sock, DUMP_RECEIVE_BYTES)
                self.dump_receives += 1
                for message in ipvs_wire.parse_messages(data, seq):
                    if message.kind == ipvs_wire.NLMSG_DONE:
                        finished = True
                    elif message.kind == kind:
                        messages.append(message)
        except ipvs_wire.MalformedReply as exc:
            raise self._dump_error(f"unreadable {self._dump_name} dump reply: {exc}") from exc
        self._dump_unfinished = False
        self.dump_messages += len(messages)
        return messages


class AddressSocket(NetlinkSocket):
    """A raw rtnetlink socket that binds and unbinds addresses on one interface in batches, and lists the
    addresses bound there: one address dump a call.

    With NETLINK_GET_STRICT_CHK the kernel sends only that interface's addresses; an older kernel ignores the
    index and sends every interface's, so the index is checked here too. Strict checking concerns dump and
    get requests only: address adds and deletes are parsed as before it.
    """

    _dump_error = AddressDumpError
    _dump_name = "address"

    def __init__(self, settings: IPVSSettings) -> None:
        super().__init__(socket.NETLINK_ROUTE, settings)

    def _open_socket(self) -> socket.socket:
        sock = super()._open_socket()
        # Before Linux 4.20 (ENOPROTOOPT) the kernel filters nothing; addresses() checks the index anyway.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        return sock

    async def send(self, operations: Sequence[AddressOperation], index: int) -> list[int]:
        """Bind and unbind on interface ``index`` in order; return each operation's errno (0 = applied):
        EEXIST for an address already bound, EADDRNOTAVAIL for one not bound, ENODEV without the interface.
        """

        def encode(seq: int, op: AddressOperation, ack: bool) -> bytes:
            return rtnl_wire.address_request(seq, op, index, ack=ack)

        return await self.send_batches(operations, encode)

    async def addresses(self, index: int) -> list[rtnl_wire.DumpedAddress]:
        """The IPv4 and IPv6 addresses bound on interface ``index``; none when there is no such interface
        (strict checking answers ENODEV where an unfiltered dump would just hold none of its addresses)."""
        request = rtnl_wire.address_dump_request(seq := next(self._seq), index=index)
        try:
            messages = await self._dump(request, seq, rtnl_wire.RTM_NEWADDR)
        except ipvs_wire.NetlinkErrorReply as exc:
            if exc.errno == errno.ENODEV:
                return []
            raise
        try:
            decoded = [rtnl_wire.decode_address(message) for message in messages]
        except ipvs_wire.MalformedReply as exc:
            raise AddressDumpError(f"unreadable address dump reply: {exc}") from exc
        return [address for address in decoded if address is not None and address.index == index]


class BatchSocket(NetlinkSocket):
    """A raw generic-netlink socket that sends IPVS requests in batches and maps acknowledgements back; it
    also reads dumps, and single virtual servers.
    """

    _dump_error = IPVSDumpError
    _dump_name = "IPVS"

    def __init__(self, family_id: int, settings: IPVSSettings) -> None:
        super().__init__(NETLINK_GENERIC, settings)
        self._family_id = family_id
        self.gets_sent = 0  # requests for one virtual server (not dumps)

    async def send(self, operations: Sequence[ipvs_wire.IPVSOperation]) -> list[int]:
        """Apply the operations in order; return each one's errno (0 = applied)."""
        return await self.send_batches(operations, self._request)

    def _request(self, seq: int, op: ipvs_wire.IPVSOperation, ack: bool) -> bytes:
        command, body = ipvs_wire.request_body(op)
        return ipvs_wire.pack_request(self._family_id, seq, command, body, ack=ack)

    async def services(self) -> list[ipvs_wire.DumpedService]:
        """Every virtual server in the kernel (this network namespace), foreign and firewall-mark ones too."""
        request = ipvs_wire.services_dump_request(self._family_id, seq := next(self._seq))
        messages = await self._dump(request, seq, self._family_id)
        try:
            return [ipvs_wire.decode_service(message) for message in messages]
        except ipvs_wire.MalformedReply as exc:  # a ValueError: the daemon would not take it for a backend's
            raise IPVSDumpError(f"unreadable IPVS service dump: {exc}") from exc

    async def dests(self, key: VirtualServerKey) -> list[ipvs_wire.DumpedDest]:
        """The real servers of one virtual server; none if it does not exist (the kernel's answer, too)."""
        request = ipvs_wire.dests_dump_request(self._family_id, seq := next(self._seq), key)
        family = socket.AF_INET if key.address.version == 4 else socket.AF_INET6
        messages = await self._dump(request, seq, self._family_id)
        try:
            return [ipvs_wire.decode_dest(message, family) for message in messages]
        except ipvs_wire.MalformedReply as exc:
            raise IPVSDumpError(f"unreadable IPVS real server dump of {key}: {exc}") from exc

    async def service(self, key: VirtualServerKey) -> ipvs_wire.DumpedService | None:
        """One virtual server, foreign ones too, by its key: one request, one reply. None when the kernel has
        no such virtual server (ESRCH); any other refusal raises ``NetlinkErrorReply`` as a dump's does."""
        request = ipvs_wire.service_get_request(self._family_id, seq := next(self._seq), key)
        try:
            message = await self._get(request, seq)
        except ipvs_wire.NetlinkErrorReply as exc:
            if exc.errno == errno.ESRCH:
                return None
            raise
        try:
            return ipvs_wire.decode_service(message)
        except ipvs_wire.MalformedReply as exc:
            raise IPVSDumpError(f"unreadable IPVS service reply: {exc}") from exc

    async def _get(self, request: bytes, seq: int) -> ipvs_wire.Message:
        """Send one request that is not a dump; return its one reply message.

        The kernel answers with a single message of the family, or an NLMSG_ERROR (raised by parse_messages);
        no NLMSG_DONE follows, so the first message of ours ends the wait. Leftovers of an earlier request
        that timed out carry other sequence numbers and are passed over. The timeout bounds each receive.
        """
        loop = asyncio.get_running_loop()
        self._replace_socket_after_unfinished_dump()
        await loop.sock_sendall(self._sock, request)
        self.gets_sent += 1
        try:
            while True:
                async with asyncio.timeout(self._settings.ack_timeout):
                    data = await loop.sock_recv(self._sock, DUMP_RECEIVE_BYTES)
                for message in ipvs_wire.parse_messages(data, seq):
                    if message.kind == self._family_id:
                        return message
                    # An acknowledgement or a DONE (neither asked for): the kernel sent no virtual server.
                    raise IPVSDumpError(f"IPVS answered request {seq} with message type {message.kind}")
        except ipvs_wire.MalformedReply as exc:
            raise IPVSDumpError(f"unreadable IPVS reply: {exc}") from exc


class OwnershipRecord:
    """Virtual servers aproxy created on addresses it does not bind (NodePorts, node-address external IPs).

    Written before the kernel is asked (an intent), pruned of what the kernel refused, so a crash in between
    can only leave a record of a virtual server that does not exist, never an owned one that is not recorded.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._keys: set[VirtualServerKey] = set()

    def load(self) -> None:
        try:
            entries = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning(
                "ignoring unreadable ownership record", extra={"path": str(self._path), "error": str(exc)}
            )
            return
        self._keys = {_key_from_record(entry) for entry in entries if isinstance(entry, list)}

    def __contains__(self, key: VirtualServerKey) -> bool:
        return key in self._keys

    def keys(self) -> frozenset[VirtualServerKey]:
        return frozenset(self._keys)

    def update(self, add: Iterable[VirtualServerKey] = (), remove: Iterable[VirtualServerKey] = ()) -> None:
        before = len(self._keys)
        added = set(add) - self._keys
        self._keys |= added
        self._keys -= set(remove)
        if added or len(self._keys) != before:
            self._save()

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        entries = sorted(([k.protocol.value, str(k.address), k.port] for k in self._keys), key=str)
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries))
        os.replace(temporary, self._path)


def _key_from_record(entry: list[Any]) -> VirtualServerKey:
    protocol, address, port = entry
    return VirtualServerKey(L4Protocol(protocol), ip_address(address), int(port))


@dataclass(slots=True)
class IPVSBackend:
    """The Backend Protocol on the kernel. Use as ``async with IPVSBackend(settings) as backend``."""

    settings: IPVSSettings = field(default_factory=IPVSSettings)
    _netlink: NetlinkThread | None = None
    _ipvs: AsyncIPVS | None = None
    _ipr: AsyncIPRoute | None = None
    _batch: BatchSocket | None = None
    _addresses: AddressSocket | None = None
    _device_index: int | None = None
    _bound: set[IPAddress] = field(default_factory=set)
    _record: OwnershipRecord | None = None
    _masquerade: Masquerade | None = None
    _conntrack: ConntrackCleaner | None = None

    async def __aenter__(self) -> IPVSBackend:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the sockets, the device and the node's surroundings. Whatever fails (IPVSUnavailable,
        SysctlError, MasqueradeError, ValueError for a bad cluster CIDR, OSError), what was opened before it,
        the netlink thread included, is closed again before the error goes on."""
        self._netlink = NetlinkThread()
        try:
            await self._open(self._netlink)
        except Exception:
            await self.close()
            raise

    async def _open(self, netlink: NetlinkThread) -> None:
        ipvs, self._ipr = await netlink.run(_open_pyroute2())
        self._ipvs = ipvs
        self._batch = BatchSocket(ipvs.prid, self.settings)
        self._addresses = AddressSocket(self.settings)
        self._record = OwnershipRecord(self.settings.state_file)
        self._record.load()
        self._device_index = await self._ensure_device()
        self._bound = await self._device_addresses()
        await self._prepare_node()

    async def _prepare_node(self) -> None:
        """What IPVS needs around it: sysctls, source NAT chains and sets, the conntrack cleaner."""
        if self.settings.manage_sysctls:
            await apply_sysctls(wanted_sysctls(os.uname().release, strict_arp=self.settings.strict_arp))
        if self.settings.masquerade:
            self._masquerade = Masquerade(
                MasqueradeSettings(self.settings.masquerade_all, self.settings.cluster_cidrs)
            )
            await self._masquerade.ensure()
        self._conntrack = ConntrackCleaner()

    @property
    def masquerade(self) -> Masquerade | None:
        return self._masquerade

    @property
    def netlink_messages_sent(self) -> int:
        """IPVS requests sent so far (one per IPVS operation; address changes are not counted)."""
        return self._batch.messages_sent if self._batch is not None else 0

    @property
    def netlink_batches_sent(self) -> int:
        """Buffers of IPVS requests sent so far (one sendmsg each)."""
        return self._batch.batches_sent if self._batch is not None else 0

    @property
    def netlink_dumps_sent(self) -> int:
        """IPVS dump requests sent so far: one per service dump, one per virtual server's real servers."""
        return self._batch.dumps_sent if self._batch is not None else 0

    @property
    def netlink_gets_sent(self) -> int:
        """IPVS requests for one virtual server sent so far (``read``: one per owned key asked for)."""
        return self._batch.gets_sent if self._batch is not None else 0

    @property
    def netlink_address_messages_sent(self) -> int:
        """Address binds and unbinds sent so far (one request each); not in ``netlink_messages_sent``."""
        return self._addresses.messages_sent if self._addresses is not None else 0

    @property
    def netlink_address_batches_sent(self) -> int:
        """Buffers of address binds and unbinds sent so far (one sendmsg each)."""
        return self._addresses.batches_sent if self._addresses is not None else 0

    @property
    def netlink_address_dumps_sent(self) -> int:
        """Address dumps of the dummy device sent so far (one per ``dump``, ``read`` and ``open``); not
        counted in ``netlink_dumps_sent``, which counts IPVS dumps only."""
        return self._addresses.dumps_sent if self._addresses is not None else 0

    async def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
        if self._addresses is not None:
            self._addresses.close()
        if self._masquerade is not None:
            self._masquerade.close()
        if self._netlink is not None:
            await self._netlink.run(_close_pyroute2(self._ipvs, self._ipr))
            await self._netlink.stop()
        self._batch = self._addresses = self._ipvs = self._ipr = self._netlink = None

    # --- the Backend Protocol ----------------------------------------------------------------------------

    async def apply(self, operations: Sequence[Operation]) -> list[OperationResult]:
        """Apply in order: runs of IPVS operations and runs of address changes alternate as they come, each
        run sent in batches on its own socket."""
        results: list[OperationResult] = []
        for is_address, run in itertools.groupby(
            operations, key=lambda op: isinstance(op, BindAddress | UnbindAddress)
        ):
            ops = list(run)
            if is_address:
                results.extend(await self._apply_addresses(ops))  # type: ignore[arg-type]
            else:
                results.extend(await self._apply_ipvs(ops))  # type: ignore[arg-type]
        return results

    async def dump(self) -> IPVSState:
        """The owned part of the kernel's IPVS state."""
        state = IPVSState()
        self._bound = await self._device_addresses()
        for address in self._bound:
            state.apply(BindAddress(address))
        for key, spec in await self._dump_services():
            if self._owns(key):
                state.apply(AddVirtualServer(key, spec))
                for real, weight, _conns in await self._dump_dests(key):
                    state.apply(AddRealServer(key, RealServer(real.address, real.port, weight)))
        if self._masquerade is not None:
            # A dump is the start-up adoption and the audit: the time to repair the chains and the set.
            try:
                await self._masquerade.ensure()
                await self._masquerade.resync(state)
            except MasqueradeError as exc:
                log.error("source NAT repair failed", extra={"error": str(exc)})  # IPVS state still good
        return state

    async def read(self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]) -> IPVSState:
        """The owned state of just these virtual servers and addresses, as ``dump()`` would show it.

        One address dump of the device (ownership depends on it), then per owned key one get of the virtual
        server and, when it exists, one dump of its real servers: the cost of the keys, not of the node. A
        foreign key is not asked about at all. No source NAT repair: that is the audit's, through ``dump()``.
        """
        state = IPVSState()
        self._bound = await self._device_addresses()
        for address in addresses:
            state.set_bound(address, address in self._bound)
        for key in sorted(keys, key=VirtualServerKey.sort_key):
            if not self._owns(key):
                continue
            spec = await self._service_spec(key)
            if spec is not None:
                reals = {real: weight for real, weight, _conns in await self._dump_dests(key)}
                state.replace_virtual(key, spec, reals)
        return state

    # --- beyond the Protocol: what the drain and cleanup need -----------------------------------------------

    async def connections(self, key: VirtualServerKey) -> dict[RealServerKey, RealServerConnections]:
        return {real: conns for real, _weight, conns in await self._dump_dests(key)}

    async def cleanup(self) -> int:
        """Remove every owned virtual server, every bound address and the device; return how many removed."""
        owned = [key for key, _spec in await self._dump_services() if self._owns(key)]
        results = await self._apply_ipvs([DeleteVirtualServer(key) for key in owned])
        assert self._ipr is not None and self._device_index is not None
        await self._nl(self._ipr.link("del", index=self._device_index))
        self._device_index = None
        self._bound.clear()
        assert self._record is not None
        self._record.update(remove=self._record.keys())
        # Also when masquerading is off now: a run before may have left the chains and sets.
        masquerade = self._masquerade or Masquerade()
        await masquerade.cleanup()
        return sum(result.ok for result in results)

    # --- internals ---------------------------------------------------------------------------------------

    async def _nl(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        assert self._netlink is not None, "IPVSBackend used before open()"
        return await self._netlink.run(coroutine)

    def _owns(self, key: VirtualServerKey) -> bool:
        assert self._record is not None
        return key.address in self._bound or key in self._record

    async def _apply_ipvs(self, ops: Sequence[ipvs_wire.IPVSOperation]) -> list[OperationResult]:
        assert self._batch is not None and self._record is not None
        unbound_adds = [
            op.key for op in ops if isinstance(op, AddVirtualServer) and op.key.address not in self._bound
        ]
        self._record.update(add=unbound_adds)
        codes = await self._send_adds_first(ops)
        refused_adds = [
            op.key for op, code in zip(ops, codes, strict=True) if code and isinstance(op, AddVirtualServer)
        ]
        deleted = [
            op.key
            for op, code in zip(ops, codes, strict=True)
            if not code and isinstance(op, DeleteVirtualServer)
        ]
        self._record.update(remove=[*refused_adds, *deleted])
        results = [_result(op, code) for op, code in zip(ops, codes, strict=True)]
        await self._after_batch(results)
        return results

    async def _send_adds_first(self, ops: Sequence[ipvs_wire.IPVSOperation]) -> list[int]:
        """Send virtual server adds as a batch of their own, then everything else but what a refusal voids.

        An add refused with EEXIST means another program's virtual server holds the key (keepalived's on a
        node address, say). Real servers sent in the same batch would land in that foreign virtual server, so
        operations on a refused key are not sent (ECANCELED). The planner emits adds before real server
        operations and deletes anyway, so this keeps its order; it costs one extra round trip per apply.
        """
        assert self._batch is not None
        add_indexes = [index for index, op in enumerate(ops) if isinstance(op, AddVirtualServer)]
        if not add_indexes:
            return await self._batch.send(ops)
        codes = [0] * len(ops)
        refused: set[VirtualServerKey | None] = set()
        for index, code in zip(
            add_indexes, await self._batch.send([ops[i] for i in add_indexes]), strict=True
        ):
            codes[index] = code
            if code:
                refused.add(virtual_server_of(ops[index]))
        rest = [i for i, op in enumerate(ops) if not isinstance(op, AddVirtualServer)]
        to_send = [i for i in rest if virtual_server_of(ops[i]) not in refused]
        if to_send:
            for index, code in zip(to_send, await self._batch.send([ops[i] for i in to_send]), strict=True):
                codes[index] = code
        for index in set(rest) - set(to_send):
            codes[index] = errno.ECANCELED
        return codes

    async def _after_batch(self, results: Sequence[OperationResult]) -> None:
        """Follow the kernel's changes outside IPVS: the hairpin set, then stale UDP conntrack entries."""
        if self._masquerade is not None:
            try:
                await self._masquerade.observe(results)
            except MasqueradeError as exc:
                # The IPVS changes stand; the next audit's resync repairs the set from the kernel.
                log.error("hairpin set update failed", extra={"error": str(exc)})
        if self._conntrack is not None:
            await self._conntrack.observe(results)

    async def _apply_addresses(self, ops: Sequence[AddressOperation]) -> list[OperationResult]:
        """Bind and unbind on the dummy device in batches; ``_bound`` follows what the kernel applied."""
        assert self._addresses is not None, "IPVSBackend used before open()"
        assert self._device_index is not None, "IPVSBackend used after cleanup() deleted the device"
        codes = await self._addresses.send(ops, self._device_index)
        for op, code in zip(ops, codes, strict=True):
            if code:
                continue
            if isinstance(op, BindAddress):
                self._bound.add(op.address)
            else:
                self._bound.discard(op.address)
        return [_result(op, code) for op, code in zip(ops, codes, strict=True)]

    async def _ensure_device(self) -> int:
        assert self._ipr is not None
        name = self.settings.device
        indexes = await self._nl(self._ipr.link_lookup(ifname=name))
        if not indexes:
            log.info("creating dummy device", extra={"device": name})
            try:
                await self._nl(self._ipr.link("add", ifname=name, kind="dummy"))
            except NetlinkError as exc:  # no dummy driver (EOPNOTSUPP), not permitted (EPERM), ...
                raise OSError(
                    exc.code, f"cannot create the dummy device {name}: {os.strerror(exc.code)}"
                ) from exc
            indexes = await self._nl(self._ipr.link_lookup(ifname=name))
        # Down is enough for the kernel to accept packets for its addresses and keeps it from answering ARP
        # the way an up device would; kube-proxy leaves kube-ipvs0 down too.
        return int(indexes[0])

    async def _device_addresses(self) -> set[IPAddress]:
        """Every address bound on the dummy device: one address dump."""
        assert self._addresses is not None, "IPVSBackend used before open()"
        assert self._device_index is not None, "IPVSBackend used after cleanup() deleted the device"
        return {found.address for found in await self._addresses.addresses(self._device_index)}

    async def _dump_services(self) -> list[tuple[VirtualServerKey, VirtualServerSpec]]:
        assert self._batch is not None, "IPVSBackend used before open()"
        services = []
        for service in await self._batch.services():
            protocol = _PROTOCOLS_BY_NUMBER.get(service.protocol)
            if protocol is None or service.fwmark or service.address is None:
                continue  # firewall-mark and other-protocol services are never aproxy's
            services.append((VirtualServerKey(protocol, service.address, service.port), _spec_of(service)))
        return services

    async def _service_spec(self, key: VirtualServerKey) -> VirtualServerSpec | None:
        assert self._batch is not None, "IPVSBackend used before open()"
        service = await self._batch.service(key)
        return None if service is None else _spec_of(service)

    async def _dump_dests(
        self, key: VirtualServerKey
    ) -> list[tuple[RealServerKey, int, RealServerConnections]]:
        assert self._batch is not None, "IPVSBackend used before open()"
        return [
            (
                RealServerKey(dest.address, dest.port),
                dest.weight,
                RealServerConnections(dest.active_connections, dest.inactive_connections),
            )
            for dest in await self._batch.dests(key)
        ]


def _spec_of(service: ipvs_wire.DumpedService) -> VirtualServerSpec:
    flags = service.flags
    timeout = service.timeout if flags & ipvs_wire.SVC_F_PERSISTENT else 0
    names = frozenset(name for name, bit in ipvs_wire.SCHED_FLAGS.items() if flags & bit)
    return VirtualServerSpec(scheduler=service.scheduler, persistence_timeout=timeout, flags=names)


def _result(op: Operation, code: int) -> OperationResult:
    if not code:
        return OperationResult(op)
    if code == errno.ECANCELED:
        return OperationResult(op, error="not sent: its virtual server could not be added", errno=code)
    return OperationResult(op, error=os.strerror(code), errno=code)
