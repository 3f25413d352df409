"""The Slurm launcher (ddpfleet.launch.launcher.Launcher): one sbatch job of srun tasks.

The SSH launcher's checks, plan and sync, then Slurm starts the ranks (run.py); detached, the
controller returns once Slurm accepted the job and indexes it with its job id (detach.py).
Slurm owns a started run: its state is Slurm's and the nodes' (state.py), its logs the job's
output file, its stop a scancel and a sweep of every node.
"""

from __future__ import annotations

from collections.abc import Sequence

from ddpfleet.errors import DdpfleetError, NodeError, PlanError
from ddpfleet.inventory import Inventory
from ddpfleet.launch.config import TrainConfig
from ddpfleet.launch.index import Attached, Index
from ddpfleet.launch.launcher import Pruned, Runs, Stopped, pythons
from ddpfleet.launch.outcome import Outcome
from ddpfleet.launch.slurm import detach, run
from ddpfleet.launch.verdict import RunView
from ddpfleet.shell import Secret
from ddpfleet.ssh.connection import Fleet

NO_RESUME = "a slurm run has no code snapshot to resume from"


class SlurmLauncher:
    name = "slurm"
    resumes = False

    def train(self, fleet: Fleet, config: TrainConfig) -> list[Outcome]:
        """Attached; recorded in the controller's index once Slurm accepted the job, with its
        verdict when it ends (as an SSH attached run is)."""
        return run.train(fleet, config, on=Attached(Index(fleet.inventory.root), self.name))

    def train_detached(
        self, fleet: Fleet, config: TrainConfig, index: Index, resume: str | None = None
    ) -> None:
        if resume:
            raise PlanError(f"--resume {resume}: {NO_RESUME}")
        detach.train_detached(fleet, config, index)

    def resumed(self, inventory: Inventory, run_id: str, become_password: Secret | None) -> dict:
        raise PlanError(f"--resume {run_id}: {NO_RESUME}")

    def views(self, runs: Runs, only: Sequence[str] = ()) -> list[RunView]:
        return detach.views(runs.fleet, runs.index.launched_by(self.name, only))

    def prune(
        self, runs: Runs, keep: int, with_outputs: bool = False
    ) -> dict[str, Pruned | NodeError]:
        return {}  # a Slurm run's output and record stay where the job wrote them

    def logs(
        self, runs: Runs, run_id: str, node: str | None, rank: int | None, follow: bool
    ) -> list[str]:
        detach.logs(runs.fleet, _entry(runs, run_id), node, rank, follow)
        return []

    def stop(self, runs: Runs, run_id: str, grace: float) -> Stopped:
        return detach.stop(runs.fleet, pythons(runs.inventory), _entry(runs, run_id), grace)


def _entry(runs: Runs, run_id: str) -> dict:
    entry = runs.index.entry(run_id)
    if entry is None:  # of_run() found this launcher by the entry: it was just there
        raise DdpfleetError(f"{run_id}: no such run in {runs.index.path}; see invoke runs")
    return entry


LAUNCHER = SlurmLauncher()
