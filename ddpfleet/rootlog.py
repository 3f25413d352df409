"""A supervised daemon's log on a node, opened by root without following a symlink.

Where PID 1 is not systemd, root starts the Slurm daemons and the Jupyter supervisor detached
(setsid -f), their output appended to /var/log/ddpfleet-<name>.log. /var/log is group-writable
on some systems (Ubuntu: root:syslog 0775, no sticky bit), so a member of that group could put
a symlink there (or a FIFO, a hard link, a file of its own) and have root create, chmod or
append to a file of its choosing, as the shell's `touch`, `chmod` and `>>` would. Instead one
stdlib Python step opens the log with O_NOFOLLOW (and O_NONBLOCK: a FIFO cannot hang it), keeps
it only when it is a regular file of root's with one link, makes it 0600 through the open file,
and execs `setsid -f COMMAND` with it as stdout and stderr (stdin /dev/null).
"""

from __future__ import annotations

# What a bootstrap marks its commands with (engine.roles.MARK), so an interrupted one can stop
# them all (bootstrap.HOLD). A daemon started detached outlives the bootstrap that started it:
# it drops the mark, and no sweep of that bootstrap ever finds it.
BOOTSTRAP_MARK = "DDPFLEET_BOOTSTRAP"

# argv: the log, then the command. Refuses with one line naming the log and the fix.
OPEN_PY = r"""
import errno, os, stat, sys
log, argv = sys.argv[1], sys.argv[2:]
flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
try:
    fd = os.open(log, flags, 0o600)
except OSError as e:
    what = "a symlink" if e.errno == errno.ELOOP else e.strerror
    sys.exit(f"{log}: cannot open the log ({what}); root writes it only as a regular file "
             f"of its own: remove {log}")
st = os.fstat(fd)
if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
    sys.exit(f"{log} is not a regular file of root's with one link; remove {log}")
os.set_blocking(fd, True)
os.fchmod(fd, 0o600)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(fd, 1)
os.dup2(fd, 2)
os.environ.pop(@MARK@, None)  # the bootstrap's mark: the daemon outlives that bootstrap
os.execvp(argv[0], argv)
""".replace("@MARK@", repr(BOOTSTRAP_MARK))


def start_detached(python: str, log: str, command: list[str]) -> list[str]:
    """argv that starts `command` detached (setsid -f), its output appended to `log`, without
    the bootstrap's mark; run as root on the node with `python` (any python3 there: the script
    is stdlib only)."""
    return [python, "-I", "-c", OPEN_PY, log, "setsid", "-f", *command]
