"""scripts/train_ddp.py under a real torchrun (2 local ranks, gloo on CPU): the ranks agree,
its checkpoints follow ddpfleet's contract, a run stopped after a checkpoint and resumed ends
with the same final sha256 as an uninterrupted run, and a failure fails torchrun.

The independent runs start at once, in parallel, to keep this under ~30 s."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
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


def torchrun(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 train_ddp.py ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(SCRIPT), *SMALL, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    for name in ("DDPFLEET_CHECKPOINT_DIR", "DDPFLEET_PROGRESS_FILE"):
        if not env.get(name):
            env.pop(name, None)
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


def final(out: str) -> str:
    (found,) = lines(r"final model sha256 ([0-9a-f]{64})", out)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Exit code and output of each run. `stopped` fails at step 7 after checkpoints at steps
    2, 4 and 6 (--checkpoint-dir, as under plain torchrun); a partial step 8 is planted; then
    `resumed` goes on from the same dir given as DDPFLEET_CHECKPOINT_DIR (as under ddpfleet),
    and must end where the uninterrupted `whole` ends (which checkpoints every 4 steps)."""
    ckpt, other = tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("whole")
    every = ["--epochs", "3", "--checkpoint-every", "2"]
    progress = str(other / "progress.json")
    stopped = torchrun(*every, "--checkpoint-dir", str(ckpt), "--fail-at-step", "7",
                       "--fail-rank", "1")  # fmt: skip
    whole = torchrun("--epochs", "3", env={"DDPFLEET_CHECKPOINT_DIR": str(other),
                                           "DDPFLEET_PROGRESS_FILE": progress})  # fmt: skip
    done = {"stopped": finish(stopped), "whole": finish(whole), "ckpt": ckpt, "other": other}
    done["after stop"] = sorted(p.name for p in ckpt.iterdir())
    partial = ckpt / "step-00000008"  # a node died while writing it: no manifest
    shutil.copytree(ckpt / "step-00000006", partial)
    (partial / "MANIFEST.json").unlink()
    elsewhere = tmp_path_factory.mktemp("unused")
    done["resumed"] = finish(torchrun(*every, "--checkpoint-dir", str(elsewhere),
                                      env={"DDPFLEET_CHECKPOINT_DIR": str(ckpt)}))  # fmt: skip
    done["elsewhere"] = list(elsewhere.iterdir())
    return done


def test_ranks_agree_and_the_progress_file_counts_steps(runs: dict) -> None:
    code, out = runs["whole"]
    assert code == 0, out
    assert sorted(lines(r"rank (\d)/2: first step", out)) == ["0", "1"]
    assert lines(r"epoch (\d) loss \d+\.\d{8}", out) == ["1", "2", "3"]
    sums = checksums(out)
    assert set(sums) == {0, 1} and sums[0] == sums[1], out
    assert final(out).startswith(sums[0])
    progress = json.loads((runs["other"] / "progress.json").read_text())
    assert progress["step"] == 12 and progress["time"] > 0
    assert json.loads((runs["other"] / "final.json").read_text())["sha256"] == final(out)


def test_checkpoints_follow_the_contract(runs: dict) -> None:
    """step-<8 digits>/ with a manifest naming every file's SHA-256; the newest 3 kept; no
    temp file left (the failure came after the checkpoint at step 6, not during it)."""
    assert runs["after stop"] == ["step-00000002", "step-00000004", "step-00000006"]
    step = runs["ckpt"] / "step-00000012"  # written by the resumed run
    manifest = json.loads((step / "MANIFEST.json").read_text())
    assert manifest["format"] == "ddpfleet.checkpoint/1"
    assert manifest["step"] == 12 and manifest["world_size"] == 2
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((step / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in step.iterdir()) == ["MANIFEST.json", *sorted(manifest["files"])]
    names = sorted(p.name for p in runs["ckpt"].iterdir())
    assert names == ["final.json", "step-00000008", "step-00000010", "step-00000012"]


def test_stopped_and_resumed_ends_with_the_uninterrupted_weights(runs: dict) -> None:
    code, out = runs["stopped"]
    assert code != 0 and "rank 1: injected failure at step 7" in out
    assert not checksums(out)
    code, out = runs["resumed"]
    assert code == 0, out
    # the newest COMPLETE one: step 8 had no manifest
    assert sorted(lines(r"rank (\d): resumed from epoch 1 step 6", out)) == ["0", "1"]
    assert "not --checkpoint-dir" in out and runs["elsewhere"] == []
    assert lines(r"epoch (\d) loss \S+", out) == ["2", "3"]
    assert final(out) == final(runs["whole"][1]), (out, runs["whole"][1])
    assert json.loads((runs["ckpt"] / "final.json").read_text())["sha256"] == final(out)


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
