"""openssh_server's controller side of node-to-node SSH: the cluster CA, the certificates it
signs, the host keys the controller trusts, and the marked block ddpfleet owns in shared files
(ssh_known_hosts, ~/.ssh/config).

Each node makes its own key (the private key never leaves it); the controller signs the node's
public key with the cluster CA for one principal that names the node and its pinned host key.
A node's authorized_keys trusts the CA only for the principals of the nodes in the inventory
now, and only from their addresses, so a node that leaves the inventory (or is re-imaged: new
host key) is refused at the next bootstrap, with no cross-node step inside a run.

Nothing here touches a node: peers.py sends what these functions compute.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import secrets
import socket
import threading
from pathlib import Path
from typing import NamedTuple

from ddpfleet import inventory as inv
from ddpfleet.errors import DdpfleetError
from ddpfleet.hygiene import state_dir
from ddpfleet.ssh.connection import resolve
from ddpfleet.ssh.knownhosts import PinnedKey, known_hosts_name, pinned_keys

BEGIN, END = "# BEGIN ddpfleet cluster", "# END ddpfleet cluster"
# Comments that mark ddpfleet's lines in authorized_keys: the CA line, and the shared root key
# of ddpfleet before per-node keys ("legacy"), which is removed wherever it is found.
CA_COMMENT, LEGACY_COMMENT = "ddpfleet-ca@", "ddpfleet-cluster@"
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # goes into authorized_keys options unquoted
_ca_lock = threading.Lock()
_resolved: dict[tuple[str, int, str], tuple[str, int]] = {}


class Peer(NamedTuple):
    """A node as another node's ssh_config names it."""

    name: str
    host: str
    port: int
    user: str


def ca(path: Path, create: bool) -> tuple[bytes, str] | None:
    """(CA private key file, CA public key 'type base64'); made once in the controller project.
    It signs certificates only: no node ever receives it."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with _ca_lock:  # the nodes' threads call this at once
        if not path.is_file():
            if not create:
                return None
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
            _write_once(path, pem)
        private = path.read_bytes()
    public = ser.load_ssh_private_key(private, None).public_key()
    return private, public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()


def _write_once(path: Path, data: bytes) -> None:
    """Create `path` 0600 atomically; another bootstrap that got there first wins."""
    state_dir(path.parent)
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


def public_key(line: str) -> str | None:
    """'type base64' of an OpenSSH public key line a node sent; None unless it parses (what a
    node says is never pasted into authorized_keys or a certificate unchecked)."""
    from cryptography.hazmat.primitives import serialization as ser

    try:
        key = ser.load_ssh_public_key(" ".join(line.split()[:2]).encode())
        return key.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    except (ValueError, TypeError, IndexError):
        return None


def sign(ca_private: bytes, node_public: str, principal: str, key_id: str) -> str:
    """A user certificate for `node_public`, valid for `principal` only, with no extensions
    (no pty, no forwarding): the authorized_keys line restricts it again."""
    from cryptography.hazmat.primitives import serialization as ser

    cert = (
        ser.SSHCertificateBuilder()
        .public_key(ser.load_ssh_public_key(node_public.encode()))
        .serial(secrets.randbits(64))
        .type(ser.SSHCertificateType.USER)
        .key_id(key_id.encode())
        .valid_principals([principal.encode()])
        .valid_after(0)
        .valid_before(2**64 - 1)  # revoked by leaving the principals list, not by expiry
        .sign(ser.load_ssh_private_key(ca_private, None))
    )
    return f"{cert.public_bytes().decode()} {key_id}"


def cert_fits(cert_line: str, node_public: str, ca_public: str, principal: str) -> bool:
    """Whether the node's certificate is for this key, from this CA, for exactly `principal`."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser

    try:
        cert = ser.load_ssh_public_identity(" ".join(cert_line.split()[:2]).encode())
        if isinstance(cert, ser.SSHCertificate):
            cert.verify_cert_signature()
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    if not isinstance(cert, ser.SSHCertificate):
        return False

    def text(key) -> str:
        return key.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()

    return (
        cert.type == ser.SSHCertificateType.USER
        and text(cert.public_key()) == node_public
        and text(cert.signature_key()) == ca_public
        and cert.valid_principals == [principal.encode()]
    )


@functools.lru_cache(maxsize=8)
def _all_nodes(path: Path, mtime_ns: int) -> tuple[inv.Node, ...]:
    return inv.load(path, check_files=False).nodes


def all_nodes(inventory) -> tuple[inv.Node, ...]:
    """Every node of the inventory file, also when this run is limited by --nodes. Raises
    DdpfleetError when the file cannot be read again: falling back to the --nodes subset would
    rewrite every managed block with fewer nodes."""
    try:
        return _all_nodes(inventory.path, inventory.path.stat().st_mtime_ns)
    except (DdpfleetError, OSError) as e:
        raise DdpfleetError(
            f"cannot read {inventory.path} again to list every node ({e}); fix it and run "
            "again (node-to-node files were left as they are)"
        ) from None


def resolved(node: inv.Node) -> tuple[str, int]:
    """The address and port `connect` and `trust` use: ~/.ssh/config HostName/Port applied
    (remembered: every node's thread asks for every node)."""
    key = (node.host, node.port, node.user)
    if key not in _resolved:
        _resolved[key] = resolve(node)
    return _resolved[key]


def trusted_keys(node: inv.Node) -> dict[str, PinnedKey]:
    """The node's host keys the controller trusts ({type: key}), looked up under the name
    `trust` records: the project's known_hosts, else the user's (as connect reads them)."""
    host, port = resolved(node)
    return pinned_keys(known_hosts_name(host, port), node.known_hosts)


def principal(node: inv.Node) -> str | None:
    """'ddpfleet:<node>:<host key fingerprint>' (None without a trusted host key): a re-imaged
    machine that takes over the name gets a new host key, so the old machine's cert stops
    working once the pin is updated."""
    keys = trusted_keys(node)
    if not keys:
        return None
    kind = "ssh-ed25519" if "ssh-ed25519" in keys else min(keys)
    return f"ddpfleet:{node.name}:{keys[kind].fingerprint.removeprefix('SHA256:')}"


def addresses(node: inv.Node) -> list[str]:
    """The node's address as the inventory resolves it, plus the IPs a name resolves to here
    (sshd matches from= against the client's IP unless UseDNS is on)."""
    host, _ = resolved(node)
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        infos = []
    return sorted({str(info[4][0]) for info in infos}) + [host]


def known_host_lines(nodes: tuple[inv.Node, ...]) -> tuple[list[str], list[str]]:
    """known_hosts lines naming each node by name and address, from the keys the controller
    trusts; and the nodes it has no key for."""
    lines, missing = [], []
    for node in nodes:
        keys = trusted_keys(node)
        if not keys:
            missing.append(node.name)
            continue
        host, port = resolved(node)
        names = sorted({known_hosts_name(node.name, port), known_hosts_name(host, port)})
        lines += [f"{','.join(names)} {kind} {keys[kind].base64}" for kind in sorted(keys)]
    return lines, missing


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
