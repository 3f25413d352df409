"""`invoke train --launcher slurm`, the pure half: the run's plan as one sbatch job, and the
job's output read back into node, rank and verdict.

The same Plan the SSH launcher runs becomes a batch script: `srun --kill-on-bad-exit=1` starts
one task per node, and each task runs that node's torchrun from the plan (its python, cwd and
environment), with c10d rendezvous in place of the static one:

    torchrun --nnodes "$SLURM_NNODES" --nproc-per-node G --rdzv-backend c10d
             --rdzv-id "$SLURM_JOB_ID" --rdzv-endpoint <first node>:<port> ... script args

srun --label prefixes each line with the task id; with one task per node, task i runs on the
i-th node of the job's node list. c10d numbers the nodes by hostname, which is the order of
Slurm's node list wherever node names sort as their hostnames do (the sandbox, most clusters):
a rank is then task id * nproc + torchrun's local rank.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ddpfleet.errors import PlanError
from ddpfleet.launch.clues import split_rank
from ddpfleet.launch.plan import NodePlan, Plan

LABEL = re.compile(r"^\s*(\d+): ?(.*)$")
# srun's word on a task that failed: 'srun: error: node1: task 1: Exited with exit code 1'
TASK_FAILED = re.compile(r"srun: error: (\S+): tasks? ([\d,-]+): (Exited with exit code (\d+)|.*)")
TERMINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
)
# The torchrun options the static plan sets and c10d replaces.
STATIC = {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-id"}


def torchrun_argv(n: NodePlan, endpoint: str) -> str:
    """The node's torchrun from the plan, static rendezvous swapped for c10d; $SLURM_* are left
    for the task's shell to fill in."""
    argv, rest, i = list(n.argv), [], 0
    head = argv[:3]  # python -m torch.distributed.run
    opts = argv[3:]
    while i < len(opts):
        if opts[i] in STATIC:
            i += 2
            continue
        rest.append(opts[i])
        i += 1
    return " ".join(
        [
            shlex.join(head),
            '--nnodes "$SLURM_NNODES"',
            "--rdzv-backend c10d",
            '--rdzv-id "$SLURM_JOB_ID"',
            shlex.join(["--rdzv-endpoint", endpoint, *rest]),
        ]
    )


