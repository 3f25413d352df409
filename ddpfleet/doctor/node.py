"""doctor's node side: what runs on the nodes, what it answers, and how it is gathered.

Every node in parallel, three short round trips each:

1. facts, one sh script: uid and sudo, the env's torch / CUDA / NCCL (envs.TORCH_FACTS_PY), free
   disk under the env prefix, TCP to every other node's SSH port, and gpu.probe_script();
2. the clock: `date +%s.%N` three times, the fastest answer corrected by half its round trip;
3. the master port: a short-lived listener on the master (it binds: the port is free) hands a
   token to every worker that connects (the worker reads it: the port is reachable, and it was
   our listener that answered, not whatever else holds the port).
"""

from __future__ import annotations

import json
import secrets
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ddpfleet import envs, gpu, trainuser
from ddpfleet.errors import NodeError
from ddpfleet.inventory import Node
from ddpfleet.shell import tail
from ddpfleet.ssh.connection import Conn, Fleet

MARK = "@@doctor"
REACH_S = 5.0  # how long a worker keeps trying the master's port (the listener may be starting)
FACTS_TIMEOUT_S = 120.0  # a cold `import torch` on a slow disk


@dataclass(frozen=True)
class EnvFacts:
    python: str
    present: bool
    torch: str | None = None
    cuda: str | None = None  # None: a CPU build
    nccl: str | None = None
    error: str | None = None  # why `import torch` failed
    available: bool | None = None  # torch.cuda.is_available() here
    gpus: int | None = None  # torch.cuda.device_count() here

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
    train_ids: str = ""  # the training user's "uid:gid" here; "" when it does not exist


@dataclass(frozen=True)
class PortTest:
    master: str
    port: int
    free: bool | None  # None: the listener could not run (error says why)
    error: str | None
    reached: Mapping[str, str | None]  # worker -> None (got our token) or why not


# --- node side -------------------------------------------------------------------------------

# runtime=True: a CUDA build whose CUDA does not work here fails the env check on a GPU node.
_TORCH = (
    envs.TORCH_FACTS_PY
    + 'import json\nprint("@@doctor env " + json.dumps(torch_facts(runtime=True)))\n'
)

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
say trainuser "$(getent passwd {train} | cut -d: -f3,4)"
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


def facts_script(
    python: str, prefix: str, peers: Sequence[tuple[str, str, int]], train: str = "train"
) -> str:
    """The node's facts, then gpu.probe_script() last (it may `exit`). peers: (name, host, port)."""
    q = shlex.quote
    targets = " ".join(q(f"{name}={host}={port}") for name, host, port in peers)
    return (
        _FACTS.format(
            mark=MARK,
            prefix=q(prefix),
            python=q(python),
            torch=q(_TORCH),
            tcp=q(_TCP),
            targets=targets,
            train=q(train),
        )
        + gpu.probe_script()
    )


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
        train_ids=said.get("trainuser", "").strip(),
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
    return EnvFacts(
        python,
        True,
        got.get("torch"),
        got.get("cuda"),
        got.get("nccl"),
        got.get("error"),
        got.get("available"),
        got.get("gpus"),
    )


# --- gathering -------------------------------------------------------------------------------


def _address(fleet: Fleet, node: Node) -> str:
    # The connected host is ~/.ssh/config's HostName where the inventory names an alias.
    conn = fleet.conns.get(node.name)
    return conn.host if conn else node.host


def gather_facts(fleet: Fleet) -> dict[str, NodeFacts | NodeError]:
    inventory = fleet.inventory

    def one(conn: Conn) -> NodeFacts:
        env = envs.location(inventory, conn.node)
        peers = [(n.name, _address(fleet, n), n.port) for n in fleet.nodes if n != conn.node]
        script = facts_script(
            env.python, env.path, peers, trainuser.settings(inventory, conn.node).name
        )
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
    reach = ["python3", "-c", _REACH, conn.host, str(port), token, str(REACH_S)]
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
