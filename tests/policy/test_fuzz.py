"""Fuzzing the loader: whatever it is given, the only exception out is ``PolicyError``.

Three entry points are fed bad input: ``Snapshot.from_resources`` (parsed
documents), ``Snapshot.from_files`` (YAML text: random bytes, random text, dumped
random structures and hand-made nasty YAML) and ``validate_paths`` (which never
raises at all). The documents are fully random JSON-like values, or mutations of
valid configurations (the Istio corpus plus documents of our own), which reach far
deeper into the validators; the "field" mutation puts an edge case of the field's
own kind (a duration, a regex, an int...) where it hurts most. One test also walks
every typed field of every valid set systematically.

Beyond "no other exception": a snapshot that loads answers its lookups, every issue
is explained in meshlib's words (no "invalid literal for int()" passed through),
and nasty YAML (aliases, "billion laughs") loads in milliseconds.

Profiles: ``ci`` (the default: Hypothesis' CI settings, derandomized, with small
per-test budgets so the file runs in seconds) and ``soak`` (10,000 random examples
per test, a few minutes). Pick one with ``HYPOTHESIS_PROFILE=soak``.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from meshlib import Issue, PolicyError
from meshlib.policy import (
    IGNORED_KINDS,
    KINDS,
    AuthorizationPolicy,
    MeshModel,
    PeerAuthentication,
    RateLimitPolicy,
    Snapshot,
    Workload,
    validate_paths,
)

# ------------------------------------------------------------------------ profiles

settings.register_profile("ci", settings.get_profile("ci"), deadline=None)
settings.register_profile("soak", max_examples=10_000, deadline=None, database=None)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def budget(ci_examples: int) -> settings:
    """``ci_examples`` under the ci profile (keeps the file fast); the profile's own budget otherwise."""
    base = settings.get_profile(PROFILE)
    if PROFILE == "ci":
        return settings(base, max_examples=ci_examples)
    return base


# ------------------------------------------------------------------------ the vocabulary

from _corpus import CORPUS  # noqa: E402


def _models() -> Iterator[type[BaseModel]]:
    stack: list[type[BaseModel]] = [MeshModel]
    seen: set[type[BaseModel]] = set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        stack.extend(cls.__subclasses__())


def _literals(annotation: Any) -> Iterator[str]:
    if typing.get_origin(annotation) is typing.Literal:
        yield from (a for a in typing.get_args(annotation) if isinstance(a, str))
    for arg in typing.get_args(annotation):
        yield from _literals(arg)


FIELD_NAMES = sorted(
    {info.alias or name for cls in _models() for name, info in cls.model_fields.items()}
    | {"apiVersion", "kind", "metadata", "spec", "items", "status", "value", "8090", "9080"}
)
ENUM_VALUES = sorted({v for cls in _models() for info in cls.model_fields.values() for v in _literals(info.annotation)})


def _kinds(cls: type[BaseModel], name: str) -> set[str]:
    """What a field holds, read off its annotation: duration, int, float, bool, enum, str, list of str, regex."""
    info = cls.model_fields[name]
    text = f"{info.annotation!r} {info.metadata!r}"
    kinds = {k for k, mark in (("duration", "parse_duration"), ("enum", "Literal[")) if mark in text}
    if not kinds:
        kinds = {k for k in ("int", "float", "bool", "str") if re.search(rf"\b{k}\b", text)}
    if "list[str]" in text:
        kinds = {"list-of-str"}
    if name in ("regex", "match") and "str" in kinds:
        kinds.add("regex")
    return kinds


FIELD_KINDS: dict[str, set[str]] = {}
SIBLINGS: dict[str, set[str]] = {}
for _cls in _models():
    _aliases = {info.alias or name: name for name, info in _cls.model_fields.items()}
    for _alias, _name in _aliases.items():
        FIELD_KINDS.setdefault(_alias, set()).update(_kinds(_cls, _name))
        SIBLINGS.setdefault(_alias, set()).update(_aliases)

