"""The health decision (pure) and the pieces of the endpoints' answers, table-driven."""

from __future__ import annotations

from datetime import datetime

import pytest

from aproxy.web.healthz import Health, decide, health_body, rfc3339
from aproxy.web.server import ListenAddress, ListenAddressError

PERIOD = 30.0  # sync_period: stale after 60 s

# (now, pending_since, last_success, initialized) -> (healthz, livez, ready)
CASES = [
    pytest.param(5.0, None, None, False, (False, True, False), id="listing-not-initialized"),
    pytest.param(500.0, None, None, False, (False, True, False), id="long-listing-is-alive-not-healthy"),
    pytest.param(10.0, None, 9.0, True, (True, True, True), id="synced-nothing-pending"),
    pytest.param(100.0, 90.0, 50.0, True, (True, True, True), id="pending-within-limit"),
    pytest.param(160.0, 100.0, 50.0, True, (True, True, True), id="pending-exactly-at-limit"),
    pytest.param(161.0, 100.0, 50.0, True, (False, False, True), id="pending-beyond-limit-stale"),
    pytest.param(161.0, 100.0, None, True, (False, False, False), id="never-succeeded-stale"),
    pytest.param(20.0, 1.0, None, True, (True, True, False), id="initial-sync-failed-still-in-limit"),
    pytest.param(161.0, 100.0, 120.0, True, (True, True, True), id="request-during-a-sync-that-succeeded"),
    pytest.param(200.0, 100.0, 120.0, True, (False, False, True), id="syncs-failing-since-that-success"),
    pytest.param(100.0, 10.0, None, False, (False, False, False), id="initial-sync-never-completes"),
    pytest.param(1000.0, None, 10.0, True, (True, True, True), id="idle-cluster-nothing-to-do"),
]


@pytest.mark.parametrize(("now", "pending_since", "last_success", "initialized", "expected"), CASES)
def test_decide(
    now: float,
    pending_since: float | None,
    last_success: float | None,
    initialized: bool,
    expected: tuple[bool, bool, bool],
) -> None:
    health = decide(now, pending_since, last_success, PERIOD, initialized)
    assert (health.healthz, health.livez, health.ready) == expected


@pytest.mark.parametrize(
    ("now", "pending_since", "last_success", "initialized", "reason"),
    [
        pytest.param(5.0, None, None, False, "the initial sync has not completed", id="not-initialized"),
        pytest.param(
            200.0, 100.0, None, True, "a change has waited 100.0 s without a successful sync", id="stale"
        ),
        pytest.param(10.0, None, 9.0, True, "ok", id="ok"),
    ],
)
def test_reason(
    now: float, pending_since: float | None, last_success: float | None, initialized: bool, reason: str
) -> None:
    assert decide(now, pending_since, last_success, PERIOD, initialized).reason == reason


def test_health_is_a_value() -> None:
    assert decide(10.0, None, 9.0, PERIOD, True) == Health(
        healthz=True, livez=True, ready=True, reason="ok", node_eligible=True
    )


# (now, pending_since, last_success, initialized, node_reason) -> (healthz, livez, ready, reason)
NODE_CASES = [
    pytest.param(
        10.0,
        None,
        9.0,
        True,
        "being deleted",
        (False, True, True, "node is being deleted"),
        id="deleting-node-fails-healthz-only",
    ),
    pytest.param(
        10.0,
        None,
        9.0,
        True,
        "tainted ToBeDeletedByClusterAutoscaler",
        (False, True, True, "node is tainted ToBeDeletedByClusterAutoscaler"),
        id="autoscaler-taint-fails-healthz-only",
    ),
    pytest.param(
        10.0, None, 9.0, True, "", (False, True, True, "node is not eligible"), id="no-reason-given"
    ),
    pytest.param(
        200.0,
        100.0,
        None,
        True,
        "being deleted",
        (False, False, False, "a change has waited 100.0 s without a successful sync"),
        id="staleness-reason-takes-precedence",
    ),
    pytest.param(
        5.0,
        None,
        None,
        False,
        "being deleted",
        (False, True, False, "the initial sync has not completed"),
        id="not-initialized-and-ineligible",
    ),
]


@pytest.mark.parametrize(
    ("now", "pending_since", "last_success", "initialized", "node_reason", "expected"), NODE_CASES
)
def test_decide_for_an_ineligible_node(
    now: float,
    pending_since: float | None,
    last_success: float | None,
    initialized: bool,
    node_reason: str,
    expected: tuple[bool, bool, bool, str],
) -> None:
    health = decide(
        now, pending_since, last_success, PERIOD, initialized, node_eligible=False, node_reason=node_reason
    )
    assert (health.healthz, health.livez, health.ready, health.reason) == expected
    assert health.node_eligible is False


def test_an_eligible_node_ignores_its_reason() -> None:
    health = decide(10.0, None, 9.0, PERIOD, True, node_eligible=True, node_reason="being deleted")
    assert (health.healthz, health.reason, health.node_eligible) == (True, "ok", True)


@pytest.mark.parametrize(
    "eligible", [pytest.param(True, id="eligible"), pytest.param(False, id="ineligible")]
)
def test_body_reports_node_eligibility(eligible: bool) -> None:
    assert health_body(None, 0.0, eligible)["nodeEligible"] is eligible


def test_body_has_kube_proxys_keys_and_rfc3339_times() -> None:
    body = health_body(1_700_000_000.25, 1_700_000_001.5, True)
    assert body == {
        "lastUpdated": "2023-11-14T22:13:20.250000Z",
        "currentTime": "2023-11-14T22:13:21.500000Z",
        "nodeEligible": True,
    }
    assert datetime.fromisoformat(body["currentTime"]).timestamp() == 1_700_000_001.5


def test_body_before_any_successful_sync() -> None:
    assert health_body(None, 0.0, True) == {
        "lastUpdated": None,
        "currentTime": rfc3339(0.0),
        "nodeEligible": True,
    }
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("0.0.0.0:10256", ListenAddress("0.0.0.0", 10256), id="ipv4-any"),
        pytest.param("127.0.0.1:0", ListenAddress("127.0.0.1", 0), id="ephemeral-port"),
        pytest.param("[::]:10256", ListenAddress("::", 10256), id="ipv6-bracketed"),
        pytest.param("[fd00:0::1]:9", ListenAddress("fd00::1", 9), id="ipv6-compressed"),
    ],
)
def test_listen_address_parse(text: str, expected: ListenAddress) -> None:
    assert ListenAddress.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("10256", id="no-host"),
        pytest.param("localhost:10256", id="name-not-ip"),
        pytest.param("127.0.0.1:", id="no-port"),
        pytest.param("127.0.0.1:70000", id="port-out-of-range"),
        pytest.param("::1:80", id="ipv6-without-brackets-is-ambiguous"),
    ],
)
def test_listen_address_rejects(text: str) -> None:
    with pytest.raises(ListenAddressError):
        ListenAddress.parse(text)


@pytest.mark.parametrize(
    ("address", "text"),
    [
        pytest.param(ListenAddress("127.0.0.1", 10249), "127.0.0.1:10249", id="ipv4"),
        pytest.param(ListenAddress("::1", 10249), "[::1]:10249", id="ipv6"),
    ],
)
def test_listen_address_text(address: ListenAddress, text: str) -> None:
    assert str(address) == text
