"""ddpfleet.gpustatus: totals, rows, the --json document and --watch, on nodes made from the
recorded nvidia-smi output (the probe run by sh against the stand-in, as in test_gpu_parse)."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from rich.console import Console

from ddpfleet import gpu, gpustatus, report
from ddpfleet.errors import CommandError, NodeError, Unreachable
from ddpfleet.ssh.become import Escalation
from ddpfleet.ssh.connection import Result
from tests.unit.test_gpu_parse import probe, run_probe, strip_section, validate

UNREACHABLE = Unreachable("node9", "timeout: no answer from 10.0.0.9:22 within 5s")
TIMED_OUT = CommandError("node8", "sh -c ...", None, "timed out after 30.0s")


def nodes(**selections: str) -> dict[str, gpu.NodeGpus | NodeError]:
    """{node name: recording} -> results as gpustatus.query gives them."""
    return {name: probe(selection) for name, selection in selections.items()}


# --- totals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selections, errors, expect",
    [
        # nodes, unqueried, no_gpu, gpus, busy, idle, mem used MiB, mem total MiB
        ({"n0": "a100x8"}, {}, (1, 0, 0, 8, 2, 6, 61058, 655360)),
        ({"n0": "h100x8"}, {}, (1, 0, 0, 8, 3, 5, 130434, 652472)),  # GPU 2: 12 %, own app
        ({"n0": "a100_mig"}, {}, (1, 0, 0, 2, 2, 0, 29581, 81920)),  # util [N/A]: busy by apps
        ({"n0": "na_power", "n1": "no_driver"}, {}, (2, 0, 1, 2, 0, 2, 0, 30720)),
        ({"n0": "v100x4"}, {"node9": UNREACHABLE, "node8": TIMED_OUT},
         (3, 2, 0, 4, 1, 3, 11623, 64640)),
        ({}, {"node9": UNREACHABLE}, (1, 1, 0, 0, 0, 0, 0, 0)),
    ],
)  # fmt: skip
def test_totals(selections: dict, errors: dict, expect: tuple) -> None:
    results = {**nodes(**selections), **errors}
    assert dataclasses.astuple(gpustatus.totals(results)) == expect


def test_busy_is_apps_or_utilisation() -> None:
    idle = probe("a100x8").gpus[2]
    assert not gpustatus.is_busy(idle)
    assert gpustatus.is_busy(dataclasses.replace(idle, util_pct=3))
    mig = probe("a100_mig").gpus[1]
    assert mig.util_pct is None and gpustatus.is_busy(mig)


def test_failed_is_only_what_could_not_be_queried() -> None:
    results = {**nodes(n0="a100x8", n1="no_driver"), "node9": UNREACHABLE, "node8": TIMED_OUT}
    assert list(report.failed(results)) == ["node9", "node8"]


# --- rows ------------------------------------------------------------------------------------


def test_gpu_rows_one_per_gpu_with_processes() -> None:
    rows = gpustatus.node_rows("node0", probe("a100x8"))
    assert [r[1] for r in rows] == [str(i) for i in range(8)]
    assert rows[0] == (
        "node0", "0", "NVIDIA A100-SXM4-80GB", "97 %", "29.8 / 80.0 GiB", "61 C", "312 W / 400 W",
        "41234 ? 29.8 GiB python3.10",
    )  # fmt: skip
    assert rows[2][7] == "-"


MIG_GPU0_APPS = """\
30001 ? 9.6 GiB python3.10
30002 ? - python3.10"""


@pytest.mark.parametrize(
    "selection, index, column, text",
    [
        ("na_power", 0, 6, "-"),  # power.draw and power.limit [N/A]
        ("a100_mig", 0, 1, "0 MIG"),
        ("a100_mig", 0, 3, "-"),  # utilization [N/A] under MIG
        ("a100_mig", 0, 7, MIG_GPU0_APPS),
        ("comma_name", 0, 2, "Tesla V100, PCIe 32GB"),
    ],
)  # fmt: skip
def test_gpu_row_cells(selection: str, index: int, column: int, text: str) -> None:
    assert gpustatus.node_rows("n", probe(selection))[index][column] == text


def test_process_owner_and_run_id() -> None:
    p = gpu.GpuProcess(41234, "alice", 30512, "python train_ddp.py --epochs 3", "20260106-ab12")
    assert gpustatus._process(p) == "41234 alice 29.8 GiB python train_ddp.py --epochs 3 " \
        "[run 20260106-ab12]"  # fmt: skip
    long = dataclasses.replace(p, command="x" * 100, run_id=None)
    assert gpustatus._process(long).endswith(" " + "x" * 37 + "...")
    env = dataclasses.replace(p, command="/opt/conda/envs/ddp/bin/python3.10 -u train.py")
    assert gpustatus._process(env).endswith(" python3.10 -u train.py [run 20260106-ab12]")
    job = dataclasses.replace(p, slurm_job_id="812")
    assert gpustatus._process(job).endswith(" [run 20260106-ab12] [slurm job 812]")


@pytest.mark.parametrize(
    "outcome, text",
    [
        (gpu.NodeGpus((), gpu.NOT_FOUND, 127), "no NVIDIA driver: nvidia-smi not found"),
        ("no_driver", "no NVIDIA driver: NVIDIA-SMI has failed because it couldn't communicate"),
        ("fail=12", "no NVIDIA driver: NVIDIA-SMI couldn't find libnvidia-ml.so"),
        ("fail=15", "nvidia-smi failed (exit 15): Unable to determine the device handle"),
        ("no_devices", "no GPU: the driver is loaded but lists no device (No devices were found)"),
        (UNREACHABLE, "unreachable: timeout: no answer from 10.0.0.9:22 within 5s"),
        (TIMED_OUT, "not queried: command failed (exit None): sh -c ...: timed out after 30.0s"),
    ],
)
def test_one_row_for_a_node_without_gpus(outcome, text: str) -> None:
    outcome = probe(outcome) if isinstance(outcome, str) else outcome
    (row,) = gpustatus.node_rows("node1", outcome)
    assert row[0] == "node1" and row[1] == "-" and row[2].startswith(text)
    assert row[3:] == ("",) * 5


def test_unattached_processes_get_their_own_row() -> None:
    app = gpu.GpuProcess(77, "bob", 100, "python", None, "MIG-unknown")
    node = dataclasses.replace(probe("na_power"), unattached=(app,))
    rows = gpustatus.node_rows("n", node)
    assert len(rows) == 3 and rows[-1][1:3] == ("?", "GPU not known") and "77 bob" in rows[-1][7]


@pytest.mark.parametrize(
    "results, expect",
    [
        (nodes(n0="a100x8"), ("total", "8", "2 busy, 6 idle", "", "59.6 / 640.0 GiB", "", "",
                              "1 node")),
        ({**nodes(n0="v100x4", n1="no_driver"), "node9": UNREACHABLE},
         ("total", "4", "1 busy, 3 idle", "", "11.4 / 63.1 GiB", "", "",
          "3 nodes, 1 without GPUs, 1 not queried")),
    ],
)  # fmt: skip
def test_totals_row(results: dict, expect: tuple) -> None:
    assert gpustatus.totals_row(gpustatus.totals(results)) == expect


def text_of(renderable, width: int = 200) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_render_table_totals_last_then_notes() -> None:
    mig = gpu.parse_probe(strip_section(run_probe("a100_mig"), "list"))  # no -L: GPUs unknown
    results = {"node0": probe("a100x8"), "node1": probe("no_driver"), "node2": mig}
    lines = text_of(gpustatus.render(results)).splitlines()
    body = [line for line in lines if line.startswith("│") and line.split("│")[1].strip()]
    # A100s, the no-driver row, the MIG GPUs, their apps of unknown GPU, the totals
    assert [line.split("│")[2].strip() for line in body] == [
        *map(str, range(8)),
        "-",
        "0 MIG",
        "1 MIG",
        "?",
        "10",
    ]
    assert "no NVIDIA driver" in body[8] and body[-1].split("│")[1].strip() == "total"
    assert "node2: pid 30001: GPU of device MIG-0cddde3e" in lines[-3]  # the parser's notes


# --- --json ----------------------------------------------------------------------------------

WHEN = datetime(2026, 1, 6, 12, 0, tzinfo=timezone.utc)


def test_document_matches_the_schema() -> None:
    results = {**nodes(node0="a100x8", node1="no_driver", node2="a100_mig", node3="comma_name"),
               "node9": UNREACHABLE, "node8": TIMED_OUT}  # fmt: skip
    doc = gpustatus.document(results, WHEN)
    assert json.loads(json.dumps(doc)) == doc
    validate(doc, gpustatus.REPORT_SCHEMA)
    assert (
        doc["schema"] == "ddpfleet.gpu-status-report/2"
        and doc["time"] == "2026-01-06T12:00:00+00:00"
    )
    # one id for the whole output: every node object names the document's
    assert {n["schema"] for n in doc["nodes"]} == {doc["schema"]}
    assert [n["node"] for n in doc["nodes"]] == list(results)
    by = {n["node"]: n for n in doc["nodes"]}
    assert by["node9"]["reachable"] is False and "no answer" in by["node9"]["error"]
    assert by["node8"]["reachable"] is True and by["node8"]["exit_code"] is None
    assert by["node1"]["exit_code"] == 9 and by["node1"]["gpus"] == []
    assert doc["totals"] == dataclasses.asdict(gpustatus.totals(results))


def test_report_schema_is_not_vacuous() -> None:
    doc = gpustatus.document(nodes(node0="a100x8"), WHEN)
    for broken in (
        {**doc, "extra": 1},
        {**doc, "schema": "ddpfleet.gpu-status/1"},
        {**doc, "totals": {**doc["totals"], "gpus": "8"}},
        {**doc, "nodes": [{**doc["nodes"][0], "gpus": "none"}]},
    ):
        with pytest.raises(AssertionError):
            validate(broken, gpustatus.REPORT_SCHEMA)


# --- the probe and --watch, against fakes ------------------------------------------------------


class FakeConn:
    name = "node0"
    escalation = Escalation("root", "root")  # logged in as root: the probe runs as it is

    def __init__(self, stdout: str):
        self.stdout, self.commands = stdout, []

    def run(self, command, timeout=None, **kw) -> Result:
        self.commands.append(command)
        return Result(self.name, "sh", 0, self.stdout, "", 0.01)


def test_probe_is_one_round_trip_of_the_probe_script() -> None:
    conn = FakeConn(run_probe("v100x4"))
    node = gpustatus.probe(conn)  # type: ignore[arg-type]
    assert conn.commands == [["sh", "-c", gpu.probe_script()]] and len(node.gpus) == 4


def test_probe_output_we_do_not_know_is_an_error() -> None:
    with pytest.raises(NodeError, match="probe output not recognised: Welcome"):
        gpustatus.probe(FakeConn("Welcome to the node\n"))  # type: ignore[arg-type]


class FakeFleet:
    """Answers query() with one canned result set after another; counts the rounds."""

    def __init__(self, rounds: list[dict]):
        self.rounds, self.calls, self.reconnects = rounds, 0, []

    def map(self, fn):
        self.calls += 1
        return self.rounds[min(self.calls, len(self.rounds)) - 1]

    def reconnect_lost(self) -> list[str]:
        self.reconnects.append(self.calls)
        return []


def sleeps_then_interrupt(monkeypatch, n: int) -> list[float]:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        if len(slept) == n:
            raise KeyboardInterrupt
        slept.append(seconds)

    monkeypatch.setattr(gpustatus, "time", SimpleNamespace(sleep=sleep))
    return slept


def test_watch_json_lines_until_ctrl_c(monkeypatch, capsys) -> None:
    rounds = [nodes(node0="a100x8"), {"node0": UNREACHABLE}, nodes(node0="v100x4")]
    fleet = FakeFleet(rounds)
    slept = sleeps_then_interrupt(monkeypatch, 2)  # Ctrl-C in the third sleep
    last = gpustatus.run(fleet, as_json=True, every=2.5)  # type: ignore[arg-type]
    assert slept == [2.5, 2.5] and fleet.calls == 3 and last is rounds[2]
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["totals"]["gpus"] for d in docs] == [8, 0, 4]
    assert fleet.reconnects == [1, 2]  # lost nodes are connected again before each refresh


def test_watch_live_table(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=out, width=200))
    sleeps_then_interrupt(monkeypatch, 1)
    fleet = FakeFleet([nodes(node0="a100x8"), nodes(node0="v100x4")])
    last = gpustatus.run(fleet, every=1)  # type: ignore[arg-type]
    assert len(last["node0"].gpus) == 4 and "every 1s" in out.getvalue()
    assert "Tesla V100-SXM2-16GB" in out.getvalue()


def test_brackets_are_text_not_markup() -> None:
    g = probe("v100x4").gpus[0]
    app = dataclasses.replace(g.processes[0], run_id="r1", command="python [worker]")
    node = gpu.NodeGpus((dataclasses.replace(g, processes=(app,)),), None, 0)
    assert "python [worker] [run r1]" in text_of(gpustatus.render({"node0": node}))


def test_insufficient_permissions_cells_show_as_unknown() -> None:
    (g,) = probe("a100_mig_pod").gpus  # a real capture's cells: [N/A], [Insufficient Permissions]
    assert gpustatus.gpu_row("node0", g)[1:6] == (
        "0 MIG", "NVIDIA A100-SXM4-80GB", "-", "- / - GiB", "47 C")  # fmt: skip


def test_a_new_column_is_one_entry(monkeypatch) -> None:
    bus = gpustatus.Column("bus", lambda g: g.bus_id or "-", lambda t: f"{t.nodes} nodes")
    monkeypatch.setattr(gpustatus, "COLUMNS", (*gpustatus.COLUMNS, bus))
    results = {"node0": probe("v100x4"), "node9": UNREACHABLE}
    rows = gpustatus.node_rows("node0", results["node0"])
    assert all(len(row) == 9 for row in rows) and rows[0][-1] == "00000000:1A:00.0"
    assert gpustatus.node_rows("node9", UNREACHABLE)[0][-1] == ""  # not queried: empty
    assert gpustatus.totals_row(gpustatus.totals(results))[-1] == "2 nodes"
    shown = text_of(gpustatus.render(results))
    assert " bus " in shown and "00000000:1A:00.0" in shown
