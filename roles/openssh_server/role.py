"""openssh_server: sshd installed and running, key-only login, node-to-node SSH by name.

The drop-in's lines (login, session limits, the algorithms ssh-audit passes, picked from the
node's `ssh -Q`) come from hardening.py; the probe reports what that needs.

A converged node costs one probe (PROBE): package, service, the drop-in's hash, the effective
settings (`sshd -T`) and the hashes of the cluster files. When the drop-in must change:

1. the candidate, followed by `Include /etc/ssh/sshd_config`, is fed to `sshd -t -f /dev/stdin`
   (read-only, so --check validates too); a rejected candidate is never written;
2. it is installed beside the old one, `sshd -t` runs again on the real config, and a rejection
   puts the old file back in the same script;
3. the `reload sshd` handler reloads (never restarts: sessions stay up), then opens a NEW
   controller connection; if that login fails, the old drop-in goes back and sshd reloads again.

Node-to-node SSH (off by default; pdsh, rsync, MPI-style tools between nodes, which torchrun
does not need) is peers.py, with its controller half in cluster.py: a key made on each node for
one named user, certified by a CA kept on the controller, trusted from the cluster's addresses
only, reconciled against the inventory on every run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddpfleet import inventory as inv
from ddpfleet.engine.roles import Host, Step, changed, failed, ok
from ddpfleet.errors import NodeError
from ddpfleet.shell import APT_GET, sh, sha256
from ddpfleet.ssh.connection import connect
from ddpfleet.ssh.knownhosts import known_hosts_name, pinned_keys

from . import cluster as controller  # cluster CA, trusted host keys, marked blocks
from . import (
    hardening,  # the drop-in's lines: login, session limits, algorithms
    peers,  # node-to-node SSH on the node
)

ORDER = 20
SECTION = "openssh_server"
WHAT = "key-only login, session limits, audited algorithms"  # what the drop-in does, in steps
SSHD = "/usr/sbin/sshd"
EFFECTIVE = "|".join(hardening.EFFECTIVE)  # the drop-in's keywords as `sshd -T` prints them

# $1 drop-in, $2 systemd unit ('' without systemd). Prints key=value lines only.
PROBE = rf"""
dropin=$1 unit=$2
digest() {{ sha256sum 2>/dev/null <"$1" | cut -c1-64; }}
echo "uid=$(id -u)"
echo "home=$HOME"
[ -x {SSHD} ] && echo sshd=1
if [ -n "$unit" ]; then
  echo "active=$(systemctl is-active "$unit" 2>/dev/null)"
else
  pid=$(cat /run/sshd.pid 2>/dev/null) && kill -0 "$pid" 2>/dev/null && echo active=active
fi
awk 'tolower($1) == "include" && index($0, "sshd_config.d/") {{ f = 1 }} END {{ exit !f }}' \
  /etc/ssh/sshd_config 2>/dev/null && echo include=1
echo "dropin=$(digest "$dropin")"
[ -e "$dropin.ddpfleet-pending" ] && echo pending=1
[ -d /run/sshd ] && echo rundir=1
[ -x {SSHD} ] && {SSHD} -T 2>/dev/null | awk '$1 ~ /^({EFFECTIVE})$/ \
  {{ print "eff_" $1 "=" $2 }}'
{hardening.QUERY.strip()}
true
"""

# $1 drop-in; the candidate on stdin. Writes it beside the live file, swaps it in, and puts the
# old one back at once if `sshd -t` rejects the real config (the candidate passed already).
# <drop-in>.ddpfleet-pending marks "installed, not yet proven by a fresh login": a run cut
# short there reloads and checks on its next run. <drop-in>.ddpfleet-prev is the old version.
INSTALL = rf"""
set -e
d=$1 new="$1.ddpfleet-new" prev="$1.ddpfleet-prev"
install -d -m 0755 /run/sshd "$(dirname "$d")"
cat >"$new"
chmod 0644 "$new"
rm -f "$prev"
if [ -e "$d" ]; then cp -p "$d" "$prev"; fi
: >"$d.ddpfleet-pending"
mv -f "$new" "$d"
if ! out=$({SSHD} -t 2>&1); then
  if [ -e "$prev" ]; then mv -f "$prev" "$d"; else rm -f "$d"; fi
  rm -f "$d.ddpfleet-pending"
  printf '%s\n' "$out"
  exit 3
