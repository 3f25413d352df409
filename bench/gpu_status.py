"""Bench: `invoke gpu-status --json` against pdsh -R ssh (curve25519) running the same nvidia-smi
probe on the same sandbox nodes, in one run.

    .venv/bin/python bench/gpu_status.py [--nodes 32] [--repeat 5] [--prefix ddpg]
                                         [--subnet 10.217.0.0/24]

Brings up its own sandbox (--prefix, --subnet) with --nodes nodes, puts the recorded-output
nvidia-smi stand-in (tests/standins, 8 A100s) on every node, then times whole processes,
alternating ours and pdsh's so load from elsewhere hits both alike (median of --repeat each).
pdsh runs gpu.probe_script(), exactly what gpu-status runs on a node (query-gpu, query-compute-apps,
-L, the owners of the apps); a second pdsh line runs the bare `--query-gpu` alone, for scale.
The sandbox is taken down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpfleet.gpu import QUERY_GPU_FIELDS, probe_script
from tests.integration.conftest import write_inventory
from tests.integration.test_gpu_status import install_standin

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
QUERY_GPU = f"nvidia-smi --query-gpu={','.join(QUERY_GPU_FIELDS)} --format=csv,noheader,nounits"


def once(argv: list[str], env: dict, check) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{argv[:5]} failed ({r.returncode}): {r.stderr[-800:]}")
    check(r.stdout)
    return seconds


def pdsh(data: dict, command: str) -> tuple[list[str], dict]:
    hosts = ",".join(node["host"] for node in data["nodes"].values())
    ssh = data["ssh"]
    ssh_args = (
        f"-i {ssh['key']} -o KexAlgorithms=curve25519-sha256 -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={ssh['known_hosts']}"
    )
    env = {**os.environ, "PDSH_SSH_ARGS_APPEND": ssh_args, "PDSH_RCMD_TYPE": "ssh"}
    n = str(len(data["nodes"]))
    return ["pdsh", "-S", "-R", "ssh", "-l", "root", "-f", n, "-w", hosts, command], env


def gpus_in_json(n: int):
    def check(stdout: str) -> None:
        doc = json.loads(stdout)
        assert doc["totals"]["gpus"] == 8 * n and doc["totals"]["unqueried"] == 0, doc["totals"]

    return check


def lines_with(text: str, count: int):
    def check(stdout: str) -> None:
        assert stdout.count(text) == count, stdout[-500:]

    return check


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefix", default="ddpg")
    ap.add_argument("--subnet", default="10.217.0.0/24")
    args = ap.parse_args()
    n = args.nodes
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-gpu-"))
    inventory = write_inventory(work, n, prefix=args.prefix, subnet=args.subnet)
    env = {**os.environ, "DDPFLEET_INVENTORY": str(inventory)}
    subprocess.run([*INVOKE, "sandbox.up"], env=env, check=True, capture_output=True)
    try:
        data = yaml.safe_load(inventory.read_text())
        install_standin(inventory, list(data["nodes"]), "a100x8")
        runs = {
            "invoke gpu-status --json": ([*INVOKE, "gpu-status", "--json"], env, gpus_in_json(n)),
            "pdsh, the same probe": (*pdsh(data, probe_script()), lines_with(" end\n", n)),
            "pdsh, --query-gpu only": (*pdsh(data, QUERY_GPU), lines_with("A100-SXM4", 8 * n)),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, (argv, run_env, check) in runs.items():
                times[name].append(once(argv, run_env, check))
        median = {name: statistics.median(t) for name, t in times.items()}
        base = median["pdsh, the same probe"]
        print(f"{n} nodes, median of {args.repeat}, alternating")
        for name, seconds in median.items():
            spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
            print(f"  {name:<28} {seconds:7.3f} s  ({spread})  {seconds / base:5.2f}x")
        ratio = median["invoke gpu-status --json"] / base
        print(f"gpu-status / pdsh (same probe): {ratio:.2f} (target <= 1.30)")
    finally:
        subprocess.run([*INVOKE, "sandbox.down"], env=env, capture_output=True, check=False)


if __name__ == "__main__":
    main()
