"""Opt-in roles (slurm) and the inventory's train.launcher."""

from __future__ import annotations

import textwrap

import pytest

from ddpfleet import inventory as inv
from ddpfleet.engine.settings import select_roles
from ddpfleet.errors import InventoryError

BASE = """\
nodes:
  node0: {host: 10.0.0.10}
"""


def load(tmp_path, extra: str = ""):
    p = tmp_path / "inventory.yaml"
    p.write_text(BASE + textwrap.dedent(extra))
    return inv.load(p, check_files=False)


def test_slurm_is_selected_but_off_unless_enabled_or_named(tmp_path):
    loaded = load(tmp_path)
    node = loaded.nodes[0]
    everything = {r.name: r for r in select_roles()}
    assert everything["slurm"].config(loaded, node)["enabled"] is False
    named = {r.name: r for r in select_roles("venv_env,slurm")}
    assert named["slurm"].config(loaded, node)["enabled"] is True
    on = load(tmp_path, "slurm: {enabled: true, partition: gpu}\n")
    assert everything["slurm"].config(on, node)["partition"] == "gpu"
    assert everything["slurm"].config(on, node)["enabled"] is True


def test_an_unknown_slurm_key_is_an_inventory_mistake(tmp_path):
    # Named when the inventory loads (every task), not only when bootstrap runs the role.
    with pytest.raises(InventoryError, match=r"inventory.yaml:3: slurm.partiton: unknown key; "):
        load(tmp_path, "slurm: {partiton: gpu}\n")


def test_train_launcher_from_the_inventory(tmp_path):
    assert load(tmp_path).launcher == "ssh"
    assert load(tmp_path, "train: {launcher: slurm}\n").launcher == "slurm"
    with pytest.raises(InventoryError, match=r"train.launcher: 'pbs' is not a launcher"):
        load(tmp_path, "train: {launcher: pbs}\n")
    with pytest.raises(InventoryError, match=r"train.lanucher: unknown key"):
        load(tmp_path, "train: {lanucher: slurm}\n")
