"""The authorizer decides as Istio's generated Envoy RBAC would, for the real corpus and every field.

Requests are plain :class:`AuthzRequest` values (no sockets): a principal in Istio's
form (``cluster.local/ns/N/sa/S``, None for plaintext), addresses, host, port, method,
an already normalised path and lower-case headers.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from _corpus import CORPUS

from meshlib.engine import Authorizer, AuthzDecision, AuthzRequest, CustomCheck, ShadowResult
from meshlib.policy import Snapshot, Workload

HTTPBIN = Workload("httpbin", namespace="foo")


def peer(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    return f"{trust_domain}/ns/{namespace}/sa/{service_account}"


def req(**parts: Any) -> AuthzRequest:
    return AuthzRequest.from_parts(**parts)


def policy(
    name: str,
    action: str = "ALLOW",
    rules: list[dict[str, Any]] | None = None,
    *,
    namespace: str = "foo",
    selector: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"action": action, **spec}
    if rules is not None:
        body["rules"] = rules
    if selector is not None:
        body["selector"] = {"matchLabels": selector}
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta, "spec": body}


def authorizer(*docs: dict[str, Any], workload: Workload = HTTPBIN) -> Authorizer:
    return Authorizer(Snapshot.from_resources(docs), workload)


def allowed(authz: Authorizer, **parts: Any) -> bool:
    return authz.decide(req(**parts)).allowed


def ref(name: str, namespace: str = "foo") -> str:
    return f"AuthorizationPolicy/{namespace}/{name}"


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return cond


def allow_when(*conditions: dict[str, Any]) -> Authorizer:
    return authorizer(policy("p", "ALLOW", [{"when": list(conditions)}]))


def deny_when(*conditions: dict[str, Any]) -> Authorizer:
    return authorizer(policy("p", "DENY", [{"when": list(conditions)}]))


def allow_from(**source: Any) -> Authorizer:
    return authorizer(policy("p", "ALLOW", [{"from": [{"source": source}]}]))


def allow_to(**operation: Any) -> Authorizer:
    return authorizer(policy("p", "ALLOW", [{"to": [{"operation": operation}]}]))


# ------------------------------------------------------------------------------ the corpus

CORPUS_CASES: dict[str, list[tuple[Workload, dict[str, Any], bool, str | None, str]]] = {
    # DENY principals ["deny"], ALLOW principals ["allow"]; both namespace-wide in foo
    "authz-deny-and-allow.yaml": [
        (HTTPBIN, {"principal": "deny"}, False, ref("httpbin-deny"), f"denied by DENY policy {ref('httpbin-deny')}"),
        (HTTPBIN, {"principal": "allow"}, True, ref("httpbin-allow"), f"allowed by {ref('httpbin-allow')}"),
        (HTTPBIN, {"principal": peer("foo", "allow")}, False, None, "no ALLOW policy matched"),  # exact, not suffix
        (HTTPBIN, {"principal": "allow2"}, False, None, "no ALLOW policy matched"),
        (HTTPBIN, {}, False, None, "no ALLOW policy matched"),  # plaintext: no principal at all
        (Workload("other", namespace="foo"), {"principal": "allow"}, True, ref("httpbin-allow"), ""),
        (Workload("httpbin", namespace="bar"), {"principal": "deny"}, True, None, "no ALLOW policy"),
    ],
    # httpbin-1 selects app=httpbin,version=v1 in foo. Rule 0: serviceAccounts my-ns/my-sa or foo/sa-only,
    # minus my-ns/my-sa-not and foo/sa-not-only. Rule 1 can never match: notPrincipals ["*"] refuses every
    # peer with an identity, while principals ["*"] needs one (and notPaths ["*"], notMethods ["*"]...).
    "authz-allow-full-rule.yaml": [
        (
            Workload("httpbin", "foo", {"version": "v1"}),
            {"principal": peer("my-ns", "my-sa")},
            True,
            ref("httpbin-1"),
            "",
        ),
        (
            Workload("httpbin", "foo", {"version": "v1"}),
            {"principal": peer("foo", "sa-only")},
            True,
            ref("httpbin-1"),
            "",
        ),
        (Workload("httpbin", "foo", {"version": "v1"}), {"principal": peer("bar", "sa-only")}, False, None, ""),
        (Workload("httpbin", "foo", {"version": "v1"}), {"principal": peer("my-ns", "my-sa-not")}, False, None, ""),
        (Workload("httpbin", "foo", {"version": "v1"}), {"principal": peer("foo", "sa-not-only")}, False, None, ""),
        (Workload("httpbin", "foo", {"version": "v1"}), {"principal": peer("my-ns", "my-sa-extra")}, False, None, ""),
        # Istio's service account regex lets other trust domains and extra path parts through
        (
            Workload("httpbin", "foo", {"version": "v1"}),
            {"principal": "td/ns/my-ns/sa/my-sa"},
            True,
            ref("httpbin-1"),
            "",
        ),
        (Workload("httpbin", "foo", {"version": "v1"}), {}, False, None, "no ALLOW policy matched"),
        (
            Workload("httpbin", "foo", {"version": "v1"}),
            {
                "principal": peer("ns", "x-suffix-principal"),
                "source_ip": "1.2.3.4",
                "request_principal": "requestPrincipals/x",
                "host": "exact.com",
                "port": 80,
                "method": "method",
                "path": "/exact",
                "headers": {"x-header": "header"},
            },
            False,
            None,
            "no ALLOW policy matched",
        ),
        (Workload("httpbin", "foo", {"version": "v2"}), {"principal": peer("a", "b")}, True, None, "no ALLOW policy"),
    ],
}


def _corpus_policy_files() -> list[str]:
    names = []
    for path in sorted(CORPUS.glob("*.yaml")):
        if any(doc and doc.get("kind") == "AuthorizationPolicy" for doc in yaml.safe_load_all(path.read_text())):
            names.append(path.name)
    return names


def test_every_corpus_authorization_policy_has_a_case_table() -> None:
    assert _corpus_policy_files() == sorted(CORPUS_CASES)


@pytest.mark.parametrize(
    ("file", "workload", "parts", "expect", "decided_by", "reason"),
    [
        pytest.param(file, *case, id=f"{file}-{i}")
        for file, cases in CORPUS_CASES.items()
        for i, case in enumerate(cases)
    ],
)
def test_corpus_policies_decide_as_istio(
    file: str, workload: Workload, parts: dict[str, Any], expect: bool, decided_by: str | None, reason: str
) -> None:
    authz = Authorizer(Snapshot.from_files(CORPUS / file), workload)
    decision = authz.decide(req(**parts))
    assert decision.allowed is expect
    assert decision.policy == decided_by
    if reason:
        assert decision.reason == reason
    assert authz.custom(req(**parts)) == ()


# ------------------------------------------------------------------------------ actions

PRINCIPAL_RULE = [{"from": [{"source": {"principals": [peer("foo", "good")]}}]}]
DENY_BAD = [{"from": [{"source": {"principals": [peer("foo", "bad")]}}]}]


def test_no_policy_allows_everything() -> None:
    authz = authorizer()
    decision = authz.decide(req())
    assert decision == AuthzDecision(True, None, "no ALLOW policy")
    assert authz.custom(req()) == ()
    assert authz.policies == ()


@pytest.mark.parametrize(
    ("principal", "expect", "decided_by", "reason"),
    [
        (peer("foo", "good"), True, ref("allow"), f"allowed by {ref('allow')}"),
        (peer("foo", "other"), False, None, "no ALLOW policy matched"),
        (None, False, None, "no ALLOW policy matched"),
        (peer("foo", "bad"), False, ref("deny"), f"denied by DENY policy {ref('deny')}"),
    ],
)
def test_deny_then_allow(principal: str | None, expect: bool, decided_by: str | None, reason: str) -> None:
    authz = authorizer(policy("allow", "ALLOW", PRINCIPAL_RULE), policy("deny", "DENY", DENY_BAD))
    decision = authz.decide(req(principal=principal))
    assert (decision.allowed, decision.policy, decision.reason) == (expect, decided_by, reason)


def test_deny_wins_over_a_matching_allow() -> None:
    authz = authorizer(policy("allow-all", "ALLOW", [{}]), policy("deny", "DENY", DENY_BAD))
    assert allowed(authz, principal=peer("foo", "good"))
    decision = authz.decide(req(principal=peer("foo", "bad")))
    assert not decision.allowed
    assert decision.policy == ref("deny")


def test_only_deny_policies_allow_what_they_do_not_match() -> None:
    authz = authorizer(policy("deny", "DENY", DENY_BAD))
    assert authz.decide(req(principal=peer("foo", "x"))) == AuthzDecision(True, None, "no ALLOW policy")
    assert not allowed(authz, principal=peer("foo", "bad"))


def test_any_matching_allow_policy_allows_and_is_named() -> None:
    authz = authorizer(
        policy("a", "ALLOW", [{"to": [{"operation": {"paths": ["/a"]}}]}]),
        policy("b", "ALLOW", [{"to": [{"operation": {"paths": ["/b"]}}]}]),
    )
    assert authz.decide(req(path="/a")).policy == ref("a")
    assert authz.decide(req(path="/b")).policy == ref("b")
    assert not allowed(authz, path="/c")


@pytest.mark.parametrize(
    ("principal", "expect", "audit"),
    [
        (peer("foo", "good"), True, ref("audit-1")),
        (peer("foo", "bad"), False, ref("audit-1")),  # audited even when denied
        (peer("foo", "x"), False, None),
    ],
)
def test_audit_never_changes_the_answer(principal: str, expect: bool, audit: str | None) -> None:
    authz = authorizer(
        policy("allow", "ALLOW", PRINCIPAL_RULE),
        policy("deny", "DENY", DENY_BAD),
        policy("audit-1", "AUDIT", [{"from": [{"source": {"principals": [peer("foo", "good"), peer("foo", "bad")]}}]}]),
        policy("audit-2", "AUDIT", [{}]),
        policy("audit-3", "AUDIT"),  # no rules: never matches
    )
    decision = authz.decide(req(principal=principal))
    assert decision.allowed is expect
    assert decision.audit == (audit or ref("audit-2"))


def test_audit_alone_is_not_an_allow_policy() -> None:
    authz = authorizer(policy("audit", "AUDIT", [{}]))
    assert authz.decide(req()) == AuthzDecision(True, None, "no ALLOW policy", audit=ref("audit"))


CUSTOM_ADMIN = [{"to": [{"operation": {"paths": ["/admin*"]}}]}]


def test_custom_policies_are_for_the_adapter_to_ask() -> None:
    authz = authorizer(
        policy("ext", "CUSTOM", CUSTOM_ADMIN, provider={"name": "opa"}),
        policy("ext-all", "CUSTOM", [{}], provider={"name": "oauth2"}),
    )
    assert authz.custom(req(path="/admin/x")) == (
        CustomCheck(ref("ext"), "opa"),
        CustomCheck(ref("ext-all"), "oauth2"),
    )
    assert authz.custom(req(path="/public")) == (CustomCheck(ref("ext-all"), "oauth2"),)
    # CUSTOM is not an ALLOW policy: once the providers said yes, the request passes
    assert authz.decide(req(path="/admin/x")) == AuthzDecision(True, None, "no ALLOW policy")


def test_a_custom_denial_names_policy_and_provider() -> None:
    decision = AuthzDecision.denied_by_custom(CustomCheck(ref("ext"), "opa"))
    assert not decision.allowed
    assert decision.policy == ref("ext")
    assert decision.reason == f"denied by CUSTOM policy {ref('ext')} (provider opa)"


DRY = {"istio.io/dry-run": "true"}


def test_dry_run_deny_is_reported_not_enforced() -> None:
    authz = authorizer(policy("deny", "DENY", DENY_BAD, annotations=DRY))
    decision = authz.decide(req(principal=peer("foo", "bad")))
    assert decision.allowed
    assert decision.reason == "no ALLOW policy"
    assert decision.shadow == (ShadowResult(ref("deny"), "DENY", True),)
    assert decision.shadow == ((ref("deny"), "DENY", True),)  # a plain tuple too
    assert decision.shadow_denied
    assert not authz.decide(req(principal=peer("foo", "ok"))).shadow_denied


def test_dry_run_allow_is_not_an_allow_policy() -> None:
    authz = authorizer(policy("allow", "ALLOW", PRINCIPAL_RULE, annotations=DRY))
    # no enforced ALLOW policy: every request passes; the shadow says what enforcing it would do
    hit = authz.decide(req(principal=peer("foo", "good")))
    miss = authz.decide(req(principal=peer("foo", "other")))
    assert hit.allowed
    assert miss.allowed
    assert hit.shadow == (ShadowResult(ref("allow"), "ALLOW", True),)
    assert not hit.shadow_denied
    assert miss.shadow == (ShadowResult(ref("allow"), "ALLOW", False),)
    assert miss.shadow_denied


def test_dry_run_next_to_enforced_policies() -> None:
    authz = authorizer(
        policy("allow", "ALLOW", PRINCIPAL_RULE),
        policy("deny-dry", "DENY", [{"to": [{"operation": {"methods": ["DELETE"]}}]}], annotations=DRY),
        policy("ext-dry", "CUSTOM", [{}], provider={"name": "opa"}, annotations={"istio.io/dry-run": "True"}),
        policy("deny", "DENY", DENY_BAD, annotations={"istio.io/dry-run": "false"}),  # enforced
    )
    decision = authz.decide(req(principal=peer("foo", "good"), method="DELETE"))
    assert decision.allowed
    assert decision.policy == ref("allow")
    assert decision.shadow == (
        ShadowResult(ref("deny-dry"), "DENY", True),
        ShadowResult(ref("ext-dry"), "CUSTOM", True),
    )
    assert authz.custom(req()) == ()  # a dry-run CUSTOM policy asks no provider
    refused = authz.decide(req(principal=peer("foo", "bad")))
    assert not refused.allowed
    assert refused.policy == ref("deny")
    assert refused.shadow[0] == ShadowResult(ref("deny-dry"), "DENY", False)


# ------------------------------------------------------------------------------ rules


def test_allow_without_rules_denies_everything() -> None:
    for rules in (None, []):
        authz = authorizer(policy("p", "ALLOW", rules))
        assert authz.decide(req(principal=peer("foo", "a"))) == AuthzDecision(False, None, "no ALLOW policy matched")


def test_the_rule_of_nothing_matches_everything() -> None:
    assert allowed(authorizer(policy("p", "ALLOW", [{}])))
    assert allowed(authorizer(policy("p", "ALLOW", [{}])), principal=peer("x", "y"), path="/any", method="PATCH")
    assert not allowed(authorizer(policy("p", "DENY", [{}])))


def test_rule_parts_and_together_lists_or() -> None:
    rules = [
        {
            "from": [{"source": {"namespaces": ["a"]}}, {"source": {"namespaces": ["b"]}}],
            "to": [{"operation": {"methods": ["GET"]}}, {"operation": {"paths": ["/open"]}}],
            "when": [when("request.headers[x-a]", ["1"]), when("request.headers[x-b]", ["2"])],
        }
    ]
    authz = authorizer(policy("p", "ALLOW", rules))
    ok = {"principal": peer("b", "s"), "method": "POST", "path": "/open", "headers": {"x-a": "1", "x-b": "2"}}
    assert allowed(authz, **ok)
    assert allowed(authz, **{**ok, "method": "GET", "path": "/closed"})
    assert not allowed(authz, **{**ok, "method": "POST", "path": "/closed"})  # no operation
    assert not allowed(authz, **{**ok, "principal": peer("c", "s")})  # no source
    assert not allowed(authz, **{**ok, "headers": {"x-a": "1"}})  # one condition fails


def test_fields_inside_one_source_and_together() -> None:
    authz = allow_from(namespaces=["foo"], ipBlocks=["10.0.0.0/8"])
    assert allowed(authz, principal=peer("foo", "a"), source_ip="10.1.2.3")
    assert not allowed(authz, principal=peer("foo", "a"), source_ip="192.168.0.1")
    assert not allowed(authz, principal=peer("bar", "a"), source_ip="10.1.2.3")


# ------------------------------------------------------------------------------ sources


@pytest.mark.parametrize(
    ("source", "principal", "expect"),
    [
        ({"principals": [peer("foo", "a")]}, peer("foo", "a"), True),
        ({"principals": [peer("foo", "a")]}, peer("foo", "ab"), False),
        ({"principals": ["cluster.local/ns/foo/*"]}, peer("foo", "ab"), True),
        ({"principals": ["*/sa/a"]}, peer("bar", "a"), True),
        ({"principals": ["*"]}, peer("bar", "a"), True),
        ({"principals": ["*"]}, None, False),  # plaintext has no principal: "*" needs one
        ({"notPrincipals": [peer("foo", "a")]}, peer("foo", "b"), True),
        ({"notPrincipals": [peer("foo", "a")]}, peer("foo", "a"), False),
        ({"notPrincipals": ["*"]}, peer("foo", "a"), False),
        ({"notPrincipals": ["*"]}, None, True),  # Istio: a plaintext peer matches every notPrincipals
        ({"notPrincipals": [peer("foo", "a")]}, None, True),
        ({"namespaces": ["foo"]}, peer("foo", "a"), True),
        ({"namespaces": ["foo"]}, peer("foo-bar", "a"), False),
        ({"namespaces": ["foo"]}, "spiffe://cluster.local/ns/foo/sa/a", True),
        ({"namespaces": ["foo-*"]}, peer("foo-bar", "a"), True),
        ({"namespaces": ["*-prod"]}, peer("shop-prod", "a"), True),
        ({"namespaces": ["*-prod"]}, peer("shop-dev", "a"), False),
        ({"namespaces": ["*"]}, peer("x", "a"), True),
        ({"namespaces": ["*"]}, None, False),
        ({"notNamespaces": ["foo"]}, peer("bar", "a"), True),
        ({"notNamespaces": ["foo"]}, peer("foo", "a"), False),
        ({"notNamespaces": ["foo"]}, None, True),
        ({"serviceAccounts": ["bar/a"]}, peer("bar", "a"), True),
        ({"serviceAccounts": ["a"]}, peer("foo", "a"), True),  # bare: the policy's namespace
        ({"serviceAccounts": ["a"]}, peer("bar", "a"), False),
        ({"serviceAccounts": ["a"]}, peer("foo", "ab"), False),
        ({"serviceAccounts": ["a"]}, None, False),
        ({"notServiceAccounts": ["a"]}, peer("foo", "a"), False),
        ({"notServiceAccounts": ["a"]}, peer("foo", "b"), True),
        ({"notServiceAccounts": ["a"]}, None, True),
    ],
)
def test_identity_fields(source: dict[str, Any], principal: str | None, expect: bool) -> None:
    assert allowed(allow_from(**source), principal=principal) is expect


@pytest.mark.parametrize(
    ("source", "source_ip", "remote_ip", "expect"),
    [
        ({"ipBlocks": ["10.0.0.0/16"]}, "10.0.3.4", None, True),
        ({"ipBlocks": ["10.0.0.0/16"]}, "10.1.3.4", None, False),
        ({"ipBlocks": ["10.0.0.7"]}, "10.0.0.7", None, True),
        ({"ipBlocks": ["10.0.0.7"]}, "10.0.0.8", None, False),
        ({"ipBlocks": ["10.0.0.7"]}, "::ffff:10.0.0.7", None, True),  # a dual-stack socket's IPv4 peer
        ({"ipBlocks": ["2001:db8::/32"]}, "2001:db8::1", None, True),
        ({"ipBlocks": ["2001:db8::/32"]}, "10.0.0.1", None, False),
        ({"ipBlocks": ["10.0.0.0/8"]}, "not-an-ip", None, False),
        ({"notIpBlocks": ["10.0.0.0/8"]}, "10.0.0.1", None, False),
        ({"notIpBlocks": ["10.0.0.0/8"]}, "192.168.1.1", None, True),
        # ipBlocks is the peer; remoteIpBlocks the client after X-Forwarded-For handling
        ({"ipBlocks": ["10.0.0.0/8"]}, "192.168.1.1", "10.0.0.1", False),
        ({"remoteIpBlocks": ["10.0.0.0/8"]}, "192.168.1.1", "10.0.0.1", True),
        ({"remoteIpBlocks": ["10.0.0.0/8"]}, "10.0.0.1", "192.168.1.1", False),
        ({"remoteIpBlocks": ["10.0.0.0/8"]}, "10.0.0.1", None, True),  # remote defaults to the peer
        ({"notRemoteIpBlocks": ["10.0.0.0/8"]}, "10.0.0.1", "192.168.1.1", True),
    ],
)
def test_ip_blocks(source: dict[str, Any], source_ip: str, remote_ip: str | None, expect: bool) -> None:
    assert allowed(allow_from(**source), source_ip=source_ip, remote_ip=remote_ip) is expect


@pytest.mark.parametrize(
    ("source", "jwt", "expect"),
    [
        ({"requestPrincipals": ["*"]}, None, False),  # no JWT: no request principal
        ({"requestPrincipals": ["*"]}, "https://issuer.example/alice", True),
        ({"requestPrincipals": ["https://issuer.example/alice"]}, "https://issuer.example/alice", True),
        ({"requestPrincipals": ["https://issuer.example/alice"]}, "https://issuer.example/bob", False),
        ({"requestPrincipals": ["https://issuer.example/*"]}, "https://issuer.example/bob", True),
        ({"requestPrincipals": ["https://issuer.example/*"]}, "https://other.example/bob", False),
        ({"requestPrincipals": ["*/alice"]}, "https://other.example/alice", True),
        ({"notRequestPrincipals": ["*"]}, None, True),
        ({"notRequestPrincipals": ["*"]}, "https://issuer.example/alice", False),
    ],
)
def test_request_principals(source: dict[str, Any], jwt: str | None, expect: bool) -> None:
    assert allowed(allow_from(**source), request_principal=jwt) is expect


def test_deny_requests_without_a_jwt_the_istio_way() -> None:
    authz = authorizer(policy("require-jwt", "DENY", [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]))
    assert not allowed(authz)
    assert allowed(authz, request_principal="https://issuer.example/alice")


# ------------------------------------------------------------------------------ operations


@pytest.mark.parametrize(
    ("operation", "parts", "expect"),
    [
        ({"hosts": ["Example.com"]}, {"host": "example.COM"}, True),  # case-insensitive
        ({"hosts": ["example.com"]}, {"host": "example.com:8080"}, True),  # port dropped
        ({"hosts": ["*.example.com"]}, {"host": "API.example.com"}, True),
        ({"hosts": ["api.*"]}, {"host": "api.internal"}, True),
        ({"hosts": ["api.*"]}, {"host": "web.internal"}, False),
        ({"hosts": ["*"]}, {"host": ""}, True),  # present
        ({"notHosts": ["*.internal"]}, {"host": "db.INTERNAL"}, False),
        ({"notHosts": ["*.internal"]}, {"host": "example.com"}, True),
        ({"ports": ["8080"]}, {"port": 8080}, True),
        ({"ports": ["8080"]}, {"port": 80}, False),
        ({"notPorts": ["8080", "9090"]}, {"port": 9090}, False),
        ({"notPorts": ["8080", "9090"]}, {"port": 80}, True),
        ({"methods": ["GET", "HEAD"]}, {"method": "HEAD"}, True),
        ({"methods": ["GET"]}, {"method": "get"}, False),  # case-sensitive
        ({"methods": ["P*"]}, {"method": "PATCH"}, True),
        ({"notMethods": ["DELETE"]}, {"method": "DELETE"}, False),
        ({"notMethods": ["DELETE"]}, {"method": "GET"}, True),
        ({"paths": ["/api"]}, {"path": "/api"}, True),
        ({"paths": ["/api"]}, {"path": "/api/"}, False),
        ({"paths": ["/api/*"]}, {"path": "/api/v1/x"}, True),
        ({"paths": ["/api/*"]}, {"path": "/api"}, False),
        ({"paths": ["*.json"]}, {"path": "/x/y.json"}, True),
        ({"paths": ["*"]}, {"path": "/"}, True),
        ({"paths": ["/Admin"]}, {"path": "/admin"}, False),  # case-sensitive
        ({"notPaths": ["/private*"]}, {"path": "/private/x"}, False),
        ({"notPaths": ["/private*"]}, {"path": "/public"}, True),
    ],
)
def test_operation_fields(operation: dict[str, Any], parts: dict[str, Any], expect: bool) -> None:
    assert allowed(allow_to(**operation), **parts) is expect


@pytest.mark.parametrize(
    ("template", "path", "expect"),
    [
        ("/path/template/{*}", "/path/template/x", True),
        ("/path/template/{*}", "/path/template/x-y.z~1", True),
        ("/path/template/{*}", "/path/template/x/y", False),  # one segment
        ("/path/template/{*}", "/path/template/", False),  # a non-empty one
        ("/path/template/{*}", "/path/template", False),
        ("/{*}/items/{*}", "/shop/items/42", True),
        ("/{*}/items/{*}", "/shop/other/42", False),
        ("/api/{**}", "/api/a/b/c", True),
        ("/api/{**}", "/api/", True),  # zero segments
        ("/api/{**}", "/api", False),
        ("/{**}/path/template", "/a/b/path/template", True),
        ("/{**}/path/template", "/a/path/template", True),
        # Envoy's template is "/" + "**" + "/path/template": some text must sit between the slashes
        ("/{**}/path/template", "/path/template", False),
        ("/{**}/path/template", "/a/path/template/x", False),
        ("/a.b/{*}", "/aXb/c", False),  # literals are literal
    ],
)
def test_path_templates(template: str, path: str, expect: bool) -> None:
    assert allowed(allow_to(paths=[template]), path=path) is expect
    assert allowed(allow_to(notPaths=[template]), path=path) is not expect


# ------------------------------------------------------------------------------ when


@pytest.mark.parametrize(
    ("condition", "headers", "expect"),
    [
        (when("request.headers[X-Token]", ["abc"]), {"x-token": "abc"}, True),  # names ignore case
        (when("request.headers[x-token]", ["abc"]), {"X-TOKEN": "abc"}, True),
        (when("request.headers[X-Token]", ["abc"]), {"x-token": "ABC"}, False),  # values do not
        (when("request.headers[X-Token]", ["ab*"]), {"x-token": "abc"}, True),
        (when("request.headers[X-Token]", ["*bc"]), {"x-token": "abc"}, True),
        (when("request.headers[X-Token]", ["*"]), {"x-token": ""}, True),  # present, even empty
        (when("request.headers[X-Token]", ["*"]), {}, False),
        (when("request.headers[X-Token]", not_values=["bad"]), {}, True),
        (when("request.headers[X-Token]", not_values=["bad"]), {"x-token": "bad"}, False),
        (when("request.headers[X-Token]", ["a*"], ["ax"]), {"x-token": "ax"}, False),
        # repeated headers are joined with "," and matched as one string (Istio's HeaderMatcher)
        (when("request.headers[X-Tag]", ["a,b"]), [("X-Tag", "a"), ("x-tag", "b")], True),
        (when("request.headers[X-Tag]", ["a"]), [("X-Tag", "a"), ("x-tag", "b")], False),
        (when("request.headers[X-Tag]", ["a*"]), [("X-Tag", "a"), ("x-tag", "b")], True),
        (when("request.headers[X-Tag]", not_values=["*,b"]), [("X-Tag", "a"), ("x-tag", "b")], False),
    ],
)
def test_when_headers(condition: dict[str, Any], headers: Any, expect: bool) -> None:
    assert allowed(allow_when(condition), headers=headers) is expect


@pytest.mark.parametrize(
    ("condition", "parts", "expect"),
    [
        (when("source.ip", ["10.0.0.0/8"]), {"source_ip": "10.9.9.9", "remote_ip": "1.1.1.1"}, True),
        (when("source.ip", ["10.0.0.0/8"]), {"source_ip": "1.1.1.1", "remote_ip": "10.9.9.9"}, False),
        (when("remote.ip", ["10.0.0.0/8"]), {"source_ip": "1.1.1.1", "remote_ip": "10.9.9.9"}, True),
        (when("remote.ip", not_values=["10.0.0.0/8"]), {"remote_ip": "10.9.9.9"}, False),
        (when("source.namespace", ["foo"]), {"principal": peer("foo", "a")}, True),
        (when("source.namespace", ["foo"]), {}, False),
        (when("source.namespace", not_values=["foo"]), {}, True),
        (when("source.principal", [peer("foo", "a")]), {"principal": peer("foo", "a")}, True),
        (when("source.principal", ["*"]), {}, False),
        (when("source.serviceAccount", ["a"]), {"principal": peer("foo", "a")}, True),
        (when("source.serviceAccount", ["bar/a"]), {"principal": peer("foo", "a")}, False),
        (when("destination.port", ["8443"]), {"port": 8443}, True),
        (when("destination.port", not_values=["8443"]), {"port": 8443}, False),
        (when("destination.ip", ["10.0.0.0/8"]), {"destination_ip": "10.0.0.5"}, True),
        (when("destination.ip", ["10.0.0.0/8"]), {"destination_ip": "127.0.0.1"}, False),
        (when("connection.sni", ["*.example.com"]), {"sni": "api.example.com"}, True),
        (when("connection.sni", ["*"]), {"sni": ""}, False),  # no SNI sent
        (when("connection.sni", not_values=["*"]), {"sni": ""}, True),
        (
            when("request.auth.principal", ["https://issuer.example/*"]),
            {"request_principal": "https://issuer.example/a"},
            True,
        ),
        (when("request.auth.principal", ["*"]), {}, False),
        (when("request.auth.principal", not_values=["*"]), {}, True),
    ],
)
def test_when_keys(condition: dict[str, Any], parts: dict[str, Any], expect: bool) -> None:
    assert allowed(allow_when(condition), **parts) is expect


JWT = {"request_principal": "https://issuer.example/alice"}
CLAIMS = {
    "iss": "https://issuer.example",
    "sub": "alice",
    "aud": ["shop", "admin"],
    "azp": "web",
    "groups": ["dev", "ops"],
    "org": {"team": "payments"},
}


@pytest.mark.parametrize(
    ("condition", "claims", "expect"),
    [
        (when("request.auth.claims[groups]", ["ops"]), CLAIMS, True),  # a list matches by any element
        (when("request.auth.claims[groups]", ["qa"]), CLAIMS, False),
        (when("request.auth.claims[iss]", ["https://issuer.example"]), CLAIMS, True),  # a string
        (when("request.auth.claims[org][team]", ["pay*"]), CLAIMS, True),  # nested
        (when("request.auth.claims[org][team][x]", ["*"]), CLAIMS, False),
        (when("request.auth.claims[missing]", not_values=["*"]), CLAIMS, True),
        (when("request.auth.audiences", ["admin"]), CLAIMS, True),
        (when("request.auth.presenter", ["web"]), CLAIMS, True),
        (when("request.auth.presenter", ["mobile"]), CLAIMS, False),
    ],
)
def test_when_jwt_claims(condition: dict[str, Any], claims: dict[str, Any], expect: bool) -> None:
    assert allowed(allow_when(condition), **JWT, claims=claims) is expect


def test_jwt_claims_without_a_jwt_are_absent() -> None:
    condition = when("request.auth.claims[groups]", ["ops"])
    assert not allowed(allow_when(condition))
    assert allowed(deny_when(condition))
    negated = when("request.auth.claims[groups]", not_values=["ops"])
    assert allowed(allow_when(negated))


# ------------------------------------------------------------------------------ what cannot be evaluated

UNKNOWN = [
    (when("experimental.envoy.filters.a.b[c]", ["x"]), {}),
    (when("connection.sni", ["api.example.com"]), {}),  # the server does not know the SNI
    (when("connection.sni", not_values=["api.example.com"]), {}),
    (when("destination.ip", ["10.0.0.0/8"]), {}),  # nor its own address here
    (when("request.auth.claims[groups]", ["ops"]), JWT),  # a JWT whose claims were not passed
    (when("request.auth.audiences", not_values=["x"]), JWT),
]


@pytest.mark.parametrize(("condition", "parts"), UNKNOWN)
def test_an_allow_rule_that_cannot_be_evaluated_grants_nothing(
    condition: dict[str, Any], parts: dict[str, Any]
) -> None:
    authz = authorizer(policy("p", "ALLOW", [{"when": [condition]}]))
    assert authz.decide(req(**parts)) == AuthzDecision(False, None, "no ALLOW policy matched")


@pytest.mark.parametrize(("condition", "parts"), UNKNOWN)
def test_a_deny_rule_that_cannot_be_evaluated_covers_more(condition: dict[str, Any], parts: dict[str, Any]) -> None:
    rule = {"to": [{"operation": {"paths": ["/admin*"]}}], "when": [condition]}
    authz = authorizer(policy("p", "DENY", [rule]), policy("audit", "AUDIT", [rule]))
    assert not allowed(authz, path="/admin/x", **parts)
    assert authz.decide(req(path="/admin/x", **parts)).audit == ref("audit")
    assert allowed(authz, path="/public", **parts)  # the parts it can evaluate still count


# ------------------------------------------------------------------------------ which policies apply


def test_selectors_and_namespaces() -> None:
    snapshot = Snapshot.from_resources(
        [
            policy("ns-wide", "DENY", [{"to": [{"operation": {"paths": ["/ns"]}}]}]),
            policy("for-httpbin", "DENY", [{"to": [{"operation": {"paths": ["/mine"]}}]}], selector={"app": "httpbin"}),
            policy("for-other", "DENY", [{"to": [{"operation": {"paths": ["/other"]}}]}], selector={"app": "other"}),
            policy("elsewhere", "DENY", [{"to": [{"operation": {"paths": ["/elsewhere"]}}]}], namespace="bar"),
            policy("mesh-wide", "DENY", [{"to": [{"operation": {"paths": ["/mesh"]}}]}], namespace="istio-system"),
            policy(
                "mesh-selector",
                "DENY",
                [{"to": [{"operation": {"paths": ["/mesh-sel"]}}]}],
                namespace="istio-system",
                selector={"app": "httpbin"},
            ),
        ]
    )
    httpbin = Authorizer(snapshot, HTTPBIN)
    other = Authorizer(snapshot, Workload("other", namespace="foo"))
    bar_httpbin = Authorizer(snapshot, Workload("httpbin", namespace="bar"))

    def denied(authz: Authorizer, path: str) -> bool:
        return not authz.decide(req(path=path)).allowed

    assert [p for p in ("/ns", "/mine", "/other", "/elsewhere", "/mesh", "/mesh-sel") if denied(httpbin, p)] == [
        "/ns",
        "/mine",
        "/mesh",
        "/mesh-sel",
    ]
    assert [p for p in ("/ns", "/mine", "/other", "/elsewhere", "/mesh", "/mesh-sel") if denied(other, p)] == [
        "/ns",
        "/other",
        "/mesh",
    ]
    assert [p for p in ("/ns", "/mine", "/other", "/elsewhere", "/mesh", "/mesh-sel") if denied(bar_httpbin, p)] == [
        "/elsewhere",
        "/mesh",
        "/mesh-sel",
    ]
    assert httpbin.policies == (  # in ref order
        ref("for-httpbin"),
        ref("ns-wide"),
        ref("mesh-selector", "istio-system"),
        ref("mesh-wide", "istio-system"),
    )


def test_an_allow_policy_for_another_workload_leaves_this_one_open() -> None:
    authz = authorizer(policy("only-admins", "ALLOW", PRINCIPAL_RULE, selector={"app": "other"}))
    assert authz.decide(req()) == AuthzDecision(True, None, "no ALLOW policy")


def test_a_policy_attached_by_target_ref_applies_to_no_workload() -> None:
    gateway_ref = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}
    authz = authorizer(policy("gw", "DENY", [{}], targetRefs=[gateway_ref]))
    assert authz.policies == ()
    assert allowed(authz)


def test_a_custom_root_namespace_comes_from_mesh_config() -> None:
    mesh = {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh"},
        "spec": {"rootNamespace": "mesh-root"},
    }
    authz = authorizer(mesh, policy("all", "DENY", [{}], namespace="mesh-root"))
    assert not allowed(authz)


# ------------------------------------------------------------------------------ the request


def test_request_from_parts() -> None:
    r = AuthzRequest.from_parts(
        principal="spiffe://cluster.local/ns/foo/sa/a",
        host="Example.COM:8443",
        headers=[("X-A", "1"), ("x-a", "2"), ("Accept", "*/*")],
    )
    assert r.principal == "cluster.local/ns/foo/sa/a"
    assert r.host == "example.com"
    assert dict(r.headers) == {"x-a": "1,2", "accept": "*/*"}
    assert r.remote_ip == r.source_ip == "127.0.0.1"
    assert AuthzRequest.from_parts(headers={"X-B": "v"}).headers == {"x-b": "v"}


def test_authorizer_for_a_plain_workload_name() -> None:
    authz = Authorizer(Snapshot.from_resources([policy("p", "DENY", [{}], namespace="default")]), "web")
    assert authz.workload == Workload("web")
    assert not allowed(authz)
    assert "default/web" in repr(authz)
