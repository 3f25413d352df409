"""ProxyJump hops: parsed from ~/.ssh/config's value and opened by `connection.connect` itself
(never by Fabric, whose hops accept any host key), so each hop is checked like a node."""

from __future__ import annotations

from dataclasses import replace

import fabric

from ddpfleet.errors import NodeError
from ddpfleet.inventory import Node


def hops(jump: str | None) -> list[str]:
    """'root@bastion,h2:2222' -> ['root@bastion', 'h2:2222']; None and 'none' -> []."""
    if not jump or jump.strip().lower() == "none":
        return []
    return [h.strip() for h in jump.split(",") if h.strip()]


def hop_node(node: Node, hop: str) -> Node:
    """A ProxyJump hop ("[user@]host[:port]") as a Node: the node's key, known_hosts and
    timeouts; user and port from the hop string, else ~/.ssh/config, else the node's."""
    user, _, rest = hop.rpartition("@")
    host, _, port = rest.partition(":")
    if rest.startswith("["):  # [v6addr]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    found = fabric.Config().base_ssh_config.lookup(host)
    return replace(
        node,
        host=host,
        user=user or found.get("user") or node.user,
        port=int(port or found.get("port") or 22),
    )


def as_hop(e: NodeError, node: str, hop: str) -> NodeError:
    """A hop's error, told as the node's: 'node1: jump host root@10.0.0.1: host key ...'."""
    if e.message.startswith("jump host "):  # an earlier hop's, already named
        return e
    err = type(e).__new__(type(e))  # same class and fields (.kind, fingerprints), new text
    err.__dict__.update(e.__dict__)
    err.node, err.message = node, f"jump host {hop}: {e.message}"
    err.args = (f"{node}: {err.message}",)
    return err
