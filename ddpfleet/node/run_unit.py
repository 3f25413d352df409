"""Loaded by run_supervisor.py on a node whose PID 1 is systemd (stdlib only, Linux, root).

There the supervisor runs as a transient service, `ddpfleet-<run-id>-<node>` with KillMode=mixed
and --collect, instead of double-forked: the unit's cgroup is the run, so `systemctl stop` ends
every descendant (SIGTERM to the supervisor, which ends its tree within its grace; then SIGKILL to
whatever is left in the cgroup), and systemd collects the unit once it is done.

The service replays the launcher's own input (its sources and the spec, with in_unit set) from
<run dir>/unit.stdin, and reports started, or why not, through <run dir>/report.fifo.
"""

import json
import os
import re
import select
import subprocess

SOURCES = []  # the length-prefixed helper sources, in the order run_supervisor.py read them


def systemd_is_pid1():
    return os.path.isdir("/run/systemd/system")


def unit_name(run_id, node):
    return re.sub(r"[^A-Za-z0-9:_.-]", "_", f"ddpfleet-{run_id}-{node}") + ".service"


def launch(run_dir, spec, own_source, report_s):
    """Start the unit; print its one-line report (or why it did not start); the exit code."""
    unit = unit_name(spec["run_id"], spec["node"])
    fifo, replay = os.path.join(run_dir, "report.fifo"), os.path.join(run_dir, "unit.stdin")
    spec = {**spec, "in_unit": True, "run_dir": run_dir, "unit": unit}
    fd = os.open(replay, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the spec may hold secrets
    with os.fdopen(fd, "wb") as f:
        f.write(b"".join([own_source, *SOURCES, json.dumps(spec).encode(), b"\n"]))
    os.mkfifo(fifo, 0o600)
    # Read and write end both here: no EOF before the service opens it, no block either.
    report = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    with open("/proc/self/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0")[:-1]]  # python -u -c LOADER
    env = [f"--setenv={k}={os.environ[k]}" for k in ("PATH", "LANG") if k in os.environ]
    r = subprocess.run(
        ["systemd-run", "--unit", unit, "--collect", "--quiet", *env,
         "-p", "KillMode=mixed",
         "-p", f"TimeoutStopSec={int(spec['grace']) + 10}",
         "-p", f"StandardInput=file:{replay}",
         "-p", f"StandardOutput=append:{os.path.join(run_dir, 'supervisor.log')}",
         "--", *argv],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        print(json.dumps({"ok": False, "error": f"systemd-run: {r.stderr.strip()[-300:]}"}))
        return 1
    ready, _, _ = select.select([report], [], [], report_s)
    line = os.read(report, 65536).decode() if ready else ""
    print(line.strip() or json.dumps({"ok": False, "error": f"{unit} did not report"}))
    return 0 if line and json.loads(line).get("ok") else 1


def report_fd(spec):
    """In the unit: the launcher's fifo, to write the one-line report to."""
    return os.open(os.path.join(spec["run_dir"], "report.fifo"), os.O_WRONLY)
