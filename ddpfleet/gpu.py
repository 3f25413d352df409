"""GPU facts from nvidia-smi: one probe script, one pure parser.

`probe_script()` is a POSIX sh snippet run on a node in one SSH round trip; `parse_probe()`
turns its output into frozen dataclasses (their JSON shape: ddpfleet.gpujson). Nothing here
talks SSH.

nvidia-smi's CSV is the interface (NVML bindings are not on every node), so it is parsed
defensively: `[N/A]`, `[Not Supported]` and any other bracketed cell mean "no value"; a GPU
name may contain a comma (nvidia-smi does not quote it); the field list travels with the output
so an older driver that rejects `mig.mode.current` still parses after the probe's retry.

Probe output, one marker per line (`@@ddpfleet KIND ...`; the blank line before each marker
is left out here), e.g. for one A100:

    @@ddpfleet query-gpu index,uuid,name,pci.bus_id,driver_version,...
    0, GPU-0b8a4b3e-..., NVIDIA A100-SXM4-80GB, 00000000:07:00.0, 535.161.08, 97, ...
    @@ddpfleet rc 0
    @@ddpfleet stderr
    @@ddpfleet query-compute-apps gpu_uuid,pid,used_memory,process_name
    GPU-0b8a4b3e-..., 41234, 30512, /opt/conda/envs/train/bin/python
    @@ddpfleet rc 0
    @@ddpfleet stderr
    @@ddpfleet list
    GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-0b8a4b3e-...)
    @@ddpfleet ps 41234 alice /opt/conda/envs/train/bin/python train_ddp.py --epochs 3
    @@ddpfleet run-id 41234 20260106-120000-ab12
    @@ddpfleet slurm-job 41234 812
    @@ddpfleet end
"""

from __future__ import annotations

import csv
import dataclasses
import re
import shlex
from dataclasses import dataclass

# Fields asked of `--query-gpu`, in this order. mig.mode.current is last because drivers
# before R450 reject it (exit 2): the probe then retries with GPU_BASE_FIELDS.
QUERY_GPU_FIELDS: tuple[str, ...] = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "driver_version",
    "utilization.gpu",  # percent
    "memory.used",  # MiB
    "memory.total",  # MiB
    "temperature.gpu",  # degrees C
    "power.draw",  # W
    "power.limit",  # W
    "mig.mode.current",  # Enabled | Disabled | [N/A] on boards without MIG
)
GPU_BASE_FIELDS: tuple[str, ...] = QUERY_GPU_FIELDS[:-1]

# process_name is last: it is free text, so a comma in it folds back into the final cell.
QUERY_APPS_FIELDS: tuple[str, ...] = ("gpu_uuid", "pid", "used_memory", "process_name")

MARK = "@@ddpfleet"
NOT_FOUND = "nvidia-smi not found"
NO_DRIVER_CODES = (127, 9, 12)  # nvidia-smi's exit: absent, driver not loaded, NVML missing
# nvidia-smi's exit 6 ("No devices were found"): a driver that lists no GPU. Not a broken GPU
# (a reboot does not help) and not a GPU node either (cpu_only: auto gives it the CPU build).
NO_DEVICES_CODE = 6


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    user: str | None
    mem_mib: int | None
    command: str  # full command line from ps, else nvidia-smi's process_name
    run_id: str | None  # DDPFLEET_RUN_ID from the process environment, when readable
    device_uuid: str | None = None  # as nvidia-smi reported it: GPU-... or MIG-...
    slurm_job_id: str | None = None  # SLURM_JOB_ID from the process environment, when readable


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    bus_id: str | None
    driver: str
    util_pct: int | None
    mem_used_mib: int | None
    mem_total_mib: int | None
    temp_c: int | None
    power_w: float | None
    power_limit_w: float | None
    mig_mode: str | None
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class NodeGpus:
    gpus: tuple[Gpu, ...]
    driver_error: str | None  # nvidia-smi's own message, or NOT_FOUND
    exit_code: int | None  # of `nvidia-smi --query-gpu`; 127 when the binary is absent
    unattached: tuple[GpuProcess, ...] = ()  # apps whose GPU could not be determined
    notes: tuple[str, ...] = ()


