"""venv_env's wheelhouse step: the controller's cached wheels to the node, only those it lacks or
holds other bytes of (ddpfleet.wheelhouse.push compares SHA-256 in one command on the node)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddpfleet.engine import wheelhouse
from ddpfleet.engine.roles import Step, changed, ok
from ddpfleet.engine.wheelhouse import Target

if TYPE_CHECKING:
    from .role import Env


def step(env: Env) -> Step | None:
    """Fetch the spec's wheels into the controller's cache and send the node what it lacks."""
    if not env.cfg["wheelhouse"]:
        return None
    target = Target.from_probe(env.state, env.host.node.name)
    remote = env.cfg["wheelhouse_dir"]
    return env.host.changed(
        "wheelhouse",
        f"fetch wheels for {target.tag} and send the node the ones {remote} lacks",
        lambda: _send(env, target, remote),
    )


def _send(env: Env, target: Target, remote: str) -> Step:
    cache = env.host.inventory.root / ".ddpfleet" / "wheelhouse"
    files = wheelhouse.fetch(cache, env.spec, target, env.progress)
    if env.host.sudo:
        # SFTP writes as the login user: the wheelhouse is theirs (it can become root anyway;
        # the wheels are root's pip's input, never a config)
        env.host.change(["install", "-d", "-o", env.host.node.user, "-m", "0755", remote])
    else:
        env.host.change(["mkdir", "-p", remote])

    def run(argv: list[str], stdin: str) -> str:
        return env.host.change(argv, stdin=stdin).stdout

    pushed = wheelhouse.push(
        env.host.conn.sftp(), remote, files, run, env.progress, node=env.host.conn.name
    )
    cleared = f"; removed {pushed.removed} interrupted upload(s)" if pushed.removed else ""
    if not pushed.files and not cleared:
        return ok("wheelhouse", f"{len(files)} wheels for {target.tag} already in {remote}")
    return changed(
        "wheelhouse",
        f"sent {pushed.files} of {len(files)} wheels for {target.tag} "
        f"({pushed.bytes / 2**20:.0f} MiB) to {remote}{cleared}",
    )
