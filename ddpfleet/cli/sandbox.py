"""`invoke sandbox.*`: the local test cluster (network namespaces, overlay roots, real sshd)."""

from __future__ import annotations

from invoke import Collection, task

from ddpfleet import inventory as inv
from ddpfleet import report
from ddpfleet.cli.common import INVENTORY_HELP, NODES_HELP, cli
from ddpfleet.errors import InventoryError

COUNT_HELP = "how many nodes, node0..node<N-1> (default: the inventory's nodes)"


def _sandbox_spec(inventory, count=None, login_user=None, sudo=None, init=None):
    from ddpfleet import sandbox

    loaded = inv.load(inventory, check_files=False)
    return sandbox.spec_for(loaded, _count(count), login_user, sudo, init)


def _count(count) -> int | None:
    """--count N, checked before anything is read or made."""
    if count in (None, ""):
        return None
    if not str(count).isdigit() or int(count) < 1:
        raise InventoryError(f"--count {count!r}: give a number of nodes, e.g. --count 3")
    return int(count)


def _no_nodes(task: str, nodes) -> None:
    """--nodes names nodes in every task; here a number once did: say so instead of guessing."""
    if nodes is not None:
        raise InventoryError(
            f"sandbox.{task} --nodes {nodes}: --nodes names nodes (sandbox.stop/start, train, "
            f"...); say how many nodes with --count N"
        )


@task(
    name="up",
    help={
        "inventory": INVENTORY_HELP,
        "count": COUNT_HELP,
        "nodes": "not here: see --count (--nodes names nodes in the other tasks)",
        "login-user": "who logs in (default: the inventory's ssh.user); not root: a cloud-style "
        "user with the client key, and sshd refuses root",
        "sudo": "that user's sudo: nopasswd (default), password (kept in "
        "<state_dir>/become_password) or none",
        "init": "the nodes' PID 1: sandbox (default, a small init running sshd) or systemd",
    },
)
@cli
def sandbox_up(c, inventory=None, count=None, login_user=None, sudo=None, init=None, nodes=None):
    """Create a local test cluster here (needs root)."""
    from ddpfleet import sandbox

    _no_nodes("up", nodes)
    spec, written = _sandbox_spec(inventory, count, login_user, sudo, init)
    sandbox.preflight()
    report.show(sandbox.render(sandbox.up(spec)))
    if written:
        report.show(f"inventory for these nodes: {written} (pass --inventory)")


@task(
    name="down",
    help={
        "inventory": INVENTORY_HELP,
        "count": "how many nodes were brought up (default: the inventory's)",
        "nodes": "not here: see --count",
    },
)
@cli
def sandbox_down(c, inventory=None, count=None, nodes=None):
    """Remove the local test cluster, leaving no trace."""
    from ddpfleet import sandbox

    _no_nodes("down", nodes)
    spec, _ = _sandbox_spec(inventory, count)
    sandbox.preflight()
    sandbox.down(spec)
    report.show(f"sandbox {spec.prefix}: down")


@task(
    name="status",
    help={"inventory": INVENTORY_HELP, "count": COUNT_HELP, "nodes": "not here: see --count"},
)
@cli
def sandbox_status(c, inventory=None, count=None, nodes=None):
    """Show the local test cluster's nodes."""
    from ddpfleet import sandbox

    _no_nodes("status", nodes)
    spec, _ = _sandbox_spec(inventory, count)
    report.show(sandbox.render(sandbox.status(spec)))


@task(name="stop", help={"inventory": INVENTORY_HELP, "nodes": NODES_HELP + " to stop"})
@cli
def sandbox_stop(c, nodes, inventory=None):
    """Stop local test cluster nodes (files are kept)."""
    from ddpfleet import sandbox

    spec, _ = _sandbox_spec(inventory)
    sandbox.stop(spec, _node_list(nodes))
    report.show(f"stopped: {nodes}")


@task(name="start", help={"inventory": INVENTORY_HELP, "nodes": NODES_HELP + " to start"})
@cli
def sandbox_start(c, nodes, inventory=None):
    """Restart stopped nodes of the local test cluster."""
    from ddpfleet import sandbox

    spec, _ = _sandbox_spec(inventory)
    sandbox.start(spec, _node_list(nodes))
    report.show(f"started: {nodes}")


def _node_list(nodes: str) -> list[str]:
    # sandbox.stop/start name any unknown node, with the known ones.
    return [n.strip() for n in nodes.split(",") if n.strip()]


sandbox_ns = Collection(
    "sandbox", sandbox_up, sandbox_down, sandbox_status, sandbox_stop, sandbox_start
)
