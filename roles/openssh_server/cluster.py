"""openssh_server's controller side: the cluster key, the host keys the controller trusts, and
the marked block ddpfleet owns in shared files (ssh_known_hosts, ~/.ssh/config).

Nothing here touches a node: role.py sends what these functions compute.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import paramiko

from ddpfleet import inventory as inv
from ddpfleet.connection import USER_KNOWN_HOSTS, known_hosts_name
from ddpfleet.errors import DdpfleetError

BEGIN, END = "# BEGIN ddpfleet cluster", "# END ddpfleet cluster"
_key_lock = threading.Lock()


def keypair(path: Path, comment: str, create: bool) -> tuple[bytes, str] | None:
    """(private key file, public key line); made once, shared by every node and every run."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with _key_lock:  # the nodes' threads call this at once
        if not path.is_file():
            if not create:
                return None
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
            _write_once(path, pem)
        private = path.read_bytes()
    public = ser.load_ssh_private_key(private, None).public_key()
    line = public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    line = f"{line} {comment}"
    pub_path = path.with_name(path.name + ".pub")
    if not pub_path.is_file() or pub_path.read_text() != line + "\n":
        pub_path.write_text(line + "\n")
    return private, line


def _write_once(path: Path, data: bytes) -> None:
    """Create `path` 0600 atomically; another bootstrap that got there first wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


@functools.lru_cache(maxsize=8)
def _all_nodes(path: Path, mtime_ns: int) -> tuple[inv.Node, ...]:
    return inv.load(path, check_files=False).nodes


def all_nodes(inventory) -> tuple[inv.Node, ...]:
    """Every node of the inventory file, also when this run is limited by --nodes."""
    try:
        return _all_nodes(inventory.path, inventory.path.stat().st_mtime_ns)
    except (DdpfleetError, OSError):
        return tuple(inventory.nodes)


def known_host_lines(nodes: tuple[inv.Node, ...]) -> tuple[list[str], list[str]]:
    """known_hosts lines naming each node by name and address, from the keys the controller
    trusts; and the nodes it has no key for."""
    lines, missing = [], []
    for node in nodes:
        keys = _trusted_keys(node)
        if not keys:
            missing.append(node.name)
            continue
        names = sorted(
            {known_hosts_name(node.name, node.port), known_hosts_name(node.host, node.port)}
        )
        lines += [f"{','.join(names)} {kind} {keys[kind].get_base64()}" for kind in sorted(keys)]
    return lines, missing


def _trusted_keys(node: inv.Node) -> dict[str, paramiko.PKey]:
    name = known_hosts_name(node.host, node.port)
    for path in (node.known_hosts, USER_KNOWN_HOSTS):
        if path.is_file():
            found = paramiko.HostKeys(str(path)).lookup(name)
            if found:
                return dict(found)
    return {}


def with_block(text: str, block: str, top: bool) -> str:
    """`text` with ddpfleet's marked block replaced by `block`, at the top or the end."""
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == BEGIN:
            inside = True
        elif inside and line.rstrip("\n") == END:
            inside = False
        elif not inside:
            kept.append(line)
    rest = "".join(kept)
    if rest and not rest.endswith("\n"):
        rest += "\n"
    return block + rest if top else rest + block
