"""``meshlib demo`` end to end, as CI and a new user run it: a real process, its exit code, its measured figures.

The demo is run once for the module (about 20 s); each test then checks one of its
claims against the numbers it wrote with ``--json``, so a regression names the claim
that broke rather than a line of text that moved. The numbers must be real: a canary
split within a few points of the weights set, the failing instance the one ejected,
403s and 429s actually received.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

DEMO_TIMEOUT = 170  # the demo must finish in under 120 s; this only bounds a hang


def _children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """True when ``pid`` runs (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("demo") / "report.json"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "meshlib", "demo", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert path.exists(), f"no JSON report (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(path.read_text())
    return {"result": result, "elapsed": elapsed, "report": report}


def step(demo: dict[str, Any], key: str) -> dict[str, Any]:
    found: dict[str, Any] = demo["report"]["steps"][key]
    assert found["ok"], f"step {key} FAILED: {found['reason']}"
    figures: dict[str, Any] = found["figures"]
    return figures


def test_the_demo_exits_0_in_under_two_minutes_with_a_report(demo: dict[str, Any]) -> None:
    result = demo["result"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert demo["elapsed"] < 120
    report = demo["report"]
    assert report["ok"] is True
    assert list(report["steps"]) == [
        "identities",
        "canary",
        "failover",
        "authorization",
        "rate_limit",
        "faults",
        "latency",
    ]
    out = result.stdout
    assert "== Report" in out
    assert "meshlib demo: every step passed" in out
    assert "FAILED" not in out
    assert report["links"]["control plane /metrics"].endswith("/metrics")


def test_every_workload_has_its_spiffe_identity_and_acked_the_configuration(demo: dict[str, Any]) -> None:
    figures = step(demo, "identities")
    planes = {d["instance"]: d for d in figures["dataplanes"]}
    assert set(planes) >= {"frontend", "orders", "payments-v1-a", "payments-v1-b", "payments-v2", "ledger"}
    for name, plane in planes.items():
        assert plane["state"] == "ACKED", name
        assert plane["spiffe_id"] == f"spiffe://cluster.local/ns/shop/sa/{plane['service_account']}"
        assert plane["cert_not_after"] > time.time(), f"{name} has no live certificate"
    assert planes["ledger"]["runs"].startswith("meshlib sidecar")
    assert figures["plaintext_refused"] == 2


def test_the_canary_split_measured_matches_the_weights_set(demo: dict[str, Any]) -> None:
    phases = {(p["weights"]["v1"], p["weights"]["v2"]): p for p in step(demo, "canary")["phases"]}
    assert set(phases) == {(95, 5), (50, 50), (0, 100)}
    for phase in phases.values():
        assert phase["requests"] >= 200
        assert phase["succeeded"] == phase["requests"], phase["statuses"]
        assert sum(phase["counts"].values()) == phase["succeeded"], "every answer named its version"
    half = phases[(50, 50)]
    assert abs(half["measured_percent"]["v2"] - 50) <= 10
    assert half["counts"]["v1"] > 0
    assert half["counts"]["v2"] > 0
    assert abs(phases[(95, 5)]["measured_percent"]["v2"] - 5) <= 5
    assert phases[(95, 5)]["counts"].get("v2", 0) > 0, "the 5% canary got no traffic at all"
    everything = phases[(0, 100)]
    assert everything["counts"] == {"v2": everything["requests"]}, "100 to v2 means all to v2"
    versions = [p["version"] for p in phases.values()]
    assert versions == sorted(versions)
    assert len(set(versions)) == 3, "each change is a new version"


def test_the_failing_instance_is_ejected_while_retries_keep_success_at_99_9(demo: dict[str, Any]) -> None:
    figures = step(demo, "failover")
    assert figures["requests"] >= 1000
    assert figures["success_rate"] >= 0.999
    assert figures["succeeded"] >= 0.999 * figures["requests"]
    assert figures["ejected"] == ["payments-v1-b"]
    assert figures["failing_instance_503s"] > 0
    assert figures["retries"] > 0
    assert figures["per_instance"]["payments-v1-b"]["failed"] == figures["failing_instance_503s"]


def test_the_authorization_policy_denies_frontend_but_not_orders(demo: dict[str, Any]) -> None:
    figures = step(demo, "authorization")
    assert figures["frontend_to_ledger_before"] == {"200": 50}
    assert figures["denied"] > 0
    assert figures["frontend_to_ledger_after"] == {"403": figures["denied"]}
    assert "RBAC: access denied" in figures["denied_body"]
    assert figures["orders_to_ledger_after"] == {"200": 50}


def test_the_rate_limit_answers_429(demo: dict[str, Any]) -> None:
    figures = step(demo, "rate_limit")
    assert figures["limited"] > 0
    assert figures["allowed"] > 0
    assert figures["allowed"] + figures["limited"] == figures["requests"]
    assert float(figures["retry_after"]) > 0


def test_injected_faults_are_measured_near_what_was_set(demo: dict[str, Any]) -> None:
    figures = step(demo, "faults")
    assert figures["abort"]["count"] > 0
    assert abs(figures["abort"]["measured_percent"] - figures["abort"]["set_percent"]) <= 7
    assert abs(figures["delay"]["measured_percent"] - figures["delay"]["set_percent"]) <= 9


def test_the_latency_table_times_the_same_app_three_ways(demo: dict[str, Any]) -> None:
    modes = step(demo, "latency")["modes"]
    assert len(modes) == 3
    for mode in modes:
        assert mode["calls"] >= 200, mode
        assert mode["ok"] == mode["calls"], mode
        assert 0 < mode["p50_ms"] <= mode["p99_ms"] < 1000, mode


def test_no_process_of_the_demo_is_left_running(demo: dict[str, Any]) -> None:
    report = demo["report"]
    assert {p["name"] for p in report["processes"]} == {"ledger-app", "ledger-sidecar"}
    for process in report["processes"]:
        pid = process["pid"]
        assert not (_alive(pid) and ("meshlib" in _cmdline(pid) or "ledger" in _cmdline(pid))), process
    workdir = report["workdir"]
    assert workdir
    assert not Path(workdir).exists(), "a passing demo leaves no temporary files"
    leftovers = [
        pid for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) if workdir in _cmdline(pid)
    ]
    assert not leftovers, [_cmdline(pid) for pid in leftovers]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the demo's child processes")
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "meshlib", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a CI shell may ignore SIGINT
    )
    try:
        assert process.stdout is not None
        workdir = ""
        for line in process.stdout:  # the shop is up once step 1 begins
            found = re.search(r"state in (\S+)/control-plane", line)
            workdir = found.group(1) if found else workdir
            if line.startswith("== Step 2"):
                break
        assert workdir, "the demo names its temporary directory"
        children = _children_of(process.pid)
        assert len(children) >= 2, "the ledger app and its sidecar run as child processes"
        process.send_signal(signal.SIGINT)
        process.stdout.read()
        assert process.wait(30) == 130
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], [_cmdline(pid) for pid in children]
        assert not Path(workdir).exists(), "an interrupted demo leaves no temporary files"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
