"""The ``spec`` of Istio's networking kinds: VirtualService, DestinationRule, ServiceEntry.

Teams that already run Istio hand meshlib the YAML they have, so these models
follow ``istio/api`` networking v1 field by field, with Istio's defaults and the
checks Istio's admission webhook makes (weights, retry conditions, durations,
unique subset and port names...). A typo or a value Istio would refuse is an
error here, at load time, never a surprise at request time. Fields that are
valid Istio but that meshlib does not act on are declared with
:func:`~._base.unenforced` so that ``meshlib validate`` names them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator, model_validator

from ._base import MeshModel, unenforced
from ._values import Duration, LabelSelector, Percent, StringMatch, check_labels, format_duration

__all__ = [
    "ClientTLSSettings",
    "ConnectionPoolSettings",
    "ConsistentHashLB",
    "CorsPolicy",
    "Delegate",
    "Destination",
    "DestinationRuleSpec",
    "FaultAbort",
    "FaultDelay",
    "HTTPBody",
    "HTTPCookie",
    "HTTPDirectResponse",
    "HTTPFaultInjection",
    "HTTPMatchRequest",
    "HTTPMirrorPolicy",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HTTPRouteDestination",
    "HTTPSettings",
    "HeaderOperations",
    "Headers",
    "L4MatchAttributes",
    "LoadBalancerSettings",
    "LocalityDistribute",
    "LocalityFailover",
    "LocalityLoadBalancerSetting",
    "MagLev",
    "OutlierDetection",
    "PortSelector",
    "PortTrafficPolicy",
    "ProxyProtocol",
    "RETRY_ON_CONDITIONS",
    "RegexRewrite",
    "RetryBudget",
    "RingHash",
    "RouteDestination",
    "ServiceEntrySpec",
    "ServicePort",
    "Subset",
    "TCPRoute",
    "TCPSettings",
    "TLSMatchAttributes",
    "TLSRoute",
    "TcpKeepalive",
    "TrafficPolicy",
    "TunnelSettings",
    "UNLIMITED",
    "VirtualServiceSpec",
    "WarmupConfiguration",
    "WorkloadEntry",
]

UNLIMITED = 2**32 - 1
"""Istio's default for connection-pool limits (Envoy's circuit breakers are then never hit)."""

RETRY_ON_CONDITIONS = frozenset(
    {
        # x-envoy-retry-on
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        # x-envoy-retry-grpc-on
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
"""The ``retryOn`` conditions Istio accepts (besides HTTP status codes)."""

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_HEADER_NAME = re.compile(r"^[-_a-z0-9]+\Z")
_PROTOCOLS = frozenset(
    {"HTTP", "HTTPS", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-WEB", "TCP", "TLS", "UDP", "MONGO", "MYSQL", "REDIS"}
)

# ---------------------------------------------------------------------------- value helpers


def _ms(seconds: float) -> str:
    return format_duration(seconds)


def _at_least_1ms(seconds: float) -> float:
    # Istio's ValidateDuration: at least 1ms, and no finer than a millisecond.
    if seconds < 1e-3 - 1e-12:
        raise ValueError(f"duration {_ms(seconds)} is shorter than Istio's minimum of 1ms")
    if abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
        raise ValueError(f"duration {_ms(seconds)} is finer than a millisecond, which Istio does not support")
    return seconds


def _zero_or_at_least_1ms(seconds: float) -> float:
    return seconds if seconds == 0 else _at_least_1ms(seconds)


MsDuration = Annotated[Duration, AfterValidator(_at_least_1ms)]
"""A duration Istio requires to be >= 1ms, in whole milliseconds."""

Timeout = Annotated[Duration, AfterValidator(_zero_or_at_least_1ms)]
"""A route timeout: 0s turns it off, otherwise >= 1ms."""


def _port_number(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is not in 1..65535")
    return value


PortNumber = Annotated[int, AfterValidator(_port_number)]


def _percent_int(value: int) -> int:
    if not 0 <= value <= 100:
        raise ValueError(f"percent {value} is not in 0..100")
    return value


PercentInt = Annotated[int, AfterValidator(_percent_int)]
"""The old integer percentage fields (``percent``, ``mirrorPercent``): 0..100."""


def _zero_means(default: int) -> BeforeValidator:
    # proto3 int32 fields: 0 is "unset", and Istio then applies its default.
    def convert(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value == 0:
            return default
        return value

    return BeforeValidator(convert)


Limit = Annotated[int, _zero_means(UNLIMITED), Field(ge=0)]
"""A connection-pool limit; 0 or unset means Istio's default, 2^32-1."""


def _labels(value: dict[str, str]) -> dict[str, str]:
    return check_labels(value)


Labels = Annotated[dict[str, str], AfterValidator(_labels)]


