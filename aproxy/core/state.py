"""The IPVS state of this node as aproxy sees it: virtual servers, their real servers, and bound addresses.

One mutable ``IPVSState`` serves three roles: the planner's record of what the kernel holds (its *applied*
state), the memory backend's "kernel", and the expected result of programming a set of services from scratch
(``from_services``). ``apply`` mutates it exactly as the kernel would and rejects what the kernel rejects,
with the errno the kernel answers, so that tests on the memory backend catch the mistakes the kernel would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from errno import EADDRNOTAVAIL, EEXIST, ENOENT, ESRCH
from types import MappingProxyType

from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    BindAddress,
    DeleteRealServer,
    DeleteVirtualServer,
    IPAddress,
    Operation,
    RealServerKey,
    ServiceState,
    UnbindAddress,
    UpdateRealServer,
    UpdateVirtualServer,
    VirtualServerKey,
    VirtualServerSpec,
)


class StateError(Exception):
    """An operation the kernel would reject. ``errno`` is the (positive) error number it would answer."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class AlreadyExists(StateError):
    """Adding what is already there (EEXIST)."""


class NotFound(StateError):
    """Changing or deleting what is not there.

    The kernel's errno depends on what is missing: ESRCH for a virtual server, ENOENT for a real server,
    EADDRNOTAVAIL for an address that is not bound.
    """


@dataclass(slots=True)
class _Virtual:
    spec: VirtualServerSpec
    # Insertion-ordered; compared as a mapping, so order never matters for equality.
    reals: dict[RealServerKey, int] = field(default_factory=dict)


