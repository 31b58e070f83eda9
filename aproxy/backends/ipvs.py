"""The Linux IPVS backend: the Backend Protocol on the kernel, and the only module that drives pyroute2.

- IPVS operations go out in batches on :class:`~aproxy.backends.ipvs_socket.IPVSSocket` (generic netlink),
  binding and unbinding the dummy device's addresses on
  :class:`~aproxy.backends.address_socket.AddressSocket` (rtnetlink): many requests per ``sendmsg``, every
  error mapped back to its operation by sequence number (netlink_socket.py).
- Reads go through the same raw sockets, parsed by hand: a full dump (start-up, audit) is one service dump,
  then one destination dump per owned virtual server; a read of a few virtual servers (reconciling after
  EEXIST, ENOENT, ...) is one get per virtual server and one destination dump per one that exists, whatever
  the node holds. Each also lists the dummy device's addresses (one address dump).
- Only creating, finding and deleting the device go through pyroute2's asyncio API (``AsyncIPRoute``, on a
  loop of its own: pyroute2_thread.py); ``AsyncIPVS`` only resolves the IPVS generic-netlink family at open.
- Ownership: aproxy changes only virtual servers whose address is bound on its dummy device, or that it
  created on another address and recorded in its state file (ownership.py). Everything else in the kernel
  (keepalived's, an operator's) is invisible to it.
- Around IPVS: the sysctls it needs (sysctl.py, at open), source NAT for node, hairpin and optionally other
  traffic (masquerade.py: chains at open, hairpin set after every batch, both repaired by the start-up dump
  and at the end of every audit round, ``repair_nat_steps``),
  and stale UDP conntrack entries deleted after every batch that removed UDP real servers (conntrack.py).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from pyroute2 import AsyncIPRoute, AsyncIPVS
from pyroute2.netlink.exceptions import NetlinkError

from aproxy.backends import ipvs_wire
from aproxy.backends.address_socket import AddressOperation, AddressSocket
from aproxy.backends.base import DestinationUsage, OperationResult, RealServerConnections
from aproxy.backends.conntrack import ConntrackCleaner
from aproxy.backends.ipvs_socket import IPVSSocket
from aproxy.backends.ipvs_wire import IPVSTimeouts
from aproxy.backends.masquerade import Masquerade, MasqueradeError
from aproxy.backends.nat_rules import MasqueradeSettings, every_address
from aproxy.backends.netlink_socket import BatchLimits
from aproxy.backends.ownership import OwnershipRecord
from aproxy.backends.pyroute2_thread import NetlinkThread
from aproxy.backends.sysctl import apply_sysctls, wanted_sysctls
from aproxy.core.datapath import SetDelta, SetEntry
from aproxy.core.model import (
    AddVirtualServer,
    BindAddress,
    DeleteVirtualServer,
    IPAddress,
    Operation,
    RealServerKey,
    UnbindAddress,
    VirtualServerKey,
    VirtualServerSpec,
    virtual_server_of,
)
from aproxy.core.node_addresses import NodePortAddresses
from aproxy.core.state import IPVSState

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_PROTOCOLS_BY_NUMBER = {number: protocol for protocol, number in ipvs_wire.PROTOCOL_NUMBERS.items()}


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
    # Set when the backend opens (kube-proxy's --ipvs-tcp-timeout and friends); zeros change nothing.
    timeouts: IPVSTimeouts = field(default_factory=IPVSTimeouts)
    # --nodeport-addresses: CIDRs, ("primary",), or () for every local address (core/node_addresses.py).
    nodeport_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_device_name(self.device)
        NodePortAddresses.parse(self.nodeport_addresses)  # ValueError now, not at start-up

    @property
    def batch_limits(self) -> BatchLimits:
        return BatchLimits(self.batch_messages, self.batch_bytes, self.ack_timeout)


@dataclass(slots=True)
class IPVSBackend:
    """The Backend Protocol on the kernel. Use as ``async with IPVSBackend(settings) as backend``."""

    settings: IPVSSettings = field(default_factory=IPVSSettings)
    _netlink: NetlinkThread | None = None
    _ipvs: AsyncIPVS | None = None
    _ipr: AsyncIPRoute | None = None
    _batch: IPVSSocket | None = None
    _addresses: AddressSocket | None = None
    _device_index: int | None = None
    _bound: set[IPAddress] = field(default_factory=set)
    _record: OwnershipRecord | None = None
    _masquerade: Masquerade | None = None
    # Which real server addresses are endpoints on this node: the hairpin set's filter (set_local_endpoints).
    _is_local: Callable[[IPAddress], bool] = every_address
    _conntrack: ConntrackCleaner | None = None
    # Backend addresses seen with connections by the dumps (the health checks' scope "used").
    usage: DestinationUsage = field(default_factory=DestinationUsage)

    async def __aenter__(self) -> IPVSBackend:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self, *, prepare: bool = True) -> None:
        """Open the sockets, the device and the node's surroundings. Whatever fails (IPVSUnavailable,
        SysctlError, MasqueradeError, ValueError for a bad cluster CIDR, OSError), what was opened before it,
        the netlink thread included, is closed again before the error goes on.

        ``prepare=False`` (what ``cleanup`` needs) changes nothing on the node: an existing device is used
        but none is created, and no sysctl, chain or set is written."""
        self._netlink = NetlinkThread()
        try:
            await self._open(self._netlink, prepare)
        except Exception:
            await self.close()
            raise

    async def _open(self, netlink: NetlinkThread, prepare: bool) -> None:
        ipvs, self._ipr = await netlink.run(_open_pyroute2())
        self._ipvs = ipvs
        self._batch = IPVSSocket(ipvs.prid, self.settings.batch_limits)
        self._addresses = AddressSocket(self.settings.batch_limits)
        self._record = OwnershipRecord(self.settings.state_file)
        self._record.load()
        if prepare:
            self._device_index = await self._ensure_device()
        else:
            self._device_index = await self._find_device()
        self._bound = await self._device_addresses() if self._device_index is not None else set()
        if prepare:
            await self._prepare_node()

    async def _prepare_node(self) -> None:
        """What IPVS needs around it: sysctls, source NAT chains and sets, the conntrack cleaner."""
        if self.settings.manage_sysctls:
            await apply_sysctls(wanted_sysctls(os.uname().release, strict_arp=self.settings.strict_arp))
        if self.settings.masquerade:
            self._masquerade = Masquerade(
                MasqueradeSettings(self.settings.masquerade_all, self.settings.cluster_cidrs), self._is_local
            )
            await self._masquerade.ensure()
        self._conntrack = ConntrackCleaner()
        if not self.settings.timeouts.unchanged:
            await self._set_timeouts(self.settings.timeouts)

    async def _set_timeouts(self, timeouts: IPVSTimeouts) -> None:
        assert self._batch is not None
        error = await self._batch.set_timeouts(timeouts)
        if error:
            raise OSError(error, f"cannot set the IPVS timeouts {timeouts}: {os.strerror(error)}")
        log.info(
            "IPVS timeouts set", extra={"tcp": timeouts.tcp, "tcp_fin": timeouts.tcp_fin, "udp": timeouts.udp}
        )

    @property
    def masquerade(self) -> Masquerade | None:
        return self._masquerade

    def set_local_endpoints(self, is_local: Callable[[IPAddress], bool]) -> None:
        """Only real servers whose address ``is_local`` says is an endpoint on this node join the hairpin set
        (the syncer passes its ``is_local_endpoint``: ``LocalEndpointFilter``; default: every real server)."""
        self._is_local = is_local
        if self._masquerade is not None:
            self._masquerade.set_local_endpoints(is_local)

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
        bound = await self.bound_addresses()  # first: ownership depends on it
        state = await self.outline()
        for address in bound:
            state.apply(BindAddress(address))
        for key in list(state.virtual_keys()):
            reals = {real: weight for real, weight, _conns in await self._dump_dests(key)}
            state.replace_virtual(key, state.spec(key), reals)
        # A dump is the start-up adoption: the time to repair the chains and the sets.
        await self.repair_nat(state)
        return state

    async def bound_addresses(self) -> frozenset[IPAddress]:
        self._bound = await self._device_addresses()
        return frozenset(self._bound)

    async def outline(self) -> IPVSState:
        # Ownership as aproxy's binds and its last address dump say: the audit dumps the addresses in the
        # slice before (each dump is a pass of its own: 0.25 s and 0.48 s at 10,000 services in the guest).
        state = IPVSState()
        for key, spec in await self._dump_services():
            if self._owns(key):
                state.apply(AddVirtualServer(key, spec))
        return state

    async def repair_nat(self, state: IPVSState) -> None:
        """Repair the chains and the sets that follow IPVS to match ``state`` (start-up, in one go)."""
        async for _ in self.repair_nat_steps(lambda: state):
            pass

    async def repair_nat_steps(self, applied: Callable[[], IPVSState]) -> AsyncIterator[None]:
        if self._masquerade is None:
            return
        try:
            async for _ in self._masquerade.ensure_steps():
                yield
            await self._masquerade.resync(applied())
        except MasqueradeError as exc:
            log.error("source NAT repair failed", extra={"error": str(exc)})  # IPVS state still good

    async def read(self, keys: Collection[VirtualServerKey], addresses: Collection[IPAddress]) -> IPVSState:
        """The owned state of just these virtual servers and addresses, as ``dump()`` would show it.

        One address dump of the device when addresses are asked about or a key does not look owned (its
        address not bound as far as aproxy's binds and its last dump say, and not recorded), then per owned
        key one get of the virtual server and, when it exists, one dump of its real servers: the cost of the
        keys, not of the node. A foreign key is not asked about at all. No source NAT repair: that is the
        audit's, through ``dump()``.
        """
        state = IPVSState()
        # The audit's slices of real servers ask only about keys aproxy made on addresses it bound: at 10,000
        # bound addresses the dump was most of such a slice's time. An address unbound behind aproxy's back
        # is the audit's to find (each round dumps the addresses once).
        if addresses or not all(self._owns(key) for key in keys):
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

    # --- the ServiceSets Protocol (base.py): the service sets around IPVS -----------------------------------

    async def update_services(self, delta: SetDelta) -> None:
        if self._masquerade is not None:
            await self._sets("update", self._masquerade.update_services(delta))

    async def resync_services(self, entries: frozenset[SetEntry]) -> None:
        if self._masquerade is not None:
            await self._sets("repair", self._masquerade.resync_services(entries))

    @staticmethod
    async def _sets(what: str, change: Coroutine[Any, Any, object]) -> None:
        try:
            await change
        except MasqueradeError as exc:
            # The IPVS changes stand; the next audit's resync repairs the sets.
            log.error(f"service set {what} failed", extra={"error": str(exc)})

    # --- beyond the Protocol: what the drain and cleanup need -----------------------------------------------

    async def connections(self, key: VirtualServerKey) -> dict[RealServerKey, RealServerConnections]:
        return {real: conns for real, _weight, conns in await self._dump_dests(key)}

    async def cleanup(self) -> int:
        """Remove every owned virtual server, every bound address and the device; return how many removed."""
        owned = [key for key, _spec in await self._dump_services() if self._owns(key)]
        results = await self._apply_ipvs([DeleteVirtualServer(key) for key in owned])
        assert self._ipr is not None
        if self._device_index is not None:
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
        results = [_result(op, code) for op, code in zip(ops, codes, strict=True)]
        await self._after_batch(results)  # the service-IP filter's set follows the device's addresses
        return results

    async def _find_device(self) -> int | None:
        assert self._ipr is not None
        indexes = await self._nl(self._ipr.link_lookup(ifname=self.settings.device))
        return int(indexes[0]) if indexes else None

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
        dests = []
        for dest in await self._batch.dests(key):
            conns = RealServerConnections(dest.active_connections, dest.inactive_connections)
            self.usage.observe(dest.address, conns)  # the health checks' scope "used"
            dests.append((RealServerKey(dest.address, dest.port), dest.weight, conns))
        return dests


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
