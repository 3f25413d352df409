"""A sandbox prefix and subnet no one else on this kernel is using, claimed for this test session.

Two test sessions on one kernel (a rehearsal beside CI, two developers on one box, containers
sharing the host's network) on the same prefix and subnet break each other: one's `sandbox.up`
finds the other's bridge, one's `tc` lands on the other's node. So the defaults are a list of
candidates, not one: the first whose prefix names no link or namespace, whose subnets overlap no
address on the host, and whose claim (a bridge left down, `claim-<prefix>`, made atomically by the
kernel) this session wins. The claim goes when the session ends; one left by a killed session
only moves the next session to the next candidate (`ip link del claim-<prefix>` frees it).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import subprocess

CANDIDATES = 16  # candidate n: prefix + (n or ""), subnet base + 4n /24s


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _in_use(prefix: str, networks: list[ipaddress.IPv4Network]) -> bool:
    names = [ln.split(":")[1].strip().split("@")[0] for ln in _ip("-o", "link").stdout.splitlines()]
    names += [ln.split()[0] for ln in _ip("netns", "list").stdout.splitlines() if ln.strip()]
    if any(n == f"claim-{prefix}" or n.startswith(f"{prefix}-") for n in names):
        return True
    if any(n[len(prefix) : len(prefix) + 1].isalpha() for n in names if n.startswith(prefix)):
        return True  # a module's own sandbox: prefix + one letter ("ddpid-br")
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        address = ipaddress.IPv4Interface(line.split()[3])
        if any(address.network.overlaps(net) for net in networks):
            return True
    return False


def claim(prefix: str, subnet: str, span: int = 4) -> tuple[str, str]:
    """(prefix, subnet) for this session: the defaults when they are free, else the next free
    candidate; `span` subnets from `subnet` on are checked (the session's and its modules')."""
    base = ipaddress.IPv4Network(subnet)
    if os.geteuid() != 0 or not shutil.which("ip"):
        return prefix, subnet  # no sandbox can come up here anyway: the tests say so themselves
    for n in range(CANDIDATES):
        name = prefix + (str(n) if n else "")
        first = int(base.network_address) + n * span * base.num_addresses
        nets = [
            ipaddress.IPv4Network((first + i * base.num_addresses, base.prefixlen))
            for i in range(span)
        ]
        if _in_use(name, nets):
            continue
        made = _ip("link", "add", f"claim-{name}", "type", "bridge")  # down, no address: inert
        if made.returncode != 0 and "exists" in made.stderr:
            continue  # another session took it between the check and now
        if made.returncode != 0:
            return name, str(nets[0])  # no claim possible here: the free candidate, unclaimed
        atexit.register(_ip, "link", "del", f"claim-{name}")
        return name, str(nets[0])
    raise RuntimeError(
        f"no free sandbox prefix/subnet among {CANDIDATES} candidates from {prefix} {subnet}: "
        f"take down old sandboxes (ip -o link | grep {prefix}) or set the DDPFLEET_*_PREFIX/_SUBNET"
    )
