"""The base every policy model shares: frozen, strict about unknown fields, camelCase.

Istio's YAML uses camelCase field names; the Python attributes are snake_case.
Unknown fields are errors (a typo must never be silently ignored). Fields that
meshlib accepts because they are valid Istio but does not enforce are declared with
:func:`unenforced`, and :func:`unenforced_fields` finds the ones a resource sets so
that ``meshlib validate`` can name them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = ["ENFORCED_VALUES_KEY", "MeshModel", "UNENFORCED_KEY", "unenforced", "unenforced_fields"]

UNENFORCED_KEY = "x-meshlib-unenforced"
ENFORCED_VALUES_KEY = "x-meshlib-enforced-values"
"""On a partly enforced field: the values meshlib does act on (any other is unenforced)."""


class MeshModel(BaseModel):
    """Base of every resource model."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        str_strip_whitespace=False,
        validate_default=False,
    )


def unenforced(why: str, default: Any = None, *, enforced: tuple[Any, ...] = (), **kwargs: Any) -> Any:
    """A field accepted as valid Istio that meshlib does not act on.

    ``why`` ends up in the warning, so say what the user should know
    ("meshlib has no ingress gateways"). ``enforced`` lists the values meshlib does
    act on for a partly enforced field: only other values are warned about.
    """
    extra: dict[str, Any] = {UNENFORCED_KEY: why}
    if enforced:
        extra[ENFORCED_VALUES_KEY] = list(enforced)
    return Field(default=default, json_schema_extra=extra, **kwargs)


def _enforced(model: type[BaseModel], name: str) -> list[Any]:
    extra = model.model_fields[name].json_schema_extra
    values = extra.get(ENFORCED_VALUES_KEY) if isinstance(extra, dict) else None
    return list(values) if isinstance(values, list) else []


def _why(model: type[BaseModel], name: str) -> str | None:
    extra = model.model_fields[name].json_schema_extra
    if isinstance(extra, dict):
        why = extra.get(UNENFORCED_KEY)
        return str(why) if why is not None else None
    return None


def _alias(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    return info.alias or name


def unenforced_fields(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield ``(field path, why)`` for every unenforced field set anywhere in ``value``."""
    if isinstance(value, BaseModel):
        cls = type(value)
        for name in value.model_fields_set:
            if name not in cls.model_fields:
                continue
            sub = getattr(value, name)
            field_path = f"{path}.{_alias(cls, name)}" if path else _alias(cls, name)
            why = _why(cls, name)
            if why is not None:
                if sub is not None and sub != [] and sub != {} and sub not in _enforced(cls, name):
                    yield field_path, why
                continue
            yield from unenforced_fields(sub, field_path)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from unenforced_fields(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from unenforced_fields(item, f"{path}.{key}")
