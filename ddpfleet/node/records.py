"""A detached run's records on a node: where they live, how they are written and read, and
whether the supervisor that writes them still lives. Stdlib only, Linux, root.

Loaded (sent on stdin as a helper) by run_supervisor.py, which writes them, and run_ctl.py,
which reads them for `invoke runs`, `logs`, `stop`:

    RUNS/<run-id>/spec.json     what the controller sent (0600: --env values, lifeline secret)
                 /state.json    the node's part: STARTING, RUNNING, then how it ended
                 /node.log      torchrun's output

Every record is written to a temp file and renamed: a reader never sees half a file. A
supervisor counts as alive only while its pid has the start time and the boot id it recorded
(identity()): a reused pid or a reboot is not our supervisor.
"""

import json
import os

RUNS = "/var/lib/ddpfleet/runs"
LIVE = ("STARTING", "RUNNING")  # a part that has not ended (if its supervisor still lives)
# run_ctl.py stop's word in the run dir before its SIGTERM (run_supervisor reads it)
STOP_MARK = "stop-requested"


def write_json(path, data, mode=0o644, tmp=".tmp"):
    """Write then rename. `tmp`: the temp file's suffix (a writer of its own, as the guardian,
    takes its own: a dead supervisor may have left its temp file half written)."""
    tmp = path + tmp
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path, default=None):
    """The record, or `default` where it is missing or not (yet) JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _stat(pid):
    """(state letter, start time) from /proc/<pid>/stat (field 22: the start time)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0].decode(), fields[19].decode()


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def identity(pid):
    """What tells this process from a later one with its pid: recorded in state.json."""
    return {"pid_starttime": _stat(pid)[1], "boot_id": boot_id()}


def alive(state):
    """True while the supervisor that wrote `state` lives (not a zombie, not a reused pid)."""
    try:
        letter, started = _stat(state.get("supervisor_pid"))
        boot = boot_id()
    except (OSError, TypeError, ValueError):
        return False
    return (
        letter not in ("Z", "X")
        and started == state.get("pid_starttime")
        and boot == state.get("boot_id")
    )