# --- the probe -------------------------------------------------------------------------------

# Markers start with a newline so they begin a line even after output without one; the
# parser skips blank lines. `rc` is the exit status of the last query.
_PROBE = """\
M={mark}
mark() {{ printf '\\n%s %s\\n' "$M" "$*"; }}
if ! command -v nvidia-smi >/dev/null 2>&1; then mark absent; exit 0; fi
d=$(mktemp -d) || exit 1
trap 'rm -rf "$d"' EXIT
query() {{
  mark "$1" "$2"
  nvidia-smi "--$1=$2" --format=csv,noheader,nounits >"$d/out" 2>"$d/err"
  rc=$?
  cat "$d/out"; mark rc "$rc"; mark stderr; cat "$d/err"
}}
query query-gpu {gpu_fields}
if [ "$rc" = 2 ]; then query query-gpu {base_fields}; fi
[ "$rc" = 0 ] || {{ mark end; exit 0; }}
query query-compute-apps {app_fields}
mark list
nvidia-smi -L 2>/dev/null
cut -d, -f{pid_col} "$d/out" | tr -d ' ' | sort -u | while read -r pid; do
  case $pid in ''|*[!0-9]*) continue ;; esac
  mark ps "$pid" "$(ps -o user=,args= -p "$pid" 2>/dev/null)"
  penv=$({{ tr '\\000' '\\n' <"/proc/$pid/environ"; }} 2>/dev/null)
  mark run-id "$pid" "$(printf '%s\\n' "$penv" | sed -n 's/^DDPFLEET_RUN_ID=//p' | head -n 1)"
  mark slurm-job "$pid" "$(printf '%s\\n' "$penv" | sed -n 's/^SLURM_JOB_ID=//p' | head -n 1)"
done
mark end
"""


def probe_script() -> str:
    """One POSIX sh snippet for `sh -c` (or `sh -s` on stdin): GPUs, apps and their owners.

    Sections are marker lines (see the module docstring); a missing binary prints only
    `@@ddpfleet absent`. nvidia-smi's exit code and stderr are reported, never raised: the
    script itself exits 0 unless mktemp fails.
    """
    return _PROBE.format(
        mark=MARK,
        gpu_fields=shlex.quote(",".join(QUERY_GPU_FIELDS)),
        base_fields=shlex.quote(",".join(GPU_BASE_FIELDS)),
        app_fields=shlex.quote(",".join(QUERY_APPS_FIELDS)),
        pid_col=QUERY_APPS_FIELDS.index("pid") + 1,
    )


# --- cells and rows --------------------------------------------------------------------------

_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?")


def _cell(value: str | None) -> str | None:
    """None for nvidia-smi's no-value forms: N/A, [N/A], [Not Supported], [Unknown Error] ..."""
    if value is None:
        return None
    value = value.strip()
    if not value or value == "N/A" or (value.startswith("[") and value.endswith("]")):
        return None
    return value


def _float(value: str | None) -> float | None:
    # A leading number only, so a stray unit ("250.00 W" without nounits) still parses.
    match = _NUMBER.match(_cell(value) or "")
    return float(match.group()) if match else None


def _int(value: str | None) -> int | None:
    number = _float(value)
    return None if number is None else round(number)


def _rows(text: str, fields: tuple[str, ...], free: str) -> list[dict[str, str]]:
    """CSV rows as {field: cell}. nvidia-smi does not quote, so a comma inside the free-text
    cell (a name, a process path) gives extra cells: those fold back into `free` as written."""
    width, at = len(fields), fields.index(free)
    rows = []
    for line in text.splitlines():
        row = next(csv.reader([line], skipinitialspace=True), [])
        if not "".join(row).strip():
            continue
        if len(row) < width:
            raise ValueError(f"expected {width} fields ({','.join(fields)}), got: {line!r}")
        if len(row) > width:
            # Split the raw line, not the csv cells: they lost the space after each comma.
            row = line.split(",")
            extra = len(row) - width
            row = row[:at] + [",".join(row[at : at + extra + 1])] + row[at + extra + 1 :]
        rows.append(dict(zip(fields, (cell.strip() for cell in row))))
    return rows


