"""`ddpfleet ...` (the installed command) and `python -m ddpfleet ...`: Invoke's own Program over
the task collection of ddpfleet/cli/tasks.py, so `ddpfleet train --nodes a,b` is `invoke train
--nodes a,b` in the checkout, with the same flags and help.

The project is the current directory, as it is for `invoke`: ./inventory.yaml (or --inventory),
the state under its .ddpfleet/, `train` mirrors it. Invoke's defaults that the checkout's
invoke.yaml sets are set here too (that file is only read beside a tasks.py).
"""

from __future__ import annotations

import sys

from invoke import Config, Program

from ddpfleet import __version__


class DdpfleetConfig(Config):
    # Config files and env vars of our own (~/.ddpfleet.yaml, DDPFLEET_RUN_ECHO=...), never a
    # user's invoke settings meant for their own tasks.
    prefix = "ddpfleet"

    @staticmethod
    def global_defaults() -> dict:
        defaults = Config.global_defaults()
        defaults["run"]["echo"] = False
        defaults["tasks"]["auto_dash_names"] = True
        return defaults


def program():
    from ddpfleet.cli.tasks import ns

    return Program(
        namespace=ns,
        version=__version__,
        name="ddpfleet",
        binary="ddpfleet",
        config_class=DdpfleetConfig,
    )


def main() -> None:
    try:
        program().run()
    except BrokenPipeError:  # `ddpfleet --list | head -1`: Invoke's own output, a reader gone
        from ddpfleet.cli.common import PIPE_CLOSED, quiet_stdout

        quiet_stdout()
        sys.exit(PIPE_CLOSED)


if __name__ == "__main__":
    main()
