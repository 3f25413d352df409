"""train_user: getent's answers in, one step and its command out."""

from __future__ import annotations

import pytest

from tests.roles.fakehost import FakeHost, apply

TRAIN = "train:x:2000:2000:ddpfleet training:/home/train:/bin/bash"


def node(answer: str, check: bool = False) -> FakeHost:
    return FakeHost(answers=[(r"getent passwd", 0, answer)], check=check)


def run(h: FakeHost, **cfg):
    steps, _ = apply("train_user", h, **cfg)
    return [(s.name, s.status, s.reason) for s in steps]


def test_converged_user_is_one_probe_and_no_change():
    h = node(f"user={TRAIN}\ngroup=train:x:2000:\nuid_holder=train\ngid_holder=train\n")
    assert run(h) == [("user", "ok", "train (uid 2000, gid 2000, home /home/train)")]
    assert h.changes == []


def test_fresh_node_gets_the_user_with_its_ids_and_no_password():
    h = node("")
    (step,) = run(h)
    assert step[:2] == ("user", "changed")
    (cmd,) = h.changes
    assert "useradd -m -u" in cmd and cmd.endswith(" sh train 2000 2000 /bin/bash")


def test_check_mode_only_says_what_it_would_do():
    h = node("", check=True)
    assert run(h)[0][2].startswith("would create train (uid 2000, gid 2000")
    assert h.changes == []


@pytest.mark.parametrize(
    "answer, words",
    [
        ("user=train:x:1001:1001::/home/train:/bin/bash\n", "exists with uid 1001 gid 1001"),
        ("uid_holder=ubuntu\n", "uid 2000 belongs to ubuntu"),
        ("group=train:x:3000:\n", "group train exists with gid 3000"),
        ("gid_holder=docker\n", "gid 2000 belongs to group docker"),
    ],
)
def test_other_ids_fail_and_nothing_is_renumbered(answer, words):
    h = node(answer)
    (step,) = run(h)
    assert step[1] == "failed" and words in step[2]
    assert h.changes == []


def test_root_is_refused_unless_the_inventory_says_so():
    h = node("")
    assert run(h, name="root", uid=0)[0][1] == "failed"
    assert "training as root is refused" in run(node(""), name="root", uid=0)[0][2]
    assert run(node(""), name="root", uid=0, allow_root=True)[0][1] == "ok"


def test_jupyter_runs_as_the_training_user_unless_training_runs_as_root(tmp_path):
    from ddpfleet import inventory as inv
    from ddpfleet.jupyter import default_user

    path = tmp_path / "inventory.yaml"
    path.write_text("nodes: {node0: 10.0.0.10}\n")
    i = inv.load(path)
    assert default_user(i, i.nodes[0]) == "train"
    path.write_text("train_user: {name: root, allow_root: true}\nnodes: {node0: 10.0.0.10}\n")
    i = inv.load(path)
    assert default_user(i, i.nodes[0]) == "jupyter"  # never root


def test_train_refuses_root_in_one_line_unless_the_inventory_allows_it(tmp_path):
    from ddpfleet import inventory as inv
    from ddpfleet import launch
    from ddpfleet.errors import PlanError

    path = tmp_path / "inventory.yaml"
    path.write_text("train_user: {name: root}\nnodes: {node0: 10.0.0.10}\n")
    with pytest.raises(PlanError, match="node0: training as root is refused") as e:
        launch.resolve(inv.load(path), launch.TrainFlags(), tmp_path / "logs")
    assert "\n" not in str(e.value) and "allow_root: true" in str(e.value)
    path.write_text("train_user: {name: root, allow_root: true}\nnodes: {node0: 10.0.0.10}\n")
    assert launch.resolve(inv.load(path), launch.TrainFlags(), tmp_path / "logs").users == {
        "node0": "root"
    }
    path.write_text("nodes: {node0: 10.0.0.10}\n")  # the default: every rank runs as train
    assert launch.resolve(inv.load(path), launch.TrainFlags(), tmp_path / "logs").users == {
        "node0": "train"
    }
