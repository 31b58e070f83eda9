"""The resource types the fake API server serves, and what the real API server adds to stored objects.

The real server applies defaulting on every write (the Service's type, session affinity, port protocols,
allocated cluster IPs, EndpointSlice port protocol and name), so a client reading from a cluster sees
defaulted objects while a manifest on disk is not defaulted. Defaulting here only fills fields of the
expected shape and never raises: tests must be able to store malformed objects to check that a source
survives them.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

Obj: TypeAlias = dict[str, Any]


def _service_fields(obj: Obj) -> dict[str, str]:
    spec = obj.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    return {"spec.clusterIP": str(spec.get("clusterIP") or ""), "spec.type": str(spec.get("type") or "")}


def _node_fields(obj: Obj) -> dict[str, str]:
    spec = obj.get("spec")
    unschedulable = bool(spec.get("unschedulable")) if isinstance(spec, dict) else False
    # Go formats a bool as "true"/"false".
    return {"spec.unschedulable": "true" if unschedulable else "false"}


def _no_fields(obj: Obj) -> dict[str, str]:
    return {}


def _service_zero() -> Obj:
    # encoding/json writes a struct even when it is empty: ServiceStatus.loadBalancer is a struct.
    return {"spec": {}, "status": {"loadBalancer": {}}}


def _endpointslice_zero() -> Obj:
    # addressType and endpoints have no omitempty in the Go type, so an empty slice shows them as ""/null.
    return {"addressType": "", "endpoints": None}


def _node_zero() -> Obj:
    node_info = dict.fromkeys(
        (
            "machineID",
            "systemUUID",
            "bootID",
            "kernelVersion",
            "osImage",
            "containerRuntimeVersion",
            "kubeletVersion",
            "kubeProxyVersion",
            "operatingSystem",
            "architecture",
        ),
        "",
    )
    return {
        "spec": {},
        "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 0}}, "nodeInfo": node_info},
    }


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One served resource: its URL, its kind, and the fields its field selector accepts."""

    plural: str
    kind: str
    group: str
    version: str
    namespaced: bool
    extra_fields: Callable[[Obj], dict[str, str]]
    zero_fields: Callable[[], Obj]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified_name(self) -> str:
        """How the server names the resource in error messages: plural, then group when there is one."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def base_path(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def selectable_fields(self) -> frozenset[str]:
        return frozenset({"metadata.name", "metadata.namespace", *self.extra_fields({})})

    def fields(self, obj: Obj) -> dict[str, str]:
        """The field set a field selector is matched against (the server's GetAttrs)."""
        metadata = obj.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        return {
            "metadata.name": str(metadata.get("name") or ""),
            "metadata.namespace": str(metadata.get("namespace") or ""),
            **self.extra_fields(obj),
        }

    def bookmark_object(self, resource_version: int, annotations: Mapping[str, str] | None = None) -> Obj:
        """A BOOKMARK's object: an empty object of the kind, serialised as Go serialises zero values."""
        metadata: Obj = {"resourceVersion": str(resource_version), "creationTimestamp": None}
        if annotations:
            metadata["annotations"] = dict(annotations)
        return {"kind": self.kind, "apiVersion": self.api_version, "metadata": metadata, **self.zero_fields()}


SERVICES = ResourceType("services", "Service", "", "v1", True, _service_fields, _service_zero)
ENDPOINTSLICES = ResourceType(
    "endpointslices", "EndpointSlice", "discovery.k8s.io", "v1", True, _no_fields, _endpointslice_zero
)
NODES = ResourceType("nodes", "Node", "", "v1", False, _node_fields, _node_zero)
RESOURCES: tuple[ResourceType, ...] = (SERVICES, ENDPOINTSLICES, NODES)


class UnknownResourceError(KeyError):
    """The test named a resource the fake server does not serve."""


def resolve(name: str) -> ResourceType:
    """Find a resource by plural ("services"), kind ("Service") or lower-case kind ("service")."""
    for resource in RESOURCES:
        if name in (resource.plural, resource.kind, resource.kind.lower()):
            return resource
    raise UnknownResourceError(name)


class ClusterIPAllocator:
    """Hands out service cluster IPs from the default service CIDR, like the API server's allocator."""

    def __init__(self, cidr: str = "10.96.0.0/12") -> None:
        self._hosts = ipaddress.ip_network(cidr).hosts()
        next(self._hosts)  # 10.96.0.1 is the kubernetes service's address in a real cluster.

    def allocate(self, used: Callable[[str], bool]) -> str:
        for address in self._hosts:
            if not used(str(address)):
                return str(address)
        raise RuntimeError("service CIDR exhausted")


class NodePortAllocator:
    def __init__(self, first: int = 30000, last: int = 32767) -> None:
        self._next = first
        self._last = last

    def allocate(self) -> int:
        if self._next > self._last:
            raise RuntimeError("node port range exhausted")
        port = self._next
        self._next += 1
        return port


@dataclass(slots=True)
class Defaulter:
    """The API server's defaulting and allocation for the served kinds."""

    cluster_ips: ClusterIPAllocator
    node_ports: NodePortAllocator
    cluster_ip_in_use: Callable[[str], bool]

    def apply(self, resource: ResourceType, obj: Obj) -> None:
        if resource is SERVICES:
            self._service(obj)
        elif resource is ENDPOINTSLICES:
            _endpointslice(obj)

    def _service(self, obj: Obj) -> None:
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        service_type = spec["type"]
        _service_ports(spec, service_type, self.node_ports)
        if spec["sessionAffinity"] == "ClientIP" and "sessionAffinityConfig" not in spec:
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
        if service_type == "ExternalName":
            return
        if service_type in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
        if service_type == "LoadBalancer":
            spec.setdefault("allocateLoadBalancerNodePorts", True)
        spec.setdefault("internalTrafficPolicy", "Cluster")
        if not spec.get("clusterIP"):
            spec["clusterIP"] = self.cluster_ips.allocate(self.cluster_ip_in_use)
        if isinstance(spec["clusterIP"], str):
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", [_ip_family(spec["clusterIP"])])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        obj.setdefault("status", {"loadBalancer": {}})


def _service_ports(spec: Obj, service_type: object, node_ports: NodePortAllocator) -> None:
    ports = spec.get("ports")
    if not isinstance(ports, list):
        return
    for port in ports:
        if not isinstance(port, dict):
            continue
        port.setdefault("protocol", "TCP")
        if "port" in port:
            port.setdefault("targetPort", port["port"])
        if service_type in ("NodePort", "LoadBalancer") and not port.get("nodePort"):
            port["nodePort"] = node_ports.allocate()


def _endpointslice(obj: Obj) -> None:
    ports = obj.get("ports")
    if not isinstance(ports, list):
        return
    for port in ports:
        if isinstance(port, dict):
            port.setdefault("name", "")
            port.setdefault("protocol", "TCP")


def _ip_family(address: str) -> str:
    try:
        return "IPv6" if ipaddress.ip_address(address).version == 6 else "IPv4"
    except ValueError:
        # "None" (headless) and garbage: the server's default family.
        return "IPv4"


def carry_allocations(resource: ResourceType, new: Obj, old: Obj) -> None:
    """On update the server keeps its allocations (cluster IPs, node ports) the new object leaves out."""
    if resource is not SERVICES:
        return
    new_spec, old_spec = new.get("spec"), old.get("spec")
    if not isinstance(new_spec, dict) or not isinstance(old_spec, dict):
        return
    if not new_spec.get("clusterIP"):
        for allocated in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if allocated in old_spec:
                new_spec.setdefault(allocated, copy.deepcopy(old_spec[allocated]))
    old_ports = old_spec.get("ports")
    new_ports = new_spec.get("ports")
    if not isinstance(old_ports, list) or not isinstance(new_ports, list):
        return
    old_node_ports = {
        (port.get("port"), port.get("protocol", "TCP")): port["nodePort"]
        for port in old_ports
        if isinstance(port, dict) and port.get("nodePort")
    }
    for port in new_ports:
        if isinstance(port, dict) and not port.get("nodePort"):
            node_port = old_node_ports.get((port.get("port"), port.get("protocol", "TCP")))
            if node_port:
                port["nodePort"] = node_port
