"""The plan as a person reads it: the command once, what differs per node as a short table,
the shared env and cwd once; --env values that may be secrets masked."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from rich.console import Group

from ddpfleet import report
from ddpfleet.launch.plan import NodePlan, Plan

SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
# --env names whose values the plan table shows: knobs of torch, NCCL, CUDA and the runtime.
PLAIN_ENV = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_LAUNCH_BLOCKING",
        "CUBLAS_WORKSPACE_CONFIG",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "PYTHONUNBUFFERED",
        "PYTHONHASHSEED",
        "PYTHONFAULTHANDLER",
        "LOGLEVEL",
        "TORCH_DISTRIBUTED_DEBUG",
        "TORCH_CPP_LOG_LEVEL",
        "TORCH_SHOW_CPP_STACKTRACES",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "TORCH_NCCL_BLOCKING_WAIT",
        "PYTORCH_CUDA_ALLOC_CONF",
        "TOKENIZERS_PARALLELISM",
    }
)
PLAIN_ENV_PREFIXES = ("NCCL_", "GLOO_")
PLAIN_VALUES = frozenset({"", "0", "1", "true", "false", "yes", "no", "on", "off"})


def _shown_env(name: str, value: str, user: set[str]) -> str:
    """A --env value is shown only where it cannot be a secret: a name known to be harmless, or a
    one-bit value. The rest shows as ***: names do not say what a value holds (DATABASE_URL)."""
    if name not in user or value.lower() in PLAIN_VALUES:
        return f"{name}={value}"
    plain = (name in PLAIN_ENV or name.startswith(PLAIN_ENV_PREFIXES)) and not any(
        h in name.upper() for h in SECRET_HINTS
    )
    return f"{name}={value if plain else '***'}"


def render_plan(p: Plan, user_env: Sequence[tuple[str, str]] = ()) -> Group:
    """The torchrun command once, with {placeholders} where the nodes differ; a table of what
    differs per node (always node, node_rank, host); then the env and cwd the nodes share.

        run r1: 2 node(s) x 1 process(es), master node0 at 10.0.0.10:29500
        command: /opt/venv/bin/python -m torch.distributed.run ... --node-rank {node_rank} ...
        node   node_rank  host
        node0  0          10.0.0.10
        node1  1          10.0.0.11
        env: DDPFLEET_RUN_ID=r1 OMP_NUM_THREADS=1 ...
        cwd: /root/ddpfleet/demo/code
        checkpoints: /var/lib/ddpfleet/runs/r1/checkpoints (DDPFLEET_CHECKPOINT_DIR)
        spares: node3 at 10.0.0.13 (standing by, no ranks: one takes a lost node's node_rank)

    cwd is where the ranks run: a detached run's own copy of the code dir. Spares are not rows:
    they get a node_rank only when they replace a node.
    """
    user = {k for k, _ in user_env}
    gang = p.gang
    command, columns = _command(gang)
    env, env_columns = _env(gang, user)
    cwds = {n.cwd for n in gang}
    if len(cwds) > 1:
        env_columns.append(("cwd", [n.cwd for n in gang]))
    columns = [
        ("node", [n.node for n in gang]),
        ("host", [n.host for n in gang]),
        *columns,
        *env_columns,
    ]
    rows = list(zip(*(values for _, values in columns)))
    title = (
        f"run {p.run_id}: {p.nnodes} node(s) x {p.nproc} process(es), master "
        f"{p.master} at {p.master_addr}:{p.master_port}"
    )
    lines = [
        report.text(title),
        report.text(f"command: {command}"),
        report.table(None, [name for name, _ in columns], rows),
        report.text(f"env: {env}"),
    ]
    if "='=" in env:  # NCCL_SOCKET_IFNAME='=eth0' read as a typo for one '='
        lines.append(report.text("  (a value starting with '=' is NCCL's: exactly that interface)"))
    if len(cwds) == 1:
        lines.append(report.text(f"cwd: {cwds.pop()}"))
    checkpoints = {n.checkpoint_dir for n in p.nodes} - {""}
    if checkpoints:  # the same path on every node: the run's id names it
        lines.append(report.text(f"checkpoints: {checkpoints.pop()} ({CHECKPOINT_ENV})"))
    standby = [n for n in p.nodes if n.node in p.spares]
    if standby:
        where = ", ".join(f"{n.node} at {n.host}" for n in standby)
        lines.append(
            report.text(
                f"spares: {where} (standing by, no ranks: one takes a lost node's node_rank)"
            )
        )
    return Group(*lines)


def _command(nodes: Sequence[NodePlan]) -> tuple[str, list[tuple[str, list[str]]]]:
    """The argv every node runs, quoted once, and a column per word that differs: named after
    the flag before it ('--node-rank' -> node_rank), 'python' for the interpreter."""
    argvs = [n.argv for n in nodes]
    if len({len(a) for a in argvs}) > 1:  # not one command: show each node's whole
        return "(per node)", [("command", [shlex.join(a) for a in argvs])]
    words, columns = [], [("node_rank", [str(n.rank) for n in nodes])]
    for i, values in enumerate(zip(*argvs)):
        if len(set(values)) == 1:
            words.append(shlex.quote(values[0]))
            continue
        flag = argvs[0][i - 1] if i else ""
        name = (
            "python"
            if i == 0
            else flag[2:].replace("-", "_")
            if flag.startswith("--")
            else f"arg{i}"
        )
        words.append(f"{{{name}}}")
        if name != "node_rank":
            columns.append((name, list(values)))
    return " ".join(words), columns


CHECKPOINT_ENV = "DDPFLEET_CHECKPOINT_DIR"  # shown on its own line, not in env:


def _env(nodes: Sequence[NodePlan], user: set[str]) -> tuple[str, list[tuple[str, list[str]]]]:
    """NAME=value for what every node gets alike, and a column per variable that differs
    (unset on some, or another value); --env values that may be secrets show as ***."""
    names = [k for k in dict.fromkeys(k for n in nodes for k in n.env) if k != CHECKPOINT_ENV]
    shared, columns = [], []
    for name in names:
        values = [n.env.get(name) for n in nodes]
        shown = [None if v is None else _shown_env(name, v, user).split("=", 1)[1] for v in values]
        if len(set(values)) == 1:
            shared.append(f"{name}={_quoted(shown[0])}")
        else:
            columns.append((name, ["(unset)" if v is None else v for v in shown]))
    return " ".join(shared), columns


def _quoted(value: str) -> str:
    """Shell-quoted, and a value starting with '=' always quoted: NCCL_SOCKET_IFNAME's '=eth0'
    (exactly eth0) printed bare reads NCCL_SOCKET_IFNAME==eth0, a typo to the eye."""
    if value == "***":
        return value
    return (
        f"'{value}'"
        if value.startswith("=") and shlex.quote(value) == value
        else shlex.quote(value)
    )
