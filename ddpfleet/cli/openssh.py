"""`ddpfleet ssh NODE [CMD]`: the system's OpenSSH client, as ddpfleet itself connects.

The inventory's user, port, key and connect timeout, and the pinned host keys: the project's
known_hosts, then ~/.ssh/known_hosts, with StrictHostKeyChecking=yes (an unknown key is refused,
never recorded; `ddpfleet trust` records it). Those options live in a small config file of the
project's (.ddpfleet/ssh/<node>.conf) given with -F, because OpenSSH hands -F, and not -o, to
the ssh it starts for each ProxyJump hop: every hop is held to the same pins, as
ddpfleet.ssh.connection holds it. The file then includes ~/.ssh/config and the system's, so host
aliases and ProxyJump work as in a plain `ssh`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ddpfleet.errors import DdpfleetError
from ddpfleet.hygiene import STATE_DIR, state_dir
from ddpfleet.inventory import Inventory, Node

SYSTEM_CONFIG = "/etc/ssh/ssh_config"


def _quoted(path: Path | str) -> str:
    text = str(path)
    if '"' in text or "\n" in text:
        raise DdpfleetError(f"{text!r}: a path OpenSSH's config cannot quote; rename it")
    return f'"{text}"'


def config_text(node: Node) -> str:
    """The options every connection to the node (and to each of its jump hosts) gets first:
    OpenSSH keeps the first value it reads, so the includes below cannot loosen them."""
    home = Path.home()  # $HOME, as ddpfleet's own SSH reads it (not the password database's)
    known = [node.known_hosts, home / ".ssh" / "known_hosts"]
    lines = [
        "# Written by `ddpfleet ssh` for this node; rewritten on every use.",
        "Host *",
        "  StrictHostKeyChecking yes",
        "  UserKnownHostsFile " + " ".join(_quoted(p) for p in known),
        "  GlobalKnownHostsFile /dev/null",
        "  UpdateHostKeys no",
        f"  ConnectTimeout {max(1, round(node.connect_timeout))}",
    ]
    if node.key is not None:  # the inventory's key only, as ddpfleet (no agent's other keys)
        lines += [f"  IdentityFile {_quoted(node.key)}", "  IdentitiesOnly yes"]
    lines += [
        f"  Include {_quoted(home / '.ssh' / 'config')}",
        f"  Include {SYSTEM_CONFIG}",
    ]
    return "\n".join(lines) + "\n"


def argv(inventory: Inventory, node: Node, command: list[str]) -> list[str]:
    """ssh's argument list; writes the node's config file under the project's .ddpfleet/."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise DdpfleetError("no ssh on PATH: install the OpenSSH client (openssh-client)")
    directory = state_dir(inventory.root / STATE_DIR / "ssh", mode=0o700)
    conf = directory / f"{node.name}.conf"
    tmp = conf.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config_text(node))
    os.replace(tmp, conf)  # ssh refuses a config others may write: 0600 from the start
    args = [ssh, "-F", str(conf), "-l", node.user, "-p", str(node.port)]
    return args + ["--", node.host, *command]


def exec_ssh(inventory: Inventory, node: Node, command: list[str]) -> None:
    """Become ssh: its exit code is ours, its terminal handling the user's."""
    args = argv(inventory, node, command)
    os.execv(args[0], args)
