"""Istio's security resources: ``PeerAuthentication`` and ``AuthorizationPolicy`` specs.

The models accept what Istio accepts and refuse what Istio's validation webhook
refuses (``pkg/config/validation`` and ``pkg/config/security`` in istio/istio), with
the field named, so a policy that would be rejected by ``kubectl apply`` is rejected
by ``meshlib validate`` too. Two rules are stricter than Istio, on purpose, because
Istio silently accepts a policy that can never do what its author meant:

- a ``*`` anywhere but at the start or the end of a value (``a*b``): Istio matches it
  as a literal star, which is never what was meant;
- ``from: []`` / ``to: []``: Istio's validator refuses them, but Kubernetes may turn
  them into "unset", which matches *every* source/operation.

Fields that are valid Istio but that meshlib does not act on are declared with
:func:`~meshlib.policy._base.unenforced` and show up as warnings in ``meshlib validate``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from ._base import MeshModel, unenforced
from ._values import LabelSelector

__all__ = [
    "DRY_RUN_ANNOTATION",
    "JWT_WHY",
    "AuthorizationAction",
    "AuthorizationPolicySpec",
    "Condition",
    "ExtensionProvider",
    "MtlsMode",
    "MutualTls",
    "Operation",
    "PeerAuthenticationSpec",
    "PolicyTargetReference",
    "Rule",
    "RuleFrom",
    "RuleTo",
    "Source",
    "dry_run_annotation_problem",
    "is_dry_run",
    "parse_ip_block",
]

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
"""PeerAuthentication modes: UNSET inherits (PERMISSIVE at the top), STRICT requires a client cert."""

AuthorizationAction = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]

DRY_RUN_ANNOTATION = "istio.io/dry-run"
"""An AuthorizationPolicy with this annotation set to true is evaluated and logged, never enforced."""

JWT_WHY = "enforced only when a JWT hook is configured"
_TARGET_REF_WHY = "meshlib has no Gateway API: a policy attached with targetRef(s) applies to no meshlib workload"
_SNI_WHY = "meshlib's servers do not expose the TLS SNI of inbound connections to policy"
_EXPERIMENTAL_WHY = "Envoy-internal attribute: meshlib is not Envoy"


# --------------------------------------------------------------------------- values


def _check_not_empty(values: list[str]) -> None:
    for v in values:
        if v == "":
            raise ValueError("empty value not allowed")


def _check_wildcards(values: list[str]) -> None:
    """Istio string matching: exact, ``prefix*``, ``*suffix`` or ``*`` (presence)."""
    for v in values:
        stars = v.count("*")
        if v == "*" or stars == 0 or (stars == 1 and (v.startswith("*") or v.endswith("*"))):
            continue
        raise ValueError(
            f"{v!r} has a '*' that is not a lone '*', a prefix ('*suffix') or a suffix ('prefix*'): "
            "Istio would match it as a literal star"
        )


def _match_values(values: list[str]) -> list[str]:
    _check_not_empty(values)
    _check_wildcards(values)
    return values


_PREFIX_BITS = re.compile(r"^(0|[1-9][0-9]{0,2})\Z")


def parse_ip_block(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse an ``ipBlocks`` entry as Istio does (Go's ``netip``): an address or ``addr/bits``.

    Host bits are allowed, as Istio allows them: ``10.1.2.3/16`` means ``10.1.0.0/16``.
    Netmask forms (``10.0.0.0/255.0.0.0``), leading zeros and IPv6 zones are refused.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"bad IP address {value!r}")
    addr, slash, bits = value.partition("/")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        what = "CIDR range" if slash else "IP address"
        raise ValueError(f"bad {what} {value!r}: not an IP address or CIDR (like 10.0.0.1 or 10.0.0.0/16)") from None
    if "%" in addr:
        raise ValueError(f"bad IP address {value!r}: IPv6 zones are not supported")
    if not slash:
        return ipaddress.ip_network(ip)
    if not _PREFIX_BITS.match(bits) or int(bits) > ip.max_prefixlen:
        raise ValueError(f"bad CIDR range {value!r}: the prefix length must be 0..{ip.max_prefixlen}")
    return ipaddress.ip_network(f"{ip}/{bits}", strict=False)


def _ip_values(values: list[str]) -> list[str]:
    _check_not_empty(values)
    for v in values:
        parse_ip_block(v)
    return values


_DIGITS = re.compile(r"^[0-9]+\Z")


def _port_values(values: list[str]) -> list[str]:
    _check_not_empty(values)
    for v in values:
        if not _DIGITS.match(v) or len(v) > 5 or int(v) > 65535:
            raise ValueError(f"bad port {v!r}: a port is a number 0..65535 written as a string, like '8080'")
    return values


# Envoy's URI template literals: RFC 3986 pchar, without '/'.
_PATH_LITERAL = re.compile(r"^[a-zA-Z0-9\-._~%!$&'()+,;:@=]+\Z")
_MATCH_ONE = "{*}"
_MATCH_ANY = "{**}"


def _check_path(path: str) -> None:
    """Istio's ``CheckValidPathTemplate``, plus the wildcard rule for plain paths."""
    is_template = _MATCH_ONE in path or _MATCH_ANY in path
    seen_any = False
    for glob in path.strip("/").split("/"):
        if glob in (_MATCH_ONE, _MATCH_ANY):
            if seen_any:
                raise ValueError(f"invalid path template {path!r}: '{{**}}' must be the last operator")
            seen_any = glob == _MATCH_ANY
            continue
        if "{" in glob or "}" in glob:
            raise ValueError(
                f"invalid path {path!r}: '{{' and '}}' are only allowed in the templates "
                "'{*}' (one segment) and '{**}' (any number of segments)"
            )
        if is_template and not _PATH_LITERAL.match(glob):
            raise ValueError(
                f"invalid path template {path!r}: segment {glob!r} must be a template or a literal "
                "(no '*', no empty segment)"
            )
    if is_template:
        if not path.startswith("/"):
            raise ValueError(f"invalid path template {path!r}: a template must start with '/'")
    else:
        _check_wildcards([path])


