"""docs/architecture.md's "what may import what", checked: every import of ddpfleet, roles/ and
tasks.py read with ast, each module placed in its layer, each edge judged by the table below.

A module may import its own layer or a lower one. On top of that: paramiko and fabric only under
ddpfleet/ssh/, Invoke only at the edge (ddpfleet/cli/, tasks.py), node programs stdlib only, a
job never imports another job (nor the roles engine, bootstrap excepted), and a role never
imports another role's modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (layer, rank): a module may import modules of its own rank or below. Longest prefix wins.
LAYERS = {
    "ddpfleet.errors": ("ground", 0),
    "ddpfleet.hygiene": ("ground", 0),
    "ddpfleet.names": ("ground", 0),
    "ddpfleet.facts": ("ground", 0),
    "ddpfleet.gpu": ("ground", 0),
    "ddpfleet.gpujson": ("ground", 0),
    "ddpfleet.shell": ("ground", 0),
    "ddpfleet.report": ("ground", 0),
    "ddpfleet.plaintable": ("ground", 0),
    "ddpfleet.progress": ("ground", 0),
    "ddpfleet.rootlog": ("ground", 0),
    "ddpfleet.node": ("node", 0),  # NODE_DIR: where the node programs' bytes are
    "ddpfleet.node.checkpoints": ("node", 0),  # the checkpoint contract's node side
    "ddpfleet.inventory": ("config", 1),
    "ddpfleet.inventory_types": ("config", 1),
    "ddpfleet.inventory_yaml": ("config", 1),
    "ddpfleet.catalog": ("config", 1),  # which roles exist: their header lines
    "ddpfleet.launchers": ("config", 1),  # which launchers exist: names and module paths
    "ddpfleet.engine.settings": ("config", 1),  # role defaults < sections < vars < flags
    "ddpfleet.ssh": ("ssh", 2),
    "ddpfleet.envs": ("env", 3),
    "ddpfleet.trainuser": ("env", 3),
    "ddpfleet.secretfiles": ("env", 3),
    "ddpfleet.engine": ("engine", 4),
    "roles": ("roles", 5),
    "ddpfleet.bootstrap": ("job", 6),
    "ddpfleet.launch": ("job", 6),
    "ddpfleet.launch.fetch": ("job", 6),  # a run's files home
    "ddpfleet.launch.fetchfiles": ("job", 6),  # its local half
    "ddpfleet.gpustatus": ("job", 6),
    "ddpfleet.ping": ("job", 6),
    "ddpfleet.doctor": ("job", 6),
    "ddpfleet.envexport": ("job", 6),
    "ddpfleet.jupyter": ("job", 6),
    "ddpfleet.health": ("job", 6),
    "ddpfleet.adhoc": ("job", 6),
    "ddpfleet.sandbox": ("job", 6),
    "ddpfleet.cli": ("edge", 7),
    "ddpfleet.__main__": ("edge", 7),  # the installed `ddpfleet` command
    "tasks": ("edge", 7),
}
# Kept on purpose (docs/architecture.md says why): the jupyter role and `jupyter.status` agree on
# the config path and the password source through ddpfleet.jupyter.
UPWARD = {("roles.jupyter", "ddpfleet.jupyter")}
ONLY = {  # what may import these third-party packages
    "paramiko": ("ddpfleet.ssh",),
    "fabric": ("ddpfleet.ssh",),
    "invoke": ("ddpfleet.cli", "ddpfleet.__main__", "tasks"),
}
SANDBOX_MAY = ("ddpfleet.errors", "ddpfleet.names", "ddpfleet.report", "ddpfleet.hygiene")
NODE_PROGRAMS = "ddpfleet.node."  # and the sandbox's PID 1, below
STDLIB_ONLY = ("ddpfleet.sandbox.node_init",)


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    paths = [*(ROOT / "ddpfleet").rglob("*.py"), *(ROOT / "roles").rglob("*.py"), ROOT / "tasks.py"]
    return {_name(p): p for p in paths if "__pycache__" not in p.parts}


SOURCES = _sources()


def _imports(module: str) -> set[str]:
    """What `module` imports, as full module names (a `from pkg import mod` names pkg.mod)."""
    tree = ast.parse(SOURCES[module].read_text())
    package = module if SOURCES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a role's own modules: from .survey import ...
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in SOURCES]
            found |= set(subs) if subs else {base}
    return found


def _layer(module: str) -> tuple[str, int] | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def _job(module: str) -> str:
    return ".".join(module.split(".")[:2])  # ddpfleet.launch.ssh.run -> ddpfleet.launch


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _problem(module: str, dep: str) -> str | None:
    top = dep.split(".")[0]
    if module.startswith(NODE_PROGRAMS) or module in STDLIB_ONLY:
        ok = top in sys.stdlib_module_names or top == "__future__"
        return None if ok else "a node program imports only the standard library"
    if top in ONLY:
        return None if _within(module, ONLY[top]) else f"only {ONLY[top]} may import {top}"
    if top not in ("ddpfleet", "roles", "tasks") or dep == "ddpfleet":
        return None
    mine, theirs = _layer(module), _layer(dep)
    if mine is None or theirs is None:
        return f"{module if mine is None else dep} has no layer in test_layers.LAYERS"
    if any(module.startswith(a) and dep.startswith(b) for a, b in UPWARD):
        return None
    if theirs[1] > mine[1]:
        return f"{mine[0]} imports {theirs[0]}, a layer above"
    if module.startswith("ddpfleet.sandbox.") and theirs[0] != "job":
        return None if _within(dep, SANDBOX_MAY) else "the sandbox never uses SSH or the config"
    if mine[0] == "job" and theirs[0] == "job" and _job(module) != _job(dep):
        return "a job never imports another job"
    if mine[0] == "job" and theirs[0] == "engine" and _job(module) != "ddpfleet.bootstrap":
        return "only bootstrap runs the roles engine"
    if _within(module, ["ddpfleet.launch"]) and dep == "ddpfleet.engine.settings":
        return "launch reads role defaults through envs/trainuser, never the settings"
    if mine[0] == "roles" and theirs[0] == "roles" and module.split(".")[1] != dep.split(".")[1]:
        return "a role never imports another role's modules"
    return None


EDGES = sorted((m, d) for m in SOURCES for d in _imports(m))


def test_every_import_follows_the_layer_table():
    wrong = [f"{m} -> {d}: {why}" for m, d in EDGES if (why := _problem(m, d))]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("module", "dep", "why"),
    [
        ("ddpfleet.bootstrap", "paramiko", "only"),
        ("ddpfleet.ssh.connection", "invoke", "only"),
        ("ddpfleet.node.proctree", "yaml", "standard library"),
        ("ddpfleet.report", "ddpfleet.launch.plan", "a layer above"),
        ("ddpfleet.gpustatus", "ddpfleet.launch.plan", "another job"),
        ("ddpfleet.launch.ssh.run", "ddpfleet.engine.roles", "roles engine"),
        ("ddpfleet.sandbox.net", "ddpfleet.ssh.connection", "never uses SSH"),
        ("roles.slurm.role", "roles.miniconda.role", "another role"),
        ("ddpfleet.newthing", "ddpfleet.errors", "no layer"),
    ],
)
def test_the_checker_catches(module, dep, why):
    assert why in (_problem(module, dep) or "")


def test_every_module_has_a_layer_and_the_doc_names_it():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    homeless = [m for m in SOURCES if m not in ("ddpfleet", "tasks") and _layer(m) is None]
    assert not homeless, f"add to test_layers.LAYERS and docs/architecture.md: {homeless}"
    unnamed = [
        m for m in SOURCES
        if m.startswith("ddpfleet.") and m.rpartition(".")[2] not in doc
    ]  # fmt: skip
    assert not unnamed, f"docs/architecture.md never names: {unnamed}"
