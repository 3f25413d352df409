"""Who training runs as on a node: the train_user role's settings, read by the role, by
`invoke train` (every rank drops to this user) and by jupyter (its default user).

    user = trainuser.settings(inventory, node)    # TrainUser('train', 2000, 2000, False)
    trainuser.refuse_root(user, node.name)        # PlanError unless root was asked for

Precedence is the roles' (ddpfleet.role_settings): defaults.yaml < train_user: < node vars.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddpfleet.engine.settings import load_role
from ddpfleet.errors import PlanError
from ddpfleet.inventory import Inventory, Node

ROLE = "train_user"


@dataclass(frozen=True)
class TrainUser:
    name: str
    uid: int
    gid: int
    allow_root: bool

    @property
    def root(self) -> bool:
        return self.name == "root" or self.uid == 0


def settings(inventory: Inventory, node: Node) -> TrainUser:
    cfg = load_role(ROLE).config(inventory, node)
    return TrainUser(str(cfg["name"]), int(cfg["uid"]), int(cfg["gid"]), bool(cfg["allow_root"]))


def refuse_root(user: TrainUser, node: str) -> None:
    """Training as root only when the inventory says so explicitly."""
    if user.root and not user.allow_root:
        raise PlanError(
            f"{node}: training as root is refused (train_user.name is {user.name}); use an "
            "ordinary user (the default train), or set train_user.allow_root: true to mean it"
        )
