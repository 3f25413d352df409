"""Jupyter on the nodes, from the controller: settings, the password, the service, the tunnel.

The jupyter role (roles/jupyter) makes each node's server; `invoke jupyter`, `jupyter.status`
and `jupyter.stop` reach it. Both take what they share from here:

    settings.py   Settings (the role's config, resolved once) and the password's sources
    node.py       the node's state in one probe, argv builders (as_user, start, stop, wait)
    jobs.py       status, stop, open_tunnel: what the tasks do (the tunnel is ddpfleet.tunnel)

(jobs.py, not status.py: a module named like its `status` function would be shadowed by it.)
Every name the module had before the split is still importable from ddpfleet.jupyter.
"""

from ddpfleet.jupyter.jobs import (
    STATUS_COLUMNS,
    node_status,
    open_tunnel,
    server_list,
    show_status,
    status,
    stop,
)
from ddpfleet.jupyter.node import (
    CONFIG_NAME,
    LIBEXEC,
    LOG_PATH,
    PROBE_SH,
    PROCTREE,
    PROCTREE_SOURCE,
    READ_SH,
    SERVICE,
    STATE_DIR,
    STOP_SH,
    SUPERVISOR,
    UNIT_PATH,
    WAIT_PY,
    NodeState,
    Runner,
    as_user,
    config_path,
    hashed_password,
    log_tail_command,
    parse_state,
    probe_script,
    quick,
    read_config,
    read_state,
    server_argv,
    start_command,
    stop_command,
    supervisor_argv,
    user_path,
    wait_command,
)
from ddpfleet.jupyter.settings import (
    USER_NAME,
    Settings,
    _prompt,
    _prompt_lock,
    _prompted,
    default_user,
    find_secret,
    for_node,
    no_secret_message,
    read_secret_file,
    settings,
)
from ddpfleet.shell import Secret
from ddpfleet.ssh.tunnel import tunnel

__all__ = [
    "CONFIG_NAME",
    "LIBEXEC",
    "LOG_PATH",
    "PROBE_SH",
    "PROCTREE",
    "PROCTREE_SOURCE",
    "READ_SH",
    "SERVICE",
    "STATE_DIR",
    "STATUS_COLUMNS",
    "STOP_SH",
    "SUPERVISOR",
    "UNIT_PATH",
    "USER_NAME",
    "WAIT_PY",
    "NodeState",
    "Runner",
    "Secret",
    "Settings",
    "_prompt",
    "_prompt_lock",
    "_prompted",
    "as_user",
    "config_path",
    "default_user",
    "find_secret",
    "for_node",
    "hashed_password",
    "log_tail_command",
    "no_secret_message",
    "node_status",
    "open_tunnel",
    "parse_state",
    "probe_script",
    "quick",
    "read_config",
    "read_secret_file",
    "read_state",
    "server_argv",
    "server_list",
    "settings",
    "show_status",
    "start_command",
    "status",
    "stop",
    "stop_command",
    "supervisor_argv",
    "tunnel",
    "user_path",
    "wait_command",
]  # fmt: skip
