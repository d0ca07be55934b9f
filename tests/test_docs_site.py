"""The docs site builds with ``mkdocs build --strict``: no broken link or anchor, no page left out of the nav,
no API reference that fails to resolve (mkdocs, mkdocs-material and mkdocstrings are dev dependencies)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    # the pages exist, and the API reference was rendered from the docstrings
    assert (site / "quickstart" / "index.html").is_file()
    assert (site / "changelog" / "index.html").read_text(encoding="utf-8").count("Unreleased") >= 1
    mesh_page = (site / "reference" / "mesh" / "index.html").read_text(encoding="utf-8")
    assert 'id="meshlib.Mesh.connect"' in mesh_page
    assert ":meth:" not in mesh_page  # Sphinx roles become code (scripts/griffe_sphinx_roles.py)
