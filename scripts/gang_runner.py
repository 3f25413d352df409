"""Runs on a node for `invoke train`: this node's part of one run, from preflight to exit.

Stdlib only, Linux. On the channel's stdin the controller sends, in order: this file (a length
line, then the source), node_helper.py the same way, one JSON line asking for the preflight
facts, and then either EOF (preflight failed somewhere: nothing is started) or one JSON line
{"argv", "env", "cwd", "grace", "watchdog"} that starts torchrun. After that it keeps stdin
open and writes control lines: "hb" (heartbeat), "stop" (graceful), "kill" (at once); the runner
sends its own heartbeat back, so either side notices a connection that died silently.

The preflight runs here, not in channels of its own, so a launch costs one exec per node: the
facts and code manifest (node_helper.facts), the master port bound on the master and held
until torchrun needs it, a real TCP connect to it from every worker.

Why each piece of the run is here:
- torchrun gets its own session (setsid): no terminal, so no SIGHUP from a hang-up, and its
  group is ours to signal. Its workers start their own sessions (start_new_session in torch's
  SubprocessHandler), so killing torchrun's group alone would orphan them: this runner makes
  itself a child subreaper, so every descendant, orphaned or not, stays in its tree, and a stop
  signals every descendant's process group. Nothing is ever looked up by name.
- stdin is the lifeline: EOF (the controller died, its TCP connection closed, sshd closed the
  channel), a "stop" line, or no line for `watchdog` seconds (a half-open connection) stops the
  run: SIGTERM to every group, SIGKILL after `grace` seconds.
- torchrun also gets PR_SET_PDEATHSIG, so it is told to stop even if this runner is SIGKILLed.

Output: torchrun's stdout+stderr relayed line by line; control lines start with \\x1e and hold
JSON ({"event": "facts", ...}, {"event": "stopping", ...}, {"event": "exit", ...}). The exit
status is torchrun's.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
AGENT_LINGER_S = 0.5
STDIN = sys.stdin.buffer
OUT_LOCK = threading.Lock()


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in a forked child
except (OSError, AttributeError):
    _PRCTL = None  # not Linux: the process-group kill still holds, orphan capture does not


def prctl(option, value):
    if _PRCTL is not None:
        _PRCTL(option, value, 0, 0, 0)


def write(data):
    """Relay to the controller; once it is gone, keep draining so torchrun never blocks."""
    with OUT_LOCK:
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except OSError:
            pass


def control(**event):
    write(b"\x1e" + json.dumps(event).encode() + b"\n")


def children_map():
    """{ppid: [pid, ...]} for every process, from /proc/<pid>/stat."""
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants():
    kids, found, todo = children_map(), [], [os.getpid()]
    while todo:
        for pid in kids.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def signal_all(sig):
    """The signal to every descendant's process group, then to each descendant itself."""
    pids = descendants()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    groups.discard(os.getpgid(0))  # never our own group: the sshd session shell is in it
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return pids


