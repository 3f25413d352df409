"""The launch plan is pure: the resolved config + per-node facts in, exact torchrun argv out."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from ddpfleet import inventory as inv
from ddpfleet import launch
from ddpfleet.errors import PlanError
from ddpfleet.launch import NodeFacts, Outcome, TrainFlags
from ddpfleet.launch.verdict import RunState

PY = "/opt/ddpfleet/venv/bin/python"
NODES = """\
nodes:
  node0: {host: 10.0.0.10}
  node1: {host: 10.0.0.11}
  node2: {host: 10.0.0.12}
"""


def load(tmp_path, text: str = NODES, head: str = "cluster: {name: demo}\n") -> inv.Inventory:
    p = tmp_path / "inventory.yaml"
    p.write_text(head + textwrap.dedent(text))
    return inv.load(p, check_files=False)


def facts(name: str, **kw) -> NodeFacts:
    ip = {"node0": "10.0.0.10", "node1": "10.0.0.11", "node2": "10.0.0.12"}[name]
    base = {
        "python": PY,
        "home": "/root",
        "ssh_host": ip,
        "torch": "2.13.0+cpu",
        "addrs": {"lo": ("127.0.0.1",), "eth0": (ip,)},
        "master_resolved": "10.0.0.10",
        "route_dev": "eth0",
    }
    return NodeFacts(**{**base, **kw})


def all_facts(**kw) -> dict[str, NodeFacts]:
    return {n: facts(n, **kw) for n in ("node0", "node1", "node2")}


HERE = launch.project_key(Path(".").resolve())  # the default project dir's name on the nodes


def config(inventory: inv.Inventory, **flags) -> launch.TrainConfig:
    return launch.resolve(inventory, TrainFlags(**{"run_id": "r1", **flags}), Path("/logs"))


def plan(inventory: inv.Inventory, facts: dict[str, NodeFacts], **flags) -> launch.Plan:
    return launch.plan(config(inventory, **flags), facts)


def test_flags_are_resolved_once_into_a_frozen_config(tmp_path):
    i = load(tmp_path, NODES.replace("10.0.0.12}", "10.0.0.12, gpus: 2}"))
    c = config(
        i,
        nodes=("node2", "node0"),
        master_port="31000",
        env=("A=1",),
        args="--name 'a b'",
        project_dir=tmp_path,
    )
    assert c.order == ("node2", "node0") and c.master == "node2" and c.port == 31000
    assert c.args == ("--name", "a b") and c.env == (("A", "1"),) and c.nproc is None
    assert not c.count_gpus("node2") and c.count_gpus("node0")  # node2's inventory says 2
    # One code dir per project (issue 24 item 6): the project dir's name and a hash of its path.
    assert c.code_dir == f"~/ddpfleet/demo/{launch.project_key(tmp_path.resolve())}/code"
    assert c.remote_logs == "~/ddpfleet/demo/runs"
    assert c.run_dir == Path("/logs/r1") and c.project_dir == tmp_path.resolve()
    assert c.python["node0"].endswith("/bin/python") and c.hosts["node2"] == "10.0.0.12"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"master_port": "99999"}, "--master-port '99999': use a port from 1 to 65535"),
        ({"master_port": "http"}, "--master-port 'http'"),
        ({"args": "--name 'unclosed"}, '--args "--name \'unclosed": No closing quotation'),
        ({"nproc_per_node": "0"}, "--nproc-per-node '0'"),
        ({"env": ("1A=2",)}, "--env '1A=2'"),
        ({"run_id": "../x"}, "--run-id '../x'"),
        ({"code_dir": "~/{user}"}, "--code-dir: give a path"),
        ({"nodes": ("node0", "node1")}, "put node1 first"),
    ],
)
def test_every_flag_mistake_is_refused_before_any_connection(tmp_path, flags, message):
    i = load(tmp_path, head="cluster: {name: demo, master: node1}\n")
    with pytest.raises(PlanError) as e:
        config(i, **flags)
    assert message in str(e.value)


def test_argv_is_exact_and_ranks_follow_nodes_order(tmp_path):
    p = plan(load(tmp_path), all_facts(), nodes=("node1", "node0"), args="--epochs 2")
    assert [(n.node, n.rank) for n in p.nodes] == [("node1", 0), ("node0", 1)]
    assert p.master == "node1" and p.master_addr == "10.0.0.11" and p.master_port == 29500
    assert p.nodes[1].argv == (
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.11",
        "--master-port",
        "29500",
        "--nproc-per-node",
        "1",
        "--rdzv-id",
        "r1",
        "--log-dir",
        "/root/ddpfleet/demo/runs/r1",
        "--tee",
        "3",
        "scripts/train_ddp.py",
        "--epochs",
        "2",
    )
    assert p.nodes[0].cwd == f"/root/ddpfleet/demo/{HERE}/code"


def test_default_order_is_inventory_order_with_the_master_first(tmp_path):
    i = load(tmp_path, head="cluster: {name: demo, master: node2}\n")
    p = plan(i, all_facts())
    assert [n.node for n in p.nodes] == ["node2", "node0", "node1"]
    assert p.master_addr == "10.0.0.12"


def test_explicit_master_not_first_in_nodes_is_refused(tmp_path):
    i = load(tmp_path, head="cluster: {name: demo, master: node1}\n")
    with pytest.raises(PlanError, match="put node1 first"):
        plan(i, all_facts(), nodes=("node0", "node1"))


def test_master_port_flag_beats_inventory(tmp_path):
    i = load(tmp_path, head="cluster: {name: demo, master_port: 29600}\n")
    assert plan(i, all_facts()).master_port == 29600
    p = plan(i, all_facts(), master_port=31000)
    assert p.master_port == 31000 and "31000" in p.nodes[1].argv


def test_master_name_is_resolved_by_a_worker_not_by_the_master(tmp_path):
    f = all_facts()
    # The master resolves its own name to Debian's 127.0.1.1; the workers see its real address.
    f["node0"] = facts("node0", ssh_host="gpu-a", master_resolved="127.0.1.1")
    for w in ("node1", "node2"):
        f[w] = facts(w, master_resolved="10.0.0.10")
    p = plan(load(tmp_path), f)
    assert p.master_addr == "10.0.0.10"
    assert p.nodes[0].env["GLOO_SOCKET_IFNAME"] == "eth0"


def test_unresolvable_master_name_is_refused(tmp_path):
    f = {n: facts(n, master_resolved=None) for n in ("node0", "node1")}
    f["node0"] = facts("node0", ssh_host="gpu-a", master_resolved=None)
    with pytest.raises(PlanError, match="node1: cannot resolve the master's host 'gpu-a'"):
        plan(load(tmp_path), f, nodes=("node0", "node1"))


def test_env_has_run_id_threads_and_socket_interfaces(tmp_path):
    f = all_facts()
    f["node1"] = facts("node1", route_dev="ib0")
    f["node2"] = facts("node2", route_dev=None)
    p = plan(load(tmp_path), f, env=("NCCL_DEBUG=INFO", "OMP_NUM_THREADS=4"))
    e0, e1, e2 = (n.env for n in p.nodes)
    assert e0["DDPFLEET_RUN_ID"] == "r1" and e0["PYTHONUNBUFFERED"] == "1"
    assert e0["GLOO_SOCKET_IFNAME"] == "eth0" and e0["NCCL_SOCKET_IFNAME"] == "=eth0"
    assert e1["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "GLOO_SOCKET_IFNAME" not in e2  # unknown: left to gloo/NCCL
    assert e0["NCCL_DEBUG"] == "INFO" and e0["OMP_NUM_THREADS"] == "4"


def test_omp_threads_default_is_one(tmp_path):
    assert plan(load(tmp_path), all_facts()).nodes[0].env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(
    ("inventory_gpus", "probed", "expected"),
    [
        ("", {"node0": 4, "node1": 4, "node2": 4}, 4),  # nvidia-smi counts
        ("", {"node0": 0, "node1": 0, "node2": 0}, 1),  # no GPUs: one process
        ("gpus: 8", {"node0": 2, "node1": 2, "node2": 2}, 8),  # inventory wins over the probe
    ],
)
def test_auto_nproc(tmp_path, inventory_gpus, probed, expected):
    text = NODES.replace("}", f", {inventory_gpus}}}" if inventory_gpus else "}")
    f = {n: facts(n, gpus=g) for n, g in probed.items()}
    p = plan(load(tmp_path, text), f)
    assert p.nproc == expected and f"{expected}" == p.nodes[0].argv[12]


def test_unequal_gpu_counts_are_refused(tmp_path):
    f = {
        "node0": facts("node0", gpus=8),
        "node1": facts("node1", gpus=4),
        "node2": facts("node2", gpus=8),
    }
    with pytest.raises(PlanError, match=r"different GPU counts \(node0: 8, node1: 4, node2: 8\)"):
        plan(load(tmp_path), f)


def test_explicit_nproc(tmp_path):
    assert plan(load(tmp_path), all_facts(), nproc_per_node="2").nproc == 2
    with pytest.raises(PlanError, match="--nproc-per-node 'zero'"):
        plan(load(tmp_path), all_facts(), nproc_per_node="zero")


def test_env_flag_parsing():
    assert launch.parse_env(["A=1", "B=x=y", "C="]) == (("A", "1"), ("B", "x=y"), ("C", ""))
    for bad in ("A", "1A=2", "A B=1", "DDPFLEET_RUN_ID=x"):
        with pytest.raises(PlanError):
            launch.parse_env([bad])


def test_run_id_must_be_safe_in_paths():
    assert launch.check_run_id("exp-1.a_b") == "exp-1.a_b"
    for bad in ("../x", "a/b", "", "-x", "a b"):
        with pytest.raises(PlanError):
            launch.check_run_id(bad)


def test_versions_must_match_and_name_both():
    f = all_facts()
    assert launch.check_versions(f) == []
    f["node1"] = facts("node1", torch="2.0.0+fake")
    (line,) = launch.check_versions(f)
    assert "torch versions differ" in line
    assert "2.13.0+cpu on node0, node2" in line and "2.0.0+fake on node1" in line
    f["node2"] = facts("node2", torch=None)
    assert launch.check_versions(f) == [
        f"node2: torch is not installed in {PY}'s env; run invoke bootstrap"
    ]


def test_cuda_and_nccl_versions_compared_too():
    f = {
        "node0": facts("node0", cuda="11.8", nccl="2.21.5"),
        "node1": facts("node1", cuda="12.1", nccl="2.21.5"),
    }
    (line,) = launch.check_versions(f)
    assert line.startswith("cuda versions differ") and "12.1 on node1" in line


def shown(p: launch.Plan, user_env=()) -> list[str]:
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(launch.render_plan(p, user_env))
    return [line.rstrip() for line in console.export_text().splitlines()]


def cells(lines: list[str], first: str) -> list[str]:
    """The words of the table row whose first cell is `first`, whatever the borders."""
    for line in lines:
        words = [w for w in line.split() if w.strip("│┃|")]
        if words and words[0] == first:
            return words
    raise AssertionError(f"no row {first!r} in {lines}")


def test_plan_shows_the_command_once_and_what_differs_per_node(tmp_path):
    c = config(load(tmp_path), env=("WANDB_API_KEY=s3cret", "NCCL_DEBUG=INFO"))
    lines = shown(launch.plan(c, all_facts()), c.env)
    text = "\n".join(lines)
    assert "s3cret" not in text and "WANDB_API_KEY=***" in text and "NCCL_DEBUG=INFO" in text
    (command,) = [line for line in lines if line.startswith("command: ")]
    assert command == (
        f"command: {PY} -m torch.distributed.run --nnodes 3 --node-rank "
        "{node_rank} --master-addr 10.0.0.10 --master-port 29500 "
        "--nproc-per-node 1 --rdzv-id r1 --log-dir /root/ddpfleet/demo/runs/r1 "
        "--tee 3 scripts/train_ddp.py"
    )
    assert cells(lines, "node") == ["node", "host", "node_rank"]
    assert cells(lines, "node2") == ["node2", "10.0.0.12", "2"]
    assert (
        f"cwd: /root/ddpfleet/demo/{HERE}/code" in lines
        and text.count("torch.distributed.run") == 1
    )


def test_what_only_some_nodes_have_becomes_a_column(tmp_path):
    f = all_facts()
    f["node1"] = facts("node1", home="/home/ubuntu", route_dev="ib0")
    f["node2"] = facts("node2", route_dev=None)
    lines = shown(launch.plan(config(load(tmp_path)), f))
    assert cells(lines, "node") == [
        "node",
        "host",
        "node_rank",
        "log_dir",
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
        "cwd",
    ]
    home = "/home/ubuntu/ddpfleet/demo"
    assert cells(lines, "node1") == [
        "node1",
        "10.0.0.11",
        "1",
        f"{home}/runs/r1",
        "ib0",
        "=ib0",
        f"{home}/{HERE}/code",
    ]
    assert cells(lines, "node2")[4:6] == ["(unset)", "(unset)"]
    assert any("--log-dir {log_dir}" in line for line in lines)
    assert not any(line.startswith("cwd:") for line in lines)


def test_every_node_gets_the_runs_checkpoint_dir_outside_the_code_dir(tmp_path):
    p = plan(load(tmp_path), all_facts())
    assert {n.env["DDPFLEET_CHECKPOINT_DIR"] for n in p.nodes} == {
        "/var/lib/ddpfleet/runs/r1/checkpoints"
    }
    assert {n.checkpoint_dir for n in p.nodes} == {"/var/lib/ddpfleet/runs/r1/checkpoints"}
    lines = shown(p)
    assert "checkpoints: /var/lib/ddpfleet/runs/r1/checkpoints (DDPFLEET_CHECKPOINT_DIR)" in lines
    (env,) = [line for line in lines if line.startswith("env: ")]
    assert "DDPFLEET_CHECKPOINT_DIR" not in env  # its own line, once


def test_a_detached_plan_shows_the_directory_the_ranks_really_run_in(tmp_path):
    """Issue 24 item 2: the plan printed the code dir while the ranks ran in the run's copy."""
    p = plan(load(tmp_path), all_facts(), snapshot=True)
    assert {n.cwd for n in p.nodes} == {"/var/lib/ddpfleet/runs/r1/code"}
    assert {n.mirror for n in p.nodes} == {f"/root/ddpfleet/demo/{HERE}/code"}  # the sync fills
    assert "cwd: /var/lib/ddpfleet/runs/r1/code" in shown(p)
    attached = plan(load(tmp_path), all_facts())
    assert attached.nodes[0].cwd == attached.nodes[0].mirror == f"/root/ddpfleet/demo/{HERE}/code"


