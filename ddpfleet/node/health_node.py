"""A spare's health, judged on the node itself: may it replace a lost node? Stdlib, python 3.8.

A detached run's supervisors recover without the controller, so they cannot ask `invoke
health`; they call spare_verdict(expected_gpus) here instead. It runs the fail-level quick
checks of the controller's judge (ddpfleet/health/judge.py, xid.py) with the same rules and
thresholds, so a spare passes here exactly when `invoke train`'s gate would let it in:

    gpus            fewer than expected (nvidia-smi absent, no driver or no device: a fail
                    only where GPUs are expected; any other nvidia-smi failure always fails)
    ecc             uncorrected volatile ECC errors on any GPU
    retired pages   a retirement pending (pre-Ampere)
    remapped rows   a remap pending or failed (Ampere and later; others skip it)
    throttle        HW slowdown, HW thermal slowdown or HW power brake active
    temperature     at or above TEMP_FAIL_C
    pcie link       a GPU's link narrower than its max (a lower gen is only a warning there)
    nvlink          a link down while others are up
    xid             a fatal Xid (FATAL_XIDS) in the kernel log since boot

Warnings (SW thermal, a hot GPU, unknown Xids, an unreadable kernel log) never refuse a spare.
tests/unit/test_health_node.py runs this and the controller's probe + judge over the same
stand-ins and checks they agree, and that the constants below equal the controller's.

Also a program: `python3 health_node.py [EXPECTED_GPUS]` prints {"ok": .., "reason": ..} and
exits 0 (ok) or 1.
"""

import json
import re
import subprocess
import sys

SMI_TIMEOUT_S = 30.0  # a GPU that fell off the bus can hang nvidia-smi for minutes
KLOG_TIMEOUT_S = 10.0

# --query-gpu fields (a subset of ddpfleet.health.probe.QUERY_FIELDS, no free-text cell);
# a driver that rejects one (exit 2) is asked BASE_FIELDS, as the probe does.
QUERY_FIELDS = (
    "index",
    "pci.bus_id",
    "temperature.gpu",
    "ecc.errors.uncorrected.volatile.total",
    "retired_pages.pending",
    "clocks_throttle_reasons.active",
    "pcie.link.width.current",
    "pcie.link.width.max",
)
BASE_FIELDS = ("index", "pci.bus_id")
REMAP_FIELDS = ("gpu_bus_id", "remapped_rows.pending", "remapped_rows.failure")

# The judge's FAIL rules (judge.THROTTLE_BITS, judge.DEFAULTS, xid.XIDS, gpu.*_CODE(S)).
THROTTLE_FAIL_BITS = {0x8: "HW slowdown", 0x40: "HW thermal slowdown", 0x80: "HW power brake"}
TEMP_FAIL_C = 92
FATAL_XIDS = {
    48: "double-bit ECC error",
    64: "row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
}
NO_DRIVER_CODES = (127, 9, 12)  # nvidia-smi absent, driver not loaded, NVML missing
NO_DEVICES_CODE = 6

XID_LINE = re.compile(r"NVRM: Xid \((PCI:[0-9A-Fa-f:.]+)\): (\d+)")
LINK_LINE = re.compile(r"^\s*Link (\d+):\s*(.*)$")
GPU_LINE = re.compile(r"^GPU (\d+):")


def _run(argv, timeout):
    """(exit code, stdout, stderr); 127 when the program is missing, None when it timed out."""
    try:
        r = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            universal_newlines=True,
            timeout=timeout,
        )
    except FileNotFoundError:
        return 127, "", "not found"
    except subprocess.TimeoutExpired:
        return None, "", "timed out after %d s" % timeout
    except OSError as e:
        return 126, "", str(e)
    return r.returncode, r.stdout, r.stderr


def _value(cell):
    """A CSV cell, None for nvidia-smi's bracketed "no value" cells ([N/A], [Not Supported])."""
    cell = cell.strip()
    return None if not cell or cell.startswith("[") or cell in ("N/A", "n/a") else cell


