"""One sandbox node: the files of its overlay root, and its init (ddpfleet/sandbox/node_init.py).

Names resolve like on a cluster with working DNS: every node's /etc/hosts lists every node (so
each knows the others and itself), and nothing asks the host's DNS server, which no node reaches.

The init writes its host-visible pid to spec.pidfile(node); a pid only counts as the node's
init while its netns is the node's and it is PID 1 of a PID namespace (so a reused pid never
does).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from ddpfleet.errors import SandboxError
from ddpfleet.hygiene import state_dir
from ddpfleet.sandbox import systemd_init, users
from ddpfleet.sandbox.host import host_key, host_pub, wait_for
from ddpfleet.sandbox.spec import NETNS_DIR, PATH, SandboxNode, SandboxSpec

INIT_SCRIPT = Path(__file__).resolve().parent / "node_init.py"
UP_TIMEOUT_S = 30.0  # until every node's sshd answers
STOP_GRACE_S = 4.0  # init's own SIGTERM->SIGKILL grace is 2 s
BASHRC = f"# ddpfleet sandbox node: a lean shell\nexport PATH={PATH}\n"
PROFILE = f'# ddpfleet sandbox node\nexport PATH={PATH}\n[ -n "$BASH" ] && . ~/.bashrc\n'
# Host files the node must not inherit through the overlay: the host's own host keys (each node
# has its own) and login files that bash would read instead of our lean ~/.profile.
HIDDEN = (
    "etc/ssh/ssh_host_rsa_key",
    "etc/ssh/ssh_host_rsa_key.pub",
    "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ecdsa_key.pub",
    "root/.bash_profile",
    "root/.bash_login",
)

# Popen of each init launched by this process, so we can reap it (no zombies, no warnings).
_children: dict[str, subprocess.Popen] = {}


# -- node files ------------------------------------------------------------------------------------


def hosts_file(spec: SandboxSpec) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
    ]
    lines += [f"{n.address}\t{n.name}" for n in spec.nodes]
    return "\n".join(lines) + "\n"


def nsswitch_file(host_conf: str | None) -> str:
    """The host's nsswitch.conf with names looked up in /etc/hosts only.

    The node has no route out, so the host's DNS server never answers: a lookup /etc/hosts
    cannot settle then fails "temporarily" (EAI_AGAIN) instead of "not found". c10d's store
    looks up each client's IPv4-mapped IPv6 address, which /etc/hosts never lists, and warned
    "The hostname of the client socket cannot be retrieved. err=-3" for every rank.
    """
    ours = ["# ddpfleet sandbox: no DNS server is reachable from a node", "hosts:          files"]
    lines = [ln for ln in (host_conf or "").splitlines() if not ln.startswith("# ddpfleet")]
    at = next((i for i, ln in enumerate(lines) if ln.split(":", 1)[0].strip() == "hosts"), None)
    if at is None:
        return "\n".join([*lines, *ours]) + "\n"
    return "\n".join([*lines[:at], *ours, *lines[at + 1 :]]) + "\n"


def _host_nsswitch() -> str | None:
    try:
        return Path("/etc/nsswitch.conf").read_text()
    except OSError:
        return None


def _node_files(spec: SandboxSpec, node: SandboxNode) -> dict[str, tuple[bytes, int]]:
    """Files of the node's root, relative to it: content and mode."""
    key = host_key(spec, node.name)
    known = "".join(f"{n.name},{n.address} {host_pub(spec, n.name)}\n" for n in spec.nodes)
    return {
        "etc/hostname": (f"{node.name}\n".encode(), 0o644),
        "etc/hosts": (hosts_file(spec).encode(), 0o644),
        "etc/nsswitch.conf": (nsswitch_file(_host_nsswitch()).encode(), 0o644),
        "etc/ssh/ssh_known_hosts": (known.encode(), 0o644),  # node-to-node ssh, strict
        "etc/ssh/ssh_host_ed25519_key": (key.read_bytes(), 0o600),
        "etc/ssh/ssh_host_ed25519_key.pub": (Path(f"{key}.pub").read_bytes(), 0o644),
        "root/.bashrc": (BASHRC.encode(), 0o644),
        "root/.profile": (PROFILE.encode(), 0o644),
        "root/.ssh/authorized_keys": (Path(f"{spec.client_key}.pub").read_bytes(), 0o600),
    }


def _mkdirs_like_host(upper: Path, rel: Path) -> None:
    """Create upper/rel with the modes/owners the host's dirs have: the merged dir takes the
    upper one's attributes (a 0755 /root would be a surprise)."""
    for part in reversed([rel, *rel.parents][:-1]):
        target = upper / part
        if target.exists():
            continue
        target.mkdir()
        try:
            st = os.stat(Path("/") / part)
            os.chown(target, st.st_uid, st.st_gid)
            target.chmod(stat.S_IMODE(st.st_mode))
        except FileNotFoundError:
            target.chmod(0o700 if part.name == ".ssh" else 0o755)


