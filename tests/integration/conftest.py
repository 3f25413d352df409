"""A real 2-node sandbox cluster for the integration tests (one per test session).

Its inventory is the project's inventory.yaml with its own prefix, subnet and state directory,
so a test session never touches a sandbox someone brought up by hand. Two sessions side by side
each claim their own (netclaim.py); DDPFLEET_TEST_PREFIX / DDPFLEET_TEST_SUBNET pin them.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
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
    directory: Path, count: int = 2, prefix: str = PREFIX, subnet: str = SUBNET, **changes
) -> Path:
    """The project inventory, moved to `directory`, its own prefix/subnet, `count` nodes.

    These clusters log in as root and train as root, said explicitly (train_user.allow_root):
    the tests written for them read root's files; test_real_machine.py is the cloud shape."""
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
