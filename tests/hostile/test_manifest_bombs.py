"""Hostile manifests (issue 14): deep nesting and alias expansion end in a one-line error naming the file,
never a crash, a hang or a traceback. The CLI cases run ``aproxy plan`` as a process: before the fix, YAML
nested 50,000 levels killed the process inside libyaml (exit 139), which would take pytest down with it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from aproxy.sources.manifest import MAX_DEPTH, MAX_NODES, ManifestError, load_manifests

SERVICE = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"


def alias_bomb(levels: int, width: int = 9) -> str:
    """A List of nested Lists whose items are aliases of the level below: ``width ** levels`` Services once
    flattened, from a file of a few hundred bytes (the 835-byte file of the report is 9 levels of 9)."""
    lines = ["kind: List", "a0: &a0 {apiVersion: v1, kind: Service, metadata: {name: x}}"]
    for level in range(1, levels + 1):
        items = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} {{kind: List, items: [{items}]}}")
    lines.append(f"items: [*a{levels}]")
    return "\n".join(lines) + "\n"


def plan(path: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "aproxy.cli", "plan", "--source", str(path), "--node-name", "n"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_json_nested_a_thousand_levels_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 1000 + "]" * 1000)
    with pytest.raises(ManifestError, match=rf"^{path}: nested too deeply"):
        load_manifests([path])


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 50_000])
def test_yaml_nested_deeper_than_the_bound_is_a_one_line_error(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * depth + "]" * depth + "\n")
    with pytest.raises(ManifestError, match=rf"^{path}: nested deeper than {MAX_DEPTH} levels"):
        load_manifests([path])


def test_yaml_at_the_depth_bound_still_loads(tmp_path: Path) -> None:
    # The bound leaves room for real objects: a Service inside Lists inside a deep annotation-free structure.
    path = tmp_path / "ok.yaml"
    path.write_text(SERVICE + "extra: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")
    assert len(load_manifests([path]).services) == 1


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_plan_exits_2_with_one_line_for_very_deep_input(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep.{suffix}"
    path.write_text("[" * 50_000 + "]" * 50_000)
    result = plan(path)
    assert result.returncode == 2, result.stderr[-500:]
    assert result.stderr.count("\n") == 1
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_alias_expansion_past_the_bound_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels=9))
    assert path.stat().st_size < 1000
    began = time.perf_counter()
    with pytest.raises(ManifestError, match=rf"^{path}: expands to more than {MAX_NODES:,} nodes"):
        load_manifests([path])
    # Behaviour, not speed, is asserted: it stops while counting instead of walking 9**9 objects. The loose
    # bound only catches a regression to expanding (which takes minutes).
    assert time.perf_counter() - began < 10


def test_plan_of_an_alias_bomb_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels=9))
    result = plan(path)
    assert result.returncode == 2
    expected = f"aproxy: {path}: expands to more than {MAX_NODES:,} nodes (YAML aliases included)"
    assert result.stderr.strip() == expected


def test_a_few_aliases_within_the_bound_still_load(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(alias_bomb(levels=2, width=3))
    services = load_manifests([path]).services
    assert [s["metadata"]["name"] for s in services] == ["x"] * 9


def test_an_alias_inside_the_node_it_names_is_refused(tmp_path: Path) -> None:
    # Nine copies of itself: without this check the List flattening walks 9**8 objects before its depth bound.
    path = tmp_path / "loop.yaml"
    path.write_text("&loop {kind: List, items: [" + ", ".join(["*loop"] * 9) + "]}\n")
    message = rf"^{path}: the YAML alias \*loop is inside the node it refers to$"
    with pytest.raises(ManifestError, match=message):
        load_manifests([path])
