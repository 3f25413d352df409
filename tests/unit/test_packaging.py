"""What the wheel ships (pyproject.toml lists its packages: roles/ maps into ddpfleet/roles/) and
what `ddpfleet init` writes. The wheel itself is built and run in tests/integration/test_installed.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import yaml

from ddpfleet import inventory as inv
from ddpfleet.cli.init import init_project
from ddpfleet.engine import settings
from ddpfleet.errors import DdpfleetError

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_and_role_is_listed_for_the_wheel():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    packages = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ddpfleet").rglob("__init__.py")
    }
    roles = {f"ddpfleet.roles.{p.parent.name}" for p in (ROOT / "roles").glob("*/role.py")}
    assert packages | roles == listed, "add the new package to [tool.setuptools] packages"
    assert tool["package-dir"] == {"ddpfleet.roles": "roles"}


def test_roles_come_from_the_checkout_here():
    assert settings.ROLES_DIR == ROOT / "roles"


def test_init_writes_a_valid_commented_inventory_and_gitignore(tmp_path: Path):
    project = tmp_path / "my proj"
    project.mkdir()
    (project / ".gitignore").write_text("*.pt\nlogs")  # no newline at the end; logs/ there
    done = init_project(project)
    assert done[0].startswith("wrote inventory.yaml")
    assert (project / ".gitignore").read_text() == "*.pt\nlogs\n.ddpfleet/\n/runs/\n"
    text = (project / "inventory.yaml").read_text()
    assert text.count("#") > 10
    assert yaml.safe_load(text)["cluster"]["name"] == "my-proj"
    loaded = inv.load(project / "inventory.yaml", check_files=False)
    assert [n.name for n in loaded.nodes] == ["node0", "node1"]
    roles = settings.select_roles(None, None)
    settings.validate_sections(loaded, roles)  # every section is a role's


def test_init_never_overwrites(tmp_path: Path):
    (tmp_path / "inventory.yaml").write_text("mine\n")
    with pytest.raises(DdpfleetError, match="already exists"):
        init_project(tmp_path)
    assert (tmp_path / "inventory.yaml").read_text() == "mine\n"
    assert not (tmp_path / ".gitignore").exists()
