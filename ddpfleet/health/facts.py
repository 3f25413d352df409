"""The health probe's output -> NodeFacts. Pure: recorded outputs under tests/ drive it.

nvidia-smi's CSV goes through ddpfleet.gpu's reader (`[N/A]` and other bracketed cells are
"no value", a comma in a name folds back); the kernel log lines are NVIDIA's documented
`NVRM: Xid (PCI:0000:3b:00): 79, pid=..., <text>`, from dmesg or the journal alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ddpfleet.gpu import MARK, NOT_FOUND
from ddpfleet.gpu import _cell as cell
from ddpfleet.gpu import _int as integer
from ddpfleet.gpu import _rows as csv_rows
from ddpfleet.health import netif


@dataclass(frozen=True)
class GpuHealth:
    index: int
    uuid: str
    name: str
    bus_id: str | None
    driver: str
    pstate: str | None = None
    temp_c: int | None = None
    ecc_uncorrected: int | None = None  # volatile: since the driver last loaded
    retired_pending: bool | None = None
    throttle: int | None = None  # NVML's clocks throttle reasons bitmask
    gen: int | None = None
    gen_max: int | None = None
    width: int | None = None
    width_max: int | None = None


@dataclass(frozen=True)
class Remap:
    bus_id: str
    uncorrectable: int | None
    pending: bool | None
    failed: bool | None


@dataclass(frozen=True)
class Xid:
    pci: str  # as the kernel wrote it, e.g. PCI:0000:3b:00
    code: int
    line: str


@dataclass(frozen=True)
class NodeFacts:
    smi: str  # ok | absent | failed | unparsed
    smi_rc: int | None = None
    smi_error: str | None = None
    gpus: tuple[GpuHealth, ...] = ()
    remap: tuple[Remap, ...] | None = None  # None: not supported (before Ampere) or not run
    nvlinks: dict[int, dict[int, bool]] = field(default_factory=dict)  # gpu -> link -> up
    nvlink_errors: dict[int, dict[str, int]] = field(default_factory=dict)  # gpu -> kind -> n
    xids: tuple[Xid, ...] = ()
    klog: str | None = None  # dmesg | journal | none (unreadable); None: not read
    versions: dict | None = None  # the env python's {"python", "torch", "cuda", "nccl"}
    net: netif.NetFacts | None = None  # None: the probe was not asked (no master given)

    @property
    def driver(self) -> str | None:
        return self.gpus[0].driver if self.gpus else None


@dataclass
class _Section:
    head: str = ""
    out: list[str] = field(default_factory=list)
    rc: int | None = None
    err: list[str] = field(default_factory=list)


def split(text: str) -> dict[str, _Section]:
    """Marker sections by kind; a retried query replaces the earlier attempt."""
    sections: dict[str, _Section] = {}
    current, sink = _Section(), None
    for line in text.splitlines():
        if not line.startswith(MARK + " "):
            if sink is not None and line.strip():
                sink.append(line)
            continue
        kind, _, rest = line[len(MARK) + 1 :].partition(" ")
        if kind == "rc":
            current.rc, sink = integer(rest), None
        elif kind == "stderr":
            sink = current.err
        elif kind == "end":
            sink = None
        else:
            current = sections[kind] = _Section(head=rest.strip())
            sink = current.out
    return sections


def _yes(value: str | None) -> bool | None:
    value = (cell(value) or "").lower()
    if value in ("yes", "true", "1", "pending"):
        return True
    if value in ("no", "false", "0"):
        return False
    return None


def _hex(value: str | None) -> int | None:
    value = cell(value)
    try:
        return int(value, 16) if value and value.lower().startswith("0x") else integer(value)
    except ValueError:
        return None


def parse_gpus(text: str, fields: tuple[str, ...]) -> tuple[GpuHealth, ...]:
    gpus = []
    for row in csv_rows(text, fields, free="name"):
        index = integer(row.get("index"))
        if index is None or not row.get("uuid"):
            raise ValueError(f"GPU row without index or uuid: {row!r}")
        gpus.append(
            GpuHealth(
                index=index,
                uuid=row["uuid"],
                name=row.get("name", ""),
                bus_id=cell(row.get("pci.bus_id")),
                driver=cell(row.get("driver_version")) or "",
                pstate=cell(row.get("pstate")),
                temp_c=integer(row.get("temperature.gpu")),
                ecc_uncorrected=integer(row.get("ecc.errors.uncorrected.volatile.total")),
                retired_pending=_yes(row.get("retired_pages.pending")),
                throttle=_hex(row.get("clocks_throttle_reasons.active")),
                gen=integer(row.get("pcie.link.gen.current")),
                gen_max=integer(row.get("pcie.link.gen.max")),
                width=integer(row.get("pcie.link.width.current")),
                width_max=integer(row.get("pcie.link.width.max")),
            )
        )
    return tuple(gpus)


def parse_remap(text: str, fields: tuple[str, ...]) -> tuple[Remap, ...]:
    return tuple(
        Remap(
            bus_id=row.get("gpu_bus_id", ""),
            uncorrectable=integer(row.get("remapped_rows.uncorrectable")),
            pending=_yes(row.get("remapped_rows.pending")),
            failed=_yes(row.get("remapped_rows.failure")),
        )
        for row in csv_rows(text, fields, free=fields[0])
    )


_GPU_LINE = re.compile(r"^GPU (\d+):")
# `nvidia-smi nvlink -s`: "\t Link 0: 26.562 GB/s" or "\t Link 5: <inactive>"
_LINK = re.compile(r"^\s*Link (\d+):\s*(.*)$")
# `nvidia-smi nvlink -e`: "\t Link 0: Replay Errors: 0" (and Recovery, CRC)
_LINK_ERROR = re.compile(r"^\s*Link \d+:\s*([A-Za-z ]+?) Errors?:\s*(\d+)")


def parse_nvlink_status(lines: list[str]) -> dict[int, dict[int, bool]]:
    links: dict[int, dict[int, bool]] = {}
    gpu = None
    for line in lines:
        if m := _GPU_LINE.match(line):
            gpu = int(m.group(1))
            links[gpu] = {}
        elif (m := _LINK.match(line)) and gpu is not None:
            state = m.group(2).strip().lower()
            links[gpu][int(m.group(1))] = not ("inactive" in state or state in ("", "down"))
    return links


def parse_nvlink_errors(lines: list[str]) -> dict[int, dict[str, int]]:
    errors: dict[int, dict[str, int]] = {}
    gpu = None
    for line in lines:
        if m := _GPU_LINE.match(line):
            gpu = int(m.group(1))
            errors[gpu] = {}
        elif (m := _LINK_ERROR.match(line)) and gpu is not None:
            kind = m.group(1).strip().lower()
            errors[gpu][kind] = errors[gpu].get(kind, 0) + int(m.group(2))
    return errors


_XID = re.compile(r"NVRM: Xid \((PCI:[0-9A-Fa-f:.]+)\): (\d+)")


def parse_xids(lines: list[str]) -> tuple[Xid, ...]:
    return tuple(
        Xid(m.group(1), int(m.group(2)), line.strip()) for line in lines if (m := _XID.search(line))
    )


def _versions(section: _Section | None) -> dict | None:
    for line in reversed(section.out if section else []):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _error_text(section: _Section) -> str:
    for lines in (section.err, section.out):
        if lines:
            return "\n".join(lines)
    return f"nvidia-smi exited {section.rc}"


def parse(text: str) -> NodeFacts:
    """The whole probe output -> NodeFacts; odd output is a state with its reason, never raised."""
    sections = split(text)
    versions = _versions(sections.get("versions"))
    net = netif.parse(sections)
    if "absent" in sections:
        return NodeFacts("absent", 127, NOT_FOUND, versions=versions, net=net)
    xid = sections.get("xid")
    klog = dict(klog=xid.head or None, xids=parse_xids(xid.out)) if xid else {}
    query = sections.get("query-gpu")
    if query is None or query.rc is None:
        first = (text.strip().splitlines() or ["(empty)"])[0][:200]
        return NodeFacts("unparsed", None, f"probe output not recognised: {first}")
    if query.rc != 0:
        return NodeFacts("failed", query.rc, _error_text(query), versions=versions, net=net, **klog)
    try:
        gpus = parse_gpus("\n".join(query.out), tuple(query.head.split(",")))
        remap_section = sections.get("query-remapped-rows")
        remap = None
        if remap_section and remap_section.rc == 0:
            remap = parse_remap("\n".join(remap_section.out), tuple(remap_section.head.split(",")))
    except ValueError as e:
        return NodeFacts("unparsed", query.rc, f"unparseable nvidia-smi output: {e}")
    status, errors = sections.get("nvlink-status"), sections.get("nvlink-errors")
    return NodeFacts(
        "ok",
        0,
        gpus=gpus,
        remap=remap,
        nvlinks=parse_nvlink_status(status.out) if status and status.rc == 0 else {},
        nvlink_errors=parse_nvlink_errors(errors.out) if errors and errors.rc == 0 else {},
        versions=versions,
        net=net,
        **klog,
    )
