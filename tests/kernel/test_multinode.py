"""Traffic from outside the node, across nodes: NodePorts, external IPs and load-balancer IPs (fabric.py).

aproxy programs node A (the guest's root namespace) through the daemon's code path; a client on the fabric
talks to node A's addresses; the backends are pods on node B (reached over the flat pod network, answering
the client directly unless node A source-NATs) and pods on node A.

- ``externalTrafficPolicy: Cluster``: the connection completes and the pod sees node A's address.
- ``externalTrafficPolicy: Local``: only node A's pods answer, and they see the client's address.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from aproxy.backends.ipvs import IPVSSettings
from aproxy.core.translate import TranslationContext
from tests.core import k8s
from tests.kernel import netlab
from tests.kernel.fabric import NODE_A, Fabric
from tests.kernel.netlab import ECHO_PORT, Lab, Namespace
from tests.kernel.test_traffic import Cluster

pytestmark = pytest.mark.kernel

CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({NODE_A}))
CLUSTER_IP = IPv4Address("10.96.0.20")
EXTERNAL_IP = IPv4Address("192.168.60.10")
LB_IP = IPv4Address("192.168.70.10")
PORT = 80
NODE_PORT = 30080
# Where a client sends, per path: (address, port).
PATHS = {"node-port": (NODE_A, NODE_PORT), "external-ip": (EXTERNAL_IP, PORT), "load-balancer": (LB_IP, PORT)}


def service(
    pods: Sequence[tuple[Namespace, str]], *, policy: str = "Cluster", protocol: str = "TCP", **extra: Any
) -> list[dict[str, Any]]:
    """A LoadBalancer service with an external IP and an LB IP, endpoints the (pod, node name) pairs."""
    endpoints = [k8s.endpoint(str(pod.address), ready=True, node=node) for pod, node in pods]
    return [
        k8s.service(
            "web",
            type_="LoadBalancer",
            cluster_ips=str(CLUSTER_IP),
            ports=[k8s.port("web", PORT, protocol, node_port=NODE_PORT)],
            external_ips=[str(EXTERNAL_IP)],
            lb_ips=[str(LB_IP)],
            external_policy=policy,
            **extra,
        ),
        k8s.endpoint_slice("web", endpoints=endpoints, ports=[k8s.slice_port("web", ECHO_PORT, protocol)]),
    ]


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json")


@pytest.fixture
def fabric(lab: Lab) -> Fabric:
    return Fabric(lab)


@pytest.fixture
def node_a(settings: IPVSSettings) -> Iterator[Cluster]:
    cluster = Cluster(settings, CTX)
    try:
        yield cluster
    finally:
        cluster.close()


def request(protocol: str, path: str, client: Namespace) -> netlab.Reply:
    address, port = PATHS[path]
    send = netlab.tcp_request if protocol == "TCP" else netlab.udp_request
    return send(address, port, netns=client.netns)


def test_fabric_routes_a_client_to_node_b_pods_directly(lab: Lab, fabric: Fabric) -> None:
    """The lab itself: a node B pod answers a client directly, seeing the client's own address."""
    pod = fabric.add_remote_pod("podb")
    client = fabric.add_client("outside")
    reply = netlab.tcp_request(pod.address, ECHO_PORT, netns=client.netns)
    assert reply == netlab.Reply("podb", client.address)


@pytest.mark.xfail(strict=True, reason="issue 10: no source NAT for traffic from outside the node yet")
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_cluster_policy_reaches_a_pod_on_another_node_as_node_a(
    lab: Lab, fabric: Fabric, node_a: Cluster, path: str, protocol: str
) -> None:
    pod = fabric.add_remote_pod("podb")
    client = fabric.add_client("outside")
    node_a.apply(service([(pod, "node-b")], protocol=protocol))
    assert request(protocol, path, client) == netlab.Reply("podb", NODE_A)


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_local_policy_answers_from_node_a_pods_with_the_client_address(
    lab: Lab, fabric: Fabric, node_a: Cluster, path: str, protocol: str
) -> None:
    remote = fabric.add_remote_pod("podb")
    local = lab.add_pod("poda")
    client = fabric.add_client("outside")
    node_a.apply(service([(remote, "node-b"), (local, "node-a")], policy="Local", protocol=protocol))
    replies = [request(protocol, path, client) for _ in range(4)]
    assert set(replies) == {netlab.Reply("poda", client.address)}
