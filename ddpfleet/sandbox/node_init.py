#!/usr/bin/env python3
"""PID 1 of one sandbox node (stdlib only; started by ddpfleet.sandbox, never by hand).

Started as `nsenter --net=NETNS unshare --mount --uts --pid --fork --propagation private --
python3 sandbox_init.py --dir D --hostname H --pidfile P`, so it already owns a private mount
namespace, a UTS namespace and a PID namespace in which it is PID 1. It:

1. writes its host-visible pid to P (the controller's handle on the node);
2. sets the hostname, mounts the node's root (overlay: lower /, upper/work under D) with a
   fresh proc, sysfs (the host's cgroup tree bound at its /sys/fs/cgroup), /dev, devpts,
   /dev/shm, /run, its own /var/lib/ddpfleet over the host's, pivots into it;
3. runs `sshd -D -e` (restarted if it exits, like a service manager would), reaps every
   orphan, and on SIGTERM/SIGINT kills everything in the node and exits;
   or, with --cgroup and --exec-systemd (a systemd node, ddpfleet/sandbox/systemd_init.py),
   joins that cgroup in a cgroup namespace of its own, mounts a fresh cgroup2 instead of the
   host's tree, binds its log over the node's /dev/console and execs systemd.

All mounts live in the node's mount namespace: they vanish with it, the host's table is
never touched.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import signal
import socket
import sys
import time

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
MNT_DETACH = 2
CLONE_NEWCGROUP = 0x02000000
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SSHD = [
    "/usr/sbin/sshd",
    "-D",
    "-e",  # absolute path: sshd re-execs itself on SIGHUP
    "-o",
    "PasswordAuthentication=no",
    "-o",
    "KbdInteractiveAuthentication=no",
    "-o",
    "PermitRootLogin=prohibit-password",
    "-o",
    "UseDNS=no",
]
CGROUP_ROOT = "/sys/fs/cgroup"
GRACE_S = 2.0  # between SIGTERM and SIGKILL for the node's processes

libc = ctypes.CDLL(None, use_errno=True)


class Shutdown(Exception):
    pass


def log(msg: str) -> None:
    print(
        f"sandbox_init[{os.environ.get('SANDBOX_NODE', '?')}]: {msg}", file=sys.stderr, flush=True
    )


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    check(
        libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() or None,
        ),
        f"mount {fstype} {target}",
    )


def write_host_pid(pidfile: str) -> None:
    # /proc is still the host's procfs here, so /proc/self names our pid as the host sees it.
    tmp = f"{pidfile}.tmp"
    with open(tmp, "w") as f:
        f.write(os.readlink("/proc/self") + "\n")
    os.replace(tmp, pidfile)


def make_root(base: str, own_cgroup: bool) -> str:
    root = os.path.join(base, "root")
    mount("none", "/", None, MS_REC | MS_PRIVATE)  # belt and braces: nothing leaks to the host
    opts = f"lowerdir=/,upperdir={base}/upper,workdir={base}/work"
    mount("overlay", root, "overlay", 0, opts)
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # our pid ns
    mount("sysfs", f"{root}/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # our netns
    if own_cgroup:  # a systemd node: its cgroup namespace's root, writable by its systemd
        mount("cgroup2", f"{root}{CGROUP_ROOT}", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        mount_cgroups(root)
    mount("/dev", f"{root}/dev", None, MS_BIND)
    log_file = os.readlink("/proc/self/fd/2")
    if own_cgroup and os.path.isfile(log_file):  # systemd writes to the console: the node's log
        mount(log_file, f"{root}/dev/console", None, MS_BIND)
    # Own PTYs for sshd sessions; ptmx of this instance over /dev/ptmx.
    mount(
        "devpts",
        f"{root}/dev/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    mount(f"{root}/dev/pts/ptmx", f"{root}/dev/ptmx", None, MS_BIND)
    mount("tmpfs", f"{root}/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", f"{root}/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    # Nodes must not see the sandbox's upper dirs (their own or the others'): the node's own
    # /var/lib/ddpfleet (runs' records, checkpoints) is a dir beside its upper one, kept across
    # sandbox.stop/start as a real disk keeps it; sandbox.down removes it with the node.
    data = os.path.join(base, "data")
    os.makedirs(data, mode=0o755, exist_ok=True)
    mount(data, f"{root}/var/lib/ddpfleet", None, MS_BIND)
    os.makedirs(f"{root}/run/sshd", mode=0o755)
    os.makedirs(f"{root}/run/lock", exist_ok=True)
    os.chmod(f"{root}/run/lock", 0o1777)  # /var/lock points here (bootstrap's flock)
    return root


def mount_cgroups(root: str) -> None:
    """The host's cgroup tree at the node's /sys/fs/cgroup: a fresh sysfs has an empty one, and
    slurmd will not start without a cgroup filesystem. A recursive bind brings whatever the host
    has (v1 hierarchies on a tmpfs with name=systemd, cgroup2, or both); the hierarchies are
    the kernel's, shared with the host either way, as a fresh mount of each would be."""
    if os.path.ismount(CGROUP_ROOT):
        mount(CGROUP_ROOT, f"{root}{CGROUP_ROOT}", None, MS_BIND | MS_REC)
    else:
        log(f"{CGROUP_ROOT} is not a mount on this host: the node has no cgroup filesystem")


