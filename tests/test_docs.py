"""The generated field-support page is current: it cannot drift from the models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_istio_support_page_matches_the_models() -> None:
    spec = importlib.util.spec_from_file_location("field_support", ROOT / "scripts" / "field_support.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "istio-support.md").read_text(encoding="utf-8")
    assert committed == module.render(), "docs/istio-support.md is stale: run .venv/bin/python scripts/field_support.py"
    # every unenforced field the validator can warn about is on the page
    assert "`spec.http.corsPolicy` | not enforced" in committed
    assert "`spec.rules.from.source.requestPrincipals` | not enforced" in committed
