"""One node's part of a run: torchrun started, stopped once, waited for; its guardian; the
sweep a stop from outside makes. Stdlib only, Linux; sent on stdin as a helper after
proctree.py, and used the same way by gang_runner.py (attached), run_supervisor.py (detached)
and run_ctl.py (`invoke stop` on a detached run).

What differs by design is only who holds the gang, and each entry program says it:
- attached (gang_runner.py): the controller's SSH channel. EOF, a "stop" or "kill" line, or
  a silent channel stops the part; torchrun's output goes back on the channel.
- detached (run_supervisor.py): the lifelines to the other nodes' supervisors
  (run_lifeline.py) and a SIGTERM from run_ctl.py; output goes to node.log, the end to
  state.json (records.py).

Everything else is here:
- start: torchrun in its own session (setsid: no terminal, no SIGHUP; its group is ours to
  signal), into the run's cgroup as root, dropped to the training user, PDEATHSIG
  (proctree.enter); on the master its store adopts the port held since the preflight (ADOPT,
  masterport.py), so it is never free in between. A Reaper collects every exit.
- stop, once: SIGTERM to the tree, `grace` seconds, freeze-and-kill sweeps, then cgroup.kill
  (proctree.end_run). Only a kill (grace 0) may follow a graceful stop under way.
- wait: torchrun's exit; whatever it left is the run's too: swept, the cgroup killed, removed.
- the guardian (split, guard): the parent of the runner or supervisor, a child subreaper. If
  that process is SIGKILLed its orphans come here: the guardian ends the tree and the cgroup
  and says so (`lost`); otherwise it sweeps a last-moment orphan and exits with its status.
- from outside (sweep_out): the run's cgroup killed and every process whose environment holds
  the run's id SIGKILLed (marked: whole NAME=VALUE entries of /proc/*/environ, never a name).
"""

import errno
import os
import pwd
import signal
import stat
import subprocess
import threading
import time

CHECKPOINT_ENV = "DDPFLEET_CHECKPOINT_DIR"  # the checkpoint contract (checkpoints.py)

# torchrun with the master's held port: the static rendezvous's store adopts the listening
# socket (argv[1]: its fd, '-' for none) instead of binding the port again, so it is never free
# in between.
ADOPT = (
    "import runpy,sys;fd=sys.argv.pop(1);fd=None if fd=='-' else int(fd);"
    "import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as m;T=m.TCPStore\n"
    "def S(*a,**k):\n"
    " global fd\n"
    " if fd is not None and (a[3] if len(a)>3 else k.get('is_master')):\n"
    "  k['master_listen_fd'],fd=fd,None\n"
    " return T(*a,**k)\n"
    "m.TCPStore=S\n"
)
# torchrun --max-restarts with the static rendezvous: every attempt reuses the first attempt's
# store, where the dead workers' gloo/NCCL addresses still are, and a node restarts as soon as
# its own workers fail, not when the others' do. So a restarted worker could read a dead peer's
# address ("Gloo connectFullMesh failed ... Connection refused"). Here attempt n>0 waits for
# the master's agent to reach attempt n too and gets a fresh store (an ephemeral port, bound
# before it is told) under a prefix of its own; each restart prints one line saying why, which
# `invoke runs` counts (run_ctl.py).
FRESH = (
    "import time\n"
    "from torch.distributed import PrefixStore\n"
    "from torch.distributed.elastic.rendezvous import RendezvousInfo,RendezvousStoreInfo\n"
    "import torch.distributed.elastic.agent.server.api as A\n"
    "import torch.distributed.elastic.agent.server.local_elastic_agent as L\n"
    "N=m.StaticTCPRendezvous.next_rendezvous;R=A.SimpleElasticAgent._rendezvous\n"
    "W=L.LocalElasticAgent._monitor_workers\n"
    "def nxt(self):\n"
    " i=N(self);n=getattr(self,'_ddpfleet_attempt',-1)+1;self._ddpfleet_attempt=n\n"
    " if n==0:return i\n"
    " s=PrefixStore('ddpfleet/%s/%d'%(self.run_id,n),self._store)\n"
    " if self.rank==0:\n"
    "  self._ddpfleet_store=T(self.master_addr,0,None,True,self.timeout,wait_for_workers=False)\n"
    "  s.set('port',str(self._ddpfleet_store.port))\n"
    " p=int(s.get('port'))\n"
    " return RendezvousInfo(s,self.rank,self.world_size,RendezvousStoreInfo(self.master_addr,p))\n"
    "def mon(self,g):\n"
    " r=W(self,g)\n"
    " if r.is_failed() and not getattr(self,'_ddpfleet_failed',None):\n"
    "  self._ddpfleet_failed=(time.time(),r)\n"
    " return r\n"
    "def rdzv(self,g):\n"
    " g.spec.master_addr=g.spec.master_port=None\n"
    " f=getattr(self,'_ddpfleet_failed',None);self._ddpfleet_failed=None\n"
    " if f:\n"
    "  at,r=f;x=', '.join('rank %d exit %d'%(k,v.exitcode) for k,v in sorted(r.failures.items()))\n"
    "  print('ddpfleet: restart %d of %d after %s at %.3f'%(g.spec.max_restarts-\n"
    "   self._remaining_restarts,g.spec.max_restarts,x,at),file=sys.stderr,flush=True)\n"
    " return R(self,g)\n"
    "m.StaticTCPRendezvous.next_rendezvous=nxt;A.SimpleElasticAgent._rendezvous=rdzv\n"
    "L.LocalElasticAgent._monitor_workers=mon\n"
)
RUN = (
    "sys.argv[0]='torchrun';"
    "runpy.run_module('torch.distributed.run',run_name='__main__',alter_sys=True)"
)


