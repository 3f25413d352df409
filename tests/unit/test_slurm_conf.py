"""roles/slurm/conf.py: settings checked on the controller, the three files rendered (pure)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from ddpfleet.engine.roles import load_role
from ddpfleet.errors import InventoryError

ROLE = load_role("slurm")
CONF = __import__("ddpfleet_role_slurm.conf", fromlist=["conf"])
NodeHW = CONF.NodeHW


def inventory(lines=None):
    where = lambda *keys: f"inventory.yaml:{(lines or {}).get(keys, 7)}"  # noqa: E731
    return SimpleNamespace(cluster=SimpleNamespace(name="demo"), where=where, path=Path("x"))


def settings(**changes):
    return CONF.settings(MappingProxyType({**ROLE.defaults, **changes}), inventory())


NODES = [
    NodeHW("node0", "node0", "10.0.0.10", 96, 1000000, 8, "cgroup2fs"),
    NodeHW("node1", "gpu-b", "10.0.0.11", 96, 1000000, 1, "cgroup2fs"),
]


def test_defaults_are_valid_and_take_the_cluster_name():
    s = settings()
    assert s.cluster_name == "demo" and s.partition == "main"
    assert (s.slurmctld_port, s.slurmd_port) == (6817, 6818)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"slurmd_port": 6817}, "slurm.slurmd_port: is slurmctld_port too"),
        ({"slurmctld_port": 70000}, "slurm.slurmctld_port: must be a whole number 1-65535"),
        ({"partition": "two words"}, "slurm.partition: 'two words' is not a name"),
        ({"munge_uid": "990"}, "slurm.munge_uid: must be a whole number"),
        ({"cgroup_plugin": "v3"}, "slurm.cgroup_plugin: 'v3' is not one of"),
        ({"proctrack_type": "linuxproc"}, "slurm.proctrack_type: 'linuxproc' is not a plugin"),
        ({"options": {"NodeName": "x"}}, "NodeName is written by the role itself"),
        ({"options": {"maxJobCount": 5}}, "'maxJobCount' is not a slurm.conf key"),
        ({"options": {"MaxJobCount": "5\nNodeName=evil"}}, "must be one word"),
        ({"options": ["MaxJobCount=5"]}, "slurm.options: must be a mapping"),
    ],
)
def test_a_bad_setting_names_its_line_and_says_nothing_changed(changes, words):
    with pytest.raises(InventoryError) as e:
        settings(**changes)
    assert str(e.value).startswith("inventory.yaml:7: ")
    assert words in str(e.value) and str(e.value).endswith("nothing was changed")


def test_slurm_conf_lists_every_node_with_its_hardware_and_the_master_by_hostname():
    files = CONF.files(settings(options={"MaxJobCount": 5000}), NODES, "node0")
    conf = files[CONF.SLURM_CONF]
    assert "SlurmctldHost=node0(10.0.0.10)\n" in conf
    assert "NodeName=node0 NodeAddr=10.0.0.10 CPUs=96 RealMemory=1000000 Gres=gpu:8 " in conf
    assert "NodeName=node1 NodeAddr=10.0.0.11 CPUs=96 RealMemory=1000000 Gres=gpu:1 " in conf
    assert "GresTypes=gpu\n" in conf and "MaxJobCount=5000\n" in conf
    assert "PartitionName=main Nodes=ALL Default=YES" in conf
    gres = files[CONF.GRES_CONF]
    assert "NodeName=node0 Name=gpu File=/dev/nvidia[0-7]\n" in gres
    assert "NodeName=node1 Name=gpu File=/dev/nvidia0\n" in gres
    assert files[CONF.CGROUP_CONF].endswith("CgroupPlugin=cgroup/v2\n")


def test_cpu_nodes_get_no_gres_and_cgroup_v1_on_a_tmpfs_cgroup_root():
    cpu = [NodeHW("node0", "node0", "", 2, 2000, 0, "tmpfs")]
    files = CONF.files(settings(), cpu, "node0")
    assert "Gres" not in files[CONF.SLURM_CONF] and "NodeAddr" not in files[CONF.SLURM_CONF]
    assert "SlurmctldHost=node0\n" in files[CONF.SLURM_CONF]
    assert "File=" not in files[CONF.GRES_CONF]
    assert files[CONF.CGROUP_CONF].endswith("CgroupPlugin=cgroup/v1\n")


def test_the_stamp_tells_a_restart_from_a_re_read():
    base = CONF.files(settings(), NODES, "node0")
    option = CONF.files(settings(options={"MaxJobCount": 5000}), NODES, "node0")
    bigger = CONF.files(settings(), [*NODES, NodeHW("node2", "n2", "", 8, 64, 0, "")], "node0")
    a, b, c = CONF.stamp(base), CONF.stamp(option), CONF.stamp(bigger)
    assert a != b and a.split()[1] == b.split()[1]  # a re-read is enough
    assert a.split()[1] != c.split()[1]  # a new node: restart
    assert CONF.stamp(base) == a


def test_node_addr_only_for_addresses():
    assert CONF.node_addr("10.0.0.1") == "10.0.0.1"
    assert CONF.node_addr("gpu-a") == ""
