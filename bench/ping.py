"""Bench: `ping` and `gpu-status` against pdsh -R ssh (curve25519) on the same sandbox nodes,
in one run, in two shapes.

    .venv/bin/python bench/ping.py [--sizes 2,8,32] [--rss-nodes 64] [--repeat 5]
        [--cloud-sizes 2,8,32] [--rounds 1] [--only root|cloud] [--prefix ddpb]
        [--subnet 10.219.0.0/24] [--from-source]

Root login (a sandbox of max(sizes, rss-nodes) nodes, `--prefix`, `--subnet`): `invoke ping`
and `invoke gpu-status --json` cold (ssh.persist: 0, a handshake per node) and warm (the
connection keeper of an earlier command); then the latency of one command on an open
connection (direct and through the keeper), the peak RSS of a cold `invoke ping` and the
keeper's RSS at --rss-nodes.

The default cloud shape (a second sandbox, `--prefix`+c in the next subnet: login `ubuntu`,
passwordless sudo, root login refused): the installed command (`python -m ddpfleet`, the
console script's main(); its lean path, ddpfleet/__main__.py) warm, beside the full `invoke`
tasks warm, against `pdsh -l ubuntu` running the same node script the same way (the facts
script as ubuntu; the GPU probe through the same `sudo -n -H -- /bin/sh -c ...` line; ours adds
the node-side timeout wrapper around each). --rounds measures the cloud sizes again in the same
sandboxes; each row ends with the machine's 1-minute load average, since on a shared machine a
busy minute moves both columns.

The package's bytecode is written first (compileall), as `pip install` writes it: where
PYTHONDONTWRITEBYTECODE is set (this box, CI) every run would otherwise compile ~60 modules
from source, ~18 ms of CPU that an installed command never spends (--from-source keeps that).

Every node has the recorded-output nvidia-smi stand-in (tests/standins, 8 A100s). Whole
processes are timed alternating ours and pdsh's, so load from elsewhere hits both alike (median
of --repeat each); the sandboxes are taken down at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpfleet import inventory as inv
from ddpfleet.facts import FACTS_SCRIPT
from ddpfleet.gpu import probe_script
from ddpfleet.ssh import kept
from ddpfleet.ssh.become import Escalation
from ddpfleet.ssh.connection import connect
from tests.integration.conftest import second_subnet, write_inventory
from tests.integration.test_gpu_status import install_standin
from tests.integration.test_lean import install_standin_sudo

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
INSTALLED = [sys.executable, "-m", "ddpfleet"]  # what the `ddpfleet` console script runs


def once(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{argv[-3:]} failed: {r.stderr[-500:]}")
    return seconds


def pdsh(data: dict, command: str) -> tuple[list[str], dict]:
    """pdsh -R ssh on data's nodes as its ssh.user, host keys checked as ours are."""
    hosts = ",".join(node["host"] for node in data["nodes"].values())
    ssh = data["ssh"]
    ssh_args = (
        f"-i {ssh['key']} -o KexAlgorithms=curve25519-sha256 -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={ssh['known_hosts']}"
    )
    env = {**os.environ, "PDSH_SSH_ARGS_APPEND": ssh_args, "PDSH_RCMD_TYPE": "ssh"}
    n = str(len(data["nodes"]))
    user = ssh["user"]
    return ["pdsh", "-S", "-R", "ssh", "-l", user, "-f", n, "-w", hosts, command], env


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


def sandbox(
    directory: Path, count: int, prefix: str, subnet: str, cloud: bool, ups: list[dict]
) -> Path:
    """A sandbox of `count` nodes, up (its env added to `ups` first, for the take-down), the GPU
    stand-in on each: root login, or the cloud shape (ubuntu + passwordless sudo, the
    project's default)."""
    path = write_inventory(directory, count, prefix=prefix, subnet=subnet, cloud=cloud)
    env = {**os.environ, "DDPFLEET_INVENTORY": str(path)}
    ups.append(env)
    up = [*INVOKE, "sandbox.up"] + (["--sudo", "nopasswd"] if cloud else [])
    subprocess.run(up, env=env, check=True, capture_output=True)
    if cloud:
        install_standin_sudo(path, "a100x8")
    else:
        install_standin(path, list(yaml.safe_load(path.read_text())["nodes"]), "a100x8")
    return path


def medians(runs: dict[str, tuple[list[str], dict]], repeat: int) -> dict[str, float]:
    """Each command `repeat` times, taking turns, so load from elsewhere hits all alike."""
    t: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, (argv, env) in runs.items():
            t[k].append(once(argv, env))
    return {k: statistics.median(v) for k, v in t.items()}


