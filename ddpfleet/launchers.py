"""The launchers `invoke train` knows: one entry each, the registry every other place reads.

A launcher is a folder under ddpfleet/launch/ whose launcher.py has LAUNCHER, an object that
implements `ddpfleet.launch.launcher.Launcher` (start attached or detached; a started run's view,
logs and stop). This registry holds names and module paths only, not the objects: the
inventory checks `train.launcher` against these names as it loads, and it sits below the launch
layer (the launch layer imports the inventory), so it must not import a launcher to learn its
name. `ddpfleet.launch.launcher.get` imports the one a run needs.

Adding a launcher: its folder, one entry here, a test (tests/unit/test_launchers.py checks every
entry against the Launcher protocol), and its part of the README.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    module: str  # where its LAUNCHER is
    summary: str  # for train --launcher's help


LAUNCHERS: dict[str, Entry] = {
    "ssh": Entry("ddpfleet.launch.ssh.launcher", "torchrun on every node over SSH"),
    "slurm": Entry("ddpfleet.launch.slurm.launcher", "one sbatch job"),
}
# The inventory's train.launcher when it says none; also the launcher of an index entry that
# names none (the SSH launcher indexes its detached runs without one).
DEFAULT = "ssh"


def flag_help() -> str:
    """train --launcher's help."""
    names = " or ".join(f"{name} ({entry.summary})" for name, entry in LAUNCHERS.items())
    return f"{names}; default: the inventory's train.launcher, else {DEFAULT}"
