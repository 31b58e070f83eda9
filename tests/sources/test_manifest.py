"""Manifest loading: formats, flattening, filtering, defaults, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aproxy.sources.manifest import ManifestError, Manifests, load_manifests, manifest_files

SERVICE_WEB = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80, protocol: TCP}]}
"""

SLICE_WEB = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.1.5]}]
"""

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {replicas: 2}
"""


def names(objects: tuple[dict[str, Any], ...]) -> list[str]:
    return [f"{obj['metadata'].get('namespace')}/{obj['metadata'].get('name')}" for obj in objects]


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


TYPED_SERVICE_LIST = {
    "apiVersion": "v1",
    "kind": "ServiceList",
    "metadata": {"resourceVersion": "42"},
    "items": [
        {"metadata": {"name": "a", "namespace": "x"}, "spec": {"clusterIP": "10.96.0.1"}},
        {"metadata": {"name": "b", "namespace": "x"}, "spec": {"clusterIP": "10.96.0.2"}},
    ],
}

LOADS = [
    pytest.param(
        {"c.yaml": f"{SERVICE_WEB}---\n{DEPLOYMENT}---\n---\n{SLICE_WEB}"},
        ["c.yaml"],
        ["shop/web"],
        ["shop/web-abc"],
        id="multi-document-with-null-and-other-kind",
    ),
    pytest.param(
        {
            "l.yaml": "apiVersion: v1\nkind: List\nitems:\n"
            + "".join(
                "- " + doc.replace("\n", "\n  ").rstrip() + "\n"
                for doc in (SERVICE_WEB, DEPLOYMENT, SLICE_WEB)
            )
        },
        ["l.yaml"],
        ["shop/web"],
        ["shop/web-abc"],
        id="list-flattened",
    ),
    pytest.param(
        {"t.json": json.dumps(TYPED_SERVICE_LIST)},
        ["t.json"],
        ["x/a", "x/b"],
        [],
        id="typed-list-items-take-the-list-kind",
    ),
    pytest.param(
        {
            "s.yaml": "apiVersion: discovery.k8s.io/v1\nkind: EndpointSliceList\nitems:\n"
            "- metadata: {name: s1, namespace: x}\n  addressType: IPv4\n"
        },
        ["s.yaml"],
        [],
        ["x/s1"],
        id="typed-slice-list",
    ),
    pytest.param(
        {"n.yaml": "kind: List\nitems:\n- kind: List\n  items:\n  - " + SERVICE_WEB.replace("\n", "\n    ")},
        ["n.yaml"],
        ["shop/web"],
        [],
        id="nested-list-flattened",
    ),
    pytest.param(
        {
            "c.json": json.dumps(
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j", "namespace": "y"}}
            )
        },
        ["c.json"],
        ["y/j"],
        [],
        id="json-object",
    ),
    pytest.param(
        {
            "a.json": json.dumps(
                [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j", "namespace": "y"}}]
            )
        },
        ["a.json"],
        ["y/j"],
        [],
        id="top-level-list-of-objects",
    ),
    pytest.param(
        {
            "d/b.yml": SLICE_WEB,
            "d/a.yaml": SERVICE_WEB,
            "d/c.json": json.dumps(
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c", "namespace": "z"}}
            ),
            "d/notes.txt": "not: a manifest",
            "d/.hidden.yaml": "- broken: [",
            "d/sub/deep.yaml": SERVICE_WEB.replace("web", "deep"),
        },
        ["d"],
        ["shop/web", "z/c"],
        ["shop/web-abc"],
        id="directory-sorted-manifests-only-not-recursive",
    ),
    pytest.param(
        {"a.yaml": SERVICE_WEB, "b.yaml": SERVICE_WEB.replace("name: web", "name: other")},
        ["b.yaml", "a.yaml"],
        ["shop/other", "shop/web"],
        [],
        id="files-in-the-order-given",
    ),
    pytest.param(
        {
            "o.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n"
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old}\n---\n"
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\n---\n"
            "kind: 7\n"
        },
        ["o.yaml"],
        [],
        [],
        id="other-kinds-and-versions-ignored",
    ),
    pytest.param(
        {
            "ns.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: absent}\n---\n"
            "apiVersion: v1\nkind: Service\nmetadata: {name: nulled, namespace: null}\n---\n"
            "apiVersion: v1\nkind: Service\nmetadata: {name: kept, namespace: team}\n"
        },
        ["ns.yaml"],
        ["default/absent", "default/nulled", "team/kept"],
        [],
        id="namespace-defaults-to-default",
    ),
    pytest.param(
        {"e.yaml": "", "f.yaml": "# only a comment\n"}, ["e.yaml", "f.yaml"], [], [], id="empty-files"
    ),
]


@pytest.mark.parametrize(("files", "paths", "services", "slices"), LOADS)
def test_load(
    tmp_path: Path, files: dict[str, str], paths: list[str], services: list[str], slices: list[str]
) -> None:
    write(tmp_path, dict(files))
    manifests = load_manifests([tmp_path / path for path in paths])
    assert names(manifests.services) == services
    assert names(manifests.slices) == slices
    assert all(obj["kind"] == "Service" and obj["apiVersion"] == "v1" for obj in manifests.services)
    assert all(obj["kind"] == "EndpointSlice" for obj in manifests.slices)


