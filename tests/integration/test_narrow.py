"""Output at 100 and 200 columns and into pipes (issue 25 item 5), on the sandbox's nodes: no
address cut in two on a terminal, a closed pipe ends a task quietly, and `gpu-status --watch`
into a pipe writes one whole table per refresh."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

import pytest

from tests.integration.conftest import INVOKE, Cluster

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def in_terminal(cluster: Cluster, columns: int, *args: str, timeout: float = 120) -> str:
    """A task's output on a terminal of `columns` columns (a pty sized before the task starts),
    escapes removed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        os.chdir(cluster.dir)
        env = {k: v for k, v in cluster.env().items() if k != "COLUMNS"}
        os.execvpe(INVOKE[0], [*INVOKE, *args], env)
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    os.waitpid(pid, 0)
    return ANSI.sub("", out.decode(errors="replace")).replace("\r", "")


@pytest.mark.parametrize("columns", [100, 200])
def test_addresses_stay_whole_on_a_terminal(cluster: Cluster, columns: int):
    out = in_terminal(cluster, columns, "ping")
    assert max(map(len, out.splitlines())) <= columns, out
    for node in ("node0", "node1"):
        assert re.search(rf"│ {node} +│ {re.escape(cluster.address(node))} +│", out), out


@pytest.mark.parametrize(
    "task", [("runs", "--json"), ("gpu-status", "--json"), ("jupyter.status", "--json"), ("ping",)]
)
def test_a_closed_pipe_ends_quietly(cluster: Cluster, task: tuple[str, ...]):
    proc = subprocess.Popen(
        [*INVOKE, *task],
        cwd=cluster.dir,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first byte: `| head -c0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == "", err


def test_watch_into_a_pipe_writes_a_table_per_refresh(cluster: Cluster):
    proc = subprocess.Popen(
        [*INVOKE, "gpu-status", "--watch", "1"],
        cwd=cluster.dir,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(6)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    frames = out.count("every 1s, last ")
    assert frames >= 2, out + err  # a Live display off a terminal printed one, at the end
    rows = [line for line in out.splitlines() if line.startswith("│ node0 ")]
    assert len(rows) == frames  # one line a row: the content's width, never folded at 80
