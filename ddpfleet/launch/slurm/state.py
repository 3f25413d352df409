"""A detached Slurm run's state (pure): what its nodes say about the job, folded into the same
verdict as an SSH run's (verdict.RunState, verdict.RunView; the node to blame: verdict.blame).

Without an accounting database Slurm forgets a job MinJobAge (300 s) after it ends, so the
nodes are asked three things in one round trip (`probe_script`), and `fold` reads them in order:

    scontrol -o show job ID   while Slurm knows the job: its state, exit, nodes, BatchHost
    slurm-ID.state            the batch script's record: the job's nodes, then srun's exit
    slurm-ID.out (its tail)   srun's labelled lines: who failed, and slurmstepd's CANCELLED

    PENDING, RUNNING, ...     RUNNING (why says it waits, and on what)
    COMPLETED, exit 0         SUCCEEDED
    FAILED, TIMEOUT, OOM ...  FAILED, the node and rank to blame read from the output
    CANCELLED, PREEMPTED      STOPPED
    NODE_FAIL, BOOT_FAIL      LOST
    forgotten                 the record's exit (0: SUCCEEDED, else FAILED); without one, the
                              output's CANCELLED line (STOPPED), else LOST
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ddpfleet.launch.clues import Clues
from ddpfleet.launch.slurm.batch import (
    JobOutput,
    exit_code,
    output_path,
    parse_job,
    parse_record,
    record_path,
)
from ddpfleet.launch.verdict import Evidence, RunState, RunView, who
from ddpfleet.launch.verdict import blame as blame_first

MARK = "@@ddpfleet-slurm"
TAIL_LINES = 200
LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")
# Slurm's JobState -> the run's; any other (FAILED, TIMEOUT, OUT_OF_MEMORY ...) is FAILED, and so
# is COMPLETED with an exit other than 0 (job_state).
JOB_STATES = {
    **dict.fromkeys(LIVE, RunState.RUNNING),
    "COMPLETED": RunState.SUCCEEDED,
    **dict.fromkeys(("CANCELLED", "PREEMPTED", "DEADLINE"), RunState.STOPPED),
    **dict.fromkeys(("NODE_FAIL", "BOOT_FAIL"), RunState.LOST),
}
# slurmstepd's word in the output when the job or a step is cancelled (scancel, a time limit).
CANCELLED = re.compile(r"\*\*\* (?:JOB|STEP) [\d.]+ ON \S+ CANCELLED AT")


@dataclass(frozen=True)
class NodeSays:
    job: Mapping[str, str] | None  # scontrol's record; None when Slurm does not know the job
    record: str | None  # the batch script's record, when this node has it
    tail: tuple[str, ...] | None  # the output's last lines, when this node has the output


# $1 the job id, $2 the batch script's record, $3 the job's output.
PROBE = f"""\
echo {MARK} job; scontrol -o show job "$1" 2>/dev/null
echo {MARK} record; cat -- "$2" 2>/dev/null
echo {MARK} tail; tail -n {TAIL_LINES} -- "$3" 2>/dev/null || echo {MARK} none
"""


def probe_argv(job_id: str, output_dir: str) -> list[str]:
    """One sh script for every node of the run: what Slurm says, then this node's files."""
    paths = (record_path(output_dir, job_id), output_path(output_dir, job_id))
    return ["sh", "-c", PROBE, "sh", job_id, *paths]


def parse_probe(text: str) -> NodeSays:
    """`probe_script`'s output -> NodeSays."""
    parts: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(MARK + " "):
            current = parts.setdefault(line.split()[1], [])
            continue
        if current is not None:
            current.append(line)
    job = parse_job(" ".join(parts.get("job", ())))
    record = "\n".join(parts["record"]) if parts.get("record") else None
    tail = None if "none" in parts else tuple(parts.get("tail", ()))
    return NodeSays(job if "JobId" in job else None, record, tail)


def job_state(job: Mapping[str, str]) -> RunState:
    """scontrol's record of the job -> the run's state (JOB_STATES)."""
    state = JOB_STATES.get(job.get("JobState", ""), RunState.FAILED)
    return RunState.FAILED if state is RunState.SUCCEEDED and exit_code(job) != 0 else state


