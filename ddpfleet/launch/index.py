"""The controller's index of the runs it started, both launchers: .ddpfleet/runs.jsonl beside
the inventory, one JSON line a run (run id, nodes, started, and what another launcher needs to
find it again: Slurm's launcher, job_id, output_dir, nproc, user). The truth is on the nodes;
this is how the controller knows which runs to ask about."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ddpfleet.hygiene import state_dir


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

    def slurm(self, only: Sequence[str] = ()) -> list[dict]:
        """The Slurm runs (their state is Slurm's, not a supervisor's)."""
        return [e for e in self.entries() if e.get("launcher") == "slurm"
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
            self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))
