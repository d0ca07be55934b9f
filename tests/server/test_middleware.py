"""``MeshMiddleware`` enforces the mesh's inbound policy on any ASGI app, as Istio's sidecar would.

One-layer tests drive the middleware through ``httpx.ASGITransport`` (or, where httpx
would clean the request up first, an ASGI scope built by hand: dot segments, lower-case
methods); the rest run it under real uvicorn / ``meshlib.MeshServer`` on loopback, with
real mTLS certificates from the mesh's CA and a real websocket client. The caller's
identity comes from the TLS connection or from the ``x-forwarded-client-cert`` header of
a trusted sidecar (``127.0.0.1`` here); the engine's own tables are in
``tests/engine/test_authz.py``, these show that the adapter hands it the right request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from _upstreams import service_entry, serving

import meshlib
from meshlib.engine import TLS_MODE_LABEL, AuthzRequest, CustomCheck
from meshlib.policy import SpiffeId
from meshlib.server import MeshMiddleware, PeerInfo

HTTPBIN = meshlib.Workload("httpbin", namespace="foo", labels={"app": "httpbin", "version": "v1"})
SIDECAR = "127.0.0.1"
STRANGER = "10.9.9.9"
PRODUCTPAGE = "cluster.local/ns/default/sa/productpage"
RATINGS = "cluster.local/ns/default/sa/ratings"
ELSEWHERE = "cluster.local/ns/other/sa/productpage"
DENIED = "RBAC: access denied"
URL = "http://httpbin.foo.svc.cluster.local:8000"

Doc = dict[str, Any]


# -- resources ----------------------------------------------------------------------------------


def policy(
    name: str,
    action: str = "ALLOW",
    rules: list[Doc] | None = None,
    *,
    namespace: str = "foo",
    selector: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> Doc:
    body: Doc = {"action": action, **spec}
    if rules is not None:
        body["rules"] = rules
    if selector is not None:
        body["selector"] = {"matchLabels": selector}
    meta: Doc = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta, "spec": body}


def allow(*rules: Doc, name: str = "allow", **kw: Any) -> Doc:
    return policy(name, "ALLOW", list(rules), **kw)


def deny(*rules: Doc, name: str = "deny", **kw: Any) -> Doc:
    return policy(name, "DENY", list(rules), **kw)


def src(**source: Any) -> Doc:
    return {"from": [{"source": source}]}


def op(**operation: Any) -> Doc:
    return {"to": [{"operation": operation}]}


def when(key: str, *values: str) -> Doc:
    return {"when": [{"key": key, "values": list(values)}]}


def peer_authentication(mode: str, namespace: str = "foo") -> Doc:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": {"mtls": {"mode": mode}},
    }


def normalization(mode: str) -> Doc:
    return {
        "apiVersion": "meshlib.io/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh", "namespace": "istio-system"},
        "spec": {"pathNormalization": {"normalization": mode}},
    }


def xfcc(principal: str) -> str:
    return f"By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash=abc;URI=spiffe://{principal}"


def mesh_of(*docs: Doc, workload: meshlib.Workload = HTTPBIN) -> meshlib.Mesh:
    return meshlib.Mesh.from_resources(list(docs), workload=workload)


# -- the app and the ways to call it -----------------------------------------------------------


class EchoApp:
    """Answers 200 with what reached it (path, raw path, query, headers); records every scope."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        self.scopes.append(scope)
        decision = scope.get("extensions", {}).get("meshlib.authz")
        payload = json.dumps(
            {
                "path": scope["path"],
                "raw_path": scope["raw_path"].decode("latin-1") if scope.get("raw_path") else None,
                "query": scope["query_string"].decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "policy": decision.policy if decision is not None else None,
            }
        ).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": payload})

    @property
    def calls(self) -> int:
        return len(self.scopes)


async def call(
    app: Any,
    path: str = "/",
    *,
    method: str = "GET",
    principal: str | None = None,
    headers: Sequence[tuple[str, str]] | dict[str, str] = (),
    client: str = SIDECAR,
    url: str = URL,
) -> httpx.Response:
    """One request through ``httpx.ASGITransport`` from ``client``; ``principal`` travels as XFCC."""
    sent = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if principal is not None:
        sent.append(("x-forwarded-client-cert", xfcc(principal)))
    transport = httpx.ASGITransport(app=app, client=(client, 5000))
    async with httpx.AsyncClient(transport=transport, base_url=url) as http:
        return await http.request(method, path, headers=sent)


