"""Live reload of ``--config`` files: an edit takes effect within the reload interval, under traffic, losing nothing.

The sidecar watches its files at the default interval (1 s), as ``meshlib sidecar`` does;
the edits replace the file atomically (a rename, as a ConfigMap update or an editor's
save does).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import meshlib
from tests._upstreams import Upstream, destination_rule, service_entry, to, upstreams, virtual_service
from tests.sidecar._sidecar import RunningSidecar, running_sidecar, wait_for


def write(path: Path, docs: list[dict[str, Any]] | str) -> None:
    text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs)
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(text)
    os.replace(scratch, path)


class Traffic:
    """A client calling ``http://reviews/`` through the sidecar without pause, in a thread."""

    def __init__(self, sidecar: RunningSidecar) -> None:
        self.sidecar = sidecar
        self.results: list[tuple[float, int, str | None]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.sidecar.client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    response = client.get("http://reviews/")
                except httpx.HTTPError as exc:
                    self.errors.append(exc)
                    continue
                version = response.json().get("version") if response.status_code == 200 else None
                self.results.append((time.monotonic(), response.status_code, version))
                time.sleep(0.005)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def versions_since(self, moment: float) -> list[str | None]:
        return [version for at, _, version in list(self.results) if at > moment]


@pytest.fixture
def reviews() -> Iterator[tuple[Upstream, Upstream]]:
    with upstreams(Upstream("r1", "v1"), Upstream("r2", "v2")) as (v1, v2):
        yield v1, v2


def config(v1: Upstream, v2: Upstream, weights: tuple[int, int]) -> list[dict[str, Any]]:
    split = {"route": [to("reviews", "v1", weights[0]), to("reviews", "v2", weights[1])]}
    return [service_entry("reviews", v1, v2), destination_rule("reviews"), virtual_service("reviews", split)]


def test_an_edit_moves_the_traffic_within_two_seconds_and_no_request_fails(
    tmp_path: Path, reviews: tuple[Upstream, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = reviews
    path = tmp_path / "mesh.yaml"
    write(path, config(v1, v2, (100, 0)))
    mesh = meshlib.Mesh.from_files(path, workload="productpage")
    caplog.set_level(logging.INFO, logger="meshlib.sidecar")
    with running_sidecar(mesh, config_paths=[str(path)], reload_interval=1.0) as sidecar, Traffic(sidecar) as traffic:
        wait_for(lambda: len(traffic.results) > 20, what="traffic")
        before = mesh.version
        write(path, config(v1, v2, (0, 100)))
        edited = time.monotonic()
        wait_for(lambda: traffic.versions_since(time.monotonic() - 0.1)[-5:] == ["v2"] * 5, 3.0, "traffic on v2")
        flipped = next(at for at, _, version in traffic.results if version == "v2")
        after = mesh.version
        config_page = sidecar.admin("/config").json()
    assert flipped - edited < 2.0
    assert not traffic.errors
    assert {status for _, status, _ in traffic.results} == {200}
    versions = [version for _, _, version in traffic.results]
    first_v2 = versions.index("v2")
    assert set(versions[:first_v2]) == {"v1"}
    assert set(versions[first_v2:]) == {"v2"}  # one clean switch, no going back
    assert after != before
    assert config_page["snapshot"] == after
    assert any("reloaded" in r.getMessage() and after in r.getMessage() for r in caplog.records)


def test_a_broken_edit_keeps_the_configuration_in_force_and_says_why(
    tmp_path: Path, reviews: tuple[Upstream, Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = reviews
    path = tmp_path / "mesh.yaml"
    good = config(v1, v2, (0, 100))
    write(path, good)
    mesh = meshlib.Mesh.from_files(path, workload="productpage")
    in_force = mesh.version
    broken = yaml.safe_dump_all(good).replace("weight: 100", "weight: lots")
    with running_sidecar(mesh, config_paths=[str(path)], reload_interval=1.0) as sidecar, Traffic(sidecar) as traffic:
        write(path, broken)
        edited = time.monotonic()
        wait_for(lambda: any("refused" in r.getMessage() for r in caplog.records), 3.0, "the refusal in the log")
        served = traffic.versions_since(edited)
        config_page = sidecar.admin("/config").json()
    assert mesh.version == in_force
    assert config_page["snapshot"] == in_force
    assert served
    assert set(served) == {"v2"}
    assert not traffic.errors
    (refusal,) = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refusal.levelno == logging.ERROR
    assert refusal.name == "meshlib.sidecar"
    assert in_force in refusal.getMessage()
    assert "weight" in refusal.getMessage()  # what is wrong, so the operator can fix it
