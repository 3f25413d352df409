"""ddpfleet.gpu: cells and rows, then the whole probe run by sh against the nvidia-smi stand-in
(tests/standins/nvidia-smi, recordings in tests/standins/recordings), then the JSON schema."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ddpfleet.gpu import (
    GPU_BASE_FIELDS,
    NOT_FOUND,
    Gpu,
    NodeGpus,
    parse_apps_csv,
    parse_gpu_csv,
    parse_mig_list,
    parse_probe,
    probe_script,
)
from ddpfleet.gpujson import JSON_SCHEMA, to_json, unreachable_json

STANDINS = Path(__file__).resolve().parents[1] / "standins"
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)


def run_probe(selection: str, path: str | None = None, **env: str) -> str:
    """The probe's raw output on this machine, with the stand-in first on PATH."""
    environ = {
        "PATH": path or f"{STANDINS}:/usr/bin:/bin",
        "DDPFLEET_STANDIN_GPU": selection,
        "DDPFLEET_STANDIN_GPU_FILE": "/nonexistent",  # never this machine's /etc file
        **env,
    }
    done = subprocess.run(
        ["/bin/sh", "-c", probe_script()],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def probe(selection: str, **env: str) -> NodeGpus:
    return parse_probe(run_probe(selection, **env))


# --- cells and rows ------------------------------------------------------------------------

ROW = "0, GPU-1, NVIDIA A100-SXM4-80GB, 00000000:07:00.0, 535.161.08, {}, {}, 81920, {}, {}, {}, {}"


@pytest.mark.parametrize(
    "cells, expect",
    [
        # utilization.gpu, memory.used, temperature.gpu, power.draw, power.limit, mig.mode.current
        (("97", "30517", "61", "312.45", "400.00", "Disabled"),
         (97, 30517, 61, 312.45, 400.0, "Disabled")),
        (("[N/A]", "19845", "44", "[N/A]", "[Not Supported]", "Enabled"),
         (None, 19845, 44, None, None, "Enabled")),
        (("N/A", "[Unknown Error]", "", "[Insufficient Permissions]", "70", "[N/A]"),
         (None, None, None, None, 70.0, None)),
        (("45 %", "11623 MiB", "48", "164.27 W", "300.00 W", "Disabled"),  # units left in
         (45, 11623, 48, 164.27, 300.0, "Disabled")),
    ],
)  # fmt: skip
def test_gpu_cells(cells: tuple[str, ...], expect: tuple) -> None:
    (gpu,) = parse_gpu_csv(ROW.format(*cells))
    got = (gpu.util_pct, gpu.mem_used_mib, gpu.temp_c, gpu.power_w, gpu.power_limit_w)
    assert (*got, gpu.mig_mode) == expect


@pytest.mark.parametrize(
    "line, name",
    [
        ("0, GPU-1, Tesla V100, PCIe 32GB, 00000000:3B:00.0, 470.57.02, 3, 1, 2, 4, 5, 6, [N/A]",
         "Tesla V100, PCIe 32GB"),
        ('0, GPU-1, "Tesla V100, PCIe", 00000000:3B:00.0, 470.57.02, 3, 1, 2, 4, 5, 6, [N/A]',
         "Tesla V100, PCIe"),
        ("0, GPU-1, A,B,C, 00000000:3B:00.0, 470.57.02, 3, 1, 2, 4, 5, 6, [N/A]", "A,B,C"),
    ],
)  # fmt: skip
def test_names_with_commas(line: str, name: str) -> None:
    (gpu,) = parse_gpu_csv(line)
    assert (gpu.name, gpu.bus_id, gpu.mig_mode) == (name, "00000000:3B:00.0", None)


def test_fewer_fields_and_short_rows() -> None:
    (gpu,) = parse_gpu_csv("3, GPU-9, Tesla T4, 00000000:00:1E.0, 418.67, 0, 0, 15360, 30, 9.5, 70",
                           GPU_BASE_FIELDS)  # fmt: skip
    assert (gpu.index, gpu.driver, gpu.mig_mode) == (3, "418.67", None)
    with pytest.raises(ValueError, match="expected 12 fields"):
        parse_gpu_csv("0, GPU-1, Tesla T4")
    with pytest.raises(ValueError, match="without index"):
        parse_gpu_csv("[N/A], GPU-1, T4, b, d, 1, 2, 3, 4, 5, 6, 7")


def test_apps_csv() -> None:
    apps = parse_apps_csv(
        "GPU-1, 41234, 30512, /opt/conda/envs/ddp/bin/python3.10\n"
        "MIG-7, 30002, [N/A], /opt/odd,dir/bin/python3\n\n"
    )
    assert [(a.pid, a.mem_mib, a.command, a.device_uuid) for a in apps] == [
        (41234, 30512, "/opt/conda/envs/ddp/bin/python3.10", "GPU-1"),
        (30002, None, "/opt/odd,dir/bin/python3", "MIG-7"),
    ]
    assert parse_apps_csv("") == ()


def test_mig_list() -> None:
    text = (STANDINS / "recordings" / "a100_mig.list.txt").read_text()
    parents = parse_mig_list(text)
    assert len(parents) == 3 and set(parents.values()) == {
        line.split("UUID: ")[1].rstrip(")") for line in text.splitlines() if line.startswith("GPU")
    }


# --- the probe against the stand-in ----------------------------------------------------------

RECORDINGS = [
    # selection, count, name, driver, mig, per-GPU process counts
    ("a100x8", 8, "NVIDIA A100-SXM4-80GB", "535.161.08", "Disabled", [1, 1, 0, 0, 0, 0, 0, 0]),
    ("h100x8", 8, "NVIDIA H100 80GB HBM3", "550.54.15", "Disabled", [1, 1, 1, 0, 0, 0, 0, 0]),
    ("v100x4", 4, "Tesla V100-SXM2-16GB", "470.57.02", "Disabled", [1, 0, 0, 0]),
    ("a100_mig", 2, "NVIDIA A100-SXM4-40GB", "535.104.05", "Enabled", [2, 1]),
    ("na_power", 2, "Tesla T4", "525.85.12", None, [0, 0]),
    ("comma_name", 1, "Tesla V100, PCIe 32GB", "470.57.02", None, [1]),
    # a driver older than R450 rejects mig.mode.current: the probe retries without it
    ("v100x4 driver=418.67", 4, "Tesla V100-SXM2-16GB", "418.67", None, [1, 0, 0, 0]),
]


@pytest.mark.parametrize("selection, count, name, driver, mig, procs", RECORDINGS)
def test_probe_recordings(selection, count, name, driver, mig, procs) -> None:
    node = probe(selection)
    assert (node.driver_error, node.exit_code, node.unattached, node.notes) == (None, 0, (), ())
    assert [gpu.index for gpu in node.gpus] == list(range(count))
    assert len({gpu.uuid for gpu in node.gpus}) == count
    assert {(gpu.name, gpu.driver, gpu.mig_mode) for gpu in node.gpus} == {(name, driver, mig)}
    assert [len(gpu.processes) for gpu in node.gpus] == procs
    for gpu in node.gpus:
        assert gpu.mem_total_mib and gpu.mem_used_mib is not None and gpu.temp_c is not None
        for proc in gpu.processes:
            assert proc.device_uuid == gpu.uuid or proc.device_uuid.startswith("MIG-")


def test_probe_values() -> None:
    first = probe("a100x8").gpus[0]
    assert first == Gpu(
        index=0, uuid=first.uuid, name="NVIDIA A100-SXM4-80GB", bus_id="00000000:07:00.0",
        driver="535.161.08", util_pct=97, mem_used_mib=30517, mem_total_mib=81920, temp_c=61,
        power_w=312.45, power_limit_w=400.0, mig_mode="Disabled", processes=first.processes,
    )  # fmt: skip
    assert [(p.pid, p.mem_mib) for p in first.processes] == [(41234, 30512)]
    t4 = probe("na_power").gpus
    assert [(g.power_w, g.power_limit_w, g.util_pct) for g in t4] == [(None, None, 0),
                                                                      (26.71, 70.0, 0)]  # fmt: skip
    mig = probe("a100_mig").gpus
    assert [g.util_pct for g in mig] == [None, None]
    assert [p.mem_mib for p in mig[0].processes] == [9800, None]


def test_probe_a_mig_gpu_seen_from_an_unprivileged_container() -> None:
    """Cells of a real capture (535.161.08, MIG, unprivileged pod): `[N/A]` utilization and
    `[Insufficient Permissions]` memory parse as unknown, not as an error."""
    node = probe("a100_mig_pod")
    assert (node.driver_error, node.exit_code) == (None, 0)
    (g,) = node.gpus
    assert (g.util_pct, g.mem_used_mib, g.mem_total_mib) == (None, None, None)
    assert (g.name, g.driver, g.mig_mode, g.temp_c) == (
        "NVIDIA A100-SXM4-80GB", "535.161.08", "Enabled", 47)  # fmt: skip


def probe_with_a_process(env: dict[str, str]):
    """The recorded A100 node probed while a live `sleep` with `env` stands in for the first
    GPU's process (a training rank): (the parsed node, that process)."""
    with subprocess.Popen(["sleep", "60"], env={**os.environ, **env}) as sleeper:
        try:
            return probe(f"a100x8 pids={sleeper.pid}"), sleeper
        finally:
            sleeper.kill()


def test_probe_owner_and_run_id() -> None:
    """A live process stands in for a training rank: ps gives its user and command line, its
    environment its ddpfleet run."""
    node, sleeper = probe_with_a_process({"DDPFLEET_RUN_ID": "20260106-run7"})
    (proc,) = node.gpus[0].processes
    assert (proc.pid, proc.user, proc.command, proc.run_id, proc.mem_mib) == (
        sleeper.pid, getpass.getuser(), "sleep 60", "20260106-run7", 30512,
    )  # fmt: skip
    other = node.gpus[1].processes[0]  # pid 41235 from the recording: not ours
    assert other.run_id is None or other.pid != sleeper.pid


def test_probe_slurm_job_id() -> None:
    """A process started by a Slurm job carries SLURM_JOB_ID: the probe names the job; a
    process without one (the recording's other pid) has none."""
    node, _ = probe_with_a_process({"SLURM_JOB_ID": "812", "DDPFLEET_RUN_ID": "r-slurm"})
    (proc,) = node.gpus[0].processes
    assert (proc.slurm_job_id, proc.run_id) == ("812", "r-slurm")
    assert to_json("node0", node)["gpus"][0]["processes"][0]["slurm_job_id"] == "812"
    assert node.gpus[1].processes[0].slurm_job_id is None


def strip_section(text: str, kind: str) -> str:
    """The probe output without one marker section (as an older probe or node would give)."""
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith("@@ddpfleet "):
            skip = line.split()[1] == kind
        if not skip:
            out.append(line)
    return "\n".join(out)


def test_mig_parent_without_listing() -> None:
    text = strip_section(run_probe("a100_mig"), "list")
    node = parse_probe(text)  # two MIG GPUs: a MIG-... uuid alone cannot name its GPU
    assert [len(g.processes) for g in node.gpus] == [0, 0]
    assert [p.pid for p in node.unattached] == [30001, 30002, 30003]
    assert all("not known" in note for note in node.notes) and len(node.notes) == 3
    one = parse_probe(text.replace(node.gpus[1].uuid + ", NVIDIA A100-SXM4-40GB", "GPU-x, T4")
                      .replace("97.06, 400.00, Enabled", "97.06, 400.00, Disabled"))  # fmt: skip
    assert [len(g.processes) for g in one.gpus] == [3, 0]  # the only MIG GPU, noted as a guess
    assert len(one.notes) == 3 and "assumed" in one.notes[0]


def test_legacy_mig_uuid() -> None:
    """R450 drivers name MIG devices MIG-GPU-<parent uuid>/<gi>/<ci>: the parent is in it."""
    text = strip_section(run_probe("a100_mig"), "list")
    listing = (STANDINS / "recordings" / "a100_mig.list.txt").read_text()
    for mig, parent in parse_mig_list(listing).items():
        text = text.replace(mig, f"MIG-{parent}/1/0")
    node = parse_probe(text)
    assert [len(g.processes) for g in node.gpus] == [2, 1]
    assert (node.unattached, node.notes) == ((), ())


@pytest.mark.parametrize(
    "selection, code, error",
    [
        ("no_driver", 9, NO_DRIVER),
        ("a100x8 fail=9", 9, NO_DRIVER),
        ("a100x8 fail=12", 12, "NVIDIA-SMI couldn't find libnvidia-ml.so library"),
        ("a100x8 fail=15", 15, "Unable to determine the device handle for GPU0000:07:00.0"),
        ("a100x8 fail=255", 255, "Failed to initialize NVML: Unknown Error"),
        ("no_devices", 6, "No devices were found"),
    ],
)
def test_probe_no_driver(selection: str, code: int, error: str) -> None:
    node = probe(selection)
    assert (node.gpus, node.exit_code) == ((), code)
    assert node.driver_error.startswith(error)


def test_probe_absent_binary(tmp_path: Path) -> None:
    node = parse_probe(run_probe("a100x8", path=str(tmp_path)))
    assert node == NodeGpus((), NOT_FOUND, 127)


def test_probe_unrecognised_output() -> None:
    assert parse_probe("").driver_error == "probe output not recognised: (empty)"
    assert parse_probe("sh: 1: Syntax error\n").driver_error.endswith("sh: 1: Syntax error")
    broken = run_probe("a100x8").replace("0, GPU-", "x, GPU-", 1)
    assert parse_probe(broken).driver_error.startswith("unparseable nvidia-smi output")


@pytest.mark.parametrize("selection", ["a100_mig", "a100x8 fail=9"])
def test_truncated_probe_output_never_raises(selection: str) -> None:
    """A connection cut mid-output gives a partial probe: an answer or a reason, no traceback."""
    text = run_probe(selection)
    for end in range(len(text)):
        node = parse_probe(text[:end])
        assert node.gpus or node.driver_error or node.exit_code == 0


# --- JSON ----------------------------------------------------------------------------------

TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate(value, schema: dict, where: str = "$") -> None:
    """The draft 2020-12 subset JSON_SCHEMA uses: type, const, required, properties,
    additionalProperties: false, items."""
    if "const" in schema:
        assert value == schema["const"], f"{where}: {value!r} != {schema['const']!r}"
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(is_type(value, name) for name in names), f"{where}: {value!r} not {names}"
    if isinstance(value, dict):
        assert not set(schema.get("required", ())) - set(value), f"{where}: missing keys"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert not set(value) - set(props), f"{where}: extra {set(value) - set(props)}"
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{i}]")


