"""Failures read well (issue 24 item 9): the failing rank's last lines stay a block, the ranks
the gang stopped are one line each on the console, torchrun's exit-barrier noise is one
explained line, and NCCL's '=eth0' is not read as a typo."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from invoke import Exit

from ddpfleet.cli.common import cli
from ddpfleet.errors import RunFailed
from ddpfleet.launch.clues import EXIT_BARRIER_SAID, ExitBarrier
from ddpfleet.launch.display import render_plan
from ddpfleet.launch.outcome import Outcome, failure_message, held_lines
from ddpfleet.launch.output import Output
from ddpfleet.launch.plan import NodePlan, Plan
from ddpfleet.launch.verdict import RunState

SYNTAX_ERROR = (
    '  File "/var/lib/ddpfleet/runs/r1/code/train.py", line 3',
    "    def main(:",
    "             ^",
    "SyntaxError: invalid syntax",
)


def test_the_last_lines_stay_a_block_with_the_caret_under_its_column():
    first = Outcome("node1", RunState.FAILED, exit_code=1, rank=3, last_lines=SYNTAX_ERROR)
    others = [Outcome("node0", RunState.STOPPED), first]

    @cli
    def task(c):
        raise RunFailed(failure_message(first, others))

    with pytest.raises(Exit) as got:
        task(None)
    lines = got.value.message.splitlines()
    assert lines[0] == (
        "error: training failed: node1 rank 3 failed first (exit 1); node0 stopped. "
        "Last lines of node1 rank 3:"
    )
    assert lines[1:] == ["    " + line for line in SYNTAX_ERROR]
    assert lines[2].index("(") + 1 == lines[3].index("^")  # the caret under its column


def test_a_node_cannot_forge_lines_or_escapes_in_the_block():
    first = Outcome("node1", RunState.FAILED, exit_code=1, rank=0, last_lines=("a\x1b[2Jb\rc",))

    @cli
    def task(c):
        raise RunFailed(failure_message(first, [first]))

    with pytest.raises(Exit) as got:
        task(None)
    assert got.value.message.splitlines()[1] == "    abc"


def test_once_a_rank_fails_the_others_go_to_their_logs_and_a_line_each_at_the_end(tmp_path):
    stream = io.StringIO()
    out = Output(stream)
    logs = {n: (tmp_path / f"{n}.log").open("w") for n in ("node0", "node1")}
    out.line("[node0 r0] epoch 0 loss 1.0", logs["node0"], key=("node0", 0))
    out.hold(("node1", 3))  # node1 rank 3 printed the first traceback
    out.line("[node1 r3] Traceback (most recent call last):", logs["node1"], key=("node1", 3))
    for i in range(40):  # the peers' tracebacks, torchrun's summaries
        out.line(f"[node0 r0] peer line {i}", logs["node0"], key=("node0", 0))
        out.line(f"[node0 r1] peer line {i}", logs["node0"], key=("node0", 1))
        out.line(f"[node0] torchrun line {i}", logs["node0"], key=("node0", None))
        out.line(f"[node1 r2] peer line {i}", logs["node1"], key=("node1", 2))
    out.line("ddpfleet: node1 failed: stopping every node")  # ddpfleet's own: always shown
    for f in logs.values():
        f.close()
    shown = stream.getvalue().splitlines()
    assert shown == [
        "[node0 r0] epoch 0 loss 1.0",
        "[node1 r3] Traceback (most recent call last):",
        "ddpfleet: node1 failed: stopping every node",
    ]
    assert (tmp_path / "node0.log").read_text().count("peer line") == 80  # nothing lost
    first = Outcome("node1", RunState.FAILED, exit_code=1, rank=3)
    outcomes = [Outcome("node0", RunState.STOPPED), first]
    assert held_lines(out.held(), outcomes, first, Path("logs/r1")) == [
        "[node0] torchrun stopped by the gang after the first failure: 40 lines in logs/r1/node0.log",
        "[node0 r0] rank 0 stopped by the gang after the first failure: 40 lines in "
        "logs/r1/node0.log",
        "[node0 r1] rank 1 stopped by the gang after the first failure: 40 lines in "
        "logs/r1/node0.log",
        "[node1 r2] rank 2 ended with the gang after the first failure: 40 lines in "
        "logs/r1/node1.log",
    ]


# torch 2.13's torchrun on a node whose exit barrier lost the master's store (as logged).
P = "E1206 08:10:00.124000 77 torch/distributed/elastic/agent/server/api.py:1008]"
BARRIER_NOISE = [
    "[W1206 08:10:00.123456347 socket.cpp:462] [c10d] recvValueWithTimeout failed on "
    "SocketImpl(fd=3, addr=[node1]:40312, remote=[node0]:29500): Failed to recv, got 0 bytes. "
    "Connection was likely closed. Did the remote server shutdown or crash?",
    f"{P} Error waiting on exit barrier. Elapsed: 0.0012 seconds",
    f"{P} Traceback (most recent call last):",
    f'{P}   File "/opt/ddpfleet/venv/lib/python3.11/site-packages/torch/distributed/elastic/'
    'agent/server/api.py", line 994, in _exit_barrier',
    f"{P}     store_util.barrier(",
    f"{P} torch.distributed.DistNetworkError: failed to recv, got 0 bytes",
]


def feed_all(lines, rank=None):
    barrier = ExitBarrier()
    got = [x for line in lines for x in barrier.feed(rank, line)]
    return got + barrier.end()


def test_the_exit_barrier_noise_is_one_explained_line():
    got = feed_all(BARRIER_NOISE + ["after it"])
    assert [text for _, text, show in got if show] == [EXIT_BARRIER_SAID, "after it"]
    assert [text for _, text, show in got if not show] == BARRIER_NOISE  # all still logged


def test_a_store_warning_without_the_barrier_error_is_shown():
    got = feed_all([BARRIER_NOISE[0], "[default0]:next"])
    assert [(text, show) for _, text, show in got] == [
        (BARRIER_NOISE[0], True),
        ("[default0]:next", True),
    ]
    assert [t for _, t, s in feed_all([BARRIER_NOISE[0]]) if s] == [BARRIER_NOISE[0]]


def test_a_ranks_own_lines_are_never_taken_for_the_noise():
    lines = ["Error waiting on exit barrier (a rank printing it)", "Traceback (most recent"]
    assert all(show for _, _, show in feed_all(lines, rank=0))


def test_ncclsocket_ifname_is_shown_so_nobody_takes_it_for_a_typo():
    argv = ("python", "-m", "torch.distributed.run", "train.py")
    env = {"NCCL_SOCKET_IFNAME": "=eth0", "GLOO_SOCKET_IFNAME": "eth0"}
    nodes = tuple(
        NodePlan(n, r, h, argv, env, "/code", "/logs")
        for r, (n, h) in enumerate((("node0", "10.0.0.10"), ("node1", "10.0.0.11")))
    )
    p = Plan("r1", "node0", "10.0.0.10", 29500, 1, "train.py", nodes)
    text = capture(render_plan(p))
    assert "NCCL_SOCKET_IFNAME='=eth0'" in text
    assert "==eth0" not in text
    assert "a value starting with '=' is NCCL's: exactly that interface" in text


def capture(renderable) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    console.print(renderable)
    return console.file.getvalue()


def test_a_restart_of_the_workers_shows_every_rank_again():
    stream = io.StringIO()
    out = Output(stream)
    out.hold(("node1", 3))
    out.line("[node0 r0] held", key=("node0", 0))
    out.release()  # torchrun: '... attempts left; will restart worker group'
    out.line("[node0 r0] shown", key=("node0", 0))
    assert stream.getvalue().splitlines() == ["[node0 r0] shown"]


def test_a_refused_preflight_is_a_line_per_node_and_a_node_cannot_add_lines():
    """Issue 24 item 6's refusal names the job and the node, one line each; the lines came
    squashed into one before (the CLI cleaned every error of its newlines)."""
    from ddpfleet.launch.preflight import fail_if

    @cli
    def task(c):
        fail_if(
            [
                "node0: slurm job 42 (ddpfleet run r1) is running there; ...",
                "node1: code dir /c is in use by run r1\nforged line (slurm job 42); ...",
            ],
            "preflight failed",
        )

    with pytest.raises(Exit) as got:
        task(None)
    assert got.value.message.splitlines() == [
        "error: preflight failed; nothing was started:",
        "  node0: slurm job 42 (ddpfleet run r1) is running there; ...",
        "  node1: code dir /c is in use by run r1forged line (slurm job 42); ...",
    ]
