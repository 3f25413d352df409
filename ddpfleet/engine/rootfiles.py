"""Root's files for a login user that reaches root through sudo (the roles engine's Host uses it).

SFTP runs as the login user, so it can neither read a root-only file nor write under /etc. Here:

    read     one root script prints the file's mode, owner and content (base64: bytes survive)
    install  the content goes by SFTP into a private `mktemp -d` dir (0700, the login user's),
             then one root script: `install -o OWNER -g GROUP -m MODE` beside the target, a
             rename into place (readers never see half a file), and the temp dir removed.
             Nothing is ever left owned by the login user.

The temp dir is made and held by a session of the login user's own (HOLD) that removes it when
its stdin ends: the controller ends it after the install, whatever happened (sudo refused, a
timeout), and sshd ends it when the connection is lost (the controller killed, the network
gone), so the content (a munge key) never stays in the login user's /tmp.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path

from ddpfleet.errors import CommandError, NodeError
from ddpfleet.ssh.connection import Conn, Session

# $1 path: "absent", or "MODE OWNER" then the content in base64 on one line.
READ = r"""
[ -e "$1" ] || { echo absent; exit 0; }
stat -c '%a %U' -- "$1" && base64 -w0 -- "$1" && echo
"""

# $1 source (in the private temp dir), $2 target, $3 mode, $4 owner (group: root's for root,
# else the owner's own).
INSTALL = r"""
set -eu
g=root; [ "$4" = root ] || g=$(id -gn -- "$4")
tmp=$(mktemp -p "$(dirname -- "$2")" ".$(basename -- "$2").ddpfleet-XXXXXX")
trap 'rm -f -- "$tmp"; rm -rf -- "$(dirname -- "$1")"' EXIT
install -o "$4" -g "$g" -m "$3" -- "$1" "$tmp"
mv -fT -- "$tmp" "$2"
"""


# As the login user, for as long as one install lasts: the temp dir's name on the first line,
# then the dir removed once stdin ends (EOF from the controller, or sshd closing the session).
HOLD = r"""
set -eu
d=$(mktemp -d /tmp/ddpfleet.XXXXXX)
trap 'rm -rf -- "$d"' EXIT
trap 'exit 1' HUP INT TERM
echo "$d"
cat >/dev/null
"""


def read(conn: Conn, path: str) -> tuple[bytes | None, int | None, str | None]:
    """(content, mode, owner) of a file as root sees it; (None, None, None) when absent."""
    out = conn.run(
        ["sh", "-c", READ, "sh", path], root=True, timeout=conn.node.command_timeout
    ).stdout
    lines = out.splitlines()
    if not lines or lines[0] == "absent":
        return None, None, None
    try:
        mode, owner = lines[0].split()
        return base64.b64decode(lines[1] if len(lines) > 1 else ""), int(mode, 8), owner
    except (ValueError, binascii.Error):
        raise CommandError(
            conn.name, f"read {path}", None, f"unreadable answer {out[:80]!r}"
        ) from None


def install(conn: Conn, path: str, data: bytes, mode: int, owner: str = "root") -> None:
    """Put `data` at `path` as root, owned by `owner` (group: root for root, else the owner's
    own group), mode `mode`, through a private temp dir; see the module docstring."""
    _install(conn, path, lambda source: conn.put_bytes(data, source, 0o600), mode, owner)


def install_file(conn: Conn, local: Path, path: str, mode: int = 0o644) -> None:
    """A controller file (an installer: ~100 MB, streamed) at `path`, root's, the same way."""
    _install(conn, path, lambda source: conn.sftp().put(str(local), source), mode, "root")


def _install(conn: Conn, path: str, send: Callable[[str], object], mode: int, owner: str) -> None:
    quick = conn.node.command_timeout
    hold = conn.session(["sh", "-c", HOLD])
    hold.settimeout(quick)
    done = False
    try:
        tmp_dir = _first_line(conn, hold)
        source = f"{tmp_dir}/content"
        send(source)
        conn.run(
            ["sh", "-c", INSTALL, "sh", source, path, f"{mode:04o}", owner],
            root=True,
            timeout=quick,
        )
        done = True  # INSTALL removed the dir itself
    finally:
        _release(conn, hold, wait=not done)


def _first_line(conn: Conn, hold: Session) -> str:
    """The temp dir HOLD made (its first line of output)."""
    out = b""
    while not out.endswith(b"\n"):
        got = hold.recv(4096)
        if not got:
            raise CommandError(
                conn.name, "mktemp -d /tmp/ddpfleet.XXXXXX", None, out.decode(errors="replace")
            )
        out += got
    return out.decode(errors="replace").strip()


def _release(conn: Conn, hold: Session, wait: bool) -> None:
    """End HOLD (it removes the temp dir); after a failed install, wait until it has, while the
    connection lives (when it is gone, sshd ends HOLD). Never raises: the install's own outcome
    is what the caller hears about."""
    try:
        hold.shutdown_write()
        if wait and conn.active:
            hold.recv_exit_status()
    except NodeError:
        pass
    hold.close()
