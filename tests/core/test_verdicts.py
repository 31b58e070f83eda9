"""HealthView: the check targets of translated services, weight 0 for unhealthy ones, fail open; and the
aproxy.io/health-check* annotations it reads."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from aproxy.core.model import L4Protocol, RealServerKey, ServiceKey, ServiceState
from aproxy.core.objects import HealthOverride, ServiceInfo, Severity, SliceInfo, parse_service, parse_slice
from aproxy.core.translate import TranslationContext, translate_service
from aproxy.core.verdicts import FailOpenChange, HealthView
from tests.core import k8s

CTX = TranslationContext(node_name="node-a", node_addresses=frozenset({ip_address("192.0.2.10")}))
A, B, C = "10.244.1.5", "10.244.1.6", "10.244.1.7"


def target(address: str, port: int = 8080) -> RealServerKey:
    return RealServerKey(ip_address(address), port)


def parsed_service(**kwargs: Any) -> ServiceInfo:
    info = parse_service(k8s.service(**kwargs))
    assert isinstance(info, ServiceInfo)
    return info


def translated(service: ServiceInfo, *addresses: str, protocol: str | None = None) -> ServiceState:
    endpoints = [k8s.endpoint(address) for address in addresses]
    ports = [k8s.slice_port(protocol=protocol)]
    slice_info = parse_slice(k8s.endpoint_slice(service.key.name, endpoints=endpoints, ports=ports))
    assert isinstance(slice_info, SliceInfo)
    return translate_service(service, [slice_info], CTX).state


def weights(state: ServiceState | None) -> dict[str, int]:
    assert state is not None
    (virtual,) = state.virtual_servers
    return {str(real.address): real.weight for real in virtual.real_servers}


def test_without_verdicts_the_state_is_returned_as_is() -> None:
    view = HealthView()
    service = parsed_service()
    state = translated(service, A, B)
    assert view.apply(service.key, service, state) is state
    assert view.targets(2.0) == {target(A): 2.0, target(B): 2.0}


def test_an_unhealthy_backend_gets_weight_0_in_every_service_that_uses_it() -> None:
    view = HealthView()
    web, api = parsed_service(), parsed_service(name="api", cluster_ips="10.96.0.2")
    web_state, api_state = translated(web, A, B), translated(api, A, C)
    view.apply(web.key, web, web_state)
    view.apply(api.key, api, api_state)
    other = parsed_service(name="other", cluster_ips="10.96.0.3")
    view.apply(other.key, other, translated(other, C))
    assert view.set_unhealthy(target(A), True) == {web.key, api.key}
    assert view.set_unhealthy(target(A), True) == frozenset()  # no change: nothing to mark
    assert weights(view.apply(web.key, web, web_state)) == {A: 0, B: 1}
    assert weights(view.apply(api.key, api, api_state)) == {A: 0, C: 1}
    assert view.unhealthy_count == 1
    assert view.set_unhealthy(target(A), False) == {web.key, api.key}
    assert weights(view.apply(web.key, web, web_state)) == {A: 1, B: 1}


def test_a_verdict_for_a_target_no_service_uses_is_ignored() -> None:
    view = HealthView()
    assert view.set_unhealthy(target(A), True) == frozenset()
    assert view.unhealthy_count == 0


def test_a_target_no_service_uses_any_more_is_forgotten() -> None:
    view = HealthView()
    service = parsed_service()
    view.apply(service.key, service, translated(service, A, B))
    view.set_unhealthy(target(A), True)
    view.apply(service.key, service, translated(service, B))
    assert not view.is_unhealthy(target(A))
    assert target(A) not in view.targets(2.0)
    # The endpoint coming back starts unknown: full weight.
    assert weights(view.apply(service.key, service, translated(service, A, B))) == {A: 1, B: 1}


def all_unhealthy(view: HealthView) -> tuple[ServiceInfo, ServiceState]:
    """A service with backends A and B, both judged unhealthy."""
    service = parsed_service()
    state = translated(service, A, B)
    view.apply(service.key, service, state)
    view.set_unhealthy(target(A), True)
    view.set_unhealthy(target(B), True)
    return service, state


def test_all_unhealthy_fails_open_once_per_episode() -> None:
    view = HealthView()
    service, state = all_unhealthy(view)
    assert weights(view.apply(service.key, service, state)) == {A: 1, B: 1}
    assert view.failing_open_count == 1
    (entered,) = view.take_fail_open_changes()
    assert entered == FailOpenChange(state.virtual_servers[0].key, service.key, True, 2)
    view.apply(service.key, service, state)  # still all unhealthy: no new event
    assert view.take_fail_open_changes() == []
    view.set_unhealthy(target(B), False)
    assert weights(view.apply(service.key, service, state)) == {A: 0, B: 1}
    (left,) = view.take_fail_open_changes()
    assert not left.entered
    assert view.failing_open_count == 0


def test_fail_closed_drains_them_all() -> None:
    view = HealthView(fail_closed=True)
    service, state = all_unhealthy(view)
    assert weights(view.apply(service.key, service, state)) == {A: 0, B: 0}
    assert view.take_fail_open_changes() == []


def test_a_deleted_service_ends_its_fail_open_episode_and_its_targets() -> None:
    view = HealthView()
    service = parsed_service()
    state = translated(service, A)
    view.apply(service.key, service, state)
    view.set_unhealthy(target(A), True)
    view.apply(service.key, service, state)
    view.take_fail_open_changes()
    assert view.apply(service.key, None, None) is None
    assert [change.entered for change in view.take_fail_open_changes()] == [False]
    assert view.targets(2.0) == {}
    view.retain([])
    assert view.failing_open_count == 0


def test_udp_is_checked_only_with_a_check_port() -> None:
    view = HealthView()
    dns = parsed_service(name="dns", ports=[k8s.port(protocol="UDP")])
    state = translated(dns, A, protocol="UDP")
    view.apply(dns.key, dns, state)
    assert view.targets(2.0) == {}
    dns_checked = parsed_service(
        name="dns", ports=[k8s.port(protocol="UDP")], annotations={"aproxy.io/health-check-port": "9153"}
    )
    view.apply(dns.key, dns_checked, state)
    assert view.targets(2.0) == {target(A, 9153): 2.0}
    view.set_unhealthy(target(A, 9153), True)
    view.apply(dns.key, dns_checked, translated(dns_checked, A, B, protocol="UDP"))
    state = translated(dns_checked, A, B, protocol="UDP")
    assert state.virtual_servers[0].key.protocol is L4Protocol.UDP
    assert weights(view.apply(dns.key, dns_checked, state)) == {A: 0, B: 1}


def test_checks_off_for_one_service_leave_its_weights_alone() -> None:
    view = HealthView()
    off = parsed_service(name="off", annotations={"aproxy.io/health-check": "false"})
    on = parsed_service(name="on", cluster_ips="10.96.0.2")
    off_state, on_state = translated(off, A, B), translated(on, A, B)
    view.apply(off.key, off, off_state)
    view.apply(on.key, on, on_state)
    assert view.services_of(target(A)) == {on.key}
    view.set_unhealthy(target(A), True)
    assert view.apply(off.key, off, off_state) is off_state
    assert weights(view.apply(on.key, on, on_state)) == {A: 0, B: 1}


def test_the_shortest_interval_of_a_target_wins() -> None:
    view = HealthView()
    fast = parsed_service(name="fast", annotations={"aproxy.io/health-check-interval": "500ms"})
    slow = parsed_service(name="slow", cluster_ips="10.96.0.2")
    view.apply(fast.key, fast, translated(fast, A))
    generation = view.generation
    view.apply(slow.key, slow, translated(slow, A, B))
    assert view.generation > generation
    assert view.targets(2.0) == {target(A): 0.5, target(B): 2.0}


# --- the annotations ---------------------------------------------------------------------------------------


def test_no_annotation_no_override() -> None:
    assert parsed_service().health is None


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"aproxy.io/health-check": "false"}, HealthOverride(enabled=False)),
        ({"aproxy.io/health-check": "true"}, HealthOverride()),
        ({"aproxy.io/health-check-interval": "5s"}, HealthOverride(interval=5.0)),
        ({"aproxy.io/health-check-interval": "1m30s"}, HealthOverride(interval=90.0)),
        ({"aproxy.io/health-check-interval": "2.5"}, HealthOverride(interval=2.5)),
        ({"aproxy.io/health-check-port": "9090"}, HealthOverride(port=9090)),
    ],
)
def test_valid_annotations(annotations: dict[str, str], expected: HealthOverride) -> None:
    service = parsed_service(annotations=annotations)
    assert service.health == expected
    assert service.skips == ()


@pytest.mark.parametrize(
    ("annotations", "expected", "message"),
    [
        ({"aproxy.io/health-check": "no"}, HealthOverride(), 'is not "true" or "false"'),
        ({"aproxy.io/health-check-interval": "fast"}, HealthOverride(), "is not a duration"),
        ({"aproxy.io/health-check-interval": "10ms"}, HealthOverride(), "at least 0.1s"),
        ({"aproxy.io/health-check-interval": "inf"}, HealthOverride(), "is not a duration"),
        ({"aproxy.io/health-check-interval": "nan"}, HealthOverride(), "is not a duration"),
        ({"aproxy.io/health-check-interval": 5}, HealthOverride(), "is not a duration"),
        ({"aproxy.io/health-check-port": "0"}, HealthOverride(), "is not a port"),
        ({"aproxy.io/health-check-port": "65536"}, HealthOverride(), "is not a port"),
        ({"aproxy.io/health-check-port": "http"}, HealthOverride(), "is not a port"),
        ({"aproxy.io/health-check-port": "٣"}, HealthOverride(), "is not a port"),  # a non-ASCII digit
    ],
)
def test_bad_annotations_are_a_warning_and_the_default(
    annotations: dict[str, Any], expected: HealthOverride, message: str
) -> None:
    service = parsed_service(annotations=annotations)
    assert service.health == expected
    (skip,) = service.skips
    assert skip.severity is Severity.WARNING
    assert message in skip.reason
    assert next(iter(annotations)) in skip.reason
    assert service.ports  # the service itself stands


def test_service_keys_are_values() -> None:
    # The index is keyed by ServiceKey: an equal key from another parse finds the same entry.
    view = HealthView()
    service = parsed_service()
    view.apply(ServiceKey("default", "web"), service, translated(service, A))
    assert view.services_of(target(A)) == {service.key}
