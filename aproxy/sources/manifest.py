"""Kubernetes manifests from files: the Services and EndpointSlices in YAML or JSON, as plain dicts.

Public API::

    load_manifests(paths: Sequence[Path]) -> Manifests     # raises ManifestError
    manifest_files(paths: Sequence[Path]) -> list[Path]    # the files it reads, directories expanded
    read_documents(path: Path) -> list[Any]                # one file's documents, for --config
    Manifests(services: tuple[dict, ...], slices: tuple[dict, ...])

What is read:

- A path that is a directory stands for every ``*.yaml``, ``*.yml`` and ``*.json`` regular file directly in it
  (not recursive), in name order. Hidden files (``.name``) are left out: they are editor temporaries or, in a
  ConfigMap mount, the mount's own bookkeeping.
- ``*.json`` files are parsed as one JSON document; everything else as YAML, multi-document (``---``), with
  the C loader when PyYAML has it. Text is UTF-8 (a BOM is tolerated).
- A document may be one object, a list of objects, or a ``List`` / ``<Kind>List`` object whose ``items`` are
  flattened (nested Lists too). Items of a typed list (``ServiceList`` from ``kubectl get -o yaml``) carry no
  ``kind``/``apiVersion``: they get the list's (``Service``, and the list's apiVersion).
- Kept: ``v1`` ``Service`` and ``discovery.k8s.io/v1`` ``EndpointSlice``. Every other kind is ignored silently
  (a Deployment next to its Service is normal); a Service or EndpointSlice of another apiVersion (or none)
  is ignored too, with a line in ``Manifests.ignored``. Null documents and null items are skipped.
- A kept object without ``metadata.namespace`` (or with a null/empty one) gets ``"default"``, as kubectl does.
  A kept object with no usable metadata or name is passed through unchanged: the core's parser reports it as a
  skip, like any other bad object, instead of failing the whole file here.
- Objects are returned in file order; the same object twice is returned twice (the later one wins when fed to
  the change tracker).

Errors: anything that makes a file unusable as a whole raises ``ManifestError`` with a one-line message naming
the file (``aproxy plan`` prints it and exits 2)::

    cannot read FILE: No such file or directory
    FILE: not UTF-8 text at byte N
    FILE: invalid YAML at line L, column C: PROBLEM
    FILE: invalid JSON at line L, column C: PROBLEM
    FILE: document N: expected a mapping or a list at the top level, got str
    FILE: document N: items[2] is int, expected a mapping
    FILE: document N: items of ServiceList is str, expected a list
    FILE: nested deeper than 100 levels
    FILE: expands to more than 4,000,000 nodes (YAML aliases included)
    FILE: the YAML alias *NAME is inside the node it refers to

Hostile input is bounded before it is built: a YAML file's event stream is read once (libyaml's parser keeps
its own stack, so this is safe at any depth) to check its nesting depth and the number of nodes it expands to
with its aliases counted at full size, and only then composed (the composer recurses in C: 50,000 levels
crash the process). JSON deeper than the interpreter's recursion limit is a ManifestError too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent

_Loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SERVICE = ("v1", "Service")
ENDPOINT_SLICE = ("discovery.k8s.io/v1", "EndpointSlice")
MANIFEST_SUFFIXES = frozenset({".yaml", ".yml", ".json"})
DEFAULT_NAMESPACE = "default"
# Lists inside Lists are legal but rare; the bound stops a self-referencing YAML alias from recursing forever.
_MAX_LIST_DEPTH = 8
# A Service or EndpointSlice is at most about 8 levels deep, 20 inside nested Lists: 100 is far from both, and
# far from the C stack. 4,000,000 nodes is about three times a manifest of 10,000 services with 10 endpoints
# each; an alias bomb passes it within a few hundred bytes of input and is refused while being counted.
MAX_DEPTH = 100
MAX_NODES = 4_000_000


class ManifestError(Exception):
    """A manifest file cannot be used at all; ``str()`` is a one-line message naming the file."""


class ManifestReadError(ManifestError):
    """A file or directory could not be read (``OSError``): unlike bad content, this may pass by itself
    (too many open files, a file replaced while the directory was listed), so a reader may retry."""


@dataclass(frozen=True, slots=True)
class Manifests:
    """The kept objects, as raw dicts in file order."""

    services: tuple[dict[str, Any], ...] = ()
    slices: tuple[dict[str, Any], ...] = ()
    # One line per Service or EndpointSlice left out for its apiVersion (``FILE: ... ignored``): readers
    # report each once.
    ignored: tuple[str, ...] = ()


def manifest_files(paths: Sequence[Path]) -> list[Path]:
    """The files ``load_manifests`` reads: files as given, directories expanded (sorted, non-recursive)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(_directory_manifests(path))
        else:
            files.append(path)
    return files


def load_manifests(paths: Sequence[Path]) -> Manifests:
    """Read every file (see ``manifest_files``) and keep its Services and EndpointSlices.

    Raises ``ManifestError`` on the first file that cannot be read or parsed.
    """
    services: list[dict[str, Any]] = []
    slices: list[dict[str, Any]] = []
    ignored: list[str] = []
    for file in manifest_files(paths):
        for obj in _file_objects(file):
            identity = (obj.get("apiVersion"), obj.get("kind"))
            if identity == SERVICE:
                services.append(_with_default_namespace(obj))
            elif identity == ENDPOINT_SLICE:
                slices.append(_with_default_namespace(obj))
            elif isinstance(identity[1], str) and identity[1] in _KEPT_API_VERSIONS:
                ignored.append(_ignored_version(file, obj))
    return Manifests(services=tuple(services), slices=tuple(slices), ignored=tuple(ignored))


