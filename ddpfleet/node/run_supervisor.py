"""Runs on a node for `invoke train --detach`: this node's part of a run, owned by a supervisor
that does not depend on the SSH session. Stdlib only, Linux, started as root.

On stdin the controller sends: this file (a length line, then the source), proctree.py,
run_lifeline.py, run_snapshot.py, run_unit.py and run_guardian.py the same way, then one JSON
line: the spec (run id, node, rank, argv, env, cwd, user, grace, the master's lifeline address
or the workers to expect, the run's lifeline secret: spec.json is root's, 0600). This process (the
launcher) makes /var/lib/ddpfleet/runs/<run-id>/, writes spec.json, double-forks the supervisor
(fork, setsid, fork: its own session, no terminal, nothing of the SSH channel kept open) to
run in a snapshot of the code (run_snapshot.py: the run's code/ beside its state), waits
for its one-line report (started, or why not) and exits with it. The controller then returns.

The supervisor:
- is a child subreaper (proctree): every descendant of the run, a double-forked setsid daemon
  included, stays in its tree and is reaped as it exits;
- puts torchrun in the run's own cgroup v2 (`<cgroup2 mount>/ddpfleet/<run>.<node>`) where one
  is writable, so a stop reaches everything by cgroup.kill; elsewhere the tree sweeps of
  proctree are what a stop has (state.json says which: "cgroup" is null then);
- on the master, starts torchrun with the port its preflight runner has held since the check
  (spec "port_from": proctree.take_over), adopted by torchrun's store: it is never free;
- drops torchrun to the training user (spec "user") after joining the cgroup; torchrun gets
  PDEATHSIG, and the supervisor's parent is its guardian (run_guardian.py), so a SIGKILLed
  supervisor still takes its node's whole part with it, an escaped daemon included;
- holds the lifelines (run_lifeline.py): a failed rank or a silent node anywhere stops every
  node's part without the controller;
- writes state.json atomically: RUNNING, then SUCCEEDED, FAILED or STOPPED with the reason,
  the exit code and, on the master, the gang's first failure. node.log is torchrun's output.
SIGTERM (invoke stop) ends the run: SIGTERM to the tree, `grace` seconds, then SIGKILL sweeps
and cgroup.kill. Nothing is ever looked up by name.
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import types

RUNS = "/var/lib/ddpfleet/runs"
STDIN = sys.stdin.buffer
REPORT_S = 60.0  # how long the launcher waits for the supervisor's word


def load_helper(name):
    module = types.ModuleType(name[:-3])
    source = STDIN.read(int(STDIN.readline()))
    exec(compile(source, name, "exec"), module.__dict__)  # noqa: S102
    module.__source__ = source  # a systemd unit replays it (run_unit.py)
    return module


def write_json(path, data, mode=0o644):
    """Write then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def starttime(pid):
    """Field 22 of /proc/<pid>/stat: with the boot id, tells a reused pid from ours."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()[19].decode()


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


class Supervisor:
    def __init__(self, spec, tree, lifelines, run_dir):
        self.spec, self.tree, self.run_dir = spec, tree, run_dir
        self.proc = None
        self.reaper = None
        self.stopping = threading.Event()
        self.stop_reason = None
        self.stopper = None
        self.lock = threading.Lock()
        # In a systemd unit the unit's cgroup is the run: a cgroup of our own would take
        # torchrun out of it, out of `systemctl stop`'s reach.
        self.cgroup = None if spec.get("unit") else tree.make_cgroup(spec["run_id"], spec["node"])
        self.lifeline = lifelines.Lifeline(spec, self.stop, self.first_failure)
        self.failure = None  # the gang's first failure, as the master saw it
        me = os.getpid()
        self.state = {
            "run_id": spec["run_id"],
            "node": spec["node"],
            "rank": spec["rank"],
            "status": "STARTING",
            "supervisor_pid": me,
            "pid_starttime": starttime(me),
            "boot_id": boot_id(),
            "cgroup": self.cgroup,
            "unit": spec.get("unit"),
            "started": time.time(),
        }

    def save(self, **changes):
        with self.lock:
            self.state.update(changes)
            write_json(os.path.join(self.run_dir, "state.json"), self.state)

    def first_failure(self, node, code):
        with self.lock:
            if self.failure is None:
                self.failure = {"node": node, "code": code, "at": time.time()}
        self.save(first_failure=self.failure)

    def environment(self):
        env = self.tree.user_env(self.spec.get("user"))
        env.update(self.spec["env"])
        env["DDPFLEET_RUN_ID"] = self.spec["run_id"]
        return env

    def start(self):
        # The master: its preflight runner still holds the port; torchrun's store adopts that
        # socket, so the port is never free between the preflight and the run.
        handoff = self.spec.get("port_from")
        held = self.tree.take_over(handoff) if handoff else None
        argv, fds = self.tree.adopting(self.spec["argv"], held)
        log = os.open(os.path.join(self.run_dir, "node.log"), os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.spec["cwd"],
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=fds,
                start_new_session=True,
                # No other thread runs yet, so a Python preexec_fn is safe here: the run's
                # cgroup, the training user, PDEATHSIG (proctree.enter, as for an attached run).
                preexec_fn=lambda: self.tree.enter(self.cgroup, self.spec.get("user")),  # noqa: PLW1509
            )
        finally:
            os.close(log)
            if held is not None:
                held.close()  # torchrun has its own copy; ours would keep the port after it
        self.reaper = self.tree.Reaper(self.proc.pid)
        self.save(status="RUNNING", pid=self.proc.pid)

    def stop(self, reason):
        """End this node's part (once); on the master, every worker is told to stop too."""
        with self.lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            self.stop_reason = reason
        self.lifeline.stop_all(reason)
        self.stopper = threading.Thread(target=self.terminate, daemon=True)
        self.stopper.start()

    def terminate(self):
        self.tree.end_run(self.spec["grace"], self.proc.pid, self.cgroup)

    def wait(self):
        code = self.reaper.wait()
        self.proc.returncode = code
        if self.stopper is not None:
            self.stopper.join()
        if self.tree.descendants():  # torchrun is done: anything it left is the run's too
            self.tree.end_tree(self.spec["grace"])
        if self.cgroup and os.path.isdir(self.cgroup):
            self.tree.kill_cgroup(self.cgroup)
        return code

    def finish(self, code):
        stopped = self.stopping.is_set()
        if code == 0 and not stopped:
            status = "SUCCEEDED"
        elif stopped:
            status = "STOPPED"
        else:
            status = "FAILED"
            self.first_failure(self.spec["node"], code)
        self.lifeline.finished(self.spec["node"], code, status)
        self.save(status=status, exit_code=code, ended=time.time(), reason=self.stop_reason)