def _path_values(values: list[str]) -> list[str]:
    _check_not_empty(values)
    for v in values:
        _check_path(v)
    return values


def _service_account_values(values: list[str]) -> list[str]:
    """Istio's ``CheckServiceAccount``: ``sa`` or ``ns/sa``, no wildcard, at most 16 values."""
    if len(values) > 16:
        raise ValueError("at most 16 service accounts per list")
    for v in values:
        if v == "":
            raise ValueError("empty value not allowed")
        if "*" in v:
            raise ValueError(f"{v!r}: no wildcard is allowed in a service account")
        if v.count("/") > 1 or len(v) > 320:
            raise ValueError(f"{v!r}: expected 'serviceAccount' or 'namespace/serviceAccount'")
        ns, slash, sa = v.partition("/")
        if slash and (not ns or not sa):
            raise ValueError(f"{v!r}: expected 'serviceAccount' or 'namespace/serviceAccount'")
    return values


_Matches = Annotated[list[str], AfterValidator(_match_values)]
_IpBlocks = Annotated[list[str], AfterValidator(_ip_values)]


def _ports_are_strings(value: Any) -> Any:
    if isinstance(value, list):
        for v in value:
            if isinstance(v, int) and not isinstance(v, bool):
                raise ValueError(f"write port {v} as a string ('{v}'): Istio's ports are strings")
    return value


_Ports = Annotated[list[str], BeforeValidator(_ports_are_strings), AfterValidator(_port_values)]
_Paths = Annotated[list[str], AfterValidator(_path_values)]
_ServiceAccounts = Annotated[list[str], AfterValidator(_service_account_values)]


# ------------------------------------------------------------------ PeerAuthentication


class MutualTls(MeshModel):
    """``mtls: {mode: ...}``; an unset mode is UNSET (inherit from the namespace, then the mesh)."""

    mode: MtlsMode = "UNSET"