def _check_host(host: str, what: str = "host") -> str:
    if not host or host != host.strip() or any(c.isspace() for c in host):
        raise ValueError(f"invalid {what} {host!r}")
    return host


def _header_names(value: Any, what: str) -> Any:
    if not isinstance(value, dict):
        return value
    for name in value:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: a header name cannot be empty")
        if name != name.lower():
            raise ValueError(
                f"{what}: header name {name!r} has upper-case letters; Istio requires lower-case header names"
                f" (write {name.lower()!r})"
            )
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{what}: {name!r} is not a valid header name (letters, digits, '-' and '_')")
    return value


# ---------------------------------------------------------------------------- VirtualService


class PortSelector(MeshModel):
    """``port: {number: N}``: a port of the destination service."""

    number: PortNumber


class Destination(MeshModel):
    """Where a request goes: a host, optionally a DestinationRule subset and a port."""

    host: str
    subset: str | None = None
    port: PortSelector | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v == "*":
            raise ValueError("destination host cannot be '*'")
        return _check_host(v, "destination host")

    @field_validator("subset")
    @classmethod
    def _subset(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_LABEL.match(v):
            raise ValueError(f"invalid subset name {v!r}: use a DNS label (lower-case letters, digits, '-')")
        return v


class HeaderOperations(MeshModel):
    """Header changes: ``set`` replaces, ``add`` appends, ``remove`` deletes."""

    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> Self:
        for name in [*self.set, *self.add, *self.remove]:
            if not name:
                raise ValueError("a header name cannot be empty")
        return self


class Headers(MeshModel):
    """``headers: {request: ..., response: ...}`` manipulation rules."""

    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPMatchRequest(MeshModel):
    """One match entry: all its conditions must hold (entries of a route's ``match`` OR)."""

    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    port: PortNumber | None = None
    source_labels: Labels = Field(default_factory=dict)
    ignore_uri_case: bool = False
    gateways: list[str] | None = unenforced("meshlib has no gateways; the match applies to every caller")
    source_namespace: str | None = unenforced("meshlib does not match on the caller's namespace in routes")
    stat_prefix: str | None = unenforced("meshlib's metrics have no per-match stat prefix")

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, v: Any) -> Any:
        return _header_names(v, "headers")

    @field_validator("without_headers", mode="before")
    @classmethod
    def _without_headers(cls, v: Any) -> Any:
        v = _header_names(v, "withoutHeaders")
        if isinstance(v, dict):
            # Istio reads ``regex: "*"`` here as "present", not as a regular expression.
            v = {k: ({} if isinstance(m, dict) and m == {"regex": "*"} else m) for k, m in v.items()}
        return v

    @field_validator("query_params")
    @classmethod
    def _query_params(cls, v: dict[str, StringMatch]) -> dict[str, StringMatch]:
        for name in v:
            if not name:
                raise ValueError("queryParams: a parameter name cannot be empty")
        return v


class HTTPRouteDestination(MeshModel):
    """A weighted destination of a route; weights are relative (Istio divides by their sum)."""

    destination: Destination
    weight: int = 0
    headers: Headers | None = None

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"weight {v} is negative: a weight is a share of the traffic, 0 or more")
        return v

    def effective_weight(self, n_destinations: int) -> int:
        """Istio's rule: a lone destination takes all the traffic whatever its weight."""
        return 100 if n_destinations == 1 else self.weight


class HTTPRedirect(MeshModel):
    """Answer with a redirect instead of forwarding."""

    uri: str | None = None
    authority: str | None = None
    port: PortNumber | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: Literal["http", "https"] | None = None
    redirect_code: int = 301

    @field_validator("redirect_code")
    @classmethod
    def _code(cls, v: int) -> int:
        if not 300 <= v <= 399:
            raise ValueError(f"{v} is not a valid redirect code, it must be 3xx")
        return v

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.port is not None and self.derive_port is not None:
            raise ValueError("a redirect takes port or derivePort, not both")
        if all(v is None for v in (self.uri, self.authority, self.scheme, self.port, self.derive_port)):
            raise ValueError("a redirect must set uri, authority, scheme or port")
        return self


class HTTPBody(MeshModel):
    """The body of a direct response: ``string`` or base64 ``bytes``."""

    string: str | None = None
    bytes_: str | None = Field(default=None, alias="bytes")

    @model_validator(mode="after")
    def _one(self) -> Self:
        if self.string is not None and self.bytes_ is not None:
            raise ValueError("a body takes string or bytes, not both")
        return self


class HTTPDirectResponse(MeshModel):
    """Answer with a fixed status and body instead of forwarding."""

    status: int
    body: HTTPBody | None = None

    @field_validator("status")
    @classmethod
    def _status(cls, v: int) -> int:
        if not 200 <= v <= 599:
            raise ValueError(f"HTTP status {v} is not in range 200-599")
        return v


