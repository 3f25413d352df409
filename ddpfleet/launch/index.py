"""The controller's index of the runs it started, both launchers: .ddpfleet/runs.jsonl beside
the inventory, one JSON line a run (run id, nodes, started, and what another launcher needs to
find it again: Slurm's launcher, job_id, output_dir, nproc, user). The truth is on the nodes;
this is how the controller knows which runs to ask about, and what each run did once it ended:
SUCCEEDED, FAILED and STOPPED are recorded the first time `runs` sees them and shown from then
on, whatever its nodes say later (down, rebuilt): history never lies."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ddpfleet.hygiene import state_dir
from ddpfleet.launch.verdict import RunState, RunView
from ddpfleet.launchers import DEFAULT


class Index:
    """The controller's list of run ids it started, one JSON line each."""

    def __init__(self, root: Path):
        self.path = root / ".ddpfleet" / "runs.jsonl"

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
        """`more`: what another launcher needs to find the run (Slurm: launcher, job_id ...)."""
        state_dir(self.path.parent)
        entry = {"run_id": run_id, "nodes": list(nodes), "started": time.time(), **more}
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

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
        kept = [e for e in self.entries() if e.get("run_id") not in gone]
        if self.path.exists():
            self._write(kept)

    def settle(self, views: Sequence[RunView]) -> list[RunView]:
        """Each view as `runs` shows it: a run whose final verdict is recorded shows that one
        (with the nodes that cannot be asked now); a run seen final for the first time is
        recorded. A run the index never started (known only from its nodes) is shown as read."""
        entries = self.entries()
        by_id = {e.get("run_id"): e for e in entries}
        out, fresh = [], False
        for v in views:
            entry = by_id.get(v.run_id)
            if entry is not None and "verdict" in entry:
                out.append(recorded(entry["verdict"], v))
                continue
            if entry is not None and v.state.final:
                entry["verdict"], fresh = record(v), True
            out.append(v)
        if fresh:
            self._write(entries)
        return out

    def _write(self, entries: Sequence[Mapping]) -> None:
        """The whole index at once (a reader never sees half of it)."""
        temp = self.path.with_name(self.path.name + ".tmp")
        temp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(temp, self.path)


def record(v: RunView) -> dict:
    """What the index keeps of a run's final verdict."""
    keep = ("state", "why", "started", "ended", "exits", "failed_node", "failed_rank")
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
    )
