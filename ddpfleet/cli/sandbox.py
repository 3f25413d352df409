"""`invoke sandbox.*`: the local test cluster (network namespaces, overlay roots, real sshd)."""

from __future__ import annotations

from invoke import Collection, task

from ddpfleet import inventory as inv
from ddpfleet import report
from ddpfleet.cli.common import INVENTORY_HELP, NODES_HELP, cli


def _sandbox_spec(inventory, count=None, login_user=None, sudo=None, init=None):
    from ddpfleet import sandbox

    loaded = inv.load(inventory, check_files=False)
    return sandbox.spec_for(loaded, int(count) if count else None, login_user, sudo, init)


@task(
    name="up",
    help={
        "inventory": INVENTORY_HELP,
        "nodes": "how many nodes (default: the inventory's nodes)",
        "login-user": "who logs in (default: the inventory's ssh.user); not root: a cloud-style "
        "user with the client key, and sshd refuses root",
        "sudo": "that user's sudo: nopasswd (default), password (kept in "
        "<state_dir>/become_password) or none",
        "init": "the nodes' PID 1: sandbox (default, a small init running sshd) or systemd",
    },
)
@cli
def sandbox_up(c, inventory=None, nodes=None, login_user=None, sudo=None, init=None):
    """Create a local test cluster here (needs root)."""
    from ddpfleet import sandbox

    spec, written = _sandbox_spec(inventory, nodes, login_user, sudo, init)
    sandbox.preflight()
    report.show(sandbox.render(sandbox.up(spec)))
    if written:
        report.show(f"inventory for these nodes: {written} (pass --inventory)")


@task(
    name="down",
    help={
        "inventory": INVENTORY_HELP,
        "nodes": "how many nodes were brought up (default: the inventory's)",
    },
)
@cli
def sandbox_down(c, inventory=None, nodes=None):
    """Remove the local test cluster, leaving no trace."""
    from ddpfleet import sandbox

    spec, _ = _sandbox_spec(inventory, nodes)
    sandbox.preflight()
    sandbox.down(spec)
    report.show(f"sandbox {spec.prefix}: down")


@task(name="status", help={"inventory": INVENTORY_HELP, "nodes": "how many nodes"})
@cli
def sandbox_status(c, inventory=None, nodes=None):
    """Show the local test cluster's nodes."""
    from ddpfleet import sandbox

    spec, _ = _sandbox_spec(inventory, nodes)
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
