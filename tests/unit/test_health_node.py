"""node/health_node.py (a spare judged on the node itself) over the recorded stand-ins, held
against the controller's own probe + judge on the same stand-ins: a spare passes there exactly
when `invoke train`'s gate would let it in, and the shared constants are equal."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ddpfleet import gpu
from ddpfleet.health import facts, judge, probe, xid
from ddpfleet.health.check import FAIL, WARN
from ddpfleet.node import NODE_DIR

STANDINS = Path(__file__).resolve().parents[1] / "standins"
HEALTH = STANDINS / "health"
PROGRAM = NODE_DIR / "health_node.py"


def _load():
    """The node program as the supervisor loads it: by path, never through ddpfleet."""
    spec = importlib.util.spec_from_file_location("health_node", PROGRAM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


node = _load()


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """A PATH whose nvidia-smi is the stand-in (`nvlink -s` from $FAKE_NVLINK where set) and
    whose dmesg / journalctl print $FAKE_DMESG / $FAKE_JOURNAL (refused where unset)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    scripts = {
        "nvidia-smi": '[ "$1" = nvlink ] && [ -n "$FAKE_NVLINK" ] && exec cat "$FAKE_NVLINK"\n'
        f'exec {sys.executable} {STANDINS / "nvidia-smi"} "$@"\n',
        "dmesg": '[ -n "$FAKE_DMESG" ] && exec cat "$FAKE_DMESG"\necho refused >&2; exit 1\n',
        "journalctl": '[ -n "$FAKE_JOURNAL" ] && exec cat "$FAKE_JOURNAL"\nexit 1\n',
    }
    for name, body in scripts.items():
        (bin_ / name).write_text("#!/bin/sh\n" + body)
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    for var in ("DDPFLEET_STANDIN_GPU", "FAKE_NVLINK", "FAKE_DMESG", "FAKE_JOURNAL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DDPFLEET_STANDIN_GPU_FILE", str(tmp_path / "no-config"))
    return bin_


def controller_fails(expected: int | None) -> list[judge.Check]:
    """What the gate refuses on this machine: the real probe, parsed and judged."""
    out = subprocess.run(
        ["sh", "-c", probe.script("/nonexistent/python")], capture_output=True, text=True
    ).stdout
    rows = judge.judge("spare", facts.parse(out), expected_gpus=expected)
    return [c for c in rows if c.verdict == FAIL and c.check != "versions"]


ECC = "ecc.errors.uncorrected.volatile.total"
# (stand-in config, expected gpus, {env: recording}, the node's verdict)
SCENARIOS = [
    ("h100x8", 8, {}, True),
    ("h100x8", None, {"FAKE_DMESG": "h100x8.dmesg.txt"}, True),
    ("h100x8", 9, {}, False),  # a GPU missing from the count
    (f"h100x8 set={ECC}:2@3", 8, {}, False),
    ("v100x4 set=retired_pages.pending:Yes@1", 4, {}, False),
    ("h100x8 set=remapped_rows.pending:Yes@1", 8, {}, False),
    ("h100x8 set=remapped_rows.failure:Yes@2", 8, {}, False),
    ("h100x8 set=clocks_throttle_reasons.active:0x0000000000000040@5", 8, {}, False),
    ("h100x8 set=clocks_throttle_reasons.active:0x0000000000000020@5", 8, {}, True),  # warn
    ("h100x8 set=temperature.gpu:93@0", 8, {}, False),
    ("h100x8 set=temperature.gpu:88@0", 8, {}, True),  # warn
    ("h100x8 set=pcie.link.width.current:4@2", 8, {}, False),
    ("h100x8 set=pcie.link.gen.current:2@2", 8, {}, True),  # a lower gen only warns
    ("h100x8", 8, {"FAKE_NVLINK": "h100x8.nvlink-s.txt"}, True),
    ("h100x8", 8, {"FAKE_NVLINK": "nvlink_down.nvlink-s.txt"}, False),
    ("h100x8", 8, {"FAKE_DMESG": "xid79.dmesg.txt"}, False),
    ("h100x8", 8, {"FAKE_DMESG": "xid48.dmesg.txt"}, False),
    ("h100x8", 8, {"FAKE_JOURNAL": "xid13.journal.txt"}, True),  # 13: the app's own fault
    ("no_driver", None, {}, True),
    ("no_driver", 0, {}, True),
    ("no_driver", 8, {}, False),
    ("no_devices", 8, {}, False),
    ("h100x8 fail=15", None, {}, False),  # GPU lost: whatever the inventory says
    ("h100x8 fail=255", None, {"FAKE_DMESG": "xid79.dmesg.txt"}, False),
]


