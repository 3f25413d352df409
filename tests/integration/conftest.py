"""A real 2-node sandbox cluster for the integration tests (one per test session), and the same
sandbox grown to 4 nodes for the modules that need four (`grown_four`, made once per session).

Its inventory is the project's inventory.yaml with its own prefix, subnet and state directory,
so a test session never touches a sandbox someone brought up by hand. Two sessions side by side
each claim their own (netclaim.py); DDPFLEET_TEST_PREFIX / DDPFLEET_TEST_SUBNET pin them.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.integration.netclaim import claim

ROOT = Path(__file__).resolve().parents[2]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
if "DDPFLEET_TEST_PREFIX" in os.environ or "DDPFLEET_TEST_SUBNET" in os.environ:
    PREFIX = os.environ.get("DDPFLEET_TEST_PREFIX", "ddpi")
    SUBNET = os.environ.get("DDPFLEET_TEST_SUBNET", "10.215.0.0/24")
else:  # ddpi on 10.215.0.0/24 unless another session on this kernel has it (netclaim.py)
    PREFIX, SUBNET = claim("ddpi", "10.215.0.0/24")
USER_KNOWN_HOSTS = Path("~/.ssh/known_hosts").expanduser()  # under the test HOME (../conftest.py)
# The system ssh takes ~ from the password database, not $HOME: no user config, no default keys.
HERMETIC = ["-F", "/dev/null", "-o", "IdentitiesOnly=yes"]


def second_subnet(subnet: str = SUBNET) -> str:
    """A subnet for a test's second sandbox, next to the session's own (never another session's)."""
    net = ipaddress.IPv4Network(subnet)
    return str(ipaddress.IPv4Network((int(net.network_address) + net.num_addresses, net.prefixlen)))


def write_inventory(
    directory: Path,
    count: int = 2,
    prefix: str = PREFIX,
    subnet: str = SUBNET,
    cloud: bool = False,
    **changes,
) -> Path:
    """The project inventory, moved to `directory`, its own prefix/subnet, `count` nodes.

    These clusters log in as root and train as root, said explicitly (train_user.allow_root):
    the tests written for them read root's files. `cloud`: the default cloud shape instead,
    login `ubuntu` (its sandbox brought up with `--sudo nopasswd`, which refuses root logins)
    and the default training user `train` (test_real_machine.py, the benches)."""
    data = yaml.safe_load((ROOT / "inventory.yaml").read_text())
    net = ipaddress.IPv4Network(subnet)
    data["sandbox"].update(prefix=prefix, subnet=subnet, state_dir=str(directory / "state"))
    data["ssh"].update(
        user="root",
        key=str(directory / "state" / "id_ed25519"),
        known_hosts=str(directory / "known_hosts"),
    )
    # Direct connections unless a test is about the keeper (test_keeper.py): every test has a
    # HOME of its own, so kept connections would mean a keeper per test, idling for a minute.
    data["ssh"]["persist"] = 0
    if cloud:
        data["ssh"]["user"] = "ubuntu"
        data.pop("train_user", None)  # the default: train, uid 2000
    else:
        data["train_user"] = {"name": "root", "uid": 0, "gid": 0, "allow_root": True}
    data["nodes"] = {f"node{i}": {"host": str(net[10 + i])} for i in range(count)}
    for key, value in changes.items():
        data[key] = value
    path = directory / "inventory.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Cluster:
    dir: Path
    inventory: Path

    @property
    def data(self) -> dict:
        return yaml.safe_load(self.inventory.read_text())

    def env(self, **extra) -> dict:
        return {**os.environ, "DDPFLEET_INVENTORY": str(self.inventory), "COLUMNS": "200", **extra}

    def invoke(
        self,
        *args: str,
        timeout: float = 900,
        inventory: Path | None = None,
        extra_env: dict | None = None,
        **kw,
    ) -> subprocess.CompletedProcess:
        env = self.env(**(extra_env or {}))
        if inventory is not None:
            env["DDPFLEET_INVENTORY"] = str(inventory)
        return subprocess.run(
            [*INVOKE, *args],
            cwd=self.dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def address(self, node: str) -> str:
        return self.data["nodes"][node]["host"]

    def ssh(
        self, node: str, command: str, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        """The system OpenSSH client, strict host keys, to check what a user would check."""
        d = self.data
        return subprocess.run(
            [
                "ssh",
                *HERMETIC,
                "-i",
                d["ssh"]["key"],
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={d['ssh']['known_hosts']}",
                "-o",
                "ConnectTimeout=5",
                f"root@{self.address(node)}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def logins(self, node: str) -> int:
        """Accepted logins so far, from the node's own sshd log (this query's own included)."""
        out = self.ssh(node, "grep -c 'Accepted publickey' /var/log/sshd.log || true").stdout
        return int(out.strip() or 0)


@contextmanager
def sandbox(c: Cluster, *up_args: str) -> Iterator[Cluster]:
    """c's sandbox (`sandbox.up` with up_args) for the with-block, taken down after it, even
    when the block fails; both asserted."""
    up = c.invoke("sandbox.up", *up_args, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield c
    finally:
        down = c.invoke("sandbox.down", timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    directory = tmp_path_factory.mktemp("cluster")
    with sandbox(Cluster(directory, write_inventory(directory))) as c:
        yield c


# --- the session's sandbox grown to 4 nodes, lent to one module at a time -----------------------
# Bringing up and bootstrapping (venv_env, torch) four nodes takes minutes on a 2-core box; the
# modules that need four (test_health's --deep, test_recovery, test_runs_history) each did it
# for a sandbox of their own. Now the session's sandbox grows once: node2 and node3 made by
# `sandbox.up` with a 4-node inventory beside the session's (as a user adds machines; the
# session's own inventory still names node0 and node1 only), all four bootstrapped once.


RUN_PROCS = "grep -l -a -s -e DDPFLEET_RUN_ID= /proc/[0-9]*/environ"  # any run's processes


class Four:
    """The grown sandbox. `lend(dir)` gives a module an inventory of its own naming all four
    (its own runs index and health log; `changes` as write_inventory's), healed and checked,
    bootstrapped again if a node's env is no longer the one made (test_jupyter remakes
    node0/node1's with its own spec); when done, the module must leave the four as it found them."""

    def __init__(self, session: Cluster, directory: Path):
        self.session, self.dir = session, directory
        self.prefix = session.data["sandbox"]["prefix"]
        self.cluster = Cluster(directory, self._inventory(directory))
        self.nodes = list(self.cluster.data["nodes"])
        self.qdiscs: dict[str, str] = {}
        self.envs: dict[str, str] = {}

    def _inventory(self, directory: Path, **changes) -> Path:
        """A 4-node inventory on the session's sandbox (its state dir, key, known_hosts), in
        `directory`, sharing the session's wheel cache."""
        d = self.session.data
        changes = {"sandbox": {**d["sandbox"]}, "ssh": {**d["ssh"]}, **changes}
        directory.mkdir(parents=True, exist_ok=True)
        wheels = self.session.dir / ".ddpfleet" / "wheelhouse"
        wheels.mkdir(parents=True, exist_ok=True)
        (directory / ".ddpfleet").mkdir(exist_ok=True)
        if not (directory / ".ddpfleet" / "wheelhouse").exists():
            (directory / ".ddpfleet" / "wheelhouse").symlink_to(wheels)
        return write_inventory(directory, 4, self.prefix, d["sandbox"]["subnet"], **changes)

    def _each(self, fn) -> dict:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            return dict(zip(self.nodes, pool.map(fn, self.nodes)))

    def _qdisc(self, node: str) -> str:
        return _netns(self.prefix, node, "tc", "qdisc", "show", "dev", "eth0").stdout

    def _envs(self) -> dict[str, str]:
        """venv_env's record of the spec it installed and verified, per node ('' where none)."""
        spec = f"{self.cluster.data['python_env']['path']}/.ddpfleet-spec.sha256"
        return self._each(lambda n: self.cluster.ssh(n, f"cat {spec} 2>/dev/null").stdout.strip())

    def bootstrap(self) -> None:
        boot = self.cluster.invoke("bootstrap", "--roles", "venv_env", timeout=1800)
        assert boot.returncode == 0, boot.stdout[-3000:] + boot.stderr[-3000:]
        self.envs = self._envs()
        assert all(self.envs.values()), f"bootstrap left no env spec hash on a node: {self.envs}"

    def grow(self) -> None:
        up = self.cluster.invoke("sandbox.up", timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        self.bootstrap()
        self.qdiscs = self._each(self._qdisc)

    def wrongs(self) -> list[str]:
        """What is not as the sandbox was grown: a node down or unreachable, a host veth down, a
        qdisc on a node's eth0, a process of a run (DDPFLEET_RUN_ID) left on a node."""
        found = []
        for i, node in enumerate(self.nodes):
            if "state UP" not in _ip("link", "show", f"{self.prefix}-{i}h").stdout:
                found.append(f"{node}: its veth {self.prefix}-{i}h is not up")
        for node, qdisc in self._each(self._qdisc).items():
            if qdisc != self.qdiscs[node]:
                found.append(f"{node}: eth0 has a qdisc: {qdisc.strip()}")
        for node, r in self._each(lambda n: self.cluster.ssh(n, RUN_PROCS + " || true")).items():
            if r.returncode != 0:
                found.append(f"{node}: unreachable ({r.stderr.strip()[-200:]})")
            elif r.stdout.split():
                pids = [line.split("/")[2] for line in r.stdout.split()]
                found.append(f"{node}: processes of a run left: {' '.join(pids)}")
        return found

    def heal(self) -> None:
        """Everything back as grown: veths up, qdiscs removed, run processes killed, stopped
        nodes started (`sandbox.start` is idempotent)."""
        for i in range(len(self.nodes)):
            _ip("link", "set", f"{self.prefix}-{i}h", "up")
        for node, qdisc in self._each(self._qdisc).items():
            if qdisc != self.qdiscs[node]:
                _netns(self.prefix, node, "tc", "qdisc", "del", "dev", "eth0", "root")
        kill = RUN_PROCS + " | cut -d/ -f3 | xargs -r kill -9"
        killed = self._each(lambda n: self.cluster.ssh(n, kill))
        down = [node for node, r in killed.items() if r.returncode == 255]  # ssh's own failure
        if down:
            r = self.cluster.invoke("sandbox.start", "--nodes", ",".join(down), timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr

    @contextmanager
    def lend(self, directory: Path, **changes) -> Iterator[Cluster]:
        """The four for one module: healed and checked when handed out; when the module is
        done, whatever it left (a node stopped, a qdisc, a run still running) fails its
        teardown by name and is put right for the next module."""
        found = self.wrongs()
        if found:  # a module before this one left it so (said there, if it was a lender)
            print("shared 4-node sandbox put right before lending it: " + "; ".join(found))
            self.heal()
            found = self.wrongs()
        assert not found, "the shared 4-node sandbox is not healthy: " + "; ".join(found)
        if self._envs() != self.envs:  # node0/node1's env remade by another module's bootstrap
            print("shared 4-node sandbox: an env changed since its bootstrap; bootstrapping again")
            self.bootstrap()
        yield Cluster(directory, self._inventory(directory, **changes))
        deadline = time.monotonic() + 15  # a run that just ended may still be exiting
        while (wrong := self.wrongs()) and time.monotonic() < deadline:
            time.sleep(1)
        if wrong:
            self.heal()
            pytest.fail("the module left the shared 4-node sandbox changed: " + "; ".join(wrong))


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _netns(prefix: str, node: str, *argv: str) -> subprocess.CompletedProcess:
    return _ip("netns", "exec", f"{prefix}-{node}", *argv)


@pytest.fixture(scope="session")
def grown_four(cluster: Cluster) -> Four:
    """The session's sandbox grown to node0-node3, venv_env bootstrapped on all four, once per
    session; modules take it with `grown_four.lend(their_dir)`. The session's `sandbox.down`
    takes node2 and node3 down with the rest (it removes every node dir of the state dir)."""
    four = Four(cluster, cluster.dir / "four")
    four.grow()
    return four
