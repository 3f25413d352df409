"""The cloud shape on the sandbox's real nodes (issue 11): ddpfleet logs in as `ubuntu` with
sudo, sshd refuses root, and training runs as the ordinary user `train`.

One sandbox for the module, made by `sandbox.up --login-user ubuntu --sudo nopasswd`, and one
full bootstrap. The last tests turn the same running nodes into password-sudo and no-sudo nodes
(`sandbox.up --sudo ...` rewrites only the user's sudo rule and password), so nothing is built
twice.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    HERMETIC,
    INVOKE,
    PREFIX,
    Cluster,
    sandbox,
    second_subnet,
    write_inventory,
)
from tests.integration.test_bootstrap import recap
from tests.integration.test_gpu_status import STANDIN_DIR, STANDIN_PATHS, STANDINS
from tests.integration.test_jupyter import Client, read_until

NODES = ("node0", "node1")
JUPYTER_PASSWORD = "cloud-shaped-notebook-pw"
WAIT_S = 180  # the longest any wait here may take before the test fails
# A rank that holds until the test has looked at it: it waits for a file in /tmp.
HOLD = """\
import os, sys, time
release = "/tmp/ddpfleet-release-" + os.environ["DDPFLEET_RUN_ID"]
print("rank", os.environ["RANK"], "uid", os.getuid(), flush=True)
deadline = time.monotonic() + 300
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.1)
sys.exit(0 if os.path.exists(release) else 3)
"""
# As root on a node: every process of run $1 as "pid uid local_rank" (local_rank - for others).
RUN_PROCESSES = r"""
for d in /proc/[0-9]*; do
  tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qx "DDPFLEET_RUN_ID=$1" || continue
  r=$(tr '\0' '\n' < "$d/environ" 2>/dev/null | sed -n 's/^LOCAL_RANK=//p')
  echo "${d#/proc/} $(awk '/^Uid:/ {print $2}' "$d/status") ${r:--}"
done
"""


@pytest.fixture(scope="module")
def cloud(cluster: Cluster, tmp_path_factory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("cloud")
    subnet = second_subnet(second_subnet())
    c = Cluster(
        directory, write_inventory(directory, prefix=PREFIX + "c", subnet=subnet, cloud=True)
    )
    (directory / ".ddpfleet").mkdir(exist_ok=True)
    shared = cluster.dir / ".ddpfleet" / "wheelhouse"
    shared.mkdir(parents=True, exist_ok=True)
    (directory / ".ddpfleet" / "wheelhouse").symlink_to(shared)
    with sandbox(c, "--sudo", "nopasswd"):
        yield c


def ssh(c: Cluster, node: str, command: str, user: str = "ubuntu", **kw):
    """The system OpenSSH client as `user`, strict host keys."""
    d = c.data
    argv = ["ssh", *HERMETIC, "-i", d["ssh"]["key"], "-o", "BatchMode=yes", "-o",
            "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={d['ssh']['known_hosts']}",
            f"{user}@{c.address(node)}", command]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def as_root(c: Cluster, node: str, script: str, *args: str) -> str:
    """A root script on the node through the login user's passwordless sudo."""
    r = ssh(c, node, shlex.join(["sudo", "-n", "sh", "-c", script, "sh", *args]))
    assert r.returncode == 0, r.stderr
    return r.stdout