def test_spares_are_listed_as_spares_not_as_rows_with_node_rank_3_and_up(tmp_path):
    """A detached run plans its spares with the gang (checked and synced alike), but a spare has
    no rank until it takes a lost node's place: not a table row, not in --nnodes."""
    c = dataclasses.replace(config(load(tmp_path)), spares=("node1",))
    p = launch.plan(c, all_facts())
    assert p.spares == ("node1",) and p.nnodes == 2
    assert [(n.node, n.rank) for n in p.gang] == [("node0", 0), ("node2", 1)]
    assert {n.argv[n.argv.index("--nnodes") + 1] for n in p.nodes} == {"2"}
    lines = shown(p)
    text = "\n".join(lines)
    assert lines[0].startswith("run r1: 2 node(s) x 1 process(es)")
    assert cells(lines, "node2") == ["node2", "10.0.0.12", "1"]
    with pytest.raises(AssertionError):
        cells(lines, "node1")
    assert "spares: node1 at 10.0.0.11 (standing by, no ranks: one takes a lost node's " in text
    assert "--nnodes 2 " in text
    assert not any(line.startswith("spares:") for line in shown(plan(load(tmp_path), all_facts())))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[default0]:rank 0/4: first step", (2, "rank 0/4: first step")),
        (
            "[default1]:Traceback (most recent call last):",
            (3, "Traceback (most recent call last):"),
        ),
        (
            "W0101 torchrun warning [default0]: not a prefix",
            (None, "W0101 torchrun warning [default0]: not a prefix"),
        ),
    ],
)
def test_rank_prefix_becomes_the_global_rank(line, expected):
    assert launch.split_rank(line, node_rank=1, nproc=2) == expected


