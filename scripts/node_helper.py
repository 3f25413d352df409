"""Runs on a node for `invoke train`: facts, the code mirror, the master-port checks.

Stdlib only, any Python >= 3.8. The controller sends this file on stdin (a length line, then
the source; see ddpfleet.sync.helper_command), so nothing has to be installed on the node and
`ps` shows a short command line. gang_runner.py receives it the same way and imports its
functions. Subcommands, each printing one JSON object on stdout:

    probe CODE_DIR MASTER_HOST [--count-gpus]   home, torch/CUDA/NCCL versions, GPU count,
                                                IPv4 addresses, route to the master, manifest
    apply CODE_DIR [SCRIPT]   stdin: a JSON line {"delete": [...]} then a tar stream; mirrors
                              it, then says whether SCRIPT (relative to CODE_DIR) is there
"""

import hashlib
import importlib.util
import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading
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
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for ln in out.stdout.splitlines() if ln.strip().isdigit())


def ip(*args):
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=5,
                              check=False).stdout
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


def manifest(root):
    """{relative path: [kind, executable, sha256]}; kind f (file) or l (symlink: its target)."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            full = os.path.join(top, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                found[rel] = ["l", False, hashlib.sha256(target.encode()).hexdigest()]
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ["f", bool(st.st_mode & 0o100), file_digest(full)]
    return found


def facts(code_dir, master_host, count_gpus):
    master = resolve(master_host)
    root = os.path.expanduser(code_dir)
    found = {"home": os.path.expanduser("~"), "hostname": socket.gethostname(),
             "python": sys.executable, "addrs": addresses(), "master_resolved": master,
             "route_dev": route_dev(master), "gpus": gpu_count() if count_gpus else None,
             "manifest": manifest(root) if os.path.isdir(root) else {}}
    found.update(torch_versions())
    return found


def safe_target(root, name):
    """The member's path under root; anything absolute or climbing out is refused."""
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or not name:
        raise SystemExit(f"refusing unsafe path in the code tar: {name!r}")
    return os.path.join(root, *parts)


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def prune_empty_dirs(root):
    for top, dirs, files in os.walk(root, topdown=False):
        if top != root and not os.listdir(top):
            os.rmdir(top)


def write_member(tar, member, dest):
    parent = os.path.dirname(dest)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        os.unlink(parent)  # a file became a directory
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(dest) and not os.path.islink(dest):
        shutil.rmtree(dest)  # a directory became a file
    if member.issym():
        remove(dest)
        os.symlink(member.linkname, dest)
        return
    tmp = dest + ".ddpfleet-tmp"
    with tar.extractfile(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.chmod(tmp, 0o755 if member.mode & 0o100 else 0o644)
    os.utime(tmp, (member.mtime, member.mtime))
    os.replace(tmp, dest)  # a process reading the old file never sees half a new one


def apply(code_dir, script=None):
    root = os.path.expanduser(code_dir)
    os.makedirs(root, exist_ok=True)
    header = json.loads(STDIN.readline())
    for rel in header["delete"]:
        remove(safe_target(root, rel))
    prune_empty_dirs(root)
    written = 0
    with tarfile.open(fileobj=STDIN, mode="r|") as tar:
        for member in tar:
            if not (member.isfile() or member.issym()):
                raise SystemExit(f"refusing {member.name!r}: only files and symlinks are synced")
            write_member(tar, member, safe_target(root, member.name))
            written += 1
    report = {"written": written, "deleted": len(header["delete"])}
    if script:
        report["script"] = os.path.isfile(safe_target(root, script))
    emit(report)


class Held:
    """The master port, bound and listening from the preflight on: connects from the workers'
    checks are answered until quiet(); then the socket stays listening for torchrun's store to
    adopt (gang_runner), so the port is never free between the check and the run."""

    def __init__(self, sock):
        self.sock = sock
        self.stopped = threading.Event()
        self.server = threading.Thread(target=self.serve, daemon=True)
        self.server.start()

    def serve(self):
        while not self.stopped.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            # Wait for the worker to close first, so TIME_WAIT lands on its side, not here.
            conn.settimeout(10)
            try:
                while conn.recv(64):
                    pass
            except OSError:
                pass
            conn.close()

    def quiet(self):
        """Stop answering (a stray check's connection is closed) but keep listening."""
        self.stopped.set()
        self.server.join(timeout=12)
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.accept()[0].close()
        except OSError:
            pass
        self.sock.setblocking(True)

    def close(self):
        self.quiet()
        self.sock.close()


def bind(port):
    """The free-port test: bind like torchrun's store will (all IPv4 addresses) and listen.

    Returns (Held, None) or (None, why).
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind(("0.0.0.0", port))
        srv.listen(64)
    except OSError as e:
        srv.close()
        return None, e.strerror or str(e)
    return Held(srv), None


def reach(host, port, timeout):
    """One real TCP connect to the master's listener; retried while its runner may still be
    starting (refused), for `timeout` seconds in all.

    Returns None or why not.
    """
    deadline = time.monotonic() + timeout
    address = resolve(host) or host
    while True:
        left = max(0.1, deadline - time.monotonic())
        try:
            with socket.create_connection((address, port), timeout=left) as s:
                s.sendall(b"ddpfleet preflight\n")
            return None
        except OSError as e:
            why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        if time.monotonic() > deadline:
            return f"{why} after {timeout:g}s"
        time.sleep(0.05)


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "probe":
        emit(facts(args[0], args[1], "--count-gpus" in args[2:]))
    elif cmd == "apply":
        apply(args[0], args[1] if len(args) > 1 else None)
    else:
        raise SystemExit(f"node_helper: unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
