"""The guardian of a node's run supervisor (run_supervisor.py): what a SIGKILLed supervisor
leaves behind goes with it. Stdlib only, Linux, root; sent on stdin after run_snapshot.py.

    guardian (child subreaper; no lifeline, no DDPFLEET_RUN_ID of the run in its own environment)
      └─ supervisor (child subreaper; holds the lifelines, writes state.json)
           └─ torchrun (the run's cgroup) ─ ranks ─ whatever they start, a setsid daemon too

torchrun gets PDEATHSIG, but a rank's double-forked, setsid, SIGTERM-ignoring daemon does not:
it is re-parented to the nearest living subreaper. With the supervisor SIGKILLed that is the
guardian, which then ends the whole tree (proctree.end_tree: SIGTERM, grace, SIGKILL sweeps),
kills the run's cgroup (what left the tree another way) and records the node's part as LOST,
saying why. The supervisor's lifeline sockets closed with it, so the other nodes' supervisors
stop their parts too (run_lifeline.py). A supervisor that ends normally has ended its run
already; the guardian only sweeps a last-moment orphan and exits.
"""

import json
import os
import signal
import time

LIVE = ("STARTING", "RUNNING")


def split(tree, run_dir, spec, keep_out):
    """Fork: the child goes on as the supervisor and returns; this process becomes its guardian
    and exits with it. `keep_out`: fds that are the supervisor's alone (the launcher's pipe: its
    reader waits for the supervisor's word, so no copy may stay open here)."""
    pid = os.fork()
    if pid == 0:
        return
    for fd in keep_out:
        os.close(fd)
    os._exit(guard(tree, pid, run_dir, spec))


def guard(tree, supervisor, run_dir, spec):
    tree.prctl(tree.PR_SET_CHILD_SUBREAPER, 1)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if pid == supervisor:
            break
    code = tree.exit_code(status)
    if code >= 0:
        tree.kill_all()  # the supervisor ended its run; only a last-moment orphan can be left
        return code
    path = os.path.join(run_dir, "state.json")
    state = read_json(path)
    tree.end_run(spec.get("grace") or 0, cgroup=state.get("cgroup"))  # gone already: a no-op
    if state.get("status", "STARTING") in LIVE:
        why = (
            f"{spec['node']}: its supervisor was killed ({signal.Signals(-code).name}); "
            "its guardian stopped every process of the run there"
        )
        state.update(status="LOST", reason=why, ended=time.time())
        write_json(path, state)
    return 128 - code


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_json(path, data):
    """Write then rename (its own temp name: the dead supervisor may have left one half done)."""
    tmp = f"{path}.guardian"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
