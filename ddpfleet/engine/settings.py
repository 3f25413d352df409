"""Which roles exist, in what order, and each role's settings for one node.

A role is a directory roles/<name>/ whose role.py is loaded as the package
`ddpfleet_role_<name>` (registered in sys.modules like any import, so dataclasses and
`from . import helper` work in it), plus defaults.yaml with every knob prefixed by the role name
(`miniconda_prefix: /opt/miniconda3`).

A role's settings for a node, lowest precedence first (the one place this is written down):

    roles/<name>/defaults.yaml      miniconda_prefix: /opt/miniconda3   (every key must be here)
    < the inventory's section       miniconda: {prefix: /opt/conda}     (SECTION, else the name)
    < the node's vars               nodes: {node1: {vars: {miniconda_prefix: /data/conda}}}
    < task flags                    what a task passes, e.g. the roles tests' overrides
    < the role's overrides          {enabled: true} for an opt-in role (OPT_IN) named in --roles

A section key no role defines is an inventory mistake (validate_sections), named with its line.
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

import yaml

from ddpfleet.errors import InventoryError
from ddpfleet.inventory import Inventory, Node, _did_you_mean

ROLES_DIR = Path(__file__).resolve().parents[2] / "roles"
ROLE_ORDER = (
    "train_user",
    "openssh_server",
    "miniconda",
    "conda_env",
    "venv_env",
    "jupyter",
    "slurm",
)
# Off unless the inventory enables them ({enabled: true}) or --roles names them.
OPT_IN = ("slurm",)


@dataclass(frozen=True)
class Role:
    name: str
    module: ModuleType
    defaults: Mapping[str, Any]  # unprefixed
    directory: Path
    # What the run itself decided, above every tier: {enabled: true} for an opt-in role that
    # --roles names.
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def section(self) -> str:
        return getattr(self.module, "SECTION", self.name)

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
    module = _import(f"ddpfleet_role_{name}", directory)
    raw = yaml.safe_load((directory / "defaults.yaml").read_text()) or {}
    prefix = name + "_"
    defaults = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    return Role(name, module, MappingProxyType(defaults), directory)


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


def select_roles(only: str | None = None, skip: str | None = None) -> list[Role]:
    names = list(ROLE_ORDER)
    wanted = _comma_list(only) or names
    skipped_names = _comma_list(skip)
    for flag, given in (("--roles", wanted), ("--skip-roles", skipped_names)):
        for n in given:
            if n not in names:
                raise InventoryError(
                    f"{flag}: unknown role {n!r}{_did_you_mean(n, names)}; "
                    f"roles: {', '.join(names)}"
                )
    chosen = [load_role(n) for n in names if n in wanted and n not in skipped_names]
    named = _comma_list(only)
    return [
        replace(r, overrides=MappingProxyType({"enabled": True}))
        if r.name in OPT_IN and r.name in named
        else r
        for r in chosen
    ]


def validate_sections(inventory: Inventory, roles: list[Role]) -> None:
    """Unknown keys in a role section are inventory mistakes: name the line and the fix."""
    known: dict[str, set[str]] = {}
    for role in [load_role(n) for n in ROLE_ORDER if (ROLES_DIR / n / "role.py").is_file()]:
        known.setdefault(role.section, set()).update(role.defaults)
    for section, keys in known.items():
        for key in inventory.section(section):
            if key not in keys:
                raise InventoryError(
                    f"{inventory.where(section, key)}: {section}.{key}: unknown key"
                    f"{_did_you_mean(key, sorted(keys))} (known: {', '.join(sorted(keys))})"
                )


def _comma_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]
