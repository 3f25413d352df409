"""Jupyter on the real sandbox nodes: bootstrapped with venv_env + jupyter, reachable only
through `invoke jupyter` (an SSH tunnel), locked by the password, checked in a real headless
Chromium, and the password's text nowhere on the nodes, in `ps`, or in the logs."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import select
import shlex
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import INVOKE, ROOT, Cluster
from tests.integration.jupyter_browser import Browser, chromium
from tests.integration.jupyter_kernels import PROCS_PY, kernel_spec, post_json

NODES = ("node0", "node1")
PORT = 8888
PASSWORD = "ddph-" + secrets.token_urlsafe(12)  # random: found only where something leaked it
PYTHON_ENV = {
    "manager": "venv",
    "path": "/opt/ddpfleet/venv",
    "torch": "torch==2.13.0",
    "index_url": "",
    "packages": ["jupyterlab"],
    "wheelhouse": True,
}
ARTIFACTS = ROOT / "test-artifacts"
STATE_DIR = "/var/lib/ddpfleet/jupyter"

# Run on a node with the password on stdin: every regular file under /home and /etc, and those
# written since the test began under /root, /var/log, the jupyter state and /tmp (the rest of /root
# is the host's multi-GB lower layer, older than any password of this run).
SCAN_PY = """import os, stat, sys
secret, since, hits = sys.stdin.buffer.read(), float(sys.argv[1]), []
def has(path):
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(1 << 20):
            if secret in tail + chunk:
                return True
            tail = chunk[-len(secret):]
    return False
for top, newer in (("/home", 0), ("/etc", 0), ("/root", 1), ("/var/log", 1),
                   ("/var/lib/ddpfleet/jupyter", 1), ("/tmp", 1)):
    for folder, _, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and not (newer and st.st_mtime < since) and has(path):
                    hits.append(path)
            except OSError:
                pass
