"""Bench: `invoke ping` against pdsh -R ssh (curve25519) on the same sandbox nodes, one run.

    .venv/bin/python bench/ping.py [--sizes 2,8,32] [--repeat 5]

Brings up its own sandbox (prefix ddpb, 10.219.0.0/24) with max(sizes) nodes, times whole
processes (median of --repeat), prints ratios, then the median latency of 20 sequential
commands on one open ddpfleet connection, and takes the sandbox down again.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpfleet import inventory as inv  # noqa: E402
from ddpfleet.connection import connect  # noqa: E402
from ddpfleet.facts import FACTS_SCRIPT  # noqa: E402
from tests.integration.conftest import write_inventory  # noqa: E402

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def timed(argv: list[str], env: dict, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        r = subprocess.run(argv, env=env, capture_output=True, text=True)
        runs.append(time.perf_counter() - start)
        if r.returncode != 0:
            raise SystemExit(f"{argv[:4]} failed: {r.stderr[-500:]}")
    return statistics.median(runs)


def pdsh_argv(data: dict, n: int) -> tuple[list[str], dict]:
    hosts = ",".join(node["host"] for node in list(data["nodes"].values())[:n])
    ssh_args = (
        f"-i {data['ssh']['key']} -o KexAlgorithms=curve25519-sha256 -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={data['ssh']['known_hosts']}"
    )
    env = {**os.environ, "PDSH_SSH_ARGS_APPEND": ssh_args, "PDSH_RCMD_TYPE": "ssh"}
    return ["pdsh", "-S", "-R", "ssh", "-l", "root", "-f", str(n), "-w", hosts, FACTS_SCRIPT], env


def per_command_ms(inventory: Path) -> float:
    node = inv.load(inventory).nodes[0]
    conn = connect(node)
    try:
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            conn.run("true")
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2,8,32")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-"))
    big = write_inventory(work, max(sizes), prefix="ddpb", subnet="10.219.0.0/24")
    env = {**os.environ, "DDPFLEET_INVENTORY": str(big)}
    subprocess.run([*INVOKE, "sandbox.up"], env=env, check=True, capture_output=True)
    try:
        import yaml

        data = yaml.safe_load(big.read_text())
        print(f"{'N':>4} {'invoke ping s':>14} {'pdsh s':>8} {'ratio':>6}")
        for n in sizes:
            sub = work / f"n{n}"
            sub.mkdir(exist_ok=True)
            part = dict(data, nodes=dict(list(data["nodes"].items())[:n]))
            (sub / "inventory.yaml").write_text(yaml.safe_dump(part, sort_keys=False))
            ours = timed(
                [*INVOKE, "ping"],
                {**env, "DDPFLEET_INVENTORY": str(sub / "inventory.yaml")},
                args.repeat,
            )
            argv, penv = pdsh_argv(data, n)
            theirs = timed(argv, penv, args.repeat)
            print(f"{n:>4} {ours:>14.3f} {theirs:>8.3f} {ours / theirs:>6.2f}")
        print(f"per command on one open connection: {per_command_ms(big):.2f} ms (median of 20)")
    finally:
        subprocess.run([*INVOKE, "sandbox.down"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
