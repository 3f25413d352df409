"""`invoke doctor`: what would break training, found before training starts.

Every node in parallel, three short round trips each:

1. facts, one sh script: uid and sudo, the env's torch / CUDA / NCCL, free disk under the env
   prefix, TCP to every other node's SSH port, and gpu.probe_script() (driver and GPUs);
2. the clock: `date +%s.%N` three times, the fastest answer corrected by half its round trip;
3. the master port: a short-lived listener on the master (it binds: the port is free) hands a
   token to every worker that connects (the worker reads it: the port is reachable, and it was
   our listener that answered, not whatever else holds the port).

Then pure check functions turn facts into `Check(name, status, message, fix)` rows; cross-node
checks (GPU counts, versions) compare each node with what most nodes have, ties going to the
master. `invoke doctor` exits non-zero when any check fails.
"""

from __future__ import annotations

import json
import secrets
import shlex
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ddpfleet import envs, gpu
from ddpfleet.connection import Conn, Fleet
from ddpfleet.errors import (
    AuthError,
    ConnectError,
    DdpfleetError,
    HostKeyChanged,
    HostKeyUnknown,
    NodeError,
)
from ddpfleet.inventory import Inventory, Node
from ddpfleet.shell import tail

MARK = "@@doctor"
CUDA_118_DRIVER = (520, 61, 5)  # facts.md B4: CUDA 11.8 GA on Linux
MINOR_COMPAT_DRIVER = (450, 80, 2)  # CUDA 11.x minor-version compatibility, limited features
CLOCK_WARN_S, CLOCK_FAIL_S = 2.0, 30.0
DISK_WARN_KIB, DISK_FAIL_KIB = 10 * 2**20, 2 * 2**20
REACH_S = 5.0  # how long a worker keeps trying the master's port (the listener may be starting)
FACTS_TIMEOUT_S = 120.0  # a cold `import torch` on a slow disk