VALID_API_VERSIONS = sorted(f"{cls.GROUP}/{v}" for cls in KINDS.values() for v in cls.VERSIONS)
API_VERSIONS = [
    *VALID_API_VERSIONS,
    "v1",
    "apps/v1",
    "networking.istio.io",
    "networking.istio.io/v2",
    "security.istio.io/v1alpha1",
    "meshlib.io/v1",
    "telemetry.istio.io/v1",
    "/",
    "//",
    "",
]
KIND_NAMES = [*KINDS, *IGNORED_KINDS, "List", "Service", "Deployment", "virtualservice", "Virtual Service", ""]

# Strings the validators look at closely: hosts, names, durations, rates, regexes, IPs, keys.
INTERESTING_STRINGS = [
    *ENUM_VALUES,
    "",
    " ",
    "*",
    "*.local",
    "reviews",
    "reviews.default.svc.cluster.local",
    "v1",
    "default",
    "istio-system",
    "http",
    "1s",
    "250ms",
    "0s",
    "1h30m",
    "0.0001s",
    "1.5",
    "9" * 400 + "h",
    "9" * 306 + "s",
    "9" * 290 + "h",
    "315576000001s",
    "315576000000s",
    "10/second",
    "0/second",
    "10 per minute;100/hour",
    "1000000000000000000000000000/second",
    "5xx,connect-failure",
    "503",
    "²",
    "9" * 5000,
    "10.0.0.1",
    "10.0.0.0/8",
    "10.0.0.0/8\n",
    "fe80::1%eth0",
    "::1/129",
    "unix:///var/run/app.sock",
    "unix://",
    "redis://127.0.0.1:6379/0",
    "memcached://localhost:11211",
    "request.headers[x-token]",
    "request.auth.claims[iss]",
    "experimental.envoy.filters.a[b]",
    "destination.labels[app]",
    "cluster.local/ns/default/sa/reviews",
    "ns/sa",
    "/api/{*}/x/{**}",
    "/{**}/{**}",
    "a*b",
    "a{99999999999}",
    "a{4294967295}",
    "(?=x)",
    "(" * 300 + ")" * 300,
    "[" * 5,
    "\\",
    "x-meshlib-deadline",
    "X-Upper",
    "http://collector:4318",
    "GET",
    "true",
    "\x00",
    "\ud800",
    "é",
]

# Built lazily: Hypothesis reprs its strategies, and a 5000-digit int has no repr (Python's 4300-digit limit).
huge_ints = st.tuples(st.sampled_from([31, 32, 63, 64, 1400, 16700]), st.sampled_from([1, -1])).map(
    lambda t: t[1] * 2 ** t[0]
)


def pick(values: list[Any]) -> st.SearchStrategy[Any]:
    """``sampled_from`` without a repr of every value (some are kilobytes long)."""
    return st.integers(0, len(values) - 1).map(lambda i: values[i])


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-1, max_value=70000),
        huge_ints,
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300, 0.5, 100.0]),
        st.text(max_size=30),
        pick(INTERESTING_STRINGS),
    )


def keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=12), pick(INTERESTING_STRINGS))


# Edge cases per kind of field, the nastiest first (Hypothesis favours small indices).
DURATIONS = [
    "9" * 306 + "s", "315576000001s", "9" * 290 + "h", "87600000h", "315576000000s", "0.5ms", "1.0001s",
    "0s", "0ms", "1ms", "-1s", "1e3s", "1s1s", "1 s", "1S", "1", "s", "1.s", ".5s", "1µs", "1ns", "٣s",
]  # fmt: skip
REGEXES = [
    "a{99999999999}", "(" * 1200 + ")" * 1200, "[[:alpha:]]", "a{4294967295}", "(" * 400 + ")" * 400,
    "a{1001}", "[[]", "[a--b]", "(?=x)", "(?<!x)", "\\1", "(?P<n>a)(?P=n)", "(?P<n>a)", "\\p{L}",
    "\\", "a**", "(", ")", "[", "*", "(?i)abc", "\\Q.*\\E", "", "^/api/.*$", ".*",
]  # fmt: skip
INTS = [2**64, -(2**63) - 1, 2**64 - 1, 2**63, 2**63 - 1, 2**32, 2**32 - 1, 2**31, 2**31 - 1]
INTS += [-1, 0, 1, 100, 599, 600, 65535, 65536]
FLOATS = [math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324, 100.0000001, -1e-9, "50", "1%"]
BOOLS = ["true", "yes", "on", 1, 0, "", None, True, False]


