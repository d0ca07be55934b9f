#!/usr/bin/env python3
"""One entry point for developers and CI, using nothing but the Python 3.11 standard library.

Why it exists: the README's quick start must work on a fresh machine that has only
Python (no venv, nothing installed, maybe a read-only site-packages). So every
command here first makes sure that `.venv` exists and holds this project installed
editable with its dev extras, re-installing when pyproject.toml changed since the
last install, then runs the real tool inside `.venv`:

    python3 dev.py setup              only create/refresh .venv
    python3 dev.py demo [ARGS...]     meshlib demo ARGS...
    python3 dev.py test [ARGS...]     python -m pytest ARGS... (whole suite by default)
    python3 dev.py lint               ruff check, ruff format --check, mypy --strict, layers
    python3 dev.py meshlib ARGS...    any meshlib CLI call, e.g. `meshlib validate mesh/`
    python3 dev.py bench [ARGS...]    benchmarks/run.py ARGS..., if it exists
    python3 dev.py docs               mkdocs build --strict: the docs site, to site/

bench and docs run what the noxfile's sessions of the same name run, in `.venv`
rather than in a venv of their own. The exit status is the tool's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"  # POSIX layout: Linux and macOS
PY = BIN / "python"
STAMP = VENV / ".meshlib-install-stamp"
LAYERS = ROOT.parent / "shared" / "tools" / "layers.py"

# Programs the test suite runs for real, mapped to the Debian package providing each.
# Empty today: the issue that adds a test needing one adds it here, e.g.
#   {"redis-server": "redis-server", "etcd": "etcd-server", "haproxy": "haproxy"}
APT_PACKAGES: dict[str, str] = {
    "redis-server": "redis-server",  # global rate limits (tests start one on a free loopback port)
    "openssl": "openssl",  # certificate interop tests
    "curl": "curl",  # mTLS interop tests
    "wrk": "wrk",  # middleware overhead benchmark
    "etcd": "etcd-server",  # control-plane HA store (tests start a 3-member cluster on loopback)
    "haproxy": "haproxy",  # the reference proxy hop of benchmarks/modes.py
    "chromium": "chromium",  # the dashboard's browser tests (Playwright drives Debian's build; nothing downloaded)
}

USAGE = "usage:\n" + (__doc__ or "").split("\n\n")[2]


def say(message: str) -> None:
    print(f"dev.py: {message}", flush=True)


def run(cmd: Sequence[str | Path], cwd: Path | None = None) -> int:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, check=False).returncode


def pyproject_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def is_root_with_apt() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def apt_install(packages: Sequence[str]) -> bool:
    """apt-get update once, then install: True when it worked."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say(f"apt-get install {' '.join(packages)}")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            return False
    return True


def create_venv() -> None:
    say("creating .venv")
    cmd = [sys.executable, "-m", "venv", "--clear", str(VENV)]
    if subprocess.run(cmd, check=False).returncode == 0:
        return
    # Debian ships venv/ensurepip separately from python3.
    package = f"python3.{sys.version_info.minor}-venv"
    if is_root_with_apt() and apt_install([package]) and subprocess.run(cmd, check=False).returncode == 0:
        return
    sys.exit(f"dev.py: could not create .venv; install {package} (sudo apt-get install {package}) and retry")


def ensure_venv() -> None:
    """Create .venv if missing or broken, install meshlib[dev] if new or pyproject.toml changed."""
    if not PY.exists():  # also a dangling link left by a removed interpreter
        create_venv()
    wanted = pyproject_hash()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    why = "pyproject.toml changed" if STAMP.exists() else "first run, ~1 min"
    say(f"installing meshlib[dev] ({why})")
    started = time.monotonic()
    pip: list[str | Path] = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-qq"]
    if run([*pip, "-e", ".[dev]"], cwd=ROOT) != 0:
        sys.exit("dev.py: pip install -e '.[dev]' failed (see above); fix and rerun")
    STAMP.write_text(wanted + "\n")
    say(f"installed in {time.monotonic() - started:.0f}s")


def ensure_programs() -> None:
    """Install the programs tests need (as root with apt-get) or say what to install."""
    missing = {prog: pkg for prog, pkg in APT_PACKAGES.items() if shutil.which(prog) is None}
    if not missing:
        return
    packages = sorted(set(missing.values()))
    if is_root_with_apt() and apt_install(packages):
        return
    say(f"missing programs {', '.join(sorted(missing))}; tests that need them will fail")
    say(f"install them with: sudo apt-get install {' '.join(packages)}")


def lint() -> int:
    steps: list[list[str | Path]] = [
        [BIN / "ruff", "check", "."],
        [BIN / "ruff", "format", "--check", "."],
        [BIN / "mypy", "--strict", "meshlib", "dev.py", "noxfile.py"],
    ]
    if LAYERS.exists():
        steps.append([PY, LAYERS])
    failed = [step for step in steps if run(step, cwd=ROOT) != 0]
    for step in failed:
        say(f"failed: {Path(step[0]).name} {' '.join(str(a) for a in step[1:])}")
    return 1 if failed else 0


def docs() -> int:
    """The docs site (mkdocs.yml, docs/) built to site/; a broken link, anchor or reference fails it."""
    return run([BIN / "mkdocs", "build", "--strict"], cwd=ROOT)


def bench(args: Sequence[str]) -> int:
    script = ROOT / "benchmarks" / "run.py"
    if not script.exists():
        say("no benchmark exists yet (benchmarks/run.py)")
        return 0
    return run([PY, script, *args], cwd=ROOT)


def execute(cmd: Sequence[str | Path], cwd: Path | None = None) -> int:
    """Replace this process by cmd, so that signals and the exit status are the tool's own."""
    if cwd is not None:
        os.chdir(cwd)
    argv = [str(c) for c in cmd]
    if not Path(argv[0]).exists():
        sys.exit(f"dev.py: {argv[0]} is missing; remove .venv and rerun")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 127  # not reached


def main(argv: Sequence[str]) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be run by any python3
        sys.exit("dev.py: meshlib needs Python 3.11 or newer")
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if argv else 2
    os.environ.setdefault("PIP_ROOT_USER_ACTION", "ignore")  # pip as root in our own venv is fine
    command, args = argv[0], list(argv[1:])
    commands = {"setup", "demo", "test", "lint", "meshlib", "bench", "docs"}
    if command not in commands:
        print(f"dev.py: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    ensure_venv()
    if command == "setup":
        return 0
    if command == "demo":
        return execute([BIN / "meshlib", "demo", *args])
    if command == "meshlib":
        return execute([BIN / "meshlib", *args])
    if command == "test":
        ensure_programs()
        return execute([PY, "-m", "pytest", *args], cwd=ROOT)
    if command == "lint":
        return lint()
    if command == "bench":
        return bench(args)
    return docs()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