class Delegate(MeshModel):
    """A VirtualService that holds this route's rules (Istio's delegation)."""

    name: str
    namespace: str | None = None


class RegexRewrite(MeshModel):
    """``uriRegexRewrite``: RE2 ``match`` replaced by ``rewrite`` (``\\1`` groups)."""

    match: str
    rewrite: str

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            StringMatch(regex=v)  # the same RE2 checks as a regex match
        except ValidationError as exc:
            raise ValueError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None
        return v


class HTTPRewrite(MeshModel):
    """Rewrite the path (``uri`` prefix or ``uriRegexRewrite``) and/or the authority."""

    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if self.uri is not None and self.uri_regex_rewrite is not None:
            raise ValueError("rewrite takes uri or uriRegexRewrite, not both")
        if self.uri is None and self.uri_regex_rewrite is None and self.authority is None:
            raise ValueError("rewrite must set uri, uriRegexRewrite or authority")
        return self


class HTTPRetry(MeshModel):
    """Retry policy: at most ``1 + attempts`` requests; ``attempts: 0`` turns retries off."""

    attempts: int = 0
    per_try_timeout: MsDuration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = unenforced("meshlib has no localities")
    retry_ignore_previous_hosts: bool | None = None
    backoff: MsDuration | None = None

    @field_validator("attempts")
    @classmethod
    def _attempts(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"attempts {v} is negative: use 0 to turn retries off")
        return v

    @field_validator("retry_on")
    @classmethod
    def _retry_on(cls, v: str | None) -> str | None:
        if v is None:
            return v
        for raw in v.split(","):
            item = raw.strip()
            if not item:
                raise ValueError(f"retryOn {v!r} has an empty entry")
            if item.isascii() and item.isdigit():  # not '²', which isdigit() but int() refuses
                if len(item) != 3 or not 100 <= int(item) <= 599:
                    shown = item if len(item) <= 12 else item[:12] + "..."
                    raise ValueError(f"retryOn status code {shown} is not in 100..599")
            elif item not in RETRY_ON_CONDITIONS:
                known = ", ".join(sorted(RETRY_ON_CONDITIONS))
                raise ValueError(f"{item!r} is not a retryOn condition; use HTTP status codes or one of: {known}")
        return v

    @model_validator(mode="after")
    def _disabled(self) -> Self:
        if self.attempts == 0 and (self.per_try_timeout is not None or self.retry_on is not None):
            raise ValueError(
                "retries set perTryTimeout or retryOn but attempts is 0 (retries off): set attempts, or remove them"
            )
        return self


def _fraction(percentage: Percent | None, percent: int | None) -> float:
    # Istio: the new ``percentage`` wins; else the old integer ``percent``; neither means nothing.
    if percentage is not None:
        return percentage.fraction
    if percent is not None:
        return percent / 100.0
    return 0.0


class FaultDelay(MeshModel):
    """Delay a share of the requests before forwarding them."""

    fixed_delay: MsDuration | None = None
    exponential_delay: Duration | None = unenforced("Istio itself does not support exponential delays")
    percentage: Percent | None = None
    percent: PercentInt | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        if self.fixed_delay is not None and self.exponential_delay is not None:
            raise ValueError("a delay takes fixedDelay or exponentialDelay, not both")
        if self.fixed_delay is None and self.exponential_delay is None:
            raise ValueError("a delay needs fixedDelay")
        return self

    @property
    def effective_fraction(self) -> float:
        """Share of the requests delayed, 0..1 (unset percentage: none)."""
        return _fraction(self.percentage, self.percent)


