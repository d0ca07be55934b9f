"""What the demo prints and writes: each step's explanation and tables, the final report, the JSON figures.

Text is for people; ``--json`` is for machines (the end-to-end test reads it), so the
test checks numbers, not the wording of a table. A step that failed says FAILED and
why, in both, and makes the exit status 1.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Report", "StepResult", "Table", "ms", "pct"]

_NUMBER = re.compile(r"^[-+]?[\d,.]+\s*(%|ms|s|x)?$")
_WRAP = 92


def pct(part: float, whole: float, digits: int = 1) -> str:
    return f"{100 * part / whole:.{digits}f}%" if whole else "-"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


@dataclass
class Table:
    headers: Sequence[str]
    rows: list[list[str]]
    title: str = ""

    def render(self, indent: str = "  ") -> str:
        cells = [[str(c) for c in self.headers], *[[str(c) for c in row] for row in self.rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.headers))]
        numeric = [all(_NUMBER.match(row[i]) or row[i] in ("", "-") for row in cells[1:]) for i in range(len(widths))]

        def line(row: list[str]) -> str:
            parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
            return (indent + "  ".join(parts)).rstrip()

        out = [indent + self.title] if self.title else []
        out += [line(cells[0]), indent + "  ".join("-" * w for w in widths)]
        out += [line(row) for row in cells[1:]]
        return "\n".join(out)


@dataclass
class StepResult:
    """One step's outcome: ``figures`` go to the JSON, ``tables`` to stdout, ``summary`` to the final table."""

    number: int
    key: str
    title: str
    ok: bool = True
    reason: str = ""
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, reason: str) -> None:
        """Record a failed check (the first reason leads; every one is kept)."""
        self.ok = False
        self.reason = f"{self.reason}; {reason}" if self.reason else reason

    def check(self, condition: bool, reason: str) -> bool:
        if not condition:
            self.fail(reason)
        return condition

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "key": self.key,
            "title": self.title,
            "ok": self.ok,
            "reason": self.reason or None,
            "summary": self.summary,
            "seconds": round(self.seconds, 2),
            "changes": self.changes,
            "figures": self.figures,
        }


class Report:
    """Prints as the demo goes (to ``out``), and keeps everything for the end and for ``--json``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.steps: list[StepResult] = []
        self.started = time.monotonic()
        self.setup: dict[str, Any] = {}
        self.setup_error: str | None = None
        self.links: dict[str, str] = {}
        self.processes: list[dict[str, Any]] = []
        self.workdir = ""
        self._blank = False

    def say(self, text: str = "") -> None:
        if not text and self._blank:
            return  # one blank line between blocks, never two
        self._blank = not text
        print(text, file=self.out, flush=True)

    def paragraph(self, text: str) -> None:
        for para in textwrap.dedent(text).strip().split("\n\n"):
            self.say(textwrap.fill(" ".join(para.split()), _WRAP, initial_indent="  ", subsequent_indent="  "))
            self.say()

    def heading(self, text: str) -> None:
        self.say()
        self.say(f"== {text}")

    def begin(self, number: int, title: str, explanation: str) -> None:
        self.heading(f"Step {number}: {title}")
        self.paragraph(explanation)

    def end(self, step: StepResult) -> None:
        for change in step.changes:
            self.say(f"  applied: {change}")
        for table in step.tables:
            self.say()
            self.say(table.render())
        self.say()
        if step.ok:
            self.say(f"  PASSED: {step.summary}")
        else:
            self.say(f"  FAILED: {step.reason}")
        self.steps.append(step)

    @property
    def ok(self) -> bool:
        return self.setup_error is None and bool(self.steps) and all(s.ok for s in self.steps)

    def final(self) -> None:
        self.heading("Report")
        outcomes = [(str(s.number), s.title, s.ok, s.summary if s.ok else s.reason) for s in self.steps]
        if self.setup_error is not None:
            outcomes.insert(0, ("-", "start the shop", False, self.setup_error))
        rows = [
            [n, title, "PASSED" if ok else "FAILED", text.splitlines()[0] if text else ""]
            for n, title, ok, text in outcomes
        ]
        self.say(Table(["#", "step", "result", "measured"], rows).render())
        for _, title, ok, text in outcomes:
            details = text.splitlines()[1:]
            if not ok and details:  # a child's log tail, a traceback: below the table, not in it
                self.say()
                self.say(f"  {title}, in detail:")
                for line in details:
                    self.say(f"    | {line}")
        self.say()
        for name, url in self.links.items():
            self.say(f"  {name:<28} {url}")
        self.say()
        verdict = "every step passed" if self.ok else "FAILED: see the steps above"
        self.say(f"  meshlib demo: {verdict} ({time.monotonic() - self.started:.1f} s)")

    def write_json(self, path: Path) -> None:
        data = {
            "ok": self.ok,
            "seconds": round(time.monotonic() - self.started, 2),
            "setup": self.setup,
            "setup_error": self.setup_error,
            "steps": {s.key: s.to_dict() for s in self.steps},
            "links": self.links,
            "processes": self.processes,
            "workdir": self.workdir,
        }
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
