"""A real multi-node cluster on one Linux box: per node a network namespace on a private
bridge, its own hostname and PID namespace, an overlay root over the host's `/`, and sshd.

    host                                   node `n` (netns {prefix}-n)
    {prefix}-br  10.x.0.1/24  ──veth──  eth0 10.x.0.(10+i)/24, lo; no default route
                                         PID 1: scripts/sandbox_init.py (mount+uts+pid ns)
                                           └─ /usr/sbin/sshd -D -e   (key-only)

What lives where:
    /run/netns/{prefix}-{node}                  the named netns (`ip netns`)
    /var/lib/ddpfleet/sandbox/{prefix}/{node}/  upper/ work/ root/ of the node's overlay; the
                                                overlay itself is mounted inside the node's own
                                                mount namespace, so the host table never has it
    spec.state_dir/                             client key, hostkeys/<node>/ (kept by down),
                                                run/<node>.pid (host pid of the init), logs/

The init writes its host-visible pid to run/<node>.pid; a pid only counts as the node's init
while its netns is the node's and it is PID 1 of a PID namespace (so a reused pid never does).
Only root on Linux can do this; everything else gets one SandboxError line.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ddpfleet.errors import SandboxError  # a DdpfleetError: the tasks' one-line error path

__all__ = ["NodeStatus", "SandboxError", "SandboxNode", "SandboxSpec", "down", "preflight",
           "render", "spec_for", "start", "status", "stop", "up"]

PACKAGES = ("openssh-server", "iproute2", "python3-venv", "procps", "util-linux", "rsync")
BASE = Path("/var/lib/ddpfleet/sandbox")
NETNS_DIR = Path("/run/netns")
INIT_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sandbox_init.py"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FIRST_HOST = 10  # nodes get .10, .11, ... when spec_for makes them
UP_TIMEOUT_S = 30.0  # until every node's sshd answers
STOP_GRACE_S = 4.0  # init's own SIGTERM->SIGKILL grace is 2 s
NETNS_GONE_S = 3.0  # the kernel frees a deleted netns (and its veth) asynchronously
BASHRC = f"# ddpfleet sandbox node: a lean shell\nexport PATH={PATH}\n"
PROFILE = f"# ddpfleet sandbox node\nexport PATH={PATH}\n[ -n \"$BASH\" ] && . ~/.bashrc\n"
# Host files the node must not inherit through the overlay: the host's own host keys (each node
# has its own) and login files that bash would read instead of our lean ~/.profile.
HIDDEN = ("etc/ssh/ssh_host_rsa_key", "etc/ssh/ssh_host_rsa_key.pub",
          "etc/ssh/ssh_host_ecdsa_key", "etc/ssh/ssh_host_ecdsa_key.pub",
          "root/.bash_profile", "root/.bash_login")

# Popen of each init launched by this process, so we can reap it (no zombies, no warnings).
_children: dict[str, subprocess.Popen] = {}
T = TypeVar("T")


@dataclass(frozen=True)
class SandboxNode:
    name: str
    address: str


@dataclass(frozen=True)
class SandboxSpec:
    prefix: str
    subnet: str
    nodes: tuple[SandboxNode, ...]
    state_dir: Path
    client_key: Path
    known_hosts: Path


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    netns_exists: bool
    init_pid: int | None
    sshd_listening: bool

    @property
    def running(self) -> bool:
        return self.init_pid is not None


# -- public API ---------------------------------------------------------------------------------


def preflight() -> None:
    """Raise SandboxError unless this is Linux and we are root."""
    if sys.platform != "linux":
        raise SandboxError(f"sandbox needs Linux (network/PID/mount namespaces), not "
                           f"{sys.platform}: run it on a Linux machine")
    if os.geteuid() != 0:
        raise SandboxError("sandbox needs root on Linux: run as root (sudo invoke sandbox.up)")


def up(spec: SandboxSpec) -> list[NodeStatus]:
    """Create and start whatever is missing; running nodes are left alone. Idempotent."""
    preflight()
    _check_spec(spec)
    _ensure_packages()
    _ensure_client_key(spec.client_key)
    _parallel([lambda n=n: _ensure_host_key(spec, n) for n in spec.nodes])
    _bring_up(spec, spec.nodes)
    _write_known_hosts(spec)
    return status(spec)


def down(spec: SandboxSpec) -> None:
    """Remove exactly what up made (processes, netns, links, node dirs); keys stay."""
    preflight()
    names = sorted({n.name for n in spec.nodes} | set(_node_dirs(spec)))
    _parallel([lambda n=n: _stop_node(spec, n) for n in names])
    gone = [_netns(spec, n) for n in names if (NETNS_DIR / _netns(spec, n)).exists()]
    if gone:  # one batch: the kernel then frees all the namespaces (and veths) together
        _ip("-batch", "-", stdin="".join(f"netns del {ns}\n" for ns in gone))
    _wait_for(lambda: not _bridge_ports(spec), NETNS_GONE_S)
    for port in _bridge_ports(spec):  # a netns someone else still holds open
        _ip("link", "del", port, check=False)
    if _link_exists(_bridge(spec)):
        _ip("link", "del", _bridge(spec))
    _release_run_netns(spec)
    # In parallel: unlinking is slow on a busy disk (ext4 with discard: ~50 ms a node here).
    _parallel([lambda n=n: shutil.rmtree(_node_dir(spec, n), ignore_errors=True) for n in names])
    shutil.rmtree(BASE / spec.prefix, ignore_errors=True)


def status(spec: SandboxSpec) -> list[NodeStatus]:
    """Each node: netns present, init pid (None: not running), sshd answering on port 22."""
    preflight()  # as anyone else, /proc/<init>/ns would read as "not running"

    def one(node: SandboxNode) -> NodeStatus:
        pid = _init_pid(spec, node.name)
        return NodeStatus(node.name, node.address, (NETNS_DIR / _netns(spec, node.name)).exists(),
                          pid, pid is not None and _ssh_answers(node.address, 1.0))
    return _parallel([lambda n=n: one(n) for n in spec.nodes])


def stop(spec: SandboxSpec, names: Iterable[str]) -> None:
    """Kill these nodes' inits (so every process in them); netns and files stay. Idempotent."""
    preflight()
    _parallel([lambda n=n.name: _stop_node(spec, n) for n in _select(spec, names)])


