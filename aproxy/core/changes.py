"""Intake: the newest Service and EndpointSlice objects, and which services changed since the last sync.

Watch handlers call ``upsert_*``/``delete_*`` with raw objects; the tracker parses each once, keeps the slim
result, and marks the affected ``ServiceKey`` dirty only when something translation reads changed (a relist,
or an update of fields translation ignores, marks nothing). The sync task takes the dirty keys and asks
``inputs``/``desired`` for just those services, so the cost of a sync follows the change, not the cluster:
slices are indexed by service.

Rules:

- A slice is keyed by (namespace, slice name). If its ``kubernetes.io/service-name`` label changes, the old
  and the new service both become dirty.
- Services labelled ``service.kubernetes.io/service-proxy-name`` are absent for aproxy (gaining the label is
  like a delete); slices labelled that or ``service.kubernetes.io/headless`` likewise.
- A Service or slice that fails to parse is absent too (its previous good version is forgotten), so the
  incremental result always equals a from-scratch translation of the objects last seen.
- A slice port that no port of its Service names (same name and protocol) is a warning, reported once
  while it lasts (whichever of the two changes).
- Skips are reported once: ``new_skips`` returns each skip the first time it appears for its object, and
  again only if it disappeared (the object was fixed or deleted) and came back.
- Nothing may be applied before both kinds were listed once (``initialized``): a restart must never apply a
  half-known cluster. ``take_dirty`` does not enforce it; the sync task checks ``initialized`` (and its first
  sync is a full one anyway).
- An object whose ``metadata.resourceVersion`` equals the stored one's is not even parsed again (a relist of
  10,000 services costs milliseconds); a changed slice is parsed against the stored version, whose
  unchanged endpoints are reused rather than made again. The API server changes the version on every
  write; a source that reads files must not pass a stale version with edited content (leaving it out
  always works: the content is then compared).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Final, Literal

from aproxy.core.model import ServiceKey, ServiceState
from aproxy.core.objects import (
    SERVICE_KIND,
    SLICE_KIND,
    ServiceInfo,
    Severity,
    Skip,
    SliceInfo,
    parse_service,
    parse_slice,
)
from aproxy.core.translate import TranslationContext, translate_service, unmatched_slice_ports

ListedKind = Literal["services", "endpointslices"]
_KINDS: Final = frozenset({"services", "endpointslices"})

# (kind, namespace, name) of the object a set of skips belongs to.
_ObjectId = tuple[str, str, str]
# The kind under which a slice's unmatched ports are reported: they depend on its Service too, so they are
# kept apart from the slice's own skips (which its next version replaces).
_SLICE_PORTS = "EndpointSlice ports"


class UnknownKindError(ValueError):
    """``mark_listed`` got something other than "services" or "endpointslices"."""


class ChangeTracker:
    """The last-seen objects per service, the dirty set, the initialized gate and the skip reports."""

    def __init__(self) -> None:
        self._services: dict[ServiceKey, ServiceInfo] = {}
        self._slices: dict[tuple[str, str], SliceInfo] = {}
        # Per service, its slices sorted by name: a tuple, not a dict (most services have one slice; a small
        # dict costs 4 times the memory), rebuilt when one of them changes.
        self._slices_by_service: dict[ServiceKey, tuple[SliceInfo, ...]] = {}
        self._dirty: set[ServiceKey] = set()
        self._listed: set[str] = set()
        self._active_skips: dict[_ObjectId, frozenset[Skip]] = {}
        self._new_skips: list[Skip] = []
        self._skip_counts: Counter[tuple[str, Severity]] = Counter()
        self._service_changes = 0
        self._slice_changes = 0

    # --- intake ---------------------------------------------------------------------------------------------

    def upsert_service(self, raw: object) -> bool:
        """Record a Service (added or modified). True when its service became dirty."""
        ident = _raw_identity(raw)
        if ident is not None and ident[2]:
            # A relist: Kubernetes bumps resourceVersion on every change, so an equal one is the same object.
            stored = self._services.get(ServiceKey(ident[0], ident[1]))
            if stored is not None and stored.resource_version == ident[2]:
                return False
        parsed = parse_service(raw)
        if isinstance(parsed, Skip):
            self._report((SERVICE_KIND, parsed.namespace, parsed.name), (parsed,))
            if parsed.namespace and parsed.name:
                return self._drop_service(ServiceKey(parsed.namespace, parsed.name))
            return False
        key = parsed.key
        self._report((SERVICE_KIND, key.namespace, key.name), () if parsed.proxy_name_label else parsed.skips)
        old = self._services.get(key)
        self._services[key] = parsed  # the newest resourceVersion, even when nothing else changed
        if old == parsed:
            return False
        for endpoint_slice in self._slices_by_service.get(key, ()):
            self._report_slice_ports(parsed, endpoint_slice)
        return self._service_changed(key)

    def delete_service(self, namespace: str, name: str) -> bool:
        """Record a Service deletion. True when its service became dirty."""
        self._report((SERVICE_KIND, namespace, name), ())
        return self._drop_service(ServiceKey(namespace, name))

    def upsert_slice(self, raw: object) -> bool:
        """Record an EndpointSlice (added or modified). True when a service became dirty."""
        ident = _raw_identity(raw)
        stored = None
        if ident is not None:
            stored = self._slices.get((ident[0], ident[1]))
            if stored is not None and ident[2] and stored.resource_version == ident[2]:
                return False
        # The stored version lets the parser reuse what did not change (most endpoints of an update).
        parsed = parse_slice(raw, stored)
        if isinstance(parsed, Skip):
            self._report((SLICE_KIND, parsed.namespace, parsed.name), (parsed,))
            if parsed.namespace and parsed.name:
                return self._drop_slice(parsed.namespace, parsed.name)
            return False
        self._report((SLICE_KIND, parsed.namespace, parsed.name), parsed.skips)
        if parsed.ignored:
            return self._drop_slice(parsed.namespace, parsed.name)
        old = stored  # parsing succeeded, so the identity read above was this slice's
        self._slices[(parsed.namespace, parsed.name)] = parsed
        key = parsed.service_key
        self._index(key, parsed)
        # Other addresses (most updates) mean other endpoints: no need to compare them one by one.
        if old is not None and old.address_ids == parsed.address_ids and old == parsed:
            return False
        # Only a changed slice: an unchanged one's ports were checked against this very service already.
        self._report_slice_ports(self._services.get(key), parsed)
        if old is not None and old.service_name != parsed.service_name:
            # Relabelled: the old service loses these endpoints, the new one gains them.
            self._unindex(old)
            return self._slice_changed(old.service_key, key)
        return self._slice_changed(key)

    def delete_slice(self, namespace: str, name: str) -> bool:
        """Record an EndpointSlice deletion. True when a service became dirty."""
        self._report((SLICE_KIND, namespace, name), ())
        return self._drop_slice(namespace, name)

    def mark_listed(self, kind: ListedKind) -> None:
        """The first complete list of ``kind`` ("services" or "endpointslices") has been taken in."""
        if kind not in _KINDS:
            raise UnknownKindError(f"unknown kind {kind!r}: expected one of {sorted(_KINDS)}")
        self._listed.add(kind)

    @property
    def initialized(self) -> bool:
        """Both Services and EndpointSlices have been listed once: syncing is safe."""
        return self._listed == _KINDS

    # --- sync side ------------------------------------------------------------------------------------------

    def take_dirty(self) -> set[ServiceKey]:
        """The services whose inputs changed since the last call (and forget them)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def mark_dirty(self, keys: Iterable[ServiceKey]) -> None:
        """Mark services dirty for a reason outside their objects (a health verdict changed their weights);
        not counted as a service or slice change."""
        self._dirty.update(keys)

    @property
    def dirty_count(self) -> int:
        """Services changed and not yet taken (kube-proxy's ``*_changes_pending``)."""
        return len(self._dirty)

    def inputs(self, key: ServiceKey) -> tuple[ServiceInfo | None, list[SliceInfo]]:
        """The service (None when absent, unparseable or another proxy's) and its slices, sorted by name."""
        service = self._services.get(key)
        if service is not None and service.proxy_name_label:
            service = None
        return service, list(self._slices_by_service.get(key, ()))

    def service(self, key: ServiceKey) -> ServiceInfo | None:
        """The service alone (None when absent, unparseable or another proxy's): no copy of its slices."""
        service = self._services.get(key)
        return None if service is None or service.proxy_name_label else service

    def desired(
        self, key: ServiceKey, ctx: TranslationContext
    ) -> tuple[ServiceState | None, tuple[Skip, ...]]:
        """The service's desired state (None: absent, ignored or unparseable) and its current warnings.

        The warnings were already reported once through ``new_skips`` at intake; these are for display."""
        service, slices = self.inputs(key)
        if service is None:
            return None, ()
        translation = translate_service(service, slices, ctx)
        return translation.state, translation.skips

    def services(self) -> frozenset[ServiceKey]:
        """The keys of the services aproxy serves (present, parsed, not another proxy's)."""
        return frozenset(key for key, service in self._services.items() if not service.proxy_name_label)

    def new_skips(self) -> list[Skip]:
        """Skips not reported before, oldest first (and forget them): log each of these once."""
        skips, self._new_skips = self._new_skips, []
        return skips

    # --- counts ---------------------------------------------------------------------------------------------

    @property
    def skipped_total(self) -> dict[str, int]:
        """Skips reported so far, by kind ("Service", "EndpointSlice"), both severities."""
        totals: Counter[str] = Counter()
        for (kind, _), count in self._skip_counts.items():
            totals[kind] += count
        return dict(totals)

    @property
    def skip_counts(self) -> dict[tuple[str, Severity], int]:
        """Skips reported so far, by (kind, severity): whole objects (error) and parts (warning)."""
        return dict(self._skip_counts)

    @property
    def service_changes_total(self) -> int:
        """Service events that changed a service's inputs."""
        return self._service_changes

    @property
    def slice_changes_total(self) -> int:
        """EndpointSlice events that changed a service's inputs."""
        return self._slice_changes

    @property
    def service_count(self) -> int:
        return len(self._services)

    @property
    def slice_count(self) -> int:
        return len(self._slices)

    # --- internals ------------------------------------------------------------------------------------------

    def _service_changed(self, key: ServiceKey) -> bool:
        self._service_changes += 1
        self._dirty.add(key)
        return True

    def _slice_changed(self, *keys: ServiceKey) -> bool:
        self._slice_changes += 1
        self._dirty.update(keys)
        return True

    def _drop_service(self, key: ServiceKey) -> bool:
        if self._services.pop(key, None) is None:
            return False
        for endpoint_slice in self._slices_by_service.get(key, ()):
            self._report_slice_ports(None, endpoint_slice)
        return self._service_changed(key)

    def _drop_slice(self, namespace: str, name: str) -> bool:
        old = self._slices.pop((namespace, name), None)
        self._report((_SLICE_PORTS, namespace, name), ())
        if old is None:
            return False
        self._unindex(old)
        return self._slice_changed(old.service_key)

    def _index(self, key: ServiceKey, parsed: SliceInfo) -> None:
        """Put ``parsed`` in its service's slices, replacing the one of that name."""
        slices = self._slices_by_service.get(key, ())
        if len(slices) == 1 and slices[0].name == parsed.name:
            self._slices_by_service[key] = (parsed,)  # the common case: the service's only slice
            return
        if not slices and (service := self._services.get(key)) is not None:
            key = service.key  # a new entry: keyed by the service's own key object, not one more copy
        others = [s for s in slices if s.name != parsed.name]
        others.append(parsed)
        others.sort(key=_slice_name)
        self._slices_by_service[key] = tuple(others)

    def _unindex(self, old: SliceInfo) -> None:
        key = old.service_key
        slices = self._slices_by_service.get(key)
        if slices is None:
            return
        remaining = tuple(s for s in slices if s.name != old.name)
        if remaining:
            self._slices_by_service[key] = remaining
        else:
            del self._slices_by_service[key]

    def _report_slice_ports(self, service: ServiceInfo | None, endpoint_slice: SliceInfo) -> None:
        """Warn once about slice ports no port of the service names (their endpoints serve nothing)."""
        unmatched = () if service is None else unmatched_slice_ports(service, endpoint_slice)
        ident = (_SLICE_PORTS, endpoint_slice.namespace, endpoint_slice.name)
        if not unmatched and ident not in self._active_skips:
            return  # the common case, without building anything
        skips = tuple(
            Skip(
                SLICE_KIND,
                endpoint_slice.namespace,
                endpoint_slice.name,
                f"port {port.name or '(unnamed)'}/{port.protocol.value} matches no port of Service "
                f"{endpoint_slice.namespace}/{endpoint_slice.service_name}",
                Severity.WARNING,
            )
            for port in unmatched
        )
        self._report(ident, skips)

    def _report(self, ident: _ObjectId, skips: tuple[Skip, ...]) -> None:
        """Make ``skips`` the object's current ones; those it did not have already are new reports."""
        if not skips and ident not in self._active_skips:
            return  # the common case: nothing to report, nothing to forget
        current = frozenset(skips)
        previous = self._active_skips.get(ident, frozenset())
        for skip in dict.fromkeys(skips):
            if skip not in previous:
                self._new_skips.append(skip)
                self._skip_counts[(skip.kind, skip.severity)] += 1
        if current:
            self._active_skips[ident] = current
        else:
            self._active_skips.pop(ident, None)


def _slice_name(endpoint_slice: SliceInfo) -> str:
    return endpoint_slice.name


def _raw_identity(raw: object) -> tuple[str, str, str] | None:
    """(namespace, name, resourceVersion) of a raw object whose namespace and name are non-empty strings;
    the version is "" unless it is a non-empty string too."""
    meta = raw.get("metadata") if isinstance(raw, dict | Mapping) else None
    if not isinstance(meta, dict | Mapping):
        return None
    namespace, name, version = meta.get("namespace"), meta.get("name"), meta.get("resourceVersion")
    if not isinstance(namespace, str) or not isinstance(name, str) or not namespace or not name:
        return None
    return namespace, name, version if isinstance(version, str) else ""
