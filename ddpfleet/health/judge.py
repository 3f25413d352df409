"""NodeFacts + what the inventory expects -> Check rows (pass / warn / fail, with the fix). Pure.

A node's rows come from its facts alone (`judge`); `versions.compare` then holds every node's
driver, torch, CUDA and NCCL against the fleet's most common value. A fail refuses the node
(`invoke train`'s gate, the exit code of `invoke health`); a warn is shown, never refused.
"""

from __future__ import annotations

from collections.abc import Mapping

from ddpfleet.gpu import NO_DEVICES_CODE, NO_DRIVER_CODES
from ddpfleet.health import versions, xid
from ddpfleet.health.check import FAIL, ORDER, PASS, WARN, Check, worst
from ddpfleet.health.facts import GpuHealth, NodeFacts

__all__ = ["FAIL", "PASS", "WARN", "Check", "judge", "worst"]

# NVML's clocks throttle (event) reasons: the bits that mean the hardware holds the clocks down.
THROTTLE_BITS: dict[int, tuple[str, str]] = {
    0x8: ("HW slowdown", FAIL),
    0x20: ("SW thermal slowdown", WARN),
    0x40: ("HW thermal slowdown", FAIL),
    0x80: ("HW power brake", FAIL),
}
IDLE_PSTATES = ("P8", "P10", "P12")  # an idle GPU lowers its PCIe gen on purpose

DEFAULTS = {"temp_warn_c": 85, "temp_fail_c": 92}


def _per_gpu(node: str, check: str, gpus, bad, ok: str, fix: str, verdict: str = FAIL) -> Check:
    """One row for a per-GPU check: the GPUs `bad` names (index -> text), else `ok`."""
    found = {g.index: text for g in gpus if (text := bad(g))}
    if not found:
        return Check(node, check, ok, PASS)
    return Check(node, check, "; ".join(f"GPU {i}: {t}" for i, t in found.items()), verdict, fix)


def _count(node: str, facts: NodeFacts, expected: int | None) -> Check:
    n = len(facts.gpus)
    if expected is None:
        return Check(node, "gpus", f"{n} (inventory: not set)", PASS)
    if n < expected:
        return Check(
            node,
            "gpus",
            f"{n} of {expected}",
            FAIL,
            "a GPU is missing: check the kernel log for Xid 79, reseat or replace it; "
            f"or set nodes.{node}.gpus",
        )
    if n > expected:
        return Check(
            node, "gpus", f"{n}, inventory says {expected}", WARN, f"set nodes.{node}.gpus: {n}"
        )
    return Check(node, "gpus", f"{n} of {expected}", PASS)


def _no_gpu(node: str, facts: NodeFacts, expected: int | None) -> list[Check]:
    """nvidia-smi absent or failing: "no GPU" unless the inventory says the node has GPUs."""
    if facts.smi == "absent":
        state, fix = "no GPU (nvidia-smi not found)", "install the NVIDIA driver"
    elif facts.smi_rc == NO_DEVICES_CODE:
        state, fix = "no GPU: the driver lists no device", "check the GPUs are passed through"
    elif facts.smi_rc in NO_DRIVER_CODES:
        state, fix = f"no NVIDIA driver: {facts.smi_error}", "load or reinstall the driver"
    else:
        return [
            Check(
                node,
                "nvidia-smi",
                f"failed (exit {facts.smi_rc}): {facts.smi_error}",
                FAIL,
                "reboot the node; reseat the GPU if it stays lost",
            )
        ]
    if expected:
        return [Check(node, "gpus", f"{state}, inventory says {expected}", FAIL, fix)]
    return [Check(node, "gpus", state, PASS)]


def _pcie(g: GpuHealth) -> tuple[str, str] | None:
    if g.width is not None and g.width_max is not None and g.width < g.width_max:
        return f"x{g.width} of x{g.width_max}", FAIL
    if g.gen is not None and g.gen_max is not None and g.gen < g.gen_max:
        return f"gen {g.gen} of {g.gen_max}", PASS if g.pstate in IDLE_PSTATES else WARN
    return None