def _pool(kind: str) -> st.SearchStrategy[Any]:
    if kind == "duration":
        return pick(DURATIONS)
    if kind == "regex":
        return pick(REGEXES)
    if kind == "int":
        return st.one_of(pick(INTS), huge_ints, st.integers(-5, 70000), st.sampled_from([1.5, True, "80", "0x10"]))
    if kind == "float":
        return pick(FLOATS)
    if kind == "bool":
        return pick(BOOLS)
    if kind == "enum":
        return st.one_of(st.sampled_from(ENUM_VALUES).map(lambda v: v.lower()), st.sampled_from(ENUM_VALUES))
    if kind == "list-of-str":
        return st.lists(pick(INTERESTING_STRINGS), max_size=3)
    return pick(INTERESTING_STRINGS)


def field_values(field: str) -> st.SearchStrategy[Any]:
    """A value meant to hurt this field: its kind's edge cases, or anything."""
    pools = [_pool(kind) for kind in sorted(FIELD_KINDS.get(field, ()))]
    return st.one_of(*pools, scalars()) if pools else scalars()


def _nested(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=5), st.dictionaries(keys(), children, max_size=6))


def json_values(max_leaves: int = 25) -> st.SearchStrategy[Any]:
    return st.recursive(scalars(), _nested, max_leaves=max_leaves)


def random_documents() -> st.SearchStrategy[Any]:
    """A resource envelope with random parts (and, sometimes, anything at all)."""
    metadata = st.one_of(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["reviews", "ratings", "default", "a"])},
            optional={
                "namespace": st.sampled_from(["default", "foo", "istio-system", "", "Bad_NS"]) | scalars(),
                "labels": json_values(6),
                "annotations": json_values(6),
            },
        ),
        json_values(8),
    )
    envelope = st.fixed_dictionaries(
        {},
        optional={
            "apiVersion": st.sampled_from(API_VERSIONS) | scalars(),
            "kind": st.sampled_from(KIND_NAMES) | scalars(),
            "metadata": metadata,
            "spec": json_values(),
            "status": json_values(4),
            "items": st.lists(json_values(8), max_size=3),
        },
    )
    return st.one_of(envelope, envelope, envelope, json_values())


# ------------------------------------------------------------------------ valid documents

OWN_DOCUMENTS: list[dict[str, Any]] = [
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "reviews", "namespace": "default", "labels": {"app": "reviews"}},
        "spec": {
            "hosts": ["reviews"],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": 9080, "name": "http", "protocol": "HTTP", "targetPort": 9080}],
            "endpoints": [
                {"address": "10.0.0.1", "labels": {"version": "v1"}, "ports": {"http": 9080}},
                {"address": "10.0.0.2", "labels": {"version": "v2"}, "serviceAccount": "reviews"},
                {"address": "unix:///var/run/reviews.sock", "labels": {"version": "v3"}},
            ],
        },
    },
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "external-api", "namespace": "default"},
        "spec": {
            "hosts": ["api.example.com"],
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}],
        },
    },
    {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": {
            "trustDomain": "cluster.local",
            "rootNamespace": "istio-system",
            "defaultTimeout": "15s",
            "defaultRetry": {
                "attempts": 2,
                "perTryTimeout": "2s",
                "retryOn": "connect-failure,503",
                "retriableStatusCodes": [503],
            },
            "retryBudget": {"percent": 20, "minRetryConcurrency": 3},
            "deadlinePropagation": {"enabled": True, "header": "x-meshlib-deadline"},
            "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
            "tracing": {"sampling": 1.0, "otlpEndpoint": "http://collector:4318", "propagators": ["tracecontext"]},
            "accessLog": {"enabled": True, "format": "JSON"},
            "certificates": {"ttl": "24h", "graceRatio": 0.5},
        },
    },
    {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "reviews-server", "namespace": "default"},
        "spec": {
            "side": "SERVER",
            "selector": {"matchLabels": {"app": "reviews"}},
            "strategy": "SLIDING_WINDOW_COUNTER",
            "limits": [
                {
                    "name": "per-caller",
                    "rate": "10/second;100/minute",
                    "key": "PRINCIPAL",
                    "match": {"paths": [{"prefix": "/api"}], "methods": ["GET"]},
                },
                {"name": "by-header", "rate": "5 per second", "key": "HEADER", "header": "x-user"},
            ],
        },
    },
    {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "reviews-client", "namespace": "default"},
        "spec": {
            "side": "CLIENT",
            "host": "reviews",
            "backend": {"type": "GLOBAL", "storage": "redis://127.0.0.1:6379/0", "failureMode": "CLOSED"},
            "strategy": "MOVING_WINDOW",
            "limits": [{"rate": "100/second"}],
        },
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}},
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "reviews"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {9080: {"mode": "STRICT"}, "9090": {"mode": "DISABLE"}},
        },
    },
]


