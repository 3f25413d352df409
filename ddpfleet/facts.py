"""Node facts gathered in one round trip: one small sh script, one pure parse.

Example output of FACTS_SCRIPT (one key=value a line):

    hostname=node0
    os=Debian GNU/Linux 12 (bookworm)
    os_id=debian
    arch=x86_64
    python3=3.11.2
    disk_free_kb=81234567
    nvidia_smi=/usr/bin/nvidia-smi
"""

from __future__ import annotations

# Builtins and redirections where they do the job: each $(...) and each program is a fork, and
# `python3 -c 'import platform ...'` alone took ~30 ms of a ~36 ms script (now ~6 ms), which every
# `invoke ping` and every bootstrap pays on every node.
FACTS_SCRIPT = r"""
read -r h 2>/dev/null </proc/sys/kernel/hostname || h=$(hostname)
echo "hostname=$h"
. /etc/os-release 2>/dev/null
echo "os=${PRETTY_NAME:-unknown}"
echo "os_id=${ID:-unknown}"
echo "os_like=${ID_LIKE:-}"
echo "arch=$(uname -m)"
v=$(python3 -V 2>/dev/null)
echo "python3=${v#Python }"
df -Pk / 2>/dev/null | { read -r _; read -r _ _ _ free _; echo "disk_free_kb=$free"; }
echo "nvidia_smi=$(command -v nvidia-smi 2>/dev/null)"
p=; read -r p 2>/dev/null </proc/1/comm
echo "pid1=$p"
"""


def parse_facts(text: str) -> dict[str, str]:
    """'key=value' lines -> dict; values may be empty, unknown lines are ignored."""
    facts = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            facts[key] = value.strip()
    return facts


def human_kb(kb: str) -> str:
    try:
        n = float(kb) * 1024
    except ValueError:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return "?"
