"""`invoke jupyter`, `jupyter.status`, `jupyter.stop`: a node's Jupyter through an SSH tunnel."""

from __future__ import annotations

from invoke import Collection, task

from ddpfleet import inventory as inv
from ddpfleet import report
from ddpfleet.cli.common import INVENTORY_HELP, NODES_HELP, cli
from ddpfleet.cli.common import fleet as _fleet


@task(
    name="tunnel",
    default=True,
    help={
        "inventory": INVENTORY_HELP,
        "node": "the node whose Jupyter to reach (default: the first node)",
        "local_port": "port on this machine's 127.0.0.1 (default 8888; 0 picks a free one)",
    },
)
@cli
def jupyter_tunnel(c, node=None, local_port=8888, inventory=None):
    """Open a node's Jupyter on a local port (SSH)."""
    from ddpfleet import jupyter

    jupyter.open_tunnel(inv.load(inventory, node), int(local_port))


@task(
    name="status",
    help={
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "json": "one JSON object per node instead of the table",
    },
)
@cli
def jupyter_status(c, inventory=None, nodes=None, json=False):
    """Show whether Jupyter is running on each node."""
    from ddpfleet import jupyter

    with _fleet(inventory, nodes) as fleet:
        results = jupyter.status(fleet)
    jupyter.show_status(results, as_json=json)
    report.exit_if_failed(results, "jupyter.status")


@task(name="stop", help={"inventory": INVENTORY_HELP, "nodes": NODES_HELP})
@cli
def jupyter_stop(c, inventory=None, nodes=None):
    """Stop Jupyter on the nodes."""
    from ddpfleet import jupyter

    with _fleet(inventory, nodes) as fleet:
        results = jupyter.stop(fleet)
    report.show(report.table(None, ("node", "jupyter"), results.items()))
    report.exit_if_failed(results, "jupyter.stop")


jupyter_ns = Collection("jupyter", jupyter_tunnel, jupyter_status, jupyter_stop)
