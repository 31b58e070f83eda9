"""Every metric the kube-proxy dashboard of the Kubernetes monitoring mixin queries is exported, with its
type and the labels the queries use: the daemon on the Kubernetes source (the fake API server), scraped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakeapi import fixtures
from tests.fakeapi.server import FakeApiServer
from tests.test_app import FAST_RETRY, TIMEOUT, Daemon, MemoryBackend, get, initial_sync, running, settings

fake_api = fixtures.fake_api

DASHBOARD = Path(__file__).with_name("kube-proxy-dashboard-metrics.txt")
# Prometheus adds these itself, or they are the target's: not the exporter's to provide.
SCRAPE_LABELS = {"instance"}


def dashboard() -> list[tuple[str, str, set[str]]]:
    rows = []
    for line in DASHBOARD.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, kind, labels = line.split()
        rows.append((name, kind, set() if labels == "-" else set(labels.split(","))))
    return rows


def scrape(fake_api: FakeApiServer, tmp_path: Path, ready: Callable[[str], bool] = lambda text: True) -> str:
    """/metrics of the daemon on the fake API server, after its initial sync, once ``ready(text)`` holds."""
    fake_api.create(
        "nodes",
        {
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
        },
    )
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig")
    daemon = Daemon(settings(node_ips=(), kubeconfig=kubeconfig, retry=FAST_RETRY), backend=MemoryBackend())

    async def scenario() -> str:
        async with running(daemon):
            await initial_sync(daemon)
            while True:  # bounded by fake_api.run's timeout
                status, body = await get(daemon.web.metrics_port, "/metrics")
                assert status == 200
                if ready(body.decode()):
                    return body.decode()
                await asyncio.sleep(0.05)

    return fake_api.run(scenario(), timeout=TIMEOUT)


def test_every_dashboard_metric_is_exported_with_its_type_and_labels(
    fake_api: FakeApiServer, tmp_path: Path
) -> None:
    families = {family.name: family for family in text_string_to_metric_families(scrape(fake_api, tmp_path))}
    missing = []
    for name, kind, labels in dashboard():
        if name == "up":  # Prometheus' own, per target
            continue
        family_name = name.removesuffix("_total") if kind == "counter" else name
        family = families.get(family_name)
        if family is None:
            missing.append(name)
            continue
        assert family.type == kind, name
        exported = {label for sample in family.samples for label in sample.labels} - {"le"}
        assert labels - SCRAPE_LABELS <= exported, (name, exported)
    assert missing == []


def test_the_rest_client_counts_the_list_and_watch_requests(fake_api: FakeApiServer, tmp_path: Path) -> None:
    # A watch is counted when its response starts, which may be just after the initial sync: wait for them.
    text = scrape(fake_api, tmp_path, ready=lambda text: _ok_gets(text) >= 4)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = {
        (sample.labels["code"], sample.labels["method"]): sample.value
        for sample in families["rest_client_requests"].samples
    }
    # One list per kind at least (services, endpointslices), then their watches: all answered 200.
    assert requests[("200", "GET")] >= 4
    assert all(
        sample.labels["host"].startswith("127.0.0.1:") for sample in families["rest_client_requests"].samples
    )
    urls = {
        sample.labels["url"]
        for sample in families["rest_client_request_duration_seconds"].samples
        if sample.name.endswith("_count")
    }
    assert any(url.endswith("/api/v1/services") for url in urls), urls
    assert any(url.endswith("/apis/discovery.k8s.io/v1/endpointslices") for url in urls), urls
    assert not any("?" in url for url in urls)


def _ok_gets(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "rest_client_requests"
        for sample in family.samples
        if (sample.labels.get("code"), sample.labels.get("method")) == ("200", "GET")
    )


@pytest.mark.parametrize(
    "name", ["aproxy_sync_proxy_rules_duration_seconds", "aproxy_sync_proxy_rules_last_timestamp_seconds"]
)
def test_no_metric_is_exported_under_two_names(fake_api: FakeApiServer, tmp_path: Path, name: str) -> None:
    text = scrape(fake_api, tmp_path)
    assert name not in text
    assert name.replace("aproxy_", "kubeproxy_", 1) in text
