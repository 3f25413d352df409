"""What node names, hosts, users and the cluster's name in an inventory may look like.

They end up in paths (logs/<run>/<node>.log, envs/<node>.yml, ~/ddpfleet/<cluster>/code), in
root's ~/.ssh/config (`Host`, `HostName`, `User`), in /etc/ssh/ssh_known_hosts, authorized_keys
comments, unit files and --nodes lists: a newline injects a config line, a space makes two
patterns, '/' or '..' leaves logs/, ',' splits --nodes. So each is held to a shape none of those
can misread. Each check returns the problem and its fix, or '' when the value is fine.
"""

from __future__ import annotations

import ipaddress
import re

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# RFC 1123 labels; '_' too, which ~/.ssh/config aliases often have. No leading '-': an ssh argv
# would read it as an option.
HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# useradd's default NAME_REGEX ([a-z_][a-z0-9_-]*[$]?), with upper case and '.' that directory
# services use, and without the trailing '$' (machine accounts; systemd expands '$' in units).
USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def shown(value: str) -> str:
    """The value as it can go into a one-line message: quoted unless it is a plain word."""
    return value if _WORD.fullmatch(value) and ".." not in value else repr(value)


def node_name_problem(name: str) -> str:
    if NODE_NAME.fullmatch(name) and ".." not in name:
        return ""
    return (
        f"node name {shown(name)} is not allowed: use 1-63 letters, digits, '.', '_' or "
        "'-', starting with a letter or digit (e.g. node0, gpu-01)"
    )


def cluster_name_problem(name: str) -> str:
    """The cluster's name goes into node paths (~/ddpfleet/<cluster>/code) and key comments."""
    if NODE_NAME.fullmatch(name) and ".." not in name:
        return ""
    return (
        f"cluster name {shown(name)} is not allowed: use 1-63 letters, digits, '.', '_' or "
        "'-', starting with a letter or digit (e.g. demo)"
    )


def _host_name(host: str) -> bool:
    labels = host.rstrip(".").split(".") if len(host) <= 253 else []
    return bool(labels) and all(HOST_LABEL.fullmatch(label) for label in labels)


def host_problem(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return ""
    except ValueError:
        pass
    if _host_name(host):
        return ""
    return (
        f"{shown(host)} is not an IP address or host name: use e.g. 10.0.0.10, "
        "gpu01.example.com or a ~/.ssh/config alias (letters, digits, '-', '_', '.'; "
        "no spaces)"
    )


def hostname_problem(hostname: str) -> str:
    """A name a node reports for itself (`hostname -s`) that goes into a config file, as
    slurm.conf's SlurmctldHost=: held to the inventory's host rule, so no space, '#', '=' or
    newline there can add a key."""
    if _host_name(hostname):
        return ""
    return (
        f"hostname {shown(hostname)} is not a host name (letters, digits, '-', '_', '.'; no "
        "spaces): set a plain one on the node (hostnamectl set-hostname)"
    )


def user_problem(user: str) -> str:
    if USER.fullmatch(user):
        return ""
    return (
        f"user {shown(user)} is not a valid login name: use up to 32 letters, digits, "
        "'_', '.' or '-', starting with a letter or '_' (e.g. ubuntu, root)"
    )


def sandbox_prefix_problem(prefix: str) -> str:
    """The sandbox prefix starts every interface name it makes ({prefix}-br, {prefix}-10h)."""
    if prefix.isascii() and prefix.isalnum() and len(prefix) <= 8:
        return ""
    return (
        f"sandbox prefix {shown(prefix)} is not allowed: use 1-8 letters/digits (it names "
        "network interfaces, which allow 15 characters)"
    )


def subnet_problem(subnet: str) -> str:
    try:
        ipaddress.IPv4Network(subnet)
        return ""
    except ValueError:
        return f"subnet {shown(subnet)} is not an IPv4 network like 10.213.0.0/24"


def hostlist(names) -> str:
    """node0,node1,node2,node4,gpu-a -> node[0-2,4],gpu-a (pdsh's hostlist form); a name
    without a number, or alone with its stem, stays as it is."""
    stems: dict[str, list[tuple[int, str]]] = {}
    order: list[str] = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        stem, digits = (m.group(1), m.group(2)) if m else (name, "")
        if stem not in stems:
            order.append(stem)
            stems[stem] = []
        stems[stem].append((int(digits) if digits else -1, digits))
    out = []
    for stem in order:
        nums = stems[stem]
        if len(nums) == 1 or any(n < 0 or (len(d) > 1 and d.startswith("0")) for n, d in nums):
            out.extend(stem + d for _, d in nums)
            continue
        spans, values = [], sorted(n for n, _ in nums)
        start = prev = values[0]
        for v in values[1:] + [None]:
            if v is not None and v == prev + 1:
                prev = v
                continue
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            if v is not None:
                start = prev = v
        out.append(f"{stem}[{','.join(spans)}]")
    return ",".join(out)
