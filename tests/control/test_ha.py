"""Several control-plane replicas on one etcd cluster serve one mesh, through member and replica failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib.control._etcd import EtcdStore
from tests._upstreams import service_entry, to, virtual_service
from tests.control._cp import RunningControlPlane, running_control_plane
from tests.control._etcd import EtcdCluster
from tests.control._sse import Subscriber, kinds


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    (tmp_path / "etcd").mkdir()
    etcd = EtcdCluster(tmp_path / "etcd")
    try:
        yield etcd
    finally:
        etcd.stop()


def replica(tmp_path: Path, cluster: EtcdCluster, name: str, **options: Any) -> Any:
    return running_control_plane(tmp_path / name, store=EtcdStore(cluster.endpoints), **options)


def route(subset_weight: int) -> dict[str, Any]:
    """A change whose content says which write it was (the weight of v2)."""
    return virtual_service(
        "payments", {"route": [to("payments", "v1", 100 - subset_weight), to("payments", "v2", subset_weight)]}
    )


PAYMENTS = service_entry("payments", ("127.0.0.1:9001", "v1"), ("127.0.0.1:9002", "v2"))
RULE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "payments", "namespace": "default"},
    "spec": {"host": "payments", "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]},
}


def weight_of(push: dict[str, Any]) -> int | None:
    for doc in push["resources"]:
        if doc["kind"] == "VirtualService":
            return int(doc["spec"]["http"][0]["route"][1]["weight"])
    return None


def test_a_change_on_one_replica_reaches_data_planes_on_another(tmp_path: Path, cluster: EtcdCluster) -> None:
    with replica(tmp_path, cluster, "a", config=[PAYMENTS, RULE]) as a, replica(tmp_path, cluster, "b") as b:
        token = a.token("default", "order")  # tokens live in etcd: made on a, good on b
        with Subscriber(b.url, token, node="order-on-b") as sub:
            assert sub.status_code == 200
            assert sub.next_push()["version"] == 1
            start = time.monotonic()
            assert a.apply([route(20)]).json()["version"] == 2
            push = sub.next_push(timeout=3)
            assert time.monotonic() - start < 1.0
            assert weight_of(push) == 20
            # the data plane streaming from b is visible from a, with its ACK
            plane = a.wait_for(
                lambda: next(
                    (d for d in a.dataplanes() if d["node"] == "order-on-b" and d["acked_version"] == 2), None
                ),
                timeout=5,
                what="b's data plane in a's list",
            )
            assert plane["state"] == "ACKED"
            assert plane["replica"] == b.plane.replica
        history = b.get("/v1/history")["history"]
        assert [h["version"] for h in history] == [2, 1]


def test_kill_an_etcd_member_and_a_replica_during_a_stream_of_changes(tmp_path: Path, cluster: EtcdCluster) -> None:
    """No acknowledged write is lost, and every data plane converges on the last version."""
    with replica(tmp_path, cluster, "a", config=[PAYMENTS, RULE]) as a, replica(tmp_path, cluster, "b") as b:
        token = a.token("default", "order")
        subs = [Subscriber(b.url, token, node=f"order-{i}") for i in range(3)]
        for sub in subs:
            sub.__enter__()
        acknowledged: list[tuple[int, int]] = []  # (version, weight) the API said it stored
        try:
            replicas: list[RunningControlPlane] = [a, b]
            for weight in range(1, 41):
                if weight == 10:
                    cluster.kill(cluster.leader())
                if weight == 20:
                    a.stop_serving()  # a replica dies; writes go on through b
                    replicas = [b]
                target = replicas[weight % len(replicas)]
                try:
                    r = target.apply([route(weight)])
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    acknowledged.append((r.json()["version"], weight))
            assert len(acknowledged) >= 35, acknowledged
            versions = [v for v, _ in acknowledged]
            assert versions == sorted(versions), "versions only go up"
            assert len(set(versions)) == len(versions), "no two writes got one version"
            last_version, last_weight = acknowledged[-1]
            # every acknowledged write is in the history, with its own content
            history = {h["version"]: h for h in b.get("/v1/history?resources=1")["history"]}
            for version, weight in acknowledged:
                docs = history[version]["resources"]
                assert weight_of({"resources": docs}) == weight
            assert b.get("/healthz")["version"] == last_version
            for sub in subs:
                push = sub.push_where(lambda p: p["version"] == last_version, timeout=10)
                assert weight_of(push) == last_weight
                assert "VirtualService" in kinds(push)
        finally:
            for sub in subs:
                sub.__exit__(None, None, None)
