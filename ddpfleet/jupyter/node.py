"""Jupyter on the nodes, from the controller: settings, the password, the service, the tunnel.

The jupyter role (roles/jupyter) makes each node's server; `invoke jupyter`, `jupyter.status`
and `jupyter.stop` reach it. Both take what they share from here:

    Settings       the role's config, resolved once (user, port, env, root_dir, password sources)
    Secret         the password; it prints as *** (str, repr, f-strings, tracebacks)
    probe_script   one read-only round trip: the user, the env, the service; parse_state reads it
    as_user        argv that runs a command as the Jupyter user with a clean environment
    tunnel         127.0.0.1:<local port> here -> 127.0.0.1:<port> on the node, over SSH

Files on a node:

    ~USER/.jupyter/jupyter_server_config.json   0600, written as USER (root never writes into a
                                                directory USER controls: no symlink games)
    /etc/systemd/system/ddpfleet-jupyter.service         where PID 1 is systemd, else:
    /usr/local/libexec/ddpfleet/jupyter-supervise        restarts the server when it dies
    /var/lib/ddpfleet/jupyter/{supervisor,server}.pid    its pidfiles (root only)
    /var/log/ddpfleet-jupyter.log                        the server's output (root only)
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import select
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paramiko

from ddpfleet.connection import Conn, Fleet, Result
from ddpfleet.errors import DdpfleetError, InventoryError, NodeError, Unreachable
from ddpfleet.inventory import Inventory, Node

SERVICE = "ddpfleet-jupyter"
UNIT_PATH = f"/etc/systemd/system/{SERVICE}.service"
LIBEXEC = "/usr/local/libexec/ddpfleet"
SUPERVISOR = f"{LIBEXEC}/jupyter-supervise"
STATE_DIR = "/var/lib/ddpfleet/jupyter"
LOG_PATH = "/var/log/ddpfleet-jupyter.log"
CONFIG_NAME = "jupyter_server_config.json"  # .json: it wins over a .py in the same directory
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class Runner(Protocol):
    """What runs commands on a node: a Conn (tasks) or the roles engine's Host."""

    def run(
        self,
        command: str | list[str],
        stdin: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> Result: ...


# -- settings and the password ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    user: str
    port: int
    root_dir: str  # '' = the user's home
    env_dir: str
    create_user: bool
    password_env: str
    password_file: str

    @property
    def lab(self) -> str:
        return f"{self.env_dir}/bin/jupyter-lab"

    @property
    def jupyter(self) -> str:
        return f"{self.env_dir}/bin/jupyter"

    @property
    def python(self) -> str:
        return f"{self.env_dir}/bin/python"


def settings(cfg: Mapping[str, Any], env_dir: str) -> Settings:
    """The role's resolved config as Settings; a bad value is an InventoryError with the fix."""
    port, user = cfg["port"], str(cfg["user"] or "")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InventoryError(f"jupyter.port {port!r}: use a port from 1 to 65535")
    if user == "root":
        raise InventoryError(
            "jupyter.user is root: Jupyter runs notebook code as its user, so "
            "it never runs as root; set jupyter.user (default: jupyter)"
        )
    if not USER_NAME.match(user):
        raise InventoryError(f"jupyter.user {user!r}: not a valid user name")
    return Settings(
        user,
        port,
        str(cfg["root_dir"] or ""),
        env_dir,
        bool(cfg["create_user"]),
        str(cfg["password_env"] or ""),
        str(cfg["password_file"] or ""),
    )


def for_node(inventory: Inventory, node: Node) -> Settings:
    from ddpfleet import envs
    from ddpfleet.roles import load_role

    cfg = load_role("jupyter").config(inventory, node)
    return settings(cfg, cfg["env_dir"] or envs.env_dir(inventory, node))


class Secret:
    """A password on its way to argon2. Only reveal() gives the text; everything else says ***."""

    __slots__ = ("_text",)

    def __init__(self, text: str):
        self._text = text

    def reveal(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"


_prompted: list[Secret] = []
_prompt_lock = threading.Lock()


def no_secret_message(s: Settings) -> str:
    return (
        f"no Jupyter password: set ${s.password_env or 'DDPFLEET_JUPYTER_PASSWORD'} on the "
        "controller, or jupyter.password_file in the inventory, or run bootstrap in a "
        "terminal to be asked"
    )


def find_secret(s: Settings, root: Path, ask: bool) -> Secret | None:
    """From $password_env, else password_file (relative to the inventory), else a terminal
    prompt (only when `ask`: once per run, shared by every node); None when none of these."""
    if s.password_env and os.environ.get(s.password_env):
        return Secret(os.environ[s.password_env])
    if s.password_file:
        return read_secret_file(root / Path(s.password_file).expanduser())
    if ask and sys.stdin.isatty():
        return _prompt()
    return None


def read_secret_file(path: Path) -> Secret:
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text().rstrip("\r\n")
    except OSError as e:
        raise InventoryError(f"jupyter.password_file {path}: {e.strerror or e}") from None
    if mode & 0o077:
        raise InventoryError(
            f"jupyter.password_file {path} is readable by others (mode "
            f"{mode:04o}); chmod 600 {path}"
        )
    if not text:
        raise InventoryError(f"jupyter.password_file {path} is empty")
    return Secret(text)


def _prompt() -> Secret:
    from ddpfleet import report

    with _prompt_lock:  # nodes run in parallel: the first asks, the others reuse the answer
        if not _prompted:
            report.console.print("Jupyter password for the cluster's notebooks (not echoed)")
            first = getpass.getpass("password: ")
            if not first or getpass.getpass("again: ") != first:
                raise InventoryError("the Jupyter passwords were empty or differ; run again")
            _prompted.append(Secret(first))
        return _prompted[0]


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
    from ddpfleet.facts import parse_facts

    return parse_state(parse_facts(node.run(probe_script(s)).stdout))


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
    return [SUPERVISOR, STATE_DIR, *server_argv(s, state, root_dir)]


START_SH = """log=$1; shift
touch "$log" && chmod 600 "$log" || exit 1
setsid -f "$@" </dev/null >>"$log" 2>&1"""

STOP_SH = r"""state=$1
sp=$(cat "$state/supervisor.pid" 2>/dev/null)
case $sp in ''|*[!0-9]*) exit 0;; esac
if tr '\0' ' ' < "/proc/$sp/cmdline" 2>/dev/null | grep -q jupyter-supervise; then
  kill -TERM "$sp"
  i=0
  while [ -d "/proc/$sp" ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
  # 30 s and the server still has not shut down its kernels: end the whole process group
  [ -d "/proc/$sp" ] && kill -KILL -- "-$sp" 2>/dev/null
  echo "stopped=$sp"
fi
rm -f "$state/supervisor.pid" "$state/server.pid"
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
    return ["sh", "-c", START_SH, "sh", LOG_PATH, *supervisor_argv(s, state, root_dir)]


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


# -- status and stop -------------------------------------------------------------------------


def server_list(node: Runner, s: Settings, state: NodeState) -> list[dict]:
    """`jupyter server list --json` as the Jupyter user (its runtime dir, its pids), tokens
    dropped: they are credentials and nobody here needs them."""
    out = node.run(
        as_user(s, state, state.home or "/", [s.jupyter, "server", "list", "--json"]), check=False
    ).stdout
    servers = []
    for line in out.splitlines():
        try:
            info = json.loads(line)
        except ValueError:
            continue
        if isinstance(info, dict):
            info.pop("token", None)
            servers.append(info)
    return servers


STATUS_COLUMNS = ("node", "state", "pid", "port", "service", "password", "root_dir", "version")


def node_status(conn: Conn, s: Settings) -> dict:
    """One node's row: the service as `jupyter server list` sees it, as the Jupyter user."""
    state = read_state(conn, s)
    row: dict[str, Any] = {
        "node": conn.name,
        "port": s.port,
        "user": s.user,
        "service": "systemd" if state.systemd else "supervised",
    }
    if not state.uid:
        return {**row, "state": f"not installed (no user {s.user})"}
    ours = [x for x in server_list(conn, s, state) if x.get("port") == s.port]
    if not ours:
        return {**row, "state": "starting or failing" if state.running else "stopped"}
    info = ours[0]
    # server list's own "password" field reads the deprecated ServerApp.password: always False
    # with PasswordIdentityProvider.hashed_password, so the config file says it instead
    hashed = hashed_password(read_config(conn, s, state)[1])
    return {
        **row,
        "state": "running",
        "pid": info.get("pid"),
        "url": info.get("url"),
        "root_dir": info.get("root_dir"),
        "password": hashed.split(":")[0] or "none",
        "version": info.get("version"),
    }


def status(fleet: Fleet) -> dict[str, dict | NodeError]:
    return fleet.map(lambda conn: node_status(conn, for_node(fleet.inventory, conn.node)))


def show_status(results: Mapping[str, dict | NodeError], as_json: bool = False) -> None:
    """A table, or with as_json one object per line (keys: STATUS_COLUMNS, url, user, error)."""
    from ddpfleet import report

    rows = [
        r if isinstance(r, dict) else {"node": n, "state": "error", "error": r.message}
        for n, r in results.items()
    ]
    if as_json:
        for row in rows:
            print(json.dumps(row, sort_keys=True), flush=True)
        return
    report.show(
        report.table(
            "jupyter", STATUS_COLUMNS, [[row.get(c, "") for c in STATUS_COLUMNS] for row in rows]
        )
    )


def stop(fleet: Fleet) -> dict[str, str | NodeError]:
    """Stop each node's server (systemd unit or supervisor); bootstrap starts it again."""

    def one(conn: Conn) -> str:
        s = for_node(fleet.inventory, conn.node)
        state = read_state(conn, s)
        if not state.running:
            return "not running"
        conn.run(stop_command(state), timeout=60)
        return f"stopped (was pid {state.pid})" if state.pid else "stopped"

    return fleet.map(one)


# -- the tunnel ------------------------------------------------------------------------------


def open_tunnel(inventory: Inventory, local_port: int) -> None:
    """`invoke jupyter`: the tunnel to the first selected node's Jupyter, until Ctrl-C."""
    from ddpfleet import report

    node = inventory.nodes[0]
    s = for_node(inventory, node)
    with Fleet(inventory, [node]) as fleet:
        conn = fleet.open()[node.name]
        if isinstance(conn, NodeError):
            raise conn

        def ready(port: int) -> None:
            report.show(
                f"{node.name}: Jupyter (127.0.0.1:{s.port} on the node) is at\n"
                f"  http://127.0.0.1:{port}/lab\n"
                "log in with the Jupyter password; Ctrl-C closes the tunnel"
            )

        tunnel(conn, s.port, local_port, ready)
    report.show(f"{node.name}: tunnel closed")


def tunnel(conn: Conn, remote_port: int, local_port: int, on_ready: Callable[[int], None]) -> None:
    """127.0.0.1:local_port here -> 127.0.0.1:remote_port on the node until Ctrl-C, each local
    connection one direct-tcpip channel on the run's SSH transport (what `ssh -L` does)."""
    listener = _listen(local_port)
    previous = _term_as_interrupt()
    try:
        _channel(conn, remote_port, ("127.0.0.1", 0)).close()  # fail now, not in the browser
        conn.transport.set_keepalive(30)
        on_ready(listener.getsockname()[1])
        _serve(conn, listener, remote_port)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _term_as_interrupt():
    """SIGTERM (a script's `kill`) closes the tunnel the way Ctrl-C does; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))  # this machine only, like the node's side
    except OSError as e:
        sock.close()
        raise DdpfleetError(
            f"cannot listen on 127.0.0.1:{port} here ({e.strerror or e}); pass "
            "--local-port with a free port (0 picks one)"
        ) from None
    sock.listen(16)
    return sock


def _channel(conn: Conn, port: int, origin: tuple[str, int]) -> paramiko.Channel:
    try:
        return conn.transport.open_channel("direct-tcpip", ("127.0.0.1", port), origin, timeout=10)
    except paramiko.ChannelException as e:
        raise NodeError(
            conn.name,
            f"nothing answers on 127.0.0.1:{port} on the node "
            f"({e.text}); start it with `invoke bootstrap --roles jupyter`, "
            "see `invoke jupyter.status`",
        ) from None
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise Unreachable(
            conn.name, f"SSH connection lost ({e}); run invoke jupyter again"
        ) from None


def _serve(conn: Conn, listener: socket.socket, port: int) -> None:
    from ddpfleet import report

    while conn.transport.is_active():
        if not select.select([listener], [], [], 1.0)[0]:
            continue
        client, origin = listener.accept()
        try:
            chan = _channel(conn, port, origin)
        except Unreachable:
            client.close()
            raise
        except NodeError as e:  # the server restarting: this request fails, the tunnel stays
            client.close()
            report.warn(str(e))
            continue
        threading.Thread(target=_pump, args=(client, chan), daemon=True).start()
    raise Unreachable(conn.name, "the SSH connection closed; run invoke jupyter again")


def _pump(client: socket.socket, chan: paramiko.Channel) -> None:
    """Bytes both ways until either side closes."""
    try:
        while True:
            ready = select.select([client, chan], [], [], 30)[0]
            if client in ready:
                data = client.recv(65536)
                if not data:
                    break
                chan.sendall(data)
            if chan in ready:
                data = chan.recv(65536)
                if not data:
                    break
                client.sendall(data)
    except (OSError, paramiko.SSHException):
        pass
    finally:
        chan.close()
        client.close()
