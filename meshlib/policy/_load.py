"""Reading resources from YAML files, folders and parsed documents.

Every problem becomes an :class:`~meshlib.Issue` that names the file, the document
index, the resource and the field path; the loader collects all of them before
raising, so one run of ``meshlib validate`` shows every mistake, not the first.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .._exceptions import Issue
from ._base import unenforced_fields
from ._kinds import IGNORED_KINDS, KINDS
from ._resource import Resource
from ._values import yaml_type

__all__ = ["Loaded", "Origin", "expand_paths", "parse_documents", "read_documents", "read_text"]

_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a resource came from: a file (or ``<resources>``) and its document index."""

    file: str
    document: int

    def issue(self, message: str, resource: str = "", field: str = "", severity: str = "error") -> Issue:
        return Issue(message, self.file, self.document, resource, field, severity)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a load produced: the resources with their origins, and every issue found."""

    resources: tuple[tuple[Resource, Origin], ...]
    issues: tuple[Issue, ...]

    @property
    def errors(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")

    @property
    def warnings(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "warning")


_MAX_DEPTH = 100
"""How deep YAML collections may nest; Istio resources need about 15 levels, and PyYAML's
composer recurses per level, so a deeper document would end in a RecursionError."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last),
    absurd nesting and integers Python will not read."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"the document nests deeper than {_MAX_DEPTH} levels", self.get_mark()
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    # Only the keys written in this mapping: a key pulled in by a merge (``<<: *base``)
    # is meant to be overridden by one written here, as YAML's merge rules say.
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found an unhashable key", key_node.start_mark
            ) from None
        if duplicate:
            first = seen[key].start_mark
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {_show(key, quote=True)} (first at line {first.line + 1});"
                " YAML would keep only the last",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


