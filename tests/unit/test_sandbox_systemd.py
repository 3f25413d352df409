"""A systemd sandbox node's files, masks and cgroup (ddpfleet.sandbox.systemd_init), no root."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpfleet.errors import SandboxError
from ddpfleet.sandbox import systemd_init
from ddpfleet.sandbox.spec import SandboxNode, SandboxSpec

HYBRID = """\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
34 25 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
35 25 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
"""
UNIFIED = "25 1 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
NESTED = "25 1 0:23 /init.scope /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(
    "mountinfo, root",
    [
        (HYBRID, Path("/sys/fs/cgroup/unified")),
        (UNIFIED, Path("/sys/fs/cgroup")),
        (NESTED, None),  # a mount of a subtree is not the hierarchy's root
        ("25 1 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", None),
    ],
)
def test_cgroup2_root(mountinfo, root):
    assert systemd_init.cgroup2_root(mountinfo) == root


def test_cgroup_dir_names_the_node_and_fails_without_cgroup2():
    assert systemd_init.cgroup_dir("ddy", "node0", HYBRID) == Path(
        "/sys/fs/cgroup/unified/ddpfleet-ddy-node0"
    )
    with pytest.raises(SandboxError, match="node0: init systemd needs a cgroup2 hierarchy"):
        systemd_init.cgroup_dir("ddy", "node0", "")


def test_masked_keeps_targets_slices_journal_and_halting(tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    names = ["getty@.service", "ssh.service", "multi-user.target", "system.slice",
             "systemd-journald.service", "systemd-poweroff.service", "apt-daily.timer",
             "dbus.socket", "tmp.mount"]  # fmt: skip
    for name in names:
        (units / name).write_text("")
    (units / "multi-user.target.wants").mkdir()
    assert systemd_init.masked((units,)) == [
        "apt-daily.timer",
        "getty@.service",
        "ssh.service",
        "tmp.mount",
    ]


def test_prepare_masks_writes_units_and_keeps_machine_id(tmp_path, monkeypatch):
    monkeypatch.setattr(systemd_init, "masked", lambda: ["getty@.service", "ssh.service"])
    systemd_init.prepare(tmp_path, "no")
    units = tmp_path / "etc/systemd/system"
    assert Path(units / "getty@.service").readlink() == Path("/dev/null")
    sshd = (units / systemd_init.SSHD_UNIT).read_text()
    assert "PermitRootLogin=no" in sshd and "PasswordAuthentication=no" in sshd
    assert "Wants=ddpfleet-sshd.service" in (units / systemd_init.TARGET).read_text()
    first = (tmp_path / "etc/machine-id").read_text()
    systemd_init.prepare(tmp_path, "no")  # again: idempotent, same identity
    assert (tmp_path / "etc/machine-id").read_text() == first


def test_spec_checks_init(tmp_path):
    node = (SandboxNode("node0", "10.229.0.10"),)
    args = ("ddy", "10.229.0.0/24", node, tmp_path, tmp_path / "k", tmp_path / "kh")
    assert SandboxSpec(*args, init="systemd").init == "systemd"
    with pytest.raises(SandboxError, match="init 'upstart': use sandbox or systemd"):
        SandboxSpec(*args, init="upstart")
