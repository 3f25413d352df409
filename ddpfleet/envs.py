"""Where a node's training env lives and what torch it holds: the env contract, in one place.

Both managers give the same thing: a directory whose bin/ holds python, torchrun and jupyter.
Callers run those by absolute path, never through `conda run` (it does not forward signals).

    env = envs.location(inventory, node)   # EnvLocation, resolved once per node
    env.path, env.python                   # /opt/ddpfleet/venv, /opt/ddpfleet/venv/bin/python
    env.export_argv()                      # conda's own `env export` (conda envs only)
    TORCH_FACTS_PY + "print(torch_facts())"  # the one torch / CUDA / NCCL probe, run by env.python

Where the path comes from: python_env.manager (venv_env's setting) picks venv_env's `path`, or
<miniconda.prefix>/envs/<python_env.name>; each read through the role's resolved settings
(defaults.yaml < inventory section < node vars), so the env roles and every job agree.

Files the env roles keep in the env, read by the roles and shown by the jobs:

    <env>/.ddpfleet-spec.sha256   SPEC_FILE: the spec installed and verified, written last
    <env>/.ddpfleet-torch.json    RECORD_FILE: what VERIFY_PY saw after the install (`describe`)

On a GPU node a verify that imports torch still fails when `cuda_problem` finds no working CUDA:
both files are then left as they were, so the next bootstrap retries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ddpfleet.engine.settings import load_role
from ddpfleet.inventory import Inventory, Node

SPEC_FILE = ".ddpfleet-spec.sha256"
RECORD_FILE = ".ddpfleet-torch.json"


@dataclass(frozen=True)
class EnvLocation:
    manager: str  # venv | conda
    path: str  # the env's prefix, e.g. /opt/ddpfleet/venv or /opt/miniconda3/envs/ddp
    conda: str = ""  # <miniconda prefix>/bin/conda for a conda env
    name: str = ""  # the conda env's name

    @property
    def python(self) -> str:
        return f"{self.path}/bin/python"

    def export_argv(self) -> list[str] | None:
        """conda's export of the env (`conda env create -f` takes it back); None for a venv,
        whose export is its python's pip freeze."""
        return [self.conda, "env", "export", "-n", self.name] if self.manager == "conda" else None


def location(inventory: Inventory, node: Node) -> EnvLocation:
    venv = load_role("venv_env").config(inventory, node)
    if venv["manager"] == "venv":
        return EnvLocation("venv", venv["path"])
    name = load_role("conda_env").config(inventory, node)["name"]
    prefix = load_role("miniconda").config(inventory, node)["prefix"]
    return EnvLocation("conda", f"{prefix}/envs/{name}", f"{prefix}/bin/conda", name)


def manager(inventory: Inventory, node: Node) -> str:
    return location(inventory, node).manager


def env_dir(inventory: Inventory, node: Node) -> str:
    """The env's prefix on the node, e.g. /opt/ddpfleet/venv or /opt/miniconda3/envs/ddp."""
    return location(inventory, node).path


def env_python(inventory: Inventory, node: Node) -> str:
    return location(inventory, node).python


# -- what the env holds ------------------------------------------------------------------------

# ddpfleet/node/node_helper.py's torch_versions() reads the same versions from torch/version.py and
# dist-info without importing torch: it runs before every train, where an import's seconds count.
# Python source defining torch_facts(runtime=False) -> dict, for the env's own python: python,
# torch, cuda (None: a CPU build), nccl (None: none built in) and, with runtime, whether CUDA
# works here and how many GPUs it sees. A failed `import torch` is the "error" key, never raised:
# callers decide whether that fails them. Callers append what they print.
TORCH_FACTS_PY = """
def torch_facts(runtime=False):
    import platform
    out = {"python": platform.python_version(), "torch": None, "cuda": None, "nccl": None}
    try:
        import torch
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
        return out
    out["torch"], out["cuda"] = str(torch.__version__), torch.version.cuda
    try:  # CPU builds have no NCCL at all
        v = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        pass
    if runtime:  # a broken driver may raise here rather than answer False
        try:
            out["available"], out["gpus"] = torch.cuda.is_available(), torch.cuda.device_count()
        except Exception:
            out["available"], out["gpus"] = False, 0
    return out
"""

