"""Ad-hoc tasks: `run` a command on the nodes, `ssh` to one, `put` and `get` files.
ddpfleet/cli/tasks.py reads like a table of contents; these are its ad-hoc chapter."""

from __future__ import annotations

from pathlib import Path

from invoke import task

from ddpfleet import report
from ddpfleet.cli import select
from ddpfleet.cli.common import ASK_BECOME_HELP, INVENTORY_HELP, NODES_HELP, become_password, cli
from ddpfleet.errors import DdpfleetError


def _fleet(inventory, nodes, exclude, ask_become_pass=False):
    from ddpfleet.ssh.connection import Fleet

    loaded = select.load(inventory, nodes, exclude)
    return Fleet(loaded, become_password=become_password(ask_become_pass))


@task(
    name="run",
    help={
        "command": "the shell command line, one string: ddpfleet run 'df -h /'",
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "exclude": select.EXCLUDE_HELP,
        "sudo": "run it as root (through the login user's sudo)",
        "as_train_user": "run it as the training user (train_user), in its home",
        "ask_become_pass": ASK_BECOME_HELP,
    },
)
@cli
def run_command(
    c,
    command,
    inventory=None,
    nodes=None,
    exclude=None,
    sudo=False,
    as_train_user=False,
    ask_become_pass=False,
):
    """Run a command on every node; outputs folded."""
    from ddpfleet import adhoc

    if sudo and as_train_user:
        raise DdpfleetError("--sudo and --as-train-user: choose one")
    with _fleet(inventory, nodes, exclude, ask_become_pass) as fleet:
        users = None
        if as_train_user:
            from ddpfleet import trainuser

            loaded = fleet.inventory
            users = {n.name: trainuser.settings(loaded, n).name for n in loaded.nodes}
        results = adhoc.run(fleet, command, sudo=sudo, train_users=users)
    report.show(adhoc.render(adhoc.fold(results)))
    bad = adhoc.failures(results)
    if bad:
        raise DdpfleetError(f"run failed on {len(bad)} of {len(results)} node(s): {', '.join(bad)}")


@task(
    help={
        "node": "the node to log in to",
        "command": "a command line to run there instead of a login shell, one string: "
        "ddpfleet ssh node1 -c 'nvidia-smi'",
        "inventory": INVENTORY_HELP,
    },
)
@cli
def ssh(c, node, command=None, inventory=None):
    """Open an SSH session (OpenSSH) on a node."""
    from ddpfleet import inventory as inv
    from ddpfleet.cli import openssh

    loaded = inv.load(inventory, node)
    openssh.exec_ssh(loaded, loaded.nodes[0], [command] if command else [])


@task(
    help={
        "local": "the file to send",
        "remote": "where on each node (a directory keeps the file's name; relative: the login "
        "user's home)",
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "exclude": select.EXCLUDE_HELP,
    },
)
@cli
def put(c, local, remote, inventory=None, nodes=None, exclude=None):
    """Copy a file to every node (SFTP)."""
    from ddpfleet import adhoc

    with _fleet(inventory, nodes, exclude) as fleet:
        results = adhoc.put(fleet, Path(local), remote)
    report.show(report.table(None, ("node", "copied to"), adhoc.copied_rows(results)))
    report.exit_if_failed(results, "put")


@task(
    help={
        "remote": "the file on the nodes (relative: the login user's home)",
        "local_dir": "where it lands, as LOCAL_DIR/<node>/<name> (default: the current dir)",
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "exclude": select.EXCLUDE_HELP,
    },
)
@cli
def get(c, remote, local_dir=".", inventory=None, nodes=None, exclude=None):
    """Copy a file from every node (SFTP), one per node."""
    from ddpfleet import adhoc

    with _fleet(inventory, nodes, exclude) as fleet:
        results = adhoc.get(fleet, remote, Path(local_dir))
    report.show(report.table(None, ("node", "copied to"), adhoc.copied_rows(results)))
    report.exit_if_failed(results, "get")


TASKS = (run_command, ssh, put, get)
