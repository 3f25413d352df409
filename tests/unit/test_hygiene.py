"""Node text shown as text, credentials masked, private files: ddpfleet.hygiene and its users."""

from __future__ import annotations

import io
import stat

import pytest
from invoke import Exit
from rich.console import Console

from ddpfleet import hygiene, report
from ddpfleet.errors import CommandError, DdpfleetError, NodeError
from ddpfleet.launch import Output, _shown_env

MARKUP = "Debian [/] [link=https://x]12[/link]"
ESC = "\x1b"


def printed(renderable) -> str:
    console = Console(
        width=200, record=True, file=io.StringIO(), force_terminal=True, color_system="truecolor"
    )
    console.print(renderable)
    return console.export_text(styles=False)


def raw(renderable) -> str:
    out = io.StringIO()
    Console(width=200, file=out, force_terminal=True, color_system="truecolor").print(renderable)
    return out.getvalue()


def test_table_cells_print_markup_literally():
    t = report.table("[bold]title[/]", ("node", "os"), [("node0", MARKUP), ("node1", None)])
    text = printed(t)
    assert MARKUP in text and "[bold]title[/]" in text
    assert "\x1b]8;" not in raw(t)  # no OSC 8 hyperlink reached the terminal


def test_table_cells_lose_terminal_escapes():
    t = report.table(None, ("node", "os"), [("node0", f"ok{ESC}]52;c;aGk={ESC}\\ {ESC}[2Jdone")])
    out = raw(t)
    assert "52;c" not in out and "[2J" not in out and "ok done" in printed(t)


def test_show_and_warn_print_strings_literally(capsys):
    report.show(f"node0: {MARKUP}")
    report.warn(f"node0: {MARKUP} {ESC}[31m")
    got = capsys.readouterr()
    assert MARKUP in got.out and MARKUP in got.err and ESC not in got.err


def test_exit_line_has_no_control_characters():
    with pytest.raises(Exception) as e:
        report.exit_if_failed(
            {"node0": NodeError("node0", f"said {ESC}]0;pwned{ESC}\\ bye")}, "ping"
        )
    assert ESC not in str(e.value) and "said  bye" in str(e.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{ESC}[1;31mred{ESC}[0m", "red"),
        (f"a{ESC}]8;;https://x{ESC}\\link{ESC}]8;;{ESC}\\b", "alinkb"),
        (f"clip{ESC}]52;c;aGk=\x07board", "clipboard"),
        ("\x9b2Jc1 csi\x9c", "c1 csi"),
        ("tab\tstays\x00\x07\x08\x7f", "tab\tstays"),
        (f"unterminated {ESC}]0;title", "unterminated "),
        ("\rprogress 50%\rprogress 100%", "progress 50%progress 100%"),
        (MARKUP, MARKUP),
    ],
)
def test_clean_strips_escape_sequences_and_controls_but_tab(text, expected):
    assert hygiene.clean(text) == expected


def test_clean_can_keep_newlines():
    assert hygiene.clean(f"a\n{ESC}[Kb", keep_newlines=True) == "a\nb"
    assert hygiene.clean("a\nb") == "ab"


def test_training_lines_are_cleaned_on_the_terminal_and_in_the_log(tmp_path):
    stream, log = io.StringIO(), open(tmp_path / "node0.log", "w")  # noqa: SIM115
    Output(stream).line(f"[node0 r0] step 1 {ESC}]52;c;aGk=\x07{ESC}[1A[bold]ok[/]", log)
    log.close()
    assert stream.getvalue() == "[node0 r0] step 1 [bold]ok[/]\n"
    assert (tmp_path / "node0.log").read_text() == stream.getvalue()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:token@host/simple", "https://user:***@host/simple"),
        ("http://u:SECRET@127.0.0.1:9/simple", "http://u:***@127.0.0.1:9/simple"),
        ("https://token@pypi.example/simple/", "https://***@pypi.example/simple/"),
        ("https://host/simple?token=abc", "https://host/simple?***"),
        ("https://download.pytorch.org/whl/cpu", "https://download.pytorch.org/whl/cpu"),
        ("", ""),
    ],
)
def test_mask_url(url, shown):
    assert hygiene.mask_url(url) == shown


def test_mask_urls_in_free_text():
    text = "Could not fetch http://u:SECRET@127.0.0.1:9/simple/torch/ (https://h/x ok)"
    assert hygiene.mask_urls(text) == (
        "Could not fetch http://u:***@127.0.0.1:9/simple/torch/ (https://h/x ok)"
    )


def test_private_dir_and_files_are_owner_only(tmp_path):
    d = tmp_path / "logs"
    d.mkdir(mode=0o755)
    d.chmod(0o755)  # as an older ddpfleet left it
    hygiene.private_dir(d)
    with hygiene.open_private(d / "a.log") as f:
        f.write("x\n")
    hygiene.write_private(d / "b.yml", "y\n")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o600}
    old = d / "c.log"
    old.write_text("old\n")
    old.chmod(0o644)
    with hygiene.open_private(old) as f:
        f.write("more\n")
    assert stat.S_IMODE(old.stat().st_mode) == 0o600 and old.read_text() == "old\nmore\n"


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("DATABASE_URL", "postgres://u:pw@db/x", "DATABASE_URL=***"),
        ("WANDB_API_KEY", "s3cret", "WANDB_API_KEY=***"),
        ("MY_SETTING", "hunter2", "MY_SETTING=***"),
        ("NCCL_DEBUG", "INFO", "NCCL_DEBUG=INFO"),
        ("CUDA_VISIBLE_DEVICES", "0,1", "CUDA_VISIBLE_DEVICES=0,1"),
        ("USE_AMP", "1", "USE_AMP=1"),
        ("NCCL_AUTH_TOKEN", "abc", "NCCL_AUTH_TOKEN=***"),
    ],
)
def test_plan_shows_user_env_values_only_for_harmless_names(name, value, shown):
    assert _shown_env(name, value, {name}) == shown


def test_plan_shows_ddpfleets_own_env():
    assert _shown_env("GLOO_SOCKET_IFNAME", "eth1", set()) == "GLOO_SOCKET_IFNAME=eth1"


def test_command_error_quotes_stderr_without_escapes():
    e = CommandError("node0", "pip install x", 1, f"fine\n{ESC}[2J{ESC}]52;c;aGk=\x07cleared")
    assert ESC not in str(e) and str(e).endswith(": fine | cleared")


def test_task_errors_end_as_one_clean_line():
    from ddpfleet.cli import common as tasks

    @tasks.cli
    def fails(c):
        raise DdpfleetError(f"node0: said {ESC}]0;pwned\x07[bold]x[/]")

    with pytest.raises(Exit) as e:
        fails(None)
    assert e.value.message == "error: node0: said [bold]x[/]" and e.value.code == 1
