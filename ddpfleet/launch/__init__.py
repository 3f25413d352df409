"""`invoke train`: torchrun on every node as one gang. Plan, preflight, sync, run, collect.

    flags = TrainFlags(nodes=("node0", "node1"), run_id=new_run_id())
    with Fleet(inventory, nodes) as fleet:
        train(fleet, flags)          # raises DdpfleetError naming the first failing node

1. plan() is pure: inventory + flags + per-node facts -> per node the exact torchrun argv,
   environment and working directory, shown as a table before anything starts.
2. Preflight, every node in parallel, nothing started on failure, one line per problem:
   one probe per node (env python, torch/CUDA/NCCL versions, GPUs, addresses, the code dir
   claimed and locked for this run with its manifest), a fresh run id, the master port bound
   on the master and connected to from every worker, the script present after the sync
   (ddpfleet.sync: only what changed, deleting only what it sent itself).
3. One exec channel per node runs scripts/gang_runner.py, which owns torchrun and everything
   it starts (see its docstring: setsid, subreaper, stdin as the lifeline). The controller
   prefixes every line with its node and rank, writes logs/<run-id>/<node>.log, stops every
   node when one fails or its connection drops, and on Ctrl-C (twice: kill at once).
4. torchrun's per-rank logs come back over SFTP; one summary line per node.

This package does not import Invoke; tasks.py resolves the flags and calls train().
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
    TrainFlags,
    check_code_dir,
    check_nproc,
    check_run_id,
    new_run_id,
    parse_env,
    run_order,
)
from ddpfleet.launch.display import PLAIN_ENV, SECRET_HINTS, _shown_env, render_plan
from ddpfleet.launch.gang import Gang
from ddpfleet.launch.logs import RANK_LOG, fetch_rank_logs, local_log_name
from ddpfleet.launch.member import (
    CONTROL,
    HEARTBEAT_S,
    RUNNER_FILES,
    STOP_GRACE_S,
    TAIL_CHARS,
    WATCHDOG_S,
    Member,
)
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
    fresh_run_dir,
    open_members,
    port_problems,
    preflight,
    reused_run_id,
)
from ddpfleet.launch.run import conclude, prepare, push_code, train

__all__ = [
    "_shown_env",
    "AGENT_SAW_FAILURE",
    "check_code_dir",
    "check_nproc",
    "check_run_id",
    "check_versions",
    "Clues",
    "conclude",
    "CONNECT_CHECK_S",
    "CONTROL",
    "DEFAULT_CODE_DIR",
    "DEFAULT_REMOTE_LOGS",
    "DEFAULT_SCRIPT",
    "ENV_NAME_RE",
    "exit_text",
    "failure_message",
    "fetch_rank_logs",
    "first_failure",
    "fresh_run_dir",
    "Gang",
    "HEARTBEAT_S",
    "LineSplitter",
    "local_log_name",
    "master_address",
    "MAX_LINE",
    "Member",
    "new_run_id",
    "NodeFacts",
    "NodePlan",
    "nproc_per_node",
    "open_members",
    "Outcome",
    "Output",
    "parse_env",
    "PLAIN_ENV",
    "Plan",
    "plan",
    "port_problems",
    "preflight",
    "prepare",
    "Probed",
    "push_code",
    "RANK_LINE",
    "RANK_LOG",
    "render_plan",
    "reused_run_id",
    "RUN_ID_RE",
    "run_order",
    "RUNNER_FILES",
    "SECRET_HINTS",
    "socket_ifname",
    "split_rank",
    "STOP_GRACE_S",
    "SUMMARY_EXIT",
    "summary_line",
    "SUMMARY_RANK",
    "sync",
    "TAIL_CHARS",
    "TRACEBACK",
    "train",
    "TrainFlags",
    "WATCHDOG_S",
]
