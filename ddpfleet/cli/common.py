"""What every task shares: the one-line error wrapper and the common flag help."""

from __future__ import annotations

import atexit
import functools
import gc
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
    """User mistakes and node failures end as one line on stderr and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(c, *args, **kwargs):
        try:
            return fn(c, *args, **kwargs)
        except DdpfleetError as e:
            raise Exit(f"error: {clean(str(e))}", code=1) from None  # may quote node output
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None

    return wrapper


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
