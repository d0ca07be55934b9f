"""Run every benchmark and write docs/benchmarks.md (``python3 dev.py bench``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["inprocess.py", "middleware.py", "controlplane.py", "modes.py"]


def main() -> int:
    status = 0
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        status |= subprocess.run([sys.executable, str(HERE / name), *sys.argv[1:]], check=False).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
