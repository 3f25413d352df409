"""openssh_server's sshd settings: key-only login, the session limits of the hardening guides, and
the algorithms an auditor (ssh-audit) passes, picked from what the node's OpenSSH knows.

Pure: the probe's answer in, (keyword, value) lines out. role.py renders them into the drop-in
(and the algorithm lines into the node-to-node ~/.ssh/config block) and asks `sshd -t` first.

An algorithm setting given as a list is a preference order: the names the node's `ssh -Q` does
not print are left out, so an older OpenSSH never sees a name it rejects. Given as a string it
goes into the drop-in as written (OpenSSH's own "+name" / "-name" / "^name" forms included);
null leaves the keyword out, so sshd's compiled-in default applies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# (keyword, setting) in drop-in order; sshd keeps the first value it reads for a keyword.
KEYWORDS = (
    ("PubkeyAuthentication", "pubkey_authentication"),
    ("PasswordAuthentication", "password_authentication"),
    ("KbdInteractiveAuthentication", "kbd_interactive_authentication"),
    ("PermitRootLogin", "permit_root_login"),
    ("MaxAuthTries", "max_auth_tries"),
    ("LoginGraceTime", "login_grace_time"),
    ("ClientAliveInterval", "client_alive_interval"),
    ("ClientAliveCountMax", "client_alive_count_max"),
    ("X11Forwarding", "x11_forwarding"),
    ("AllowAgentForwarding", "allow_agent_forwarding"),
    ("AllowTcpForwarding", "allow_tcp_forwarding"),
)
PUBKEY = "PubkeyAcceptedAlgorithms"  # OpenSSH < 8.5 calls it PubkeyAcceptedKeyTypes
# (keyword, setting, the probe's `ssh -Q` answer); valid in sshd_config and ssh_config alike.
ALGORITHMS = (
    ("KexAlgorithms", "kex_algorithms", "q_kex"),
    ("Ciphers", "ciphers", "q_cipher"),
    ("MACs", "macs", "q_mac"),
    ("HostKeyAlgorithms", "host_key_algorithms", "q_key"),
    (PUBKEY, "pubkey_accepted_algorithms", "q_key"),
)
# Lower-case names as `sshd -T` prints them: the probe reports these as eff_<name>.
EFFECTIVE = [k.lower() for k, _ in KEYWORDS] + [k.lower() for k, _, _ in ALGORITHMS]
EFFECTIVE.append("pubkeyacceptedkeytypes")
ALIASES = {"without-password": "prohibit-password"}  # how `sshd -T` prints a value
TIMES = {"LoginGraceTime", "ClientAliveInterval"}  # `sshd -T` prints these in seconds

# For the probe: what this OpenSSH supports, one comma-separated line per query. key-sig lists
# signature names (rsa-sha2-512); OpenSSH before 8.3 has only `ssh -Q key`.
QUERY = r"""
for q in kex cipher mac; do echo "q_$q=$(ssh -Q $q 2>/dev/null | paste -sd, -)"; done
echo "q_key=$( (ssh -Q key-sig || ssh -Q key) 2>/dev/null | paste -sd, -)"
"""

_TIME = re.compile(r"(\d+)([sSmMhHdDwW]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadSetting(ValueError):
    """An inventory value that cannot go into the drop-in; the message names the key and fix.
    `key` is the setting (unprefixed), so role.py can point at its line in the inventory."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def word(v: Any) -> str:
    """YAML reads yes/no as booleans; sshd wants the words."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _line_value(key: str, v: Any) -> str:
    text = word(v)
    if not text.strip() or any(ord(c) < 32 for c in text):
        raise BadSetting(
            key.split(".")[0],
            f"openssh_server.{key}: {text!r} is empty or holds a line break or control "
            "character; give one sshd_config value on one line",
        )
    return text


def permit_root_login(v: Any, user: str) -> str:
    """auto: root keeps key-only login while the controller logs in as root, else none."""
    if word(v) != "auto":
        return word(v)
    return "prohibit-password" if user == "root" else "no"


def algorithms(cfg: Mapping[str, Any], state: Mapping[str, str]) -> list[tuple[str, str]]:
    """The algorithm lines for this node; an empty `ssh -Q` answer (no client installed yet, or
    --check before the package) keeps the list whole and leaves the verdict to `sshd -t`."""
    lines = []
    for keyword, key, query in ALGORITHMS:
        want = cfg[key]
        if want is None:
            continue
        if keyword == PUBKEY and state.get("eff_pubkeyacceptedkeytypes"):
            keyword = "PubkeyAcceptedKeyTypes"
        if isinstance(want, str):
            lines.append((keyword, _line_value(key, want)))
            continue
        if not isinstance(want, list) or not all(isinstance(n, str) for n in want) or not want:
            raise BadSetting(
                key,
                f"openssh_server.{key}: give a list of algorithm names (preference order), a "
                "string to use as written, or null for sshd's default",
            )
        known = set(filter(None, state.get(query, "").split(",")))
        chosen = [n for n in want if n in known] if known else list(want)
        if not chosen:
            raise BadSetting(
                key,
                f"openssh_server.{key}: this node's OpenSSH knows none of {', '.join(want)} "
                f"(`ssh -Q {query[2:]}`); add one it lists, or set it to null",
            )
        lines.append((keyword, _line_value(key, ",".join(chosen))))
    return lines


def settings(
    cfg: Mapping[str, Any], state: Mapping[str, str] | None = None, user: str = "root"
) -> list[tuple[str, str]]:
    """Every drop-in line. `options` adds keywords, and replaces a keyword set above in its
    place (matched case-insensitively, as sshd matches them), so it never loses silently."""
    state = state or {}
    pairs = []
    for keyword, key in KEYWORDS:
        v = cfg[key]
        if v is None:
            continue
        if key == "permit_root_login":
            v = permit_root_login(v, user)
        pairs.append((keyword, _line_value(key, v)))
    pairs += algorithms(cfg, state)
    options = cfg["options"] or {}
    if not isinstance(options, Mapping):
        raise BadSetting("options", "openssh_server.options: give a mapping of sshd keywords")
    for k, v in options.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", str(k)):
            raise BadSetting("options", f"openssh_server.options: {k!r} is not an sshd keyword")
        line = (str(k), _line_value(f"options.{k}", v))
        same = [i for i, (kw, _) in enumerate(pairs) if kw.lower() == str(k).lower()]
        if same:
            pairs[same[0]] = line
        else:
            pairs.append(line)
    return pairs


def client_lines(lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The algorithm lines of `lines`, for the node-to-node ssh client config."""
    names = {k.lower() for k, _, _ in ALGORITHMS} | {"pubkeyacceptedkeytypes"}
    return [(k, v) for k, v in lines if k.lower() in names]