def reap(keep):
    """As subreaper we inherit orphans: collect their exits so they do not linger as zombies.

    Never waitpid(-1): that could collect torchrun (`keep`) before Popen.wait, which would
    then read its exit code as 0.
    """
    for pid in children_map().get(os.getpid(), ()):
        if pid != keep and is_zombie(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def alive(keep):
    reap(keep)
    return [p for p in descendants() if not is_zombie(p)]


def is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"Z"
    except OSError:
        return True


class Member:
    def __init__(self, spec):
        self.spec = spec
        self.proc = None
        self.stopper = None
        self.stopping = threading.Event()
        self.stop_lock = threading.Lock()
        self.last_line = time.monotonic()

    def start(self):
        env = dict(os.environ)
        env.update(self.spec["env"])
        self.proc = subprocess.Popen(
            self.spec["argv"], cwd=self.spec["cwd"], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            # No other thread runs at this point (main() starts them after), so a Python
            # preexec_fn is safe here; PDEATHSIG survives torchrun's exec.
            preexec_fn=lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM),  # noqa: PLW1509
        )
        control(event="started", pid=self.proc.pid, pgid=self.proc.pid)

    def relay(self):
        for line in iter(self.proc.stdout.readline, b""):
            write(line)

    def listen(self):
        """Control lines from the controller; EOF means it is gone."""
        for line in iter(STDIN.readline, b""):
            self.last_line = time.monotonic()
            word = line.strip()
            if word == b"stop":
                self.stop("asked by the controller")
            elif word == b"kill":
                self.stop("killed by the controller", grace=0)
        self.stop("the controller's connection closed")

    def watchdog(self):
        """Both ways: a heartbeat to the controller, and a stop when its own stop arriving.

        A connection can die silently (power loss, a cable): no EOF then, only silence.
        """
        limit, every = self.spec.get("watchdog") or 0, self.spec.get("heartbeat") or 2
        while not self.stopping.is_set():
            time.sleep(every)
            control(event="hb")
            if limit and time.monotonic() - self.last_line > limit:
                self.stop(f"no heartbeat from the controller for {limit}s")

    def stop(self, reason, grace=None):
        grace = self.spec["grace"] if grace is None else grace
        with self.stop_lock:
            hard = self.stopping.is_set()
            self.stopping.set()
        if hard and grace:
            return  # a graceful stop is already under way
        control(event="stopping", reason=reason, grace=grace)
        self.stopper = threading.Thread(target=self.terminate, args=(grace,), daemon=True)
        self.stopper.start()

    def terminate(self, grace):
        """SIGTERM to every group; SIGKILL to what is left after `grace` seconds, or as soon as
        torchrun alone has outlived its workers by AGENT_LINGER_S: all it does then is print
        (already relayed) and tear down an interpreter with torch loaded, which takes seconds."""
        start = time.monotonic()
        if grace:
            signal_all(signal.SIGTERM)
            alone_since = None
            while (left := self.alive()) and time.monotonic() - start < grace:
                if left == [self.proc.pid]:
                    alone_since = alone_since or time.monotonic()
                    if time.monotonic() - alone_since > AGENT_LINGER_S:
                        break
                else:
                    alone_since = None
                time.sleep(0.05)
        left = self.alive()
        signal_all(signal.SIGKILL)
        if left and grace:
            control(event="killed", pids=left, after=round(time.monotonic() - start, 2),
                    agent_only=left == [self.proc.pid])
        deadline = time.monotonic() + 5  # SIGKILLed processes may take a moment to go
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def alive(self):
        return alive(self.proc.pid)

    def wait(self):
        code = self.proc.wait()
        if self.stopper is not None:
            self.stopper.join()
        if self.alive():  # torchrun is done; anything it left behind is the run's too
            self.terminate(self.spec["grace"])
        return code


def load_helper():
    """node_helper.py, sent next on stdin the same way as this file."""
    module = types.ModuleType("node_helper")
    source = STDIN.read(int(STDIN.readline()))
    exec(compile(source, "node_helper.py", "exec"), module.__dict__)  # noqa: S102
    return module


def preflight(helper, ask):
    """Facts for the plan; the master binds and holds its port, a worker connects to it."""
    listener = server = None
    if ask.get("listen"):  # first: the workers' connects are already on their way
        listener, server, error = helper.bind(ask["listen"])
    found = helper.facts(ask["code_dir"], ask["master_host"], ask["count_gpus"])
    if ask.get("listen"):
        found["listen"] = {"ok": listener is not None, "error": error}
    if ask.get("reach"):
        error = helper.reach(ask["master_host"], ask["reach"]["port"], ask["reach"]["timeout"])
        found["reach"] = {"ok": error is None, "error": error}
    control(event="facts", **found)
    return listener, server


def release(listener, server):
    """Free the held master port: torchrun's store binds it next."""
    try:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the serving thread's accept(); close won't
    except OSError:
        pass
    listener.close()
    server.join(timeout=2)


def main():
    helper = load_helper()
    listener, server = preflight(helper, json.loads(STDIN.readline()))
    line = STDIN.readline()
    if listener is not None:
        release(listener, server)
    if not line.strip():
        return 0  # the controller called it off: nothing was started
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    spec = json.loads(line)
    member = Member(spec)
    try:
        member.start()
    except OSError as e:
        control(event="error", error=f"cannot start {spec['argv'][0]}: {e.strerror or e}")
        return 127
    relay = threading.Thread(target=member.relay, daemon=True)
    relay.start()
    threading.Thread(target=member.listen, daemon=True).start()
    threading.Thread(target=member.watchdog, daemon=True).start()
    code = member.wait()
    relay.join(timeout=2)
    control(event="exit", code=code, stopped=member.stopping.is_set())
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    # os._exit: the stdin thread may hold stdin's lock, which would abort a normal shutdown.
    os._exit(status)
