"""A real etcd cluster (3 members by default) on free loopback ports, for the control plane's store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from _upstreams import free_port

ETCD = "/usr/bin/etcd"


class EtcdCluster:
    """Starts at once and waits until every member is healthy; ``kill(i)``/``restart(i)`` one member for outages.

    Fast raft timings (50 ms heartbeat, 500 ms election) keep startup and fail-over under
    a second. Skips the test when etcd is not installed (``python3 dev.py setup`` installs it).
    """

    def __init__(self, tmp_path: Path, members: int = 3) -> None:
        binary = ETCD if os.access(ETCD, os.X_OK) else shutil.which("etcd")
        if binary is None:
            pytest.skip("etcd is not installed: run `python3 dev.py setup` (it installs etcd-server)")
        self.binary = binary
        self.folder = tmp_path
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports = [free_port() for _ in range(members)]
        self.peer_ports = [free_port() for _ in range(members)]
        self.token = f"meshlib-test-{uuid.uuid4().hex[:8]}"
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * members
        try:
            for i in range(members):
                self._spawn(i)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def _spawn(self, i: int) -> None:
        cluster = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        args = [
            self.binary,
            "--name", self.names[i],
            "--data-dir", str(self.folder / f"{self.names[i]}.etcd"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        with open(self.folder / f"{self.names[i]}.log", "ab") as log:
            self.processes[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)

    def _call(self, i: int, path: str, body: dict[str, Any] | None = None, timeout: float = 1.0) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.client_ports[i]}{path}"
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def healthy(self, i: int) -> bool:
        try:
            return bool(self._call(i, "/health").get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members: list[int] | None = None, timeout: float = 20.0) -> None:
        todo = [i for i in range(len(self.names)) if self.processes[i] is not None] if members is None else members
        limit = time.monotonic() + timeout
        while todo:
            for i in list(todo):
                process = self.processes[i]
                if process is not None and process.poll() is not None:
                    log = (self.folder / f"{self.names[i]}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"etcd member {self.names[i]} exited ({process.returncode}):\n{log}")
                if self.healthy(i):
                    todo.remove(i)
            if todo:
                if time.monotonic() > limit:
                    raise RuntimeError(f"etcd members {[self.names[i] for i in todo]} not healthy in {timeout} s")
                time.sleep(0.05)

    def leader(self) -> int:
        """The index of the member that leads now."""
        for i, process in enumerate(self.processes):
            if process is None:
                continue
            try:
                status = self._call(i, "/v3/maintenance/status", {})
            except (OSError, ValueError):
                continue
            if status.get("leader") and status.get("leader") == status["header"].get("member_id"):
                return i
        raise RuntimeError("no etcd member leads")

    def compact(self) -> int:
        """Compact the history up to the current revision; return that revision."""
        for i, process in enumerate(self.processes):
            if process is None:
                continue
            revision = int(self._call(i, "/v3/kv/range", {"key": "AA==", "count_only": True})["header"]["revision"])
            self._call(i, "/v3/kv/compaction", {"revision": str(revision), "physical": True}, timeout=5.0)
            return revision
        raise RuntimeError("no etcd member is running")

    def kill(self, i: int) -> None:
        """SIGKILL one member: no goodbye to its peers or clients."""
        process = self.processes[i]
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            self.processes[i] = None

    def restart(self, i: int) -> None:
        """Start a killed member again on its data directory and wait until it is healthy."""
        self.kill(i)
        self._spawn(i)
        self.wait_healthy([i])

    def stop(self) -> None:
        """Kill every member: the data is thrown away, and a leader would spend seconds handing over."""
        for i in range(len(self.processes)):
            self.kill(i)