_PORT_KEY = re.compile(r"^[0-9]+\Z")


class PeerAuthenticationSpec(MeshModel):
    """Which mTLS mode a workload's server side accepts, optionally per port.

    No selector: the policy covers the namespace (the whole mesh in the root
    namespace). ``portLevelMtls`` keys are the workload's own port (the target port,
    not the service port) and need a selector, as in Istio.
    """

    selector: LabelSelector | None = None
    mtls: MutualTls = Field(default_factory=MutualTls)
    port_level_mtls: dict[int, MutualTls] = Field(default_factory=dict)

    @field_validator("port_level_mtls", mode="before")
    @classmethod
    def _port_keys(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("portLevelMtls is a map from port number to {mode: ...}")
        if not value:
            raise ValueError("portLevelMtls, if set, must list at least one port")
        ports: dict[int, Any] = {}
        for key, item in value.items():
            if isinstance(key, bool) or not (
                isinstance(key, int) or (isinstance(key, str) and _PORT_KEY.match(key.strip()))
            ):
                raise ValueError(f"portLevelMtls key {key!r} is not a port number")
            if isinstance(key, str) and len(key.strip().lstrip("0")) > 5:
                # Not int(key): Python refuses to convert more than 4300 digits, with its own message.
                raise ValueError(f"portLevelMtls port {key.strip()[:12]}... is out of range 1..65535")
            port = int(key)
            if not 1 <= port <= 65535:
                raise ValueError(f"portLevelMtls port {port} is out of range 1..65535")
            if port in ports:
                raise ValueError(f"portLevelMtls lists port {port} twice")
            ports[port] = item
        return ports

    @model_validator(mode="after")
    def _needs_selector(self) -> PeerAuthenticationSpec:
        if self.port_level_mtls and (self.selector is None or not self.selector.match_labels):
            raise ValueError(
                "portLevelMtls needs a selector with matchLabels: a namespace- or mesh-wide "
                "PeerAuthentication cannot set per-port mTLS (Istio's rule)"
            )
        return self

    def mode_for_port(self, port: int) -> MtlsMode:
        """The mode this policy sets for ``port``: the port's own, else the workload-wide one.

        UNSET means "inherit": the caller resolves it against the namespace and mesh policies.
        """
        per_port = self.port_level_mtls.get(port)
        if per_port is not None and per_port.mode != "UNSET":
            return per_port.mode
        return self.mtls.mode


# ---------------------------------------------------------------- AuthorizationPolicy


class Source(MeshModel):
    """Who sends the request. Fields AND together; values inside one field OR.

    ``principals`` are SPIFFE ids without ``spiffe://`` (``cluster.local/ns/N/sa/S``);
    ``serviceAccounts`` are ``ns/sa`` (or ``sa`` in the policy's namespace) and cannot
    be mixed with principals or namespaces in one source (Istio's rule).
    """

    principals: _Matches = Field(default_factory=list)
    not_principals: _Matches = Field(default_factory=list)
    request_principals: _Matches = unenforced(JWT_WHY, default=[])
    not_request_principals: _Matches = unenforced(JWT_WHY, default=[])
    namespaces: _Matches = Field(default_factory=list)
    not_namespaces: _Matches = Field(default_factory=list)
    ip_blocks: _IpBlocks = Field(default_factory=list)
    not_ip_blocks: _IpBlocks = Field(default_factory=list)
    remote_ip_blocks: _IpBlocks = Field(default_factory=list)
    not_remote_ip_blocks: _IpBlocks = Field(default_factory=list)
    service_accounts: _ServiceAccounts = Field(default_factory=list)
    not_service_accounts: _ServiceAccounts = Field(default_factory=list)

    @model_validator(mode="after")
    def _coherent(self) -> Source:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("a source must set at least one field (principals, namespaces, ipBlocks...)")
        if (self.service_accounts or self.not_service_accounts) and (
            self.principals or self.not_principals or self.namespaces or self.not_namespaces
        ):
            raise ValueError(
                "serviceAccounts/notServiceAccounts cannot be set with principals or namespaces in the same "
                "source (Istio's rule): use a second source"
            )
        return self


class Operation(MeshModel):
    """What the request does. Fields AND together; values inside one field OR.

    ``paths`` take exact, ``prefix*``, ``*suffix``, ``*`` or a template with ``{*}``
    (one segment) and ``{**}`` (any number; it must be the last template operator).
    ``ports`` are numeric strings.
    """

    hosts: _Matches = Field(default_factory=list)
    not_hosts: _Matches = Field(default_factory=list)
    ports: _Ports = Field(default_factory=list)
    not_ports: _Ports = Field(default_factory=list)
    methods: _Matches = Field(default_factory=list)
    not_methods: _Matches = Field(default_factory=list)
    paths: _Paths = Field(default_factory=list)
    not_paths: _Paths = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> Operation:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("an operation must set at least one field (hosts, ports, methods, paths...)")
        return self


_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]\Z")
_INLINE_HEADER_KEY = re.compile(r"^request\.experimental\.inline\.headers\[([^\[\]]+)\]\Z")
_CLAIMS_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)\Z")
_EXPERIMENTAL_KEY = re.compile(r"^experimental\.envoy\.filters\.[^\[\]]+\[[^\[\]]+\]\Z")
_PLAIN_KEYS = {
    "source.ip": "ip",
    "remote.ip": "ip",
    "destination.ip": "ip",
    "destination.port": "port",
    "source.namespace": "match",
    "source.principal": "match",
    "source.serviceAccount": "service_account",
    "request.auth.principal": "match",
    "request.auth.audiences": "match",
    "request.auth.presenter": "match",
    "connection.sni": "match",
}
_REPLACED_KEYS = {
    "destination.namespace": "attribute destination.namespace is replaced by the policy's metadata.namespace",
    "destination.name": "attribute destination.name is deprecated (only supported in Istio's v1alpha1)",
    "destination.user": "attribute destination.user is deprecated (only supported in Istio's v1alpha1)",
}
_SUPPORTED_KEYS = (
    "request.headers[<name>], source.ip, remote.ip, source.namespace, source.principal, "
    "source.serviceAccount, request.auth.principal, request.auth.audiences, request.auth.presenter, "
    "request.auth.claims[<claim>], destination.ip, destination.port, connection.sni, "
    "experimental.envoy.filters.<filter>[<key>]"
)


