"""Every value is checked once, when the inventory loads (issue 24 item 8): a setting outside a
role's CHOICES, a node var that sets one, a boolean given as text; and sandbox.up's node count is
--count, because --nodes names nodes in every other task."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ddpfleet import catalog
from ddpfleet import inventory as inv
from ddpfleet.errors import InventoryError

ROOT = Path(__file__).resolve().parents[2]
BASE = "nodes:\n  node0: {host: 10.0.0.10}\n"


def load(tmp_path, extra: str):
    p = tmp_path / "inventory.yaml"
    p.write_text(BASE + textwrap.dedent(extra))
    return inv.load(p, check_files=False)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "python_env: {manager: pip}\n",
            r"^inventory.yaml:3: python_env.manager: 'pip' is not a choice; use conda or venv$",
        ),
        (
            "python_env:\n  manager: Venv\n",
            r"^inventory.yaml:4: python_env.manager: 'Venv' is not a choice; use conda or venv$",
        ),
        (
            "python_env: {wheelhouse: 'yes'}\n",
            r"^inventory.yaml:3: python_env.wheelhouse: must be true or false, got 'yes'$",
        ),
        (
            "python_env: {manger: venv}\n",
            r"^inventory.yaml:3: python_env.manger: unknown key; did you mean 'manager'",
        ),
    ],
)
def test_a_bad_setting_is_one_line_at_load(tmp_path, extra, message):
    with pytest.raises(InventoryError, match=message):
        load(tmp_path, extra)


def test_a_node_var_that_sets_a_choice_is_checked_too(tmp_path):
    p = tmp_path / "inventory.yaml"
    p.write_text("nodes:\n  node0:\n    host: 10.0.0.10\n    vars: {venv_env_manager: pip}\n")
    with pytest.raises(
        InventoryError,
        match=r"^inventory.yaml:4: nodes.node0.vars.venv_env_manager: 'pip' is not a choice",
    ):
        inv.load(p, check_files=False)


def test_good_settings_load(tmp_path):
    loaded = load(tmp_path, "python_env: {manager: venv, wheelhouse: true}\n")
    assert loaded.section("python_env")["manager"] == "venv"
    assert catalog.setting_problem("python_env", "manager", "conda") is None


def sandbox_task(tmp_path, *args):
    (tmp_path / "inventory.yaml").write_text((ROOT / "inventory.yaml").read_text())
    return subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ("sandbox.up", "--nodes", "node0"),
            "error: sandbox.up --nodes node0: --nodes names nodes (sandbox.stop/start, train, "
            "...); say how many nodes with --count N",
        ),
        (("sandbox.up", "--count", "node0"), "error: --count 'node0': give a number of nodes"),
        (("sandbox.down", "--count", "0"), "error: --count '0': give a number of nodes"),
    ],
)
def test_sandbox_node_count_is_count_and_a_mistake_is_one_line(tmp_path, args, line):
    r = sandbox_task(tmp_path, *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    (said,) = r.stderr.strip().splitlines()
    assert said.startswith(line), said
