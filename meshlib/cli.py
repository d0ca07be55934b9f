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
    from .demo import run_demo

    return run_demo(config=args.config)


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

    demo = sub.add_parser("demo", help="the mesh on this machine, end to end, with a report")
    demo.add_argument(
        "--config", metavar="PATH", default=None, help="a mesh configuration to show instead of the demo shop"
    )
    demo.set_defaults(func=_cmd_demo)

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
