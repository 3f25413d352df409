"""slurm role: the survey and one probe's answer in, steps and commands out (FakeHost)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import load_role
from tests.roles.fakehost import FakeHost, apply

ROLE = load_role("slurm")
CONF = __import__("ddpfleet_role_slurm.conf", fromlist=["conf"])
SURVEY = __import__("ddpfleet_role_slurm.survey", fromlist=["survey"])
DAEMONS = __import__("ddpfleet_role_slurm.daemons", fromlist=["daemons"])
KEY = SURVEY.MungeKey(Path("/x/munge.key"), b"k" * 1024)
NODES = [
    CONF.NodeHW("node0", "node0", "10.0.0.10", 2, 4000, 0, "tmpfs"),
    CONF.NodeHW("node1", "node1", "10.0.0.11", 2, 4000, 0, "tmpfs"),
]
SUPERVISOR = "/bin/sh " + DAEMONS.SUPERVISOR


def survey(**options):
    inventory = SimpleNamespace(
        cluster=SimpleNamespace(name="demo"), where=lambda *k: "inventory.yaml:3"
    )
    cfg = MappingProxyType({**ROLE.defaults, "options": options})
    s = CONF.settings(cfg, inventory)
    return SURVEY.Survey(s, "node0", tuple(NODES), CONF.files(s, NODES, "node0"), KEY)


def probe_answer(found, fresh: bool = False, stamp: str | None = None, **extra) -> str:
    if fresh:
        return "uid_munge=\ngid_munge=\nuid_slurm=\ngid_slurm=\nmissing= munge slurmd\n" + (
            "key= \nabsent_dirs= /run/munge /var/lib/ddpfleet/slurm\n"
        )
    stamp = stamp or CONF.stamp(found.files)
    lines = [
        "uid_munge=990",
        "gid_munge=990",
        "uid_slurm=991",
        "gid_slurm=991",
        "missing=",
        f"key=munge 400 {KEY.digest}",
        "absent_dirs=",
        f"stamp_munge={KEY.digest}",
        "supervisor_munge=10",
        "pid_munge=11",
        f"argv_munge={SUPERVISOR} {' '.join(DAEMONS.supervised('munge', 'node1')[1:])}",
        f"stamp_slurmd={stamp}",
        "supervisor_slurmd=20",
        "pid_slurmd=21",
        f"argv_slurmd={SUPERVISOR} {' '.join(DAEMONS.supervised('slurmd', 'node1')[1:])}",
    ]
    return "\n".join(lines + [f"{k}={v}" for k, v in extra.items()]) + "\n"


def node1(found, answer: str, files=None, check=False) -> FakeHost:
    fake = FakeHost(
        answers=[(r"absent_dirs", 0, answer)], name="node1", files=files or {}, check=check
    )
    fake.role = ROLE
    fake.host.surveys = {"slurm": found}
    return fake


def converged_files(found) -> dict[str, bytes]:
    script = (ROLE.directory / "files" / "slurm-supervise").read_bytes()
    files = {p: t.encode() for p, t in found.files.items()}
    return {**files, DAEMONS.SUPERVISOR: script}


def modes(fake: FakeHost) -> None:
    fake.modes[DAEMONS.SUPERVISOR] = 0o755


def test_a_converged_worker_changes_nothing():
    found = survey()
    fake = node1(found, probe_answer(found), converged_files(found))
    modes(fake)
    steps, _ = apply("slurm", fake)
    assert [(s.name, s.status) for s in steps] == [
        ("users", "ok"),
        ("packages", "ok"),
        ("dirs", "ok"),
        ("munge key", "ok"),
        ("files", "ok"),
        ("service", "ok"),
        ("munge", "ok"),
        ("slurmd", "ok"),
    ]
    assert fake.changes == []


def test_a_fresh_worker_gets_users_packages_key_files_and_started_daemons():
    found = survey()
    fake = node1(found, probe_answer(found, fresh=True))
    steps, _ = apply("slurm", fake)
    assert all(s.status == "changed" for s in steps), steps
    ran = "\n".join(fake.changes)
    assert "groupadd --system --gid 990 munge" in ran
    assert "useradd --system --uid 991 --gid slurm" in ran
    assert "apt-get -o DPkg::Lock::Timeout=300 install -y -q munge slurmd" in ran
    assert fake.files[DAEMONS.KEY] == KEY.reveal() and fake.modes[DAEMONS.KEY] == 0o400
    assert fake.files[CONF.SLURM_CONF].decode() == found.files[CONF.SLURM_CONF]
    assert f"{DAEMONS.SUPERVISOR} {DAEMONS.STATE_DIR} slurmd /usr/sbin/slurmd -D -N node1" in ran
    assert "slurmctld" not in [s.name for s in steps]  # the master's alone


def test_check_mode_changes_nothing_and_says_what_it_would_do():
    found = survey()
    fake = node1(found, probe_answer(found, fresh=True), check=True)
    steps, _ = apply("slurm", fake)
    assert fake.changes == [] and DAEMONS.KEY not in fake.files
    assert [s.reason.split()[0] for s in steps if s.status == "changed"] == ["would"] * len(
        [s for s in steps if s.status == "changed"]
    )


def test_a_user_with_another_uid_fails_with_the_fix():
    found = survey()
    answer = probe_answer(found).replace("uid_munge=990", "uid_munge=105")
    steps, _ = apply("slurm", node1(found, answer))
    assert steps[-1].status == "failed"
    assert "user munge has uid 105, slurm.munge_uid says 990" in steps[-1].reason


def test_an_option_change_is_a_re_read_not_a_restart():
    old, new = survey(), survey(MaxJobCount=5000)
    fake = node1(new, probe_answer(new, stamp=CONF.stamp(old.files)), converged_files(old))
    modes(fake)
    steps, _ = apply("slurm", fake)
    assert ("slurmd", "changed") in [(s.name, s.status) for s in steps]
    assert "kill -HUP 21" in fake.changes
    assert not any("slurm-supervise" in c and "start" in c for c in fake.changes)


def test_a_node_change_restarts_slurmd():
    old = survey()
    three = [*NODES, CONF.NodeHW("node2", "node2", "10.0.0.12", 2, 4000, 0, "tmpfs")]
    files = CONF.files(old.settings, three, "node0")
    grown = SURVEY.Survey(old.settings, "node0", tuple(three), files, KEY)
    fake = node1(grown, probe_answer(grown, stamp=CONF.stamp(old.files)), converged_files(old))
    modes(fake)
    steps, _ = apply("slurm", fake)
    step = next(s for s in steps if s.name == "slurmd")
    assert step.status == "changed" and "nodes or ports changed" in step.reason
    assert "kill -HUP 21" not in fake.changes
    started = "/var/log/ddpfleet-slurmd.log setsid -f " + " ".join(
        DAEMONS.supervised("slurmd", "node1")
    )
    assert any(c.startswith("python3 -I -c ") and started in c for c in fake.changes)


def test_a_survey_problem_fails_before_anything():
    found = SURVEY.Survey(survey().settings, "node0", problem="slurm.conf needs every node: x")
    steps, _ = apply("slurm", node1(found, ""))
    assert [(s.name, s.status) for s in steps] == [("survey", "failed")]


class ProbedFleet:
    """A fleet whose nodes answer the survey's probe with `answers` (name: probe output)."""

    def __init__(self, inventory, answers):
        self.inventory, self.nodes, self.answers = inventory, inventory.nodes, answers

    def map(self, fn):
        def conn(name):
            return SimpleNamespace(
                name=name, run=lambda cmd: SimpleNamespace(stdout=self.answers[name])
            )

        return {n.name: fn(conn(n.name)) for n in self.nodes}


