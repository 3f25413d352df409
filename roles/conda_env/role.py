"""conda_env: the training env from a rendered environment.yml, with the node's conda.

Created when absent (`conda env create`), rebuilt only when the rendered spec's hash differs from
the one stored in the env: the old env is renamed <env>.ddpfleet-old, a new one created at the
env's path, and the old one removed once the new one verifies, or put back if it does not (never
`conda env update --prune`, see _env; never `conda create --yes`, which deletes an existing env
before the new one exists, facts.md A6). Verified by the env's own python importing torch and, on a node
that is not CPU-only, finding working CUDA on as many GPUs as `nvidia-smi -L` lists. Env binaries are
called by absolute path, never through `conda run` (it does not forward signals, facts.md A5).

Files the role keeps on the node:

    <prefix>/ddpfleet/<name>.environment.yml   the spec conda was given
    <env>/.ddpfleet-spec.sha256                its hash, written last (after verify): a failed or
                                               cut-short run leaves the old one, so the next retries
    <env>/.ddpfleet-torch.json                 what verify saw: torch, CUDA, cuda available, GPUs

A converged node costs one probe: a few file reads and, where the node has nvidia-smi, one
`nvidia-smi -L` (exit 6, "No devices were found", makes cpu_only: auto pick cpuonly); no conda
and no python.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddpfleet.engine.roles import Host, Step, changed, failed, load_role, ok, skipped
from ddpfleet.envs import (
    RECORD_FILE,
    SMI_PROBE,
    SPEC_FILE,
    TOS_PLUGIN_PROBE,
    VERIFY_PY,
    cuda_problem,
    describe,
    gpu_node,
)

ORDER = 40
SECTION = "python_env"
CHOICES = {"manager": ("conda", "venv")}  # checked when the inventory loads
ASIDE = ".ddpfleet-old"  # <env><ASIDE>: the old env while its replacement is built and verified
# $1 env, $2 where the old one waits: the new env goes, the old one comes back as it was.
RESTORE = 'rm -rf "$1" && mv -T "$2" "$1"'
TOS_ERROR = "CondaToSNonInteractiveError"
TOS_HINT = (
    "to go on, set `miniconda: {accept_tos: true}` if you accept Anaconda's Terms of Service "
    "for repo.anaconda.com, or use `miniconda: {flavor: miniforge}` (conda-forge, no consent)"
)

# $1 miniconda prefix, $2 env prefix.
PROBE = rf"""
p=$1 e=$2
[ -x "$p/bin/conda" ] && echo conda=1
[ -e "$e" ] && echo env_dir=1
[ -d "$e/conda-meta" ] && echo env=1
echo "spec=$(cat "$e/{SPEC_FILE}" 2>/dev/null)"
echo "record=$(tr -d '\n' <"$e/{RECORD_FILE}" 2>/dev/null)"
[ -e "$e{ASIDE}" ] && echo aside=1
{SMI_PROBE}
{TOS_PLUGIN_PROBE}
true
"""


def applies(cfg: Mapping[str, Any], host) -> bool:
    return cfg["manager"] == "conda"


def miniconda_cfg(host) -> Mapping[str, Any]:
    """The miniconda role's settings for this node: prefix, flavor, accept_tos."""
    return load_role("miniconda").config(host.inventory, host.node)


def cpu_only(
    cfg: Mapping[str, Any], facts: Mapping[str, str], state: Mapping[str, str] | None = None
) -> bool:
    """'auto': the cpuonly variant on nodes without nvidia-smi, or whose nvidia-smi finds no
    device (exit 6, in the probe's state)."""
    setting = cfg["cpu_only"]
    if str(setting).lower() == "auto":
        return not gpu_node(facts, state or {})
    return setting is True or str(setting).lower() in ("true", "yes", "1")


def channels(cfg: Mapping[str, Any], flavor: str, cpu: bool) -> list[str]:
    if cfg["channels"] != "auto":
        return [str(c) for c in cfg["channels"]]
    base = "defaults" if flavor == "miniconda" else "conda-forge"
    return ["pytorch", *([] if cpu else ["nvidia"]), base]


def needs_tos(miniconda: Mapping[str, Any], chans: list[str], plugin: bool) -> bool:
    """ddpfleet's consent policy: conda runs with Anaconda's `defaults` channels only when the
    inventory accepts their Terms of Service. `nodefaults` in the env file keeps them out of the
    env, but not out of the ToS plugin's check, which reads the condarc's channels (`defaults`)
    before the env file (conda cli/conda_argparse.py do_call; facts.md A7): so it avoids the
    consent only for a conda without the plugin (< 24.11, e.g. the pinned 24.9.2)."""
    if miniconda["flavor"] != "miniconda" or miniconda["accept_tos"]:
        return False
    return plugin or "nodefaults" not in chans


