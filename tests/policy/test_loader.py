"""Loading YAML into a Snapshot: every bad input is a PolicyError naming where it is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from meshlib import PolicyError
from meshlib.policy import Snapshot, Workload

WriteYaml = Callable[[str, str], Path]

REVIEWS_DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

REVIEWS_SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v1}}
  - {address: 10.0.0.3, labels: {version: v2}}
"""


def vs(route: str, name: str = "reviews") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - route:
{route}
"""


def load_error(write_yaml: WriteYaml, text: str, name: str = "mesh.yaml") -> PolicyError:
    path = write_yaml(name, text)
    with pytest.raises(PolicyError) as info:
        Snapshot.from_files(path)
    return info.value


def test_a_valid_file_loads_into_a_versioned_snapshot(write_yaml: WriteYaml) -> None:
    path = write_yaml("mesh.yaml", REVIEWS_SE + "---" + REVIEWS_DR)
    snap = Snapshot.from_files(path)
    assert len(snap.resources) == 2
    assert len(snap.version) == 16
    assert [e.address for e in snap.subset("reviews", "v1").endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert [e.address for e in snap.subset("reviews", "v2").endpoints] == ["10.0.0.3"]


def test_short_and_full_host_names_are_the_same_service(write_yaml: WriteYaml) -> None:
    snap = Snapshot.from_files(write_yaml("mesh.yaml", REVIEWS_SE + "---" + REVIEWS_DR))
    assert snap.service("reviews") is snap.service("reviews.default.svc.cluster.local")
    assert snap.service("reviews.default.svc") is snap.service("reviews")
    assert snap.destination_rule("reviews.default.svc.cluster.local") is snap.destination_rule("reviews")
    # ...but a short name is relative to a namespace
    assert snap.service("reviews", namespace="other") is None


def test_version_is_a_content_hash(write_yaml: WriteYaml) -> None:
    a = Snapshot.from_files(write_yaml("a/mesh.yaml", REVIEWS_SE + "---" + REVIEWS_DR))
    # same content, other order and formatting
    b = Snapshot.from_files(
        write_yaml("b/mesh.yaml", REVIEWS_DR + "---\n" + REVIEWS_SE.replace("[reviews]", "\n  - reviews"))
    )
    assert a.version == b.version
    c = Snapshot.from_files(write_yaml("c/mesh.yaml", REVIEWS_SE + "---" + REVIEWS_DR.replace("v2}}", "v3}}")))
    assert c.version != a.version


def test_folders_and_multi_document_files_load_together(write_yaml: WriteYaml, tmp_path: Path) -> None:
    write_yaml("mesh/registry.yaml", REVIEWS_SE)
    write_yaml("mesh/rules/reviews.yml", REVIEWS_DR + "---\n" + vs("    - destination: {host: reviews, subset: v2}"))
    write_yaml("mesh/notes.txt", "not yaml, not read")
    snap = Snapshot.from_files(tmp_path / "mesh")
    assert sorted(r.kind for r in snap.resources) == ["DestinationRule", "ServiceEntry", "VirtualService"]


def test_yaml_that_does_not_parse_names_file_and_line(write_yaml: WriteYaml) -> None:
    err = load_error(write_yaml, "apiVersion: networking.istio.io/v1\nkind: [unclosed\n")
    assert "mesh.yaml" in str(err)
    assert "YAML does not parse" in str(err)
    assert "line 2" in str(err)


def test_a_duplicate_yaml_key_is_an_error_not_a_silent_overwrite(write_yaml: WriteYaml) -> None:
    err = load_error(
        write_yaml,
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          host: ratings
        """,
    )
    assert "duplicate key 'host'" in str(err)


def test_bad_value_names_file_document_resource_and_field(write_yaml: WriteYaml) -> None:
    text = (
        REVIEWS_SE
        + "---"
        + REVIEWS_DR
        + "---"
        + vs("    - destination: {host: reviews, subset: v1}\n    timeout: soon")
    )
    err = load_error(write_yaml, text)
    (issue,) = err.issues
    assert issue.file.endswith("mesh.yaml")
    assert issue.document == 2
    assert issue.resource == "VirtualService/default/reviews"
    assert issue.field == "spec.http[0].timeout"
    assert "invalid duration 'soon'" in issue.message
    assert "mesh.yaml[doc 2]: VirtualService/default/reviews: spec.http[0].timeout" in str(err)


