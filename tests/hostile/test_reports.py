"""What used to be silent or confusing (issue 14): negative durations, a --source that does not exist, kept
kinds under another apiVersion, NodePorts in ``plan`` without --node-ip, a source that fell behind its files
(``/healthz``), the held-objects gauge."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import yaml

from aproxy import cli
from aproxy.metrics import file_source_gauges
from aproxy.sources.file import FileSource
from aproxy.web.healthz import decide
from tests.core.k8s import endpoint, endpoint_slice, port, service, slice_port


@pytest.mark.parametrize("flag", ["--min-sync-period", "--sync-period", "--source-settle-period"])
@pytest.mark.parametrize("value", ["-1s", "-1", "-0.5"])
def test_a_negative_duration_names_the_flag_and_value(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--source", "x.yaml", "--node-name", "n", flag, value])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"aproxy run: error: argument {flag}: invalid duration: '{value}' (must not be negative)"


def test_a_source_that_does_not_exist_at_start_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone" / "c.yaml"
    code = cli.main(["run", "--source", str(missing), "--node-name", "n", "--backend", "dry-run"])
    assert code == 2
    assert capsys.readouterr().err == f"aproxy: --source {missing}: No such file or directory\n"


def test_a_settle_period_out_of_range_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--source", "x.yaml", "--node-name", "n", "--source-settle-period", "2m"])
    assert code == 2
    assert "--source-settle-period (120s) must be 0..60s" in capsys.readouterr().err


def _plan(tmp_path: Path, objects: list[dict[str, object]], *extra: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    assert cli.main(["plan", "--source", str(path), "--node-name", "node-a", *extra]) == 0


def test_plan_reports_kept_kinds_of_another_api_version_once_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beta = endpoint_slice("web", endpoints=[endpoint("10.244.1.5")], ports=[slice_port("http", 8080)])
    beta["apiVersion"] = "discovery.k8s.io/v1beta1"
    bare = service("api", cluster_ips="10.96.0.2", ports=[port("http", 80)])
    del bare["apiVersion"]
    _plan(tmp_path, [service("web", ports=[port("http", 80)]), beta, bare])
    lines = [line for line in capsys.readouterr().err.splitlines() if "object ignored" in line]
    assert len(lines) == 2
    assert "EndpointSlice default/" in lines[0]
    assert 'apiVersion \\"discovery.k8s.io/v1beta1\\", only discovery.k8s.io/v1 is read: ignored' in lines[0]
    assert "Service default/api: no apiVersion, only v1 is read: ignored" in lines[1]


def test_plan_without_node_ip_says_node_ports_are_not_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node_port = service("web", type_="NodePort", ports=[port("http", 80, node_port=30080)])
    _plan(tmp_path, [node_port])
    _plan(tmp_path, [node_port], "--node-ip", "192.0.2.10")
    lines = [line for line in capsys.readouterr().err.splitlines() if "NodePort" in line]
    assert len(lines) == 1
    assert "no --node-ip given" in lines[0] and "services=1" in lines[0] and "example=default/web" in lines[0]


def test_the_file_source_reports_an_ignored_api_version_once_while_it_lasts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.yaml"
    bare = service("api", cluster_ips="10.96.0.2", ports=[port("http", 80)])
    del bare["apiVersion"]
    path.write_text(yaml.safe_dump_all([bare]))
    source, sink = FileSource([path]), _NullSink()

    async def scenario() -> None:
        for content in ([bare], [bare], [], [bare]):
            path.write_text(yaml.safe_dump_all(content))
            await source.reload(sink)

    with caplog.at_level(logging.WARNING, logger="aproxy.sources.file"):
        asyncio.run(scenario())
    assert sum(r.getMessage() == "object ignored" for r in caplog.records) == 2  # gone, then back


class _NullSink:
    def upsert_service(self, raw: object) -> None: ...
    def delete_service(self, namespace: str, name: str) -> None: ...
    def upsert_slice(self, raw: object) -> None: ...
    def delete_slice(self, namespace: str, name: str) -> None: ...
    def mark_listed(self, kind: object) -> None: ...


@pytest.mark.parametrize(
    ("behind", "healthz"),
    [pytest.param(59.0, True, id="within-twice-the-sync-period"), pytest.param(61.0, False, id="beyond")],
)
def test_healthz_fails_when_the_source_has_not_applied_its_files_for_twice_the_sync_period(
    behind: float, healthz: bool
) -> None:
    now = 1000.0
    verdict = decide(now, None, now - 1, 30.0, True, source_pending_since=now - behind)
    assert (verdict.healthz, verdict.livez, verdict.ready) == (healthz, True, True)
    if not healthz:
        assert verdict.reason == "the source has not applied its files' current content for 61.0 s"


def test_the_held_objects_gauge() -> None:
    class Source:
        objects_held = 3

    [family] = list(file_source_gauges(Source()))
    assert (family.name, family.type, family.samples[0].value) == ("aproxy_source_objects_held", "gauge", 3)
    assert list(file_source_gauges(object())) == []


def test_a_daemon_whose_file_does_not_parse_turns_healthz_503_then_200_when_fixed(tmp_path: Path) -> None:
    from aproxy.app import Daemon
    from aproxy.sources.file import FileSourceSettings
    from tests import test_app

    manifest = tmp_path / "c.yaml"
    test_app.write_manifest(manifest, [test_app.web_service()])
    settings = test_app.settings(
        sources=(tmp_path,),
        min_sync_period=0.05,
        sync_period=0.1,  # stale after 0.2 s
        file_source=FileSourceSettings(settle_period=0.01),
    )
    daemon = Daemon(settings)

    async def healthz() -> int:
        return (await test_app.get(daemon.web.healthz_port, "/healthz"))[0]

    async def healthz_until(status: int) -> int:
        """Poll /healthz (staleness is a matter of time: nothing to await) until it answers ``status``."""
        while True:
            if (answer := await healthz()) == status:
                return answer
            await asyncio.sleep(0.05)

    async def scenario() -> list[int]:
        async with test_app.running(daemon):
            await test_app.initial_sync(daemon)
            statuses = [await healthz()]
            source = daemon.source
            assert isinstance(source, FileSource)
            async with asyncio.timeout(test_app.STEP):
                # The watch starts unobservably after the first read: break the file until it is noticed.
                while source.pending_since is None:
                    await asyncio.to_thread(manifest.write_text, "kind: [\n")
                    await asyncio.sleep(0.1)
                statuses.append(await healthz_until(503))
                statuses.append((await test_app.get(daemon.web.healthz_port, "/livez"))[0])
                test_app.write_manifest(manifest, [test_app.web_service()])
                statuses.append(await healthz_until(200))
            return statuses

    assert test_app.run(scenario()) == [200, 503, 200, 200]


def test_slice_ports_that_match_no_service_port_are_reported_once_while_they_last() -> None:
    from aproxy.core.changes import ChangeTracker

    def web(*names: str) -> dict[str, object]:
        return service("web", ports=[port(name, 80 + index) for index, name in enumerate(names)])

    def web_slice(*addresses: str) -> dict[str, object]:
        return endpoint_slice(
            "web",
            endpoints=[endpoint(address) for address in addresses],
            ports=[slice_port("http", 8080), slice_port("metrics", 9090)],
        )

    tracker = ChangeTracker()
    tracker.upsert_service(web("http"))
    tracker.upsert_slice(web_slice("10.244.1.5"))
    [skip] = tracker.new_skips()
    assert str(skip).startswith("warning: EndpointSlice default/web-")
    assert skip.reason == "port metrics/TCP matches no port of Service default/web"
    tracker.upsert_slice(web_slice("10.244.1.5", "10.244.1.6"))  # still unmatched: not again
    tracker.upsert_service(web("http", "other"))  # a service change, still unmatched: not again
    assert tracker.new_skips() == []
    tracker.upsert_service(web("http", "metrics"))  # matched now
    tracker.upsert_service(web("http"))  # unmatched again: reported again
    assert [s.reason for s in tracker.new_skips()] == [skip.reason]
    assert tracker.skip_counts[("EndpointSlice", skip.severity)] == 2


def test_plan_reports_an_unmatched_slice_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    web_slice = endpoint_slice("web", endpoints=[endpoint("10.244.1.5")], ports=[slice_port("metrics", 9090)])
    _plan(tmp_path, [service("web", ports=[port("http", 80)]), web_slice])
    lines = [line for line in capsys.readouterr().err.splitlines() if "matches no port" in line]
    assert len(lines) == 1 and "port metrics/TCP matches no port of Service default/web" in lines[0]


def test_plan_shows_an_object_a_running_daemon_would_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _plan(tmp_path, [service("web", ports=[port("http", 70000)])])
    lines = [line for line in capsys.readouterr().err.splitlines() if "default/web" in line]
    assert len(lines) == 1
    assert "skipped object" in lines[0] and "invalid port 70000" in lines[0]
