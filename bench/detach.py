"""Bench: detached runs (`invoke train --detach`, `invoke stop`, the gang without a controller).

    .venv/bin/python bench/detach.py [--repeat 3] [--inventory PATH] [--prefix P --subnet S]

Without --inventory it brings up its own 2-node sandbox (default prefix ddpd, 10.221.0.0/24),
installs the training env and takes the sandbox down at the end.

- Launch: `invoke train --detach` wall time (it returns once every node's ranks started) against
  an attached `invoke train`'s time to the last of 4 ranks' first step (bench/launch.py's
  figure); target: detached <= attached + 1 s. Runs alternate; medians of --repeat.
- Stop: `invoke stop RUN` on a training run, from the command's start to the last process of the
  run gone on every node (a /proc poller per node, by DDPFLEET_RUN_ID); target <= 3 s.
- Gang stop without a controller: rank 3 (node1) raises in a detached run; from its process
  vanishing to the last process of the run gone on every node; target <= 10 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_launch", ROOT / "bench" / "launch.py")
attached = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attached)

from tests.integration.conftest import write_inventory  # noqa: E402

INVOKE = attached.INVOKE
LONG = "--epochs 200 --steps-per-epoch 4 --batch-size 8 --step-sleep 0.05"


def invoke(inventory: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "DDPFLEET_INVENTORY": str(inventory), "COLUMNS": "200"}
    start = time.perf_counter()
    r = subprocess.run([*INVOKE, *args], env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"invoke {' '.join(args[:3])} failed: {r.stdout[-800:]}{r.stderr[-800:]}")
    return took, r


def detach(inventory: Path, run_id: str, args: str) -> float:
    took, _ = invoke(inventory, "train", "--project-dir", str(ROOT), "--nproc-per-node", "2",
                     "--run-id", run_id, "--args", args, "--detach")  # fmt: skip
    return took


def wait_ended(inventory: Path, run_id: str, within: float = 300) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        _, r = invoke(inventory, "runs", "--json")
        view = next((v for v in json.loads(r.stdout) if v["run_id"] == run_id), None)
        if view and view["state"] != "RUNNING":
            return view["state"]
        time.sleep(0.5)
    raise SystemExit(f"{run_id} did not end within {within}s")


def wait_first_steps(inventory: Path, run_id: str, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        _, r = invoke(inventory, "logs", run_id)
        if r.stdout.count("first step") >= 4:
            return
        time.sleep(0.3)
    raise SystemExit(f"{run_id}: not every rank started within {within}s")


def launch_figure(inventory: Path, repeat: int) -> None:
    ours, theirs = [], []
    for i in range(repeat):
        lines, _ = attached.run_invoke(inventory, f"bench-att-{i}-{uuid.uuid4().hex[:6]}",
                                       attached.ARGS)  # fmt: skip
        theirs.append(attached._first_steps(lines, "invoke train"))
        run_id = f"bench-det-{i}-{uuid.uuid4().hex[:6]}"
        ours.append(detach(inventory, run_id, attached.ARGS))
        wait_ended(inventory, run_id)
        print(f"  run {i + 1}: train --detach returned {ours[-1]:.2f}s; attached first steps "
              f"{theirs[-1]:.2f}s")  # fmt: skip
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"launch (median of {repeat}): detached returns {a:.2f}s, attached ranks' first step "
          f"{b:.2f}s: {a - b:+.2f}s (target <= +1.0s)")  # fmt: skip


def stop_figure(inventory: Path, data: dict) -> None:
    run_id = f"bench-stop-{uuid.uuid4().hex[:6]}"
    detach(inventory, run_id, LONG)
    wait_first_steps(inventory, run_id)
    watch = attached.pollers(data, run_id)
    start = time.time()
    took, _ = invoke(inventory, "stop", run_id)
    last = {}
    for node, proc in watch.items():
        out, _ = proc.communicate(timeout=240)
        gone = [float(t) for t, what, *_ in (x.split() for x in out.splitlines()) if what == "gone"]
        last[node] = max(gone) if gone else start
    print(f"stop: invoke stop returned in {took:.2f}s; last process gone "
          f"{max(last.values()) - start:.2f}s after it began (target <= 3s)")  # fmt: skip


def gang_figure(inventory: Path, data: dict) -> None:
    run_id = f"bench-gang-{uuid.uuid4().hex[:6]}"
    watch = attached.pollers(data, run_id)
    detach(inventory, run_id, attached.FAIL_ARGS)
    crash, last = attached.vanish_times(watch, "3")
    state = wait_ended(inventory, run_id)
    print(f"gang stop without controller: rank 3 crash -> last process gone on every node "
          f"{attached._stop_figures(crash, last)} (target <= 10s); runs says {state}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--inventory", type=Path, help="an existing 2-node cluster with the env")
    ap.add_argument("--prefix", default="ddpd")
    ap.add_argument("--subnet", default="10.221.0.0/24")
    args = ap.parse_args()
    own = args.inventory is None
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-"))
    inventory = args.inventory or write_inventory(work, 2, prefix=args.prefix, subnet=args.subnet)
    env = {**os.environ, "DDPFLEET_INVENTORY": str(inventory)}
    if own:
        subprocess.run([*INVOKE, "sandbox.up"], env=env, check=True, capture_output=True)
    try:
        if own:
            subprocess.run([*INVOKE, "bootstrap", "--roles", "venv_env"], env=env, check=True,
                           capture_output=True)  # fmt: skip
        data = yaml.safe_load(Path(inventory).read_text())
        attached.run_invoke(inventory, f"bench-warmup-{uuid.uuid4().hex[:6]}", attached.ARGS)
        launch_figure(inventory, args.repeat)
        stop_figure(inventory, data)
        gang_figure(inventory, data)
    finally:
        attached.cleanup(yaml.safe_load(Path(inventory).read_text()))
        if own:
            subprocess.run([*INVOKE, "sandbox.down"], env=env, check=False, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
