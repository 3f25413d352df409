"""Root work for a login user that is not root (cloud VMs: `ubuntu` with sudo, root login off).

ssh.become, per node: auto (sudo when the login user is not root; the default) | sudo | none.
How a connection becomes root is found out once, by one probe (PROBE), and every root command
after that is one script through one sudo, never sudo per command:

    sudo -n -H -- /bin/sh -c 'umask 022; PATH=/usr/local/sbin:...; export PATH; <script>'

A sudo that asks a password gets it as the first line of its stdin (`sudo -k -S -p ''`: sudo
reads it a byte at a time and leaves the rest of stdin to the command), never on a command line,
in a log or in a file on the node. The password is tried once right after the probe, so a wrong
one fails the node there and sudo never reads a command's own stdin as another attempt.

The training user is reached the same way: root (directly or through sudo) runs
`setpriv --reuid U --regid U --init-groups --reset-env`, which needs no PAM session.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddpfleet.errors import BecomeError
from ddpfleet.shell import Secret

MODES = ("auto", "sudo", "none")
PASSWORD_ENV = "DDPFLEET_BECOME_PASSWORD"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PREAMBLE = f"umask 022; PATH={ROOT_PATH}; export PATH; "
HOW_TO_GIVE = (
    f"--ask-become-pass, ${PASSWORD_ENV} or ssh.become_password_file (a 0600 file on the "
    "controller)"
)
UNCHANGED = "; nothing was changed"
# As the login user: its uid, whether sudo exists, what `sudo -n` says when it refuses, and
# whether the account has a usable password at all (passwd -S: P yes, L locked, NP none): sudo
# asks a non-sudoer for a password too, and one that has none can never give it.
PROBE = (
    "id -u; command -v sudo >/dev/null 2>&1 || { echo ddpfleet-nosudo; exit 0; }; "
    "sudo -n -H -- true 2>&1 && echo ddpfleet-sudo-ok; "
    "echo ddpfleet-pw-$(passwd -S 2>/dev/null | cut -d' ' -f2); exit 0"
)
NOT_SUDOER = ("not in the sudoers", "may not run sudo", "is not allowed to execute")

# run(command, stdin) -> (exit code, stdout, stderr), as the login user
Runner = Callable[[str, bytes | None], tuple[int, str, str]]


@dataclass(frozen=True)
class Escalation:
    """How one connection does root work: `root` (it is root), `sudo`, `sudo-password`, or
    `none` (ssh.become: none and not root: root work runs as the login user and may fail)."""

    how: str
    user: str
    password: Secret | None = None

    @property
    def via_sudo(self) -> bool:
        return self.how in ("sudo", "sudo-password")

    def wrap(self, command: str) -> str:
        """`command` (a shell command line) as one root script; unchanged when already root."""
        if not self.via_sudo:
            return command
        flags = ["-k", "-S", "-p", ""] if self.password is not None else ["-n"]
        return shlex.join(["sudo", *flags, "-H", "--", "/bin/sh", "-c", PREAMBLE + command])

    def stdin(self, data: str | bytes | None) -> str | bytes | None:
        """The command's stdin with the sudo password in front of it, when sudo needs one."""
        if self.password is None or not self.via_sudo:
            return data
        head = self.password.reveal().encode() + b"\n"
        return head + (data.encode() if isinstance(data, str) else (data or b""))

    def as_user(self, user: str, command: str) -> str:
        """`command` run by `user` in its home with a clean environment, from a root script:
        setpriv drops uid, gid and groups (no PAM session, nothing left behind)."""
        if user == self.user:
            return command
        drop = shlex.join(
            [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--init-groups",
                "--reset-env",
                "--",
                "/bin/sh",
                "-c",
                'cd "$HOME" 2>/dev/null || cd /; ' + command,
            ]
        )
        return self.wrap("exec " + drop)


def require_root(escalation: Escalation, node_name: str, job: str) -> None:
    """A job that needs root (bootstrap) refuses up front when this login cannot have it."""
    if escalation.how == "none":
        raise BecomeError(
            node_name,
            f"{job} needs root and {escalation.user} is not root with ssh.become: none; set "
            f"ssh.become: auto (sudo) or log in as root{UNCHANGED}",
        )