class FaultAbort(MeshModel):
    """Answer a share of the requests with an error instead of forwarding them."""

    http_status: int | None = None
    grpc_status: str | None = unenforced("meshlib aborts with HTTP statuses only")
    http2_error: str | None = unenforced("meshlib aborts with HTTP statuses only")
    percentage: Percent | None = None
    percent: PercentInt | None = None

    @field_validator("http_status")
    @classmethod
    def _status(cls, v: int | None) -> int | None:
        if v is not None and not 200 <= v <= 599:
            raise ValueError(f"HTTP status {v} is not in range 200-599")
        return v

    @model_validator(mode="after")
    def _one(self) -> Self:
        kinds = [k for k in ("http_status", "grpc_status", "http2_error") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError("an abort takes one of httpStatus, grpcStatus or http2Error")
        if not kinds:
            raise ValueError("an abort needs httpStatus")
        return self

    @property
    def effective_fraction(self) -> float:
        """Share of the requests aborted, 0..1 (unset percentage: none)."""
        return _fraction(self.percentage, self.percent)


class HTTPFaultInjection(MeshModel):
    """Fault injection on a route: a delay and/or an abort."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _some(self) -> Self:
        if self.delay is None and self.abort is None:
            raise ValueError("fault injection must have an abort and/or a delay")
        return self


class HTTPMirrorPolicy(MeshModel):
    """One entry of ``mirrors``: a destination and the share of traffic copied to it."""

    destination: Destination
    percentage: Percent | None = None

    @property
    def fraction(self) -> float:
        """Share of the requests mirrored, 0..1 (unset: all)."""
        return 1.0 if self.percentage is None else self.percentage.fraction


class CorsPolicy(MeshModel):
    """Cross-origin resource sharing settings."""

    allow_origins: list[StringMatch] = Field(default_factory=list)
    allow_origin: list[str] = Field(default_factory=list)
    allow_methods: list[str] = Field(default_factory=list)
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] | None = None


class HTTPRoute(MeshModel):
    """One HTTP rule: the first whose match holds decides what happens to the request."""

    name: str | None = None
    match: list[HTTPMatchRequest] = Field(default_factory=list)
    route: list[HTTPRouteDestination] = Field(default_factory=list)
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = unenforced("meshlib does not support delegate VirtualServices")
    rewrite: HTTPRewrite | None = None
    timeout: Timeout | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: list[HTTPMirrorPolicy] = Field(default_factory=list)
    mirror_percentage: Percent | None = None
    mirror_percent: PercentInt | None = None
    cors_policy: CorsPolicy | None = unenforced("meshlib does not answer CORS preflights; the app must")
    headers: Headers | None = None

    @model_validator(mode="after")
    def _rules(self) -> Self:
        actions = [
            alias
            for alias, value in (
                ("route", self.route),
                ("redirect", self.redirect),
                ("directResponse", self.direct_response),
                ("delegate", self.delegate),
            )
            if value
        ]
        if not actions:
            raise ValueError("an HTTP route needs one of route, redirect, directResponse or delegate")
        if len(actions) > 1:
            raise ValueError(f"an HTTP route takes one of route, redirect, directResponse or delegate, not {actions}")
        if actions[0] in ("redirect", "directResponse"):
            for alias, value in (("fault", self.fault), ("rewrite", self.rewrite)):
                if value is not None:
                    raise ValueError(f"an HTTP route cannot have both {actions[0]} and {alias}")
        if self.mirror is not None and self.mirrors:
            raise ValueError("an HTTP route takes mirror or mirrors, not both")
        if len(self.route) > 1 and all(d.weight == 0 for d in self.route):
            raise ValueError(
                f"the weights of the {len(self.route)} destinations are all 0 (total destination weight = 0):"
                " give at least one a positive weight"
            )
        return self

    @property
    def destination_weights(self) -> tuple[int, ...]:
        """Effective weight of each destination of ``route`` (a lone one gets 100)."""
        n = len(self.route)
        return tuple(d.effective_weight(n) for d in self.route)

    @property
    def mirror_targets(self) -> tuple[tuple[Destination, float], ...]:
        """Every mirror destination with the share (0..1) of requests copied to it."""
        if self.mirror is not None:
            if self.mirror_percentage is not None:
                share = self.mirror_percentage.fraction
            elif self.mirror_percent is not None:
                share = self.mirror_percent / 100.0
            else:
                share = 1.0
            return ((self.mirror, share),)
        return tuple((m.destination, m.fraction) for m in self.mirrors)


class RouteDestination(MeshModel):
    """A weighted destination of a TCP or TLS route."""

    destination: Destination
    weight: int = Field(default=0, ge=0)


class L4MatchAttributes(MeshModel):
    """Match on a TCP connection."""

    destination_subnets: list[str] = Field(default_factory=list)
    port: PortNumber | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str | None = None


class TLSMatchAttributes(MeshModel):
    """Match on a TLS connection's SNI."""

    sni_hosts: list[str]
    destination_subnets: list[str] = Field(default_factory=list)
    port: PortNumber | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str | None = None


class TCPRoute(MeshModel):
    """A TCP route (accepted, not enforced: meshlib routes HTTP)."""

    match: list[L4MatchAttributes] = Field(default_factory=list)
    route: list[RouteDestination] = Field(default_factory=list)


class TLSRoute(MeshModel):
    """A TLS passthrough route (accepted, not enforced: meshlib routes HTTP)."""

    match: list[TLSMatchAttributes] = Field(default_factory=list)
    route: list[RouteDestination] = Field(default_factory=list)


class VirtualServiceSpec(MeshModel):
    """``VirtualService.spec``: the HTTP routing rules for some hosts."""

    hosts: list[str] = Field(default_factory=list)
    gateways: list[str] | None = unenforced("meshlib has no ingress gateways; the rules apply inside the mesh")
    http: list[HTTPRoute] = Field(default_factory=list)
    tls: list[TLSRoute] | None = unenforced("meshlib routes HTTP only")
    tcp: list[TCPRoute] | None = unenforced("meshlib routes HTTP only")
    export_to: list[str] | None = unenforced("visibility is mesh-wide in meshlib")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for host in v:
            _check_host(host)
            if host == "*":
                raise ValueError("wildcard host '*' is not allowed for a VirtualService inside the mesh")
            if host in seen:
                raise ValueError(f"duplicate host {host!r}")
            seen.add(host)
        return v

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if not self.hosts:
            raise ValueError("a VirtualService needs hosts (one without is a delegate, which meshlib does not support)")
        if not self.http and not self.tls and not self.tcp:
            raise ValueError("a VirtualService needs http (or tcp/tls) routes")
        return self


# ---------------------------------------------------------------------------- DestinationRule


class HTTPCookie(MeshModel):
    """A cookie used as the consistent-hash key (generated with ``ttl`` when absent)."""

    name: str
    path: str | None = None
    ttl: Duration | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v:
            raise ValueError("name required for httpCookie")
        return v


class RingHash(MeshModel):
    """Ring-hash algorithm settings."""

    minimum_ring_size: int = Field(default=1024, ge=0)


class MagLev(MeshModel):
    """Maglev algorithm settings."""

    table_size: int = 65537

    @field_validator("table_size")
    @classmethod
    def _prime(cls, v: int) -> int:
        if v <= 1 or v >= 5000011 or any(v % d == 0 for d in range(2, int(v**0.5) + 1)):
            raise ValueError(f"maglev tableSize {v} must be a prime number below 5000011")
        return v


class ConsistentHashLB(MeshModel):
    """Consistent hashing on exactly one key: a header, a cookie, the source IP or a query parameter."""

    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_key(self) -> Self:
        keys = [
            alias
            for alias, value in (
                ("httpHeaderName", self.http_header_name),
                ("httpCookie", self.http_cookie),
                ("useSourceIp", self.use_source_ip),
                ("httpQueryParameterName", self.http_query_parameter_name),
            )
            if value is not None
        ]
        if len(keys) != 1:
            what = "none" if not keys else " and ".join(keys)
            raise ValueError(
                "consistentHash takes exactly one key of httpHeaderName, httpCookie, useSourceIp or"
                f" httpQueryParameterName, got {what}"
            )
        if self.ring_hash is not None and self.maglev is not None:
            raise ValueError("consistentHash takes ringHash or maglev, not both")
        if self.minimum_ring_size and (self.ring_hash is not None or self.maglev is not None):
            raise ValueError("only one of minimumRingSize or maglev/ringHash can be specified")
        return self

    @property
    def algorithm(self) -> Literal["RING_HASH", "MAGLEV"]:
        """The hash algorithm in force (ring hash unless maglev is set)."""
        return "MAGLEV" if self.maglev is not None else "RING_HASH"

    @property
    def ring_size(self) -> int:
        """The ring hash's minimum ring size (1024 by default)."""
        if self.ring_hash is not None:
            return self.ring_hash.minimum_ring_size or 1024
        return self.minimum_ring_size or 1024


class LocalityDistribute(MeshModel):
    """Traffic from one locality spread over others by weight."""

    from_: str | None = Field(default=None, alias="from")
    to: dict[str, int] = Field(default_factory=dict)


class LocalityFailover(MeshModel):
    """The region that traffic from a region fails over to."""

    from_: str | None = Field(default=None, alias="from")
    to: str | None = None


class LocalityLoadBalancerSetting(MeshModel):
    """Locality-weighted load balancing (accepted, not enforced)."""

    distribute: list[LocalityDistribute] = Field(default_factory=list)
    failover: list[LocalityFailover] = Field(default_factory=list)
    failover_priority: list[str] = Field(default_factory=list)
    enabled: bool | None = None


class WarmupConfiguration(MeshModel):
    """Slow start for new endpoints (accepted, not enforced)."""

    duration: Duration | None = None
    minimum_percent: float | None = Field(default=None, ge=0, le=100)
    aggression: float | None = Field(default=None, ge=0)


class LoadBalancerSettings(MeshModel):
    """Load balancing: a ``simple`` algorithm or ``consistentHash``, not both."""

    simple: Literal["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"] | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = unenforced("meshlib has no localities")
    warmup_duration_secs: Duration | None = unenforced("meshlib does not warm up new endpoints")
    warmup: WarmupConfiguration | None = unenforced("meshlib does not warm up new endpoints")

    @model_validator(mode="after")
    def _one(self) -> Self:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("loadBalancer takes simple or consistentHash, not both")
        return self


class TcpKeepalive(MeshModel):
    """TCP keep-alive probes."""

    probes: int | None = Field(default=None, ge=0)
    time: Duration | None = None
    interval: Duration | None = None


class TCPSettings(MeshModel):
    """Connection limits common to HTTP and TCP."""

    max_connections: Limit = UNLIMITED
    connect_timeout: MsDuration = 10.0
    tcp_keepalive: TcpKeepalive | None = unenforced("meshlib leaves TCP keep-alive to the operating system")
    max_connection_duration: MsDuration | None = unenforced("meshlib does not cap a connection's lifetime")
    idle_timeout: Duration | None = unenforced("meshlib uses its HTTP client's idle timeout")


class HTTPSettings(MeshModel):
    """HTTP connection-pool limits (Envoy's circuit-breaker thresholds)."""

    http1_max_pending_requests: Limit = Field(default=UNLIMITED, alias="http1MaxPendingRequests")
    http2_max_requests: Limit = Field(default=UNLIMITED, alias="http2MaxRequests")
    max_requests_per_connection: int = unenforced(
        "1 turns keep-alive off (every attempt sends connection: close); above 1 meshlib's HTTP client"
        " reuses a connection for any number of requests",
        default=0,
        enforced=(0, 1),
        ge=0,
    )
    max_retries: Limit = UNLIMITED
    idle_timeout: Duration | None = unenforced("meshlib uses its HTTP client's idle timeout")
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = unenforced(
        "meshlib keeps the protocol its HTTP client negotiates", alias="h2UpgradePolicy"
    )
    use_client_protocol: bool | None = unenforced("meshlib keeps the protocol its HTTP client negotiates")
    max_concurrent_streams: int | None = unenforced("meshlib does not tune HTTP/2 streams", ge=0)

    @model_validator(mode="after")
    def _upgrade(self) -> Self:
        if self.h2_upgrade_policy == "UPGRADE" and self.use_client_protocol:
            raise ValueError("useClientProtocol must not be true when h2UpgradePolicy is UPGRADE")
        return self


class ConnectionPoolSettings(MeshModel):
    """Per-host connection and request limits; unset limits are Istio's (2^32-1, connect 10s)."""

    tcp: TCPSettings = Field(default_factory=TCPSettings)
    http: HTTPSettings = Field(default_factory=HTTPSettings)


class OutlierDetection(MeshModel):
    """Eject hosts that keep failing; defaults are Istio's."""

    consecutive_errors: int | None = Field(default=None, ge=0)
    split_external_local_origin_errors: bool | None = unenforced(
        "meshlib counts connect failures and timeouts as 5xx errors"
    )
    consecutive_local_origin_failures: int | None = unenforced(
        "meshlib counts connect failures and timeouts as 5xx errors", ge=0
    )
    consecutive_gateway_errors: int | None = Field(default=None, ge=0)
    consecutive_5xx_errors: int = Field(default=5, ge=0, alias="consecutive5xxErrors")
    interval: MsDuration = 10.0
    base_ejection_time: MsDuration = 30.0
    max_ejection_percent: Annotated[int, _zero_means(10), Field(ge=0, le=100)] = 10
    min_health_percent: int = Field(default=0, ge=0, le=100)

    @model_validator(mode="after")
    def _local_origin(self) -> Self:
        if self.consecutive_local_origin_failures and not self.split_external_local_origin_errors:
            raise ValueError("consecutiveLocalOriginFailures is set but splitExternalLocalOriginErrors is false")
        return self

    @property
    def five_xx_threshold(self) -> int:
        """Consecutive 5xx errors that eject a host; 0 = off.

        Istio's rule: the deprecated ``consecutiveErrors`` counts gateway errors only,
        so when it is set and ``consecutive5xxErrors`` is not, 5xx ejection is off.
        """
        if "consecutive_5xx_errors" in self.model_fields_set:
            return self.consecutive_5xx_errors
        if self.consecutive_errors:
            return 0
        return self.consecutive_5xx_errors

    @property
    def gateway_error_threshold(self) -> int:
        """Consecutive 502/503/504 (and connect failures) that eject a host; 0 = off."""
        if self.consecutive_gateway_errors is not None:
            return self.consecutive_gateway_errors
        return self.consecutive_errors or 0


class ClientTLSSettings(MeshModel):
    """TLS to the upstream: DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL (the mesh's own mTLS)."""

    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "DISABLE"
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = unenforced("meshlib reads certificates from files, not Kubernetes secrets")
    subject_alt_names: list[str] = Field(default_factory=list)
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = unenforced("meshlib does not check certificate revocation lists")

    @model_validator(mode="after")
    def _mutual(self) -> Self:
        if self.mode == "MUTUAL" and not self.credential_name:
            missing = [
                a
                for a, v in (("clientCertificate", self.client_certificate), ("privateKey", self.private_key))
                if not v
            ]
            if missing:
                raise ValueError(f"tls mode MUTUAL needs {' and '.join(missing)}")
        if self.insecure_skip_verify and self.mode in ("MUTUAL", "ISTIO_MUTUAL"):
            raise ValueError(f"insecureSkipVerify is not supported with tls mode {self.mode}")
        return self


class PortTrafficPolicy(MeshModel):
    """Policy for one port of the destination; it replaces, not inherits, the host's policy."""

    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TunnelSettings(MeshModel):
    """Tunnel TCP over HTTP CONNECT/POST (accepted, not enforced)."""

    protocol: Literal["CONNECT", "POST"] | None = None
    target_host: str
    target_port: PortNumber


class ProxyProtocol(MeshModel):
    """Send the PROXY protocol header upstream (accepted, not enforced)."""

    version: Literal["V1", "V2"] = "V1"


def _budget_percent(value: Any) -> Any:
    # Accept a plain number or Istio's ``Percent`` shape ``{value: N}``.
    if isinstance(value, dict) and set(value) <= {"value"}:
        return value.get("value", 0.0)
    return value


class RetryBudget(MeshModel):
    """Retries may be at most ``percent`` of active requests, never below ``minRetryConcurrency``."""

    percent: Annotated[float, BeforeValidator(_budget_percent), Field(ge=0, le=100, allow_inf_nan=False)] = 20.0
    min_retry_concurrency: int = Field(default=3, ge=0)
    budget_interval: Duration | None = unenforced("meshlib counts active requests, as Envoy does by default")


class TrafficPolicy(MeshModel):
    """What happens on the way to a destination: balancing, limits, ejection, TLS, retry budget."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] | None = unenforced(
        "meshlib applies one policy per host and subset, not per port"
    )
    tunnel: TunnelSettings | None = unenforced("meshlib does not tunnel TCP")
    proxy_protocol: ProxyProtocol | None = unenforced("meshlib does not send the PROXY protocol")
    retry_budget: RetryBudget | None = None

    @field_validator("port_level_settings")
    @classmethod
    def _ports(cls, v: list[PortTrafficPolicy] | None) -> list[PortTrafficPolicy] | None:
        seen: set[int] = set()
        for p in v or []:
            if p.port is None:
                raise ValueError("each portLevelSettings entry needs port")
            if p.port.number in seen:
                raise ValueError(f"duplicate port {p.port.number} in portLevelSettings")
            seen.add(p.port.number)
        return v

    def merged_with(self, override: TrafficPolicy | None, port: int | None = None) -> TrafficPolicy:
        """Istio's subset merge: each top-level field set in ``override`` replaces this one's whole.

        With ``port``, port-level settings for that port apply as in Istio's
        ``MergeTrafficPolicy``: this policy's first, then the override's top level,
        then the override's port level. A port-level entry replaces the load
        balancer, connection pool, outlier detection and TLS together.
        """
        merged = _apply_port(self, self, port)
        if override is None:
            return merged
        update = {
            name: getattr(override, name) for name in type(self).model_fields if getattr(override, name) is not None
        }
        return _apply_port(merged.model_copy(update=update), override, port)


def _apply_port(policy: TrafficPolicy, source: TrafficPolicy, port: int | None) -> TrafficPolicy:
    if port is None:
        return policy
    for p in source.port_level_settings or []:
        if p.port is not None and p.port.number == port:
            return policy.model_copy(
                update={
                    "load_balancer": p.load_balancer,
                    "connection_pool": p.connection_pool,
                    "outlier_detection": p.outlier_detection,
                    "tls": p.tls,
                }
            )
    return policy


class Subset(MeshModel):
    """A named subset of a host's endpoints, selected by labels, with an optional policy override."""

    name: str
    labels: Labels = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"invalid subset name {v!r}: use a DNS label (lower-case letters, digits, '-')")
        return v


