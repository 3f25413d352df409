"""A run's process tree on a node: find it, reap it, end it; who runs it. Stdlib only, Linux.

Loaded (sent on stdin as a helper) by every program that owns a node's part of a run, through
part.py, and installed beside the Jupyter supervisor (roles/jupyter). A part's processes:

    guardian (a child subreaper; part.split)
      └─ runner or supervisor (a child subreaper too; part.Part)
           └─ torchrun (its own session) ─ workers (their own sessions) ─ whatever they start

Every orphan is re-parented to the nearest living subreaper above it, so while either of the
two lives, everything the run starts stays in this tree, even a double-forked daemon that
calls setsid(). If the runner is SIGKILLed, its orphans go to the guardian, which ends them.
What escapes the tree: processes started outside it by another service (systemd-run, docker,
an already running tmux or screen server, at, `ssh peer cmd`), and the tree itself when both the
guardian and the runner are SIGKILLed (torchrun still gets PDEATHSIG). The run's own cgroup
closes those where the runner is root and a writable cgroup v2 exists: torchrun starts with
enter(): into the run's cgroup as root, then dropped to the training user; a stop ends the tree
and then kills the cgroup (end_run), and so does the guardian of a SIGKILLed runner.

Ending the tree: SIGTERM to every process group and process, `grace` seconds, then freeze and
kill: SIGSTOP sweeps until three in a row find no process still running (a stopped process
cannot fork, so a fork-and-setsid loop cannot outrun the sweeps), then SIGKILL sweeps until
three in a row find nothing alive. A sweep during which the Reaper collected an exit does not
count as clean: a loop that forks and exits faster than a sweep reads /proc is never quiet.
Nothing is ever looked up by name.
"""

import contextlib
import ctypes
import errno
import os
import pwd
import signal
import threading
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
KILL_WAIT_S = 5.0  # SIGKILLed processes may take a moment to go (a D-state read, a core dump)
CLEAN_SWEEPS = 3  # sweeps in a row that must find nothing before a tree counts as stopped
_reaped = 0  # children a Reaper of this process has collected: a sweep that saw one is not clean

try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in a forked child
except (OSError, AttributeError):
    _PRCTL = None  # not Linux: the process-group kill still holds, orphan capture does not


def prctl(option, value):
    if _PRCTL is not None:
        _PRCTL(option, value, 0, 0, 0)


def _stat(pid):
    """(state letter, ppid) from /proc/<pid>/stat, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def children_map():
    """{ppid: [(pid, state), ...]} for every process. Newest first: a process that forks and
    exits at once has left a living child only where /proc was listed, so the newest entries
    are read while that child's parent is most likely still there to lead to it."""
    kids = {}
    for pid in sorted((int(e) for e in os.listdir("/proc") if e.isdigit()), reverse=True):
        if (st := _stat(pid)) is not None:
            kids.setdefault(st[1], []).append((pid, st[0]))
    return kids


def descendants(root=None):
    """[(pid, state), ...] below `root` (this process), zombies and exited ones left out."""
    kids, found, todo = children_map(), [], [os.getpid() if root is None else root]
    while todo:
        for pid, state in kids.get(todo.pop(), ()):
            todo.append(pid)
            if state not in "ZX":
                found.append((pid, state))
    return found


def signal_all(sig, procs):
    """The signal to each process's group (never our own: sshd's session shell is in it),
    then to each process itself."""
    ours = os.getpgid(0)
    groups = set()
    for pid, _ in procs:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    for pgid in groups - {ours}:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    for pid, _ in procs:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _sweep(sig, pick, deadline):
    """Send `sig` to what `pick` keeps of our descendants until CLEAN_SWEEPS sweeps in a row
    find nothing to send it to (or the deadline). One clean sweep is not proof: a child forked
    after /proc was listed, whose parent exited before it was read, is in no sweep's tree."""
    clean = 0
    while clean < CLEAN_SWEEPS and time.monotonic() < deadline:
        seen = _reaped
        procs = [p for p in descendants() if pick(p)]
        if procs:
            clean = 0
            signal_all(sig, procs)
        else:
            clean += 1
        time.sleep(0.005)
        if _reaped != seen:
            # Something of the tree exited meanwhile. A fork-and-exit loop forks faster than a
            # sweep reads /proc on a loaded machine and can hide from many sweeps in a row,
            # but every generation's exit is collected here: it is never quiet while it lives.
            clean = 0
    return clean >= CLEAN_SWEEPS


