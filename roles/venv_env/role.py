"""venv_env: `python3 -m venv` + pip: torch and the packages, optionally from a pushed wheelhouse.

A converged node costs one probe: the node's python3 reports its platform, the env's python its
stored spec hash and, from package metadata (no `import torch`, which takes seconds), torch's
version and any missing package; where the node has nvidia-smi, its `-L` exit status (6, "No
devices were found": 'auto' picks the CPU index there). `import torch` runs after an install only
(on a GPU node it must also find working CUDA on every GPU); what it reported is kept in the env
and shown on later runs. Files the role keeps in the env:

    <path>/.ddpfleet-spec.sha256   the spec installed and verified (written last: a failed or
                                   cut-short install leaves the old hash, so the next run retries)
    <path>/.ddpfleet-torch.json    what verify saw: torch, CUDA, cuda available, GPU count
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ddpfleet.engine import wheelhouse
from ddpfleet.engine.roles import Host, Step, failed, ok, skipped
from ddpfleet.engine.wheelhouse import Spec
from ddpfleet.envs import (
    RECORD_FILE,
    SMI_PROBE,
    SPEC_FILE,
    VERIFY_PY,
    cuda_problem,
    describe,
    gpu_node,
)
from ddpfleet.errors import CommandError
from ddpfleet.hygiene import mask_url, mask_urls
from ddpfleet.shell import APT_GET

from . import wheels

ORDER = 50
SECTION = "python_env"
CHOICES = {"manager": ("conda", "venv")}  # checked when the inventory loads
CU118_LAST = (2, 7)  # facts.md B: the cu118 wheel index ends at 2.7.x
PIP = ["-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
APT_VENV = ["env", "DEBIAN_FRONTEND=noninteractive", *APT_GET, "install", "-yq", "python3-venv"]
# pip takes its index from PIP_INDEX_URL, read from stdin: the URL may carry credentials
# (https://user:token@host/...), and an argv is visible in ps to every user of the node.
INDEX_FROM_STDIN = [
    "sh",
    "-c",
    'IFS= read -r PIP_INDEX_URL && export PIP_INDEX_URL && exec "$@"',
    "sh",
]

# Run by the env's python after wheelhouse.TARGET_PY, with: spec file, record file, requirement
# names. It reads dist-info directory names instead of importing importlib.metadata (~50 ms).
ENV_PY = """
import os, re, sys
spec_file, record_file, *names = sys.argv[1:]
def read(path):
    try:
        with open(path) as f:
            return " ".join(f.read().split())
    except OSError:
        return ""
def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()
dists = {}
for d in sys.path:
    if d.endswith("site-packages") and os.path.isdir(d):
        for entry in os.listdir(d):
            if entry.endswith(".dist-info"):
                name, _, version = entry[:-10].partition("-")
                dists.setdefault(key(name), version)
if "pip" in dists:  # a venv cut off before ensurepip finished is no working venv
    print("env_python=%d.%d.%d" % sys.version_info[:3])
