"""The source-NAT rules and hairpin set lines aproxy generates, and the refcounted hairpin membership.

Pure: what would be fed to iptables-restore and ipset restore. The kernel tier proves the kernel takes it and
that traffic then flows (tests/kernel/test_traffic.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from errno import EEXIST
from ipaddress import ip_address

import pytest

from aproxy.backends import ipset_wire
from aproxy.backends.base import OperationResult
from aproxy.backends.masquerade import Masquerade
from aproxy.backends.nat_rules import (
    FAMILIES,
    Delta,
    LoopBackEntry,
    LoopBackMembers,
    MasqueradeSettings,
    create_sets_text,
    parse_saved_members,
    removal_text,
    restore_text,
    set_requests,
)
from aproxy.core.model import (
    AddRealServer,
    AddVirtualServer,
    DeleteRealServer,
    DeleteVirtualServer,
    L4Protocol,
    Operation,
    RealServer,
    UpdateRealServer,
    VirtualServerKey,
    VirtualServerSpec,
)
from aproxy.core.state import IPVSState

V4, V6 = FAMILIES
NAT = "-m ipvs --vdir ORIGINAL --vmethod MASQ"
WEB = VirtualServerKey(L4Protocol.TCP, ip_address("10.96.0.10"), 80)
WEB_NODEPORT = VirtualServerKey(L4Protocol.TCP, ip_address("192.0.2.10"), 30080)
DNS = VirtualServerKey(L4Protocol.UDP, ip_address("10.96.0.53"), 53)
WEB6 = VirtualServerKey(L4Protocol.TCP, ip_address("fd00:10:96::10"), 80)
POD_A = RealServer(ip_address("10.244.1.5"), 8080)
POD_B = RealServer(ip_address("10.244.1.6"), 8080)
POD_A6 = RealServer(ip_address("fd00:10:244::5"), 8080)


def entry(real: RealServer, protocol: L4Protocol = L4Protocol.TCP) -> LoopBackEntry:
    return LoopBackEntry(real.address, protocol, real.port)


def ok(*operations: Operation) -> list[OperationResult]:
    return [OperationResult(op) for op in operations]


# --- iptables-restore text ----------------------------------------------------------------------------------


def chain(text: str, name: str = "APROXY-POSTROUTING") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {name} ")]


MARKED = "-A APROXY-POSTROUTING -m mark --mark 0x4000/0x4000 -m comment --comment marked -j APROXY-MASQ"


def test_default_chain_masquerades_marked_node_and_hairpin_traffic_only() -> None:
    assert chain(restore_text(V4, MasqueradeSettings())) == [
        MARKED,
        f'-A APROXY-POSTROUTING {NAT} -m addrtype --src-type LOCAL -m comment --comment "from the node" '
        "-j MASQUERADE",
        f"-A APROXY-POSTROUTING {NAT} -m set --match-set APROXY-LOOP-BACK dst,dst,src "
        "-m comment --comment hairpin -j MASQUERADE",
    ]


def test_marked_traffic_has_its_mark_cleared_then_is_masqueraded() -> None:
    text = restore_text(V4, MasqueradeSettings())

    assert chain(text, "APROXY-MARK-MASQ") == ["-A APROXY-MARK-MASQ -j MARK --or-mark 0x4000"]
    assert chain(text, "APROXY-MASQ") == [
        "-A APROXY-MASQ -j MARK --xor-mark 0x4000",
        "-A APROXY-MASQ -j MASQUERADE --random-fully",
    ]


# The nat APROXY-SERVICES chain: which destinations are marked for masquerading (policy Cluster) and which
# keep their source (cluster IPs, policy Local), in this order.
SERVICES_V4 = [
    "-m set --match-set APROXY-CLUSTER-IP dst,dst -j RETURN",
    "-m set --match-set APROXY-LOAD-BALANCER-LOCAL dst,dst -j RETURN",
    "-m set --match-set APROXY-LOAD-BALANCER dst,dst "
    '-m comment --comment "load balancer" -j APROXY-MARK-MASQ',
    "-m set --match-set APROXY-EXTERNAL-IP-LOCAL dst,dst -j RETURN",
    '-m set --match-set APROXY-EXTERNAL-IP dst,dst -m comment --comment "external IP" -j APROXY-MARK-MASQ',
    "-p tcp -m addrtype --dst-type LOCAL -m set --match-set APROXY-NODE-PORT-LOCAL-TCP dst -j RETURN",
    "-p tcp -m addrtype --dst-type LOCAL -m set --match-set APROXY-NODE-PORT-TCP dst "
    '-m comment --comment "node port" -j APROXY-MARK-MASQ',
    "-p udp -m addrtype --dst-type LOCAL -m set --match-set APROXY-NODE-PORT-LOCAL-UDP dst -j RETURN",
    "-p udp -m addrtype --dst-type LOCAL -m set --match-set APROXY-NODE-PORT-UDP dst "
    '-m comment --comment "node port" -j APROXY-MARK-MASQ',
]
# The filter APROXY-INPUT chain: source ranges, then the service-IP filter.
INPUT_V4 = [
    "-m set --match-set APROXY-LOAD-BALANCER-FW dst,dst -m set ! --match-set APROXY-LOAD-BALANCER-SRC "
    'dst,dst,src -m comment --comment "outside loadBalancerSourceRanges" -j DROP',
    "-m set --match-set APROXY-CLUSTER-IP dst,dst -j RETURN",
    "-m set --match-set APROXY-EXTERNAL-IP dst,dst -j RETURN",
    "-m set --match-set APROXY-LOAD-BALANCER dst,dst -j RETURN",
    "-p tcp -m set --match-set APROXY-HEALTH-CHECK-TCP dst -j RETURN",
    "-m conntrack --ctstate NEW -m set --match-set APROXY-IPVS-IPS dst "
    '-m comment --comment "not a service port" -j REJECT',
]


def test_services_and_input_chains_are_a_constant_handful_of_set_matches() -> None:
    text = restore_text(V4, MasqueradeSettings())

    assert chain(text, "APROXY-SERVICES") == [f"-A APROXY-SERVICES {rule}" for rule in SERVICES_V4]
    assert chain(text, "APROXY-INPUT") == [f"-A APROXY-INPUT {rule}" for rule in INPUT_V4]


def test_ipv6_chains_use_the_ipv6_sets_and_the_shared_port_sets() -> None:
    text = restore_text(V6, MasqueradeSettings())

    assert "--match-set APROXY-LOOP-BACK6 dst,dst,src" in text
    assert "--match-set APROXY-LOOP-BACK " not in text
    assert (
        chain(text, "APROXY-SERVICES")[0]
        == "-A APROXY-SERVICES -m set --match-set APROXY-CLUSTER-IP6 dst,dst -j RETURN"
    )
    assert "--match-set APROXY-NODE-PORT-TCP dst" in text  # bitmap:port sets have no family
    assert "--match-set APROXY-IPVS-IPS6 dst" in text


def test_restore_declares_only_aproxys_chains() -> None:
    """--noflush leaves every other chain alone; declaring a chain flushes it, so only ours are declared."""
    ours = {"APROXY-POSTROUTING", "APROXY-SERVICES", "APROXY-MARK-MASQ", "APROXY-MASQ", "APROXY-INPUT"}
    for text in (restore_text(V4, MasqueradeSettings(cluster_cidrs=("10.244.0.0/16",))), removal_text()):
        declared = [line for line in text.splitlines() if line.startswith((":", "*", "-F", "-X", "-A"))]
        assert {line.split()[0][1:] for line in declared if line.startswith(":")} == ours
        assert [line for line in declared if line.startswith("*")] == ["*nat", "*filter"]
        assert not [line for line in declared if line.startswith("-F")]
        assert all(line.split()[1] in ours for line in declared if line[:2] in {"-A", "-X"})


def test_masquerade_all_is_one_rule_for_all_ipvs_nat_traffic() -> None:
    assert chain(restore_text(V4, MasqueradeSettings(masquerade_all=True))) == [
        MARKED,
        f'-A APROXY-POSTROUTING {NAT} -m comment --comment "masquerade all" -j MASQUERADE',
    ]


def test_cluster_cidrs_return_their_family_then_masquerade_the_rest() -> None:
    settings = MasqueradeSettings(cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/56", "10.245.7.1/24"))

    v4 = chain(restore_text(V4, settings))
    v6 = chain(restore_text(V6, settings))

    outside = (
        f'-A APROXY-POSTROUTING {NAT} -m comment --comment "from outside the cluster CIDRs" -j MASQUERADE'
    )
    # Marked, node and hairpin rules come first: a pod reaching itself is inside the cluster CIDR and still
    # needs it.
    assert v4[3:] == [
        "-A APROXY-POSTROUTING -s 10.244.0.0/16 -j RETURN",
        "-A APROXY-POSTROUTING -s 10.245.7.0/24 -j RETURN",
        outside,
    ]
    assert v6[3:] == ["-A APROXY-POSTROUTING -s fd00:10:244::/56 -j RETURN", outside]


def test_cluster_cidrs_of_one_family_leave_the_other_without_the_catch_all() -> None:
    settings = MasqueradeSettings(cluster_cidrs=("10.244.0.0/16",))

    assert len(chain(restore_text(V6, settings))) == 3  # marked, from the node, hairpin


def test_removal_empties_then_deletes_the_chains() -> None:
    assert removal_text().splitlines() == [
        "*nat",
        ":APROXY-POSTROUTING - [0:0]",
        ":APROXY-SERVICES - [0:0]",
        ":APROXY-MARK-MASQ - [0:0]",
        ":APROXY-MASQ - [0:0]",
        "-X APROXY-POSTROUTING",
        "-X APROXY-SERVICES",
        "-X APROXY-MARK-MASQ",
        "-X APROXY-MASQ",
        "COMMIT",
        "*filter",
        ":APROXY-INPUT - [0:0]",
        "-X APROXY-INPUT",
        "COMMIT",
    ]


def test_a_bad_cluster_cidr_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"10\.244\.0\.0/99"):
        Masquerade(MasqueradeSettings(cluster_cidrs=("10.244.0.0/99",)))


# --- ipset lines --------------------------------------------------------------------------------------------


def test_sets_are_created_per_family_idempotently() -> None:
    assert create_sets_text().splitlines() == [
        "create APROXY-LOOP-BACK hash:ip,port,ip family inet -exist",
        "create APROXY-LOOP-BACK6 hash:ip,port,ip family inet6 -exist",
    ]


def test_set_requests_remove_first_and_name_the_family_set() -> None:
    requests = set_requests(
        added=[entry(POD_A), entry(POD_A6), entry(POD_B, L4Protocol.UDP)], removed=[entry(POD_B)]
    )

    assert [(command, e.set_name, e.member()) for command, e in requests] == [
        (ipset_wire.CMD_DEL, "APROXY-LOOP-BACK", "10.244.1.6,tcp:8080,10.244.1.6"),
        (ipset_wire.CMD_ADD, "APROXY-LOOP-BACK", "10.244.1.5,tcp:8080,10.244.1.5"),
        (ipset_wire.CMD_ADD, "APROXY-LOOP-BACK6", "fd00:10:244::5,tcp:8080,fd00:10:244::5"),
        (ipset_wire.CMD_ADD, "APROXY-LOOP-BACK", "10.244.1.6,udp:8080,10.244.1.6"),
    ]


def test_saved_members_parse_back_and_foreign_lines_are_ignored() -> None:
    saved = "\n".join(
        [
            "create APROXY-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536",
            "add APROXY-LOOP-BACK 10.244.1.5,tcp:8080,10.244.1.5",
            "add APROXY-LOOP-BACK 10.244.1.6,sctp:9000,10.244.1.6",
            "add APROXY-LOOP-BACK6 fd00:10:244::5,tcp:8080,fd00:10:244::5",
            "add KUBE-LOOP-BACK 10.244.1.7,tcp:80,10.244.1.7",
            "add APROXY-LOOP-BACK 10.244.1.8,tcp:80,10.244.1.9",
        ]
    )

    assert parse_saved_members(saved) == {
        entry(POD_A),
        LoopBackEntry(ip_address("10.244.1.6"), L4Protocol.SCTP, 9000),
        entry(POD_A6),
    }


# --- membership ---------------------------------------------------------------------------------------------


def test_an_added_real_server_adds_one_entry() -> None:
    members = LoopBackMembers()

    delta = members.observe(ok(AddVirtualServer(WEB, VirtualServerSpec()), AddRealServer(WEB, POD_A)))

    assert delta == Delta(added=(entry(POD_A),))
    assert members.entries() == {entry(POD_A)}


def test_an_entry_stays_until_its_last_virtual_server_lets_it_go() -> None:
    members = LoopBackMembers()
    members.observe(ok(AddRealServer(WEB, POD_A), AddRealServer(WEB_NODEPORT, POD_A)))

    first = members.observe(ok(DeleteRealServer(WEB, POD_A.key)))
    last = members.observe(ok(DeleteVirtualServer(WEB_NODEPORT)))

    assert first == Delta()
    assert last == Delta(removed=(entry(POD_A),))
    assert members.entries() == frozenset()


def test_deleting_a_virtual_server_removes_its_real_servers_entries() -> None:
    members = LoopBackMembers()
    members.observe(ok(AddRealServer(WEB, POD_A), AddRealServer(WEB, POD_B), AddRealServer(DNS, POD_A)))

    delta = members.observe(ok(DeleteVirtualServer(WEB)))

    assert set(delta.removed) == {entry(POD_A), entry(POD_B)}
    assert delta.added == ()
    assert members.entries() == {entry(POD_A, L4Protocol.UDP)}


def test_the_protocol_is_part_of_the_entry() -> None:
    members = LoopBackMembers()

    delta = members.observe(ok(AddRealServer(WEB, POD_A), AddRealServer(DNS, POD_A)))

    assert set(delta.added) == {entry(POD_A), entry(POD_A, L4Protocol.UDP)}


def test_refused_operations_and_weight_changes_change_nothing() -> None:
    members = LoopBackMembers()
    members.observe(ok(AddRealServer(WEB, POD_A)))

    delta = members.observe(
        [
            OperationResult(AddRealServer(WEB, POD_B), "File exists", EEXIST),
            OperationResult(UpdateRealServer(WEB, RealServer(POD_A.address, POD_A.port, 0))),
        ]
    )

    assert delta == Delta()
    assert members.entries() == {entry(POD_A)}


def test_a_batch_reports_only_its_net_change() -> None:
    members = LoopBackMembers()
    members.observe(ok(AddRealServer(WEB, POD_A)))

    delta = members.observe(
        ok(DeleteRealServer(WEB, POD_A.key), AddRealServer(WEB_NODEPORT, POD_A), AddRealServer(WEB6, POD_A6))
    )

    assert delta == Delta(added=(entry(POD_A6),))


def test_one_endpoint_change_writes_one_line_whatever_the_cluster_size() -> None:
    members = LoopBackMembers()
    many = [
        AddRealServer(
            VirtualServerKey(L4Protocol.TCP, ip_address(f"10.96.{n // 250}.{n % 250 + 1}"), 80), real
        )
        for n in range(1000)
        for real in (POD_A, RealServer(ip_address(f"10.245.{n // 250}.{n % 250 + 1}"), 8080))
    ]
    members.observe(ok(*many))
    newcomer = RealServer(ip_address("10.244.9.9"), 8080)

    delta = members.observe(ok(AddRealServer(WEB, newcomer)))

    assert [(c, e.member()) for c, e in set_requests(delta.added, delta.removed)] == [
        (ipset_wire.CMD_ADD, "10.244.9.9,tcp:8080,10.244.9.9")
    ]


def _state(entries: Sequence[tuple[VirtualServerKey, RealServer]]) -> IPVSState:
    state = IPVSState()
    for key in dict.fromkeys(key for key, _ in entries):
        state.apply(AddVirtualServer(key, VirtualServerSpec()))
    for key, real in entries:
        state.apply(AddRealServer(key, real))
    return state


def test_replace_takes_a_dumps_membership_and_later_changes_follow_it() -> None:
    members = LoopBackMembers()
    members.observe(ok(AddRealServer(DNS, POD_B)))  # stale: the dump below does not have it

    members.replace(_state([(WEB, POD_A), (WEB_NODEPORT, POD_A), (WEB6, POD_A6)]))
    after_one_delete = members.observe(ok(DeleteVirtualServer(WEB)))

    assert after_one_delete == Delta()
    assert members.entries() == {entry(POD_A), entry(POD_A6)}


# --- membership filtered to this node's endpoints -----------------------------------------------------------


def local_only(*reals: RealServer) -> LoopBackMembers:
    """Members that take only ``reals``' addresses for endpoints on this node (the daemon's syncer says)."""
    addresses = {real.address for real in reals}
    return LoopBackMembers(is_local=addresses.__contains__)


def test_a_remote_real_server_adds_nothing_a_local_one_adds_its_entry() -> None:
    members = local_only(POD_A)

    delta = members.observe(ok(AddRealServer(WEB, POD_B), AddRealServer(WEB, POD_A)))

    assert delta == Delta(added=(entry(POD_A),))
    assert members.entries() == {entry(POD_A)}


def test_a_local_real_server_removed_removes_its_entry_and_a_remote_one_removes_nothing() -> None:
    members = local_only(POD_A)
    members.observe(ok(AddRealServer(WEB, POD_A), AddRealServer(WEB, POD_B), AddRealServer(DNS, POD_A)))

    remote = members.observe(ok(DeleteRealServer(WEB, POD_B.key)))
    local = members.observe(ok(DeleteRealServer(WEB, POD_A.key)))
    whole = members.observe(ok(DeleteVirtualServer(DNS)))

    assert (remote, local, whole) == (
        Delta(),
        Delta(removed=(entry(POD_A),)),
        Delta(removed=(entry(POD_A, L4Protocol.UDP),)),
    )
    assert members.entries() == frozenset()


def test_an_entry_in_the_set_is_removed_even_once_its_address_is_no_longer_local() -> None:
    local = {POD_A.address}
    members = LoopBackMembers(is_local=local.__contains__)
    members.observe(ok(AddRealServer(WEB, POD_A)))

    local.clear()  # the pod is gone: the syncer forgets its address before the backend deletes it
    delta = members.observe(ok(DeleteRealServer(WEB, POD_A.key)))

    assert delta == Delta(removed=(entry(POD_A),))


def test_replace_keeps_only_local_real_servers() -> None:
    members = local_only(POD_A, POD_A6)

    members.replace(_state([(WEB, POD_A), (WEB, POD_B), (WEB_NODEPORT, POD_A), (WEB6, POD_A6)]))
    after_one_delete = members.observe(ok(DeleteVirtualServer(WEB)))

    assert after_one_delete == Delta()  # WEB_NODEPORT still holds POD_A; POD_B was never counted
    assert members.entries() == {entry(POD_A), entry(POD_A6)}


def test_by_default_every_real_server_counts() -> None:
    members = LoopBackMembers()

    members.replace(_state([(WEB, POD_A), (WEB, POD_B)]))

    assert members.entries() == {entry(POD_A), entry(POD_B)}
