"""Runs on a node for `invoke runs`, `logs`, `stop`, `runs --prune`: reads and acts on the
detached runs under /var/lib/ddpfleet/runs/ (see run_supervisor.py). Stdlib only, as root.

    list [RUN...]          one JSON document: every run's state, liveness, a failed node's tail
    stop RUN GRACE         SIGTERM to the supervisor (it ends its part: tree, then cgroup), then
                           part.sweep_out: the run's cgroup killed and whatever carries its
                           DDPFLEET_RUN_ID SIGKILLed. Idempotent; one JSON line says what it did
    logs RUN FOLLOW        node.log from the start; FOLLOW=1 keeps reading until the run ends
    prune KEEP OUTPUTS     removes the run dirs of ended runs but the newest KEEP; their
                           checkpoints/ stay unless OUTPUTS=1; {"removed", "kept"}
    spec RUN               the run's spec.json, less its lifeline secret
    sweep KILL ENTRY...    the pids whose environment holds one of the NAME=VALUE entries
                           (part.marked; KILL=1: those SIGKILLed); one JSON list
                           (a Slurm job's leftovers: SLURM_JOB_ID=<job> DDPFLEET_RUN_ID=<run>)

The controller sends this file, then records.py, proctree.py and part.py on stdin
(launch.ssh.runctl.CTL_FILES). A run's supervisor counts as alive only while its pid has the
recorded start time and the boot id is the same (records.alive).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

TAIL_LINES = 80
HELPERS = ("records.py", "proctree.py", "part.py")  # as launch.ssh.runctl.CTL_FILES sends them
m = types.SimpleNamespace()  # the helpers by name, loaded in main()


def tail(path, lines=TAIL_LINES):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def restarts(path):
    """torchrun's restart lines in node.log (part.FRESH prints one a --max-restarts restart)."""
    found = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b"ddpfleet: restart "):
                    found.append(line.decode(errors="replace").strip())
    except OSError:
        pass
    return found


def run_ids(wanted):
    try:
        found = sorted(os.listdir(m.records.RUNS))
    except FileNotFoundError:
        return []
    return [r for r in found if not wanted or r in wanted]


def recorded(run_id):
    """True for a detached run's dir (its supervisor wrote spec.json first)."""
    d = os.path.join(m.records.RUNS, run_id)
    return any(os.path.exists(os.path.join(d, f)) for f in ("spec.json", "state.json"))


def one(run_id):
    d = os.path.join(m.records.RUNS, run_id)
    spec = m.records.read_json(os.path.join(d, "spec.json")) or {}
    state = m.records.read_json(os.path.join(d, "state.json")) or {"status": "STARTING"}
    state["alive"] = m.records.alive(state)
    state["meta"] = spec.get("meta", {})
    state["nnodes"] = spec.get("nnodes")
    state["nproc"] = spec.get("nproc")
    if "--max-restarts" in (spec.get("argv") or ()):
        state["restarts"] = restarts(os.path.join(d, "node.log"))
    # A part the gang stopped may hold the first failure: its failing rank's torchrun was still
    # tearing down when the master's own failure stopped it.
    # ("node1 failed (exit 1)" on the master, "gang: node1 failed (exit 1)" on a worker)
    if state.get("status") == "FAILED" or "failed (exit" in str(state.get("reason") or ""):
        state["tail"] = tail(os.path.join(d, "node.log"))
    return state


