"""`invoke train --launcher slurm --detach` and `runs`, `logs`, `stop` on such runs.

Submitting is the attached launcher's checks, plan, sync and sbatch; the controller returns
once Slurm accepted the job, and keeps the run in the same index as SSH runs, with its
launcher, job id and output dir. Slurm owns the run from there: `runs` asks the run's nodes
(slurm_state), `logs` reads the job's output file on the node that has it, `stop` is scancel,
then a sweep of every node for what is left of the job (SLURM_JOB_ID or DDPFLEET_RUN_ID in
/proc/*/environ, never a name: run_ctl.py's sweep, the one a detached SSH run's stop makes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.index import shape
from ddpfleet.launch.launcher import NodeStop, Stopped, check_ranks
from ddpfleet.launch.output import Output
from ddpfleet.launch.slurm.batch import JobOutput, output_path, parse_record
from ddpfleet.launch.slurm.run import (
    CANCEL_WAIT_S,
    POLL_S,
    OutputFile,
    ask,
    found,
    ready,
    run_as,
    submit,
)
from ddpfleet.launch.slurm.state import LIVE, NodeSays, fold, parse_probe, probe_argv
from ddpfleet.launch.ssh import runctl
from ddpfleet.launch.verdict import RunView
from ddpfleet.ssh.connection import Conn, Fleet

KILL_WAIT_S = 5.0


def train_detached(
    fleet: Fleet, config: TrainConfig, index: runctl.Index, out: Output | None = None
) -> str:
    """Check, plan, sync, sbatch; index the run; return its Slurm job id."""
    out = out or Output()
    p = ready(fleet, config, out)
    began = time.monotonic()
    job_id = submit(fleet, p, out)
    index.add(p.run_id, [n.node for n in p.nodes], launcher="slurm", **found(p, job_id),
              **shape(p))  # fmt: skip
    took = time.monotonic() - began
    state = ask(fleet.conns[p.nodes[0].node], job_id).get("JobState", "accepted").lower()
    out.line(f"run {p.run_id}: slurm job {job_id} {state} ({took:.2f}s)")
    return job_id


def probe(fleet: Fleet, entry: Mapping) -> dict[str, NodeSays | str]:
    """What every node of the run says (slurm_state.probe_argv), or why it could not; asked as
    the job's user, who owns its files (an index entry without one: the login user's job)."""
    argv, user = probe_argv(str(entry["job_id"]), entry["output_dir"]), entry.get("user")
    nodes = [n for n in entry["nodes"] if n in {m.name for m in fleet.nodes}]
    got = fleet.map(lambda c: parse_probe(run_as(c, user, argv, check=False).stdout), nodes)
    said: dict[str, NodeSays | str] = {
        n: f"unreachable ({r.message})" if isinstance(r, NodeError) else r for n, r in got.items()
    }
    for n in entry["nodes"]:
        said.setdefault(n, "not in this inventory or --nodes")
    return said


def views(fleet: Fleet, entries: Sequence[Mapping]) -> list[RunView]:
    return [fold(e, probe(fleet, e)) for e in entries]


class OutputReader:
    """The job's output file, read from the node that has it (found by asking the run's nodes)."""

    def __init__(self, fleet: Fleet, entry: Mapping):
        self.fleet, self.entry = fleet, entry
        self.job_id = str(entry["job_id"])
        self.user = entry.get("user")  # owns the output (None: the login user)
        self.path = output_path(entry["output_dir"], self.job_id)
        self.host: str | None = None
        self.unasked: list[str] = []  # "node1 unreachable (...)": the nodes find() could not ask
        parsed = JobOutput(nodes=tuple(entry["nodes"]), nproc=int(entry.get("nproc") or 1))
        self.file = OutputFile(self.path, self.user, parsed)
        fleet.open()  # connections are made on first use; the asker is one that is up
        self.asker = next((fleet.conns[n] for n in entry["nodes"] if n in fleet.conns), None)

    def live(self) -> bool:
        return self.asker is not None and ask(self.asker, self.job_id).get("JobState") in LIVE

    def find(self) -> None:
        every = probe(self.fleet, self.entry)
        self.unasked = [f"{n} {s}" for n, s in every.items() if not isinstance(s, NodeSays)]
        said = [(n, s) for n, s in every.items() if isinstance(s, NodeSays)]
        self.host = next((n for n, s in said if s.tail is not None), None)
        record = next((s.record for _, s in said if s.record), None)
        self.file.parsed.nodes = parse_record(record or "")[0] or self.file.parsed.nodes

    def read(self) -> list[tuple[str, int | None, str]]:
        if self.host is None:
            self.find()
        return [] if self.host is None else self.file.read(self.fleet.conns[self.host])

    def end(self) -> list[tuple[str, int | None, str]]:
        return self.file.end()


def logs(
    fleet: Fleet,
    entry: Mapping,
    node: str | None = None,
    rank: int | None = None,
    follow: bool = False,
    out: Output | None = None,
) -> None:
    """The job's output, each line prefixed with its node and rank (`node`: only these,
    comma-separated, as an SSH run's logs take them); `follow`: until the job ends. Reading
    never touches the job. Slurm gathers every rank's lines into the one file, so a node that
    is down drops none of them unless the file is there: then it is named."""
    out = out or Output()
    nproc, run_nodes = int(entry.get("nproc") or 1), list(entry["nodes"])
    ranks = {n: range(i * nproc, (i + 1) * nproc) for i, n in enumerate(run_nodes)}
    only = [n.strip() for n in (node or "").split(",") if n.strip()]  # as an SSH run's logs
    # --node with --rank: Slurm may order the nodes otherwise, so only the world is checked
    check_ranks(entry["run_id"], ranks, rank)
    check_ranks(entry["run_id"], dict.fromkeys(run_nodes, ()), None, only)
    reader = OutputReader(fleet, entry)
    while True:
        live = follow and reader.live()  # asked first: the last read then has every line
        for n, r, text in reader.read():
            _show(out, n, r, text, only, rank)
        if not live:
            break
        time.sleep(POLL_S)
    for n, r, text in reader.end():
        _show(out, n, r, text, only, rank)
    if reader.host is None and reader.unasked:  # the output may be on a node not asked
        raise DdpfleetError(
            f"{entry['run_id']}: slurm job {reader.job_id}'s output ({reader.path}) is on no "
            f"node that answered; not asked: {'; '.join(reader.unasked)}"
        )
    if reader.host is None:
        raise DdpfleetError(
            f"{entry['run_id']}: no node of the run has slurm job {reader.job_id}'s output "
            f"({reader.path}) yet; see invoke runs"
        )


def _show(out: Output, n: str, r: int | None, text: str, only: list[str], rank: int | None):
    """One line of the job's output, unless --node (`only`, none: every node) or --rank
    leaves it out."""
    if (not only or n in only) and (rank is None or r == rank):
        out.line(f"[{n}] {text}" if r is None else f"[{n} r{r}] {text}")


def sweep(conn: Conn, python: str, job_id: str, run_id: str, kill: bool = False) -> list[str]:
    """The node's pids of the job or run (each SIGKILLed with `kill`): run_ctl.py's sweep, as
    root, who may read every user's /proc/<pid>/environ."""
    marks = (f"SLURM_JOB_ID={job_id}", f"DDPFLEET_RUN_ID={run_id}")
    return [str(p) for p in runctl.node_call(conn, python, "sweep", str(int(kill)), *marks)]


