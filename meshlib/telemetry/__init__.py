"""RED metrics, traces and access logs for every request the mesh sees (issue #6)."""

from ._accesslog import AccessLog, AccessLogError
from ._endpoint import metrics_app
from ._metrics import EngineState, RequestMetrics
from ._record import Reporter, RequestRecord
from ._telemetry import Telemetry
from ._tracing import Tracing, format_trace_id

__all__ = [
    "AccessLog",
    "AccessLogError",
    "EngineState",
    "Reporter",
    "RequestMetrics",
    "RequestRecord",
    "Telemetry",
    "Tracing",
    "format_trace_id",
    "metrics_app",
]
