"""A detached Slurm run's state (pure): what its nodes say about the job, folded into the same
verdicts as an SSH run's (runstate.RunView).

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

from ddpfleet.launch.clues import Clues, peer_gone
from ddpfleet.launch.slurm.batch import (
    JobOutput,
    exit_code,
    output_path,
    parse_job,
    parse_record,
    record_path,
)
from ddpfleet.launch.ssh.runstate import RunView

MARK = "@@ddpfleet-slurm"
TAIL_LINES = 200
LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")
STOPPED = ("CANCELLED", "PREEMPTED", "DEADLINE")
LOST = ("NODE_FAIL", "BOOT_FAIL")
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


def blame(lines: Sequence[str], nodes: Sequence[str], nproc: int) -> tuple[str | None, int | None]:
    """(node, rank) to blame from the job's output: the first node whose rank raised, unless
    that rank only says a peer went away while another node's rank failed otherwise; else the
    first node srun says failed."""
    parsed = JobOutput(nodes=tuple(nodes), nproc=nproc)
    clues = {n: Clues(node_rank=i, nproc=nproc) for i, n in enumerate(nodes)}
    own: dict[str, list[tuple[int | None, str]]] = {n: [] for n in nodes}
    for at, raw in enumerate(lines):
        node, rank, text = parsed.line(raw)
        if node in clues:
            clues[node].feed(rank, text, float(at))
            own[node].append((rank, text))
    failed = [n for n in nodes if clues[n].rank is not None]
    causes = [
        n for n in failed if not peer_gone(t for r, t in own[n] if r == clues[n].rank)
    ] or failed
    if causes:
        first = min(causes, key=lambda n: clues[n].first_at or 0.0)
        return first, clues[first].rank
    srun_said = [n for n, _ in parsed.failed_tasks]
    return (srun_said[0] if srun_said else None), None


def fold(entry: Mapping, said: Mapping[str, NodeSays | str]) -> RunView:
    """One RunView from the index entry (run id, nodes, job id, nproc, started) and what each
    node said (or why it could not be asked)."""
    job_id, order = str(entry["job_id"]), tuple(entry["nodes"])
    answers = [s for s in said.values() if isinstance(s, NodeSays)]
    job = next((a.job for a in answers if a.job), None)
    record = next((a.record for a in answers if a.record), "")
    tail = next((a.tail for a in answers if a.tail is not None), ())
    task_nodes, code = parse_record(record)
    view = {"run_id": entry["run_id"], "nodes": order, "started": entry.get("started"),
            "ended": None, "exits": {n: None for n in order}}  # fmt: skip
    what = f"slurm job {job_id}"

    def failed(why: str) -> RunView:
        node, rank = blame(tail, task_nodes or order, int(entry.get("nproc") or 1))
        said_rank = f"rank {rank}" if rank is not None else "its torchrun"
        if node is not None:
            why = f"{node} {said_rank} failed first ({why})"
        return RunView(**view, state="FAILED", why=why, failed_node=node, failed_rank=rank)

    if job is not None:
        state = job.get("JobState", "")
        if state in LIVE:
            reason = job.get("Reason", "None")
            waits = f" waits: {reason}" if state == "PENDING" and reason != "None" else ""
            where = job.get("NodeList", "")
            on = f" on {where}" if where not in ("", "(null)") else ""
            return RunView(**view, state="RUNNING", why=f"{what} {state.lower()}{on}{waits}")
        if state == "COMPLETED" and exit_code(job) == 0:
            return RunView(**view, state="SUCCEEDED", why=what)
        if state in STOPPED:
            return RunView(**view, state="STOPPED", why=f"{what} {state.lower()}")
        if state in LOST:
            return RunView(
                **view, state="LOST", why=f"{what} {state.lower()} ({job.get('Reason')})"
            )
        return failed(f"{what} {state.lower()}, exit {exit_code(job)}")
    unreachable = [f"{n}: {s}" for n, s in said.items() if isinstance(s, str)]
    if code == 0:
        return RunView(**view, state="SUCCEEDED", why=what)
    if code is not None:
        return failed(f"{what} exit {code}")
    if any(CANCELLED.search(line) for line in tail):
        return RunView(**view, state="STOPPED", why=f"{what} cancelled")
    why = f"Slurm no longer knows {what} and no node has its exit"
    return RunView(**view, state="LOST", why="; ".join([why, *unreachable]))