def test_rank_log_names():
    node = launch.NodePlan("node1", 1, "h", (), {}, "/c", "/l")
    assert (
        launch.local_log_name(node, 2, "r1_ab/attempt_0/1/stderr.log") == "node1-rank3.stderr.log"
    )
    assert (
        launch.local_log_name(node, 2, "r1_ab/attempt_2/0/stdout.log")
        == "node1-rank2.attempt2.stdout.log"
    )
    assert (
        launch.local_log_name(node, 2, "r1_ab/attempt_0/filtered_stdout.log")
        == "node1-filtered_stdout.log"
    )


def test_first_failure_is_the_earliest_evidence_not_the_first_exit():
    # node1's rank raised (traceback at t=1.0) but its torchrun exited after node0's, whose
    # ranks only failed because node1's rank was gone (traceback at t=1.2).
    node0 = Outcome("node0", state=RunState.FAILED, exit_code=1, rank=0, evidence_at=1.2)
    node1 = Outcome("node1", state=RunState.FAILED, exit_code=1, rank=3, evidence_at=1.0)
    assert launch.first_failure([node0, node1]) is node1
    assert (
        launch.first_failure(
            [Outcome("node0", state=RunState.SUCCEEDED), Outcome("node1", state=RunState.STOPPED)]
        )
        is None
    )
    msg = launch.failure_message(node1, [node0, node1])
    assert msg.startswith("training failed: node1 rank 3 failed first (exit 1); node0 failed")
    # heard of first, but its rank only lost a peer: the other node is the cause
    peer = ("RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer",)
    node0 = Outcome(
        "node0", state=RunState.FAILED, exit_code=1, rank=0, evidence_at=0.9, last_lines=peer
    )
    assert launch.first_failure([node0, node1]) is node1


