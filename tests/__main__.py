"""``python -m tests``: every check the project has, in the order CI runs them.

ruff on the code and the tests, ``mypy --strict`` on relayd/, then pytest.
Extra arguments go to pytest (``python -m tests -k dispatch -x``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    steps = [
        [sys.executable, "-m", "ruff", "check", "relayd", "tests"],
        [sys.executable, "-m", "mypy", "--strict", "relayd"],
        [sys.executable, "-m", "pytest", "-q", *sys.argv[1:]],
    ]
    for step in steps:
        print("+", " ".join(step[2:] if step[1] == "-m" else step), flush=True)
        code = subprocess.call(step, cwd=ROOT)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
