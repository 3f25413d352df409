"""Bench: `invoke train` launch overhead and stop latency against plain ssh + torchrun, one run.

    .venv/bin/python bench/launch.py [--repeat 3] [--inventory PATH]

Without --inventory it brings up its own 2-node sandbox (prefix ddpl, 10.220.0.0/24), installs
the training env (bootstrap --roles venv_env) and takes the sandbox down at the end.

Launch overhead: seconds from starting `invoke train` (a fresh process, as a user types it) to
the last of the 4 ranks printing "first step", against the same torchrun commands (the plan's
own argv, env and directory) started by hand with `ssh node 'cd ... && env ... torchrun ...'`
on both nodes at once. Runs alternate, medians of --repeat, the code tree unchanged (a warm-up
run syncs it first). The difference is what ddpfleet costs: invoke's start, one connection per
node, the probe, the plan, the port checks.

Stop latency: rank 3 (node1) raises mid-training. A /proc poller on each node watches every
process carrying the run's DDPFLEET_RUN_ID; the figure is from the first of them vanishing (the
crashed rank) to the last one gone on every node. Sandbox nodes share the controller's clock.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from ddpfleet import inventory as inv
from ddpfleet import launch
from ddpfleet.ssh.connection import Fleet
from tests.integration.conftest import ROOT, write_inventory

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
ARGS = "--epochs 1 --steps-per-epoch 30 --step-sleep 0.05"  # ~1.5 s of steps after the first
FAIL_ARGS = "--epochs 100 --steps-per-epoch 100 --step-sleep 0.05 --fail-at-step 10 --fail-rank 3"
FIRST_STEP = re.compile(r"rank \d+/4: first step")

# Runs on a node (system python3). "RUN watch": prints "<unix time> seen|gone <pid> <RANK|->"
# for every process carrying DDPFLEET_RUN_ID=RUN until it saw some and none is left for 1.5 s.
# "PREFIX kill": SIGKILLs every process whose run id starts with PREFIX (the bench's cleanup).
POLLER = r"""
import os, signal, sys, time
exact = sys.argv[2] == "watch"
tag = b"\0DDPFLEET_RUN_ID=" + sys.argv[1].encode() + (b"\0" if exact else b"")
def pids():
    found = {}
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                with open("/proc/%s/environ" % p, "rb") as f:
                    env = b"\0" + f.read()
            except OSError:
                continue
            if tag in env:
                rank = [v[5:] for v in env.split(b"\0") if v.startswith(b"RANK=")]
                found[int(p)] = rank[0].decode() if rank else "-"
    return found
if not exact:
    for p in pids():
        os.kill(p, signal.SIGKILL)
    sys.exit()
live, seen, empty_since, end = {}, False, None, time.time() + 180
while time.time() < end:
    now, t = pids(), time.time()
    for p in sorted(set(now) - set(live)):
        print("%.4f seen %d %s" % (t, p, now[p]), flush=True)
    for p in sorted(set(live) - set(now)):
        print("%.4f gone %d %s" % (t, p, live[p]), flush=True)
    live, seen = now, seen or bool(now)
    if seen and not live:
        empty_since = empty_since or t
        if t - empty_since > 1.5:
            break
    else:
        empty_since = None
    time.sleep(0.02)
"""


class Lines:
    """A process's stdout, each line timestamped on arrival."""

    def __init__(self, proc: subprocess.Popen, start: float):
        self.proc, self.start, self.lines = proc, start, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.start, line.rstrip("\n")))

    def first_steps(self) -> list[float]:
        return [t for t, line in self.lines if FIRST_STEP.search(line)]


def ssh_argv(data: dict, node: str, command: str) -> list[str]:
    return [
        "ssh",
        "-i",
        data["ssh"]["key"],
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={data['ssh']['known_hosts']}",
        f"{data['ssh'].get('user', 'root')}@{data['nodes'][node]['host']}",
        command,
    ]


PROJECT = ROOT  # --project-dir: the tree `invoke train` mirrors (holds scripts/train_ddp.py)


