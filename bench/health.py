"""Bench: `invoke health` (the quick checks) against pdsh -R ssh running the same probe on the
same sandbox nodes, cold (ssh.persist: 0) and warm (the connection keeper), then the wall time
of `invoke health --deep` on a few nodes with the training env.

    .venv/bin/python bench/health.py [--nodes 32] [--deep-nodes 8] [--repeat 5]
        [--prefix dhlb] [--subnet 10.231.0.0/26] [--wheelhouse DIR]

Brings up its own sandbox (--prefix, --subnet) with --nodes nodes in the default cloud shape
(login `ubuntu` with passwordless sudo, root login refused, training as the non-root `train`).
--deep runs first, on the CPU nodes as they are (a node without nvidia-smi: no GPU rows). Then
the recorded-output nvidia-smi stand-in (tests/standins, 8 A100s) goes on each node, so the
quick probe takes its GPU path (nvidia-smi, remapped rows, NVLink, the kernel log). Whole
processes are timed alternating ours and pdsh's, so load from elsewhere hits both alike; the
median of --repeat each. pdsh (-l ubuntu) runs exactly what ours runs on a node:
probe.script(the env's python, the master's host) as root through the same `sudo -n -H --
/bin/sh -c ...` line (ours adds the node-side timeout wrapper). Targets (issue 23): quick within
1.2x of pdsh at 32 nodes; --deep on 8 nodes under 60 s.

--deep needs torch on its nodes: `bootstrap --roles train_user,venv_env` on the first
--deep-nodes, before anything is timed (its time is shown, not counted). --wheelhouse links an
existing controller wheel cache (<dir>/.ddpfleet/wheelhouse of an earlier cluster) so nothing
is downloaded again. The sandbox goes down at the end, and the bench's directory with it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ping import part, pdsh, warm_up  # noqa: E402
from ddpfleet import envs  # noqa: E402
from ddpfleet import inventory as inv  # noqa: E402
from ddpfleet.health import probe  # noqa: E402
from ddpfleet.ssh.become import Escalation  # noqa: E402
from tests.integration.conftest import write_inventory  # noqa: E402
from tests.integration.test_lean import install_standin_sudo  # noqa: E402

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def once(argv: list[str], env: dict, check: bool = True) -> tuple[float, int]:
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[-3:])} failed ({r.returncode}): {r.stderr[-800:]}")
    return seconds, r.returncode


def quick(data: dict, work: Path, env: dict, n: int, repeat: int) -> None:
    cold_env = {**env, "DDPFLEET_INVENTORY": str(part(data, n, work / f"c{n}", 0))}
    warm_inv = part(data, n, work / f"w{n}", 60)
    warm_env = {**env, "DDPFLEET_INVENTORY": str(warm_inv)}
    warm_up(warm_inv, warm_env)
    loaded = inv.load(warm_inv)
    python = envs.location(loaded, loaded.nodes[0]).python
    # as health's probe reaches root on these nodes (probe.run: root through sudo)
    script = Escalation("sudo", "ubuntu").wrap(
        shlex.join(["sh", "-c", probe.script(python, loaded.nodes[0].host)])
    )
    sub = dict(data, nodes=dict(list(data["nodes"].items())[:n]))
    p_argv, p_env = pdsh(sub, script)
    argv = [*INVOKE, "health", "--json"]
    t: dict[str, list[float]] = {"cold": [], "warm": [], "pdsh": []}
    try:
        for _ in range(repeat):
            t["cold"].append(once(argv, cold_env)[0])
            t["warm"].append(once(argv, warm_env)[0])
            t["pdsh"].append(once(p_argv, p_env)[0])
    finally:
        subprocess.run([*INVOKE, "disconnect"], env=warm_env, capture_output=True)
    m = {k: statistics.median(v) for k, v in t.items()}
    print(f"{'N':>4} {'cold s':>7} {'warm s':>7} {'pdsh s':>7} {'cold':>5} {'warm':>5}")
    print(
        f"{n:>4} {m['cold']:>7.3f} {m['warm']:>7.3f} {m['pdsh']:>7.3f} "
        f"{m['cold'] / m['pdsh']:>5.2f} {m['warm'] / m['pdsh']:>5.2f}"
        "   (ratio = ours / pdsh; target <= 1.2)"
    )
    print(
        "  every run, s: "
        + "; ".join(f"{k} {' '.join(f'{x:.2f}' for x in v)}" for k, v in t.items())
    )


def bootstrap(data: dict, work: Path, env: dict, n: int, wheelhouse: Path | None) -> dict:
    """The training env on the first n nodes, before the stand-in is there: with it, the env's
    check would want a CUDA build of torch (the sandbox's wheelhouse holds the CPU one)."""
    inventory = part(data, n, work / f"d{n}", 0)
    deep_env = {**env, "DDPFLEET_INVENTORY": str(inventory)}
    if wheelhouse:
        (work / f"d{n}" / ".ddpfleet").mkdir(exist_ok=True)
        (work / f"d{n}" / ".ddpfleet" / "wheelhouse").symlink_to(wheelhouse.resolve())
    took, _ = once([*INVOKE, "bootstrap", "--roles", "train_user,venv_env"], deep_env)
    print(f"bootstrap --roles train_user,venv_env on {n} nodes: {took:.1f} s (not counted)")
    return deep_env


def deep(deep_env: dict, n: int) -> None:
    start = time.perf_counter()
    r = subprocess.run([*INVOKE, "health", "--deep"], env=deep_env, capture_output=True, text=True)
    took = time.perf_counter() - start
    verdict = "pass" if r.returncode == 0 else f"exit {r.returncode}"
    print(f"health --deep on {n} nodes: {took:.1f} s wall ({verdict}; target < 60 s)")
    if r.returncode != 0:  # what it found, as a user reads it
        print((r.stdout + r.stderr)[-2500:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--deep-nodes", type=int, default=8, help="0: no --deep")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefix", default="dhlb")
    ap.add_argument("--subnet", default="10.231.0.0/26")
    ap.add_argument("--wheelhouse", type=Path, help="an existing .ddpfleet/wheelhouse to link")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-health-"))
    # busbw_ratio 0.1: the sandbox's nodes share this machine's cores (see test_health.py's
    # `four`); the bench times --deep, a slow pair on a loaded box is no finding of it.
    big = write_inventory(
        work,
        max(args.nodes, args.deep_nodes),
        prefix=args.prefix,
        subnet=args.subnet,
        cloud=True,
        health={"busbw_ratio": 0.1},
    )
    env = {**os.environ, "DDPFLEET_INVENTORY": str(big)}
    began = time.perf_counter()
    up = [*INVOKE, "sandbox.up", "--sudo", "nopasswd"]
    subprocess.run(up, env=env, check=True, capture_output=True)
    try:
        data = yaml.safe_load(big.read_text())
        print(f"sandbox of {len(data['nodes'])} nodes up in {time.perf_counter() - began:.1f} s")
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        if args.deep_nodes:  # before the stand-in: with it, nvidia-smi lists 8 GPUs that the
            # CPU torch cannot see, and --deep rightly fails each node's `cuda` row
            deep(bootstrap(data, work, env, args.deep_nodes, args.wheelhouse), args.deep_nodes)
        install_standin_sudo(big, "a100x8")
        print(f"quick checks, median of {args.repeat}, alternating ours and pdsh:")
        quick(data, work, env, args.nodes, args.repeat)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        subprocess.run([*INVOKE, "sandbox.down"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
