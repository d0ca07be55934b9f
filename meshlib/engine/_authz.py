"""AuthorizationPolicy decisions for one workload, compiled once per snapshot.

The adapters (middleware, sidecar) turn each inbound request into an
:class:`AuthzRequest` and ask an :class:`Authorizer` two questions, in Istio's order:

1. :meth:`Authorizer.custom`: which CUSTOM policies match; the adapter asks each
   one's external provider (IO is not the engine's job) and denies if any says no;
2. :meth:`Authorizer.decide`: any matching DENY denies; with no ALLOW policy the
   request passes; else a matching ALLOW rule is needed. AUDIT policies and
   dry-run (``istio.io/dry-run``) policies never change the answer, the decision
   only reports them.

Matching follows what Istio generates for Envoy's RBAC filter
(``pilot/pkg/security/authz/model/generator.go`` and ``matcher/*.go``):

- strings: exact, ``prefix*``, ``*suffix``; ``*`` is "non-empty" (regex ``.+``),
  except for ``hosts``, ``methods`` and headers where it is "present";
  ``hosts`` ignore case; everything else is case-sensitive;
- ``principals``, ``namespaces`` (``.*/ns/N/.*``), ``serviceAccounts``
  (``ns/sa``, or ``sa`` in the policy's namespace) and the ``source.*`` keys need a
  peer identity: a plaintext request matches none of them, so their ``not*``
  forms match it (Envoy's ``authenticated`` matcher is false without TLS);
- ``ipBlocks``/``source.ip`` match the peer address, ``remoteIpBlocks``/``remote.ip``
  the client address after X-Forwarded-For handling;
- ``paths``: exact, prefix, suffix, ``*``, and templates where ``{*}`` is one
  non-empty segment and ``{**}`` any run of characters including ``/`` (Envoy's
  ``uri_template``: ``/{**}/x`` needs at least one character between the slashes);
- ``request.headers[name]``: the value Envoy sees, repeated headers joined with
  ``,``, matched as one string (Istio's ``HeaderMatcher``);
- JWT attributes (``requestPrincipals``, ``request.auth.*``): a request without a
  JWT simply has none of them, as in Istio: their values never match and their
  ``not`` forms always do. ``requestPrincipals`` values are ``iss/sub``, matched
  as Istio does since it split them (issuer and subject separately, at the last
  ``/``).
- Every rule's ``not*`` field and ``notValues`` is "none of these matches".

Attributes the server cannot know make a condition that cannot be evaluated:
``experimental.*`` and ``request.experimental.*`` keys (meshlib is not Envoy),
``connection.sni`` when :attr:`AuthzRequest.sni` is None, ``destination.ip`` when
:attr:`AuthzRequest.destination_ip` is None, and ``request.auth.audiences``,
``presenter`` or ``claims`` when a JWT was verified but its claims were not passed.
Such a condition fails closed, by Istio's rule for attributes a filter cannot see
(HTTP-only fields on a TCP filter chain, ``builder.go``): in an ALLOW rule it does
not match (the rule cannot grant access), in a DENY, AUDIT or CUSTOM rule it is
left out (the rule covers more, never less). ``meshlib validate`` already warns
about each of these keys.

Dry run: Istio evaluates dry-run policies in Envoy's "shadow" engines and only
logs the result. :attr:`AuthzDecision.shadow` lists, for every dry-run policy of
the workload, whether it matched; :attr:`AuthzDecision.shadow_denied` applies
Istio's shadow rule: the dry-run DENY policies would deny if one matched, the
dry-run ALLOW policies (taken alone, not with the enforced ones) would deny if
none matched. Dry-run policies are evaluated on every request, even one an
enforced DENY refuses (Envoy would skip the ALLOW shadow engine then).

Policies attached with ``targetRef(s)`` apply to no meshlib workload (there is no
Gateway API here) and are left out, as ``meshlib validate`` warns.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, NamedTuple

from ..policy import AuthorizationPolicy, Snapshot, Workload, split_host_port
from ..policy._security import Condition, Operation, Rule, Source, is_dry_run, parse_ip_block
from ._paths import NormalizationMode, normalization_mode

__all__ = ["AuthzDecision", "AuthzRequest", "Authorizer", "CustomCheck", "ShadowResult"]

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_SPIFFE = "spiffe://"


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What the server knows about one inbound request, in the form policies match.

    - ``principal``: the peer's identity as Istio writes it (``cluster.local/ns/N/sa/S``),
      None for a plaintext peer;
    - ``source_ip``: the peer's address (``ipBlocks``, ``source.ip``); ``remote_ip``: the
      original client after X-Forwarded-For handling (``remoteIpBlocks``, ``remote.ip``),
      the same as ``source_ip`` when there is none;
    - ``request_principal``: ``iss/sub`` of a JWT a hook verified, None when there is no
      JWT; ``claims``: that JWT's claims, when the hook gives them;
    - ``host``: the Host header without port; ``port``: the destination port;
    - ``path``: already normalised (see :mod:`._paths`), without the query;
    - ``headers``: lower-case names, repeated headers joined with ``,``;
    - ``sni``, ``destination_ip``: None when the server does not know them (a
      condition on them then cannot be evaluated); ``sni=""`` means the client sent none.
    """

    principal: str | None
    source_ip: str
    remote_ip: str
    request_principal: str | None
    host: str
    port: int
    method: str
    path: str
    headers: Mapping[str, str]
    sni: str | None = None
    destination_ip: str | None = None
    claims: Mapping[str, Any] | None = None

    @classmethod
    def from_parts(
        cls,
        *,
        principal: str | None = None,
        source_ip: str = "127.0.0.1",
        remote_ip: str | None = None,
        request_principal: str | None = None,
        host: str = "localhost",
        port: int = 80,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        sni: str | None = None,
        destination_ip: str | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> AuthzRequest:
        """A request from loose parts, for tests and simple adapters.

        ``principal`` may be a SPIFFE id (``spiffe://`` is dropped); ``host`` may carry a
        port (dropped) and any case; ``headers`` may be pairs with repeated names,
        which are joined with ``,`` as Envoy does.
        """
        if principal is not None and principal.startswith(_SPIFFE):
            principal = principal[len(_SPIFFE) :]
        return cls(
            principal=principal,
            source_ip=source_ip,
            remote_ip=source_ip if remote_ip is None else remote_ip,
            request_principal=request_principal,
            host=split_host_port(host)[0].lower(),
            port=port,
            method=method,
            path=path,
            headers=_join_headers(headers),
            sni=sni,
            destination_ip=destination_ip,
            claims=claims,
        )


def _join_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Mapping[str, str]:
    if not headers:
        return _NO_HEADERS
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    joined: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        joined[key] = f"{joined[key]},{value}" if key in joined else value
    return MappingProxyType(joined)


# ----------------------------------------------------------------------------- the answers


@dataclass(frozen=True, slots=True)
class CustomCheck:
    """A CUSTOM policy whose rules matched: the adapter must ask ``provider`` (deny if it says no)."""

    policy: str
    provider: str


class ShadowResult(NamedTuple):
    """What a dry-run policy did for one request: ``(policy ref, action, matched)``."""

    policy: str
    action: str
    matched: bool


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    """The answer for one request, with what the access log needs to explain it.

    ``policy`` is the ref (``kind/namespace/name``) of the policy that decided: the
    matching DENY, or the matching ALLOW; None when the request passed because the
    workload has no ALLOW policy, or was refused because none matched (``reason``
    says which). ``audit`` is the first matching AUDIT policy; ``shadow`` the dry-run
    policies' results (they never change ``allowed``).
    """

    allowed: bool
    policy: str | None
    reason: str
    audit: str | None = None
    shadow: tuple[ShadowResult, ...] = field(default=())

    @property
    def shadow_denied(self) -> bool:
        """Whether the dry-run policies would have refused the request (Istio's shadow engines).

        A matching dry-run DENY would deny; dry-run ALLOW policies, taken alone,
        would deny when none of them matched.
        """
        allows = [s.matched for s in self.shadow if s.action == "ALLOW"]
        return any(s.matched for s in self.shadow if s.action == "DENY") or (bool(allows) and not any(allows))

    @classmethod
    def denied_by_custom(cls, check: CustomCheck) -> AuthzDecision:
        """The decision to log when ``check.provider`` refused the request."""
        return cls(False, check.policy, f"denied by CUSTOM policy {check.policy} (provider {check.provider})")


_NO_ALLOW_POLICY = AuthzDecision(True, None, "no ALLOW policy")
_NO_ALLOW_MATCHED = AuthzDecision(False, None, "no ALLOW policy matched")


# ----------------------------------------------------------------------------- matchers

_Check = Callable[[AuthzRequest], bool]
_Cond = Callable[[AuthzRequest], bool | None]
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Strings:
    """Istio's string values, split once: an exact set and prefix/suffix tuples for ``str.startswith``."""

    __slots__ = ("exact", "prefixes", "star", "suffixes")

    def __init__(self, values: Iterable[str], *, star_matches_empty: bool = False) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        star = False
        for v in values:
            if v == "*":
                star = True
            elif v.startswith("*"):
                suffixes.append(v[1:])
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            else:
                exact.add(v)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        # ``*`` is Envoy's ``.+`` for strings, its ``present_match`` for headers, hosts and methods.
        self.star: bool | None = None if not star else star_matches_empty

    def __call__(self, value: str) -> bool:
        if value in self.exact:
            return True
        if self.star is not None and (self.star or value != ""):
            return True
        return value.startswith(self.prefixes) or value.endswith(self.suffixes)


def _negate(check: _Check) -> _Check:
    return lambda r: not check(r)


def _principals(values: Iterable[str]) -> Callable[[str | None], bool]:
    match = _Strings(values)
    return lambda principal: principal is not None and match(principal)


def _regex_any(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.DOTALL)


def _namespaces(values: Iterable[str]) -> Callable[[str | None], bool]:
    """Istio's ``.*/ns/<value, * as .*>/.*`` on the peer's principal."""
    rx = _regex_any(".*/ns/" + ".*".join(re.escape(part) for part in v.split("*")) + "/.*" for v in values)
    return lambda principal: principal is not None and rx.fullmatch(principal) is not None


def _service_accounts(values: Iterable[str], namespace: str) -> Callable[[str | None], bool]:
    """Istio's ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?``; a bare ``sa`` is in the policy's namespace."""
    patterns = []
    for v in values:
        ns, slash, sa = v.partition("/")
        if not slash:
            ns, sa = namespace, v
        patterns.append(f".+/ns/{re.escape(ns)}/(?:.+/|)sa/{re.escape(sa)}(?:/.+)?")
    rx = _regex_any(patterns)
    return lambda principal: principal is not None and rx.fullmatch(principal) is not None


@lru_cache(maxsize=1024)
def _address(text: str) -> _Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return ip


def _ip_blocks(values: Iterable[str]) -> Callable[[str], bool]:
    networks = tuple(parse_ip_block(v) for v in values)

    def match(text: str) -> bool:
        ip = _address(text)
        return ip is not None and any(ip in net for net in networks)

    return match


def _ports(values: Iterable[str]) -> frozenset[int]:
    return frozenset(int(v) for v in values)


_PCHARS = r"a-zA-Z0-9\-._~%!$&'()+,;:@"
"""Envoy's ``uri_template`` literal characters: what ``{*}`` (one segment) and ``{**}`` (also ``/``) span."""


def _template_regex(template: str) -> str:
    """Envoy's regex for a path template (``{*}`` → ``*`` → one segment, ``{**}`` → ``**`` → any text)."""
    parts = []
    for segment in template[1:].split("/"):
        if segment == "{*}":
            parts.append(f"[{_PCHARS}]+")
        elif segment == "{**}":
            parts.append(f"[{_PCHARS}/]*")
        else:
            parts.append(re.escape(segment))
    return "/" + "/".join(parts)


def _paths(values: Iterable[str]) -> _Check:
    plain = [v for v in values if "{*}" not in v and "{**}" not in v]
    templates = [v for v in values if v not in plain]
    match = _Strings(plain)
    if not templates:
        return lambda r: match(r.path)
    rx = _regex_any(_template_regex(t) for t in templates)
    return lambda r: match(r.path) or rx.fullmatch(r.path) is not None


def _iss_sub_matcher(value: str) -> Callable[[str, str], bool]:
    """Istio's ``requestPrincipalGenerator``: a value ``iss/sub`` split at its last ``/``."""
    anything = _Strings(["*"])
    idx = value.rfind("/")
    found = idx >= 0
    iss, sub = (value[:idx], value[idx + 1 :]) if found else (value, "")
    match_iss: Callable[[str], bool]
    match_sub: Callable[[str], bool]
    if value == "*":
        match_iss = match_sub = anything
    elif value.startswith("*"):
        if found:
            match_iss = anything if iss == "*" else _Strings([iss])
            match_sub = _Strings([sub]) if sub else "".__eq__
        else:
            match_iss, match_sub = anything, _Strings([value])
    elif value.endswith("*"):
        if found:
            match_iss = _Strings([iss]) if iss else "".__eq__
            match_sub = anything if sub == "*" else _Strings([sub])
        else:
            match_iss, match_sub = _Strings([value]), anything
    else:
        match_iss, match_sub = iss.__eq__, sub.__eq__
    return lambda i, s: match_iss(i) and match_sub(s)


def _iss_sub(request: AuthzRequest) -> tuple[str, str] | None:
    if request.request_principal is None:
        return None
    claims = request.claims
    if claims is not None and isinstance(claims.get("iss"), str) and isinstance(claims.get("sub"), str):
        return claims["iss"], claims["sub"]
    iss, _, sub = request.request_principal.rpartition("/")
    return (iss, sub) if iss else (sub, "")


def _request_principals(values: Iterable[str]) -> _Check:
    matchers = tuple(_iss_sub_matcher(v) for v in values)

    def check(request: AuthzRequest) -> bool:
        pair = _iss_sub(request)
        return pair is not None and any(m(*pair) for m in matchers)

    return check


def _claim_values(claims: Mapping[str, Any], path: tuple[str, ...]) -> tuple[str, ...]:
    """A (nested) claim as Istio's authn filter stores it: a list of strings."""
    value: Any = claims
    for key in path:
        if not isinstance(value, Mapping):
            return ()
        value = value.get(key)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _claims(path: tuple[str, ...], values: Iterable[str]) -> _Cond:
    match = _Strings(values)

    def check(request: AuthzRequest) -> bool | None:
        if request.request_principal is None:
            return False  # no JWT: the attribute is absent
        if request.claims is None:
            return None  # a JWT whose claims the hook did not pass: cannot be evaluated
        return any(match(v) for v in _claim_values(request.claims, path))

    return check


# ----------------------------------------------------------------------------- compiling


def _source_ip(values: list[str]) -> _Check:
    match = _ip_blocks(values)
    return lambda r: match(r.source_ip)


def _remote_ip(values: list[str]) -> _Check:
    match = _ip_blocks(values)
    return lambda r: match(r.remote_ip)


def _on_peer(match: Callable[[str | None], bool]) -> _Check:
    return lambda r: match(r.principal)


def _port_check(values: list[str]) -> _Check:
    numbers = _ports(values)
    return lambda r: r.port in numbers


def _method_check(values: list[str]) -> _Check:
    match = _Strings(values, star_matches_empty=True)
    return lambda r: match(r.method)


def _host_check(values: list[str]) -> _Check:
    match = _Strings((v.lower() for v in values), star_matches_empty=True)
    return lambda r: match(r.host.lower())


_Field = tuple[list[str], list[str], Callable[[list[str]], _Check]]


def _field_checks(fields: Iterable[_Field]) -> tuple[_Check, ...]:
    """One check per set field (``not*`` fields negated); they AND."""
    checks: list[_Check] = []
    for values, not_values, build in fields:
        if values:
            checks.append(build(values))
        if not_values:
            checks.append(_negate(build(not_values)))
    return tuple(checks)


def _source_checks(source: Source, namespace: str) -> tuple[_Check, ...]:
    return _field_checks(
        (
            (source.ip_blocks, source.not_ip_blocks, _source_ip),
            (source.remote_ip_blocks, source.not_remote_ip_blocks, _remote_ip),
            (source.principals, source.not_principals, lambda vs: _on_peer(_principals(vs))),
            (source.namespaces, source.not_namespaces, lambda vs: _on_peer(_namespaces(vs))),
            (
                source.service_accounts,
                source.not_service_accounts,
                lambda vs: _on_peer(_service_accounts(vs, namespace)),
            ),
            (source.request_principals, source.not_request_principals, _request_principals),
        )
    )


def _operation_checks(operation: Operation) -> tuple[_Check, ...]:
    return _field_checks(
        (
            (operation.ports, operation.not_ports, _port_check),
            (operation.methods, operation.not_methods, _method_check),
            (operation.hosts, operation.not_hosts, _host_check),
            (operation.paths, operation.not_paths, _paths),
        )
    )


def _condition_test(condition: Condition, values: list[str], namespace: str) -> _Cond:
    """Whether the request's attribute matches one of ``values``; None when it cannot be evaluated."""
    attribute, args = condition.attribute, condition.arguments
    if attribute == "request.headers":
        name, header = args[0], _Strings(values, star_matches_empty=True)

        def check_header(r: AuthzRequest) -> bool:
            value = r.headers.get(name)
            return value is not None and header(value)

        return check_header
    if attribute == "source.ip":
        return _source_ip(values)
    if attribute == "remote.ip":
        return _remote_ip(values)
    if attribute == "destination.ip":
        dest = _ip_blocks(values)
        return lambda r: None if r.destination_ip is None else dest(r.destination_ip)
    if attribute == "destination.port":
        return _port_check(values)
    if attribute == "source.principal":
        return _on_peer(_principals(values))
    if attribute == "source.namespace":
        return _on_peer(_namespaces(values))
    if attribute == "source.serviceAccount":
        return _on_peer(_service_accounts(values, namespace))
    if attribute == "request.auth.principal":
        return _request_principals(values)
    if attribute == "request.auth.audiences":
        return _claims(("aud",), values)
    if attribute == "request.auth.presenter":
        return _claims(("azp",), values)
    if attribute == "request.auth.claims":
        return _claims(args, values)
    if attribute == "connection.sni":
        sni = _Strings(values)
        return lambda r: None if r.sni is None else sni(r.sni)
    if attribute.startswith(("experimental.", "request.experimental.")):
        return lambda r: None  # Envoy-internal: meshlib never has it
    raise ValueError(f"`when` key {condition.key!r} has no matcher in meshlib's authorizer")


def _condition(condition: Condition, namespace: str) -> _Cond:
    """``values`` (one must match) AND ``notValues`` (none may match), or None when unknown."""
    positive = _condition_test(condition, condition.values, namespace) if condition.values else None
    negative = _condition_test(condition, condition.not_values, namespace) if condition.not_values else None

    def check(request: AuthzRequest) -> bool | None:
        if positive is not None:
            hit = positive(request)
            if not hit:
                return hit
        if negative is not None:
            hit = negative(request)
            if hit is None:
                return None
            if hit:
                return False
        return True

    return check


def _all(checks: tuple[_Check, ...], request: AuthzRequest) -> bool:
    for check in checks:  # noqa: SIM110 - a loop allocates no generator per request
        if not check(request):
            return False
    return True


class _Rule:
    """One rule: any source AND any operation AND every condition (a missing part matches all)."""

    __slots__ = ("conditions", "operations", "sources", "unknown")

    def __init__(self, rule: Rule, namespace: str, *, unknown_matches: bool) -> None:
        self.sources = tuple(_source_checks(item.source, namespace) for item in rule.from_)
        self.operations = tuple(_operation_checks(item.operation) for item in rule.to)
        self.conditions = tuple(_condition(c, namespace) for c in rule.when)
        self.unknown = unknown_matches

    def matches(self, request: AuthzRequest) -> bool:
        if self.sources and not any(_all(checks, request) for checks in self.sources):
            return False
        if self.operations and not any(_all(checks, request) for checks in self.operations):
            return False
        for condition in self.conditions:
            hit = condition(request)
            if not (self.unknown if hit is None else hit):
                return False
        return True


class _Policy:
    """A compiled policy with its answers prepared, so a decision allocates nothing when it can."""

    __slots__ = ("action", "check", "decision", "dry_run", "reason", "ref", "rules")

    def __init__(self, policy: AuthorizationPolicy) -> None:
        spec = policy.spec
        self.ref = policy.ref
        self.action = spec.action
        self.dry_run = is_dry_run(policy.metadata.annotations)
        # An ALLOW rule that cannot be evaluated must not grant access; elsewhere it widens the rule.
        unknown = spec.action != "ALLOW"
        # ``rules`` unset (or ``[]``) never matches: an ALLOW policy without rules denies everything.
        self.rules = tuple(_Rule(r, policy.namespace, unknown_matches=unknown) for r in spec.rules or ())
        self.check = CustomCheck(self.ref, spec.provider.name if spec.provider is not None else "")
        if spec.action == "DENY":
            self.reason = f"denied by DENY policy {self.ref}"
        else:
            self.reason = f"allowed by {self.ref}"
        self.decision = AuthzDecision(spec.action != "DENY", self.ref, self.reason)

    def matches(self, request: AuthzRequest) -> bool:
        for rule in self.rules:  # noqa: SIM110 - a loop allocates no generator per request
            if rule.matches(request):
                return True
        return False


class Authorizer:
    """The AuthorizationPolicies of one workload, compiled once per snapshot; see the module doc.

    Pure and immutable: build a new one when the snapshot changes. ``normalization``
    is the MeshConfig's path normalisation mode, for the adapter to apply before
    building the :class:`AuthzRequest`.
    """

    def __init__(self, snapshot: Snapshot, workload: Workload | str) -> None:
        self.workload = Workload.coerce(workload)
        self.version = snapshot.version
        self.normalization: NormalizationMode = normalization_mode(snapshot.mesh_config)
        applied = [p for p in snapshot.authorization_policies(self.workload) if not p.spec.uses_target_refs]
        self.policies: tuple[str, ...] = tuple(p.ref for p in applied)
        compiled = [_Policy(p) for p in applied]
        enforced = [p for p in compiled if not p.dry_run]
        self._custom = tuple(p for p in enforced if p.action == "CUSTOM")
        self._deny = tuple(p for p in enforced if p.action == "DENY")
        self._allow = tuple(p for p in enforced if p.action == "ALLOW")
        self._audit = tuple(p for p in enforced if p.action == "AUDIT")
        self._dry_run = tuple(p for p in compiled if p.dry_run)

    def __repr__(self) -> str:
        return f"<Authorizer {self.workload.namespace}/{self.workload.name} policies={len(self.policies)}>"

    def custom(self, request: AuthzRequest) -> tuple[CustomCheck, ...]:
        """The enforced CUSTOM policies whose rules match, in name order: ask each provider, deny on any no."""
        if not self._custom:
            return ()
        return tuple(p.check for p in self._custom if p.matches(request))

    def decide(self, request: AuthzRequest) -> AuthzDecision:
        """DENY, then ALLOW, as Istio orders them after CUSTOM; AUDIT and dry-run are only reported."""
        audit: str | None = None
        for p in self._audit:
            if p.matches(request):
                audit = p.ref
                break
        shadow = tuple(ShadowResult(p.ref, p.action, p.matches(request)) for p in self._dry_run)
        plain = audit is None and not shadow
        for p in self._deny:
            if p.matches(request):
                return p.decision if plain else AuthzDecision(False, p.ref, p.reason, audit, shadow)
        if not self._allow:
            return _NO_ALLOW_POLICY if plain else AuthzDecision(True, None, _NO_ALLOW_POLICY.reason, audit, shadow)
        for p in self._allow:
            if p.matches(request):
                return p.decision if plain else AuthzDecision(True, p.ref, p.reason, audit, shadow)
        return _NO_ALLOW_MATCHED if plain else AuthzDecision(False, None, _NO_ALLOW_MATCHED.reason, audit, shadow)
