"""Node text and inventory secrets on the real sandbox nodes (review #12, #16).

A node's /etc/os-release is node-controlled text shown in ping's table; an index_url's password
must reach neither the logs, the console nor the node's process list while pip runs.
"""

from __future__ import annotations

import stat
import subprocess
import time
from pathlib import Path

import yaml

from tests.integration.conftest import INVOKE, Cluster

PRETTY = "Debian [/] [link=https://x]12[/link]"
SECRET_URL = "http://u:SECRET@127.0.0.1:9/simple"  # nothing listens on the node's port 9
ENV = "/opt/ddpfleet/venv-inputs-safety"


def test_ping_prints_markup_from_os_release_literally_and_no_escapes(cluster: Cluster):
    # The node's root is its own overlay: this changes node0 only, and is put back after.
    pretty = PRETTY + "\x1b]0;pwned\x07"
    script = (
        "mv /etc/os-release /etc/os-release.ddpfleet-test && "
        "{ grep -v '^PRETTY_NAME=' /etc/os-release.ddpfleet-test; "
        f"printf 'PRETTY_NAME=\"%s\"\\n' '{pretty}'; }} > /etc/os-release"
    )
    made = cluster.ssh("node0", script)
    assert made.returncode == 0, made.stderr
    try:
        result = cluster.invoke("ping", timeout=120)
    finally:
        cluster.ssh("node0", "mv -f /etc/os-release.ddpfleet-test /etc/os-release")
    assert result.returncode == 0, result.stdout + result.stderr
    assert PRETTY in result.stdout, result.stdout
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "Traceback" not in result.stderr


def secret_inventory(cluster: Cluster) -> Path:
    """The session inventory in its own directory (its own logs/), pip pointed at SECRET_URL for
    a torch no source has (pip.conf find-links on the nodes would serve a real one)."""
    data = cluster.data
    data["python_env"] = {
        **(data.get("python_env") or {}),
        "manager": "venv",
        "path": ENV,
        "torch": "torch==0.0.1",
        "index_url": SECRET_URL,
        "packages": [],
        "wheelhouse": False,
    }
    directory = cluster.dir / "inputs-safety"
    directory.mkdir(exist_ok=True)
    path = directory / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_index_url_password_reaches_no_log_console_or_node_argv(cluster: Cluster):
    inventory = secret_inventory(cluster)
    cluster.ssh("node0", f"rm -rf {ENV}")
    boot = subprocess.Popen(
        [*INVOKE, "bootstrap", "--roles", "venv_env", "--nodes", "node0"],
        cwd=cluster.dir,
        env=cluster.env(DDPFLEET_INVENTORY=str(inventory)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen_pip, leaked = [], []
    try:
        while boot.poll() is None:  # every process on the node while bootstrap runs
            ps = cluster.ssh("node0", "ps -eo args", timeout=30).stdout.splitlines()
            seen_pip += [line for line in ps if "-m pip install" in line]
            leaked += [line for line in ps if "SECRET" in line]
            time.sleep(0.1)
        out, err = boot.communicate(timeout=600)
    finally:
        if boot.poll() is None:
            boot.kill()
        cluster.ssh("node0", f"rm -rf {ENV}")
    assert boot.returncode != 0, out + err  # nothing serves that torch
    assert seen_pip, "pip never showed up in ps on node0: the check saw nothing"
    assert not leaked, leaked
    assert "venv_env: packages: failed" in out, out + err
    assert "SECRET" not in out + err
    logs = inventory.parent / "logs"
    files = list(logs.rglob("*"))
    assert files and not [f for f in files if f.is_file() and "SECRET" in f.read_text()]
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in files if f.is_file()} == {0o600}