def is_type(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, TYPES[name])


@pytest.mark.parametrize(
    "selection", ["a100x8", "h100x8", "v100x4", "a100_mig", "na_power", "comma_name", "no_driver"]
)
def test_json_matches_schema(selection: str) -> None:
    doc = to_json("node0", probe(selection))
    assert json.loads(json.dumps(doc)) == doc
    validate(doc, JSON_SCHEMA)
    assert doc["node"] == "node0" and doc["reachable"] is True


def test_json_edge_shapes() -> None:
    validate(unreachable_json("node1", "connection refused"), JSON_SCHEMA)
    validate(to_json("node2", NodeGpus((), NOT_FOUND, 127)), JSON_SCHEMA)
    validate(to_json("n", parse_probe(strip_section(run_probe("a100_mig"), "list"))), JSON_SCHEMA)
    assert unreachable_json("node1", "x")["reachable"] is False


def test_validator_is_not_vacuous() -> None:
    doc = to_json("node0", probe("a100x8"))
    for broken in (
        {**doc, "extra": 1},
        {k: v for k, v in doc.items() if k != "gpus"},
        {**doc, "gpus": [{**doc["gpus"][0], "util_pct": "97"}]},
        {**doc, "gpus": [{**doc["gpus"][0], "index": True}]},
    ):
        with pytest.raises(AssertionError):
            validate(broken, JSON_SCHEMA)