# Most networking fields at once, so that mutations reach their validators.
RICH_NETWORKING: list[dict[str, Any]] = [
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "hosts": ["reviews"],
            "http": [
                {
                    "name": "canary",
                    "match": [
                        {
                            "uri": {"prefix": "/api"},
                            "method": {"exact": "GET"},
                            "headers": {"end-user": {"regex": "^j.*n$"}, "x-present": {}},
                            "withoutHeaders": {"x-skip": {"exact": "1"}},
                            "queryParams": {"debug": {"exact": "true"}},
                            "port": 9080,
                            "sourceLabels": {"app": "productpage"},
                            "ignoreUriCase": True,
                        }
                    ],
                    "route": [
                        {"destination": {"host": "reviews", "subset": "v1", "port": {"number": 9080}}, "weight": 90},
                        {
                            "destination": {"host": "reviews", "subset": "v2"},
                            "weight": 10,
                            "headers": {"request": {"set": {"x-canary": "1"}, "remove": ["x-debug"]}},
                        },
                    ],
                    "timeout": "10s",
                    "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,503,reset", "backoff": "25ms"},
                    "fault": {
                        "delay": {"fixedDelay": "100ms", "percentage": {"value": 0.5}},
                        "abort": {"httpStatus": 503, "percent": 1},
                    },
                    "rewrite": {"uriRegexRewrite": {"match": "^/api/(.*)", "rewrite": "/\\1"}},
                    "mirror": {"host": "reviews", "subset": "v1"},
                    "mirrorPercentage": {"value": 5.0},
                    "headers": {"response": {"add": {"x-served-by": "mesh"}}},
                },
                {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "redirectCode": 308}},
                {"match": [{"uri": {"exact": "/down"}}], "directResponse": {"status": 503, "body": {"string": "x"}}},
                {"route": [{"destination": {"host": "reviews"}}], "mirrors": [{"destination": {"host": "ratings"}}]},
            ],
        },
    },
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "host": "reviews",
            "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "60s"}, "maglev": {}}},
                "connectionPool": {
                    "tcp": {"maxConnections": 100, "connectTimeout": "30ms"},
                    "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 100, "maxRetries": 3},
                },
                "outlierDetection": {
                    "consecutive5xxErrors": 5,
                    "consecutiveGatewayErrors": 3,
                    "interval": "10s",
                    "baseEjectionTime": "30s",
                    "maxEjectionPercent": 50,
                },
                "tls": {"mode": "ISTIO_MUTUAL", "sni": "reviews.default.svc.cluster.local"},
                "retryBudget": {"percent": {"value": 25}, "minRetryConcurrency": 2},
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                },
            ],
        },
    },
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {
            "hosts": ["reviews"],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
            "endpoints": [
                {"address": "10.0.0.1", "labels": {"version": "v1"}},
                {"address": "10.0.0.2", "labels": {"version": "v2"}},
            ],
        },
    },
]


def _corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.yaml")) if CORPUS.is_dir() else []


def _read_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _valid_sets() -> list[list[dict[str, Any]]]:
    """Configurations that load: each corpus file with the rule that defines its subsets, plus our own."""
    files = _corpus_files()
    rules = [d for p in files if p.name == "destination-rule-all.yaml" for d in _read_yaml(p)]
    sets = [OWN_DOCUMENTS, RICH_NETWORKING]
    for path in files:
        docs = _read_yaml(path)
        if path.name.startswith(("virtual-service", "fault-injection")):
            own = {(d.get("kind"), d.get("metadata", {}).get("name")) for d in docs}
            docs = docs + [d for d in rules if (d.get("kind"), d.get("metadata", {}).get("name")) not in own]
        sets.append(docs)
    return sets


