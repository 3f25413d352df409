"""Jupyter's settings for a node, resolved once, and the password they point to.

for_node(inventory, node)   the jupyter role's config as Settings (user, port, env, root_dir,
                            where the password comes from); a bad value is an InventoryError
find_secret(s, root, ask)   the password: $password_env, else password_file, else a prompt
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpfleet import envs, report, trainuser
from ddpfleet.engine.settings import load_role
from ddpfleet.errors import InventoryError
from ddpfleet.inventory import Inventory, Node
from ddpfleet.shell import Secret

USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
FALLBACK_USER = "jupyter"  # jupyter.user "" while training runs as root


@dataclass(frozen=True)
class Settings:
    user: str
    port: int
    root_dir: str  # '' = the user's home
    env_dir: str
    create_user: bool
    password_env: str
    password_file: str

    @property
    def lab(self) -> str:
        return f"{self.env_dir}/bin/jupyter-lab"

    @property
    def jupyter(self) -> str:
        return f"{self.env_dir}/bin/jupyter"

    @property
    def python(self) -> str:
        return f"{self.env_dir}/bin/python"


def default_user(inventory: Inventory | None, node: Node | None) -> str:
    """jupyter.user "": the training user, or `jupyter` where training runs as root."""
    if inventory is None or node is None:
        return FALLBACK_USER
    user = trainuser.settings(inventory, node)
    return FALLBACK_USER if user.root else user.name


def settings(cfg: Mapping[str, Any], env_dir: str, default: str = "jupyter") -> Settings:
    """The role's resolved config as Settings; a bad value is an InventoryError with the fix.
    `default` is the user when jupyter.user is "" (default_user)."""
    port, user = cfg["port"], str(cfg["user"] or default)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InventoryError(f"jupyter.port {port!r}: use a port from 1 to 65535")
    if user == "root":
        raise InventoryError(
            "jupyter.user is root: Jupyter runs notebook code as its user, so "
            "it never runs as root; set jupyter.user (default: the training user)"
        )
    if not USER_NAME.match(user):
        raise InventoryError(f"jupyter.user {user!r}: not a valid user name")
    return Settings(
        user,
        port,
        str(cfg["root_dir"] or ""),
        env_dir,
        bool(cfg["create_user"]),
        str(cfg["password_env"] or ""),
        str(cfg["password_file"] or ""),
    )


def for_node(inventory: Inventory, node: Node) -> Settings:
    cfg = load_role("jupyter").config(inventory, node)
    return settings(
        cfg, cfg["env_dir"] or envs.env_dir(inventory, node), default_user(inventory, node)
    )


_prompted: list[Secret] = []
_prompt_lock = threading.Lock()


def no_secret_message(s: Settings) -> str:
    return (
        f"no Jupyter password: set ${s.password_env or 'DDPFLEET_JUPYTER_PASSWORD'} on the "
        "controller, or jupyter.password_file in the inventory, or run bootstrap in a "
        "terminal to be asked"
    )


def find_secret(s: Settings, root: Path, ask: bool) -> Secret | None:
    """From $password_env, else password_file (relative to the inventory), else a terminal
    prompt (only when `ask`: once per run, shared by every node); None when none of these."""
    if s.password_env and os.environ.get(s.password_env):
        return Secret(os.environ[s.password_env])
    if s.password_file:
        return read_secret_file(root / Path(s.password_file).expanduser())
    if ask and sys.stdin.isatty():
        return _prompt()
    return None


def read_secret_file(path: Path) -> Secret:
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text().rstrip("\r\n")
    except OSError as e:
        raise InventoryError(f"jupyter.password_file {path}: {e.strerror or e}") from None
    if mode & 0o077:
        raise InventoryError(
            f"jupyter.password_file {path} is readable by others (mode "
            f"{mode:04o}); chmod 600 {path}"
        )
    if not text:
        raise InventoryError(f"jupyter.password_file {path} is empty")
    return Secret(text)


def _prompt() -> Secret:
    with _prompt_lock:  # nodes run in parallel: the first asks, the others reuse the answer
        if not _prompted:
            report.console.print("Jupyter password for the cluster's notebooks (not echoed)")
            first = getpass.getpass("password: ")
            if not first or getpass.getpass("again: ") != first:
                raise InventoryError("the Jupyter passwords were empty or differ; run again")
            _prompted.append(Secret(first))
        return _prompted[0]