async def raw_call(
    app: Any,
    raw_path: bytes,
    *,
    method: str = "GET",
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    client: str = SIDECAR,
    extensions: dict[str, Any] | None = None,
) -> tuple[int, bytes]:
    """One request from an ASGI scope built by hand: the path and method exactly as a raw client sent them."""
    from urllib.parse import unquote

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"httpbin.foo.svc.cluster.local"), *headers],
        "client": (client, 5000),
        "server": ("127.0.0.1", 8000),
    }
    if extensions is not None:
        scope["extensions"] = extensions
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


# -- 1. AuthorizationPolicy, action by action ----------------------------------------------------

P, R, E = PRODUCTPAGE, RATINGS, ELSEWHERE

# (policies, request, expected status). Requests: method, path, principal (XFCC from the sidecar), headers.
AUTHZ_TABLE: list[tuple[str, list[Doc], dict[str, Any], int]] = [
    # principals: exact, prefix, suffix, and '*' (any authenticated peer)
    ("principal-exact", [allow(src(principals=[P]))], {"principal": P}, 200),
    ("principal-other", [allow(src(principals=[P]))], {"principal": R}, 403),
    ("principal-plaintext", [allow(src(principals=[P]))], {}, 403),
    ("principal-prefix", [allow(src(principals=["cluster.local/ns/default/*"]))], {"principal": R}, 200),
    ("principal-prefix-miss", [allow(src(principals=["cluster.local/ns/default/*"]))], {"principal": E}, 403),
    ("principal-suffix", [allow(src(principals=["*/sa/productpage"]))], {"principal": E}, 200),
    ("principal-star", [allow(src(principals=["*"]))], {"principal": R}, 200),
    ("principal-star-plaintext", [allow(src(principals=["*"]))], {}, 403),
    # notPrincipals: a plaintext peer has no principal, so it is "not" any of them
    ("not-principal-hit", [allow(src(notPrincipals=[P]))], {"principal": P}, 403),
    ("not-principal-other", [allow(src(notPrincipals=[P]))], {"principal": R}, 200),
    ("not-principal-plaintext", [allow(src(notPrincipals=[P]))], {}, 200),
    # namespaces
    ("namespace", [allow(src(namespaces=["default"]))], {"principal": P}, 200),
    ("namespace-other", [allow(src(namespaces=["default"]))], {"principal": E}, 403),
    ("namespace-plaintext", [allow(src(namespaces=["default"]))], {}, 403),
    ("not-namespace", [allow(src(notNamespaces=["default"]))], {"principal": E}, 200),
    ("not-namespace-hit", [allow(src(notNamespaces=["default"]))], {"principal": P}, 403),
    # paths: prefix, suffix, exact (query ignored), {*} one segment, {**} many
    ("path-prefix", [allow(op(paths=["/api/*"]))], {"path": "/api/items"}, 200),
    ("path-prefix-miss", [allow(op(paths=["/api/*"]))], {"path": "/apix"}, 403),
    ("path-prefix-bare", [allow(op(paths=["/api/*"]))], {"path": "/api"}, 403),
    ("path-suffix", [allow(op(paths=["*/info"]))], {"path": "/v1/info"}, 200),
    ("path-exact-query", [allow(op(paths=["/exact"]))], {"path": "/exact?x=1&y=/admin"}, 200),
    ("path-exact-slash", [allow(op(paths=["/exact"]))], {"path": "/exact/"}, 403),
    ("path-one-segment", [allow(op(paths=["/users/{*}/profile"]))], {"path": "/users/42/profile"}, 200),
    ("path-one-segment-two", [allow(op(paths=["/users/{*}/profile"]))], {"path": "/users/4/2/profile"}, 403),
    ("path-many-segments", [allow(op(paths=["/files/{**}"]))], {"path": "/files/a/b/c.txt"}, 200),
    ("path-many-segments-miss", [allow(op(paths=["/files/{**}"]))], {"path": "/other/a/b"}, 403),
    # methods
    ("method", [allow(op(methods=["GET", "HEAD"]))], {"method": "HEAD"}, 200),
    ("method-miss", [allow(op(methods=["GET", "HEAD"]))], {"method": "POST"}, 403),
    ("not-method", [allow(op(notMethods=["DELETE"]))], {"method": "PUT"}, 200),
    ("not-method-hit", [allow(op(notMethods=["DELETE"]))], {"method": "DELETE"}, 403),
    # when request.headers: the name in the policy matches whatever case the client sent
    ("header", [allow(when("request.headers[X-Tenant]", "acme"))], {"headers": {"x-tenant": "acme"}}, 200),
    ("header-case", [allow(when("request.headers[x-tenant]", "acme"))], {"headers": {"X-TENANT": "acme"}}, 200),
    ("header-prefix", [allow(when("request.headers[x-env]", "prod-*"))], {"headers": {"x-env": "prod-eu"}}, 200),
    ("header-value", [allow(when("request.headers[X-Tenant]", "acme"))], {"headers": {"x-tenant": "evil"}}, 403),
    ("header-absent", [allow(when("request.headers[X-Tenant]", "acme"))], {}, 403),
    # DENY beats ALLOW
    (
        "deny-beats-allow",
        [deny(op(paths=["/admin*"])), allow(src(principals=[P]))],
        {"path": "/admin/x", "principal": P},
        403,
    ),
    (
        "deny-miss-allow",
        [deny(op(paths=["/admin*"])), allow(src(principals=[P]))],
        {"path": "/home", "principal": P},
        200,
    ),
    ("deny-miss-no-allow-match", [deny(op(paths=["/admin*"])), allow(src(principals=[P]))], {"principal": R}, 403),
    # no ALLOW policy: everything DENY does not refuse passes
    ("no-allow-policy", [deny(op(paths=["/admin*"]))], {"path": "/home"}, 200),
    ("no-allow-policy-denied", [deny(op(paths=["/admin*"]))], {"path": "/admin"}, 403),
    ("no-policy-at-all", [], {}, 200),
    # ALLOW policies, none matching
    (
        "allows-none-match",
        [allow(src(principals=[P]), name="a"), allow(op(paths=["/x"]), name="b")],
        {"principal": R},
        403,
    ),
    (
        "allows-second-matches",
        [allow(src(principals=[P]), name="a"), allow(op(paths=["/x"]), name="b")],
        {"path": "/x"},
        200,
    ),
    # rules unset never matches; a rule {} always does
    ("allow-rules-unset", [policy("a", "ALLOW")], {"principal": P}, 403),
    ("allow-rules-empty-list", [policy("a", "ALLOW", [])], {"principal": P}, 403),
    ("allow-rule-empty", [policy("a", "ALLOW", [{}])], {}, 200),
    ("deny-rule-empty", [policy("d", "DENY", [{}])], {"principal": P}, 403),
    # selector and namespace: whose policy it is
    ("selector-other-workload", [policy("a", "ALLOW", selector={"app": "reviews"})], {}, 200),
    ("selector-this-workload", [policy("a", "ALLOW", selector={"app": "httpbin"})], {}, 403),
    ("selector-other-version", [policy("a", "ALLOW", selector={"version": "v2"})], {}, 200),
    ("other-namespace", [policy("d", "DENY", [{}], namespace="bar")], {}, 200),
    ("root-namespace", [deny(op(paths=["/blocked"]), namespace="istio-system")], {"path": "/blocked"}, 403),
    ("root-namespace-miss", [deny(op(paths=["/blocked"]), namespace="istio-system")], {"path": "/open"}, 200),
]


