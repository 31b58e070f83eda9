"""Traffic from outside the node, across nodes: NodePorts, external IPs and load-balancer IPs (fabric.py).

aproxy programs node A (the guest's root namespace) through the daemon's code path; a client on the fabric
talks to node A's addresses; the backends are pods on node B (reached over the flat pod network, answering
the client directly unless node A source-NATs) and pods on node A.

- ``externalTrafficPolicy: Cluster``: the connection completes and the pod sees node A's address.
- ``externalTrafficPolicy: Local``: only node A's pods answer, and they see the client's address.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from aproxy.backends.ipvs import IPVSSettings
from aproxy.backends.node_addresses import NodePortAddressFollower
from aproxy.core.health_ports import HealthPortTable
from aproxy.core.model import IPAddress
from aproxy.core.node_addresses import NodePortAddresses
from aproxy.core.translate import TranslationContext
from aproxy.web.health_ports import HealthCheckListeners
from tests.core import k8s
from tests.kernel import netlab
from tests.kernel.fabric import BRIDGE, NODE_A, Fabric
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


# Each path, over TCP and UDP.
EVERY_PATH = pytest.mark.parametrize(
    ("path", "protocol"), [(path, p) for path in sorted(PATHS) for p in ("TCP", "UDP")]
)


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


@pytest.fixture
def podb(fabric: Fabric) -> Namespace:
    """A pod on node B."""
    return fabric.add_remote_pod("podb")


@pytest.fixture
def outside(fabric: Fabric) -> Namespace:
    """A client on the fabric, outside the cluster."""
    return fabric.add_client("outside")


def test_fabric_routes_a_client_to_node_b_pods_directly(podb: Namespace, outside: Namespace) -> None:
    """The lab itself: a node B pod answers a client directly, seeing the client's own address."""
    reply = netlab.tcp_request(podb.address, ECHO_PORT, netns=outside.netns)
    assert reply == netlab.Reply("podb", outside.address)


@EVERY_PATH
def test_cluster_policy_reaches_a_pod_on_another_node_as_node_a(
    podb: Namespace, outside: Namespace, node_a: Cluster, path: str, protocol: str
) -> None:
    node_a.apply(service([(podb, "node-b")], protocol=protocol))
    assert request(protocol, path, outside) == netlab.Reply("podb", NODE_A)


@EVERY_PATH
def test_local_policy_answers_from_node_a_pods_with_the_client_address(
    lab: Lab, podb: Namespace, outside: Namespace, node_a: Cluster, path: str, protocol: str
) -> None:
    local = lab.add_pod("poda")
    node_a.apply(service([(podb, "node-b"), (local, "node-a")], policy="Local", protocol=protocol))
    replies = [request(protocol, path, outside) for _ in range(4)]
    assert set(replies) == {netlab.Reply("poda", outside.address)}


# --- loadBalancerSourceRanges -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_source_ranges_let_an_allowed_client_in_and_drop_another(
    protocol: str, fabric: Fabric, podb: Namespace, outside: Namespace, node_a: Cluster
) -> None:
    other = fabric.add_client("other")
    ranges = [f"{outside.address}/32", "not-a-range", "fd00::/8"]  # a malformed one: a warning, not a crash
    node_a.apply(
        service([(podb, "node-b")], protocol=protocol, spec_extra={"loadBalancerSourceRanges": ranges})
    )

    assert request(protocol, "load-balancer", outside) == netlab.Reply("podb", NODE_A)
    with pytest.raises(netlab.NoReply, match="timed out"):  # dropped, not refused
        request(protocol, "load-balancer", other)
    # The ranges guard the load-balancer IP only: the other paths stay open to everyone.
    assert request(protocol, "node-port", other) == netlab.Reply("podb", NODE_A)
    assert request(protocol, "external-ip", other) == netlab.Reply("podb", NODE_A)


def test_source_ranges_removed_open_the_load_balancer_again(
    fabric: Fabric, podb: Namespace, outside: Namespace, node_a: Cluster
) -> None:
    node_a.apply(service([(podb, "node-b")], spec_extra={"loadBalancerSourceRanges": ["203.0.113.0/24"]}))
    with pytest.raises(netlab.NoReply):
        request("TCP", "load-balancer", outside)

    node_a.apply(service([(podb, "node-b")]))

    assert request("TCP", "load-balancer", outside) == netlab.Reply("podb", NODE_A)


# --- the service-IP filter ----------------------------------------------------------------------------------

HOST_PORT = 2222


