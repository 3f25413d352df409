"""The Launcher interface: what `invoke train`, `runs`, `logs` and `stop` ask of a way to start
runs, and how they find the one to ask (the registry is ddpfleet/launchers.py).

    launcher = get(config_launcher)           # train: --launcher, else the inventory's
    launcher.train(fleet, config)             # attached: returns once the run ended
    launcher.train_detached(fleet, config, index)
    runs = Runs.open(inventory)               # runs / logs / stop
    views = [v for each in every() for v in each.views(runs)]
    of_run(runs.index, run_id).stop(runs, run_id, grace)   # -> Stopped: data, the task renders

A run's launcher is the one its index entry names (an entry without one: the default's).
Nothing above this module names a launcher: adding one is its folder and a registry entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ddpfleet import envs, report
from ddpfleet.errors import DdpfleetError, NodeError
from ddpfleet.inventory import Inventory
from ddpfleet.launch.index import Index
from ddpfleet.launchers import DEFAULT, LAUNCHERS
from ddpfleet.ssh.connection import Fleet

if TYPE_CHECKING:
    from ddpfleet.launch.config import TrainConfig
    from ddpfleet.launch.outcome import Outcome
    from ddpfleet.launch.ssh.runstate import RunView
    from ddpfleet.shell import Secret

# A node's answer to stop, by what it means for the run there.
STOPPED = "stopped"  # nothing of the run is left on the node
STILL_THERE = "still there"  # pids survived even SIGKILL: the stop is not confirmed
UNREACHABLE = "unreachable"  # the node could not be asked (`error` says why)
NO_RECORD = "no record"  # the node knows no such run: nothing to stop


@dataclass(frozen=True)
class Pruned:
    """One node's part of `runs --prune`: the runs whose records went, and the runs whose
    outputs (checkpoints) were kept there (only `--with-outputs` removes them)."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NodeStop:
    """One node's part of `invoke stop`: what was done there and what is left."""

    state: str  # STOPPED, STILL_THERE, UNREACHABLE or NO_RECORD
    did: str = ""  # what ended: "stopped its part", "was FAILED", "2 processes of the job ended"
    killed: tuple[str, ...] = ()  # the pids SIGKILLed after the grace
    left: tuple[str, ...] = ()  # the pids still there
    error: str = ""  # UNREACHABLE: the node's error

    @classmethod
    def of(cls, did: str, killed: Sequence, left: Sequence) -> NodeStop:
        return cls(STILL_THERE if left else STOPPED, did,
                   tuple(map(str, killed)), tuple(map(str, left)))  # fmt: skip

    @classmethod
    def failed(cls, error: NodeError) -> NodeStop:
        return cls(UNREACHABLE, error=str(error))


@dataclass(frozen=True)
class Stopped:
    """`invoke stop RUN`: per node what happened; `did`: what the launcher did for the whole
    run first (Slurm: the scancel), '' when that is only the nodes' work."""

    run_id: str
    nodes: Mapping[str, NodeStop] = field(default_factory=dict)
    did: str = ""

    def unconfirmed(self) -> list[str]:
        """The nodes where the run may still be there."""
        return [n for n, s in self.nodes.items() if s.state in (STILL_THERE, UNREACHABLE)]


@dataclass
class Runs:
    """What `runs`, `logs` and `stop` hand a launcher: the inventory, one (lazy) connection per
    node, and the controller's index of the runs it started."""

    inventory: Inventory
    fleet: Fleet
    index: Index

    @classmethod
    def open(cls, inventory: Inventory, become_password: Secret | None = None) -> Runs:
        return cls(inventory, Fleet(inventory, become_password=become_password), index(inventory))

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, *exc) -> None:
        self.fleet.close()


