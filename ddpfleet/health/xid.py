"""Xid events from the kernel log: named, judged, placed on their GPU."""

from __future__ import annotations

from collections import Counter

from ddpfleet.health.check import FAIL, ORDER, PASS, WARN, Check
from ddpfleet.health.facts import NodeFacts

# Xid codes by name (NVIDIA's Xid catalogue); fails are hardware faults a rerun on this node
# would meet again, warns are faults an application can cause by itself (a bad kernel, OOB).
XIDS: dict[int, tuple[str, str]] = {
    13: ("graphics engine exception", WARN),
    31: ("GPU memory page fault (MMU)", WARN),
    43: ("GPU stopped processing", WARN),
    48: ("double-bit ECC error", FAIL),
    63: ("row remapping event", WARN),
    64: ("row remapping failure", FAIL),
    74: ("NVLink error", FAIL),
    79: ("GPU has fallen off the bus", FAIL),
    92: ("high single-bit ECC error rate", WARN),
    94: ("contained ECC error", WARN),
    95: ("uncontained ECC error", FAIL),
}
XID_FIX = {
    48: "reset the GPU (nvidia-smi -r) or reboot; replace it if the DBE returns",
    64: "drain the node and replace the GPU (its spare rows are used up)",
    74: "reboot; check the NVLink bridge/baseboard if it returns",
    79: "reboot the node; reseat or replace the GPU if it falls off again",
    95: "reboot the node (an uncontained ECC error may have corrupted other work)",
}


def check(node: str, facts: NodeFacts, gpus) -> Check:
    if facts.klog in (None, "none"):
        return Check(
            node,
            "xid",
            "kernel log unreadable",
            WARN,
            "let the login user sudo, or set sysctl kernel.dmesg_restrict=0",
        )
    if not facts.xids:
        return Check(node, "xid", "none since boot", PASS)
    counts = Counter(x.code for x in facts.xids)
    verdict = max((XIDS.get(code, ("", WARN))[1] for code in counts), key=ORDER.__getitem__)
    parts = []
    for code, n in sorted(counts.items()):
        name = XIDS.get(code, ("",))[0]
        where = sorted({_gpu_of(x.pci, gpus) for x in facts.xids if x.code == code})
        parts.append(f"{code}" + (f" {name}" if name else "") + f" x{n} ({', '.join(where)})")
    fixes = [XID_FIX[c] for c in sorted(counts) if c in XID_FIX]
    fix = fixes[0] if fixes else "see NVIDIA's Xid catalogue; reboot clears the log's record"
    return Check(node, "xid", "; ".join(parts), verdict, fix)


def _bus(address: str) -> tuple[str, str]:
    """(bus, device) of a PCI address: the kernel's PCI:0000:5d:00 and nvidia-smi's
    00000000:5D:00.0 name the same GPU."""
    parts = address.lower().removeprefix("pci:").split(".")[0].split(":")
    return (parts[-2], parts[-1]) if len(parts) >= 2 else (address.lower(), "")


def _gpu_of(pci: str, gpus) -> str:
    for g in gpus:
        if g.bus_id and _bus(g.bus_id) == _bus(pci):
            return f"GPU {g.index}"
    return pci
