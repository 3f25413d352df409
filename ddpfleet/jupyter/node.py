"""Jupyter on one node: its state in one read-only round trip, and the commands that run it.

The jupyter role (roles/jupyter) makes each node's server with these; the jobs in status.py
read it with them:

    probe_script   one read-only round trip: the user, the env, the service; parse_state reads it
    as_user        argv that runs a command as the Jupyter user with a clean environment
    *_command      start (supervised), stop, wait for the port, the log's tail

Files on a node:

    ~USER/.jupyter/jupyter_server_config.json   0600, written as USER (root never writes into a
                                                directory USER controls: no symlink games)
    /etc/systemd/system/ddpfleet-jupyter.service         where PID 1 is systemd, else:
    /usr/local/libexec/ddpfleet/jupyter-supervise        restarts the server when it dies, ends
    /usr/local/libexec/ddpfleet/proctree.py              its tree on a stop (ddpfleet/node/proctree.py)
    /var/lib/ddpfleet/jupyter/{supervisor,server}.pid    its pidfiles (root only), and `cgroup`:
                                                         the server's own cgroup v2, if it has one
    /var/log/ddpfleet-jupyter.log                        the server's output (root only)
"""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ddpfleet import rootlog
from ddpfleet.facts import parse_facts
from ddpfleet.inventory import Node
from ddpfleet.jupyter.settings import Settings
from ddpfleet.node import NODE_DIR
from ddpfleet.ssh.connection import Result

SERVICE = "ddpfleet-jupyter"
UNIT_PATH = f"/etc/systemd/system/{SERVICE}.service"
LIBEXEC = "/usr/local/libexec/ddpfleet"
SUPERVISOR = f"{LIBEXEC}/jupyter-supervise"
PROCTREE = f"{LIBEXEC}/proctree.py"  # the supervisor imports it from its own directory
# The one copy of proctree.py, the training runs' too: the role installs it as it is.
PROCTREE_SOURCE = NODE_DIR / "proctree.py"
STATE_DIR = "/var/lib/ddpfleet/jupyter"
LOG_PATH = "/var/log/ddpfleet-jupyter.log"
CONFIG_NAME = "jupyter_server_config.json"  # .json: it wins over a .py in the same directory


