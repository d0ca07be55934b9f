"""Istio's path normalisation for inbound requests ("Authorization Policy Normalization").

The normalised path is what AuthorizationPolicy ``paths`` see *and* what the app
receives, so a policy and the app can never disagree about which resource a
request names (``/public/../admin`` is ``/admin`` for both). Modes, as Istio's
``meshConfig.pathNormalization.normalization``:

- ``NONE``: the path as received (still refused if it holds ``%00`` or bytes no
  request line may carry);
- ``BASE`` (Istio's default): Envoy's ``normalize_path``, i.e. Chromium's URL path
  canonicaliser: ``\\`` becomes ``/``; ``%2d %2e %30-%39 %41-%5a %5f %61-%7a %7e``
  (any hex case) are decoded once; ``.`` and ``..`` segments are removed as RFC 3986
  says (never above the root); ``" # < > ` ^ { | }`` are percent-encoded; any other
  escape is kept exactly as sent (``%2f`` stays ``%2f``);
- ``MERGE_SLASHES``: BASE, then runs of ``/`` become one (after the dot segments,
  as Envoy does: ``/a//../b`` is ``/a/b``);
- ``DECODE_AND_MERGE_SLASHES``: ``%2F`` and ``%5C`` are decoded first (to ``/`` and
  ``\\``, so both end up as ``/``), then MERGE_SLASHES.

The query never takes part: :func:`split_path_query` cuts it first and the
caller forwards it unchanged.

Differences from Envoy, each stricter and on purpose: a ``%`` not followed by two
hex digits is refused (Chromium passes it through, and apps then decode it in
different ways); raw control characters, spaces and non-ASCII characters are
refused in every mode (Envoy's HTTP parsers refuse them before normalising; a
client must percent-encode them); a path made only of slashes merges to ``/``
(Envoy's merge leaves ``//`` as it is).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from .._exceptions import MeshError
from ..policy._meshkinds import MeshConfigSpec

__all__ = [
    "NORMALIZATION_MODES",
    "BadPathError",
    "NormalizationMode",
    "check_method",
    "normalization_mode",
    "normalize_path",
    "split_path_query",
]

NormalizationMode = Literal["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]
NORMALIZATION_MODES: tuple[NormalizationMode, ...] = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
_MODES: dict[str, NormalizationMode] = {m: m for m in NORMALIZATION_MODES} | {"DEFAULT": "BASE"}


class BadPathError(MeshError, ValueError):
    """A request path Istio's proxy would refuse with 400 (``%00``, a broken escape, raw bytes)."""


# Already canonical: only characters Chromium copies as they are, no escape, no dot segment, no backslash.
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]/]*")
# A raw character no request line carries, an escape of NUL, or a '%' that starts no escape.
_BAD = re.compile(r"[^\x21-\x7e]|%00|%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASH_ESCAPE = re.compile(r"%(?:2[Ff]|5[Cc])")
_TO_ESCAPE = re.compile(r"[\"#<>`^{|}]")
_SLASHES = re.compile(r"//+")
# Chromium's UNESCAPE set, plus '.', which it decodes through its dot handling.
_DECODED = frozenset(b"-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")


def split_path_query(target: str) -> tuple[str, str]:
    """``/a/b?x=1`` → (``/a/b``, ``x=1``): policies match the path only; the query is forwarded as is."""
    path, _, query = target.partition("?")
    return path, query


def normalization_mode(config: MeshConfigSpec) -> NormalizationMode:
    """The mode a MeshConfig asks for: ``pathNormalization.normalization``, BASE when unset or DEFAULT."""
    setting = config.path_normalization
    return "BASE" if setting is None else _MODES[setting.normalization]


def check_method(method: str) -> bool:
    """Whether Istio lets the method through: an HTTP token without lower-case letters (else 400)."""
    return _METHOD.fullmatch(method) is not None


def normalize_path(raw_path: str | bytes, mode: str = "BASE") -> str:
    """The path policies match and the app receives, without the query; BadPathError for a 400.

    ``raw_path`` is the request target's path as sent (``raw_path`` of an ASGI scope
    as bytes, or text); anything from ``?`` on is dropped.
    """
    try:
        resolved = _MODES[mode]
    except KeyError:
        raise ValueError(f"unknown path normalization {mode!r}: use one of {', '.join(_MODES)}") from None
    text = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else raw_path
    return _normalize(text.partition("?")[0], resolved)


@lru_cache(maxsize=4096)
def _normalize(path: str, mode: NormalizationMode) -> str:
    if mode != "NONE" and _PLAIN.fullmatch(path) and "/." not in path:
        return _SLASHES.sub("/", path) if mode != "BASE" and "//" in path else path
    bad = _BAD.search(path)
    if bad is not None:
        raise BadPathError(f"invalid request path: {_why(bad.group())}")
    if mode == "NONE":
        return path
    if mode == "DECODE_AND_MERGE_SLASHES":
        path = _SLASH_ESCAPE.sub(lambda m: "/" if m.group()[1] == "2" else "\\", path)
    path = _canonical(path)
    return _SLASHES.sub("/", path) if mode != "BASE" else path


def _canonical(path: str) -> str:
    """Envoy's ``normalize_path`` (Chromium's ``CanonicalizePath``) on an already checked path."""
    path = path.replace("\\", "/")
    if "%" in path:
        path = _ESCAPE.sub(_decode, path)
    path = _TO_ESCAPE.sub(lambda m: f"%{ord(m.group()):02X}", path)
    if not path.startswith("/"):
        path = "/" + path
    if "/." not in path:
        return path
    segments = path[1:].split("/")
    last = len(segments) - 1
    kept: list[str] = []
    for i, segment in enumerate(segments):
        if segment == ".":
            pass
        elif segment == "..":
            if kept:
                kept.pop()
        else:
            kept.append(segment)
            continue
        if i == last:  # "/a/." and "/a/b/.." keep their trailing slash, as in RFC 3986
            kept.append("")
    return "/" + "/".join(kept)


def _decode(match: re.Match[str]) -> str:
    value = int(match.group(1), 16)
    return chr(value) if value in _DECODED else match.group()


def _why(found: str) -> str:
    if found == "%00":
        return "an encoded NUL (%00)"
    if found.startswith("%"):
        return "a '%' that does not start a %XX escape"
    return f"the raw character {found!r}: percent-encode it"