def adopting(argv, listener):
    """torchrun's argv and pass_fds: its store adopts `listener` (None: the port is not held
    here), and with --max-restarts above 0 each restart starts clean (FRESH)."""
    argv = list(argv)
    restarts = "--max-restarts" in argv and argv[argv.index("--max-restarts") + 1] != "0"
    if (listener is None and not restarts) or argv[1:3] != ["-m", "torch.distributed.run"]:
        return argv, ()
    fds = (listener.fileno(),) if listener is not None else ()
    code = ADOPT + (FRESH if restarts else "") + RUN
    return [argv[0], "-c", code, str(fds[0]) if fds else "-", *argv[3:]], fds


class Part:
    """torchrun and everything it starts on this node. `spec`: argv, env, cwd, grace, user (the
    training user) and, detached, run_id; `cgroup`: the run's (None: the tree sweeps only);
    `on_killed(pids, after)`: what a graceful stop had to SIGKILL, and when."""

    def __init__(self, tree, spec, cgroup=None, on_killed=None):
        self.tree, self.spec, self.cgroup, self.on_killed = tree, spec, cgroup, on_killed
        self.grace = spec["grace"]
        self.proc = None
        self.reaper = None
        self.stopper = None
        self.stopping = threading.Event()
        self.stopped_with = None  # the grace of the stop under way
        self.lock = threading.Lock()

    def environment(self, inherit):
        """The training user's clean environment (proctree.user_env) and the run's; `inherit`:
        a runner that is already that user (not root) passes its own on, as a login would."""
        user = self.spec.get("user")
        tree = self.tree
        env = dict(os.environ) if inherit and not tree.drops_to(user) else tree.user_env(user)
        env.update(self.spec["env"])
        if self.spec.get("run_id"):
            env["DDPFLEET_RUN_ID"] = self.spec["run_id"]
        return env

    def start(self, stdout, listener=None, inherit=False):
        """torchrun (OSError where it cannot start); `listener`: the master's held port."""
        tree, cgroup, user = self.tree, self.cgroup, self.spec.get("user")
        path = self.spec["env"].get(CHECKPOINT_ENV)
        if path:  # before torchrun: the script may look for a checkpoint at its first line
            self.spec["env"][CHECKPOINT_ENV] = checkpoint_dir(tree, path, user)
        argv, fds = adopting(self.spec["argv"], listener)
        tree.forget_exits()
        self.proc = subprocess.Popen(
            argv,
            cwd=self.spec["cwd"],
            env=self.environment(inherit),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            pass_fds=fds,
            start_new_session=True,
            # The callers start no other thread before this, so a Python preexec_fn is safe
            # here: the run's cgroup, the training user, PDEATHSIG.
            preexec_fn=lambda: tree.enter(cgroup, user),  # noqa: PLW1509
        )
        self.reaper = tree.reaper_for(self.proc.pid)
        return self.proc

    def stop(self, grace=None, first=None):
        """Start ending the part; True when this call did. Once: only a kill (grace 0) may
        follow a graceful stop under way. `first()` runs before any signal is sent."""
        grace = self.grace if grace is None else grace
        with self.lock:
            if self.stopping.is_set() and not (self.stopped_with and not grace):
                return False
            self.stopping.set()
            self.stopped_with = grace
        if first is not None:
            first()
        self.stopper = threading.Thread(target=self.terminate, args=(grace,), daemon=True)
        self.stopper.start()
        return True

    def terminate(self, grace):
        killed = self.tree.end_run(grace, self.proc.pid, self.cgroup)
        if killed and grace and self.on_killed is not None:
            self.on_killed(*killed)

    def wait(self):
        """torchrun's exit code (minus the signal that ended it), once nothing of it is left."""
        code = self.reaper.wait()
        self.proc.returncode = code  # collected by the reaper; Popen must not wait again
        if self.stopper is not None:
            self.stopper.join()
        if self.tree.descendants():  # torchrun is done: anything it left is the run's too
            self.terminate(self.grace)
        if self.cgroup and os.path.isdir(self.cgroup):
            self.tree.kill_cgroup(self.cgroup)
        return code