def _classify_key(key: str) -> tuple[str, str, tuple[str, ...]]:
    """``(attribute, value kind, arguments)`` of a ``when`` key, or ValueError naming it."""
    if key in _PLAIN_KEYS:
        return key, _PLAIN_KEYS[key], ()
    if m := _HEADER_KEY.match(key):
        return "request.headers", "match", (m.group(1).lower(),)
    if m := _INLINE_HEADER_KEY.match(key):
        return "request.experimental.inline.headers", "match", (m.group(1).lower(),)
    if m := _CLAIMS_KEY.match(key):
        return "request.auth.claims", "match", tuple(m.group(1)[1:-1].split("]["))
    if _EXPERIMENTAL_KEY.match(key):
        name, _, rest = key.partition("[")
        return name, "any", (rest[:-1],)
    if key in _REPLACED_KEYS:
        raise ValueError(f"unsupported `when` key {key!r}: {_REPLACED_KEYS[key]}")
    if key.startswith("destination.labels"):
        raise ValueError(f"unsupported `when` key {key!r}: destination labels are chosen by the selector")
    for prefix in ("request.headers", "request.auth.claims", "experimental.envoy.filters."):
        if key.startswith(prefix):
            raise ValueError(f"bad `when` key {key!r}: write it as {prefix.rstrip('.')}[<name>]")
    raise ValueError(f"unknown `when` key {key!r}: use one of {_SUPPORTED_KEYS}")


def _any_values(values: list[str]) -> list[str]:
    _check_not_empty(values)
    return values


