"""Bench: `invoke train --launcher slurm` against the SSH launcher, the same run, one session.

    .venv/bin/python bench/slurm_launch.py [--repeat 3] [--inventory PATH]
                                           [--prefix ddpk --subnet 10.222.0.0/24]

Without --inventory it brings up its own 2-node sandbox (the prefix and subnet given), runs
`bootstrap --roles venv_env,slurm` and takes the sandbox down at the end (its Slurm daemons
end with their nodes). With --inventory the cluster must be bootstrapped with both roles.

The figure: seconds from starting `invoke train` (a fresh process, as a user types it) to the
last of the 4 ranks printing "first step", for each launcher, runs alternating, medians of
--repeat, the code tree unchanged (a warm-up run of each syncs it first). The difference is
what going through Slurm costs: sbatch, slurmctld's scheduling, srun's step launch on every
node, c10d's rendezvous instead of the static one, and the controller's output polling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.launch import FIRST_STEP, INVOKE, ROOT, Lines  # noqa: E402
from tests.integration.conftest import write_inventory  # noqa: E402

ARGS = "--epochs 1 --steps-per-epoch 10 --step-sleep 0.02"


def run(inventory: Path, launcher: str) -> float:
    """Seconds to the 4th rank's first step; fails loudly when the run fails."""
    run_id = f"bench-{launcher}-{uuid.uuid4().hex[:6]}"
    argv = [*INVOKE, "train", "--launcher", launcher, "--project-dir", str(ROOT)]
    argv += ["--nproc-per-node", "2", "--run-id", run_id, "--args", ARGS]
    env = {**os.environ, "DDPFLEET_INVENTORY": str(inventory), "COLUMNS": "200"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = Lines(proc, start)
    code = proc.wait(timeout=600)
    lines.thread.join(timeout=5)
    firsts = [t for t, line in lines.lines if FIRST_STEP.search(line)]
    if code != 0 or len(firsts) < 4:
        tail = "\n".join(line for _, line in lines.lines[-30:])
        raise SystemExit(f"{launcher} run {run_id} failed (exit {code}):\n{tail}")
    return sorted(firsts)[3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--inventory", type=Path, help="a 2-node cluster with venv_env and slurm")
    ap.add_argument("--prefix", default="ddpk")
    ap.add_argument("--subnet", default="10.222.0.0/24")
    args = ap.parse_args()
    own = args.inventory is None
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-"))
    inventory = args.inventory or write_inventory(work, 2, prefix=args.prefix, subnet=args.subnet)
    env = {**os.environ, "DDPFLEET_INVENTORY": str(inventory)}
    try:
        if own:
            subprocess.run([*INVOKE, "sandbox.up"], env=env, check=True, capture_output=True)
            subprocess.run(
                [*INVOKE, "bootstrap", "--roles", "venv_env,slurm"],
                env=env,
                check=True,
                capture_output=True,
            )
        for launcher in ("ssh", "slurm"):  # warm-up: the first syncs the tree
            run(inventory, launcher)
        times: dict[str, list[float]] = {"ssh": [], "slurm": []}
        for _ in range(args.repeat):
            for launcher in times:
                times[launcher].append(run(inventory, launcher))
        ssh, slurm = (statistics.median(times[k]) for k in ("ssh", "slurm"))
        print(f"start to 4th rank's first step, median of {args.repeat}:")
        print(f"  ssh launcher    {ssh:6.2f} s   {' '.join(f'{t:.2f}' for t in times['ssh'])}")
        print(f"  slurm launcher  {slurm:6.2f} s   {' '.join(f'{t:.2f}' for t in times['slurm'])}")
        print(f"  slurm - ssh     {slurm - ssh:+6.2f} s   (x{slurm / ssh:.2f})")
    finally:
        if own:
            subprocess.run([*INVOKE, "sandbox.down"], env=env, check=False, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