VALID_SETS = _valid_sets()
# A pool of real sub-values to splice elsewhere: a real value in the wrong place finds more than noise.
SPLICE_POOL: list[Any] = []


def _walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


for _set in VALID_SETS:
    for _doc in _set:
        SPLICE_POOL.extend(_walk(_doc.get("spec")))


# ------------------------------------------------------------------------ mutations

Slot = tuple[Any, Any]  # (container, key or index)


def _slots(value: Any) -> Iterator[Slot]:
    if isinstance(value, dict):
        for k, item in value.items():
            yield value, k
            yield from _slots(item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield value, i
            yield from _slots(item)


def _fields(value: Any, field: str = "") -> Iterator[tuple[Any, Any, str]]:
    """``(container, key, field name)``: a list item's field is the list's."""
    if isinstance(value, dict):
        for k, item in value.items():
            yield value, k, str(k)
            yield from _fields(item, str(k))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield value, i, field
            yield from _fields(item, field)


def _containers(value: Any) -> Iterator[Any]:
    if isinstance(value, (dict, list)):
        yield value
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            yield from _containers(item)


def _change_type(value: Any) -> Any:
    """Same content, another type: what a hand-written YAML mistake looks like."""
    if isinstance(value, bool):
        return "yes" if value else "off"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**4000 else hex(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value[0] if value else {}
    if isinstance(value, dict):
        return None
    return {}


# "field" (an edge case that fits the field) comes up most: it is what reaches the validators' corners.
MUTATIONS = ("field",) * 3 + ("replace", "delete", "add", "rename", "change-type", "duplicate", "splice", "clear")


@st.composite
def mutated_sets(draw: st.DrawFn) -> list[Any]:
    docs: list[Any] = copy.deepcopy(draw(pick(VALID_SETS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        mutation = draw(st.sampled_from(MUTATIONS))
        slots = list(_slots(docs))
        dicts = [c for c in _containers(docs) if isinstance(c, dict)]
        lists = [c for c in _containers(docs) if isinstance(c, list) and c]
        if not slots:
            break
        container, key = draw(pick(slots))
        typed = [(c, k, f) for c, k, f in _fields(docs) if FIELD_KINDS.get(f)]
        if mutation == "field" and typed:
            # An edge case of the field's own kind: a kind first (durations, regexes, ints...),
            # then a field of that kind, so that rare kinds get their share.
            kind = draw(st.sampled_from(sorted({k for _, _, f in typed for k in FIELD_KINDS[f]})))
            container, key, field = draw(pick([t for t in typed if kind in FIELD_KINDS[t[2]]]))
            if isinstance(container, list) and kind == "list-of-str":
                container[key] = draw(pick(INTERESTING_STRINGS))
            elif isinstance(container, dict) and draw(st.integers(0, 3)) == 0:
                # ...or under a sibling's name: exact -> regex, timeout -> retries.
                sibling = draw(st.sampled_from(sorted(SIBLINGS[field])))
                container[sibling] = container.pop(key)
                container[sibling] = draw(field_values(sibling))
            else:
                container[key] = draw(st.one_of(_pool(kind), _pool(kind), scalars()))
        elif mutation == "replace":
            container[key] = draw(st.one_of(scalars(), json_values(10)))
        elif mutation == "delete":
            del container[key]
        elif mutation == "add" and dicts:
            draw(pick(dicts))[draw(keys())] = draw(json_values(6))
        elif mutation == "rename" and isinstance(container, dict):
            # Another field's name on this value: ``exact`` becomes ``regex``, ``hosts`` becomes ``host``...
            container[draw(st.sampled_from(FIELD_NAMES))] = container.pop(key)
        elif mutation == "change-type":
            container[key] = _change_type(container[key])
        elif mutation == "duplicate" and lists:
            target = draw(pick(lists))
            target.insert(draw(st.integers(0, len(target))), copy.deepcopy(draw(pick(target))))
        elif mutation == "splice":
            container[key] = copy.deepcopy(draw(pick(SPLICE_POOL)))
        else:  # clear: an empty container or string where a value was
            container[key] = draw(st.sampled_from([[], {}, "", None, 0]))
    return docs


# ------------------------------------------------------------------------ YAML text

NASTY_VALUES = [
    ".nan",
    ".inf",
    "-.inf",
    "1e1000",
    "9" * 5000,
    "-" + "9" * 5000,
    "0x" + "f" * 4000,
    "0b" + "1" * 20000,
    "1_000",
    "0o777",
    "190:20:30",
    "on",
    "off",
    "yes",
    "no",
    "y",
    "~",
    "null",
    "2001-12-14t21:59:43.10-05:00",
    "2002-12-14",
    "!!binary R0lGODlhDAAMAIQAAP//9/X17unp5WZmZgAAAOfn515eXvPz7Y6OjuDg4J+fn5",
    "!!binary /w==",
    "!!python/object:os.system {}",
    "!!python/name:os.system",
    "!!python/object/apply:os.system [echo hi]",
    "!custom tag",
    "!!set {a, b}",
    "!!omap [a: 1, b: 2]",
    "!!pairs [a: 1, a: 2]",
    "!!str 8080",
    "!!int '12'",
    "!!float 'nope'",
    "!!timestamp '2001-01-01'",
    "? 0x" + "f" * 4000 + "\n: 1\n? 0x" + "f" * 4000 + "\n: 2",
    "!!map {? [a, b] : c}",
    "{? [a, b] : c}",
    "{? {a: b} : c}",
    "*undefined",
    "&a [*a]",
    "&b {self: *b}",
    "[" * 300 + "]" * 300,
    "{a: " * 300 + "1" + "}" * 300,
    "- " * 300 + "x",
    # "billion laughs": each alias doubles the last; nothing may expand them.
    "[&a [x, x], &b [*a, *a], &c [*b, *b], &d [*c, *c], &e [*d, *d], &f [*e, *e], &g [*f, *f], &h [*g, *g],"
    " &i [*h, *h], &j [*i, *i], &k [*j, *j], &l [*k, *k], &m [*l, *l], &n [*m, *m], &o [*n, *n], &p [*o, *o],"
    " &q [*p, *p], &r [*q, *q], &s [*r, *r], &t [*s, *s], &u [*t, *t], &v [*u, *u], &w [*v, *v], *w]",
    '"\\ud800"',
    '"\\x00\\x1b"',
    "'''",
    "|\n  multi\n  line",
    "[a, b",
    "{a: 1, a: 2}",
    '"unterminated',
]

VALID_TEXTS = [p.read_text(encoding="utf-8") for p in _corpus_files()] + [
    yaml.safe_dump_all(OWN_DOCUMENTS, sort_keys=False)
]


def anchored(value: str) -> str:
    """Anchors, aliases and merge keys around ``value``: aliases reused where a resource expects its own value."""
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: &meta {name: reviews, namespace: default}\n"
        f"spec:\n  host: reviews\n  subsets:\n  - &s {{name: v1, labels: {{version: {value}}}}}\n"
        "  - {<<: *s, name: v2}\n  - *s\n  trafficPolicy: {<<: *meta}\n"
    )


BLOCK_TEMPLATE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: {namespace}
spec:
  hosts:
  - {host}
  resolution: STATIC
  ports:
  - number: {port}
    name: http
  endpoints:
  - address: 10.0.0.1
    labels:
      version: {label}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: reviews
spec:
  selector:
    matchLabels:
      app: reviews
  portLevelMtls:
    {key}:
      mode: {mode}
"""
BLOCK_DEFAULTS = {
    "name": "reviews",
    "namespace": "default",
    "host": "reviews",
    "port": "9080",
    "label": "v1",
    "key": "9080",
    "mode": "STRICT",
}


def in_block(value: str, slot: str) -> str:
    """The block template with ``value`` in one of its slots (a name, a number, a label, a key)."""
    return BLOCK_TEMPLATE.format_map({**BLOCK_DEFAULTS, slot: value})


@st.composite
def nasty_yaml(draw: st.DrawFn) -> str:
    """A valid file with one value replaced by something nasty, or nasty YAML on its own."""
    value = draw(pick(NASTY_VALUES))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return value
    if choice == 1:
        return anchored(value)
    if choice == 2:
        return in_block(value, draw(st.sampled_from(sorted(BLOCK_DEFAULTS))))
    text = draw(pick(VALID_TEXTS))
    lines = text.splitlines()
    candidates = [i for i, line in enumerate(lines) if ": " in line and not line.rstrip().endswith(":")]
    i = draw(pick(candidates))
    head, _, _ = lines[i].partition(": ")
    lines[i] = f"{head}: {value}"
    return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes an integer too long for ``str()`` in hex, as a YAML 1.1 int."""


def _represent_int(dumper: yaml.SafeDumper, value: int) -> yaml.Node:
    text = str(value) if abs(value) < 10**4000 else ("-" if value < 0 else "") + hex(abs(value))
    return dumper.represent_scalar("tag:yaml.org,2002:int", text)


_Dumper.add_representer(int, _represent_int)


def dump(documents: list[Any]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, allow_unicode=True, sort_keys=False)


YAML_ALPHABET = st.sampled_from([*"-:[]{}&*!|>'\"%@`#,?<= \n\t.~0123456789abcxyz", "\u00e9", "\ufeff", "\x85"])
yaml_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=YAML_ALPHABET, max_size=200),
    nasty_yaml(),
    st.lists(random_documents(), max_size=3).map(dump),
    mutated_sets().map(dump),
)


# ------------------------------------------------------------------------ properties


# Python's own words in a message mean an exception was caught and passed on, not explained.
INTERNAL_WORDS = (
    "Exceeds the limit",
    "integer string conversion",
    "invalid literal for",
    "could not convert",
    "has no attribute",
    "object is not",
    "unhashable type",
    "recursion",
    "index out of range",
    "NoneType",
    "Traceback",
)


def assert_clear(issue: Issue) -> None:
    assert isinstance(issue, Issue)
    assert isinstance(issue.message, str)
    assert issue.message
    leaked = [w for w in INTERNAL_WORDS if w in issue.message]
    assert not leaked, f"unclear message: {issue}"


def assert_policy_error(error: PolicyError) -> None:
    assert error.issues, "a PolicyError lists at least one issue"
    for issue in error.issues:
        assert_clear(issue)
        assert issue.severity == "error"
    assert str(error)


def exercise(snapshot: Snapshot) -> None:
    """A snapshot that exists answers every lookup without raising."""
    assert isinstance(snapshot, Snapshot)
    assert len(snapshot.version) == 16
    for host in snapshot.hosts:
        snapshot.subset(host, None)
        snapshot.destination_rule(host)
        snapshot.virtual_service(host)
        snapshot.service(host)
        rule = snapshot.destination_rule(host)
        for subset in rule.spec.subsets if rule is not None else ():
            snapshot.subset(host, subset.name)
    for resource in snapshot.of_kind(AuthorizationPolicy) + snapshot.of_kind(RateLimitPolicy):
        selector = resource.spec.selector
        labels = dict(selector.match_labels) if selector is not None else {}
        workload = Workload("w", namespace=resource.namespace, labels=labels)
        snapshot.authorization_policies(workload)
        snapshot.rate_limits(workload, "SERVER")
        snapshot.rate_limits(workload, "CLIENT")
    for resource in snapshot.of_kind(PeerAuthentication):
        selector = resource.spec.selector
        labels = dict(selector.match_labels) if selector is not None else {}
        snapshot.mtls(Workload("w", namespace=resource.namespace, labels=labels)).mode_for(8080)


def load_resources(documents: list[Any]) -> None:
    try:
        snapshot = Snapshot.from_resources(documents)
    except PolicyError as exc:
        assert_policy_error(exc)
    else:
        exercise(snapshot)


def load_file(path: Path, *, as_one_mesh: bool = False) -> None:
    try:
        snapshot = Snapshot.from_files(path)
    except PolicyError as exc:
        assert_policy_error(exc)
    else:
        exercise(snapshot)
    issues = validate_paths([path], as_one_mesh=as_one_mesh)
    assert isinstance(issues, list)
    for issue in issues:
        assert_clear(issue)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | bytes], Path]:
    """Write a file and return its path (module-scoped: Hypothesis reruns the test in one function call)."""
    folder = tmp_path_factory.mktemp("fuzz")

    def write(content: str | bytes) -> Path:
        path = folder / "mesh.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        return path

    return write