class Status(str, Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""


@dataclass(frozen=True)
class EnvFacts:
    python: str
    present: bool
    torch: str | None = None
    cuda: str | None = None  # None: a CPU build
    nccl: str | None = None
    error: str | None = None  # why `import torch` failed

    @property
    def versions(self) -> tuple[str | None, str | None, str | None]:
        return self.torch, self.cuda, self.nccl


@dataclass(frozen=True)
class NodeFacts:
    uid: int | None
    sudo_rc: int | None  # `sudo -n true`; 127: no sudo; None: not asked (root)
    env: EnvFacts
    disk_free_kib: int | None
    disk_path: str  # the env prefix, or its nearest existing parent
    tcp: Mapping[str, str | None] | str  # other node -> None or why not; str: test not run
    gpus: gpu.NodeGpus


@dataclass(frozen=True)
class PortTest:
    master: str
    port: int
    free: bool | None  # None: the listener could not run (error says why)
    error: str | None
    reached: Mapping[str, str | None]  # worker -> None (got our token) or why not


# --- node side -------------------------------------------------------------------------------

_TORCH = envs.TORCH_FACTS_PY + 'import json\nprint("@@doctor env " + json.dumps(torch_facts()))\n'

_TCP = """\
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
def probe(target):
    name, host, port = target.split("=", 2)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return name, None
    except OSError as e:
        return name, e.strerror or str(e) or type(e).__name__
with ThreadPoolExecutor(32) as pool:
    print("@@doctor tcp " + json.dumps(dict(pool.map(probe, sys.argv[1:]))))
"""

_FACTS = """\
say() {{ printf '\\n%s %s %s\\n' {mark} "$1" "$2"; }}
say uid "$(id -u)"
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo -n true >/dev/null 2>&1; say sudo $?
  else say sudo 127; fi
fi
p={prefix}
while [ ! -e "$p" ]; do p=$(dirname "$p"); done
say disk "$(df -Pk "$p" 2>/dev/null | awk 'NR==2 {{print $4}}') $p"
if [ -x {python} ]; then {python} -c {torch}; else say env-absent -; fi
if command -v python3 >/dev/null 2>&1; then python3 -c {tcp} {targets}
else say tcp-error 'python3 not found'; fi
"""

_LISTEN = """\
import json, socket, sys, time
port, token = int(sys.argv[1]), sys.argv[2].encode()
expect, wait = int(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAITs do not hold a port
try:
    s.bind(("", port))
    s.listen(64)
except OSError as e:
    print(json.dumps({"free": False, "error": e.strerror or str(e)}))
    sys.exit(0)
deadline, served = time.monotonic() + wait, 0
while served < expect and time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        c, _ = s.accept()
    except OSError:
        break
    c.sendall(token)
    c.settimeout(2)
    try:  # the worker closes first, so no TIME_WAIT is left on the master's port
        c.recv(1)
    except OSError:
        pass
    c.close()
    served += 1
print(json.dumps({"free": True, "error": None}))
"""

_REACH = """\
import json, socket, sys, time
host, port, token, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
deadline, error = time.monotonic() + wait, "no answer"
while time.monotonic() < deadline:
    try:
        with socket.create_connection((host, port), timeout=3) as c:
            c.settimeout(3)
            got = b""
            while len(got) < len(token):
                chunk = c.recv(64)
                if not chunk:
                    break
                got += chunk
        error = None if got == token else "something other than the test listener answered"
        break
    except ConnectionRefusedError as e:  # the listener may not be up yet
        error = e.strerror
        time.sleep(0.1)
    except OSError as e:
        error = e.strerror or str(e) or type(e).__name__
        break
print(json.dumps({"error": error}))
"""


def facts_script(python: str, prefix: str, peers: Sequence[tuple[str, str, int]]) -> str:
    """The node's facts, then gpu.probe_script() last (it may `exit`). peers: (name, host, port)."""
    q = shlex.quote
    targets = " ".join(q(f"{name}={host}={port}") for name, host, port in peers)
    return (
        _FACTS.format(
            mark=MARK, prefix=q(prefix), python=q(python), torch=q(_TORCH), tcp=q(_TCP),
            targets=targets,
        )
        + gpu.probe_script()
    )  # fmt: skip


def parse_facts(text: str, stderr: str, python: str) -> NodeFacts:
    """The facts script's output -> NodeFacts. Example lines before the GPU probe:

    @@doctor uid 0
    @@doctor disk 77918228 /opt
    @@doctor env {"torch": "2.5.1", "cuda": "11.8", "nccl": "2.21.5"}
    @@doctor tcp {"node1": null}
    """
    at = text.find(gpu.MARK + " ")
    said: dict[str, str] = {}
    for line in text[: at if at >= 0 else len(text)].splitlines():
        if line.startswith(MARK + " "):
            key, _, value = line[len(MARK) + 1 :].partition(" ")
            said[key] = value
    free, _, path = said.get("disk", "").partition(" ")
    return NodeFacts(
        uid=_int(said.get("uid")),
        sudo_rc=_int(said.get("sudo")),
        env=_env(said, stderr, python),
        disk_free_kib=_int(free),
        disk_path=path,
        tcp=_tcp(said),
        gpus=gpu.parse_probe(text[at:] if at >= 0 else ""),
    )


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().lstrip("-").isdigit() else None


def _json(value: str | None) -> dict | None:
    try:
        got = json.loads(value or "")
    except ValueError:
        return None
    return got if isinstance(got, dict) else None


def _tcp(said: Mapping[str, str]) -> Mapping[str, str | None] | str:
    got = _json(said.get("tcp"))
    return got if got is not None else said.get("tcp-error", "the test printed nothing")


def _env(said: Mapping[str, str], stderr: str, python: str) -> EnvFacts:
    if "env-absent" in said:
        return EnvFacts(python, present=False)
    got = _json(said.get("env"))
    if got is None:  # the interpreter itself died: its stderr is all there is
        last = tail(stderr, 2) or "no output"
        return EnvFacts(python, present=True, error=f"{python} failed: {last}")
    return EnvFacts(python, True, got.get("torch"), got.get("cuda"), got.get("nccl"),
                    got.get("error"))  # fmt: skip


# --- gathering -------------------------------------------------------------------------------


def _address(fleet: Fleet, node: Node) -> str:
    # The connected host is ~/.ssh/config's HostName where the inventory names an alias.
    conn = fleet.conns.get(node.name)
    return conn.fabric.host if conn else node.host


def gather_facts(fleet: Fleet) -> dict[str, NodeFacts | NodeError]:
    inventory = fleet.inventory

    def one(conn: Conn) -> NodeFacts:
        env = envs.location(inventory, conn.node)
        peers = [(n.name, _address(fleet, n), n.port) for n in fleet.nodes if n != conn.node]
        script = facts_script(env.python, env.path, peers)
        result = conn.run(["sh", "-c", script], timeout=FACTS_TIMEOUT_S)
        return parse_facts(result.stdout, result.stderr, env.python)

    return fleet.map(one)


def clock_offset(conn: Conn, samples: int = 3) -> float:
    """Node clock minus ours, seconds: the fastest of `samples` answers, taken at its middle."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        before = time.time()
        answer = conn.run(["date", "+%s.%N"]).stdout.strip()
        after = time.time()
        seconds, _, fraction = answer.partition(".")
        node = float(seconds) + (float("0." + fraction) if fraction.isdigit() else 0.0)
        if best is None or after - before < best[0]:
            best = (after - before, node - (before + after) / 2)
    assert best is not None
    return best[1]


def port_test(fleet: Fleet, master: str, port: int) -> PortTest:
    """Bind on the master, connect from every other node of the run, all at once."""
    # Only nodes we reached: waiting for one that cannot connect would only delay the listener.
    workers = [n.name for n in fleet.nodes if n.name != master and n.name in fleet.conns]
    conn = fleet.conns.get(master)
    if conn is None:
        return PortTest(master, port, None, f"{master} is not reachable", {})
    token, wait = secrets.token_hex(8), REACH_S + 2
    got: dict[str, dict] = {}
    argv = ["python3", "-c", _LISTEN, str(port), token, str(len(workers)), str(wait)]
    listener = threading.Thread(target=lambda: got.update(r=_run_json(conn, argv, wait + 10)))
    listener.start()
    reach = ["python3", "-c", _REACH, conn.fabric.host, str(port), token, str(REACH_S)]
    answers = fleet.map(lambda c: _run_json(c, reach, REACH_S + 10), workers)
    listener.join()
    listen = got["r"]
    reached = {
        w: str(a) if isinstance(a, NodeError) else a.get("error") for w, a in answers.items()
    }
    return PortTest(master, port, listen.get("free"), listen.get("error"), reached)


def _run_json(conn: Conn, argv: list[str], timeout: float) -> dict:
    """A helper's one JSON line; a failure to run it becomes {"error": ...}, never raised."""
    try:
        result = conn.run(argv, check=False, timeout=timeout)
    except NodeError as e:
        return {"free": None, "error": e.message}
    lines = result.stdout.strip().splitlines()
    got = _json(lines[-1] if lines else "")
    if got is None:
        last = tail(result.stderr or result.stdout, 1) or "no output"
        return {"free": None, "error": f"{argv[0]} exited {result.exit_code}: {last}"}
    return got


def master_of(inventory: Inventory) -> str:
    """The run's master: cluster.master when selected, else the first selected node."""
    names = [n.name for n in inventory.nodes]
    return inventory.cluster.master if inventory.cluster.master in names else names[0]


# --- checks: facts in, (status, message, fix) out --------------------------------------------


def ok(name: str, message: str) -> Check:
    return Check(name, Status.PASS, message)


def warn(name: str, message: str, fix: str = "") -> Check:
    return Check(name, Status.WARN, message, fix)


def fail(name: str, message: str, fix: str) -> Check:
    return Check(name, Status.FAIL, message, fix)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(f"{part:02d}" if i == 2 else str(part) for i, part in enumerate(version))


def check_ssh(node: Node, error: NodeError | None) -> Check:
    if error is None:
        return ok("ssh", f"{node.user}@{node.address}, host key checked")
    fix = "check host/port in the inventory and that sshd runs there (invoke ping)"
    if isinstance(error, HostKeyUnknown):
        fix = f"invoke trust --nodes {node.name}"
    elif isinstance(error, HostKeyChanged):
        fix = "if the node was reinstalled: remove its known_hosts line, then invoke trust"
    elif isinstance(error, AuthError):
        fix = "add the public key to the node's authorized_keys, or fix ssh.key"
    return fail("ssh", error.message, fix)


def check_sudo(uid: int | None, sudo_rc: int | None, user: str) -> Check:
    # A warning, not a failure: bootstrap logs in as root (it does not use sudo yet); a training
    # run does not need root. Never advise widening sudo: nothing here would use it.
    if uid == 0:
        return ok("sudo", "root")
    has = "has passwordless sudo" if sudo_rc == 0 else (
        "has no sudo" if sudo_rc == 127 else "has sudo with a password")
    fix = "bootstrap as root: set ssh.user: root for this node (training does not need it)"
    return warn("sudo", f"{user} is not root and {has}; bootstrap logs in as root", fix)


def check_driver(gpus: gpu.NodeGpus, expected: int | None) -> Check:
    """CUDA 11.8 wants >= 520.61.05; >= 450.80.02 runs it through minor-version compatibility.
    No driver is fine on a CPU node, a failure where the inventory says the node has GPUs."""
    install = f"install an NVIDIA driver >= {_dotted(CUDA_118_DRIVER)}, then reboot"
    error = gpus.driver_error
    if error and gpus.exit_code not in gpu.NO_DRIVER_CODES:  # there, but broken (15: off the bus)
        return fail("driver", f"nvidia-smi exit {gpus.exit_code}: {error}", "reboot the node")
    if error and expected:
        return fail("driver", f"gpus: {expected} in the inventory, but {error}", install)
    if error:
        return warn("driver", f"CPU only ({error})")
    driver = gpus.gpus[0].driver
    version = _version(driver)
    if version >= CUDA_118_DRIVER:
        return ok("driver", f"{driver} >= {_dotted(CUDA_118_DRIVER)} (CUDA 11.8)")
    if version >= MINOR_COMPAT_DRIVER:
        why = "CUDA 11.8 through minor-version compatibility only (limited, no PTX JIT)"
        return warn("driver", f"{driver}: {why}", install)
    limit = _dotted(MINOR_COMPAT_DRIVER)
    return fail("driver", f"{driver} < {limit}: too old for CUDA 11.8", install)


def _reference(values: Mapping[str, object], master: str) -> object:
    """What most nodes have; on a tie, the master's value (it hosts rank 0)."""
    counts = Counter(values.values())
    top = max(counts.values())
    if master in values and counts[values[master]] == top:
        return values[master]
    return next(v for v in values.values() if counts[v] == top)


def _holders(values: Mapping[str, object], value: object) -> str:
    return ", ".join(name for name, v in values.items() if v == value)


def check_gpu_count(name: str, counts: Mapping[str, int], master: str, expected: int | None
                    ) -> Check:  # fmt: skip
    """Equal GPUs on every node (torchrun starts the same --nproc-per-node everywhere), and as
    many as the inventory's gpus: says."""
    mine, usual = counts[name], _reference(counts, master)
    if expected is not None and mine != expected:
        fix = f"check nvidia-smi -L on {name}, or fix nodes.{name}.gpus"
        return fail("gpus", f"{mine} GPUs, the inventory says gpus: {expected}", fix)
    if mine != usual:
        fix = "train on nodes with equal GPUs (--nodes), or pass --nproc-per-node"
        holders = _holders(counts, usual)
        verb = "has" if "," not in holders else "have"
        return fail("gpus", f"{mine} GPUs; {holders} {verb} {usual}", fix)
    odd = [n for n, count in counts.items() if count != usual]
    if odd:
        return ok("gpus", f"{mine} GPUs; differs on {', '.join(odd)}")
    return ok("gpus", f"{mine} GPUs" + (" on every node" if len(counts) > 1 else ""))


def check_env(name: str, env: EnvFacts, has_gpus: bool) -> Check:
    fix = f"invoke bootstrap --nodes {name}"
    if not env.present:
        return fail("env", f"no env: {env.python} not found", fix)
    if env.error or not env.torch:
        return fail("env", f"import torch failed: {env.error}", fix)
    found = f"torch {env.torch}, CUDA {env.cuda or '-'}, NCCL {env.nccl or '-'}"
    if has_gpus and not env.cuda:
        return warn("env", f"{found}: a CPU build on a node with GPUs",
                    f"pin a CUDA build in python_env (torch, index_url), then {fix}")  # fmt: skip
    return ok("env", found)


def check_versions(name: str, versions: Mapping[str, tuple], master: str) -> Check:
    """torch / CUDA / NCCL equal on every node with a working env (the others fail `env`)."""
    usual = _reference(versions, master)
    labels = ("torch", "CUDA", "NCCL")
    diff = [f"{label} {a or '-'}" for label, a, b in zip(labels, versions[name], usual) if a != b]
    if diff:
        theirs = ", ".join(f"{label} {b or '-'}" for label, b in zip(labels, usual))
        fix = "pin the same versions in python_env, then invoke bootstrap"
        return fail("versions", f"{', '.join(diff)}; {_holders(versions, usual)}: {theirs}", fix)
    odd = [n for n, v in versions.items() if v != usual]
    if odd:
        return ok("versions", f"differs on {', '.join(odd)}")
    return ok("versions", "same on every node" if len(versions) > 1 else "one env only")


def check_port(name: str, test: PortTest) -> Check:
    """On the master: the port is free. On a worker: it connects to the master's listener."""
    where, port = f"{test.master}:{test.port}", test.port
    if name == test.master and test.free:
        return ok("master port", f"{port} free")
    if name == test.master and test.free is None:
        return warn("master port", f"{port} not tested: {test.error}", "install python3")
    if name == test.master:
        fix = (f"stop what holds it (ss -ltnp 'sport = :{port}'), or pick another port: "
               "cluster.master_port, train --master-port")  # fmt: skip
        return fail("master port", f"{port} in use: {test.error}", fix)
    if not test.free:
        return warn("master port", f"{where} not tested", f"see {test.master}'s master port")
    error = test.reached.get(name, "not tested")
    if error is None:
        return ok("master port", f"reached {where}")
    fix = f"allow TCP {port} from the workers to {test.master} (firewall)"
    return fail("master port", f"cannot reach {where}: {error}", fix)


def check_clock(offset_s: float | None) -> Check:
    if offset_s is None:
        return warn("clock", "could not read the node's clock")
    text = f"{round(offset_s, 3) + 0.0:+.3f}s from this machine"  # + 0.0: no "-0.000s"
    fix = "enable time sync on the nodes (timedatectl set-ntp true, or chrony)"
    if abs(offset_s) < CLOCK_WARN_S:
        return ok("clock", text)
    return (warn if abs(offset_s) < CLOCK_FAIL_S else fail)("clock", text, fix)


def check_disk(free_kib: int | None, path: str, prefix: str) -> Check:
    if free_kib is None:
        return warn("disk", f"could not read the free space under {prefix}")
    text = f"{free_kib / 2**20:.1f} GiB free at {path}"
    text += f" (for {prefix})" if path != prefix else ""
    fix = f"free space on {path}: the env with torch takes ~5 GiB, checkpoints more"
    if free_kib < DISK_FAIL_KIB:
        return fail("disk", text, fix)
    return warn("disk", text, fix) if free_kib < DISK_WARN_KIB else ok("disk", text)


def check_tcp(tcp: Mapping[str, str | None] | str) -> Check:
    """Each other node's SSH port from this node: the cheapest proof the nodes see each other."""
    if isinstance(tcp, str):
        return warn("tcp", f"not tested: {tcp}", "install python3 on the node")
    bad = "; ".join(f"{peer}: {why}" for peer, why in tcp.items() if why is not None)
    if bad:
        return fail("tcp", f"cannot connect to {bad}", "allow TCP between the nodes")
    if not tcp:
        return ok("tcp", "no other node")
    names = ", ".join(tcp) if len(tcp) <= 4 else f"all {len(tcp)} other nodes"
    return ok("tcp", f"reached the SSH port of {names}")


# --- the whole run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    """Everything the checks read; `facts` holds a NodeError for a node SSH could not reach."""

    master: str
    facts: Mapping[str, NodeFacts | NodeError]
    clocks: Mapping[str, float | NodeError]
    port: PortTest


def evaluate(inventory: Inventory, got: Gathered) -> dict[str, list[Check]]:
    """Pure: every node's checks, in table order. An unreachable node gets its ssh row only,
    one whose facts did not come back its ssh row and why."""
    ok = {name: f for name, f in got.facts.items() if isinstance(f, NodeFacts)}
    counts = {name: len(f.gpus.gpus) for name, f in ok.items()}
    versions = {name: f.env.versions for name, f in ok.items() if f.env.torch and not f.env.error}
    checks: dict[str, list[Check]] = {}
    for node in inventory.nodes:
        facts = got.facts[node.name]
        if isinstance(facts, ConnectError):
            checks[node.name] = [check_ssh(node, facts)]
            continue
        if isinstance(facts, NodeError):  # reached, but the facts script failed or hung
            fix = "run the node's checks by hand to see where it stops (df, python, nvidia-smi)"
            checks[node.name] = [check_ssh(node, None), fail("facts", facts.message, fix)]
            continue
        clock = got.clocks.get(node.name)
        rows = [
            check_ssh(node, None),
            check_sudo(facts.uid, facts.sudo_rc, node.user),
            check_driver(facts.gpus, node.gpus),
            check_gpu_count(node.name, counts, got.master, node.gpus),
            check_env(node.name, facts.env, bool(facts.gpus.gpus)),
        ]
        if node.name in versions:
            rows.append(check_versions(node.name, versions, got.master))
        rows += [
            check_port(node.name, got.port),
            check_clock(clock if isinstance(clock, float) else None),
            check_disk(facts.disk_free_kib, facts.disk_path, envs.env_dir(inventory, node)),
            check_tcp(facts.tcp),
        ]
        checks[node.name] = rows
    return checks


def gather(fleet: Fleet) -> Gathered:
    """The three round trips, each on every node at once."""
    facts = gather_facts(fleet)
    clocks = fleet.map(clock_offset)
    master = master_of(fleet.inventory)
    return Gathered(
        master, facts, clocks, port_test(fleet, master, fleet.inventory.cluster.master_port)
    )


def diagnose(fleet: Fleet) -> dict[str, list[Check]]:
    return evaluate(fleet.inventory, gather(fleet))


_STYLE = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


def render(checks: Mapping[str, Sequence[Check]]) -> Group:
    table = Table(header_style="bold")
    for column in ("node", "check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold", no_wrap=column in ("node", "check", "status"))
    for i, (name, rows) in enumerate(checks.items()):
        if i:
            table.add_section()
        for j, c in enumerate(rows):
            status = Text(c.status.value, style=_STYLE[c.status])
            cells = (name if j == 0 else "", c.name, status, Text(c.message), Text(c.fix))
            table.add_row(*cells)  # Text: "[Errno 111]" in a message is no markup
    return Group(table, Text(summary(checks)))


def summary(checks: Mapping[str, Sequence[Check]]) -> str:
    counts = Counter(c.status for rows in checks.values() for c in rows)
    return ", ".join(f"{counts[s]} {s.value}" for s in Status)


def exit_if_failed(checks: Mapping[str, Sequence[Check]]) -> None:
    bad = [f"{name} {c.name}" for name, rows in checks.items() for c in rows
           if c.status is Status.FAIL]  # fmt: skip
    if bad:
        raise DdpfleetError(f"doctor: {len(bad)} check(s) failed: {', '.join(bad)}")