class DestinationRuleSpec(MeshModel):
    """``DestinationRule.spec``: policy for traffic to one host, and its subsets."""

    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] = Field(default_factory=list)
    export_to: list[str] | None = unenforced("visibility is mesh-wide in meshlib")
    workload_selector: LabelSelector | None = unenforced("meshlib applies a DestinationRule to every client")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _check_host(v)

    @field_validator("subsets")
    @classmethod
    def _unique(cls, v: list[Subset]) -> list[Subset]:
        seen: set[str] = set()
        for s in v:
            if s.name in seen:
                raise ValueError(f"duplicate subset name {s.name!r}: subset names must be unique in a DestinationRule")
            seen.add(s.name)
        return v

    def subset(self, name: str) -> Subset | None:
        """The subset called ``name``, if any."""
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, subset: str | None = None, port: int | None = None) -> TrafficPolicy:
        """The traffic policy in force for ``subset`` (and ``port``), after Istio's merge."""
        base = self.traffic_policy or TrafficPolicy()
        found = self.subset(subset) if subset is not None else None
        return base.merged_with(found.traffic_policy if found is not None else None, port)


# ---------------------------------------------------------------------------- ServiceEntry


class ServicePort(MeshModel):
    """A port of the service: number, name (unique) and protocol."""

    number: PortNumber
    protocol: str | None = None
    name: str
    target_port: PortNumber | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"invalid port name {v!r}: use a DNS label (lower-case letters, digits, '-')")
        return v

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v: str | None) -> str | None:
        if v is not None and v.upper() not in _PROTOCOLS:
            raise ValueError(f"unrecognized protocol {v!r}; use one of {', '.join(sorted(_PROTOCOLS))}")
        return v


