"""Ad-hoc output (fold, hostlist, render), --nodes/--exclude together, and the OpenSSH config that
`ddpfleet ssh` hands to ssh -F. The commands themselves: tests/integration/test_adhoc.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpfleet import adhoc
from ddpfleet import inventory as inv
from ddpfleet.cli import openssh, select
from ddpfleet.errors import InventoryError, Unreachable
from ddpfleet.names import hostlist
from ddpfleet.ssh.result import Result


def result(node: str, out: str, code: int = 0, err: str = "") -> Result:
    return Result(node, "cmd", code, out, err, 0.1)


@pytest.mark.parametrize(
    "names, expected",
    [
        (["node0", "node1", "node2", "node4"], "node[0-2,4]"),
        (["node3"], "node3"),
        (["gpu-a", "node1", "node0"], "gpu-a,node[0-1]"),
        (["n01", "n02"], "n01,n02"),  # zero-padded: left as written, never renumbered
        (["a1", "b1", "a2"], "a[1-2],b1"),
    ],
)
def test_hostlist(names, expected):
    assert hostlist(names) == expected


def test_fold_groups_same_output_and_code_and_names_failures():
    results = {
        "node0": result("node0", "Linux\n"),
        "node1": result("node1", "Linux\n"),
        "node2": result("node2", "Linux\n", code=1),
        "node3": Unreachable("node3", "timeout: no answer"),
        "node4": result("node4", "Linux", err="warn\n"),
    }
    text = adhoc.render(adhoc.fold(results))
    assert text.splitlines() == [
        "---------------- node[0-1] (2) exit 0",
        "Linux",
        "---------------- node2 exit 1",
        "Linux",
        "---------------- node3 unreachable",
        "node3: timeout: no answer",
        "---------------- node4 exit 0",
        "Linux",
        "warn",
    ]
    assert adhoc.failures(results) == ["node2 (exit 1)", "node3 (unreachable)"]


def test_render_cleans_terminal_escapes():
    text = adhoc.render(adhoc.fold({"node0": result("node0", "\x1b]0;pwned\x07ok\n")}))
    assert "\x1b" not in text and "ok" in text


@pytest.fixture
def loaded(tmp_path: Path):
    path = tmp_path / "inventory.yaml"
    path.write_text(
        "ssh: {user: ubuntu, port: 2222}\n"
        "nodes:\n  node0: 10.0.0.10\n  node1: 10.0.0.11\n  node2: {host: 10.0.0.12, port: 22}\n"
    )
    return inv.load(path)


def test_exclude_with_and_without_nodes(loaded):
    names = lambda i: [n.name for n in i.nodes]  # noqa: E731
    assert names(select.narrowed(loaded, None, "node1")) == ["node0", "node2"]
    assert names(select.narrowed(loaded, "node2,node0", None)) == ["node2", "node0"]
    assert names(select.narrowed(loaded, "node2,node1", "node0")) == ["node2", "node1"]


@pytest.mark.parametrize(
    "nodes, exclude, message",
    [
        ("node1", "node1", "--nodes and --exclude both name node1"),
        (None, "nod1", "--exclude: unknown node 'nod1'; did you mean 'node1'?"),
        ("nodeX", "node1", "--nodes: unknown node 'nodeX'"),
        (None, "node0,node1,node2", "--exclude node0,node1,node2 leaves no node"),
    ],
)
def test_exclude_mistakes_are_one_line(loaded, nodes, exclude, message):
    with pytest.raises(InventoryError, match=message.replace("?", r"\?")) as e:
        select.narrowed(loaded, nodes, exclude)
    assert "\n" not in str(e.value)


def test_ssh_argv_pins_host_keys_for_the_node_and_its_hops(loaded, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    node = loaded.node("node1")
    args = openssh.argv(loaded, node, ["uptime"])
    assert args[1:] == [
        "-F",
        str(loaded.root / ".ddpfleet/ssh/node1.conf"),
        "-l",
        "ubuntu",
        "-p",
        "2222",
        "--",
        "10.0.0.11",
        "uptime",
    ]
    conf = Path(args[2])
    assert conf.stat().st_mode & 0o077 == 0
    lines = [line.strip() for line in conf.read_text().splitlines()]
    # Options come before the includes: OpenSSH keeps the first value, so ~/.ssh/config
    # cannot turn the checking off, for the node or for a ProxyJump hop (-F reaches hops).
    first_include = next(i for i, line in enumerate(lines) if line.startswith("Include"))
    assert lines.index("StrictHostKeyChecking yes") < first_include
    known = f'UserKnownHostsFile "{node.known_hosts}" "{tmp_path}/home/.ssh/known_hosts"'
    assert known in lines and lines.index(known) < first_include
    assert f'Include "{tmp_path}/home/.ssh/config"' in lines
    assert (loaded.root / ".ddpfleet" / ".gitignore").read_text() == "*\n"