def parse_gpu_csv(text: str, fields: tuple[str, ...] = QUERY_GPU_FIELDS) -> tuple[Gpu, ...]:
    """`nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits` -> Gpus (no processes).

    Example line: `0, GPU-0b8a..., NVIDIA A100-SXM4-80GB, 00000000:07:00.0, 535.161.08, 97,
    30515, 81920, 61, 312.45, 400.00, Disabled`. Fields absent from FIELDS read as None.
    """
    gpus = []
    for row in _rows(text, fields, free="name"):
        index = _int(row.get("index"))
        if index is None or not row.get("uuid"):
            raise ValueError(f"GPU row without index or uuid: {row!r}")
        gpus.append(
            Gpu(
                index=index,
                uuid=row["uuid"],
                name=row.get("name", ""),
                bus_id=_cell(row.get("pci.bus_id")),
                driver=_cell(row.get("driver_version")) or "",
                util_pct=_int(row.get("utilization.gpu")),
                mem_used_mib=_int(row.get("memory.used")),
                mem_total_mib=_int(row.get("memory.total")),
                temp_c=_int(row.get("temperature.gpu")),
                power_w=_float(row.get("power.draw")),
                power_limit_w=_float(row.get("power.limit")),
                mig_mode=_cell(row.get("mig.mode.current")),
            )
        )
    return tuple(gpus)


def parse_apps_csv(
    text: str, fields: tuple[str, ...] = QUERY_APPS_FIELDS
) -> tuple[GpuProcess, ...]:
    """`nvidia-smi --query-compute-apps=FIELDS --format=csv,noheader,nounits` -> processes.

    Example line: `GPU-0b8a..., 41234, 30512, /opt/conda/envs/train/bin/python`. `user` and
    `run_id` stay None here; `parse_probe` fills them from ps and /proc.
    """
    apps = []
    for row in _rows(text, fields, free="process_name"):
        pid = _int(row.get("pid"))
        if pid is None:
            raise ValueError(f"compute-app row without pid: {row!r}")
        apps.append(
            GpuProcess(
                pid=pid,
                user=None,
                mem_mib=_int(row.get("used_memory")),
                command=row.get("process_name", ""),
                run_id=None,
                device_uuid=_cell(row.get("gpu_uuid")),
            )
        )
    return tuple(apps)


def parse_mig_list(text: str) -> dict[str, str]:
    """`nvidia-smi -L` -> {MIG device uuid: parent GPU uuid}.

    Example lines: `GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5f4b...)` then, indented,
    `  MIG 3g.20gb     Device  0: (UUID: MIG-8a1f...)`.
    """
    parents: dict[str, str] = {}
    gpu = None
    for line in text.splitlines():
        match = re.search(r"\(UUID: ([^)\s]+)\)", line)
        if not match:
            continue
        if line.startswith("GPU "):
            gpu = match.group(1)
        elif line.lstrip().startswith("MIG") and gpu:
            parents[match.group(1)] = gpu
    return parents


# --- the whole probe -------------------------------------------------------------------------


@dataclass
class _Section:
    fields: tuple[str, ...] = ()
    out: list[str] = dataclasses.field(default_factory=list)
    rc: int | None = None
    err: list[str] = dataclasses.field(default_factory=list)


def _split(text: str) -> tuple[dict[str, _Section], list[str], dict[str, dict[int, str]]]:
    """Probe text -> (query sections by kind, `-L` lines, per pid: ps line, run id, Slurm job)."""
    sections: dict[str, _Section] = {}
    listing: list[str] = []
    by_pid: dict[str, dict[int, str]] = {"ps": {}, "run-id": {}, "slurm-job": {}}
    sink: list[str] | None = None
    current = _Section()
    for line in text.splitlines():
        if not line.startswith(MARK + " "):
            if sink is not None:
                sink.append(line)
            continue
        kind, _, rest = line[len(MARK) + 1 :].partition(" ")
        if kind.startswith("query-"):  # a retry replaces the earlier attempt
            current = sections[kind] = _Section(fields=tuple(rest.split(",")))
            sink = current.out
        elif kind == "rc":
            current.rc, sink = _int(rest), None
        elif kind == "stderr":
            sink = current.err
        elif kind == "list":
            sink = listing
        elif kind in by_pid:
            pid, _, value = rest.partition(" ")
            if pid.isdigit():
                by_pid[kind][int(pid)] = value.strip()
            sink = None
        else:  # absent / end
            sink = None
    return sections, listing, by_pid