@pytest.mark.parametrize(("docs", "request_", "status"), [c[1:] for c in AUTHZ_TABLE], ids=[c[0] for c in AUTHZ_TABLE])
async def test_authorization_table(docs: list[Doc], request_: dict[str, Any], status: int) -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(*docs), trusted_sidecars=[SIDECAR])
    response = await call(mw, request_.get("path", "/"), **{k: v for k, v in request_.items() if k != "path"})
    assert response.status_code == status, response.text
    assert app.calls == (1 if status == 200 else 0)  # a denied request never reaches the app
    if status == 403:
        assert response.text == DENIED


# The adapter hands the engine the peer address, host, port and headers as Envoy would.
ADAPTER_TABLE: list[tuple[str, list[Doc], dict[str, Any], int]] = [
    ("ip-block", [allow(src(ipBlocks=["10.1.0.0/16"]))], {"client": "10.1.2.3"}, 200),
    ("ip-block-miss", [allow(src(ipBlocks=["10.1.0.0/16"]))], {"client": "127.0.0.1"}, 403),
    ("remote-ip-block", [allow(src(remoteIpBlocks=["10.1.2.3"]))], {"client": "10.1.2.3"}, 200),
    ("not-ip-block", [allow(src(notIpBlocks=["10.1.0.0/16"]))], {"client": "10.1.2.3"}, 403),
    ("when-source-ip", [allow(when("source.ip", "10.1.0.0/16"))], {"client": "10.1.9.9"}, 200),
    ("host-port-stripped-any-case", [allow(op(hosts=["httpbin.foo.svc.cluster.local"]))], {}, 200),
    (
        "host-upper",
        [allow(op(hosts=["httpbin.foo.svc.cluster.local"]))],
        {"url": "http://HTTPBIN.foo.svc.cluster.local:8000"},
        200,
    ),
    ("host-miss", [allow(op(hosts=["httpbin.foo.svc.cluster.local"]))], {"url": "http://other.foo:8000"}, 403),
    ("port", [allow(op(ports=["8000"]))], {}, 200),
    ("port-miss", [allow(op(ports=["8000"]))], {"url": "http://httpbin.foo:9000"}, 403),
    ("when-destination-port", [allow(when("destination.port", "8000"))], {}, 200),
    (
        "repeated-headers-joined",
        [allow(when("request.headers[x-v]", "a,b"))],
        {"headers": [("x-v", "a"), ("x-v", "b")]},
        200,
    ),
    ("when-source-principal", [allow(when("source.principal", P))], {"principal": P}, 200),
    ("when-source-namespace", [allow(when("source.namespace", "other"))], {"principal": E}, 200),
    ("when-source-namespace-miss", [allow(when("source.namespace", "other"))], {"principal": P}, 403),
    ("service-account", [allow(src(serviceAccounts=["default/productpage"]))], {"principal": P}, 200),
]


