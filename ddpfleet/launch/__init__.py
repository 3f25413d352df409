"""`invoke train`: torchrun on every node as one gang. Plan, preflight, sync, run, collect.

    config = resolve(inventory, TrainFlags(nodes=("node0", "node1")), log_root)
    with Fleet(inventory) as fleet:
        train(fleet, config)          # raises DdpfleetError naming the first failing node

0. resolve() (config.py) checks every flag against the inventory once, before any connection,
   into a frozen TrainConfig; nothing below reads the flags again.
1. plan() (plan.py) is pure: the config + per-node facts -> per node the exact torchrun argv,
   environment and working directory, shown (display.py) before anything starts.
2. Preflight, every node in parallel, nothing started on failure, one line per problem:
   one probe per node (env python, torch/CUDA/NCCL versions, GPUs, addresses, the code dir
   claimed and locked for this run with its manifest), a fresh run id, the master port bound
   on the master and connected to from every worker, the script present after the sync
   (sync.py: only what changed, deleting only what it sent itself).
3. One exec channel per node (member.py) runs ddpfleet/node/gang_runner.py, which owns torchrun and everything
   it starts (see its docstring: setsid, subreaper, stdin as the lifeline). The controller
   prefixes every line with its node and rank, writes logs/<run-id>/<node>.log, stops every
   node when one fails or its connection drops, and on Ctrl-C (twice: kill at once) (gang.py);
   what the output says about a failure is read by clues.py.
4. torchrun's per-rank logs come back over SFTP (ranklogs.py); one summary line per node and
   the verdict (outcome.py, run.py): the node that failed first is verdict.blame's, the rule
   every launcher shares, with the run states (verdict.RunState).

This package imports neither Invoke nor the SSH library: tasks.py gathers the flags, the connection
layer (Conn.session, Conn.sftp) carries the bytes.
"""

from __future__ import annotations

# The package's names, re-exported: callers and tests use ddpfleet.launch.X.
from ddpfleet.launch import sync
from ddpfleet.launch.clues import (
    AGENT_SAW_FAILURE,
    RANK_LINE,
    SUMMARY_EXIT,
    SUMMARY_RANK,
    TRACEBACK,
    Clues,
    split_rank,
)
from ddpfleet.launch.config import (
    DEFAULT_CODE_DIR,
    DEFAULT_REMOTE_LOGS,
    DEFAULT_SCRIPT,
    ENV_NAME_RE,
    RUN_ID_RE,
    TrainConfig,
    TrainFlags,
    check_code_dir,
    check_nproc,
    check_port,
    check_run_id,
    new_run_id,
    parse_env,
    project_key,
    resolve,
    run_order,
    split_args,
)
from ddpfleet.launch.display import PLAIN_ENV, SECRET_HINTS, _shown_env, render_plan
from ddpfleet.launch.outcome import (
    Outcome,
    exit_text,
    failure_message,
    first_failure,
    summary_line,
)
from ddpfleet.launch.output import MAX_LINE, LineSplitter, Output
from ddpfleet.launch.plan import (
    NodeFacts,
    NodePlan,
    Plan,
    check_versions,
    master_address,
    nproc_per_node,
    plan,
    socket_ifname,
)
from ddpfleet.launch.preflight import (
    CONNECT_CHECK_S,
    Probed,
    fail_if,
    fresh_run_dir,
    open_members,
    port_problems,
    preflight,
    reused_run_id,
)
from ddpfleet.launch.ssh.gang import Gang
from ddpfleet.launch.ssh.member import (
    CONTROL,
    HEARTBEAT_S,
    RUNNER_FILES,
    STOP_GRACE_S,
    TAIL_CHARS,
    WATCHDOG_S,
    Member,
)
from ddpfleet.launch.ssh.ranklogs import RANK_LOG, fetch_rank_logs, local_log_name
from ddpfleet.launch.ssh.run import prepare, push_code, train, verdict

__all__ = [
    "AGENT_SAW_FAILURE",
    "CONNECT_CHECK_S",
    "CONTROL",
    "DEFAULT_CODE_DIR",
    "DEFAULT_REMOTE_LOGS",
    "DEFAULT_SCRIPT",
    "ENV_NAME_RE",
    "HEARTBEAT_S",
    "MAX_LINE",
    "PLAIN_ENV",
    "RANK_LINE",
    "RANK_LOG",
    "RUNNER_FILES",
    "RUN_ID_RE",
    "SECRET_HINTS",
    "STOP_GRACE_S",
    "SUMMARY_EXIT",
    "SUMMARY_RANK",
    "TAIL_CHARS",
    "TRACEBACK",
    "WATCHDOG_S",
    "Clues",
    "Gang",
    "LineSplitter",
    "Member",
    "NodeFacts",
    "NodePlan",
    "Outcome",
    "Output",
    "Plan",
    "Probed",
    "TrainConfig",
    "TrainFlags",
    "_shown_env",
    "check_code_dir",
    "check_nproc",
    "check_port",
    "check_run_id",
    "check_versions",
    "exit_text",
    "fail_if",
    "failure_message",
    "fetch_rank_logs",
    "first_failure",
    "fresh_run_dir",
    "local_log_name",
    "master_address",
    "new_run_id",
    "nproc_per_node",
    "open_members",
    "parse_env",
    "plan",
    "port_problems",
    "preflight",
    "prepare",
    "project_key",
    "push_code",
    "render_plan",
    "resolve",
    "reused_run_id",
    "run_order",
    "socket_ifname",
    "split_args",
    "split_rank",
    "summary_line",
    "sync",
    "train",
    "verdict",
]
