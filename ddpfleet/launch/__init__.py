"""`invoke train`: torchrun on every node as one gang. Plan, preflight, sync, run, collect.

    flags = TrainFlags(nodes=("node0", "node1"), run_id=new_run_id())
    with Fleet(inventory, nodes) as fleet:
        train(fleet, flags)          # raises DdpfleetError naming the first failing node

1. plan() is pure: inventory + flags + per-node facts -> per node the exact torchrun argv,
   environment and working directory, shown as a table before anything starts.
2. Preflight, every node in parallel, nothing started on failure, one line per problem:
   one probe per node (env python, torch/CUDA/NCCL versions, GPUs, addresses, the code dir
   claimed and locked for this run with its manifest), a fresh run id, the master port bound
   on the master and connected to from every worker, the script present after the sync
   (ddpfleet.sync: only what changed, deleting only what it sent itself).
3. One exec channel per node runs scripts/gang_runner.py, which owns torchrun and everything
   it starts (see its docstring: setsid, subreaper, stdin as the lifeline). The controller
   prefixes every line with its node and rank, writes logs/<run-id>/<node>.log, stops every
   node when one fails or its connection drops, and on Ctrl-C (twice: kill at once).
4. torchrun's per-rank logs come back over SFTP; one summary line per node.

This module does not import Invoke; tasks.py resolves the flags and calls train().
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import shlex
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

import paramiko

from ddpfleet import report
from ddpfleet.launch import sync
from ddpfleet.connection import Conn, Fleet
from ddpfleet.errors import DdpfleetError, NodeError, PlanError
from ddpfleet.hygiene import clean, open_private, private_dir
from ddpfleet.inventory import Inventory

DEFAULT_SCRIPT = "scripts/train_ddp.py"
DEFAULT_CODE_DIR = "~/ddpfleet/{cluster}/code"
DEFAULT_REMOTE_LOGS = "~/ddpfleet/{cluster}/runs"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
STOP_GRACE_S = 3.0  # runner: SIGTERM, then SIGKILL this much later (torchrun's own is 30 s)
HEARTBEAT_S = 2.0
WATCHDOG_S = 30  # silence either way this long: the connection is dead (runner stops the run)
CONNECT_CHECK_S = 10.0  # a worker's connect to the master's port; its runner may start later
CONTROL = b"\x1e"
MAX_LINE = 64 * 1024  # a node's output line longer than this is shown in pieces
TAIL_CHARS = 2000  # of each line kept for the last-lines of a failure message
RUNNER_FILES = ("gang_runner.py", "node_helper.py", "proctree.py")  # in the order it loads them


@dataclass(frozen=True)
class TrainFlags:
    """`invoke train` flags, parsed; nodes in run order (node_rank = position)."""

    nodes: tuple[str, ...] = ()
    script: str = DEFAULT_SCRIPT
    args: tuple[str, ...] = ()
    nproc_per_node: str = "auto"
    master_port: int | None = None
    env: tuple[tuple[str, str], ...] = ()
    run_id: str = ""
    project_dir: Path = Path(".")
    code_dir: str = DEFAULT_CODE_DIR
    remote_logs: str = DEFAULT_REMOTE_LOGS


@dataclass(frozen=True)
class NodeFacts:
    """What the probe found on one node (node_helper.py probe), plus how SSH reaches it."""

    python: str
    home: str
    ssh_host: str
    torch: str | None = None
    cuda: str | None = None
    nccl: str | None = None
    gpus: int | None = None  # nvidia-smi's count, when it was asked
    addrs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # iface -> IPv4s
    master_resolved: str | None = None  # the master's host as this node resolves it
    route_dev: str | None = None  # this node's interface towards that address


@dataclass(frozen=True)
class NodePlan:
    node: str
    rank: int
    host: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    log_dir: str


@dataclass(frozen=True)
class Plan:
    run_id: str
    master: str
    master_addr: str
    master_port: int
    nproc: int
    script: str
    nodes: tuple[NodePlan, ...]

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.node == name)


# -- flags ------------------------------------------------------------------------------------


def new_run_id() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def parse_env(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """--env K=V (repeatable) -> ((K, V), ...); bad names are refused, not passed on."""
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not ENV_NAME_RE.match(name):
            raise PlanError(f"--env {pair!r}: expected NAME=VALUE with NAME like MY_VAR")
        if name == "DDPFLEET_RUN_ID":
            raise PlanError("--env DDPFLEET_RUN_ID: set by ddpfleet; use --run-id instead")
        out.append((name, value))
    return tuple(out)


def check_code_dir(code_dir: str) -> str:
    try:
        code_dir.format(cluster="x")
    except (KeyError, IndexError, ValueError):
        code_dir = ""
    if not code_dir.strip():
        raise PlanError("--code-dir: give a path on the nodes, e.g. ~/ddpfleet/{cluster}/code "
                        "({cluster} is the only placeholder; write braces as {{ and }})")
    return code_dir


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise PlanError(f"--run-id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-' "
                        "(it names directories on every node)")
    return run_id


def run_order(inventory: Inventory, nodes: Sequence[str]) -> tuple[str, ...]:
    """Node names by node_rank. Without --nodes: all, the cluster's master first.

    torchrun's static rendezvous serves its store on node_rank 0, so an explicit
    cluster.master that is part of the run but not first in --nodes cannot be honoured.
    """
    master = inventory.cluster.master
    if not nodes:
        names = [n.name for n in inventory.nodes]
        return tuple([master] + [n for n in names if n != master] if master in names else names)
    explicit = (inventory.lines or {}).get(("cluster", "master"))
    if explicit and master in nodes and nodes[0] != master:
        raise PlanError(f"--nodes {','.join(nodes)}: {inventory.where('cluster', 'master')} makes "
                        f"{master} the master, but node_rank 0 (the first in --nodes) hosts "
                        f"torchrun's rendezvous: put {master} first")
    return tuple(nodes)


# -- the plan (pure) --------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def master_address(order: Sequence[str], facts: Mapping[str, NodeFacts]) -> str:
    """The master's address as the workers reach it: its SSH host when that is an IP, else
    what the first worker resolves it to (the master itself may say 127.0.1.1)."""
    master = facts[order[0]]
    if _is_ip(master.ssh_host):
        return master.ssh_host
    for name in order[1:]:
        if facts[name].master_resolved:
            return facts[name].master_resolved
    if len(order) > 1:
        raise PlanError(f"{order[1]}: cannot resolve the master's host {master.ssh_host!r}; "
                        f"use an IP address for {order[0]} in the inventory")
    return master.master_resolved or master.ssh_host


def socket_ifname(is_master: bool, addr: str, facts: NodeFacts) -> str | None:
    """The interface gloo/NCCL should use: on the master the one holding its address, on a
    worker the one its route to the master leaves by. None when not known."""
    if is_master:
        return next((i for i, ips in facts.addrs.items() if addr in ips), None)
    return facts.route_dev if facts.route_dev and facts.route_dev != "lo" else None


def check_nproc(flag: str) -> str:
    if flag != "auto" and (not flag.isdigit() or int(flag) < 1):
        raise PlanError(f"--nproc-per-node {flag!r}: use auto or a number >= 1")
    return flag


def nproc_per_node(inventory: Inventory, order: Sequence[str], flag: str,
                   facts: Mapping[str, NodeFacts]) -> int:
    """--nproc-per-node N, or auto: the node's GPUs (inventory gpus:, else nvidia-smi), 1 on a
    node without; torchrun needs the same count on every node."""
    if check_nproc(flag) != "auto":
        return int(flag)
    counts = {}
    for name in order:
        gpus = inventory.node(name).gpus
        gpus = facts[name].gpus if gpus is None else gpus
        counts[name] = gpus or 1
    if len(set(counts.values())) > 1:
        found = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise PlanError(f"--nproc-per-node auto: the nodes have different GPU counts ({found}); "
                        "torchrun needs the same count on every node: pick nodes with equal "
                        "counts or pass --nproc-per-node N")
    return next(iter(counts.values()))


def _under_home(path: str, home: str) -> str:
    return home.rstrip("/") + path[1:] if path == "~" or path.startswith("~/") else path


def plan(inventory: Inventory, flags: TrainFlags, facts: Mapping[str, NodeFacts]) -> Plan:
    """Per node: the exact torchrun argv, its environment and working directory."""
    order = run_order(inventory, flags.nodes)
    port = flags.master_port or inventory.cluster.master_port
    if not 1 <= port <= 65535:
        raise PlanError(f"--master-port {port}: use a port from 1 to 65535")
    addr = master_address(order, facts)
    nproc = nproc_per_node(inventory, order, flags.nproc_per_node, facts)
    cluster = inventory.cluster.name
    nodes = []
    for rank, name in enumerate(order):
        f = facts[name]
        log_dir = f"{_under_home(flags.remote_logs.format(cluster=cluster), f.home)}/{flags.run_id}"
        argv = (f.python, "-m", "torch.distributed.run", "--nnodes", str(len(order)),
                "--node-rank", str(rank), "--master-addr", addr, "--master-port", str(port),
                "--nproc-per-node", str(nproc), "--rdzv-id", flags.run_id,
                "--log-dir", log_dir, "--tee", "3", flags.script, *flags.args)
        env = {"DDPFLEET_RUN_ID": flags.run_id, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        ifname = socket_ifname(rank == 0, addr, f)
        if ifname:
            # NCCL reads a prefix list; '=' asks for exactly this interface (eth1 != eth10).
            env.update(GLOO_SOCKET_IFNAME=ifname, NCCL_SOCKET_IFNAME=f"={ifname}")
        env.update(flags.env)
        cwd = _under_home(flags.code_dir.format(cluster=cluster), f.home)
        nodes.append(NodePlan(name, rank, inventory.node(name).host, argv,
                              MappingProxyType(env), cwd, log_dir))
    return Plan(flags.run_id, order[0], addr, port, nproc, flags.script, tuple(nodes))


def check_versions(facts: Mapping[str, NodeFacts]) -> list[str]:
    """One line per problem: torch missing, or torch/CUDA/NCCL differing between nodes."""
    problems = [f"{n}: torch is not installed in {f.python}'s env; run invoke bootstrap"
                for n, f in facts.items() if f.torch is None]
    if problems:
        return problems
    for what in ("torch", "cuda", "nccl"):
        seen: dict[str, list[str]] = {}
        for name, f in facts.items():
            seen.setdefault(str(getattr(f, what)), []).append(name)
        if len(seen) > 1:
            found = "; ".join(f"{v} on {', '.join(ns)}" for v, ns in seen.items())
            problems.append(f"{what} versions differ between nodes: {found}; every node needs "
                            "the same (run invoke bootstrap)")
    return problems


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


# -- one member per node: gang_runner.py on one exec channel, preflight to exit -------------

RANK_LINE = re.compile(r"^\[([A-Za-z_][\w-]*?)(\d+)\]:(.*)$")
# torchrun's ChildFailedError summary: '  rank      : 3 (local_rank: 1)', '  exitcode  : 1 (pid...'
SUMMARY_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
SUMMARY_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
# torch >= 2.4 prefixes a worker's uncaught exception with '[rank3]: '.
TRACEBACK = re.compile(r"^(\[rank\d+\]:\s*)?Traceback \(most recent call last\)")
# The agent's own word that a worker died, logged as soon as it sees it, seconds before its
# own exit (teardown of an interpreter with torch loaded): the earliest reliable signal.
AGENT_SAW_FAILURE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")


def split_rank(line: str, node_rank: int, nproc: int) -> tuple[int | None, str]:
    """torchrun --tee prefixes a worker's lines with '[default<local rank>]:'; give back the
    global rank (node_rank * nproc + local rank) and the text. Agent lines have no rank."""
    m = RANK_LINE.match(line)
    if not m:
        return None, line
    return node_rank * nproc + int(m.group(2)), m.group(3)


@dataclass
class Clues:
    """What one node's output says about a failure, fed line by line (pure).

    The blamed rank is the first to print a traceback: a rank that raises prints it before it
    dies, its peers only fail after it died. Without one (a segfault, the OOM killer), torchrun's
    word: its 'failed (exitcode: ...)' line, or the root cause of its summary. The summary also
    gives each failed rank's exit code.
    """

    node_rank: int = 0
    nproc: int = 1
    traceback_rank: int | None = None
    agent_rank: int | None = None
    first_at: float | None = None  # when the first clue arrived (monotonic)
    exits: dict[int, int] = field(default_factory=dict)
    _summary_rank: int | None = None

    @property
    def rank(self) -> int | None:
        return self.traceback_rank if self.traceback_rank is not None else self.agent_rank

    def feed(self, rank: int | None, body: str, now: float) -> bool:
        """Take one line; True when it is torchrun saying that one of its workers failed."""
        if rank is not None:
            if self.traceback_rank is None and TRACEBACK.match(body):
                self.traceback_rank = rank
                self.first_at = now if self.first_at is None else self.first_at
            return False
        if m := AGENT_SAW_FAILURE.search(body):
            failed = self.node_rank * self.nproc + int(m.group(2))
            self.agent_rank = failed if self.agent_rank is None else self.agent_rank
            self.exits.setdefault(failed, int(m.group(1)))
            self.first_at = now if self.first_at is None else self.first_at
            return True
        if m := SUMMARY_RANK.match(body):
            self._summary_rank = int(m.group(1))
        elif (m := SUMMARY_EXIT.match(body)) and self._summary_rank is not None:
            self.exits[self._summary_rank] = int(m.group(1))
            self._summary_rank = None
        return False


class LineSplitter:
    """Bytes in, lines out; a line longer than MAX_LINE (a progress bar redrawn with \\r,
    binary output) comes out in MAX_LINE pieces, so memory stays bounded and the work linear."""

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        start = len(self.buf)
        self.buf += data
        out, begin = [], 0
        while True:
            end = self.buf.find(b"\n", max(begin, start))
            if end < 0 or end - begin > self.limit:
                if len(self.buf) - begin <= self.limit:
                    break
                end = begin + self.limit  # a piece of an over-long line, without a newline
                out.append(bytes(self.buf[begin:end]))
                begin = end
                continue
            out.append(bytes(self.buf[begin:end]))
            begin = end + 1
        del self.buf[:begin]
        return out

    def end(self) -> list[bytes]:
        rest, self.buf = bytes(self.buf), bytearray()
        return [rest] if rest else []


class Output:
    """Lines from every node on our stdout, as they come, one writer at a time."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def line(self, text: str, log=None) -> None:
        # Training output is node-controlled: escapes could forge lines, retitle or write the
        # operator's clipboard (OSC 52), on the terminal and in whatever later cats the log.
        text = clean(text)
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()
            if log is not None and not log.closed:  # closed: a node given up on, still talking
                log.write(text + "\n")
                log.flush()


