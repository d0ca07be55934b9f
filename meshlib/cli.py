"""The ``meshlib`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._exceptions import Issue

__all__ = ["main"]


def _cmd_validate(args: argparse.Namespace) -> int:
    from .policy import validate_paths

    issues = validate_paths(args.paths, as_one_mesh=args.mesh)
    errors = [i for i in issues if i.severity == "error"]
    warnings = [i for i in issues if i.severity == "warning"]
    if args.format == "json":
        print(json.dumps([_issue_json(i) for i in issues], indent=2))
    else:
        for issue in issues:
            if issue.severity == "warning" and args.quiet:
                continue
            print(f"{issue.severity}: {issue}")
        verdict = "invalid" if errors else "valid"
        print(f"{verdict}: {len(errors)} error(s), {len(warnings)} warning(s)", file=sys.stderr)
    return 1 if errors else 0


def _issue_json(issue: Issue) -> dict[str, object]:
    return {
        "severity": issue.severity,
        "file": issue.file,
        "document": issue.document,
        "resource": issue.resource,
        "field": issue.field,
        "message": issue.message,
    }


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    if args.scale <= 0:
        print("meshlib demo: --scale must be more than 0", file=sys.stderr)
        return 2
    return run_demo(
        DemoOptions(
            keep_running=args.keep_running,
            json_path=Path(args.json) if args.json else None,
            scale=args.scale,
            static=args.static,
            config=args.config,
        )
    )


def _cmd_control_plane(args: argparse.Namespace) -> int:
    import logging

    from .control._run import ControlPlaneOptions, default_state_dir, main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main(
        ControlPlaneOptions(
            config=args.config,
            listen=args.listen,
            store=args.store,
            state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
            ca=Path(args.ca) if args.ca else None,
            trust_domain=args.trust_domain,
            admin_token_file=Path(args.admin_token_file) if args.admin_token_file else None,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            registry_ttl=args.registry_ttl,
            keepalive=args.keepalive,
        )
    )


def _cmd_sidecar(args: argparse.Namespace) -> int:
    import logging

    from ._exceptions import MeshError
    from .sidecar._run import SidecarOptions, main, parse_labels

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        labels = parse_labels(args.labels)
    except MeshError as exc:
        print(f"meshlib sidecar: {exc}", file=sys.stderr)
        return 2
    return main(
        SidecarOptions(
            workload=args.workload,
            namespace=args.namespace,
            labels=labels,
            service_account=args.service_account or "",
            config=args.config or (),
            ca=args.ca,
            control_plane=args.control_plane,
            token=args.token,
            cache_dir=args.cache_dir,
            verify=args.cacert,
            app=args.app,
            inbound=args.inbound,
            outbound=args.outbound,
            admin=args.admin,
            drain_timeout=args.drain_timeout,
        )
    )


def _admin_client(args: argparse.Namespace) -> object:
    import httpx

    token = args.admin_token
    if token is None and args.admin_token_file:
        token = Path(args.admin_token_file).read_text().strip()
    if not token:
        raise SystemExit("meshlib: give --admin-token or --admin-token-file (the control plane wrote one at start)")
    verify: bool | str = args.cacert or True
    return httpx.Client(
        base_url=args.control_plane, headers={"authorization": f"Bearer {token}"}, timeout=30, verify=verify
    )


def _cmd_apply(args: argparse.Namespace) -> int:
    import httpx

    from .policy._load import expand_paths

    files, issues = expand_paths(args.paths)
    if issues:
        for issue in issues:
            print(f"meshlib apply: {issue}", file=sys.stderr)
        return 1
    body = "\n---\n".join(f.read_text(encoding="utf-8") for f in files)
    client = _admin_client(args)
    assert isinstance(client, httpx.Client)
    with client:
        try:
            r = client.post("/v1/resources", content=body, headers={"content-type": "application/yaml"})
        except httpx.HTTPError as exc:
            print(f"meshlib apply: cannot reach {args.control_plane}: {exc}", file=sys.stderr)
            return 1
    data = r.json()
    if r.status_code != 200:
        print(f"meshlib apply: refused, nothing changed: {data.get('error')}", file=sys.stderr)
        return 1
    print(f"version {data['version']}" + ("" if data.get("changed") else " (unchanged)"))
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    import httpx

    client = _admin_client(args)
    assert isinstance(client, httpx.Client)
    with client:
        try:
            r = client.post("/v1/tokens", json={"namespace": args.namespace, "service_account": args.service_account})
        except httpx.HTTPError as exc:
            print(f"meshlib token: cannot reach {args.control_plane}: {exc}", file=sys.stderr)
            return 1
    if r.status_code != 201:
        print(f"meshlib token: {r.json().get('error')}", file=sys.stderr)
        return 1
    print(r.json()["token"])
    return 0


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from ._exceptions import CertificateError
    from .policy import parse_duration
    from .security._ca import CertificateAuthority
    from .security._pem import read_file

    def fail(message: str) -> int:
        print(f"meshlib ca init: {message}", file=sys.stderr)
        return 1

    if (args.root_cert is None) != (args.root_key is None):
        return fail("--root-cert and --root-key go together: the root's certificate and its key")
    intermediate = args.root_cert is not None
    existing = Path(args.dir) / "ca-key.pem"
    if existing.exists() and not args.force:
        return fail(f"{existing}: a CA is already there; pass --force to replace it")
    try:
        ttl = parse_duration(args.ttl or ("8760h" if intermediate else "87600h"))
    except ValueError as exc:
        return fail(f"--ttl: {exc}")
    try:
        if intermediate:
            ca = CertificateAuthority.create_intermediate(
                read_file(Path(args.root_cert)), read_file(Path(args.root_key)), args.trust_domain, ttl=ttl
            )
        else:
            ca = CertificateAuthority.create(args.trust_domain, ttl=ttl)
        written = ca.save(args.dir, overwrite=args.force)
    except CertificateError as exc:
        return fail(str(exc))
    for path in written:
        note = " (the CA's private key, mode 0600: keep it secret)" if path.name == "ca-key.pem" else ""
        print(f"wrote {path}{note}")
    kind = f"intermediate CA under {args.root_cert}" if intermediate else "self-signed root CA"
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ca.not_after))
    print(f"{kind} for trust domain {ca.trust_domain}, valid until {expiry}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlib", description="A service mesh as a Python library.")
    parser.add_argument("--version", action="version", version=f"meshlib {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check Istio/meshlib YAML: exit 0 valid, 1 invalid",
        description="Check configuration files or folders. Errors name the file, the document, the resource "
        "and the field; fields meshlib accepts but does not enforce are listed as warnings.",
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="YAML/JSON files or folders")
    validate.add_argument(
        "--mesh",
        action="store_true",
        help="check the paths as one mesh configuration (as Mesh.from_files loads them): "
        "clashes between files are errors",
    )
    validate.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    validate.add_argument("--format", choices=("text", "json"), default="text")
    validate.set_defaults(func=_cmd_validate)

    demo = sub.add_parser(
        "demo",
        help="a live mesh on this machine, changed while traffic flows, with a measured report",
        description="Start a control plane and a small shop on loopback (in-process services and one app behind "
        "the sidecar), then walk through mTLS identities, a canary, a failing instance, authorization, a rate "
        "limit, fault injection and latency, measuring each. Exit 0 when every step passed, 1 otherwise.",
    )
    demo.add_argument("--keep-running", action="store_true", help="keep the mesh up after the report, until Ctrl-C")
    demo.add_argument("--json", metavar="PATH", help="also write the measured figures to PATH as JSON")
    demo.add_argument(
        "--scale", type=float, default=1.0, metavar="X", help="multiply the request counts (default %(default)s)"
    )
    demo.add_argument(
        "--static", action="store_true", help="no traffic: show how meshlib reads the static demo shop's YAML"
    )
    demo.add_argument(
        "--config", metavar="PATH", default=None, help="no traffic: show how meshlib reads this configuration"
    )
    demo.set_defaults(func=_cmd_demo)

    cp = sub.add_parser(
        "control-plane",
        help="serve the mesh's policy, registry and CA to data planes",
        description="Hold the mesh's configuration (files given with --config are applied at start), push it to "
        "every data plane, keep the service registry and sign workload certificates.",
    )
    cp.add_argument("--config", nargs="*", default=[], metavar="PATH", help="YAML files or folders applied at start")
    cp.add_argument("--listen", default="127.0.0.1:15010", metavar="HOST:PORT", help="default %(default)s")
    cp.add_argument(
        "--store", metavar="URL", help="etcd://host:port,host:port for replicas sharing a mesh (default: --state-dir)"
    )
    cp.add_argument(
        "--state-dir", metavar="DIR", help="the embedded store, CA and admin token (default ~/.local/state)"
    )
    cp.add_argument("--ca", metavar="DIR", help="a CA folder (meshlib ca init); default: one made in the state")
    cp.add_argument("--trust-domain", default="cluster.local", help="default %(default)s")
    cp.add_argument("--admin-token-file", metavar="FILE", help="default STATE_DIR/admin-token (made 0600)")
    cp.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate...")
    cp.add_argument("--tls-key", metavar="PEM", help="...and this key")
    cp.add_argument("--registry-ttl", type=float, default=10.0, metavar="SECONDS", help="default %(default)s")
    cp.add_argument("--keepalive", type=float, default=10.0, metavar="SECONDS", help="default %(default)s")
    cp.set_defaults(func=_cmd_control_plane)

    side = sub.add_parser(
        "sidecar",
        help="run the mesh beside an app that does not change a line",
        description="An outbound HTTP proxy for the app (HTTP_PROXY=http://127.0.0.1:15001) and an inbound listener "
        "in front of it (mTLS, authorization, rate limits, deadlines), with the same engine as the in-process client.",
    )
    side.add_argument("--workload", required=True, metavar="NAME")
    side.add_argument("--namespace", default="default")
    side.add_argument("--labels", metavar="k=v,...", help="the workload's labels (subsets and selectors match them)")
    side.add_argument("--service-account", metavar="SA", help="default: the workload name")
    side.add_argument("--config", nargs="*", metavar="PATH", help="YAML files or folders (reloaded when they change)")
    side.add_argument("--ca", metavar="DIR", help="with --config: a CA folder that issues this workload's certificate")
    side.add_argument("--control-plane", metavar="URL", help="take the configuration and certificate from here...")
    side.add_argument("--token", metavar="T", help="...with this bootstrap token (or MESHLIB_TOKEN)")
    side.add_argument("--cache-dir", metavar="DIR", help="where the last good configuration is kept")
    side.add_argument("--cacert", metavar="PEM", help="verify an HTTPS control plane with this CA bundle")
    side.add_argument("--app", required=True, metavar="HOST:PORT", help="where the app listens")
    side.add_argument("--inbound", default="0.0.0.0:15006", metavar="HOST:PORT", help="default %(default)s")
    side.add_argument("--outbound", default="127.0.0.1:15001", metavar="HOST:PORT", help="default %(default)s")
    side.add_argument("--admin", default="127.0.0.1:15000", metavar="HOST:PORT", help="default %(default)s")
    side.add_argument("--drain-timeout", type=float, default=15.0, metavar="SECONDS", help="default %(default)s")
    side.set_defaults(func=_cmd_sidecar)

    def admin_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control-plane", default="http://127.0.0.1:15010", metavar="URL", help="default %(default)s")
        p.add_argument("--admin-token", metavar="TOKEN")
        p.add_argument("--admin-token-file", metavar="FILE")
        p.add_argument("--cacert", metavar="PEM", help="verify an HTTPS control plane with this CA bundle")

    apply = sub.add_parser("apply", help="apply YAML to a running control plane (all or nothing)")
    apply.add_argument("paths", nargs="+", metavar="PATH")
    admin_options(apply)
    apply.set_defaults(func=_cmd_apply)

    token = sub.add_parser("token", help="make a bootstrap token for one workload identity")
    token.add_argument("--namespace", default="default")
    token.add_argument("--service-account", required=True)
    admin_options(token)
    token.set_defaults(func=_cmd_token)

    ca = sub.add_parser("ca", help="the mesh's certificate authority (Istio's plug-in CA files)")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    init = ca_sub.add_parser(
        "init",
        help="create a CA in a folder",
        description="Create a CA as Istio's plug-in CA folder: ca-cert.pem, ca-key.pem (mode 0600), root-cert.pem "
        "and cert-chain.pem. A self-signed root by default; with --root-cert and --root-key, an intermediate "
        "signed by that root (the root's key is read once and not copied).",
    )
    init.add_argument("dir", metavar="DIR", help="the folder to write (created 0700 if missing)")
    init.add_argument("--trust-domain", default="cluster.local", help="the SPIFFE trust domain (default %(default)s)")
    init.add_argument("--root-cert", metavar="PEM", help="sign an intermediate CA with this root certificate...")
    init.add_argument("--root-key", metavar="PEM", help="...and this root key")
    init.add_argument(
        "--ttl",
        metavar="DURATION",
        help="how long the CA is valid (default 87600h for a root, 8760h for an intermediate)",
    )
    init.add_argument("--force", action="store_true", help="replace a CA already in DIR")
    init.set_defaults(func=_cmd_ca_init)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
