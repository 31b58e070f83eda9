"""A multi-node lab: node A (the guest's root namespace, where aproxy runs), node B and outside clients.

Topology (IPv4, every address private to the guest)::

    client ns 192.168.50.100+N --veth--+
                                       |  bridge fab0 (root ns)  192.168.50.1 = node A
    node B ns 192.168.50.2  ----veth---+
       +--veth-- pod ns 10.245.1.N (echo servers), node B side gateway 10.245.0.1

Node A's own pods come from netlab.Lab.add_pod (10.244.1.N, routed by the root namespace). The pod network is
flat and routed, as with Calico or host-gw flannel: node A routes 10.245.0.0/16 to node B, node B routes
10.244.0.0/16 to node A, and clients route 10.245.0.0/16 to node B directly. So a pod on node B answers a
client *directly*, not through node A: exactly what makes a missing source NAT visible (the client gets an
answer from an address it never talked to, and drops it). The bridge carries frames only (br_netfilter is not
loaded): traffic between node B and a client never touches node A's iptables.

Every namespace is registered with the Lab, so the Lab's close and the node reset remove them; the bridge is
a new link, which the node reset deletes too.
"""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address, IPv6Address

from tests.kernel import netlab
from tests.kernel.netlab import ECHO_PORT, Lab, Namespace, inside, rtnl, write_sysctl

BRIDGE = "fab0"
NODE_A = IPv4Address("192.168.50.1")
NODE_B = IPv4Address("192.168.50.2")
FABRIC_PREFIX = 24
NODE_B_NETNS = "nodeb"
POD_A_NETWORK = "10.244.0.0/16"
POD_B_NETWORK = "10.245.0.0/16"
POD_B_GATEWAY = IPv4Address("10.245.0.1")
POD_B_FIRST = IPv4Address("10.245.1.10")
CLIENT_FIRST = IPv4Address("192.168.50.100")
# Namespace wants an IPv6 address; the fabric is IPv4 only, so this one is never configured.
_UNUSED6 = IPv6Address("fd00:50::1")

# Never reused within a guest session (see netlab's docstring: no stale IPVS entry can match a later test).
_POD_NUMBERS = itertools.count()
_CLIENT_NUMBERS = itertools.count()


class Fabric:
    """Node B and outside clients around node A; build with ``Fabric(lab)`` inside a test."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab
        with rtnl() as ipr:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            bridge = netlab._link_index(ipr, BRIDGE)
            ipr.addr("add", index=bridge, address=str(NODE_A), prefixlen=FABRIC_PREFIX)
            ipr.link("set", index=bridge, state="up")
        self.node_b = lab.add_created(
            Namespace(NODE_B_NETNS, NODE_B, _UNUSED6, host_interface="fab-nodeb"), self._create_node_b
        )
        with rtnl() as ipr:
            ipr.route("add", dst=POD_B_NETWORK, gateway=str(NODE_B))

    def add_remote_pod(
        self,
        name: str,
        *,
        tcp_ports: tuple[int, ...] = (ECHO_PORT,),
        udp_ports: tuple[int, ...] = (ECHO_PORT,),
    ) -> Namespace:
        """A pod on node B running echo servers (its veth's node side is in node B's namespace)."""
        index = next(_POD_NUMBERS)
        pod = Namespace(name, POD_B_FIRST + index, _UNUSED6, f"vh-{name}", tcp_ports, udp_ports)
        return self._lab.add_created(pod, _create_pod_on_node_b)

    def add_client(self, name: str) -> Namespace:
        """A client on the fabric: node A is its router, except to node B's pods (direct, flat network)."""
        index = next(_CLIENT_NUMBERS)
        client = Namespace(name, CLIENT_FIRST + index, _UNUSED6, f"fab-{name}")
        return self._lab.add_created(client, self._create_client)

    def _plug(self, space: Namespace, address: IPv4Address) -> None:
        """A namespace on the bridge: a veth whose root side is a port of fab0, the other side eth0."""
        netlab.create_netns(space.name)
        with rtnl() as ipr:
            ipr.link(
                "add",
                ifname=space.host_interface,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": space.name},
            )
            port = netlab._link_index(ipr, space.host_interface)
            ipr.link("set", index=port, master=netlab._link_index(ipr, BRIDGE))
            ipr.link("set", index=port, state="up")
        with rtnl(space.name) as ipr:
            eth0 = netlab._link_index(ipr, "eth0")
            ipr.link("set", index=netlab._link_index(ipr, "lo"), state="up")
            ipr.link("set", index=eth0, state="up")
            ipr.addr("add", index=eth0, address=str(address), prefixlen=FABRIC_PREFIX)

    def _create_node_b(self, node: Namespace) -> None:
        self._plug(node, NODE_B)
        with rtnl(node.name) as ipr:
            ipr.route("add", dst=POD_A_NETWORK, gateway=str(NODE_A))
        with inside(node.name):  # /proc/sys/net follows the opening thread's namespace
            write_sysctl("net/ipv4/ip_forward", "1")

    def _create_client(self, client: Namespace) -> None:
        self._plug(client, client.address)
        with rtnl(client.name) as ipr:
            ipr.route("add", dst=POD_B_NETWORK, gateway=str(NODE_B))
            ipr.route("add", dst="0.0.0.0/0", gateway=str(NODE_A))


def _create_pod_on_node_b(pod: Namespace) -> None:
    netlab.create_netns(pod.name)
    with rtnl(NODE_B_NETNS) as ipr:
        ipr.link(
            "add", ifname=pod.host_interface, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.name}
        )
        host = netlab._link_index(ipr, pod.host_interface)
        ipr.addr("add", index=host, address=str(POD_B_GATEWAY), prefixlen=32)
        ipr.link("set", index=host, state="up")
        ipr.route("add", dst=f"{pod.address}/32", oif=host)
    with rtnl(pod.name) as ipr:
        eth0 = netlab._link_index(ipr, "eth0")
        ipr.link("set", index=netlab._link_index(ipr, "lo"), state="up")
        ipr.link("set", index=eth0, state="up")
        ipr.addr("add", index=eth0, address=str(pod.address), prefixlen=32)
        ipr.route("add", dst=f"{POD_B_GATEWAY}/32", oif=eth0, scope=netlab.RT_SCOPE_LINK)
        ipr.route("add", dst="0.0.0.0/0", gateway=str(POD_B_GATEWAY), oif=eth0)
