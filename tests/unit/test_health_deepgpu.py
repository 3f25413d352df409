"""--deep's GPU rows: the controller's judge over recorded GPU-probe outputs (stand-ins under
tests/standins/health/deep/, built from typical H100/A100 figures, not captured on a GPU), and
the node program itself run here on CPU torch (its no-GPU answer, and its GEMM and memory pass
on a CPU device, with a bad word injected)."""

from __future__ import annotations

import ast
import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from ddpfleet import inventory as inv
from ddpfleet.errors import InventoryError, NodeError
from ddpfleet.health import deepgpu, table
from ddpfleet.health.check import FAIL, PASS
from tests.unit.test_gpu_parse import validate

STANDINS = Path(__file__).resolve().parents[1] / "standins" / "health" / "deep"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def out(name: str) -> dict:
    return deepgpu.parse((STANDINS / f"{name}.out").read_text())


def rows(fleet: dict[str, str], limits=None, gpus=None) -> dict[tuple[str, str], object]:
    """{(node, check): Check} for nodes whose probe printed these stand-ins."""
    results = {node: out(name) for node, name in fleet.items()}
    checks = deepgpu.judge(results, limits or {}, gpus or {n: 8 for n in fleet})
    return {(c.node, c.check): c for c in checks}


def verdicts(got) -> dict[tuple[str, str], str]:
    return {key: c.verdict for key, c in got.items()}


HEALTHY = {"n0": "h100x8", "n1": "h100x8", "n2": "a100x8"}


def test_healthy_h100_and_a100_nodes_pass_with_no_warning() -> None:
    got = rows(HEALTHY)
    assert set(verdicts(got).values()) == {PASS}
    assert {check for _, check in got} == {"gemm", "memory", "allreduce in node"}
    assert got[("n0", "gemm")].value == (
        "8 GPU(s) 703-721 TFLOPS bf16 (node median 711, fleet 711)"
    )
    assert got[("n0", "memory")].value.startswith("8 GPU(s): 62.0 GiB each written and read back")
    assert got[("n2", "allreduce in node")].value.startswith("busbw 236 GB/s over 8 GPUs")


def test_one_gpu_at_60_percent_is_named_alone_or_among_others() -> None:
    for fleet in ({"n0": "h100x8_slow_gpu"}, {**HEALTHY, "n3": "h100x8_slow_gpu"}):
        got = rows(fleet)
        bad = {key for key, v in verdicts(got).items() if v == FAIL}
        assert bad == {("n3" if "n3" in fleet else "n0", "gemm")}, got
    gemm = got[("n3", "gemm")]
    assert gemm.value == "GPU 3: 427 TFLOPS bf16, below 0.8x the node's median 711"
    assert gemm.fix.startswith("GPU 3: see its clocks") and "-i 3" in gemm.fix


def test_a_node_whose_gpus_are_all_slow_fails_against_the_fleet() -> None:
    got = rows({"n0": "h100x8", "n1": "h100x8", "n2": "h100x8_throttled"})
    assert verdicts(got)[("n2", "gemm")] == FAIL
    assert "below 0.8x the fleet's median" in got[("n2", "gemm")].value
    assert verdicts(got)[("n0", "gemm")] == PASS
    alone = rows({"n2": "h100x8_throttled"})  # nothing to compare with: only a floor fails it
    assert verdicts(alone)[("n2", "gemm")] == PASS
    floor = rows({"n2": "h100x8_throttled"}, {"gemm_tflops": 600})
    assert floor[("n2", "gemm")].verdict == FAIL
    assert floor[("n2", "gemm")].value.startswith(
        "GPU 0: 442 TFLOPS bf16, below health.gemm_tflops 600"
    )


def test_an_a100_is_never_held_against_h100s() -> None:
    got = rows({"n0": "h100x8", "n1": "h100x8", "n2": "h100x8", "n3": "a100x8"})
    assert set(verdicts(got).values()) == {PASS}, got


def test_memory_mismatches_fail_the_gpu_with_the_fix() -> None:
    got = rows({**HEALTHY, "n3": "h100x8_bad_memory"})
    assert {k for k, v in verdicts(got).items() if v == FAIL} == {("n3", "memory")}
    memory = got[("n3", "memory")]
    assert memory.value == "GPU 5: 3 word(s) read back wrong in 62.0 GiB"
    assert memory.fix.startswith("GPU 5: its memory returns wrong data: drain the node")


def test_slow_nvlink_fails_against_like_nodes_or_the_inventory_floor() -> None:
    got = rows({**HEALTHY, "n3": "h100x8_nvlink_down"})
    assert {k for k, v in verdicts(got).items() if v == FAIL} == {("n3", "allreduce in node")}
    assert got[("n3", "allreduce in node")].value == (
        "busbw 232 GB/s over 8 GPUs (floor 377: 0.8x the like nodes' median 472)"
    )
    assert "nvidia-smi nvlink -s" in got[("n3", "allreduce in node")].fix
    alone = rows({"n3": "h100x8_nvlink_down"}, {"node_busbw_gbps": 460})
    assert alone[("n3", "allreduce in node")].verdict == FAIL
    assert "health.node_busbw_gbps 460" in alone[("n3", "allreduce in node")].value


