"""Where the tests find the real Istio corpus: a copy kept in tests/fixtures/istio."""

from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "fixtures" / "istio"
SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "istio"

BOOKINFO_REGISTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bookinfo}
spec:
  hosts: [reviews, ratings, details, productpage]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, labels: {version: v3}}
"""
"""The corpus does not say which endpoint carries which version label: this does."""