# The GPUs the node's driver lists (`nvidia-smi -L` lines "GPU <i>: ..."), to hold torch's
# device count against; None where nvidia-smi is absent or fails, or lists MIG instances (a
# process without CUDA_VISIBLE_DEVICES sees one MIG instance, not one device per GPU).
NODE_GPUS_PY = """
def node_gpus():
    import shutil, subprocess
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode == 6:  # "No devices were found"
        return 0
    if out.returncode != 0:
        return None
    lines = out.stdout.splitlines()
    if any(line.strip().startswith("MIG ") for line in lines):
        return None
    return sum(1 for line in lines if line.startswith("GPU "))
"""

# After an install: exits non-zero with the import error on stderr, else prints the record.
VERIFY_PY = (
    TORCH_FACTS_PY
    + NODE_GPUS_PY
    + """
import json, sys
facts = torch_facts(runtime=True)
if "error" in facts:
    sys.exit(facts["error"])
record = {k: facts[k] for k in ("torch", "cuda", "available", "gpus", "python")}
record["node_gpus"] = node_gpus()
print(json.dumps(record))
"""
)


# A line for the env roles' probes: nvidia-smi's exit status where it exists, so that a driver
# that lists no device (exit 6) makes no GPU node. One `nvidia-smi -L` per probe, on nodes that
# have nvidia-smi only.
SMI_PROBE = 'if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L >/dev/null 2>&1; echo "smi_rc=$?"; fi'


# A line for the conda roles' probes ($p: the miniconda prefix): whether its conda has the
# conda-anaconda-tos plugin (conda >= 24.11; the pinned 24.9.2 has none), read from conda-meta,
# where conda records each package it holds, so no conda has to start.
TOS_PLUGIN_PROBE = (
    'for f in "$p"/conda-meta/conda-anaconda-tos-[0-9]*.json; do '
    '[ -e "$f" ] && echo tos_plugin=1; break; done'
)


def gpu_node(facts: Mapping[str, str], state: Mapping[str, str]) -> bool:
    """A node to give a CUDA build: it has nvidia-smi (facts), and nvidia-smi did not say "No
    devices were found" (exit 6, SMI_PROBE's smi_rc). Other failures (no driver loaded: 9)
    still count: the GPUs are there, the driver needs fixing, and verify says so."""
    return bool(facts.get("nvidia_smi")) and state.get("smi_rc") != "6"


def cuda_problem(record: Mapping[str, Any], gpu_node: bool) -> str:
    """Why a verified env cannot train on this GPU node ('' when it can, or on a CPU-only node):
    a CPU build, CUDA that does not work here, or torch seeing other GPUs than the driver lists.
    Reads a VERIFY_PY record or doctor's torch_facts(runtime=True)."""
    if not gpu_node:
        return ""
    if not record.get("cuda"):
        return f"torch {record.get('torch')} is a CPU build (torch.version.cuda is None)"
    if not record.get("available"):
        return (
            f"torch {record.get('torch')} (CUDA {record['cuda']}): "
            "torch.cuda.is_available() is False"
        )
    seen, listed = record.get("gpus") or 0, record.get("node_gpus")
    if not seen or (listed is not None and seen != listed):
        where = f", nvidia-smi -L lists {listed}" if listed is not None else ""
        return f"torch.cuda.device_count() is {seen}{where}"
    return ""


def describe(record: Mapping[str, Any]) -> str:
    """A RECORD_FILE's facts as one line: 'torch 2.5.1, CUDA 11.8, cuda available: yes, GPUs: 8'."""
    return (
        f"torch {record.get('torch')}, CUDA {record.get('cuda') or 'none'}, "
        f"cuda available: {'yes' if record.get('available') else 'no'}, "
        f"GPUs: {record.get('gpus', 0)}"
    )