@dataclass
class Outcome:
    """How one node's part ended, as the controller saw it."""

    node: str
    state: str = "running"  # running -> ok | failed | stopped | lost
    exit_code: int | None = None
    seconds: float = 0.0
    rank: int | None = None  # the rank that failed, from torchrun's root cause or a traceback
    evidence_at: float | None = None  # when the first sign of failure arrived (monotonic)
    last_lines: tuple[str, ...] = ()
    why: str = ""


class Member:
    """One node's gang_runner.py on one exec channel of the run's connection; a thread pumps
    its output. open() starts the preflight, launch() the run, call_off() ends it unstarted."""

    def __init__(self, conn: Conn, python: str, out: Output):
        self.conn, self.python, self.out = conn, python, out
        self.chan: paramiko.Channel | None = None
        self.plan: NodePlan | None = None
        self.nproc = 1
        self.log = None
        self.facts: dict | None = None
        self.got_facts = threading.Event()
        self.outcome = Outcome(conn.name)
        self.lines: deque[tuple[int | None, str]] = deque(maxlen=400)
        self.clues = Clues()
        self.stopped_by_us = False  # the runner said it is stopping at our word
        self.told_to_stop = False
        self.failed_itself = False  # torchrun said a worker failed before we said stop
        self.started = self.last_heard = time.monotonic()
        self.done = threading.Event()
        self.finishing = threading.Lock()

    @property
    def name(self) -> str:
        return self.conn.name

    @property
    def failing(self) -> bool:
        """Failed or lost, or torchrun already said a worker died (its exit is seconds off)."""
        return self.failed_itself or (self.done.is_set()
                                      and self.outcome.state in ("failed", "lost"))

    def open(self, ask: Mapping[str, object]) -> None:
        chan = self.conn.transport.open_session(timeout=self.conn.node.connect_timeout)
        chan.set_combine_stderr(True)
        # The run id in the runner's own environment too: every process of the run carries it.
        env = shlex.join(["env", f"DDPFLEET_RUN_ID={ask['run_id']}"])
        chan.exec_command(f"{env} {sync.helper_command(self.python, 'gang_runner.py')}")
        chan.sendall(b"".join(sync.helper_source(h) for h in RUNNER_FILES)
                     + json.dumps(ask).encode() + b"\n")
        self.chan = chan
        threading.Thread(target=self.pump, name=f"pump-{self.name}", daemon=True).start()

    def wait_facts(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while not self.got_facts.wait(0.05):
            if self.done.is_set() or time.monotonic() > deadline:
                raise NodeError(self.name, self.why_no_facts(timeout))
        return self.facts

    def why_no_facts(self, timeout: float) -> str:
        said = " | ".join(t for _, t in list(self.lines)[-3:])
        if self.outcome.exit_code == 127 or "No such file or directory" in said:
            return (f"no python at {self.python} (the training env); run invoke bootstrap, "
                    "or fix python_env in the inventory")
        if not self.done.is_set():
            return f"the preflight probe gave no answer within {timeout:g}s"
        return f"the preflight probe failed (exit {self.outcome.exit_code}): {said or 'no output'}"

    def launch(self, node: NodePlan, nproc: int, log_path: Path) -> None:
        """Start torchrun: the spec goes on stdin (--env values may be secrets)."""
        self.plan, self.nproc = node, nproc
        self.clues = Clues(node.rank, nproc)
        self.log = open_private(log_path)  # closed in finish, by the pump thread
        self.started = self.last_heard = time.monotonic()
        spec = {"argv": list(node.argv), "env": dict(node.env), "cwd": node.cwd,
                "grace": STOP_GRACE_S, "watchdog": WATCHDOG_S, "heartbeat": HEARTBEAT_S}
        self.chan.sendall(json.dumps(spec).encode() + b"\n")

    def give_up(self, why: str) -> None:
        """Treat the node as lost: close its channel. Its runner, if it still hears anything,
        sees EOF and stops the run; a dead peer never confirms, so do not wait for it."""
        self.outcome.why = why
        try:
            self.chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        if not self.done.wait(2):
            self.finish(-1)

    def call_off(self) -> None:
        """EOF before a spec: the runner frees the port and exits, having started nothing."""
        if self.chan is not None:
            try:
                self.chan.shutdown_write()
            except (OSError, EOFError, paramiko.SSHException):
                pass
            self.done.wait(5)
            self.chan.close()

    def send(self, word: str) -> None:
        self.told_to_stop = self.told_to_stop or word in ("stop", "kill")
        try:
            if self.chan is not None and not self.done.is_set():
                self.chan.sendall(word.encode() + b"\n")
        except (OSError, EOFError, paramiko.SSHException):
            pass  # its connection is gone: the pump reports that

    def pump(self) -> None:
        lines = LineSplitter()
        try:
            while data := self.chan.recv(65536):
                self.last_heard = time.monotonic()
                for raw in lines.feed(data):
                    self.handle(raw)
            for raw in lines.end():
                self.handle(raw)
            code = self.chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException):
            code = -1
        self.finish(code)

    def handle(self, raw: bytes) -> None:
        if raw.startswith(CONTROL):
            return self.control(raw[1:])
        text = raw.decode(errors="replace").rstrip("\r")
        rank, body = (None, text) if self.plan is None else split_rank(
            text, self.plan.rank, self.nproc)
        self.lines.append((rank, body[:TAIL_CHARS]))  # the tail for a failure message
        if self.plan is not None and self.clues.feed(rank, body, time.monotonic()):
            self.failed_itself = self.failed_itself or not self.told_to_stop
        prefix = f"[{self.name}]" if rank is None else f"[{self.name} r{rank}]"
        self.out.line(f"{prefix} {body}", self.log)

    def control(self, payload: bytes) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        kind = event.pop("event", None)
        if kind == "hb":
            return
        if kind == "facts":
            self.facts = event
            self.got_facts.set()
        elif kind == "stopping":
            self.stopped_by_us = True
            if self.log is not None and not self.log.closed:
                self.log.write(f"[{self.name}] ddpfleet: stopping: {event.get('reason')}\n")
        elif kind == "killed":
            what = ("torchrun, its workers gone" if event.get("agent_only") else
                    f"pids {event.get('pids')}, still there")
            self.out.line(f"[{self.name}] ddpfleet: SIGKILLed {what} {event.get('after')}s "
                          "after SIGTERM", self.log)
        elif kind == "error":
            self.out.line(f"[{self.name}] ddpfleet: {event.get('error')}", self.log)

    def finish(self, code: int) -> None:
        with self.finishing:
            if self.done.is_set():
                return  # given up on already; the pump came back late
            self.conclude(code)
            self.done.set()

    def conclude(self, code: int) -> None:
        o = self.outcome
        o.seconds = time.monotonic() - self.started
        o.exit_code = None if code == -1 else code
        if code == 0:
            o.state = "ok"
        elif code == -1:
            o.state, o.why = "lost", o.why or "its connection dropped"
        elif self.stopped_by_us and not self.failed_itself:
            o.state = "stopped"
        else:
            o.state = "failed"
        if o.state in ("failed", "lost"):
            o.rank = self.clues.rank
            o.evidence_at = self.clues.first_at or time.monotonic()
            if o.exit_code is not None:  # the failed rank's own code, not torchrun's or ours
                o.exit_code = self.clues.exits.get(o.rank, o.exit_code)
        o.last_lines = self.tail(o.rank)
        if self.log is not None:
            self.log.close()

    def tail(self, rank: int | None, n: int = 12) -> tuple[str, ...]:
        """The failing rank's last lines when known (its traceback), else the node's."""
        mine = [t for r, t in self.lines if rank is not None and r == rank]
        return tuple((mine or [t for _, t in self.lines])[-n:])


