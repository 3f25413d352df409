"""Roles are discovered from their own headers (ORDER, SECTION, OPT_IN): no central list."""

from __future__ import annotations

import textwrap

import pytest

from ddpfleet import catalog
from ddpfleet import inventory as inv
from ddpfleet.engine.settings import role_names, select_roles, validate_sections
from ddpfleet.errors import DdpfleetError, InventoryError


def role(roles_dir, name, header, defaults=""):
    d = roles_dir / name
    d.mkdir(parents=True)
    (d / "role.py").write_text(
        textwrap.dedent(header) + "\n\ndef apply(host, cfg):\n    return iter(())\n"
    )
    (d / "defaults.yaml").write_text(textwrap.dedent(defaults))
    return d


def inventory(tmp_path, extra="", **kwargs):
    p = tmp_path / "inventory.yaml"
    p.write_text("nodes:\n  node0: {host: 10.0.0.10}\n" + textwrap.dedent(extra))
    return inv.load(p, check_files=False, **kwargs)


def test_the_shipped_roles_run_in_the_order_their_headers_declare():
    assert role_names() == [
        "train_user",
        "openssh_server",
        "miniconda",
        "conda_env",
        "venv_env",
        "jupyter",
        "slurm",
    ]
    assert catalog.sections() == (
        "train_user",
        "openssh_server",
        "miniconda",
        "python_env",
        "jupyter",
        "slurm",
    )
    assert [r.name for r in catalog.discover() if r.opt_in] == ["slurm"]


def test_a_new_role_folder_is_discovered_and_its_section_accepted(tmp_path):
    roles_dir = tmp_path / "roles"
    role(roles_dir, "first", 'ORDER = 10\nSECTION = "first"\n', "first_x: 1\n")
    role(roles_dir, "gpu_burn", 'ORDER = 5\nSECTION = "burn"\n', "gpu_burn_minutes: 5\n")
    assert role_names(roles_dir) == ["gpu_burn", "first"]

    loaded = inventory(tmp_path, "burn: {minutes: 3}\n", roles_dir=roles_dir)
    assert loaded.section("burn") == {"minutes": 3}
    chosen = select_roles(roles_dir=roles_dir)
    assert [r.name for r in chosen] == ["gpu_burn", "first"]
    validate_sections(loaded, chosen, roles_dir=roles_dir)
    assert chosen[0].section == "burn"
    assert chosen[0].config(loaded, loaded.nodes[0])["minutes"] == 3

    # The shipped roles know no such section; nor does the new role know a misspelt key.
    with pytest.raises(InventoryError, match=r"inventory.yaml:3: burn: unknown key"):
        inventory(tmp_path, "burn: {minutes: 3}\n")
    with pytest.raises(InventoryError, match=r"burn.minuts: unknown key; did you mean 'minutes'"):
        inventory(tmp_path, "burn: {minuts: 3}\n", roles_dir=roles_dir)


def test_an_opt_in_role_is_off_unless_named(tmp_path):
    roles_dir = tmp_path / "roles"
    role(roles_dir, "extra", "ORDER = 1\nOPT_IN = True\n", "extra_enabled: false\n")
    loaded = inventory(tmp_path, roles_dir=roles_dir)
    node = loaded.nodes[0]
    assert select_roles(roles_dir=roles_dir)[0].config(loaded, node)["enabled"] is False
    assert select_roles("extra", roles_dir=roles_dir)[0].config(loaded, node)["enabled"] is True


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ('SECTION = "a"', r"roles/bad/role.py: no ORDER = <integer> at the top level; add one"),
        ("ORDER = '10'", r"roles/bad/role.py: no ORDER = <integer>"),
        ("ORDER = 10 + X", r"roles/bad/role.py:1: ORDER must be a literal on one line"),
        ("ORDER = 10\nSECTION = 3", r"roles/bad/role.py: SECTION must be a string"),
        ("ORDER = 20", r"roles/good/role.py: ORDER = 20 is also roles/bad's; give each role"),
    ],
)
def test_a_header_that_cannot_work_is_one_line_naming_the_file(tmp_path, header, problem):
    roles_dir = tmp_path / "roles"
    role(roles_dir, "good", "ORDER = 20\n")
    role(roles_dir, "bad", header)
    with pytest.raises(DdpfleetError, match=problem):
        catalog.discover(roles_dir)


def test_a_section_may_not_take_an_inventory_key(tmp_path):
    roles_dir = tmp_path / "roles"
    role(roles_dir, "cluster", "ORDER = 1\n")
    with pytest.raises(InventoryError, match=r"SECTION = 'cluster' is a key of the inventory"):
        inventory(tmp_path, roles_dir=roles_dir)