print("env_spec=" + read(spec_file))
print("env_torch=" + dists.get("torch", ""))
print("env_missing=" + ",".join(n for n in names if key(n) not in dists))
print("env_record=" + read(record_file))
"""


def applies(cfg: Mapping[str, Any], host) -> bool:
    return cfg["manager"] == "venv"


def index_url(cfg: Mapping[str, Any], facts: Mapping[str, str]) -> str:
    """'auto': the cu118 index on GPU nodes (nvidia-smi found), the CPU index elsewhere."""
    if cfg["index_url"] != "auto":
        return cfg["index_url"] or ""
    return cfg["cuda_index_url"] if facts.get("nvidia_smi") else cfg["cpu_index_url"]


def spec_for(cfg: Mapping[str, Any], facts: Mapping[str, str]) -> Spec:
    return Spec(cfg["torch"], index_url(cfg, facts), tuple(cfg["packages"] or ()))


def pin_problem(spec: Spec) -> str:
    """A torch pin the cu118 index cannot serve, said before anything is downloaded."""
    pinned = re.search(r"==\s*(\d+)\.(\d+)", spec.torch)
    cu118 = spec.index_url.rstrip("/").endswith("/cu118")
    if cu118 and pinned and (int(pinned[1]), int(pinned[2])) > CU118_LAST:
        return (
            f"{spec.torch} has no CUDA 11.8 wheels (the cu118 index ends at 2.7.x): "
            "pin python_env.torch to torch==2.5.1 or set python_env.index_url"
        )
    return ""


def requirement_name(requirement: str) -> str:
    """'torch==2.5.1' -> 'torch'; 'jupyterlab[full]>=4' -> 'jupyterlab'."""
    return re.split(r"[\s<>=!~;\[@(]", requirement.strip(), maxsplit=1)[0]


def probe_script(path: str, names: list[str]) -> str:
    """One round trip, one python start: the env's python reports the env and its platform (the
    wheelhouse's target); the node's python3 reports the platform only where the env is absent or
    broken."""
    py = f"{path}/bin/python"
    spec, record = f"{path}/{SPEC_FILE}", f"{path}/{RECORD_FILE}"
    env = shlex.join([py, "-I", "-c", wheelhouse.TARGET_PY + ENV_PY, spec, record, *names])
    base = shlex.join(["python3", "-c", wheelhouse.TARGET_PY])
    cfg_file = shlex.quote(f"{path}/pyvenv.cfg")
    return (
        f"[ -f {cfg_file} ] && echo env_cfg=1\n"
        f"{{ [ -x {shlex.quote(py)} ] && {env}; }} 2>/dev/null || {base} 2>/dev/null\n"
        f"{SMI_PROBE}\ntrue"
    )


def drift(state: Mapping[str, str], digest: str, path: str) -> str:
    """Why the env is not converged ('' when it is)."""
    if not state.get("env_python"):
        return f"no working venv at {path}"
    if state.get("env_spec") != digest:
        return "spec changed" if state.get("env_spec") else "no spec recorded"
    if not state.get("env_torch"):
        return "torch not installed"
    if state.get("env_missing"):
        return f"missing: {state['env_missing']}"
    if _record(state).get("torch") != state["env_torch"]:
        return f"torch {state['env_torch']} installed outside ddpfleet"
    return ""


def install_commands(
    python: str, spec: Spec, wheel_dir: str | None
) -> list[tuple[list[str], str | None]]:
    """pip (argv, stdin) pairs for the node. A wheelhouse install ignores the node's pip config,
    so the wheelhouse is the only source; otherwise torch comes from its index (its URL on
    stdin, never on the argv), the rest from pip's."""
    if wheel_dir is not None:
        offline = ["env", "PIP_CONFIG_FILE=/dev/null", python, *PIP, "--no-index", "--find-links"]
        return [([*offline, wheel_dir, *spec.requirements], None)]
    if not spec.index_url:
        return [([python, *PIP, *spec.requirements], None)]
    commands = [([*INDEX_FROM_STDIN, python, *PIP, spec.torch], spec.index_url + "\n")]
    if spec.packages:
        commands.append(([python, *PIP, *spec.requirements], None))
    return commands


def _record(state: Mapping[str, str]) -> dict:
    try:
        return json.loads(state.get("env_record") or "{}")
    except ValueError:
        return {}


# -- apply -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """One apply's view of the env: what the role decided from the probe, passed to each step."""

    host: Host
    cfg: Mapping[str, Any]
    spec: Spec
    state: Mapping[str, str]

    @property
    def why(self) -> str:
        """Why the env is not converged ('' when it is)."""
        return drift(self.state, self.spec.digest(), self.path)

    @property
    def path(self) -> str:
        return self.cfg["path"]

    @property
    def python(self) -> str:
        return f"{self.path}/bin/python"

    def progress(self, text: str) -> None:
        self.host.on_progress(text)