def _error_text(section: _Section) -> str:
    # nvidia-smi prints most failures (no driver, NVML missing) on stdout, some on stderr.
    for lines in (section.err, section.out):
        text = "\n".join(line for line in lines if line.strip())
        if text:
            return text
    return f"nvidia-smi exited {section.rc}"


def _owner(app: GpuProcess, by_pid: dict[str, dict[int, str]]) -> GpuProcess:
    user, _, args = by_pid["ps"].get(app.pid, "").partition(" ")
    return dataclasses.replace(
        app,
        user=user or None,
        command=args.strip() or app.command,
        run_id=by_pid["run-id"].get(app.pid) or None,
        slurm_job_id=by_pid["slurm-job"].get(app.pid) or None,
    )


def _parent(
    uuid: str | None, gpus: tuple[Gpu, ...], migs: dict[str, str]
) -> tuple[str | None, str]:
    """(GPU uuid an app runs on, note): the GPU itself, its MIG parent per `-L`, the legacy
    MIG form, or, failing those, the node's only MIG-enabled GPU (noted as a guess)."""
    if uuid is None or uuid in {gpu.uuid for gpu in gpus}:
        return uuid, ""
    if uuid in migs:
        return migs[uuid], ""
    if uuid.startswith("MIG-GPU-"):  # R450's "MIG-GPU-<parent uuid>/<gi>/<ci>"
        return uuid[len("MIG-") :].split("/")[0], ""
    mig_gpus = [gpu for gpu in gpus if gpu.mig_mode == "Enabled"]
    if uuid.startswith("MIG-") and len(mig_gpus) == 1:
        only = mig_gpus[0]
        return only.uuid, f"parent of {uuid} assumed: GPU {only.index}, the only MIG GPU"
    return None, f"GPU of device {uuid} not known"


def _attach(gpus: tuple[Gpu, ...], apps: tuple[GpuProcess, ...], migs: dict[str, str]) -> NodeGpus:
    by_uuid: dict[str | None, list[GpuProcess]] = {gpu.uuid: [] for gpu in gpus}
    unattached, notes = [], []
    for app in apps:
        parent, note = _parent(app.device_uuid, gpus, migs)
        if note:
            notes.append(f"pid {app.pid}: {note}")
        by_uuid.get(parent, unattached).append(app)
    attached = tuple(dataclasses.replace(gpu, processes=tuple(by_uuid[gpu.uuid])) for gpu in gpus)
    return NodeGpus(attached, None, 0, tuple(unattached), tuple(notes))


def parse_probe(text: str) -> NodeGpus:
    """The output of `probe_script()` -> NodeGpus. Never raises on odd output: it says why."""
    if f"{MARK} absent" in text.splitlines():
        return NodeGpus((), NOT_FOUND, 127)
    sections, listing, by_pid = _split(text)
    query = sections.get("query-gpu")
    if query is None or query.rc is None:
        first = text.strip().splitlines()[:1] or ["(empty)"]
        return NodeGpus((), f"probe output not recognised: {first[0][:200]}", None)
    if query.rc != 0:
        return NodeGpus((), _error_text(query), query.rc)
    try:
        gpus = parse_gpu_csv("\n".join(query.out), query.fields)
        apps_section = sections.get("query-compute-apps", _Section(rc=None))
        apps: tuple[GpuProcess, ...] = ()
        if apps_section.rc == 0:
            apps = parse_apps_csv("\n".join(apps_section.out), apps_section.fields)
    except ValueError as exc:
        return NodeGpus((), f"unparseable nvidia-smi output: {exc}", query.rc)
    node = _attach(
        gpus, tuple(_owner(app, by_pid) for app in apps), parse_mig_list("\n".join(listing))
    )
    if apps_section.rc != 0:
        reason = _error_text(apps_section) if apps_section.rc is not None else "not run"
        node = dataclasses.replace(node, notes=node.notes + (f"compute apps: {reason}",))
    return node
