"""ddpfleet.ssh.become: what sudo says in, how root work is sent and which one line comes out."""

from __future__ import annotations

import shlex

import pytest

from ddpfleet.errors import BecomeError
from ddpfleet.shell import Secret
from ddpfleet.ssh import become


def runner(*answers: tuple[int, str, str]):
    """A login user's shell answering commands in order; records (command, stdin)."""
    calls, todo = [], list(answers)

    def run(command, stdin):
        calls.append((command, stdin))
        return todo.pop(0)

    return run, calls


def establish(*answers, mode="auto", password=None):
    run, calls = runner(*answers)
    return become.establish(run, "ubuntu", mode, lambda: password), calls


def test_root_needs_no_sudo():
    esc, _ = establish((0, "0\n", ""))
    assert esc.how == "root" and esc.wrap("id -u") == "id -u"


def test_passwordless_sudo_wraps_one_quoted_script_with_a_fixed_path_and_umask():
    esc, _ = establish((0, "1000\nddpfleet-sudo-ok\nddpfleet-pw-L\n", ""))
    argv = shlex.split(esc.wrap("cat >/etc/x; echo done"))
    assert argv[:6] == ["sudo", "-n", "-H", "--", "/bin/sh", "-c"]
    assert argv[6] == become.PREAMBLE + "cat >/etc/x; echo done"
    assert "umask 022" in argv[6] and "PATH=/usr/local/sbin:" in argv[6]
    assert esc.stdin(b"data") == b"data"


def test_a_password_goes_first_on_stdin_never_on_the_command_line():
    secret = Secret("s3cret pw")
    esc, calls = establish(
        (0, "1000\nsudo: a password is required\nddpfleet-pw-P\n", ""),
        (0, "", ""),
        password=secret,
    )
    assert esc.how == "sudo-password"
    command, stdin = calls[1]  # the password is tried once, right after the probe
    assert "s3cret" not in command and stdin == b"s3cret pw\n"
    assert shlex.split(esc.wrap("true"))[:5] == ["sudo", "-k", "-S", "-p", ""]
    assert esc.stdin("rest") == b"s3cret pw\nrest"
    assert "s3cret" not in repr(esc) and "s3cret" not in esc.wrap("true")


@pytest.mark.parametrize(
    "probe, second, words",
    [
        ("1000\nsudo: a password is required\nddpfleet-pw-P\n", None, "none was given"),
        (
            "1000\nsudo: a password is required\nddpfleet-pw-P\n",
            (1, "", "Sorry, try again.\n"),
            "wrong password",
        ),
        ("1000\nsudo: a password is required\nddpfleet-pw-L\n", None, "not a NOPASSWD sudoer"),
        ("1000\nubuntu is not in the sudoers file.\n", None, "not in sudoers"),
        ("1000\nsudo: sorry, you must have a tty to run sudo\n", None, "requiretty"),
        ("1000\nddpfleet-nosudo\n", None, "no sudo"),
    ],
)
def test_each_refusal_is_one_line_with_the_fix_and_nothing_changed(probe, second, words):
    answers = [(0, probe, "")] + ([second] if second else [])
    password = Secret("x") if second else None
    with pytest.raises(BecomeError) as e:
        establish(*answers, password=password)
    text = e.value.message
    assert words in text and text.endswith("nothing was changed") and "\n" not in text


def test_the_three_ways_to_give_a_password_are_named():
    with pytest.raises(BecomeError) as e:
        establish((0, "1000\nsudo: a password is required\nddpfleet-pw-P\n", ""))
    assert all(w in e.value.message for w in ("--ask-become-pass", become.PASSWORD_ENV, "file"))


def test_become_none_runs_root_work_as_the_login_user_and_bootstrap_refuses_it():
    esc, _ = establish((0, "1000\n", ""), mode="none")
    assert esc.how == "none" and esc.wrap("id") == "id"
    with pytest.raises(BecomeError, match="bootstrap needs root"):
        become.require_root(esc, "node0", "bootstrap")


def test_as_user_drops_with_setpriv_from_root():
    esc = become.Escalation("sudo", "ubuntu")
    inner = shlex.split(shlex.split(esc.as_user("train", "python x.py"))[6].split("exec ", 1)[1])
    assert inner[:5] == [
        "setpriv",
        "--reuid=train",
        "--regid=train",
        "--init-groups",
        "--reset-env",
    ]
    assert esc.as_user("ubuntu", "python x.py") == "python x.py"  # already that user


def test_password_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv(become.PASSWORD_ENV, raising=False)
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    f.chmod(0o600)
    assert become.password_for("n", None, f).reveal() == "from-file"
    monkeypatch.setenv(become.PASSWORD_ENV, "from-env")
    assert become.password_for("n", None, f).reveal() == "from-env"
    assert become.password_for("n", Secret("asked"), f).reveal() == "asked"
    monkeypatch.delenv(become.PASSWORD_ENV)
    f.chmod(0o644)
    with pytest.raises(BecomeError, match="chmod 600"):
        become.password_for("n", None, f)
