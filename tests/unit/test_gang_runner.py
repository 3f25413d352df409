"""gang_runner.py run here, fed on stdin exactly as launch.Member feeds it on a node.

The "torchrun" of these runs is a small Python program standing in for a job that misbehaves
(prints without pause, leaves daemons, forks without end); every process of a run carries its
DDPFLEET_RUN_ID, so `/proc/*/environ` says what is left of it. Linux only (subreaper, /proc).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from ddpfleet.launch import RUNNER_FILES, sync
from ddpfleet.node import NODE_DIR

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the runner needs Linux")

WATCHDOG = 3
SLACK = 15  # generous: SIGTERM grace, the kill sweeps and a busy 2-core box

# A double-forked daemon: its own session, SIGTERM ignored, outlives its parent.
DAEMON = """
import os, signal, time
def daemon():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        os._exit(0)
"""
# A process that forks, exits, and has its child call setsid (1 ms a generation), for at most
# 20 s: should the runner ever miss it, it must not go on filling the machine with zombies
# (cleanup() hunts it down too).
HOPPER = """
def hopper():
    end = time.monotonic() + 20
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while time.monotonic() < end:
            os.setsid()
            time.sleep(0.001)
            if os.fork() != 0:
                os._exit(0)
        os._exit(0)
"""


def run_pids(run_id: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"DDPFLEET_RUN_ID={run_id}".encode() in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            pass
    return found


def gone_within(run_id: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := run_pids(run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class Runner:
    """One runner as on a node: the loader command, the helpers, the ask, then the spec."""

    def __init__(
        self,
        program: str,
        tmp_path,
        watchdog: float = WATCHDOG,
        grace: float = 1,
        argv: list[str] | None = None,
        listen: int | None = None,
        node: str | None = None,
        user: str | None = None,
        code_dir: str | None = None,
        python: str = sys.executable,
    ):
        self.run_id = f"u-{uuid.uuid4().hex[:10]}"
        cmd = f"env DDPFLEET_RUN_ID={self.run_id} " + sync.helper_command(python, "gang_runner.py")
        self.proc = subprocess.Popen(
            ["sh", "-c", cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        ask = {
            "run_id": self.run_id,
            "code_dir": code_dir or str(tmp_path / "code"),
            "master_host": "127.0.0.1",
            "count_gpus": False,
            "listen": listen,
            "reach": None,
            "node": node,
            "user": user,
        }
        spec = {
            "argv": argv or [python, "-c", program],
            "env": {"DDPFLEET_RUN_ID": self.run_id},
            "cwd": code_dir or str(tmp_path),
            "grace": grace,
            "watchdog": watchdog,
            "heartbeat": 0.5,
        }
        self.proc.stdin.write(
            b"".join(sync.helper_source(h) for h in RUNNER_FILES) + json.dumps(ask).encode() + b"\n"
        )
        self.spec = json.dumps(spec).encode() + b"\n"
        if listen is None:
            self.send_spec()

    def send_spec(self) -> None:
        self.proc.stdin.write(self.spec)
        self.proc.stdin.flush()

    def events(self) -> list[dict]:
        """Read to EOF (the runner and its guardian gone); the control events."""
        out = self.proc.stdout.read()
        self.text = out.decode(errors="replace").replace('\x1e{"event": "hb"}\n', "")[-3000:]
        return [json.loads(line[1:]) for line in out.split(b"\n") if line.startswith(b"\x1e")]

    def event(self, kind: str) -> dict:
        """Read lines until the first control event of this kind."""
        for line in iter(self.proc.stdout.readline, b""):
            if line.startswith(b"\x1e") and json.loads(line[1:]).get("event") == kind:
                return json.loads(line[1:])
        raise AssertionError(f"no {kind!r} event before EOF")

    def cleanup(self) -> None:
        """Whatever a failing test left: found by this run's id only, stopped, then killed,
        until three looks in a row find nothing (a fork hopper is missed by a single look)."""
        clean, deadline = 0, time.monotonic() + 30
        while clean < 3 and time.monotonic() < deadline:
            pids = run_pids(self.run_id)
            clean = 0 if pids else clean + 1
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def runners(tmp_path):
    made: list[Runner] = []

    def make(*parts: str, **kw) -> Runner:
        made.append(Runner("".join(textwrap.dedent(p) for p in parts), tmp_path, **kw))
        return made[-1]

    yield make
    for r in made:
        r.cleanup()


def compete(port: int) -> tuple[list[float], threading.Event]:
    """What a local user taking the port does: bind and listen, again and again, until set."""
    taken, done = [], threading.Event()

    def loop() -> None:
        while not done.is_set():
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("0.0.0.0", port))
                    s.listen()
                    taken.append(time.monotonic())
                except OSError:
                    time.sleep(0.001)

    threading.Thread(target=loop, daemon=True).start()
    return taken, done


def test_a_controller_that_stops_reading_still_stops_a_chatty_run(runners):
    # The controller neither reads the runner's output nor sends heartbeats: the output pipe
    # fills at once, and the watchdog must still stop everything, runner included.
    r = runners("""
        import sys
        while True:
            sys.stdout.write("x" * 10000 + "\\n")
        """)
    time.sleep(1)  # started, and its output already backed up
    left = gone_within(r.run_id, WATCHDOG + SLACK)
    assert not left, f"watchdog {WATCHDOG}s: still there after {WATCHDOG + SLACK}s: {left}"


def test_daemons_and_fork_hoppers_of_a_failed_run_are_gone(runners):
    for _ in range(3):
        # No watchdog: this test sends no heartbeats, and on a loaded machine three such runs
        # can outlast its few seconds, which would end the run as stopped, not failed.
        r = runners(
            DAEMON,
            HOPPER,
            """
            daemon(); hopper()
            time.sleep(0.5)
            raise SystemExit(1)
            """,
            watchdog=0,
        )
        events = r.events()
        assert events[-1] == {"event": "exit", "code": 1, "stopped": False}
        assert r.proc.wait() == 1
        assert not gone_within(r.run_id, 2)


def test_a_sigkilled_runner_still_takes_its_run_with_it(runners):
    r = runners(
        DAEMON,
        """
        daemon()
        print("ready", flush=True)
        time.sleep(600)
        """,
        watchdog=0,
    )
    agent = r.event("started")["pid"]
    with open(f"/proc/{agent}/stat") as f:
        runner = int(f.read().rsplit(")", 1)[1].split()[1])
    assert runner != r.proc.pid  # the runner is its guardian's child, not what sh started
    time.sleep(0.5)
    os.kill(runner, signal.SIGKILL)
    events = r.events()
    assert "the node's runner was killed (SIGKILL)" in events[-1]["error"]
    assert r.proc.wait() == 137
    assert not gone_within(r.run_id, 2)


def node_module(name: str):
    """ddpfleet/node/<name> as a module, as the runner loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name[:-3], NODE_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def proctree():
    return node_module("proctree.py")


def cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))


def cgroup_run(runners, node: str, *parts: str):
    """A run with a node name, as launch.Member asks: the runner puts it in its own cgroup."""
    mount = proctree().cgroup2_mount()
    if os.getuid() != 0 or mount is None:
        pytest.skip("needs root and a writable cgroup v2")
    r = runners(DAEMON, HOPPER, *parts, watchdog=0, node=node)
    agent = r.event("started")["pid"]
    path = f"{mount}/ddpfleet/{r.run_id}.{node}"
    assert cgroup_of(agent) == f"/ddpfleet/{r.run_id}.{node}"
    return r, agent, path


def test_an_attached_run_is_in_its_own_cgroup_and_a_stop_empties_and_removes_it(runners):
    r, _, path = cgroup_run(runners, "nodeu", """
        daemon(); hopper()
        print("ready", flush=True)
        time.sleep(600)
        """)  # fmt: skip
    time.sleep(0.5)  # the daemon and the hopper are out of torchrun's session by now
    with open(f"{path}/cgroup.procs") as f:
        assert len(f.read().split()) >= 3  # the agent, its daemon, the hopper's generation
    r.proc.stdin.write(b"stop\n")
    r.proc.stdin.flush()
    events = r.events()
    assert events[-1]["event"] == "exit" and events[-1]["stopped"], r.text
    assert not gone_within(r.run_id, 2)
    assert not os.path.exists(path)


def test_a_sigkilled_runners_guardian_kills_and_removes_the_runs_cgroup(runners):
    r, agent, path = cgroup_run(runners, "nodev", """
        daemon(); hopper()
        time.sleep(600)
        """)  # fmt: skip
    with open(f"/proc/{agent}/stat") as f:
        runner = int(f.read().rsplit(")", 1)[1].split()[1])
    time.sleep(0.5)
    os.kill(runner, signal.SIGKILL)
    assert "the node's runner was killed (SIGKILL)" in r.events()[-1]["error"]
    assert not gone_within(r.run_id, 2)
    assert not os.path.exists(path)


