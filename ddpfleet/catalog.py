"""Which roles exist: every roles/<name>/role.py, in the order its header declares.

A role declares itself in its own role.py, as plain literals at the top:

    ORDER = 30              # when it runs: lower first (train_user 10 ... slurm 70)
    SECTION = "miniconda"   # its inventory section (default: the role's name)
    OPT_IN = True           # off unless the inventory enables it or --roles names it
    CHOICES = {"manager": ("conda", "venv")}   # a setting that takes one of a few words

and its settings in defaults.yaml (every key prefixed by the role's name). Adding a role is its
folder, a test and a line in the README: no central list names it.

The header lines are read with `ast`, never imported: loading an inventory (which accepts each
role's section) must not run every role's code, and this module sits with `inventory`, below
the engine that does import them (engine/settings.load_role).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddpfleet.errors import DdpfleetError
from ddpfleet.inventory_yaml import did_you_mean


def _roles_dir() -> Path:
    """The roles: ddpfleet/roles/ in an installed wheel (pyproject maps the checkout's roles/
    there), else the checkout's top-level roles/ beside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "roles"
    return installed if installed.is_dir() else package.parent / "roles"


ROLES_DIR = _roles_dir()
HEADER = ("ORDER", "SECTION", "OPT_IN", "CHOICES")
_HEADER_LINE = re.compile(rf"^({'|'.join(HEADER)})\s*(?::[^=]*)?=")


@dataclass(frozen=True)
class RoleInfo:
    name: str
    order: int
    section: str
    opt_in: bool
    directory: Path
    choices: Mapping[str, tuple] = field(default_factory=dict)  # CHOICES: setting -> its words

    @property
    def keys(self) -> frozenset[str]:
        """Its settings, unprefixed (defaults.yaml): read when asked, not at discovery."""
        return frozenset(defaults(self.directory))


@functools.cache
def discover(roles_dir: Path = ROLES_DIR) -> tuple[RoleInfo, ...]:
    """Every role under roles_dir, in ORDER; a header that cannot work is one error line."""
    found = [
        info(d) for d in sorted(roles_dir.iterdir()) if d.is_dir() and (d / "role.py").is_file()
    ]
    by_order: dict[int, str] = {}
    for r in found:
        other = by_order.setdefault(r.order, r.name)
        if other != r.name:
            raise DdpfleetError(
                f"roles/{r.name}/role.py: ORDER = {r.order} is also roles/{other}'s; "
                "give each role its own ORDER"
            )
    return tuple(sorted(found, key=lambda r: r.order))


def info(directory: Path) -> RoleInfo:
    name = directory.name
    where = f"roles/{name}/role.py"
    header = _header(directory / "role.py", where)
    order = header.get("ORDER")
    if isinstance(order, bool) or not isinstance(order, int):
        raise DdpfleetError(
            f"{where}: no ORDER = <integer> at the top level; add one (when the role runs: "
            "lower first)"
        )
    section = header.get("SECTION", name)
    if not isinstance(section, str) or not section:
        raise DdpfleetError(f"{where}: SECTION must be a string naming its inventory section")
    choices = header.get("CHOICES", {})
    if not isinstance(choices, dict) or not all(
        isinstance(v, tuple) and v for v in choices.values()
    ):
        raise DdpfleetError(f"{where}: CHOICES must map a setting to a tuple of its values")
    return RoleInfo(
        name=name,
        order=order,
        section=section,
        opt_in=header.get("OPT_IN") is True,
        directory=directory,
        choices=choices,
    )


# libyaml's loader where PyYAML has it: an inventory's load reads defaults.yaml once per setting
# it checks, ~1 ms each in pure Python, ~0.1 ms here (the same values: plain scalars and lists)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def defaults(directory: Path) -> dict:
    """defaults.yaml, its keys without the role's prefix (miniconda_prefix -> prefix)."""
    path = directory / "defaults.yaml"
    raw = (yaml.load(path.read_text(), Loader=_SAFE_LOADER) if path.is_file() else None) or {}
    prefix = directory.name + "_"
    return {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}


def setting_problem(section: str, key: str, value: Any, roles_dir: Path = ROLES_DIR) -> str | None:
    """Why `section: {key: value}` in an inventory cannot work, or None: a key no role of that
    section defines (a section is shared: python_env is conda_env's and venv_env's), a value
    that is not one of the role's CHOICES, or not true/false where the default is a boolean."""
    infos = [r for r in discover(roles_dir) if r.section == section]
    known = {k: v for r in infos for k, v in defaults(r.directory).items()}
    if key not in known:
        keys = sorted(known)
        return f"unknown key{did_you_mean(key, keys)} (known: {', '.join(keys)})"
    for r in infos:
        allowed = r.choices.get(key)
        if allowed and value not in allowed:
            return f"{value!r} is not a choice; use {' or '.join(map(str, allowed))}"
    if isinstance(known[key], bool) and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    return None


def var_problem(name: str, value: Any, roles_dir: Path = ROLES_DIR) -> str | None:
    """A node var that sets a role's setting (venv_env_manager) is checked as that setting;
    any other var is the node's own."""
    for r in discover(roles_dir):
        key = name[len(r.name) + 1 :] if name.startswith(r.name + "_") else None
        if key in r.choices and value not in r.choices[key]:
            return f"{value!r} is not a choice; use {' or '.join(map(str, r.choices[key]))}"
    return None


def sections(roles_dir: Path = ROLES_DIR) -> tuple[str, ...]:
    """The inventory sections the roles own, each once, in role order."""
    return tuple(dict.fromkeys(r.section for r in discover(roles_dir)))


def _header(path: Path, where: str) -> dict:
    """The literal values of ORDER, SECTION and OPT_IN, each assigned on one line at role.py's
    top level. Only those lines are parsed: every command that loads an inventory pays for
    this, and parsing whole role modules cost ~10 ms each."""
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _HEADER_LINE.match(line)
        if not match or match.group(1) in found:
            continue
        name = match.group(1)
        try:
            stmt = ast.parse(line).body[0]
            assert isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None
            found[name] = ast.literal_eval(stmt.value)
        except (SyntaxError, ValueError, AssertionError):
            raise DdpfleetError(
                f"{where}:{number}: {name} must be a literal on one line (read without "
                "importing the role)"
            ) from None
    return found