def test_the_valid_sets_are_valid() -> None:
    assert len(VALID_SETS) > len(_corpus_files()) >= 1, f"the Istio corpus is missing at {CORPUS}"
    for docs in VALID_SETS:
        snapshot = Snapshot.from_resources(copy.deepcopy(docs))
        exercise(snapshot)


@budget(120)
@given(st.lists(random_documents(), max_size=4))
def test_random_documents(documents: list[Any]) -> None:
    load_resources(documents)


@budget(150)
@given(st.sampled_from(sorted(KINDS)), st.sampled_from(API_VERSIONS), json_values())
def test_random_spec_of_each_kind(kind: str, api_version: str, spec: Any) -> None:
    cls = KINDS[kind]
    if api_version not in VALID_API_VERSIONS or not api_version.startswith(cls.GROUP):
        api_version = f"{cls.GROUP}/{cls.VERSIONS[-1]}"
    load_resources([{"apiVersion": api_version, "kind": kind, "metadata": {"name": "a"}, "spec": spec}])


@budget(400)
@given(mutated_sets())
def test_mutated_valid_documents(documents: list[Any]) -> None:
    load_resources(documents)


@budget(150)
@given(content=st.binary(max_size=300))
def test_random_bytes_file(scratch: Callable[[str | bytes], Path], content: bytes) -> None:
    load_file(scratch(content))


