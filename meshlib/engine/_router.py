"""The sans-IO router: which VirtualService rule a request takes, and where it goes.

:class:`Router` compiles a :class:`~meshlib.policy.Snapshot` once: every VirtualService
``http`` table becomes a tuple of entries (one per ``match`` entry, in order, as Istio
writes them into Envoy routes), each holding small closures for its conditions and a
ready-made :class:`RouteDecision` per destination. A request then costs a cached
authority lookup, a few comparisons and, for a weighted route, one draw from the
caller's ``random.Random``. Decisions that need nothing from the request (no path
rewrite, no sampled fault or mirror, no redirect) are shared, never allocated.

Semantics follow Istio's translation to Envoy (``pilot/pkg/networking/core/route``):

- ``port`` and ``sourceLabels`` select which match entries exist for a caller: an entry
  whose ``port`` is not the request's port (the authority's, else 80/443 by scheme), or
  whose ``sourceLabels`` are not all carried by the caller, does not apply.
- ``uri`` matches the path without the query; ``ignoreUriCase`` applies to exact and
  prefix matches only (Envoy ignores ``case_sensitive`` for regex routes). ``authority``
  matches the Host header as written (port included), ``method`` and ``scheme`` as sent.
- ``withoutHeaders`` is Envoy's inverted matcher that treats a missing header as the
  empty string, so a missing header satisfies ``withoutHeaders: {x: {exact: a}}``.
- ``queryParams`` match the first value of a name, percent-decoded; ``{}`` tests presence.
- ``rewrite.uri`` is Envoy's ``prefix_rewrite``: it replaces what the path match matched,
  i.e. the prefix of a prefix match, the whole path of an exact or regex match, and the
  leading ``/`` when the entry has no ``uri`` match (Istio matches those on prefix ``/``).
- Weighted destinations ignore weight 0; a lone destination takes all traffic.
- Header operations follow Envoy's order (removals, then ``set``, then ``add``); for a
  lone destination its operations follow the route's in one list, for weighted
  destinations the destination's apply before the route's. ``host``/``:authority`` in
  ``set``/``add`` is an authority rewrite, as in Istio.

Randomness is drawn in a fixed order (destination, fault delay, fault abort, mirrors)
and only when a share is strictly between 0 and 1, so a seeded ``Random`` replays.
"""

from __future__ import annotations

import base64
import random
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from types import MappingProxyType
from typing import Final
from urllib.parse import unquote, urlsplit

from ..policy import Snapshot, VirtualService, canonical_host, split_host_port
from ..policy._hosts import CLUSTER_DOMAIN
from ..policy._networking import (
    Destination,
    HeaderOperations,
    Headers,
    HTTPDirectResponse,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRetry,
    HTTPRoute,
)
from ..policy._values import StringMatch

__all__ = [
    "NO_HEADER_OPS",
    "DirectResponse",
    "HeaderOps",
    "Redirect",
    "RequestView",
    "RouteDecision",
    "RouteTarget",
    "Router",
]

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})
_CACHE_LIMIT: Final = 4096
"""Authorities remembered per namespace; past it the cache starts over (bounded memory)."""


# ---------------------------------------------------------------------------- the request


def _parse_query(query: str) -> Mapping[str, str]:
    # Envoy's query matcher sees the first value of each name, percent-decoded.
    if not query:
        return _EMPTY
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote(name)
        if name not in params:
            params[name] = unquote(value)
    return params


