"""A network lab for the kernel tests: pods and clients as network namespaces, echo servers, IPVS readers.

Topology, inside the user-mode Linux guest only (every address is in a private test range; nothing leaves the
guest)::

    client ns 10.88.1.N --veth--+                      +--veth-- pod ns 10.244.1.N (TCP+UDP echo servers)
                                |  node (guest root)   |
                                |  eth0      172.30.0.2 (dummy, default route)
                                |  kube-ipvs0           (dummy holding the virtual IPs)

Each namespace hangs off the node on its own veth pair and is routed, not bridged (like Calico): the node
side of every veth carries the gateway addresses of its kind (10.244.0.1 and fd00:10:244::1 for pods,
10.88.0.1 and fd00:10:88::1 for clients, and fe80::1, the IPv6 default gateway), the namespace side carries
the namespace's /32 and /128, and the node has a host route to each. A packet from a pod back to itself
through a virtual IP therefore leaves and re-enters through the same veth: exactly the hairpin case that
needs masquerading.

Every pod runs a TCP and a UDP echo server that answers each connection, line or datagram with
``"<pod name> <peer address>"``: a test learns which backend answered and which source address it saw. The
servers live in this process (one thread running an asyncio loop): their sockets are created inside the pod's
namespace with setns(2).

Starting a process in the guest costs 30-160 ms (every shared library is read through hostfs; ``ip`` ~80 ms,
``ipvsadm`` ~160 ms), so the lab does its set-up in-process: namespaces are made with unshare(2) and a bind
mount (as ``ip netns add`` does), links, addresses and routes with pyroute2's IPRoute on a netlink socket
opened inside the namespace. A pod costs ~50 ms this way instead of ~300 ms. Reading IPVS stays with
``ipvsadm``: the checks must not share a library with the code under test.

Addresses are never reused within a guest session (pods 10.244.x.y, clients 10.88.x.y count up across tests),
so no IPVS connection entry or persistence template left by one test (``ipvsadm -C`` does not remove them)
can match a later test's traffic.

The client helpers are blocking (bounded by a timeout on every wait); from asyncio code call them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar, cast

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from aproxy.core.model import IPAddress, L4Protocol, RealServerKey, VirtualServerKey, VirtualServerSpec

NODE_ADDRESS = IPv4Address("172.30.0.2")
NODE_ADDRESS6 = IPv6Address("fd00:172:30::2")
POD_GATEWAY = IPv4Address("10.244.0.1")
CLIENT_GATEWAY = IPv4Address("10.88.0.1")
# The node side of every veth also has a global IPv6 address of its kind: without one the node would pick a
# source for IPv6 traffic to a pod by longest prefix among its other addresses, a virtual IP included.
POD_GATEWAY6 = IPv6Address("fd00:10:244::1")
CLIENT_GATEWAY6 = IPv6Address("fd00:10:88::1")
GATEWAY6 = IPv6Address("fe80::1")  # the namespaces' IPv6 default gateway (link-local, on every node veth)
# Pods get 10.244.1.10 and fd00:10:244::1:10 onwards, clients 10.88.1.10 and fd00:10:88::1:10 onwards.
POD_FIRST = IPv4Address("10.244.1.10")
POD_FIRST6 = IPv6Address("fd00:10:244::1:10")
CLIENT_FIRST = IPv4Address("10.88.1.10")
CLIENT_FIRST6 = IPv6Address("fd00:10:88::1:10")
# Service (virtual) addresses for tests to use.
SERVICE_ADDRESS = IPv4Address("10.96.0.10")
SERVICE_ADDRESS6 = IPv6Address("fd00:10:96::10")
DUMMY_DEVICE = "kube-ipvs0"
ECHO_PORT = 8080
DEFAULT_TIMEOUT = 2.0
GUEST_MARKER = Path("/run/aproxy/guest")

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
RT_SCOPE_LINK = 253
NETNS_DIR = Path("/run/netns")
# Room for the "vh-" prefix of the node-side veth within IFNAMSIZ (15 characters).
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,11}")
_MAX_LINE = 4096

# Sysctls a test may change and the next test must not inherit.
_SYSCTLS_FIXED = (
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/ipv4/conf/all/arp_ignore",
    "net/ipv4/conf/all/arp_announce",
    "net/ipv4/conf/all/route_localnet",
)
_SYSCTL_IPVS_DIR = Path("/proc/sys/net/ipv4/vs")
# Built-in chains of each iptables table: what an empty table looks like to iptables-restore.
_BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}


class NetlabError(Exception):
    """The lab could not set something up."""


class CommandError(NetlabError):
    def __init__(self, command: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(command)} failed ({returncode}): {stderr.strip()}")
        self.command = tuple(command)
        self.returncode = returncode
        self.stderr = stderr


class NoReply(NetlabError):
    """A request to an address got no answer (timeout, refused, reset)."""


class IPVSParseError(NetlabError):
    """ipvsadm printed something this parser does not understand."""


def in_guest() -> bool:
    """True only inside the kernel-test guest: the only place where kernel state may be changed freely."""
    return os.environ.get("APROXY_IN_GUEST") == "1" and GUEST_MARKER.exists()


# --- commands -----------------------------------------------------------------------------------------------


def run(*command: str, stdin: str | None = None, check: bool = True) -> str:
    """Run a command, return its stdout; raise CommandError when it fails (unless check=False)."""
    completed = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False, timeout=60)
    if check and completed.returncode != 0:
        raise CommandError(command, completed.returncode, completed.stderr)
    return completed.stdout


def ipvsadm(*args: str) -> str:
    return run("ipvsadm", *args)


def wait_until(
    probe: Callable[[], T | None], *, what: str, timeout: float = 5.0, interval: float = 0.25
) -> T:
    """Poll ``probe`` until it returns something truthy (returned), or raise TimeoutError after ``timeout``.

    For state the kernel settles asynchronously, e.g. ``ipvsadm --stats`` counters, which the IPVS estimator
    folds in only every 2 s.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def read_sysctl(name: str) -> str:
    return Path("/proc/sys", name).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", name).write_text(f"{value}\n")


