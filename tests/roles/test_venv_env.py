"""venv_env: node state in (one probe's answer), steps and commands out."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from ddpfleet.engine.roles import load_role
from tests.roles.fakehost import FACTS, FakeHost, apply

ROLE = load_role("venv_env").module
PATH = "/opt/ddpfleet/venv"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CU118 = "https://download.pytorch.org/whl/cu118"
INDEX_FROM_STDIN = 'sh -c IFS= read -r PIP_INDEX_URL && export PIP_INDEX_URL && exec "$@" sh'
RECORD = {"torch": "2.5.1+cpu", "cuda": None, "available": False, "gpus": 0, "python": "3.11.2"}
VERIFY_OUT = json.dumps(RECORD)
GPU_FACTS = MappingProxyType({**FACTS, "nvidia_smi": "/usr/bin/nvidia-smi"})
BASE = {
    "base_python": "3.11.2",
    "base_py": "3.11",
    "base_impl": "cp",
    "base_abi": "cp311",
    "base_plat": "linux-x86_64",
    "base_glibc": "2.36",
    "base_ensurepip": "1",
}


def digest(facts=FACTS, **cfg) -> str:
    return ROLE.spec_for({**load_role("venv_env").defaults, **cfg}, facts).digest()


def probe(
    env: bool = True,
    spec: str | None = None,
    torch: str = "2.5.1+cpu",
    missing: str = "",
    record: dict | None = None,
    **base,
) -> str:
    """What the node answers to the role's probe: base python facts, then the env's state."""
    lines = {**BASE, **base}
    if env:
        lines.update(
            env_cfg="1",
            env_python="3.11.2",
            env_spec=digest() if spec is None else spec,
            env_torch=torch,
            env_missing=missing,
            env_record=json.dumps(RECORD if record is None else record),
        )
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def host(
    probe_out: str,
    facts=FACTS,
    check: bool = False,
    pip_out: str = "Successfully installed torch-2.5.1",
    verify_code: int = 0,
    tmp: Path | None = None,
    verify_out: str = VERIFY_OUT,
) -> FakeHost:
    return FakeHost(
        answers=[
            (r"base_ensurepip", 0, probe_out),
            (r"-m pip install", 0, pip_out),
            (
                r"torch\.cuda\.device_count",
                verify_code,
                verify_out if verify_code == 0 else "ImportError: libfoo.so",
            ),
        ],
        facts=facts,
        check=check,
        inventory=SimpleNamespace(root=tmp or Path("/nonexistent")),
    )


def run(h: FakeHost, **cfg):
    steps, _ = apply("venv_env", h, manager="venv", **cfg)
    return [(s.name, s.status) for s in steps], steps


def test_applies_only_to_the_venv_manager():
    assert ROLE.applies({"manager": "venv"}, None)
    assert not ROLE.applies({"manager": "conda"}, None)


def test_absent_env_is_created_and_installed_from_the_cpu_index():
    h = host(probe(env=False))
    statuses, steps = run(h)
    assert statuses == [("venv", "changed"), ("packages", "changed"), ("verify", "ok")]
    pip = f"{PATH}/bin/python -m pip install --disable-pip-version-check --no-input"
    assert h.changes == [
        f"python3 -m venv {PATH}",
        f"{INDEX_FROM_STDIN} {pip} torch==2.5.1",
        f"{pip} torch==2.5.1 jupyterlab",
    ]
    assert h.stdin == {h.changes[1]: CPU_INDEX + "\n"}
    assert h.written[f"{PATH}/.ddpfleet-spec.sha256"] == (digest() + "\n").encode()
    assert json.loads(h.written[f"{PATH}/.ddpfleet-torch.json"]) == RECORD
    assert steps[-1].reason == "torch 2.5.1+cpu, CUDA none, cuda available: no, GPUs: 0"


def test_converged_env_costs_one_probe_and_changes_nothing():
    h = host(probe())
    statuses, steps = run(h)
    assert statuses == [("venv", "ok"), ("packages", "ok"), ("verify", "ok")]
    assert h.changes == [] and h.written == {}
    assert len(h.ran) == 1  # the probe: no `import torch`, no pip
    assert "torch 2.5.1+cpu" in steps[-1].reason


def test_changed_spec_reinstalls_into_the_existing_env():
    h = host(probe(spec="0" * 64))
    statuses, steps = run(h)
    assert statuses == [("venv", "ok"), ("packages", "changed"), ("verify", "ok")]
    assert not any("-m venv" in c for c in h.changes)
    assert any("pip install" in c for c in h.changes)
    assert "spec changed" in steps[1].reason
    assert h.written[f"{PATH}/.ddpfleet-spec.sha256"] == (digest() + "\n").encode()


def test_new_package_in_the_inventory_is_a_changed_spec():
    spec = digest()
    h = host(probe(spec=spec))
    statuses, _ = run(h, packages=["jupyterlab", "numpy"])
    assert ("packages", "changed") in statuses
    assert any(c.endswith("torch==2.5.1 jupyterlab numpy") for c in h.changes)


@pytest.mark.parametrize(
    "state, why",
    [
        ({"missing": "jupyterlab"}, "missing: jupyterlab"),
        ({"torch": ""}, "torch not installed"),
        ({"torch": "2.4.0"}, "torch 2.4.0 installed outside ddpfleet"),
    ],
)
def test_drift_inside_the_env_is_repaired(state, why):
    h = host(probe(**state))
    statuses, steps = run(h)
    assert ("packages", "changed") in statuses
    assert why in steps[1].reason


def test_check_reports_what_would_change_and_changes_nothing():
    h = host(probe(env=False), check=True)
    statuses, steps = run(h)
    assert statuses == [("venv", "changed"), ("packages", "changed"), ("verify", "skipped")]
    assert steps[0].reason.startswith("would create")
    assert h.changes == [] and h.written == {}
    assert [c for c in h.ran if "base_ensurepip" not in c] == []


def test_check_on_a_converged_env_is_all_ok():
    h = host(probe(), check=True)
    statuses, _ = run(h)
    assert {s for _, s in statuses} == {"ok"}
    assert h.changes == []


def test_gpu_node_gets_the_cu118_index():
    h = host(probe(env=False), facts=GPU_FACTS)
    run(h)
    assert [h.stdin[c] for c in h.changes if c.endswith(" torch==2.5.1")] == [CU118 + "\n"]


def test_nvidia_smi_without_devices_gets_the_cpu_index():
    h = host(probe(env=False) + "smi_rc=6\n", facts=GPU_FACTS)
    statuses, _ = run(h)
    assert [h.stdin[c] for c in h.changes if c.endswith(" torch==2.5.1")] == [CPU_INDEX + "\n"]
    assert statuses[-1] == ("verify", "ok")  # a CPU build is right there


def test_cpu_only_pin_on_a_gpu_node_is_refused_before_anything_runs():
    h = host(probe(env=False), facts=GPU_FACTS)
    statuses, steps = run(h, torch="torch==2.13.0")
    assert statuses == [("torch", "failed")]
    assert "cu118 index ends at 2.7.x" in steps[0].reason
    assert h.ran == []


def test_explicit_empty_index_url_means_one_pip_install_from_pips_own_config():
    h = host(probe(env=False), facts=GPU_FACTS)
    run(h, torch="torch==2.13.0", index_url="")
    pips = [c for c in h.changes if "pip install" in c]
    pip = f"{PATH}/bin/python -m pip install --disable-pip-version-check --no-input"
    assert pips == [f"{pip} torch==2.13.0 jupyterlab"]


def test_wheelhouse_pushes_then_installs_offline(monkeypatch, tmp_path):
    fetched, pushed = [], []
    wheels = [tmp_path / "torch-2.5.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]
    monkeypatch.setattr(
        ROLE.wheelhouse,
        "fetch",
        lambda cache, spec, target, progress: fetched.append((cache, target.tag)) or wheels,
    )
    monkeypatch.setattr(
        ROLE.wheelhouse,
        "push",
        lambda sftp, remote, files, run, progress, node: (
            pushed.append((remote, files)) or ROLE.wheelhouse.Pushed(1, 2**20, 0)
        ),
    )
    h = host(probe(env=False), tmp=tmp_path)
    h.conn = SimpleNamespace(sftp=lambda: "sftp", name="node0")
    statuses, _ = run(h, wheelhouse=True)
    assert statuses == [
        ("venv", "changed"),
        ("wheelhouse", "changed"),
        ("packages", "changed"),
        ("verify", "ok"),
    ]
    assert fetched == [(tmp_path / ".ddpfleet" / "wheelhouse", "cp311-manylinux_2_36_x86_64")]
    assert pushed == [("/var/cache/ddpfleet/wheelhouse", wheels)]
    assert h.changes[-1] == (
        f"env PIP_CONFIG_FILE=/dev/null {PATH}/bin/python -m pip install "
        "--disable-pip-version-check --no-input --no-index --find-links "
        "/var/cache/ddpfleet/wheelhouse torch==2.5.1 jupyterlab"
    )


def run_wheelhouse_step(monkeypatch, tmp_path, pushed):
    """The role with a wheelhouse whose push reports `pushed` (files, bytes, .part removed)."""
    monkeypatch.setattr(ROLE.wheelhouse, "fetch", lambda *a: [tmp_path / "a.whl"])
    monkeypatch.setattr(ROLE.wheelhouse, "push", lambda *a, **kw: ROLE.wheelhouse.Pushed(*pushed))
    h = host(probe(spec="0" * 64), tmp=tmp_path)
    h.conn = SimpleNamespace(sftp=lambda: None, name="node0")
    return run(h, wheelhouse=True)


def test_wheelhouse_with_everything_already_on_the_node_is_ok(monkeypatch, tmp_path):
    statuses, _ = run_wheelhouse_step(monkeypatch, tmp_path, (0, 0, 0))
    assert ("wheelhouse", "ok") in statuses


def test_wheelhouse_that_only_removed_interrupted_uploads_is_a_change(monkeypatch, tmp_path):
    _, steps = run_wheelhouse_step(monkeypatch, tmp_path, (0, 0, 2))
    [step] = [s for s in steps if s.name == "wheelhouse"]
    assert step.status == "changed" and "removed 2 interrupted upload(s)" in step.reason


def test_wheelhouse_under_check_downloads_and_sends_nothing(monkeypatch):
    monkeypatch.setattr(ROLE.wheelhouse, "fetch", lambda *a: pytest.fail("fetched under --check"))
    h = host(probe(env=False), check=True)
    statuses, _ = run(h, wheelhouse=True)
    assert ("wheelhouse", "changed") in statuses
    assert h.changes == []


def test_debian_without_ensurepip_gets_python3_venv():
    h = host(probe(env=False, base_ensurepip="0"))
    statuses, _ = run(h)
    assert statuses[0] == ("python3-venv", "changed")
    assert h.changes[0] == (  # waits for the dpkg lock (issue 11)
        "env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -yq "
        "python3-venv"
    )


def test_non_debian_without_ensurepip_fails_with_the_fix():
    facts = MappingProxyType({**FACTS, "os_id": "alpine"})
    h = host(probe(env=False, base_ensurepip="0"), facts=facts)
    statuses, steps = run(h)
    assert statuses == [("python3-venv", "failed")]
    assert "venv package" in steps[0].reason


def test_broken_venv_is_recreated_with_clear():
    h = host(probe(env=False) + "env_cfg=1\n")
    run(h)
    assert h.changes[0] == f"python3 -m venv --clear {PATH}"


def test_failed_import_fails_verify_and_keeps_the_old_hash():
    h = host(probe(env=False), verify_code=1)
    statuses, steps = run(h)
    assert statuses[-1] == ("verify", "failed")
    assert "ImportError: libfoo.so" in steps[-1].reason
    assert h.written == {}


CUDA_RECORD = {"torch": "2.5.1+cu118", "cuda": "11.8", "available": True, "gpus": 8,
               "python": "3.11.2", "node_gpus": 8}  # fmt: skip


@pytest.mark.parametrize(
    "record, why",
    [
        (RECORD, "CPU build (torch.version.cuda is None)"),
        ({**CUDA_RECORD, "available": False, "gpus": 0}, "is_available() is False"),
        ({**CUDA_RECORD, "gpus": 4}, "device_count() is 4, nvidia-smi -L lists 8"),
    ],
)
def test_no_working_cuda_on_a_gpu_node_fails_verify_and_keeps_the_old_hash(record, why):
    h = host(probe(env=False), facts=GPU_FACTS, verify_out=json.dumps(record))
    statuses, steps = run(h)
    assert statuses[-1] == ("verify", "failed")
    assert why in steps[-1].reason and "index_url" in steps[-1].reason
    assert h.written == {}  # neither the spec hash nor the record: the next bootstrap retries


def test_cuda_on_every_gpu_verifies_a_gpu_node():
    h = host(probe(env=False), facts=GPU_FACTS, verify_out=json.dumps(CUDA_RECORD))
    statuses, steps = run(h)
    assert statuses[-1] == ("verify", "ok")
    assert steps[-1].reason == "torch 2.5.1+cu118, CUDA 11.8, cuda available: yes, GPUs: 8"
    assert f"{PATH}/.ddpfleet-spec.sha256" in h.written


def test_install_that_changed_nothing_is_ok():
    h = host(probe(spec=""), pip_out="Requirement already satisfied: torch")
    statuses, _ = run(h)
    assert ("packages", "ok") in statuses


@pytest.mark.parametrize(
    "requirement, name",
    [
        ("torch==2.5.1", "torch"),
        ("jupyterlab[full]>=4", "jupyterlab"),
        ("numpy", "numpy"),
        ("foo ; python_version<'3.12'", "foo"),
        ("bar @ https://x/y.whl", "bar"),
    ],
)
def test_requirement_name(requirement, name):
    assert ROLE.requirement_name(requirement) == name


def test_index_credentials_go_on_stdin_and_are_masked_in_every_reason():
    url = "http://u:SECRET@127.0.0.1:9/simple"
    h = host(probe(env=False))
    statuses, steps = run(h, index_url=url)
    assert ("packages", "changed") in statuses
    assert not [c for c in h.changes if "SECRET" in c]  # argv: visible in ps on the node
    assert url + "\n" in h.stdin.values()
    assert not [s for s in steps if "SECRET" in s.reason]
    assert "from http://u:***@127.0.0.1:9/simple" in steps[1].reason


def test_a_failing_pip_is_a_failed_packages_step_with_the_url_masked():
    url = "http://u:SECRET@127.0.0.1:9/simple"
    h = host(probe(env=False), pip_out=f"ERROR: no index at {url}")
    h.answers[1] = (r"-m pip install", 1, f"ERROR: no index at {url}")
    statuses, steps = run(h, index_url=url)
    assert statuses[-1] == ("packages", "failed")
    assert "SECRET" not in steps[-1].reason and "u:***@127.0.0.1:9" in steps[-1].reason
