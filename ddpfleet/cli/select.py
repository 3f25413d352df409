"""--nodes and --exclude together: which nodes a task works on, validated as one.

    select.load(inventory, "node0,node1", None)   # those two, in that order
    select.load(inventory, None, "node2")         # every node but node2, in inventory order

An unknown name in either flag, a name in both, or nothing left is a one-line error.
"""

from __future__ import annotations

from ddpfleet import inventory as inv
from ddpfleet.errors import InventoryError
from ddpfleet.inventory import Inventory
from ddpfleet.inventory_yaml import did_you_mean

EXCLUDE_HELP = "comma-separated nodes to leave out (of --nodes, else of all nodes)"


def names(flag: str | None) -> list[str]:
    return [n.strip() for n in (flag or "").split(",") if n.strip()]


def narrowed(loaded: Inventory, nodes: str | None, exclude: str | None) -> Inventory:
    """`loaded` (every node) restricted to --nodes, minus --exclude."""
    chosen = loaded.select(nodes)  # names any unknown --nodes entry, with the known ones
    left_out = names(exclude)
    if not left_out:
        return chosen
    known = [n.name for n in loaded.nodes]
    for name in left_out:
        if name not in known:
            raise InventoryError(
                f"--exclude: unknown node {name!r}{did_you_mean(name, known)} (known nodes in "
                f"{loaded.path.name}: {', '.join(known)})"
            )
    both = [n for n in names(nodes) if n in left_out]
    if both:
        raise InventoryError(
            f"--nodes and --exclude both name {', '.join(both)}: name a node in one of them"
        )
    kept = [n.name for n in chosen.nodes if n.name not in left_out]
    if not kept:
        raise InventoryError(f"--exclude {exclude} leaves no node to work on")
    return chosen.select(",".join(kept))


def load(path: str | None, nodes: str | None = None, exclude: str | None = None, **kw) -> Inventory:
    """inventory.load, then --nodes and --exclude."""
    return narrowed(inv.load(path, **kw), nodes, exclude)
