"""Builders of raw Kubernetes objects (plain dicts, as decoded from JSON) for tests.

Every argument left at ``None`` is left out of the object, the way the API server omits unset fields, so a
test says only what it is about. Defaults make a working ClusterIP service ``default/web`` (10.96.0.1, port
``http`` 80) and a ready endpoint slice for it (port ``http`` 8080).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Obj = dict[str, Any]


def port(
    name: Any = "http",
    port: Any = 80,
    protocol: str | None = None,
    *,
    target_port: Any = None,
    node_port: Any = None,
) -> Obj:
    """A Service port. ``protocol`` None leaves it out (the API default, TCP)."""
    obj: Obj = {"port": port}
    _put(obj, "name", name)
    _put(obj, "protocol", protocol)
    _put(obj, "targetPort", target_port)
    _put(obj, "nodePort", node_port)
    return obj


def service(
    name: str = "web",
    ns: str | None = "default",
    *,
    type_: str | None = None,
    cluster_ips: str | Sequence[str] | None = "10.96.0.1",
    ports: Sequence[Any] | None = None,
    external_ips: Sequence[str] | None = None,
    lb_ips: Sequence[str] | None = None,
    lb_ingress: Sequence[Any] | None = None,
    affinity: bool | int | None = None,
    external_policy: str | None = None,
    internal_policy: str | None = None,
    scheduler: str | None = None,
    annotations: Mapping[str, Any] | None = None,
    labels: Mapping[str, Any] | None = None,
    resource_version: str | None = None,
    spec_extra: Mapping[str, Any] | None = None,
) -> Obj:
    """A v1 Service.

    ``cluster_ips``: one address or a list (written to ``clusterIPs`` and its first to ``clusterIP``);
    ``"None"`` makes a headless service, None or ``()`` leaves both out. ``ports`` defaults to
    ``[port()]``. ``lb_ips`` become ``status.loadBalancer.ingress[].ip`` (``lb_ingress`` adds raw entries).
    ``affinity``: True for ClientIP with the default timeout, an int for ClientIP with that timeout.
    ``scheduler`` sets the ``aproxy.io/scheduler`` annotation.
    """
    metadata: Obj = {"name": name}
    _put(metadata, "namespace", ns)
    _put(metadata, "resourceVersion", resource_version)
    _put(metadata, "labels", dict(labels) if labels is not None else None)
    all_annotations = dict(annotations or {})
    if scheduler is not None:
        all_annotations["aproxy.io/scheduler"] = scheduler
    _put(metadata, "annotations", all_annotations or None)
    spec: Obj = {"ports": list(ports) if ports is not None else [port()]}
    _put(spec, "type", type_)
    addresses = [cluster_ips] if isinstance(cluster_ips, str) else list(cluster_ips or ())
    if addresses:
        spec["clusterIP"] = addresses[0]
        spec["clusterIPs"] = addresses
    _put(spec, "externalIPs", list(external_ips) if external_ips is not None else None)
    if affinity is not None and affinity is not False:
        spec["sessionAffinity"] = "ClientIP"
        if not isinstance(affinity, bool):
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    _put(spec, "externalTrafficPolicy", external_policy)
    _put(spec, "internalTrafficPolicy", internal_policy)
    spec.update(spec_extra or {})
    obj: Obj = {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}
    ingress = [{"ip": ip} for ip in lb_ips or ()] + list(lb_ingress or ())
    if ingress:
        obj["status"] = {"loadBalancer": {"ingress": ingress}}
    return obj


def endpoint(
    address: str | Sequence[str],
    *,
    ready: Any = None,
    serving: Any = None,
    terminating: Any = None,
    node: str | None = None,
    zone: str | None = None,
    hints: Sequence[str] | None = None,
) -> Obj:
    """An EndpointSlice endpoint; conditions left at None are omitted (unset)."""
    obj: Obj = {"addresses": [address] if isinstance(address, str) else list(address)}
    conditions: Obj = {}
    _put(conditions, "ready", ready)
    _put(conditions, "serving", serving)
    _put(conditions, "terminating", terminating)
    if conditions:
        obj["conditions"] = conditions
    _put(obj, "nodeName", node)
    _put(obj, "zone", zone)
    if hints is not None:
        obj["hints"] = {"forZones": [{"name": zone_name} for zone_name in hints]}
    return obj


def slice_port(name: str | None = "http", port: Any = 8080, protocol: str | None = None) -> Obj:
    obj: Obj = {}
    _put(obj, "name", name)
    _put(obj, "port", port)
    _put(obj, "protocol", protocol)
    return obj


def endpoint_slice(
    service: str | None = "web",
    ns: str | None = "default",
    *,
    name: str | None = None,
    address_type: str | None = "IPv4",
    endpoints: Iterable[Any] | None = None,
    ports: Sequence[Any] | None = None,
    labels: Mapping[str, Any] | None = None,
    resource_version: str | None = None,
) -> Obj:
    """A discovery.k8s.io/v1 EndpointSlice for ``service`` (label ``kubernetes.io/service-name``).

    ``name`` defaults to ``<service>-<addresstype>``; ``endpoints`` to one ready endpoint 10.244.1.5 on
    node-a; ``ports`` to ``[slice_port()]``.
    """
    all_labels: Obj = dict(labels or {})
    if service is not None:
        all_labels["kubernetes.io/service-name"] = service
    metadata: Obj = {"name": name or f"{service}-{(address_type or 'none').lower()}"}
    _put(metadata, "namespace", ns)
    _put(metadata, "resourceVersion", resource_version)
    if all_labels:
        metadata["labels"] = all_labels
    obj: Obj = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": metadata}
    _put(obj, "addressType", address_type)
    obj["endpoints"] = list(endpoints) if endpoints is not None else [endpoint("10.244.1.5", node="node-a")]
    obj["ports"] = list(ports) if ports is not None else [slice_port()]
    return obj


def _put(obj: Obj, key: str, value: Any) -> None:
    if value is not None:
        obj[key] = value
