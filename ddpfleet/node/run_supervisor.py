"""Runs on a node for `invoke train --detach`: this node's part of a DETACHED run, owned by a
supervisor that does not depend on the SSH session. What holds the gang here: the lifelines
between the nodes' supervisors (run_lifeline.py) and `invoke stop` (run_ctl.py's SIGTERM); the
attached counterpart is gang_runner.py, and what both do alike is part.py. Stdlib only, Linux,
started as root.

On stdin the controller sends: this file (a length line, then the source), then records.py,
proctree.py, masterport.py, part.py, run_lifeline.py, run_snapshot.py, run_unit.py, checkpoints.py,
generation.py, follower.py, succession.py and health_node.py the same
way (launch.ssh.detach.SUPERVISOR_FILES), then one JSON line: the spec (run id, node, rank,
argv, env, cwd, user, grace, the master's lifeline address or the workers to expect, the run's
lifeline secret: spec.json is root's, 0600). This process (the launcher) makes
/var/lib/ddpfleet/runs/<run-id>/, writes spec.json, double-forks the supervisor (fork, setsid,
fork: its own session, no terminal, nothing of the SSH channel kept open) to run in a snapshot
of the code (run_snapshot.py: the run's code/ beside its state), waits for its one-line report
(started, or why not) and exits with it. The controller then returns. Where PID 1 is systemd
the supervisor is a transient service instead (run_unit.py: the unit's cgroup is the run).

The supervisor:
- runs the node's part (part.Part): torchrun in the run's own cgroup v2 where one is writable
  (state.json's "cgroup" is null where not: the tree sweeps are what a stop has then), dropped
  to the training user, on the master with the port its preflight runner has held since the
  check (spec "port_from": masterport.take_over);
- has a guardian for a parent (part.split), which records the part LOST and ends it if the
  supervisor is SIGKILLed;
- holds the lifelines: a failed rank or a silent node anywhere stops every node's part
  without the controller;
- writes state.json atomically (records.py): RUNNING, then SUCCEEDED, FAILED or STOPPED with
  the reason, the exit code and, on the master, the gang's first failure. node.log is
  torchrun's output.
SIGTERM (invoke stop) ends the run: part.Part.stop, after telling the other nodes.

With spares (spec "recovery", generation.py) a spare's supervisor stands by with no part
(STARTING, "standby": true) until the master tells it to take a lost node's place, and the lifelines' trouble
fences the gang instead of ending it: the master decides, and the run may go on in a new
generation (torchrun started again here: restart).
"""

import faulthandler
import json
import os
import select
import signal
import sys
import threading
import time
import types

STDIN = sys.stdin.buffer
REPORT_S = 60.0  # how long the launcher waits for the supervisor's word
HELPERS = (  # as launch.ssh.detach.SUPERVISOR_FILES sends them
    "records.py",
    "proctree.py",
    "masterport.py",
    "part.py",
    "run_lifeline.py",
    "run_snapshot.py",
    "run_unit.py",
    "checkpoints.py",
    "generation.py",
    "follower.py",
    "succession.py",
    "health_node.py",
)
PROGRESS = "progress/progress.json"  # DDPFLEET_PROGRESS_FILE below the run dir (the user's)


