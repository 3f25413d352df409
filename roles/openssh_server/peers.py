"""openssh_server's node side of node-to-node SSH (off unless openssh_server.cluster_ssh).

For the one user the inventory names (openssh_server.cluster_user; root only when named):
  cluster user     the user exists; it is recorded in MARKER so a later run can undo its files
  cluster key      ~user/.ssh/<key name>: ed25519, made on the node by ssh-keygen as the user
  cluster cert     <key name>-cert.pub: the controller's CA signature for this node's principal
  authorized_keys  one line: cert-authority, the principals of the nodes in the inventory now,
                   from= their addresses, restrict; ddpfleet's older lines are dropped
  known_hosts      /etc/ssh/ssh_known_hosts: a block of every node's pinned host keys
  ssh config       ~user/.ssh/config: a block mapping each node name to its address
  cleanup          what an earlier setup left: another user's files, the shared root key
Everything in the user's home is read and written as that user (runuser), never by root
through a path the user controls. With cluster_ssh off, one step removes all of the above.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

from ddpfleet import trainuser
from ddpfleet.engine.roles import Step, failed, ok
from ddpfleet.errors import DdpfleetError
from ddpfleet.shell import sh, sha256

KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
MARKER = "/var/lib/ddpfleet/cluster_ssh_users"  # users whose homes hold ddpfleet's files
USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
OURS = "/^ddpfleet-(ca|cluster)@/"  # awk: the last field of ddpfleet's authorized_keys lines
RUNUSER = 'runuser -u "$1" -- sh -c "$2" sh "$3"'
SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SAFE_OPTION = re.compile(r"[A-Za-z0-9:._/+*?!-]+")  # no quote, comma or space: stays one option
EMPTY_BLOCK = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of ''


def as_user(user: str, script: str, *args: str) -> str:
    """`script` run by `user` in its home: root never follows a path the user controls."""
    return shlex.join(["runuser", "-u", user, "--", "sh", "-c", script, "sh", *args])


def block_sed(path: str) -> str:
    from_block = r"/^# BEGIN ddpfleet cluster$/,/^# END ddpfleet cluster$/"
    return f"sed -n '{from_block}p' \"{path}\" 2>/dev/null | sha256sum | cut -c1-64"


# As the user; $1 key name. key=value lines only.
USER_PROBE = rf"""
cd "$HOME" 2>/dev/null || exit 0
s=.ssh k=.ssh/$1
[ "$(stat -c %a "$k" 2>/dev/null)" = 600 ] && echo "pub=$(ssh-keygen -y -P '' -f "$k" 2>/dev/null)"
awk '$NF ~ /^ddpfleet-cluster@/ {{ f = 1 }} END {{ exit !f }}' "$k.pub" 2>/dev/null && echo legacy=1
echo "cert=$(head -n 1 "$k-cert.pub" 2>/dev/null)"
echo "ak=$(awk '$NF ~ {OURS}' "$s/authorized_keys" 2>/dev/null | sha256sum | cut -c1-64)"
echo "ssh_config=$({block_sed("$s/config")})"
"""

# As root; $1 user ('' when off), $2 key name, $3 USER_PROBE.
PROBE = rf"""
user=$1
echo "known_hosts=$({block_sed(KNOWN_HOSTS)})"
echo "marker=$(cat {MARKER} 2>/dev/null | tr '\n' ' ')"
r=$HOME/.ssh
awk '$NF ~ /^ddpfleet-cluster@/ {{ f = 1 }} END {{ exit !f }}' "$r/authorized_keys" \
  "$r/$2.pub" 2>/dev/null && echo root_legacy=1
[ -n "$user" ] && getent passwd "$user" >/dev/null && echo user_ok=1 && \
  runuser -u "$user" -- sh -c "$3" sh "$2"
