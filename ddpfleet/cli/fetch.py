"""`invoke fetch RUN [--node N] [--path PATH]`: a run's checkpoints or outputs home.
ddpfleet/cli/tasks.py reads like a table of contents; this is its fetch chapter."""

from __future__ import annotations

from invoke import task

from ddpfleet import inventory as inv
from ddpfleet import report
from ddpfleet.cli.common import ASK_BECOME_HELP, INVENTORY_HELP, become_password, cli
from ddpfleet.errors import DdpfleetError


@task(
    help={
        "run": "the run id (invoke runs lists them)",
        "path": "what to bring, relative to the run's directory on the node "
        "(/var/lib/ddpfleet/runs/<run-id>); default: checkpoints",
        "node": "which node's copy (default: the run's first node); N,M or all: each into "
        "runs/<run-id>/<node>/",
        "inventory": INVENTORY_HELP,
        "ask_become_pass": ASK_BECOME_HELP,
    }
)
@cli
def fetch(c, run, path=None, node=None, inventory=None, ask_become_pass=False):
    """Copy a run's checkpoints/outputs to runs/<id>/."""
    from ddpfleet.launch import fetch as fetching
    from ddpfleet.launch.launcher import index
    from ddpfleet.ssh.connection import Fleet

    loaded = inv.load(inventory)
    with Fleet(loaded, become_password=become_password(ask_become_pass)) as fleet:
        got = fetching.fetch(fleet, index(loaded), run, node, path, loaded.root)
    report.show(report.table(None, ("node", f"fetch {run}"), fetching.rows(got, loaded.root)))
    problems = fetching.problems(got)
    for line in problems[:-1]:  # one line each; the last is the error the task ends with
        report.err_console.print(report.text(f"error: {line}"))
    if problems:
        raise DdpfleetError(problems[-1])


TASKS = (fetch,)