_VALUE_CHECKS: dict[str, Callable[[list[str]], list[str]]] = {
    "ip": _ip_values,
    "port": _port_values,
    "match": _match_values,
    "service_account": _service_account_values,
    "any": _any_values,
}


class Condition(MeshModel):
    """``when: [{key, values, notValues}]``: one attribute of the request.

    The request matches when the attribute equals one of ``values`` (if set) and none
    of ``notValues``. ``attribute`` and ``arguments`` give the key parsed: for
    ``request.headers[X-Token]`` they are ``"request.headers"`` and ``("x-token",)``
    (header names match case-insensitively).
    """

    key: str
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Condition:
        _, kind, _ = _classify_key(self.key)
        if not self.values and not self.not_values:
            raise ValueError(f"`when` key {self.key!r} needs values or notValues")
        check = _VALUE_CHECKS[kind]
        for field, values in (("values", self.values), ("notValues", self.not_values)):
            try:
                check(values)
            except ValueError as exc:
                raise ValueError(f"`when` key {self.key!r}, {field}: {exc}") from None
        return self

    @property
    def attribute(self) -> str:
        return _classify_key(self.key)[0]

    @property
    def arguments(self) -> tuple[str, ...]:
        return _classify_key(self.key)[2]

    @property
    def unenforced_reason(self) -> str | None:
        """Why meshlib does not evaluate this condition, or None when it does."""
        return _UNENFORCED_KEYS.get(type(self))


class _JwtCondition(Condition):
    key: str = unenforced(JWT_WHY, default=...)


class _SniCondition(Condition):
    key: str = unenforced(_SNI_WHY, default=...)


class _ExperimentalCondition(Condition):
    key: str = unenforced(_EXPERIMENTAL_WHY, default=...)


_UNENFORCED_KEYS: dict[type[Condition], str] = {
    _JwtCondition: JWT_WHY,
    _SniCondition: _SNI_WHY,
    _ExperimentalCondition: _EXPERIMENTAL_WHY,
}


def _condition_class(key: str) -> type[Condition]:
    if key.startswith("request.auth."):
        return _JwtCondition
    if key == "connection.sni":
        return _SniCondition
    if key.startswith(("experimental.", "request.experimental.")):
        return _ExperimentalCondition
    return Condition


class RuleFrom(MeshModel):
    """``from: [{source: ...}]``."""

    source: Source


class RuleTo(MeshModel):
    """``to: [{operation: ...}]``."""

    operation: Operation


