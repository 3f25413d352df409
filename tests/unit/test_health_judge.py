"""The health parser and judge over recorded nvidia-smi and kernel-log outputs (one per fault
the issue names), put together in the probe's own marker format; a healthy 8-GPU node passes
with no warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddpfleet.gpu import MARK
from ddpfleet.health import facts, judge, probe, versions
from ddpfleet.health.judge import FAIL, PASS, WARN

RECORDINGS = Path(__file__).resolve().parents[1] / "standins" / "health"
VERSIONS = {"python": "3.10.12", "torch": "2.3.1+cu121", "cuda": "12.1", "nccl": "2.20.5"}


def read(name: str) -> str:
    return (RECORDINGS / name).read_text()


def section(kind: str, out: str, rc: int = 0, err: str = "") -> str:
    return f"\n{MARK} {kind}\n{out}\n{MARK} rc {rc}\n{MARK} stderr\n{err}"


def probe_output(
    query: str = "h100x8.query.csv",
    remapped: str | None = "h100x8.remapped.csv",
    nvlink_s: str = "h100x8.nvlink-s.txt",
    nvlink_e: str = "h100x8.nvlink-e.txt",
    klog: str = "h100x8.dmesg.txt",
    source: str = "dmesg",
    versions: dict | None = VERSIONS,
) -> str:
    """What probe.script() prints on a node whose commands print these recordings."""
    out = f"{MARK} versions\n" + (json.dumps(versions) if versions else "")
    out += section("query-gpu " + ",".join(probe.QUERY_FIELDS), read(query))
    out += (
        section("query-remapped-rows " + ",".join(probe.REMAP_FIELDS), read(remapped))
        if remapped
        else section(
            "query-remapped-rows " + ",".join(probe.REMAP_FIELDS),
            "",
            rc=2,
            err='Field "remapped_rows.pending" is not a valid field to query.',
        )
    )
    out += section("nvlink-status", read(nvlink_s)) + section("nvlink-errors", read(nvlink_e))
    lines = [ln for ln in read(klog).splitlines() if "NVRM: Xid" in ln]  # the probe's grep
    return out + f"\n{MARK} xid {source}\n" + "\n".join(lines) + f"\n{MARK} end\n"


def checks_of(text: str, gpus: int | None = 8, **kw) -> dict[str, judge.Check]:
    rows = judge.judge("node0", facts.parse(text), expected_gpus=gpus, **kw)
    return {c.check: c for c in rows}


def not_passing(rows: dict[str, judge.Check]) -> dict[str, str]:
    return {name: c.verdict for name, c in rows.items() if c.verdict != PASS}


def test_a_healthy_8_gpu_node_passes_with_no_warning() -> None:
    rows = checks_of(probe_output())
    assert not_passing(rows) == {}
    assert rows["gpus"].value == "8 of 8"
    assert rows["nvlink"].value == "144 up, no errors"
    assert rows["xid"].value == "none since boot"
    assert rows["versions"].value == "driver 550.54.15, torch 2.3.1+cu121, cuda 12.1, nccl 2.20.5"


def test_healthy_idle_gpus_at_a_low_pcie_gen_are_not_a_warning() -> None:
    assert not_passing(checks_of(probe_output(query="idle.query.csv"))) == {}


def test_uncorrected_ecc_fails_naming_the_gpu() -> None:
    rows = checks_of(probe_output(query="ecc.query.csv"))
    assert not_passing(rows) == {"ecc": FAIL}
    assert rows["ecc"].value == "GPU 3: 2 uncorrected"
    assert "nvidia-smi -r" in rows["ecc"].fix


def test_remapped_rows_pending_fails() -> None:
    rows = checks_of(probe_output(remapped="remap_pending.remapped.csv"))
    assert not_passing(rows) == {"remapped rows": FAIL}
    assert rows["remapped rows"].value == "GPU 1: pending"


def test_a_gpu_without_row_remapping_has_no_remap_row() -> None:
    assert "remapped rows" not in checks_of(probe_output(remapped=None))


@pytest.mark.parametrize(
    ("klog", "source", "value", "verdict"),
    [
        ("xid79.dmesg.txt", "dmesg", "79 GPU has fallen off the bus x1 (GPU 3)", FAIL),
        ("xid48.dmesg.txt", "dmesg",
         "48 double-bit ECC error x1 (GPU 1); 63 row remapping event x1 (GPU 1)", FAIL),
        ("xid13.journal.txt", "journal", "13 graphics engine exception x1 (GPU 0)", WARN),
    ],
)  # fmt: skip
def test_xid_events_are_named_with_their_gpu(klog, source, value, verdict) -> None:
    rows = checks_of(probe_output(klog=klog, source=source))
    assert not_passing(rows) == {"xid": verdict}
    assert rows["xid"].value == value


def test_an_unknown_xid_is_shown_by_number_as_a_warning() -> None:
    line = "[ 1.0] NVRM: Xid (PCI:0000:18:00): 119, pid=1, Timeout after 6s of waiting for RPC"
    text = probe_output().replace(f"{MARK} xid dmesg\n", f"{MARK} xid dmesg\n{line}")
    rows = checks_of(text)
    assert (rows["xid"].value, rows["xid"].verdict) == ("119 x1 (GPU 0)", WARN)


def test_an_unreadable_kernel_log_is_a_warning() -> None:
    rows = checks_of(probe_output(source="none"))
    assert not_passing(rows) == {"xid": WARN}
    assert "dmesg_restrict" in rows["xid"].fix


def test_thermal_throttle_fails() -> None:
    rows = checks_of(probe_output(query="thermal.query.csv"))
    assert not_passing(rows) == {"throttle": FAIL, "temperature": WARN}
    assert rows["throttle"].value == "GPU 5: HW thermal slowdown"
    assert rows["temperature"].value == "max 88 C (GPU 5)"


def test_temperature_limits_come_from_the_inventory() -> None:
    rows = checks_of(probe_output(), limits={"temp_warn_c": 30, "temp_fail_c": 40})
    assert (rows["temperature"].verdict, rows["temperature"].value) == (FAIL, "max 41 C (GPU 0)")


def test_a_gpu_missing_from_the_count_fails() -> None:
    rows = checks_of(probe_output(query="missing_gpu.query.csv"))
    assert not_passing(rows) == {"gpus": FAIL}
    assert rows["gpus"].value == "7 of 8"


def test_pcie_x16_running_at_x4_fails() -> None:
    rows = checks_of(probe_output(query="pcie_x4.query.csv"))
    assert not_passing(rows) == {"pcie link": FAIL}
    assert rows["pcie link"].value == "GPU 2: x4 of x16"


def test_an_nvlink_down_fails() -> None:
    rows = checks_of(probe_output(nvlink_s="nvlink_down.nvlink-s.txt"))
    assert not_passing(rows) == {"nvlink": FAIL}
    assert rows["nvlink"].value == "GPU 4: link 7 down"


def test_nvlink_error_counters_warn() -> None:
    errors = read("h100x8.nvlink-e.txt").replace(
        "Link 3: CRC Errors: 0", "Link 3: CRC Errors: 12", 1
    )
    text = probe_output().replace(read("h100x8.nvlink-e.txt"), errors)
    rows = checks_of(text)
    assert not_passing(rows) == {"nvlink": WARN}
    assert rows["nvlink"].value.endswith("errors GPU 0: 12 crc")


def test_a_cpu_node_passes_the_gpu_checks_as_no_gpu() -> None:
    text = f"{MARK} versions\n{json.dumps(VERSIONS)}\n{MARK} absent\n"
    rows = checks_of(text, gpus=None)
    assert not_passing(rows) == {}
    assert rows["gpus"].value == "no GPU (nvidia-smi not found)"


def test_a_node_the_inventory_gives_gpus_fails_without_nvidia_smi() -> None:
    rows = checks_of(f"{MARK} versions\n{MARK} absent\n", gpus=4)
    assert rows["gpus"].verdict == FAIL
    assert rows["gpus"].value == "no GPU (nvidia-smi not found), inventory says 4"
    assert rows["versions"].verdict == WARN  # no env python answered


def test_a_lost_gpu_fails_with_nvidia_smis_message() -> None:
    lost = "Unable to determine the device handle for GPU0000:5D:00.0: GPU is lost."
    text = f"{MARK} versions\n" + section("query-gpu index", lost, rc=15) + f"\n{MARK} end\n"
    rows = checks_of(text)
    assert rows["nvidia-smi"].verdict == FAIL and "GPU is lost" in rows["nvidia-smi"].value


def test_versions_that_differ_across_nodes_fail_the_odd_node() -> None:
    old = {**VERSIONS, "torch": "2.2.0+cu121"}
    parsed = {
        "node0": facts.parse(probe_output()),
        "node1": facts.parse(probe_output()),
        "node2": facts.parse(probe_output(versions=old)),
    }
    rows = [c for n, f in parsed.items() for c in judge.judge(n, f, 8)]
    verdicts = {c.node: c for c in versions.compare(parsed, rows) if c.check == "versions"}
    assert [verdicts[n].verdict for n in parsed] == [PASS, PASS, FAIL]
    assert verdicts["node2"].value == "differs: torch 2.2.0+cu121 (most nodes: 2.3.1+cu121)"


def test_the_one_line_reason() -> None:
    rows = checks_of(probe_output(query="ecc.query.csv"))
    assert rows["ecc"].line.startswith("node0: ecc: GPU 3: 2 uncorrected; fix: drain the node")