# --- namespaces and sockets ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _check_libc(result: int, call: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")


def _setns(fd: int) -> None:
    _check_libc(_libc.setns(fd, CLONE_NEWNET), "setns")


@contextmanager
def inside(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in the named network namespace (None: stay where we are).

    setns(2) switches only the calling thread, and sockets keep the namespace they were created in, so a
    socket made inside stays there after the thread switches back.
    """
    if netns is None:
        yield
        return
    with open("/proc/thread-self/ns/net", "rb") as home, open(NETNS_DIR / netns, "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def open_socket(
    netns: str | None, family: socket.AddressFamily, kind: socket.SocketKind, proto: int = 0
) -> socket.socket:
    with inside(netns):
        return socket.socket(family, kind, proto)


def create_netns(name: str) -> None:
    """What ``ip netns add`` does, without a process: unshare, then pin the namespace with a bind mount."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    path = NETNS_DIR / name
    path.touch(exist_ok=False)
    with open("/proc/thread-self/ns/net", "rb") as home:
        _check_libc(_libc.unshare(CLONE_NEWNET), "unshare")
        try:
            source = b"/proc/thread-self/ns/net"
            _check_libc(_libc.mount(source, bytes(path), b"none", MS_BIND, None), f"mount {path}")
        finally:
            _setns(home.fileno())


def delete_netns(name: str) -> None:
    """What ``ip netns del`` does: the namespace goes once nothing else holds it."""
    path = NETNS_DIR / name
    _check_libc(_libc.umount2(bytes(path), MNT_DETACH), f"umount {path}")
    path.unlink()


@contextmanager
def rtnl(netns: str | None = None) -> Iterator[IPRoute]:
    """pyroute2's IPRoute on a netlink socket opened inside the namespace (None: the node)."""
    sock = open_socket(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, 0)  # 0: NETLINK_ROUTE
    ipr = IPRoute(use_socket=sock)
    try:
        yield ipr
    finally:
        ipr.close()
        sock.close()


def _link_index(ipr: IPRoute, name: str) -> int:
    found: list[int] = ipr.link_lookup(ifname=name)
    if not found:
        raise NetlabError(f"no interface {name}")
    return found[0]


def _family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


@dataclass(frozen=True, slots=True)
class Namespace:
    """A pod or client: a network namespace behind a veth pair routed by the node."""

    name: str
    address: IPv4Address
    address6: IPv6Address
    host_interface: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()

    @property
    def netns(self) -> str:
        return self.name

    def exec(self, *command: str, check: bool = True) -> str:
        """Run a command inside the namespace."""
        return run("ip", "netns", "exec", self.name, *command, check=check)


IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h


def _create_namespace(space: Namespace, gateway: IPv4Address, gateway6: IPv6Address) -> None:
    create_netns(space.name)
    with rtnl() as ipr:
        ipr.link(
            "add", ifname=space.host_interface, kind="veth", peer={"ifname": "eth0", "net_ns_fd": space.name}
        )
        host = _link_index(ipr, space.host_interface)
        ipr.addr("add", index=host, address=str(gateway), prefixlen=32)
        # IPv6 addresses skip duplicate address detection: a tentative address answers nothing for about a
        # second after the link comes up, and a test sending at once would race it.
        ipr.addr("add", index=host, address=str(gateway6), prefixlen=128, flags=IFA_F_NODAD)
        ipr.addr("add", index=host, address=str(GATEWAY6), prefixlen=64, flags=IFA_F_NODAD)
        ipr.link("set", index=host, state="up")
        ipr.route("add", dst=f"{space.address}/32", oif=host)
        ipr.route("add", dst=f"{space.address6}/128", oif=host)
    with rtnl(space.name) as ipr:
        eth0 = _link_index(ipr, "eth0")
        ipr.link("set", index=_link_index(ipr, "lo"), state="up")
        ipr.link("set", index=eth0, state="up")
        ipr.addr("add", index=eth0, address=str(space.address), prefixlen=32)
        ipr.addr("add", index=eth0, address=str(space.address6), prefixlen=128, flags=IFA_F_NODAD)
        ipr.route("add", dst=f"{gateway}/32", oif=eth0, scope=RT_SCOPE_LINK)
        ipr.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=eth0)
        ipr.route("add", dst="::/0", gateway=str(GATEWAY6), oif=eth0)