def apply(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    spec = spec_for(cfg, host.facts)
    problem = pin_problem(spec)
    if problem:
        yield failed("torch", problem)
        return
    names = [requirement_name(r) for r in spec.requirements]
    state = host.probe(probe_script(cfg["path"], names))
    if not gpu_node(host.facts, state) and host.facts.get("nvidia_smi"):
        # nvidia-smi found no device (exit 6): 'auto' means the CPU index, as on a node without it
        spec = spec_for(cfg, {**host.facts, "nvidia_smi": ""})
    env = Env(host, cfg, spec, state)
    if not env.why:
        yield ok("venv", f"{env.path} (python {state['env_python']})")
        yield ok("packages", f"spec {spec.digest()[:12]} installed: {', '.join(spec.requirements)}")
        yield ok("verify", describe(_record(state)) + ", as verified at install")
        return
    for step_fn in (_venv_support, _venv, wheels.step, _packages, _verify):
        step = step_fn(env)
        if step is not None:
            yield step
            if step.status == "failed":
                return


def _venv_support(env: Env) -> Step | None:
    """Debian/Ubuntu split venv's ensurepip into python3-venv; without it `venv` fails."""
    if env.state.get("env_python") or env.state.get("base_ensurepip") == "1":
        return None
    if not env.state.get("base_python"):
        return failed("python3-venv", "no python3 on the node: install python3 (>= 3.9)")
    facts = env.host.facts
    if "debian" not in (facts.get("os_id", ""), *facts.get("os_like", "").split()):
        return failed(
            "python3-venv",
            "python3 has no ensurepip, so `python3 -m venv` cannot "
            "work: install your distribution's python3 venv package",
        )

    def install() -> None:
        if not env.host.change(APT_VENV, check=False).ok:  # stale or absent package lists
            env.host.change([*APT_GET, "update", "-q"])
            env.host.change(APT_VENV)

    return env.host.changed("python3-venv", "install python3-venv (ensurepip for venv)", install)


def _venv(env: Env) -> Step:
    if env.state.get("env_python"):
        return ok("venv", f"{env.path} (python {env.state['env_python']})")
    # --clear only where a venv already is (its python no longer runs): never empty a directory
    # that is not a venv.
    clear = ["--clear"] if env.state.get("env_cfg") else []
    what = "recreate broken venv" if clear else "create"
    base = env.state.get("base_python", "?")
    return env.host.changed(
        "venv",
        f"{what} {env.path} (python3 {base})",
        lambda: env.host.change(["python3", "-m", "venv", *clear, env.path]),
    )


def _packages(env: Env) -> Step:
    wheel_dir = env.cfg["wheelhouse_dir"] if env.cfg["wheelhouse"] else None
    source = (
        "the wheelhouse"
        if wheel_dir
        else (mask_url(env.spec.index_url) or "pip's configured index")
    )
    what = f"{', '.join(env.spec.requirements)} from {source} ({env.why})"

    def install() -> Step | None:
        try:
            outputs = [
                env.host.change(argv, stdin=stdin)
                for argv, stdin in install_commands(env.python, env.spec, wheel_dir)
            ]
        except CommandError as e:  # pip's own output masks index passwords; an old pip may not
            return failed("packages", mask_urls(e.message))
        if not any("Successfully installed" in r.stdout for r in outputs):
            return ok("packages", f"already satisfied: {', '.join(env.spec.requirements)}")
        return None

    return env.host.changed("packages", f"install {what}", install)


def _verify(env: Env) -> Step:
    if env.host.check:
        return skipped("verify", "--check: nothing installed to import yet")
    result = env.host.run([env.python, "-c", VERIFY_PY], check=False, timeout=600)
    if not result.ok:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        return failed("verify", f"`import torch` failed in {env.path}: {tail}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    problem = cuda_problem(record, gpu_node=gpu_node(env.host.facts, env.state))
    if problem:  # no spec hash written: the next bootstrap retries
        return failed(
            "verify",
            f"no working CUDA in {env.path} on a GPU node: {problem}; check the driver "
            "(invoke gpu-status), and that python_env.index_url serves a CUDA build of "
            "torch (auto: the cu118 index), then bootstrap again",
        )
    env.host.put(f"{env.path}/{RECORD_FILE}", json.dumps(record, sort_keys=True) + "\n")
    env.host.put(f"{env.path}/{SPEC_FILE}", env.spec.digest() + "\n")
    return ok("verify", describe(record))