def _int(cell):
    cell = _value(cell)
    if cell is None:
        return None
    try:
        return int(cell, 16) if cell.lower().startswith("0x") else int(float(cell))
    except ValueError:
        return None


def _yes(cell):
    return (_value(cell) or "").lower() in ("yes", "true", "1", "pending")


def _rows(text, fields):
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(fields):
            raise ValueError("expected %d fields, got: %r" % (len(fields), line))
        rows.append(dict(zip(fields, cells)))
    return rows


def _bus(address):
    """(bus, device): the kernel's PCI:0000:5d:00 and nvidia-smi's 00000000:5D:00.0 alike."""
    address = address.lower()
    if address.startswith("pci:"):
        address = address[4:]
    parts = address.split(".")[0].split(":")
    return (parts[-2], parts[-1]) if len(parts) >= 2 else (address, "")


def _smi(fields, what, timeout):
    return _run(
        ["nvidia-smi", "--%s=%s" % (what, ",".join(fields)), "--format=csv,noheader,nounits"],
        timeout,
    )


def _no_gpu(rc, err, expected):
    """nvidia-smi absent or failing: (ok, reason), as judge._no_gpu."""
    if rc == 127:
        state = "no GPU (nvidia-smi not found)"
    elif rc == NO_DEVICES_CODE:
        state = "no GPU: the driver lists no device"
    elif rc in NO_DRIVER_CODES:
        state = "no NVIDIA driver: " + err
    elif rc is None:
        return False, "nvidia-smi: " + err + "; reboot the node"
    else:
        return False, "nvidia-smi: failed (exit %s): %s" % (rc, err)
    if expected:
        return False, "gpus: %s, expected %d" % (state, expected)
    return True, state


def _gpu_faults(gpus, temp_fail_c):
    """The fail-level findings of the query-gpu rows: ["ecc: GPU 3: 2 uncorrected", ...]."""
    found = {}

    def add(check, index, text):
        found.setdefault(check, []).append("GPU %s: %s" % (index, text))

    for g in gpus:
        i = g.get("index")
        ecc = _int(g.get("ecc.errors.uncorrected.volatile.total", ""))
        if ecc:
            add("ecc", i, "%d uncorrected" % ecc)
        if _yes(g.get("retired_pages.pending", "")):
            add("retired pages", i, "retirement pending")
        bits = _int(g.get("clocks_throttle_reasons.active", "")) or 0
        named = [n for bit, n in sorted(THROTTLE_FAIL_BITS.items()) if bits & bit]
        if named:
            add("throttle", i, ", ".join(named))
        temp = _int(g.get("temperature.gpu", ""))
        if temp is not None and temp >= temp_fail_c:
            add("temperature", i, "%d C" % temp)
        width = _int(g.get("pcie.link.width.current", ""))
        width_max = _int(g.get("pcie.link.width.max", ""))
        if width is not None and width_max is not None and width < width_max:
            add("pcie link", i, "x%d of x%d" % (width, width_max))
    return ["%s: %s" % (check, "; ".join(texts)) for check, texts in found.items()]


def _remap_faults(gpus, timeout):
    rc, out, _ = _smi(REMAP_FIELDS, "query-remapped-rows", timeout)
    if rc != 0:  # before Ampere: not supported, nothing to judge
        return []
    index = {_bus(g.get("pci.bus_id") or ""): g.get("index") for g in gpus}
    bad = []
    for r in _rows(out, REMAP_FIELDS):
        flags = (("pending", r["remapped_rows.pending"]), ("FAILED", r["remapped_rows.failure"]))
        what = ", ".join(w for w, on in flags if _yes(on))
        if what:
            gpu = index.get(_bus(r["gpu_bus_id"]), r["gpu_bus_id"])
            bad.append("GPU %s: %s" % (gpu, what))
    return ["remapped rows: " + "; ".join(bad)] if bad else []


