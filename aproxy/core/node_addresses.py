"""Which of the node's addresses get NodePort virtual servers (kube-proxy's ``--nodeport-addresses``).

- default: every local address, except loopback, IPv6 link-local and the dummy device's own (the caller
  leaves those out: it knows which interface is which);
- CIDRs: the local addresses inside any of them;
- ``primary``: the node's primary addresses (``--node-ip``, or its Node object's), whatever is local.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

from aproxy.core.model import IPAddress

PRIMARY = "primary"


@dataclass(frozen=True, slots=True)
class NodePortAddresses:
    cidrs: tuple[IPv4Network | IPv6Network, ...] = ()  # empty: every local address
    primary: bool = False

    @classmethod
    def parse(cls, values: Iterable[str]) -> NodePortAddresses:
        """``("primary",)``, CIDRs, or nothing (the default); ValueError naming what is not a CIDR."""
        texts = [text.strip() for text in values if text.strip()]
        if texts == [PRIMARY]:
            return cls(primary=True)
        cidrs = []
        for text in texts:
            try:
                cidrs.append(ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"not a CIDR (nor {PRIMARY!r} alone): {text!r}") from None
        return cls(tuple(cidrs))

    @property
    def every_address(self) -> bool:
        """Unset, or an unspecified CIDR (``0.0.0.0/0``, ``::/0``) among them: kube-proxy's ``MatchAll``,
        under which its health-check node ports listen on every address rather than on the selection."""
        return not self.primary and (not self.cidrs or any(cidr.prefixlen == 0 for cidr in self.cidrs))

    def select(self, local: Iterable[IPAddress], primary: Iterable[IPAddress]) -> frozenset[IPAddress]:
        """The NodePort addresses among the node's ``local`` ones (already without the dummy device's)."""
        if self.primary:
            return frozenset(primary)
        usable = (
            address
            for address in local
            if not address.is_loopback and not (address.version == 6 and address.is_link_local)
        )
        if not self.cidrs:
            return frozenset(usable)
        return frozenset(
            address
            for address in usable
            if any(address.version == cidr.version and address in cidr for cidr in self.cidrs)
        )
