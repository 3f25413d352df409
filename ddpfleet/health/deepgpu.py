"""`invoke health --deep`'s GPU rows: GEMM TFLOPS and a memory pass per GPU, NCCL in each node.

    measure(fleet, names, pythons)   deep_node.py on every node at once, in the env's python
    judge(results, limits, gpus)     its JSON (or the node's error) -> three rows a node:

    gemm               a GPU below health.gemm_tflops where given, else below gemm_ratio (0.8)
                       of its node's median or of the fleet's median for that GPU model (the
                       node's catches one slow GPU, the fleet's a node whose GPUs all are)
    memory             any word read back wrong fails its GPU; no threshold
    allreduce in node  NCCL busbw between the node's GPUs, below health.node_busbw_gbps where
                       given, else below node_busbw_ratio (0.8) of the median of the nodes
                       with the same GPUs (model and count: topology sets the ceiling)

A node where torch sees no CUDA device passes as "no GPU", as the quick checks do, unless it
has GPUs (the inventory's `gpus`, else nvidia-smi's list): then CUDA is broken under a driver
that answers, and its one `cuda` row fails. A node without nvidia-smi and without GPUs in the
inventory is not probed (NO_DRIVER). Recorded outputs (tests/standins/health/deep/)
drive judge in the tests.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ddpfleet.errors import CommandTimeout, NodeError
from ddpfleet.health.check import FAIL, PASS, WARN, Check, worst

if TYPE_CHECKING:
    from ddpfleet.ssh.fleetbase import FleetBase

# What a node without nvidia-smi (and no GPUs in the inventory) answers, unasked: the probe's
# torch import costs seconds, and CUDA cannot work without the driver.
NO_DRIVER = {"cuda": False, "reason": "nvidia-smi not found", "torch": None}
PROBE_TIMEOUT_S = 300.0  # ~30 s on 8 H100s; CUDA init and NCCL's first communicator are slow
DEFAULT_RATIO = 0.8
NODE_PROGRAM = Path(__file__).with_name("deep_node.py")
GIB = 1024**3

SLOW_FIX = ("see its clocks and throttle reasons (nvidia-smi -q -d PERFORMANCE,CLOCK -i {i}), "
            "its cooling and power cap; reset it or drain the node if it stays slow")  # fmt: skip
ERROR_FIX = ("check the kernel log for Xid (invoke health), reset the GPU (nvidia-smi -r -i {i}) "
             "or drain the node")  # fmt: skip
MEMORY_FIX = ("its memory returns wrong data: drain the node and have the GPU replaced "
              "(nvidia-smi -q -d ECC,ROW_REMAPPER -i {i} shows what the driver saw)")  # fmt: skip
NCCL_FIX = ("check the links between its GPUs: nvidia-smi topo -m and nvidia-smi nvlink -s (a link "
            "down or P2P off halves it; 8x H100 SXM reach 460-480 GB/s, 8x A100 SXM 230-250)")  # fmt: skip


def parse(stdout: str) -> dict:
    """The probe's JSON: its last line that is one (torch may print warnings before it)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line")


def measure(fleet: FleetBase, names, pythons: Mapping[str, str]) -> dict[str, object]:
    """{node: the probe's JSON | NodeError}, every node at once (their GPUs are their own)."""
    source = NODE_PROGRAM.read_text()

    def one(conn) -> dict:
        argv = [pythons[conn.name], "-c", source]
        try:
            r = conn.run(argv, timeout=PROBE_TIMEOUT_S, check=False)
        except CommandTimeout:  # its message would quote the program's first 80 characters
            why = f"the GPU probe ran past {PROBE_TIMEOUT_S:.0f} s (stopped); a GPU may hang"
            raise NodeError(conn.name, why) from None
        try:
            return parse(r.stdout)
        except ValueError:
            why = (r.stderr.strip().splitlines() or [f"exit {r.exit_code}"])[-1]
            raise NodeError(
                conn.name, f"GPU probe failed (exit {r.exit_code}): {why[:300]}"
            ) from None

    return fleet.map(one, list(names))


ABSOLUTE = {"gemm": "gemm_tflops", "node_busbw": "node_busbw_gbps"}  # the inventory's floors


def _floor(limits: Mapping[str, float], key: str, median: float, whose: str) -> tuple[float, str]:
    """The floor and how it was set: the inventory's figure, else a ratio of `whose` median."""
    if ABSOLUTE[key] in limits:
        return limits[ABSOLUTE[key]], f"health.{ABSOLUTE[key]} {limits[ABSOLUTE[key]]:g}"
    ratio = limits.get(key + "_ratio", DEFAULT_RATIO)
    return ratio * median, f"{ratio:g}x {whose} median {median:.0f}"


def _measured(g: dict) -> bool:
    return bool(g["gemm"]["tflops"]) and not g["gemm"]["error"]


