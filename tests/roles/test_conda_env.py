"""conda_env: node state in (one probe's answer), steps and commands out."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import load_role
from tests.roles.fakehost import FACTS, FakeHost, apply

ROLE = load_role("conda_env").module
PREFIX = "/opt/miniconda3"
ENV = f"{PREFIX}/envs/ddp"
YML = f"{PREFIX}/ddpfleet/ddp.environment.yml"
CONDA = f"{PREFIX}/bin/conda"
GPU_FACTS = MappingProxyType({**FACTS, "nvidia_smi": "/usr/bin/nvidia-smi"})
RECORD = {"torch": "2.5.1", "cuda": "11.8", "available": True, "gpus": 8, "python": "3.10.16"}
TOS_OUT = (
    "CondaToSNonInteractiveError: Terms of Service have not been accepted for the "
    "following channels. Please accept or remove them before proceeding:\n"
    "    \u2022 https://repo.anaconda.com/pkgs/main\n"
)


@pytest.fixture
def inventory(tmp_path):
    """An inventory whose miniconda section says: accept_tos (Miniconda's default channels)."""

    def make(**miniconda) -> inv.Inventory:
        data = {
            "miniconda": {"accept_tos": True, **miniconda},
            "nodes": {"node0": {"host": "10.9.0.10"}},
        }
        (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(data))
        return inv.load(tmp_path / "inventory.yaml", check_files=False)

    return make


def spec_text(inventory: inv.Inventory, facts=FACTS, **cfg) -> str:
    """The environment.yml the role renders for these settings."""
    h = node(inventory, probe(env=False, record=None), facts=facts)
    apply("conda_env", h, **cfg)
    return h.written.get(YML, b"").decode()


def digest(inventory, facts=FACTS, **cfg) -> str:
    return hashlib.sha256(spec_text(inventory, facts, **cfg).encode()).hexdigest()


def probe(env=True, spec="", record=RECORD, conda=True) -> dict[str, str]:
    state = {
        "conda": "1" if conda else "",
        "spec": spec,
        "record": json.dumps(record) if record else "",
    }
    if env:
        state.update(env_dir="1", env="1")
    return state


def node(
    inventory, state, facts=FACTS, check=False, conda=(0, "done"), verify=0, record=RECORD
) -> FakeHost:
    text = "".join(f"{k}={v}\n" for k, v in state.items() if v)
    return FakeHost(
        answers=[
            (r"ddpfleet-spec\.sha256", 0, text),
            (rf"{CONDA} env (create|update)", conda[0], conda[1]),
            (
                r"torch\.cuda\.device_count",
                verify,
                json.dumps(record)
                if verify == 0
                else "ImportError: undefined symbol: iJIT_NotifyEvent",
            ),
        ],
        facts=facts,
        check=check,
        inventory=inventory,
        node=inventory.nodes[0],
    )


def run(h: FakeHost, **cfg):
    steps, _ = apply("conda_env", h, **cfg)
    return [(s.name, s.status) for s in steps], steps


def test_converged_env_costs_one_probe_and_changes_nothing(inventory):
    i = inventory()
    h = node(i, probe(spec=digest(i)))
    statuses, steps = run(h)
    assert statuses == [("environment.yml", "ok"), ("env", "ok"), ("verify", "ok")]
    assert h.changes == [] and h.written == {} and len(h.ran) == 1
    assert steps[-1].reason == (
        "torch 2.5.1, CUDA 11.8, cuda available: yes, GPUs: 8 (verified at install)"
    )


def test_absent_env_is_created_from_the_rendered_file_and_verified(inventory):
    i = inventory()
    h = node(i, probe(env=False, record=None))
    statuses, steps = run(h)
    assert statuses == [("environment.yml", "changed"), ("env", "changed"), ("verify", "ok")]
    assert h.changes == [f"mkdir -p {PREFIX}/ddpfleet", f"{CONDA} env create -p {ENV} -f {YML}"]
    assert h.written[f"{ENV}/.ddpfleet-spec.sha256"] == (digest(i) + "\n").encode()
    assert json.loads(h.written[f"{ENV}/.ddpfleet-torch.json"]) == RECORD
    assert steps[-1].reason == "torch 2.5.1, CUDA 11.8, cuda available: yes, GPUs: 8"
    verify = [c for c in h.ran if "device_count" in c]
    assert verify and verify[0].startswith(f"{ENV}/bin/python -c")  # absolute path


@pytest.mark.parametrize("flavor, base", [("miniconda", "defaults"), ("miniforge", "conda-forge")])
def test_environment_yml_pins_the_cuda_118_pairing_from_the_pytorch_channel(
    inventory, flavor, base
):
    """Channel-qualified: no channel order or solver choice can give conda-forge's torch."""
    doc = yaml.safe_load(spec_text(inventory(flavor=flavor), facts=GPU_FACTS))
    assert doc["name"] == "ddp"
    assert doc["channels"] == ["pytorch", "nvidia", base]
    for dep in (
        "python=3.10",
        "pytorch::pytorch==2.5.1",
        "pytorch::torchvision==0.20.1",
        "pytorch::torchaudio==2.5.1",
        "pytorch::pytorch-cuda=11.8",
        "mkl<2024.1",
        "jupyterlab",
    ):
        assert dep in doc["dependencies"]
    assert not [d for d in doc["dependencies"] if "cpuonly" in str(d)]
    unqualified = [d for d in doc["dependencies"] if str(d).startswith(("pytorch=", "torch"))]
    assert unqualified == []


@pytest.mark.parametrize("flavor", ["miniconda", "miniforge"])
def test_cpu_node_gets_cpuonly(inventory, flavor):
    doc = yaml.safe_load(spec_text(inventory(flavor=flavor)))  # FACTS: no nvidia-smi
    assert "pytorch::cpuonly" in doc["dependencies"]
    assert "pytorch::pytorch==2.5.1" in doc["dependencies"]
    assert not any(d.startswith("pytorch-cuda") for d in doc["dependencies"] if isinstance(d, str))
    assert "nvidia" not in doc["channels"]


@pytest.mark.parametrize(
    "setting, facts, cpu",
    [
        ("auto", GPU_FACTS, False),
        ("auto", FACTS, True),
        (True, GPU_FACTS, True),
        (False, FACTS, False),
        ("false", FACTS, False),
    ],
)
def test_cpu_only_setting(setting, facts, cpu):
    assert ROLE.cpu_only({"cpu_only": setting}, facts) is cpu


def test_pip_and_extra_conda_packages_are_rendered(inventory):
    doc = yaml.safe_load(
        spec_text(
            inventory(), conda_packages=["jupyterlab", "numpy<2"], pip_packages=["wandb==0.18.0"]
        )
    )
    assert "numpy<2" in doc["dependencies"]
    assert {"pip": ["wandb==0.18.0"]} in doc["dependencies"] and "pip" in doc["dependencies"]


OLD = f"{ENV}.ddpfleet-old"
ASIDE = f"mv -T {ENV} {OLD}"
RESTORE = f'sh -c rm -rf "$1" && mv -T "$2" "$1" sh {ENV} {OLD}'
CREATE = f"{CONDA} env create -p {ENV} -f {YML}"


def test_changed_spec_rebuilds_the_env_keeping_the_old_one_until_the_new_verifies(inventory):
    """No `conda env update --prune` (conda-libmamba-solver #671, #595): a fresh create at the
    env's own path (conda envs are not relocatable), the old env renamed beside it meanwhile."""
    i = inventory()
    h = node(i, probe(spec="0" * 64))
    statuses, steps = run(h)
    assert statuses == [("environment.yml", "changed"), ("env", "changed"), ("verify", "ok")]
    assert h.changes == [f"mkdir -p {PREFIX}/ddpfleet", ASIDE, CREATE, f"rm -rf {OLD}"]
    assert "spec changed" in steps[1].reason and "kept aside until it verifies" in steps[1].reason
    assert h.written[f"{ENV}/.ddpfleet-spec.sha256"] == (digest(i) + "\n").encode()
    assert not any("env update" in c or "--prune" in c for c in h.ran)


def test_a_rebuild_that_fails_to_verify_puts_the_old_env_back(inventory):
    h = node(inventory(), probe(spec="0" * 64), verify=1)
    statuses, steps = run(h)
    assert statuses[-1] == ("verify", "failed")
    assert h.changes[-1] == RESTORE and f"rm -rf {OLD}" not in h.changes
    assert f"the old env is back at {ENV}" in steps[-1].reason
    assert f"{ENV}/.ddpfleet-spec.sha256" not in h.written  # the old hash: the next run retries


def test_a_rebuild_whose_create_fails_puts_the_old_env_back(inventory):
    h = node(inventory(), probe(spec="0" * 64), conda=(1, "LibMambaUnsatisfiableError: ..."))
    statuses, steps = run(h)
    assert statuses[-1] == ("env", "failed")
    assert h.changes[-2:] == [CREATE, RESTORE]
    assert "Unsatisfiable" in steps[-1].reason and "the old env is back" in steps[-1].reason
    assert not any("device_count" in c for c in h.ran)  # no verify of what is not there


@pytest.mark.parametrize("verified, change", [(False, RESTORE), (True, f"rm -rf {OLD}")])
def test_a_rebuild_cut_short_is_settled_first(inventory, verified, change):
    """<env>.ddpfleet-old left by a run that died: removed if the new env had verified (its
    spec hash is written last), else put back, before anything else."""
    i = inventory()
    state = {**probe(spec=digest(i) if verified else "0" * 64), "aside": "1"}
    h = node(i, state)
    statuses, steps = run(h)
    assert statuses[0] == ("env", "changed") and h.changes[0] == change
    assert steps[0].reason.startswith(f"removed {OLD}" if verified else f"put {OLD} back")


def test_new_package_in_the_inventory_is_a_rebuild(inventory):
    i = inventory()
    h = node(i, probe(spec=digest(i)))
    statuses, _ = run(h, conda_packages=["jupyterlab", "numpy"])
    assert ("env", "changed") in statuses
    assert ASIDE in h.changes and CREATE in h.changes


def test_env_without_a_recorded_spec_is_rebuilt_and_kept_until_verified(inventory):
    h = node(inventory(), probe(spec=""))
    _, steps = run(h)
    assert "no spec recorded" in steps[1].reason
    assert h.changes[1:] == [ASIDE, CREATE, f"rm -rf {OLD}"]


def test_no_consent_refuses_before_any_conda_command(inventory):
    h = node(inventory(accept_tos=False), probe(env=False, record=None))
    statuses, steps = run(h)
    assert statuses == [("terms of service", "failed")]
    assert len(h.ran) == 1 and h.changes == []
    assert "accept_tos: true" in steps[0].reason and "flavor: miniforge" in steps[0].reason


def test_miniforge_needs_no_consent_and_uses_conda_forge(inventory):
    i = inventory(accept_tos=False, flavor="miniforge")
    h = node(i, probe(env=False, record=None))
    statuses, _ = run(h)
    assert ("env", "changed") in statuses
    assert yaml.safe_load(h.written[YML])["channels"] == ["pytorch", "conda-forge"]


NODEFAULTS = ["pytorch", "conda-forge", "nodefaults"]


def test_nodefaults_does_not_avoid_consent_with_a_tos_plugin_conda(inventory):
    """Real conda with the plugin (>= 24.11) checks the condarc's `defaults` before it reads the
    env file, so `nodefaults` there would still stop with CondaToSNonInteractiveError."""
    state = {**probe(env=False, record=None), "tos_plugin": "1"}
    h = node(inventory(accept_tos=False), state)
    statuses, steps = run(h, channels=NODEFAULTS)
    assert statuses == [("terms of service", "failed")] and h.changes == []
    reason = steps[0].reason
    assert "ddpfleet's consent policy" in reason and "nodefaults does not avoid it" in reason
    assert f"take defaults out of {PREFIX}/.condarc" in reason and "accept_tos: true" in reason


def test_nodefaults_without_a_tos_plugin_needs_no_consent(inventory):
    """The pinned conda 24.9.2 has no plugin: nodefaults keeps Anaconda's channels out."""
    h = node(inventory(accept_tos=False), probe(env=False, record=None))
    statuses, _ = run(h, channels=NODEFAULTS)
    assert ("env", "changed") in statuses


@pytest.mark.parametrize(
    "plugin, says",
    [("", "no ToS plugin (< 24.11) and would not stop by itself"),
     ("1", "has the ToS plugin and would stop with CondaToSNonInteractiveError")],
)  # fmt: skip
def test_the_refusal_is_ddpfleets_policy_and_says_how_to_go_on(inventory, plugin, says):
    state = {**probe(env=False, record=None), "tos_plugin": plugin}
    statuses, steps = run(node(inventory(accept_tos=False), state))
    assert statuses == [("terms of service", "failed")]
    reason = steps[0].reason
    assert "ddpfleet's consent policy" in reason and says in reason
    assert "to go on, set `miniconda: {accept_tos: true}`" in reason
    assert "flavor: miniforge" in reason


def test_conda_tos_error_becomes_one_clear_line(inventory):
    h = node(inventory(), probe(env=False, record=None), conda=(1, TOS_OUT))
    statuses, steps = run(h)
    assert statuses[-1] == ("env", "failed")
    assert "CondaToSNonInteractiveError" in steps[-1].reason
    assert "accept_tos: true" in steps[-1].reason


def test_failed_import_keeps_the_old_spec_so_the_next_run_retries(inventory):
    h = node(inventory(), probe(env=False, record=None), verify=1)
    statuses, steps = run(h)
    assert statuses[-1] == ("verify", "failed")
    assert "iJIT_NotifyEvent" in steps[-1].reason
    assert f"{ENV}/.ddpfleet-spec.sha256" not in h.written


CPU_RECORD = {"torch": "2.5.1", "cuda": None, "available": False, "gpus": 0, "python": "3.10.16"}


@pytest.mark.parametrize(
    "record, why",
    [
        (CPU_RECORD, "CPU build (torch.version.cuda is None)"),
        ({**RECORD, "available": False, "gpus": 0}, "is_available() is False"),
        ({**RECORD, "node_gpus": 4}, "device_count() is 8, nvidia-smi -L lists 4"),
        ({**RECORD, "gpus": 0, "node_gpus": None}, "device_count() is 0"),
    ],
)
def test_no_working_cuda_on_a_gpu_node_fails_verify_and_keeps_the_old_spec(inventory, record, why):
    h = node(inventory(), probe(spec="0" * 64), facts=GPU_FACTS, record=record)
    statuses, steps = run(h)
    assert statuses[-1] == ("verify", "failed")
    assert why in steps[-1].reason and "pytorch-cuda" in steps[-1].reason
    assert f"{ENV}/.ddpfleet-spec.sha256" not in h.written
    assert f"{ENV}/.ddpfleet-torch.json" not in h.written


def test_cuda_on_every_gpu_verifies_a_gpu_node(inventory):
    h = node(inventory(), probe(env=False, record=None), facts=GPU_FACTS,
             record={**RECORD, "node_gpus": 8})  # fmt: skip
    statuses, _ = run(h)
    assert statuses[-1] == ("verify", "ok")
    assert f"{ENV}/.ddpfleet-spec.sha256" in h.written


def test_cpu_only_node_verifies_a_cpu_build(inventory):
    h = node(inventory(), probe(env=False, record=None), record=CPU_RECORD)
    statuses, _ = run(h)
    assert statuses[-1] == ("verify", "ok")


@pytest.mark.parametrize("smi_rc, cpu", [("6", True), ("9", False), ("0", False)])
def test_nvidia_smi_without_devices_gets_cpuonly(inventory, smi_rc, cpu):
    """exit 6, "No devices were found": no GPU node, whatever the facts' nvidia-smi says; exit 9
    (driver not loaded) still is one: its GPUs need the driver fixed, not a CPU build."""
    state = {**probe(env=False, record=None), "smi_rc": smi_rc}
    h = node(inventory(), state, facts=GPU_FACTS, record=CPU_RECORD if cpu else RECORD)
    statuses, _ = run(h)
    deps = yaml.safe_load(h.written[YML])["dependencies"]
    assert ("pytorch::cpuonly" in deps, "pytorch::pytorch-cuda=11.8" in deps) == (cpu, not cpu)
    assert statuses[-1] == ("verify", "ok")


def test_the_shipped_gpu_example_gets_past_conda_env():
    """examples/gpu-cluster.yaml states a consent choice, so its GPU nodes get their env."""
    example = Path(__file__).resolve().parents[2] / "examples" / "gpu-cluster.yaml"
    i = inv.load(example, check_files=False)
    h = FakeHost(
        answers=[(r"ddpfleet-spec\.sha256", 0, "conda=1\n"),
                 (r"torch\.cuda\.device_count", 0, json.dumps({**RECORD, "node_gpus": 8}))],
        facts=GPU_FACTS, inventory=i, node=i.nodes[0],
    )  # fmt: skip
    statuses, _ = run(h)
    assert statuses == [("environment.yml", "changed"), ("env", "changed"), ("verify", "ok")]
    assert "pytorch::pytorch-cuda=11.8" in yaml.safe_load(h.written[YML])["dependencies"]


def test_no_conda_yet_names_the_miniconda_role(inventory):
    h = node(inventory(), probe(env=False, record=None, conda=False))
    statuses, steps = run(h)
    assert statuses == [("env", "failed")]
    assert "--roles miniconda,conda_env" in steps[0].reason


def test_a_directory_that_is_not_an_env_is_left_alone(inventory):
    state = {**probe(env=False, record=None), "env_dir": "1"}
    statuses, steps = run(node(inventory(), state))
    assert statuses == [("env", "failed")] and "not a conda env" in steps[0].reason


def test_check_reports_what_would_change_and_changes_nothing(inventory):
    h = node(inventory(), probe(env=False, record=None, conda=False), check=True)
    statuses, steps = run(h)
    assert statuses == [("environment.yml", "changed"), ("env", "changed"), ("verify", "skipped")]
    assert steps[1].reason.startswith("would create")
    assert h.changes == [] and h.written == {} and len(h.ran) == 1


def test_never_conda_create_yes_nor_conda_run(inventory):
    for state in (probe(env=False, record=None), probe(spec="1" * 64)):
        h = node(inventory(), state)
        run(h)
        assert not any("--yes" in c or " run " in c or "conda create" in c for c in h.ran)


def test_applies_only_to_the_conda_manager():
    assert ROLE.applies({"manager": "conda"}, None)
    assert not ROLE.applies({"manager": "venv"}, None)
