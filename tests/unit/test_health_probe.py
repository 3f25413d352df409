"""The health probe script itself, run here under sh with the nvidia-smi stand-in and a dmesg
that prints a recording on its PATH; then the table, the JSON and the history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ddpfleet.health import facts, judge, probe, table
from ddpfleet.health.judge import FAIL, PASS
from ddpfleet.inventory import Inventory, Node
from tests.unit.test_gpu_parse import validate

STANDINS = Path(__file__).resolve().parents[1] / "standins"


def run_probe(tmp_path: Path, selection: str, klog: str | None, python: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").symlink_to(STANDINS / "nvidia-smi")
    if klog is not None:
        recording = STANDINS / "health" / klog
        (bin_dir / "dmesg").write_text(f"#!/bin/sh\ncat '{recording}'\n")
        (bin_dir / "dmesg").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DDPFLEET_STANDIN_GPU": selection}
    out = subprocess.run(["sh", "-c", probe.script(python)], env=env, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return out.stdout


def test_the_probe_reads_every_section_in_one_run(tmp_path: Path) -> None:
    text = run_probe(tmp_path, "a100x8", "xid79.dmesg.txt", sys.executable)
    f = facts.parse(text)
    assert f.smi == "ok" and len(f.gpus) == 8 and f.klog == "dmesg"
    assert [x.code for x in f.xids] == [79]
    assert f.remap is not None and len(f.remap) == 8
    assert f.versions and f.versions["python"] == ".".join(map(str, sys.version_info[:3]))
    rows = {c.check: c for c in judge.judge("node0", f, 8)}
    assert {n: c.verdict for n, c in rows.items() if c.verdict != PASS} == {"xid": FAIL}


def test_a_fault_set_on_the_stand_in_reaches_the_judge(tmp_path: Path) -> None:
    fault = "a100x8 set=ecc.errors.uncorrected.volatile.total:2@3 set=pcie.link.width.current:4@1"
    f = facts.parse(run_probe(tmp_path, fault, "h100x8.dmesg.txt", "/nonexistent/python"))
    rows = {c.check: c for c in judge.judge("node0", f)}
    assert rows["ecc"].value == "GPU 3: 2 uncorrected" and rows["ecc"].verdict == FAIL
    assert rows["pcie link"].value == "GPU 1: x4 of x16"
    assert rows["versions"].value == "no python env"  # the env python does not exist


def test_a_node_without_nvidia_smi_says_absent(tmp_path: Path) -> None:
    env = {"PATH": "/nonexistent"}
    out = subprocess.run(["/bin/sh", "-c", probe.script("/nonexistent/python")], env=env,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    f = facts.parse(out.stdout)
    assert (f.smi, f.versions) == ("absent", None)


def _inventory(tmp_path: Path) -> Inventory:
    node = Node("node0", "10.0.0.10", 22, "root", None, tmp_path / "kh", 5.0, gpus=8)
    return Inventory(tmp_path / "inventory.yaml", None, (node,), 1, {}, None)  # type: ignore[arg-type]


def test_json_document_and_history(tmp_path: Path) -> None:
    f = facts.parse(run_probe(tmp_path, "a100x8", "xid79.dmesg.txt", "/x"))
    checks = judge.judge("node0", f, 8) + judge.judge("node1", facts.NodeFacts("absent"))
    doc = table.document(checks)
    validate(doc, table.HEALTH_SCHEMA)
    assert doc["schema"] == "ddpfleet.health/1" and doc["verdict"] == FAIL
    assert [n["verdict"] for n in doc["nodes"]] == [FAIL, "warn"]
    path = table.record(_inventory(tmp_path), checks)
    table.record(_inventory(tmp_path), checks, source="train")
    assert path == tmp_path / ".ddpfleet" / "health.jsonl"
    assert (tmp_path / ".ddpfleet" / ".gitignore").read_text() == "*\n"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["node"], x["source"]) for x in lines] == [
        ("node0", "health"), ("node1", "health"), ("node0", "train"), ("node1", "train")]  # fmt: skip
    for line in lines:
        validate(line, table.HISTORY_SCHEMA)
    assert table.failures(checks)["node0"].check == "xid"