@pytest.mark.parametrize(
    ("docs", "request_", "status"), [c[1:] for c in ADAPTER_TABLE], ids=[c[0] for c in ADAPTER_TABLE]
)
async def test_the_adapter_passes_address_host_port_and_headers(
    docs: list[Doc], request_: dict[str, Any], status: int
) -> None:
    mw = MeshMiddleware(EchoApp(), mesh=mesh_of(*docs), trusted_sidecars=[SIDECAR])
    response = await call(mw, **request_)
    assert response.status_code == status, response.text


async def test_a_denial_says_rbac_access_denied_and_only_the_log_names_the_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mw = MeshMiddleware(EchoApp(), mesh=mesh_of(deny(op(paths=["/admin*"]), name="secret-admin-guard")))
    with caplog.at_level(logging.INFO, logger="meshlib.authz"):
        response = await call(mw, "/admin/users")
    assert response.status_code == 403
    assert response.content == b"RBAC: access denied"
    assert "secret-admin-guard" not in response.text
    assert "secret-admin-guard" not in str(response.headers)
    logged = [r.getMessage() for r in caplog.records if r.name == "meshlib.authz"]
    assert any("AuthorizationPolicy/foo/secret-admin-guard" in m and "/admin/users" in m for m in logged), logged


async def test_audit_never_changes_the_answer_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    audit = policy("audit-all", "AUDIT", [{}])
    with caplog.at_level(logging.INFO, logger="meshlib.authz"):
        alone = await call(MeshMiddleware(EchoApp(), mesh=mesh_of(audit)), "/a")
        denied = await call(MeshMiddleware(EchoApp(), mesh=mesh_of(audit, allow(src(principals=[P])))), "/b")
    assert alone.status_code == 200  # an AUDIT policy is no ALLOW policy: it does not close the workload
    assert denied.status_code == 403  # nor does it open one
    logged = [r.getMessage() for r in caplog.records if r.name == "meshlib.authz"]
    assert any(m.startswith("AUDIT") and "AuthorizationPolicy/foo/audit-all" in m and "/a" in m for m in logged)
    assert any("AUDIT" in m and "AuthorizationPolicy/foo/audit-all" in m and "/b" in m for m in logged), logged


async def test_dry_run_policies_are_logged_and_never_enforced(caplog: pytest.LogCaptureFixture) -> None:
    dry = {"istio.io/dry-run": "true"}
    docs = [
        policy("deny-everything", "DENY", [{}], annotations=dry),
        allow(src(principals=[P]), name="only-productpage", annotations=dry),
    ]
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(*docs), trusted_sidecars=[SIDECAR])
    with caplog.at_level(logging.INFO, logger="meshlib.authz"):
        responses = [await call(mw, "/x"), await call(mw, "/y", principal=R)]
    assert [r.status_code for r in responses] == [200, 200]
    assert app.calls == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "meshlib.authz"]
    assert any("dry-run" in m and "deny-everything" in m and "would deny" in m for m in logged), logged


