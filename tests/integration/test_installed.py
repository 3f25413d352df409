"""The installed command: a wheel built from this checkout, installed into a fresh venv, run from
a directory outside the checkout (issue 25 item 1, issue 21 item 7).

The venv reaches ddpfleet's dependencies through a .pth naming this environment's site-packages
(added as a plain path: the editable install of the checkout that lives there is not loaded), so
nothing is downloaded; ddpfleet itself is the wheel's copy, which the tests check.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import ROOT, Cluster

# What the wheel is built from: everything else in the checkout must not be needed.
SOURCES = ("pyproject.toml", "README.md", "ddpfleet", "roles")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("installed")
    src = work / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src],
        check=True,
        timeout=300,
    )
    env = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True, timeout=120)
    site = Path(
        subprocess.check_output(
            [env / "bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            text=True,
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [*pip, "--python", env / "bin/python", "install", "--no-deps", "--no-index"]
        + sorted(wheels.glob("ddpfleet-*.whl")),
        check=True,
        timeout=300,
    )
    shutil.rmtree(src)  # the installed command must not need the sources it was built from
    return env


def ddpfleet(
    venv: Path, *args: str, cwd: Path, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DDPFLEET_INVENTORY", "PYTHONPATH")}
    return subprocess.run(
        [venv / "bin/ddpfleet", *args],
        cwd=cwd,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def test_the_wheel_carries_roles_and_node_programs(venv: Path, tmp_path: Path):
    probe = (
        "import ddpfleet, ddpfleet.node as n, ddpfleet.engine.settings as s;"
        "print(ddpfleet.__file__); print(n.NODE_DIR); print(s.ROLES_DIR);"
        "print(sorted(r.name for r in s.ROLES_DIR.iterdir() if (r / 'role.py').is_file()))"
    )
    out = subprocess.run(
        [venv / "bin/python", "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.splitlines()
    package = Path(out[0]).parent
    assert package.is_relative_to(venv), out  # the wheel's copy, not this checkout
    assert Path(out[1]) == package / "node" and Path(out[2]) == package / "roles"
    assert (package / "node" / "gang_runner.py").is_file()
    assert (package / "roles" / "jupyter" / "files" / "jupyter-supervise").is_file()
    assert (package / "roles" / "openssh_server" / "templates" / "hardening.conf.j2").is_file()
    assert eval(out[3]) == sorted(p.parent.name for p in (ROOT / "roles").glob("*/role.py"))


def test_list_and_init_in_an_empty_project(venv: Path, tmp_path: Path):
    r = ddpfleet(venv, "--list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("init", "bootstrap", "train", "gpu-status", "sandbox.up", "jupyter.tunnel"):
        assert f"  {name} " in r.stdout, r.stdout
    helped = ddpfleet(venv, "train", "--help", cwd=tmp_path)
    assert "--nproc-per-node" in helped.stdout and "--project-dir" in helped.stdout

    r = ddpfleet(venv, "init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load((tmp_path / "inventory.yaml").read_text())
    assert data["cluster"]["name"] == tmp_path.name and data["nodes"]
    assert (tmp_path / ".gitignore").read_text() == ".ddpfleet/\nlogs/\n/runs/\n"
    again = ddpfleet(venv, "init", cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr

    missing = ddpfleet(venv, "ping", cwd=tmp_path / "..")
    assert missing.returncode == 1 and "inventory not found" in missing.stderr


def test_ping_from_a_project_outside_the_checkout(venv: Path, cluster: Cluster, tmp_path: Path):
    """The sandbox's inventory, copied into a project of its own: the pinned host keys and the
    state are found relative to it."""
    project = tmp_path / "proj"
    project.mkdir()
    shutil.copy(cluster.inventory, project / "inventory.yaml")
    r = ddpfleet(venv, "ping", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    for node in ("node0", "node1"):
        assert cluster.address(node) in r.stdout
    elsewhere = ddpfleet(venv, "ping", "--inventory", str(project / "inventory.yaml"), cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stdout + elsewhere.stderr


TRAIN = """\
import os

import torch.distributed as dist

dist.init_process_group("gloo")
print(f"rank {dist.get_rank()} of {dist.get_world_size()} trained", flush=True)
dist.destroy_process_group()
"""


def test_a_new_project_bootstraps_and_trains(venv: Path, cluster: Cluster, tmp_path: Path):
    """Issue 25's walk-through: a directory holding only a training script, `ddpfleet init`,
    the inventory edited to the sandbox, `ddpfleet bootstrap` (the env role), `ddpfleet train`."""
    project = tmp_path / "myproj"
    project.mkdir()
    (project / "train.py").write_text(TRAIN)
    r = ddpfleet(venv, "init", cwd=project)
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load((project / "inventory.yaml").read_text())
    sandbox = cluster.data
    for key in ("ssh", "nodes", "python_env", "train_user"):
        data[key] = sandbox[key]
    (project / "inventory.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    shared = cluster.dir / ".ddpfleet" / "wheelhouse"  # the session's download, if made
    shared.mkdir(parents=True, exist_ok=True)
    (project / ".ddpfleet").mkdir()
    (project / ".ddpfleet" / "wheelhouse").symlink_to(shared)

    r = ddpfleet(venv, "bootstrap", "--roles", "venv_env", cwd=project, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = ddpfleet(venv, "train", "--script", "train.py", "--nproc-per-node", "1", cwd=project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 0 of 2 trained" in r.stdout and "rank 1 of 2 trained" in r.stdout
    # The project's own code dir on the nodes (the cluster is named after the project, the code
    # dir after the project dir: its name and a hash of its path).
    assert re.search(r"/ddpfleet/myproj/myproj-[0-9a-f]{8}/code", r.stdout), r.stdout
    assert any((project / "logs").iterdir())