def seconds(text: str) -> str | None:
    """sshd's time format (90, 1m30s) in seconds, as `sshd -T` prints it; None if not one."""
    parts = _TIME.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return str(sum(int(n) * _UNIT[u.lower()] for n, u in parts))


def overridden(lines: list[tuple[str, str]], state: Mapping[str, str]) -> tuple[str, str, str]:
    """(keyword, what sshd -T says, what the drop-in says) for the first line a file read
    earlier overrides; empty strings when sshd uses every line the way the drop-in says."""
    for keyword, want in lines:
        got = state.get(f"eff_{keyword.lower()}")
        if not got:
            continue  # not printed by this sshd (or a keyword sshd -T spells differently)
        want = want.lower()
        if keyword in TIMES:
            want = seconds(want) or want
        if want[:1] in "+-^":
            continue  # relative to sshd's default: the result is not this string
        if ALIASES.get(got, got) != ALIASES.get(want, want):
            return keyword, got, want
    return "", "", ""


def unoffered_pins(lines: list[tuple[str, str]], pinned: set[str]) -> str:
    """The host key types the controller trusts for a node, when the HostKeyAlgorithms line
    would stop sshd offering every one of them (its next login would be refused); else ''."""
    value = dict(lines).get("HostKeyAlgorithms")
    if not pinned or value is None or value[:1] in "+-^":
        return ""
    offered = set(value.split(","))
    signatures = {"ssh-rsa": {"rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"}}  # one key, three sigs
    if any(offered & signatures.get(kind, {kind}) for kind in pinned):
        return ""
    return ", ".join(sorted(pinned))