def stop(fleet: Fleet, pythons: Mapping[str, str], entry: Mapping, grace: float) -> Stopped:
    """scancel the job, wait until Slurm says it ended, then make sure no process of it is left
    on any node of the run (`pythons`: each node's, for run_ctl.py): what Slurm did, and per
    node what ended and what is left."""
    job_id, run_id = str(entry["job_id"]), str(entry["run_id"])
    fleet.open()
    nodes = [n for n in entry["nodes"] if n in {m.name for m in fleet.nodes}]
    before = fleet.map(lambda c: sweep(c, pythons[c.name], job_id, run_id), nodes)
    reader = OutputReader(fleet, entry)
    if reader.asker is None:
        raise DdpfleetError(f"stop {run_id}: none of its nodes {entry['nodes']} is in --nodes")
    was = ask(reader.asker, job_id).get("JobState", "")
    if was in LIVE:
        run_as(reader.asker, reader.user, ["scancel", job_id], check=False)
        end = time.monotonic() + CANCEL_WAIT_S
        while reader.live() and time.monotonic() < end:
            time.sleep(POLL_S)
        did = f"slurm job {job_id} cancelled (was {was})"
    else:
        did = f"slurm job {job_id} had ended ({was or 'Slurm no longer knows it'})"
    after = fleet.map(lambda c: _leftovers(c, pythons[c.name], job_id, run_id, grace), nodes)
    rows: dict[str, NodeStop] = {}
    for n in nodes:
        ran, left = before.get(n), after.get(n)
        if isinstance(left, NodeError):
            rows[n] = NodeStop.failed(left)
            continue
        ended = f"{len(ran)} processes of the job ended" if isinstance(ran, list) and ran else ""
        rows[n] = NodeStop.of(ended or "none running", *left)
    return Stopped(run_id, rows, did)


def _leftovers(
    conn: Conn, python: str, job_id: str, run_id: str, grace: float
) -> tuple[list, list]:
    """Waits `grace` for the job's processes to go, SIGKILLs the rest: (the pids SIGKILLed, the
    pids still there after KILL_WAIT_S)."""
    end = time.monotonic() + grace
    while (left := sweep(conn, python, job_id, run_id)) and time.monotonic() < end:
        time.sleep(POLL_S)
    if not left:
        return [], []
    killed = sweep(conn, python, job_id, run_id, kill=True)
    end = time.monotonic() + KILL_WAIT_S
    while (left := sweep(conn, python, job_id, run_id)) and time.monotonic() < end:
        time.sleep(POLL_S)
    return killed, left