async def test_custom_policies_ask_the_hook_and_fail_closed(caplog: pytest.LogCaptureFixture) -> None:
    custom = policy("ext", "CUSTOM", [op(paths=["/ext/*"])], provider={"name": "opa"})
    asked: list[tuple[AuthzRequest, CustomCheck]] = []

    def hook(answer: bool | Exception) -> Any:
        async def check(request: AuthzRequest, check: CustomCheck) -> bool:
            asked.append((request, check))
            if isinstance(answer, Exception):
                raise answer
            return answer

        return check

    mesh = mesh_of(custom)
    no = MeshMiddleware(EchoApp(), mesh=mesh, custom=hook(False), trusted_sidecars=[SIDECAR])
    yes = MeshMiddleware(EchoApp(), mesh=mesh, custom=hook(True))
    broken = MeshMiddleware(EchoApp(), mesh=mesh, custom=hook(ConnectionError("opa is down")))
    missing = MeshMiddleware(EchoApp(), mesh=mesh)
    with caplog.at_level(logging.INFO, logger="meshlib.authz"):
        assert (await call(no, "/other")).status_code == 200  # the policy does not match: no one is asked
        assert asked == []
        refused = await call(no, "/ext/data", method="POST", principal=P, headers={"x-user": "bob"})
        assert (refused.status_code, refused.text) == (403, DENIED)
        assert (await call(yes, "/ext/data")).status_code == 200
        assert (await call(broken, "/ext/data")).status_code == 403
        assert (await call(missing, "/ext/data")).status_code == 403
        assert (await call(missing, "/open")).status_code == 200
    request, check = asked[0]
    assert (request.principal, request.method, request.path) == (P, "POST", "/ext/data")
    assert request.headers["x-user"] == "bob"
    assert request.port == 8000
    assert request.host == "httpbin.foo.svc.cluster.local"
    assert request.source_ip == SIDECAR
    assert check == CustomCheck("AuthorizationPolicy/foo/ext", "opa")
    logged = " | ".join(r.getMessage() for r in caplog.records if r.name == "meshlib.authz")
    assert "opa is down" in logged
    assert "no custom= hook" in logged


# -- the real Istio corpus, through the middleware ---------------------------------------------


async def test_corpus_deny_and_allow_through_the_middleware(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Principals "deny" and "allow" are no SPIFFE identity a peer can prove: the ALLOW policy
    # exists, so every real caller is refused, and by "no ALLOW matched", never by the DENY.
    mesh = meshlib.Mesh.from_files(corpus / "authz-deny-and-allow.yaml", workload=HTTPBIN)
    mw = MeshMiddleware(EchoApp(), mesh=mesh, trusted_sidecars=[SIDECAR])
    with caplog.at_level(logging.INFO, logger="meshlib.authz"):
        for principal in (P, None):
            response = await call(mw, "/headers", principal=principal)
            assert (response.status_code, response.text) == (403, DENIED)
    logged = [r.getMessage() for r in caplog.records if r.name == "meshlib.authz"]
    assert len(logged) == 2, logged
    assert all("no ALLOW policy matched" in m for m in logged), logged
    # Another namespace's workload is not covered by policies in foo.
    other = meshlib.Mesh.from_files(corpus / "authz-deny-and-allow.yaml", workload=meshlib.Workload("httpbin"))
    assert (await call(MeshMiddleware(EchoApp(), mesh=other), "/headers")).status_code == 200


@pytest.mark.parametrize(
    ("principal", "status"),
    [
        ("cluster.local/ns/my-ns/sa/my-sa", 200),  # serviceAccounts "my-ns/my-sa"
        ("cluster.local/ns/foo/sa/sa-only", 200),  # a bare "sa-only" is in the policy's namespace
        ("cluster.local/ns/my-ns/sa/sa-only", 403),
        ("cluster.local/ns/foo/sa/sa-not-only", 403),
        (PRODUCTPAGE, 403),  # the second rule holds contradictions (principals * and notPrincipals *)
        (None, 403),
    ],
)
async def test_corpus_allow_full_rule_through_the_middleware(corpus: Path, principal: str | None, status: int) -> None:
    mesh = meshlib.Mesh.from_files(corpus / "authz-allow-full-rule.yaml", workload=HTTPBIN)
    mw = MeshMiddleware(EchoApp(), mesh=mesh, trusted_sidecars=[SIDECAR])
    response = await call(mw, "/exact", method="POST", principal=principal, headers={"X-header": "header"})
    assert response.status_code == status


async def test_corpus_allow_full_rule_selects_only_httpbin_v1(corpus: Path) -> None:
    v2 = meshlib.Workload("httpbin", namespace="foo", labels={"app": "httpbin", "version": "v2"})
    mesh = meshlib.Mesh.from_files(corpus / "authz-allow-full-rule.yaml", workload=v2)
    assert (await call(MeshMiddleware(EchoApp(), mesh=mesh), "/anything")).status_code == 200


# -- path normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"/admin",
        b"/admin/",
        b"/admin/users",
        b"/public/../admin",
        b"/public/%2e%2e/admin",
        b"/public/%2E%2E/admin/x",
        b"/%61dmin",
        b"/%61%64%6D%69%6E",
        b"/./admin",
        b"/a/b/../../admin",
        b"/../../admin",
        b"/public\\..\\admin",
    ],
)
async def test_path_tricks_do_not_get_around_a_deny(raw: bytes) -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(deny(op(paths=["/admin*"]))))
    status, body = await raw_call(mw, raw, query=b"x=1")
    assert (status, body) == (403, DENIED.encode())
    assert app.calls == 0


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"/admin%00", "NUL"),
        (b"/files/a%00.txt", "NUL"),
        (b"/broken%zz", "escape"),
        (b"/%", "escape"),
    ],
)
async def test_bad_paths_are_400_before_anything_else(raw: bytes, why: str) -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(policy("open", "ALLOW", [{}])))
    status, body = await raw_call(mw, raw)
    assert status == 400
    assert why in body.decode()
    assert app.calls == 0


