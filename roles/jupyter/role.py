"""jupyter: JupyterLab from the node's env on 127.0.0.1 only, behind an argon2 password.

One probe reads the node (user, env, service); each step then closes only its own gap:

    user        the Jupyter user (never root), created when jupyter.create_user says so
    jupyterlab  jupyter-lab in the env the venv_env / conda_env role made
    root_dir    the notebook directory, made as the user
    password    jupyter_server's own passwd() hash; the node's hash is kept while the given
                password still matches it, so a second run writes nothing
    config      ~/.jupyter/jupyter_server_config.json, 0600, written as the user
    service     files: a systemd unit where PID 1 is systemd, else the supervisor script
    service     running: started when it is not; when it is, and its config or command changed,
                the "restart jupyter" handler restarts it once at the end

The password's text reaches the node only on the hashing command's stdin, and not at all when
jupyter_server is importable on the controller. Everything inside the user's home is read and
written as the user (setpriv), so a symlink planted there can never aim a root write.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ddpfleet import jupyter
from ddpfleet.engine.roles import Host, Step, changed, failed, ok, skipped
from ddpfleet.errors import CommandError, DdpfleetError
from ddpfleet.jupyter import NodeState, Secret, Settings

from . import service  # its files, running, the wait
from .service import RESTART

ORDER = 60  # after venv_env / conda_env: jupyter-lab goes into their env
SECTION = "jupyter"

# Runs with the env's python; the password and the node's current hash arrive on stdin.
HASH_PY = """import json, sys
from jupyter_server.auth import passwd, passwd_check
given = json.load(sys.stdin)
old, secret = given["existing"], given["secret"]
keep = old.startswith("argon2:") and passwd_check(old, secret)
print(old if keep else passwd(secret, algorithm="argon2"))
"""
WRITE_SH = (
    'umask 077 && mkdir -p "$1" && cat > "$2.ddpfleet-tmp" && chmod 600 "$2.ddpfleet-tmp" && '
    'mv -f "$2.ddpfleet-tmp" "$2"'
)
MKDIR_SH = 'mkdir -p "$1" && test -w "$1"'


def applies(cfg: Mapping[str, Any], host) -> bool:
    return bool(cfg["enabled"])


def render_config(s: Settings, root_dir: str, hashed: str) -> str:
    """The server config: only current trait names, every security-relevant one set explicitly
    so a stray jupyter_server_config.py beside it (lower precedence) cannot loosen anything."""
    config = {
        "ServerApp": {
            "ip": "127.0.0.1",
            "port": s.port,
            "port_retries": 0,
            "open_browser": False,
            "allow_remote_access": False,
            "allow_root": False,
            "allow_origin": "",
            "allow_origin_pat": "",
            "disable_check_xsrf": False,
            "root_dir": root_dir,
        },
        "IdentityProvider": {"token": ""},  # the password is the only way in
        "PasswordIdentityProvider": {
            "hashed_password": hashed,
            "password_required": True,  # no hash: the server refuses to start
            "allow_password_change": False,  # the inventory's password is the password
        },
    }
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def redact(text: str) -> str:
    return re.sub(r"(argon2:|sha1:)[^\"\s]*", r"\1***", text)


@dataclass
class Run:
    """One apply's view of the node, handed from step to step. Not frozen: a step leaves what it
    learned for the ones after it (the state after useradd, the config file, the hash)."""

    host: Host
    cfg: Mapping[str, Any]
    s: Settings
    state: NodeState = field(init=False)
    current: str | None = None  # the config file's text, when the user can read it
    mode_owner: str = ""
    hashed: str = ""

    def __post_init__(self) -> None:
        self.state = jupyter.read_state(self.host, self.s)

    @property
    def home(self) -> str:
        return self.state.home or f"/home/{self.s.user}"

    @property
    def root_dir(self) -> str:
        return self.s.root_dir or self.home

    @property
    def config_path(self) -> str:
        return f"{self.home}/.jupyter/{jupyter.CONFIG_NAME}"

    def as_user(self, argv: list[str]) -> list[str]:
        return jupyter.as_user(self.s, self.state, self.home, argv)


def resolve(host, cfg: Mapping[str, Any]) -> Settings:
    env_dir = cfg["env_dir"]
    if not env_dir:
        from ddpfleet import envs

        env_dir = envs.env_dir(host.inventory, host.node)
    if cfg["user"]:
        return jupyter.settings(cfg, env_dir)
    return jupyter.settings(cfg, env_dir, jupyter.default_user(host.inventory, host.node))


def apply(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    try:
        run = Run(host, cfg, resolve(host, cfg))
    except DdpfleetError as e:
        yield failed("settings", str(e))
        return
    steps = (_user, _jupyterlab, _root_dir, _password, _config, service.files, service.service)
    for step_fn in steps:
        step = step_fn(run)
        yield step
        if step.status in ("failed", "skipped"):  # skipped: --check cannot see further
            return


# -- steps -----------------------------------------------------------------------------------


def _user(run: Run) -> Step:
    s, state = run.s, run.state
    if state.uid == "0":
        return failed("user", f"{s.user} has uid 0: Jupyter never runs as root; set jupyter.user")
    if state.uid:
        return ok("user", f"{s.user} (uid {state.uid}, home {state.home})")
    if not s.create_user:
        return failed(
            "user", f"no user {s.user} on the node: create it, or set jupyter.create_user: true"
        )

    def create() -> None:
        run.host.change(
            [
                "useradd",
                "--create-home",
                "--shell",
                "/bin/bash",
                "--comment",
                "Jupyter (ddpfleet)",
                s.user,
            ]
        )
        run.state = jupyter.read_state(run.host, s)

    return run.host.changed(
        "user", f"create {s.user} (no password: notebooks are its only way in)", create
    )


def _jupyterlab(run: Run) -> Step:
    if run.state.lab:
        return ok("jupyterlab", run.s.lab)
    if run.host.check:  # the env role only said it would install it
        return skipped("jupyterlab", f"no {run.s.lab} yet; the env role would install it")
    return failed(
        "jupyterlab",
        f"no {run.s.lab}: JupyterLab is not in the node's env; add "
        "jupyterlab to python_env.packages (or the conda env) and bootstrap again",
    )


def _root_dir(run: Run) -> Step:
    root, action = run.root_dir, f"create {run.root_dir} as {run.s.user}"
    if not run.state.uid:  # --check, the user is still to be made
        return run.host.changed("root_dir", action)
    if run.host.run(run.as_user(["test", "-d", root, "-a", "-w", root]), check=False).ok:
        return ok("root_dir", root)

    def make() -> Step | None:
        result = run.host.change(run.as_user(["sh", "-c", MKDIR_SH, "sh", root]), check=False)
        if result.ok:
            return None
        return failed(
            "root_dir",
            f"{run.s.user} cannot make or write {root} "
            f"({result.stderr.strip() or 'not writable'}): create it owned by "
            f"{run.s.user}, or set jupyter.root_dir",
        )

    return run.host.changed("root_dir", action, make)


def _password(run: Run) -> Step:
    _read_config(run)
    existing = jupyter.hashed_password(run.current)
    try:
        secret = jupyter.find_secret(run.s, run.host.inventory.root, ask=not existing)
    except DdpfleetError as e:
        return failed("password", str(e))
    if secret is None:
        if existing.startswith("argon2:"):
            run.hashed = existing
            return ok(
                "password",
                "kept the node's argon2 hash (no password given; set "
                f"${run.s.password_env} to change it)",
            )
        return failed("password", jupyter.no_secret_message(run.s))
    try:
        run.hashed = hash_password(run.host, run.s, secret, existing)
    except CommandError as e:
        return failed("password", f"hashing with the env's jupyter_server failed: {e.message}")
    if run.hashed == existing:
        return ok("password", "the node's argon2 hash matches the given password")
    return changed("password", "new argon2 hash (jupyter_server passwd)")


def _read_config(run: Run) -> None:
    if run.state.uid:  # else --check, and the user is still to be made
        run.mode_owner, run.current = jupyter.read_config(run.host, run.s, run.state)


def hash_password(host, s: Settings, secret: Secret, existing: str) -> str:
    """jupyter_server's passwd(), here when it is importable, else on the node fed by stdin."""
    try:
        from jupyter_server.auth import passwd, passwd_check
    except ImportError:  # not on the controller: hash on the node
        given = json.dumps({"existing": existing, "secret": secret.reveal()})
        result = host.run([s.python, "-I", "-c", HASH_PY], stdin=given, timeout=60)
        hashed = result.stdout.strip()
        if not hashed.startswith("argon2:"):
            raise CommandError(
                host.name, f"{s.python} -c HASH_PY", 0, "no argon2 hash printed"
            ) from None
        return hashed
    if existing.startswith("argon2:") and passwd_check(existing, secret.reveal()):
        return existing
    return passwd(secret.reveal(), algorithm="argon2")


