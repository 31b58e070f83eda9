"""Health-check node ports: which services get one, what it answers, and the table that follows changes."""

from __future__ import annotations

from typing import Any

import pytest

from aproxy.core.health_ports import HealthCheckPort, HealthPortTable, answer, health_check_port
from aproxy.core.model import ServiceKey
from aproxy.core.objects import ServiceInfo, SliceInfo, parse_service, parse_slice
from tests.core import k8s

WEB, API = ServiceKey("default", "web"), ServiceKey("default", "api")


def lb_service(**kwargs: Any) -> ServiceInfo:
    fields: dict[str, Any] = {"type_": "LoadBalancer", "external_policy": "Local"}
    fields.update(kwargs)
    extra = {"healthCheckNodePort": fields.pop("hc", 32000)}
    info = parse_service(k8s.service(spec_extra=extra, **fields))
    assert isinstance(info, ServiceInfo)
    return info


def endpoints(*specs: tuple[str, str, bool]) -> list[SliceInfo]:
    parsed = parse_slice(
        k8s.endpoint_slice(
            endpoints=[k8s.endpoint(address, node=node, ready=ready) for address, node, ready in specs]
        )
    )
    assert isinstance(parsed, SliceInfo)
    return [parsed]


def test_local_ready_endpoints_are_counted_once_each() -> None:
    slices = endpoints(
        ("10.244.1.5", "node-a", True),
        ("10.244.1.6", "node-a", False),  # not ready
        ("10.244.2.5", "node-b", True),  # another node's
    )

    assert health_check_port(lb_service(), slices, "node-a") == HealthCheckPort(32000, WEB, 1)
    assert health_check_port(lb_service(), slices, "node-c") == HealthCheckPort(32000, WEB, 0)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"external_policy": "Cluster"}, id="policy-cluster"),
        pytest.param({"type_": "NodePort"}, id="not-a-load-balancer"),
        pytest.param({"hc": None}, id="no-port"),
    ],
)
def test_only_load_balancers_with_policy_local_and_a_port_get_one(fields: dict[str, Any]) -> None:
    assert health_check_port(lb_service(**fields), [], "node-a") is None


def test_an_invalid_port_is_a_warning_and_no_health_check() -> None:
    info = lb_service(hc=70000)

    assert info.health_check_node_port == 0
    assert [skip.reason for skip in info.skips] == ["invalid healthCheckNodePort 70000 ignored"]


def test_answers_are_kube_proxys() -> None:
    body = {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }

    assert answer(HealthCheckPort(32000, WEB, 2), True) == (200, body)
    assert answer(HealthCheckPort(32000, WEB, 0), True) == (503, {**body, "localEndpoints": 0})
    assert answer(HealthCheckPort(32000, WEB, 2), False) == (503, {**body, "serviceProxyHealthy": False})


def test_the_table_follows_changes_and_a_freed_port_goes_to_the_next_claimant() -> None:
    changes: list[int] = []
    table = HealthPortTable(on_change=lambda: changes.append(1))

    assert table.update(WEB, HealthCheckPort(32000, WEB, 1))
    assert not table.update(WEB, HealthCheckPort(32000, WEB, 1))  # nothing changed: no poke
    table.update(API, HealthCheckPort(32000, API, 3))  # a duplicate claim: the first keeps it
    assert table.ports() == {32000: HealthCheckPort(32000, WEB, 1)}

    table.update(WEB, HealthCheckPort(32001, WEB, 1))
    assert table.ports() == {32000: HealthCheckPort(32000, API, 3), 32001: HealthCheckPort(32001, WEB, 1)}

    table.update(API, None)
    table.update(WEB, None)
    assert table.ports() == {}
    assert len(changes) == 5
