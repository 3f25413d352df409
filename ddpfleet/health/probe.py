"""The quick health probe: one POSIX sh snippet, run on a node in one SSH round trip.

Sections are marker lines, as in ddpfleet.gpu (`@@ddpfleet KIND ...`, each after a newline),
so ddpfleet.health.facts can split them without guessing:

    @@ddpfleet versions                      the env's python: one JSON line (torch, cuda, nccl)
    {"python": "3.10.12", "torch": "2.3.1+cu121", "cuda": "12.1", "nccl": "2.20.5"}
    @@ddpfleet net                           the run's master as this node resolves it, the
    master 10.0.0.10                         hostname's address (gloo's own pick goes by it),
    hostname gpu-a 127.0.1.1                 then net-route (`ip -o route get` the master),
    @@ddpfleet net-route ...                 net-addr (`ip -o -4 addr show`) and net-link
                                             (`ip -o link show`): netif.py judges them
    @@ddpfleet query-gpu index,uuid,...      nvidia-smi --query-gpu=FIELDS (csv,noheader,nounits)
    0, GPU-5503..., NVIDIA H100 80GB HBM3, 00000000:18:00.0, 550.54.15, P0, 41, 0, ...
    @@ddpfleet rc 0
    @@ddpfleet stderr
    @@ddpfleet query-remapped-rows gpu_bus_id,...   Ampere and later; others fail it (rc != 0)
    @@ddpfleet nvlink-status                 nvidia-smi nvlink -s
    @@ddpfleet nvlink-errors                 nvidia-smi nvlink -e
    @@ddpfleet xid dmesg                     the kernel log's "NVRM: Xid" lines since boot
    [ 8121.5] NVRM: Xid (PCI:0000:3b:00): 79, pid=2716, GPU has fallen off the bus.
    @@ddpfleet end

A node without nvidia-smi prints only its versions, its net sections and `@@ddpfleet absent`.
The kernel log is read where nvidia-smi exists (a GPU that fell off the bus still leaves its
Xid there); dmesg first, journalctl -k -b where dmesg is refused, `xid none` when neither can
be read.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from ddpfleet.errors import BecomeError, NodeError
from ddpfleet.gpu import MARK

if TYPE_CHECKING:  # the warm path (kept.py) must not load paramiko
    from ddpfleet.ssh.connection import Conn

PROBE_TIMEOUT_S = 30.0  # a GPU that fell off the bus can hang nvidia-smi for minutes

# `--query-gpu` fields, in this order. clocks_throttle_reasons.active is the NVML bitmask
# (judge.THROTTLE_BITS); drivers from R535 also call it clocks_event_reasons.active and still
# accept this name. A driver that rejects a field (exit 2) is asked BASE_FIELDS instead.
QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "driver_version",
    "pstate",  # P0 busy .. P8 idle: an idle GPU lowers its PCIe gen to save power
    "temperature.gpu",
    "ecc.errors.uncorrected.volatile.total",
    "retired_pages.pending",  # Yes | No; [N/A] from Ampere on (row remapping replaced it)
    "clocks_throttle_reasons.active",
    "pcie.link.gen.current",
    "pcie.link.gen.max",
    "pcie.link.width.current",
    "pcie.link.width.max",
)
BASE_FIELDS: tuple[str, ...] = ("index", "uuid", "name", "pci.bus_id", "driver_version")
REMAP_FIELDS: tuple[str, ...] = (
    "gpu_bus_id",
    "remapped_rows.correctable",
    "remapped_rows.uncorrectable",
    "remapped_rows.pending",
    "remapped_rows.failure",
)

# The env's python says what torch it holds without importing torch (seconds saved on every
# gate): torch/version.py is a few assignments; NCCL is its own wheel with pip. Python 3.8.
VERSIONS_PY = """
import importlib.util, json, os, platform
out = {"python": platform.python_version(), "torch": None, "cuda": None, "nccl": None}
spec = importlib.util.find_spec("torch")
if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    scope = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
    except (OSError, SyntaxError):
        pass
    out["torch"], out["cuda"] = scope.get("__version__"), scope.get("cuda")
    if out["cuda"]:
        try:
            from importlib import metadata
            for dist in metadata.distributions():
                if (dist.metadata.get("Name") or "").lower().startswith("nvidia-nccl"):
                    out["nccl"] = dist.version
        except Exception:
            pass