@pytest.mark.parametrize(("config", "expected", "logs", "ok"), SCENARIOS)
def test_the_node_and_the_controller_agree(bin_dir, monkeypatch, config, expected, logs, ok):
    monkeypatch.setenv("DDPFLEET_STANDIN_GPU", config)
    for var, name in logs.items():
        monkeypatch.setenv(var, str(HEALTH / name))
    verdict, reason = node.spare_verdict(expected)
    assert verdict is ok, reason
    fails = controller_fails(expected)
    assert (not fails) is ok, [c.line for c in fails]
    for c in fails:  # the node names every check the gate refuses
        assert f"{c.check}:" in reason, (c.line, reason)
    assert "\n" not in reason


@pytest.mark.parametrize(
    ("config", "expected", "logs", "reason"),
    [
        ("h100x8", 8, {"FAKE_DMESG": "h100x8.dmesg.txt"}, "8 GPU(s) of 8, no fault"),
        ("h100x8", 9, {}, "gpus: 8 of 9"),
        (f"h100x8 set={ECC}:2@3", 8, {}, "ecc: GPU 3: 2 uncorrected"),
        ("h100x8 set=remapped_rows.pending:Yes@1", 8, {}, "remapped rows: GPU 1: pending"),
        ("h100x8", 8, {"FAKE_NVLINK": "nvlink_down.nvlink-s.txt"}, "nvlink: GPU 4: link 7 down"),
        (
            "h100x8",
            8,
            {"FAKE_DMESG": "xid79.dmesg.txt"},
            "xid: 79 GPU has fallen off the bus x1 (GPU 3)",
        ),
        (
            "h100x8",
            8,
            {"FAKE_DMESG": "xid48.dmesg.txt"},
            "xid: 48 double-bit ECC error x1 (GPU 1)",
        ),
        ("no_driver", 8, {}, "gpus: no NVIDIA driver: "),
    ],
)
def test_the_reason_names_the_check_and_the_gpu(
    bin_dir, monkeypatch, config, expected, logs, reason
):
    monkeypatch.setenv("DDPFLEET_STANDIN_GPU", config)
    for var, name in logs.items():
        monkeypatch.setenv(var, str(HEALTH / name))
    assert node.spare_verdict(expected)[1].startswith(reason)


def test_without_nvidia_smi_a_node_without_expected_gpus_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    assert node.spare_verdict(None) == (True, "no GPU (nvidia-smi not found)")
    assert node.spare_verdict(0)[0] is True
    assert node.spare_verdict(4) == (False, "gpus: no GPU (nvidia-smi not found), expected 4")


def test_an_unreadable_kernel_log_is_said_not_refused(bin_dir, monkeypatch):
    monkeypatch.setenv("DDPFLEET_STANDIN_GPU", "h100x8")
    assert node.spare_verdict(8) == (
        True,
        "8 GPU(s) of 8, no fault (kernel log unreadable: Xids not checked)",
    )


def test_a_hung_nvidia_smi_fails_within_the_timeout(bin_dir, monkeypatch):
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexec sleep 30\n")
    ok, reason = node.spare_verdict(8, timeout=0.5)
    assert not ok and reason.startswith("nvidia-smi: timed out after 0 s"), reason


def test_the_program_prints_its_verdict_and_exits_with_it(bin_dir, monkeypatch):
    monkeypatch.setenv("DDPFLEET_STANDIN_GPU", f"h100x8 set={ECC}:1@0")
    r = subprocess.run([sys.executable, str(PROGRAM), "8"], capture_output=True, text=True)
    assert (r.returncode, json.loads(r.stdout)) == (
        1,
        {"ok": False, "reason": "ecc: GPU 0: 1 uncorrected"},
    )


def test_the_rules_are_the_controllers():
    assert {c: n for c, (n, v) in xid.XIDS.items() if v == FAIL} == node.FATAL_XIDS
    assert {
        bit: n for bit, (n, v) in judge.THROTTLE_BITS.items() if v == FAIL
    } == node.THROTTLE_FAIL_BITS
    assert set(judge.THROTTLE_BITS) - set(node.THROTTLE_FAIL_BITS) == {
        bit for bit, (_, v) in judge.THROTTLE_BITS.items() if v == WARN
    }
    assert judge.DEFAULTS["temp_fail_c"] == node.TEMP_FAIL_C
    assert set(node.QUERY_FIELDS) <= set(probe.QUERY_FIELDS)
    assert set(node.BASE_FIELDS) <= set(probe.BASE_FIELDS)
    assert set(node.REMAP_FIELDS) <= set(probe.REMAP_FIELDS)
    assert (node.NO_DRIVER_CODES, node.NO_DEVICES_CODE) == (
        gpu.NO_DRIVER_CODES,
        gpu.NO_DEVICES_CODE,
    )
    assert node.XID_LINE.pattern == facts._XID.pattern


def test_it_is_python_3_8_and_stdlib_only():
    tree = ast.parse(PROGRAM.read_text(), feature_version=(3, 8))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in imported), imported