def checkpoint_dir(tree, path, user):
    """The run's checkpoint dir (RUNS/<run-id>/checkpoints), made if missing: its run dir
    root's (0755), the dir itself the training user's, 0700, never through a symlink. A
    runner that is not root (its login cannot become root) cannot make it under RUNS: it gets
    ~/.ddpfleet/runs/<run-id>/checkpoints instead, its own. The path the ranks get."""
    if os.getuid() != 0:
        try:
            return user_dir(path, None)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM):
                raise
            run_id = os.path.basename(os.path.dirname(path))
            home = pwd.getpwuid(os.getuid()).pw_dir
            return user_dir(os.path.join(home, ".ddpfleet", "runs", run_id, "checkpoints"), None)
    return user_dir(path, user if tree.drops_to(user) else None)


def user_dir(path, user, what="the checkpoint dir"):
    """`path` made if missing (its parents 0755) and made `user`'s (None: ours), 0700, never
    through a symlink: a dir of the run's that the training user writes (checkpoints, progress)."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if user is not None:
                pw = pwd.getpwnam(user)
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    except OSError as e:
        why = e.strerror or str(e)
        raise OSError(e.errno, f"cannot make {what} {path}: {why}") from None
    return path


# -- the guardian ---------------------------------------------------------------------------


def split(tree, grace, cgroup, lost, keep_out=()):
    """Fork: the child goes on (as the runner or supervisor) and returns; this process becomes
    its guardian and exits with its status. `lost(signal name)` says the child was killed;
    `keep_out`: fds or sockets that are the child's alone (none may stay open here: a reader
    would wait for its EOF, a held port would outlive torchrun)."""
    pid = os.fork()
    if pid == 0:
        return
    for held in keep_out:
        if isinstance(held, int):
            os.close(held)
        else:
            held.close()
    os._exit(guard(tree, pid, grace, cgroup, lost))


def guard(tree, child, grace, cgroup, lost):
    """The guardian's life: reap until `child` exits; a child killed by a signal stops the run
    here (its orphans are ours now, and the cgroup has what is not)."""
    tree.prctl(tree.PR_SET_CHILD_SUBREAPER, 1)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1  # cannot happen while the child lives; nothing of ours is left
        if pid == child:
            break
    code = tree.exit_code(status)
    if code < 0:
        tree.end_run(grace, cgroup=cgroup)
        lost(signal.Signals(-code).name)
        return 128 - code
    tree.kill_all()  # the child ended its run already; only a last-moment orphan can be left
    if cgroup and os.path.isdir(cgroup):
        tree.kill_cgroup(cgroup)  # one that failed to start torchrun left it empty
    return code


# -- from outside: what a stop sweeps once the run's own supervisor had its chance ----------


def marked(entries):
    """Every process (but this one) whose environment holds one of `entries`, whole
    NAME=VALUE entries (DDPFLEET_RUN_ID=<run>, SLURM_JOB_ID=<job>): never a name."""
    wanted, me, found = {e.encode() for e in entries}, os.getpid(), []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == me:
            continue
        try:
            with open(f"/proc/{e}/environ", "rb") as f:
                if wanted.intersection(f.read().split(b"\0")):
                    found.append(int(e))
        except OSError:
            pass
    return found


def kill_marked(entries):
    """SIGKILL to every marked process: the pids it reached."""
    killed = []
    for pid in marked(entries):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    return killed


def cgroup_pids(path):
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, TypeError):
        return []


def leftovers(run_id, cgroup):
    return sorted(set(cgroup_pids(cgroup) + marked([f"DDPFLEET_RUN_ID={run_id}"])))


def sweep_out(tree, run_id, cgroup, rounds=3):
    """The run's cgroup killed (and removed once empty), every process marked with the run's id
    SIGKILLed, until a round finds none. The pids it killed."""
    killed = []
    for _ in range(rounds):
        if not leftovers(run_id, cgroup):
            break
        if cgroup:
            killed += tree.kill_cgroup(cgroup)
        killed += kill_marked([f"DDPFLEET_RUN_ID={run_id}"])
        time.sleep(0.1)
    return sorted(set(killed))
