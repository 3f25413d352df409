"""Where a node's training env lives, whichever manager made it (the env contract).

Both managers give the same thing: a directory whose bin/ holds python, torchrun and jupyter.
Callers run those by absolute path, never through `conda run` (it does not forward signals).
"""

from __future__ import annotations

from ddpfleet.inventory import Inventory, Node
from ddpfleet.roles import load_role


def manager(inventory: Inventory, node: Node) -> str:
    return load_role("venv_env").config(inventory, node)["manager"]


def env_dir(inventory: Inventory, node: Node) -> str:
    """The env's prefix on the node, e.g. /opt/ddpfleet/venv or /opt/miniconda3/envs/ddp."""
    if manager(inventory, node) == "venv":
        return load_role("venv_env").config(inventory, node)["path"]
    conda = load_role("conda_env").config(inventory, node)
    prefix = load_role("miniconda").config(inventory, node)["prefix"]
    return f"{prefix}/envs/{conda['name']}"


def env_python(inventory: Inventory, node: Node) -> str:
    return f"{env_dir(inventory, node)}/bin/python"
