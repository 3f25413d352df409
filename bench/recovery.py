"""Bench: a self-healing detached run's recovery, from the kill of a worker to the new
generation's first step (issue 22's target: <= 60 s on the sandbox), in its phases.

    .venv/bin/python bench/recovery.py [--repeat 3] [--prefix drcb] [--subnet 10.238.0.0/24]
        [--kill-at 9] [--wheelhouse DIR]

Brings up its own sandbox (--prefix, --subnet) of 3 nodes + 1 spare in the default cloud shape
(login `ubuntu` with passwordless sudo, root login refused, training as the non-root `train`),
the training user and env on each (`bootstrap --roles train_user,venv_env`, its time shown, not
counted), then --repeat times: the
deterministic scripts/train_ddp.py detached on node0-2 (2 ranks each, a checkpoint every 2
steps, 0.5 s a step) with node3 standing by, `invoke sandbox.stop` of node1 once node0 is past
step --kill-at, the run left to end (it must SUCCEED), node1 started again for the next round.

What each round reads is what a user reads: `runs --json` (the second generation's lost_at,
started, checkpoint_s, first_step) and `logs` (rank 0's "checkpoint loaded in Xs"). The sandbox's
nodes share this machine's clock, so the controller's kill time and the nodes' times compare.
Columns, seconds:

    total       kill -> the new generation's first step (the target)
    detect      kill -> the master saw the loss (lifeline closed or silent)
    decide      loss -> torchrun started again: fence, the 5 s settle, the spare's health
                check and take, the checkpoint in place (everything before the new start)
    transfer    of decide: the newest complete checkpoint on every node (the spare fetches it
                from the master, verified by SHA-256)
    restart     torchrun started -> first step: processes, imports, rendezvous, the load
    load        of restart: rank 0 reading, verifying and loading the checkpoint

The median of --repeat, and the load average before and after (8 torch processes starting on a
shared 2-core box move `restart` most). The sandbox goes down at the end, with the bench's dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import Cluster, sandbox, write_inventory  # noqa: E402
from tests.integration.test_real_machine import ssh  # noqa: E402
from tests.integration.test_train import train_args  # noqa: E402

GANG = ("node0", "node1", "node2")
SCRIPT = "--epochs 6 --steps-per-epoch 4 --batch-size 8 --checkpoint-every 2 --step-sleep 0.5"
RUNS = "/var/lib/ddpfleet/runs"
LOADED = re.compile(r"checkpoint loaded in ([0-9.]+)s")
COLUMNS = ("total", "detect", "decide", "transfer", "restart", "load")


def invoke(c: Cluster, *args: str, timeout: float = 300) -> str:
    r = c.invoke(*args, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"invoke {' '.join(args[:2])} failed: {(r.stderr or r.stdout)[-1500:]}")
    return r.stdout


def view(c: Cluster, run_id: str) -> dict:
    runs = json.loads(invoke(c, "runs", "--json", timeout=120))
    return next((v for v in runs if v["run_id"] == run_id), {})


def step(c: Cluster, run_id: str) -> int:
    """node0's step, read as root through ubuntu's sudo (the run's state is root's)."""
    path = f"{RUNS}/{run_id}/progress/progress.json"
    out = ssh(c, "node0", shlex.join(["sudo", "-n", "cat", path]) + " 2>/dev/null").stdout
    try:
        return json.loads(out)["step"]
    except (ValueError, KeyError):
        return -1


def until(what: str, check, within: float):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise SystemExit(f"{what}: not within {within:.0f}s")


def round_(c: Cluster, n: int, kill_at: int) -> dict[str, float]:
    """One run, node1 killed mid-run: the phases of its recovery, seconds."""
    run_id = f"bench-rec-{os.getpid()}-{n}"
    invoke(c, *train_args(run_id, SCRIPT, "--nodes", ",".join(GANG), "--detach"),
           "--spares", "node3", "--no-health-gate")  # fmt: skip
    until(f"{run_id} at step {kill_at}", lambda: step(c, run_id) >= kill_at, 180)
    killed = time.time()
    invoke(c, "sandbox.stop", "--nodes", "node1", timeout=120)
    try:
        ended = until(
            f"{run_id} ended",
            lambda: (v := view(c, run_id)).get("state") in ("SUCCEEDED", "FAILED", "LOST") and v,
            300,
        )
    finally:
        invoke(c, "sandbox.start", "--nodes", "node1", timeout=180)
    gens = ended.get("generations") or []
    if ended["state"] != "SUCCEEDED" or len(gens) != 2 or not gens[1].get("first_step"):
        raise SystemExit(
            f"{run_id}: {ended['state']} ({ended.get('why')}), generations {gens}: not one "
            f"recovery\n{invoke(c, 'logs', run_id, timeout=120)[-3000:]}"
        )
    g = gens[1]
    loads = LOADED.findall(invoke(c, "logs", run_id, timeout=120))
    return {
        "total": g["first_step"] - killed,
        "detect": g["lost_at"] - killed,
        "decide": g["started"] - g["lost_at"],
        "transfer": g["checkpoint_s"],
        "restart": g["first_step"] - g["started"],
        "load": float(loads[-1]) if loads else float("nan"),
        "step": g["resumed_step"],
    }


def row(name: str, t: dict[str, float]) -> str:
    return f"{name:>7} " + " ".join(f"{t[k]:>9.3f}" for k in COLUMNS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prefix", default="drcb")
    ap.add_argument("--subnet", default="10.238.0.0/24")
    ap.add_argument("--kill-at", type=int, default=9, help="node0's step before node1 is killed")
    ap.add_argument("--wheelhouse", type=Path, help="an existing .ddpfleet/wheelhouse to link")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-recovery-"))
    c = Cluster(work, write_inventory(work, 4, prefix=args.prefix, subnet=args.subnet, cloud=True))
    if args.wheelhouse:
        (work / ".ddpfleet").mkdir(exist_ok=True)
        (work / ".ddpfleet" / "wheelhouse").symlink_to(args.wheelhouse.resolve())
    try:
        with sandbox(c, "--sudo", "nopasswd"):
            began = time.perf_counter()
            invoke(c, "bootstrap", "--roles", "train_user,venv_env", timeout=1800)
            print(f"bootstrap --roles train_user,venv_env on 4 nodes (login ubuntu + sudo): "
                  f"{time.perf_counter() - began:.1f} s (not counted)")  # fmt: skip
            print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
            rounds = []
            for n in range(args.repeat):
                rounds.append(round_(c, n, args.kill_at))
                print(f"round {n + 1}: {rounds[-1]['total']:.1f} s (resumed from step "
                      f"{rounds[-1]['step']})", flush=True)  # fmt: skip
            print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nkill of node1 -> the new generation's first step, seconds (3 nodes + 1 spare, "
          "2 ranks each; target total <= 60):")  # fmt: skip
    print(f"{'':>7} " + " ".join(f"{k:>9}" for k in COLUMNS))
    for n, t in enumerate(rounds):
        print(row(f"run {n + 1}", t))
    print(row("median", {k: statistics.median(t[k] for t in rounds) for k in COLUMNS}))


if __name__ == "__main__":
    main()