# -- preflight: every node at once, nothing started on failure -------------------------------


@dataclass(frozen=True)
class Probed:
    facts: NodeFacts
    manifest: Mapping[str, list]
    code: Mapping[str, object]  # the code dir: claimed and locked for this run, or why not
    listen: Mapping[str, object] | None  # the master's bind test
    reach: Mapping[str, object] | None  # a worker's connect to the master's port


def _probed(conn: Conn, python: str, got: Mapping) -> Probed:
    facts = NodeFacts(
        python=python, home=got["home"], ssh_host=conn.fabric.host, torch=got["torch"],
        cuda=got["cuda"], nccl=got["nccl"], gpus=got["gpus"],
        addrs=MappingProxyType({k: tuple(v) for k, v in got["addrs"].items()}),
        master_resolved=got["master_resolved"], route_dev=got["route_dev"],
    )
    return Probed(facts, got["manifest"], got["code"], got.get("listen"), got.get("reach"))


def open_members(fleet: Fleet, flags: TrainFlags, order: Sequence[str],
                 python: Mapping[str, str], out: Output) -> dict[str, Member]:
    """A runner per node; the master binds and holds the port, the workers connect to it."""
    inventory = fleet.inventory
    port = flags.master_port or inventory.cluster.master_port
    master_host = fleet.conns[order[0]].fabric.host
    members = {}
    for rank, name in enumerate(order):
        ask = {"run_id": flags.run_id,
               "code_dir": flags.code_dir.format(cluster=inventory.cluster.name),
               "master_host": master_host,
               "count_gpus": flags.nproc_per_node == "auto" and inventory.node(name).gpus is None,
               "listen": port if rank == 0 else None,
               "reach": None if rank == 0 else {"port": port, "timeout": CONNECT_CHECK_S}}
        members[name] = Member(fleet.conns[name], python[name], out)
        members[name].open(ask)
    return members