@pytest.mark.parametrize("method", ["get", "Get", "pOST"])
async def test_a_method_that_is_not_upper_case_is_400(method: str) -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(deny(op(methods=["GET", "POST"]))))
    status, body = await raw_call(mw, b"/", method=method)
    assert status == 400
    assert b"upper case" in body
    assert app.calls == 0


@pytest.mark.parametrize(
    ("raw", "path", "raw_path"),
    [
        (b"/public/./data/abc/../xyz", "/public/data/xyz", "/public/data/xyz"),
        (b"/%7Euser/%41bc", "/~user/Abc", "/~user/Abc"),
        (b"/a%2Fb/../c", "/c", "/c"),  # %2F is no separator in BASE: "a%2Fb" is one segment
        (b"/keep%2fslash", "/keep/slash", "/keep%2fslash"),  # kept encoded on the wire, decoded in path
        (b"/plain/path", "/plain/path", "/plain/path"),
    ],
)
async def test_the_app_receives_the_path_the_policies_saw(raw: bytes, path: str, raw_path: str) -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(deny(op(paths=["/admin*"]))))
    status, _ = await raw_call(mw, raw, query=b"q=/../admin")
    assert status == 200
    seen = app.scopes[0]
    assert (seen["path"], seen["raw_path"], seen["query_string"]) == (path, raw_path.encode(), b"q=/../admin")


async def test_merge_slashes_modes_follow_mesh_config() -> None:
    guard = deny(op(paths=["/admin*"]))
    base = MeshMiddleware(EchoApp(), mesh=mesh_of(guard))
    merge = MeshMiddleware(EchoApp(), mesh=mesh_of(guard, normalization("MERGE_SLASHES")))
    decode = MeshMiddleware(EchoApp(), mesh=mesh_of(guard, normalization("DECODE_AND_MERGE_SLASHES")))
    # Istio's documented caveat: BASE keeps "//admin" (so a DENY on /admin* misses it); MERGE_SLASHES does not.
    assert (await raw_call(base, b"//admin"))[0] == 200
    assert (await raw_call(merge, b"//admin"))[0] == 403
    assert (await raw_call(merge, b"/public/..%2Fadmin"))[0] == 200
    assert (await raw_call(decode, b"/public/..%2Fadmin"))[0] == 403
    assert (await raw_call(decode, b"/x/..%5C..%5Cadmin"))[0] == 403


def test_path_tricks_through_real_uvicorn() -> None:
    app = EchoApp()
    with serving(MeshMiddleware(app, mesh=mesh_of(deny(op(paths=["/admin*"]))))) as port:
        answers = {}
        for target in ("/public/../admin", "/%61dmin", "/public/./data/../x?y=1", "/ok%00"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            answers[target] = (int(head.split()[1]), body)
    assert answers["/public/../admin"] == (403, DENIED.encode())
    assert answers["/%61dmin"] == (403, DENIED.encode())
    assert answers["/ok%00"][0] == 400
    status, body = answers["/public/./data/../x?y=1"]
    assert status == 200
    assert (json.loads(body)["path"], json.loads(body)["query"]) == ("/public/x", "y=1")
    assert app.calls == 1


# -- peer identity: XFCC only from a trusted sidecar --------------------------------------------


async def test_a_spoofed_xfcc_is_removed_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(), trusted_sidecars=[SIDECAR])
    with caplog.at_level(logging.WARNING, logger="meshlib.server"):
        echoed = await call(mw, "/", principal=P, client=STRANGER, headers={"x-other": "kept"})
    names = [name for name, _ in echoed.json()["headers"]]
    assert "x-forwarded-client-cert" not in names
    assert "x-other" in names
    assert any(STRANGER in r.getMessage() and "x-forwarded-client-cert" in r.getMessage() for r in caplog.records)

    guarded = MeshMiddleware(EchoApp(), mesh=mesh_of(allow(src(principals=[P]))), trusted_sidecars=[SIDECAR])
    assert (await call(guarded, "/", principal=P, client=STRANGER)).status_code == 403
    honoured = await call(guarded, "/", principal=P, client=SIDECAR)
    assert honoured.status_code == 200
    assert "x-forwarded-client-cert" in [name for name, _ in honoured.json()["headers"]]


