"""`invoke --list` reads as a table of contents: one line per task, none folded at 80 columns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_task_is_one_line_in_invoke_list():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "invoke", "--list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries = [line for line in out.splitlines()[1:] if line.strip()]
    assert entries, out
    folded = [line for line in entries if not line.startswith("  ") or line.startswith("   ")]
    assert not folded, f"a summary wrapped onto a second line (keep it to ~48 characters):\n{out}"
    assert all(len(line.split(None, 1)) == 2 for line in entries), f"a task has no summary:\n{out}"
