"""The controller's index of the runs it started, both launchers, attached and detached:
.ddpfleet/runs.jsonl beside the inventory, one JSON object a run. The truth is on the nodes;
this is how the controller knows which runs to ask about, and what each run did once it ended:
SUCCEEDED, FAILED and STOPPED are recorded the first time they are seen and shown from then on,
whatever its nodes say later (down, rebuilt): history never lies.

An entry (extensible: a reader keeps keys it does not know, and `runs --json` shows SHOWN ones):

    run_id, nodes (node_rank order), started       every run
    launcher ("ssh", "slurm"), nproc, port          its shape, for `runs` and `train --resume`
    attached                                        true: an attached run, recorded at its start
    controller {pid, starttime}                     attached: the controller process holding it
    outputs                                         where its outputs are on each of its nodes
    verdict {state, why, started, ended, ...}       once final (record())
    restarts [why, ...]                             torchrun's restarts seen (verdict.restarts)
    job_id, output_dir, user ...                    what another launcher needs (Slurm)

Every change takes runs.lock (flock) first: two controllers' `train` and `runs` at once each
read, change and rewrite the whole file, and one would otherwise write back a list without the
other's new run or verdict.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ddpfleet.hygiene import state_dir
from ddpfleet.launch.plan import checkpoint_dir
from ddpfleet.launch.verdict import RunState, RunView
from ddpfleet.launchers import DEFAULT

SHOWN = ("launcher", "nproc", "port", "attached", "outputs")  # beside the verdict in `runs`


def shape(p) -> dict:
    """What the index keeps of a run's plan (launch.plan.Plan) besides its nodes."""
    return {"nproc": p.nproc, "port": p.master_port}