def _nvlink_faults(timeout):
    rc, out, _ = _run(["nvidia-smi", "nvlink", "-s"], timeout)
    if rc != 0:
        return []
    links, gpu = {}, None
    for line in out.splitlines():
        m = GPU_LINE.match(line)
        if m:
            gpu = int(m.group(1))
            links[gpu] = {}
            continue
        m = LINK_LINE.match(line)
        if m and gpu is not None:
            state = m.group(2).strip().lower()
            links[gpu][int(m.group(1))] = not ("inactive" in state or state in ("", "down"))
    if not any(up for ls in links.values() for up in ls.values()):
        return []  # no NVLink, or none active (PCIe only): as judge._nvlink
    down = []
    for g, ls in sorted(links.items()):
        off = [str(n) for n, up in sorted(ls.items()) if not up]
        if off:
            down.append("GPU %d: link %s down" % (g, ", ".join(off)))
    return ["nvlink: " + "; ".join(down)] if down else []


def kernel_log(timeout=KLOG_TIMEOUT_S):
    """(source, text): dmesg, else the journal's kernel messages since boot; ("none", "")."""
    rc, out, _ = _run(["dmesg"], timeout)
    if rc == 0:
        return "dmesg", out
    rc, out, _ = _run(["journalctl", "-k", "-b", "-q", "--no-pager"], timeout)
    if rc == 0:
        return "journal", out
    return "none", ""


def xid_faults(text, gpus=()):
    """The fatal Xids of a kernel log: ["xid: 79 GPU has fallen off the bus x1 (GPU 3)"]."""
    counts, where = {}, {}
    for m in XID_LINE.finditer(text):
        code = int(m.group(2))
        if code not in FATAL_XIDS:
            continue
        counts[code] = counts.get(code, 0) + 1
        gpu = m.group(1)
        for g in gpus:
            if g.get("pci.bus_id") and _bus(g["pci.bus_id"]) == _bus(m.group(1)):
                gpu = "GPU %s" % g["index"]
        where.setdefault(code, set()).add(gpu)
    parts = [
        "%d %s x%d (%s)" % (c, FATAL_XIDS[c], n, ", ".join(sorted(where[c])))
        for c, n in sorted(counts.items())
    ]
    return ["xid: " + "; ".join(parts)] if parts else []


def spare_verdict(expected_gpus, temp_fail_c=TEMP_FAIL_C, timeout=SMI_TIMEOUT_S):
    """(ok, reason) for this node: ok when no fail-level check fails (warnings never refuse).
    `expected_gpus`: the inventory's gpus for the node (0 or None: a node without nvidia-smi
    is fine). `reason` is one line: every failing check, else what was found."""
    rc, out, err = _smi(QUERY_FIELDS, "query-gpu", timeout)
    fields = QUERY_FIELDS
    if rc == 2:  # a field this driver does not know
        rc, out, err = _smi(BASE_FIELDS, "query-gpu", timeout)
        fields = BASE_FIELDS
    err = " ".join((err or out).split())[:200]
    if rc != 0:
        ok, reason = _no_gpu(rc, err, expected_gpus)
        if rc == 127:  # no driver tools: the probe does not read the kernel log either
            return ok, reason
        xids = xid_faults(kernel_log()[1])
        return (ok and not xids), "; ".join([reason] + xids)
    try:
        gpus = _rows(out, fields)
        faults = []
        if expected_gpus and len(gpus) < expected_gpus:
            faults.append("gpus: %d of %d" % (len(gpus), expected_gpus))
        faults += _gpu_faults(gpus, temp_fail_c)
        faults += _remap_faults(gpus, timeout)
    except ValueError as e:
        return False, "nvidia-smi: unparseable output: %s" % e
    faults += _nvlink_faults(timeout)
    source, text = kernel_log()
    faults += xid_faults(text, gpus)
    if faults:
        return False, "; ".join(faults)
    count = "%d GPU(s)" % len(gpus) + (" of %d" % expected_gpus if expected_gpus else "")
    klog = "" if source != "none" else " (kernel log unreadable: Xids not checked)"
    return True, "%s, no fault%s" % (count, klog)


def main(argv):
    expected = int(argv[0]) if argv and argv[0].isdigit() else None
    ok, reason = spare_verdict(expected)
    print(json.dumps({"ok": ok, "reason": reason}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