def port_problems(order: Sequence[str], probed: Mapping[str, Probed], port: int) -> list[str]:
    listen = probed[order[0]].listen or {}
    if not listen.get("ok"):
        return [(f"{order[0]}: master port {port} is not free ({listen.get('error')}); stop "
                 "what holds it or pick another with --master-port")]
    problems = []
    for name in order[1:]:
        reach = probed[name].reach or {}
        if not reach.get("ok"):
            problems.append(f"{name}: cannot reach the master {order[0]} on port {port} "
                            f"({reach.get('error')}); open that port between the nodes or "
                            "pick another with --master-port")
    return problems


def _fail_if(problems: Sequence[str], what: str) -> None:
    if problems:
        raise PlanError(f"{what}; nothing was started:\n  " + "\n  ".join(problems))


def preflight(fleet: Fleet, flags: TrainFlags, members: Mapping[str, Member]
              ) -> tuple[Plan, dict[str, Probed]]:
    """Every node's facts (in parallel: the runners probe at once), then the pure plan."""
    order = run_order(fleet.inventory, flags.nodes)
    port = flags.master_port or fleet.inventory.cluster.master_port
    probed, problems = {}, []
    for name in order:  # the master first: a taken port need not wait for the workers' connects
        m = members[name]
        try:
            probed[name] = _probed(m.conn, m.python, m.wait_facts())
        except NodeError as e:
            problems.append(str(e))
        if name == order[0] and name in probed and not (probed[name].listen or {}).get("ok"):
            _fail_if(port_problems(order[:1], probed, port) + problems, "preflight failed")
    _fail_if(problems, "preflight failed")
    facts = {n: p.facts for n, p in probed.items()}
    claims = {n: probed[n].code for n in order}
    _fail_if(sync.code_dir_problems(claims, flags.code_dir) + check_versions(facts)
             + port_problems(order, probed, port), "preflight failed")
    return plan(fleet.inventory, flags, facts), probed


