"""The conda stand-in (tests/standins/conda/) run here, in a temp dir: it must be as strict as
real conda where ddpfleet's roles depend on it, or the sandbox tests prove nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ddpfleet import envexport
from ddpfleet.envs import VERIFY_PY

STANDINS = Path(__file__).resolve().parents[1] / "standins"
SPEC = """name: ddp
channels:
  - pytorch
  - nvidia
  - defaults
dependencies:
  - python=3.10
  - pytorch==2.5.1
{variant}
"""


@pytest.fixture
def conda(tmp_path, request):
    """Install the stand-in Miniconda into tmp_path; returns a runner for its conda. The
    installer's name (indirect parameter) sets the conda version, as Anaconda's names do."""
    installer = tmp_path / getattr(request, "param", "Miniconda3-standin-Linux-x86_64.sh")
    conda_dir = STANDINS / "conda"
    installer.write_bytes(
        (conda_dir / "installer.sh").read_bytes() + (conda_dir / "conda").read_bytes()
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "DDPFLEET_STANDIN_LOG": str(tmp_path / "standin.log")}  # fmt: skip
    prefix = tmp_path / "mc"
    done = subprocess.run(["sh", str(installer), "-b", "-p", str(prefix)], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr

    def run(*argv: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(prefix / "bin" / "conda"), *argv], env={**env, **extra},
                              capture_output=True, text=True, check=False)  # fmt: skip

    run.prefix = prefix  # type: ignore[attr-defined]
    run.env = env  # type: ignore[attr-defined]
    return run


def gpu_path(tmp_path: Path) -> str:
    """A PATH whose nvidia-smi is the GPU stand-in."""
    bin_dir = tmp_path / "gpubin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "nvidia-smi").exists():
        (bin_dir / "nvidia-smi").symlink_to(STANDINS / "nvidia-smi")
    return f"{bin_dir}:/usr/bin:/bin"


def verify(conda, env_path: Path, **extra: str) -> dict:
    done = subprocess.run([str(env_path / "bin" / "python"), "-c", VERIFY_PY],
                          env={**conda.env, **extra}, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def create(conda, tmp_path: Path, variant: str) -> Path:
    spec = tmp_path / "environment.yml"
    spec.write_text(SPEC.format(variant=variant))
    env_path = tmp_path / "mc" / "envs" / "ddp"
    done = conda("tos", "accept", "--override-channels", "--channel",
                 "https://repo.anaconda.com/pkgs/main", "--system")  # fmt: skip
    conda("tos", "accept", "--override-channels", "--channel",
          "https://repo.anaconda.com/pkgs/r", "--system")  # fmt: skip
    done = conda("env", "create", "-p", str(env_path), "-f", str(spec))
    assert done.returncode == 0, done.stderr
    return env_path


@pytest.mark.skipif(
    not Path("/usr/bin/python3").exists(), reason="the stand-in runs /usr/bin/python3"
)
@pytest.mark.parametrize(
    "variant, gpu, cuda, gpus",
    [
        ("  - pytorch-cuda=11.8", True, "11.8", 8),
        ("  - pytorch::pytorch-cuda=11.8", True, "11.8", 8),
        ("  - pytorch-cuda=11.8", False, "11.8", 0),  # a CUDA build, no driver here
        ("  - cpuonly", True, None, 0),  # a CPU build on a GPU node
    ],
)
def test_standin_torch_sees_gpus_only_with_pytorch_cuda_and_a_driver(
    conda, tmp_path, variant, gpu, cuda, gpus
):
    env_path = create(conda, tmp_path, variant)
    extra = {"PATH": gpu_path(tmp_path), "DDPFLEET_STANDIN_GPU": "a100x8"} if gpu else {}
    record = verify(conda, env_path, **extra)
    assert (record["cuda"], record["available"], record["gpus"]) == (cuda, gpus > 0, gpus)
    assert record["node_gpus"] == (8 if gpu else None)


NEWER = "Miniconda3-py310_25.5.1-1-Linux-x86_64.sh"
MAIN = "https://repo.anaconda.com/pkgs/main"


def test_pinned_2492_has_no_tos_command(conda):
    assert conda("--version").stdout.strip() == "conda 24.9.2"
    done = conda("tos", "accept", "--override-channels", "--channel", MAIN, "--system")
    assert done.returncode == 2 and "invalid choice: 'tos'" in done.stderr


@pytest.mark.parametrize("conda", [NEWER], indirect=True)
def test_a_tos_plugin_conda_checks_the_condarc_before_the_env_file(conda, tmp_path):
    assert conda("--version").stdout.strip() == "conda 25.5.1"
    spec = tmp_path / "environment.yml"
    spec.write_text("name: ddp\nchannels:\n  - pytorch\n  - nodefaults\ndependencies:\n"
                    "  - pytorch::cpuonly\n")  # fmt: skip
    env_path = str(tmp_path / "mc" / "envs" / "ddp")
    refused = conda("env", "create", "-p", env_path, "-f", str(spec))
    assert refused.returncode == 1 and "CondaToSNonInteractiveError" in refused.stderr
    for channel in (MAIN, "https://repo.anaconda.com/pkgs/r"):
        accept = conda("tos", "accept", "--override-channels", "--channel", channel, "--system")
        assert accept.returncode == 0, accept.stderr
    assert conda("env", "create", "-p", env_path, "-f", str(spec)).returncode == 0


@pytest.mark.parametrize("conda", ["Miniforge3-standin-Linux-x86_64.sh"], indirect=True)
def test_miniforge_has_no_tos_plugin(conda):
    assert conda("tos", "accept", "--channel", MAIN).returncode == 2


def test_env_export_lists_installed_packages_as_name_version_build(conda, tmp_path):
    env_path = create(conda, tmp_path, "  - pytorch::pytorch-cuda=11.8\n  - mkl<2024.1")
    done = conda("env", "export", "-p", str(env_path))
    assert done.returncode == 0, done.stderr
    packages = envexport.parse_conda_export(done.stdout)
    assert packages["pytorch"] == "2.5.1=py3.10_cuda11.8_cudnn9.1.0_0"
    assert packages["python"].startswith("3.10.16=") and packages["pytorch-cuda"].startswith(
        "11.8="
    )
    assert not [line for line in done.stdout.splitlines() if "::" in line or "<" in line]


def test_env_create_follows_conda_2492_on_existing_paths(conda, tmp_path):
    """A directory that is no env (no conda-meta/) is installed into; an env is refused."""
    spec = tmp_path / "environment.yml"
    spec.write_text(SPEC.format(variant="  - pytorch::cpuonly").replace("  - defaults\n", ""))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert conda("env", "create", "-p", str(plain), "-f", str(spec)).returncode == 0
    assert (plain / "conda-meta").is_dir()
    again = conda("env", "create", "-p", str(plain), "-f", str(spec))
    assert again.returncode == 1 and "prefix already exists" in again.stderr
