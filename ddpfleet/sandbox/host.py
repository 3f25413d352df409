"""The host's side of the sandbox: running its commands, its Debian packages, the keys.

Every command runs here, on the controller, as root; a failure becomes one SandboxError line
with the command and the last line it wrote.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ddpfleet.errors import SandboxError
from ddpfleet.hygiene import state_dir
from ddpfleet.sandbox.spec import PATH, SandboxNode, SandboxSpec

PACKAGES = (
    "openssh-server",
    "iproute2",
    "python3-venv",
    "procps",
    "util-linux",
    "rsync",
    "sudo",  # nodes use the host's /usr: a login user's sudo is the host's
)
T = TypeVar("T")


# -- running commands ------------------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    # sudo, cron and friends may leave /usr/sbin (ip, sshd) off PATH.
    return {**os.environ, "PATH": f"{PATH}:{os.environ.get('PATH', '')}", **extra}


def run(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("env", env())
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise SandboxError(
            f"{argv[0]} not found: install it (or let sandbox.up install the "
            f"Debian packages {' '.join(PACKAGES)})"
        ) from None
    if check and proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise SandboxError(f"{' '.join(argv)} failed (exit {proc.returncode}): {tail}")
    return proc


def ip(*args: str, check: bool = True, stdin: str | None = None) -> str:
    return run(["ip", *args], check=check, input=stdin).stdout


def parallel(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run jobs in threads, results in order; every failure ends up in one SandboxError line."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(jobs))) as pool:
        futures = [pool.submit(job) for job in jobs]
    errors = [str(f.exception()) for f in futures if f.exception() is not None]
    if errors:
        raise SandboxError("; ".join(errors))
    return [f.result() for f in futures]


def wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- host packages and keys ------------------------------------------------------------------------


def ensure_packages() -> None:
    """apt-get install what dpkg says is missing, without starting the host's own sshd."""
    out = run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *PACKAGES], check=False)
    installed = {ln.split()[0] for ln in out.stdout.splitlines() if ln.endswith(" installed")}
    missing = [p for p in PACKAGES if p not in installed]
    if not missing:
        return
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:  # exit 101 = "action forbidden": package scripts start no service
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    apt_env = env(DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "update", "-qq"], env=apt_env)
        run(
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "-o",
                "DPkg::Lock::Timeout=300",
                *missing,
            ],
            env=apt_env,
        )
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def _ssh_keygen(path: Path, comment: str) -> None:
    state_dir(path.parent, mode=0o700)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def ensure_client_key(key: Path) -> None:
    if not key.exists():
        _ssh_keygen(key, "ddpfleet-sandbox")
    elif not Path(f"{key}.pub").exists():
        pub = run(["ssh-keygen", "-y", "-f", str(key)]).stdout
        Path(f"{key}.pub").write_text(pub)


def host_key(spec: SandboxSpec, name: str) -> Path:
    return spec.state_dir / "hostkeys" / name / "ssh_host_ed25519_key"


def ensure_host_key(spec: SandboxSpec, node: SandboxNode) -> None:
    """Made once per node name and kept by down, so known_hosts stays valid across ups."""
    if not host_key(spec, node.name).exists():
        _ssh_keygen(host_key(spec, node.name), f"root@{node.name}")


def host_pub(spec: SandboxSpec, name: str) -> str:
    """'ssh-ed25519 AAAA...' without the comment."""
    return " ".join(Path(f"{host_key(spec, name)}.pub").read_text().split()[:2])


def write_known_hosts(spec: SandboxSpec) -> None:
    """Replace the lines for our addresses; every other line stays as it was."""
    ours = {n.address for n in spec.nodes}
    path = spec.known_hosts
    old = path.read_text().splitlines() if path.exists() else []
    kept = [ln for ln in old if not (ln.split() and set(ln.split()[0].split(",")) & ours)]
    lines = kept + [f"{n.address} {host_pub(spec, n.name)}" for n in spec.nodes]
    state_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{ln}\n" for ln in lines))
    tmp.replace(path)