def supervise(spec, tree, lifelines, run_dir, report):
    """The supervisor's life, in its own session; `report` is the launcher's pipe."""
    sup = Supervisor(spec, tree, lifelines, run_dir)
    tree.prctl(tree.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
        target=sup.stop, args=("stopped by invoke stop",), daemon=True).start())  # fmt: skip
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        port = sup.lifeline.open()
        sup.start()
    except Exception as e:  # noqa: BLE001 - every reason goes back to the controller
        sup.save(status="FAILED", reason=f"could not start: {e}", ended=time.time())
        os.write(report, (json.dumps({"ok": False, "error": str(e)}) + "\n").encode())
        return 1
    if port is not None:  # where the workers' lifelines come in (never the secret)
        sup.save(lifeline=sup.lifeline.address)
    said = {"ok": True, "pid": sup.proc.pid, "lifeline_port": port, "cgroup": sup.cgroup}
    os.write(report, (json.dumps(said) + "\n").encode())
    os.close(report)
    sup.lifeline.run()
    code = sup.wait()
    sup.finish(code)
    return 0


def daemonize(run_dir):
    """Fork, setsid, fork: the grandchild returns, the rest exit. Its stdio goes to
    supervisor.log, so nothing of the SSH channel stays open and sshd can close it."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(os.path.join(run_dir, "supervisor.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir("/")


def refuse(error):
    print(json.dumps({"ok": False, "error": error}))
    return 1


def main():
    tree, lifelines = load_helper("proctree.py"), load_helper("run_lifeline.py")
    snapshot, unit = load_helper("run_snapshot.py"), load_helper("run_unit.py")
    guardian = load_helper("run_guardian.py")
    spec = json.loads(STDIN.readline())
    if spec.get("in_unit"):  # the transient service run_unit.launch started
        return supervise(spec, tree, lifelines, spec["run_dir"], unit.report_fd(spec))
    runs = spec.get("runs_root") or RUNS
    run_dir = os.path.join(runs, spec["run_id"])
    os.makedirs(runs, mode=0o755, exist_ok=True)
    try:
        os.mkdir(run_dir, 0o755)
    except FileExistsError:
        return refuse(f"{run_dir} exists: the run id was used")
    code, old = os.path.join(run_dir, "code"), spec.get("resume_from")
    try:  # copied by a child dropped to the training user: the code dir is the user's
        if old:
            snapshot.resume(os.path.join(runs, old, "code"), code, spec.get("user"), tree)
        else:
            snapshot.take(spec["cwd"], code, spec.get("user"), tree)
    except (OSError, ValueError, KeyError) as e:
        return refuse(f"cannot snapshot the code into {code}: {e}")
    spec["code_dir"], spec["cwd"] = spec["cwd"], code
    write_json(os.path.join(run_dir, "spec.json"), spec, mode=0o600)  # --env may hold secrets
    if unit.systemd_is_pid1() and "__source__" in globals():
        unit.SOURCES[:] = [b"%d\n%s" % (len(m.__source__), m.__source__)
                           for m in (tree, lifelines, snapshot, unit, guardian)]  # fmt: skip
        me = globals()["__source__"]
        return unit.launch(run_dir, spec, b"%d\n%s" % (len(me), me), REPORT_S)
    rd, wr = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(rd)
        daemonize(run_dir)
        guardian.split(tree, run_dir, spec, keep_out=(wr,))
        os._exit(supervise(spec, tree, lifelines, run_dir, wr))
    os.close(wr)
    os.waitpid(child, 0)  # the first fork exits at once: no zombie left behind
    ready, _, _ = select.select([rd], [], [], REPORT_S)
    line = os.read(rd, 65536).decode() if ready else ""
    print(line.strip() or json.dumps({"ok": False, "error": "the supervisor did not report"}))
    return 0 if line and json.loads(line).get("ok") else 1


if __name__ == "__main__":
    sys.stdout.flush()
    sys.exit(main())