def _config(run: Run) -> Step:
    content = render_config(run.s, run.root_dir, run.hashed)
    want = f"600 {run.s.user}"
    if run.current == content and run.mode_owner == want:
        return ok("config", f"{run.config_path} ({want})")
    diff = _diff(run.config_path, run.current, content) if run.host.diff else ""
    directory = run.config_path.rsplit("/", 1)[0]

    def write() -> None:
        argv = run.as_user(["sh", "-c", WRITE_SH, "sh", directory, run.config_path])
        run.host.change(argv, stdin=content)

    if run.state.running:
        run.host.notify(RESTART)
    action = f"write {run.config_path} (0600, {run.s.user})"
    return run.host.changed("config", action, write, diff)


def _diff(path: str, old: str | None, new: str) -> str:
    lines = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        new.splitlines(keepends=True),
        f"{path} (node)",
        f"{path} (new)",
    )
    return redact("".join(lines))


# -- handler ---------------------------------------------------------------------------------


def restart(host, cfg: Mapping[str, Any]) -> Iterator[Step]:
    """Once per run, after the role: the config or the service's definition changed."""
    run = Run(host, cfg, resolve(host, cfg))

    def restart_now() -> Step:
        if run.state.systemd:
            host.change(["systemctl", "restart", jupyter.SERVICE])
        else:
            host.change(jupyter.stop_command(run.state))
            host.change(jupyter.start_command(run.s, run.state, run.root_dir))
        return service.wait(run, "restarted: config changed", name="restart")

    yield host.changed("restart", "restart Jupyter", restart_now)


HANDLERS = {RESTART: restart}