print(json.dumps(out))
"""

_PROBE = """\
M={mark}
mark() {{ printf '\\n%s %s\\n' "$M" "$*"; }}
mark versions
if [ -x {python} ]; then {python} -c {versions} 2>/dev/null | tail -n 1; fi
{net}if ! command -v nvidia-smi >/dev/null 2>&1; then mark absent; exit 0; fi
d=$(mktemp -d) || exit 1
trap 'rm -rf "$d"' EXIT
section() {{
  mark "$1" "$2"; shift 2
  "$@" >"$d/out" 2>"$d/err"
  rc=$?
  cat "$d/out"; mark rc "$rc"; mark stderr; cat "$d/err"
}}
klog() {{
  if dmesg >"$d/k" 2>/dev/null; then src=dmesg
  elif journalctl -k -b -q --no-pager >"$d/k" 2>/dev/null; then src=journal
  else src=none; : >"$d/k"; fi
  mark xid "$src"
  grep -F 'NVRM: Xid' "$d/k" | tail -n 200
}}
section query-gpu {fields} nvidia-smi --query-gpu={fields} --format=csv,noheader,nounits
if [ "$rc" = 2 ]; then
  section query-gpu {base} nvidia-smi --query-gpu={base} --format=csv,noheader,nounits
fi
if [ "$rc" = 0 ]; then
  section query-remapped-rows {remap} nvidia-smi --query-remapped-rows={remap} \\
    --format=csv,noheader,nounits
  section nvlink-status '' nvidia-smi nvlink -s
  section nvlink-errors '' nvidia-smi nvlink -e
fi
klog
mark end
"""


# What netif.py judges: how this node reaches the master (`master`: its inventory host; an
# address is taken as it is where getent is missing) and what gloo's own pick would go by.
_NET = """\
net() {{
  mark net
  PATH=$PATH:/usr/sbin:/sbin  # ip lives there; a login user's PATH may lack it
  if ! command -v ip >/dev/null 2>&1; then echo noip; return; fi
  set -- $(getent ahostsv4 {master} 2>/dev/null); m=${{1:-}}
  case {master} in *[!0-9.]*) ;; *) m=${{m:-{master}}} ;; esac
  echo "master $m"
  h=$(hostname 2>/dev/null || uname -n)
  set -- $(getent ahostsv4 "$h" 2>/dev/null)
  echo "hostname $h ${{1:-}}"
  mark net-route
  if [ -n "$m" ]; then ip -o route get "$m" 2>/dev/null; fi
  mark net-addr
  ip -o -4 addr show 2>/dev/null
  mark net-link
  ip -o link show 2>/dev/null
}}
net
"""


def script(python: str, master: str | None = None) -> str:
    """The probe for `sh -c`; `python` is the training env's interpreter (absent: no versions),
    `master` the run's master host (None: no interface check). It exits 0 whatever nvidia-smi
    does: every exit code and message is in the output."""
    return _PROBE.format(
        mark=MARK,
        net=_NET.format(master=shlex.quote(master)) if master else "",
        python=shlex.quote(python),
        versions=shlex.quote(VERSIONS_PY),
        fields=shlex.quote(",".join(QUERY_FIELDS)),
        base=shlex.quote(",".join(BASE_FIELDS)),
        remap=shlex.quote(",".join(REMAP_FIELDS)),
    )


def run(
    conn: Conn, python: str, master: str | None = None, timeout: float = PROBE_TIMEOUT_S
) -> str:
    """The probe's output from one node. As root where sudo makes that cheap: dmesg is often
    refused to other users (kernel.dmesg_restrict); a node that cannot become root is probed
    as the login user, and its kernel log may then read as unreadable (a warning)."""
    try:
        root = conn.escalation.via_sudo
    except BecomeError:
        root = False
    result = conn.run(["sh", "-c", script(python, master)], timeout=timeout, root=root, check=False)
    if f"{MARK} end" not in result.stdout and f"{MARK} absent" not in result.stdout:
        what = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise NodeError(conn.name, f"health probe failed (exit {result.exit_code}): {what[0]}")
    return result.stdout
