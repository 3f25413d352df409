"""A cloud-shaped sandbox node: a login user (`ubuntu`) with the client key, sudo as asked, and
sshd refusing root (ddpfleet/sandbox/node_init.py --permit-root-login no).

The user lives in the node's own /etc/passwd, /etc/group and /etc/shadow (the host's, copied
into the overlay's upper layer, one line added to each); sudo is the host's (sandbox.up installs
the package), its rule one file in /etc/sudoers.d:

    nopasswd  ubuntu ALL=(ALL:ALL) NOPASSWD:ALL
    password  ubuntu ALL=(ALL:ALL) ALL; a random password, kept 0600 in
              <state_dir>/become_password (where tests and people read it)
    none      no rule: the user cannot become root
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path

from ddpfleet.hygiene import state_dir
from ddpfleet.sandbox.host import run
from ddpfleet.sandbox.spec import SandboxSpec

SUDO_MODES = ("nopasswd", "password", "none")
SUDOERS = "etc/sudoers.d/90-ddpfleet-sandbox"
FIRST_UID = 1000
_MAKING = threading.Lock()


def password_file(spec: SandboxSpec) -> Path:
    return spec.state_dir / "become_password"


def _password(spec: SandboxSpec) -> str:
    """The login user's password, made once and kept (a node keeps its /etc/shadow)."""
    path = password_file(spec)
    with _MAKING:  # nodes are set up in parallel: the first makes it, the others read it
        if not path.exists():
            state_dir(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(18) + "\n")
    return path.read_text().strip()


def _lines(upper: Path, rel: str) -> list[str]:
    """The node's copy of a host file if it has one, else the host's."""
    mine = upper / rel
    source = mine if mine.exists() else Path("/") / rel
    return source.read_text().splitlines() if source.exists() else []


def _write_like_host(upper: Path, rel: str, lines: list[str]) -> None:
    """Write in place (a running node's overlay keeps the inode) with the host file's owner and
    mode (shadow is root:shadow 0640)."""
    path, host = upper / rel, Path("/") / rel
    st = host.stat() if host.exists() else None
    mode = stat.S_IMODE(st.st_mode) if st else 0o644
    data = ("\n".join(lines) + "\n").encode()
    if path.exists() and path.read_bytes() == data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if st:
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
        os.fchmod(f.fileno(), mode)


def _free_id(passwd: list[str], group: list[str]) -> int:
    used = {int(f[2]) for f in (ln.split(":") for ln in passwd + group) if len(f) > 2 and f[2]}
    uid = FIRST_UID
    while uid in used:
        uid += 1
    return uid


def ensure(spec: SandboxSpec, upper: Path) -> None:
    """The login user, its key, its home and its sudo rule in the node's upper layer."""
    sudoers = upper / SUDOERS
    if spec.login_user == "root":
        sudoers.unlink(missing_ok=True)
        return
    user = spec.login_user
    passwd, group, shadow = (_lines(upper, f"etc/{f}") for f in ("passwd", "group", "shadow"))
    mine = next((ln.split(":") for ln in passwd if ln.startswith(f"{user}:")), None)
    if mine is None:
        uid = _free_id(passwd, group)
        passwd.append(f"{user}:x:{uid}:{uid}::/home/{user}:/bin/bash")
        group.append(f"{user}:x:{uid}:")
        _write_like_host(upper, "etc/passwd", passwd)
        _write_like_host(upper, "etc/group", group)
    else:
        uid = int(mine[2])
    hashed = "*"  # no password: key login only, and sudo cannot ask for one
    if spec.sudo == "password":
        hashed = run(["openssl", "passwd", "-6", "-stdin"], input=_password(spec)).stdout.strip()
    shadow = [ln for ln in shadow if not ln.startswith(f"{user}:")]
    shadow.append(f"{user}:{hashed}:20000:0:99999:7:::")
    _write_like_host(upper, "etc/shadow", shadow)
    home = upper / "home" / user
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    key = Path(f"{spec.client_key}.pub").read_bytes()
    files = {
        home: (None, 0o750),
        home / ".ssh": (None, 0o700),
        home / ".ssh" / "authorized_keys": (key, 0o600),
    }
    for path, (data, mode) in files.items():
        if data is not None and (not path.exists() or path.read_bytes() != data):
            path.write_bytes(data)
        os.chown(path, uid, uid)
        path.chmod(mode)
    sudoers.parent.mkdir(parents=True, exist_ok=True)
    rule = {
        "nopasswd": f"{user} ALL=(ALL:ALL) NOPASSWD:ALL\n",
        "password": f"{user} ALL=(ALL:ALL) ALL\n",
    }
    if spec.sudo in rule:
        sudoers.write_text(f"# ddpfleet sandbox: {user} is the cloud login user\n{rule[spec.sudo]}")
        sudoers.chmod(0o440)
    else:
        sudoers.unlink(missing_ok=True)
