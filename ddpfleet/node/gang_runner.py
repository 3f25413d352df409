"""Runs on a node for `invoke train`: this node's part of an ATTACHED run, from preflight to
exit. What holds the gang here: the controller's SSH channel (the detached counterpart is
run_supervisor.py; what both do alike is part.py).

Stdlib only, Linux. On the channel's stdin the controller sends, in order: this file (a length
line, then the source), node_helper.py, proctree.py, masterport.py and part.py the same way
(launch.ssh.member.RUNNER_FILES), one JSON line asking for the preflight facts, and then either
EOF (preflight failed somewhere: nothing is started), one JSON line {"argv", "env", "cwd",
"grace", "watchdog", "heartbeat"} that starts torchrun, or (a detached run's master) one JSON
line {"handoff": NAME}: the held port goes to the run's supervisor, which connects to the
abstract unix socket NAME (masterport.hand_over), and the runner exits.
The preflight request names the node and the training user: the runner is root where the
login can become root (as the detached supervisor is), and torchrun, every rank and whatever
they start run as that user (part.Part: the run's cgroup, the drop, PDEATHSIG).

The preflight runs here, not in channels of its own, so a launch costs one exec per node: the
facts and code manifest (node_helper.facts), the master port bound on the master and held,
a real TCP connect to it from every worker (masterport.py). The held socket is never closed:
torchrun's store adopts it, so no other process can take the port in between.

What the channel does, and only here:
- stdin is the lifeline: EOF (the controller died, its TCP connection closed, sshd closed the
  channel), a "stop" line, or no line for `watchdog` seconds (a half-open connection) stops the
  run gracefully (part.Part.stop); "kill" stops it at once. The runner sends its own heartbeat
  back, so either side notices a connection that died silently. The watchdog and the stop
  never wait on output: a controller that stops reading cannot keep the run alive.
- the runner's guardian (part.split) is the process sshd waits for: if the runner is
  SIGKILLed it ends the run and says so on the channel.
- output: torchrun's stdout+stderr relayed line by line (over-long lines in MAX_LINE pieces)
  through one writer thread; control lines start with \\x1e and hold JSON, one "event" each:
  facts, started, hb, stopping, killed, error, exit (ddpfleet.launch.ssh.member reads them).
  The exit status is torchrun's.
"""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

STDIN = sys.stdin.buffer
OUT_QUEUE = 256  # chunks (a line each, at most MAX_LINE) waiting for a slow controller
MAX_LINE = 64 * 1024  # torchrun's output relayed in pieces no longer than this
FLUSH_S = 5.0  # at exit, how long the last words may wait for a controller that stopped reading
HANDOFF_S = 120  # a detached master: how long its supervisor may take to claim the port


class Out:
    """Everything for the controller goes through one writer thread and a bounded queue, so a
    controller that stops reading (frozen, or silently partitioned: the SSH window fills and
    the write blocks) only ever blocks the writer and the relay, never the watchdog or a stop.
    Before start() (preflight, a single thread) writes go straight out."""

    def __init__(self):
        self.queue = queue.Queue(OUT_QUEUE)
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._drain, name="out", daemon=True)
        self.thread.start()

    def _drain(self):
        while (data := self.queue.get()) is not None:
            self._write(data)

    @staticmethod
    def _write(data):
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except OSError:
            pass  # the controller is gone: keep draining so torchrun never blocks on us

    def put(self, data, block=True, timeout=None):
        """False when it could not be queued (only when not blocking, or past the timeout)."""
        if self.thread is None:
            self._write(data)
            return True
        try:
            self.queue.put(data, block, timeout)
        except queue.Full:
            return False
        return True

    def close(self, timeout):
        """The last words out, waiting at most `timeout` seconds for the controller to read."""
        if self.thread is not None and self.put(None, timeout=timeout):
            self.thread.join(timeout)


OUT = Out()


