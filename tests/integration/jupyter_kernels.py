"""A kernel jupyter_server cannot shut down, and what finds it on a node, for test_jupyter.py.

The kernel is a kernelspec whose argv is FAKE_KERNEL_PY: started by the server through its REST
API (POST /api/kernels), in a session of its own as every kernel is, it ignores SIGTERM and leaves
a double-forked child in yet another session. Both carry a marker in their environment, the way
they are found again (never by name).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

FAKE_KERNEL_PY = """import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork():
        os._exit(0)
while True:
    time.sleep(60)
"""

# Run as root on a node with the marker and a user: "PID marked" for every process whose
# environment holds the marker, "PID user" for every other process of that user (by uid).
PROCS_PY = """import os, pwd, sys
mark, uid = sys.argv[1].encode(), pwd.getpwnam(sys.argv[2]).pw_uid
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\\0")
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        continue
    if mark in env or owner == uid:
        print(pid, "marked" if mark in env else "user")
"""


def kernel_spec(mark: str) -> dict:
    """kernel.json of the fake kernel; `mark` is NAME=VALUE, put in its environment."""
    name, value = mark.split("=", 1)
    return {
        "argv": ["python3", "-c", FAKE_KERNEL_PY, "{connection_file}"],
        "display_name": "ddpfleet test kernel",
        "language": "python",
        "env": {name: value},
    }


def post_json(opener, base: str, xsrf: str, path: str, body: dict) -> tuple[int, str]:
    """A JSON POST to the server's REST API with a logged-in session's opener and XSRF token."""
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRFToken": xsrf},
    )
    try:
        with opener.open(request, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