class Runner(Protocol):
    """What runs commands on a node: a Conn (tasks) or the roles engine's Host."""

    node: Node

    def run(
        self,
        command: str | list[str],
        stdin: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> Result: ...


def quick(runner: Runner) -> float:
    """The bound on a read-only round trip (ssh.command_timeout): a hung probe fails the node,
    it never hangs the job."""
    return runner.node.command_timeout


# -- the node's state in one round trip -----------------------------------------------------

PROBE_SH = r"""
user=$1 state=$2 env=$3 port=$4 unit=$5 libexec=$6
ours() { case $1 in ''|*[!0-9]*) return 1;; esac
         tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"; }
pid1=$(cat /proc/1/comm 2>/dev/null)
echo "pid1=$pid1"
getent passwd "$user" | awk -F: '{print "uid=" $3 "\ngid=" $4 "\nhome=" $6 "\nshell=" $7}'
[ -x "$env/bin/jupyter-lab" ] && echo lab=1
[ -d "$state" ] && echo state_dir=1
[ -d "$libexec" ] && echo libexec=1
sp=$(cat "$state/supervisor.pid" 2>/dev/null)
ours "$sp" jupyter-supervise && echo "supervisor_pid=$sp" &&
  echo "supervisor_argv=$(base64 -w0 < "/proc/$sp/cmdline")"
p=$(cat "$state/server.pid" 2>/dev/null)
ours "$p" jupyter && echo "server_pid=$p"
if [ "$pid1" = systemd ]; then
  echo "unit_active=$(systemctl is-active "$unit" 2>/dev/null)"
  echo "unit_enabled=$(systemctl is-enabled "$unit" 2>/dev/null)"
  echo "unit_pid=$(systemctl show -p MainPID --value "$unit" 2>/dev/null)"
fi
py=$env/bin/python; [ -x "$py" ] || py=python3
"$py" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2)' \
  "$port" 2>/dev/null && echo port_open=1
true
"""


def probe_script(s: Settings) -> str:
    return shlex.join(
        ["sh", "-c", PROBE_SH, "sh", s.user, STATE_DIR, s.env_dir, str(s.port), SERVICE, LIBEXEC]
    )


@dataclass(frozen=True)
class NodeState:
    """What probe_script saw. Example output it parses:

    pid1=sandbox-init        uid=999  gid=999  home=/home/jupyter  shell=/bin/bash
    lab=1  state_dir=1  libexec=1  supervisor_pid=812  server_pid=815  port_open=1
    supervisor_argv=L2Jpbi9zaAAvdXNyL2xvY2Fs...   (base64 of /proc/812/cmdline)
    """

    pid1: str = ""
    uid: str = ""
    gid: str = ""
    home: str = ""
    shell: str = ""
    lab: bool = False
    state_dir: bool = False
    libexec: bool = False
    supervisor_pid: int | None = None
    supervisor_argv: tuple[str, ...] = ()
    server_pid: int | None = None
    unit_active: str = ""
    unit_enabled: str = ""
    unit_pid: int | None = None
    port_open: bool = False

    @property
    def systemd(self) -> bool:
        return self.pid1 == "systemd"

    @property
    def running(self) -> bool:
        return self.unit_active == "active" if self.systemd else self.supervisor_pid is not None

    @property
    def pid(self) -> int | None:
        return self.unit_pid if self.systemd else self.server_pid


def parse_state(facts: Mapping[str, str]) -> NodeState:
    def pid(key: str) -> int | None:
        value = facts.get(key, "")
        return int(value) if value.isdigit() and value != "0" else None

    argv = base64.b64decode(facts.get("supervisor_argv", "")).decode(errors="replace")
    return NodeState(
        pid1=facts.get("pid1", ""),
        uid=facts.get("uid", ""),
        gid=facts.get("gid", ""),
        home=facts.get("home", ""),
        shell=facts.get("shell", ""),
        lab=facts.get("lab") == "1",
        state_dir=facts.get("state_dir") == "1",
        libexec=facts.get("libexec") == "1",
        supervisor_pid=pid("supervisor_pid"),
        supervisor_argv=tuple(argv.split("\0")[:-1]),
        server_pid=pid("server_pid"),
        unit_active=facts.get("unit_active", ""),
        unit_enabled=facts.get("unit_enabled", ""),
        unit_pid=pid("unit_pid"),
        port_open=facts.get("port_open") == "1",
    )


def read_state(node: Runner, s: Settings) -> NodeState:
    return parse_state(parse_facts(node.run(probe_script(s), timeout=quick(node)).stdout))


# -- commands on the node --------------------------------------------------------------------


def user_path(s: Settings) -> str:
    """The env first, so a notebook terminal's python and pip are the env's."""
    return f"{s.env_dir}/bin:/usr/local/bin:/usr/bin:/bin"


def as_user(s: Settings, state: NodeState, cwd: str, argv: list[str]) -> list[str]:
    """argv run as the Jupyter user in `cwd` with only the environment a login would give:
    setpriv execs (the server keeps the pid the supervisor saw); env -i drops root's variables
    (JUPYTER_*, XDG_*) so the server and `jupyter server list` agree on the runtime dir."""
    return [
        "setpriv",
        f"--reuid={s.user}",
        f"--regid={state.gid}",
        "--init-groups",
        "env",
        "-i",
        "-C",
        cwd,
        f"HOME={state.home}",
        f"USER={s.user}",
        f"LOGNAME={s.user}",
        f"SHELL={state.shell or '/bin/sh'}",
        f"PATH={user_path(s)}",
        "LANG=C.UTF-8",
        *argv,
    ]


def server_argv(s: Settings, state: NodeState, root_dir: str) -> list[str]:
    return as_user(s, state, root_dir, [s.lab])


def supervisor_argv(s: Settings, state: NodeState, root_dir: str) -> list[str]:
    """The supervisor (Python, stdlib only) runs on the env's python: it is there on every node
    that has a server to supervise."""
    return [s.python, "-I", SUPERVISOR, STATE_DIR, *server_argv(s, state, root_dir)]


STOP_SH = r"""state=$1
sp=$(cat "$state/supervisor.pid" 2>/dev/null)
case $sp in ''|*[!0-9]*) exit 0;; esac
if tr '\0' ' ' < "/proc/$sp/cmdline" 2>/dev/null | grep -q jupyter-supervise; then
  kill -TERM "$sp"
  i=0
  # the supervisor gives the server 20 s to shut its kernels down, then kills what is left
  while [ -d "/proc/$sp" ] && [ $i -lt 200 ]; do sleep 0.2; i=$((i + 1)); done
  if [ -d "/proc/$sp" ]; then
    # a supervisor that hangs: its process group, and the server's cgroup with the kernels
    kill -KILL -- "-$sp" 2>/dev/null
    cg=$(cat "$state/cgroup" 2>/dev/null)
    [ -n "$cg" ] && [ -f "$cg/cgroup.kill" ] && echo 1 >"$cg/cgroup.kill"
  fi
  echo "stopped=$sp"
fi
rm -f "$state/supervisor.pid" "$state/server.pid" "$state/cgroup"
"""

WAIT_PY = """import socket, sys, time
port, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.25)
sys.exit(1)
"""


def start_command(s: Settings, state: NodeState, root_dir: str) -> list[str]:
    """The supervisor started detached, its output appended to LOG_PATH (ddpfleet.rootlog)."""
    return rootlog.start_detached(s.python, LOG_PATH, supervisor_argv(s, state, root_dir))


def stop_command(state: NodeState) -> list[str]:
    if state.systemd:
        return ["systemctl", "stop", SERVICE]
    return ["sh", "-c", STOP_SH, "sh", STATE_DIR]


def wait_command(s: Settings, seconds: float = 90) -> list[str]:
    return [s.python, "-I", "-c", WAIT_PY, str(s.port), str(seconds)]


def log_tail_command(lines: int = 5) -> list[str]:
    return ["tail", "-n", str(lines), LOG_PATH]


READ_SH = 'stat -c "%a %U" "$1" 2>/dev/null || exit 3; cat "$1"'


def config_path(state: NodeState) -> str:
    return f"{state.home}/.jupyter/{CONFIG_NAME}"


def read_config(node: Runner, s: Settings, state: NodeState) -> tuple[str, str | None]:
    """('600 jupyter', text) of the user's server config, read as the user; ('', None) when
    it is absent or the user cannot read it."""
    result = node.run(
        as_user(s, state, state.home, ["sh", "-c", READ_SH, "sh", config_path(state)]), check=False
    )
    if result.exit_code != 0:
        return "", None
    mode_owner, _, text = result.stdout.partition("\n")
    return mode_owner, text


def hashed_password(text: str | None) -> str:
    try:
        return str(json.loads(text or "")["PasswordIdentityProvider"]["hashed_password"])
    except (ValueError, KeyError, TypeError):
        return ""