def reused_run_id(fleet: Fleet, p: Plan) -> list[str]:
    """One line per node that already has this run's log dir: torchrun would add to it and
    the rank logs of two runs would meet under one logs/<run-id>/."""

    def one(conn: Conn) -> bool:
        try:
            conn.sftp().lstat(p.node(conn.name).log_dir)
        except FileNotFoundError:
            return False
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise NodeError(conn.name, f"cannot check {p.node(conn.name).log_dir}: {e}") from None
        return True

    results = fleet.map(one, [n.node for n in p.nodes])
    return [str(r) if isinstance(r, NodeError) else
            f"{name}: --run-id {p.run_id} was used before ({p.node(name).log_dir} exists); "
            "pick a new --run-id or leave it out for a fresh one"
            for name, r in results.items() if r is not False]


def fresh_run_dir(run_dir: Path, make: bool = False) -> None:
    """Refuse a run id whose logs/<run-id>/ exists: a reused id never overwrites old logs."""
    try:
        if make:
            private_dir(run_dir.parent)  # output may hold secrets: 0700, files 0600
            run_dir.mkdir(mode=0o700)  # exclusive: a second run of the same id loses here
        elif run_dir.exists():
            raise FileExistsError
    except FileExistsError:
        raise PlanError(f"--run-id {run_dir.name} was used before ({run_dir} exists); pick a "
                        "new --run-id or leave it out for a fresh one") from None


