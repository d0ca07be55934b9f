"""The security and meshlib-kind spec models: what loads, what is refused, and why."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from _corpus import CORPUS
from pydantic import ValidationError

from meshlib.policy._base import unenforced_fields
from meshlib.policy._meshkinds import MeshConfigSpec, RateLimitPolicySpec
from meshlib.policy._security import (
    JWT_WHY,
    AuthorizationPolicySpec,
    PeerAuthenticationSpec,
    dry_run_annotation_problem,
    is_dry_run,
    parse_ip_block,
)

SPECS: dict[str, type[AuthorizationPolicySpec] | type[PeerAuthenticationSpec]] = {
    "AuthorizationPolicy": AuthorizationPolicySpec,
    "PeerAuthentication": PeerAuthenticationSpec,
}


def _security_documents() -> list[Any]:
    files = [*sorted(CORPUS.glob("authz-*.yaml")), CORPUS / "peer-authentication-per-port.yaml"]
    params = []
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("kind") in SPECS:
                params.append(pytest.param(doc, id=f"{path.name}[{i}]"))
    return params


def _error(model: Any, data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return str(info.value)


def _source(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"from": [{"source": fields}]}]}


def _operation(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"to": [{"operation": fields}]}]}


def _when(key: str, values: list[str]) -> dict[str, Any]:
    return {"rules": [{"when": [{"key": key, "values": values}]}]}


# ------------------------------------------------------------------ the real corpus


def test_corpus_has_security_resources() -> None:
    assert len(_security_documents()) >= 4


@pytest.mark.parametrize("doc", _security_documents())
def test_corpus_security_specs_validate(doc: dict[str, Any]) -> None:
    spec = SPECS[doc["kind"]].model_validate(doc["spec"])
    assert spec is not None


def test_full_rule_corpus_file_reads_as_istio_wrote_it() -> None:
    doc = yaml.safe_load((CORPUS / "authz-allow-full-rule.yaml").read_text())
    spec = AuthorizationPolicySpec.model_validate(doc["spec"])
    assert spec.action == "ALLOW"
    assert spec.rules is not None
    assert len(spec.rules) == 2
    assert spec.rules[0].from_[0].source.service_accounts == ["my-ns/my-sa", "sa-only"]
    source = spec.rules[1].from_[0].source
    assert source.ip_blocks == ["1.2.3.4", "5.6.0.0/16"]
    operation = spec.rules[1].to[0].operation
    assert "/{**}/path/template" in operation.paths
    assert operation.ports == ["80", "90"]
    header = spec.rules[1].when[0]
    assert (header.attribute, header.arguments) == ("request.headers", ("x-header",))
    # requestPrincipals need a JWT hook: accepted, and reported as such.
    reported = dict(unenforced_fields(spec, "spec"))
    assert reported == {
        "spec.rules[1].from[0].source.requestPrincipals": JWT_WHY,
        "spec.rules[1].from[0].source.notRequestPrincipals": JWT_WHY,
    }


def test_per_port_mtls_corpus_file() -> None:
    doc = next(yaml.safe_load_all((CORPUS / "peer-authentication-per-port.yaml").read_text()))
    spec = PeerAuthenticationSpec.model_validate(doc["spec"])
    assert spec.mtls.mode == "DISABLE"
    assert spec.port_level_mtls[8090].mode == "STRICT"
    assert spec.mode_for_port(8090) == "STRICT"
    assert spec.mode_for_port(80) == "DISABLE"


# ------------------------------------------------------------------ AuthorizationPolicy


def test_rules_unset_and_rule_that_matches_everything_differ() -> None:
    unset = AuthorizationPolicySpec.model_validate({})
    everything = AuthorizationPolicySpec.model_validate({"rules": [{}]})
    assert unset.action == "ALLOW"
    assert unset.rules is None
    assert everything.rules is not None
    assert len(everything.rules) == 1
    assert everything.rules[0].matches_everything
    assert unset != everything


def test_empty_rules_list_is_unset_as_in_kubernetes() -> None:
    assert AuthorizationPolicySpec.model_validate({"rules": []}).rules is None


def test_custom_without_provider_refused() -> None:
    message = _error(AuthorizationPolicySpec, {"action": "CUSTOM", "rules": [{}]})
    assert "provider.name" in message
    spec = AuthorizationPolicySpec.model_validate(
        {"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [{}]}
    )
    assert spec.provider is not None
    assert spec.provider.name == "ext-authz"


def test_provider_without_custom_refused() -> None:
    message = _error(AuthorizationPolicySpec, {"action": "DENY", "provider": {"name": "x"}, "rules": [{}]})
    assert "only for action CUSTOM" in message


def test_deny_without_rules_refused() -> None:
    assert "DENY" in _error(AuthorizationPolicySpec, {"action": "DENY"})


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.2.3", "10.0.0.0/255.0.0.0", "garbage"])
def test_bad_cidr_refused_naming_it(bad: str) -> None:
    message = _error(AuthorizationPolicySpec, _source(ipBlocks=["10.0.0.1", bad]))
    assert repr(bad) in message
    assert "ipBlocks" in message


def test_bad_cidr_in_when_refused_naming_it() -> None:
    message = _error(AuthorizationPolicySpec, _when("source.ip", ["10.0.0.0/99"]))
    assert "'10.0.0.0/99'" in message


def test_cidr_with_host_bits_accepted_like_istio() -> None:
    AuthorizationPolicySpec.model_validate(_source(remoteIpBlocks=["10.1.2.3/16"]))
    assert str(parse_ip_block("10.1.2.3/16")) == "10.1.0.0/16"
    assert str(parse_ip_block("2001:db8::1")) == "2001:db8::1/128"


def test_unknown_when_key_refused_naming_it() -> None:
    message = _error(AuthorizationPolicySpec, _when("request.header[x-user]", ["alice"]))
    assert "'request.header[x-user]'" in message


def test_replaced_when_key_refused_with_reason() -> None:
    assert "metadata.namespace" in _error(AuthorizationPolicySpec, _when("destination.namespace", ["a"]))


def test_when_needs_values() -> None:
    message = _error(AuthorizationPolicySpec, {"rules": [{"when": [{"key": "source.ip"}]}]})
    assert "values or notValues" in message


def test_star_in_the_middle_of_a_principal_refused() -> None:
    message = _error(AuthorizationPolicySpec, _source(principals=["cluster.local/ns/*/sa/order"]))
    assert "'cluster.local/ns/*/sa/order'" in message
    AuthorizationPolicySpec.model_validate(_source(principals=["cluster.local/ns/default/*", "*/sa/order", "*"]))


def test_port_values_checked() -> None:
    assert "'70000'" in _error(AuthorizationPolicySpec, _operation(ports=["70000"]))
    assert "as a string" in _error(AuthorizationPolicySpec, _operation(ports=[8080]))
    assert "'99999'" in _error(AuthorizationPolicySpec, _when("destination.port", ["99999"]))


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/api/{id", "'{' and '}'"),
        ("/api/{name}/x", "'{' and '}'"),
        ("/a/{**}/{*}", "last operator"),
        ("/a/{*}/b*", "segment 'b*'"),
        ("/a*b", "literal star"),
    ],
)
def test_bad_paths_refused(path: str, why: str) -> None:
    message = _error(AuthorizationPolicySpec, _operation(paths=[path]))
    assert why in message
    assert repr(path) in message


def test_service_accounts_rules() -> None:
    message = _error(
        AuthorizationPolicySpec, _source(serviceAccounts=["ns/sa"], principals=["cluster.local/ns/a/sa/b"])
    )
    assert "cannot be set with principals" in message
    assert "wildcard" in _error(AuthorizationPolicySpec, _source(serviceAccounts=["ns/*"]))
    assert "'a/b/c'" in _error(AuthorizationPolicySpec, _source(notServiceAccounts=["a/b/c"]))


def test_empty_from_and_empty_source_refused() -> None:
    assert "empty list" in _error(AuthorizationPolicySpec, {"rules": [{"from": []}]})
    assert "at least one field" in _error(AuthorizationPolicySpec, _source())


def test_unknown_field_refused() -> None:
    assert "principal" in _error(AuthorizationPolicySpec, _source(principal=["x"]))


def test_unenforced_when_keys_and_target_refs_are_reported() -> None:
    spec = AuthorizationPolicySpec.model_validate(
        {
            "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}],
            "rules": [
                {
                    "when": [
                        {"key": "request.auth.claims[groups]", "values": ["admin"]},
                        {"key": "connection.sni", "values": ["*.example.com"]},
                        {"key": "request.headers[x-user]", "values": ["alice"]},
                    ]
                }
            ],
        }
    )
    reported = dict(unenforced_fields(spec, "spec"))
    assert set(reported) == {"spec.targetRefs", "spec.rules[0].when[0].key", "spec.rules[0].when[1].key"}
    assert reported["spec.rules[0].when[0].key"] == JWT_WHY
    assert spec.uses_target_refs
    assert spec.rules is not None
    assert spec.rules[0].when[0].unenforced_reason == JWT_WHY
    assert spec.rules[0].when[2].unenforced_reason is None


def test_selector_and_target_ref_exclusive() -> None:
    message = _error(
        AuthorizationPolicySpec,
        {"selector": {"matchLabels": {"app": "a"}}, "targetRef": {"kind": "Gateway", "name": "gw"}},
    )
    assert "only one of" in message


def test_dry_run_annotation() -> None:
    assert is_dry_run({"istio.io/dry-run": "true"})
    assert not is_dry_run({"istio.io/dry-run": "false"})
    assert not is_dry_run({})
    assert AuthorizationPolicySpec.is_dry_run({"istio.io/dry-run": "True"})
    assert dry_run_annotation_problem({"istio.io/dry-run": "yes"}) is not None
    assert dry_run_annotation_problem({"istio.io/dry-run": "1"}) is None


# ------------------------------------------------------------------ PeerAuthentication


def test_port_level_mtls_without_selector_refused() -> None:
    message = _error(PeerAuthenticationSpec, {"portLevelMtls": {8080: {"mode": "STRICT"}}})
    assert "selector" in message


def test_port_out_of_range_refused() -> None:
    message = _error(
        PeerAuthenticationSpec,
        {"selector": {"matchLabels": {"app": "b"}}, "portLevelMtls": {70000: {"mode": "STRICT"}}},
    )
    assert "70000" in message


def test_port_keys_as_strings_accepted() -> None:
    spec = PeerAuthenticationSpec.model_validate(
        {"selector": {"matchLabels": {"app": "b"}}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}
    )
    assert spec.port_level_mtls == {8080: spec.port_level_mtls[8080]}
    assert spec.mode_for_port(8080) == "PERMISSIVE"


def test_mtls_mode_is_case_sensitive_like_istio() -> None:
    assert "STRICT" in _error(PeerAuthenticationSpec, {"mtls": {"mode": "strict"}})


def test_empty_peer_authentication_is_unset() -> None:
    assert PeerAuthenticationSpec.model_validate({}).mtls.mode == "UNSET"


# ------------------------------------------------------------------ MeshConfig


def test_mesh_config_defaults() -> None:
    spec = MeshConfigSpec.model_validate({})
    assert spec.trust_domain == "cluster.local"
    assert spec.root_namespace == "istio-system"
    assert spec.default_timeout is None
    assert spec.default_retry.attempts == 2
    assert spec.default_retry.retriable_status_codes == [503]
    assert "connect-failure" in spec.default_retry.retry_on
    assert spec.retry_budget is not None
    assert (spec.retry_budget.percent, spec.retry_budget.min_retry_concurrency) == (20.0, 3)
    assert spec.outbound_traffic_policy.mode == "ALLOW_ANY"
    assert spec.deadline_propagation.enabled
    assert spec.deadline_propagation.header == "x-meshlib-deadline"
    assert spec.tracing.sampling == 1.0
    assert spec.tracing.propagators == ["tracecontext"]
    assert (spec.access_log.active, spec.access_log.format) == (False, "JSON")  # off unless asked, as in Istio
    assert (spec.certificates.ttl, spec.certificates.grace_ratio) == (86400.0, 0.5)


def test_mesh_config_values() -> None:
    spec = MeshConfigSpec.model_validate(
        {
            "trustDomain": "example.org",
            "defaultTimeout": "5s",
            "defaultRetry": {"attempts": 0, "perTryTimeout": "250ms"},
            "retryBudget": None,
            "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
            "certificates": {"ttl": "1h"},
        }
    )
    assert spec.default_timeout == 5.0
    assert spec.default_retry.per_try_timeout == 0.25
    assert spec.retry_budget is None
    assert spec.certificates.ttl == 3600.0
    assert MeshConfigSpec.model_validate({"defaultTimeout": "0s"}).default_timeout is None


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"defaultRetry": {"retryOn": "5xx,sometimes"}}, "'sometimes'"),
        ({"certificates": {"graceRatio": 1.0}}, "graceRatio"),
        ({"tracing": {"sampling": 150}}, "sampling"),
        ({"trustDomain": "Not A Domain"}, "'Not A Domain'"),
        ({"defaultTimeout": 5}, "unit"),
        ({"accessLog": {"format": "XML"}}, "format"),
    ],
)
def test_mesh_config_bad_values(data: dict[str, Any], named: str) -> None:
    assert named in _error(MeshConfigSpec, data)


# ------------------------------------------------------------------ RateLimitPolicy


def test_good_rate_limit_policy_parses_and_exposes_rates() -> None:
    spec = RateLimitPolicySpec.model_validate(
        {
            "selector": {"matchLabels": {"app": "reviews"}},
            "backend": {"type": "GLOBAL", "storage": "redis://127.0.0.1:6379/0", "failureMode": "CLOSED"},
            "limits": [
                {"name": "per-user", "rate": "10/second;100/minute", "key": "HEADER", "header": "X-User"},
                {"rate": "1000 per minute", "match": {"paths": [{"prefix": "/api"}], "methods": ["POST"]}},
            ],
        }
    )
    assert spec.side == "SERVER"
    assert spec.strategy == "SLIDING_WINDOW_COUNTER"
    assert spec.backend.failure_mode == "CLOSED"
    first, second = spec.limits
    assert first.header == "x-user"
    assert [(item.amount, item.get_expiry()) for item in first.parsed_rates] == [(10, 1), (100, 60)]
    assert [(item.amount, item.get_expiry()) for item in second.parsed_rates] == [(1000, 60)]
    assert second.match is not None
    assert second.match.paths[0].prefix == "/api"


def test_rate_limit_defaults() -> None:
    spec = RateLimitPolicySpec.model_validate({"limits": [{"rate": "5/second"}]})
    assert (spec.side, spec.backend.type, spec.backend.failure_mode) == ("SERVER", "LOCAL", "OPEN")
    assert spec.limits[0].key == "ALL"


def test_global_without_storage_refused() -> None:
    message = _error(RateLimitPolicySpec, {"backend": {"type": "GLOBAL"}, "limits": [{"rate": "1/second"}]})
    assert "storage" in message


def test_storage_scheme_checked() -> None:
    message = _error(
        RateLimitPolicySpec,
        {"backend": {"type": "GLOBAL", "storage": "postgres://db"}, "limits": [{"rate": "1/second"}]},
    )
    assert "'postgres://db'" in message


def test_bad_rate_refused_naming_it() -> None:
    message = _error(RateLimitPolicySpec, {"limits": [{"rate": "10 per fortnight"}]})
    assert "'10 per fortnight'" in message


def test_header_key_without_header_refused() -> None:
    message = _error(RateLimitPolicySpec, {"limits": [{"rate": "1/second", "key": "HEADER"}]})
    assert "header" in message


def test_client_side_without_host_refused() -> None:
    message = _error(RateLimitPolicySpec, {"side": "CLIENT", "limits": [{"rate": "1/second"}]})
    assert "host" in message
    spec = RateLimitPolicySpec.model_validate({"side": "CLIENT", "host": "ratings", "limits": [{"rate": "1/second"}]})
    assert spec.host == "ratings"


def test_rate_limit_needs_limits() -> None:
    assert "limits" in _error(RateLimitPolicySpec, {"limits": []})
