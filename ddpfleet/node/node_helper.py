"""Runs on a node for `invoke train`: facts, the code mirror, the master-port checks.

Stdlib only, any Python >= 3.8. The controller sends this file on stdin (a length line, then
the source; see ddpfleet.sync.helper_command), so nothing has to be installed on the node and
`ps` shows a short command line. gang_runner.py receives it the same way and imports its
functions. Subcommands, each printing one JSON object on stdout:

    probe CODE_DIR MASTER_HOST [--count-gpus]   home, torch/CUDA/NCCL versions, GPU count,
                                                IPv4 addresses, route to the master; claims
                                                and locks the code dir, lists its manifest
    apply CODE_DIR RUN_ID [SCRIPT]   stdin: a JSON line {"delete", "send", "manifest"} then a
                              tar stream; mirrors it into the code dir RUN_ID has locked, then
                              says whether SCRIPT (relative to CODE_DIR) is there

The mirror only ever deletes paths it put there itself (its manifest, CODE_DIR/.ddpfleet/),
so what a run writes beside the code (checkpoints, outputs) survives every later sync; a
directory it did not make is refused untouched; modes travel as they are (0600 stays 0600).
"""

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time

STDIN = sys.stdin.buffer


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def torch_versions():
    """torch, CUDA and NCCL versions without importing torch (that costs seconds).

    torch/version.py is a few assignments; NCCL comes as its own wheel (nvidia-nccl-cuXX)
    with pip, and is built into libtorch with conda, where it stays unknown (None).
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {"torch": None, "cuda": None, "nccl": None}
    path = os.path.join(next(iter(spec.submodule_search_locations)), "version.py")
    scope = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), scope)  # noqa: S102 (torch's own version file)
    nccl = None
    if scope.get("cuda") is None:  # a CPU build: no NCCL, and no need to scan every dist-info
        return {"torch": scope.get("__version__"), "cuda": None, "nccl": None}
    try:
        from importlib import metadata

        for dist in metadata.distributions():
            name = (dist.metadata.get("Name") or "").lower()
            if name.startswith("nvidia-nccl"):
                nccl = dist.version
    except Exception:  # noqa: BLE001, S110 (a broken dist-info must not fail the probe)
        pass
    return {"torch": scope.get("__version__"), "cuda": scope.get("cuda"), "nccl": nccl}


def gpu_count():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for ln in out.stdout.splitlines() if ln.strip().isdigit())


def ip(*args):
    try:
        return subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def addresses():
    """{iface: [IPv4, ...]} from `ip -o -4 addr show`, e.g. '2: eth0    inet 10.0.0.5/24 ...'."""
    found = {}
    for line in ip("-o", "-4", "addr", "show").splitlines():
        m = re.match(r"\d+:\s+(\S+)\s+inet\s+([\d.]+)/", line)
        if m:
            found.setdefault(m.group(1).split("@")[0], []).append(m.group(2))
    return found


def resolve(host):
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return None


def route_dev(address):
    m = re.search(r"\bdev (\S+)", ip("-o", "route", "get", address)) if address else None
    return m.group(1) if m else None


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The mirror's own bookkeeping, inside the code dir under a name the project never sends
# (ddpfleet.sync leaves a top-level .ddpfleet at home). manifest.json is both the marker
# "ddpfleet made this directory" and what the mirror put there ({path: [kind, mode, sha256]}):
# the only paths a sync may ever delete, and only while they still hold what was sent. lock is
# flocked by the run using the mirror, for as long as it runs.
META = ".ddpfleet"
MANIFEST = META + "/manifest.json"
LOCK = META + "/lock"
_HELD = []  # lock fds of this process: the lock lasts as long as the run's runner does
# A Slurm run's claim on the code dir from its preflight until its tasks take the lock: its run
# id, written by the controller while its runners still hold the lock (launch/slurm/run.py
# reserve). It holds while Slurm has the run's job (ddpfleet-<run id>) in any state but an
# ended one, and, before sbatch answered, for SUBMIT_GRACE_S after it was written; past that
# the next claim finds it stale and removes it, so a job that ended or was cancelled, or never
# was submitted, blocks nothing.
RESERVED = META + "/slurm-run"
SUBMIT_GRACE_S = 60
ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "OUT_OF_MEMORY")  # fmt: skip
SLURM_CONFS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf")  # roles/slurm: the first


def safe_target(root, name):
    """The member's path under root; anything absolute or climbing out is refused."""
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "" in parts or "." in parts:
        raise SystemExit(f"refusing unsafe path in the code sync: {name!r}")
    return os.path.join(root, *parts)


def path_entry(full):
    """[kind, mode, sha256] as ddpfleet.sync.Entry.as_list(), or None when it is neither a
    regular file nor a symlink (or gone)."""
    try:
        st = os.lstat(full)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return ["l", 0, hashlib.sha256(os.readlink(full).encode()).hexdigest()]
    if stat.S_ISREG(st.st_mode):
        return ["f", stat.S_IMODE(st.st_mode) & 0o777, file_digest(full)]
    return None