def control(block=True, timeout=None, **event):
    """A control line; block=False drops it when the controller is not reading."""
    return OUT.put(b"\x1e" + json.dumps(event).encode() + b"\n", block, timeout)


class Member:
    """This node's part (part.Part) held by the controller's SSH channel: stdin is the lifeline
    (EOF, "stop", "kill", silence past the watchdog), stdout carries torchrun's output."""

    def __init__(self, spec, part):
        self.spec, self.part = spec, part
        part.on_killed = self.killed
        self.last_line = time.monotonic()
        self.guardian = os.getppid()

    @property
    def stopping(self):
        return self.part.stopping

    def start(self, listener=None):
        """torchrun in its own session; with `listener` (the master's held port) it adopts it."""
        proc = self.part.start(subprocess.PIPE, listener, inherit=True)
        control(event="started", pid=proc.pid, pgid=proc.pid)

    def relay(self):
        """torchrun's output, line by line; a line longer than MAX_LINE (a progress bar
        redrawn with \\r, binary output) goes in pieces, so memory stays bounded."""
        out = self.part.proc.stdout
        for line in iter(lambda: out.readline(MAX_LINE), b""):
            OUT.put(line)

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

        A connection can die silently (power loss, a cable): no EOF then, only silence. The
        checks come first and the heartbeat never waits: a controller that stopped reading
        must not keep this loop from noticing that it stopped talking.
        """
        limit, every = self.spec.get("watchdog") or 0, self.spec.get("heartbeat") or 2
        while not self.stopping.is_set():
            time.sleep(every)
            if limit and time.monotonic() - self.last_line > limit:
                self.stop(f"no heartbeat from the controller for {limit}s")
            elif os.getppid() != self.guardian:
                self.stop("the runner's guardian process died")
            control(block=False, event="hb")

    def stop(self, reason, grace=None):
        """Start ending the run; the signals go first, the word to the controller after."""
        grace = self.part.grace if grace is None else grace
        if self.part.stop(grace):
            control(block=False, event="stopping", reason=reason, grace=grace)

    def killed(self, pids, after):
        """What a graceful stop had to SIGKILL, and when (part.Part's on_killed)."""
        agent_only = pids == [self.part.proc.pid]
        control(block=False, event="killed", pids=pids, after=after, agent_only=agent_only)


def preflight(helper, masterport, tree, ask):
    """Facts for the plan; the master binds and holds its port, a worker connects to it. The
    code dir and its lock are the training user's: the facts are gathered acting as it."""
    held = None
    if ask.get("listen"):  # first: the workers' connects are already on their way
        held, error = masterport.bind(ask["listen"])
    with tree.acting_as(ask.get("user")):
        found = helper.facts(ask["code_dir"], ask["master_host"], ask["count_gpus"])
    if ask.get("listen"):
        found["listen"] = {"ok": held is not None, "error": error}
    if ask.get("reach"):
        master = helper.resolve(ask["master_host"]) or ask["master_host"]
        error = masterport.reach(master, ask["reach"]["port"], ask["reach"]["timeout"])
        found["reach"] = {"ok": error is None, "error": error}
    found["slurm_jobs"] = slurm_jobs(ask.get("node"))
    control(event="facts", **found)
    return held


SLURM_CONFS = (
    "/etc/slurm/slurm.conf",
    "/etc/slurm-llnl/slurm.conf",
)  # roles/slurm writes the first


def slurm_jobs(node):
    """ddpfleet's Slurm jobs running on this node, [[job id, job name]]: an SSH run here would
    share its GPUs and re-sync its code. [] where Slurm is not installed or cannot say (the
    node's Slurm NodeName is its inventory name: roles/slurm)."""
    squeue = shutil.which("squeue")
    configured = os.environ.get("SLURM_CONF") or any(os.path.isfile(p) for p in SLURM_CONFS)
    if not squeue or not configured or not node:
        return []  # no Slurm here: no squeue, nor its ~40 ms failing to find a config
    argv = [squeue, "-h", "-w", node, "-t", "RUNNING,COMPLETING", "-o", "%i %j"]
    try:  # a slurmctld that does not answer must not hold up every SSH run's preflight
        got = subprocess.run(argv, capture_output=True, text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return []
    jobs = [line.split(None, 1) for line in got.stdout.splitlines()]
    return [j for j in jobs if got.returncode == 0 and len(j) == 2 and j[1].startswith("ddpfleet-")]


def lost(signame):
    """The guardian's word when the runner was killed: never blocks (nobody may be reading)."""
    text = (
        f"the node's runner was killed ({signame}); "
        "every process of the run on this node was stopped"
    )
    fd = sys.stdout.fileno()
    try:
        os.set_blocking(fd, False)
        os.write(fd, b"\x1e" + json.dumps({"event": "error", "error": text}).encode() + b"\n")
    except OSError:
        pass


def hand_off(helper, masterport, held, name):
    """A detached run's master: the held port goes to the run's supervisor (masterport's
    hand_over), which connects to `name` once started; then this runner exits, having started
    nothing. The code dir's lock is freed first, as a call-off frees it: the run works in a
    snapshot."""
    helper.release()
    if held is None:
        control(event="error", error="no master port was held to hand over")
        return 1

    def ready():
        control(event="handoff", name=name, pid=os.getpid(), uid=os.getuid())

    why = masterport.hand_over(held.sock, name, STDIN.fileno(), ready, HANDOFF_S)
    held.close()  # the supervisor has its own copy now (or the run did not start)
    if why is not None:
        control(event="error", error=f"the master port was not handed over: {why}")
        return 1
    return 0


def main():
    # load_helper: defined by the loader this file runs under (ddpfleet.launch.sync.HELPER_LOADER)
    helper, tree = load_helper("node_helper.py"), load_helper("proctree.py")  # noqa: F821
    masterport, parts = load_helper("masterport.py"), load_helper("part.py")  # noqa: F821
    ask = json.loads(STDIN.readline())
    held = preflight(helper, masterport, tree, ask)
    line = STDIN.readline()
    if held is not None:
        held.quiet()  # still bound and listening: torchrun's store adopts the socket
    if not line.strip():
        if held is not None:
            held.close()
        return 0  # the controller called it off: nothing was started
    spec = json.loads(line)
    if "handoff" in spec:
        return hand_off(helper, masterport, held, spec["handoff"])
    run_id, node = os.environ.get("DDPFLEET_RUN_ID"), ask.get("node")
    cgroup = tree.make_cgroup(run_id, node) if run_id and node else None
    # This process, the one sshd waits for, becomes the runner's guardian; the child goes on.
    # The held port is the runner's alone: a copy here would outlive torchrun.
    parts.split(tree, spec["grace"], cgroup, lost, keep_out=[held] if held else [])
    tree.prctl(tree.PR_SET_CHILD_SUBREAPER, 1)
    member = Member(spec, parts.Part(tree, {**spec, "user": ask.get("user")}, cgroup))
    try:
        member.start(held.sock if held is not None else None)
    except OSError as e:
        control(event="error", error=f"cannot start {spec['argv'][0]}: {e.strerror or e}")
        return 127
    finally:
        if held is not None:
            held.close()  # torchrun has its own copy now
    OUT.start()
    relay = threading.Thread(target=member.relay, daemon=True)
    relay.start()
    threading.Thread(target=member.listen, daemon=True).start()
    threading.Thread(target=member.watchdog, daemon=True).start()
    code = member.part.wait()
    relay.join(timeout=2)
    control(timeout=FLUSH_S, event="exit", code=code, stopped=member.stopping.is_set())
    OUT.close(FLUSH_S)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    # os._exit: the stdin thread may hold stdin's lock, which would abort a normal shutdown.
    os._exit(status)