def push_code(fleet: Fleet, p: Plan, files: Mapping[str, sync.Entry], root: Path,
              probed: Mapping[str, Probed]) -> dict[str, sync.SyncStats | NodeError]:
    """Only what changed, every node in parallel; each says whether the script is there."""

    def one(conn: Conn) -> sync.SyncStats:
        n = p.node(conn.name)
        remote = probed[conn.name].manifest
        change = sync.diff(files, remote)
        stats = sync.push(conn, n.argv[0], n.cwd, root, files, change, p.script, remote,
                          p.run_id)
        if not stats.script:
            raise NodeError(conn.name, f"{n.cwd}/{p.script} is missing after the sync")
        return stats

    return fleet.map(one, [n.node for n in p.nodes])


def _sync_line(results: Mapping[str, sync.SyncStats | NodeError]) -> str:
    parts = []
    for name, s in results.items():
        if isinstance(s, sync.SyncStats):
            parts.append(f"{name} unchanged" if not (s.sent or s.deleted) else
                         f"{name} {s.sent} sent ({s.bytes / 1024:.1f} KiB), {s.deleted} deleted")
    return "code: " + "; ".join(parts)


def prepare(fleet: Fleet, flags: TrainFlags, members: Mapping[str, Member],
            files: Mapping[str, sync.Entry], root: Path) -> Plan:
    """Everything before launch: probes, the plan table, the sync and the script check."""
    p, probed = preflight(fleet, flags, members)
    _fail_if(reused_run_id(fleet, p), "preflight failed")
    report.show(render_plan(p, flags.env))
    results = push_code(fleet, p, files, root, probed)
    _fail_if([str(r) for r in results.values() if isinstance(r, NodeError)], "code sync failed")
    report.console.print(_sync_line(results), markup=False)
    return p


