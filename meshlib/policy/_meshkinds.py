"""The two kinds meshlib adds to Istio's (group ``meshlib.io``, version ``v1alpha1``).

- ``MeshConfig``: the mesh-wide defaults Istio keeps in its install-time MeshConfig
  (trust domain, default retry and timeout, outbound policy, tracing, access log,
  certificates), plus what meshlib does that Istio does not (retry budget on by
  default, deadline propagation).
- ``RateLimitPolicy``: local or global (Redis, through the ``limits`` library)
  request limits, enforced by the called workload (SERVER) or by the caller (CLIENT).

Defaults are the ones a mesh user expects (Istio's where Istio has one); where
meshlib chooses differently the field's docstring says so and why.
"""

from __future__ import annotations

import re
from typing import Literal

from limits import RateLimitItem, parse_many
from pydantic import Field, PrivateAttr, field_validator, model_validator

from ._base import MeshModel
from ._identity import DEFAULT_TRUST_DOMAIN
from ._networking import RETRY_ON_CONDITIONS
from ._values import Duration, LabelSelector, StringMatch

__all__ = [
    "DEFAULT_RETRY_ON",
    "AccessLogSettings",
    "CertificateSettings",
    "DeadlinePropagation",
    "MeshConfigSpec",
    "OutboundTrafficPolicy",
    "PathNormalization",
    "Propagator",
    "RateLimit",
    "RateLimitBackend",
    "RateLimitKey",
    "RateLimitMatch",
    "RateLimitPolicySpec",
    "RateLimitStrategy",
    "RetryBudgetDefaults",
    "RetryDefaults",
    "TracingSettings",
]

DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
"""Istio's mesh default ``retryOn`` (with status code 503)."""

# Envoy's HTTP and gRPC retry conditions, as Istio's validation accepts them.
_RETRY_ON = RETRY_ON_CONDITIONS
_STATUS = re.compile(r"^[1-5][0-9][0-9]\Z")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+\Z")
_HOST = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_METHOD = re.compile(r"^[A-Z]+\Z")


def _header_name(value: str, what: str) -> str:
    lowered = value.lower()
    if not _HEADER_NAME.match(lowered):
        raise ValueError(f"invalid {what} {value!r}: an HTTP header name has no spaces, ':' or other separators")
    return lowered


# ------------------------------------------------------------------------ MeshConfig


class RetryDefaults(MeshModel):
    """The retry policy of a route that sets none (Istio's mesh default).

    At most ``1 + attempts`` requests; ``attempts: 0`` turns retries off.
    ``perTryTimeout`` unset means each try may use the whole route timeout.
    """

    attempts: int = Field(default=2, ge=0)
    per_try_timeout: Duration | None = None
    retry_on: str = DEFAULT_RETRY_ON
    retriable_status_codes: list[int] = Field(default_factory=lambda: [503])

    @field_validator("per_try_timeout")
    @classmethod
    def _per_try(cls, value: float | None) -> float | None:
        if value is not None and value < 0.001:
            raise ValueError("perTryTimeout must be at least 1ms")
        return value

    @field_validator("retry_on")
    @classmethod
    def _conditions(cls, value: str) -> str:
        for token in value.split(","):
            token = token.strip()
            if token not in _RETRY_ON and not _STATUS.match(token):
                raise ValueError(
                    f"unknown retryOn condition {token!r}: use Envoy's conditions "
                    f"({', '.join(sorted(_RETRY_ON))}) or HTTP status codes"
                )
        return value

    @field_validator("retriable_status_codes")
    @classmethod
    def _codes(cls, value: list[int]) -> list[int]:
        for code in value:
            if not 100 <= code <= 599:
                raise ValueError(f"retriable status code {code} is not an HTTP status (100..599)")
        return value


class RetryBudgetDefaults(MeshModel):
    """Retries may add at most ``percent`` % to the active requests, and always ``minRetryConcurrency``.

    Envoy's and Istio's newer ``retryBudget`` defaults (20 %, 3). It caps the retry
    storm when a destination is down: without it every caller multiplies the load
    by ``1 + attempts`` exactly when the destination can least take it.
    """

    percent: float = Field(default=20.0, ge=0.0, le=100.0, allow_inf_nan=False)
    min_retry_concurrency: int = Field(default=3, ge=0)


class DeadlinePropagation(MeshModel):
    """Pass the time left to the next hop in ``header`` (absolute deadline), and honour it inbound.

    Finagle's and gRPC's practice: a callee stops working on a request whose caller
    has already given up, and its own calls inherit the shorter deadline.
    """

    enabled: bool = True
    header: str = "x-meshlib-deadline"

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        return _header_name(value, "deadline header")


class OutboundTrafficPolicy(MeshModel):
    """ALLOW_ANY (Istio's default) lets calls to hosts outside the registry through; REGISTRY_ONLY refuses them."""

    mode: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"


