"""ddpfleet tasks: a table of contents. Each task resolves its flags, then calls the core."""

from __future__ import annotations

import sys
from dataclasses import replace

from invoke import Collection, task

import ddpfleet.cli.adhoc as adhoctasks
import ddpfleet.cli.fetch as fetchtasks
import ddpfleet.cli.runs as runtasks
from ddpfleet import inventory as inv
from ddpfleet import launchers, report
from ddpfleet.cli import select
from ddpfleet.cli import spares as spare_flags
from ddpfleet.cli.common import ASK_BECOME_HELP, INVENTORY_HELP, NODES_HELP, cli
from ddpfleet.cli.common import become_password as _become_password
from ddpfleet.cli.common import fleet as _fleet
from ddpfleet.cli.init import init
from ddpfleet.cli.jupyter import jupyter_ns
from ddpfleet.cli.sandbox import sandbox_ns
from ddpfleet.errors import DdpfleetError


def _warm_fleet(inventory, nodes, exclude=None):
    """The connection keeper's connections when one runs (kept.py), else direct ones."""
    from ddpfleet.ssh import kept

    return kept.fleet(select.load(inventory, nodes, exclude))


@task(help={"inventory": INVENTORY_HELP, "nodes": NODES_HELP})
@cli
def ping(c, inventory=None, nodes=None):
    """Check each node answers; show OS, Python, disk."""
    from ddpfleet import ping as ping_mod

    with _warm_fleet(inventory, nodes) as fleet:
        results = ping_mod.ping(fleet)
        report.show(ping_mod.render(fleet, results))
        report.exit_if_failed(results, "ping")


@task(help={"inventory": INVENTORY_HELP})
@cli
def disconnect(c, inventory=None):
    """Close the SSH connections kept for later commands."""
    from ddpfleet.ssh import kept

    report.show(kept.disconnect(inv.load(inventory)))


