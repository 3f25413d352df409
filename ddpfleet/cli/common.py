"""What every task shares: the one-line error wrapper and the common flag help."""

from __future__ import annotations

import atexit
import functools
import gc
import os
import sys

from invoke import Exit

from ddpfleet.errors import DdpfleetError
from ddpfleet.hygiene import clean

INVENTORY_HELP = "inventory file (default: $DDPFLEET_INVENTORY, else ./inventory.yaml)"
NODES_HELP = "comma-separated node names (default: all nodes)"
ASK_BECOME_HELP = (
    "ask the login user's sudo password once, on this terminal (or set "
    "$DDPFLEET_BECOME_PASSWORD, or ssh.become_password_file)"
)

# The last garbage collections of an exiting interpreter walk everything a task made (a fleet's
# transports and threads, rich's tables): ~25 ms after a cold 32-node ping, on one core, with the
# output already out. Freezing first leaves those objects to the OS; registered here, before the
# handlers of the modules a task imports later, so it runs after them (atexit runs in reverse).
atexit.register(gc.freeze)


def cli(fn):
    """User mistakes and node failures end as one line on stderr and exit 1, never a traceback.
    A reader that went away (`runs --json | head`) ends it quietly, exit 1."""

    @functools.wraps(fn)
    def wrapper(c, *args, **kwargs):
        try:
            result = fn(c, *args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return result
        except BrokenPipeError:
            quiet_stdout()
            raise Exit(code=PIPE_CLOSED) from None
        except DdpfleetError as e:  # may quote node output: cleaned; a block (a rank's last
            # lines, one refusal per node) keeps its newlines, every other error is one line
            raise Exit(f"error: {clean(str(e), e.block)}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


# A closed pipe's exit code: rich's own (Console.on_broken_pipe: /dev/null, then exit 1) for
# the tables, so every task ends the same way whichever writer met the closed pipe.
PIPE_CLOSED = 1


def quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe goes nowhere, instead
    of raising again (with a traceback) when the interpreter flushes it at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def become_password(ask: bool):
    """--ask-become-pass: the sudo password, asked once per run on a terminal (a Secret)."""
    if not ask:
        return None
    import getpass

    from ddpfleet.shell import Secret
    from ddpfleet.ssh.become import PASSWORD_ENV

    if not sys.stdin.isatty():
        raise DdpfleetError(
            f"--ask-become-pass needs a terminal; without one set ${PASSWORD_ENV} or "
            "ssh.become_password_file"
        )
    return Secret(getpass.getpass("sudo password on the nodes: "))


def fleet(inventory, nodes, ask_become_pass=False, exclude=None):
    """The Fleet of the inventory's --nodes minus --exclude (not yet opened: it opens lazily)."""
    from ddpfleet.cli import select
    from ddpfleet.ssh.connection import Fleet

    loaded = select.load(inventory, nodes, exclude)
    return Fleet(loaded, become_password=become_password(ask_become_pass))