true
"""

# As the user; $1 key name, $2 comment. Prints the new public key.
KEYGEN = """
set -e
cd "$HOME"
umask 077
mkdir -p .ssh && chmod 700 .ssh
rm -f ".ssh/$1" ".ssh/$1.pub" ".ssh/$1-cert.pub"
ssh-keygen -q -t ed25519 -N '' -C "$2" -f ".ssh/$1"
echo "pub=$(ssh-keygen -y -P '' -f ".ssh/$1")"
"""

# As the user; $1 path under ~/.ssh, $2 mode; the content on stdin.
PUT = """
set -e
cd "$HOME"
umask 077
mkdir -p .ssh && chmod 700 .ssh
cat >".ssh/$1.ddpfleet-tmp"
chmod "$2" ".ssh/$1.ddpfleet-tmp"
mv -f ".ssh/$1.ddpfleet-tmp" ".ssh/$1"
"""

# As the user; $1 the CA line ('' to only drop ddpfleet's lines).
AUTHORIZE = rf"""
set -e
cd "$HOME"
umask 077
mkdir -p .ssh && chmod 700 .ssh
a=.ssh/authorized_keys
t=$a.ddpfleet-tmp
{{ awk '$NF !~ {OURS}' "$a" 2>/dev/null || true; [ -z "$1" ] || printf '%s\n' "$1"; }} >"$t"
chmod 600 "$t"
mv -f "$t" "$a"
"""

# As the user whose files go; $1 key name.
FORGET = rf"""
cd "$HOME" 2>/dev/null || exit 0
rm -f ".ssh/$1" ".ssh/$1.pub" ".ssh/$1-cert.pub"
for f in .ssh/authorized_keys .ssh/config; do
  [ -f "$f" ] || continue
  case $f in
    *keys) awk '$NF !~ {OURS}' "$f" >"$f.ddpfleet-tmp" ;;
    *) sed '/^# BEGIN ddpfleet cluster$/,/^# END ddpfleet cluster$/d' "$f" >"$f.ddpfleet-tmp" ;;
  esac
  chmod 600 "$f.ddpfleet-tmp" && mv -f "$f.ddpfleet-tmp" "$f"
