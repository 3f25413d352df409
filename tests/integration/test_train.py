"""`invoke train` on real sandbox nodes with the real torch CPU wheel and gloo.

What a user would check: the exit code and its message, the lines on the terminal, the files
under logs/<run-id>/, and `/proc/*/environ` on every node for the run's DDPFLEET_RUN_ID (every
process of a run carries it, so nothing of the run is missed and nothing else is counted).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import HERMETIC, INVOKE, ROOT, Cluster

NODES = ("node0", "node1")
SHORT = "--epochs 2 --steps-per-epoch 4 --batch-size 8"
LONG = "--epochs 100 --steps-per-epoch 100 --step-sleep 0.1"


# Each node's env spec hash right after `ready` bootstrapped it, per inventory (a session's).
MADE: dict[Path, dict[str, str]] = {}


def env_hashes(cluster: Cluster) -> dict[str, str]:
    """venv_env's record of the spec it installed and verified, per node ('' where none)."""
    spec = f"{cluster.data['python_env']['path']}/.ddpfleet-spec.sha256"
    return {n: cluster.ssh(n, f"cat {spec} 2>/dev/null").stdout.strip() for n in NODES}


@pytest.fixture(scope="module")
def ready(cluster: Cluster) -> Cluster:
    """The nodes' training env (venv + torch through the wheelhouse), as bootstrap makes it.

    The first module of a session to ask bootstraps it; a later one again only where a node's
    env is not the one made then (removed, or remade with another spec, as test_venv_bootstrap
    does): a converged bootstrap per module cost an invoke, SSH and a probe per node."""
    if not MADE.get(cluster.inventory) or MADE[cluster.inventory] != env_hashes(cluster):
        r = cluster.invoke("bootstrap", "--roles", "venv_env", timeout=1800)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        made = env_hashes(cluster)
        assert all(made.values()), f"bootstrap left no env spec hash on a node: {made}"
        MADE[cluster.inventory] = made
    return cluster


def new_run_id(what: str) -> str:
    return f"t-{what}-{uuid.uuid4().hex[:8]}"


def train_args(run_id: str, script_args: str, *extra: str) -> list[str]:
    return [
        "train",
        "--project-dir",
        str(ROOT),
        "--nproc-per-node",
        "2",
        "--run-id",
        run_id,
        "--args",
        script_args,
        *extra,
    ]


def run_pids(cluster: Cluster, node: str, run_id: str) -> list[str]:
    """Processes on the node whose environment holds this run's id."""
    out = cluster.ssh(
        node, f"grep -l -a -s -e 'DDPFLEET_RUN_ID={run_id}' /proc/[0-9]*/environ || true"
    ).stdout
    return [line.split("/")[2] for line in out.split()]


def ps(cluster: Cluster, node: str) -> str:
    return cluster.ssh(node, "ps -eo pid,pgid,sid,stat,args | cut -c1-160").stdout


def wait_gone(
    cluster: Cluster, run_id: str, since: float, within: float, nodes: tuple[str, ...] = NODES
) -> float:
    """Seconds from `since` until no process of the run is left on any of the nodes."""
    while True:
        left = {n: run_pids(cluster, n, run_id) for n in nodes}
        now = time.monotonic()
        if not any(left.values()):
            return now - since
        if now - since > within:
            pytest.fail(
                f"processes of {run_id} still there {within}s on: {left}\n"
                + "\n".join(ps(cluster, n) for n in nodes)
            )
        time.sleep(0.3)