def start(spec: SandboxSpec, names: Iterable[str]) -> None:
    """Start these nodes' inits again, on the files they had. Idempotent."""
    preflight()
    nodes = _select(spec, names)
    _ensure_client_key(spec.client_key)
    _parallel([lambda n=n: _ensure_host_key(spec, n) for n in nodes])
    _bring_up(spec, nodes)


def spec_for(inventory: Any, count: int | None = None) -> tuple[SandboxSpec, Path | None]:
    """The spec an inventory describes (its sandbox: section and nodes), or `count` nodes
    node0..node{count-1} from .10; then, if those differ from the inventory's nodes, an inventory
    for them is written under <inventory dir>/.ddpfleet/ and its path returned too."""
    sb = inventory.sandbox
    if sb is None:
        raise SandboxError(f"{inventory.path.name}: no sandbox: section; add one (prefix, "
                           f"subnet, state_dir) to use invoke sandbox.*")
    first = inventory.nodes[0] if inventory.nodes else None
    state_dir = Path(sb.state_dir)
    key = Path(first.key) if first and first.key else state_dir / "id_ed25519"
    known = Path(first.known_hosts) if first else inventory.root / ".ddpfleet" / "known_hosts"
    listed = tuple(SandboxNode(n.name, n.host) for n in inventory.nodes)
    nodes = listed if count is None else _numbered(sb.subnet, count)
    spec = SandboxSpec(sb.prefix, sb.subnet, nodes, state_dir, key, known)
    _check_spec(spec, where=inventory.path.name)
    written = None if nodes == listed else _write_inventory(inventory, spec)
    return spec, written


def render(statuses: Sequence[NodeStatus]):
    """A table for people (rich)."""
    from rich.table import Table

    t = Table(title="sandbox", title_justify="left", header_style="bold")
    for col in ("node", "address", "netns", "init pid", "sshd"):
        t.add_column(col)
    for s in statuses:
        t.add_row(s.name, s.address, "yes" if s.netns_exists else "no",
                  str(s.init_pid) if s.init_pid else "stopped",
                  "listening" if s.sshd_listening else "down")
    return t