def run_invoke(inventory: Path, run_id: str, args: str) -> tuple[Lines, int]:
    argv = [
        *INVOKE,
        "train",
        "--inventory",
        str(inventory),
        "--project-dir",
        str(PROJECT),
        "--nproc-per-node",
        "2",
        "--run-id",
        run_id,
        "--args",
        args,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines = Lines(proc, start)
    code = proc.wait(timeout=600)
    lines.thread.join(5)
    return lines, code


def plan_for(inventory: Path, run_id: str, args: str) -> launch.Plan:
    """The plan `invoke train` would run, from a real preflight that then starts nothing."""
    loaded = inv.load(inventory)
    flags = launch.TrainFlags(run_id=run_id, nproc_per_node="2", project_dir=PROJECT, args=args)
    config = launch.resolve(loaded, flags, log_root=PROJECT / "logs")
    with Fleet(loaded) as fleet:
        fleet.open()
        quiet = launch.Output(open(os.devnull, "w"))  # noqa: SIM115
        members = launch.open_members(fleet, config, quiet)
        try:
            p, _ = launch.preflight(config, members)
        finally:
            for m in members.values():
                m.call_off()
    return p


def run_by_hand(data: dict, p: launch.Plan) -> tuple[Lines, list[int]]:
    """Both nodes' torchrun over plain ssh at once, as a user would start them."""
    start = time.perf_counter()
    procs = []
    for n in p.nodes:
        env = [f"{k}={v}" for k, v in n.env.items()]
        command = f"cd {shlex.quote(n.cwd)} && exec {shlex.join(['env', *env, *n.argv])}"
        procs.append(
            subprocess.Popen(
                ssh_argv(data, n.node, command),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    merged = Lines(procs[0], start)
    other = Lines(procs[1], start)
    codes = [proc.wait(timeout=600) for proc in procs]
    merged.thread.join(5)
    other.thread.join(5)
    merged.lines += other.lines
    return merged, codes


def _first_steps(lines: Lines, who: str) -> float:
    """When the last of the 4 ranks took its first step; what happens after is not timed."""
    steps = lines.first_steps()
    if len(steps) != 4:
        raise SystemExit(
            f"{who}: not every rank started:\n" + "\n".join(x for _, x in lines.lines[-30:])
        )
    return max(steps)


def launch_overhead(inventory: Path, data: dict, repeat: int) -> None:
    ours, theirs = [], []
    for i in range(repeat):
        lines, code = run_invoke(inventory, f"bench-ours-{i}-{uuid.uuid4().hex[:6]}", ARGS)
        ours.append(_first_steps(lines, "invoke train"))
        p = plan_for(inventory, f"bench-hand-{i}-{uuid.uuid4().hex[:6]}", ARGS)
        lines, codes = run_by_hand(data, p)
        theirs.append(_first_steps(lines, "torchrun by hand"))
        print(
            f"  run {i + 1}: invoke train {ours[-1]:.2f}s, ssh + torchrun {theirs[-1]:.2f}s"
            + (
                f" (exit codes {code} / {codes}: the job's own end, not its start)"
                if code or any(codes)
                else ""
            )
        )
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"launch -> first step on all 4 ranks (median of {repeat}): invoke train {a:.2f}s, "
        f"by hand {b:.2f}s, overhead {a - b:+.2f}s (target < 1.0s)"
    )


def pollers(data: dict, run_id: str) -> dict[str, subprocess.Popen]:
    procs = {}
    for node in data["nodes"]:
        command = shlex.join(["python3", "-c", POLLER, run_id, "watch"])
        procs[node] = subprocess.Popen(
            ssh_argv(data, node, command), stdout=subprocess.PIPE, text=True
        )
    time.sleep(1.0)  # let them start before the run does
    return procs


def vanish_times(procs: dict[str, subprocess.Popen], rank: str) -> tuple[float, dict]:
    """(the crashing rank's process gone, {node: its last process of the run gone}), unix time."""
    crashed, last = [], {}
    for node, proc in procs.items():
        out, _ = proc.communicate(timeout=240)
        for t, what, _pid, who in (line.split() for line in out.splitlines()):
            if what == "gone":
                last[node] = max(last.get(node, 0.0), float(t))
                if who == rank:
                    crashed.append(float(t))
    if not crashed:
        raise SystemExit(f"the pollers did not see rank {rank} go")
    return min(crashed), last


def _stop_figures(crash: float, last: dict) -> str:
    per_node = ", ".join(f"{n} +{t - crash:.2f}s" for n, t in sorted(last.items()))
    return f"{max(last.values()) - crash:.2f}s ({per_node})"


def stop_latency(inventory: Path, data: dict) -> None:
    run_id = f"bench-stop-{uuid.uuid4().hex[:6]}"
    watch = pollers(data, run_id)
    lines, code = run_invoke(inventory, run_id, FAIL_ARGS)
    crash, last = vanish_times(watch, "3")
    named = next((x for _, x in lines.lines if x.startswith("error: training failed")), "?")
    print(
        f"stop latency, invoke train: rank 3 crash -> last process gone on every node "
        f"{_stop_figures(crash, last)} (target < 3s); exit {code}: {named[:70]}"
    )
    p = plan_for(inventory, f"bench-stop-hand-{uuid.uuid4().hex[:6]}", FAIL_ARGS)
    watch = pollers(data, p.run_id)
    run_by_hand(data, p)
    crash, last = vanish_times(watch, "3")
    print(
        f"stop latency, torchrun by hand: {_stop_figures(crash, last)} (gloo fails the peers "
        "fast; NCCL peers would wait for their collective timeout)"
    )


def cleanup(data: dict, run_prefix: str = "bench-") -> None:
    """Nothing of a bench run may outlive it (kills by the run-id marker, never by name)."""
    for node in data["nodes"]:
        subprocess.run(
            ssh_argv(data, node, shlex.join(["python3", "-c", POLLER, run_prefix, "kill"])),
            capture_output=True,
            check=False,
            timeout=60,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--inventory", type=Path, help="an existing 2-node cluster with the env")
    ap.add_argument("--project-dir", type=Path, default=ROOT)
    args = ap.parse_args()
    global PROJECT
    PROJECT = args.project_dir.resolve()
    own = args.inventory is None
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-"))
    inventory = args.inventory or write_inventory(work, 2, prefix="ddpl", subnet="10.220.0.0/24")
    env = {**os.environ, "DDPFLEET_INVENTORY": str(inventory)}
    if own:
        subprocess.run([*INVOKE, "sandbox.up"], env=env, check=True, capture_output=True)
    try:
        if own:
            subprocess.run(
                [*INVOKE, "bootstrap", "--roles", "venv_env"],
                env=env,
                check=True,
                capture_output=True,
            )
        data = yaml.safe_load(Path(inventory).read_text())
        run_invoke(inventory, f"bench-warmup-{uuid.uuid4().hex[:6]}", ARGS)  # syncs the tree
        launch_overhead(inventory, data, args.repeat)
        stop_latency(inventory, data)
    finally:
        cleanup(yaml.safe_load(Path(inventory).read_text()))
        if own:
            subprocess.run([*INVOKE, "sandbox.down"], env=env, check=False, capture_output=True)
            shutil.rmtree(work, ignore_errors=True)  # its wheelhouse alone is hundreds of MB


if __name__ == "__main__":
    main()