def listed(root):
    """{path: entry as sent} of what the mirror put under root (its manifest); ValueError when
    the manifest is not one this helper wrote."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            paths = json.load(f).get("paths")
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError):
        paths = None
    if not isinstance(paths, dict) or not all(isinstance(e, list) for e in paths.values()):
        raise ValueError(f"{os.path.join(root, MANIFEST)} is not a ddpfleet manifest")
    return paths


def write_listed(root, entries):
    """Replace the manifest atomically (0600): a crash leaves the old or the new list."""
    path = os.path.join(root, MANIFEST)
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "paths": entries}, f, sort_keys=True)
    os.replace(tmp, path)


def manifest(root):
    """{relative path: [kind, mode, sha256]} of what the mirror put there and is still there.

    Only the paths in the manifest are hashed: checkpoints and outputs beside them cost nothing
    and are invisible to the sync, so it can neither resend nor delete them."""
    found = {}
    for rel in listed(root):
        entry = path_entry(safe_target(root, rel))
        if entry is not None:
            found[rel] = entry
    return found


def lock_holder(root):
    """The run id holding root's lock, or None when nobody holds it."""
    try:
        fd = os.open(os.path.join(root, LOCK), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def claim(root, run_id):
    """Make the code dir (0700) unless it exists, refuse one ddpfleet did not make, and lock
    it for this run. {"dir", "problem": None | "foreign" | "busy" | "error", "detail"}."""
    found = {"dir": root, "problem": None, "detail": None}
    try:
        if os.path.lexists(root) and not os.path.isfile(os.path.join(root, MANIFEST)):
            found["problem"] = "foreign"  # someone's directory: never write or delete in it
            return found
        if not os.path.lexists(root):
            parent = os.path.dirname(root.rstrip("/"))
            if parent:
                os.makedirs(parent, exist_ok=True)
            os.mkdir(root, 0o700)
            os.chmod(root, 0o700)  # not widened by a umask: the code may hold secrets
            os.mkdir(os.path.join(root, META), 0o700)
            write_listed(root, {})
        listed(root)  # readable, or the dir is refused: without it nothing here is known ours
        fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            found.update(problem="busy", detail=os.read(fd, 200).decode(errors="replace"))
            os.close(fd)
            return found
        job = reserved(root)
        if job is not None:  # a pending Slurm job will run here: the lock is not this run's
            found.update(problem="reserved", job=job)
            os.close(fd)
            return found
        os.ftruncate(fd, 0)
        os.pwrite(fd, run_id.encode(), 0)
        _HELD.append(fd)
    except OSError as e:
        found.update(problem="error", detail=f"{e.strerror or e}: {e.filename or root}")
    except ValueError as e:
        found.update(problem="error", detail=str(e))
    return found


def reserved(root):
    """{"run_id", "job_id", "state"} of the Slurm job the code dir is reserved for (RESERVED),
    or None; a stale reservation is removed. Called with the code dir's lock held."""
    path = os.path.join(root, RESERVED)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd) as f:
        said = f.read(200).split() + [None]
        age = time.time() - os.fstat(f.fileno()).st_mtime
    run_id = said[0]
    jobs = slurm_jobs_named("ddpfleet-" + run_id) if run_id else []
    if isinstance(jobs, str):  # Slurm could not say: held, as the job may still start
        return {"run_id": run_id, "job_id": None, "state": "unknown (" + jobs + ")"}
    live = [j for j in jobs if j[1] not in ENDED]
    if live:
        return {"run_id": run_id, "job_id": live[0][0], "state": live[0][1]}
    if run_id and not jobs and age < SUBMIT_GRACE_S:
        return {"run_id": run_id, "job_id": None, "state": "being submitted"}
    os.unlink(path)
    return None


def slurm_jobs_named(name):
    """[[job id, state]] of the jobs Slurm knows by `name`, ended ones too (for MinJobAge);
    [] where this node has no Slurm; squeue's error text when it could not say."""
    squeue = shutil.which("squeue")
    if not squeue or not (os.environ.get("SLURM_CONF") or any(map(os.path.isfile, SLURM_CONFS))):
        return []
    argv = [squeue, "-h", "-n", name, "-t", "all", "-o", "%i %T"]
    try:
        got = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return "squeue: " + str(e)
    if got.returncode != 0:
        return "squeue: " + (got.stderr.strip().splitlines() or ["exit %d" % got.returncode])[-1]
    return [line.split() for line in got.stdout.splitlines() if len(line.split()) == 2]


def release():
    """Free the code dir locks this process holds (a detached run goes on in a snapshot)."""
    while _HELD:
        os.close(_HELD.pop())