# A kept kind under another apiVersion (``discovery.k8s.io/v1beta1``, removed in Kubernetes 1.25, or none at
# all) is almost certainly meant to be used: it is left out, but said so.
_KEPT_API_VERSIONS = {SERVICE[1]: SERVICE[0], ENDPOINT_SLICE[1]: ENDPOINT_SLICE[0]}


def _ignored_version(file: Path, obj: dict[str, Any]) -> str:
    kind = obj["kind"]
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    namespace = (metadata.get("namespace") if isinstance(metadata, dict) else None) or DEFAULT_NAMESPACE
    version = obj.get("apiVersion")
    got = "no apiVersion" if version is None else f"apiVersion {_show(version)}"
    return f"{file}: {kind} {namespace}/{name}: {got}, only {_KEPT_API_VERSIONS[kind]} is read: ignored"


def _show(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _directory_manifests(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise ManifestReadError(f"cannot read {directory}: {exc.strerror or exc}") from exc
    return [
        entry
        for entry in entries
        if entry.suffix in MANIFEST_SUFFIXES and not entry.name.startswith(".") and entry.is_file()
    ]


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestReadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text at byte {exc.start}") from exc


def _documents(path: Path, text: str) -> list[Any]:
    if path.suffix == ".json":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from exc
        except RecursionError as exc:
            raise ManifestError(f"{path}: nested too deeply") from exc
    try:
        _check_yaml_shape(path, text)
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        problem = _one_line(exc.problem or str(exc))
        mark = exc.problem_mark
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ManifestError(f"{path}: invalid YAML{where}: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: invalid YAML: {_one_line(str(exc))}") from exc


def _check_yaml_shape(path: Path, text: str) -> None:
    """Refuse YAML nested deeper than MAX_DEPTH, expanding to more than MAX_NODES nodes, or holding an alias
    inside the node it names (a cycle: no Kubernetes object is one), from the parser's events alone."""
    expanded = 0  # nodes so far, every alias counted as the whole node it names
    sizes: dict[str, int] = {}  # anchor -> the expanded size of its node, once the node is complete
    open_collections: list[tuple[str | None, int]] = []  # (anchor, ``expanded`` at its start)
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, CollectionStartEvent):
            if len(open_collections) >= MAX_DEPTH:
                raise ManifestError(f"{path}: nested deeper than {MAX_DEPTH} levels")
            open_collections.append((event.anchor, expanded))
            expanded += 1
        elif isinstance(event, CollectionEndEvent):
            anchor, start = open_collections.pop()
            if anchor is not None:
                sizes[anchor] = expanded - start
        elif isinstance(event, ScalarEvent):
            expanded += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_collections):
                raise ManifestError(f"{path}: the YAML alias *{event.anchor} is inside the node it refers to")
            expanded += sizes.get(event.anchor or "", 1)  # an unknown anchor: the composer names the error
        if expanded > MAX_NODES:
            raise ManifestError(f"{path}: expands to more than {MAX_NODES:,} nodes (YAML aliases included)")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _file_objects(path: Path) -> Iterator[dict[str, Any]]:
    for number, document in enumerate(_documents(path, _read_text(path)), start=1):
        where = f"{path}: document {number}"
        if document is None:
            continue
        if isinstance(document, list):
            yield from _list_items(document, "", None, where, depth=0)
        elif isinstance(document, dict):
            yield from _flatten(document, where, depth=0)
        else:
            raise ManifestError(
                f"{where}: expected a mapping or a list at the top level, got {type(document).__name__}"
            )


def _flatten(obj: dict[str, Any], where: str, depth: int, location: str = "") -> Iterator[dict[str, Any]]:
    kind = obj.get("kind")
    if not (isinstance(kind, str) and kind.endswith("List")):
        yield obj
        return
    if depth >= _MAX_LIST_DEPTH:
        raise ManifestError(f"{where}: Lists nested deeper than {_MAX_LIST_DEPTH}")
    items = obj.get("items")
    if items is None:
        return
    if not isinstance(items, list):
        raise ManifestError(f"{where}: {location}items of {kind} is {type(items).__name__}, expected a list")
    # "ServiceList" items are Services; a plain "List" says nothing about its items.
    item_kind = kind.removesuffix("List") or None
    inherited = None if item_kind is None else (obj.get("apiVersion"), item_kind)
    yield from _list_items(items, f"{location}items", inherited, where, depth + 1)


def _list_items(
    items: list[Any], location: str, inherited: tuple[Any, str] | None, where: str, depth: int
) -> Iterator[dict[str, Any]]:
    for index, item in enumerate(items):
        item_location = f"{location}[{index}]"
        if item is None:
            continue
        if not isinstance(item, dict):
            raise ManifestError(f"{where}: {item_location} is {type(item).__name__}, expected a mapping")
        if inherited is not None and "kind" not in item:
            api_version, kind = inherited
            item = {"apiVersion": api_version, "kind": kind, **item}
        yield from _flatten(item, where, depth, f"{item_location}.")


def _with_default_namespace(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and not metadata.get("namespace"):
        return {**obj, "metadata": {**metadata, "namespace": DEFAULT_NAMESPACE}}
    return obj


def read_documents(path: Path) -> list[Any]:
    """The documents of one YAML or JSON file, read with the same bounds as manifests (--config files)."""
    return _documents(path, _read_text(path))