def connects(address: IPv4Address, port: int, client: Namespace) -> bool:
    """Whether a TCP connection from the client is accepted (refused or timed out: False)."""
    with netlab.open_socket(client.netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(netlab.DEFAULT_TIMEOUT)
        try:
            sock.connect((str(address), port))
        except OSError:
            return False
        return True


@pytest.fixture
def host_listener() -> Iterator[socket.socket]:
    """A host process's listener on node A's 0.0.0.0:2222 (an sshd, say)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", HOST_PORT))
        sock.listen(16)
        yield sock


def test_a_host_listener_is_not_reachable_through_service_ips(
    lab: Lab, outside: Namespace, node_a: Cluster, host_listener: socket.socket
) -> None:
    # A pod on node A: an outside client's cluster-IP traffic is not masqueraded (no --cluster-cidr), so
    # only a pod that answers through node A can complete it.
    node_a.apply(service([(lab.add_pod("poda"), "node-a")]))

    assert connects(NODE_A, HOST_PORT, outside), "the node's own address stays the host's"
    for address in (CLUSTER_IP, EXTERNAL_IP, LB_IP):
        assert not connects(address, HOST_PORT, outside), f"{address}:{HOST_PORT} reached the host"
        assert connects(address, PORT, outside), f"{address}:{PORT} is a service port"
    assert netlab.tcp_request(CLUSTER_IP, PORT, netns=outside.netns).backend == "poda"


# --- health-check node ports --------------------------------------------------------------------------------

HEALTH_PORT = 32100


def http_get(address: IPv4Address, port: int, client: Namespace) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.0 GET / from the client: (status, JSON body)."""
    with netlab.open_socket(client.netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(netlab.DEFAULT_TIMEOUT)
        sock.connect((str(address), port))
        sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: lb\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_health_check_node_port_says_whether_node_a_has_a_ready_local_pod(
    lab: Lab, podb: Namespace, outside: Namespace, settings: IPVSSettings
) -> None:
    table = HealthPortTable()
    node = Cluster(settings, CTX, health_ports=table)
    listeners = HealthCheckListeners(table, lambda: True)
    extra = {"spec_extra": {"healthCheckNodePort": HEALTH_PORT}}
    try:
        node.apply(service([(podb, "node-b")], policy="Local", **extra))
        node.run(listeners.reconcile())
        status, body = node.run(asyncio.to_thread(http_get, NODE_A, HEALTH_PORT, outside))
        assert (status, body["localEndpoints"]) == (503, 0)

        poda = lab.add_pod("poda")
        node.apply(service([(podb, "node-b"), (poda, "node-a")], policy="Local", **extra))
        node.run(listeners.reconcile())
        for address in (NODE_A, LB_IP):  # on the LB IP (on kube-ipvs0) the service-IP filter lets it through
            status, body = node.run(asyncio.to_thread(http_get, address, HEALTH_PORT, outside))
            assert (status, body["localEndpoints"], body["serviceProxyHealthy"]) == (200, 1, True)

        node.apply(service([(podb, "node-b"), (poda, "node-a")], policy="Cluster", **extra))
        node.run(listeners.reconcile())
        assert listeners.ports == frozenset()  # Cluster policy: no health check, the listener closed
        assert not connects(NODE_A, HEALTH_PORT, outside)
    finally:
        node.run(listeners.close())
        node.close()


# --- NodePort addresses, followed live ----------------------------------------------------------------------

NEW_ADDRESS = IPv4Address("192.168.50.77")


def node_port_addresses() -> set[IPv4Address | IPv6Address]:
    keys = netlab.read_ipvs().keys()
    return {key.address for key in keys if key.port == NODE_PORT}


async def next_change(follower: NodePortAddressFollower, change: Callable[[], None]) -> frozenset[IPAddress]:
    """Follow the node's addresses, make ``change``, return the addresses the follower then reports."""
    reported: asyncio.Future[frozenset[IPAddress]] = asyncio.get_running_loop().create_future()
    following = asyncio.create_task(follower.follow(lambda now: reported.done() or reported.set_result(now)))
    try:
        await asyncio.sleep(0.2)  # subscribed before the change
        await asyncio.to_thread(change)  # pyroute2's blocking API wants a thread without a running loop
        return await asyncio.wait_for(reported, 5)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


def add_new_address() -> None:
    with netlab.rtnl() as ipr:
        ipr.addr("add", index=netlab._link_index(ipr, BRIDGE), address=str(NEW_ADDRESS), prefixlen=24)


def remove_new_address() -> None:
    with netlab.rtnl() as ipr:
        ipr.addr("del", index=netlab._link_index(ipr, BRIDGE), address=str(NEW_ADDRESS), prefixlen=24)


def test_a_node_address_added_gets_its_node_ports_within_one_sync_and_loses_them_when_removed(
    podb: Namespace, outside: Namespace, node_a: Cluster
) -> None:
    follower = NodePortAddressFollower(NodePortAddresses(), netlab.DUMMY_DEVICE, frozenset())
    node_a.syncer.set_node_addresses(node_a.run(follower.current()))
    node_a.apply(service([(podb, "node-b")]))
    before = node_port_addresses()
    assert NODE_A in before and NEW_ADDRESS not in before
    assert not {CLUSTER_IP, EXTERNAL_IP, LB_IP} & before, "kube-ipvs0's addresses are not node addresses"

    addresses = node_a.run(next_change(follower, add_new_address))
    assert node_a.syncer.set_node_addresses(addresses)
    node_a.apply([])  # one sync
    assert node_port_addresses() == before | {NEW_ADDRESS}
    assert netlab.tcp_request(NEW_ADDRESS, NODE_PORT, netns=outside.netns).backend == "podb"

    node_a.syncer.set_node_addresses(node_a.run(next_change(follower, remove_new_address)))
    node_a.apply([])
    assert node_port_addresses() == before


def test_health_check_node_port_listens_on_the_chosen_node_port_addresses_and_follows_them(
    podb: Namespace, outside: Namespace, settings: IPVSSettings
) -> None:
    """``--nodeport-addresses 192.168.50.0/24``: kube-proxy listens on the node IPs it selects, not on every
    address; aproxy too, and it follows an address added or removed while it runs."""
    table = HealthPortTable()
    node = Cluster(settings, CTX, health_ports=table)
    choice = NodePortAddresses.parse([f"{NODE_A}/24"])
    follower = NodePortAddressFollower(choice, netlab.DUMMY_DEVICE, frozenset())
    assert node.run(follower.current()) == {NODE_A}
    listeners = HealthCheckListeners(table, lambda: True, addresses=[NODE_A])
    extra = {"spec_extra": {"healthCheckNodePort": HEALTH_PORT}}
    try:
        node.apply(service([(podb, "node-b")], policy="Local", **extra))
        node.run(listeners.reconcile())
        assert node.run(asyncio.to_thread(http_get, NODE_A, HEALTH_PORT, outside))[0] == 503
        # The LB IP (on kube-ipvs0) passes the service-IP filter on this port, but nothing listens there now.
        assert not connects(LB_IP, HEALTH_PORT, outside)

        listeners.set_addresses(node.run(next_change(follower, add_new_address)))
        node.run(listeners.reconcile())
        for address in (NODE_A, NEW_ADDRESS):
            assert node.run(asyncio.to_thread(http_get, address, HEALTH_PORT, outside))[0] == 503

        listeners.set_addresses(node.run(next_change(follower, remove_new_address)))
        node.run(listeners.reconcile())
        assert listeners.ports == {HEALTH_PORT}
        assert node.run(asyncio.to_thread(http_get, NODE_A, HEALTH_PORT, outside))[0] == 503
    finally:
        node.run(listeners.close())
        node.close()


# --- aproxy cleanup -----------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
WATCHED_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/vs/conntrack", "net/ipv4/conf/all/arp_ignore")


def aproxy_cleanup(state_file: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "aproxy.cli", "cleanup", "--state-file", str(state_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def aproxy_objects() -> list[str]:
    """Every trace of aproxy in iptables (both families, every table) and ipset."""
    found = [
        line for command in ("iptables-save", "ip6tables-save") for line in netlab.run(command).splitlines()
    ]
    found += netlab.run("ipset", "list", "-n").split() if Path("/sys/module/ip_set").exists() else []
    return [line for line in found if "APROXY" in line]


def test_cleanup_on_a_pristine_node_creates_nothing_and_writes_no_sysctl(tmp_path: Path) -> None:
    netlab.write_sysctl("net/ipv4/ip_forward", "0")
    netlab.write_sysctl("net/ipv4/vs/conntrack", "0")
    before = {name: netlab.read_sysctl(name) for name in WATCHED_SYSCTLS}

    aproxy_cleanup(tmp_path / "owned.json")

    assert {name: netlab.read_sysctl(name) for name in WATCHED_SYSCTLS} == before
    assert not Path("/sys/class/net", netlab.DUMMY_DEVICE).exists()
    assert aproxy_objects() == []


def test_cleanup_removes_exactly_what_aproxy_made(
    lab: Lab, podb: Namespace, settings: IPVSSettings, tmp_path: Path
) -> None:
    netlab.run("iptables", "-t", "filter", "-N", "FOREIGN-IN")
    netlab.run("iptables", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.0/24", "-j", "FOREIGN-IN")
    netlab.run("ipset", "create", "FOREIGN-SET", "hash:ip")
    node = Cluster(settings, CTX, health_ports=HealthPortTable())
    try:
        extra = {"loadBalancerSourceRanges": ["192.168.50.0/24"], "healthCheckNodePort": HEALTH_PORT}
        node.apply(
            service([(podb, "node-b"), (lab.add_pod("poda"), "node-a")], policy="Local", spec_extra=extra)
        )
    finally:
        node.close()
    assert len(aproxy_objects()) > 20  # chains, jumps, rules and sets of both families
    before = {name: netlab.read_sysctl(name) for name in WATCHED_SYSCTLS}

    aproxy_cleanup(settings.state_file)

    assert aproxy_objects() == []
    assert len(netlab.read_ipvs()) == 0
    assert not Path("/sys/class/net", netlab.DUMMY_DEVICE).exists()
    assert "-A INPUT -s 192.0.2.0/24 -j FOREIGN-IN" in netlab.run("iptables-save", "-t", "filter")
    assert "FOREIGN-SET" in netlab.run("ipset", "list", "-n").split()
    assert {name: netlab.read_sysctl(name) for name in WATCHED_SYSCTLS} == before
    netlab.run("ipset", "destroy", "FOREIGN-SET")