async def test_a_flood_of_spoofed_xfcc_logs_one_warning_per_address(caplog: pytest.LogCaptureFixture) -> None:
    mw = MeshMiddleware(EchoApp(), mesh=mesh_of(), trusted_sidecars=[SIDECAR])
    with caplog.at_level(logging.WARNING, logger="meshlib.server"):
        for _ in range(20):
            await call(mw, "/", principal=P, client=STRANGER)
    warnings = [r for r in caplog.records if "x-forwarded-client-cert" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (f'By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash=abc;URI="spiffe://{P}"', 200),  # quoted value
        (f'Subject="CN=x,O=a;b";URI=spiffe://{P}', 200),  # separators inside quotes
        (f"By=spiffe://x;uri=spiffe://{P}", 200),  # key in any case
        (f"URI=spiffe://{P},By=spiffe://cluster.local/ns/foo/sa/httpbin;URI=spiffe://{R}", 403),  # the last hop speaks
        (f"By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash=abc;URI=https://{P}", 403),  # no SPIFFE id
        ("By=spiffe://cluster.local/ns/foo/sa/httpbin;Hash=abc", 403),  # no URI at all
    ],
)
async def test_the_trusted_xfcc_is_read_as_envoy_writes_it(value: str, status: int) -> None:
    mw = MeshMiddleware(EchoApp(), mesh=mesh_of(allow(src(principals=[P]))), trusted_sidecars=[SIDECAR])
    response = await call(mw, "/", headers={"x-forwarded-client-cert": value})
    assert response.status_code == status


async def test_without_trusted_sidecars_no_xfcc_is_believed() -> None:
    mw = MeshMiddleware(EchoApp(), mesh=mesh_of(allow(src(principals=[P]))))
    assert (await call(mw, "/", principal=P, client=SIDECAR)).status_code == 403


async def test_a_spoofed_xfcc_in_any_header_case_is_removed() -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(allow(src(principals=[P]))), trusted_sidecars=[SIDECAR])
    header = (b"X-Forwarded-Client-Cert", xfcc(P).encode())
    status, _ = await raw_call(mw, b"/", headers=[header], client=STRANGER)
    assert status == 403
    status, _ = await raw_call(mw, b"/", headers=[header], client=SIDECAR)
    assert status == 200
    open_app = EchoApp()
    await raw_call(MeshMiddleware(open_app, mesh=mesh_of(), trusted_sidecars=[SIDECAR]), b"/", headers=[header])
    await raw_call(MeshMiddleware(open_app, mesh=mesh_of()), b"/", headers=[header], client=STRANGER)
    assert [h for h, _ in open_app.scopes[0]["headers"] if h.lower() == b"x-forwarded-client-cert"] != []
    assert [h for h, _ in open_app.scopes[1]["headers"] if h.lower() == b"x-forwarded-client-cert"] == []


async def test_a_tls_peer_speaks_for_itself_even_from_a_sidecar_address() -> None:
    app = EchoApp()
    mw = MeshMiddleware(app, mesh=mesh_of(allow(src(principals=[P]))), trusted_sidecars=[SIDECAR])
    tls_peer = {"meshlib.peer": PeerInfo(SpiffeId("spiffe://" + R), True)}
    claim = [(b"x-forwarded-client-cert", xfcc(P).encode())]
    status, _ = await raw_call(mw, b"/", headers=claim, extensions=tls_peer)
    assert status == 403  # the certificate says ratings, whatever the header claims
    tls_peer = {"meshlib.peer": PeerInfo(SpiffeId("spiffe://" + P), True)}
    status, _ = await raw_call(mw, b"/", headers=[(b"x-forwarded-client-cert", xfcc(R).encode())], extensions=tls_peer)
    assert status == 200
    assert all(h != b"x-forwarded-client-cert" for h, _ in app.scopes[0]["headers"])


# -- PeerAuthentication -------------------------------------------------------------------------