@dataclass(frozen=True, slots=True)
class RequestView:
    """What routing reads of a request; adapters build one from what they received.

    ``headers`` has lower-case names, repeated headers joined with ``,`` (as Envoy's
    header matcher sees them). ``query_params`` is parsed on first use only, so a table
    without ``queryParams`` matches never pays for it.
    """

    method: str
    scheme: str
    authority: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    _query_params: Mapping[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def query_params(self) -> Mapping[str, str]:
        """First value of each query parameter, percent-decoded."""
        params = self._query_params
        if params is None:
            params = _parse_query(self.query)
            object.__setattr__(self, "_query_params", params)
        return params

    @property
    def port(self) -> int:
        """The port the request is for: the authority's, else the scheme's default."""
        _, port = split_host_port(self.authority)
        return port if port is not None else (443 if self.scheme == "https" else 80)

    @classmethod
    def from_parts(
        cls,
        method: str,
        url_or_target: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> RequestView:
        """From a URL (``http://reviews:9080/p?q``) or an origin-form target plus a Host header."""
        joined: dict[str, str] = {}
        items = headers.items() if isinstance(headers, Mapping) else (headers or ())
        for name, value in items:
            key = name.lower()
            joined[key] = f"{joined[key]},{value}" if key in joined else value
        parts = urlsplit(url_or_target)
        authority = parts.netloc or joined.get("host", joined.get(":authority", ""))
        return cls(
            method=method,
            scheme=parts.scheme.lower() or "http",
            authority=authority,
            path=parts.path or "/",
            query=parts.query,
            headers=MappingProxyType(joined),
        )


# ---------------------------------------------------------------------------- the decision


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """Where a request (or a mirrored copy) goes: canonical host, subset, port (``None``: unset)."""

    host: str
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header changes, applied in Envoy's order: ``remove``, then ``set``, then ``add``.

    Names are lower-case. Several levels of operations (route, destination) are composed
    into one at compile time with :meth:`then`, so adapters apply a single value.
    """

    remove: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)

    def then(self, later: HeaderOps) -> HeaderOps:
        """The operations equal to applying these, then ``later``."""
        if not self:
            return later
        if not later:
            return self
        replaced = {*later.remove, *(name for name, _ in later.set)}
        return HeaderOps(
            remove=tuple(dict.fromkeys(self.remove + later.remove)),
            set=tuple((n, v) for n, v in self.set if n not in replaced) + later.set,
            add=tuple((n, v) for n, v in self.add if n not in replaced) + later.add,
        )

    def apply(self, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Apply to a header list (names compared case-insensitively); returns a new list."""
        drop = {*self.remove, *(name for name, _ in self.set)}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        out.extend(self.set)
        out.extend(self.add)
        return out


NO_HEADER_OPS: Final = HeaderOps()


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer with ``status`` and a ``Location`` header instead of forwarding."""

    status: int
    location: str


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """Answer with a fixed ``status`` and ``body`` instead of forwarding."""

    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """What the route table decided for one request; adapters act on it, never re-decide.

    Exactly one of these holds: ``no_route`` (answer 404, response flag NR), ``redirect``,
    ``direct_response``, or ``destination`` is set (forward). A fault abort overrides the
    forward: wait ``fault_delay`` if set, then answer ``fault_abort`` (Envoy flags DI, FI).
    """

    destination: RouteTarget | None
    """The chosen destination (``None`` when the answer is local)."""
    virtual_service: str | None = None
    """``VirtualService/<ns>/<name>`` that decided; ``None`` for a host without one."""
    route_index: int | None = None
    """Index of the rule in the VirtualService's ``http`` list."""
    route_name: str | None = None
    """The rule's name, ``rule.match`` when the match entry is named too (as Envoy names routes)."""
    no_route: bool = False
    """The host has routes but none matched: Istio answers 404 with response flag NR."""
    rewrite_path: str | None = None
    """The path to forward (without the query, which is kept); ``None``: the request's own."""
    rewrite_authority: str | None = None
    """The Host to forward; ``None``: the request's own."""
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    timeout: float | None = None
    """The rule's timeout in seconds; ``0.0`` turns it off; ``None``: unset (the mesh default applies)."""
    retries: HTTPRetry | None = None
    """The rule's retry policy; ``None``: unset (the mesh default applies)."""
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    fault_delay: float | None = None
    """Seconds to hold this request before going on (the delay fault fired)."""
    fault_abort: int | None = None
    """Status to answer this request with instead of forwarding (the abort fault fired)."""
    mirrors: tuple[RouteTarget, ...] = ()
    """Where copies of this request go, fire and forget (Host gets ``-shadow``)."""
    http_route: HTTPRoute | None = None
    """The rule itself, for what the decision does not spell out."""

    @property
    def fault_injected(self) -> bool:
        """A fault fired: Istio applies neither the route's timeout nor its retries to this request."""
        return self.fault_delay is not None or self.fault_abort is not None


# ---------------------------------------------------------------------------- compiling matches

StrTest = Callable[[str], bool]
Condition = Callable[[RequestView], bool]


def _string_test(match: StringMatch, ignore_case: bool = False) -> StrTest | None:
    """A test for one StringMatch; ``None`` for ``{}`` (presence, or "anything")."""
    if match.exact is not None:
        exact = match.exact
        if ignore_case:
            lowered = exact.lower()
            return lambda v: v.lower() == lowered
        return lambda v: v == exact
    if match.prefix is not None:
        prefix = match.prefix
        if ignore_case:
            lowered, n = prefix.lower(), len(prefix)
            return lambda v: v[:n].lower() == lowered
        return lambda v: v.startswith(prefix)
    if match.regex is not None:
        # RE2 full match. Envoy ignores ``case_sensitive`` for regex routes: so does meshlib.
        fullmatch = re.compile(match.regex).fullmatch
        return lambda v: fullmatch(v) is not None
    return None


def _header_condition(name: str, match: StringMatch, negate: bool) -> Condition:
    test = _string_test(match)
    if test is None:
        if negate:
            return lambda r: name not in r.headers
        return lambda r: name in r.headers
    if negate:
        # Envoy's ``treat_missing_header_as_empty`` on the inverted matcher.
        return lambda r: not test(r.headers.get(name, ""))

    def header(r: RequestView) -> bool:
        value = r.headers.get(name)
        return value is not None and test(value)

    return header


def _query_condition(name: str, match: StringMatch) -> Condition:
    test = _string_test(match)
    if test is None:
        return lambda r: name in r.query_params

    def param(r: RequestView) -> bool:
        value = r.query_params.get(name)
        return value is not None and test(value)

    return param


def _attribute_condition(match: StringMatch | None, read: Callable[[RequestView], str]) -> Condition | None:
    test = _string_test(match) if match is not None else None
    if test is None:
        return None
    return lambda r: test(read(r))


def _conditions(m: HTTPMatchRequest) -> tuple[Condition, ...]:
    """The conditions of one match entry, cheapest first (they AND, so order is free)."""
    out: list[Condition | None] = [
        _attribute_condition(m.method, lambda r: r.method),
        _attribute_condition(m.scheme, lambda r: r.scheme),
        _attribute_condition(m.authority, lambda r: r.authority),
    ]
    if m.uri is not None:
        out.append(_uri_condition(m.uri, m.ignore_uri_case))
    out += [_header_condition(name, sm, negate=False) for name, sm in sorted(m.headers.items())]
    out += [_header_condition(name, sm, negate=True) for name, sm in sorted(m.without_headers.items())]
    out += [_query_condition(name, sm) for name, sm in sorted(m.query_params.items())]
    return tuple(c for c in out if c is not None)


def _uri_condition(match: StringMatch, ignore_case: bool) -> Condition | None:
    test = _string_test(match, ignore_case=ignore_case and match.regex is None)
    if test is None:
        return None
    return lambda r: test(r.path)


def _matched_prefix_length(m: HTTPMatchRequest | None) -> int:
    """How much of the path ``rewrite.uri`` replaces: -1 for all of it (Envoy's prefix_rewrite)."""
    uri = m.uri if m is not None else None
    if uri is None or uri.is_presence:
        return 1  # Istio matches on prefix "/"
    if uri.prefix is not None:
        return len(uri.prefix)
    return -1


# ---------------------------------------------------------------------------- compiling rules

_AUTHORITY_HEADERS: Final = frozenset({"host", ":authority"})


def _header_ops(ops: HeaderOperations | None) -> tuple[HeaderOps, HeaderOps, str | None]:
    """(remove-only ops, set/add ops, authority) of one level; Istio drops internal headers."""
    if ops is None:
        return NO_HEADER_OPS, NO_HEADER_OPS, None
    # Istio: a ``host``/``:authority`` header operation rewrites the authority, ``set`` before ``add``.
    authority = next((v for n, v in ops.set.items() if n.lower() in _AUTHORITY_HEADERS), None)
    if authority is None:
        authority = next((v for n, v in ops.add.items() if n.lower() in _AUTHORITY_HEADERS), None)

    def keep(name: str) -> bool:
        return not name.startswith(":") and name.lower() not in _AUTHORITY_HEADERS

    removes = HeaderOps(remove=tuple(n.lower() for n in ops.remove if keep(n)))
    writes = HeaderOps(
        set=tuple(sorted((n.lower(), v) for n, v in ops.set.items() if keep(n))),
        add=tuple(sorted((n.lower(), v) for n, v in ops.add.items() if keep(n))),
    )
    return removes, writes, authority


def _compose(route: Headers | None, dest: Headers | None, lone: bool) -> tuple[HeaderOps, HeaderOps, str | None]:
    """Request ops, response ops and authority of a (rule, destination) pair, in Envoy's order."""
    out: list[HeaderOps] = []
    authority: str | None = None
    for side in ("request", "response"):
        r_rm, r_wr, r_auth = _header_ops(getattr(route, side) if route is not None else None)
        d_rm, d_wr, d_auth = _header_ops(getattr(dest, side) if dest is not None else None)
        # A lone destination shares the route's Envoy list (every removal first, then the
        # route's writes, then the destination's); a weighted one applies before the route.
        ops = r_rm.then(d_rm).then(r_wr).then(d_wr) if lone else d_rm.then(d_wr).then(r_rm).then(r_wr)
        out.append(ops)
        if side == "request":
            authority = r_auth or d_auth
    return out[0], out[1], authority


def _target(dest: Destination, namespace: str) -> RouteTarget:
    port = dest.port.number if dest.port is not None else None
    return RouteTarget(canonical_host(dest.host, namespace), dest.subset, port)


def _direct_response(spec: HTTPDirectResponse) -> DirectResponse:
    body = b""
    if spec.body is not None:
        if spec.body.string is not None:
            body = spec.body.string.encode()
        elif spec.body.bytes_ is not None:
            body = base64.b64decode(spec.body.bytes_)
    return DirectResponse(spec.status, body)


def _redirect_location(spec: HTTPRedirect, request: RequestView, request_port: int) -> str:
    """Envoy's ``RedirectAction`` as Istio configures it (``newUri``)."""
    scheme = spec.scheme or request.scheme
    port: int | None = spec.port
    if spec.derive_port == "FROM_REQUEST_PORT":
        port = request_port
    if (port == 80 and scheme == "http") or (port == 443 and scheme == "https"):
        port = None  # Istio leaves out the scheme's default port
    if spec.authority:
        host = spec.authority
    else:
        host = request.authority
        _, request_host_port = split_host_port(host)
        if request_host_port is not None:
            drop = port is not None or (
                scheme != request.scheme and (request.scheme, request_host_port) in (("https", 443), ("http", 80))
            )
            if drop:
                host = host[: host.rfind(":")]
    path = spec.uri if spec.uri else request.path
    if request.query and "?" not in path:
        path = f"{path}?{request.query}"
    port_part = f":{port}" if port is not None else ""
    return f"{scheme}://{host}{port_part}{path}"


def _re2_template(rewrite: str) -> str:
    # RE2 writes groups as \0..\9; Python's \0 is a NUL, so spell every group \g<N>.
    return re.sub(r"\\(\d)", r"\\g<\1>", rewrite)


class _Rule:
    """One ``http`` rule compiled: what every match entry of it shares."""

    __slots__ = (
        "abort",
        "abort_share",
        "cumulative",
        "delay",
        "delay_share",
        "dynamic",
        "mirrors",
        "mirrors_sampled",
        "prefix_rewrite",
        "redirect",
        "regex_rewrite",
        "route",
        "total",
    )

    def __init__(self, route: HTTPRoute, namespace: str) -> None:
        self.route = route
        weights = [w for w in route.destination_weights if w > 0]
        self.cumulative: tuple[int, ...] = tuple(accumulate(weights))
        self.total = self.cumulative[-1] if self.cumulative else 0
        rewrite = route.rewrite
        self.prefix_rewrite = rewrite.uri if rewrite is not None and rewrite.uri else None
        regex = rewrite.uri_regex_rewrite if rewrite is not None else None
        self.regex_rewrite = (re.compile(regex.match), _re2_template(regex.rewrite)) if regex is not None else None
        self.redirect = route.redirect
        fault = route.fault
        delay = fault.delay if fault is not None else None
        abort = fault.abort if fault is not None else None
        self.delay = delay.fixed_delay if delay is not None else None
        self.delay_share = delay.effective_fraction if self.delay is not None and delay is not None else 0.0
        self.abort = abort.http_status if abort is not None else None
        self.abort_share = abort.effective_fraction if self.abort is not None and abort is not None else 0.0
        targets = [(_target(d, namespace), share) for d, share in route.mirror_targets if share > 0]
        self.mirrors = tuple(t for t, _ in targets)
        self.mirrors_sampled: tuple[tuple[RouteTarget, float], ...] = (
            tuple(targets) if any(share < 1 for _, share in targets) else ()
        )
        self.dynamic = bool(
            self.prefix_rewrite is not None
            or self.regex_rewrite is not None
            or self.redirect is not None
            or 0 < self.delay_share < 1
            or 0 < self.abort_share < 1
            or self.mirrors_sampled
        )

    def decisions(
        self, ref: str, index: int, match: HTTPMatchRequest | None, namespace: str
    ) -> tuple[RouteDecision, ...]:
        """The ready decision per destination with positive weight (one for a local answer)."""
        route = self.route
        name = route.name
        if match is not None and match.name:
            name = f"{name}.{match.name}" if name else match.name
        if route.redirect is not None or route.direct_response is not None:
            req, resp, _ = _compose(route.headers, None, lone=True)
            direct = _direct_response(route.direct_response) if route.direct_response is not None else None
            local = RouteDecision(
                None,
                virtual_service=ref,
                route_index=index,
                route_name=name,
                request_headers=req,
                response_headers=resp,
                direct_response=direct,
                http_route=route,
            )
            return (local,)
        rewrite = route.rewrite
        lone = len(route.route) == 1
        out = []
        for dest, weight in zip(route.route, route.destination_weights, strict=True):
            if weight <= 0:
                continue  # Istio leaves weight-0 destinations out of the weighted clusters
            req, resp, authority = _compose(route.headers, dest.headers, lone=lone)
            if rewrite is not None and rewrite.authority:
                authority = rewrite.authority
            decision = RouteDecision(
                _target(dest.destination, namespace),
                virtual_service=ref,
                route_index=index,
                route_name=name,
                rewrite_authority=authority,
                request_headers=req,
                response_headers=resp,
                timeout=route.timeout,
                retries=route.retries,
                fault_delay=self.delay if self.delay_share >= 1 else None,
                fault_abort=self.abort if self.abort_share >= 1 else None,
                mirrors=self.mirrors,
                http_route=route,
            )
            out.append(decision)
        return tuple(out)

    def finish(
        self, base: RouteDecision, request: RequestView, rng: random.Random, entry: _Entry, port: int
    ) -> RouteDecision:
        """The per-request parts: rewritten path, sampled faults and mirrors, redirect location."""
        path = None
        if self.prefix_rewrite is not None:
            n = entry.prefix_length
            path = self.prefix_rewrite + (request.path[n:] if n >= 0 else "")
        elif self.regex_rewrite is not None:
            pattern, template = self.regex_rewrite
            path = pattern.sub(template, request.path)
        delay = base.fault_delay
        if 0 < self.delay_share < 1:
            delay = self.delay if rng.random() < self.delay_share else None
        abort = base.fault_abort
        if 0 < self.abort_share < 1:
            abort = self.abort if rng.random() < self.abort_share else None
        mirrors = base.mirrors
        if self.mirrors_sampled:
            mirrors = tuple(t for t, share in self.mirrors_sampled if share >= 1 or rng.random() < share)
        redirect = None
        if self.redirect is not None:
            location = _redirect_location(self.redirect, request, port)
            redirect = Redirect(self.redirect.redirect_code, location)
        return RouteDecision(
            base.destination,
            virtual_service=base.virtual_service,
            route_index=base.route_index,
            route_name=base.route_name,
            rewrite_path=path,
            rewrite_authority=base.rewrite_authority,
            request_headers=base.request_headers,
            response_headers=base.response_headers,
            timeout=base.timeout,
            retries=base.retries,
            redirect=redirect,
            direct_response=base.direct_response,
            fault_delay=delay,
            fault_abort=abort,
            mirrors=mirrors,
            http_route=base.http_route,
        )


class _Entry:
    """One match entry of a rule (a rule without ``match`` has one that matches everything)."""

    __slots__ = ("conditions", "decisions", "port", "prefix_length", "rule", "source_labels")

    def __init__(self, rule: _Rule, match: HTTPMatchRequest | None, ref: str, index: int, namespace: str) -> None:
        self.rule = rule
        self.port = match.port if match is not None else None
        labels = match.source_labels if match is not None else {}
        self.source_labels: tuple[tuple[str, str], ...] | None = tuple(labels.items()) if labels else None
        self.conditions = _conditions(match) if match is not None else ()
        self.prefix_length = _matched_prefix_length(match)
        self.decisions = rule.decisions(ref, index, match, namespace)

    def decide(self, request: RequestView, rng: random.Random, port: int) -> RouteDecision:
        decisions = self.decisions
        if len(decisions) == 1:
            base = decisions[0]
        else:
            rule = self.rule
            i = bisect_right(rule.cumulative, rng.random() * rule.total)
            base = decisions[min(i, len(decisions) - 1)]
        if not self.rule.dynamic:
            return base
        return self.rule.finish(base, request, rng, self, port)


class _Table:
    """The route table of a host: entries in order, and what to answer when none applies."""

    __slots__ = ("entries", "fallback")

    def __init__(self, entries: tuple[_Entry, ...], fallback: RouteDecision) -> None:
        self.entries = entries
        self.fallback = fallback


def _compile(vs: VirtualService) -> _Table | None:
    if not vs.spec.http:
        return None  # a tcp/tls-only VirtualService leaves HTTP on the default route
    ns, ref = vs.namespace, vs.ref
    entries: list[_Entry] = []
    for index, route in enumerate(vs.spec.http):
        rule = _Rule(route, ns)
        matches: list[HTTPMatchRequest | None] = [*route.match] or [None]
        for match in matches:
            entries.append(_Entry(rule, match, ref, index, ns))
    return _Table(tuple(entries), RouteDecision(None, virtual_service=ref, no_route=True))


def _default_table(host: str) -> _Table:
    return _Table((), RouteDecision(RouteTarget(host)))


def _labels_match(wanted: tuple[tuple[str, str], ...], labels: Mapping[str, str] | None) -> bool:
    if labels is None:
        return False
    for key, value in wanted:  # noqa: SIM110 - a loop allocates no generator per request
        if labels.get(key) != value:
            return False
    return True


# ---------------------------------------------------------------------------- the router

_Resolved = tuple[_Table, int | None] | None


class Router:
    """The route tables of one snapshot; build a new Router when the snapshot changes.

    ``route`` is safe to call from many threads or tasks at once: the only state it
    writes is a bounded memo of authorities already resolved.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.version = snapshot.version
        tables: dict[str, _Table] = {}
        wild_vs: list[tuple[str, _Table]] = []
        for vs in snapshot.of_kind(VirtualService):
            table = _compile(vs)
            if table is None:
                continue
            for host in vs.spec.hosts:
                fqdn = canonical_host(host, vs.namespace)
                if fqdn.startswith("*"):
                    wild_vs.append((fqdn, table))
                else:
                    tables[fqdn] = table
        self._wild_vs = sorted(wild_vs, key=lambda item: -len(item[0]))
        self._wild_hosts = sorted((h for h in snapshot.hosts if h.startswith("*")), key=len, reverse=True)
        for host in snapshot.hosts:
            if not host.startswith("*") and host not in tables:
                tables[host] = self._wildcard_vs(host) or _default_table(host)
        self._tables = tables
        self._memo: dict[str, dict[str, _Resolved]] = {}

    def __repr__(self) -> str:
        return f"<Router version={self.version} hosts={len(self._tables)}>"

    def route(
        self,
        request: RequestView,
        rng: random.Random,
        *,
        source_labels: Mapping[str, str] | None = None,
        namespace: str = "default",
    ) -> RouteDecision | None:
        """Route one request from a caller in ``namespace`` labelled ``source_labels``.

        ``None``: the host is not in the mesh's configuration (pass it through, or
        refuse it under ``REGISTRY_ONLY``). Otherwise a decision; ``no_route`` when the
        host's VirtualService has no rule for this request. ``source_labels=None`` is a
        caller without labels: rules with ``sourceLabels`` do not apply to it.
        """
        resolved = self._resolve(request.authority, namespace)
        if resolved is None:
            return None
        table, port = resolved
        if port is None:
            port = 443 if request.scheme == "https" else 80
        for entry in table.entries:
            if entry.port is not None and entry.port != port:
                continue
            if entry.source_labels is not None and not _labels_match(entry.source_labels, source_labels):
                continue
            for condition in entry.conditions:
                if not condition(request):
                    break
            else:
                return entry.decide(request, rng, port)
        return table.fallback

    def _resolve(self, authority: str, namespace: str) -> _Resolved:
        memo = self._memo.get(namespace)
        if memo is None:
            if len(self._memo) >= _CACHE_LIMIT:
                self._memo.clear()
            memo = self._memo[namespace] = {}
        try:
            return memo[authority]
        except KeyError:
            pass
        host, port = split_host_port(authority)
        table = self._table_for(canonical_host(host, namespace)) if host else None
        resolved = (table, port) if table is not None else None
        if len(memo) >= _CACHE_LIMIT:
            memo.clear()
        memo[authority] = resolved
        return resolved

    def _table_for(self, fqdn: str) -> _Table | None:
        table = self._tables.get(fqdn)
        if table is not None:
            return table
        if fqdn.count(".") == 1:  # "reviews.default", as Kubernetes DNS answers it
            table = self._tables.get(f"{fqdn}.svc.{CLUSTER_DOMAIN}")
            if table is not None:
                return table
        table = self._wildcard_vs(fqdn)
        if table is not None:
            return table
        if any(fqdn.endswith(pattern[1:]) for pattern in self._wild_hosts):
            return _default_table(fqdn)
        return None

    def _wildcard_vs(self, fqdn: str) -> _Table | None:
        for pattern, table in self._wild_vs:
            if fqdn.endswith(pattern[1:]):
                return table
        return None
