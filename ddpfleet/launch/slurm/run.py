"""`invoke train --launcher slurm`: the SSH launcher's preflight, plan and sync, then one sbatch
job instead of the gang; its output streamed with node and rank prefixes, the verdict naming
the failing node and rank, Ctrl-C cancelling the job (scancel).

The job's output file lives on its BatchHost (Slurm's first node of the job), in the first
node's torchrun log dir: the controller reads it over SFTP as it grows, while `scontrol show
job` says how the job stands. Without a shared filesystem this is the one place srun writes.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from ddpfleet.errors import DdpfleetError, NodeError, RunFailed
from ddpfleet.hygiene import open_private
from ddpfleet.launch.clues import Clues
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.interrupts import Interrupts
from ddpfleet.launch.outcome import (
    Outcome,
    failure_message,
    first_failure,
    held_lines,
    summary_line,
)
from ddpfleet.launch.output import LineSplitter, Output
from ddpfleet.launch.plan import NodePlan, Plan
from ddpfleet.launch.preflight import fail_if, fresh_run_dir
from ddpfleet.launch.slurm.batch import (
    TERMINAL,
    JobOutput,
    as_job_user,
    batch_script,
    checkpoint_dir_argv,
    exit_code,
    job_user,
    output_path,
    parse_job,
    sbatch_argv,
)
from ddpfleet.launch.slurm.state import job_state
from ddpfleet.launch.ssh.ranklogs import fetch_rank_logs
from ddpfleet.launch.ssh.run import open_checked, prepare
from ddpfleet.launch.verdict import RunState
from ddpfleet.ssh.connection import Conn, Fleet
from ddpfleet.ssh.result import Result

POLL_S = 0.3
# After scancel, until Slurm says the job ended: Slurm's KillWait (30 s from SIGTERM to SIGKILL)
# plus its UnkillableStepTimeout (60 s more for the killed processes to go), the longest Slurm
# itself waits (both defaults; roles/slurm sets neither). Ctrl-C on an attached job and `invoke
# stop` wait alike: a shorter wait returns while ranks may still run.
CANCEL_WAIT_S = 90.0


def run_as(conn: Conn, user: str | None, argv: list[str], **kw) -> Result:
    """argv as the job's user (slurm_batch.as_job_user): runuser run by root, directly on a
    root login, through the connection's sudo on another; the login user itself when it is
    that user."""
    command, root = as_job_user(user, conn.node.user, argv)
    return conn.run(command, root=root, **kw)


def plan_user(p: Plan) -> str | None:
    return job_user([(n.node, n.user) for n in p.nodes])


def ready(fleet: Fleet, config: TrainConfig, out: Output) -> Plan:
    """The SSH launcher's checks, plan and code sync (open_checked, prepare), and the code dirs
    reserved for the job; Slurm starts the ranks."""
    job_user([(n, config.users.get(n)) for n in config.order])  # one user, before any change
    fresh_run_dir(config.run_dir)
    files, members = open_checked(fleet, config, out)
    try:  # the runners only check, sync and hold the code dir's lock here
        p = prepare(fleet, config, members, files, beside_slurm=True)
        reserve(fleet, p)
        return p
    finally:
        for m in members.values():
            m.call_off()


# $1 the reservation's path, $2 the run id (node_helper.RESERVED), replaced whole.
RESERVE_SH = 'umask 077 && printf "%s\\n" "$2" >"$1.tmp" && mv -f -- "$1.tmp" "$1"'


def reserve(fleet: Fleet, p: Plan) -> None:
    """Each node's code dir reserved for the run's job, written while the runners still hold
    its lock: from the runners' end until the job's tasks take the lock (the job may pend for
    hours), an SSH run's claim finds it and refuses the node while Slurm has the job
    (node_helper.reserved); once the job ended, or Slurm never had it, it is stale, and the
    next claim removes it."""
    user = plan_user(p)
    made = fleet.map(
        lambda c: run_as(c, user, ["sh", "-c", RESERVE_SH, "sh", reservation(p, c.name), p.run_id]),
        [n.node for n in p.nodes],
    )
    fail_if([str(r) for r in made.values() if isinstance(r, NodeError)], "cannot submit")


def reservation(p: Plan, node: str) -> str:
    return f"{p.node(node).mirror}/.ddpfleet/slurm-run"  # node_helper.RESERVED


def ask(conn: Conn, job_id: str) -> dict[str, str]:
    """scontrol's record of the job; {} once Slurm forgot it."""
    got = conn.run(["scontrol", "-o", "show", "job", job_id], check=False)
    return parse_job(got.stdout) if got.ok else {}