def freeze(deadline):
    """SIGSTOP sweeps until none finds a process still running (or the deadline)."""
    _sweep(signal.SIGSTOP, lambda p: p[1] != "T", deadline)


def kill_all(wait=KILL_WAIT_S):
    """Freeze, then SIGKILL sweeps until none finds anything alive. True when nothing is left.
    Each phase has its own `wait`: a freeze that runs out of time (a loaded machine, a fork
    loop) must still be followed by the kill, or what it stopped stays stopped for ever."""
    freeze(time.monotonic() + wait)
    return _sweep(signal.SIGKILL, lambda p: True, time.monotonic() + wait) or not descendants()


def end_tree(grace, agent=None, linger=0.5):
    """SIGTERM to everything below us, SIGKILL to what is left after `grace` seconds, or as
    soon as `agent` (torchrun) alone has outlived its workers by `linger` seconds: all it does
    then is print and tear down an interpreter with torch loaded, which takes seconds.

    Returns (pids SIGKILLed, seconds after the SIGTERM), or None when nothing needed a SIGKILL.
    """
    start = time.monotonic()
    if grace:
        signal_all(signal.SIGTERM, descendants())
        alone_since = None
        while (left := [p for p, _ in descendants()]) and time.monotonic() - start < grace:
            if left == [agent]:
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > linger:
                    break
            else:
                alone_since = None
            time.sleep(0.05)
    left = [p for p, _ in descendants()]
    kill_all()
    return (left, round(time.monotonic() - start, 2)) if left else None


# -- a run's own cgroup: what closes the holes of the tree above ---------------------------


def cgroup2_mount():
    """A writable cgroup v2 mount with cgroup.kill (Linux >= 5.14), or None."""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, kind = line.split()[:3]
            if kind == "cgroup2" and os.access(where, os.W_OK):
                return where
    return None


def make_cgroup(run_id, node):
    try:
        mount = cgroup2_mount()
        if mount is None:
            return None
        path = os.path.join(mount, "ddpfleet", f"{run_id}.{node}")
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(os.path.join(path, "cgroup.kill")):
            os.rmdir(path)
            return None
        return path
    except OSError:
        return None


def kill_cgroup(path, wait=5.0):
    """Everything in the cgroup SIGKILLed at once (it also gets what forks meanwhile), then
    the cgroup removed once empty. Returns the pids it held."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            held = [int(p) for p in f.read().split()]
        if held:
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
        deadline = time.monotonic() + wait
        while True:
            try:
                os.rmdir(path)  # EBUSY until the last task has really gone, not just left procs
                break
            except OSError as e:
                if e.errno == errno.ENOENT:
                    break
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)
    except OSError:
        return []
    return held


def end_run(grace, agent=None, cgroup=None):
    """The whole run on this node: its tree (end_tree), then what its cgroup still holds."""
    killed = end_tree(grace, agent)
    if cgroup:
        kill_cgroup(cgroup)
    return killed


# -- who runs it: root supervises, the training user trains ---------------------------------

KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


def drops_to(user):
    """True when this (root) process starts the run as another user."""
    return bool(user) and user != "root" and os.getuid() == 0


def user_env(user):
    """A clean environment for a run dropped to `user`: this process's path and locale and the
    user's own HOME, USER, LOGNAME, SHELL; nothing of root's, of sudo's or of the login."""
    env = {k: v for k, v in os.environ.items() if k in KEPT_ENV}
    if user:
        pw = pwd.getpwnam(user)
        env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user, SHELL=pw.pw_shell or "/bin/sh")
    return env