def root_login(args, big: Path, work: Path, socks: list) -> None:
    """ours cold and warm, `invoke`, root login, against pdsh (the table kept since issue 18)."""
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {**os.environ, "DDPFLEET_INVENTORY": str(big)}
    data = yaml.safe_load(big.read_text())
    print(f"root login: median of {args.repeat}, alternating; ratio = ours / pdsh")
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
            runs = {"cold": (argv, cold_env), "warm": (argv, warm_env), "pdsh": pdsh(sub, script)}
            m = medians(runs, args.repeat)
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


def cloud_shape(args, big: Path, work: Path, socks: list) -> None:
    """The installed command warm (its lean path) and `invoke` warm, login ubuntu + sudo,
    against pdsh -l ubuntu running the same node script the same way."""
    env = {**os.environ, "DDPFLEET_INVENTORY": str(big), "PYTHONPATH": str(ROOT)}
    data = yaml.safe_load(big.read_text())
    sudo = Escalation("sudo", "ubuntu")  # how our gpu-status probe reaches root on these nodes
    probe = sudo.wrap(shlex.join(["sh", "-c", probe_script()]))
    print(
        f"cloud shape (login ubuntu + sudo), warm: median of {args.repeat}, alternating; "
        "ratio = ours / pdsh (target <= 1.0)"
    )
    print(
        f"{'N':>4} {'task':<11} {'ddpfleet':>8} {'invoke':>7} {'pdsh s':>7} {'ddpf':>5} {'inv':>5}"
        f" {'load':>11}"
    )
    sizes = [int(s) for s in args.cloud_sizes.split(",")]
    for n in [n for _ in range(args.rounds) for n in sizes]:
        warm_inv = part(data, n, work / f"u{n}", 60)
        warm_env = {**env, "DDPFLEET_INVENTORY": str(warm_inv)}
        sock = kept.socket_path(inv.load(warm_inv))
        if not sock.exists():  # a later round finds the keeper still warm
            socks.append((warm_up(warm_inv, warm_env), warm_env))
        sub = dict(data, nodes=dict(list(data["nodes"].items())[:n]))
        for task, script in (("ping", FACTS_SCRIPT), ("gpu-status", probe)):
            flags = ["--json"] if task == "gpu-status" else []
            runs = {
                "lean": ([*INSTALLED, task, *flags], warm_env),
                "invoke": ([*INVOKE, task, *flags], warm_env),
                "pdsh": pdsh(sub, script),
            }
            load = os.getloadavg()[0]
            m = medians(runs, args.repeat)
            print(
                f"{n:>4} {task:<11} {m['lean']:>8.3f} {m['invoke']:>7.3f} {m['pdsh']:>7.3f} "
                f"{m['lean'] / m['pdsh']:>5.2f} {m['invoke'] / m['pdsh']:>5.2f}"
                f" {load:>5.1f}-{os.getloadavg()[0]:<5.1f}"  # 1-minute load before and after
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2,8,32")
    ap.add_argument("--rss-nodes", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cloud-sizes", default="2,8,32")
    ap.add_argument("--rounds", type=int, default=1, help="cloud sizes measured this often")
    ap.add_argument("--only", choices=("root", "cloud"))
    ap.add_argument("--prefix", default="ddpb")
    ap.add_argument("--subnet", default="10.219.0.0/24")
    ap.add_argument("--from-source", action="store_true", help="no bytecode written first")
    args = ap.parse_args()
    if not args.from_source:
        compile_all = [sys.executable, "-m", "compileall", "-q", str(ROOT / "ddpfleet")]
        subprocess.run(compile_all, check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="ddpfleet-bench-"))
    socks: list[tuple[Path, dict]] = []
    shapes = [
        ("root", max(*map(int, args.sizes.split(",")), args.rss_nodes), root_login),
        ("cloud", max(map(int, args.cloud_sizes.split(","))), cloud_shape),
    ]
    ups: list[dict] = []
    try:
        for name, count, measure in shapes:
            if args.only not in (None, name):
                continue
            cloud = name == "cloud"
            directory = work / name
            directory.mkdir()
            prefix = args.prefix + ("c" if cloud else "")
            subnet = second_subnet(args.subnet) if cloud else args.subnet
            big = sandbox(directory, count, prefix, subnet, cloud, ups)
            measure(args, big, work, socks)
            print()
    finally:
        for _, warm_env in socks:
            subprocess.run([*INVOKE, "disconnect"], env=warm_env, capture_output=True)
        for env in ups:
            subprocess.run([*INVOKE, "sandbox.down"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