class OutputFile:
    """The job's output file (srun's labelled lines), read over SFTP as the job's user as it
    grows: what an attached run streams and `invoke logs` prints. Lines come out as (node,
    rank, text); a partial last line waits for the next read, or end()."""

    def __init__(self, path: str, user: str | None, parsed: JobOutput):
        self.path, self.user, self.parsed = path, user, parsed
        self.offset = 0
        self.lines = LineSplitter()

    def read(self, conn: Conn) -> list[tuple[str, int | None, str]]:
        """What was written since the last read ([] while the file is not there yet)."""
        try:
            with conn.sftp(self.user).open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        return [self.parsed.line(raw.decode(errors="replace")) for raw in self.lines.feed(data)]

    def end(self) -> list[tuple[str, int | None, str]]:
        return [self.parsed.line(raw.decode(errors="replace")) for raw in self.lines.end()]


def checkpoint_dir(conn: Conn, n: NodePlan, user: str | None) -> None:
    """The run's DDPFLEET_CHECKPOINT_DIR, made by root for the job's user; a login that cannot
    become root leaves it to the task (batch.CHECKPOINT_DIR_SH: the user's own then)."""
    if n.checkpoint_dir and conn.escalation.how != "none":
        conn.run(checkpoint_dir_argv(n.checkpoint_dir, user or conn.node.user), root=True)


def submit(fleet: Fleet, p: Plan, out: Output) -> str:
    """sbatch the plan from its first node; the job id (Slurm accepted the job)."""
    output_dir, user = p.nodes[0].log_dir, plan_user(p)
    # The output dir on every node, the job user's (Slurm picks the BatchHost, opens the output
    # there as that user, and makes no dirs).
    made = fleet.map(
        lambda c: run_as(c, user, ["mkdir", "-p", "-m", "0700", "--", output_dir]),
        [n.node for n in p.nodes],
    )
    fail_if([str(r) for r in made.values() if isinstance(r, NodeError)], "cannot submit")
    made = fleet.map(lambda c: checkpoint_dir(c, p.node(c.name), user), [n.node for n in p.nodes])
    fail_if([str(r) for r in made.values() if isinstance(r, NodeError)], "cannot submit")
    head = fleet.conns[p.nodes[0].node]
    argv = sbatch_argv(p, output_path(output_dir))
    job_id = run_as(head, user, argv, stdin=batch_script(p)).stdout.strip()
    job_id = job_id.split(";")[0]
    who = f" as {user}" if user else ""
    out.line(f"[slurm] submitted job {job_id} ({p.nnodes} nodes) from {head.name}{who}")
    return job_id


def found(p: Plan, job_id: str) -> dict:
    """What the index keeps to find a Slurm run's job and output again (`runs`, `logs`,
    `stop`), attached or detached."""
    return {"job_id": job_id, "output_dir": p.nodes[0].log_dir, "user": plan_user(p)}


def train(fleet: Fleet, config: TrainConfig, out: Output | None = None, on=None) -> list[Outcome]:
    """`on`: told once Slurm accepted the job (on.started(plan, job's place)) and when it
    ended (on.ended(...)): the controller's index (index.Attached)."""
    out = out or Output()
    p = ready(fleet, config, out)
    fresh_run_dir(config.run_dir, make=True)
    job = Job(fleet, p, config.run_dir, out)
    with Interrupts() as interrupts:  # from sbatch on: a job submitted is a job cancelled
        job.submit()
        if on is not None:
            on.started(p, **found(p, job.id))
        if not job.follow(interrupts):
            job.cancel(interrupts)
            if on is not None:  # STOPPED: the ranks' words on the cancel's SIGTERM are no failure
                reason = f"interrupted: slurm job {job.id} cancelled"
                on.ended(p, job.outcomes(), reason, job.said(), RunState.STOPPED)
            raise KeyboardInterrupt
    return job.verdict(on)