def probe_output(hostname: str) -> str:
    return f"hostname={hostname}\ncpus=2\nmemory_mb=4000\ngpus=0\ncgroup=cgroup2fs\n"


@pytest.mark.parametrize(
    "hostname", ["node0 #x", "node0\tSlurmUser=root", "a=b", "node0#", "-node0", "n/0"]
)
def test_a_hostname_that_would_inject_into_slurm_conf_is_refused(tmp_path, hostname):
    """The review's #8: the master's `hostname -s` becomes SlurmctldHost= in every node's
    slurm.conf. A bad one is one line naming the node and the value; no file, no munge key."""
    path = tmp_path / "inventory.yaml"
    path.write_text("slurm: {enabled: true}\nnodes: {node0: 10.0.0.10, node1: 10.0.0.11}\n")
    fleet = ProbedFleet(
        inv.load(path), {"node0": probe_output(hostname), "node1": probe_output("node1")}
    )
    found = SURVEY.survey(fleet, ROLE, check=False)
    assert found.problem.startswith("slurm.conf needs every node: node0: hostname ")
    assert repr(hostname) in found.problem and "\n" not in found.problem
    assert found.problem.endswith("; nothing was changed") and not found.files
    assert not (tmp_path / ".ddpfleet").exists()  # the munge key was not made either
    fake = node1(found, "")
    steps, _ = apply("slurm", fake)
    assert [(s.name, s.status) for s in steps] == [("survey", "failed")] and not fake.changes


def test_plain_hostnames_go_into_slurm_conf(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text("slurm: {enabled: true}\nnodes: {node0: 10.0.0.10, node1: 10.0.0.11}\n")
    answers = {"node0": probe_output("gpu-01"), "node1": probe_output("gpu_02")}
    found = SURVEY.survey(ProbedFleet(inv.load(path), answers), ROLE, check=False)
    assert found.problem == ""
    assert "SlurmctldHost=gpu-01(10.0.0.10)\n" in found.files[CONF.SLURM_CONF]
    assert (tmp_path / ".ddpfleet" / ".gitignore").read_text() == "*\n"  # beside the key
