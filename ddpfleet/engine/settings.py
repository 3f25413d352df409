"""Which roles exist, in what order, and each role's settings for one node.

A role is a directory roles/<name>/ whose role.py is loaded as the package
`ddpfleet_role_<name>` (registered in sys.modules like any import, so dataclasses and
`from . import helper` work in it), plus defaults.yaml with every knob prefixed by the role name
(`miniconda_prefix: /opt/miniconda3`). Which roles exist and their order come from their own
headers (ORDER, SECTION, OPT_IN: ddpfleet.catalog), never from a list here.

A role's settings for a node, lowest precedence first (the one place this is written down):

    roles/<name>/defaults.yaml      miniconda_prefix: /opt/miniconda3   (every key must be here)
    < the inventory's section       miniconda: {prefix: /opt/conda}     (SECTION, else the name)
    < the node's vars               nodes: {node1: {vars: {miniconda_prefix: /data/conda}}}
    < task flags                    what a task passes, e.g. the roles tests' overrides
    < the role's overrides          {enabled: true} for an opt-in role (OPT_IN) named in --roles

A section key no role defines, or a value outside a role's CHOICES, is an inventory mistake named
with its line when the inventory loads (catalog.setting_problem).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

from ddpfleet import catalog
from ddpfleet.catalog import ROLES_DIR
from ddpfleet.errors import InventoryError
from ddpfleet.inventory import Inventory, Node
from ddpfleet.inventory_yaml import did_you_mean


@dataclass(frozen=True)
class Role:
    name: str
    module: ModuleType
    defaults: Mapping[str, Any]  # unprefixed
    directory: Path
    # What the run itself decided, above every tier: {enabled: true} for an opt-in role that
    # --roles names.
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    section: str = ""  # its inventory section (the role's SECTION); "" means its name

    def __post_init__(self) -> None:
        if not self.section:
            object.__setattr__(self, "section", self.name)

    def config(
        self, inventory: Inventory, node: Node, flags: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any]:
        """defaults < inventory section < node vars (prefixed) < task flags < overrides."""
        cfg = dict(self.defaults)
        cfg.update({k: v for k, v in inventory.section(self.section).items() if k in cfg})
        prefix = self.name + "_"
        cfg.update({k[len(prefix) :]: v for k, v in node.vars.items() if k.startswith(prefix)})
        cfg.update(flags or {})
        cfg.update(self.overrides)
        return MappingProxyType(cfg)


@functools.cache
def load_role(name: str, roles_dir: Path = ROLES_DIR) -> Role:
    directory = roles_dir / name
    if not (directory / "role.py").is_file():
        raise InventoryError(f"--roles: no role {name!r} (roles/{name}/role.py missing)")
    info = catalog.info(directory)
    module = _import(f"ddpfleet_role_{name}", directory)
    defaults = catalog.defaults(directory)
    return Role(name, module, MappingProxyType(defaults), directory, section=info.section)


def _import(module_name: str, directory: Path) -> ModuleType:
    """role.py as a package whose path is its directory: registered before it runs, as the
    import system does, so dataclasses resolve its annotations and `from . import x` finds
    the helper modules beside it."""
    spec = importlib.util.spec_from_file_location(
        module_name, directory / "role.py", submodule_search_locations=[str(directory)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def role_names(roles_dir: Path = ROLES_DIR) -> list[str]:
    """Every role, in the order they run (each role's ORDER)."""
    return [r.name for r in catalog.discover(roles_dir)]


def select_roles(
    only: str | None = None, skip: str | None = None, roles_dir: Path = ROLES_DIR
) -> list[Role]:
    infos = {r.name: r for r in catalog.discover(roles_dir)}
    names = list(infos)
    wanted = _comma_list(only) or names
    skipped_names = _comma_list(skip)
    for flag, given in (("--roles", wanted), ("--skip-roles", skipped_names)):
        for n in given:
            if n not in names:
                raise InventoryError(
                    f"{flag}: unknown role {n!r}{did_you_mean(n, names)}; roles: {', '.join(names)}"
                )
    chosen = [load_role(n, roles_dir) for n in names if n in wanted and n not in skipped_names]
    named = _comma_list(only)
    # An opt-in role (OPT_IN = True) is off unless the inventory enables it or --roles names it.
    return [
        replace(r, overrides=MappingProxyType({"enabled": True}))
        if infos[r.name].opt_in and r.name in named
        else r
        for r in chosen
    ]


def validate_sections(inventory: Inventory, roles: list[Role], roles_dir: Path = ROLES_DIR) -> None:
    """Unknown keys and values outside a role's CHOICES are inventory mistakes: name the line and
    the fix. inventory.load already refuses them (catalog.setting_problem); this checks an
    Inventory built some other way. Every role's keys count, also those of roles not selected:
    a section is shared (python_env: conda_env and venv_env)."""
    for section in catalog.sections(roles_dir):
        for key, value in inventory.section(section).items():
            if problem := catalog.setting_problem(section, key, value, roles_dir):
                raise InventoryError(f"{inventory.where(section, key)}: {section}.{key}: {problem}")


def _comma_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]
