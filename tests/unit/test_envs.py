"""envs: where a node's env lives (one answer for every job) and the one torch probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ddpfleet import envs
from ddpfleet import inventory as inv
from ddpfleet.envs import EnvLocation

ROOT = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, text: str) -> inv.Inventory:
    (tmp_path / "inventory.yaml").write_text(text)
    return inv.load(tmp_path / "inventory.yaml", check_files=False)


NODES = """
nodes:
  node0: {host: 10.0.0.10}
  node1: {host: 10.0.0.11, vars: {miniconda_prefix: /srv/conda, conda_env_name: exp}}
"""


def test_venv_location(tmp_path) -> None:
    loaded = load(tmp_path, "python_env: {manager: venv, path: /opt/v}\n" + NODES)
    env = envs.location(loaded, loaded.nodes[0])
    assert env == EnvLocation("venv", "/opt/v")
    assert env.python == "/opt/v/bin/python" and env.export_argv() is None
    assert envs.env_python(loaded, loaded.nodes[1]) == "/opt/v/bin/python"


def test_conda_location_follows_node_vars(tmp_path) -> None:
    loaded = load(tmp_path, "python_env: {manager: conda}\n" + NODES)
    first, second = (envs.location(loaded, n) for n in loaded.nodes)
    assert first == EnvLocation("conda", "/opt/miniconda3/envs/ddp", "/opt/miniconda3/bin/conda",
                                "ddp")  # fmt: skip
    assert second.python == "/srv/conda/envs/exp/bin/python"
    assert second.export_argv() == ["/srv/conda/bin/conda", "env", "export", "-n", "exp"]
    assert envs.manager(loaded, loaded.nodes[1]) == "conda"
    assert envs.env_dir(loaded, loaded.nodes[1]) == "/srv/conda/envs/exp"


# --- the probe, run here against a stand-in torch ---------------------------------------------

FAKE_TORCH = """\
__version__ = "2.5.1"
version = type("version", (), {"cuda": "11.8"})
class cuda:
    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 8)
    class nccl:
        version = staticmethod(lambda: (2, 21, 5))
"""


def run(source: str, tmp_path: Path, fake: bool) -> subprocess.CompletedProcess:
    """The stand-in torch on the path, or (-S: no site-packages) no torch at all."""
    if fake:
        (tmp_path / "torch").mkdir(exist_ok=True)
        (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    return subprocess.run(
        [sys.executable, *([] if fake else ["-S"]), "-c", source], capture_output=True,
        text=True, timeout=60, env={"PYTHONPATH": str(tmp_path)}, check=False,
    )  # fmt: skip


def test_torch_facts_without_torch(tmp_path) -> None:
    done = run(envs.TORCH_FACTS_PY + "import json; print(json.dumps(torch_facts()))", tmp_path,
               fake=False)  # fmt: skip
    got = json.loads(done.stdout)
    assert got["error"] == "ModuleNotFoundError: No module named 'torch'"
    assert got["torch"] is None and got["python"] == ".".join(map(str, sys.version_info[:3]))


def test_torch_facts_with_torch(tmp_path) -> None:
    done = run(envs.TORCH_FACTS_PY + "import json; print(json.dumps(torch_facts()))", tmp_path,
               fake=True)  # fmt: skip
    got = json.loads(done.stdout)
    assert (got["torch"], got["cuda"], got["nccl"]) == ("2.5.1", "11.8", "2.21.5")
    assert "available" not in got and "error" not in got  # no CUDA init unless asked


def test_verify_prints_the_record(tmp_path) -> None:
    done = run(envs.VERIFY_PY, tmp_path, fake=True)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert sorted(record) == ["available", "cuda", "gpus", "node_gpus", "python", "torch"]
    assert envs.describe(record) == "torch 2.5.1, CUDA 11.8, cuda available: yes, GPUs: 8"


def test_verify_fails_with_the_import_error(tmp_path) -> None:
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('libcudnn.so.8: no file')")
    done = subprocess.run([sys.executable, "-c", envs.VERIFY_PY], capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path)}, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.strip() == "ImportError: libcudnn.so.8: no file"


def test_describe_a_cpu_record() -> None:
    assert envs.describe({"torch": "2.13.0+cpu"}) == (
        "torch 2.13.0+cpu, CUDA none, cuda available: no, GPUs: 0"
    )


def test_read_only_jobs_never_load_the_roles_engine() -> None:
    code = (
        "import sys\n"
        "import ddpfleet.doctor, ddpfleet.envexport, ddpfleet.envs, ddpfleet.jupyter\n"
        "print('ddpfleet.engine.roles' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "False"
