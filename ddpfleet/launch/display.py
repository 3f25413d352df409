"""The plan as a person reads it, with --env values that may be secrets masked."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from ddpfleet import report
from ddpfleet.launch.plan import Plan

SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
# --env names whose values the plan table shows: knobs of torch, NCCL, CUDA and the runtime.
PLAIN_ENV = frozenset({
    "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "PYTHONFAULTHANDLER", "LOGLEVEL",
    "TORCH_DISTRIBUTED_DEBUG", "TORCH_CPP_LOG_LEVEL", "TORCH_SHOW_CPP_STACKTRACES",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT", "PYTORCH_CUDA_ALLOC_CONF",
    "TOKENIZERS_PARALLELISM",
})
PLAIN_ENV_PREFIXES = ("NCCL_", "GLOO_")
PLAIN_VALUES = frozenset({"", "0", "1", "true", "false", "yes", "no", "on", "off"})


def _shown_env(name: str, value: str, user: set[str]) -> str:
    """A --env value is shown only where it cannot be a secret: a name known to be harmless, or a
    one-bit value. The rest shows as ***: names do not say what a value holds (DATABASE_URL)."""
    if name not in user or value.lower() in PLAIN_VALUES:
        return f"{name}={value}"
    plain = (name in PLAIN_ENV or name.startswith(PLAIN_ENV_PREFIXES)) and not any(
        h in name.upper() for h in SECRET_HINTS)
    return f"{name}={value if plain else '***'}"


def render_plan(p: Plan, user_env: Sequence[tuple[str, str]] = ()):
    user = {k for k, _ in user_env}
    rows = [(n.node, n.rank, n.host, shlex.join(n.argv),
             "\n".join(_shown_env(k, v, user) for k, v in n.env.items()), n.cwd)
            for n in p.nodes]
    title = (f"run {p.run_id}: {p.nnodes} node(s) x {p.nproc} process(es), master "
             f"{p.master} at {p.master_addr}:{p.master_port}")
    return report.table(title, ("node", "node_rank", "host", "command", "env", "cwd"), rows)
