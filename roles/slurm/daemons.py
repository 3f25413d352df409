"""The slurm role's node side: one probe of everything the role looks after, and the daemons'
start, stop, restart and reload, under systemd where it is PID 1, else supervised.

Without systemd each daemon runs in the foreground under files/slurm-supervise (started with
setsid, so it outlives the SSH session), which restarts it when it dies:

    /usr/local/libexec/ddpfleet/slurm-supervise          the supervisor
    /var/lib/ddpfleet/slurm/<daemon>{.supervisor,}.pid   its pidfiles (root only)
    /var/log/ddpfleet-<daemon>.log                       what the daemon printed
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from ddpfleet import rootlog
from ddpfleet.facts import parse_facts

LIBEXEC = "/usr/local/libexec/ddpfleet"
SUPERVISOR = f"{LIBEXEC}/slurm-supervise"
STATE_DIR = "/var/lib/ddpfleet/slurm"
KEY = "/etc/munge/munge.key"
DAEMONS = ("munge", "slurmctld", "slurmd")  # systemd's unit names; munge's daemon is munged
DIRS = (  # path, owner, mode: the daemons refuse to start without them
    ("/run/munge", "munge", "0755"),
    ("/var/log/munge", "munge", "0700"),
    ("/var/lib/munge", "munge", "0700"),
    ("/var/lib/slurm/slurmctld", "slurm", "0755"),
    ("/var/lib/slurm/slurmd", "root", "0755"),
    ("/var/log/slurm", "slurm", "0755"),
    (STATE_DIR, "root", "0700"),
    (LIBEXEC, "root", "0755"),
)


def packages(debian: bool, master: bool) -> tuple[str, ...]:
    if debian:
        return ("munge", "slurmd", "slurm-client") + (("slurmctld",) if master else ())
    return ("munge", "slurm", "slurm-slurmd") + (("slurm-slurmctld",) if master else ())


def argv(daemon: str, node: str) -> list[str]:
    """The daemon in the foreground, as the supervisor runs it."""
    if daemon == "munge":  # setpriv execs: the supervisor's child pid is munged's
        return [
            "setpriv",
            "--reuid=munge",
            "--regid=munge",
            "--init-groups",
            "/usr/sbin/munged",
            "--foreground",
        ]
    if daemon == "slurmctld":  # it drops to SlurmUser itself
        return ["/usr/sbin/slurmctld", "-D"]
    return ["/usr/sbin/slurmd", "-D", "-N", node]  # -N: the inventory's name, not hostname


def log_path(daemon: str) -> str:
    """What the supervised daemon printed (root's, 0600; opened without following a symlink)."""
    return f"/var/log/ddpfleet-{daemon}.log"


def supervised(daemon: str, node: str) -> list[str]:
    return [SUPERVISOR, STATE_DIR, daemon, *argv(daemon, node)]


# $1 state dir, $2 key, $3 "pkg pkg", $4 systemd ("1"/""), $5 "user:uid user:uid", $6 "dir ..".
PROBE_SH = r"""
state=$1
ours() { case $1 in ''|*[!0-9]*) return 1;; esac
         tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"; }
for u in $5; do
  name=${u%%:*}
  echo "uid_$name=$(id -u "$name" 2>/dev/null)"
  echo "gid_$name=$(getent group "$name" | cut -d: -f3)"
done
missing=
for p in $3; do
  if command -v dpkg-query >/dev/null; then
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  else
    rpm -q "$p" >/dev/null 2>&1 || missing="$missing $p"
  fi
done
echo "missing=$missing"
echo "key=$(stat -c '%U %a' "$2" 2>/dev/null) $(sha256sum < "$2" 2>/dev/null | cut -c1-64)"
absent=
for d in $6; do [ -d "$d" ] || absent="$absent $d"; done
echo "absent_dirs=$absent"
for d in munge slurmctld slurmd; do
  echo "stamp_$d=$(cat "$state/$d.stamp" 2>/dev/null)"
  if [ -n "$4" ]; then
    echo "active_$d=$(systemctl is-active "$d" 2>/dev/null)"
    echo "enabled_$d=$(systemctl is-enabled "$d" 2>/dev/null)"
  else
    sp=$(cat "$state/$d.supervisor.pid" 2>/dev/null)
    ours "$sp" slurm-supervise && echo "supervisor_$d=$sp" &&
      echo "argv_$d=$(tr '\0' ' ' < "/proc/$sp/cmdline")"
    p=$(cat "$state/$d.pid" 2>/dev/null)
    ours "$p" "$d" && echo "pid_$d=$p"
  fi
done
true
"""


@dataclass(frozen=True)
class NodeState:
    """What PROBE_SH saw. Example output:

    uid_munge=990  gid_munge=990  uid_slurm=991  gid_slurm=991  missing= slurmctld
    key=munge 400 3f2a...  absent_dirs=  supervisor_munge=812  pid_munge=815
    argv_munge=/bin/sh /usr/local/libexec/ddpfleet/slurm-supervise ... munged --foreground
    """

    systemd: bool
    facts: Mapping[str, str]

    def uid(self, user: str) -> str:
        return self.facts.get(f"uid_{user}", "")

    def gid(self, user: str) -> str:
        return self.facts.get(f"gid_{user}", "")

    @property
    def missing(self) -> list[str]:
        return self.facts.get("missing", "").split()

    @property
    def key(self) -> tuple[str, str, str]:
        """(owner, mode, sha256) of the node's munge key; empty strings when absent."""
        parts = self.facts.get("key", "").split()
        return tuple(parts) if len(parts) == 3 else ("", "", "")  # type: ignore[return-value]

    @property
    def absent_dirs(self) -> list[str]:
        return self.facts.get("absent_dirs", "").split()

    def running(self, daemon: str) -> bool:
        if self.systemd:
            return self.facts.get(f"active_{daemon}") == "active"
        return bool(self.facts.get(f"supervisor_{daemon}"))

    def stamp(self, daemon: str) -> str:
        return self.facts.get(f"stamp_{daemon}", "")

    def pid(self, daemon: str) -> str:
        return self.facts.get(f"pid_{daemon}", "")

    def command(self, daemon: str) -> list[str]:
        """The supervised daemon's argv as it runs now (after the supervisor's own path)."""
        words = self.facts.get(f"argv_{daemon}", "").split()
        return words[words.index(SUPERVISOR) :] if SUPERVISOR in words else words


def probe(host, pkgs: tuple[str, ...], users: Mapping[str, int]) -> NodeState:
    systemd = host.facts.get("pid1") == "systemd"
    script = shlex.join(
        [
            "sh",
            "-c",
            PROBE_SH,
            "sh",
            STATE_DIR,
            KEY,
            " ".join(pkgs),
            "1" if systemd else "",
            " ".join(f"{u}:{i}" for u, i in users.items()),
            " ".join(d for d, _, _ in DIRS),
        ]
    )
    return NodeState(
        systemd, parse_facts(host.run(script, timeout=host.node.command_timeout).stdout)
    )


STOP_SH = r"""state=$1 name=$2
sp=$(cat "$state/$name.supervisor.pid" 2>/dev/null)
case $sp in ''|*[!0-9]*) exit 0;; esac
if tr '\0' ' ' < "/proc/$sp/cmdline" 2>/dev/null | grep -q slurm-supervise; then
  kill -TERM "$sp"
  i=0
  while [ -d "/proc/$sp" ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
  [ -d "/proc/$sp" ] && kill -KILL -- "-$sp" 2>/dev/null
fi
rm -f "$state/$name.supervisor.pid" "$state/$name.pid"
"""


def start(daemon: str, node: str, systemd: bool) -> list[str]:
    if systemd:
        return ["systemctl", "enable", "--now", daemon]
    # the node's python3 (the role's probes use it too): see ddpfleet.rootlog
    return rootlog.start_detached("python3", log_path(daemon), supervised(daemon, node))


def stop(daemon: str, systemd: bool) -> list[str]:
    if systemd:
        return ["systemctl", "stop", daemon]
    return ["sh", "-c", STOP_SH, "sh", STATE_DIR, daemon]


def write_stamp(daemon: str, stamp: str) -> list[str]:
    """Record what the daemon has now read (see role._daemon)."""
    return ["sh", "-c", 'printf "%s\\n" "$2" > "$1"', "sh", f"{STATE_DIR}/{daemon}.stamp", stamp]


def reload(daemon: str, state: NodeState) -> list[str]:
    """slurmd re-reads its files on SIGHUP; slurmctld through `scontrol reconfigure`, which
    also tells every slurmd."""
    if daemon == "slurmctld":
        return ["scontrol", "reconfigure"]
    if state.systemd:
        return ["systemctl", "reload", daemon]
    return ["kill", "-HUP", state.pid(daemon)]


# $1 daemon, $2 seconds, $3 port (slurmd's, slurmctld's). Polls until the daemon answers.
WAIT_SH = r"""
end=$(( $(date +%s) + $2 ))
while [ "$(date +%s)" -lt "$end" ]; do
  case $1 in
    munge) munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && exit 0 ;;
    slurmctld) scontrol ping 2>/dev/null | grep -q 'is UP' && exit 0 ;;
    slurmd) python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' \
              "$3" 2>/dev/null && exit 0 ;;
  esac
  sleep 0.2
done
exit 1
"""


def wait(daemon: str, seconds: int, port: int) -> list[str]:
    return ["sh", "-c", WAIT_SH, "sh", daemon, str(seconds), str(port)]


def log_tail(daemon: str, systemd: bool) -> list[str]:
    if systemd:
        return ["journalctl", "-u", daemon, "-n", "3", "--no-pager"]
    logs = [log_path(daemon)]
    if daemon != "munge":
        logs.append(f"/var/log/slurm/{daemon}.log")
    return ["sh", "-c", 'tail -q -n 2 "$@" 2>/dev/null', "sh", *logs]