class Supervisor:
    """This node's part (part.Part) held by the lifelines, recorded in state.json."""

    def __init__(self, spec, m, run_dir, cgroup):
        self.spec, self.m, self.run_dir = spec, m, run_dir
        self.lock = threading.Lock()
        self.cgroup = cgroup
        self.part = None if spec.get("spare") else m.part.Part(m.proctree, spec, cgroup)
        self.stop_reason = None
        self.gen = None  # with spares: generation.Coordinator (the master) or Follower
        if spec.get("recovery"):
            kind = m.generation.Coordinator if spec["rank"] == 0 else m.follower.Follower
            self.gen = kind(self, m)
        lost = self.gen.lost if spec["rank"] == 0 and self.gen else None
        self.lifeline = m.run_lifeline.Lifeline(
            spec, self.stop, self.first_failure, self.gen and self.gen.heard, lost
        )
        if getattr(self.gen, "standby", None) is not None:  # where it would lead (succession.py)
            self.lifeline.after_join = [m.succession.listen_line(spec, self.gen.standby)]
        self.failure = None  # the gang's first failure, as the master saw it
        me = os.getpid()
        self.state = {
            "run_id": spec["run_id"],
            "node": spec["node"],
            "rank": spec["rank"],
            "status": "STARTING",
            "supervisor_pid": me,
            **m.records.identity(me),
            "cgroup": cgroup,
            "unit": spec.get("unit"),
            "started": time.time(),
        }

    def save(self, **changes):
        with self.lock:
            self.state.update(changes)
            self.m.records.write_json(os.path.join(self.run_dir, "state.json"), self.state)

    def first_failure(self, node, code):
        with self.lock:
            if self.failure is None:
                self.failure = {"node": node, "code": code, "at": time.time()}
        self.save(first_failure=self.failure)

    def start(self):
        # The master: its preflight runner still holds the port; torchrun's store adopts that
        # socket, so the port is never free between the preflight and the run.
        handoff = self.spec.get("port_from")
        self.launch(self.m.masterport.take_over(handoff) if handoff else None)

    def launch(self, listener, **saved):
        """This part's torchrun, its output appended to node.log (O_APPEND: ddpfleet's own lines,
        generation.py's, go between torchrun's, never over them); `listener`, the master port,
        closed once torchrun has its own copy (ours would keep the port after it)."""
        log = os.open(
            os.path.join(self.run_dir, "node.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640
        )
        try:
            proc = self.part.start(log, listener)
        finally:
            os.close(log)
            if listener is not None:
                listener.close()
        self.save(status="RUNNING", pid=proc.pid, **saved)

    def stop(self, reason):
        """End this node's part (once); on the master, every worker is told to stop first.
        With spares, the master fences the gang instead (generation.py decides what next)."""
        if isinstance(self.gen, self.m.generation.Coordinator) and not self.gen.final:
            self.gen.fence(reason)
            return
        if self.gen is not None and not isinstance(self.gen, self.m.generation.Coordinator):
            self.gen.stopped(reason)
        if self.part is None:
            return

        def first():
            self.stop_reason = reason
            self.lifeline.stop_all(reason)

        self.part.stop(first=first)

    def end(self, reason):
        """invoke stop (SIGTERM): the run ends, with spares too. A member or spare says so
        first: this node going away is a loss to the master unless the whole run is stopping
        (a machine shutting down SIGTERMs it too). The master's SIGTERM without invoke stop's
        word (records.STOP_MARK): its machine is going down, and a survivor leads (succession.py)."""
        if isinstance(self.gen, self.m.generation.Coordinator):
            if not os.path.exists(os.path.join(self.run_dir, self.m.records.STOP_MARK)):
                self.gen.leaving = "SIGTERM without invoke stop (its machine going down?)"
                self.log(f"[ddpfleet recovery] {self.gen.leaving}: leaving the run to the others")
                if self.part is not None:
                    self.part.stop()
                return
            self.gen.final = reason
        elif self.gen is not None:
            self.lifeline.say(f"left {self.spec['node']} SIGTERM")
        self.stop(reason)

    def log(self, line):
        """A line of ddpfleet's own into node.log, between torchrun's output."""
        stamp = time.strftime("%H:%M:%S")
        fd = os.open(
            os.path.join(self.run_dir, "node.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640
        )
        try:
            os.write(fd, f"{stamp} {line}\n".encode())
        finally:
            os.close(fd)

    def restart(self, argv, listener):
        """A new generation's torchrun here: the run's cgroup made again, node.log appended."""
        self.spec["argv"] = argv
        if self.cgroup:
            self.cgroup = self.m.proctree.make_cgroup(self.spec["run_id"], self.spec["node"])
        self.part = self.m.part.Part(self.m.proctree, self.spec, self.cgroup)
        self.launch(listener, cgroup=self.cgroup)

    def finish(self, code, status=None, reason=None):
        stopped = self.part is None or self.part.stopping.is_set()
        if status is not None:  # generation.py's word: an own failure (no reason), or why
            self.stop_reason = reason or self.stop_reason
            if status == "FAILED" and reason is None:
                self.first_failure(self.spec["node"], code)
        elif code == 0 and not stopped:
            status = "SUCCEEDED"
        elif stopped:
            status = "STOPPED"
        else:
            status = "FAILED"
            self.first_failure(self.spec["node"], code)
        self.lifeline.finished(self.spec["node"], code, status)
        self.save(status=status, exit_code=code, ended=time.time(), reason=self.stop_reason)


def supervise(spec, m, run_dir, cgroup, report):
    """The supervisor's life, in its own session; `report` is the launcher's pipe."""
    sup = Supervisor(spec, m, run_dir, cgroup)
    m.proctree.prctl(m.proctree.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
        target=sup.end, args=("stopped by invoke stop",), daemon=True).start())  # fmt: skip
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1: every thread's stack in supervisor.log
    try:
        progress(spec, run_dir, m)
        port = sup.lifeline.open()
        if sup.part is None:
            sup.save(status="STARTING", standby=True)  # a spare: no torchrun until it takes a place
        else:
            sup.start()
        if isinstance(sup.gen, m.generation.Coordinator):
            sup.save(generations=sup.gen.generations, spares=sup.gen.spares)
    except Exception as e:  # noqa: BLE001 - every reason goes back to the controller
        sup.save(status="FAILED", reason=f"could not start: {e}", ended=time.time())
        os.write(report, (json.dumps({"ok": False, "error": str(e)}) + "\n").encode())
        return 1
    if port is not None:  # where the workers' lifelines come in (never the secret)
        sup.save(lifeline=sup.lifeline.address)
    pid = sup.part.proc.pid if sup.part else None
    said = {"ok": True, "pid": pid, "lifeline_port": port, "cgroup": cgroup,
            "resumed": spec.get("resumed")}  # fmt: skip
    os.write(report, (json.dumps(said) + "\n").encode())
    os.close(report)
    sup.lifeline.run()
    while True:
        code = sup.part.wait() if sup.part else None
        if sup.gen is None or not sup.gen.after_part(code):
            break
    status, reason = sup.gen.outcome if sup.gen else (None, None)
    sup.finish(code, status, reason)
    return 0


def progress(spec, run_dir, m):
    """DDPFLEET_PROGRESS_FILE for the ranks (LOCAL_RANK 0 writes each step there): in a dir of
    the run's that the training user owns; generation.py reads a new generation's first step."""
    if not spec.get("recovery"):
        return
    path = os.path.join(run_dir, PROGRESS)
    user = spec.get("user")
    owner = user if m.proctree.drops_to(user) else None
    m.part.user_dir(os.path.dirname(path), owner, "the progress dir")
    spec["env"]["DDPFLEET_PROGRESS_FILE"] = path


def lost_part(m, run_dir, spec):
    """The guardian's word when the supervisor was killed: the part is LOST, and why."""

    def lost(signame):
        path = os.path.join(run_dir, "state.json")
        state = m.records.read_json(path, {})
        if state.get("status", "STARTING") in m.records.LIVE:
            why = (
                f"{spec['node']}: its supervisor was killed ({signame}); "
                "its guardian stopped every process of the run there"
            )
            state.update(status="LOST", reason=why, ended=time.time())
            m.records.write_json(path, state, tmp=".guardian")

    return lost


def checkpoints(m, spec, old, user):
    """Make the run's checkpoint dir; with --resume, copy the old run's newest COMPLETE
    checkpoint into it (as the training user, every file verified by hash) before torchrun
    starts. What was resumed, for the controller's line: {"step", "from"}, {"step": None}
    where the old run has no complete checkpoint here, None without --resume."""
    path = spec["env"].get(m.part.CHECKPOINT_ENV)
    if path:
        spec["env"][m.part.CHECKPOINT_ENV] = path = m.part.checkpoint_dir(m.proctree, path, user)
    if not spec.get("resume_from") or not path:
        return None
    found = m.checkpoints.newest_complete(old)
    if found is None:
        return {"step": None}
    m.checkpoints.copy_into(found[0], path, user, m.proctree)
    return {"step": found[1]["step"], "from": found[0]}


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
    # load_helper: defined by the loader this file runs under (ddpfleet.launch.sync.HELPER_LOADER)
    loaded = [load_helper(name) for name in HELPERS]  # noqa: F821
    m = types.SimpleNamespace(**{h.__name__: h for h in loaded})
    spec = json.loads(STDIN.readline())
    if spec.get("in_unit"):  # the transient service run_unit.launch started: no cgroup of
        # our own (it would take torchrun out of the unit's, out of `systemctl stop`'s reach)
        return supervise(spec, m, spec["run_dir"], None, m.run_unit.report_fd(spec))
    runs = spec.get("runs_root") or m.records.RUNS
    run_dir = os.path.join(runs, spec["run_id"])
    os.makedirs(runs, mode=0o755, exist_ok=True)
    try:
        os.mkdir(run_dir, 0o755)
    except FileExistsError:
        return refuse(f"{run_dir} exists: the run id was used")
    code, old, user = os.path.join(run_dir, "code"), spec.get("resume_from"), spec.get("user")
    try:  # copied by a child dropped to the training user: the code dir is the user's
        if old:
            m.run_snapshot.resume(os.path.join(runs, old, "code"), code, user, m.proctree)
        else:
            m.run_snapshot.take(spec["cwd"], code, user, m.proctree)
    except (OSError, ValueError, KeyError) as e:
        return refuse(f"cannot snapshot the code into {code}: {e}")
    spec["code_dir"], spec["cwd"] = spec["cwd"], code
    try:  # the run's DDPFLEET_CHECKPOINT_DIR, and (--resume) the old run's newest checkpoint in it
        spec["resumed"] = checkpoints(m, spec, os.path.join(runs, old or "", "checkpoints"), user)
    except (OSError, ValueError, KeyError) as e:
        return refuse(str(e))
    # --env may hold secrets, and the lifeline's secret is here: root's alone
    m.records.write_json(os.path.join(run_dir, "spec.json"), spec, mode=0o600)
    if m.run_unit.systemd_is_pid1() and "__source__" in globals():
        m.run_unit.SOURCES[:] = [b"%d\n%s" % (len(h.__source__), h.__source__) for h in loaded]
        me = globals()["__source__"]
        return m.run_unit.launch(run_dir, spec, b"%d\n%s" % (len(me), me), REPORT_S)
    rd, wr = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(rd)
        daemonize(run_dir)
        cgroup = m.proctree.make_cgroup(spec["run_id"], spec["node"])
        # The launcher's pipe is the supervisor's alone: its reader waits for the word.
        grace, lost = spec.get("grace") or 0, lost_part(m, run_dir, spec)
        m.part.split(m.proctree, grace, cgroup, lost, keep_out=(wr,))
        os._exit(supervise(spec, m, run_dir, cgroup, wr))
    os.close(wr)
    os.waitpid(child, 0)  # the first fork exits at once: no zombie left behind
    ready, _, _ = select.select([rd], [], [], REPORT_S)
    line = os.read(rd, 65536).decode() if ready else ""
    print(line.strip() or json.dumps({"ok": False, "error": "the supervisor did not report"}))
    return 0 if line and json.loads(line).get("ok") else 1


if __name__ == "__main__":
    sys.stdout.flush()
    sys.exit(main())
