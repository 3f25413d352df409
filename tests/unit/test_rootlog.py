"""The supervised daemons' start commands (Slurm's, Jupyter's), run here for real against a log
in a temp dir: root appends to its log, never through a symlink, FIFO or hard link planted at
the log's path (what a member of a group that may write /var/log could plant)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpfleet import jupyter
from ddpfleet.engine.roles import load_role

load_role("slurm")  # registers the role's package
DAEMONS = __import__("ddpfleet_role_slurm.daemons", fromlist=["daemons"])
SAYS = ["sh", "-c", "echo out-$$; echo err >&2"]  # stands in for the supervisor


def slurmd(log: Path) -> list[str]:
    """slurmd's start command with the log moved to `log` and the supervisor stood in for."""
    argv = DAEMONS.start("slurmd", "node1", False)
    supervised = DAEMONS.supervised("slurmd", "node1")
    assert argv[-len(supervised) :] == supervised
    head = argv[: -len(supervised)]
    return [str(log) if a == "/var/log/ddpfleet-slurmd.log" else a for a in head] + SAYS


def jupyter_server(log: Path) -> list[str]:
    defaults = load_role("jupyter").defaults
    s = jupyter.settings({**defaults, "env_dir": "/opt/env"}, "/opt/env")
    state = jupyter.NodeState(uid="999", gid="999", home="/home/j", shell="/bin/sh")
    argv = jupyter.start_command(s, state, "/home/j")
    supervisor = jupyter.supervisor_argv(s, state, "/home/j")
    assert argv[-len(supervisor) :] == supervisor
    swap = {jupyter.LOG_PATH: str(log), s.python: sys.executable}
    return [swap.get(a, a) for a in argv[: -len(supervisor)]] + SAYS


STARTS = pytest.mark.parametrize("start", [slurmd, jupyter_server], ids=["slurmd", "jupyter"])


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
    )


def _until(check, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@STARTS
def test_the_log_is_made_root_only_and_appended_to(start, tmp_path: Path):
    log = tmp_path / "ddpfleet-x.log"
    log.write_text("earlier\n")
    log.chmod(0o644)
    assert _run(start(log)).returncode == 0
    assert _until(lambda: "err" in log.read_text())  # setsid -f: the command runs detached
    assert log.read_text().startswith("earlier\nout-")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@STARTS
def test_a_symlink_at_the_log_path_is_not_followed(start, tmp_path: Path):
    target = tmp_path / "shadow"
    target.write_text("root:secret\n")
    target.chmod(0o640)
    log = tmp_path / "ddpfleet-x.log"
    log.symlink_to(target)
    r = _run(start(log))
    assert r.returncode != 0
    assert f"{log}: cannot open the log (a symlink)" in r.stderr and f"remove {log}" in r.stderr
    time.sleep(0.3)  # a command that did start detached would have written by now
    assert target.read_text() == "root:secret\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@STARTS
def test_a_dangling_symlink_creates_nothing(start, tmp_path: Path):
    log = tmp_path / "ddpfleet-x.log"
    log.symlink_to(tmp_path / "made-by-root")
    assert _run(start(log)).returncode != 0
    time.sleep(0.3)
    assert not (tmp_path / "made-by-root").exists()


@STARTS
def test_a_fifo_or_a_hard_link_is_refused_without_hanging(start, tmp_path: Path):
    log = tmp_path / "ddpfleet-x.log"
    os.mkfifo(log)
    assert _run(start(log)).returncode != 0  # no reader: a blocking open would hang
    log.unlink()
    other = tmp_path / "other"
    other.write_text("kept\n")
    os.link(other, log)
    r = _run(start(log))
    assert r.returncode != 0 and "not a regular file of root's with one link" in r.stderr
    time.sleep(0.3)
    assert other.read_text() == "kept\n"


@STARTS
def test_the_daemon_is_started_without_the_bootstraps_mark(start, tmp_path: Path):
    """A bootstrap stops what carries its mark when it ends short of 'done' (bootstrap.HOLD);
    a daemon it started (Jupyter's, Slurm's) must outlive it (seen: a Jupyter server SIGTERMed
    2.8 s after the bootstrap that started it)."""
    from ddpfleet.engine.roles import MARK

    log = tmp_path / "ddpfleet-x.log"
    argv = start(log)[: -len(SAYS)] + ["sh", "-c", f'echo "mark=${{{MARK}:-none}}"']
    marked = {**os.environ, MARK: "t0k3n"}
    assert subprocess.run(argv, env=marked, timeout=10, stdin=subprocess.DEVNULL).returncode == 0
    assert _until(lambda: "mark=" in log.read_text())
    assert "mark=none" in log.read_text()