def _delete_namespace(space: Namespace) -> None:
    # The veth goes first and synchronously: a namespace is destroyed asynchronously, and its veth with it,
    # so a later test re-using the interface name could otherwise meet the old one.
    delete_links([space.host_interface])
    if (NETNS_DIR / space.name).exists():
        delete_netns(space.name)


def delete_links(names: Iterable[str]) -> None:
    """Delete these interfaces of the node, those that exist."""
    present = [name for name in names if Path("/sys/class/net", name).exists()]
    if not present:
        return
    with rtnl() as ipr:
        for name in present:
            ipr.link("del", index=_link_index(ipr, name))


# --- echo servers -------------------------------------------------------------------------------------------


def _peer_host(peer: tuple[str, int] | tuple[str, int, int, int]) -> str:
    return peer[0].split("%", 1)[0]


class _UDPEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(f"{self.name} {str(addr[0]).split('%', 1)[0]}\n".encode(), addr)


@dataclass(slots=True)
class _PodServers:
    tcp: list[asyncio.Server] = field(default_factory=list)
    udp: list[asyncio.DatagramTransport] = field(default_factory=list)
    connections: set[asyncio.StreamWriter] = field(default_factory=set)


class EchoServers:
    """Every pod's echo servers, served by one daemon thread running its own asyncio loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netlab-echo", daemon=True)
        self._thread.start()
        self._pods: dict[str, _PodServers] = {}

    def serve(self, space: Namespace) -> None:
        sockets = [
            (kind, _bound_socket(space.netns, family, kind, port))
            for kind, ports in ((socket.SOCK_STREAM, space.tcp_ports), (socket.SOCK_DGRAM, space.udp_ports))
            for port in ports
            for family in (socket.AF_INET, socket.AF_INET6)
        ]
        future = asyncio.run_coroutine_threadsafe(self._start(space.name, sockets), self._loop)
        self._pods[space.name] = future.result(timeout=30)

    async def _start(
        self,
        name: str,
        sockets: list[tuple[socket.SocketKind, socket.socket]],
        pod: _PodServers | None = None,
    ) -> _PodServers:
        pod = pod if pod is not None else _PodServers()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            pod.connections.add(writer)
            line = f"{name} {_peer_host(writer.get_extra_info('peername'))}\n".encode()
            try:
                writer.write(line)
                await writer.drain()
                # Every line the client sends gets another answer: a held connection proves it still works.
                while await reader.readline():
                    writer.write(line)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                pod.connections.discard(writer)
                writer.close()

        for kind, sock in sockets:
            if kind == socket.SOCK_STREAM:
                pod.tcp.append(await asyncio.start_server(handle, sock=sock))
            else:
                transport, _ = await self._loop.create_datagram_endpoint(lambda: _UDPEcho(name), sock=sock)
                pod.udp.append(transport)
        return pod

    def stop_listening(self, space: Namespace) -> None:
        """Close a pod's TCP listeners only: new connections are refused, open ones go on."""
        pod = self._pods[space.name]
        listeners, pod.tcp = pod.tcp, []

        async def close() -> None:
            for server in listeners:
                server.close()  # Python 3.11: the listening sockets only, not the connections

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)

    def listen_again(self, space: Namespace) -> None:
        """Open a pod's TCP listeners again (after ``stop_listening``)."""
        pod = self._pods[space.name]
        sockets = [
            (socket.SOCK_STREAM, _bound_socket(space.netns, family, socket.SOCK_STREAM, port))
            for port in space.tcp_ports
            for family in (socket.AF_INET, socket.AF_INET6)
        ]
        asyncio.run_coroutine_threadsafe(self._start(space.name, sockets, pod), self._loop).result(timeout=30)

    def stop(self, name: str) -> None:
        """Stop a pod's servers and close its open connections."""
        pod = self._pods.pop(name, None)
        if pod is not None:
            asyncio.run_coroutine_threadsafe(self._stop(pod), self._loop).result(timeout=30)

    @staticmethod
    async def _stop(pod: _PodServers) -> None:
        for server in pod.tcp:
            server.close()
        for transport in pod.udp:
            transport.close()
        for writer in list(pod.connections):
            writer.close()
        for server in pod.tcp:
            await server.wait_closed()

    def close(self) -> None:
        for name in list(self._pods):
            self.stop(name)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def _bound_socket(
    netns: str, family: socket.AddressFamily, kind: socket.SocketKind, port: int
) -> socket.socket:
    sock = open_socket(netns, family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# --- the lab ------------------------------------------------------------------------------------------------


class Lab:
    """Pods, clients and service addresses for one test; ``close()`` removes everything it created.

    Creating a lab turns on forwarding (the node routes between clients and pods); ``reset_node`` (run after
    every kernel test by conftest.py) restores it.
    """

    def __init__(self) -> None:
        if not in_guest():
            raise NetlabError("netlab changes kernel state: it runs only inside the kernel-test guest")
        self._spaces: list[Namespace] = []
        self._servers = EchoServers()
        write_sysctl("net/ipv4/ip_forward", "1")
        write_sysctl("net/ipv6/conf/all/forwarding", "1")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add_pod(
        self,
        name: str,
        *,
        tcp_ports: Sequence[int] = (ECHO_PORT,),
        udp_ports: Sequence[int] = (ECHO_PORT,),
        address: IPv4Address | None = None,
    ) -> Namespace:
        """A pod namespace running echo servers on the given ports (both address families). ``address``: a
        fixed IPv4 address (``make run`` gives pods the example manifest's), else the next free one."""
        _check_name(name)
        index = next(_POD_NUMBERS)
        pod = Namespace(
            name=name,
            address=address or POD_FIRST + index,
            address6=POD_FIRST6 + index,
            host_interface=f"vh-{name}",
            tcp_ports=tuple(tcp_ports),
            udp_ports=tuple(udp_ports),
        )
        self._create(pod, POD_GATEWAY, POD_GATEWAY6)
        self._servers.serve(pod)
        return pod

    def add_client(self, name: str = "client") -> Namespace:
        """A client namespace whose traffic to anything but itself is routed through the node."""
        _check_name(name)
        index = next(_CLIENT_NUMBERS)
        client = Namespace(
            name=name,
            address=CLIENT_FIRST + index,
            address6=CLIENT_FIRST6 + index,
            host_interface=f"vh-{name}",
        )
        self._create(client, CLIENT_GATEWAY, CLIENT_GATEWAY6)
        return client

    def add_created(self, space: Namespace, create: Callable[[Namespace], None]) -> Namespace:
        """A namespace another topology builds (``create``), removed by ``close()`` like the lab's own and
        running echo servers on its ports (tests/kernel/fabric.py: node B, its pods, outside clients)."""
        _check_name(space.name)
        self._spaces.append(space)  # recorded first: a half-created namespace is still deleted
        create(space)
        if space.tcp_ports or space.udp_ports:
            self._servers.serve(space)
        return space

    def _create(self, space: Namespace, gateway: IPv4Address, gateway6: IPv6Address) -> None:
        # Recorded first: a half-created namespace is still deleted by close().
        self._spaces.append(space)
        _create_namespace(space, gateway, gateway6)

    def stop_listening(self, pod: Namespace) -> None:
        """The pod's TCP servers stop listening (its open connections go on): a crashed or hung server."""
        self._servers.stop_listening(pod)

    def listen_again(self, pod: Namespace) -> None:
        self._servers.listen_again(pod)

    def remove(self, space: Namespace) -> None:
        """Take a pod or client away (its servers stop, its connections close, its namespace goes)."""
        self._servers.stop(space.name)
        _delete_namespace(space)
        self._spaces.remove(space)

    def close(self) -> None:
        self._servers.close()
        for space in reversed(self._spaces):
            _delete_namespace(space)
        self._spaces.clear()
        delete_links([DUMMY_DEVICE])


# Never reset within a guest session: see the module docstring.
_POD_NUMBERS = itertools.count()
_CLIENT_NUMBERS = itertools.count()


def _check_name(name: str) -> None:
    if not _NAME_PATTERN.fullmatch(name):
        raise NetlabError(
            f"namespace name {name!r} must match {_NAME_PATTERN.pattern} (it names an interface)"
        )


def bind_service_address(address: IPAddress, device: str = DUMMY_DEVICE) -> None:
    """Put a virtual IP on the dummy device (created when missing), as kube-proxy's IPVS mode does."""
    with rtnl() as ipr:
        if not Path("/sys/class/net", device).exists():
            ipr.link("add", ifname=device, kind="dummy")
        index = _link_index(ipr, device)
        ipr.link("set", index=index, state="up")
        ipr.addr("add", index=index, address=str(address), prefixlen=128 if address.version == 6 else 32)


def wait_for_local_routes(device: str = DUMMY_DEVICE) -> None:
    """Until every IPv6 address bound on ``device`` has its local route.

    The kernel installs an IPv6 address's local route from its addrconf work queue, a little after the
    address was added (an IPv4 address's comes with it): a datagram sent in between is routed on instead of
    reaching IPVS, and UDP does not retry. Traffic tests wait for it after binding a new virtual IP.
    """
    wanted = {address for address in device_addresses(device) if address.version == 6}
    if not wanted:
        return

    def routed() -> bool | None:
        output = run("ip", "-6", "route", "show", "table", "local", "dev", device)
        local = {ip_address(match) for match in re.findall(r"^local ([0-9a-f:]+)", output, re.MULTILINE)}
        return True if wanted <= local else None

    wait_until(routed, what=f"local routes of the IPv6 addresses on {device}")


def device_addresses(device: str = DUMMY_DEVICE) -> frozenset[IPAddress]:
    """The global addresses bound on a device (empty when the device does not exist).

    The IPv6 link-local address the kernel gives every interface is left out: nobody binds it.
    """
    if not Path("/sys/class/net", device).exists():
        return frozenset()
    output = run("ip", "-o", "addr", "show", "dev", device, "scope", "global")
    found = re.findall(r"\binet6? ([0-9a-f.:]+)/\d+", output)
    return frozenset(ip_address(text) for text in found)


# --- clients ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One echo answer: which backend answered, and the source address it saw."""

    backend: str
    source: IPAddress

    @classmethod
    def parse(cls, line: bytes) -> Reply:
        try:
            backend, source = line.decode().split()
            return cls(backend, ip_address(source))
        except ValueError as exc:
            raise NoReply(f"unexpected echo answer {line!r}") from exc


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < _MAX_LINE:
        chunk = sock.recv(_MAX_LINE)
        if not chunk:
            raise NoReply(f"connection closed after {data!r}")
        data += chunk
    return data


def endpoint_text(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def tcp_request(
    address: IPAddress, port: int, *, netns: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Reply:
    """Connect (from the namespace, or from the node when netns is None), read the answer, close."""
    with open_socket(netns, _family(address), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((str(address), port))
            return Reply.parse(_read_line(sock))
        except OSError as exc:
            raise NoReply(f"TCP {endpoint_text(address, port)} from {netns or 'the node'}: {exc}") from exc


def udp_request(
    address: IPAddress, port: int, *, netns: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Reply:
    """Send one datagram and wait for the answer; a connected socket accepts it only from address:port."""
    with open_socket(netns, _family(address), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((str(address), port))
            sock.send(b"ping\n")
            return Reply.parse(sock.recv(_MAX_LINE))
        except OSError as exc:
            raise NoReply(f"UDP {endpoint_text(address, port)} from {netns or 'the node'}: {exc}") from exc


def tcp_replies(
    address: IPAddress, port: int, count: int, *, netns: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[Reply]:
    """``count`` fresh connections in a row; raises NoReply at the first one that gets no answer."""
    return [tcp_request(address, port, netns=netns, timeout=timeout) for _ in range(count)]


def udp_replies(
    address: IPAddress, port: int, count: int, *, netns: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[Reply]:
    """``count`` datagrams, each from a fresh socket (a fresh source port, so a fresh IPVS connection)."""
    return [udp_request(address, port, netns=netns, timeout=timeout) for _ in range(count)]


def backends(replies: Iterable[Reply]) -> Counter[str]:
    """How many answers came from each backend."""
    return Counter(reply.backend for reply in replies)


class HeldConnection:
    """An open TCP connection through a virtual IP; ``exchange()`` proves it still carries data."""

    def __init__(self, sock: socket.socket, first: Reply, target: str) -> None:
        self._sock = sock
        self.first = first
        self._target = target

    @property
    def backend(self) -> str:
        return self.first.backend

    def exchange(self) -> Reply:
        try:
            self._sock.sendall(b"ping\n")
            return Reply.parse(_read_line(self._sock))
        except OSError as exc:
            raise NoReply(f"held connection to {self._target}: {exc}") from exc

    def close(self) -> None:
        self._sock.close()

    def reset(self) -> None:
        """Close with a RST (SO_LINGER 0) instead of a FIN: IPVS keeps a reset connection's entry 10 s
        (CLOSE), a closed one two minutes (TIME_WAIT, counted as inactive)."""
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def hold(
    address: IPAddress, port: int, *, netns: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> HeldConnection:
    """Open a TCP connection and keep it open (use as a context manager, or close() it)."""
    target = endpoint_text(address, port)
    sock = open_socket(netns, _family(address), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((str(address), port))
        first = Reply.parse(_read_line(sock))
    except OSError as exc:
        sock.close()
        raise NoReply(f"TCP {target} from {netns or 'the node'}: {exc}") from exc
    except NoReply:
        sock.close()
        raise
    return HeldConnection(sock, first, target)


# --- ipvsadm, parsed ----------------------------------------------------------------------------------------

Endpoint = tuple[IPAddress, int]


def parse_endpoint(text: str) -> Endpoint:
    """``10.0.0.1:80`` or ``[fd00::1]:80``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise IPVSParseError(f"not an address:port: {text!r}")
    try:
        return ip_address(host.strip("[]")), int(port)
    except ValueError as exc:
        raise IPVSParseError(f"not an address:port: {text!r}") from exc


@dataclass(frozen=True, slots=True)
class RealServerEntry:
    address: IPAddress
    port: int
    forward: str  # Masq, Route, Tunnel, Local
    weight: int
    active: int
    inactive: int

    @property
    def key(self) -> RealServerKey:
        return RealServerKey(self.address, self.port)


@dataclass(frozen=True, slots=True)
class VirtualServerEntry:
    protocol: L4Protocol
    address: IPAddress
    port: int
    scheduler: str
    # Scheduler flags in the model's canonical names (flag-1..3; ipvsadm prints sh-fallback, sh-port, ...).
    flags: frozenset[str]
    persistence_timeout: int  # 0: not persistent
    netmask: str | None
    one_packet: bool
    real_servers: tuple[RealServerEntry, ...]

    @property
    def key(self) -> VirtualServerKey:
        return VirtualServerKey(self.protocol, self.address, self.port)

    @property
    def spec(self) -> VirtualServerSpec:
        return VirtualServerSpec(self.scheduler, self.persistence_timeout, self.flags)

    @property
    def weights(self) -> dict[RealServerKey, int]:
        return {real.key: real.weight for real in self.real_servers}

    def real(self, address: IPAddress | str, port: int) -> RealServerEntry:
        wanted = RealServerKey(ip_address(address), port)
        for real in self.real_servers:
            if real.key == wanted:
                return real
        raise KeyError(f"{wanted} is not a real server of {self.key}: {sorted(map(str, self.weights))}")


@dataclass(frozen=True, slots=True)
class FwmarkEntry:
    """A firewall-mark virtual server (aproxy never makes these; a foreign one may exist)."""

    fwmark: int
    scheduler: str
    real_servers: tuple[RealServerEntry, ...]


@dataclass(frozen=True, slots=True)
class IPVSTable:
    virtual_servers: tuple[VirtualServerEntry, ...]
    fwmark_servers: tuple[FwmarkEntry, ...] = ()

    def keys(self) -> frozenset[VirtualServerKey]:
        return frozenset(entry.key for entry in self.virtual_servers)

    def get(self, key: VirtualServerKey) -> VirtualServerEntry:
        for entry in self.virtual_servers:
            if entry.key == key:
                return entry
        raise KeyError(f"no virtual server {key}; present: {sorted(map(str, self.keys()))}")

    def find(self, protocol: str, address: IPAddress | str, port: int) -> VirtualServerEntry:
        return self.get(VirtualServerKey(L4Protocol(protocol.upper()), ip_address(address), port))

    def __len__(self) -> int:
        return len(self.virtual_servers) + len(self.fwmark_servers)


def canonical_flag(scheduler: str, printed: str) -> str:
    """ipvsadm names flags 1 and 2 after the scheduler for sh and mh; the model always says flag-N."""
    if printed == f"{scheduler}-fallback":
        return "flag-1"
    if printed == f"{scheduler}-port":
        return "flag-2"
    return printed


def _parse_options(scheduler: str, tokens: list[str]) -> tuple[frozenset[str], int, str | None, bool]:
    flags: frozenset[str] = frozenset()
    persistence = 0
    netmask: str | None = None
    one_packet = False
    position = 0
    while position < len(tokens):
        token = tokens[position]
        if token.startswith("("):
            flags = frozenset(
                canonical_flag(scheduler, name) for name in token.strip("()").split(",") if name
            )
        elif token == "persistent":
            position += 1
            persistence = int(tokens[position])
        elif token == "mask":
            position += 1
            netmask = tokens[position]
        elif token == "pe":
            position += 1  # persistence engine (sip): not used by aproxy
        elif token == "ops":
            one_packet = True
        else:
            raise IPVSParseError(f"unknown virtual server option {token!r} in {tokens}")
        position += 1
    return flags, persistence, netmask, one_packet


def _parse_real_server(line: str) -> RealServerEntry:
    parts = line.split()
    if len(parts) != 6 or parts[0] != "->":
        raise IPVSParseError(f"not a real server line: {line!r}")
    address, port = parse_endpoint(parts[1])
    return RealServerEntry(address, port, parts[2], int(parts[3]), int(parts[4]), int(parts[5]))


def parse_ipvs(text: str) -> IPVSTable:
    """Parse ``ipvsadm -Ln`` output."""
    virtual: list[VirtualServerEntry] = []
    fwmark: list[FwmarkEntry] = []
    # (header tokens, real servers) of the virtual server being read.
    current: tuple[list[str], list[RealServerEntry]] | None = None

    def flush() -> None:
        if current is None:
            return
        head, reals = current
        if head[0] == "FWM":
            # An IPv6 firewall-mark service reads "FWM  8 IPv6 sh": the family comes before the scheduler.
            scheduler = head[3] if head[2] == "IPv6" and len(head) > 3 else head[2]
            fwmark.append(FwmarkEntry(int(head[1]), scheduler, tuple(reals)))
            return
        address, port = parse_endpoint(head[1])
        flags, persistence, netmask, one_packet = _parse_options(head[2], head[3:])
        virtual.append(
            VirtualServerEntry(
                L4Protocol(head[0]),
                address,
                port,
                head[2],
                flags,
                persistence,
                netmask,
                one_packet,
                tuple(reals),
            )
        )

    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("IP Virtual Server", "Prot ", "-> RemoteAddress")):
            continue
        if stripped.startswith("->"):
            if current is None:
                raise IPVSParseError(f"real server outside a virtual server: {line!r}")
            current[1].append(_parse_real_server(stripped))
            continue
        flush()
        head = stripped.split()
        if head[0] not in {"TCP", "UDP", "SCTP", "FWM"} or len(head) < 3:
            raise IPVSParseError(f"not a virtual server line: {line!r}")
        current = (head, [])
    flush()
    return IPVSTable(tuple(virtual), tuple(fwmark))


def read_ipvs() -> IPVSTable:
    """The kernel's IPVS table, as ``ipvsadm -Ln`` shows it."""
    return parse_ipvs(ipvsadm("-Ln"))


def hairpin_addresses(name: str = "APROXY-LOOP-BACK") -> set[IPAddress]:
    """The real server addresses in aproxy's hairpin set, as ``ipset save`` shows its members."""
    members = re.findall(rf"^add {re.escape(name)} ([^,\s]+),", run("ipset", "save", name), re.MULTILINE)
    return {ip_address(address) for address in members}


def real_server_addresses(version: int = 4) -> set[IPAddress]:
    """Every real server address of one family in the kernel's IPVS table."""
    reals = (real for entry in read_ipvs().virtual_servers for real in entry.real_servers)
    return {real.address for real in reals if real.address.version == version}


@dataclass(frozen=True, slots=True)
class TrafficStats:
    connections: int
    in_packets: int
    out_packets: int
    in_bytes: int
    out_bytes: int


@dataclass(frozen=True, slots=True)
class VirtualServerStats:
    key: VirtualServerKey
    total: TrafficStats
    real_servers: dict[RealServerKey, TrafficStats]


def _stats(numbers: Sequence[str]) -> TrafficStats:
    if len(numbers) != 5:
        raise IPVSParseError(f"expected 5 counters, got {numbers}")
    return TrafficStats(*(int(number) for number in numbers))


def parse_ipvs_stats(text: str) -> dict[VirtualServerKey, VirtualServerStats]:
    """Parse ``ipvsadm -Ln --stats --exact`` (firewall-mark virtual servers are left out)."""
    found: dict[VirtualServerKey, VirtualServerStats] = {}
    current: VirtualServerStats | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] in {"IP", "Prot"} or parts[1:2] == ["RemoteAddress:Port"]:
            continue
        if parts[0] == "->":
            if current is not None:
                address, port = parse_endpoint(parts[1])
                current.real_servers[RealServerKey(address, port)] = _stats(parts[2:])
            continue
        if parts[0] == "FWM":
            current = None
            continue
        address, port = parse_endpoint(parts[1])
        key = VirtualServerKey(L4Protocol(parts[0]), address, port)
        current = found[key] = VirtualServerStats(key, _stats(parts[2:]), {})
    return found


def read_ipvs_stats() -> dict[VirtualServerKey, VirtualServerStats]:
    """Cumulative traffic counters per virtual server and real server (``conns`` = connections scheduled)."""
    return parse_ipvs_stats(ipvsadm("-Ln", "--stats", "--exact"))


@dataclass(frozen=True, slots=True)
class IPVSConnection:
    protocol: str  # TCP, UDP, SCTP, or IP for a persistence template
    expire: str  # mm:ss as ipvsadm prints it
    state: str
    source: Endpoint
    virtual: Endpoint
    destination: Endpoint


def parse_ipvs_connections(text: str) -> list[IPVSConnection]:
    """Parse ``ipvsadm -Lnc``."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6 or parts[0] in {"IPVS", "pro"}:
            continue
        protocol, expire, state, source, virtual, destination = parts
        found.append(
            IPVSConnection(
                protocol,
                expire,
                state,
                parse_endpoint(source),
                parse_endpoint(virtual),
                parse_endpoint(destination),
            )
        )
    return found


def read_ipvs_connections() -> list[IPVSConnection]:
    """IPVS's connection table (and persistence templates)."""
    return parse_ipvs_connections(ipvsadm("-Lnc"))


# --- resetting the node between tests -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeBaseline:
    """The node's pristine state, captured once before the first test."""

    links: frozenset[str]
    iptables: str
    ip6tables: str
    sysctls: dict[str, str]


def _snapshot_sysctls() -> dict[str, str]:
    names = list(_SYSCTLS_FIXED)
    if _SYSCTL_IPVS_DIR.is_dir():
        names += [
            f"net/ipv4/vs/{entry.name}"
            for entry in sorted(_SYSCTL_IPVS_DIR.iterdir())
            if os.access(entry, os.W_OK)
        ]
    return {name: read_sysctl(name) for name in names}


def _links() -> frozenset[str]:
    return frozenset(entry.name for entry in Path("/sys/class/net").iterdir())


def capture_baseline() -> NodeBaseline:
    return NodeBaseline(_links(), run("iptables-save"), run("ip6tables-save"), _snapshot_sysctls())


def _table_names(family: str) -> set[str]:
    # Tables are instantiated lazily, on first use: the legacy iptables-save prints only those, so a pristine
    # node saves as nothing at all.
    path = Path(f"/proc/net/{family}_tables_names")
    return set(path.read_text().split()) if path.exists() else set()


def _tables_to_restore(saved: str, current: set[str]) -> str:
    """The saved rules, plus an empty table for each table in use now but not then (restoring flushes it)."""
    saved_tables = set(re.findall(r"^\*(\S+)$", saved, re.MULTILINE))
    blocks = [saved]
    for table in sorted(current - saved_tables):
        chains = "".join(f":{chain} ACCEPT [0:0]\n" for chain in _BUILTIN_CHAINS.get(table, ()))
        blocks.append(f"*{table}\n{chains}COMMIT\n")
    return "".join(blocks)


def _restore_iptables(baseline: NodeBaseline) -> None:
    for family, command, saved in (
        ("ip", "iptables-restore", baseline.iptables),
        ("ip6", "ip6tables-restore", baseline.ip6tables),
    ):
        current = _table_names(family)
        if current:  # none instantiated: nothing can have changed
            run(command, stdin=_tables_to_restore(saved, current))


def _ipvs_has_entries() -> bool:
    # /proc/net/ip_vs: three header lines, then one line per virtual or real server.
    try:
        return len(Path("/proc/net/ip_vs").read_text().splitlines()) > 3
    except FileNotFoundError:  # ip_vs not loaded (a test may unload it): nothing to flush
        return False


def _destroy_aproxy_ipsets() -> None:
    """aproxy's hairpin sets (APROXY-*) outlive the rules that used them; a later test must start without."""
    if not Path("/sys/module/ip_set").exists():
        return  # no test loaded ipset yet: nothing to destroy, and no process start
    for name in run("ipset", "list", "-n").split():
        if name.startswith("APROXY-"):
            run("ipset", "destroy", name)


def reset_node(baseline: NodeBaseline) -> None:
    """Undo what a test left behind: IPVS rules, interfaces, namespaces, iptables, sysctls, conntrack entries.

    Cheap checks first, so a test that changed little costs little: every process start is expensive here.
    """
    if not in_guest():
        raise NetlabError("reset_node changes kernel state: it runs only inside the kernel-test guest")
    if _ipvs_has_entries():
        ipvsadm("-C")
    # Interfaces the test made (veths towards its namespaces, kube-ipvs0, ...): deleting one end of a veth
    # deletes both, synchronously.
    for name in sorted(_links() - baseline.links):
        with suppress(NetlinkError):  # the peer of a veth deleted just before, or a device that cannot go
            delete_links([name])
    if NETNS_DIR.is_dir():
        for entry in NETNS_DIR.iterdir():
            delete_netns(entry.name)
    _restore_iptables(baseline)
    _destroy_aproxy_ipsets()  # after the iptables rules that reference them are gone
    for name, value in baseline.sysctls.items():
        with suppress(FileNotFoundError):  # the ip_vs module may have been unloaded by the test
            if read_sysctl(name) != value:
                write_sysctl(name, value)
    with suppress(FileNotFoundError):
        if int(read_sysctl("net/netfilter/nf_conntrack_count")) > 0:
            run("conntrack", "-F", check=False)  # exits 1 when the table emptied meanwhile
