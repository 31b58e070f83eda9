"""Backend health checks on a real kernel, with real traffic: the daemon (file source, IPVS backend, its
health-check task) in a thread, three pods behind one virtual IP, a client namespace sending connections.

- A pod whose listener stops: within interval x fall + timeout + one interval (plus a sync) its real server
  is at weight 0, new connections go elsewhere, and a connection opened before keeps working.
- A pod whose packets are dropped (blackholed): its checks time out; drained too.
- Both back: after `rise` successes they get their weight and traffic again.
- Every backend failing its check: fail open, the weights stay, traffic keeps flowing.

Every kernel check reads IPVS with ipvsadm (netlab's parser), never through the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aproxy.app import Daemon
from aproxy.backends.ipvs import IPVSSettings
from aproxy.core.model import L4Protocol, RealServerKey, VirtualServerKey
from aproxy.health.config import HealthCheckSettings
from aproxy.settings import Settings
from aproxy.web.server import ListenAddress
from tests.core import k8s
from tests.kernel import netlab
from tests.kernel.netlab import NODE_ADDRESS, SERVICE_ADDRESS, Lab, Namespace
from tests.kernel.test_drain import PORT, hold_on

pytestmark = pytest.mark.kernel

TARGET_PORT = netlab.ECHO_PORT
VIRTUAL = VirtualServerKey(L4Protocol.TCP, SERVICE_ADDRESS, PORT)
HEALTH = HealthCheckSettings(interval=0.5, timeout=0.5, fall=3, rise=2)
MIN_SYNC = 0.1
# The bound (with the +-10% jitter), plus one sync; then the slack of a user-mode kernel on a shared
# 2-core host (ipvsadm alone costs ~160 ms here, and it is what the test polls with).
DETECTION_BOUND = HEALTH.interval * 1.1 * HEALTH.fall + HEALTH.timeout + HEALTH.interval + MIN_SYNC
SLACK = 2.0
TRAFFIC = 12  # fresh connections per look at where traffic goes (rr over three: four each)


def real_key(pod: Namespace) -> RealServerKey:
    return RealServerKey(pod.address, TARGET_PORT)


def weights() -> dict[RealServerKey, int]:
    return netlab.read_ipvs().get(VIRTUAL).weights


def manifest(path: Path, pods: list[Namespace], annotations: dict[str, str] | None = None) -> Path:
    objects = [
        k8s.service(
            "web",
            cluster_ips=str(SERVICE_ADDRESS),
            ports=[k8s.port("http", PORT, target_port=TARGET_PORT)],
            annotations=annotations,
        ),
        k8s.endpoint_slice(
            "web",
            endpoints=[k8s.endpoint(str(pod.address), node="node-a") for pod in pods],
            ports=[k8s.slice_port("http", TARGET_PORT)],
        ),
    ]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    return path


@contextmanager
def daemon(tmp_path: Path, source: Path, health: HealthCheckSettings = HEALTH) -> Iterator[Daemon]:
    """`aproxy run` in a thread of this process (its own event loop); stopped, exit 0, on leaving."""
    settings = Settings(
        node_name="node-a",
        sources=(source,),
        node_ips=(NODE_ADDRESS,),
        backend="ipvs",
        ipvs=IPVSSettings(state_file=tmp_path / "owned.json"),
        healthz_address=ListenAddress("127.0.0.1", 0),
        metrics_address=ListenAddress("127.0.0.1", 0),
        min_sync_period=MIN_SYNC,
        health_checks=health,
    )
    instance = Daemon(settings)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    codes: list[int] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        codes.append(loop.run_until_complete(instance.run(stop, handle_signals=False)))

    thread = threading.Thread(target=serve, name="aproxy-daemon", daemon=True)
    thread.start()
    try:
        yield instance
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()
    assert codes == [0]


def wait_weights(expected: dict[RealServerKey, int], what: str, timeout: float) -> float:
    """Poll ipvsadm until the weights are ``expected``; the seconds it took."""
    began = time.monotonic()

    def reached() -> bool | None:
        try:
            return weights() == expected or None
        except KeyError:
            return None  # the virtual server is not programmed yet

    netlab.wait_until(reached, what=what, timeout=timeout, interval=0.05)
    return time.monotonic() - began


def traffic(client: Namespace) -> set[str]:
    """The pods that answered TRAFFIC fresh connections through the virtual IP."""
    replies = netlab.tcp_replies(SERVICE_ADDRESS, PORT, TRAFFIC, netns=client.netns, timeout=2.0)
    return set(netlab.backends(replies))


def blackhole(pod: Namespace, on: bool) -> None:
    """Drop every packet the pod receives (a dead node, a broken route), or stop dropping them."""
    pod.exec("iptables", "-A" if on else "-D", "INPUT", "-j", "DROP")


def test_drain_on_failure_and_restore_on_recovery(lab: Lab, tmp_path: Path) -> None:
    a, b, c = lab.add_pod("pod-a"), lab.add_pod("pod-b"), lab.add_pod("pod-c")
    client = lab.add_client()
    all_up = {real_key(a): 1, real_key(b): 1, real_key(c): 1}
    with daemon(tmp_path, manifest(tmp_path / "web.json", [a, b, c])):
        wait_weights(all_up, "all three programmed", timeout=30)
        # Long enough for every pod's first checks (unknown -> healthy) to have run.
        time.sleep(2 * HEALTH.interval)
        assert traffic(client) == {"pod-a", "pod-b", "pod-c"}
        held = hold_on(a, client)
        with held:
            lab.stop_listening(a)  # the server is gone: new connections are refused
            took = wait_weights({**all_up, real_key(a): 0}, "pod-a drained", timeout=DETECTION_BOUND + SLACK)
            assert took <= DETECTION_BOUND + SLACK
            assert "pod-a" not in traffic(client)
            assert held.exchange().backend == "pod-a"  # the connection opened before keeps working

            blackhole(b, True)  # no answer at all: the checks time out
            drained = {real_key(a): 0, real_key(b): 0, real_key(c): 1}
            took = wait_weights(drained, "pod-b drained", timeout=DETECTION_BOUND + SLACK)
            assert took <= DETECTION_BOUND + SLACK
            assert traffic(client) == {"pod-c"}

        lab.listen_again(a)
        blackhole(b, False)
        # `rise` successes: two intervals and a sync, plus jitter.
        wait_weights(all_up, "pod-a and pod-b restored", timeout=HEALTH.interval * 1.1 * 3 + MIN_SYNC + SLACK)
        assert traffic(client) == {"pod-a", "pod-b", "pod-c"}


def test_every_backend_failing_fails_open_and_traffic_flows(lab: Lab, tmp_path: Path) -> None:
    a, b, c = lab.add_pod("pod-a"), lab.add_pod("pod-b"), lab.add_pod("pod-c")
    client = lab.add_client()
    all_up = {real_key(a): 1, real_key(b): 1, real_key(c): 1}
    # The checks go to a port none of them listens on: every backend is judged unhealthy.
    source = manifest(tmp_path / "web.json", [a, b, c], {"aproxy.io/health-check-port": "9"})
    with daemon(tmp_path, source) as running:
        wait_weights(all_up, "all three programmed", timeout=30)
        checker = running.health_checker
        assert checker is not None

        def all_unhealthy() -> bool | None:
            return running.health_view.unhealthy_count == 3 or None

        netlab.wait_until(all_unhealthy, what="all three judged unhealthy", timeout=DETECTION_BOUND + SLACK)
        time.sleep(MIN_SYNC + 0.5)  # a sync would have drained them by now, were it to
        assert weights() == all_up
        assert running.health_view.failing_open_count == 1
        assert traffic(client) == {"pod-a", "pod-b", "pod-c"}


def test_fail_closed_drains_them_all(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.add_pod("pod-a"), lab.add_pod("pod-b")
    source = manifest(tmp_path / "web.json", [a, b], {"aproxy.io/health-check-port": "9"})
    with daemon(tmp_path, source, dataclasses.replace(HEALTH, fail_closed=True)):
        wait_weights({real_key(a): 0, real_key(b): 0}, "both drained", timeout=30)