def _checked_scalar(tag: str, what: str) -> Any:
    """PyYAML's constructor for ``tag``, with its crashes on bad text turned into YAML errors.

    PyYAML converts scalars with ``int()``, ``float()``, a dict lookup or a regex match
    and lets what they raise escape: ``!!float`` alone is an IndexError, ``!!bool x`` a
    KeyError, ``2024-13-01`` (read as a date) a ValueError, a decimal integer of more
    than 4300 digits (Python's limit, CVE-2020-10735) a ValueError.
    """
    construct = yaml.SafeLoader.yaml_constructors[tag]

    def checked(loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            text = str(node.value)
            if isinstance(exc, ValueError) and "integer string conversion" in str(exc):
                problem = f"an integer of {sum(c.isdigit() for c in text)} digits is too large to read"
            else:
                shown = text if len(text) <= 40 else text[:40] + "..."
                problem = f"{shown!r} is not a valid {what}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

    return checked


for _tag, _what in (("int", "integer"), ("float", "number"), ("bool", "boolean"), ("timestamp", "date or time")):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _checked_scalar(f"tag:yaml.org,2002:{_tag}", _what))
_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[Issue]]:
    """Files as given, folders walked recursively in sorted order for their YAML/JSON files."""
    files: list[Path] = []
    issues: list[Issue] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
            if not found:
                issues.append(Issue("folder holds no .yaml, .yml or .json file", str(path), severity="warning"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            issues.append(Issue("no such file or folder", str(path)))
    return files, issues


def read_documents(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[tuple[Any, Origin]], list[Issue]]:
    """Parse every YAML document of every file; syntax errors become issues with a line number."""
    files, issues = expand_paths(paths)
    docs: list[tuple[Any, Origin]] = []
    for path in files:
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(Issue(f"cannot read file: {exc}", name))
            continue
        more, problems = read_text(text, name)
        docs.extend(more)
        issues.extend(problems)
    return docs, issues


def read_text(text: str, name: str) -> tuple[list[tuple[Any, Origin]], list[Issue]]:
    """Parse every YAML (or JSON) document of one text, as a file's would be; ``name`` says where it came from."""
    docs: list[tuple[Any, Origin]] = []
    index = 0
    try:
        for index, doc in enumerate(yaml.load_all(text, Loader=_StrictLoader)):
            docs.append((doc, Origin(name, index)))
    except yaml.YAMLError as exc:
        return docs, [Issue(f"YAML does not parse: {_yaml_message(exc)}", name, index)]
    return docs, []


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    text = str(problem)
    if mark is not None:
        text += f" (line {mark.line + 1}, column {mark.column + 1})"
    if context and context_mark is not None:
        text += f", {context} started at line {context_mark.line + 1}"
    return text


def parse_documents(docs: Sequence[tuple[Any, Origin]]) -> Loaded:
    """Turn parsed documents into resources; nothing is skipped without an issue saying so."""
    resources: list[tuple[Resource, Origin]] = []
    issues: list[Issue] = []
    for doc, origin in _flatten_lists(docs, issues):
        if doc is None:
            continue  # an empty document (a trailing ``---``) holds nothing to lose
        if isinstance(doc, Resource):
            resources.append((doc, origin))
            issues.extend(_unenforced(doc, origin))
            continue
        if not isinstance(doc, Mapping):
            issues.append(origin.issue(f"a document must be a mapping with apiVersion and kind, not {yaml_type(doc)}"))
            continue
        resource = _parse_one(doc, origin, issues)
        if resource is not None:
            resources.append((resource, origin))
            issues.extend(_unenforced(resource, origin))
    return Loaded(tuple(resources), tuple(issues))


def _flatten_lists(docs: Sequence[tuple[Any, Origin]], issues: list[Issue]) -> Iterator[tuple[Any, Origin]]:
    # ``kubectl get -o yaml`` writes ``kind: List`` with the resources under ``items``.
    for doc, origin in docs:
        if isinstance(doc, Mapping) and doc.get("kind") == "List" and "items" in doc:
            items = doc.get("items")
            if not isinstance(items, list):
                issues.append(origin.issue("a List's items must be a list", field="items"))
                continue
            for item in items:
                yield item, origin
        else:
            yield doc, origin


def _show(value: Any, *, quote: bool = False, limit: int = 80) -> str:
    """A value for a message: never raises (a huge int has no ``str``), never kilobytes long."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, str):
        text = repr(value[: limit + 1]) if quote else value[: limit + 1]
    elif value is None or isinstance(value, (int, float, bytes, datetime.date, datetime.time)):
        text = repr(value[: limit + 1] if isinstance(value, bytes) else value)
    else:
        # Not str() of a collection: YAML aliases can make one whose text is exponential in size.
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _ref(doc: Mapping[str, Any]) -> str:
    kind = doc.get("kind") or "?"
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = meta.get("namespace") or "default"
    return f"{_show(kind)}/{_show(namespace)}/{_show(meta.get('name') or '?')}"


# Kubernetes and Istio numbers are protobuf int64/uint64 (most are int32/uint32).
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _oversized_ints(doc: Any) -> Iterator[tuple[str, int]]:
    """``(field path, value)`` of every integer no Kubernetes field can hold, keys included.

    Iterative, and each container is visited once, so YAML aliases (shared or even
    cyclic structures) cost no more than the text that wrote them.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT_MIN <= value <= _INT_MAX:
                yield path, value
        elif isinstance(value, (Mapping, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, Mapping):
                for key, item in value.items():
                    if isinstance(key, int) and not isinstance(key, bool) and not _INT_MIN <= key <= _INT_MAX:
                        yield path, key
                        continue
                    stack.append((item, f"{path}.{_show(key)}" if path else _show(key)))
            else:
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _parse_one(doc: Mapping[str, Any], origin: Origin, issues: list[Issue]) -> Resource | None:
    kind = doc.get("kind")
    api_version = doc.get("apiVersion")
    ref = _ref(doc)
    if not isinstance(kind, str) or not kind:
        issues.append(origin.issue("missing kind", ref, "kind"))
        return None
    if not isinstance(api_version, str) or not api_version:
        issues.append(origin.issue("missing apiVersion", ref, "apiVersion"))
        return None
    group, _, version = api_version.rpartition("/")
    cls = KINDS.get(kind)
    if cls is None:
        if kind in IGNORED_KINDS:
            issues.append(
                origin.issue(
                    f"kind {kind} is valid Istio but meshlib ignores it: {IGNORED_KINDS[kind]}", ref, "kind", "warning"
                )
            )
        elif "istio.io" not in group and "meshlib.io" not in group:
            issues.append(
                origin.issue(
                    f"{api_version} {kind} is not a mesh policy kind; meshlib ignores it", ref, "kind", "warning"
                )
            )
        else:
            issues.append(origin.issue(f"unknown kind {kind!r}; meshlib reads {', '.join(sorted(KINDS))}", ref, "kind"))
        return None
    if group != cls.GROUP or version not in cls.VERSIONS:
        accepted = ", ".join(f"{cls.GROUP}/{v}" for v in cls.VERSIONS)
        issues.append(origin.issue(f"{kind} takes apiVersion {accepted}, not {api_version!r}", ref, "apiVersion"))
        return None
    oversized = list(_oversized_ints(doc))
    for path, value in reversed(oversized):
        issues.append(
            origin.issue(f"{_show(value)} is out of range: Kubernetes and Istio numbers are 64-bit", ref, path)
        )
    if oversized:
        return None
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            issues.append(origin.issue(_error_message(err), ref, _loc_path(err["loc"])))
        return None


def _error_message(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; meshlib refuses fields it does not know rather than ignore them)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif (
        "input" in err
        and err["type"] not in ("value_error", "assertion_error")
        and not isinstance(err["input"], (dict, list))
    ):
        msg = f"{msg} (got {_show(err['input'], quote=True)})"
    return msg


def _loc_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.startswith(("function-", "json-or-python", "lax-or-strict")):
            continue  # pydantic's internal step names (union members, validators), not fields
        else:
            out += f".{part}" if out else part
    return out


def _unenforced(resource: Resource, origin: Origin) -> Iterator[Issue]:
    for path, why in unenforced_fields(resource.spec, "spec"):
        yield origin.issue(f"accepted but not enforced by meshlib: {why}", resource.ref, path, "warning")