def test_objects_without_a_usable_name_pass_through(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "bad.yaml": "apiVersion: v1\nkind: Service\nspec: {}\n---\n"
            "apiVersion: v1\nkind: Service\nmetadata: 5\n"
        },
    )
    manifests = load_manifests([tmp_path / "bad.yaml"])
    assert manifests == Manifests(
        services=(
            {"apiVersion": "v1", "kind": "Service", "spec": {}},
            {"apiVersion": "v1", "kind": "Service", "metadata": 5},
        ),
    )


def test_directory_listing(tmp_path: Path) -> None:
    write(
        tmp_path,
        {"d/b.yml": "", "d/a.yaml": "", "d/c.json": "{}", "d/x.txt": "", "d/.h.yaml": "", "f.yaml": ""},
    )
    (tmp_path / "d" / "dir.yaml").mkdir()
    assert manifest_files([tmp_path / "f.yaml", tmp_path / "d"]) == [
        tmp_path / "f.yaml",
        tmp_path / "d" / "a.yaml",
        tmp_path / "d" / "b.yml",
        tmp_path / "d" / "c.json",
    ]


ERRORS = [
    pytest.param(
        {}, "missing.yaml", "cannot read {dir}/missing.yaml: No such file or directory", id="missing-file"
    ),
    pytest.param(
        {"s.yaml": "kind: Service\nmetadata: {name: a: b}\n"},
        "s.yaml",
        "{dir}/s.yaml: invalid YAML at line 2, column 19: did not find expected ',' or '}'",
        id="yaml-syntax-error",
    ),
    pytest.param(
        {"s.yaml": SERVICE_WEB + "---\nkind: Service\n  name: x\n"},
        "s.yaml",
        "{dir}/s.yaml: invalid YAML at line 7, column 7: mapping values are not allowed in this context",
        id="yaml-syntax-error-in-a-later-document",
    ),
    pytest.param(
        {"s.json": '{"kind": "Service",}'},
        "s.json",
        "{dir}/s.json: invalid JSON at line 1, column 20: Expecting property name enclosed in double quotes",
        id="json-syntax-error",
    ),
    pytest.param(
        {"b.yaml": b"kind: Service\n\xff\n"},
        "b.yaml",
        "{dir}/b.yaml: not UTF-8 text at byte 14",
        id="not-utf8",
    ),
    pytest.param(
        {"t.yaml": "just a string\n"},
        "t.yaml",
        "{dir}/t.yaml: document 1: expected a mapping or a list at the top level, got str",
        id="top-level-scalar",
    ),
    pytest.param(
        {"t.yaml": SERVICE_WEB + "---\n42\n"},
        "t.yaml",
        "{dir}/t.yaml: document 2: expected a mapping or a list at the top level, got int",
        id="second-document-scalar",
    ),
    pytest.param(
        {"t.yaml": "- " + SERVICE_WEB.replace("\n", "\n  ").rstrip() + "\n- oops\n"},
        "t.yaml",
        "{dir}/t.yaml: document 1: [1] is str, expected a mapping",
        id="top-level-list-item-not-a-mapping",
    ),
    pytest.param(
        {"l.yaml": "kind: List\nitems:\n- kind: ConfigMap\n- 3\n"},
        "l.yaml",
        "{dir}/l.yaml: document 1: items[1] is int, expected a mapping",
        id="list-item-not-a-mapping",
    ),
    pytest.param(
        {"l.yaml": "kind: List\nitems:\n- kind: List\n  items: [[1]]\n"},
        "l.yaml",
        "{dir}/l.yaml: document 1: items[0].items[0] is list, expected a mapping",
        id="nested-list-item-not-a-mapping",
    ),
    pytest.param(
        {"l.yaml": "apiVersion: v1\nkind: ServiceList\nitems: oops\n"},
        "l.yaml",
        "{dir}/l.yaml: document 1: items of ServiceList is str, expected a list",
        id="list-items-not-a-list",
    ),
    pytest.param(
        {"l.yaml": "&loop {kind: List, items: [*loop]}\n"},
        "l.yaml",
        "{dir}/l.yaml: the YAML alias *loop is inside the node it refers to",
        id="self-referencing-list",
    ),
    pytest.param(
        {"l.yaml": "{kind: List, items: [" * 9 + "{kind: Service}" + "]}" * 9 + "\n"},
        "l.yaml",
        "{dir}/l.yaml: document 1: Lists nested deeper than 8",
        id="lists-nested-too-deep",
    ),
]


@pytest.mark.parametrize(("files", "path", "message"), ERRORS)
def test_errors_are_one_line_naming_the_file(
    tmp_path: Path, files: dict[str, str | bytes], path: str, message: str
) -> None:
    write(tmp_path, files)
    with pytest.raises(ManifestError) as caught:
        load_manifests([tmp_path / path])
    assert str(caught.value) == message.replace("{dir}", str(tmp_path))
    assert "\n" not in str(caught.value)


def test_first_bad_file_fails_the_whole_load(tmp_path: Path) -> None:
    write(tmp_path, {"d/a.yaml": SERVICE_WEB, "d/b.yaml": "a: [\n"})
    with pytest.raises(ManifestError, match=r"/d/b\.yaml: invalid YAML at line 2"):
        load_manifests([tmp_path / "d"])