# -- names ----------------------------------------------------------------------------------------


def _netns(spec: SandboxSpec, name: str) -> str:
    return f"{spec.prefix}-{name}"


def _bridge(spec: SandboxSpec) -> str:
    return f"{spec.prefix}-br"


def _veth(spec: SandboxSpec, index: int) -> str:
    return f"{spec.prefix}-{index}h"  # the "-" keeps prefix "ab1" index 0 apart from "ab" 10


def _node_dir(spec: SandboxSpec, name: str) -> Path:
    return BASE / spec.prefix / name


def _pidfile(spec: SandboxSpec, name: str) -> Path:
    return spec.state_dir / "run" / f"{name}.pid"


def _network(spec: SandboxSpec) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(spec.subnet)


def _host_iface(spec: SandboxSpec) -> ipaddress.IPv4Interface:
    net = _network(spec)
    return ipaddress.IPv4Interface(f"{net[1]}/{net.prefixlen}")


# -- checks ----------------------------------------------------------------------------------------


def _check_spec(spec: SandboxSpec, where: str = "sandbox") -> None:
    if not (spec.prefix.isalnum() and len(spec.prefix) <= 8):
        raise SandboxError(f"{where}: prefix {spec.prefix!r} must be 1-8 letters/digits (it "
                           f"names network interfaces, which allow 15 characters)")
    try:
        net = _network(spec)
    except ValueError:
        raise SandboxError(f"{where}: subnet {spec.subnet!r} is not an IPv4 network like "
                           f"10.213.0.0/24") from None
    for node in spec.nodes:
        addr = ipaddress.IPv4Address(node.address) if _is_ipv4(node.address) else None
        if addr is None or addr not in net or addr in (net[0], net[1], net.broadcast_address):
            raise SandboxError(f"{where}: node {node.name} address {node.address!r} must be an "
                               f"address in {net} other than {net[0]}, {net[1]} (the host) and "
                               f"{net.broadcast_address}")
        if not node.name.replace("-", "").isalnum() or len(node.name) > 48:
            raise SandboxError(f"{where}: node name {node.name!r} must be letters, digits and "
                               f"'-' (it is the node's hostname)")


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _select(spec: SandboxSpec, names: Iterable[str]) -> list[SandboxNode]:
    by_name = {n.name: n for n in spec.nodes}
    wanted = list(names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SandboxError(f"unknown sandbox node(s) {', '.join(unknown)}; known: "
                           f"{', '.join(by_name)}")
    return [by_name[n] for n in wanted]


# -- running commands ------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    # sudo, cron and friends may leave /usr/sbin (ip, sshd) off PATH.
    return {**os.environ, "PATH": f"{PATH}:{os.environ.get('PATH', '')}", **extra}


def _run(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("env", _env())
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise SandboxError(f"{argv[0]} not found: install it (or let sandbox.up install the "
                           f"Debian packages {' '.join(PACKAGES)})") from None
    if check and proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise SandboxError(f"{' '.join(argv)} failed (exit {proc.returncode}): {tail}")
    return proc


def _ip(*args: str, check: bool = True, stdin: str | None = None) -> str:
    return _run(["ip", *args], check=check, input=stdin).stdout


def _parallel(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run jobs in threads, results in order; every failure ends up in one SandboxError line."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(jobs))) as pool:
        futures = [pool.submit(job) for job in jobs]
    errors = [str(f.exception()) for f in futures if f.exception() is not None]
    if errors:
        raise SandboxError("; ".join(errors))
    return [f.result() for f in futures]


# -- host packages and keys ------------------------------------------------------------------------


def _ensure_packages() -> None:
    """apt-get install what dpkg says is missing, without starting the host's own sshd."""
    out = _run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *PACKAGES], check=False)
    installed = {ln.split()[0] for ln in out.stdout.splitlines() if ln.endswith(" installed")}
    missing = [p for p in PACKAGES if p not in installed]
    if not missing:
        return
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:  # exit 101 = "action forbidden": package scripts start no service
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = _env(DEBIAN_FRONTEND="noninteractive")
    try:
        _run(["apt-get", "update", "-qq"], env=env)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
              "-o", "DPkg::Lock::Timeout=300", *missing], env=env)
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def _ssh_keygen(path: Path, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _ensure_client_key(key: Path) -> None:
    if not key.exists():
        _ssh_keygen(key, "ddpfleet-sandbox")
    elif not Path(f"{key}.pub").exists():
        pub = _run(["ssh-keygen", "-y", "-f", str(key)]).stdout
        Path(f"{key}.pub").write_text(pub)


def _host_key(spec: SandboxSpec, name: str) -> Path:
    return spec.state_dir / "hostkeys" / name / "ssh_host_ed25519_key"


def _ensure_host_key(spec: SandboxSpec, node: SandboxNode) -> None:
    """Made once per node name and kept by down, so known_hosts stays valid across ups."""
    if not _host_key(spec, node.name).exists():
        _ssh_keygen(_host_key(spec, node.name), f"root@{node.name}")


def _host_pub(spec: SandboxSpec, name: str) -> str:
    """'ssh-ed25519 AAAA...' without the comment."""
    return " ".join(Path(f"{_host_key(spec, name)}.pub").read_text().split()[:2])


def _write_known_hosts(spec: SandboxSpec) -> None:
    """Replace the lines for our addresses; every other line stays as it was."""
    ours = {n.address for n in spec.nodes}
    path = spec.known_hosts
    old = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in old if not (ln.split() and set(ln.split()[0].split(",")) & ours)]
    lines = kept + [f"{n.address} {_host_pub(spec, n.name)}" for n in spec.nodes]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{ln}\n" for ln in lines))
    tmp.replace(path)


