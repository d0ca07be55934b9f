"""Where the tests find the real Istio corpus: a copy kept in tests/fixtures/istio."""

from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "fixtures" / "istio"
SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "istio"
