"""shell: the sh idiom, stderr tails, digests and Secret."""

from __future__ import annotations

import subprocess

from ddpfleet.shell import Secret, sh, sha256, tail


def test_sh_passes_values_as_parameters_never_as_shell() -> None:
    hostile = "$(touch /tmp/x); `id`; 'quote"
    line = sh('printf "%s|%s" "$1" "$2"', hostile, "two words")
    done = subprocess.run(line, shell=True, capture_output=True, text=True, check=True)
    assert done.stdout == f"{hostile}|two words"


def test_tail_keeps_the_last_lines_on_one_line() -> None:
    text = "Traceback (most recent call last):\n  File x\nImportError: libfoo.so\n\n"
    assert tail(text) == "Traceback (most recent call last): |   File x | ImportError: libfoo.so"
    assert tail(text, 1) == "ImportError: libfoo.so"
    assert tail("a\nb", 2, "; ") == "a; b"
    assert tail("") == "" and tail("   \n") == ""


def test_sha256_matches_sha256sum() -> None:
    done = subprocess.run(["sha256sum"], input="line\n", capture_output=True, text=True, check=True)
    assert sha256("line\n") == sha256(b"line\n") == done.stdout.split()[0]


def test_secret_never_prints() -> None:
    s = Secret("hunter2")
    shown = [str(s), repr(s), f"{s}", f"{s!r}", f"{s:>10}", str([s])]
    assert not any("hunter2" in text for text in shown)
    assert s.reveal() == "hunter2"
