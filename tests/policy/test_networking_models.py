"""The Istio networking specs: what a user notices when a file is right, wrong or half-set."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from meshlib.policy._base import unenforced_fields
from meshlib.policy._networking import (
    UNLIMITED,
    ConnectionPoolSettings,
    DestinationRuleSpec,
    FaultAbort,
    FaultDelay,
    HTTPRetry,
    OutlierDetection,
    RetryBudget,
    ServiceEntrySpec,
    TCPSettings,
    TrafficPolicy,
    VirtualServiceSpec,
)


def vs(*routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"hosts": ["reviews"], "http": list(routes), **extra}


def dest(subset: str | None = None, weight: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": {"host": "reviews"}}
    if subset is not None:
        d["destination"]["subset"] = subset
    if weight is not None:
        d["weight"] = weight
    return d


def error_text(model: Any, data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return str(info.value)


# ---------------------------------------------------------------- weights


def test_negative_weight_is_refused_naming_the_field() -> None:
    text = error_text(VirtualServiceSpec, vs({"route": [dest("v1", 80), dest("v2", -20)]}))
    assert "http.0.route.1.weight" in text
    assert "-20 is negative" in text


def test_all_zero_weights_are_refused() -> None:
    text = error_text(VirtualServiceSpec, vs({"route": [dest("v1", 0), dest("v2", 0)]}))
    assert "all 0" in text


def test_two_destinations_without_weights_are_refused_as_istio_does() -> None:
    assert "all 0" in error_text(VirtualServiceSpec, vs({"route": [dest("v1"), dest("v2")]}))


def test_a_single_destination_gets_all_the_traffic() -> None:
    spec = VirtualServiceSpec.model_validate(vs({"route": [dest("v1")]}))
    route = spec.http[0]
    assert route.destination_weights == (100,)
    assert route.route[0].effective_weight(1) == 100
    # Even an explicit 0 on a lone destination: Istio sends it everything.
    lone_zero = VirtualServiceSpec.model_validate(vs({"route": [dest("v1", 0)]}))
    assert lone_zero.http[0].destination_weights == (100,)


def test_weights_need_not_sum_to_100() -> None:
    spec = VirtualServiceSpec.model_validate(vs({"route": [dest("v1", 1), dest("v2", 3), dest("v3", 0)]}))
    assert spec.http[0].destination_weights == (1, 3, 0)


def test_a_route_needs_exactly_one_action() -> None:
    assert "needs one of route, redirect" in error_text(VirtualServiceSpec, vs({"timeout": "1s"}))
    both = vs({"route": [dest()], "directResponse": {"status": 503}})
    assert "not ['route', 'directResponse']" in error_text(VirtualServiceSpec, both)


# ---------------------------------------------------------------- faults


def test_old_percent_and_new_percentage_give_the_same_fraction() -> None:
    old = FaultAbort.model_validate({"httpStatus": 500, "percent": 25})
    new = FaultAbort.model_validate({"httpStatus": 500, "percentage": {"value": 25.0}})
    assert old.effective_fraction == new.effective_fraction == 0.25
    delay = FaultDelay.model_validate({"fixedDelay": "7s", "percent": 100})
    assert delay.effective_fraction == 1.0
    assert delay.fixed_delay == 7.0


def test_new_percentage_wins_over_old_percent() -> None:
    both = FaultDelay.model_validate({"fixedDelay": "1s", "percent": 100, "percentage": {"value": 10}})
    assert both.effective_fraction == pytest.approx(0.1)


def test_unset_percentage_affects_no_request() -> None:
    assert FaultAbort.model_validate({"httpStatus": 503}).effective_fraction == 0.0
    assert FaultDelay.model_validate({"fixedDelay": "2s"}).effective_fraction == 0.0


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"abort": {"httpStatus": 503, "percent": 101}}, "not in 0..100"),
        ({"abort": {"httpStatus": 503, "percentage": {"value": 150}}}, "less than or equal to 100"),
        ({"abort": {"httpStatus": 99}}, "not in range 200-599"),
        ({"abort": {"httpStatus": 600}}, "not in range 200-599"),
        ({"abort": {"percent": 50}}, "needs httpStatus"),
        ({}, "abort and/or a delay"),
    ],
)
def test_bad_faults_are_refused(fault: dict[str, Any], message: str) -> None:
    assert message in error_text(VirtualServiceSpec, vs({"route": [dest()], "fault": fault}))


# ---------------------------------------------------------------- durations and retries


@pytest.mark.parametrize("bad", ["10", "1x", 10, "", "-1s"])
def test_bad_durations_are_refused(bad: Any) -> None:
    text = error_text(VirtualServiceSpec, vs({"route": [dest()], "timeout": bad}))
    assert "http.0.timeout" in text


def test_durations_parse_to_seconds() -> None:
    spec = VirtualServiceSpec.model_validate(
        vs({"route": [dest()], "timeout": "1.5s", "retries": {"attempts": 2, "perTryTimeout": "250ms"}})
    )
    assert spec.http[0].timeout == 1.5
    assert spec.http[0].retries is not None
    assert spec.http[0].retries.per_try_timeout == pytest.approx(0.25)


def test_zero_timeout_means_no_timeout_and_is_accepted() -> None:
    spec = VirtualServiceSpec.model_validate(vs({"route": [dest()], "timeout": "0s"}))
    assert spec.http[0].timeout == 0.0


def test_per_try_timeout_below_one_millisecond_is_refused() -> None:
    text = error_text(HTTPRetry, {"attempts": 3, "perTryTimeout": "0.5ms"})
    assert "perTryTimeout" in text
    assert "1ms" in text


def test_unknown_retry_on_condition_is_refused_and_status_codes_pass() -> None:
    text = error_text(HTTPRetry, {"attempts": 2, "retryOn": "5xx,connect-failur"})
    assert "'connect-failur' is not a retryOn condition" in text
    ok = HTTPRetry.model_validate({"attempts": 2, "retryOn": "gateway-error,503,retriable-status-codes,unavailable"})
    assert ok.retry_on == "gateway-error,503,retriable-status-codes,unavailable"
    assert "not in 100..599" in error_text(HTTPRetry, {"attempts": 2, "retryOn": "5xx,700"})


def test_negative_attempts_are_refused_and_zero_disables() -> None:
    assert "negative" in error_text(HTTPRetry, {"attempts": -1})
    assert HTTPRetry.model_validate({"attempts": 0}).attempts == 0
    assert "attempts is 0" in error_text(HTTPRetry, {"retryOn": "5xx"})


# ---------------------------------------------------------------- matches


def test_upper_case_header_name_is_refused_naming_it() -> None:
    route = {"match": [{"headers": {"End-User": {"exact": "jason"}}}], "route": [dest()]}
    text = error_text(VirtualServiceSpec, vs(route))
    assert "'End-User'" in text
    assert "lower-case" in text


def test_header_match_presence_and_without_headers() -> None:
    route = {
        "match": [{"headers": {"end-user": {}}, "withoutHeaders": {"x-debug": {"regex": "*"}}}],
        "route": [dest()],
    }
    match = VirtualServiceSpec.model_validate(vs(route)).http[0].match[0]
    assert match.headers["end-user"].is_presence
    assert match.without_headers["x-debug"].is_presence


# ---------------------------------------------------------------- DestinationRule


def test_duplicate_subset_names_are_refused() -> None:
    spec = {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v1"}]}
    assert "duplicate subset name 'v1'" in error_text(DestinationRuleSpec, spec)


def test_consistent_hash_with_two_keys_is_refused() -> None:
    lb = {"consistentHash": {"httpHeaderName": "x-user", "useSourceIp": True}}
    text = error_text(DestinationRuleSpec, {"host": "reviews", "trafficPolicy": {"loadBalancer": lb}})
    assert "exactly one key" in text
    assert "httpHeaderName and useSourceIp" in text


def test_simple_and_consistent_hash_together_are_refused() -> None:
    lb = {"simple": "ROUND_ROBIN", "consistentHash": {"httpHeaderName": "x-user"}}
    text = error_text(DestinationRuleSpec, {"host": "reviews", "trafficPolicy": {"loadBalancer": lb}})
    assert "simple or consistentHash, not both" in text


def test_unknown_simple_algorithm_is_refused() -> None:
    lb = {"simple": "LEAST_REQUESTS"}
    assert "LEAST_REQUEST" in error_text(DestinationRuleSpec, {"host": "r", "trafficPolicy": {"loadBalancer": lb}})


def test_subset_policy_overrides_field_by_field() -> None:
    spec = DestinationRuleSpec.model_validate(
        {
            "host": "reviews",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"tcp": {"maxConnections": 100}},
                "tls": {"mode": "ISTIO_MUTUAL"},
            },
            "subsets": [
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {
                        "loadBalancer": {"simple": "ROUND_ROBIN"},
                        "outlierDetection": {"consecutive5xxErrors": 2},
                    },
                }
            ],
        }
    )
    merged = spec.policy_for("v2")
    assert merged.load_balancer is not None
    assert merged.load_balancer.simple == "ROUND_ROBIN"
    assert merged.outlier_detection is not None
    assert merged.outlier_detection.consecutive_5xx_errors == 2
    assert merged.connection_pool is not None
    assert merged.connection_pool.tcp.max_connections == 100
    assert merged.tls is not None
    assert merged.tls.mode == "ISTIO_MUTUAL"
    # The top-level policy and the other subsets keep their own.
    assert spec.policy_for(None) == spec.traffic_policy
    assert spec.policy_for("nope") == spec.traffic_policy
    assert TrafficPolicy().merged_with(None) == TrafficPolicy()


def test_a_set_section_replaces_the_top_level_one_whole() -> None:
    top = TrafficPolicy.model_validate({"connectionPool": {"tcp": {"maxConnections": 10}, "http": {"maxRetries": 4}}})
    sub = TrafficPolicy.model_validate({"connectionPool": {"http": {"http2MaxRequests": 50}}})
    merged = top.merged_with(sub)
    assert merged.connection_pool is not None
    assert merged.connection_pool.http.http2_max_requests == 50
    # Not a deep merge: the subset's pool brings Istio's defaults for what it leaves out.
    assert merged.connection_pool.tcp.max_connections == UNLIMITED
    assert merged.connection_pool.http.max_retries == UNLIMITED


def test_defaults_are_istios() -> None:
    od = OutlierDetection()
    assert od.consecutive_5xx_errors == 5
    assert od.five_xx_threshold == 5
    assert od.gateway_error_threshold == 0
    assert od.interval == 10.0
    assert od.base_ejection_time == 30.0
    assert od.max_ejection_percent == 10
    assert od.min_health_percent == 0
    assert TCPSettings().connect_timeout == 10.0
    pool = ConnectionPoolSettings()
    assert pool.tcp.max_connections == UNLIMITED
    assert pool.http.http1_max_pending_requests == UNLIMITED
    assert pool.http.http2_max_requests == UNLIMITED
    assert pool.http.max_retries == UNLIMITED
    assert pool.http.max_requests_per_connection == 0
    budget = RetryBudget()
    assert (budget.percent, budget.min_retry_concurrency) == (20.0, 3)


def test_zero_limits_mean_istios_default_and_zero_5xx_disables() -> None:
    pool = ConnectionPoolSettings.model_validate({"tcp": {"maxConnections": 0}, "http": {"http2MaxRequests": 0}})
    assert pool.tcp.max_connections == UNLIMITED
    assert pool.http.http2_max_requests == UNLIMITED
    assert OutlierDetection.model_validate({"consecutive5xxErrors": 0}).five_xx_threshold == 0


def test_deprecated_consecutive_errors_counts_gateway_errors_only() -> None:
    od = OutlierDetection.model_validate({"consecutiveErrors": 7})
    assert od.gateway_error_threshold == 7
    assert od.five_xx_threshold == 0


def test_connect_timeout_below_one_millisecond_is_refused() -> None:
    text = error_text(TCPSettings, {"connectTimeout": "0s"})
    assert "connectTimeout" in text


# ---------------------------------------------------------------- ServiceEntry


def service_entry(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "hosts": ["reviews"],
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
        "endpoints": [
            {"address": "10.0.0.1", "labels": {"version": "v1"}},
            {"address": "10.0.0.2", "ports": {"http": 8080}, "labels": {"version": "v2"}},
        ],
    }
    spec.update(changes)
    return spec


def test_service_entry_loads_with_its_endpoint_ports() -> None:
    spec = ServiceEntrySpec.model_validate(service_entry())
    port = spec.ports[0]
    assert [spec.endpoint_port(ep, port) for ep in spec.endpoints] == [80, 8080]
    assert ServiceEntrySpec.model_validate({"hosts": ["a.example.com"]}).resolution == "NONE"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hosts": []}, "at least one host"),
        ({"endpoints": [{"address": "reviews-1.internal"}]}, "not an IP address"),
        ({"endpoints": [{"address": "10.0.0.1", "ports": {"grpc": 9090}}]}, "'grpc' is not a port"),
        ({"ports": [{"number": 80, "name": "http"}, {"number": 80, "name": "http2"}]}, "port 80 already defined"),
        ({"ports": [{"number": 80, "name": "http"}, {"number": 81, "name": "http"}]}, "'http' already defined"),
        ({"ports": [{"number": 70000, "name": "http"}]}, "not in 1..65535"),
        ({"resolution": "NONE"}, "resolution NONE takes no endpoints"),
    ],
)
def test_bad_service_entries_are_refused(changes: dict[str, Any], message: str) -> None:
    assert message in error_text(ServiceEntrySpec, service_entry(**changes))


def test_static_endpoints_may_be_unix_sockets() -> None:
    spec = ServiceEntrySpec.model_validate(service_entry(endpoints=[{"address": "unix:///var/run/app.sock"}]))
    assert spec.endpoints[0].is_unix


# ---------------------------------------------------------------- typos, round trip, unenforced


@pytest.mark.parametrize(
    ("model", "data", "typo"),
    [
        (VirtualServiceSpec, vs({"route": [{"destination": {"host": "reviews"}, "weigth": 50}]}), "weigth"),
        (DestinationRuleSpec, {"host": "r", "trafficPolicy": {"outlierDetection": {"interva": "5s"}}}, "interva"),
        (ServiceEntrySpec, {"hosts": ["a.example.com"], "resolutoin": "DNS"}, "resolutoin"),
    ],
)
def test_unknown_fields_are_refused(model: Any, data: dict[str, Any], typo: str) -> None:
    text = error_text(model, data)
    assert typo in text
    assert "Extra inputs are not permitted" in text


def test_camel_case_input_round_trips() -> None:
    data = vs(
        {
            "name": "canary",
            "match": [{"uri": {"prefix": "/api"}, "headers": {"end-user": {"exact": "jason"}}, "ignoreUriCase": True}],
            "route": [dest("v1", 90), {**dest("v2", 10), "headers": {"request": {"set": {"x-canary": "1"}}}}],
            "timeout": "1.5s",
            "retries": {"attempts": 3, "perTryTimeout": "250ms", "retryOn": "5xx,reset"},
            "fault": {"delay": {"fixedDelay": "7s", "percentage": {"value": 10.0}}},
            "mirror": {"host": "reviews", "subset": "v3"},
            "mirrorPercentage": {"value": 5.0},
        }
    )
    spec = VirtualServiceSpec.model_validate(data)
    assert spec.model_dump(by_alias=True, exclude_unset=True, mode="json") == data
    dr: dict[str, Any] = {
        "host": "reviews",
        "trafficPolicy": {
            "loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "10s"}}},
            "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "30ms"}},
            "outlierDetection": {"consecutive5xxErrors": 7, "interval": "5s", "baseEjectionTime": "60s"},
            "retryBudget": {"percent": 25.0, "minRetryConcurrency": 5},
        },
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
    }
    assert DestinationRuleSpec.model_validate(dr).model_dump(by_alias=True, exclude_unset=True, mode="json") == dr


def test_snake_case_names_work_too() -> None:
    spec = VirtualServiceSpec.model_validate(
        {"hosts": ["reviews"], "http": [{"route": [dest()], "retries": {"attempts": 1, "per_try_timeout": "1s"}}]}
    )
    assert spec.http[0].retries is not None
    assert spec.http[0].retries.per_try_timeout == 1.0


def test_unenforced_fields_are_named_for_the_loader() -> None:
    spec = VirtualServiceSpec.model_validate(
        vs({"route": [dest()], "corsPolicy": {"allowOrigins": [{"exact": "https://a.example"}]}}, gateways=["gw"])
    )
    found = dict(unenforced_fields(spec))
    assert set(found) == {"gateways", "http[0].corsPolicy"}
    assert "gateways" in found["gateways"]
    plain = VirtualServiceSpec.model_validate(vs({"route": [dest()]}))
    assert list(unenforced_fields(plain)) == []
