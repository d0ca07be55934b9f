"""Sans-IO decision engines: they take ``now`` and return decisions; adapters do the IO.

The same objects serve the async and sync httpx transports and the sidecar, so the
route, the endpoint and the retry decision for a request never depend on the mode.
"""

from ._authz import Authorizer, AuthzDecision, AuthzRequest, CustomCheck, ShadowResult
from ._balancer import Balancer, InFlight, endpoint_key, hash_key_for, make_balancer
from ._breaker import Breaker
from ._budget import RetryBudget
from ._call import Attempt, Call, Refusal, Verdict
from ._deadline import DEFAULT_HEADER as DEADLINE_HEADER
from ._deadline import current_deadline, earliest
from ._deadline import from_header as deadline_from_header
from ._deadline import to_header as deadline_to_header
from ._destination import Destination, DestinationKey
from ._inbound import Inbound
from ._outbound import LocalReply, Outbound, Passthrough, Plan, Proceed
from ._outcome import Failure, Outcome
from ._outlier import OutlierDetector
from ._paths import BadPathError, check_method, normalization_mode, normalize_path, split_path_query
from ._pool import Admission, PoolLimits
from ._ratelimit import RateDecision, RateKeyInputs, RateLimiterEngine
from ._retry import RetryDecision, RetryPolicy, RetryReason, is_testing, set_testing
from ._router import HeaderOps, RequestView, RouteDecision, Router, RouteTarget
from ._tls import TLS_MODE_LABEL, TlsOrigination, origination_for

__all__ = [
    "Inbound",
    "TLS_MODE_LABEL",
    "TlsOrigination",
    "origination_for",
    "DEADLINE_HEADER",
    "Admission",
    "Attempt",
    "Authorizer",
    "AuthzDecision",
    "AuthzRequest",
    "BadPathError",
    "Balancer",
    "Breaker",
    "Call",
    "CustomCheck",
    "Destination",
    "DestinationKey",
    "Failure",
    "HeaderOps",
    "InFlight",
    "LocalReply",
    "Outbound",
    "Outcome",
    "OutlierDetector",
    "Passthrough",
    "Plan",
    "PoolLimits",
    "Proceed",
    "RateDecision",
    "RateKeyInputs",
    "RateLimiterEngine",
    "Refusal",
    "RequestView",
    "RetryBudget",
    "RetryDecision",
    "RetryPolicy",
    "RetryReason",
    "RouteDecision",
    "RouteTarget",
    "Router",
    "ShadowResult",
    "Verdict",
    "check_method",
    "current_deadline",
    "deadline_from_header",
    "deadline_to_header",
    "earliest",
    "endpoint_key",
    "hash_key_for",
    "is_testing",
    "make_balancer",
    "normalization_mode",
    "normalize_path",
    "set_testing",
    "split_path_query",
]
