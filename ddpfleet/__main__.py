"""`ddpfleet ...` (the installed command) and `python -m ddpfleet ...`: Invoke's own Program over
the task collection of ddpfleet/cli/tasks.py, so `ddpfleet train --nodes a,b` is `invoke train
--nodes a,b` in the checkout, with the same flags and help.

The project is the current directory, as it is for `invoke`: ./inventory.yaml (or --inventory),
the state under its .ddpfleet/, `train` mirrors it. Invoke's defaults that the checkout's
invoke.yaml sets are set here too (that file is only read beside a tasks.py).

The lean path: `ddpfleet ping` and `ddpfleet gpu-status [--json]` are what people type most and
wait on, and with a warm connection keeper (ssh/kept.py) their nodes answer in milliseconds
while Invoke and the task collection take ~0.1 s to import. So those two, with only the long
flags below, skip Invoke: the inventory, the keeper's fleet, then rich (imported while the
nodes answer). Same output, same exit codes and error lines as the tasks in cli/tasks.py; any
other flag, a bad inventory (its error is the task's to say) or no keeper answering, and the
whole Program runs as usual.
"""

from __future__ import annotations

import sys

from ddpfleet import __version__

# task -> the long flags the lean path takes, each True when it takes a value
LEAN: dict[str, dict[str, bool]] = {
    "ping": {"inventory": True, "nodes": True},
    "gpu-status": {"inventory": True, "nodes": True, "exclude": True, "json": False},
}


def lean_args(argv: list[str]) -> tuple[str, dict[str, str | bool]] | None:
    """(task, flags) when argv is a lean task with flags it takes (each at most once), spelt
    `--flag value` or `--flag=value`; None for anything else."""
    if not argv or argv[0] not in LEAN:
        return None
    takes, flags = LEAN[argv[0]], {}
    rest = iter(argv[1:])
    for arg in rest:
        name, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or name not in takes or name in flags:
            return None
        if not takes[name]:
            if eq:
                return None
            flags[name] = True
            continue
        if not eq:
            value = next(rest, None)
            if value is None or value.startswith("-"):
                return None  # Invoke's parser says what is wrong
        flags[name] = value
    return argv[0], flags


def lean(argv: list[str]) -> int | None:
    """The task's exit code, done through a warm keeper; None (having printed nothing) when the
    full Program must run it."""
    got = lean_args(argv)
    if got is None:
        return None
    task, flags = got
    import gc

    # A short run: no collections while its modules load (~6% of its CPU, which a busy
    # machine multiplies); the full Program, if it comes to that, collects as usual.
    gc.disable()
    from ddpfleet.cli import select
    from ddpfleet.errors import DdpfleetError
    from ddpfleet.ssh import kept

    try:
        inventory = select.load(flags.get("inventory"), flags.get("nodes"), flags.get("exclude"))
        fleet = kept.warm(inventory)
    except DdpfleetError:
        fleet = None
    if fleet is None:
        gc.enable()
        return None
    return _finish(task, fleet, bool(flags.get("json")))


def _finish(task: str, fleet, as_json: bool) -> int:
    """Run and print as cli/tasks.py's ping and gpu_status do, through cli.common.cli's rules:
    a DdpfleetError is one `error: ...` line on stderr and exit 1, a closed pipe exit 1 quietly,
    Ctrl-C `interrupted` and 130."""
    import threading

    from ddpfleet import plaintable
    from ddpfleet.errors import DdpfleetError, NodeError
    from ddpfleet.hygiene import clean

    try:
        if task == "ping":
            from ddpfleet import ping as job

            query = job.ping
        else:
            from ddpfleet import gpustatus as job

            query = job.query
        results: dict = {}
        crashed: list[BaseException] = []

        def probe() -> None:
            try:
                results.update(query(fleet))
            except BaseException as e:  # a bug, not a node's failure: raised below, as the task
                crashed.append(e)

        worker = threading.Thread(target=probe, daemon=True)
        worker.start()
        plain = task == "ping" and plaintable.usable()  # off a terminal: no rich (~30 ms)
        if not (as_json or plain):
            from ddpfleet import report  # rich: ~40 ms of imports while the nodes answer
        worker.join()
        if crashed:
            raise crashed[0]
        drawn = plaintable.draw(job.COLUMNS, job.rows(fleet, results)) if plain else None
        if drawn is not None:
            sys.stdout.write(drawn)
        elif task == "ping":
            from ddpfleet import report  # a cell rich may draw otherwise: loaded now

            report.show(job.render(fleet, results))
        elif as_json:
            import json

            sys.stdout.write(json.dumps(job.document(results), indent=2) + "\n")
        else:
            report.show(job.render(results))
        if any(isinstance(r, NodeError) for r in results.values()):
            from ddpfleet.report import exit_if_failed  # rich, which --json did without

            exit_if_failed(results, task)
        sys.stdout.flush()
        return 0
    except BrokenPipeError:
        from ddpfleet.cli.common import PIPE_CLOSED, quiet_stdout  # loads Invoke: rare here

        quiet_stdout()
        return PIPE_CLOSED
    except DdpfleetError as e:
        print(f"error: {clean(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def program():
    from invoke import Config, Program

    from ddpfleet.cli.tasks import ns

    class DdpfleetConfig(Config):
        # Config files and env vars of our own (~/.ddpfleet.yaml, DDPFLEET_RUN_ECHO=...), never
        # a user's invoke settings meant for their own tasks.
        prefix = "ddpfleet"

        @staticmethod
        def global_defaults() -> dict:
            defaults = Config.global_defaults()
            defaults["run"]["echo"] = False
            defaults["tasks"]["auto_dash_names"] = True
            return defaults

    return Program(
        namespace=ns,
        version=__version__,
        name="ddpfleet",
        binary="ddpfleet",
        config_class=DdpfleetConfig,
    )


def end(code: int) -> None:
    """The lean path's exit: its output flushed (a reader gone: exit quietly, as _finish
    does), then straight out, without the interpreter's teardown, which clears every module
    and collects once more: ~6 ms of a ~75 ms run, and nothing of ours waits on it (no atexit
    work, no file left open for writing)."""
    import os

    try:
        sys.stdout.flush()
    except BrokenPipeError:  # what is left unwritten stays so: os._exit flushes nothing
        from ddpfleet.cli.common import PIPE_CLOSED

        code = PIPE_CLOSED
    try:
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    code = lean(sys.argv[1:])
    if code is not None:
        end(code)
    try:
        program().run()
    except BrokenPipeError:  # `ddpfleet --list | head -1`: Invoke's own output, a reader gone
        from ddpfleet.cli.common import PIPE_CLOSED, quiet_stdout

        quiet_stdout()
        sys.exit(PIPE_CLOSED)


if __name__ == "__main__":
    main()
