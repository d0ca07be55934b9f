"""Value types shared by the resources: durations, percentages, string matches, selectors.

They parse what Istio's YAML accepts and nothing else, so a typo fails at load time
with the field named, never at request time.
"""

from __future__ import annotations

import datetime
import math
import re
import warnings
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer, model_validator

from ._base import MeshModel

__all__ = [
    "Duration",
    "LabelSelector",
    "Percent",
    "StringMatch",
    "format_duration",
    "parse_duration",
    "yaml_type",
]

MAX_DURATION = 315_576_000_000.0
"""The largest protobuf ``Duration`` (Istio's duration type): 10000 years, in seconds."""

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# [0-9], not \d: \d and float() also take other scripts' digits ("٣s").
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(h|ms|m|s|us|µs|ns)")


def yaml_type(value: Any) -> str:
    """What a value is, in the words of the YAML that wrote it: ``null``, ``a list``, ``a mapping``..."""
    if value is None:
        return "null"
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (bytes, "binary data"),
        ((list, tuple), "a list"),
        ((dict, set), "a mapping"),
        ((datetime.date, datetime.time), "a date"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def parse_duration(value: Any) -> float:
    """Parse an Istio/Go duration (``1.5s``, ``250ms``, ``1h30m``) into seconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"a duration needs a unit: write {value!r} as '{value}s' (or 'ms', 'm', 'h')")
        raise ValueError(f"a duration is a string like '1.5s' or '250ms', not {yaml_type(value)}")
    text = value.strip()
    if not text:
        raise ValueError("a duration cannot be empty")
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {value!r}: use a number and a unit, like '1.5s', '250ms' or '1h30m'")
    if not math.isfinite(total) or total > MAX_DURATION:
        # Beyond this, arithmetic on it overflows (``round(inf)``) and timers refuse it.
        raise ValueError(f"invalid duration {_clip(value)!r}: too large (at most {MAX_DURATION:.0f}s, 10000 years)")
    return total


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def format_duration(seconds: float) -> str:
    """Format seconds back into the shortest exact Istio duration string."""
    if seconds and seconds < 1 and round(seconds * 1000, 6) == int(round(seconds * 1000, 6)):
        return f"{round(seconds * 1000)}ms"
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
"""A duration in seconds, written in YAML as ``1.5s``/``250ms``/``1h``."""


class Percent(MeshModel):
    """Istio's ``Percent``: ``{value: 0..100}`` as a double."""

    value: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False)

    @property
    def fraction(self) -> float:
        return self.value / 100.0


_RE2_UNSUPPORTED = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\(\?P=")
_POSIX_CLASS = re.compile(r"\[:\^?[a-z]+:\]")


class StringMatch(MeshModel):
    """Istio's ``StringMatch``: exactly one of exact, prefix or regex (RE2, full match).

    An empty match (``{}``) means "present, any value", which is how Istio's header
    matches test presence.
    """

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StringMatch:
        set_kinds = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(set_kinds) > 1:
            raise ValueError(f"a string match takes one of exact, prefix or regex, not {' and '.join(set_kinds)}")
        if self.regex is not None:
            if _RE2_UNSUPPORTED.search(self.regex):
                raise ValueError(
                    f"regex {self.regex!r} uses lookaround or backreferences, which RE2 (Istio's regex engine) refuses"
                )
            if _POSIX_CLASS.search(self.regex):
                raise ValueError(
                    f"regex {self.regex!r} uses a POSIX class like [[:alpha:]], which Python's re reads as a plain"
                    " set of characters: write the characters out, like [a-zA-Z]"
                )
            try:
                with warnings.catch_warnings():
                    # "Possible nested set" and the like: a note about future Python, not an error,
                    # and it must not become one under ``-W error``.
                    warnings.simplefilter("ignore", FutureWarning)
                    re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.regex!r}: {exc}") from None
            except OverflowError:
                # Python's re refuses counts above 2**32-2 with OverflowError, not re.error.
                raise ValueError(
                    f"invalid regex {self.regex!r}: a repetition count is too large (RE2 allows at most 1000)"
                ) from None
            except RecursionError:
                # Python's regex parser recurses once per nested group.
                raise ValueError(f"invalid regex {self.regex!r}: groups nest too deeply") from None
        return self

    @property
    def is_presence(self) -> bool:
        return self.exact is None and self.prefix is None and self.regex is None

    def matches(self, value: str | None, *, ignore_case: bool = False) -> bool:
        """Whether ``value`` (``None`` = absent) satisfies this match."""
        if value is None:
            return False
        if self.exact is not None:
            return value.lower() == self.exact.lower() if ignore_case else value == self.exact
        if self.prefix is not None:
            return value.lower().startswith(self.prefix.lower()) if ignore_case else value.startswith(self.prefix)
        if self.regex is not None:
            flags = re.IGNORECASE if ignore_case else 0
            return re.fullmatch(self.regex, value, flags) is not None
        return True


_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z")


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Kubernetes label rules: a typo'd key would silently select nothing."""
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise ValueError(f"invalid label key {key!r}")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            raise ValueError(f"invalid value {value!r} for label {key!r}")
    return labels


Labels = Annotated[dict[str, str], BeforeValidator(lambda v: v if v is not None else {})]


class LabelSelector(MeshModel):
    """``selector: {matchLabels: {...}}``: every label must be equal."""

    match_labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _labels(self) -> LabelSelector:
        check_labels(self.match_labels)
        return self

    def matches(self, labels: dict[str, str] | Any) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())