def blame(lines: Sequence[str], nodes: Sequence[str], nproc: int) -> tuple[str | None, int | None]:
    """(node, rank) to blame from the job's output (verdict.blame): a node failed when one of
    its ranks did (clues.py) or srun says one of its tasks did; when, by the line it said so."""
    parsed = JobOutput(nodes=tuple(nodes), nproc=nproc)
    clues = {n: Clues(node_rank=i, nproc=nproc) for i, n in enumerate(nodes)}
    own: dict[str, list[tuple[int | None, str]]] = {n: [] for n in nodes}
    srun_at: dict[str, float] = {}
    for at, raw in enumerate(lines):
        node, rank, text = parsed.line(raw)
        if node in clues:
            clues[node].feed(rank, text, float(at))
            own[node].append((rank, text))
        for task_node, _ in parsed.failed_tasks:  # srun's 'srun: error: node1: task 1: ...'
            srun_at.setdefault(task_node, float(at))
    first = blame_first([_evidence(n, clues[n], own[n], srun_at.get(n)) for n in nodes])
    return (first.node, first.rank) if first is not None else (None, None)


def _evidence(node: str, clues: Clues, own: list, srun_at: float | None) -> Evidence:
    """One node's part as the job's output tells it."""
    if clues.rank is None and srun_at is None:
        return Evidence(node, RunState.STOPPED)
    said = tuple(t for r, t in own if r == clues.rank) if clues.rank is not None else ()
    at = clues.first_at if clues.rank is not None else srun_at
    return Evidence(node, RunState.FAILED, at=at, rank=clues.rank, said=said)


def fold(entry: Mapping, said: Mapping[str, NodeSays | str]) -> RunView:
    """One RunView from the index entry (run id, nodes, job id, nproc, started) and what each
    node said (or why it could not be asked)."""
    order = tuple(entry["nodes"])
    job, record, tail = _gathered(said)
    task_nodes, code = parse_record(record)
    what = f"slurm job {entry['job_id']}"
    if job is not None:
        state, why = job_state(job), _job_why(what, job)
    else:
        state, why = _forgotten(what, code, tail, said)
    view = {"run_id": entry["run_id"], "nodes": order, "started": entry.get("started"),
            "ended": None, "exits": {n: None for n in order}, "state": state,
            "unasked": {n: s for n, s in said.items() if isinstance(s, str)}}  # fmt: skip
    if state is not RunState.FAILED:
        return RunView(**view, why=why)
    node, rank = blame(tail, task_nodes or order, int(entry.get("nproc") or 1))
    if node is not None:
        why = f"{who(Evidence(node, state, rank=rank))} failed first ({why})"
    return RunView(**view, why=why, failed_node=node, failed_rank=rank)


def _gathered(said: Mapping[str, NodeSays | str]) -> tuple[dict | None, str, tuple[str, ...]]:
    """Slurm's record of the job, the batch script's record and the output's tail, from
    whichever node has each."""
    answers = [s for s in said.values() if isinstance(s, NodeSays)]
    job = next((a.job for a in answers if a.job), None)
    record = next((a.record for a in answers if a.record), "")
    return job, record, next((a.tail for a in answers if a.tail is not None), ())


def _job_why(what: str, job: Mapping[str, str]) -> str:
    """What Slurm says of a job it still knows, in a few words."""
    state, reason, where = (
        job.get("JobState", ""),
        job.get("Reason", "None"),
        job.get("NodeList", ""),
    )
    on = f" on {where}" if where not in ("", "(null)") else ""
    waits = f" waits: {reason}" if state == "PENDING" and reason != "None" else ""
    return {
        RunState.RUNNING: f"{what} {state.lower()}{on}{waits}",
        RunState.SUCCEEDED: what,
        RunState.STOPPED: f"{what} {state.lower()}",
        RunState.LOST: f"{what} {state.lower()} ({job.get('Reason')})",
    }.get(job_state(job), f"{what} {state.lower()}, exit {exit_code(job)}")


def _forgotten(
    what: str, code: int | None, tail: Sequence[str], said: Mapping[str, NodeSays | str]
) -> tuple[RunState, str]:
    """A job Slurm forgot: the record's exit (0: SUCCEEDED, else FAILED); without one, the
    output's CANCELLED line (STOPPED), else LOST."""
    if code is not None:
        ok = code == 0
        return (RunState.SUCCEEDED, what) if ok else (RunState.FAILED, f"{what} exit {code}")
    if any(CANCELLED.search(line) for line in tail):
        return RunState.STOPPED, f"{what} cancelled"
    unreachable = [f"{n}: {s}" for n, s in said.items() if isinstance(s, str)]
    why = f"Slurm no longer knows {what} and no node has its exit"
    return RunState.LOST, "; ".join([why, *unreachable])
