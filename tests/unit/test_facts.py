"""The node facts script (`invoke ping`, every role's facts), run here with the system's sh:
what it reports must be what the machine says through the usual commands."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess

from ddpfleet.facts import FACTS_SCRIPT, parse_facts


def facts(path: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PATH=path or os.environ["PATH"])
    done = subprocess.run(["/bin/sh", "-c", FACTS_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return parse_facts(done.stdout)


def test_the_facts_are_the_machines() -> None:
    found = facts()
    assert found["hostname"] == socket.gethostname()
    assert found["arch"] == platform.machine()
    python3 = subprocess.run(["python3", "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert found["python3"] == python3
    free = shutil.disk_usage("/").free // 1024
    assert abs(int(found["disk_free_kb"]) - free) < 256 * 1024  # other writers meanwhile
    with open("/proc/1/comm") as f:
        assert found["pid1"] == f.read().strip()
    with open("/etc/os-release") as f:
        ids = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    assert found["os_id"] == ids["ID"].strip('"')


def test_a_node_without_python3_or_nvidia_smi_says_so_with_empty_values(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("uname", "df", "hostname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    found = facts(path=str(bin_dir))
    assert found["python3"] == ""
    assert found["nvidia_smi"] == ""
    assert found["disk_free_kb"].isdigit()
    assert found["arch"] == platform.machine()