async def test_strict_refuses_plaintext_and_permissive_takes_it() -> None:
    app = EchoApp()
    strict = MeshMiddleware(app, mesh=mesh_of(peer_authentication("STRICT")), trusted_sidecars=[SIDECAR])
    refused = await call(strict, "/")
    assert refused.status_code == 400
    assert refused.text == "meshlib: this port requires mutual TLS (PeerAuthentication STRICT)"
    assert (await call(strict, "/", principal=P, client=STRANGER)).status_code == 400  # an untrusted claim is no TLS
    assert (await call(strict, "/", principal=P)).status_code == 200  # the sidecar did the mTLS
    assert app.calls == 1
    permissive = MeshMiddleware(EchoApp(), mesh=mesh_of(peer_authentication("PERMISSIVE")))
    assert (await call(permissive, "/")).status_code == 200
    mesh_wide = MeshMiddleware(EchoApp(), mesh=mesh_of(peer_authentication("STRICT", namespace="istio-system")))
    assert (await call(mesh_wide, "/")).status_code == 400


# -- real mTLS, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> meshlib.CertificateAuthority:
    return meshlib.CertificateAuthority.create()


async def test_real_mtls_identity_decides_through_meshserver(ca: meshlib.CertificateAuthority) -> None:
    reviews = meshlib.Workload("reviews")  # the ServiceEntry host: the identity clients expect
    server_mesh = meshlib.Mesh.from_resources(
        [
            peer_authentication("STRICT", namespace="default"),
            allow(src(principals=[PRODUCTPAGE]), name="reviews-viewer", namespace="default"),
        ],
        workload=reviews,
        ca=ca,
    )
    app = EchoApp()
    with serving(MeshMiddleware(app, mesh=server_mesh), mesh=server_mesh) as port:
        entry = service_entry("reviews", (f"127.0.0.1:{port}", "v1"))
        for ep in entry["spec"]["endpoints"]:
            ep["labels"][TLS_MODE_LABEL] = "istio"
        statuses = {}
        for name in ("productpage", "ratings"):
            client = meshlib.Mesh.from_resources([entry], workload=meshlib.Workload(name), ca=ca)
            async with client.async_client() as http:
                response = await http.get("http://reviews/reviews/1")
            statuses[name] = (response.status_code, response.text if response.status_code != 200 else "")
            client.close()
        plain = meshlib.Mesh.from_resources([entry], workload=meshlib.Workload("productpage"))
        async with plain.async_client() as http:
            refused = await http.get("http://reviews/reviews/1")
    server_mesh.close()
    assert statuses == {"productpage": (200, ""), "ratings": (403, DENIED)}
    assert refused.status_code == 400  # no certificate: STRICT says no before any policy
    assert app.calls == 1
    peer = app.scopes[0]["extensions"]["meshlib.peer"]
    assert str(peer.spiffe_id) == "spiffe://" + PRODUCTPAGE
    assert peer.mtls


# -- lifespan and websockets under uvicorn ------------------------------------------------------


class LifespanApp(EchoApp):
    def __init__(self) -> None:
        super().__init__()
        self.lifespan: list[str] = []
        self.lifespan_scope: dict[str, Any] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await super().__call__(scope, receive, send)
            return
        self.lifespan_scope = scope
        while True:
            message = await receive()
            self.lifespan.append(message["type"])
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return


class Spy:
    """The layer uvicorn calls: records the scope object it handed down."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await self.app(scope, receive, send)


def test_lifespan_passes_through_untouched() -> None:
    app = LifespanApp()
    spy = Spy(MeshMiddleware(app, mesh=mesh_of(policy("closed", "ALLOW"), peer_authentication("STRICT"))))
    with serving(spy, lifespan="on") as port:
        assert app.lifespan == ["lifespan.startup"]
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 400  # the policy applies to requests
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]
    lifespan = next(s for s in spy.scopes if s["type"] == "lifespan")
    assert app.lifespan_scope is lifespan
    assert "meshlib.authz" not in (lifespan.get("extensions") or {})


class WebsocketEcho:
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": f"{scope['path']}: {message.get('text')}"})


async def test_websocket_handshakes_are_authorized() -> None:
    client = pytest.importorskip("websockets.asyncio.client")
    exceptions = pytest.importorskip("websockets.exceptions")
    mw = MeshMiddleware(WebsocketEcho(), mesh=mesh_of(deny(op(paths=["/ws/admin*"]))))
    with serving(mw) as port:
        async with client.connect(f"ws://127.0.0.1:{port}/ws/chat") as ws:
            await ws.send("hello")
            assert await ws.recv() == "/ws/chat: hello"
        with pytest.raises(exceptions.InvalidStatus) as refused:
            async with client.connect(f"ws://127.0.0.1:{port}/ws/admin"):
                pass
        with pytest.raises(exceptions.InvalidStatus) as sneaky:
            async with client.connect(f"ws://127.0.0.1:{port}/ws/chat/../admin"):
                pass
    assert refused.value.response.status_code == 403
    assert sneaky.value.response.status_code == 403
