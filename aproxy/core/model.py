"""Value types of the desired and applied IPVS state, and the operations that change it.

Everything here is immutable and stdlib-only: the core computes with these, the backends carry them to the
kernel (or to memory). IPv4 and IPv6 addresses are ``ipaddress`` objects; because the two families do not
compare with each other, ordering always goes through the explicit ``sort_key`` functions below.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar, TypeAlias

IPAddress: TypeAlias = IPv4Address | IPv6Address

# The schedulers the IPVS kernel module family provides (ip_vs_<name>); kube-router's and kube-proxy's set.
SCHEDULERS: frozenset[str] = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh"}
)
DEFAULT_SCHEDULER = "rr"
DEFAULT_WEIGHT = 1


class L4Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


def address_sort_key(address: IPAddress) -> tuple[int, int]:
    """IPv4 before IPv6, then numerically (``str`` order would put 10.0.0.10 before 10.0.0.9)."""
    return (address.version, int(address))


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A Kubernetes Service's identity."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class VirtualServerKey:
    """What identifies an IPVS virtual service in the kernel: (protocol, address, port)."""

    protocol: L4Protocol
    address: IPAddress
    port: int

    def sort_key(self) -> tuple[str, int, int, int]:
        version, number = address_sort_key(self.address)
        return (self.protocol.value, version, number, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.protocol.value} {host}:{self.port}"


@dataclass(frozen=True, slots=True)
class VirtualServerSpec:
    """The editable attributes of a virtual server: changing them is an in-place update, never a re-create.

    ``flags`` holds IPVS scheduler flags by their canonical names ``flag-1``, ``flag-2``, ``flag-3``
    (ipvsadm's ``sh-fallback``/``mh-fallback`` are ``flag-1``, ``sh-port``/``mh-port`` are ``flag-2``), so
    that a spec read back from the kernel compares equal. Persistence is ``persistence_timeout`` (seconds,
    0 = none), not a flag.
    """

    scheduler: str = DEFAULT_SCHEDULER
    persistence_timeout: int = 0
    flags: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class RealServerKey:
    """What identifies a real server inside its virtual server."""

    address: IPAddress
    port: int

    def sort_key(self) -> tuple[int, int, int]:
        return (*address_sort_key(self.address), self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RealServer:
    address: IPAddress
    port: int
    weight: int = DEFAULT_WEIGHT

    @property
    def key(self) -> RealServerKey:
        return RealServerKey(self.address, self.port)


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """One desired virtual server with its real servers (sorted by address, port; keys unique)."""

    key: VirtualServerKey
    spec: VirtualServerSpec
    # ``namespace/name:portname`` (``namespace/name`` for an unnamed port): what operators grep for.
    port_name: str
    real_servers: tuple[RealServer, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceState:
    """Everything one Service wants programmed on this node.

    ``bind_addresses`` are the service addresses to put on the dummy device: cluster IPs, and external and
    load-balancer IPs that are not node addresses. NodePort virtual servers live on node
    addresses, never bound.
    """

    service: ServiceKey
    virtual_servers: tuple[VirtualServer, ...] = ()
    bind_addresses: frozenset[IPAddress] = field(default_factory=frozenset)


# --- Operations ---------------------------------------------------------------------------------------------
# One kernel change each. The planner emits them in a safe order; a backend applies them in that order and
# reports a result per operation.


@dataclass(frozen=True, slots=True)
class AddVirtualServer:
    name: ClassVar[str] = "add_virtual_server"
    key: VirtualServerKey
    spec: VirtualServerSpec


@dataclass(frozen=True, slots=True)
class UpdateVirtualServer:
    name: ClassVar[str] = "update_virtual_server"
    key: VirtualServerKey
    spec: VirtualServerSpec


@dataclass(frozen=True, slots=True)
class DeleteVirtualServer:
    name: ClassVar[str] = "delete_virtual_server"
    key: VirtualServerKey


@dataclass(frozen=True, slots=True)
class AddRealServer:
    name: ClassVar[str] = "add_real_server"
    virtual: VirtualServerKey
    real: RealServer


@dataclass(frozen=True, slots=True)
class UpdateRealServer:
    """Change a real server's weight in place (weight 0 = drain: no new connections, existing ones go on)."""

    name: ClassVar[str] = "update_real_server"
    virtual: VirtualServerKey
    real: RealServer


@dataclass(frozen=True, slots=True)
class DeleteRealServer:
    name: ClassVar[str] = "delete_real_server"
    virtual: VirtualServerKey
    real: RealServerKey


@dataclass(frozen=True, slots=True)
class BindAddress:
    name: ClassVar[str] = "bind_address"
    address: IPAddress


@dataclass(frozen=True, slots=True)
class UnbindAddress:
    name: ClassVar[str] = "unbind_address"
    address: IPAddress


Operation: TypeAlias = (
    AddVirtualServer
    | UpdateVirtualServer
    | DeleteVirtualServer
    | AddRealServer
    | UpdateRealServer
    | DeleteRealServer
    | BindAddress
    | UnbindAddress
)


def virtual_server_of(op: Operation) -> VirtualServerKey | None:
    """The virtual server an operation changes (None for address binds, which belong to no one server)."""
    match op:
        case AddVirtualServer(key=key) | UpdateVirtualServer(key=key) | DeleteVirtualServer(key=key):
            return key
        case AddRealServer(virtual=key) | UpdateRealServer(virtual=key) | DeleteRealServer(virtual=key):
            return key
        case BindAddress() | UnbindAddress():
            return None


def operation_to_dict(op: Operation) -> dict[str, str | int]:
    """The flat record scripts read (``aproxy sync --output json``, logs): op, protocol, address, port, ..."""
    match op:
        case BindAddress(address=address) | UnbindAddress(address=address):
            return {"op": op.name, "address": str(address)}
        case AddVirtualServer(key=key, spec=spec) | UpdateVirtualServer(key=key, spec=spec):
            return {
                **_virtual_fields(op.name, key),
                "scheduler": spec.scheduler,
                "persistence_timeout": spec.persistence_timeout,
            }
        case DeleteVirtualServer(key=key):
            return _virtual_fields(op.name, key)
        case AddRealServer(virtual=key, real=real) | UpdateRealServer(virtual=key, real=real):
            return {
                **_virtual_fields(op.name, key),
                "real_address": str(real.address),
                "real_port": real.port,
                "weight": real.weight,
            }
        case DeleteRealServer(virtual=key, real=real_key):
            return {
                **_virtual_fields(op.name, key),
                "real_address": str(real_key.address),
                "real_port": real_key.port,
            }


def _virtual_fields(name: str, key: VirtualServerKey) -> dict[str, str | int]:
    return {"op": name, "protocol": key.protocol.value, "address": str(key.address), "port": key.port}