fi
"""

# $1 drop-in: back to the version before the install (none if there was none).
ROLLBACK = """
if [ -e "$1.ddpfleet-prev" ]; then mv -f "$1.ddpfleet-prev" "$1"; else rm -f "$1"; fi
rm -f "$1.ddpfleet-pending"
"""


def applies(cfg: Mapping[str, Any], host) -> bool:
    return True


def is_debian(facts: Mapping[str, str]) -> bool:
    return "debian" in (facts.get("os_id", ""), *facts.get("os_like", "").split())


def is_redhat(facts: Mapping[str, str]) -> bool:
    family = {facts.get("os_id", ""), *facts.get("os_like", "").split()}
    return bool(family & {"rhel", "fedora", "centos"})


def unit(facts: Mapping[str, str]) -> str:
    """The service name under systemd ('' without): Debian calls it ssh, Red Hat sshd."""
    if facts.get("pid1") != "systemd":
        return ""
    return "ssh" if is_debian(facts) else "sshd"


def fresh_login(node: inv.Node, timeout: float) -> str:
    """'' once a brand-new controller connection runs `true`; else the last error. Retries:
    sshd re-executes itself on SIGHUP and refuses connections for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = connect(node)
            try:
                conn.run("true")
            finally:
                conn.close()
            return ""
        except NodeError as e:
            error = e.message
        if time.monotonic() >= deadline:
            return error
        time.sleep(0.25)


# -- apply -------------------------------------------------------------------------------------


@dataclass
class Target:
    """One apply's view: the host, the settings, what the probe said. Not frozen: steps leave
    what they learned for the ones after them (a fresh probe, the drop-in, a reload owed)."""

    host: Host
    cfg: Mapping[str, Any]
    state: dict[str, str] = field(default_factory=dict)
    lines: list[tuple[str, str]] = field(default_factory=list)
    dropin_text: str = ""
    reload: bool = False  # the drop-in is installed but no fresh login has proven it yet

    @property
    def unit(self) -> str:
        return unit(self.host.facts)

    def render(self) -> str:
        """The drop-in for what the probe said ('' when fine; else why not, naming the key):
        its algorithm lines depend on the node's OpenSSH."""
        try:
            self.lines = hardening.settings(self.cfg, self.state, self.host.node.user)
        except hardening.BadSetting as e:
            return f"{self.where(e.key)}: {e}"
        self.dropin_text = self.host.template("hardening.conf.j2", settings=self.lines)
        return ""

    def where(self, key: str) -> str:
        """Where a setting's value came from: its inventory line, else the role's defaults."""
        inventory, node = self.host.inventory, self.host.node
        var = f"{SECTION}_{key}"
        if var in node.vars:
            return inventory.where("nodes", node.name, "vars", var)
        if key in inventory.section(SECTION):
            return inventory.where(SECTION, key)
        return f"roles/{SECTION}/defaults.yaml"

    def probe(self) -> None:
        self.state = self.host.probe(sh(PROBE, self.cfg["dropin"], self.unit))