def _gemm(node: str, gpus: list[dict], fleet: Mapping[str, float], limits) -> Check:
    """A GPU is held against the higher of its node's and the fleet's median for its model."""
    mine: dict[str, list[float]] = {}
    for g in filter(_measured, gpus):
        mine.setdefault(g["name"], []).append(g["gemm"]["tflops"])
    bad: dict[int, tuple[str, str]] = {}
    for g in gpus:
        i, m = g["index"], g["gemm"]
        if not _measured(g):
            bad[i] = (m["error"] or "not measured", ERROR_FIX.format(i=i))
            continue
        ours, theirs = statistics.median(mine[g["name"]]), fleet.get(g["name"], 0.0)
        median, whose = (ours, "the node's") if ours >= theirs else (theirs, "the fleet's")
        floor, why = _floor(limits, "gemm", median, whose)
        if m["tflops"] < floor:
            bad[i] = (f"{m['tflops']:.0f} TFLOPS {m['dtype']}, below {why}", SLOW_FIX.format(i=i))
    if bad:
        value = "; ".join(f"GPU {i}: {text}" for i, (text, _) in bad.items())
        first = min(bad)
        return Check(node, "gemm", value, FAIL, f"GPU {first}: {bad[first][1]}")
    figures = [g["gemm"]["tflops"] for g in gpus]
    value = (
        f"{len(gpus)} GPU(s) {min(figures):.0f}-{max(figures):.0f} TFLOPS {gpus[0]['gemm']['dtype']} "
        f"(node median {statistics.median(figures):.0f}, fleet {fleet.get(gpus[0]['name'], 0):.0f})"
    )
    return Check(node, "gemm", value, PASS)


def _memory(node: str, gpus: list[dict]) -> Check:
    """Any word read back wrong fails; a GPU with no memory free to test (another process holds
    it) only warns."""
    bad: dict[int, tuple[str, str, str]] = {}
    for g in gpus:
        i, m = g["index"], g["memory"]
        if m["mismatches"]:
            gib = m["bytes"] / GIB
            text = f"{m['mismatches']} word(s) read back wrong in {gib:.1f} GiB"
            bad[i] = (text, FAIL, MEMORY_FIX.format(i=i))
        elif m["error"]:
            verdict = WARN if m["error"].startswith("no memory free") else FAIL
            bad[i] = (f"not tested: {m['error']}", verdict, ERROR_FIX.format(i=i))
    if bad:
        verdict = worst(Check(node, "", "", v) for _, v, _ in bad.values())
        first = min(i for i, b in bad.items() if b[1] == verdict)
        value = "; ".join(f"GPU {i}: {b[0]}" for i, b in bad.items())
        return Check(node, "memory", value, verdict, f"GPU {first}: {bad[first][2]}")
    least = min(g["memory"]["bytes"] for g in gpus) / GIB
    took = max(g["memory"]["seconds"] for g in gpus)
    passes = min(g["memory"]["passes"] for g in gpus)
    value = (f"{len(gpus)} GPU(s): {least:.1f} GiB each written and read back {passes}x, "
             f"0 mismatches ({took:.1f} s)")  # fmt: skip
    return Check(node, "memory", value, PASS)


def _topology(r: dict) -> tuple[str, int]:
    """What sets a node's NCCL ceiling, roughly: its GPU model and count."""
    return (r["gpus"][0]["name"], len(r["gpus"]))


def _allreduce(node: str, r: dict, medians: Mapping[tuple[str, int], float], limits) -> Check:
    a = r.get("allreduce")
    if not a:
        return Check(node, "allreduce in node", "1 GPU: nothing to all_reduce", PASS)
    if a["error"] or a["busbw"] is None:
        why = a["error"] or "no figure"
        fix = "run it with NCCL_DEBUG=INFO to see why; " + NCCL_FIX
        return Check(node, "allreduce in node", f"NCCL failed: {why}", FAIL, fix)
    floor, why = _floor(limits, "node_busbw", medians[_topology(r)], "the like nodes'")
    value = f"busbw {a['busbw']:.0f} GB/s over {a['gpus']} GPUs (floor {floor:.0f}: {why})"
    if a["busbw"] < floor:
        return Check(node, "allreduce in node", value, FAIL, NCCL_FIX)
    return Check(node, "allreduce in node", value, PASS)


def judge(
    results: Mapping[str, object], limits: Mapping[str, float], gpus: Mapping[str, int | None]
) -> list[Check]:
    """Every node's GPU rows, in `results`' order. `gpus`: how many GPUs each node has (the
    inventory's, else nvidia-smi's count): torch seeing none there fails."""
    probed = {n: r for n, r in results.items() if isinstance(r, dict) and r.get("gpus")}
    per_model: dict[str, list[float]] = {}
    by_topology: dict[tuple[str, int], list[float]] = {}
    for r in probed.values():
        for g in filter(_measured, r["gpus"]):
            per_model.setdefault(g["name"], []).append(g["gemm"]["tflops"])
        if (r.get("allreduce") or {}).get("busbw"):
            by_topology.setdefault(_topology(r), []).append(r["allreduce"]["busbw"])
    fleet = {name: statistics.median(v) for name, v in per_model.items()}
    medians = {t: statistics.median(v) for t, v in by_topology.items()}
    rows: list[Check] = []
    for node, r in results.items():
        if isinstance(r, NodeError):
            fix = ("check the env's torch (invoke bootstrap) and the kernel log (invoke health), "
                   "then run invoke health --deep again")  # fmt: skip
            rows.append(Check(node, "gpu probe", f"not measured: {r.message}", FAIL, fix))
        elif node not in probed:
            rows += _no_gpu(node, r, gpus.get(node))
        else:
            gpus_here = r["gpus"]
            rows += [
                _gemm(node, gpus_here, fleet, limits),
                _memory(node, gpus_here),
                _allreduce(node, r, medians, limits),
            ]
    return rows


def _no_gpu(node: str, r: dict, expected: int | None) -> list[Check]:
    reason = r.get("reason") or "torch lists no CUDA device"
    if expected:
        return [Check(node, "cuda", f"torch sees no GPU ({reason}), but the node has {expected}",
                      FAIL, "torch cannot use the GPUs: match the driver to torch's CUDA "
                      "(invoke health shows both), check CUDA_VISIBLE_DEVICES")]  # fmt: skip
    state = f"no GPU ({reason})"
    return [Check(node, check, state, PASS) for check in ("gemm", "memory", "allreduce in node")]