# -- the gang ---------------------------------------------------------------------------------


class Gang:
    """Every member runs until all are done; the first failure, a lost connection or a signal
    (SIGINT, SIGTERM, SIGHUP) stops the rest. A second signal kills at once."""

    def __init__(self, members: Sequence[Member], out: Output):
        self.members, self.out = list(members), out
        self.signals = 0
        self.handled = 0
        self.reason: str | None = None  # why the gang was stopped, once it was
        self.deadline: float | None = None

    def run(self, p: Plan, run_dir: Path) -> None:
        previous = {s: signal.signal(s, self.on_signal)
                    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for m, node in zip(self.members, p.nodes):
                self.launch(m, node, p.nproc, run_dir / f"{node.node}.log")
            self.loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def launch(self, m: Member, node: NodePlan, nproc: int, log_path: Path) -> None:
        try:
            m.launch(node, nproc, log_path)
        except (OSError, EOFError, paramiko.SSHException) as e:
            m.outcome.why = f"could not start: {e}"

    def on_signal(self, signum, frame) -> None:
        # Only count here: the loop acts on it (a handler must not take locks the loop holds).
        self.signals += 1

    def loop(self) -> None:
        beat = time.monotonic()
        while not all(m.done.is_set() for m in self.members):
            time.sleep(0.05)
            self.check_signals()
            self.check_failures()
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                for m in self.members:
                    m.send("hb")
                    if not m.done.is_set() and beat - m.last_heard > WATCHDOG_S:
                        m.give_up(f"no word from it for {WATCHDOG_S}s")
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.abandon()
                return

    def check_signals(self) -> None:
        while self.handled < self.signals:
            self.handled += 1
            if self.handled == 1:
                self.out.line("ddpfleet: interrupted: stopping every node "
                              "(interrupt again to kill at once)")
                self.stop("interrupted")
            else:
                self.out.line("ddpfleet: killing every node now")
                self.kill()

    def check_failures(self) -> None:
        if self.reason is not None:
            return
        for m in self.members:
            if m.failing:
                why = "lost its connection" if m.outcome.state == "lost" else "failed"
                self.out.line(f"ddpfleet: {m.name} {why}: stopping every node")
                self.stop(f"{m.name} {why}")
                return

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        for m in self.members:
            m.send("stop")
        # The runners kill after STOP_GRACE_S; past this, stop waiting for a node to confirm.
        self.deadline = time.monotonic() + STOP_GRACE_S + 12

    def kill(self) -> None:
        self.reason = self.reason or "killed"
        for m in self.members:
            m.send("kill")
        self.deadline = min(self.deadline or float("inf"), time.monotonic() + 8)

    def abandon(self) -> None:
        """A node that never confirmed: close its channel; its runner sees EOF and kills."""
        for m in self.members:
            if not m.done.is_set():
                m.give_up("did not confirm the stop; its channel was closed")


def first_failure(outcomes: Sequence[Outcome]) -> Outcome | None:
    """The node that failed first: the earliest sign of failure (a rank's traceback, or the
    exit). A rank that raises prints its traceback before it dies; its peers only hear of it
    after it died, so their tracebacks come later."""
    failed = [o for o in outcomes if o.state in ("failed", "lost")]
    return min(failed, key=lambda o: o.evidence_at or float("inf")) if failed else None


def exit_text(code: int | None) -> str:
    """'exit 1', or 'SIGTERM' for a process a signal ended (Python's negative return code)."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            pass
    return f"exit {code}"


def summary_line(o: Outcome, first: Outcome | None, reason: str | None) -> str:
    secs = f"{o.seconds:.1f}s"
    if o.state == "ok":
        return f"{o.node}: ok (exit 0, {secs})"
    if o.state == "stopped":
        return f"{o.node}: stopped ({reason or 'by ddpfleet'}, {secs})"
    if o.state == "lost":
        return f"{o.node}: lost ({o.why}, {secs})" + (" <- first failure" if o is first else "")
    rank = f"rank {o.rank} " if o.rank is not None else ""
    mark = " <- first failure" if o is first else ""
    return f"{o.node}: failed ({rank}{exit_text(o.exit_code)}, {secs}){mark}"


def failure_message(first: Outcome, outcomes: Sequence[Outcome]) -> str:
    rank = f" rank {first.rank}" if first.rank is not None else ""
    how = exit_text(first.exit_code) if first.state == "failed" else first.why
    others = ", ".join(f"{o.node} {o.state}" for o in outcomes if o is not first)
    lines = "\n    ".join(first.last_lines) or "(no output)"
    return (f"training failed: {first.node}{rank} failed first ({how})"
            f"{'; ' + others if others else ''}. Last lines of {first.node}{rank}:\n    {lines}")


# -- logs back, and the whole run -------------------------------------------------------------

RANK_LOG = re.compile(r"attempt_(\d+)/(\d+)/([^/]+)$")


def local_log_name(node: NodePlan, nproc: int, rel: str) -> str:
    """'<rdzv>_x/attempt_0/1/stderr.log' on node1 (rank 1, 2 procs) -> 'node1-rank3.stderr.log'."""
    m = RANK_LOG.search(rel)
    if not m:
        return f"{node.node}-{rel.rsplit('/', 1)[-1]}"
    attempt = f".attempt{m.group(1)}" if m.group(1) != "0" else ""
    rank = node.rank * nproc + int(m.group(2))
    return f"{node.node}-rank{rank}{attempt}.{m.group(3)}"


def _remote_files(sftp: paramiko.SFTPClient, top: str) -> list[str]:
    import stat as st

    found, todo = [], [top]
    while todo:
        d = todo.pop()
        for a in sftp.listdir_attr(d):
            path = f"{d}/{a.filename}"
            if st.S_ISDIR(a.st_mode or 0):
                todo.append(path)
            elif st.S_ISREG(a.st_mode or 0):
                found.append(path)
    return sorted(found)


def fetch_rank_logs(fleet: Fleet, p: Plan, run_dir: Path, nodes: Sequence[str]
                    ) -> dict[str, int | NodeError]:
    """torchrun's per-rank files from these nodes' --log-dir into logs/<run-id>/."""

    def one(conn: Conn) -> int:
        n = p.node(conn.name)
        try:
            sftp = conn.sftp()
            try:
                paths = _remote_files(sftp, n.log_dir)
            except FileNotFoundError:
                return 0  # torchrun never got as far as making it
            for path in paths:
                local = run_dir / local_log_name(n, p.nproc, path[len(n.log_dir) + 1:])
                with open_private(local, "wb") as f:
                    sftp.getfo(path, f)
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise NodeError(conn.name, f"SFTP from {n.log_dir} failed: {e}") from None
        return len(paths)

    return fleet.map(one, [n for n in nodes if fleet.conns[n].transport.is_active()])


def train(fleet: Fleet, flags: TrainFlags, python: Mapping[str, str], log_root: Path,
          out: Output | None = None) -> list[Outcome]:
    """Plan, check, sync, run as one gang, collect. Raises DdpfleetError naming the first
    failing node and rank; KeyboardInterrupt after an interrupt stopped every node."""
    out = out or Output()
    check_nproc(flags.nproc_per_node)  # flag mistakes before any connection
    root = flags.project_dir.resolve()
    files = sync.project_files(root)
    sync.require(files, flags.script, root)
    run_dir = log_root / flags.run_id
    fresh_run_dir(run_dir)  # before any connection; made once the preflight passed
    order = run_order(fleet.inventory, flags.nodes)
    _fail_if([str(r) for r in fleet.open().values() if isinstance(r, NodeError)],
             "cannot reach every node")
    members = open_members(fleet, flags, order, python, out)
    try:
        p = prepare(fleet, flags, members, files, root)
        fresh_run_dir(run_dir, make=True)
    except BaseException:  # a refusal or Ctrl-C: every runner exits having started nothing
        for m in members.values():
            m.call_off()
        raise
    gang = Gang([members[n.node] for n in p.nodes], out)
    gang.run(p, run_dir)
    return conclude(fleet, p, gang, run_dir, out)


def conclude(fleet: Fleet, p: Plan, gang: Gang, run_dir: Path, out: Output) -> list[Outcome]:
    """Rank logs back, one summary line per node, and the verdict."""
    outcomes = [m.outcome for m in gang.members]
    # Not from a lost node: SFTP to a peer that went silent would hang with it.
    fetched = fetch_rank_logs(fleet, p, run_dir, [o.node for o in outcomes if o.state != "lost"])
    first = first_failure(outcomes)
    for o in outcomes:
        out.line(summary_line(o, first, gang.reason))
    missing = [str(r) for r in fetched.values() if isinstance(r, NodeError)]
    out.line(f"logs: {run_dir}" + (f" (not copied: {'; '.join(missing)})" if missing else ""))
    if first is not None:
        raise DdpfleetError(failure_message(first, outcomes))
    if gang.handled:
        raise KeyboardInterrupt
    return outcomes
