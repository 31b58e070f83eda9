"""Loading the cluster configuration, and renewing a kubeconfig's bearer token: kubernetes_asyncio's real
loader, a real exec plugin (a Python script), and the fake API server enforcing which tokens it accepts. Waits
are bounded by ``fake_api.run``."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from aproxy.sources.kube.config import ClusterConfig, CredentialRenewal, load_config
from aproxy.sources.kube.errors import KubernetesConfigError
from aproxy.sources.kube.watch import KubernetesSource
from tests.fakeapi.server import FakeApiServer
from tests.sources.kube.helpers import (
    FAST,
    TIMEOUT,
    RecordingSink,
    create_service,
    eventually,
    key,
    reals,
    running_synced,
)

EXEC_API = "client.authentication.k8s.io/v1beta1"

# An exec credential plugin: prints the token held in the file named by its first argument, with an expiry
# inside kubernetes_asyncio's 5-minute margin (so every renewal runs it again); fails while a ".fail" file
# stands next to that file, the way a plugin fails when its cloud login has lapsed.
PLUGIN = f"""\
import json, pathlib, sys
from datetime import datetime, timedelta, timezone
token = pathlib.Path(sys.argv[1])
if token.with_suffix(".fail").exists():
    sys.exit("login expired")
expiry = (datetime.now(timezone.utc) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({{"apiVersion": "{EXEC_API}", "kind": "ExecCredential",
                  "status": {{"token": token.read_text().strip(), "expirationTimestamp": expiry}}}}))