class Job:
    def __init__(self, fleet: Fleet, p: Plan, run_dir: Path, out: Output):
        self.fleet, self.p, self.run_dir, self.out = fleet, p, run_dir, out
        self.head = fleet.conns[p.nodes[0].node]  # submits and asks Slurm
        self.output_dir = p.nodes[0].log_dir
        self.user = plan_user(p)  # owns the job and its output
        self.id = ""
        self.info: dict[str, str] = {}
        self.parsed = JobOutput(nproc=p.nproc)
        self.output: OutputFile | None = None  # once submitted
        self.started = time.monotonic()
        self.clues = {n.node: Clues(node_rank=n.rank, nproc=p.nproc) for n in p.nodes}
        self.lines = {n.node: deque(maxlen=200) for n in p.nodes}
        self.logs = {n.node: open_private(run_dir / f"{n.node}.log") for n in p.nodes}
        self.waiting_said = ""

    def submit(self) -> None:
        self.id = submit(self.fleet, self.p, self.out)
        self.output = OutputFile(output_path(self.output_dir, self.id), self.user, self.parsed)

    @property
    def state(self) -> str:
        return self.info.get("JobState", "")

    def poll(self) -> None:
        self.info = ask(self.head, self.id) or self.info  # {}: not asked this time
        nodelist = self.info.get("NodeList", "")
        if not self.parsed.nodes and nodelist not in ("", "(null)"):
            names = self.head.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
            self.parsed.nodes = tuple(names)
        reason = self.info.get("Reason", "None")
        if self.state == "PENDING" and reason not in ("None", self.waiting_said):
            self.waiting_said = reason
            self.out.line(f"[slurm] job {self.id} waits: {reason}")
        self.read()

    def read(self) -> None:
        host = self.info.get("BatchHost", "")
        if host in self.fleet.conns and self.output is not None:
            for line in self.output.read(self.fleet.conns[host]):
                self.show(*line)

    def show(self, node: str, rank: int | None, text: str) -> None:
        prefix = f"[{node}]" if rank is None else f"[{node} r{rank}]"
        if node in self.clues:
            clues, calm = self.clues[node], self.clues[node].first_at is None
            clues.feed(rank, text, time.monotonic())
            self.lines[node].append((rank, text))
            if calm and clues.first_at is not None:  # the first sign of failure: keep to it
                self.out.hold((node, clues.rank))
        key = (node, rank) if node in self.clues else None
        self.out.line(f"{prefix} {text}", self.logs.get(node), key=key)

    def follow(self, interrupts: Interrupts) -> bool:
        """Until the job ended (True) or a signal came (False); signals are looked at only
        between polls, never inside one."""
        while True:
            if interrupts.count:
                return False
            self.poll()
            if self.state in TERMINAL:
                break
            time.sleep(POLL_S)
        self.read()  # what the last poll raced
        for line in self.output.end() if self.output else ():
            self.show(*line)
        return True

    def cancel(self, interrupts: Interrupts) -> None:
        """scancel, then wait until Slurm says the job ended; another signal stops the wait
        (Slurm still ends the job: the scancel was sent)."""
        if not self.id:
            return
        self.out.line(
            f"[slurm] interrupted: cancelling job {self.id} (interrupt again to not wait)"
        )
        seen = interrupts.count
        run_as(self.head, self.user, ["scancel", self.id], check=False)
        end = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < end and self.state not in TERMINAL:
            if interrupts.count > seen:
                self.out.line(f"[slurm] job {self.id} cancelled; not waiting for it to end")
                break
            time.sleep(POLL_S)
            self.poll()
        self.close()

    def close(self) -> None:
        for f in self.logs.values():
            f.close()

    def outcomes(self) -> list[Outcome]:
        failed = dict(self.parsed.failed_tasks[::-1])  # the first word on a node wins
        ok = self.state == "COMPLETED" and exit_code(self.info) == 0
        seconds = time.monotonic() - self.started
        outs = []
        for n in self.p.nodes:
            o = Outcome(n.node, seconds=seconds)
            clues = self.clues[n.node]
            if ok:
                o.state, o.exit_code = RunState.SUCCEEDED, 0
            elif n.node in failed or clues.rank is not None:
                o.state, o.exit_code = RunState.FAILED, failed.get(n.node)
                o.rank, o.evidence_at = clues.rank, clues.first_at
                if o.exit_code is None and o.rank is not None:
                    o.exit_code = clues.exits.get(o.rank)
            else:
                o.state = RunState.STOPPED
            mine = [t for r, t in self.lines[n.node] if o.rank is None or r == o.rank]
            o.last_lines = tuple(mine[-12:])
            outs.append(o)
        return outs

    def said(self) -> dict[str, list[str]]:
        """Each node's last lines, which may say a restart (verdict.restarts)."""
        return {node: [text for _, text in lines] for node, lines in self.lines.items()}

    def final(self, outcomes: list[Outcome]) -> RunState | None:
        """The run's state from Slurm's word on the job (a time limit: FAILED, a node's
        failure: LOST) where no failed rank tells it; None: as the outcomes fold."""
        if first_failure(outcomes) is not None or "JobState" not in self.info:
            return None
        state = job_state(self.info)
        return state if state.final else None

    def verdict(self, on=None) -> list[Outcome]:
        self.close()
        outcomes = self.outcomes()
        fetched = fetch_rank_logs(self.fleet, self.p, self.run_dir, [n.node for n in self.p.nodes])
        first = first_failure(outcomes)
        reason = f"slurm job {self.id} {self.state.lower()}"
        if on is not None:
            on.ended(self.p, outcomes, reason, self.said(), self.final(outcomes))
        for line in held_lines(self.out.held(), outcomes, first, self.run_dir):
            self.out.line(line)
        for o in outcomes:
            self.out.line(summary_line(o, first, reason))
        missing = [str(r) for r in fetched.values() if isinstance(r, NodeError)]
        self.out.line(
            f"logs: {self.run_dir}" + (f" (not copied: {'; '.join(missing)})" if missing else "")
        )
        if first is not None:
            raise RunFailed(f"slurm job {self.id}: " + failure_message(first, outcomes))
        if self.state != "COMPLETED" or exit_code(self.info):
            raise DdpfleetError(
                f"slurm job {self.id} ended {self.state} ({self.info.get('Reason', '')}); "
                f"see {self.run_dir} and `scontrol show job {self.id}` on {self.head.name}"
            )
        return outcomes
