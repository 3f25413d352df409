"""`invoke train`'s health gate: the quick checks on the chosen nodes before anything starts.

One probe per node on the run's own fleet (its connections are the ones the launch then uses,
so the gate costs one round trip, in parallel). A node with a failing check is refused with
its one-line reason; warnings never refuse. A node SSH cannot reach is left to the launch,
which names it in its own words, and so are differing torch/CUDA/NCCL versions (the launch's
preflight compares them with the env it will really run, and names both versions). The result
goes to .ddpfleet/health.jsonl as `source: train`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ddpfleet.errors import ConnectError, Refusals
from ddpfleet.health import table
from ddpfleet.health.check import Check
from ddpfleet.hygiene import clean

if TYPE_CHECKING:
    from ddpfleet.ssh.fleetbase import FleetBase

SKIP_HINT = "--no-health-gate skips this check"


class HealthRefused(Refusals):
    """One line per refused node under the first; shown as lines (Refusals.block), not folded."""


def check(
    fleet: FleetBase, order: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Raise HealthRefused naming every failing node (one line each) and the fix. `order`:
    the run's node_rank order (the master first); `env`: its --env pairs (an
    NCCL_SOCKET_IFNAME or GLOO_SOCKET_IFNAME there is the interface the run will use)."""
    order = list(order or table.master_first(fleet.inventory, (n.name for n in fleet.nodes)))
    results = table.probe_all(fleet, order)
    probed = {n: r for n, r in results.items() if not isinstance(r, ConnectError)}
    if not probed:
        return
    checks = table.judge_all(fleet.inventory, probed, order, env)
    table.record(fleet.inventory, checks, source="train")
    bad = table.failures(c for c in checks if c.check != "versions")
    if bad:
        raise refusal(list(bad.values()), len(probed))


def refusal(bad: Sequence[Check], probed: int) -> HealthRefused:
    """What train prints, as launch's Refusals do: the count, then a line per refused node (its
    text cleaned of anything that could break the line or add one), then the way round it."""
    lines = "\n  ".join(clean(c.line) for c in bad)
    return HealthRefused(
        f"health gate refused {len(bad)} of {probed} node(s); nothing was started:\n  "
        f"{lines}\n  (invoke health shows every check; {SKIP_HINT})"
    )