def apply(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    node = Target(host, cfg)
    node.probe()
    if not node.state.get("uid"):
        yield failed("probe", "the node's sh printed no facts; is /bin/sh a POSIX shell?")
        return
    if node.state.get("uid") != "0":
        yield failed(
            "root",
            f"needs root on the node (logged in with uid {node.state.get('uid')}"
            "): set ssh.user: root for this node",
        )
        return
    # Node-to-node SSH runs also when off: it removes what an earlier setup left.
    steps = [_package, _service, _hardening, _reload, _peers]
    for step_fn in steps:
        out = step_fn(node)
        for step in [out] if isinstance(out, Step) else out:
            yield step
            if step.status == "failed":
                return


def _peers(node: Target) -> Iterator[Step]:
    # The node-to-node client config uses the drop-in's algorithms (node.lines, set by _hardening).
    return peers.Peers(node, controller, hardening.client_lines(node.lines)).steps()


def _package(node: Target) -> Step:
    if node.state.get("sshd"):
        return ok("package", f"{node.cfg['package']} installed ({SSHD})")
    facts, pkg = node.host.facts, node.cfg["package"]
    tool = "apt-get" if is_debian(facts) else "dnf" if is_redhat(facts) else ""
    if not tool:
        return failed(
            "package",
            f"no apt-get or dnf on {facts.get('os_id')}: install {pkg} yourself, then run again",
        )

    def install() -> None:
        if tool == "apt-get":
            apt = ["env", "DEBIAN_FRONTEND=noninteractive", *APT_GET, "install", "-y", "-q", pkg]
            if not node.host.change(apt, check=False).ok:  # stale or absent package lists
                node.host.change([*APT_GET, "update", "-q"])
                node.host.change(apt)
        else:
            node.host.change(["dnf", "install", "-y", pkg])
        node.probe()  # the package brings sshd, its host keys and (with systemd) the service

    return node.host.changed("package", f"install {pkg} ({tool})", install)


def _service(node: Target) -> Step:
    how = f"{node.unit} (systemd)" if node.unit else "sshd (pid file /run/sshd.pid)"
    if node.state.get("active") == "active":
        return ok("service", f"{how} running")
    if node.unit:
        argv: str | list[str] = ["systemctl", "enable", "--now", node.unit]
    else:
        argv = sh(f"install -d -m 0755 /run/sshd && {SSHD}")
    return node.host.changed("service", f"start {how}", lambda: node.host.change(argv))


def _hardening(node: Target) -> list[Step]:
    dropin = node.cfg["dropin"]
    bad = node.render() or _host_key_gap(node)
    if bad:
        return [failed("hardening", f"{bad}; nothing was changed")]
    if not node.state.get("include") and node.state.get("sshd"):
        return [
            failed(
                "hardening",
                "/etc/ssh/sshd_config does not Include "
                f"sshd_config.d/*.conf, so {dropin} would have no effect: add `Include "
                "/etc/ssh/sshd_config.d/*.conf` as its first line, then run again",
            )
        ]
    if node.state.get("dropin") == sha256(node.dropin_text):
        if node.state.get("pending"):  # installed by a run that stopped before its login check
            node.reload = True
            return [ok("hardening", f"{dropin} in place, not yet proven")]
        return [_effective(node)]
    problem = _validate(node)
    if problem:
        return [
            failed(
                "hardening",
                f"sshd -t rejected the new {dropin} ({problem}); "
                "nothing was installed, the old config stays",
            )
        ]
    diff = _diff(node) if node.host.diff else ""
    action = f"install {dropin} ({WHAT}) and reload sshd"
    return [node.host.changed("hardening", action, lambda: _install(node, diff), diff)]


def _install(node: Target, diff: str) -> Step:
    dropin = node.cfg["dropin"]
    result = node.host.change(sh(INSTALL, dropin), stdin=node.dropin_text, check=False)
    if not result.ok:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        return failed(
            "hardening",
            f"sshd -t rejected the installed config ({tail}); the "
            f"previous {dropin} was put back at once",
        )
    node.reload = True
    return changed("hardening", f"installed {dropin} ({WHAT}; sshd -t accepts it)", diff)


def _host_key_gap(node: Target) -> str:
    """Why the new HostKeyAlgorithms would lock the controller out ('' when they would not):
    it would refuse the only host key types it trusts for this node (an ecdsa-only pin)."""
    n = node.host.node
    name = known_hosts_name(n.host, n.port)
    # the types connect accepts: the project file's pins, else the user's (ssh.knownhosts)
    types = hardening.unoffered_pins(node.lines, set(pinned_keys(name, n.known_hosts)))
    if not types:
        return ""
    return (
        f"the controller trusts only {types} host keys for {name}, which the new "
        "HostKeyAlgorithms stop sshd offering: pin its ed25519 key (`ssh-keyscan -t ed25519 "
        f"{n.host}`, check the fingerprint, add it to {n.known_hosts}) or add {types} to "
        "openssh_server.host_key_algorithms"
    )


def _reload(node: Target) -> list[Step]:
    """Reload, then prove a fresh login works; otherwise undo and reload again. Done right
    after the install, not as an end-of-role handler: a later failed step must not leave a
    new drop-in on disk that sshd never loaded."""
    if not node.reload:
        return []
    action = "reload sshd and check a fresh controller login"
    return [node.host.changed("reload", action, lambda: _reload_and_login(node))]


def _reload_and_login(node: Target) -> Step:
    dropin = node.cfg["dropin"]
    reload = (
        ["systemctl", "reload", node.unit] if node.unit else sh('kill -HUP "$(cat /run/sshd.pid)"')
    )
    node.host.change(reload)
    error = fresh_login(node.host.node, float(node.cfg["login_timeout"]))
    if not error:
        node.host.change(["rm", "-f", f"{dropin}.ddpfleet-prev", f"{dropin}.ddpfleet-pending"])
        return changed("reload", "reloaded sshd; a fresh controller login works")
    node.host.change(sh(ROLLBACK, dropin))
    node.host.change(reload)
    return failed(
        "login check",
        f"no fresh login after the reload ({error}); put the previous "
        f"{dropin} back and reloaded sshd again",
    )


def _validate(node: Target) -> str:
    """Why sshd rejects the candidate ('' when it accepts it); nothing is written."""
    if not node.state.get("sshd"):
        return ""  # --check before the package: nothing to ask yet
    if not node.state.get("rundir"):
        if node.host.check:  # sshd -t needs /run/sshd, which --check may not create
            return ""
        node.host.change(["install", "-d", "-m", "0755", "/run/sshd"])
    candidate = node.dropin_text + "\nInclude /etc/ssh/sshd_config\n"
    result = node.host.run([SSHD, "-t", "-f", "/dev/stdin"], stdin=candidate, check=False)
    if result.ok:
        return ""
    return " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])


def _effective(node: Target) -> Step:
    """The drop-in is in place; sshd -T says whether something read earlier overrides it."""
    dropin = node.cfg["dropin"]
    keyword, got, want = hardening.overridden(node.lines, node.state)
    if keyword:
        return failed(
            "hardening",
            f"sshd -T says {keyword} {got}, {dropin} says {want}: a "
            "file sshd reads earlier sets it; remove it there, then run again",
        )
    return ok("hardening", f"{dropin} in place ({WHAT})")


def _diff(node: Target) -> str:
    from ddpfleet.engine.roles import _diff as unified

    current = node.host.read_file(node.cfg["dropin"])
    return unified(node.cfg["dropin"], current, node.dropin_text.encode())