def test_a_root_runner_drops_the_run_to_the_training_user(runners, request):
    import pwd

    python = "/usr/bin/python3"  # the user must be able to read it (this one may be root's)
    if os.getuid() != 0 or not os.path.exists(python):
        pytest.skip(f"the runner drops to the training user only as root; needs {python}")
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="ddpfleet-drop-"))  # pytest's tmp dirs are 0700
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    os.chown(base, nobody.pw_uid, nobody.pw_gid)  # the user's own dir, as its home would be
    code = base / "code"
    r = runners(
        """
        import os, json
        print("who " + json.dumps([os.getuid(), os.getgid(), os.environ.get("HOME"),
                                   os.environ.get("USER"), "PYTEST_CURRENT_TEST" in os.environ]), flush=True)
        """,
        watchdog=0,
        user="nobody",
        code_dir=str(code),
        python=python,
    )
    events = r.events()
    assert events and events[-1] == {"event": "exit", "code": 0, "stopped": False}, r.text
    facts = next(e for e in events if e["event"] == "facts")
    assert facts["home"] == nobody.pw_dir  # the preflight acted as the user
    assert facts["code"]["problem"] is None, facts["code"]
    assert os.stat(code).st_uid == nobody.pw_uid  # what it made in the code dir is the user's
    assert os.stat(code / ".ddpfleet" / "lock").st_uid == nobody.pw_uid
    who = json.loads(r.text.split("who ", 1)[1].splitlines()[0])
    assert who == [nobody.pw_uid, nobody.pw_gid, nobody.pw_dir, "nobody", False]


def test_orphans_are_reaped_as_they_come(runners):
    # Every 2 ms a child that leaves an orphan behind; each orphan exits at once and becomes
    # the runner's zombie until the runner collects it.
    r = runners(
        """
        import os, time
        print("ready", flush=True)
        while True:
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:
                    os._exit(0)
                os._exit(0)
            os.waitpid(pid, 0)
            time.sleep(0.002)
        """,
        watchdog=0,
    )
    agent = r.event("started")["pid"]
    with open(f"/proc/{agent}/stat") as f:
        runner = int(f.read().rsplit(")", 1)[1].split()[1])
    most = 0
    for _ in range(20):
        time.sleep(0.1)
        zombies = 0
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            zombies += fields[0] == "Z" and int(fields[1]) == runner
        most = max(most, zombies)
    r.proc.stdin.close()  # the controller goes: the run stops
    r.events()
    assert most < 50, f"{most} zombies under the runner"


class Channel:
    """What Member.pump reads: a paramiko channel's recv() and recv_exit_status()."""

    def __init__(self, chunks):
        self.chunks = chunks

    def recv(self, size: int) -> bytes:
        return next(self.chunks, b"")

    def recv_exit_status(self) -> int:
        return 0


def test_the_pump_splits_a_progress_bar_without_newlines_in_bounded_pieces():
    import tracemalloc
    from types import SimpleNamespace

    from ddpfleet.launch import MAX_LINE, Member, Output
    from ddpfleet.launch.verdict import RunState

    bar = (b"\r" + b"x" * 100) * 650  # 10**6 redraws of a progress bar, in ~64 KiB reads
    devnull = open(os.devnull, "w")  # noqa: SIM115 (the Output keeps it open for the test)
    member = Member(SimpleNamespace(name="node0"), "python", Output(devnull))
    member.chan = Channel(bar for _ in range(10**6 // 650))
    tracemalloc.start()
    try:
        pump = threading.Thread(target=member.pump, daemon=True)
        pump.start()
        pump.join(timeout=120)  # linear: well under a second here; quadratic: many minutes
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not pump.is_alive(), "the pump is still splitting"
    assert member.outcome.state is RunState.SUCCEEDED
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB for a 100 MiB stream"
    assert max(len(t) for _, t in member.lines) <= MAX_LINE


def test_the_master_port_is_never_free_between_the_check_and_torchrun(runners, tmp_path):
    pytest.importorskip("torch")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "job.py").write_text("import os; print('rank', os.environ['RANK'], 'up')\n")
    r = runners(
        "",
        listen=port,
        watchdog=0,
        argv=[
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--node-rank",
            "0",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--nproc-per-node",
            "1",
            "job.py",
        ],
    )
    assert r.event("facts")["listen"] == {"ok": True, "error": None}
    taken, done = compete(port)  # what a concurrent run or `doctor` does
    r.send_spec()
    for line in iter(r.proc.stdout.readline, b""):  # until a rank ran: torchrun had the port
        if b"rank 0 up" in line:
            break
    done.set()
    events = r.events()
    assert events[-1] == {"event": "exit", "code": 0, "stopped": False}, r.text
    assert not taken, f"another listener got port {port} {len(taken)} time(s) during the launch"
