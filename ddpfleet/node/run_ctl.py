"""Runs on a node for `invoke runs`, `logs`, `stop`, `runs --prune`: reads and acts on the
detached runs under /var/lib/ddpfleet/runs/ (see run_supervisor.py). Stdlib only, as root.

    list [RUN...]          one JSON document: every run's state, liveness, a failed node's tail
    stop RUN GRACE         SIGTERM to the supervisor (it ends its tree and cgroup), then a check
                           by cgroup and by DDPFLEET_RUN_ID in /proc/*/environ; SIGKILL to what
                           is left. Idempotent; one JSON line says what it stopped
    logs RUN FOLLOW        node.log from the start; FOLLOW=1 keeps reading until the run ends
    prune KEEP             removes the run dirs of ended runs but the newest KEEP
    spec RUN               the run's spec.json, less its lifeline secret

A run's supervisor counts as alive only if its pid has the recorded start time and the boot id
is the same (a reused pid or a reboot is not our supervisor).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

RUNS = "/var/lib/ddpfleet/runs"
TAIL_LINES = 80


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def alive(state):
    pid = state.get("supervisor_pid")
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except (OSError, TypeError):
        return False
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (
        fields[0] not in (b"Z", b"X")
        and fields[19].decode() == state.get("pid_starttime")
        and boot == state.get("boot_id")
    )


def tail(path, lines=TAIL_LINES):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def run_ids(wanted):
    try:
        found = sorted(os.listdir(RUNS))
    except FileNotFoundError:
        return []
    return [r for r in found if not wanted or r in wanted]


def one(run_id):
    d = os.path.join(RUNS, run_id)
    spec = read_json(os.path.join(d, "spec.json")) or {}
    state = read_json(os.path.join(d, "state.json")) or {"status": "STARTING"}
    state["alive"] = alive(state)
    state["meta"] = spec.get("meta", {})
    state["nnodes"] = spec.get("nnodes")
    state["nproc"] = spec.get("nproc")
    # A part the gang stopped may hold the first failure: its failing rank's torchrun was still
    # tearing down when the master's own failure stopped it.
    # ("node1 failed (exit 1)" on the master, "gang: node1 failed (exit 1)" on a worker)
    if state.get("status") == "FAILED" or "failed (exit" in str(state.get("reason") or ""):
        state["tail"] = tail(os.path.join(d, "node.log"))
    return state


def run_pids(run_id):
    """Every process whose environment carries the run's id (never a name)."""
    marker = f"DDPFLEET_RUN_ID={run_id}".encode()
    me, found = os.getpid(), []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == me:
            continue
        try:
            with open(f"/proc/{e}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(e))
        except OSError:
            pass
    return found


def cgroup_pids(path):
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, TypeError):
        return []


def stop(run_id, grace):
    d = os.path.join(RUNS, run_id)
    state = read_json(os.path.join(d, "state.json"))
    if state is None:
        return {"found": False}
    was, supervisor = state.get("status"), alive(state)
    if state.get("unit"):  # systemd: SIGTERM to the supervisor, then SIGKILL to the unit's cgroup
        subprocess.run(["systemctl", "stop", state["unit"]], capture_output=True, check=False)
    if alive(state):
        os.kill(state["supervisor_pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace + 8
        while alive(state) and time.monotonic() < deadline:
            time.sleep(0.05)
    killed = []
    for _ in range(3):  # what the supervisor could not end (or it was gone): by cgroup, by marker
        left = sorted(set(cgroup_pids(state.get("cgroup")) + run_pids(run_id)))
        if not left:
            break
        if state.get("cgroup") and os.path.exists(os.path.join(state["cgroup"], "cgroup.kill")):
            with open(os.path.join(state["cgroup"], "cgroup.kill"), "w") as f:
                f.write("1")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        time.sleep(0.1)
    after = read_json(os.path.join(d, "state.json")) or state
    if after.get("status") in ("RUNNING", "STARTING"):  # the supervisor was gone: say so
        after.update(status="STOPPED", reason="stopped by invoke stop (supervisor was gone)")
        after["ended"] = after.get("ended") or time.time()
        with open(os.path.join(d, "state.json.tmp"), "w") as f:
            json.dump(after, f)
        os.replace(os.path.join(d, "state.json.tmp"), os.path.join(d, "state.json"))
    left = sorted(set(cgroup_pids(state.get("cgroup")) + run_pids(run_id)))
    return {
        "found": True,
        "was": was,
        "supervisor": supervisor,
        "killed": sorted(set(killed)),
        "left": left,
        "status": after.get("status"),
    }


def logs(run_id, follow):
    d = os.path.join(RUNS, run_id)
    state = read_json(os.path.join(d, "state.json")) or {}
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
            if not follow or not alive(state):
                data = f.read()  # the last words, written as the supervisor ended
                out.write(data)
                out.flush()
                return 0
            time.sleep(0.1)


def prune(keep):
    entries = []
    for run_id in run_ids(()):
        state = one(run_id)
        if state.get("status") in ("RUNNING", "STARTING") and state["alive"]:
            continue
        entries.append((state.get("started") or 0, run_id))
    removed = []
    for _, run_id in sorted(entries, reverse=True)[keep:]:
        cgroup = (read_json(os.path.join(RUNS, run_id, "state.json")) or {}).get("cgroup")
        if cgroup and not cgroup_pids(cgroup):  # left by a supervisor that was killed
            try:
                os.rmdir(cgroup)
            except OSError:
                pass
        shutil.rmtree(os.path.join(RUNS, run_id), ignore_errors=True)
        removed.append(run_id)
    return removed


def main(argv):
    what = argv[0]
    if what == "list":
        print(json.dumps({r: one(r) for r in run_ids(set(argv[1:]))}))
    elif what == "stop":
        print(json.dumps(stop(argv[1], float(argv[2]))))
    elif what == "logs":
        return logs(argv[1], argv[2] == "1")
    elif what == "prune":
        print(json.dumps(prune(int(argv[1]))))
    elif what == "spec":  # for --resume: all but the lifeline's secret, which stays here
        spec = read_json(os.path.join(RUNS, argv[1], "spec.json"))
        print(json.dumps(spec and {k: v for k, v in spec.items() if k != "lifeline_secret"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