done
"""

# As root; $1 the users to record ('' removes the record).
RECORD = f"""
if [ -z "$1" ]; then rm -f {MARKER}; exit 0; fi
mkdir -p "$(dirname {MARKER})"
printf '%s\\n' $1 >{MARKER}.tmp && chmod 0600 {MARKER}.tmp && mv -f {MARKER}.tmp {MARKER}
"""


def cluster_user_of(cfg, inventory, node) -> str:
    """Who may ssh between nodes: cluster_user, else the training user (never root by
    default); "" when node-to-node SSH is off."""
    if not cfg["cluster_ssh"]:
        return ""
    if cfg["cluster_user"]:
        return str(cfg["cluster_user"])
    train = trainuser.settings(inventory, node)
    return "" if train.root else train.name


class Peers:
    """One node's node-to-node SSH: what it should hold, what it holds, the steps between."""

    def __init__(self, target, controller, algorithms=()):
        self.t, self.c = target, controller
        self.algorithms = list(algorithms)  # the drop-in's algorithm lines, for the ssh client
        self.host, self.cfg = target.host, target.cfg
        self.key = self.cfg["cluster_key_name"]
        self.user = cluster_user_of(self.cfg, self.host.inventory, self.host.node)
        self.state: dict[str, str] = {}

    def probe(self) -> None:
        self.state = self.host.probe(sh(PROBE, self.user, self.key, USER_PROBE))

    def steps(self) -> Iterator[Step]:
        """The steps in order, each computed after the one before; stops at a failure."""
        if not SAFE_KEY.fullmatch(self.key):
            yield failed(
                "cluster key",
                f"openssh_server.cluster_key_name {self.key!r} is not "
                "a plain file name: use letters, digits, '.', '_' or '-'",
            )
            return
        self.probe()
        if not self.cfg["cluster_ssh"]:
            yield self.off()
            return
        for step_fn in (
            self.cluster_user,
            self.cluster_key,
            self.cluster_cert,
            self.authorized_keys,
            self.known_hosts,
            self.ssh_config,
            self.cleanup,
        ):
            try:
                step = step_fn()
            except DdpfleetError as e:  # the inventory cannot be re-read, a bad option value
                step = failed(step_fn.__name__.replace("_", " "), str(e))
            yield step
            if step.status == "failed":
                return

    # -- off ------------------------------------------------------------------------------------

    def off(self) -> Step:
        removed = self.forget(keep="")
        if self.state.get("known_hosts") != EMPTY_BLOCK:
            self.write_known_hosts("")
            removed.append(f"the block in {KNOWN_HOSTS}")
        if not removed:
            return ok("node-to-node ssh", "off (openssh_server.cluster_ssh: false)")
        what = "; ".join(removed)
        return self.host.changed("node-to-node ssh", f"remove {what}")

    def forget(self, keep: str) -> list[str]:
        """Remove ddpfleet's files from every recorded user but `keep`, and the shared root
        key of older ddpfleet; returns what went."""
        gone = [u for u in self.state.get("marker", "").split() if u != keep]
        if self.state.get("root_legacy") and keep != "root" and "root" not in gone:
            gone.append("root")
        for user in gone:
            self.host.change(
                sh(
                    f'getent passwd "$1" >/dev/null || exit 0; exec {RUNUSER}',
                    user,
                    FORGET,
                    self.key,
                )
            )
        if gone or (keep and self.state.get("marker", "").split() != [keep]):
            self.host.change(sh(RECORD, keep))
        return [f"{u}'s cluster key, authorized_keys line and ssh config block" for u in gone]

    # -- on -------------------------------------------------------------------------------------

    def cluster_user(self) -> Step:
        user, where = self.user, f"openssh_server.cluster_user (node {self.host.name})"
        if not user:
            return failed(
                "cluster user",
                f"{where} is not set: name the non-root user that may "
                "ssh between nodes (root only if you mean it), or set cluster_ssh: false",
            )
        if not USER_NAME.fullmatch(user):
            return failed("cluster user", f"{where}: {user!r} is not a valid user name")
        if not self.state.get("user_ok"):
            return failed(
                "cluster user",
                f"{where}: no user {user!r} on this node: create it "
                "(the same uid on every node), then run again",
            )
        recorded = self.state.get("marker", "").split()
        note = "root, as the inventory says" if user == "root" else f"{user} (not root)"
        if user in recorded:
            return ok("cluster user", note)
        self.host.change(sh(RECORD, " ".join([*recorded, user])))
        return self.host.changed("cluster user", f"record {note}")

    def cluster_key(self) -> Step:
        pub = self.c.public_key(self.state.get("pub", ""))
        if pub and not self.state.get("legacy"):
            return ok("cluster key", f"~{self.user}/.ssh/{self.key} (made on this node)")
        comment = f"ddpfleet-key:{self.host.name}@{self.host.inventory.cluster.name}"
        why = "replace the shared key of older ddpfleet with" if pub else "generate"

        def generate() -> None:
            result = self.host.change(as_user(self.user, KEYGEN, self.key, comment))
            self.state["pub"] = result.stdout.partition("pub=")[2].strip()

        self.state.pop("cert", None)
        return self.host.changed(
            "cluster key", f"{why} ~{self.user}/.ssh/{self.key} on the node", generate
        )

    def cluster_cert(self) -> Step:
        me = self.c.principal(self.host.node)
        if me is None:
            return failed(
                "cluster cert",
                f"no trusted host key for {self.host.name} under its "
                f"ssh address: invoke trust --nodes {self.host.name}, then run again",
            )
        ca = self.ca()
        pub = self.c.public_key(self.state.get("pub", ""))
        cert = self.state.get("cert", "")
        if ca and pub and self.c.cert_fits(cert, pub, ca[1], me):
            return ok("cluster cert", f"signed by the cluster CA for {me}")

        def sign() -> None:
            if ca and pub:
                key_id = f"ddpfleet-key:{self.host.name}@{self.host.inventory.cluster.name}"
                line = self.c.sign(ca[0], pub, me, key_id)
                self.host.change(
                    as_user(self.user, PUT, f"{self.key}-cert.pub", "644"), stdin=line + "\n"
                )

        return self.host.changed("cluster cert", f"sign this node's key for {me}", sign)

    def authorized_keys(self) -> Step:
        ca = self.ca()
        line, note = self.ca_line(ca[1] if ca else "ssh-ed25519 (the CA made on the first run)")
        if ca and self.state.get("ak") == sha256(line + "\n"):
            return ok("authorized_keys", note)
        self.host.change(as_user(self.user, AUTHORIZE, line))
        return self.host.changed("authorized_keys", f"trust {note}")

    def known_hosts(self) -> Step:
        nodes = self.peer_nodes()
        lines, missing = self.c.known_host_lines(nodes)
        what = f"host keys of {len(nodes) - len(missing)} nodes"
        if missing:
            what += f" (none trusted yet for {', '.join(missing)}: invoke trust)"
        block = self.host.template("known_hosts.j2", lines=lines)
        if self.state.get("known_hosts") == sha256(block):
            return ok("known_hosts", f"{KNOWN_HOSTS}: {what}")
        _, diff = self.write_known_hosts(block)
        return self.host.changed("known_hosts", f"write {what} into {KNOWN_HOSTS}", diff=diff)

    def ssh_config(self) -> Step:
        peers = [
            self.c.Peer(p.name, *self.c.resolved(p), self.peer_user(p)) for p in self.peer_nodes()
        ]
        block = self.host.template(
            "ssh_config.j2", peers=peers, key_name=self.key, algorithms=self.algorithms
        )
        names = ", ".join(p.name for p in peers)
        path = f"~{self.user}/.ssh/config"
        if self.state.get("ssh_config") == sha256(block):
            return ok("ssh config", f"{path}: Host entries for {names}")
        current = self.host.run(as_user(self.user, 'cat "$HOME/.ssh/config" 2>/dev/null || true'))
        # ssh_config is first-match-wins too: the block goes on top.
        text = self.c.with_block(current.stdout, block, top=True)
        self.host.change(as_user(self.user, PUT, "config", "600"), stdin=text)
        return self.host.changed("ssh config", f"write Host entries for {names} into {path}")

    def cleanup(self) -> Step:
        removed = self.forget(keep=self.user)
        if not removed:
            return ok("cleanup", "nothing left from an earlier setup")
        what = "; ".join(removed)
        return self.host.changed("cleanup", f"remove {what}")

    # -- helpers --------------------------------------------------------------------------------

    def ca(self) -> tuple[bytes, str] | None:
        """The cluster CA; made here on the first run (never under --check)."""
        path = self.host.inventory.root / self.cfg["cluster_ca"]
        return self.c.ca(path, create=not self.host.check)  # the controller's, not the engine's

    def peer_nodes(self) -> tuple:
        """Every node of the inventory file with node-to-node SSH on (not just --nodes)."""
        nodes = self.c.all_nodes(self.host.inventory)
        return tuple(n for n in nodes if self.peer_user(n))

    def peer_user(self, node) -> str:
        cfg = self.host.role.config(self.host.inventory, node)
        return cluster_user_of(cfg, self.host.inventory, node)

    def ca_line(self, ca_public: str) -> tuple[str, str]:
        """The authorized_keys line and a note saying what it allows."""
        principals, sources, missing = [], list(self.cfg["cluster_from"] or []), []
        for node in self.peer_nodes():
            me = self.c.principal(node)
            if me is None:
                missing.append(node.name)
                continue
            principals.append(me)
            sources += self.c.addresses(node)
        name = self.host.inventory.cluster.name
        for value in [*principals, *sources, name]:
            if not SAFE_OPTION.fullmatch(str(value)):
                raise DdpfleetError(
                    f"{value!r} cannot go into an authorized_keys option: rename "
                    "the node or fix openssh_server.cluster_from"
                )
        sources = list(dict.fromkeys(str(s) for s in sources))
        options = f'cert-authority,principals="{",".join(principals)}",from="{",".join(sources)}"'
        line = f"{options},restrict {ca_public} {self.c.CA_COMMENT}{name}"
        note = f"the cluster CA for {len(principals)} nodes, from their addresses only"
        if missing:
            note += f" (no trusted host key for {', '.join(missing)}: invoke trust)"
        return line, note

    def write_known_hosts(self, block: str) -> tuple[bool, str]:
        current = self.host.read_file(KNOWN_HOSTS)
        text = self.c.with_block((current or b"").decode(errors="replace"), block, top=False)
        return self.host.put(KNOWN_HOSTS, text, mode=0o644)
