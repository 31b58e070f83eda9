"""Real traffic through aproxy's kernel state: load spreading, affinity, source NAT, UDP conntrack, sysctls.

Every test drives the daemon's code path (``Syncer`` + ``IPVSBackend``) with Services and EndpointSlices built
as dicts, pointing at netlab pods (network namespaces running echo servers that answer with their name and
the source address they saw). Checks read the kernel with its own tools (ipvsadm, iptables-save, ipset,
conntrack) or look at the traffic, never through the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
from collections.abc import Coroutine, Iterator, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from aproxy.backends import ipset_wire
from aproxy.backends.ipset_socket import IPSetSocket
from aproxy.backends.ipvs import IPVSBackend, IPVSSettings
from aproxy.backends.masquerade import Masquerade
from aproxy.backends.nat_rules import LoopBackEntry
from aproxy.core.changes import ChangeTracker
from aproxy.core.health_ports import HealthPortTable
from aproxy.core.model import IPAddress, L4Protocol, RealServerKey
from aproxy.core.translate import TranslationContext
from aproxy.syncer import Syncer, SyncReport
from tests.core import k8s
from tests.kernel import netlab
from tests.kernel.netlab import (
    ECHO_PORT,
    POD_GATEWAY,
    POD_GATEWAY6,
    SERVICE_ADDRESS,
    SERVICE_ADDRESS6,
    Lab,
    Namespace,
)

pytestmark = pytest.mark.kernel
T = TypeVar("T")

CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({netlab.NODE_ADDRESS}))
PORT = 80
DNS_PORT = 53
SYSCTLS_SET = {
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}
STRICT_ARP = {"net/ipv4/conf/all/arp_ignore": "1", "net/ipv4/conf/all/arp_announce": "2"}
CONN_REUSE_MODE = "net/ipv4/vs/conn_reuse_mode"


# --- the cluster under test ---------------------------------------------------------------------------------


def _address(pod: Namespace, version: int) -> IPAddress:
    return pod.address if version == 4 else pod.address6


def web_service(
    pods: Sequence[Namespace],
    *,
    version: int = 4,
    protocol: str = "TCP",
    port: int = PORT,
    affinity: bool = False,
    not_ready: Sequence[Namespace] = (),
    remote: Sequence[Namespace] = (),
) -> list[dict[str, Any]]:
    """A ClusterIP service ``default/web`` on the netlab virtual IP, with the pods as its endpoints: on this
    node (CTX's node-a), except ``remote`` ones, which the slice puts on node-b."""
    vip = SERVICE_ADDRESS if version == 4 else SERVICE_ADDRESS6
    endpoints = [k8s.endpoint(str(_address(pod, version)), ready=True, node="node-a") for pod in pods]
    endpoints += [k8s.endpoint(str(_address(pod, version)), ready=False, node="node-a") for pod in not_ready]
    endpoints += [k8s.endpoint(str(_address(pod, version)), ready=True, node="node-b") for pod in remote]
    return [
        k8s.service(
            "web", cluster_ips=str(vip), ports=[k8s.port("web", port, protocol)], affinity=affinity or None
        ),
        k8s.endpoint_slice(
            "web",
            address_type=f"IPv{version}",
            endpoints=endpoints,
            ports=[k8s.slice_port("web", ECHO_PORT, protocol)],
        ),
    ]


class Cluster:
    """One aproxy "daemon": a tracker, an opened IPVSBackend and its Syncer, on one event loop."""

    def __init__(
        self,
        settings: IPVSSettings,
        ctx: TranslationContext = CTX,
        health_ports: HealthPortTable | None = None,
        *,
        hairpin_filter: bool = True,
    ) -> None:
        self._runner = asyncio.Runner()
        self.tracker = ChangeTracker()
        self.backend = IPVSBackend(settings)
        try:
            self._runner.run(self.backend.open())
        except BaseException:
            self._runner.close()
            raise
        self.syncer = Syncer(self.tracker, ctx, self.backend, health_ports=health_ports)
        if not hairpin_filter:  # an aproxy from before the filter (the syncer hands its own over)
            self.backend.set_local_endpoints(lambda _address: True)

    def apply(self, objects: Sequence[dict[str, Any]]) -> SyncReport:
        """Feed the objects (upserts) and sync them, as the daemon would after a watch event."""
        for obj in objects:
            if obj["kind"] == "Service":
                self.tracker.upsert_service(obj)
            else:
                self.tracker.upsert_slice(obj)
        if not self.syncer.started:
            self.tracker.mark_listed("services")
            self.tracker.mark_listed("endpointslices")
            report = self._runner.run(self.syncer.start())
        else:
            report = self._runner.run(self.syncer.sync())
        assert report.ok, report.failures
        netlab.wait_for_local_routes()  # a new IPv6 virtual IP takes traffic a moment after it is bound
        return report

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the cluster's event loop (listeners it serves answer while it runs)."""
        return self._runner.run(coroutine)

    def audit(self) -> SyncReport:
        return self._runner.run(self.syncer.audit())

    def drain(self) -> SyncReport:
        return self._runner.run(self.syncer.drain())

    def cleanup(self) -> int:
        return self._runner.run(self.backend.cleanup())

    def close(self) -> None:
        try:
            self._runner.run(self.backend.close())
        finally:
            self._runner.close()


@pytest.fixture
def settings(tmp_path: Path) -> IPVSSettings:
    return IPVSSettings(state_file=tmp_path / "owned.json")


@pytest.fixture
def clusters(settings: IPVSSettings) -> Iterator[list[Cluster]]:
    """Opened clusters, closed at the end (a test may open a second one: a restart).

    The node reset after each test restores iptables but does not know ipsets: aproxy's go here.
    """
    opened: list[Cluster] = []
    yield opened
    for cluster in opened:
        cluster.close()
    asyncio.run(Masquerade().cleanup())


@pytest.fixture
def foreign_set() -> Iterator[str]:
    netlab.run("ipset", "create", "FOREIGN-SET", "hash:ip")
    yield "FOREIGN-SET"
    netlab.run("ipset", "destroy", "FOREIGN-SET", check=False)


def open_cluster(clusters: list[Cluster], settings: IPVSSettings, *, hairpin_filter: bool = True) -> Cluster:
    cluster = Cluster(settings, hairpin_filter=hairpin_filter)
    clusters.append(cluster)
    return cluster


# --- reading the kernel with its own tools ------------------------------------------------------------------


def nat_rules(command: str = "iptables-save") -> list[str]:
    return netlab.run(command, "-t", "nat").splitlines()


def ipset_names() -> set[str]:
    return set(netlab.run("ipset", "list", "-n").split())


def hairpin_members(name: str = "APROXY-LOOP-BACK") -> set[str]:
    return set(re.findall(rf"^add {re.escape(name)} (\S+)$", netlab.run("ipset", "save", name), re.MULTILINE))


def member(pod: Namespace, protocol: str = "tcp", port: int = ECHO_PORT) -> str:
    return f"{pod.address},{protocol}:{port},{pod.address}"


def udp_conntrack_reply_sources(version: int = 4) -> list[IPAddress]:
    """The reply-direction source (the real server) of every UDP conntrack entry of one family."""
    output = netlab.run("conntrack", "-L", "-f", f"ipv{version}", "-p", "udp", check=False)
    sources = []
    for line in output.splitlines():
        found = re.findall(r"\bsrc=(\S+)", line)
        if len(found) == 2:
            sources.append(ip_address(found[1]))
    return sources


class HeldUDP:
    """A connected UDP socket kept open: every datagram has the same source port (a resolver's habit)."""

    def __init__(self, netns: str, address: IPAddress, port: int) -> None:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        self._sock = netlab.open_socket(netns, family, socket.SOCK_DGRAM)
        self._sock.settimeout(netlab.DEFAULT_TIMEOUT)
        self._sock.connect((str(address), port))

    def ask(self) -> netlab.Reply:
        try:
            self._sock.send(b"ping\n")
            return netlab.Reply.parse(self._sock.recv(4096))
        except OSError as exc:
            raise netlab.NoReply(f"held UDP socket: {exc}") from exc

    def close(self) -> None:
        self._sock.close()


# --- (1) spreading, (2) affinity ----------------------------------------------------------------------------


def test_client_sees_every_ready_backend_evenly_with_rr(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    pods = [lab.add_pod(name) for name in ("pod-a", "pod-b", "pod-c")]
    unready = lab.add_pod("pod-unready")
    client = lab.add_client()
    open_cluster(clusters, settings).apply(web_service(pods, not_ready=[unready]))

    replies = netlab.tcp_replies(SERVICE_ADDRESS, PORT, 12, netns=client.netns)

    assert netlab.backends(replies) == {"pod-a": 4, "pod-b": 4, "pod-c": 4}
    assert {reply.source for reply in replies} == {client.address}  # clients keep their source


def test_session_affinity_keeps_a_client_on_one_backend(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    pods = [lab.add_pod(name) for name in ("pod-a", "pod-b", "pod-c")]
    client = lab.add_client()
    open_cluster(clusters, settings).apply(web_service(pods, affinity=True))

    replies = netlab.tcp_replies(SERVICE_ADDRESS, PORT, 9, netns=client.netns)

    assert len(netlab.backends(replies)) == 1
    assert netlab.read_ipvs().find("TCP", SERVICE_ADDRESS, PORT).persistence_timeout == 10800


# --- (3) node to virtual IP, (4) hairpin --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "masquerade", "seen"),
    [
        pytest.param(4, True, POD_GATEWAY, id="ipv4-masqueraded"),
        pytest.param(6, True, POD_GATEWAY6, id="ipv6-masqueraded"),
        # Without source NAT the node speaks from the virtual IP itself (bound locally): a pod on another
        # node would answer to its own node's copy of that address.
        pytest.param(4, False, SERVICE_ADDRESS, id="ipv4-without-masquerade"),
    ],
)
def test_node_itself_reaches_the_virtual_ip(
    lab: Lab,
    clusters: list[Cluster],
    settings: IPVSSettings,
    version: int,
    masquerade: bool,
    seen: IPAddress,
) -> None:
    pod = lab.add_pod("pod-a")
    vip = SERVICE_ADDRESS if version == 4 else SERVICE_ADDRESS6
    open_cluster(clusters, _with(settings, masquerade=masquerade)).apply(web_service([pod], version=version))

    reply = netlab.tcp_request(vip, PORT)

    assert reply == netlab.Reply("pod-a", seen)


@pytest.mark.parametrize("version", [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")])
def test_hairpin_a_backend_reaches_itself_through_its_service(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings, version: int
) -> None:
    pods = [lab.add_pod("pod-a"), lab.add_pod("pod-b")]
    vip = SERVICE_ADDRESS if version == 4 else SERVICE_ADDRESS6
    open_cluster(clusters, settings).apply(web_service(pods, version=version))

    # rr alternates: pod-a reaches itself once and pod-b once.
    replies = netlab.tcp_replies(vip, PORT, 2, netns=pods[0].netns)

    sources = {reply.backend: reply.source for reply in replies}
    gateway = POD_GATEWAY if version == 4 else POD_GATEWAY6
    assert sources == {
        "pod-a": gateway,  # to itself: masqueraded, or its own answer would never come back through IPVS
        "pod-b": _address(pods[0], version),  # to another pod: the source is kept
    }


def set_counters(masquerade: Masquerade) -> tuple[int, int, int, int]:
    """Netlink batches, members sent, members refused, commands run (ipset, iptables...) so far."""
    m = masquerade
    return m.set_writes, m.entries_written, m.entries_failed, m.commands_run


def test_hairpin_set_follows_endpoint_changes_one_entry_at_a_time(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    pod_a, pod_b, pod_c = (lab.add_pod(name) for name in ("pod-a", "pod-b", "pod-c"))
    cluster = open_cluster(clusters, settings)
    cluster.apply(web_service([pod_a, pod_b]))
    masquerade = cluster.backend.masquerade
    assert masquerade is not None
    after_start = hairpin_members()
    before_add = set_counters(masquerade)
    cluster.apply(web_service([pod_a, pod_b, pod_c]))
    after_add = hairpin_members()
    add_cost = tuple(now - then for now, then in zip(set_counters(masquerade), before_add, strict=True))
    cluster.apply(web_service([pod_b, pod_c]))
    while_draining = hairpin_members()
    before_drain = set_counters(masquerade)
    drained = cluster.drain()
    drain_cost = tuple(now - then for now, then in zip(set_counters(masquerade), before_drain, strict=True))

    assert after_start == {member(pod_a), member(pod_b)}
    assert after_add == {member(pod_a), member(pod_b), member(pod_c)}
    # One netlink batch carrying one member, none refused, and no ipset (or iptables) process started.
    assert add_cost == (1, 1, 0, 0)
    # A removed TCP endpoint drains at weight 0 first: its held connections may still be hairpin ones.
    assert while_draining == after_add
    assert [result.operation.name for result in drained.results] == ["delete_real_server"]
    assert drain_cost == (1, 1, 0, 0)
    assert hairpin_members() == {member(pod_b), member(pod_c)}
    assert netlab.tcp_request(SERVICE_ADDRESS, PORT, netns=pod_c.netns).backend in {"pod-b", "pod-c"}


def test_hairpin_set_holds_only_the_endpoints_on_this_node(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    local_a, local_c = lab.add_pod("pod-a"), lab.add_pod("pod-c")
    remote_b, remote_d = lab.add_pod("pod-b"), lab.add_pod("pod-d")  # node-b's, as the slice says
    cluster = open_cluster(clusters, settings)
    cluster.apply(web_service([local_a], remote=[remote_b]))
    after_start = hairpin_members()
    cluster.apply(web_service([local_a, local_c], remote=[remote_b, remote_d]))
    after_sync = hairpin_members()

    assert after_start == {member(local_a)}
    assert after_sync == {member(local_a), member(local_c)}
    web = netlab.read_ipvs().find("TCP", SERVICE_ADDRESS, PORT)
    reals = {real.address for real in web.real_servers}
    assert reals == {pod.address for pod in (local_a, local_c, remote_b, remote_d)}  # IPVS keeps them all
    # The local pod still reaches itself through its service (masqueraded as hairpin).
    replies = netlab.tcp_replies(SERVICE_ADDRESS, PORT, 4, netns=local_a.netns)
    assert {reply.source for reply in replies if reply.backend == "pod-a"} == {POD_GATEWAY}


def test_restart_after_an_unfiltered_aproxy_drops_the_remote_members(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    local, remote = lab.add_pod("pod-a"), lab.add_pod("pod-b")
    older = open_cluster(clusters, settings, hairpin_filter=False)  # every real server, as before the filter
    older.apply(web_service([local], remote=[remote]))
    before_upgrade = hairpin_members()
    older.close()
    clusters.remove(older)

    upgraded = open_cluster(clusters, settings)
    unchanged = upgraded.apply(web_service([local], remote=[remote]))

    assert before_upgrade == {member(local), member(remote)}
    assert unchanged.results == ()  # IPVS was right already; only the hairpin set shrank
    assert hairpin_members() == {member(local)}


def test_refused_hairpin_members_are_mapped_back_one_by_one(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    """The netlink batch attributes each error to its member; the others land (no ipset process involved).

    Run on uvloop, the daemon's loop, which refuses pyroute2's asyncio netlink sockets but not this one.
    """
    pod_a, pod_b = lab.add_pod("pod-a"), lab.add_pod("pod-b")
    open_cluster(clusters, settings).apply(web_service([pod_a]))
    good = LoopBackEntry(pod_b.address, L4Protocol.TCP, ECHO_PORT).wire()
    missing_set = dataclasses.replace(good, set_name="APROXY-NO-SUCH-SET")
    wrong_family = dataclasses.replace(good, set_name="APROXY-LOOP-BACK6")
    requests = [
        (ipset_wire.CMD_ADD, missing_set),
        (ipset_wire.CMD_ADD, good),
        (ipset_wire.CMD_ADD, wrong_family),
        (ipset_wire.CMD_ADD, good),  # already there: -exist semantics, not an error
        (ipset_wire.CMD_DEL, dataclasses.replace(good, port=1)),  # not there: not an error either
    ]

    async def write() -> tuple[list[int], int]:
        async with IPSetSocket() as sock:
            return await sock.send(requests), sock.batches_sent

    codes, batches = uvloop.run(write())

    assert batches == 1
    assert [code != 0 for code in codes] == [True, False, True, False, False]
    assert hairpin_members() == {member(pod_a), member(pod_b)}


def test_restart_adopts_the_hairpin_set_and_audit_repairs_nat_drift(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    pod_a, pod_b = lab.add_pod("pod-a"), lab.add_pod("pod-b")
    first = open_cluster(clusters, settings)
    first.apply(web_service([pod_a, pod_b]))
    first.close()
    clusters.remove(first)

    restarted = open_cluster(clusters, settings)
    unchanged = restarted.apply(web_service([pod_a, pod_b]))
    # Drift: someone flushes aproxy's chain and deletes a set entry; the audit's dump repairs both.
    netlab.run("iptables", "-t", "nat", "-F", "APROXY-POSTROUTING")
    netlab.run("ipset", "del", "APROXY-LOOP-BACK", member(pod_b))
    restarted.audit()
    repaired_members = hairpin_members()
    restarted.apply(web_service([pod_b]))
    restarted.drain()  # no connections: pod-a's real server goes at once

    assert unchanged.results == ()
    assert repaired_members == {member(pod_a), member(pod_b)}
    # The restarted daemon learnt the membership from the kernel: dropping pod-a drops its entry.
    assert hairpin_members() == {member(pod_b)}
    assert netlab.tcp_request(SERVICE_ADDRESS, PORT, netns=pod_b.netns) == netlab.Reply("pod-b", POD_GATEWAY)
    jumps = [rule for rule in nat_rules() if rule.startswith("-A POSTROUTING") and "APROXY" in rule]
    assert len(jumps) == 1  # ensure() ran at every open and dump, and added the jump once


# --- (5) UDP conntrack --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")])
def test_removed_udp_endpoint_loses_its_conntrack_entries_and_only_those(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings, version: int
) -> None:
    pods = [lab.add_pod("dns-a"), lab.add_pod("dns-b")]
    client = lab.add_client()
    cluster = open_cluster(clusters, settings)
    # Linux >= 5.9 with expire_nodest_conn=1 expires a removed server's IPVS connections, and their
    # conntrack entries, by itself; older kernels do not. Off here, so only aproxy can delete them.
    netlab.write_sysctl("net/ipv4/vs/expire_nodest_conn", "0")
    vip = SERVICE_ADDRESS if version == 4 else SERVICE_ADDRESS6
    removed, kept = (_address(pod, version) for pod in pods)
    cluster.apply(web_service(pods, version=version, protocol="UDP", port=DNS_PORT))
    answered = netlab.udp_replies(vip, DNS_PORT, 2, netns=client.netns)  # rr: one each
    before = udp_conntrack_reply_sources(version)

    cluster.apply(web_service(pods[1:], version=version, protocol="UDP", port=DNS_PORT))
    after = udp_conntrack_reply_sources(version)
    fresh = netlab.udp_request(vip, DNS_PORT, netns=client.netns)

    assert netlab.backends(answered) == {"dns-a": 1, "dns-b": 1}
    assert {removed, kept} <= set(before)
    assert removed not in after
    assert kept in after  # the live server's entries are left alone
    assert fresh.backend == "dns-b"


def test_a_resolver_reusing_its_source_port_moves_to_a_live_backend(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings
) -> None:
    pods = [lab.add_pod("dns-a"), lab.add_pod("dns-b")]
    client = lab.add_client()
    cluster = open_cluster(clusters, settings)
    cluster.apply(web_service(pods, protocol="UDP", port=DNS_PORT))
    resolver = HeldUDP(client.netns, SERVICE_ADDRESS, DNS_PORT)
    try:
        first = resolver.ask()
        removed, kept = sorted(pods, key=lambda pod: pod.name != first.backend)

        # The removed pod keeps running: only the proxy decides where the next datagram goes.
        cluster.apply(web_service([kept], protocol="UDP", port=DNS_PORT))
        after = udp_conntrack_reply_sources()
        again = resolver.ask()
    finally:
        resolver.close()

    assert removed.address not in after
    assert again.backend == kept.name
    assert netlab.read_ipvs().find("UDP", SERVICE_ADDRESS, DNS_PORT).weights.keys() == {
        RealServerKey(kept.address, ECHO_PORT)
    }


# --- (6) sysctls --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strict_arp", "manage", "expected"),
    [
        pytest.param(False, True, SYSCTLS_SET, id="default"),
        pytest.param(True, True, {**SYSCTLS_SET, **STRICT_ARP}, id="strict-arp"),
        pytest.param(False, False, {}, id="not-managed"),
    ],
)
def test_sysctls_are_set_as_kube_proxy_sets_them(
    clusters: list[Cluster], settings: IPVSSettings, strict_arp: bool, manage: bool, expected: dict[str, str]
) -> None:
    names = [*SYSCTLS_SET, *STRICT_ARP, CONN_REUSE_MODE]
    netlab.write_sysctl("net/ipv4/ip_forward", "0")  # netlab's Lab would turn it on: no lab here
    before = {name: netlab.read_sysctl(name) for name in names}

    open_cluster(clusters, _with(settings, strict_arp=strict_arp, manage_sysctls=manage))

    after = {name: netlab.read_sysctl(name) for name in names}
    assert after == {**before, **expected}
    # This guest is Linux 6.1: conn_reuse_mode is only touched on kernels >= 4.1 and < 5.9.
    assert after[CONN_REUSE_MODE] == before[CONN_REUSE_MODE]


# --- (7) cleanup --------------------------------------------------------------------------------------------


def test_cleanup_removes_aproxys_nat_objects_and_leaves_foreign_ones(
    lab: Lab, clusters: list[Cluster], settings: IPVSSettings, foreign_set: str
) -> None:
    pod = lab.add_pod("pod-a")
    foreign_rule = "-A POSTROUTING -s 192.0.2.0/24 -j FOREIGN-SNAT"
    for command in ("iptables", "ip6tables"):
        netlab.run(command, "-t", "nat", "-N", "FOREIGN-SNAT")
        netlab.run(command, "-t", "nat", "-A", "FOREIGN-SNAT", "-j", "RETURN")
    netlab.run("iptables", "-t", "nat", *foreign_rule.split())
    cluster = open_cluster(clusters, settings)
    cluster.apply(web_service([pod]))
    programmed = nat_rules() + nat_rules("ip6tables-save")
    sets_programmed = ipset_names()

    cluster.cleanup()

    assert any(rule.startswith("-A POSTROUTING") and "APROXY-POSTROUTING" in rule for rule in programmed)
    assert {"APROXY-LOOP-BACK", "APROXY-LOOP-BACK6"} <= sets_programmed
    for command in ("iptables-save", "ip6tables-save"):
        rules = nat_rules(command)
        assert not [rule for rule in rules if "APROXY" in rule], command
        assert ":FOREIGN-SNAT - [0:0]" in rules
        assert "-A FOREIGN-SNAT -j RETURN" in rules
    assert foreign_rule in nat_rules()
    assert ipset_names() == {foreign_set}
    assert len(netlab.read_ipvs()) == 0


# --- (8) masquerade_all and cluster_cidrs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("masquerade_all", "cluster_cidrs", "client_masqueraded", "pod_masqueraded"),
    [
        pytest.param(False, (), False, False, id="default"),
        pytest.param(True, (), True, True, id="masquerade-all"),
        pytest.param(False, ("10.244.0.0/16",), True, False, id="cluster-cidr-pods"),
        pytest.param(False, ("10.244.0.0/16", "10.88.0.0/16"), False, False, id="cluster-cidrs-both"),
    ],
)
def test_masquerade_all_and_cluster_cidrs_decide_who_keeps_its_source(
    lab: Lab,
    clusters: list[Cluster],
    settings: IPVSSettings,
    masquerade_all: bool,
    cluster_cidrs: tuple[str, ...],
    client_masqueraded: bool,
    pod_masqueraded: bool,
) -> None:
    backend, other_pod = lab.add_pod("pod-a"), lab.add_pod("pod-b")
    client = lab.add_client()
    tuned = _with(settings, masquerade_all=masquerade_all, cluster_cidrs=cluster_cidrs)
    open_cluster(clusters, tuned).apply(web_service([backend]))

    from_client = netlab.tcp_request(SERVICE_ADDRESS, PORT, netns=client.netns)
    from_pod = netlab.tcp_request(SERVICE_ADDRESS, PORT, netns=other_pod.netns)

    assert from_client.source == (POD_GATEWAY if client_masqueraded else client.address)
    assert from_pod.source == (POD_GATEWAY if pod_masqueraded else other_pod.address)


def _with(settings: IPVSSettings, **changes: Any) -> IPVSSettings:
    return dataclasses.replace(settings, **changes)
