"""Bench: `invoke ping` and `invoke gpu-status` against pdsh -R ssh (curve25519) on the same
sandbox nodes, cold (ssh.persist: 0, a handshake per node) and warm (the connection keeper of
an earlier command), in one run.

    .venv/bin/python bench/ping.py [--sizes 2,8,32] [--rss-nodes 64] [--repeat 5]

Brings up its own sandbox (prefix ddpb, 10.219.0.0/24) with max(sizes, rss-nodes) nodes and the
recorded-output nvidia-smi stand-in (tests/standins, 8 A100s) on each, times whole processes
alternating ours and pdsh's so load from elsewhere hits both alike (median of --repeat each),
prints the ratios, then the latency of one command on an open connection (direct and through
the keeper), the peak RSS of a cold `invoke ping` and the keeper's RSS at --rss-nodes, and takes
the sandbox down again. pdsh runs exactly what ours runs on a node (the facts script; the GPU
probe).
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpfleet import inventory as inv  # noqa: E402
from ddpfleet.facts import FACTS_SCRIPT  # noqa: E402
from ddpfleet.gpu import probe_script  # noqa: E402
from ddpfleet.ssh import kept
from ddpfleet.ssh.connection import connect
from tests.integration.conftest import write_inventory  # noqa: E402
from tests.integration.test_gpu_status import install_standin  # noqa: E402

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def once(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{argv[-3:]} failed: {r.stderr[-500:]}")
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


def part(data: dict, n: int, directory: Path, persist: int) -> Path:
    """The first n nodes of the big inventory, with ssh.persist set."""
    directory.mkdir(exist_ok=True)
    small = dict(data, nodes=dict(list(data["nodes"].items())[:n]))
    small["ssh"] = dict(data["ssh"], persist=persist)
    path = directory / "inventory.yaml"
    path.write_text(yaml.safe_dump(small, sort_keys=False))
    return path


def warm_up(inventory: Path, env: dict) -> Path:
    """One command that starts the keeper, then a wait for its socket (and its connections)."""
    once([*INVOKE, "ping"], env)
    sock = kept.socket_path(inv.load(inventory))
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the keeper did not start")
        time.sleep(0.05)
    once([*INVOKE, "ping"], env)  # the keeper's own handshakes
    return sock


def per_command_ms(inventory: Path, sock: Path) -> tuple[float, float]:
    node = inv.load(inventory).nodes[0]
    conn = connect(node)
    direct, through = [], []
    try:
        for _ in range(20):
            start = time.perf_counter()
            conn.run("true")
            direct.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            kept.KeptConn(sock, node).run("true")
            through.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()
    return statistics.median(direct), statistics.median(through)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2,8,32")
    ap.add_argument("--rss-nodes", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-"))
    big = write_inventory(work, max(*sizes, args.rss_nodes), prefix="ddpb", subnet="10.219.0.0/24")
    env = {**os.environ, "DDPFLEET_INVENTORY": str(big)}
    subprocess.run([*INVOKE, "sandbox.up"], env=env, check=True, capture_output=True)
    socks: list[tuple[Path, dict]] = []
    try:
        data = yaml.safe_load(big.read_text())
        install_standin(big, list(data["nodes"]), "a100x8")
        print(f"median of {args.repeat}, alternating; ratio = ours / pdsh (target <= 1.0 warm)")
        print(
            f"{'N':>4} {'task':<11} {'cold s':>7} {'warm s':>7} {'pdsh s':>7} {'cold':>5} {'warm':>5}"
        )
        for n in sizes:
            cold_env = {**env, "DDPFLEET_INVENTORY": str(part(data, n, work / f"c{n}", 0))}
            warm_inv = part(data, n, work / f"w{n}", 60)
            warm_env = {**env, "DDPFLEET_INVENTORY": str(warm_inv)}
            socks.append((warm_up(warm_inv, warm_env), warm_env))
            sub = dict(data, nodes=dict(list(data["nodes"].items())[:n]))
            for task, script in (("ping", FACTS_SCRIPT), ("gpu-status", probe_script())):
                argv = [*INVOKE, task] + (["--json"] if task == "gpu-status" else [])
                p_argv, p_env = pdsh(sub, script)
                t = {"cold": [], "warm": [], "pdsh": []}
                for _ in range(args.repeat):
                    t["cold"].append(once(argv, cold_env))
                    t["warm"].append(once(argv, warm_env))
                    t["pdsh"].append(once(p_argv, p_env))
                m = {k: statistics.median(v) for k, v in t.items()}
                print(
                    f"{n:>4} {task:<11} {m['cold']:>7.3f} {m['warm']:>7.3f} {m['pdsh']:>7.3f} "
                    f"{m['cold'] / m['pdsh']:>5.2f} {m['warm'] / m['pdsh']:>5.2f}"
                )
        direct, through = per_command_ms(warm_inv, socks[-1][0])
        print(f"per command on an open connection: {direct:.2f} ms direct, {through:.2f} ms kept")
        n = args.rss_nodes
        cold_env = {**env, "DDPFLEET_INVENTORY": str(part(data, n, work / f"c{n}", 0))}
        timed = subprocess.run(
            ["/usr/bin/time", "-f", "%M", *INVOKE, "ping"], env=cold_env, capture_output=True
        )
        peak_kb = int(timed.stderr.decode().split()[-1])
        warm_inv = part(data, n, work / f"w{n}", 60)
        warm_env = {**env, "DDPFLEET_INVENTORY": str(warm_inv)}
        sock = warm_up(warm_inv, warm_env)
        socks.append((sock, warm_env))
        pid = kept.ask(sock, {"op": "stats"})["pid"]
        print(
            f"RSS at {n} nodes: cold invoke ping peak {peak_kb / 1024:.0f} MB, "
            f"keeper {rss_mb(pid):.0f} MB (target <= 150 MB)"
        )
    finally:
        for _, warm_env in socks:
            subprocess.run([*INVOKE, "disconnect"], env=warm_env, capture_output=True)
        subprocess.run([*INVOKE, "sandbox.down"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