def enter(cgroup, user):
    """In torchrun's process before its exec: into the run's cgroup (as root), then dropped to
    the training user, then PDEATHSIG (a credential change clears it, so it comes last)."""
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    if drops_to(user):
        drop(user)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def drop(user):
    """This process becomes `user` for good: its groups, gid, then uid (root cannot come back)."""
    pw = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def as_user(user, work, *args):
    """work(*args) done by a forked child dropped to `user` (drop), for file work on paths the
    user controls: a symlink or `..` there then reaches only what the user could reach anyway.
    Root itself does it where drops_to(user) is false. The child's error comes back as an
    OSError with its text. Fork only where no other thread runs (as before a Popen)."""
    if not drops_to(user):
        return work(*args)
    pw = pwd.getpwnam(user)  # a missing user is the caller's KeyError, not the child's
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        try:
            drop(pw.pw_name)
            work(*args)
            code = 0
        except BaseException as e:  # noqa: BLE001 - every reason goes back to the parent
            os.write(wr, str(e).encode(errors="replace")[:4096])
            code = 1
        os._exit(code)
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        said = f.read().decode(errors="replace")
    status = wait_child(pid)
    if status != 0:
        raise OSError(said or f"the work done as {user} ended with {status}")
    return None


@contextlib.contextmanager
def acting_as(user):
    """File work of a root process done as `user` (its effective uid, gid, groups and HOME),
    root again after: what the runner's preflight makes in the code dir is the user's."""
    if not drops_to(user):
        yield
        return
    pw = pwd.getpwnam(user)
    groups, home = os.getgroups(), os.environ.get("HOME")
    os.setgroups(os.getgrouplist(user, pw.pw_gid))
    os.setegid(pw.pw_gid)
    os.seteuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home


def wait_child(pid):
    """The exit code of this process's own child `pid`. Where this process's Reaper runs (a
    detached run's supervisor, from its first torchrun on) its waitpid(-1) may collect the exit
    first, and a waitpid of our own then fails with ECHILD (seen: a recovery's checkpoint
    placement as the training user failed "[Errno 10] No child processes"): the Reaper hands
    it over instead."""
    if _reaper is not None:
        return _reaper.take(pid)
    return exit_code(os.waitpid(pid, 0)[1])


def exit_code(status):
    """A wait status as Popen reports it: the exit code, or minus the signal that ended it."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Reaper:
    """Collects every child's exit as it happens: as subreaper this process inherits every
    orphan of the run, and uncollected they pile up as zombies (against pids.max). Keeps the
    exit of `keep` (torchrun) for wait(); nothing else may wait for children meanwhile. One per
    process (reaper_for): a detached run's next generation (generation.py) follows its new
    torchrun with the same one, as two would take each other's exits."""

    def __init__(self, keep):
        self.keep, self.code, self.done = keep, None, threading.Event()
        self.lock = threading.Lock()
        self.reaped = threading.Condition(self.lock)  # told of every exit collected
        self.others = {}  # exits not kept: a next torchrun's that ended before follow()
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def _run(self):
        global _reaped
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.05)  # no child just now; orphans may still be re-parented to us
                continue
            _reaped += 1
            with self.lock:
                if pid == self.keep:
                    self.code = exit_code(status)
                    self.done.set()
                else:
                    self.others[pid] = exit_code(status)
                self.reaped.notify_all()

    def follow(self, pid):
        """Keep `pid`'s exit from now on (its exit may have come already)."""
        with self.lock:
            self.keep, self.code = pid, None
            self.done.clear()
            if pid in self.others:
                self.code = self.others.pop(pid)
                self.done.set()
        return self

    def wait(self):
        self.done.wait()
        return self.code

    def take(self, pid):
        """The exit code of `pid`, a child another thread of this process forked and waits for
        (wait_child): collected here like every other, handed over once it came."""
        with self.reaped:
            while pid not in self.others:
                self.reaped.wait(1.0)
            return self.others.pop(pid)


_reaper = None


def forget_exits():
    """Before a torchrun starts: the exits collected so far are no one's (a pid reused later
    must not find an old one)."""
    if _reaper is not None:
        with _reaper.lock:
            _reaper.others.clear()


def reaper_for(pid):
    """The process's one Reaper, now keeping `pid`'s exit."""
    global _reaper
    if _reaper is None:
        _reaper = Reaper(pid)
        return _reaper
    return _reaper.follow(pid)