@budget(200)
@given(text=yaml_texts, as_one_mesh=st.booleans())
def test_random_yaml_file(scratch: Callable[[str | bytes], Path], text: str, as_one_mesh: bool) -> None:
    load_file(scratch(text), as_one_mesh=as_one_mesh)


EDGE_CASES: dict[str, list[Any]] = {
    "duration": DURATIONS,
    "regex": REGEXES,
    "int": [*INTS, 10**30, 1.5, "80"],
    "float": FLOATS,
    "bool": BOOLS,
    "enum": ["", "strict", "Strict", 0],
    "str": ["", " ", "*", "a*b", "X" * 300, "\x00", "é", "9" * 5000, "UPPER", 0, None, []],
    "list-of-str": [[], [""], ["*"], "x", [1], [None]],
}


@pytest.mark.parametrize("index", range(len(VALID_SETS)))
def test_every_edge_case_in_every_typed_field(index: int) -> None:
    """Systematic, not random: each edge case of its kind in each field of the valid set, one at a time."""
    docs = copy.deepcopy(VALID_SETS[index])
    for container, key, field in list(_fields(docs)):
        original = container[key]
        for kind in sorted(FIELD_KINDS.get(field, ())):
            for value in EDGE_CASES[kind]:
                container[key] = value
                load_resources(docs)
        container[key] = original