# --- the stand-in itself ---------------------------------------------------------------------


def standin(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {"PATH": "/usr/bin:/bin", "DDPFLEET_STANDIN_GPU_FILE": "/nonexistent", **env}
    return subprocess.run(
        [str(STANDINS / "nvidia-smi"), *args], env=environ, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip


def test_standin_config_file_and_header(tmp_path: Path) -> None:
    conf = tmp_path / "ddpfleet-standin-gpu"
    conf.write_text("h100x8\ndriver=470.57.02\n")
    plain = standin(DDPFLEET_STANDIN_GPU_FILE=str(conf))
    assert plain.returncode == 0
    assert re.search(r"Driver Version: 470\.57\.02 +CUDA Version: 11\.4", plain.stdout)
    node = probe("", DDPFLEET_STANDIN_GPU_FILE=str(conf))
    assert (len(node.gpus), node.gpus[0].driver, node.gpus[0].mig_mode) == (
        8,
        "470.57.02",
        "Disabled",
    )


def test_standin_fields_in_requested_order() -> None:
    got = standin("--query-gpu=power.draw,index", "--format=csv,noheader,nounits",
                  DDPFLEET_STANDIN_GPU="a100x8")  # fmt: skip
    assert got.stdout.splitlines()[:2] == ["312.45, 0", "305.17, 1"]
    units = standin("--query-gpu=index,memory.used", "--format=csv", DDPFLEET_STANDIN_GPU="v100x4")
    assert units.stdout.splitlines()[:2] == ["index, memory.used [MiB]", "0, 11623 MiB"]
    bad = standin("--query-gpu=index,bogus", "--format=csv", DDPFLEET_STANDIN_GPU="v100x4")
    assert bad.returncode == 2 and 'Field "bogus" is not a valid field' in bad.stdout
    unset = standin("-L")
    assert unset.returncode == 255 and "no recording selected" in unset.stderr