"""


def token_file_user(path: Path) -> dict[str, Any]:
    return {"tokenFile": str(path)}


def exec_user(tmp_path: Path, token: Path) -> dict[str, Any]:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    return {"exec": {"apiVersion": EXEC_API, "command": sys.executable, "args": [str(plugin), str(token)]}}


def bearer(cluster: ClusterConfig) -> str:
    return str(cluster.configuration.api_key["BearerToken"])


@pytest.mark.parametrize("kind", ["token-file", "exec-plugin"])
def test_renew_copies_a_changed_token_and_nothing_else(
    fake_api: FakeApiServer, tmp_path: Path, kind: str
) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    user = token_file_user(token) if kind == "token-file" else exec_user(tmp_path, token)
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig", user=user)

    async def scenario() -> tuple[str, list[bool], str, str]:
        cluster = await load_config(kubeconfig, "http://127.0.0.1:1/", environ={})
        first = bearer(cluster)
        assert cluster.renewal is not None
        unchanged = await cluster.renewal.renew()
        token.write_text("two\n")
        changed = await cluster.renewal.renew()
        return first, [unchanged, changed], bearer(cluster), str(cluster.configuration.host)

    first, renewed, after, host = fake_api.run(scenario(), timeout=TIMEOUT)
    assert (first, renewed, after) == ("Bearer one", [False, True], "Bearer two")
    assert host == "http://127.0.0.1:1"  # --master stays: only the token is copied


def test_a_failing_renewal_keeps_the_token_and_tries_again(
    fake_api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("one")
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig", user=exec_user(tmp_path, token))
    failing = token.with_suffix(".fail")

    async def scenario() -> tuple[str, int, str, int]:
        cluster = await load_config(kubeconfig, environ={}, renewal_interval=0.01)
        renewal = cluster.renewal
        assert renewal is not None
        failing.touch()
        token.write_text("two")
        async with asyncio.TaskGroup() as group:
            task = group.create_task(renewal.run())
            await eventually(lambda: renewal.failures >= 2)
            during = bearer(cluster)
            failing.unlink()
            await eventually(lambda: renewal.renewals == 1)
            task.cancel()
        return during, renewal.failures, bearer(cluster), renewal.renewals

    with caplog.at_level(logging.ERROR, logger="aproxy.sources.kube.config"):
        during, failures, after, renewals = fake_api.run(scenario(), timeout=TIMEOUT)
    assert during == "Bearer one"
    assert failures >= 2
    assert (after, renewals) == ("Bearer two", 1)
    assert any("login expired" in getattr(record, "error", "") for record in caplog.records)


def test_the_source_follows_a_rotated_token_file(
    fake_api: FakeApiServer, sink: RecordingSink, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("one")
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig", user=token_file_user(token))
    fake_api.require_tokens("one")
    create_service(fake_api, "web", ["10.244.1.1"])

    async def scenario() -> None:
        cluster = await load_config(kubeconfig, environ={}, renewal_interval=0.01)
        renewal = cluster.renewal
        assert isinstance(renewal, CredentialRenewal)
        source = KubernetesSource(cluster.configuration, retry=FAST)
        async with running_synced(fake_api, source, sink), asyncio.TaskGroup() as group:
            task = group.create_task(renewal.run())
            token.write_text("two")  # the kubelet rotates the projected token
            await eventually(lambda: renewal.renewals == 1)
            fake_api.require_tokens("two")  # the old one has expired
            fake_api.clear_requests()
            fake_api.end_streams()  # the watches end (server timeout) and reopen with the new token
            create_service(fake_api, "api", ["10.244.2.1"])
            await sink.until(
                lambda: (
                    key("api") in sink.tracker.services()
                    and reals(sink.tracker, "api") == [("10.244.2.1", 8080)]
                )
            )
            task.cancel()

    fake_api.run(scenario(), timeout=TIMEOUT)
    # Every request after the rotation (the re-watches, and a relist if any) carried the new token.
    assert fake_api.count("watch") >= 2
    assert {record.token for record in fake_api.requests} == {"two"}


def test_in_a_pod_there_is_no_renewal_task(fake_api: FakeApiServer, tmp_path: Path) -> None:
    token, cert = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("pod-token")
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}

    cluster = fake_api.run(load_config(environ=environ, token_file=token, cert_file=cert), timeout=TIMEOUT)
    # kubernetes_asyncio re-reads the service-account token itself (refresh_api_key_hook).
    assert cluster.renewal is None
    assert cluster.configuration.refresh_api_key_hook is not None


def test_load_config_from_kubeconfig_with_master_override(fake_api: FakeApiServer, tmp_path: Path) -> None:
    path = fake_api.write_kubeconfig(tmp_path / "kubeconfig", token="secret")

    async def scenario() -> tuple[str, str, str, str]:
        from_file = (await load_config(path, environ={})).configuration
        from_env = (await load_config(None, environ={"KUBECONFIG": str(path)})).configuration
        overridden = (await load_config(path, "https://api.example:6443/", environ={})).configuration
        return str(from_file.host), from_file.api_key["BearerToken"], str(from_env.host), str(overridden.host)

    host, token, env_host, overridden = fake_api.run(scenario(), timeout=TIMEOUT)
    assert (host, env_host, overridden) == (fake_api.url, fake_api.url, "https://api.example:6443")
    assert token == "Bearer secret"


def test_load_config_in_a_pod_uses_the_service_account(fake_api: FakeApiServer, tmp_path: Path) -> None:
    token, cert = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("pod-token")
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    kubeconfig = fake_api.write_kubeconfig(tmp_path / "kubeconfig")

    async def scenario() -> tuple[str, str, str]:
        pod = await load_config(environ=environ, token_file=token, cert_file=cert)
        explicit = await load_config(kubeconfig, environ=environ, token_file=token, cert_file=cert)
        return (
            str(pod.configuration.host),
            pod.configuration.api_key["BearerToken"],
            str(explicit.configuration.host),
        )

    pod_host, pod_token, explicit_host = fake_api.run(scenario(), timeout=TIMEOUT)
    assert (pod_host, pod_token) == ("https://10.96.0.1:443", "Bearer pod-token")
    assert explicit_host == fake_api.url  # an explicit kubeconfig wins, even in a pod


def test_load_config_without_any_configuration_is_a_clear_error(
    fake_api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config

    async def scenario() -> str:
        with pytest.raises(KubernetesConfigError) as caught:
            await load_config(environ={}, token_file=tmp_path / "missing")
        only_master = (
            await load_config(None, "http://127.0.0.1:8001", environ={}, token_file=tmp_path / "x")
        ).configuration
        return f"{caught.value}|{only_master.host}"

    message, host = fake_api.run(scenario(), timeout=TIMEOUT).split("|")
    assert "no cluster configuration" in message
    assert host == "http://127.0.0.1:8001"
