"""train_user: the ordinary user that training and Jupyter run as, same uid and gid everywhere.

One probe (getent: the user and group by name, whoever holds the uid and gid), then one step:

    user    found with the right ids (ok); or created: its own group (groupadd -g GID), the user
            (useradd -m -u UID -g GID, no password: nobody logs in with one), its home 0750.
            An existing user or group with other ids fails the step: ddpfleet never renumbers
            a user (files on disks and shared filesystems carry the old ids).

Root is refused unless train_user.allow_root says so. The env stays root's (venv_env /
conda_env make it as root, 0755): this user reads and runs it and cannot change it; its code
and run dirs are made by `invoke train`, as this user, under its home.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ddpfleet.engine.roles import Step, failed, ok
from ddpfleet.shell import sh

ORDER = 10  # first: later roles (jupyter) act as this user
SECTION = "train_user"

# $1 name, $2 uid, $3 gid
PROBE = r"""
u=$(getent passwd "$1") && echo "user=$u"
g=$(getent group "$1") && echo "group=$g"
o=$(getent passwd "$2") && echo "uid_holder=${o%%:*}"
o=$(getent group "$3") && echo "gid_holder=${o%%:*}"
true
"""

# $1 name, $2 uid, $3 gid, $4 shell
CREATE = r"""
set -e
getent group "$1" >/dev/null || groupadd -g "$3" "$1"
useradd -m -u "$2" -g "$3" -s "$4" -c "ddpfleet training" "$1"
chmod 0750 "$(getent passwd "$1" | cut -d: -f6)"
"""


def applies(cfg: Mapping[str, Any], host) -> bool:
    return True


def apply(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    name, uid, gid = str(cfg["name"]), int(cfg["uid"]), int(cfg["gid"])
    if name == "root" or uid == 0:
        if cfg["allow_root"]:
            yield ok("user", "training runs as root (train_user.allow_root: true)")
        else:
            yield failed(
                "user",
                f"train_user {name} (uid {uid}) is root: training as root is refused; name an "
                "ordinary user, or set train_user.allow_root: true to mean it",
            )
        return
    state = host.probe(sh(PROBE, name, str(uid), str(gid)))
    yield _user(host, cfg, state, name, uid, gid)


def _user(host, cfg, state: Mapping[str, str], name: str, uid: int, gid: int) -> Step:
    fix = "the ids must be equal on every node: set train_user.uid/gid to match, or renumber it"
    if state.get("user"):
        fields = state["user"].split(":")
        have_uid, have_gid, home = fields[2], fields[3], fields[5]
        if (have_uid, have_gid) != (str(uid), str(gid)):
            return failed(
                "user", f"{name} exists with uid {have_uid} gid {have_gid}, not {uid}/{gid}; {fix}"
            )
        return ok("user", f"{name} (uid {uid}, gid {gid}, home {home})")
    if state.get("uid_holder"):
        return failed(
            "user", f"uid {uid} belongs to {state['uid_holder']}; pick a free train_user.uid"
        )
    group = state.get("group", "")
    if group and group.split(":")[2] != str(gid):
        return failed(
            "user", f"group {name} exists with gid {group.split(':')[2]}, not {gid}; {fix}"
        )
    if not group and state.get("gid_holder"):
        return failed(
            "user", f"gid {gid} belongs to group {state['gid_holder']}; pick a free train_user.gid"
        )
    return host.changed(
        "user",
        f"create {name} (uid {uid}, gid {gid}, no password, home 0750)",
        lambda: host.change(sh(CREATE, name, str(uid), str(gid), str(cfg["shell"]))),
    )
