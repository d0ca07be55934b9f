"""The Grafana dashboard in docs/ is valid JSON and queries only metrics meshlib really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshlib.telemetry._metrics import EngineCollector, EngineState, RequestMetrics
from meshlib.telemetry._record import RequestRecord

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"

# The sample names each family type exposes (Prometheus text format; ``_created`` is prometheus_client's).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Every sample name a registry with meshlib's metrics can expose, from Prometheus' own parser."""
    registry = CollectorRegistry(auto_describe=True)
    RequestMetrics(registry).observe(RequestRecord("source", response_code=200))
    registry.register(EngineCollector(lambda: EngineState(None, None, None, "v", "w", "default")))
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", ()))  # collapsed rows hold their panels
    return found


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", ()) if "expr" in t]


def test_dashboard_is_a_grafana_dashboard_on_a_templated_prometheus(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"destination_service", "reporter"} <= set(variables)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]


def test_every_metric_the_dashboard_queries_is_exported(dashboard: dict[str, Any]) -> None:
    exported = exported_names()
    used = {name for expr in expressions(dashboard) for name in re.findall(r"\bmeshlib_[a-z_]+\b", expr)}
    assert used, "the dashboard queries no meshlib metric"
    assert used <= exported, f"not exported by meshlib: {sorted(used - exported)}"


def test_dashboard_covers_red_and_the_engines(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(expressions(dashboard))
    for needed in (
        "rate(meshlib_requests_total",
        "meshlib_request_errors_total",
        "histogram_quantile(0.5, sum by (le, destination_service) (rate(meshlib_request_duration_milliseconds_bucket",
        "histogram_quantile(0.99,",
        "sum by (response_flags)",
        "meshlib_retries_total",
        "meshlib_outlier_ejected_endpoints",
        "meshlib_circuit_breaker_state",
        "meshlib_certificate_expiry_timestamp_seconds",
    ):
        assert needed in exprs, needed
    assert "$reporter" in exprs
    assert "$destination_service" in exprs