def test_unknown_field_is_an_error_naming_it(write_yaml: WriteYaml) -> None:
    err = load_error(write_yaml, REVIEWS_DR.replace("  host: reviews", "  host: reviews\n  trafficPolcy: {}"))
    (issue,) = err.issues
    assert issue.field == "spec.trafficPolcy"
    assert "unknown field" in issue.message


def test_route_to_an_undefined_subset_is_an_error(write_yaml: WriteYaml) -> None:
    text = REVIEWS_DR + "---" + vs("    - destination: {host: reviews, subset: v9}")
    err = load_error(write_yaml, text)
    (issue,) = err.issues
    assert issue.resource == "VirtualService/default/reviews"
    assert issue.field == "spec.http[0].route[0].destination.subset"
    assert "undefined subset 'v9'" in issue.message
    assert "v1, v2" in issue.message


def test_route_to_a_subset_of_a_host_without_rule_is_an_error(write_yaml: WriteYaml) -> None:
    err = load_error(write_yaml, vs("    - destination: {host: reviews, subset: v1}"))
    assert "no DestinationRule defines subsets" in str(err)


def test_negative_weight_is_an_error(write_yaml: WriteYaml) -> None:
    route = (
        "    - {destination: {host: reviews, subset: v1}, weight: 110}\n"
        "    - {destination: {host: reviews, subset: v2}, weight: -10}"
    )
    err = load_error(write_yaml, REVIEWS_DR + "---" + vs(route))
    (issue,) = err.issues
    assert issue.field.startswith("spec.http[0].route[1].weight")
    assert issue.resource == "VirtualService/default/reviews"


def test_weights_need_not_sum_to_100(write_yaml: WriteYaml) -> None:
    route = (
        "    - {destination: {host: reviews, subset: v1}, weight: 3}\n"
        "    - {destination: {host: reviews, subset: v2}, weight: 1}"
    )
    snap = Snapshot.from_files(write_yaml("mesh.yaml", REVIEWS_DR + "---" + vs(route)))
    vs_ = snap.virtual_service("reviews")
    assert vs_ is not None
    assert [d.weight for d in vs_.spec.http[0].route or ()] == [3, 1]


def test_duplicate_resource_is_an_error_naming_both_places(write_yaml: WriteYaml) -> None:
    err = load_error(write_yaml, REVIEWS_DR + "---" + REVIEWS_DR)
    (issue,) = err.issues
    assert issue.resource == "DestinationRule/default/reviews"
    assert "defined twice" in issue.message
    assert "first at" in issue.message
    assert "[doc 0]" in issue.message


def test_duplicate_across_files_is_an_error_when_loaded_as_one_mesh(write_yaml: WriteYaml, tmp_path: Path) -> None:
    write_yaml("mesh/a.yaml", REVIEWS_DR)
    write_yaml("mesh/b.yaml", REVIEWS_DR)
    with pytest.raises(PolicyError, match="defined twice"):
        Snapshot.from_files(tmp_path / "mesh")


def test_two_virtual_services_for_one_host_are_an_error(write_yaml: WriteYaml) -> None:
    text = (
        REVIEWS_DR
        + "---"
        + vs("    - destination: {host: reviews}")
        + "---"
        + vs("    - destination: {host: reviews}", "other")
    )
    err = load_error(write_yaml, text)
    assert "both bind host reviews.default.svc.cluster.local" in str(err)


