"""slurm: munge + slurmctld (on cluster.master) + slurmd (every node), from the distro packages.

Opt-in: `slurm: {enabled: true}` in the inventory, or `invoke bootstrap --roles slurm`.
Before any node changes, survey.survey probes every node (CPUs, memory, GPUs) and renders the
three files, the same bytes for all. Per node, in order:

  survey      the settings and every node's answer are good, else fail and change nothing
  users       munge and slurm with the fixed uids (slurm.munge_uid, slurm.slurm_uid)
  packages    munge slurmd slurm-client (+ slurmctld on the master); apt waits for dpkg's lock
  dirs        spool, state and log dirs the daemons refuse to start without
  munge key   the controller's key (.ddpfleet/slurm/munge.key), 0400 munge; never shown
  files       slurm.conf, gres.conf, cgroup.conf
  service     the supervisor script (no systemd) or the distro's units
  munge, slurmctld (master), slurmd: running, else started and waited for (polled)
  nodes       (master) every node registered with slurmctld and not down
A running daemon that has not read the current files or key (its stamp in the state dir says
what it last read) is dealt with in its own step, before the nodes check: a new key restarts
munged; slurm.conf lines about nodes or ports restart slurmctld and slurmd (22.05 adds nodes
only on restart); any other change is a re-read (slurmctld: scontrol reconfigure; slurmd:
SIGHUP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from ddpfleet.engine.roles import Step, changed, failed, ok, skipped
from ddpfleet.shell import tail

from . import daemons
from .conf import stamp
from .survey import Survey, survey  # noqa: F401  (survey: the engine's hook)

ORDER = 70
SECTION = "slurm"
OPT_IN = True  # off unless the inventory enables it or --roles names it
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-o", "DPkg::Lock::Timeout=300"]


def applies(cfg: Mapping[str, Any], host) -> bool:
    return bool(cfg["enabled"])


@dataclasses.dataclass
class Run:
    host: Any
    cfg: Mapping[str, Any]
    survey: Survey
    state: daemons.NodeState = None  # type: ignore[assignment]

    @property
    def master(self) -> bool:
        return self.host.name == self.survey.master

    @property
    def daemons(self) -> tuple[str, ...]:
        return ("munge", "slurmctld", "slurmd") if self.master else ("munge", "slurmd")

    @property
    def users(self) -> dict[str, int]:
        s = self.survey.settings
        return {"munge": s.munge_uid, "slurm": s.slurm_uid}

    @property
    def packages(self) -> tuple[str, ...]:
        return daemons.packages(_debian(self.host.facts), self.master)

    def stamp(self, daemon: str) -> str:
        """What the daemon must have read: the key's digest (munge), else the files' digest and
        the digest of their node and port lines (a change there needs a restart)."""
        if daemon == "munge":
            return self.survey.key.digest if self.survey.key else ""
        return stamp(self.survey.files)

    def probe(self) -> None:
        self.state = daemons.probe(self.host, self.packages, self.users)


def _debian(facts: Mapping[str, str]) -> bool:
    return "debian" in (facts.get("os_id", ""), *facts.get("os_like", "").split())


def apply(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    found = host.surveys.get("slurm")
    if found is None:
        yield failed("survey", "no survey of the nodes: run the role through invoke bootstrap")
        return
    if found.problem:
        yield failed("survey", found.problem)
        return
    run = Run(host, cfg, found)
    run.probe()
    steps = [_users, _packages, _dirs, _key, _files, _service]
    steps += [lambda r, d=d: _daemon(r, d) for d in run.daemons]
    if run.master:
        steps.append(_nodes)
    for fn in steps:
        step = fn(run)
        yield step
        if step.status == "failed":
            return


def _users(run: Run) -> Step:
    host, made = run.host, []
    for user, uid in run.users.items():
        have, group = run.state.uid(user), run.state.gid(user)
        if have and have != str(uid):
            return failed(
                "users",
                f"user {user} has uid {have}, slurm.{user}_uid says {uid}: munge and Slurm need "
                f"one uid on every node; set slurm.{user}_uid: {have} if every node has it, or "
                f"renumber {user} here (usermod -u {uid} {user}; chown its files)",
            )
        if not group:
            host.change(["groupadd", "--system", "--gid", str(uid), user])
            made.append(f"group {user} ({uid})")
        if not have:
            host.change(
                ["useradd", "--system", "--uid", str(uid), "--gid", user, "--home-dir"]
                + ["/nonexistent", "--no-create-home", "--shell", "/usr/sbin/nologin", user]
            )
            made.append(f"user {user} ({uid})")
    if not made:
        return ok("users", ", ".join(f"{u} ({i})" for u, i in run.users.items()))
    return host.changed("users", "make " + ", ".join(made))


def _packages(run: Run) -> Step:
    host, missing = run.host, run.state.missing
    if not missing:
        return ok("packages", " ".join(run.packages))
    debian = _debian(host.facts)
    if not debian and not host.run(["sh", "-c", "command -v dnf"], check=False).ok:
        return failed(
            "packages", f"no apt-get or dnf here: install {' '.join(missing)}, then run again"
        )

    def install() -> None:
        if debian:  # the units wait for slurm.conf (ConditionPathExists) before they start
            argv = [*APT, "install", "-y", "-q", *missing]
            if not host.change(argv, check=False, timeout=900).ok:  # stale package lists
                host.change([*APT, "update", "-q"], timeout=900)
                host.change(argv, timeout=900)
        else:
            host.change(["dnf", "install", "-y", *missing], timeout=900)
        run.probe()

    return host.changed("packages", f"install {' '.join(missing)}", install)


def _dirs(run: Run) -> Step:
    absent = set(run.state.absent_dirs)
    todo = [d for d in daemons.DIRS if d[0] in absent]
    if not todo:
        return ok("dirs", "spool, state and log dirs present")

    def make() -> None:
        for path, owner, mode in todo:
            run.host.change(["install", "-d", "-o", owner, "-g", owner, "-m", mode, path])

    return run.host.changed("dirs", "make " + ", ".join(d for d, _, _ in todo), make)


def _key(run: Run) -> Step:
    host, key = run.host, run.survey.key
    owner, mode, digest = run.state.key
    if key is not None and key.exists and (owner, mode, digest) == ("munge", "400", key.digest):
        return ok("munge key", f"{daemons.KEY} is the cluster's (0400 munge)")

    def install() -> None:
        # No diff: the key's bytes must never reach a log.
        quiet = dataclasses.replace(host, diff=False)
        quiet.put(daemons.KEY, key.reveal(), mode=0o400, owner="munge")

    return host.changed("munge key", f"install the cluster's munge key at {daemons.KEY}", install)


def _files(run: Run) -> Step:
    host, changed_paths, diffs = run.host, [], []
    for path, text in run.survey.files.items():
        written, diff = host.put(path, text, mode=0o644)
        if written:
            changed_paths.append(path)
            diffs.append(diff)
    if not changed_paths:
        return ok("files", "slurm.conf, gres.conf, cgroup.conf")
    return host.changed("files", "write " + ", ".join(changed_paths), diff="".join(diffs))


def _service(run: Run) -> Step:
    if run.state.systemd:
        return ok("service", "systemd units of the packages")
    script = (run.host.role.directory / "files" / "slurm-supervise").read_text()
    written, _ = run.host.put(daemons.SUPERVISOR, script, mode=0o755)
    if not written:
        return ok("service", f"{daemons.SUPERVISOR} (no systemd: supervised daemons)")
    return run.host.changed("service", f"write {daemons.SUPERVISOR}")


def _daemon(run: Run, daemon: str) -> Step:
    """Running with what it should have read (its stamp: the files' or the key's digest when
    it last started or re-read them), else started, restarted or told to re-read. The stamp
    survives a run that failed halfway: the next run still sees the daemon is behind."""
    host, state = run.host, run.state
    want = run.stamp(daemon)
    if not state.running(daemon):

        def start() -> Step:
            host.change(daemons.stop(daemon, state.systemd))  # a supervisor whose daemon died
            host.change(daemons.start(daemon, host.name, state.systemd))
            return _wait(run, daemon, "started", want)

        return host.changed(daemon, f"start {daemon}", start)
    if state.systemd and state.facts.get(f"enabled_{daemon}") != "enabled":
        host.change(["systemctl", "enable", daemon])
    have = state.stamp(daemon)
    command_ok = state.systemd or state.command(daemon) == daemons.supervised(daemon, host.name)
    if have == want and command_ok:
        return ok(daemon, f"running (pid {state.pid(daemon) or 'systemd'})")
    if command_ok and daemon != "munge" and have.split()[1:] == want.split()[1:]:

        def reread() -> Step:
            host.change(daemons.reload(daemon, state))
            host.change(daemons.write_stamp(daemon, want))
            return changed(daemon, f"told to re-read its files (pid {state.pid(daemon)})")

        return host.changed(daemon, f"reconfigure {daemon}", reread)
    why = (
        "its command changed"
        if not command_ok
        else "new key"
        if daemon == "munge"
        else ("nodes or ports changed" if have else "files of unknown age")
    )

    def again() -> Step:
        host.change(daemons.stop(daemon, state.systemd))
        host.change(daemons.start(daemon, host.name, state.systemd))
        return _wait(run, daemon, f"restarted: {why}", want)

    return host.changed(daemon, f"restart {daemon} ({why})", again)


def _wait(run: Run, daemon: str, verb: str, stamp: str) -> Step:
    s, host = run.survey.settings, run.host
    port = s.slurmd_port if daemon == "slurmd" else s.slurmctld_port
    if not host.run(daemons.wait(daemon, s.wait_s, port), check=False, timeout=s.wait_s + 30).ok:
        logs = host.run(daemons.log_tail(daemon, run.state.systemd), check=False).stdout
        return failed(
            daemon,
            f"{daemon} did not answer within {s.wait_s}s; its last lines: {tail(logs) or '(none)'}",
        )
    host.change(daemons.write_stamp(daemon, stamp))
    run.probe()
    return changed(daemon, f"{verb} (pid {run.state.pid(daemon) or 'systemd'})")


# %N name, %T state, %E reason: 'node1 down* Not responding'
SINFO = ["sinfo", "-h", "-N", "-o", "%N|%T|%E"]
NODES_SH = r"""
end=$(( $(date +%s) + $1 )); shift
while :; do
  out=$(sinfo -h -N -o '%N|%T|%E' 2>&1)
  bad=$(printf '%s\n' "$out" | awk -F'|' '$2 ~ /down|unknown|drain|fail|not_responding|\*/')
  [ -n "$out" ] && [ -z "$bad" ] && [ "$(printf '%s\n' "$out" | wc -l)" -ge "$#" ] && exit 0
  [ "$(date +%s)" -ge "$end" ] && { printf '%s\n' "${bad:-$out}"; exit 1; }
  sleep 0.5
done
"""


def _nodes(run: Run) -> Step:
    s, host = run.survey.settings, run.host
    names = [n.name for n in run.survey.nodes]
    seconds = 0 if host.check else s.wait_s  # --check started nothing: look once
    got = host.run(
        ["sh", "-c", NODES_SH, "sh", str(seconds), *names], check=False, timeout=seconds + 30
    )
    if not got.ok and host.check:
        return skipped("nodes", "not every node is up yet; a real run starts them")
    if not got.ok:
        return failed(
            "nodes",
            f"not every node is up in Slurm after {s.wait_s}s: {tail(got.stdout, 4, '; ')}; "
            "see invoke slurm.status and the node's /var/log/slurm/slurmd.log",
        )
    return ok("nodes", f"{len(names)} node(s) up in partition {s.partition}")
