"""A resource's document form (what the control plane stores and pushes) parses back to the same resource."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlib.policy import Origin, Snapshot, parse_documents, read_documents

CORPUS = Path(__file__).parent.parent / "fixtures" / "istio"
FILES = sorted(p for p in CORPUS.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_every_corpus_resource_round_trips_through_its_document(path: Path) -> None:
    docs, _ = read_documents([path])
    loaded = parse_documents(docs)
    for resource, _origin in loaded.resources:
        again = parse_documents([(resource.to_document(), Origin("<again>", 0))])
        assert [i for i in again.issues if i.severity == "error"] == []
        ((back, _),) = again.resources
        assert back == resource
        assert back.to_document() == resource.to_document()


def test_a_snapshot_rebuilt_from_its_documents_has_the_same_version() -> None:
    docs, _ = read_documents([CORPUS / "destination-rule-all.yaml", CORPUS / "virtual-service-reviews-80-20.yaml"])
    snapshot = Snapshot.from_resources(d for d, _ in docs)
    again = Snapshot.from_resources(r.to_document() for r in snapshot.resources)
    assert again.version == snapshot.version
