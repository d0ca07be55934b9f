"""The demo's child processes (the ledger app and its sidecar), and the guarantee that none outlives the demo.

Three layers, because a demo that leaves a sidecar listening on a port is worse than
no demo:

- each child runs in a process group of its own, so stopping it stops anything it
  started, and a Ctrl-C on the terminal reaches only the demo, which then stops the
  children in order (SIGTERM lets the sidecar drain and deregister);
- ``stop_all`` runs in the demo's ``finally`` and again from ``atexit``;
- on Linux each child asks the kernel for SIGTERM when the demo dies
  (``PR_SET_PDEATHSIG``, set by a two-line launcher before it ``exec``s the real
  command), which covers even a ``kill -9`` of the demo.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Child", "Children", "ChildError"]

# Run by ``python -c`` with argv [parent pid, program, args...]: ask for SIGTERM when the
# parent dies, give up if it already has, then become the program (the setting survives exec).
_LAUNCHER = (
    "import ctypes,os,sys\n"
    "try: ctypes.CDLL(None).prctl(1, 15)\n"
    "except Exception: pass\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class ChildError(Exception):
    """A child did not start (its log's last lines are in the message)."""


class Child:
    """One child process, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log = log
        self._stopped = False
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        command = list(argv)
        if sys.platform == "linux":
            command = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command]
        # Popen from the main thread only: the kernel ties PDEATHSIG to the thread that forked.
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def why(self) -> str:
        """What the child said before it stopped: a meshlib command's own error line if there is one, else its tail.

        A ``meshlib ...`` command reports a failure as one ``meshlib <command>: ...`` line;
        whatever follows it (a logged traceback) only buries it.
        """
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        own = [line for line in lines if re.match(r"meshlib [\w-]+: ", line)]
        return own[-1] if own else self.tail()

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Block until the child's output has a line matching ``pattern``; ChildError if it exits or times out."""
        regex = re.compile(pattern)
        limit = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                for line in self.log.read_text(errors="replace").splitlines():
                    found = regex.search(line)
                    if found:
                        return found
            if not self.running():
                raise ChildError(
                    f"{self.name} exited with status {self.process.returncode} before it was ready:\n{self.why()}"
                )
            if time.monotonic() > limit:
                raise ChildError(f"{self.name} was not ready after {timeout:g} s:\n{self.why()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL what is left after ``timeout`` (once)."""
        if self._stopped:
            return
        self._stopped = True
        if self.running():
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(2.0)
        self._signal(signal.SIGKILL)  # anything the child left in its group
        self._out.close()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


class Children:
    """Every child the demo started; ``stop_all`` is idempotent and registered with ``atexit``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        atexit.register(self.stop_all)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", env if env is not None else os.environ)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        """Stop the children, the last started first (the sidecar before the app it fronts)."""
        for child in reversed(self.children):
            child.stop()