class IPVSState:
    """Virtual servers (key -> spec, real servers with weights) and the addresses bound on the dummy device.

    Equality compares only what the kernel holds, in any order.
    """

    __slots__ = ("_addresses", "_virtual")

    def __init__(self) -> None:
        self._virtual: dict[VirtualServerKey, _Virtual] = {}
        self._addresses: set[IPAddress] = set()

    # --- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_services(cls, states: Iterable[ServiceState]) -> IPVSState:
        """The state that programming these services from scratch yields.

        When two services claim the same virtual server key the first one keeps it (the planner's rule: the
        current owner keeps a contested key); a real server key repeated inside one virtual server counts
        once (the first one wins, as in the planner).
        """
        state = cls()
        for service in states:
            state._addresses.update(service.bind_addresses)
            for virtual in service.virtual_servers:
                if virtual.key in state._virtual:
                    continue
                reals: dict[RealServerKey, int] = {}
                for real in virtual.real_servers:
                    reals.setdefault(real.key, real.weight)
                state._virtual[virtual.key] = _Virtual(virtual.spec, reals)
        return state

    def copy(self) -> IPVSState:
        clone = IPVSState()
        clone._virtual = {key: _Virtual(v.spec, dict(v.reals)) for key, v in self._virtual.items()}
        clone._addresses = set(self._addresses)
        return clone

    # --- mutation ------------------------------------------------------------------------------------------

    def apply(self, op: Operation) -> None:
        """Apply one operation as the kernel would, or raise the ``StateError`` the kernel would answer."""
        match op:
            case AddVirtualServer(key=key, spec=spec):
                if key in self._virtual:
                    raise AlreadyExists(f"virtual server {key} exists", EEXIST)
                self._virtual[key] = _Virtual(spec)
            case UpdateVirtualServer(key=key, spec=spec):
                self._need_virtual(key).spec = spec
            case DeleteVirtualServer(key=key):
                self._need_virtual(key)
                # The kernel drops a virtual server together with its real servers.
                del self._virtual[key]
            case AddRealServer(virtual=key, real=real):
                reals = self._need_virtual(key).reals
                if real.key in reals:
                    raise AlreadyExists(f"real server {real.key} exists in {key}", EEXIST)
                reals[real.key] = real.weight
            case UpdateRealServer(virtual=key, real=real):
                self._need_real(key, real.key)[real.key] = real.weight
            case DeleteRealServer(virtual=key, real=real_key):
                del self._need_real(key, real_key)[real_key]
            case BindAddress(address=address):
                if address in self._addresses:
                    raise AlreadyExists(f"address {address} is bound", EEXIST)
                self._addresses.add(address)
            case UnbindAddress(address=address):
                if address not in self._addresses:
                    raise NotFound(f"address {address} is not bound", EADDRNOTAVAIL)
                self._addresses.remove(address)

    def assume(self, op: Operation) -> None:
        """Make the state what it is after ``op`` succeeded in the kernel, whatever it was before.

        ``apply`` checks preconditions; this does not, because the kernel already said yes: an applied
        state that disagrees with the kernel is brought back in line rather than left to fail forever.
        A real-server change on a virtual server that is not here creates it with the default spec only
        when the kernel must have had it, which is every real-server operation.
        """
        match op:
            case AddVirtualServer(key=key, spec=spec) | UpdateVirtualServer(key=key, spec=spec):
                existing = self._virtual.get(key)
                if existing is None:
                    self._virtual[key] = _Virtual(spec)
                else:
                    existing.spec = spec
            case DeleteVirtualServer(key=key):
                self._virtual.pop(key, None)
            case AddRealServer(virtual=key, real=real) | UpdateRealServer(virtual=key, real=real):
                self._virtual.setdefault(key, _Virtual(VirtualServerSpec())).reals[real.key] = real.weight
            case DeleteRealServer(virtual=key, real=real_key):
                virtual = self._virtual.get(key)
                if virtual is not None:
                    virtual.reals.pop(real_key, None)
            case BindAddress(address=address):
                self._addresses.add(address)
            case UnbindAddress(address=address):
                self._addresses.discard(address)

    def replace_virtual(
        self,
        key: VirtualServerKey,
        spec: VirtualServerSpec | None,
        reals: Mapping[RealServerKey, int] | None = None,
    ) -> None:
        """Overwrite one virtual server (``spec`` None: remove it): reconciling with a kernel read."""
        if spec is None:
            self._virtual.pop(key, None)
        else:
            self._virtual[key] = _Virtual(spec, dict(reals or {}))

    def set_bound(self, address: IPAddress, bound: bool) -> None:
        """Overwrite whether one address is bound: reconciling with a kernel read."""
        if bound:
            self._addresses.add(address)
        else:
            self._addresses.discard(address)

    def _need_virtual(self, key: VirtualServerKey) -> _Virtual:
        virtual = self._virtual.get(key)
        if virtual is None:
            raise NotFound(f"no virtual server {key}", ESRCH)
        return virtual

    def _need_real(self, key: VirtualServerKey, real_key: RealServerKey) -> dict[RealServerKey, int]:
        reals = self._need_virtual(key).reals
        if real_key not in reals:
            raise NotFound(f"no real server {real_key} in {key}", ENOENT)
        return reals

    # --- reading (all O(1) unless they say otherwise) -------------------------------------------------------

    def has_virtual(self, key: VirtualServerKey) -> bool:
        return key in self._virtual

    def spec(self, key: VirtualServerKey) -> VirtualServerSpec | None:
        virtual = self._virtual.get(key)
        return None if virtual is None else virtual.spec

    def real_servers(self, key: VirtualServerKey) -> Mapping[RealServerKey, int]:
        """Read-only live view of one virtual server's real servers (empty when it does not exist)."""
        virtual = self._virtual.get(key)
        return MappingProxyType(virtual.reals if virtual is not None else {})

    def weight(self, key: VirtualServerKey, real_key: RealServerKey) -> int | None:
        virtual = self._virtual.get(key)
        return None if virtual is None else virtual.reals.get(real_key)

    def is_bound(self, address: IPAddress) -> bool:
        return address in self._addresses

    def virtual_keys(self) -> Iterator[VirtualServerKey]:
        """Iterate the virtual server keys (do not mutate the state meanwhile)."""
        return iter(self._virtual)

    def addresses(self) -> frozenset[IPAddress]:
        """The bound addresses (a copy: O(number of addresses))."""
        return frozenset(self._addresses)

    def __len__(self) -> int:
        """Number of virtual servers."""
        return len(self._virtual)

    def real_server_count(self) -> int:
        """Number of real servers over all virtual servers (O(virtual servers))."""
        return sum(len(v.reals) for v in self._virtual.values())

    def differences(self, other: IPVSState) -> tuple[set[VirtualServerKey], set[IPAddress]]:
        """The virtual server keys and addresses on which the two states disagree (O(size), no hashing of
        real servers: dict comparisons reuse the stored hashes)."""
        keys = {key for key in self._virtual.keys() ^ other._virtual.keys()}
        for key, virtual in self._virtual.items():
            theirs = other._virtual.get(key)
            if theirs is not None and theirs != virtual:
                keys.add(key)
        return keys, self._addresses ^ other._addresses

    def differences_among(
        self, other: IPVSState, keys: Iterable[VirtualServerKey], addresses: Iterable[IPAddress]
    ) -> tuple[set[VirtualServerKey], set[IPAddress]]:
        """``differences`` restricted to these keys and addresses (``other`` was read for just them)."""
        differing = {key for key in keys if self._virtual.get(key) != other._virtual.get(key)}
        unbound = {
            address for address in addresses if (address in self._addresses) != (address in other._addresses)
        }
        return differing, unbound

    def outline_differences(self, outline: IPVSState) -> set[VirtualServerKey]:
        """Where ``outline`` (the kernel's virtual servers and specs, real servers not read) disagrees with
        this state: keys on one side only, or with a different spec."""
        keys = set(self._virtual.keys() ^ outline._virtual.keys())
        for key, virtual in self._virtual.items():
            theirs = outline._virtual.get(key)
            if theirs is not None and theirs.spec != virtual.spec:
                keys.add(key)
        return keys

    def address_differences(self, bound: AbstractSet[IPAddress]) -> set[IPAddress]:
        """The addresses bound on one side only: here, or in ``bound`` (the kernel's)."""
        return set(self._addresses ^ bound)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IPVSState):
            return NotImplemented
        return self._addresses == other._addresses and self._virtual == other._virtual

    def __repr__(self) -> str:
        return (
            f"IPVSState({len(self._virtual)} virtual servers, {self.real_server_count()} real servers, "
            f"{len(self._addresses)} addresses)"
        )
