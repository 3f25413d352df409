"""scripts/train_ddp.py under a real torchrun (2 local ranks, gloo on CPU): the ranks agree,
a checkpoint resumes to the same weights as an uninterrupted run, and a failure fails torchrun.

The four runs start at once (independent ones in parallel) to keep this under ~30 s."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed in this venv"
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_ddp.py"
SMALL = ["--steps-per-epoch", "4", "--batch-size", "16"]


def torchrun(*args: str) -> subprocess.Popen:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 train_ddp.py ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(SCRIPT), *SMALL, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def finish(run: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # torchrun and its workers: their own session
        raise
    return run.returncode, out


def lines(pattern: str, out: str) -> list:
    """re.findall over whole lines of a run's output."""
    return re.findall(f"^{pattern}$", out, re.MULTILINE)


def checksums(out: str) -> dict[int, str]:
    return {int(rank): value for rank, value in lines(r"rank (\d+) checksum ([0-9a-f]{16})", out)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Exit code and output of each run; `first` and `resumed` share a checkpoint directory."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    first = torchrun("--epochs", "2", "--checkpoint-dir", str(ckpt))
    whole = torchrun("--epochs", "3")
    failing = torchrun("--epochs", "2", "--fail-at-step", "3", "--fail-rank", "1")
    done = {"first": finish(first), "whole": finish(whole), "failing": finish(failing)}
    assert (ckpt / "checkpoint.pt").is_file(), done["first"][1]
    assert not [p.name for p in ckpt.iterdir() if p.name != "checkpoint.pt"]  # no temp files
    done["resumed"] = finish(torchrun("--epochs", "3", "--checkpoint-dir", str(ckpt)))
    return done


def test_ranks_agree_and_checkpoint_saved(runs: dict) -> None:
    code, out = runs["first"]
    assert code == 0, out
    assert sorted(lines(r"rank (\d)/2: first step", out)) == ["0", "1"]
    assert lines(r"epoch (\d) loss \d+\.\d{8}", out) == ["1", "2"]
    sums = checksums(out)
    assert set(sums) == {0, 1} and sums[0] == sums[1], out


def test_resume_continues_to_the_same_weights(runs: dict) -> None:
    code, out = runs["resumed"]
    assert code == 0, out
    assert sorted(lines(r"rank (\d): resumed from epoch 2", out)) == ["0", "1"]
    assert lines(r"epoch (\d) loss \S+", out) == ["3"]
    resumed, whole = checksums(out), checksums(runs["whole"][1])
    assert resumed[0] == resumed[1] == whole[0] == whole[1], (out, runs["whole"][1])


def test_injected_failure_fails_torchrun(runs: dict) -> None:
    code, out = runs["failing"]
    assert code != 0
    assert "rank 1: injected failure at step 3" in out
    assert not checksums(out)


def test_a_finished_rank_leaves_together_flushed_and_without_finalizing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """leave(): barrier, group destroyed, output flushed, then os._exit(0) - never interpreter
    finalization, where a gloo thread dropping its last work aborts the process (SIGABRT)."""
    spec = importlib.util.spec_from_file_location("train_ddp_under_test", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []

    class Exited(Exception):
        pass

    def exit_now(code: int) -> None:
        calls.append(f"_exit {code}")
        raise Exited

    monkeypatch.setattr(script.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(script.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(script.sys.stdout, "flush", lambda: calls.append("flush stdout"))
    monkeypatch.setattr(script.sys.stderr, "flush", lambda: calls.append("flush stderr"))
    monkeypatch.setattr(script.os, "_exit", exit_now)
    with pytest.raises(Exited):
        script.leave()
    assert calls == ["barrier", "destroy", "flush stdout", "flush stderr", "_exit 0"]