def facts(code_dir, master_host, count_gpus):
    master = resolve(master_host)
    root = os.path.abspath(os.path.expanduser(code_dir))
    code = claim(root, os.environ.get("DDPFLEET_RUN_ID", ""))
    found = {
        "home": os.path.expanduser("~"),
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "addrs": addresses(),
        "master_resolved": master,
        "route_dev": route_dev(master),
        "gpus": gpu_count() if count_gpus else None,
        "code": code,
        "manifest": manifest(root) if code["problem"] is None else {},
    }
    found.update(torch_versions())
    return found


def in_the_way(root, rel, deleting):
    """Why writing rel would destroy something the mirror did not put there, or None.

    A parent that is a file or symlink, or a directory at rel itself, is fine only when all of
    it is being deleted (a managed file that became a directory, or the reverse)."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        sub = "/".join(parts[:i])
        full = os.path.join(root, *parts[:i])
        if not os.path.lexists(full):
            return None
        if os.path.islink(full) or not os.path.isdir(full):
            return None if sub in deleting else f"{sub!r} is a file or symlink made on the node"
    full = os.path.join(root, *parts)
    if not os.path.isdir(full) or os.path.islink(full):
        return None
    for top, dirs, files in os.walk(full):
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        kept = [
            f
            for f in files + links
            if os.path.relpath(os.path.join(top, f), root).replace(os.sep, "/") not in deleting
        ]
        if kept or (not dirs and not files):
            return f"{rel!r} is a directory holding files made on the node"
    return None


def remove_managed(root, rel):
    """Delete one path the mirror put there; a directory now in its place is not ours."""
    full = safe_target(root, rel)
    if os.path.realpath(os.path.dirname(full)) != os.path.join(
        os.path.realpath(root), *rel.split("/")[:-1]
    ):
        return  # a directory on the way was replaced by a symlink: never delete through it
    if os.path.islink(full) or os.path.isfile(full):
        os.unlink(full)
        parent = os.path.dirname(full)
        while parent != root:  # only the directories this removal emptied
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)


def write_member(tar, member, dest):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".ddpfleet-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    if os.path.isdir(dest) and not os.path.islink(dest):
        os.rmdir(dest)  # emptied by the deletes; in_the_way refused anything else
    if member.issym():
        os.symlink(member.linkname, tmp)
    else:
        # Created 0600 and only then given its mode: a secret is never readable on the way.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with tar.extractfile(member) as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(tmp, member.mode & 0o777)
        os.utime(tmp, (member.mtime, member.mtime))
    os.replace(tmp, dest)  # a process reading the old file never sees half a new one


def apply(code_dir, run_id, script=None):
    """Header {"delete", "send", "manifest"} then the tar of `send`. Checks everything before
    it changes anything: the dir is ddpfleet's, this run holds its lock, deletions are only
    of managed paths, nothing made on the node is in a sent path's way."""
    root = os.path.abspath(os.path.expanduser(code_dir))
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        raise SystemExit(f"{root} was not made by ddpfleet; nothing was touched")
    holder = lock_holder(root)
    if holder != run_id:
        raise SystemExit(
            f"{root} is not locked by run {run_id} (holder: {holder or 'none'}); "
            "nothing was touched: start the run again"
        )
    header = json.loads(STDIN.readline())
    old, send = listed(root), set(header["send"])
    strays = sorted(set(header["delete"]) - set(old))
    if strays:
        raise SystemExit(f"refusing to delete {strays[0]!r}: the mirror did not put it there")
    # A sent file the run has since rewritten is the run's now: it stays, unlisted.
    deleting = {
        rel for rel in header["delete"] if path_entry(safe_target(root, rel)) in (old[rel], None)
    }
    for rel in header["manifest"]:
        safe_target(root, rel)
    for rel in sorted(send):
        safe_target(root, rel)
        why = in_the_way(root, rel, deleting)
        if why:
            raise SystemExit(
                f"cannot sync {rel!r}: {why}; nothing was touched: move it out "
                f"of {root} or rename it in the project"
            )
    write_listed(root, {**old, **header["manifest"]})  # a crash leaves nothing unlisted
    for rel in sorted(deleting):
        remove_managed(root, rel)
    written = 0
    with tarfile.open(fileobj=STDIN, mode="r|") as tar:
        for member in tar:
            if not (member.isfile() or member.issym()) or member.name not in send:
                raise SystemExit(f"refusing {member.name!r}: not a file or symlink announced")
            write_member(tar, member, safe_target(root, member.name))
            written += 1
    write_listed(root, header["manifest"])
    report = {"written": written, "deleted": len(deleting)}
    if script:
        report["script"] = os.path.isfile(safe_target(root, script))
    emit(report)


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "probe":
        emit(facts(args[0], args[1], "--count-gpus" in args[2:]))
    elif cmd == "apply":
        apply(args[0], args[1], args[2] if len(args) > 2 else None)
    else:
        raise SystemExit(f"node_helper: unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
