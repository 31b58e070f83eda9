"""The desired state as people and scripts read it: ``aproxy plan``'s JSON (the shape docs/interfaces.md
promises) or ipvsadm-like text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aproxy.core.model import (
    IPAddress,
    ServiceKey,
    ServiceState,
    VirtualServer,
    VirtualServerKey,
    address_sort_key,
)


@dataclass(frozen=True, slots=True)
class VirtualServerConflict:
    """Two services want the same (protocol, address, port): the first by namespace/name keeps it."""

    key: VirtualServerKey
    owner: str
    loser: ServiceKey


@dataclass(frozen=True, slots=True)
class NodeView:
    addresses: tuple[IPAddress, ...]
    virtual_servers: tuple[VirtualServer, ...]
    conflicts: tuple[VirtualServerConflict, ...]


def node_view(states: Iterable[ServiceState]) -> NodeView:
    """Merge per-service states into the node's, sorted as the JSON interface promises."""
    chosen: dict[VirtualServerKey, VirtualServer] = {}
    conflicts: list[VirtualServerConflict] = []
    addresses: set[IPAddress] = set()
    for state in sorted(states, key=lambda s: (s.service.namespace, s.service.name)):
        addresses |= state.bind_addresses
        for vs in state.virtual_servers:
            if vs.key in chosen:
                conflicts.append(VirtualServerConflict(vs.key, chosen[vs.key].port_name, state.service))
            else:
                chosen[vs.key] = vs
    return NodeView(
        addresses=tuple(sorted(addresses, key=address_sort_key)),
        virtual_servers=tuple(sorted(chosen.values(), key=lambda vs: vs.key.sort_key())),
        conflicts=tuple(conflicts),
    )


def to_json(view: NodeView) -> dict[str, Any]:
    return {
        "addresses": [str(address) for address in view.addresses],
        "virtual_servers": [
            {
                "protocol": vs.key.protocol.value,
                "address": str(vs.key.address),
                "port": vs.key.port,
                "scheduler": vs.spec.scheduler,
                "persistence_timeout": vs.spec.persistence_timeout,
                "service": vs.port_name,
                "real_servers": [
                    {"address": str(real.address), "port": real.port, "weight": real.weight}
                    for real in vs.real_servers
                ],
            }
            for vs in view.virtual_servers
        ],
    }


def to_text(view: NodeView, device: str = "kube-ipvs0") -> str:
    """``ipvsadm -Ln``'s layout, each virtual server annotated with the service port it comes from."""
    lines = [
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward Weight",
    ]
    for vs in view.virtual_servers:
        flags = f" persistent {vs.spec.persistence_timeout}" if vs.spec.persistence_timeout else ""
        flags += "".join(f" {flag}" for flag in sorted(vs.spec.flags))
        head = (
            f"{vs.key.protocol.value:<4} {_hostport(vs.key.address, vs.key.port)} {vs.spec.scheduler}{flags}"
        )
        lines.append(f"{head:<48} # {vs.port_name}")
        lines.extend(
            f"  -> {_hostport(real.address, real.port):<28} Masq    {real.weight}{_mark(real.weight)}"
            for real in vs.real_servers
        )
    listed = " ".join(str(address) for address in view.addresses) or "(none)"
    lines.append(f"Addresses on {device}: {listed}")
    return "\n".join(lines) + "\n"


def _mark(weight: int) -> str:
    # Translation gives every real server weight 1: a desired 0 is the health checks' drain.
    return "       # unhealthy: drained" if weight == 0 else ""


def _hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