print("\\n".join(hits))
"""


@dataclass
class Run:
    """The module's cluster: its inventory, the environment holding the password, the first
    bootstrap's output and what `ps` showed while it ran."""

    cluster: Cluster
    inventory: Path
    env: dict
    since: float
    first: str = ""
    ps_samples: int = 0
    ps_leaks: list[str] = field(default_factory=list)

    def invoke(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*INVOKE, *args],
            cwd=self.cluster.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def status(self) -> dict[str, dict]:
        result = self.invoke("jupyter.status", "--json", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        return {row["node"]: row for row in rows}

    def server_pid(self, node: str) -> str:
        return self.cluster.ssh(node, f"cat {STATE_DIR}/server.pid").stdout.strip()


def bootstrap_watching_ps(run: Run) -> None:
    """The first bootstrap, `ps` of the whole box (every node's PID namespace is a child of
    ours) sampled all along, so a password on any command line would be caught."""
    log = run.cluster.dir / "jupyter-bootstrap.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*INVOKE, "bootstrap", "--roles", "venv_env,jupyter"],
            cwd=run.cluster.dir,
            env=run.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 1800
        while proc.poll() is None and time.monotonic() < deadline:
            ps = subprocess.run(
                ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
            )
            run.ps_samples += 1
            run.ps_leaks += [line for line in ps.stdout.splitlines() if PASSWORD in line]
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    run.first = log.read_text()
    assert proc.returncode == 0, run.first


@pytest.fixture(scope="module")
def jup(cluster: Cluster) -> Run:
    data = cluster.data
    data["python_env"] = {**(data.get("python_env") or {}), **PYTHON_ENV}
    inventory = cluster.dir / "inventory-jupyter.yaml"
    inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {
        **cluster.env(),
        "DDPFLEET_INVENTORY": str(inventory),
        "DDPFLEET_JUPYTER_PASSWORD": PASSWORD,
    }
    run = Run(cluster, inventory, env, since=time.time() - 2)
    bootstrap_watching_ps(run)
    yield run
    stop = run.invoke("jupyter.stop", timeout=120)  # leave no server of ours behind
    assert stop.returncode == 0, stop.stdout + stop.stderr


@pytest.fixture(scope="module")
def tunnel(jup: Run):
    """`invoke jupyter --node node0 --local-port 0` in the foreground; its URL's base."""
    proc = subprocess.Popen(
        [*INVOKE, "jupyter", "--node", "node0", "--local-port", "0"],
        cwd=jup.cluster.dir,
        env=jup.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        seen = read_until(proc, b"/lab\n", timeout=60)
        url = re.search(r"http://127\.0\.0\.1:(\d+)/lab", seen)
        assert url, f"no URL from invoke jupyter: {seen}"
        yield f"http://127.0.0.1:{url[1]}"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest = proc.communicate(timeout=30)[0].decode(errors="replace")
        assert proc.returncode == 0, seen + rest
        assert "tunnel closed" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_until(proc: subprocess.Popen, marker: bytes, timeout: float) -> str:
    """The process's output until `marker` (raw reads: no buffer hides lines from select)."""
    seen = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while marker not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


# -- HTTP through the tunnel -----------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Client:
    """A cookie-keeping HTTP client that shows redirects instead of following them, and never
    uses a proxy from the environment (the tunnel is on this machine's loopback)."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPCookieProcessor(self.jar),
            _NoRedirect,
        )

    def request(self, path: str, form: dict | None = None) -> tuple[int, dict, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.base + path, data=data, timeout=30) as r:
                return r.status, dict(r.headers), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode(errors="replace")

    def login(self, password: str) -> tuple[int, dict, str]:
        status, _, page = self.request("/login")
        assert status == 200 and 'id="password_input"' in page
        xsrf = next(c.value for c in self.jar if c.name == "_xsrf")
        return self.request("/login?next=%2Flab", {"password": password, "_xsrf": xsrf})


def test_bootstrap_starts_jupyter_on_every_node(jup: Run):
    rows = jup.status()
    assert sorted(rows) == list(NODES)
    for node, row in rows.items():
        assert row["state"] == "running", row
        assert (row["port"], row["password"], row["user"]) == (PORT, "argon2", "jupyter"), row
        assert row["url"] == f"http://127.0.0.1:{PORT}/", row
        assert str(row["pid"]) == jup.server_pid(node)
        mode = jup.cluster.ssh(
            node, "stat -c '%a %U' /home/jupyter/.jupyter/jupyter_server_config.json"
        ).stdout.strip()
        assert mode == "600 jupyter"


def test_port_answers_on_the_nodes_loopback_only(jup: Run):
    for node in NODES:
        inside = jup.cluster.ssh(
            node,
            shlex.join(
                ["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 8888), 3)"]
            ),
        )
        assert inside.returncode == 0, inside.stderr  # it is there...
        with pytest.raises(OSError):  # ...and not on the node's address
            socket.create_connection((jup.cluster.address(node), PORT), timeout=3).close()


def test_unauthenticated_requests_are_refused(tunnel: str):
    client = Client(tunnel)
    for path in ("/api/contents", "/api/kernels", "/api/sessions", "/api/terminals"):
        status, headers, _ = client.request(path)
        assert status in (401, 403) or "/login" in headers.get("Location", ""), (path, status)
    status, headers, _ = client.request("/lab")
    assert status == 302 and headers["Location"].startswith("/login")


def test_wrong_password_does_not_log_in(tunnel: str):
    client = Client(tunnel)
    status, _, page = client.login(PASSWORD + "x")
    assert status == 401 and "Invalid credentials" in page  # the login page again
    assert client.request("/api/contents")[0] in (401, 403)


def test_right_password_logs_in(tunnel: str):
    client = Client(tunnel)
    status, headers, _ = client.login(PASSWORD)
    assert status == 302 and headers["Location"] == "/lab"
    status, _, body = client.request("/api/contents")
    assert status == 200 and json.loads(body)["type"] == "directory"


def test_chromium_logs_in_and_reaches_jupyterlab(tunnel: str):
    assert chromium(), "no chromium here: scripts/setup.sh installs Debian's chromium"
    with Browser() as browser:
        page = browser.new_page()
        page.goto(tunnel + "/lab")
        page.wait_for("document.querySelector('#password_input') !== null", timeout=60)
        assert "/login" in page.url()
        page.screenshot(ARTIFACTS / "jupyter-login.png")
        page.evaluate(
            f"document.getElementById('password_input').value = {json.dumps(PASSWORD)};"
            "document.getElementById('login_submit').click(); true"
        )
        page.wait_for(
            "document.querySelector('.jp-LabShell') !== null && "
            "document.querySelector('.jp-Launcher') !== null",
            timeout=120,
        )
        assert page.url() == tunnel + "/lab"
        shot = page.screenshot(ARTIFACTS / "jupyter-lab.png")
    assert shot.stat().st_size > 10_000


def test_password_text_is_nowhere(jup: Run):
    assert jup.ps_samples > 5 and jup.ps_leaks == []
    assert PASSWORD not in jup.first
    for node in NODES:
        scan = jup.cluster.ssh(
            node,
            shlex.join(["python3", "-c", SCAN_PY, str(jup.since)]),
            input=PASSWORD,
            timeout=300,
        )
        assert scan.returncode == 0, scan.stderr
        assert scan.stdout.strip() == "", f"{node}: the password is in {scan.stdout}"
    logs = list((jup.cluster.dir / "logs").glob("*.log"))
    assert logs
    for log in logs:
        assert PASSWORD not in log.read_text(errors="replace"), log


def test_second_bootstrap_changes_nothing_and_keeps_the_pid(jup: Run):
    before = {node: jup.server_pid(node) for node in NODES}
    again = jup.invoke("bootstrap", "--roles", "venv_env,jupyter")
    assert again.returncode == 0, again.stdout + again.stderr
    log = max((jup.cluster.dir / "logs").glob("bootstrap-*.log")).read_text()
    jupyter_steps = [line for line in log.splitlines() if "] jupyter: " in line]
    assert len(jupyter_steps) == 7 * len(NODES), log
    assert all(": ok" in line for line in jupyter_steps), log
    assert {node: jup.server_pid(node) for node in NODES} == before
    assert {n: str(row["pid"]) for n, row in jup.status().items()} == before


def test_stop_then_bootstrap_starts_it_again(jup: Run, tunnel: str):
    stopped = jup.invoke("jupyter.stop", "--nodes", "node1", timeout=120)
    assert stopped.returncode == 0 and "stopped (was pid" in stopped.stdout, stopped.stdout
    rows = jup.status()
    assert rows["node1"]["state"] == "stopped" and rows["node0"]["state"] == "running"
    gone = jup.cluster.ssh("node1", "pgrep -f 'jupyter[-]lab' || true").stdout.strip()
    assert gone == ""
    again = jup.invoke("bootstrap", "--roles", "jupyter", "--nodes", "node1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "jupyter: service: changed (started" in again.stdout
    assert jup.status()["node1"]["state"] == "running"
    assert Client(tunnel).request("/api/contents")[0] == 403  # node0 never noticed


# -- jupyter.stop ends the server's whole tree (last: it stops node0's server) ----------------

KERNEL = "ddpfleet-fake"
KERNEL_DIR = f"/usr/local/share/jupyter/kernels/{KERNEL}"  # on Jupyter's system data path
MARK = "DDPFLEET_TEST_KERNEL=" + secrets.token_hex(8)  # in the fake kernel's environment


def jupyter_procs(jup: Run, node: str) -> list[str]:
    """'PID marked' / 'PID user': the fake kernel's processes and the Jupyter user's."""
    out = jup.cluster.ssh(node, shlex.join(["python3", "-c", PROCS_PY, MARK, "jupyter"]))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_stop_leaves_no_process_of_the_servers_tree(jup: Run, tunnel: str):
    put = shlex.join(["sh", "-c", 'mkdir -p "$1" && cat >"$1/kernel.json"', "sh", KERNEL_DIR])
    spec = json.dumps(kernel_spec(MARK))
    assert jup.cluster.ssh("node0", put, input=spec).returncode == 0
    try:
        client = Client(tunnel)
        assert client.login(PASSWORD)[0] == 302
        xsrf = next(c.value for c in client.jar if c.name == "_xsrf")
        status, body = post_json(client.opener, tunnel, xsrf, "/api/kernels", {"name": KERNEL})
        assert status == 201, body

        def marked() -> list[str]:
            return [p for p in jupyter_procs(jup, "node0") if p.endswith("marked")]

        deadline = time.monotonic() + 60
        while len(found := marked()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(found) == 2, found  # the kernel and its double-forked, setsid child
        cgroup = jup.cluster.ssh("node0", f"cat {STATE_DIR}/cgroup 2>/dev/null").stdout.strip()

        stopped = jup.invoke("jupyter.stop", "--nodes", "node0", timeout=120)
        assert stopped.returncode == 0 and "stopped (was pid" in stopped.stdout, stopped.stdout
        assert jupyter_procs(jup, "node0") == []  # once stop returns, nothing of the tree
        if cgroup:  # where root could make one: the server's cgroup is gone too
            gone = jup.cluster.ssh("node0", shlex.join(["test", "-e", cgroup]))
            assert gone.returncode == 1, f"{cgroup} is still there"
        assert jup.status()["node0"]["state"] == "stopped"
    finally:
        jup.cluster.ssh("node0", shlex.join(["rm", "-rf", KERNEL_DIR]))