class PathNormalization(MeshModel):
    """How inbound request paths are normalised before authorization and the app see them.

    Istio's ``meshConfig.pathNormalization``: ``NONE``, ``BASE`` (RFC 3986 dot segments,
    backslashes, decoding of unreserved escapes), ``MERGE_SLASHES`` (BASE and ``//`` to
    ``/``), ``DECODE_AND_MERGE_SLASHES`` (also ``%2F`` and ``%5C``); ``DEFAULT`` is BASE.
    """

    normalization: Literal["DEFAULT", "NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"] = "DEFAULT"


Propagator = Literal["tracecontext", "b3"]
"""Trace context headers: W3C ``traceparent`` (tracecontext) or Zipkin's B3."""


def _default_propagators() -> list[Propagator]:
    return ["tracecontext"]


class TracingSettings(MeshModel):
    """Traces: ``sampling`` is a percentage (Istio's default 1.0 %) of new traces kept.

    Propagated context (an incoming sampled trace) is always honoured. Spans go to
    the mesh's own tracer provider; without ``otlpEndpoint`` it has no exporter, so
    nothing leaves the process.
    """

    sampling: float = Field(default=1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    otlp_endpoint: str | None = None
    propagators: list[Propagator] = Field(default_factory=_default_propagators)

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"otlpEndpoint {value!r} must be an http:// or https:// URL")
        return value

    @field_validator("propagators")
    @classmethod
    def _propagators(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one propagator (tracecontext or b3)")
        if len(set(value)) != len(value):
            raise ValueError("a propagator is listed twice")
        return value


class AccessLogSettings(MeshModel):
    """One access-log line per request at each end; JSON by default so it parses.

    Off unless asked for, as in Istio (no ``accessLogFile``, no access log): a
    ``path`` turns it on, and ``enabled: true`` without a path writes to standard
    output (what container log collectors read).
    """

    enabled: bool | None = None

    @property
    def active(self) -> bool:
        """Whether lines are written: ``enabled`` when set, else whether a ``path`` is given."""
        return self.enabled if self.enabled is not None else self.path is not None

    format: Literal["JSON", "TEXT"] = "JSON"
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("path must not be empty: leave it out to log to standard output")
        return value


class CertificateSettings(MeshModel):
    """Workload certificates: Istio's 24 h lifetime, renewed once ``graceRatio`` of it has passed."""

    ttl: Duration = 86400.0
    grace_ratio: float = Field(default=0.5, gt=0.0, lt=1.0)

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("certificate ttl must be positive")
        return value


class MeshConfigSpec(MeshModel):
    """Mesh-wide defaults; one per mesh. Every field is optional and ``{}`` is Istio's behaviour.

    Differences from Istio, on purpose:

    - ``retryBudget`` is on by default (20 %, at least 3 concurrent retries): Istio's
      default retries have no budget, which turns an outage into a retry storm. Set
      ``retryBudget: null`` to turn it off.
    - ``deadlinePropagation`` is on: each hop tells the next how long its caller
      still waits, so work nobody waits for is not done.
    """

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = "istio-system"
    default_timeout: Duration | None = None
    default_retry: RetryDefaults = Field(default_factory=RetryDefaults)
    retry_budget: RetryBudgetDefaults | None = Field(default_factory=RetryBudgetDefaults)
    deadline_propagation: DeadlinePropagation = Field(default_factory=DeadlinePropagation)
    outbound_traffic_policy: OutboundTrafficPolicy = Field(default_factory=OutboundTrafficPolicy)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    access_log: AccessLogSettings = Field(default_factory=AccessLogSettings)
    certificates: CertificateSettings = Field(default_factory=CertificateSettings)
    path_normalization: PathNormalization | None = None
    """Unset: Istio's default, BASE."""

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        if not _TRUST_DOMAIN.match(value) or len(value) > 255:
            raise ValueError(
                f"invalid trust domain {value!r}: use lower-case letters, digits, '.', '-' and '_' (SPIFFE)"
            )
        return value

    @field_validator("root_namespace")
    @classmethod
    def _root_namespace(cls, value: str) -> str:
        if not _DNS_LABEL.match(value) or len(value) > 63:
            raise ValueError(f"invalid rootNamespace {value!r}: use a DNS label (lower-case letters, digits, '-')")
        return value

    @field_validator("default_timeout")
    @classmethod
    def _timeout(cls, value: float | None) -> float | None:
        # Istio: a zero timeout disables it.
        return None if value == 0 else value


# ------------------------------------------------------------------ RateLimitPolicy

RateLimitStrategy = Literal["FIXED_WINDOW", "MOVING_WINDOW", "SLIDING_WINDOW_COUNTER"]
RateLimitKey = Literal["ALL", "PRINCIPAL", "NAMESPACE", "PATH", "HEADER", "REMOTE_IP"]

_STORAGE_SCHEMES = (
    "redis://",
    "rediss://",
    "redis+unix://",
    "redis+sentinel://",
    "redis+cluster://",
    "memcached://",
    "memory://",
)


class RateLimitBackend(MeshModel):
    """Where counters live.

    LOCAL: in each process, so each replica allows the full rate. GLOBAL: in
    ``storage`` (a ``limits`` storage URI such as ``redis://127.0.0.1:6379/0``),
    shared by every replica. ``failureMode`` says what a request gets while the
    storage is unreachable: OPEN lets it through (the default: a limiter outage
    must not become a full outage), CLOSED refuses it.
    """

    type: Literal["LOCAL", "GLOBAL"] = "LOCAL"
    storage: str | None = None
    failure_mode: Literal["OPEN", "CLOSED"] = "OPEN"

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("async+"):
            raise ValueError(
                f"storage {value!r}: write the URI without 'async+'; meshlib picks the async storage itself"
            )
        if not value.startswith(_STORAGE_SCHEMES):
            raise ValueError(f"storage {value!r} must start with one of {', '.join(_STORAGE_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _storage_iff_global(self) -> RateLimitBackend:
        if self.type == "GLOBAL" and self.storage is None:
            raise ValueError("a GLOBAL backend needs storage (like redis://127.0.0.1:6379/0)")
        if self.type == "LOCAL" and self.storage is not None:
            raise ValueError("storage is only for a GLOBAL backend: a LOCAL backend counts in each process")
        return self


class RateLimitMatch(MeshModel):
    """Which requests a limit counts; every set field must match. Unset or ``{}`` counts all requests."""

    paths: list[StringMatch] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        for method in value:
            if not _METHOD.match(method):
                raise ValueError(f"method {method!r} must be upper case, like GET")
        return value


class RateLimit(MeshModel):
    """One limit: ``rate`` per ``key`` value, counted over the requests ``match`` selects.

    ``rate`` uses the ``limits`` notation: ``10/second``, ``100 per minute``, or several
    at once (``10/second;100/minute``: a request must fit every one). ``key`` splits
    the counter: ALL (one counter), PRINCIPAL, NAMESPACE (of the caller's identity),
    PATH, HEADER (the value of ``header``) or REMOTE_IP.
    """

    name: str | None = None
    rate: str
    key: RateLimitKey = "ALL"
    header: str | None = None
    match: RateLimitMatch | None = None

    _parsed: tuple[RateLimitItem, ...] = PrivateAttr(default=())

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str) -> str:
        try:
            items = parse_many(value)
        except ValueError:
            raise ValueError(
                f"invalid rate {value!r}: write it like '10/second', '100 per minute' or '10/second;100/minute'"
            ) from None
        for item in items:
            if item.amount <= 0:
                raise ValueError(f"invalid rate {value!r}: a rate of 0 refuses everything; use a DENY policy")
        return value

    @field_validator("header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        return None if value is None else _header_name(value, "header")

    @model_validator(mode="after")
    def _header_iff_key(self) -> RateLimit:
        if self.key == "HEADER" and self.header is None:
            raise ValueError("key HEADER needs header: the name of the header whose value is counted")
        if self.key != "HEADER" and self.header is not None:
            raise ValueError(f"header is only for key HEADER, not {self.key}")
        self._parsed = tuple(parse_many(self.rate))
        return self

    @property
    def parsed_rates(self) -> tuple[RateLimitItem, ...]:
        """The ``limits`` items of ``rate``, parsed once."""
        return self._parsed


class RateLimitPolicySpec(MeshModel):
    """Request limits for a set of workloads.

    ``side: SERVER`` (default): the selected workloads limit the requests they
    receive. ``side: CLIENT``: the selected workloads limit the requests they send
    to ``host`` (a mesh host, required there), and a refused call fails at once with
    ``RateLimitedError``, before it leaves. No selector means every workload of the
    policy's namespace.

    ``strategy`` defaults to SLIDING_WINDOW_COUNTER: within a small error of the exact
    moving window, without fixed windows' double burst at a window edge, and O(1)
    memory per key in Redis (the moving window stores one entry per allowed request).
    """

    side: Literal["SERVER", "CLIENT"] = "SERVER"
    selector: LabelSelector | None = None
    host: str | None = None
    backend: RateLimitBackend = Field(default_factory=RateLimitBackend)
    strategy: RateLimitStrategy = "SLIDING_WINDOW_COUNTER"
    limits: list[RateLimit] = Field(min_length=1)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None and (not _HOST.match(value) or len(value) > 253):
            raise ValueError(
                f"invalid host {value!r}: a mesh host name like 'reviews' or 'reviews.default.svc.cluster.local'"
            )
        return value

    @model_validator(mode="after")
    def _coherent(self) -> RateLimitPolicySpec:
        if self.side == "CLIENT" and self.host is None:
            raise ValueError("a CLIENT side limit needs host: the destination whose calls are limited")
        if self.side == "SERVER" and self.host is not None:
            raise ValueError("host is only for side CLIENT: a SERVER side limit applies to the selected workloads")
        if self.side == "CLIENT":
            for i, limit in enumerate(self.limits):
                if limit.key == "REMOTE_IP":
                    raise ValueError(f"limits[{i}]: key REMOTE_IP has no meaning on the CLIENT side")
        if (
            self.strategy == "MOVING_WINDOW"
            and self.backend.storage is not None
            and self.backend.storage.startswith("memcached://")
        ):
            raise ValueError("strategy MOVING_WINDOW is not supported by memcached storage")
        names = [limit.name for limit in self.limits if limit.name is not None]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"limit names must be unique: {', '.join(duplicates)}")
        return self