def password_for(node_name: str, given: Secret | None, file: Path | None) -> Secret | None:
    """The become password: --ask-become-pass (given), else $DDPFLEET_BECOME_PASSWORD, else
    ssh.become_password_file, which must be 0600 (it is a password)."""
    if given is not None:
        return given
    if os.environ.get(PASSWORD_ENV):
        return Secret(os.environ[PASSWORD_ENV])
    if file is None:
        return None
    try:
        mode = stat.S_IMODE(file.stat().st_mode)
        text = file.read_text().splitlines()
    except OSError as e:
        raise BecomeError(
            node_name, f"cannot read ssh.become_password_file {file}: {e.strerror}; fix the path"
        ) from None
    if mode & 0o077:
        raise BecomeError(
            node_name,
            f"ssh.become_password_file {file} is mode {mode:04o}; a password file must be "
            f"private: chmod 600 {file}",
        )
    return Secret(text[0] if text else "")


def establish(
    run: Runner, user: str, mode: str, password: Callable[[], Secret | None]
) -> Escalation:
    """One probe (and one password check when sudo asks one): how this connection becomes
    root, or a BecomeError naming the reason and the fix. The caller's node name is added by
    the caller (BecomeError's node is filled in there)."""
    code, out, err = run(PROBE, None)
    lines = out.strip().splitlines()
    if code != 0 or not lines or not lines[0].strip().isdigit():
        raise BecomeError("", f"cannot tell who {user} is (id -u: {(err or out).strip()[:80]})")
    if lines[0].strip() == "0":
        return Escalation("root", user)
    if mode == "none":
        return Escalation("none", user)
    said = "\n".join(lines[1:])
    if "ddpfleet-nosudo" in said:
        raise BecomeError(
            "",
            f"{user} is not root and the node has no sudo; install sudo there (apt-get install "
            f"sudo) or log in as root{UNCHANGED}",
        )
    if "ddpfleet-sudo-ok" in said:
        return Escalation("sudo", user)
    low = said.lower()
    if "must have a tty" in low:
        raise BecomeError(
            "",
            f"sudo here requires a terminal (Defaults requiretty); add 'Defaults:{user} "
            f"!requiretty' to the node's sudoers{UNCHANGED}",
        )
    if any(s in low for s in NOT_SUDOER):
        raise not_sudoer(user)
    if "password is required" not in low:
        raise BecomeError("", f"sudo -n failed for {user}: {said.strip()[:120]}{UNCHANGED}")
    if "ddpfleet-pw-L" in said or "ddpfleet-pw-NP" in said:
        raise BecomeError(
            "",
            f"{user} may not use sudo here: sudo asks a password and {user} has none (not a "
            f"NOPASSWD sudoer); as root give it a rule ('{user} ALL=(ALL) NOPASSWD:ALL' in "
            f"/etc/sudoers.d) or log in as root{UNCHANGED}",
        )
    secret = password()
    if secret is None:
        raise BecomeError(
            "",
            f"sudo asks {user}'s password and none was given; give it with {HOW_TO_GIVE}"
            f"{UNCHANGED}",
        )
    return check_password(run, user, secret)


def check_password(run: Runner, user: str, password: Secret) -> Escalation:
    escalation = Escalation("sudo-password", user, password)
    code, out, err = run(escalation.wrap("true"), _bytes(escalation.stdin(None)))
    if code == 0:
        return escalation
    low = (err + out).lower()
    if any(s in low for s in NOT_SUDOER):
        raise not_sudoer(user)
    if "must have a tty" in low:
        raise BecomeError(
            "",
            f"sudo here requires a terminal (Defaults requiretty); add 'Defaults:{user} "
            f"!requiretty' to the node's sudoers{UNCHANGED}",
        )
    raise BecomeError(
        "",
        f"sudo rejected the become password for {user} (wrong password); fix the one given "
        f"by {HOW_TO_GIVE}{UNCHANGED}",
    )


def not_sudoer(user: str) -> BecomeError:
    return BecomeError(
        "",
        f"{user} may not use sudo here (not in sudoers); as root add it (usermod -aG sudo "
        f"{user}) or log in as root{UNCHANGED}",
    )


def _bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data
