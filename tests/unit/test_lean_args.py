"""Which command lines the installed command's lean path takes (ddpfleet/__main__.py): only
ping and gpu-status with their long flags, each once; anything else is Invoke's to parse."""

from __future__ import annotations

import pytest

from ddpfleet import __main__ as main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ping"], ("ping", {})),
        (
            ["ping", "--nodes", "a,b", "--inventory=x.yaml"],
            ("ping", {"nodes": "a,b", "inventory": "x.yaml"}),
        ),
        (
            ["gpu-status", "--json", "--exclude", "n2"],
            ("gpu-status", {"json": True, "exclude": "n2"}),
        ),
    ],
)
def test_taken(argv, expected) -> None:
    assert main.lean_args(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--list"],
        ["-e", "ping"],  # Invoke's own flags come before the task
        ["train"],
        ["gpu_status"],
        ["ping", "-n", "a"],  # short flags: Invoke's
        ["ping", "--exclude", "a"],  # ping has no --exclude: Invoke says so
        ["ping", "--nodes"],  # a value missing
        ["ping", "--nodes", "--inventory", "x"],
        ["ping", "--nodes", "a", "--nodes", "b"],  # twice
        ["gpu-status", "--watch", "2"],
        ["gpu-status", "--json=yes"],
        ["ping", "--help"],
        ["ping", "extra"],
        ["ping", "ping"],  # two tasks
    ],
)
def test_left_to_invoke(argv) -> None:
    assert main.lean_args(argv) is None


def test_no_keeper_means_the_full_program(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("nodes:\n  node0: {host: 127.0.0.1}\n")
    assert main.lean(["ping", "--inventory", str(inventory)]) is None
    assert main.lean(["ping", "--inventory", str(tmp_path / "missing.yaml")]) is None