@runtime_checkable
class Launcher(Protocol):
    """A way to start runs. Its failures are DdpfleetErrors naming the node and the fix."""

    name: str
    resumes: bool  # whether train --resume RUN can start a new run from RUN's snapshot

    def train(self, fleet: Fleet, config: TrainConfig) -> list[Outcome]:
        """Attached: check, plan, sync, run; returns once the run ended, raises DdpfleetError
        naming the failing node and rank (the verdict); Ctrl-C stops the run."""

    def train_detached(
        self, fleet: Fleet, config: TrainConfig, index: Index, resume: str | None = None
    ) -> None:
        """Detached: the same checks, then the run starts and is indexed; returns at once.
        `resume`: a run id whose code snapshot the new run starts from (only if `resumes`)."""

    def resumed(self, inventory: Inventory, run_id: str, become_password: Secret | None) -> Mapping:
        """For train --resume RUN: RUN's script, args (one string) and env (K=V list) as it
        was started, and its shape: nodes (node_rank order), nproc, port ({'script', 'args',
        'env', 'nodes', 'nproc', 'port'}); a PlanError when there is nothing to resume."""

    def views(self, runs: Runs, only: Sequence[str] = ()) -> list[RunView]:
        """One view (state, verdict) per run of this launcher that the nodes or the index know
        (or only `only`)."""

    def prune(
        self, runs: Runs, keep: int, with_outputs: bool = False
    ) -> dict[str, Pruned | NodeError]:
        """Remove ended runs' records on every node but the newest `keep`; their checkpoints
        stay unless `with_outputs`. Per node: what went and whose outputs were kept."""

    def logs(
        self, runs: Runs, run_id: str, node: str | None, rank: int | None, follow: bool
    ) -> list[str]:
        """Print the run's lines prefixed by node and rank (`follow`: until it ends). A node
        whose lines cannot be read is one line on stderr as soon as that is known (missing());
        returns those lines. --rank/--node the run does not have: a DdpfleetError naming what it
        has (check_ranks), before anything is read."""

    def stop(self, runs: Runs, run_id: str, grace: float) -> Stopped:
        """Stop the run on every node: SIGTERM, `grace` seconds, SIGKILL what is left."""


def pythons(inventory: Inventory) -> dict[str, str]:
    """Each node's env python, which runs run_ctl.py there (both launchers' runs, logs, stop)."""
    return {n.name: envs.env_python(inventory, n) for n in inventory.nodes}


def index(inventory: Inventory) -> Index:
    """The controller's index of started runs, beside the inventory."""
    return Index(inventory.root)


def get(name: str, said_by: str = "--launcher") -> Launcher:
    """The registered launcher `name`; a DdpfleetError naming `said_by` when there is none."""
    entry = LAUNCHERS.get(name)
    if entry is None:
        raise DdpfleetError(f"{said_by} {name!r}: use one of {', '.join(LAUNCHERS)}")
    return importlib.import_module(entry.module).LAUNCHER


def every() -> list[Launcher]:
    return [get(name) for name in LAUNCHERS]


def resumers() -> list[str]:
    """The launchers whose runs train --resume can start from."""
    return [name for name in LAUNCHERS if get(name).resumes]


def of_run(index: Index, run_id: str) -> Launcher:
    """The launcher that started `run_id`, by its index entry (none: the default launcher's,
    which also finds runs the nodes know and the index does not)."""
    entry = index.entry(run_id) or {}
    return get(entry.get("launcher", DEFAULT), f"{run_id}: its index entry's launcher")


def views(runs: Runs) -> list[RunView]:
    """Every launcher's runs, newest first; a final verdict once seen is the index's (settle)."""
    out = runs.index.settle([v for launcher in every() for v in launcher.views(runs)])
    return sorted(out, key=lambda v: v.started or 0, reverse=True)


def prune(runs: Runs, keep: int, with_outputs: bool = False) -> dict[str, Pruned | NodeError]:
    """Every launcher's prune, per node: what went there and whose outputs stayed, or why not."""
    out: dict[str, Pruned | NodeError] = {}
    for launcher in every():
        for node, said in launcher.prune(runs, keep, with_outputs).items():
            had = out.setdefault(node, Pruned())
            if isinstance(said, NodeError) and not isinstance(had, NodeError):
                out[node] = said  # the first error a node gave is its answer
            elif isinstance(had, Pruned) and isinstance(said, Pruned):
                had.removed.extend(said.removed)
                had.kept.extend(said.kept)
    return out


def missing(run_id: str, problem: str) -> str:
    """A node whose lines `logs` cannot show: one line on stderr at once (a `logs -f` may run
    for hours and end by Ctrl-C), never dropped silently. Returns the line."""
    report.err_console.print(report.text(f"error: logs {run_id}: {problem}"))
    return problem


def check_ranks(
    run_id: str, ranks: Mapping[str, Sequence[int]], rank: int | None, nodes: Sequence[str] = ()
) -> None:
    """`logs --node/--rank` against the run (ranks: node -> its global ranks, in node order):
    a node or rank it does not have is an error naming the ones it has (a filter that matches
    nothing printed nothing and exited 0)."""
    if unknown := [n for n in nodes if n not in ranks]:
        raise DdpfleetError(
            f"--node {','.join(unknown)}: run {run_id} ran on {', '.join(ranks)}; give one of those"
        )
    have = sorted(r for n, rs in ranks.items() if not nodes or n in nodes for r in rs)
    if rank is None or not have or rank in have:
        return
    where = f" on {', '.join(nodes)}" if nodes else ""
    raise DdpfleetError(
        f"--rank {rank}: run {run_id} has ranks {spans(have)}{where}; give one of those"
    )


def spans(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 3, 6, 7] -> '0-3, 6-7'."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
