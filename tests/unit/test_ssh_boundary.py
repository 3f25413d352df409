"""paramiko and fabric are the SSH layer's own: nothing outside ddpfleet/ssh/ imports them or
reaches into a connection's Fabric object (errors.py: SSH errors become ours at that boundary)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SSH_LIBRARIES = {"paramiko", "fabric"}


def _sources() -> list[Path]:
    ssh = ROOT / "ddpfleet" / "ssh"
    files = [*(ROOT / "ddpfleet").rglob("*.py"), *(ROOT / "roles").rglob("*.py")]
    return sorted(p for p in files if ssh not in p.parents)


def _crossings(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Attribute) and node.attr == "fabric":
            names = ["<conn>.fabric"]
        for name in names:
            if name.split(".")[0] in SSH_LIBRARIES or name == "<conn>.fabric":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    return found


def test_only_the_ssh_layer_touches_paramiko_or_fabric():
    sources = _sources()
    assert any(p.name == "bootstrap.py" for p in sources)  # the walk sees the package
    assert [c for p in sources for c in _crossings(p)] == []