# -- network ---------------------------------------------------------------------------------------


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _bridge_ports(spec: SandboxSpec) -> list[str]:
    if not _link_exists(_bridge(spec)):
        return []
    return [p.name for p in Path("/sys/class/net", _bridge(spec), "brif").iterdir()]


def _ensure_bridge(spec: SandboxSpec) -> None:
    br, iface = _bridge(spec), _host_iface(spec)
    for line in _ip("-o", "-4", "addr", "show").splitlines():
        dev, addr = line.split()[1], ipaddress.IPv4Interface(line.split()[3])
        if dev != br and addr.network.overlaps(iface.network):
            raise SandboxError(f"sandbox subnet {iface.network} overlaps {addr} on {dev}: choose "
                               f"another sandbox.subnet in the inventory")
    if not _link_exists(br):
        # nf_call_* 0: the host's iptables (docker's FORWARD DROP, say) never sees node traffic.
        _ip("link", "add", br, "type", "bridge", "nf_call_iptables", "0", "nf_call_ip6tables",
            "0", "nf_call_arptables", "0")
    _ip("addr", "replace", str(iface), "dev", br)
    _ip("link", "set", br, "up")


def _net_ready(spec: SandboxSpec, index: int, name: str) -> bool:
    veth = Path("/sys/class/net", _veth(spec, index))
    return (NETNS_DIR / _netns(spec, name)).exists() and (veth / "master").exists()


def _host_side(spec: SandboxSpec, index: int, node: SandboxNode) -> str:
    """`ip -batch` lines: the netns, a veth pair with eth0 inside it, the host end on the bridge."""
    ns, veth = _netns(spec, node.name), _veth(spec, index)
    return (f"netns add {ns}\nlink add {veth} type veth peer name eth0 netns {ns}\n"
            f"link set {veth} master {_bridge(spec)} up\n")


def _configure_inside(spec: SandboxSpec, node: SandboxNode) -> None:
    iface = ipaddress.IPv4Interface(f"{node.address}/{_network(spec).prefixlen}")
    # No default route: the node reaches the bridge's subnet and nothing else.
    _ip("-n", _netns(spec, node.name), "-batch", "-",
        stdin=f"addr add {iface} dev eth0\nlink set eth0 up\nlink set lo up\n")


def _remove_net(ns: str, veth: str) -> None:
    if _link_exists(veth):
        _ip("link", "del", veth, check=False)
    if (NETNS_DIR / ns).exists():
        _ip("netns", "del", ns, check=False)


def _run_netns_mounted() -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(NETNS_DIR) for line in f)