def boot(c: Cluster, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return c.invoke(
        "bootstrap", *flags, timeout=1800,
        extra_env={"DDPFLEET_JUPYTER_PASSWORD": JUPYTER_PASSWORD, **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def booted(cloud: Cluster) -> Cluster:
    r = boot(cloud)
    assert r.returncode == 0, r.stdout + r.stderr
    return cloud


def test_the_node_is_cloud_shaped_root_refused_ubuntu_in(cloud: Cluster):
    for node in NODES:
        root = ssh(cloud, node, "true", user="root")
        assert root.returncode == 255 and "Permission denied" in root.stderr
        assert ssh(cloud, node, "id -un").stdout.strip() == "ubuntu"


def test_bootstrap_through_sudo_converges(booted: Cluster):
    again = boot(booted)
    assert again.returncode == 0, again.stdout + again.stderr
    for node, row in recap(again.stdout).items():
        assert (row["changed"], row["failed"]) == ("0", "0"), (node, again.stdout)


def test_system_files_are_roots_and_the_env_is_read_only_for_train(booted: Cluster):
    for node in NODES:
        stats = as_root(
            booted, node,
            'stat -c "%U:%G %a %n" "$@"; find /etc /usr/local/libexec/ddpfleet /opt/ddpfleet '
            "/var/lib/ddpfleet \\( -user ubuntu -o -group ubuntu -o -user train \\) -print; "
            "ls -d /tmp/ddpfleet.* 2>/dev/null; getent passwd train | cut -d: -f3,4,6",
            "/etc/ssh/sshd_config.d/00-ddpfleet-hardening.conf",
            "/usr/local/libexec/ddpfleet/jupyter-supervise", "/opt/ddpfleet/venv/bin",
        ).splitlines()  # fmt: skip
        assert stats == [
            "root:root 644 /etc/ssh/sshd_config.d/00-ddpfleet-hardening.conf",
            "root:root 755 /usr/local/libexec/ddpfleet/jupyter-supervise",
            "root:root 755 /opt/ddpfleet/venv/bin",
            "2000:2000:/home/train",  # nothing owned by the login or training user, no temp dir
        ], node
        check = as_root(
            booted, node,
            "setpriv --reuid=train --regid=train --init-groups -- sh -c "
            "'test -w /opt/ddpfleet/venv/bin && echo writable; "
            "/opt/ddpfleet/venv/bin/python -c \"import torch; print(torch.__version__)\"'",
        )  # fmt: skip
        assert "writable" not in check and check.strip().startswith("2.13.0"), check


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "hold.py").write_text(HOLD)
    return tmp_path


def run_processes(c: Cluster, node: str, run_id: str) -> list[tuple[int, int, str]]:
    out = as_root(c, node, RUN_PROCESSES, run_id)
    return [(int(p), int(u), r) for p, u, r in (line.split() for line in out.splitlines())]


def wait_for_ranks(c: Cluster, run_id: str, proc: subprocess.Popen) -> dict[str, list]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = {n: run_processes(c, n, run_id) for n in NODES}
        if all(sum(r != "-" for _, _, r in found[n]) == 2 for n in NODES):
            return found
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    raise AssertionError(f"the ranks did not start: {found}")


def gpu_users(c: Cluster, pids: list[int]) -> list[tuple[str, str]]:
    """gpu-status --json on node0 with the stand-in nvidia-smi pointing its apps at `pids`:
    each app's (user, run_id)."""
    put = (
        f"mkdir -p {STANDIN_DIR}/recordings && cd {STANDIN_DIR}/recordings && tar x && "
        "install -m 0755 nvidia-smi /usr/local/bin/nvidia-smi && rm nvidia-smi && "
        f"printf 'a100x8 pids=%s recordings=%s\\n' {','.join(map(str, pids))} "
        f"{STANDIN_DIR}/recordings > /etc/ddpfleet-standin-gpu"
    )
    tar = subprocess.run(
        ["tar", "c", "-C", str(STANDINS / "recordings"), ".", "-C", str(STANDINS), "nvidia-smi"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    r = subprocess.run(
        ["ssh", *HERMETIC, "-i", c.data["ssh"]["key"], "-o", "BatchMode=yes", "-o",
         f"UserKnownHostsFile={c.data['ssh']['known_hosts']}", f"ubuntu@{c.address('node0')}",
         "sudo -n sh -c " + shlex.quote(put)],
        input=tar, capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        out = c.invoke("gpu-status", "--nodes", "node0", "--json", timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        as_root(c, "node0", 'rm -rf "$@"', *STANDIN_PATHS)
    users: list[tuple[str, str]] = []

    def walk(x) -> None:
        if isinstance(x, dict):
            users.extend((p.get("user"), p.get("run_id")) for p in x.get("processes") or [])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(out.stdout))
    return users


def test_every_rank_runs_as_train_and_gpu_status_says_so(booted: Cluster, project: Path):
    run_id = "cloud-" + os.urandom(3).hex()
    proc = subprocess.Popen(
        [*INVOKE, "train", "--nodes", "node0,node1", "--nproc-per-node", "2",
         "--script", "hold.py", "--run-id", run_id],
        cwd=project, env=booted.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        found = wait_for_ranks(booted, run_id, proc)
        for node, processes in found.items():
            # torchrun and its workers are train's; the runner and its guardian are root's (the
            # run's supervisor, as for --detach: the run's cgroup is root's to make and kill)
            ranks = [uid for _, uid, r in processes if r != "-"]
            others = [uid for _, uid, r in processes if r == "-"]
            assert ranks == [2000, 2000], (node, processes)
            assert others.count(0) == 2 and set(others) == {0, 2000}, (node, processes)
        ranks = [pid for pid, _, r in found["node0"] if r != "-"]
        # its user, and its run (read as root: train's environ is not the login user's)
        assert gpu_users(booted, ranks) == [("train", run_id)] * 2
        for node in NODES:
            ssh(booted, node, f"touch /tmp/ddpfleet-release-{run_id}")
        out, _ = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, out
        assert out.count("uid 2000") == 4, out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)


def test_jupyter_runs_as_train_and_answers_through_the_tunnel(booted: Cluster):
    pid = as_root(booted, "node0", "cat /var/lib/ddpfleet/jupyter/server.pid").strip()
    assert ssh(booted, "node0", f"ps -o user= -p {pid}").stdout.strip() == "train"
    proc = subprocess.Popen(
        [*INVOKE, "jupyter", "--node", "node0", "--local-port", "0"], cwd=booted.dir,
        env=booted.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        seen = read_until(proc, b"/lab\n", timeout=60)
        url = re.search(r"http://127\.0\.0\.1:(\d+)/lab", seen)
        assert url, seen
        status, headers, _ = Client(f"http://127.0.0.1:{url[1]}").login(JUPYTER_PASSWORD)
        assert status == 302 and headers["Location"] == "/lab"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_doctor_passes_sudo_and_the_training_user(booted: Cluster):
    r = booted.invoke("doctor", timeout=300)
    rows = [ln for ln in r.stdout.splitlines() if re.search(r"│ (sudo|train user) ", ln)]
    assert len(rows) == 4 and all("│ pass " in ln for ln in rows), r.stdout


def test_a_detached_run_through_sudo_runs_as_train_and_stops(booted: Cluster, project: Path):
    """--detach, runs, logs, stop as ubuntu with sudo: the supervisors are root's, every
    process of the run is train's."""
    run_id = "cloud-det-" + os.urandom(3).hex()
    r = booted.invoke(
        "train", "--nodes", "node0,node1", "--nproc-per-node", "2", "--script", "hold.py",
        "--run-id", run_id, "--project-dir", str(project), "--detach", timeout=WAIT_S,
    )  # fmt: skip
    assert r.returncode == 0 and f"run {run_id}: started detached" in r.stdout, r.stdout + r.stderr
    deadline = time.monotonic() + WAIT_S
    while (out := booted.invoke("logs", run_id, timeout=60).stdout).count("uid 2000") < 4:
        assert time.monotonic() < deadline, out
        time.sleep(0.5)
    for node in NODES:
        processes = run_processes(booted, node, run_id)
        assert processes and {uid for _, uid, _ in processes} == {2000}, (node, processes)
    listed = booted.invoke("runs", "--json", timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert {v["run_id"]: v["state"] for v in json.loads(listed.stdout)}[run_id] == "RUNNING"
    s = booted.invoke("stop", run_id, timeout=120)
    assert s.returncode == 0 and s.stdout.count("nothing left") == 2, s.stdout + s.stderr
    assert not any(run_processes(booted, n, run_id) for n in NODES)
    listed = booted.invoke("runs", "--json", timeout=120)
    assert {v["run_id"]: v["state"] for v in json.loads(listed.stdout)}[run_id] == "STOPPED"


# -- the training user never steers root (security review 2026-12-06, #1) -------------------

CODE = "/home/train/ddpfleet/sandbox/code"
SECRET = "root-only-" + "5ecret"
NODE_PYTHON = "/opt/ddpfleet/venv/bin/python"
# As train on node0, what a notebook or a pip dependency of the user can do between the sync and
# the snapshot: wait for run $2's runner to lock the code dir (it writes its run id into the lock
# file once it holds it), make the links $4, take the lock once the runner frees it at the
# hand-off (the sync is done by then, and the master's supervisor, which snapshots the code, is
# started only after it), and at once add the entries $3 to the manifest. Planted before the
# supervisor makes its run dir (checked: "late" otherwise), so before the snapshot reads the
# manifest (66-80 ms before, under a load of 15 on 2 cores). A wait for the sync's new manifest
# inode missed the sync whenever ext4 gave the manifest its old inode number back (the sync
# writes it twice), and the run started unplanted.
PLANT = r"""
import fcntl, json, os, signal, sys, time
code, run_id = sys.argv[1], sys.argv[2]
entries, links = json.loads(sys.argv[3]), json.loads(sys.argv[4])
lock, manifest = code + "/.ddpfleet/lock", code + "/.ddpfleet/manifest.json"
run_dir = "/var/lib/ddpfleet/runs/" + run_id
signal.alarm(150)  # never outlives the test
print("ready", os.getpid(), flush=True)
def holder():
    try:
        with open(lock) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
while holder() != run_id:
    time.sleep(0.01)
for name, target in links.items():
    os.symlink(target, os.path.join(code, name))
fd = os.open(lock, os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
with open(manifest) as f:
    data = json.load(f)
data["paths"].update(entries)
with open(manifest + ".new", "w") as f:
    json.dump(data, f)
os.replace(manifest + ".new", manifest)
planted = time.monotonic()
late = os.path.lexists(run_dir)
while not os.path.lexists(run_dir) and time.monotonic() < planted + 60:
    time.sleep(0.001)
ahead = "late" if late else "%.0f ms before the run dir" % (1000 * (time.monotonic() - planted))
print("planted", ahead, flush=True)
"""
SUDOERS = "train ALL=(ALL) NOPASSWD:ALL"
DEEP = "/home/train/.x/1/2/3/4/5/6/7"  # .s/.. x7: ~/.x in the code dir, / in the snapshot
# plant: (root's setup on node0, $1 the secret; manifest entries; links in the code dir)
PLANTS = {
    "dotdot": (
        f"mkdir -p {DEEP} /home/train/.x/etc/sudoers.d && "
        f"echo '{SUDOERS}' > /home/train/.x/etc/sudoers.d/pwn && chown -R train: /home/train/.x",
        {".s/" + "../" * 7 + "etc/sudoers.d/pwn": ["f", 0o440, "0" * 64]},
        {".s": DEEP},
    ),
    "absolute": (
        f"mkdir -p /home/train/.x && echo '{SUDOERS}' > /home/train/.x/pwn2 && "
        "chown -R train: /home/train/.x",
        {"/etc/sudoers.d/pwn2": ["f", 0o440, "0" * 64]},
        {},
    ),
    "read": (
        'mkdir -p -m 0700 /var/tmp/ddpfleet-secret && echo "$1" > /var/tmp/ddpfleet-secret/s',
        {"leakdir/s": ["f", 0o644, "0" * 64]},
        {"leakdir": "/var/tmp/ddpfleet-secret"},
    ),
}
CLEAN = (
    'rm -rf /home/train/.x "$1/.s" "$1/leakdir" /var/tmp/ddpfleet-secret '
    "/etc/sudoers.d/pwn /etc/sudoers.d/pwn2"
)
# As train: the planted entries out of the manifest again ($1 the code dir, $2 the entries),
# or the next run's preflight refuses the code dir (the sync's own safe-path check). No
# manifest: the run never synced (its own failure is the one to see).
UNPLANT = """
import json, sys
path = sys.argv[1] + "/.ddpfleet/manifest.json"
try:
    with open(path) as f:
        data = json.load(f)
except FileNotFoundError:
    sys.exit(0)
for rel in json.loads(sys.argv[2]):
    data["paths"].pop(rel, None)
with open(path, "w") as f:
    json.dump(data, f)
"""


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_planted_manifest_entry_stops_the_detached_run(booted: Cluster, tmp_path: Path, plant):
    """The review's repro: train plants a manifest entry between the sync and the supervisor's
    snapshot (`..` through a symlinked dir to /etc/sudoers.d, an absolute path, a symlinked
    dir to a root-only one). The run never starts and says why; the node is unchanged."""
    (tmp_path / "ok.py").write_text(f"print('ran {os.urandom(4).hex()}')\n")  # a sync each time
    setup, entries, links = PLANTS[plant]
    run_id = f"plant-{plant}-" + os.urandom(3).hex()
    as_root(booted, "node0", setup, SECRET)
    before = as_root(booted, "node0", "ls -la /etc/sudoers.d")
    # nice -20: the planter must run within the ~70 ms between the hand-off and the run dir; at
    # nice 0 on a busy 2-core box it once woke too late (CI rehearsal: "planted late")
    argv = ["sudo", "-n", "nice", "-n", "-20", "setpriv", "--reuid=train", "--regid=train",
            "--init-groups", "--", NODE_PYTHON, "-c", PLANT, CODE, run_id, json.dumps(entries),
            json.dumps(links)]  # fmt: skip
    planter = subprocess.Popen(
        ["ssh", *HERMETIC, "-i", booted.data["ssh"]["key"], "-o", "BatchMode=yes", "-o",
         f"UserKnownHostsFile={booted.data['ssh']['known_hosts']}",
         f"ubuntu@{booted.address('node0')}", shlex.join(argv)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ready = []
    try:
        ready = planter.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        r = booted.invoke(
            "train", "--nodes", "node0", "--nproc-per-node", "1", "--script", "ok.py",
            "--run-id", run_id, "--project-dir", str(tmp_path), "--detach", "--code-dir", CODE,
            timeout=WAIT_S,
        )  # fmt: skip
        said = planter.communicate(timeout=90)[0]
        print(f"\n{plant}: {said.strip()}")  # how far ahead: the margin this test has
        after = as_root(booted, "node0", "ls -la /etc/sudoers.d")
        sudo = as_root(booted, "node0", "setpriv --reuid=train --regid=train --init-groups -- "
                       "sudo -n true 2>&1; echo rc=$?")  # fmt: skip
        found = as_root(booted, "node0", 'grep -rlF -- "$1" /var/lib/ddpfleet/runs /home/train || true',
                        SECRET)  # fmt: skip
    finally:
        if planter.poll() is None:  # its ssh gone, the planter would still wait on the node
            if ready[1:]:
                as_root(booted, "node0", 'kill "$1" 2>/dev/null || true', ready[1])
            planter.kill()
            planter.communicate()
        as_root(booted, "node0", CLEAN, CODE)
        unplant = ["setpriv", "--reuid=train", "--regid=train", "--init-groups", "--",
                   NODE_PYTHON, "-c", UNPLANT, CODE, json.dumps(entries)]  # fmt: skip
        as_root(booted, "node0", 'exec "$@"', *unplant)
    # else the run may have read its manifest first: the test could not judge the snapshot
    assert "planted" in said and "late" not in said, said
    out = r.stdout + r.stderr
    assert after == before and "rc=0" not in sudo, (after, sudo, out)
    assert found == "", (found, out)  # the secret in no copy
    assert r.returncode != 0, out
    assert "node0: the run's supervisor did not start: cannot snapshot the code into" in out
    assert f"{CODE}/.ddpfleet/manifest.json" in out and repr(next(iter(entries))) in out, out


# -- password sudo and no sudo, on the same nodes --------------------------------------------


def snapshot(c: Cluster) -> dict[str, list[tuple[str, int, int]]]:
    """Every file in each node's overlay upper layer (what the node changed), but the logs and
    sudo's own bookkeeping, which every login and sudo attempt touches."""
    skip = ("var/log/", "var/lib/sudo/", "home/ubuntu/")
    out = {}
    for node in NODES:
        upper = Path("/var/lib/ddpfleet/sandbox") / c.data["sandbox"]["prefix"] / node / "upper"
        out[node] = sorted(
            (str(p.relative_to(upper)), p.lstat().st_mtime_ns, p.lstat().st_size)
            for p in upper.rglob("*")
            if not str(p.relative_to(upper)).startswith(skip)
        )
    return out


def set_sudo(c: Cluster, mode: str) -> None:
    up = c.invoke("sandbox.up", "--sudo", mode, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr


def sample_ps(c: Cluster) -> subprocess.Popen:
    """`ps -eo args` on node0 over and over until /tmp/ddpfleet-stop-ps appears."""
    loop = (
        "rm -f /tmp/ddpfleet-stop-ps; echo go; "
        "until [ -e /tmp/ddpfleet-stop-ps ]; do ps -eo args; done"
    )
    d = c.data
    proc = subprocess.Popen(
        ["ssh", *HERMETIC, "-i", d["ssh"]["key"], "-o", "BatchMode=yes", "-o",
         f"UserKnownHostsFile={d['ssh']['known_hosts']}", f"ubuntu@{c.address('node0')}", loop],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "go"
    return proc


def test_password_sudo_needs_the_password_and_never_shows_it(booted: Cluster):
    set_sudo(booted, "password")
    password = (booted.dir / "state" / "become_password").read_text().strip()
    before = snapshot(booted)
    r = boot(booted)
    assert r.returncode == 1
    for node in NODES:
        assert f"{node}: become: sudo asks ubuntu's password and none was given" in r.stderr
    assert all(w in r.stderr for w in ("--ask-become-pass", "DDPFLEET_BECOME_PASSWORD", "file"))
    wrong = boot(booted, DDPFLEET_BECOME_PASSWORD="not-" + password)
    assert wrong.returncode == 1 and wrong.stderr.count("(wrong password)") == 2, wrong.stderr
    assert snapshot(booted) == before  # nothing changed on either node

    sampler = sample_ps(booted)
    try:
        good = boot(booted, DDPFLEET_BECOME_PASSWORD=password)
    finally:
        ssh(booted, "node0", "touch /tmp/ddpfleet-stop-ps")
        seen = sampler.communicate(timeout=60)[0]
    assert good.returncode == 0, good.stdout + good.stderr
    assert all(row["changed"] == "0" for row in recap(good.stdout).values()), good.stdout
    assert "sudo -k -S -p" in seen  # ps saw the root work on node0, with no password in argv
    assert password not in seen and password not in good.stdout + good.stderr
    logs = [p for p in (booted.dir / "logs").rglob("*") if p.is_file()]
    assert logs and not [p for p in logs if password in p.read_text(errors="replace")]
    prefix = booted.data["sandbox"]["prefix"]
    grep = subprocess.run(
        ["grep", "-rlF", "--", password, f"/var/lib/ddpfleet/sandbox/{prefix}"],
        capture_output=True,
        text=True,
    )
    assert grep.stdout == "", grep.stdout  # in no file on either node


def test_runs_logs_stop_take_the_become_password(booted: Cluster):
    """Still password sudo (the test above): the run tasks need it as train does."""
    password = (booted.dir / "state" / "become_password").read_text().strip()
    none = booted.invoke("runs", timeout=120)
    assert none.returncode == 1 and "--ask-become-pass" in none.stderr, none.stderr
    asked = booted.invoke(
        "stop", "no-such-run", "--ask-become-pass", stdin=subprocess.DEVNULL, timeout=120
    )  # never a terminal here, whoever runs the tests
    assert asked.returncode == 1 and "--ask-become-pass needs a terminal" in asked.stderr
    given = {"DDPFLEET_BECOME_PASSWORD": password}
    listed = booted.invoke("runs", "--json", extra_env=given, timeout=120)
    assert listed.returncode == 0, listed.stderr
    run_id = next(v["run_id"] for v in json.loads(listed.stdout) if v["state"] == "STOPPED")
    out = booted.invoke("logs", run_id, extra_env=given, timeout=120)
    assert out.returncode == 0 and out.stdout.count("uid 2000") == 4, out.stdout + out.stderr
    again = booted.invoke("stop", run_id, extra_env=given, timeout=120)
    assert again.returncode == 0 and "was STOPPED" in again.stdout, again.stdout + again.stderr


def test_a_login_user_without_sudo_gets_one_line_per_node(booted: Cluster):
    set_sudo(booted, "none")
    before = snapshot(booted)
    r = boot(booted)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "may not use sudo" in ln]
    assert len(lines) == 1 and all(f"{n}: become: ubuntu may not use sudo" in lines[0]
                                   for n in NODES), r.stderr  # fmt: skip
    assert snapshot(booted) == before
    set_sudo(booted, "nopasswd")
