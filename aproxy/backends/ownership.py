"""The record of virtual servers aproxy owns without binding their address: a small JSON file.

aproxy changes only virtual servers whose address is bound on its dummy device, or that it created on another
address (NodePorts on node addresses, external IPs that are node addresses) and recorded here. Everything else
in the kernel (keepalived's, an operator's) is invisible to it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from aproxy.core.model import L4Protocol, VirtualServerKey

log = logging.getLogger(__name__)


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