def render(host, cfg: Mapping[str, Any], chans: list[str], cpu: bool) -> str:
    return host.template(
        "environment.yml.j2",
        env_name=cfg["name"],
        channels=chans,
        python=cfg["python"],
        pytorch=cfg["pytorch"],
        torchvision=cfg["torchvision"],
        torchaudio=cfg["torchaudio"],
        cuda="" if cpu else cfg["cuda"],
        mkl=cfg["mkl"] or "",
        conda_packages=list(cfg["conda_packages"] or ()),
        pip_packages=list(cfg["pip_packages"] or ()),
    )


def env_path(prefix: str, cfg: Mapping[str, Any]) -> str:
    return f"{prefix}/envs/{cfg['name']}"


@dataclass(frozen=True)
class Env:
    """One apply's view of the env: its settings, the rendered spec and what the probe said."""

    host: Host
    cfg: Mapping[str, Any]
    miniconda: Mapping[str, Any]  # the miniconda role's settings for this node
    cpu: bool
    channels: list[str]
    text: str  # the rendered environment.yml
    state: Mapping[str, str]
    aside: list[str] = field(default_factory=list)  # the old env, while a rebuild runs

    @classmethod
    def read(cls, host: Host, cfg: Mapping[str, Any]) -> Env:
        miniconda = miniconda_cfg(host)
        prefix = miniconda["prefix"]
        state = host.probe(shlex.join(["sh", "-c", PROBE, "sh", prefix, env_path(prefix, cfg)]))
        cpu = cpu_only(cfg, host.facts, state)
        chans = channels(cfg, miniconda["flavor"], cpu)
        return cls(host, cfg, miniconda, cpu, chans, render(host, cfg, chans, cpu), state)

    @property
    def prefix(self) -> str:
        return self.miniconda["prefix"]

    @property
    def path(self) -> str:
        return env_path(self.prefix, self.cfg)

    @property
    def conda(self) -> str:
        return f"{self.prefix}/bin/conda"

    @property
    def yml(self) -> str:
        return f"{self.prefix}/ddpfleet/{self.cfg['name']}.environment.yml"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def variant(self) -> str:
        gpu = "cpuonly" if self.cpu else f"pytorch-cuda={self.cfg['cuda']}"
        return f"python {self.cfg['python']}, pytorch {self.cfg['pytorch']}, {gpu}"

    @property
    def record(self) -> dict:
        try:
            return json.loads(self.state.get("record") or "{}")
        except ValueError:
            return {}

    @property
    def current(self) -> bool:
        return bool(self.state.get("env")) and self.state.get("spec") == self.digest