def enter_cgroup(path: str) -> None:
    """Move into path (a cgroup2 dir on the host, made here) and make it our cgroup namespace's
    root, so the node's fresh cgroup2 mount shows only its own subtree."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")  # 0: the writer itself (our pid here is 1, not the host's)
    check(libc.unshare(CLONE_NEWCGROUP), "unshare cgroup namespace")


def exec_systemd(target: str) -> None:
    """Become systemd, still PID 1 (the pid file stays true), in container mode."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    env = {"PATH": PATH, "LANG": "C.UTF-8", "container": "ddpfleet-sandbox"}
    argv = ["/lib/systemd/systemd", "--system", f"--unit={target}", "--log-target=console"]
    os.execve(argv[0], argv, env)


def pivot(root: str) -> None:
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:  # unknown arch: chroot is enough for a sandbox
        os.chroot(".")
    else:
        # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only
        # the node's mounts in its table.
        check(libc.syscall(number, b".", b"."), "pivot_root")
        check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def start_sshd() -> int:
    fd = os.open("/var/log/sshd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    pid = os.fork()
    if pid == 0:
        exec_sshd(fd)
    os.close(fd)
    return pid


def exec_sshd(log_fd: int) -> None:
    """In the forked child: never returns, never runs the parent's code."""
    try:
        # exec keeps ignored signals ignored: give sshd (and its sessions) the defaults back.
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.setsid()
        os.execve(SSHD[0], SSHD, {"PATH": PATH, "LANG": "C.UTF-8"})
    finally:
        os._exit(127)


def on_signal(signum, frame) -> None:
    raise Shutdown(signal.Signals(signum).name)


def reap_all() -> bool:
    """Reap every exited child; True once no child is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def shutdown(reason: str) -> None:
    log(f"{reason}: stopping every process in the node")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(-1, sig)  # in a pid namespace: every process but us
        except ProcessLookupError:
            return
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            if reap_all():
                return
            time.sleep(0.02)


def supervise() -> None:
    sshd, started = start_sshd(), time.monotonic()
    while True:
        pid, status = os.wait()  # reaps orphans too: we are PID 1
        if pid != sshd:
            continue
        log(f"sshd exited ({os.waitstatus_to_exitcode(status)}); restarting")
        # Restart like a service manager, but never faster than once a second.
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        sshd, started = start_sshd(), time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="node dir with upper/, work/, root/")
    ap.add_argument("--hostname", required=True)
    ap.add_argument("--pidfile", required=True)
    # "no" for a cloud-shaped node: log in as the sudo user, root refused (as on cloud VMs)
    ap.add_argument("--permit-root-login", default="prohibit-password")
    ap.add_argument("--cgroup", help="systemd node: its cgroup2 dir on the host")
    ap.add_argument("--exec-systemd", metavar="TARGET", help="become systemd, booting TARGET")
    args = ap.parse_args()
    SSHD[SSHD.index("PermitRootLogin=prohibit-password")] = (
        f"PermitRootLogin={args.permit_root_login}"
    )
    os.environ["SANDBOX_NODE"] = args.hostname
    if os.getpid() != 1:
        log("must be PID 1 of a new pid namespace (run by ddpfleet.sandbox)")
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        write_host_pid(args.pidfile)
        socket.sethostname(args.hostname)
        if args.cgroup:
            enter_cgroup(args.cgroup)
        pivot(make_root(args.dir, own_cgroup=bool(args.cgroup)))
        if args.exec_systemd:
            exec_systemd(args.exec_systemd)
        supervise()
    except Shutdown as e:
        shutdown(str(e))
    except OSError as e:
        log(f"failed: {e}")
        shutdown("failure")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