class WorkloadEntry(MeshModel):
    """An endpoint of a ServiceEntry: address, per-port-name ports, labels."""

    address: str = ""
    ports: dict[str, PortNumber] = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    network: str | None = unenforced("meshlib has a single network")
    locality: str | None = unenforced("meshlib has no localities")
    weight: int | None = unenforced("meshlib balances endpoints without weights", ge=0)
    # The identity the endpoint's certificate must carry (mTLS verifies it).
    service_account: str | None = None

    @property
    def is_unix(self) -> bool:
        """Whether the address is a unix domain socket (``unix://``)."""
        return self.address.startswith("unix://")


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_FQDN = re.compile(rf"^(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\.?\Z")


class ServiceEntrySpec(MeshModel):
    """``ServiceEntry.spec``: hosts, ports and (for STATIC) the endpoints behind them."""

    hosts: list[str]
    addresses: list[str] | None = unenforced("meshlib routes by host name, not by virtual IP")
    ports: list[ServicePort] = Field(default_factory=list)
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] = "MESH_EXTERNAL"
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"] = "NONE"
    endpoints: list[WorkloadEntry] = Field(default_factory=list)
    workload_selector: LabelSelector | None = unenforced("meshlib takes endpoints from the entry, not from workloads")
    export_to: list[str] | None = unenforced("visibility is mesh-wide in meshlib")
    # Identities the endpoints may present over ISTIO_MUTUAL (checked by the client).
    subject_alt_names: list[str] | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a ServiceEntry must have at least one host")
        for host in v:
            _check_host(host)
            if host == "*":
                raise ValueError("invalid host '*'")
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[ServicePort]) -> list[ServicePort]:
        names: set[str] = set()
        numbers: set[int] = set()
        for p in v:
            if p.name in names:
                raise ValueError(f"service entry port name {p.name!r} already defined")
            if p.number in numbers:
                raise ValueError(f"service entry port {p.number} already defined")
            names.add(p.name)
            numbers.add(p.number)
        return v

    @model_validator(mode="after")
    def _endpoints(self) -> Self:
        if self.workload_selector is not None and self.endpoints:
            raise ValueError("a ServiceEntry takes workloadSelector or endpoints, not both")
        if self.resolution == "NONE" and self.endpoints:
            raise ValueError("endpoints need resolution STATIC (or DNS); resolution NONE takes no endpoints")
        if self.resolution == "DNS_ROUND_ROBIN" and len(self.endpoints) > 1:
            raise ValueError("resolution DNS_ROUND_ROBIN takes at most one endpoint")
        if self.resolution in ("DNS", "DNS_ROUND_ROBIN") and not self.endpoints:
            for host in self.hosts:
                if not _FQDN.match(host):
                    raise ValueError(
                        f"host {host!r} must be a DNS name when resolution is DNS and there are no endpoints"
                    )
        port_names = {p.name for p in self.ports}
        for i, ep in enumerate(self.endpoints):
            where = f"endpoints[{i}]"
            if not ep.address:
                if ep.network is None:
                    raise ValueError(f"{where}: address is required")
            elif ep.is_unix:
                path = ep.address[len("unix://") :]
                if not (path.startswith("@") or (path.startswith("/") and not path.endswith("/") and len(path) > 1)):
                    raise ValueError(f"{where}: {ep.address!r} is not an absolute path to a unix socket")
                if ep.ports:
                    raise ValueError(f"{where}: unix endpoint {ep.address} must not include ports")
                if self.resolution != "STATIC":
                    raise ValueError(f"{where}: unix endpoints need resolution STATIC")
            elif self.resolution == "STATIC":
                if not _is_ip(ep.address):
                    raise ValueError(f"{where}: address {ep.address!r} is not an IP address (resolution is STATIC)")
            elif not _is_ip(ep.address) and not _FQDN.match(ep.address):
                raise ValueError(f"{where}: address {ep.address!r} is not a valid DNS name or IP address")
            for name in ep.ports:
                if name not in port_names:
                    declared = ", ".join(sorted(port_names)) or "none"
                    raise ValueError(
                        f"{where}: port name {name!r} is not a port of the service entry (declared: {declared})"
                    )
        return self

    def endpoint_port(self, endpoint: WorkloadEntry, port: ServicePort) -> int:
        """Where ``endpoint`` listens for ``port``: its own mapping, else targetPort, else the number."""
        return endpoint.ports.get(port.name) or port.target_port or port.number
