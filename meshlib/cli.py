"""The ``meshlib`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