NODE1_FAILURE = """\
[default1]:[rank3]: Traceback (most recent call last):
[default1]:[rank3]: RuntimeError: rank 3: injected failure at step 10 (--fail-at-step)
[default0]:[rank2]: Traceback (most recent call last):
[default0]:[rank2]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer
E1126 19:51:28.020000 151 torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: -6) local_rank: 0 (pid: 155) of binary: /opt/ddpfleet/venv/bin/python
Failures:
[1]:
  time      : 2026-11-26_19:51:28
  host      : node1
  rank      : 3 (local_rank: 1)
  exitcode  : 1 (pid: 156)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_19:51:28
  host      : node1
  rank      : 2 (local_rank: 0)
  exitcode  : -6 (pid: 155)
"""


def feed(clues: launch.Clues, text: str) -> list[bool]:
    said = []
    for i, line in enumerate(text.splitlines()):
        rank, body = launch.split_rank(line, clues.node_rank, clues.nproc)
        said.append(clues.feed(rank, body, now=float(i)))
    return said


def test_clues_blame_the_rank_that_raised_not_the_first_to_die():
    # rank 2 aborted on the closed socket before rank 3 had finished dying, so torchrun's root
    # cause is rank 2; rank 3's traceback came first.
    clues = launch.Clues(node_rank=1, nproc=2)
    said = feed(clues, NODE1_FAILURE)
    assert said.count(True) == 1  # torchrun's 'failed (exitcode' line
    assert clues.rank == 3 and clues.first_at == 0.0
    assert clues.exits == {2: -6, 3: 1}


def test_clues_without_a_traceback_take_torchruns_word():
    clues = launch.Clues(node_rank=1, nproc=2)
    feed(clues, "\n".join(ln for ln in NODE1_FAILURE.splitlines() if "[default" not in ln))
    assert clues.rank == 2 and clues.exits[2] == -6


def test_exit_text_names_signals():
    assert launch.exit_text(1) == "exit 1"
    assert launch.exit_text(-15) == "SIGTERM" and launch.exit_text(-6) == "SIGABRT"