def test_yaml_merge_keys_may_be_overridden(scratch: Callable[[str | bytes], Path]) -> None:
    # Found by the fuzzer: the duplicate-key check saw a key written next to ``<<: *base``
    # as a duplicate of the merged one, so valid YAML did not load.
    text = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - &v1 {name: v1, labels: {version: v1, track: stable}}
  - {<<: *v1, name: v2, labels: {version: v2}}
"""
    rule = Snapshot.from_files(scratch(text)).destination_rule("reviews")
    assert rule is not None
    assert [(s.name, s.labels) for s in rule.spec.subsets] == [
        ("v1", {"version": "v1", "track": "stable"}),
        ("v2", {"version": "v2"}),
    ]


def test_the_block_template_is_valid(scratch: Callable[[str | bytes], Path]) -> None:
    exercise(Snapshot.from_files(scratch(BLOCK_TEMPLATE.format_map(BLOCK_DEFAULTS))))


@pytest.mark.parametrize("index", range(len(NASTY_VALUES)))
def test_each_nasty_value(scratch: Callable[[str | bytes], Path], index: int) -> None:
    value = NASTY_VALUES[index]
    for text in (value, anchored(value), *(in_block(value, slot) for slot in BLOCK_DEFAULTS)):
        started = time.perf_counter()
        load_file(scratch(text))
        # A few milliseconds each; seconds mean something expanded YAML aliases (the laughs are 2**24 long).
        assert time.perf_counter() - started < 3.0, text[:200]
