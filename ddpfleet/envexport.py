"""`invoke env-export`: each node's env to envs/<node>.yml, then what differs between nodes.

    snapshots = collect(fleet)          # {node: Snapshot | NodeError}: one round trip a node
    paths = write(snapshots, root / "envs")
    report.show(render(snapshots))      # torch / CUDA / NCCL / python first, then packages

The round trip runs the env's own python: envs.TORCH_FACTS_PY for torch, CUDA and NCCL, then
`pip freeze` (venv) or `<conda prefix>/bin/conda env export -n NAME` (conda). A conda node's
file is conda's export as is (`conda env create -f` takes it), with the torch facts as comments
on top; a venv node's file is a small YAML document with the freeze under `pip:`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Group
from rich.text import Text

from ddpfleet import envs, report
from ddpfleet.errors import NodeError
from ddpfleet.hygiene import private_dir, write_private
from ddpfleet.inventory import Inventory
from ddpfleet.shell import tail
from ddpfleet.ssh.connection import Conn, Fleet

KEY_FACTS = (("torch", "torch"), ("CUDA", "cuda"), ("NCCL", "nccl"), ("python", "python"))
MISSING = "-"

# Run by the env's python: envs' torch probe, then argv[1:] as the export command (default: this
# python's pip freeze). One JSON line: the torch facts, "export" and "export_error".
EXPORT_PY = (
    envs.TORCH_FACTS_PY
    + """
import json, subprocess, sys
out = torch_facts()
cmd = sys.argv[1:] or [sys.executable, "-m", "pip", "freeze"]
p = subprocess.run(cmd, capture_output=True, text=True)
out["export"] = p.stdout
out["export_error"] = p.stderr[-500:] if p.returncode else ""
print(json.dumps(out))
"""
)


@dataclass(frozen=True)
class Snapshot:
    node: str
    manager: str
    env: str
    facts: Mapping[str, str | None]  # python, torch, cuda, nccl
    packages: Mapping[str, str] = field(default_factory=dict)
    export: str = ""  # pip freeze or conda env export, as the node printed it

    def fact(self, key: str) -> str:
        return self.facts.get(key) or "none"


def export_command(python: str, conda: list[str] | None = None) -> list[str]:
    """The env's python runs EXPORT_PY; conda's export command rides along as its arguments."""
    return [python, "-I", "-c", EXPORT_PY, *(conda or [])]


def parse_freeze(lines: list[str] | str) -> dict[str, str]:
    """pip freeze lines -> {normalized name: version or URL}; comments and -e lines skipped."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out = {}
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith(("#", "-")):
            continue
        name, sep, version = line.partition("==")
        if not sep:
            name, _, version = line.partition(" @ ")
        out[_key(name)] = version.strip()
    return out


def parse_conda_export(text: str) -> dict[str, str]:
    """conda env export YAML -> {name: 'version=build'}, its pip: section included."""
    data = yaml.safe_load(text) or {}
    out: dict[str, str] = {}
    for dep in data.get("dependencies") or []:
        if isinstance(dep, dict):
            for name, version in parse_freeze(dep.get("pip") or []).items():
                out.setdefault(name, version)
        else:
            name, _, rest = str(dep).partition("=")
            out[_key(name)] = rest
    return out


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


# -- collecting --------------------------------------------------------------------------------


def collect(fleet: Fleet) -> dict[str, Snapshot | NodeError]:
    """Every node in parallel; a node without an env is its own error, never dropped."""
    return fleet.map(lambda conn: snapshot(conn, fleet.inventory))


def snapshot(conn: Conn, inventory: Inventory) -> Snapshot:
    env = envs.location(inventory, conn.node)
    result = conn.run(export_command(env.python, env.export_argv()), check=False, timeout=300)
    lines = result.stdout.strip().splitlines()
    if not result.ok or not lines:
        why = tail(result.stderr or result.stdout, 1) or "no output"
        where = f"the {env.manager} env at {env.path}"
        raise NodeError(conn.name, f"cannot read {where} ({why}); run `invoke bootstrap` first")
    data = json.loads(lines[-1])
    if data.get("export_error"):
        raise NodeError(conn.name, f"{env.manager} export failed: {data['export_error'].strip()}")
    packages = (parse_conda_export if env.manager == "conda" else parse_freeze)(data["export"])
    facts = {k: data.get(k) for _, k in KEY_FACTS}
    return Snapshot(conn.name, env.manager, env.path, facts, packages, data["export"])


# -- writing and reporting ---------------------------------------------------------------------


def document(snap: Snapshot) -> str:
    """The text of envs/<node>.yml."""
    facts = ", ".join(f"{label} {snap.fact(k)}" for label, k in KEY_FACTS)
    head = f"# {snap.node}:{snap.env} ({snap.manager}), written by `invoke env-export`\n"
    if snap.manager == "conda":
        return f"{head}# {facts}\n{snap.export}"
    body = {
        "node": snap.node,
        "manager": snap.manager,
        "env": snap.env,
        **snap.facts,
        "pip": [line for line in snap.export.splitlines() if line.strip()],
    }
    return head + yaml.safe_dump(body, sort_keys=False)


def write(snapshots: Mapping[str, Snapshot | NodeError], directory: Path) -> list[Path]:
    # pip freeze and conda exports can carry credentialed index URLs: owner-only.
    private_dir(directory)
    paths = []
    for name, snap in snapshots.items():
        if isinstance(snap, Snapshot):
            path = directory / f"{name}.yml"
            write_private(path, document(snap))
            paths.append(path)
    return paths


def differences(snaps: Mapping[str, Snapshot]) -> list[tuple[str, ...]]:
    """Rows (what, value on each node) where nodes differ: torch, CUDA, NCCL, python first."""
    rows = []
    for label, key in KEY_FACTS:
        rows.append((label, *(s.fact(key) for s in snaps.values())))
    names = sorted({n for s in snaps.values() for n in s.packages})
    for name in names:
        rows.append((name, *(s.packages.get(name, MISSING) for s in snaps.values())))
    return [row for row in rows if len(set(row[1:])) > 1]


def same_facts(snaps: Mapping[str, Snapshot]) -> list[str]:
    """['torch 2.13.0+cpu', ...]: the key facts every node shares."""
    values = list(snaps.values())
    return [
        f"{label} {values[0].fact(k)}"
        for label, k in KEY_FACTS
        if values and len({s.fact(k) for s in values}) == 1
    ]


def render(snapshots: Mapping[str, Snapshot | NodeError]) -> Group:
    """The differences table, or one line saying the nodes are identical; then node errors."""
    snaps = {n: s for n, s in snapshots.items() if isinstance(s, Snapshot)}
    rows, same = differences(snaps), ", ".join(same_facts(snaps))
    parts: list = []
    if snaps and not rows:
        count = len(next(iter(snaps.values())).packages)
        who = "all nodes identical" if len(snaps) > 1 else f"{next(iter(snaps))} only"
        parts.append(Text(f"{who}: {same}; {count} packages"))
    elif rows:
        parts.append(report.table("what differs between nodes", ("", *snaps), rows))
        if same:
            parts.append(Text(f"same on every node: {same}"))
    parts += [
        Text(f"{name}: {err.message}", style="red")
        for name, err in snapshots.items()
        if isinstance(err, NodeError)
    ]
    return Group(*parts)
