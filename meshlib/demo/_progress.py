"""A progress bar on stderr, with no dependency.

On a terminal it redraws one line in place (at most ten times a second); anywhere
else (CI logs, a pipe) it prints one line when the batch is done, so a log does not
fill with carriage returns. The report itself goes to stdout, untouched by it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 30
_REDRAW = 0.1


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(1, total)
        self.done = 0
        self.failed = 0
        self._stream = stream if stream is not None else sys.stderr
        self._live = self._stream.isatty()
        self._start = time.monotonic()
        self._drawn = 0.0

    def advance(self, ok: bool = True) -> None:
        self.done += 1
        if not ok:
            self.failed += 1
        now = time.monotonic()
        if self._live and (now - self._drawn >= _REDRAW or self.done == self.total):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        filled = int(_WIDTH * self.done / self.total)
        bar = "#" * filled + "." * (_WIDTH - filled)
        rate = self.done / max(now - self._start, 1e-6)
        line = f"\r  [{bar}] {self.done:>5}/{self.total} {self.label}  {rate:,.0f} req/s"
        if self.failed:
            line += f"  ({self.failed} not 2xx)"
        self._stream.write(line + "\x1b[K")
        self._stream.flush()

    def close(self) -> None:
        elapsed = time.monotonic() - self._start
        summary = f"  {self.label}: {self.done} requests in {elapsed:.1f} s"
        if self.failed:
            summary += f" ({self.failed} not 2xx)"
        if self._live:
            self._stream.write("\r" + summary + "\x1b[K\n")
        else:
            self._stream.write(summary + "\n")
        self._stream.flush()