def split_env(p: Plan) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(what every node's env says alike, what differs per node). The shared part, with --env's
    values, goes into the batch script, which Slurm keeps root-only; only the per-node part
    (socket interface names) is on the task's command line."""
    keys = {k for n in p.nodes for k in n.env}
    common = {
        k: p.nodes[0].env[k]
        for k in sorted(keys)
        if all(n.env.get(k) == p.nodes[0].env.get(k) for n in p.nodes)
    }
    own = {n.node: {k: v for k, v in n.env.items() if k not in common} for n in p.nodes}
    return common, own


# The code dir's lock (node_helper.LOCK, flocked as node_helper.claim does), taken by each task
# and kept by its torchrun (fd 9, inherited through exec) for as long as it runs, as an SSH run's
# runner keeps it: no other run re-syncs the code under the job. Its text names the holder, which
# a refused run quotes. flock(1) is util-linux's.
HOLD_LOCK = (
    "exec 9<>.ddpfleet/lock && flock -n -x 9 || "
    '{{ echo "ddpfleet: code dir $PWD is in use by run $(cat .ddpfleet/lock)" >&2; exit 2; }}; '
    "printf '%s (slurm job %s)' {run_id} \"$SLURM_JOB_ID\" >.ddpfleet/lock; "
)


# Each task, as the job's user, before torchrun: the run's DDPFLEET_CHECKPOINT_DIR (the
# checkpoint contract), made by root before sbatch where the login can become root
# (checkpoint_dir_argv); where it could not be, the user's own ~/.ddpfleet/runs/<run-id>/.
CHECKPOINT_DIR_SH = (
    '[ -z "$DDPFLEET_CHECKPOINT_DIR" ] || mkdir -p -m 0700 -- "$DDPFLEET_CHECKPOINT_DIR" '
    '2>/dev/null || { export DDPFLEET_CHECKPOINT_DIR="$HOME/.ddpfleet/runs/$DDPFLEET_RUN_ID/'
    'checkpoints"; mkdir -p -m 0700 -- "$DDPFLEET_CHECKPOINT_DIR" || exit 2; }'
)


def checkpoint_dir_argv(path: str, owner: str) -> list[str]:
    """As root on every node before sbatch: the run dir (root's, 0755) and its checkpoint dir,
    `owner`'s (the job's user), 0700, never through a symlink."""
    script = (
        'mkdir -p -m 0755 -- "$(dirname -- "$1")" && mkdir -p -m 0700 -- "$1" && '
        '[ ! -L "$1" ] && chown -h -- "$2:" "$1" && chmod 0700 -- "$1"'
    )
    return ["sh", "-c", script, "sh", path, owner]


def task_script(p: Plan, own: Mapping[str, Mapping[str, str]]) -> str:
    """What every srun task runs: its node's line of the plan, picked by SLURMD_NODENAME, in
    the code dir whose lock it holds."""
    endpoint = f"{p.master_addr}:{p.master_port}"
    lock = HOLD_LOCK.format(run_id=shlex.quote(p.run_id))
    lines = [CHECKPOINT_DIR_SH, 'case "$SLURMD_NODENAME" in']
    for n in p.nodes:
        env = "".join(f"export {shlex.quote(f'{k}={v}')}; " for k, v in own[n.node].items())
        lines.append(
            f"  {shlex.quote(n.node)}) cd {shlex.quote(n.cwd)} || exit 2; {lock}{env}"
            f"exec {torchrun_argv(n, endpoint)} ;;"
        )
    lines.append('  *) echo "ddpfleet: no plan for node $SLURMD_NODENAME" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines) + "\n"


def output_path(output_dir: str, job_id: str = "%j") -> str:
    """The job's output file (srun's labelled lines); sbatch fills in %j."""
    return f"{output_dir}/slurm-{job_id}.out"


def record_path(output_dir: str, job_id: str) -> str:
    """What the batch script records beside its output: the job's nodes in task order, then
    srun's exit. It outlives Slurm's memory of the job (no accounting database here)."""
    return f"{output_dir}/slurm-{job_id}.state"


def batch_script(p: Plan) -> str:
    common, own = split_env(p)
    exports = "".join(f"export {shlex.quote(f'{k}={v}')}\n" for k, v in common.items())
    srun = ["srun", "--kill-on-bad-exit=1", "--label", "--ntasks-per-node=1", "--wait=30"]
    # Not exec'd: the batch shell outlives srun to write its exit (a cancel kills it first,
    # so a record without an exit is a job that did not end on its own).
    record = shlex.quote(p.nodes[0].log_dir) + '/slurm-"$SLURM_JOB_ID".state'
    return (
        "#!/bin/sh\n"
        + exports
        + f"record={record}\n"
        + "echo \"nodes $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | tr '\\n' ' ')\" "
        + '>"$record"\n'
        + shlex.join([*srun, "/bin/sh", "-c", task_script(p, own)])
        + '\nrc=$?\necho "exit $rc" >>"$record"\nexit "$rc"\n'
    )


def parse_record(text: str) -> tuple[tuple[str, ...], int | None]:
    """The batch script's record -> (the job's nodes in task order, srun's exit or None)."""
    nodes: tuple[str, ...] = ()
    code = None
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        if key == "nodes":
            nodes = tuple(rest.split())
        elif key == "exit" and rest.strip().lstrip("-").isdigit():
            code = int(rest.strip())
    return nodes, code


def sbatch_argv(p: Plan, output: str) -> list[str]:
    """sbatch reading the script on stdin; --parsable prints the job id alone."""
    return [
        "sbatch",
        "--parsable",
        f"--job-name=ddpfleet-{p.run_id}",
        f"--nodes={p.nnodes}",
        f"--nodelist={','.join(n.node for n in p.nodes)}",
        "--ntasks-per-node=1",
        "--exclusive",
        f"--chdir={p.nodes[0].cwd}",
        f"--output={output}",
    ]


def job_user(users: Sequence[tuple[str, str | None]]) -> str | None:
    """Who the job runs as, from (node, its training user) in run order: Slurm runs a job under
    one uid everywhere, so every node must name the same user. None: the login user."""
    names = {user for _, user in users}
    if len(names) > 1:
        said = ", ".join(f"{node}: {user}" for node, user in users)
        raise PlanError(
            f"{users[0][0]}: a slurm job runs as one user, but train_user.name differs ({said}); "
            "give every node of the run the same train_user"
        )
    return users[0][1] if users else None


def as_job_user(user: str | None, login: str, argv: list[str]) -> tuple[list[str], bool]:
    """(argv, whether root must run it): a command of the job's (sbatch, scancel, reading its
    files) as its user. The login user runs it itself when it is that user; any other user is
    reached by root through runuser, whose PAM session applies that user's limits.conf, which
    Slurm hands on to every task (PropagateResourceLimits)."""
    if user is None or user == login:
        return argv, False
    return ["runuser", "-u", user, "--", *argv], True


def parse_job(text: str) -> dict[str, str]:
    """`scontrol -o show job ID`: one line of Key=Value words -> dict (values have no spaces,
    but for a few we do not read)."""
    out = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


@dataclass
class JobOutput:
    """The job's output file, fed as it grows; lines come out with their node and rank."""

    nodes: tuple[str, ...] = ()  # the job's node list, in task order
    nproc: int = 1
    failed_tasks: list[tuple[str, int | None]] = field(default_factory=list)  # (node, exit)

    def line(self, raw: str) -> tuple[str, int | None, str]:
        """(node, rank, text); node is "slurm" for srun's own words, rank None for the agent."""
        m = LABEL.match(raw)
        if m is None:
            if f := TASK_FAILED.search(raw):
                code = int(f.group(4)) if f.group(4) else None
                self.failed_tasks.append((f.group(1), code))
            return "slurm", None, raw
        task, body = int(m.group(1)), m.group(2)
        node = self.nodes[task] if task < len(self.nodes) else f"task{task}"
        rank, text = split_rank(body, task, self.nproc)
        return node, rank, text


def exit_code(job: Mapping[str, str]) -> int:
    """ExitCode=1:0 (status:signal) -> 1; a signal n -> -n."""
    status, _, signal = job.get("ExitCode", "0:0").partition(":")
    if status.isdigit() and int(status):
        return int(status)
    return -int(signal) if signal.isdigit() and int(signal) else 0
