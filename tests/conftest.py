"""Every test runs with a HOME of its own, so none reads or writes the developer's ~/.ssh.

ddpfleet reads ~/.ssh/known_hosts and ~/.ssh/config (through Fabric) from $HOME, and takes the
path once, when ddpfleet.connection is imported: so HOME moves in pytest_configure, before any
test module is collected, not in a fixture. The invoke subprocesses of the integration tests
inherit it (Cluster.env copies os.environ). The XDG directories stay where they were, pinned
to their old places: pip's config and caches, Playwright's browsers and Chromium's profile live
there, and nothing of ssh does.

The system ssh client takes ~ from the password database, not from $HOME: tests that run it
pass `-F /dev/null -o IdentitiesOnly=yes` (see tests/integration/conftest.py, Cluster.ssh).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

XDG_DEFAULTS = {
    "XDG_CONFIG_HOME": ".config",
    "XDG_CACHE_HOME": ".cache",
    "XDG_DATA_HOME": ".local/share",
}
_saved: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a shell without job control (`cmd &` in a script)
    # inherits SIGINT ignored, and so would every invoke it starts: the Ctrl-C tests would then
    # time out on an ignored signal. Python's own handler here gives the children SIG_DFL back.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    real = Path(os.environ.get("HOME") or Path("~").expanduser())
    names = ["HOME", *XDG_DEFAULTS]
    _saved.update({name: os.environ.get(name) for name in names})
    for name, default in XDG_DEFAULTS.items():
        os.environ.setdefault(name, str(real / default))
    home = Path(tempfile.mkdtemp(prefix="ddpfleet-test-home-"))
    os.environ["HOME"] = str(home)


def pytest_unconfigure(config: pytest.Config) -> None:
    home = os.environ.get("HOME", "")
    for name, value in _saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if Path(home).name.startswith("ddpfleet-test-home-"):
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def isolated_home() -> Path:
    """The test HOME; fails the session when ddpfleet took the user's path before the move."""
    from ddpfleet.ssh import connection

    home = Path(os.environ["HOME"])
    assert home.name.startswith("ddpfleet-test-home-"), "tests/conftest.py did not move HOME"
    assert connection.USER_KNOWN_HOSTS.is_relative_to(home), (
        f"ddpfleet read ~ before the test HOME was set: {connection.USER_KNOWN_HOSTS}"
    )
    return home
