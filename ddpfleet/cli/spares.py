"""train --spares / inventory `spares:` and --max-recoveries: which nodes stand by for a
detached run, checked before anything connects (node/generation.py does the replacing).

    gang, spares = spares.split(loaded, "node3", detach=True, launcher="ssh")
"""

from __future__ import annotations

from dataclasses import replace

from ddpfleet.errors import DdpfleetError
from ddpfleet.inventory import Inventory
from ddpfleet.inventory_yaml import did_you_mean

HELP = {
    "spares": "comma-separated nodes standing by for a detached run (default: the "
    "inventory's spares:); a lost node is replaced by one and the run resumes from its "
    "newest complete checkpoint",
    "max_recoveries": "at most this many lost nodes replaced in one run (default: 3)",
}
# Three: more than a run of hours on a few nodes should meet (Llama 3 saw one interruption per
# ~3 h on 16k GPUs), few enough that a systemic fault (skypilot#10155: 24 recoveries in 19 h on
# a healthy cluster) ends as FAILED with its reason instead of looping through every spare.
MAX_RECOVERIES = 3


def names(flag: str | None) -> list[str]:
    return [n.strip() for n in (flag or "").split(",") if n.strip()]


def split(
    loaded: Inventory, flag: str | None, named: bool, detach: bool, launcher: str
) -> tuple[Inventory, tuple[str, ...]]:
    """(the inventory narrowed to the gang, then the spares; the spares). `loaded`: after
    --nodes/--exclude; `named`: --nodes was given (a spare there is a mistake)."""
    spares = names(flag) if flag else list(loaded.spares)
    if not spares:
        return loaded, ()
    if (not detach or launcher != "ssh") and not flag:  # the inventory's: they stay out
        kept = [n for n in loaded.nodes if n.name not in spares]
        return (replace(loaded, nodes=tuple(kept)) if kept else loaded), ()
    if not detach or launcher != "ssh":
        raise DdpfleetError(
            "spares work for detached runs of the ssh launcher for now: add --detach "
            "(and --launcher ssh), or drop --spares / the inventory's spares:"
        )
    declared = {n.name: n for n in (loaded.declared or loaded.nodes)}
    for name in spares:
        if name not in declared:
            raise DdpfleetError(
                f"--spares: unknown node {name!r}{did_you_mean(name, declared)} "
                f"(known nodes in {loaded.path.name}: {', '.join(declared)})"
            )
    if len(set(spares)) != len(spares):
        raise DdpfleetError(f"--spares: a node is named twice in {','.join(spares)!r}")
    both = [n.name for n in loaded.nodes if n.name in spares and named]
    if both:
        raise DdpfleetError(
            f"{', '.join(both)}: both in --nodes and a spare; a spare stands by outside the gang"
        )
    gang = [n for n in loaded.nodes if n.name not in spares]
    if not gang:
        raise DdpfleetError("every node is a spare: leave at least one to train")
    return replace(loaded, nodes=tuple(gang) + tuple(declared[s] for s in spares)), tuple(spares)


def max_recoveries(value) -> int:
    if value in (None, ""):
        return MAX_RECOVERIES
    if not str(value).isdigit():
        raise DdpfleetError(f"--max-recoveries {value!r}: use a whole number (0: never replace)")
    return int(value)
