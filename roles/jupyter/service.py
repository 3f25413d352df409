"""jupyter's service steps: its files (a systemd unit, or the supervisor script where PID 1 is
not systemd), then enabled and running, and the wait for it to answer.

A change to a running service's files or command notifies RESTART, the role's handler, which
restarts it once after the role (role.restart); a fresh start clears that notice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddpfleet import jupyter
from ddpfleet.engine.roles import Step, changed, failed, ok

if TYPE_CHECKING:
    from . import Run  # role.py, this package: imported only for the annotation

RESTART = "restart jupyter"
WAIT_S = 90


def files(run: Run) -> Step:
    """The systemd unit, or (no systemd) the supervisor script and proctree it runs."""
    if run.state.systemd:
        return _unit(run)
    host, made = run.host, []
    for directory, mode, present in (
        (jupyter.STATE_DIR, "0700", run.state.state_dir),
        (jupyter.LIBEXEC, "0755", run.state.libexec),
    ):
        if not present:
            host.change(["install", "-d", "-m", mode, directory])
            made.append(directory)
    script = (host.role.directory / "files" / "jupyter-supervise").read_text()
    for path, text in (
        (jupyter.SUPERVISOR, script),
        (jupyter.PROCTREE, jupyter.PROCTREE_SOURCE.read_text()),
    ):
        written, _ = host.put(path, text, mode=0o755 if path == jupyter.SUPERVISOR else 0o644)
        if written:
            made.append(path)
            if run.state.running:
                host.notify(RESTART)
    if not made:
        return ok("service files", f"{jupyter.SUPERVISOR} (no systemd: supervised process)")
    return host.changed("service files", "write " + ", ".join(made))


def _unit(run: Run) -> Step:
    s = run.s
    unit = run.host.template(
        "ddpfleet-jupyter.service.j2",
        user=s.user,
        group=run.state.gid,
        port=s.port,
        root_dir=run.root_dir,
        lab=s.lab,
        path=jupyter.user_path(s),
    )
    written, diff = run.host.put(jupyter.UNIT_PATH, unit, mode=0o644)
    if not written:
        return ok("service files", jupyter.UNIT_PATH)
    run.host.change(["systemctl", "daemon-reload"])
    if run.state.running:
        run.host.notify(RESTART)
    return run.host.changed("service files", f"write {jupyter.UNIT_PATH}", diff=diff)


def service(run: Run) -> Step:
    """Enabled and running on 127.0.0.1:port; started (and waited for) when it is not."""
    s, state = run.s, run.state
    if state.systemd and state.unit_enabled != "enabled":
        run.host.change(["systemctl", "enable", jupyter.SERVICE])
        if state.running:
            return run.host.changed(
                "service", f"enable {jupyter.SERVICE} (running, pid {state.pid})"
            )
    if state.running and state.port_open and state.pid:
        return _running(run)
    if state.running:  # the supervisor is there, its server is not answering: start afresh
        run.host.change(jupyter.stop_command(state))
        return _start(run, "restarted (it was not answering)")
    if state.port_open:
        return failed(
            "service",
            f"127.0.0.1:{s.port} on the node is taken by another process; "
            "stop it or set jupyter.port",
        )
    return _start(run, "started")


def _running(run: Run) -> Step:
    state, note = run.state, ""
    want = jupyter.supervisor_argv(run.s, state, run.root_dir)
    if not state.systemd and list(state.supervisor_argv[-len(want) :]) != want:
        run.host.notify(RESTART)
        note = "; restart queued: its command changed"
    elif RESTART in run.host.notified:
        note = "; restart queued: its files changed"
    return ok("service", f"running (pid {state.pid}) on 127.0.0.1:{run.s.port}{note}")


def _start(run: Run, verb: str) -> Step:
    if RESTART in run.host.notified:  # a fresh start reads the new files anyway
        run.host.notified.remove(RESTART)

    def start() -> Step:
        if run.state.systemd:
            run.host.change(["systemctl", "start", jupyter.SERVICE])
        else:
            run.host.change(jupyter.start_command(run.s, run.state, run.root_dir))
        return wait(run, verb)

    return run.host.changed("service", f"start Jupyter on 127.0.0.1:{run.s.port}", start)


def wait(run: Run, verb: str, name: str = "service") -> Step:
    """Until Jupyter answers (WAIT_S), then the node's state afresh; its log tail if never."""
    host, s = run.host, run.s
    if not host.run(jupyter.wait_command(s, WAIT_S), check=False, timeout=WAIT_S + 30).ok:
        logs = (
            ["journalctl", "-u", jupyter.SERVICE, "-n", "5", "--no-pager"]
            if run.state.systemd
            else jupyter.log_tail_command()
        )
        tail = " | ".join(host.run(logs, check=False).stdout.strip().splitlines())
        return failed(
            name,
            f"Jupyter did not answer on 127.0.0.1:{s.port} within {WAIT_S}s; "
            f"its last lines: {tail or '(none)'}",
        )
    run.state = jupyter.read_state(host, s)
    return changed(name, f"{verb} (pid {run.state.pid}) on 127.0.0.1:{s.port}")