@task(
    help={
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "yes": "record every unknown key without asking",
    }
)
@cli
def trust(c, inventory=None, nodes=None, yes=False):
    """Show new nodes' SSH host keys and trust them."""
    from ddpfleet.ssh import hostkeys

    loaded = inv.load(inventory, nodes)
    failures = []
    for node in loaded.nodes:
        try:  # ProxyJump hops first: each must be trusted before it is used to reach the next
            for offered in hostkeys.scan_chain(node):
                who = f"{node.name}: {offered.via + ': ' if offered.via else ''}{offered.name}"
                if offered.known:
                    report.show(f"{who}: already trusted ({offered.fingerprint})")
                    continue
                report.show(f"{who} offers {offered.key.get_name()} {offered.fingerprint}")
                if not yes and not _confirm(f"trust {who}'s key?"):
                    raise DdpfleetError(f"{who}: not trusted")
                hostkeys.record(offered, node.known_hosts)
                report.show(f"{who}: recorded in {node.known_hosts}")
        except DdpfleetError as e:
            failures.append(str(e))
            report.err_console.print(f"{e}", markup=False)
    if failures:
        raise DdpfleetError(f"trust failed: {'; '.join(failures)}")


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise DdpfleetError(f"{question} needs an answer: run in a terminal or pass --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


@task(help={"inventory": INVENTORY_HELP, "nodes": NODES_HELP})
@cli
def env_export(c, inventory=None, nodes=None):
    """Save each node's package list; show differences."""
    from ddpfleet import envexport

    with _fleet(inventory, nodes) as fleet:
        snapshots = envexport.collect(fleet)
        for path in envexport.write(snapshots, fleet.inventory.root / "envs"):
            report.show(f"wrote {path}")
        report.show(envexport.render(snapshots))
        report.exit_if_failed(snapshots, "env-export")


@task(
    help={
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "exclude": select.EXCLUDE_HELP,
        "check": "change nothing; report what would change",
        "diff": "show the diff of every config file that changes (or would)",
        "roles": "only these roles, e.g. miniconda,conda_env",
        "skip_roles": "all roles but these",
        "ask_become_pass": ASK_BECOME_HELP,
    }
)
@cli
def bootstrap(
    c,
    inventory=None,
    nodes=None,
    check=False,
    diff=False,
    roles=None,
    skip_roles=None,
    ask_become_pass=False,
    exclude=None,
):
    """Set up nodes: SSH, PyTorch env, Jupyter, Slurm."""
    from ddpfleet import bootstrap as boot
    from ddpfleet.engine import roles as roles_mod

    with _fleet(inventory, nodes, ask_become_pass, exclude) as fleet:
        selected = roles_mod.select_roles(roles, skip_roles)
        runs = boot.bootstrap(
            fleet, selected, check=check, diff=diff, log_dir=fleet.inventory.root / "logs"
        )
        bad = boot.failures(runs)
        if bad:
            raise DdpfleetError(
                f"bootstrap failed on {len({f.node for f in bad})} node(s): "
                + "; ".join(map(str, bad))
            )


@task(
    iterable=["env"],
    help={
        "inventory": INVENTORY_HELP,
        "nodes": "comma-separated nodes; node_rank = position (default: all, the master first)",
        "exclude": select.EXCLUDE_HELP,
        "dry_run": "show the plan and run every preflight check; sync nothing, start nothing "
        "(exit 1 if a check fails)",
        "script": "training script, relative to --project-dir (default: scripts/train_ddp.py)",
        "args": 'arguments for the script, one string, e.g. "--epochs 3"',
        "nproc_per_node": "processes per node: auto (the node's GPUs, 1 without) or N",
        "master_port": "rendezvous port on the master (default: cluster.master_port)",
        "env": "K=V for every rank, repeatable: --env NCCL_DEBUG=INFO --env A=B",
        "run_id": "name of the run (default: date-time-random); logs go to logs/<run-id>/; "
        "an id used before is refused",
        "project_dir": "the directory mirrored to the nodes (default: the current one)",
        "code_dir": "where the nodes keep the mirror (default: ~/ddpfleet/<cluster>/<project>/"
        "code, <project> the project dir's name and a hash of its path); "
        "made by ddpfleet, 0700; an existing directory it did not make is refused",
        "launcher": launchers.flag_help(),
        "ask_become_pass": ASK_BECOME_HELP,
        "health_gate": "run invoke health's quick checks on the nodes first and refuse a "
        "failing node (default; --no-health-gate skips them)",
        **runtasks.TRAIN_HELP,
        **spare_flags.HELP,
    },
)
@cli
def train(
    c,
    inventory=None,
    nodes=None,
    script=None,
    args="",
    nproc_per_node=None,
    master_port=None,
    env=None,
    run_id=None,
    project_dir=".",
    code_dir=None,
    launcher=None,
    ask_become_pass=False,
    detach=False,
    max_restarts=0,
    resume=None,
    health_gate=True,
    exclude=None,
    dry_run=False,
    spares=None,
    max_recoveries=None,
):
    """Run a PyTorch training script across the nodes."""
    from ddpfleet import launch
    from ddpfleet.launch.launcher import get, index
    from ddpfleet.ssh.connection import Fleet

    password = _become_password(ask_become_pass)
    again = None
    if resume and not dry_run:  # RUN's shape, unless a flag given now says otherwise
        again = runtasks.resume(inventory, resume, password, launcher, nodes, nproc_per_node,
                                master_port, spares)  # fmt: skip
        launcher, nodes, master_port = again.launcher, again.nodes, again.master_port
        spares = again.spares  # RUN's standby nodes stand by again, unless --spares now
        nproc_per_node = again.nproc_per_node
        script, args, env = runtasks.resumed(again.meta, script, args, env)
    loaded = select.load(inventory, nodes, exclude)
    how = get(launcher or loaded.launcher)
    loaded, standby = spare_flags.split(loaded, spares, bool(nodes), detach or resume, how.name)
    recoveries = spare_flags.max_recoveries(max_recoveries)
    if dry_run and (resume or how.name != "ssh"):
        raise DdpfleetError(
            "--dry-run checks a new run of the ssh launcher; drop --resume and use --launcher ssh"
        )
    flags = launch.TrainFlags(
        nodes=tuple(n.name for n in loaded.nodes) if nodes else (),
        script=script,
        args=args or "",
        nproc_per_node=str(nproc_per_node or "auto"),
        master_port=master_port,
        env=tuple(env or ()),
        run_id=run_id,
        project_dir=project_dir,
        code_dir=code_dir,
        max_restarts=max_restarts or 0,
        snapshot=bool(detach or resume) and how.name == "ssh",  # the plan's cwd: the copy
    )
    config = launch.resolve(loaded, flags, log_root=loaded.root / "logs")
    if standby:  # planned and synced with the gang, outside its order (ssh/detach.py)
        order = tuple(n for n in config.order if n not in standby)
        config = replace(config, order=order, spares=standby, max_recoveries=recoveries)
    with Fleet(loaded, become_password=password) as fleet:
        if health_gate:  # a dry run checks this too
            from ddpfleet.health import gate

            gate.check(fleet, config.order, dict(config.env))
        if dry_run:
            from ddpfleet.launch.ssh import dryrun

            dryrun.dry_run(fleet, config)
        elif detach or resume:
            if again is not None:  # the plan below; what came from RUN is said first
                report.show("\n".join([f"resume {resume}:", *(f"  {x}" for x in again.said)]))
            how.train_detached(fleet, config, index(loaded), resume)
            for command in ("runs", f"logs {config.run_id} -f", f"stop {config.run_id}"):
                print(f"  invoke {command}")  # what to do with the run next
        else:
            how.train(fleet, config)


def _long_only(t, attr: str):
    """Task `t` with no short flag for `attr`: invoke would give --health-gate `-h`, and a user
    typing `invoke train -h` for help would start a run instead of reading one."""
    get_arguments = t.get_arguments

    def arguments(*args, **kwargs):
        found = get_arguments(*args, **kwargs)
        for argument in found:
            if argument.attr_name == attr:
                argument.names = argument.names[:1]
        return found

    t.get_arguments = arguments
    return t


train = _long_only(train, "health_gate")


@task(
    help={
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "exclude": select.EXCLUDE_HELP,
        "json": "print the ddpfleet.gpu-status-report/2 document instead of the table",
        "watch": "refresh every SECONDS, in place, until Ctrl-C",
    }
)
@cli
def gpu_status(c, inventory=None, nodes=None, json=False, watch=None, exclude=None):
    """Show every GPU of every node in one table."""
    from ddpfleet import gpustatus

    with _warm_fleet(inventory, nodes, exclude) as fleet:
        results = gpustatus.run(fleet, as_json=json, every=_seconds(watch))
        report.exit_if_failed(results, "gpu-status")


@task(
    help={
        "inventory": INVENTORY_HELP,
        "nodes": NODES_HELP,
        "exclude": select.EXCLUDE_HELP,
        "json": "print the ddpfleet.health/1 document instead of the table",
        "deep": "also each GPU's GEMM TFLOPS and memory, NCCL all_reduce inside each node and "
        "gloo all_reduce between nodes (about a minute)",
    }
)
@cli
def health(c, inventory=None, nodes=None, json=False, deep=False, exclude=None):
    """Check each node's GPUs, kernel log and versions."""
    from ddpfleet.health import table

    with _warm_fleet(inventory, nodes, exclude) as fleet:
        table.run(fleet, as_json=json, deep=deep)


@task(
    name="status",
    help={"inventory": INVENTORY_HELP, "json": "print the ddpfleet.slurm-status/1 document"},
)
@cli
def slurm_status(c, inventory=None, json=False):
    """Show Slurm's nodes (state, reason) and jobs."""
    from ddpfleet.launch.slurm import status

    with _fleet(inventory, None) as fleet:
        status.status(fleet, as_json=json)


slurm_ns = Collection("slurm", slurm_status)


def _seconds(value) -> float | None:
    try:
        seconds = None if value in (None, "") else float(value)
    except ValueError:
        seconds = 0.0
    if seconds is not None and not seconds > 0:
        raise DdpfleetError(f"--watch {value!r}: give the refresh interval in seconds, e.g. 2")
    return seconds


@task(help={"inventory": INVENTORY_HELP, "nodes": NODES_HELP})
@cli
def doctor(c, inventory=None, nodes=None):
    """Check that the nodes can train; say what to fix."""
    from ddpfleet import doctor as doctor_mod

    with _fleet(inventory, nodes) as fleet:
        checks = doctor_mod.diagnose(fleet)
        report.show(doctor_mod.render(checks))
        doctor_mod.exit_if_failed(checks)


ns = Collection(
    init,
    ping,
    trust,
    bootstrap,
    env_export,
    train,
    gpu_status,
    health,
    doctor,
    disconnect,
    sandbox_ns,
)
ns.add_collection(jupyter_ns)
ns.add_collection(slurm_ns)
for t in runtasks.TASKS + adhoctasks.TASKS + fetchtasks.TASKS:
    ns.add_task(t)