class Rule(MeshModel):
    """One rule: any ``from`` source AND any ``to`` operation AND every ``when`` condition.

    A field left out matches everything, so the rule ``{}`` matches every request.
    """

    from_: list[RuleFrom] = Field(default_factory=list, alias="from")
    to: list[RuleTo] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)

    @field_validator("from_", "to")
    @classmethod
    def _explicit_empty(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("must not be an empty list: leave the field out to match everything")
        return value

    @field_validator("when")
    @classmethod
    def _mark_unenforced(cls, value: list[Condition]) -> list[Condition]:
        marked: list[Condition] = []
        for cond in value:
            target = _condition_class(cond.key)
            if target is not type(cond):
                cond = target.model_construct(_fields_set=set(cond.model_fields_set), **dict(cond))
            marked.append(cond)
        return marked

    @property
    def matches_everything(self) -> bool:
        """The rule ``{}``: no source, operation or condition to check."""
        return not self.from_ and not self.to and not self.when


class ExtensionProvider(MeshModel):
    """``provider: {name}``: the external authorizer a CUSTOM policy delegates to."""

    name: str

    @field_validator("name")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("provider.name must not be empty")
        return value


class PolicyTargetReference(MeshModel):
    """Gateway API ``targetRef``: accepted so real policies load, not acted on."""

    group: str = ""
    kind: str
    name: str
    namespace: str = ""


_CUSTOM_UNSUPPORTED_SOURCE = (
    "principals",
    "not_principals",
    "request_principals",
    "not_request_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
)


class AuthorizationPolicySpec(MeshModel):
    """Who may call what on the selected workloads.

    Order across policies (Istio's): CUSTOM denies first, then any matching DENY
    denies, then with no ALLOW policy the request passes, else one matching ALLOW
    rule is needed. AUDIT never changes the answer.

    ``rules`` keeps Istio's distinction: ``None`` (unset, or ``[]``, which Kubernetes
    stores as unset) never matches, so an ALLOW policy without rules denies every
    request; ``[{}]`` is one rule that matches every request.
    """

    selector: LabelSelector | None = None
    target_ref: PolicyTargetReference | None = unenforced(_TARGET_REF_WHY)
    target_refs: list[PolicyTargetReference] = unenforced(_TARGET_REF_WHY, default=[])
    action: AuthorizationAction = "ALLOW"
    provider: ExtensionProvider | None = None
    rules: list[Rule] | None = None

    @field_validator("rules", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == [] else value

    @model_validator(mode="after")
    def _istio_rules(self) -> AuthorizationPolicySpec:
        attached = [n for n, v in (("selector", self.selector), ("targetRef", self.target_ref)) if v is not None]
        if self.target_refs:
            attached.append("targetRefs")
        if len(attached) > 1:
            raise ValueError(f"set only one of selector, targetRef or targetRefs, not {' and '.join(attached)}")
        if self.action == "CUSTOM":
            self._check_custom()
        elif self.provider is not None:
            raise ValueError(f"provider is only for action CUSTOM, not {self.action}")
        if self.action == "DENY" and self.rules is None:
            raise ValueError("a DENY policy without rules never matches: add the rule `{}` to deny every request")
        return self

    def _check_custom(self) -> None:
        if self.rules is None:
            raise ValueError(
                "a CUSTOM policy without rules is never triggered: add the rule `{}` to send every request "
                "to the provider"
            )
        if self.provider is None:
            raise ValueError("action CUSTOM needs provider.name (the external authorizer to ask)")
        for i, rule in enumerate(self.rules):
            for j, item in enumerate(rule.from_):
                for name in _CUSTOM_UNSUPPORTED_SOURCE:
                    if getattr(item.source, name):
                        alias = Source.model_fields[name].alias or name
                        raise ValueError(
                            f"rules[{i}].from[{j}].source.{alias} is not supported with action CUSTOM (Istio's rule)"
                        )
            for j, cond in enumerate(rule.when):
                if cond.key in ("source.namespace", "source.serviceAccount", "source.principal") or (
                    cond.key.startswith("request.auth.")
                ):
                    raise ValueError(
                        f"rules[{i}].when[{j}] key {cond.key!r} is not supported with action CUSTOM (Istio's rule)"
                    )

    @property
    def uses_target_refs(self) -> bool:
        """Attached with targetRef(s): meshlib applies such a policy to no workload."""
        return self.target_ref is not None or bool(self.target_refs)

    @staticmethod
    def is_dry_run(annotations: Mapping[str, str]) -> bool:
        """Same as the module's :func:`is_dry_run`."""
        return is_dry_run(annotations)


# Go's strconv.ParseBool, which Istio uses for the annotation.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def is_dry_run(annotations: Mapping[str, str]) -> bool:
    """Whether ``istio.io/dry-run`` marks the policy as dry-run (evaluated and logged, not enforced).

    Values are read as Istio reads them (Go's ``ParseBool``: ``true``, ``True``, ``1``...);
    an unreadable value counts as false, so the policy is enforced.
    """
    return annotations.get(DRY_RUN_ANNOTATION, "") in _TRUE


def dry_run_annotation_problem(annotations: Mapping[str, str]) -> str | None:
    """A warning when ``istio.io/dry-run`` holds a value that is neither true nor false."""
    value = annotations.get(DRY_RUN_ANNOTATION)
    if value is None or value in _TRUE or value in _FALSE:
        return None
    return f"annotation {DRY_RUN_ANNOTATION}={value!r} is neither true nor false: the policy is enforced"