def _ensure_nets(spec: SandboxSpec, nodes: Sequence[SandboxNode]) -> None:
    index = {n.name: i for i, n in enumerate(spec.nodes)}
    todo = [n for n in nodes if not _net_ready(spec, index[n.name], n.name)]
    if not todo:
        return
    # `ip netns add` bind-mounts /run/netns onto itself the first time: remember if that was us,
    # so down can undo it.
    made_mount = not _run_netns_mounted()
    for n in todo:  # leftovers of a half-made node
        _remove_net(_netns(spec, n.name), _veth(spec, index[n.name]))
    try:
        # Few processes, not 6 per node: spawning them is what costs when the box is busy.
        _ip("-batch", "-", stdin="".join(_host_side(spec, index[n.name], n) for n in todo))
        _parallel([lambda n=n: _configure_inside(spec, n) for n in todo])
    except SandboxError:
        for n in todo:
            _remove_net(_netns(spec, n.name), _veth(spec, index[n.name]))
        raise
    finally:
        if made_mount and _run_netns_mounted():
            (BASE / spec.prefix / ".made-run-netns").touch()


def _release_run_netns(spec: SandboxSpec) -> None:
    marker = BASE / spec.prefix / ".made-run-netns"
    if marker.exists() and _run_netns_mounted() and not any(NETNS_DIR.iterdir()):
        _run(["umount", str(NETNS_DIR)], check=False)


# -- node files ------------------------------------------------------------------------------------


def _hosts(spec: SandboxSpec) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             "ff02::1\tip6-allnodes", "ff02::2\tip6-allrouters"]
    lines += [f"{n.address}\t{n.name}" for n in spec.nodes]
    return "\n".join(lines) + "\n"


def _node_files(spec: SandboxSpec, node: SandboxNode) -> dict[str, tuple[bytes, int]]:
    """Files of the node's root, relative to it: content and mode."""
    key = _host_key(spec, node.name)
    known = "".join(f"{n.name},{n.address} {_host_pub(spec, n.name)}\n" for n in spec.nodes)
    return {
        "etc/hostname": (f"{node.name}\n".encode(), 0o644),
        "etc/hosts": (_hosts(spec).encode(), 0o644),
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


def _prepare_node(spec: SandboxSpec, node: SandboxNode, running: bool) -> None:
    d = _node_dir(spec, node.name)
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "upper").chmod(0o755)  # it is the node's /
    upper = d / "upper"
    for rel, (data, mode) in _node_files(spec, node).items():
        _mkdirs_like_host(upper, Path(rel).parent)
        _write_in_place(upper / rel, data, mode)
    if running:  # no whiteouts under a mounted overlay
        return
    for rel in HIDDEN:
        if os.path.lexists(Path("/") / rel) and not os.path.lexists(upper / rel):
            _mkdirs_like_host(upper, Path(rel).parent)
            os.mknod(upper / rel, stat.S_IFCHR, os.makedev(0, 0))  # overlay whiteout


def _node_dirs(spec: SandboxSpec) -> list[str]:
    base = BASE / spec.prefix
    return [p.name for p in base.iterdir() if p.is_dir()] if base.is_dir() else []


# -- node processes --------------------------------------------------------------------------------


def _init_pid(spec: SandboxSpec, name: str) -> int | None:
    """The node's init as the host sees it, or None if it is not running."""
    try:
        pid = int(_pidfile(spec, name).read_text())
    except (OSError, ValueError):
        return None
    return pid if _is_init_of(pid, NETNS_DIR / _netns(spec, name)) else None


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
    pid = _init_pid(spec, name)
    netns = NETNS_DIR / _netns(spec, name)
    if pid is not None or not netns.exists():
        return pid
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return next((p for p in pids if _is_init_of(p, netns)), None)


def _python() -> str:
    # The Debian python: the same path exists inside the node (its lower layer is the host's /).
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def _launch(spec: SandboxSpec, node: SandboxNode) -> subprocess.Popen:
    pidfile = _pidfile(spec, node.name).absolute()  # the init runs in /
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.unlink(missing_ok=True)
    logs = spec.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = ["nsenter", f"--net={NETNS_DIR / _netns(spec, node.name)}",
            "unshare", "--mount", "--uts", "--pid", "--fork", "--propagation", "private", "--",
            _python(), "-I", "-S", str(INIT_SCRIPT), "--dir", str(_node_dir(spec, node.name)),
            "--hostname", node.name, "--pidfile", str(pidfile)]
    with open(logs / f"{node.name}.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd="/", env={"PATH": PATH, "LANG": "C.UTF-8"},
                                start_new_session=True)  # no terminal signal reaches a node
    _children[_netns(spec, node.name)] = proc
    return proc