def stop(run_id, grace):
    d = os.path.join(m.records.RUNS, run_id)
    path = os.path.join(d, "state.json")
    state = m.records.read_json(path)
    if state is None:
        return {"found": False}
    was, supervisor, cgroup = state.get("status"), m.records.alive(state), state.get("cgroup")
    # the word that this SIGTERM is invoke stop's: with spares, a master SIGTERMed otherwise (its
    # machine going down) leaves the run to a survivor instead of ending it (run_supervisor.end)
    with open(os.path.join(d, m.records.STOP_MARK), "w"):
        pass
    if state.get("unit"):  # systemd: SIGTERM to the supervisor, then SIGKILL to the unit's cgroup
        subprocess.run(["systemctl", "stop", state["unit"]], capture_output=True, check=False)
    if m.records.alive(state):  # the supervisor ends its part, as a lifeline's stop would
        os.kill(state["supervisor_pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace + 8
        while m.records.alive(state) and time.monotonic() < deadline:
            time.sleep(0.05)
    killed = m.part.sweep_out(m.proctree, run_id, cgroup)  # what it could not end, or it was gone
    after = m.records.read_json(path) or state
    if after.get("status") in m.records.LIVE:  # the supervisor was gone: say so
        after.update(status="STOPPED", reason="stopped by invoke stop (supervisor was gone)")
        after["ended"] = after.get("ended") or time.time()
        m.records.write_json(path, after)
    return {
        "found": True,
        "was": was,
        "supervisor": supervisor,
        "killed": killed,
        "left": m.part.leftovers(run_id, cgroup),
        "status": after.get("status"),
    }


def logs(run_id, follow):
    d = os.path.join(m.records.RUNS, run_id)
    state = m.records.read_json(os.path.join(d, "state.json")) or {}
    out = sys.stdout.buffer
    try:
        f = open(os.path.join(d, "node.log"), "rb")  # noqa: SIM115
    except OSError:
        return 1
    with f:
        while True:
            data = f.read(65536)
            if data:
                out.write(data)
                out.flush()
                continue
            if not follow or not m.records.alive(state):
                data = f.read()  # the last words, written as the supervisor ended
                out.write(data)
                out.flush()
                return 0
            time.sleep(0.1)


def prune(keep, with_outputs=False):
    """The ended runs but the newest `keep`: each run dir's records (spec, state, logs, code)
    go; its checkpoints/ stays unless `with_outputs` (a run dir left with checkpoints only, as
    an attached or Slurm run's is, counts as an ended run too). A run still running here (its
    supervisor alive, or a process carrying its DDPFLEET_RUN_ID) is never touched."""
    entries = []
    for run_id in run_ids(()):
        d = os.path.join(m.records.RUNS, run_id)
        state = one(run_id)
        if state.get("status") in m.records.LIVE and state["alive"]:
            continue
        if m.part.marked([f"DDPFLEET_RUN_ID={run_id}"]):
            continue  # an attached run's ranks, or a Slurm job's: no supervisor records them
        # records-less: when it last wrote a checkpoint (what a prune of its records keeps)
        when = state.get("started") or _mtime(os.path.join(d, "checkpoints")) or _mtime(d)
        entries.append((when, run_id))
    removed, kept = [], []
    for _, run_id in sorted(entries, reverse=True)[keep:]:
        d = os.path.join(m.records.RUNS, run_id)
        cgroup = (m.records.read_json(os.path.join(d, "state.json")) or {}).get("cgroup")
        if cgroup and not m.part.cgroup_pids(cgroup):  # left by a supervisor that was killed
            try:
                os.rmdir(cgroup)
            except OSError:
                pass
        names = _listdir(d)
        outputs = "checkpoints" in names and bool(_listdir(os.path.join(d, "checkpoints")))
        if with_outputs or not outputs:
            shutil.rmtree(d, ignore_errors=True)
        else:
            for name in names:
                if name != "checkpoints":
                    path = os.path.join(d, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
            kept.append(run_id)
        if names != ["checkpoints"] or with_outputs or not outputs:
            removed.append(run_id)  # its records went (or all of it)
    return {"removed": removed, "kept": kept}


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0


def main(argv):
    # load_helper: defined by the loader this file runs under (ddpfleet.launch.sync.HELPER_LOADER)
    for name in HELPERS:
        setattr(m, name[:-3], load_helper(name))  # noqa: F821
    what = argv[0]
    if what == "list":  # a dir without records holds only an attached or Slurm run's outputs
        print(json.dumps({r: one(r) for r in run_ids(set(argv[1:])) if recorded(r)}))
    elif what == "stop":
        print(json.dumps(stop(argv[1], float(argv[2]))))
    elif what == "logs":
        return logs(argv[1], argv[2] == "1")
    elif what == "prune":
        print(json.dumps(prune(int(argv[1]), argv[2:3] == ["1"])))
    elif what == "sweep":
        sweep = m.part.kill_marked if argv[1] == "1" else m.part.marked
        print(json.dumps(sweep(argv[2:])))
    elif what == "resume":  # for --resume, in one round trip: the run's spec (all but the
        # lifeline's secret, which stays here) and its record, as `list` gives it
        run_id = argv[1]
        spec = m.records.read_json(os.path.join(m.records.RUNS, run_id, "spec.json"))
        spec = spec and {k: v for k, v in spec.items() if k != "lifeline_secret"}
        print(json.dumps({"spec": spec, "runs": {run_id: one(run_id)} if recorded(run_id) else {}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