def test_a_cuda_error_fails_its_gpu_and_nccl() -> None:
    got = rows({"n0": "h100x8", "n1": "h100x8_cuda_error"})
    assert verdicts(got) == {
        ("n0", "gemm"): PASS, ("n0", "memory"): PASS, ("n0", "allreduce in node"): PASS,
        ("n1", "gemm"): FAIL, ("n1", "memory"): FAIL, ("n1", "allreduce in node"): FAIL,
    }  # fmt: skip
    assert (
        got[("n1", "gemm")].value == "GPU 6: CUDA error: an illegal memory access was encountered"
    )
    assert "nvidia-smi -r -i 6" in got[("n1", "gemm")].fix
    assert got[("n1", "allreduce in node")].value.startswith("NCCL failed: NCCL Error 1")


def test_no_gpu_passes_unless_the_node_has_gpus() -> None:
    for name in ("cpu", "nocuda"):
        got = rows({"n0": name}, gpus={"n0": 0})
        assert {(c, v) for (_, c), v in verdicts(got).items()} == {
            ("gemm", PASS), ("memory", PASS), ("allreduce in node", PASS)}  # fmt: skip
        assert got[("n0", "gemm")].value == "no GPU (torch.cuda.is_available() is False)"
    unasked = deepgpu.judge({"n0": deepgpu.NO_DRIVER}, {}, {"n0": 0})  # no nvidia-smi: not probed
    assert {(c.value, c.verdict) for c in unasked} == {("no GPU (nvidia-smi not found)", PASS)}
    broken = rows({"n0": "nocuda"}, gpus={"n0": 8})  # the driver answers, CUDA does not
    assert list(broken) == [("n0", "cuda")]
    assert broken[("n0", "cuda")].verdict == FAIL
    assert broken[("n0", "cuda")].value.endswith("but the node has 8")


def test_a_probe_that_did_not_finish_fails_with_its_reason() -> None:
    results = {"n0": out("h100x8"), "n1": NodeError("n1", "timed out after 300s")}
    got = {(c.node, c.check): c for c in deepgpu.judge(results, {}, {"n0": 8, "n1": 8})}
    assert got[("n1", "gpu probe")].verdict == FAIL
    assert got[("n1", "gpu probe")].value == "not measured: timed out after 300s"
    assert got[("n0", "gemm")].verdict == PASS


def test_the_json_document_carries_the_new_rows_in_its_schema() -> None:
    checks = deepgpu.judge(
        {"n0": out("h100x8_slow_gpu"), "n1": out("cpu")}, {}, {"n0": 8, "n1": None}
    )
    doc = table.document(checks)
    validate(doc, table.HEALTH_SCHEMA)
    n0 = doc["nodes"][0]
    assert (n0["node"], n0["verdict"]) == ("n0", "fail")
    assert [c["check"] for c in n0["checks"]] == ["gemm", "memory", "allreduce in node"]


@pytest.mark.parametrize("key", ["gemm_ratio", "node_busbw_ratio"])
def test_the_inventory_takes_the_new_floors_and_refuses_a_ratio_of_one(tmp_path, key) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text(f"health:\n  gemm_tflops: 600\n  node_busbw_gbps: 460\n  {key}: 1.5\n"
                    "nodes: {a: {host: h}}\n")  # fmt: skip
    with pytest.raises(InventoryError, match=rf"inventory.yaml:4: health.{key}: must be below 1"):
        inv.load(path)
    path.write_text(path.read_text().replace("1.5", "0.7"))
    assert dict(inv.load(path).health) == {"gemm_tflops": 600, "node_busbw_gbps": 460, key: 0.7}


# --- the node program ---------------------------------------------------------------------------


def test_the_node_program_is_python_3_8() -> None:
    ast.parse(deepgpu.NODE_PROGRAM.read_text(), feature_version=(3, 8))


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed in this venv")
def test_without_cuda_the_program_says_no_gpu_and_the_judge_passes_it() -> None:
    source = deepgpu.NODE_PROGRAM.read_text()
    r = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = deepgpu.parse(r.stdout)
    assert result["cuda"] is False and result["reason"] == "torch.cuda.is_available() is False"
    got = deepgpu.judge({"n0": result}, {}, {"n0": None})
    assert {(c.check, c.verdict) for c in got} == {
        ("gemm", PASS), ("memory", PASS), ("allreduce in node", PASS)}  # fmt: skip


@pytest.fixture(scope="module")
def node():
    if not HAS_TORCH:
        pytest.skip("torch is not installed in this venv")
    return runpy.run_path(str(deepgpu.NODE_PROGRAM), run_name="deep_node")


def test_the_gemm_measures_every_device_and_checks_the_product(node) -> None:
    import torch

    cpu = torch.device("cpu")
    got = node["gemm"]([cpu], n=128, warmup_s=0.05, seconds=0.1)[cpu]
    assert got["error"] == "" and got["dtype"] == "bf16" and got["iters"] >= 10
    assert got["tflops"] > 0


def test_the_memory_pass_counts_every_bad_word_in_both_patterns(node) -> None:
    import torch

    cpu = torch.device("cpu")
    clean = node["memory"](cpu, words=10_000, chunk=1024)
    assert (clean["mismatches"], clean["passes"], clean["bytes"]) == (0, 2, 80_000)

    def stuck_bits(buf):  # what a bad cell does: a word reads back changed, in every pass
        buf[17] ^= 1
        buf[9_999] ^= 1 << 62

    bad = node["memory"](cpu, words=10_000, chunk=1024, between=stuck_bits)
    assert (bad["mismatches"], bad["passes"], bad["error"]) == (4, 2, "")
    filled = torch.empty(3000, dtype=torch.int64)
    for invert in (False, True):  # every word is its index XOR the pattern, then its complement
        node["fill"](filled, 0, 3000, invert)
        want = torch.arange(3000) ^ node["PATTERN"]
        assert torch.equal(filled, ~want if invert else want)
