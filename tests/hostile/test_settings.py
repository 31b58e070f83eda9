"""Period flags (issue 14): a relation error names both flags and their values, and periods too short to be
sane are refused (``--audit-period 1ms`` ran 3,881 full audits in 8 s)."""

from __future__ import annotations

from typing import Any

import pytest

from aproxy import cli
from aproxy.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            {"sync_period": 0.5, "min_sync_period": 1.0},
            "--sync-period (0.5s) must be >= --min-sync-period (1s)",
            id="sync-below-minimum",
        ),
        pytest.param({"sync_period": 0.0}, "--sync-period (0s) must be > 0", id="sync-zero"),
        pytest.param({"min_sync_period": -1.0}, "--min-sync-period (-1s) must be >= 0", id="min-negative"),
        pytest.param({"audit_period": 0.0}, "--audit-period (0s) must be > 0", id="audit-zero"),
    ],
)
def test_period_problems_name_the_flag_and_value(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(node_name="n", **overrides)
    assert str(caught.value) == message


def test_run_with_a_1ms_audit_period_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--source", "x.yaml", "--node-name", "n", "--audit-period", "1ms"])
    assert code == 2
    assert "--audit-period (0.001s) must be >= 1s" in capsys.readouterr().err


def test_run_with_a_10ms_drain_check_period_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--source", "x.yaml", "--node-name", "n", "--drain-check-period", "10ms"])
    assert code == 2
    assert "--drain-check-period (0.01s) must be >= 0.1s" in capsys.readouterr().err