# What a project dir that may be read but not written answers a lock or a write.
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class Index:
    """The controller's list of run ids it started, one JSON line each."""

    def __init__(self, root: Path):
        self.path = root / ".ddpfleet" / "runs.jsonl"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The index to this process alone while it reads, changes and writes it (a reader
        needs no lock: _write replaces the file whole)."""
        state_dir(self.path.parent)
        fd = os.open(self.path.with_name("runs.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # frees the flock

    def entries(self) -> list[dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def add(self, run_id: str, nodes: Sequence[str], **more) -> None:
        """`more`: the run's shape (shape()) and what another launcher needs to find the run
        (Slurm: launcher, job_id ...)."""
        entry = {"run_id": run_id, "nodes": list(nodes), "started": time.time(),
                 "outputs": checkpoint_dir(run_id), **more}  # fmt: skip
        with self._locked(), self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def update(self, run_id: str, **changes) -> None:
        """Change a run's entry (an attached run's verdict when it ended)."""
        with self._locked():
            entries = self.entries()
            for e in entries:
                if e.get("run_id") == run_id:
                    e.update(changes)
            self._write(entries)

    def entry(self, run_id: str) -> dict | None:
        return next((e for e in self.entries() if e.get("run_id") == run_id), None)

    def launched_by(self, launcher: str, only: Sequence[str] = ()) -> list[dict]:
        """The runs `launcher` started (an entry without one: the default launcher's)."""
        return [e for e in self.entries() if e.get("launcher", DEFAULT) == launcher
                and (not only or e["run_id"] in only)]  # fmt: skip

    def nodes(self, run_id: str) -> tuple[str, ...] | None:
        for e in self.entries():
            if e.get("run_id") == run_id:
                return tuple(e["nodes"])
        return None

    def drop(self, run_ids: Iterable[str]) -> None:
        gone = set(run_ids)
        with self._locked():
            kept = [e for e in self.entries() if e.get("run_id") not in gone]
            if self.path.exists():
                self._write(kept)

    def settle(self, views: Sequence[RunView]) -> list[RunView]:
        """Each view as `runs` shows it: a run whose final verdict is recorded shows that one
        (with the nodes that cannot be asked now); a run seen final for the first time is
        recorded, and restarts seen are kept. Beside each: its shape from the index (SHOWN). A
        run the index never started (known only from its nodes) is shown as read."""
        if not self.path.exists():  # nothing to settle: `runs` makes no .ddpfleet/
            return self._settle([], views)
        try:
            with self._locked():
                return self._settle(self.entries(), views)
        except OSError as e:
            if e.errno not in READ_ONLY:
                raise
            # a project this user may read but not write (a teammate's checkout, a read-only
            # mount): `runs` shows what it read and records nothing
            return self._settle(self.entries(), views, write=False)

    def _settle(
        self, entries: list[dict], views: Sequence[RunView], write: bool = True
    ) -> list[RunView]:
        by_id = {e.get("run_id"): e for e in entries}
        out, fresh = [], False
        for v in views:
            entry = by_id.get(v.run_id)
            if entry is None:
                out.append(v)
                continue
            if len(v.restarts) > len(entry.get("restarts") or ()):
                entry["restarts"], fresh = list(v.restarts), True
            if "verdict" not in entry and v.state.final:
                entry["verdict"], fresh = record(v), True
            seen = recorded(entry["verdict"], v) if "verdict" in entry else v
            out.append(replace(seen, restarts=tuple(entry.get("restarts") or v.restarts),
                               recorded=shown(entry)))  # fmt: skip
        if fresh and write:
            self._write(entries)
        return out

    def _write(self, entries: Sequence[Mapping]) -> None:
        """The whole index at once (a reader never sees half of it)."""
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(temp, self.path)


def shown(entry: Mapping) -> dict:
    """The entry's shape, beside the verdict in `runs --json` (an old entry: what it has)."""
    return {"launcher": entry.get("launcher", DEFAULT), "attached": bool(entry.get("attached")),
            **{k: entry[k] for k in SHOWN if k in entry and k not in ("launcher", "attached")}}  # fmt: skip


def record(v: RunView) -> dict:
    """What the index keeps of a run's final verdict."""
    keep = (
        "state",
        "why",
        "started",
        "ended",
        "exits",
        "failed_node",
        "failed_rank",
        "generations",
    )
    return {k: v.as_json()[k] for k in keep}


def recorded(verdict: Mapping, now: RunView) -> RunView:
    """The recorded verdict, and beside it each node that cannot be asked now."""
    unasked = "; ".join(f"{n} {why} now" for n, why in now.unasked.items())
    return RunView(
        run_id=now.run_id,
        state=RunState(verdict["state"]),
        nodes=now.nodes,
        started=verdict.get("started", now.started),
        ended=verdict.get("ended"),
        exits=verdict.get("exits") or {},
        why="; ".join(filter(None, [verdict.get("why", ""), unasked])),
        failed_node=verdict.get("failed_node"),
        failed_rank=verdict.get("failed_rank"),
        unasked=now.unasked,
        generations=tuple(verdict.get("generations") or now.generations),
    )


def controller() -> dict:
    """This process, as an attached run's entry names the controller holding it: its pid and
    start time (a reused pid is not it)."""
    return {"pid": os.getpid(), "starttime": _starttime(os.getpid())}


def holds(entry: Mapping) -> bool:
    """Whether the controller that started an attached run still runs (on this machine)."""
    held = entry.get("controller") or {}
    pid = held.get("pid")
    return (
        isinstance(pid, int)
        and _starttime(pid) not in (None, "")
        and (_starttime(pid) == held.get("starttime"))
    )


def _starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class Attached:
    """An attached run in the index (the `on` of launch.ssh.run.train and launch.slurm.run's):
    recorded when its gang starts (Slurm: once the job is accepted), with its shape, and its
    verdict when it ends; `runs` lists it like a detached one."""

    def __init__(self, index: Index, launcher: str):
        self.index, self.launcher = index, launcher
        self.began: float | None = None

    def started(self, p, **more) -> None:
        """`more`: what the launcher needs to find the run later (Slurm: job_id ...)."""
        self.began = time.time()
        self.index.add(p.run_id, [n.node for n in p.nodes], launcher=self.launcher,
                       attached=True, controller=controller(), **shape(p), **more)  # fmt: skip

    def ended(
        self,
        p,
        outcomes: Sequence,
        reason: str | None,
        said: Mapping,
        state: RunState | None = None,
    ) -> None:
        """`said`: each node's lines that may say a restart; `state`: the launcher's own word
        on the run where its outcomes do not tell it (Slurm's time limit: FAILED), else the
        outcomes' fold."""
        from ddpfleet.launch.outcome import exit_text, first_failure
        from ddpfleet.launch.verdict import fold, restarts

        state = state or fold([o.evidence() for o in outcomes])
        # a stopped run blames no one (Slurm's cancel: its ranks' words on SIGTERM)
        first = first_failure(outcomes) if state is not RunState.STOPPED else None
        lost = [f"{o.node}: {o.why}" for o in outcomes if o.state is RunState.LOST]
        why = ""
        if state is RunState.FAILED and first is not None:
            rank = f" rank {first.rank}" if first.rank is not None else ""
            why = f"{first.node}{rank} failed first ({exit_text(first.exit_code)})"
        elif state is RunState.LOST and lost:
            why = "; ".join(lost)
        elif state is not RunState.SUCCEEDED:
            why = reason or ""
        verdict = {
            "state": state.value, "why": why, "started": self.began, "ended": time.time(),
            "exits": {o.node: o.exit_code for o in outcomes},
            "failed_node": first.node if first else None,
            "failed_rank": first.rank if first else None,
        }  # fmt: skip
        # LOST is what could be said now (a dropped connection): kept, as nothing later will
        # ask the nodes of an attached run again.
        self.index.update(p.run_id, verdict=verdict, restarts=list(restarts(said)))
