"""Shared fixtures: where the real Istio corpus lives, and a writer for YAML files."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# The corpus is real Istio configuration (a copy of ../shared/corpus/istio in tests/fixtures,
# copied unchanged from istio/istio, Apache-2.0; see its README). Tests read it in place.
from _corpus import CORPUS


@pytest.fixture
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.fail(f"the Istio corpus is missing at {CORPUS}")
    return CORPUS


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write dedented YAML to a file in a fresh folder and return its path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write