def _ssh_answers(address: str, timeout: float) -> bool:
    """sshd accepted and sent its banner (a bare accept could be the kernel's backlog)."""
    try:
        with socket.create_connection((address, 22), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


def _wait_ready(spec: SandboxSpec, node: SandboxNode, proc: subprocess.Popen | None,
                deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SandboxError(f"{node.name}: init exited ({proc.returncode}): "
                               f"{_log_tail(spec, node.name)}")
        if _ssh_answers(node.address, 0.5):
            return
        time.sleep(0.05)
    raise SandboxError(f"{node.name}: sshd did not answer on {node.address}:22 within "
                       f"{UP_TIMEOUT_S:.0f} s; {_log_tail(spec, node.name)}")


def _log_tail(spec: SandboxSpec, name: str) -> str:
    log = spec.state_dir / "logs" / f"{name}.log"
    try:
        last = log.read_text(errors="replace").strip().splitlines()[-1]
    except (OSError, IndexError):
        last = "(empty)"
    return f"see {log}: {last}"


def _bring_up(spec: SandboxSpec, nodes: Sequence[SandboxNode]) -> None:
    (BASE / spec.prefix).mkdir(parents=True, exist_ok=True)
    _ensure_bridge(spec)
    _ensure_nets(spec, nodes)
    pids = {n.name: _init_pid(spec, n.name) for n in spec.nodes}
    # Every node's /etc/hosts lists every node, so running ones are refreshed too.
    touched = [n for n in spec.nodes if n in nodes or pids[n.name] is not None]
    _parallel([lambda n=n: _prepare_node(spec, n, pids[n.name] is not None) for n in touched])
    procs = {n.name: _launch(spec, n) for n in nodes if pids[n.name] is None}
    deadline = time.monotonic() + UP_TIMEOUT_S
    _parallel([lambda n=n: _wait_ready(spec, n, procs.get(n.name), deadline) for n in nodes])


def _stop_node(spec: SandboxSpec, name: str) -> None:
    pid = _find_init(spec, name)
    if pid is not None and not _signal_and_wait(pid, signal.SIGTERM, STOP_GRACE_S):
        _signal_and_wait(pid, signal.SIGKILL, STOP_GRACE_S)
    proc = _children.pop(_netns(spec, name), None)
    if proc is not None:  # our child: reap it now, no zombie until we exit
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _pidfile(spec, name).unlink(missing_ok=True)


def _signal_and_wait(pid: int, sig: int, timeout: float) -> bool:
    """True once pid is gone (or only a zombie: its namespaces are released by then)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    return _wait_for(lambda: _exited(pid), timeout)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- inventories for --nodes N ---------------------------------------------------------------------


def _numbered(subnet: str, count: int) -> tuple[SandboxNode, ...]:
    net = ipaddress.IPv4Network(subnet)
    if count < 1 or FIRST_HOST + count >= net.num_addresses - 1:
        raise SandboxError(f"--nodes {count}: subnet {net} holds 1 to "
                           f"{max(0, net.num_addresses - 2 - FIRST_HOST)} sandbox nodes")
    return tuple(SandboxNode(f"node{i}", str(net[FIRST_HOST + i])) for i in range(count))


def _write_inventory(inventory: Any, spec: SandboxSpec) -> Path:
    """The inventory with spec's nodes, paths made absolute (it lives in another directory)."""
    import yaml

    data = yaml.safe_load(Path(inventory.path).read_text())
    data.setdefault("ssh", {}).update(key=str(spec.client_key),
                                      known_hosts=str(spec.known_hosts))
    data["sandbox"] = {**(data.get("sandbox") or {}), "state_dir": str(spec.state_dir)}
    data["nodes"] = {n.name: {"host": n.address} for n in spec.nodes}
    path = Path(inventory.root) / ".ddpfleet" / f"inventory-{len(spec.nodes)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by invoke sandbox.up --nodes {len(spec.nodes)} from "
                    f"{inventory.path}\n" + yaml.safe_dump(data, sort_keys=False))
    return path