def _gpu_checks(node: str, facts: NodeFacts, limits: Mapping[str, float]) -> list[Check]:
    gpus = facts.gpus
    rows = [
        _per_gpu(
            node,
            "ecc",
            gpus,
            lambda g: f"{g.ecc_uncorrected} uncorrected" if g.ecc_uncorrected else "",
            "0 uncorrected (volatile)",
            "drain the node, reset the GPU (nvidia-smi -r -i N) or reboot",
        ),
        _per_gpu(
            node,
            "retired pages",
            gpus,
            lambda g: "retirement pending" if g.retired_pending else "",
            "none pending",
            "reboot (or reset the GPU) so the pages are retired",
        ),
    ]
    if facts.remap is not None:
        index = {(g.bus_id or "").lower(): g.index for g in gpus}
        bad = {}
        for r in facts.remap:
            what = ", ".join(w for w, on in (("pending", r.pending), ("FAILED", r.failed)) if on)
            if what:
                bad[index.get(r.bus_id.lower(), r.bus_id)] = (what, r.failed)
        value = "; ".join(f"GPU {i}: {w}" for i, (w, _) in bad.items()) or "none pending"
        fix = (
            "replace the GPU: row remapping failed"
            if any(f for _, f in bad.values())
            else "reset the GPU (nvidia-smi -r) or reboot to apply the remap"
        )
        rows.append(Check(node, "remapped rows", value, FAIL if bad else PASS, fix if bad else ""))
    rows.append(_throttle(node, gpus))
    temps = [g.temp_c for g in gpus if g.temp_c is not None]
    hot = max(temps, default=None)
    verdict = (
        PASS
        if hot is None or hot < limits["temp_warn_c"]
        else WARN
        if hot < limits["temp_fail_c"]
        else FAIL
    )
    value = "not reported" if hot is None else f"max {hot} C"
    if verdict != PASS:
        value += " (GPU " + ", ".join(str(g.index) for g in gpus if g.temp_c == hot) + ")"
    rows.append(
        Check(
            node,
            "temperature",
            value,
            verdict,
            "" if verdict == PASS else "check the cooling and airflow",
        )
    )
    links = {g.index: r for g in gpus if (r := _pcie(g))}
    verdict = max((v for _, v in links.values()), key=ORDER.__getitem__, default=PASS)
    shown = {i: t for i, (t, v) in links.items() if v != PASS}
    rows.append(
        Check(
            node,
            "pcie link",
            "; ".join(f"GPU {i}: {t}" for i, t in shown.items()) or "at max",
            verdict,
            "reseat the GPU or its riser; check the slot's BIOS link setting"
            if verdict != PASS
            else "",
        )
    )
    rows.append(_nvlink(node, facts))
    rows.append(xid.check(node, facts, gpus))
    return rows


def _throttle(node: str, gpus) -> Check:
    def reasons(g: GpuHealth) -> list[tuple[str, str]]:
        return [named for bit, named in THROTTLE_BITS.items() if (g.throttle or 0) & bit]

    bad = {g.index: reasons(g) for g in gpus if reasons(g)}
    if not bad:
        return Check(node, "throttle", "none active", PASS)
    verdict = max((v for rs in bad.values() for _, v in rs), key=ORDER.__getitem__)
    value = "; ".join(f"GPU {i}: " + ", ".join(n for n, _ in rs) for i, rs in bad.items())
    return Check(node, "throttle", value, verdict, "check cooling, power supply and PSU cabling")


def _nvlink(node: str, facts: NodeFacts) -> Check:
    if not any(facts.nvlinks.values()):
        return Check(node, "nvlink", "none", PASS)
    if not any(up for links in facts.nvlinks.values() for up in links.values()):
        return Check(node, "nvlink", "no link active (PCIe only)", PASS)
    down = {g: [n for n, up in links.items() if not up] for g, links in facts.nvlinks.items()}
    down = {g: ls for g, ls in down.items() if ls}
    if down:
        value = "; ".join(f"GPU {g}: link {', '.join(map(str, ls))} down" for g, ls in down.items())
        return Check(
            node, "nvlink", value, FAIL, "reset the GPUs or reboot; check the NVSwitch/bridge"
        )
    errors = {g: {k: n for k, n in e.items() if n} for g, e in facts.nvlink_errors.items()}
    errors = {g: e for g, e in errors.items() if e}
    up = sum(len(links) for links in facts.nvlinks.values())
    if errors:
        value = "; ".join(
            f"GPU {g}: " + ", ".join(f"{n} {k}" for k, n in e.items()) for g, e in errors.items()
        )
        return Check(
            node,
            "nvlink",
            f"{up} up; errors {value}",
            WARN,
            "watch the counters (nvidia-smi nvlink -e); reset them with -re",
        )
    return Check(node, "nvlink", f"{up} up, no errors", PASS)


def judge(
    node: str,
    facts: NodeFacts,
    expected_gpus: int | None = None,
    limits: Mapping[str, float] | None = None,
    env: str | None = None,
) -> list[Check]:
    """One node's rows. `expected_gpus`: the inventory's nodes.<node>.gpus (None: not set)."""
    limits = {**DEFAULTS, **(limits or {})}
    if facts.smi == "unparsed":
        return [Check(node, "probe", facts.smi_error or "", FAIL, "run nvidia-smi on the node")]
    if facts.smi != "ok":
        rows = _no_gpu(node, facts, expected_gpus)
        if facts.xids:
            rows.append(xid.check(node, facts, ()))
    else:
        rows = [_count(node, facts, expected_gpus), *_gpu_checks(node, facts, limits)]
    return rows + [versions.row(node, facts, env)]