def _write_in_place(path: Path, data: bytes, mode: int) -> None:
    """Write without replacing the inode: a running node's overlay keeps pointing at it."""
    if path.exists() and path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == mode:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def prepare(spec: SandboxSpec, node: SandboxNode, running: bool) -> None:
    """The node's dirs and files; a running node gets its files refreshed, nothing else."""
    d = spec.node_dir(node.name)
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "upper").chmod(0o755)  # it is the node's /
    upper = d / "upper"
    for rel, (data, mode) in _node_files(spec, node).items():
        _mkdirs_like_host(upper, Path(rel).parent)
        _write_in_place(upper / rel, data, mode)
    _mkdirs_like_host(upper, Path("home"))
    _mkdirs_like_host(upper, Path("etc/sudoers.d"))
    users.ensure(spec, upper)
    if running:  # no whiteouts under a mounted overlay
        return
    if spec.init == "systemd":
        systemd_init.prepare(upper, spec.permit_root_login)
    for rel in HIDDEN:
        if os.path.lexists(Path("/") / rel) and not os.path.lexists(upper / rel):
            _mkdirs_like_host(upper, Path(rel).parent)
            os.mknod(upper / rel, stat.S_IFCHR, os.makedev(0, 0))  # overlay whiteout


def node_dirs(spec: SandboxSpec) -> list[str]:
    """Names of the nodes that have a dir under spec.base (those up made, listed or not)."""
    return [p.name for p in spec.base.iterdir() if p.is_dir()] if spec.base.is_dir() else []


# -- node processes --------------------------------------------------------------------------------


def init_pid(spec: SandboxSpec, name: str) -> int | None:
    """The node's init as the host sees it, or None if it is not running."""
    try:
        pid = int(spec.pidfile(name).read_text())
    except (OSError, ValueError):
        return None
    return pid if _is_init_of(pid, NETNS_DIR / spec.netns(name)) else None


def _is_init_of(pid: int, netns: Path) -> bool:
    """pid lives in netns and is PID 1 of its own PID namespace (a reused pid is neither)."""
    try:
        ns, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat(netns)
        if (ns.st_dev, ns.st_ino) != (ours.st_dev, ours.st_ino):
            return False
        with open(f"/proc/{pid}/status") as f:
            nspid = next(ln.split()[1:] for ln in f if ln.startswith("NSpid:"))
    except (OSError, StopIteration):
        return False
    return len(nspid) > 1 and nspid[-1] == "1"


def _find_init(spec: SandboxSpec, name: str) -> int | None:
    """The pid file, else a scan of /proc (the state dir may be gone)."""
    pid = init_pid(spec, name)
    netns = NETNS_DIR / spec.netns(name)
    if pid is not None or not netns.exists():
        return pid
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return next((p for p in pids if _is_init_of(p, netns)), None)


def _python() -> str:
    # The Debian python: the same path exists inside the node (its lower layer is the host's /).
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def launch(spec: SandboxSpec, node: SandboxNode) -> subprocess.Popen:
    """Start the node's init in its netns, in new mount, UTS and PID namespaces."""
    pidfile = spec.pidfile(node.name).absolute()  # the init runs in /
    state_dir(pidfile.parent)
    pidfile.unlink(missing_ok=True)
    logs = spec.state_dir / "logs"
    state_dir(logs)
    argv = [
        "nsenter",
        f"--net={NETNS_DIR / spec.netns(node.name)}",
        "unshare",
        "--mount",
        "--uts",
        "--pid",
        "--fork",
        "--propagation",
        "private",
        "--",
        _python(),
        "-I",
        "-S",
        str(INIT_SCRIPT),
        "--dir",
        str(spec.node_dir(node.name)),
        "--hostname",
        node.name,
        "--pidfile",
        str(pidfile),
        "--permit-root-login",
        spec.permit_root_login,
    ]
    if spec.init == "systemd":
        argv += systemd_init.init_args(systemd_init.cgroup_dir(spec.prefix, node.name))
    with open(logs / f"{node.name}.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            env={"PATH": PATH, "LANG": "C.UTF-8"},
            start_new_session=True,
        )  # no terminal signal reaches a node
    _children[spec.netns(node.name)] = proc
    return proc


def ssh_answers(address: str, timeout: float) -> bool:
    """sshd accepted and sent its banner (a bare accept could be the kernel's backlog)."""
    try:
        with socket.create_connection((address, 22), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


def wait_ready(
    spec: SandboxSpec, node: SandboxNode, proc: subprocess.Popen | None, deadline: float
) -> None:
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SandboxError(
                f"{node.name}: init exited ({proc.returncode}): {_log_tail(spec, node.name)}"
            )
        if ssh_answers(node.address, 0.5):
            return
        time.sleep(0.05)
    raise SandboxError(
        f"{node.name}: sshd did not answer on {node.address}:22 within "
        f"{UP_TIMEOUT_S:.0f} s; {_log_tail(spec, node.name)}"
    )


def _log_tail(spec: SandboxSpec, name: str) -> str:
    log = spec.state_dir / "logs" / f"{name}.log"
    try:
        last = log.read_text(errors="replace").strip().splitlines()[-1]
    except (OSError, IndexError):
        last = "(empty)"
    return f"see {log}: {last}"


def stop(spec: SandboxSpec, name: str) -> None:
    """Kill the node's init (so every process in it) and reap it if it is ours."""
    pid = _find_init(spec, name)
    first, grace = systemd_init.stop_signal(pid) or (signal.SIGTERM, STOP_GRACE_S)
    if pid is not None and not _signal_and_wait(pid, first, grace):
        _signal_and_wait(pid, signal.SIGKILL, STOP_GRACE_S)
    proc = _children.pop(spec.netns(name), None)
    if proc is not None:  # our child: reap it now, no zombie until we exit
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    spec.pidfile(name).unlink(missing_ok=True)
    systemd_init.remove_cgroup(spec.prefix, name)


def _signal_and_wait(pid: int, sig: int, timeout: float) -> bool:
    """True once pid is gone (or only a zombie: its namespaces are released by then)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    return wait_for(lambda: _exited(pid), timeout)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
