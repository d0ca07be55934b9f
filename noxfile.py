"""nox sessions, each in its own venv under .nox/ (dev.py runs the same things in .venv).

nox                    lint, typecheck, tests
nox -s tests -- -k x   pytest with arguments
nox -s bench | docs | demo
nox -s reliability     the long reliability run (10,000 requests, 10,000 fuzz examples, 60 s soak)
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


@nox.session
def reliability(session: nox.Session) -> None:
    """tests/reliability at full size, then the soak; figures appended to .reliability-figures.jsonl.

    The quick run of the same tests is part of the suite (.ci/run); this one sets
    10,000 requests per chaos test and 10,000 fuzz examples, then runs
    tests/reliability/soak.py (60 s under wrk for the sidecar, 60 s of an in-process
    loop; the seconds can be given after --).
    """
    install(session)
    figures = ROOT / ".reliability-figures.jsonl"
    figures.unlink(missing_ok=True)
    env = {
        "MESHLIB_RELIABILITY_N": "10000",
        "MESHLIB_RELIABILITY_EXAMPLES": "10000",
        "MESHLIB_RELIABILITY_FIGURES": str(figures),
    }
    session.run("pytest", "tests/reliability", "-q", "-p", "no:cacheprovider", env=env)
    session.run("python", str(ROOT / "tests" / "reliability" / "soak.py"), *session.posargs, env=env)
    session.log(f"figures: {figures}")
