"""nox sessions, each in its own venv under .nox/ (dev.py runs the same things in .venv).

nox                    lint, typecheck, tests
nox -s tests -- -k x   pytest with arguments
nox -s bench | docs | demo
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "typecheck", "tests"]

ROOT = Path(__file__).resolve().parent
LAYERS = ROOT.parent / "shared" / "tools" / "layers.py"


def install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (pytest arguments after --)."""
    install(session)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and the layer check of DESIGN.md."""
    install(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    if LAYERS.exists():
        session.run("python", str(LAYERS))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on meshlib and the tooling."""
    install(session)
    session.run("mypy", "--strict", "meshlib", "dev.py", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """benchmarks/run.py, which writes docs/benchmarks.md."""
    script = ROOT / "benchmarks" / "run.py"
    if not script.exists():
        session.log("no benchmark exists yet (benchmarks/run.py)")
        return
    install(session)
    session.run("python", str(script), *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """mkdocs build --strict: the docs site (mkdocs.yml, docs/) to site/."""
    install(session)
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """meshlib demo: the whole mesh on this machine."""
    install(session)
    session.run("meshlib", "demo", *session.posargs)
