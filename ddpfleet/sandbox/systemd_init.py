"""A sandbox node whose PID 1 is systemd (`sandbox: {init: systemd}`, `sandbox.up --init systemd`).

ddpfleet/sandbox/node_init.py still makes the node (netns, overlay root, UTS+PID namespaces), then, told
`--cgroup DIR --exec-systemd`, moves itself into DIR (a cgroup of the host's cgroup2 hierarchy),
enters a cgroup namespace rooted there, mounts a fresh cgroup2 at the node's /sys/fs/cgroup and
execs `/lib/systemd/systemd --system` with container=ddpfleet-sandbox. systemd then owns that
subtree: every unit is a cgroup of its own, as on a real machine.

The overlay root holds the host's unit files, so the node masks every unit but the few a booted
node needs (targets, slices, the journal, halt/poweroff) and starts only ddpfleet-sshd.service:
no getty, no host service (munge, slurmd, postgresql ...), nothing that touches devices, clock or
network. A role that installs a unit of its own (jupyter, slurm) writes it under /etc, where its
file replaces the mask.

down halts it with SIGRTMIN+4 (poweroff; in a container systemd exits), then removes DIR.
"""

from __future__ import annotations

import os
import shlex
import signal
import uuid
from pathlib import Path

from ddpfleet.errors import SandboxError

INITS = ("sandbox", "systemd")
SYSTEMD = "/lib/systemd/systemd"
CONTAINER = "ddpfleet-sandbox"
UNIT_DIRS = (
    Path("/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/etc/systemd/system"),
)
# What a booted, halting node needs; everything else the host ships is masked.
KEEP = frozenset(
    {
        "dbus.service",  # systemd-run --wait and systemctl's properties need the system bus
        "dbus.socket",
        "systemd-journald.service",
        "systemd-journald.socket",
        "systemd-journald-dev-log.socket",
        "systemd-halt.service",
        "systemd-poweroff.service",
        "systemd-reboot.service",
        "systemd-exit.service",
        "user.slice",
    }
)
SSHD_UNIT = "ddpfleet-sshd.service"
TARGET = "ddpfleet-node.target"
POWEROFF = signal.SIGRTMIN + 4  # systemd: start poweroff.target; in a container, exit
HALT_GRACE_S = 15.0  # units get DefaultTimeoutStopSec (5 s) each before SIGKILL


def sshd_argv(permit_root_login: str) -> list[str]:
    """The sshd the plain init runs, as a unit's ExecStart (key-only, no DNS)."""
    opts = [
        "PasswordAuthentication=no",
        "KbdInteractiveAuthentication=no",
        f"PermitRootLogin={permit_root_login}",
        "UseDNS=no",
    ]
    return ["/usr/sbin/sshd", "-D", "-e", *(a for o in opts for a in ("-o", o))]


def sshd_unit(permit_root_login: str) -> str:
    return (
        "[Unit]\n"
        "Description=ddpfleet sandbox sshd (key-only)\n"
        "\n[Service]\n"
        f"ExecStart={shlex.join(sshd_argv(permit_root_login))}\n"
        "ExecReload=/bin/kill -HUP $MAINPID\n"
        # Like Debian's ssh.service: a restart of sshd leaves open sessions alone.
        "KillMode=process\n"
        "Restart=always\n"
        "RestartSec=1\n"
        "RuntimeDirectory=sshd\n"
        "RuntimeDirectoryPreserve=yes\n"
        "StandardOutput=append:/var/log/sshd.log\n"
        "StandardError=inherit\n"
    )


def node_files(permit_root_login: str) -> dict[str, tuple[bytes, int]]:
    """Files of a systemd node's root, relative to it: content and mode."""
    target = (
        "[Unit]\nDescription=ddpfleet sandbox node\n"
        f"Requires=basic.target\nAfter=basic.target\nWants={SSHD_UNIT}\nAllowIsolate=yes\n"
    )
    conf = "[Manager]\nDefaultTimeoutStopSec=5s\nShowStatus=no\n"
    return {
        "etc/fstab": (b"# ddpfleet sandbox node: nothing to mount\n", 0o644),
        "etc/machine-id": (f"{uuid.uuid4().hex}\n".encode(), 0o444),
        f"etc/systemd/system/{SSHD_UNIT}": (sshd_unit(permit_root_login).encode(), 0o644),
        f"etc/systemd/system/{TARGET}": (target.encode(), 0o644),
        "etc/systemd/system.conf.d/ddpfleet-sandbox.conf": (conf.encode(), 0o644),
    }


def masked(unit_dirs: tuple[Path, ...] = UNIT_DIRS) -> list[str]:
    """Every unit the host ships that a node does not need (templates included)."""
    names: set[str] = set()
    for d in unit_dirs:
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if "." in p.name and not p.is_dir())
    return sorted(n for n in names if _masked(n))


def _masked(name: str) -> bool:
    kind = name.rsplit(".", 1)[1]
    if kind in ("target", "slice") or name in KEEP:
        return False
    return kind in ("service", "socket", "timer", "path", "mount", "automount", "swap", "device")


def prepare(upper: Path, permit_root_login: str) -> None:
    """Write the unit files and masks into a stopped node's upper dir (its /)."""
    units = upper / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    ours = {Path(rel).name for rel in node_files(permit_root_login)}
    for name in masked():
        link = units / name
        if name in ours or link.is_symlink() or link.exists():
            continue
        link.symlink_to("/dev/null")
    for rel, (data, mode) in node_files(permit_root_login).items():
        path = upper / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "etc/machine-id" and path.exists():
            continue  # one identity per node for its life
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        path.chmod(mode)


def init_args(cgroup: Path) -> list[str]:
    """sandbox_init.py's extra arguments for a systemd node."""
    return ["--cgroup", str(cgroup), "--exec-systemd", TARGET]


def cgroup_dir(prefix: str, node: str, mountinfo: str | None = None) -> Path:
    """The node's cgroup on the host's cgroup2 hierarchy (/sys/fs/cgroup, or its unified/)."""
    root = cgroup2_root(mountinfo)
    if root is None:
        raise SandboxError(
            f"{node}: init systemd needs a cgroup2 hierarchy on this host (none in "
            f"/proc/self/mountinfo); mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) "
            f"or use init: sandbox"
        )
    return root / f"ddpfleet-{prefix}-{node}"


def cgroup2_root(mountinfo: str | None = None) -> Path | None:
    """Where cgroup2 is mounted, from /proc/self/mountinfo lines like
    `35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw`."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    points = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) > 4 and fields[3] == "/":
            points.append(Path(fields[4]))
    return min(points, key=lambda p: len(p.parts)) if points else None


def stop_signal(pid: int | None) -> tuple[int, float] | None:
    """How to stop a node whose init is systemd (SIGTERM would only make it re-exec itself):
    the signal and the grace before SIGKILL; None for any other init."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip() if pid is not None else ""
    except OSError:
        return None
    return (POWEROFF, HALT_GRACE_S) if comm == "systemd" else None


def remove_cgroup(prefix: str, node: str) -> None:
    """rmdir a stopped node's cgroup tree, deepest first (each is empty of processes by now)."""
    root = cgroup2_root()
    path = root / f"ddpfleet-{prefix}-{node}" if root else None
    if path is None or not path.is_dir():
        return
    dirs = [Path(d) for d, _, _ in os.walk(path)]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