def apply(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    env = Env.read(host, cfg)
    if env.state.get("aside") and not host.check:  # a rebuild was cut short: settle it first
        yield _leftover(env)
        env = Env.read(host, cfg)
    if env.current and env.record:
        yield ok("environment.yml", f"spec {env.digest[:12]} ({env.variant})")
        yield ok("env", f"{env.path} matches its spec")
        yield ok("verify", describe(env.record) + " (verified at install)")
        return
    for step_fn in (_preflight, _spec_file, _env, _verify):
        step = step_fn(env)
        if step is not None:
            yield step
            if step.status == "failed":
                return


def _preflight(env: Env) -> Step | None:
    """Refusals before any conda command runs."""
    if env.state.get("env_dir") and not env.state.get("env"):
        return failed(
            "env",
            f"{env.path} exists but is not a conda env (no conda-meta/): move "
            "it away or set python_env.name",
        )
    plugin = bool(env.state.get("tos_plugin"))
    if not env.current and needs_tos(env.miniconda, env.channels, plugin):
        hint = TOS_HINT
        if plugin and "nodefaults" in env.channels:
            why = (
                f"this conda has the ToS plugin, which checks {env.prefix}/.condarc's channels "
                "(defaults) before it reads the env file, so nodefaults does not avoid it and "
                f"conda would stop with {TOS_ERROR}"
            )
            hint = f"{TOS_HINT}, or take defaults out of {env.prefix}/.condarc"
        elif plugin:
            why = f"this conda has the ToS plugin and would stop with {TOS_ERROR}"
        else:
            why = "this conda has no ToS plugin (< 24.11) and would not stop by itself"
        return failed(
            "terms of service",
            "not running conda, by ddpfleet's consent policy: the env's channels include "
            "Anaconda's defaults (repo.anaconda.com), subject to Anaconda's Terms of Service, "
            f"and miniconda.accept_tos is false ({why}); {hint}",
        )
    # Under --check the miniconda role only said it would install conda: nothing to refuse yet.
    if not env.state.get("conda") and not env.host.check:
        return failed(
            "env",
            f"no conda at {env.conda}: run the miniconda role first (--roles miniconda,conda_env)",
        )
    return None


def _spec_file(env: Env) -> Step:
    env.host.change(["mkdir", "-p", env.yml.rsplit("/", 1)[0]])
    wrote, diff = env.host.put(env.yml, env.text)
    what = f"{env.yml}: spec {env.digest[:12]} ({env.variant})"
    if not wrote:
        return ok("environment.yml", what)
    return env.host.changed("environment.yml", f"write {what}", diff=diff)


def _leftover(env: Env) -> Step:
    """<env>.ddpfleet-old is there: a rebuild stopped before its end. If the new env verified
    (its spec hash is written last), the old one only waits to be removed; otherwise it goes
    back in place, as it was, and this run starts over from it."""
    old = env.path + ASIDE
    if env.current:
        env.host.change(["rm", "-rf", old])
        return changed("env", f"removed {old}, left by a rebuild that had verified")
    env.host.change(["sh", "-c", RESTORE, "sh", env.path, old])
    return changed("env", f"put {old} back at {env.path}: a rebuild stopped before it verified")


def _env(env: Env) -> Step | None:
    """A changed spec rebuilds the env from scratch, never `conda env update --prune`, whose
    solver bugs leave extra or missing packages (conda-libmamba-solver #671, #595). The new env
    is created at the env's own path (conda envs hold their prefix in scripts and are not
    relocatable, so it cannot be built elsewhere and moved); the old one waits beside it,
    renamed, and comes back unchanged if the create or the verify fails."""
    argv = [env.conda, "env", "create", "-p", env.path, "-f", env.yml]
    if env.current:
        return ok("env", f"{env.path} matches its spec")
    if not env.state.get("env"):
        return env.host.changed(
            "env", f"create {env.path} (absent)", lambda: _conda(env, "create", argv)
        )
    why = "spec changed" if env.state.get("spec") else "no spec recorded"
    old = env.path + ASIDE

    def rebuild() -> Step | None:
        env.host.change(["mv", "-T", env.path, old])
        env.aside.append(old)
        step = _conda(env, "create", argv)
        if step is not None:
            _restore(env)
            return failed("env", f"{step.reason}; the old env is back at {env.path}")
        return None

    what = f"rebuild {env.path} ({why}): create it anew, the old env kept aside until it verifies"
    return env.host.changed("env", what, rebuild)


def _restore(env: Env) -> None:
    env.host.change(["sh", "-c", RESTORE, "sh", env.path, env.aside.pop()])


def _conda(env: Env, verb: str, argv: list[str]) -> Step | None:
    result = env.host.change(argv, check=False, timeout=3600)
    if result.ok:
        return None
    out = result.stderr + result.stdout
    if TOS_ERROR in out:
        return failed(
            "env",
            f"conda stopped with {TOS_ERROR}: a channel's Terms of "
            f"Service are not accepted; {TOS_HINT}",
        )
    tail = " | ".join(out.strip().splitlines()[-3:])
    return failed("env", f"conda env {verb} failed for {env.path}: {tail}")


def _verify(env: Env) -> Step:
    if env.host.check:
        return skipped("verify", "--check: nothing installed to import yet")
    python = f"{env.path}/bin/python"
    result = env.host.run([python, "-c", VERIFY_PY], check=False, timeout=600)
    if not result.ok:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        return _unverified(env, f"`import torch` failed in {env.path}: {tail}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    problem = cuda_problem(record, gpu_node=not env.cpu)
    if problem:  # no spec hash written: the next bootstrap retries
        return _unverified(
            env,
            f"no working CUDA in {env.path} on a GPU node: {problem}; check the driver "
            "(invoke gpu-status), and that the env got pytorch-cuda from the pytorch and "
            "nvidia channels, then bootstrap again (python_env.cpu_only: true if the node "
            "should train on CPU)",
        )
    env.host.put(f"{env.path}/{RECORD_FILE}", json.dumps(record, sort_keys=True) + "\n")
    env.host.put(f"{env.path}/{SPEC_FILE}", env.digest + "\n")  # last: the rebuild is done
    if env.aside:
        env.host.change(["rm", "-rf", env.aside.pop()])
    return ok("verify", describe(record))


def _unverified(env: Env, reason: str) -> Step:
    """A failed verify; after a rebuild the old env goes back, with its old spec hash, so the
    next bootstrap tries again."""
    if env.aside:
        _restore(env)
        reason += f"; the old env is back at {env.path}"
    return failed("verify", reason)
