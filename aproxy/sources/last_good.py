"""The file source's rule for an object that turns invalid: its last good version stays.

The API server refuses an invalid object as a whole, so the Kubernetes source never sees one replace a good
version. A file has no such gate: editing one port of a live Service to 70000 would make the core skip the
whole Service and delete its virtual servers. ``LastGood.choose`` is that gate for files: when an object
that was fed in a valid version changes into one the core's parser refuses (``Skip`` of severity error),
the valid version is fed again instead (it stays, unchanged) and the object is *held*, with the reason.
It is released when the file has it valid again (the new version is fed) or no longer has it (deleted).

Validity is the core's (``parse_service``/``parse_slice``): this module only decides which version to
feed. An object that was never valid (new and already broken) is fed as it is: the core reports it as a
skip, as it would from the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aproxy.core.objects import SERVICE_KIND, Severity, Skip, parse_service, parse_slice

# (kind, namespace, name), as aproxy.sources.file keys objects.
ObjectKey = tuple[str, str | None, str | None]


def invalid_reason(kind: str, raw: object) -> str | None:
    """Why the core refuses ``raw`` as a whole; None when it accepts it (perhaps with warnings)."""
    parsed = parse_service(raw) if kind == SERVICE_KIND else parse_slice(raw)
    if isinstance(parsed, Skip) and parsed.severity is Severity.ERROR:
        return parsed.reason
    return None


@dataclass(frozen=True, slots=True)
class Held:
    """An object whose file version is invalid, and why; its last good version is the one fed."""

    key: ObjectKey
    reason: str

    def __str__(self) -> str:
        kind, namespace, name = self.key
        return f"{kind} {namespace}/{name}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Choice:
    """What to feed (``objects``), and how the held set changed: ``new`` holds (or new reasons) to report,
    ``released`` keys that are valid again or gone."""

    objects: dict[ObjectKey, dict[str, Any]]
    new: tuple[Held, ...]
    released: tuple[ObjectKey, ...]


class LastGood:
    """The held objects of one file source; ``choose`` once per successful read."""

    def __init__(self) -> None:
        self.held: dict[ObjectKey, Held] = {}

    def choose(
        self, fed: Mapping[ObjectKey, dict[str, Any]], current: Mapping[ObjectKey, dict[str, Any]]
    ) -> Choice:
        """The objects to feed given what was ``fed`` last and what the files hold now (``current``)."""
        objects = dict(current)
        held: dict[ObjectKey, Held] = {}
        for key, raw in current.items():
            old = fed.get(key)
            if old is None or old is raw or old == raw:
                continue  # new objects are fed as they are; unchanged ones cost nothing
            reason = invalid_reason(key[0], raw)
            if reason is None:
                continue
            # ``old`` is the last good version when it is held already, or when it parses.
            if key in self.held or invalid_reason(key[0], old) is None:
                objects[key] = old
                held[key] = Held(key, reason)
        new = tuple(hold for key, hold in held.items() if self.held.get(key) != hold)
        released = tuple(key for key in self.held if key not in held)
        self.held = held
        return Choice(objects, new, released)
