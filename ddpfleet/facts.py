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

FACTS_SCRIPT = r"""
echo "hostname=$(hostname)"
. /etc/os-release 2>/dev/null
echo "os=${PRETTY_NAME:-unknown}"
echo "os_id=${ID:-unknown}"
echo "os_like=${ID_LIKE:-}"
echo "arch=$(uname -m)"
echo "python3=$(python3 -c 'import platform; print(platform.python_version())' 2>/dev/null)"
echo "disk_free_kb=$(df -Pk / 2>/dev/null | awk 'NR==2 {print $4}')"
echo "nvidia_smi=$(command -v nvidia-smi 2>/dev/null)"
echo "pid1=$(cat /proc/1/comm 2>/dev/null)"
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