def test_every_error_is_reported_at_once(write_yaml: WriteYaml) -> None:
    text = (
        REVIEWS_DR.replace("host: reviews", "host: reviews\n  bogus: 1")
        + "---"
        + vs("    - destination: {host: reviews, subset: v1}\n    timeout: 5")
        + "---\napiVersion: networking.istio.io/v1\nkind: Gatway\nmetadata: {name: x}\nspec: {}\n"
    )
    err = load_error(write_yaml, text)
    messages = str(err)
    assert "3 configuration errors" in messages
    assert "spec.bogus" in messages
    assert "a duration needs a unit" in messages
    assert "unknown kind 'Gatway'" in messages


def test_wrong_api_version_is_an_error(write_yaml: WriteYaml) -> None:
    err = load_error(write_yaml, REVIEWS_DR.replace("networking.istio.io/v1", "security.istio.io/v1"))
    (issue,) = err.issues
    assert issue.field == "apiVersion"
    assert "networking.istio.io/v1alpha3" in issue.message


def test_a_document_that_is_not_a_mapping_is_an_error(write_yaml: WriteYaml) -> None:
    err = load_error(write_yaml, "- just\n- a list\n")
    assert "must be a mapping" in str(err)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file or folder"):
        Snapshot.from_files(tmp_path / "nope.yaml")


def test_ignored_istio_kinds_and_unenforced_fields_are_warnings(write_yaml: WriteYaml) -> None:
    gateway = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec: {selector: {istio: ingressgateway}}
"""
    route = (
        "    - destination: {host: reviews, subset: v1}\n    corsPolicy: {allowOrigins: [{exact: 'https://a.example'}]}"
    )
    snap = Snapshot.from_files(write_yaml("mesh.yaml", REVIEWS_DR + "---" + vs(route) + "---" + gateway))
    text = "\n".join(str(w) for w in snap.warnings)
    assert "kind Gateway is valid Istio but meshlib ignores it" in text
    assert "spec.http[0].corsPolicy" in text
    assert all(w.severity == "warning" for w in snap.warnings)
    assert {r.kind for r in snap.resources} == {"DestinationRule", "VirtualService"}


def test_from_resources_takes_parsed_documents_and_names_their_index() -> None:
    import yaml

    docs = [yaml.safe_load(REVIEWS_DR), yaml.safe_load(vs("    - destination: {host: reviews, subset: nope}"))]
    with pytest.raises(PolicyError) as info:
        Snapshot.from_resources(docs)
    (issue,) = info.value.issues
    assert issue.file == "<resources>"
    assert issue.document == 1
    snap = Snapshot.from_resources(docs[:1])
    assert snap.destination_rule("reviews") is not None


def test_kubectl_list_output_loads(write_yaml: WriteYaml) -> None:
    import yaml

    listing = {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(REVIEWS_DR)]}
    snap = Snapshot.from_files(write_yaml("list.yaml", yaml.safe_dump(listing)))
    assert snap.destination_rule("reviews") is not None


def test_policy_error_is_a_value_error_and_a_mesh_error(write_yaml: WriteYaml) -> None:
    import meshlib

    err = load_error(write_yaml, "kind: VirtualService\n")
    assert isinstance(err, ValueError)
    assert isinstance(err, meshlib.MeshError)


MTLS = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: shop}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: legacy, namespace: shop}
spec:
  selector: {matchLabels: {app: legacy}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    8080: {mode: DISABLE}
    9090: {mode: UNSET}
"""


def test_peer_authentication_inherits_mesh_namespace_workload(write_yaml: WriteYaml) -> None:
    snap = Snapshot.from_files(write_yaml("pa.yaml", MTLS))
    # namespace UNSET inherits the mesh's STRICT
    assert snap.mtls(Workload("orders", namespace="shop")).mode == "STRICT"
    legacy = snap.mtls(Workload("legacy", namespace="shop"))
    assert legacy.mode == "PERMISSIVE"
    assert legacy.mode_for(8080) == "DISABLE"
    assert legacy.mode_for(9090) == "PERMISSIVE"  # port-level UNSET inherits the workload's
    assert legacy.mode_for(443) == "PERMISSIVE"
    # nothing configured: Istio's PERMISSIVE
    assert Snapshot.empty().mtls(Workload("x")).mode == "PERMISSIVE"