class Live:
    """`invoke train` as a user runs it in a terminal: lines read as they come, timestamped."""

    def __init__(self, cluster: Cluster, args: list[str]):
        self.proc = subprocess.Popen(
            [*INVOKE, *args],
            cwd=cluster.dir,
            env=cluster.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> float:
        """Monotonic time the count-th line matching pattern arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [t for t, line in list(self.lines) if re.search(pattern, line)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.1)
        pytest.fail(f"no {count} x {pattern!r} in time; output:\n{self.text[-4000:]}")

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def test_two_nodes_train_to_the_same_checksum(ready: Cluster):
    run_id = new_run_id("ok")
    before = {n: ready.logins(n) for n in NODES}
    r = ready.invoke(*train_args(run_id, SHORT), timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = r.stdout
    # The plan came first: the exact command once, each node's rank in a short table.
    plan = out[: out.index("first step")]
    assert "--node-rank {node_rank}" in plan and "--node-rank 1" not in plan
    assert re.search(r"\bnode1\b\W+[\d.]+\W+1\b", plan), plan
    checksums = dict(re.findall(r"^\[node\d r(\d)\] rank \1 checksum (\S+)$", out, re.MULTILINE))
    assert sorted(checksums) == ["0", "1", "2", "3"], out[-3000:]
    assert len(set(checksums.values())) == 1, checksums  # the gradients really were averaged
    for rank, node in enumerate(("node0", "node0", "node1", "node1")):
        assert f"[{node} r{rank}] rank {rank}/4: first step" in out
    assert re.search(r"^\[node0 r0\] epoch 2 loss ", out, re.MULTILINE)
    assert "node0: ok (exit 0" in out and "node1: ok (exit 0" in out
    logs = ready.dir / "logs" / run_id
    names = {p.name for p in logs.iterdir()}
    assert {"node0.log", "node1.log"} <= names
    for rank, node in enumerate(("node0", "node0", "node1", "node1")):
        assert f"{node}-rank{rank}.stdout.log" in names, names
        assert f"{node}-rank{rank}.stderr.log" in names, names
    assert f"rank 3 checksum {checksums['3']}" in (logs / "node1-rank3.stdout.log").read_text()
    assert "[node1 r3] rank 3 checksum" in (logs / "node1.log").read_text()
    # One SSH login per node for the whole run: probe, sync, checks, runner and logs share it
    # (the other login in between is the `after` query itself).
    after = {n: ready.logins(n) for n in NODES}
    assert {n: after[n] - before[n] - 1 for n in NODES} == {"node0": 1, "node1": 1}
    assert not any(run_pids(ready, n, run_id) for n in NODES)


def test_rank_failure_on_node1_stops_every_node(ready: Cluster):
    run_id = new_run_id("fail")
    live = Live(ready, train_args(run_id, f"{LONG} --fail-at-step 8 --fail-rank 3"))
    crashed = live.wait_for(r"injected failure at step")
    code = live.finish()
    assert code != 0
    # rank 3 raised; its exit code is 1, or SIGTERM when torchrun stopped it mid-teardown
    assert "error: training failed: node1 rank 3 failed first (" in live.text, live.text
    assert "injected failure" in live.text.split("error: training failed")[1]
    gone = wait_gone(ready, run_id, crashed, within=15)
    print(f"crash -> last process gone: {gone:.2f}s")


def test_a_crash_reads_as_its_traceback_and_a_line_per_stopped_rank(ready: Cluster):
    """Issue 24 item 9: ~190 lines of the healthy ranks' tracebacks buried the one that
    mattered, and the last lines of the failed rank came squashed into one line."""
    run_id = new_run_id("reads")
    r = ready.invoke(*train_args(run_id, f"{LONG} --fail-at-step 8 --fail-rank 3"), timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    error = r.stderr.strip().splitlines()
    assert error[0].startswith("error: training failed: node1 rank 3 failed first ("), error
    assert error[0].endswith("Last lines of node1 rank 3:"), error
    block = error[1:]  # the rank's last lines, one per line, indented (torch prefixes [rank3]:)
    assert len(block) > 2 and all(line.startswith("    ") for line in block), error
    assert any("RuntimeError: rank 3: injected failure at step 8" in line for line in block), error
    stopping = "ddpfleet: node1 failed: stopping every node"
    assert stopping in r.stdout, r.stdout[-3000:]
    after = r.stdout.split(stopping, 1)[1].splitlines()
    noisy = [
        line
        for line in after
        if line.startswith("[node0") and "ddpfleet:" not in line and "first failure:" not in line
    ]
    assert noisy == [], r.stdout[-5000:]
    summaries = [line for line in after if "after the first failure:" in line]
    assert all(line.endswith(f"logs/{run_id}/{line[1:6]}.log") for line in summaries), summaries
    assert "Traceback" in (ready.dir / "logs" / run_id / "node0.log").read_text()  # kept there


def test_a_syntax_error_keeps_its_caret_under_the_column(ready: Cluster, tmp_path: Path):
    (tmp_path / "bad.py").write_text("import sys\n\ndef main(:\n    pass\n")
    run_id = new_run_id("syntax")
    args = ["train", "--project-dir", str(tmp_path), "--script", "bad.py", "--run-id", run_id,
            "--nproc-per-node", "1"]  # fmt: skip
    r = ready.invoke(*args, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    error = r.stderr.rstrip().splitlines()
    assert re.match(r"error: training failed: node\d rank \d failed first", error[0]), error
    code = next(i for i, line in enumerate(error) if line.strip() == "def main(:")
    assert error[code + 1].strip() == "^", error
    assert error[code + 1].index("^") == error[code].index("(") + 1, error  # under the column
    assert error[code + 2].strip().startswith("SyntaxError: "), error


def test_interrupt_stops_every_node(ready: Cluster):
    run_id = new_run_id("int")
    live = Live(ready, train_args(run_id, LONG))
    live.wait_for(r"\] rank \d/4: first step", count=4)
    sent = time.monotonic()
    live.proc.send_signal(signal.SIGINT)
    code = live.finish(timeout=60)
    assert code != 0
    assert "interrupted: stopping every node" in live.text
    assert "node0: stopped" in live.text and "node1: stopped" in live.text
    gone = wait_gone(ready, run_id, sent, within=15)
    print(f"SIGINT -> last process gone: {gone:.2f}s")


def test_killed_controller_takes_the_run_with_it(ready: Cluster):
    run_id = new_run_id("kill")
    live = Live(ready, train_args(run_id, LONG))
    live.wait_for(r"\] rank \d/4: first step", count=4)
    killed = time.monotonic()
    live.proc.kill()  # SIGKILL: no handler runs, only the kernel closes the TCP connections
    live.finish(timeout=30)
    gone = wait_gone(ready, run_id, killed, within=60)
    print(f"controller SIGKILL -> last process gone: {gone:.2f}s")


def _ssh_argv(cluster: Cluster, node: str, command: str) -> list[str]:
    d = cluster.data
    return [
        "ssh",
        *HERMETIC,
        "-i",
        d["ssh"]["key"],
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={d['ssh']['known_hosts']}",
        f"root@{cluster.address(node)}",
        command,
    ]


def test_master_port_taken_is_refused_before_launch(ready: Cluster):
    port = 29731
    holder = subprocess.Popen(
        _ssh_argv(
            ready,
            "node0",
            'exec python3 -c "import socket,sys; s=socket.socket(); '
            f"s.bind(('0.0.0.0',{port})); s.listen(); print('bound', flush=True); "
            'sys.stdin.read()"',
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "bound"
        run_id = new_run_id("port")
        r = ready.invoke(*train_args(run_id, SHORT, "--master-port", str(port)), timeout=120)
        assert r.returncode == 1
        assert f"node0: master port {port} is not free (Address already in use)" in r.stderr
        assert "nothing was started" in r.stderr
        assert "first step" not in r.stdout
        assert not any(run_pids(ready, n, run_id) for n in NODES)
    finally:
        holder.stdin.close()  # the holder reads stdin to EOF, then exits
        holder.wait(timeout=30)


def test_differing_torch_is_refused_naming_both_versions(ready: Cluster, tmp_path: Path):
    # A venv on node1 whose torch is a stand-in reporting another version.
    fake = "/opt/ddpfleet-standin-env"
    made = ready.ssh(
        "node1",
        f"rm -rf {fake} && python3 -m venv --without-pip {fake} && "
        f"d=$({fake}/bin/python -c "
        "'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')"
        " && mkdir -p $d/torch && touch $d/torch/__init__.py && "
        "echo \"__version__ = '2.0.0+standin'\" > $d/torch/version.py",
    )
    assert made.returncode == 0, made.stderr
    real = ready.ssh(
        "node0",
        "/opt/ddpfleet/venv/bin/python -c 'import torch.version as v; print(v.__version__)'",
    ).stdout.strip()
    data = ready.data
    data["nodes"]["node1"]["vars"] = {"venv_env_path": fake}
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    run_id = new_run_id("torch")
    try:
        r = ready.invoke(*train_args(run_id, SHORT), inventory=inventory, timeout=120)
    finally:
        ready.ssh("node1", f"rm -rf {fake}")
    assert r.returncode == 1
    assert "torch versions differ between nodes" in r.stderr
    assert f"{real} on node0" in r.stderr and "2.0.0+standin on node1" in r.stderr
    assert "nothing was started" in r.stderr
    assert not any(run_pids(ready, n, run_id) for n in NODES)


def test_lost_node_stops_the_others(ready: Cluster):
    run_id = new_run_id("lost")
    live = Live(ready, train_args(run_id, LONG))
    live.wait_for(r"\] rank \d/4: first step", count=4)
    lost = time.monotonic()
    stop = ready.invoke("sandbox.stop", "--nodes", "node1", timeout=120)  # every process in it
    try:
        assert stop.returncode == 0, stop.stderr
        code = live.finish(timeout=60)
        assert code != 0
        assert "ddpfleet: node1 lost its connection: stopping every node" in live.text
        assert "error: training failed: node1 failed first (its connection dropped)" in live.text
        gone = wait_gone(ready, run_id, lost, within=15, nodes=("node0",))
        print(f"node1 lost -> node0's last process gone: {gone:.2f}s")
    finally:
        start = ready.invoke("sandbox.start", "--nodes", "node1", timeout=300)
        assert start.returncode == 0, start.stderr
