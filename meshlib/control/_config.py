"""The mesh's configuration as the control plane keeps it: numbered versions, checked changes, history.

A change (apply, delete, rollback) is computed on the current set of resources, checked
as one mesh with the same rules as ``meshlib validate --mesh``, and written with a
compare-and-put, so two replicas changing the mesh at once never lose one another's
change: the loser recomputes on the winner's version.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._exceptions import Issue, PolicyError
from ..policy import Loaded, Origin, Resource, Snapshot, parse_documents, read_text
from ._store import Store

__all__ = [
    "CONFIG_KEY",
    "HISTORY_KEEP",
    "Change",
    "ConfigState",
    "Configuration",
    "apply_resources",
    "delete_resources",
    "parse_body",
    "replace_resources",
]

CONFIG_KEY = "config"
HISTORY_PREFIX = "history/"
HISTORY_KEEP = 200
_CAS_ATTEMPTS = 8


@dataclass(frozen=True)
class Change:
    """One line of a version's history: what happened to one resource."""

    op: str  # "created", "updated", "deleted"
    ref: str


@dataclass(frozen=True)
class ConfigState:
    """One numbered version of the mesh's resources, checked."""

    version: int
    snapshot: Snapshot
    documents: tuple[dict[str, Any], ...]

    @classmethod
    def empty(cls) -> ConfigState:
        return cls(0, Snapshot.empty(), ())

    @classmethod
    def from_stored(cls, value: Mapping[str, Any]) -> ConfigState:
        docs = tuple(value.get("resources") or ())
        return cls(int(value.get("version", 0)), Snapshot.from_resources(docs), docs)


def parse_body(text: str, source: str) -> list[Resource]:
    """Resources from a request body or a file's text (YAML or JSON, one or many); PolicyError lists every issue."""
    docs, issues = read_text(text, source)
    if len(docs) == 1 and isinstance(docs[0][0], list):  # a JSON array of documents
        docs = [(doc, Origin(source, i)) for i, doc in enumerate(docs[0][0])]
    loaded = parse_documents(docs)
    errors = [i for i in (*issues, *loaded.issues) if i.severity == "error"]
    if errors:
        raise PolicyError(errors)
    if not loaded.resources:
        raise PolicyError([Issue("the change holds no resource", source)])
    return [r for r, _ in loaded.resources]


def _history_key(version: int) -> str:
    return f"{HISTORY_PREFIX}{version:010d}"


class Configuration:
    """Reads and changes the configuration in a store; the caller keeps the state it last saw."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self) -> tuple[ConfigState, int]:
        """The stored configuration and its store revision (an empty mesh at version 0 when none is)."""
        entry = await self.store.get(CONFIG_KEY)
        if entry is None:
            return ConfigState.empty(), 0
        return ConfigState.from_stored(entry.value), entry.revision

    async def change(
        self, mutate: Callable[[dict[str, Resource]], list[Change]], *, who: str, action: str
    ) -> tuple[ConfigState, list[Change]]:
        """Apply ``mutate`` to the current resources, check the result, store it as the next version.

        ``mutate`` edits the ``ref -> resource`` map in place and says what it changed; no
        change means no new version. A refused result raises PolicyError and stores nothing.
        """
        for _ in range(_CAS_ATTEMPTS):
            state, revision = await self.load()
            resources = {r.ref: r for r in state.snapshot.resources}
            changes = mutate(resources)
            if not changes:
                return state, []
            items = [(r, Origin("", i)) for i, r in enumerate(resources.values())]
            snapshot = Snapshot.build(Loaded(tuple(items), ()))
            docs = tuple(r.to_document() for r in snapshot.resources)
            new = ConfigState(state.version + 1, snapshot, docs)
            stored = {"version": new.version, "resources": list(docs)}
            if await self.store.compare_and_put(CONFIG_KEY, stored, revision):
                await self._record(new, changes, who=who, action=action)
                return new, changes
        raise PolicyError("the configuration kept changing under this change (8 tries); apply it again")

    async def _record(self, state: ConfigState, changes: Sequence[Change], *, who: str, action: str) -> None:
        await self.store.put(
            _history_key(state.version),
            {
                "version": state.version,
                "at": time.time(),
                "who": who,
                "action": action,
                "changes": [{"op": c.op, "ref": c.ref} for c in changes],
                "resources": list(state.documents),
            },
        )
        old = state.version - HISTORY_KEEP
        if old > 0:
            await self.store.delete(_history_key(old))

    async def history(self, *, with_resources: bool = False) -> list[dict[str, Any]]:
        """Every kept version, newest first: who changed what, when."""
        entries = await self.store.range(HISTORY_PREFIX)
        out = []
        for entry in reversed(entries):
            item = dict(entry.value)
            if not with_resources:
                item.pop("resources", None)
            out.append(item)
        return out

    async def at_version(self, version: int) -> list[dict[str, Any]] | None:
        entry = await self.store.get(_history_key(version))
        return None if entry is None else list(entry.value.get("resources") or ())


def apply_resources(new: Iterable[Resource]) -> Callable[[dict[str, Resource]], list[Change]]:
    """A mutation putting ``new`` in place (created or updated); unchanged resources are no change."""
    wanted = list(new)

    def mutate(resources: dict[str, Resource]) -> list[Change]:
        changes = []
        for r in wanted:
            old = resources.get(r.ref)
            if old is not None and old.to_document() == r.to_document():
                continue
            changes.append(Change("updated" if old is not None else "created", r.ref))
            resources[r.ref] = r
        return changes

    return mutate


def delete_resources(refs: Iterable[str]) -> Callable[[dict[str, Resource]], list[Change]]:
    wanted = list(refs)

    def mutate(resources: dict[str, Resource]) -> list[Change]:
        missing = [ref for ref in wanted if ref not in resources]
        if missing:
            raise KeyError(", ".join(missing))
        for ref in wanted:
            del resources[ref]
        return [Change("deleted", ref) for ref in wanted]

    return mutate


def replace_resources(new: Iterable[Resource]) -> Callable[[dict[str, Resource]], list[Change]]:
    """A mutation making the set exactly ``new`` (a rollback)."""
    wanted = {r.ref: r for r in new}

    def mutate(resources: dict[str, Resource]) -> list[Change]:
        changes = [Change("deleted", ref) for ref in sorted(resources.keys() - wanted.keys())]
        for ref, r in sorted(wanted.items()):
            old = resources.get(ref)
            if old is None:
                changes.append(Change("created", ref))
            elif old.to_document() != r.to_document():
                changes.append(Change("updated", ref))
        resources.clear()
        resources.update(wanted)
        return changes

    return mutate
