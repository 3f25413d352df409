"""ddpfleet/node/run_lifeline.py: a detached gang's lifelines prove the run's secret before any line
counts (review 2026-12-06 #3). Real sockets on 127.0.0.1, the master and workers in-process, the
supervisor's stop/failed callbacks recorded; the strangers are plain sockets."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "ddpfleet" / "node" / "run_lifeline.py"
SECRET = secrets.token_hex(32)


def load():
    spec = importlib.util.spec_from_file_location("run_lifeline", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


L = load()


class Side:
    """One supervisor's lifeline, with what it asked of its supervisor."""

    def __init__(self, node, rank, port=None, workers=(), secret=SECRET):
        self.stops, self.failures = [], []
        spec = {"node": node, "rank": rank, "master_host": "127.0.0.1", "lifeline_port": port,
                "lifeline_secret": secret, "workers": list(workers)}  # fmt: skip
        self.line = L.Lifeline(spec, self.stops.append, lambda n, c: self.failures.append((n, c)))
        self.port = self.line.open()
        self.line.run()

    def close(self):
        for s in (self.line.server, getattr(self.line.master, "sock", None)):
            if s is not None:
                s.close()


@pytest.fixture
def sides():
    made = []

    def make(*args, **kw):
        made.append(Side(*args, **kw))
        return made[-1]

    yield make
    for side in made:
        side.close()


def stranger(port, host="127.0.0.1"):
    sock = socket.create_connection((host, port), timeout=5)
    return sock


def first_line(sock, within=1.0):
    """The first line the master sends (its challenge), or None."""
    sock.settimeout(within)
    buf = b""
    try:
        while b"\n" not in buf:
            data = sock.recv(4096)
            if not data:
                return None
            buf += data
    except OSError:
        return None
    return buf.split(b"\n", 1)[0].decode()


def closed_within(sock, seconds):
    """Seconds until the other end closed `sock` (reading whatever it sends), or fail."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        sock.settimeout(max(0.01, seconds - (time.monotonic() - start)))
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            break
    pytest.fail(f"the connection was still open after {seconds}s")


def until(check, within=3.0):
    deadline = time.monotonic() + within
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def hello(challenge, node="node1", secret=SECRET, nonce="ab" * 16):
    """A worker's hello as the protocol says (its HMAC made here, not by the module)."""
    _, _, theirs = (challenge or "challenge -").partition(" ")
    message = "\n".join(("worker", theirs, nonce, node)).encode()
    said = hmac.new(bytes.fromhex(secret), message, hashlib.sha256).hexdigest()
    return f"hello {node} {nonce} {said}\n".encode()


@pytest.mark.parametrize("line", ["fail node1 1", "hello node1", "stop x", "done node1"])
def test_a_line_without_the_secret_changes_nothing_and_is_closed(sides, line):
    master = sides("node0", 0, workers=["node1"])
    sock = stranger(master.port)
    sock.sendall(line.encode() + b"\n")
    time.sleep(1.0)
    assert master.stops == [] and master.failures == [], (master.stops, master.failures)
    assert master.line.peers == {}
    assert closed_within(sock, 3.0) < 3.0  # the hello deadline is 2 s
    assert master.stops == [] and master.failures == []


def test_a_wrong_proof_is_refused_and_the_name_stays_free(sides):
    master = sides("node0", 0, workers=["node1"])
    sock = stranger(master.port)
    sock.sendall(hello(first_line(sock), secret=secrets.token_hex(32)))
    closed_within(sock, 3.0)
    assert master.line.peers == {} and master.stops == []
    worker = sides("node1", 1, port=master.port)  # the real node1 still joins
    assert until(lambda: "node1" in master.line.peers)
    master.line.stop_all("checked")
    assert until(lambda: worker.stops == ["gang: checked"])


def test_a_second_hello_for_a_joined_node_is_refused(sides):
    master = sides("node0", 0, workers=["node1"])
    worker = sides("node1", 1, port=master.port)
    assert until(lambda: "node1" in master.line.peers)
    real = master.line.peers["node1"]
    # a fresh, correct proof (stronger than a replay) for a name that already joined
    sock = stranger(master.port)
    sock.sendall(hello(first_line(sock)))
    closed_within(sock, 3.0)
    # a replayed proof: made for another challenge
    again = stranger(master.port)
    first_line(again)
    again.sendall(hello("challenge " + "00" * 16))
    closed_within(again, 3.0)
    assert master.line.peers["node1"] is real
    master.line.stop_all("to the real one")
    assert until(lambda: worker.stops == ["gang: to the real one"])
    assert master.stops == [] and master.failures == []


def test_an_unexpected_name_is_refused(sides):
    master = sides("node0", 0, workers=["node1"])
    sock = stranger(master.port)
    sock.sendall(hello(first_line(sock), node="node7"))
    closed_within(sock, 3.0)
    assert master.line.peers == {}


def test_a_long_line_closes_the_connection_and_costs_little(sides):
    master = sides("node0", 0, workers=["node1"])
    sock = stranger(master.port)
    cpu = time.process_time()
    try:
        sock.sendall(b"x" * (100 * 1024))
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending: what we want
    assert closed_within(sock, 1.5) < 1.5  # long before the hello deadline
    assert time.process_time() - cpu < 0.5
    assert master.stops == [] and master.failures == []


def test_connections_are_capped(sides):
    master = sides("node0", 0, workers=["node1"])
    socks = [stranger(master.port) for _ in range(1 + getattr(L, "SPARE", 4) + 3)]
    shut = 0
    for sock in socks:
        if first_line(sock, within=0.5) is None:  # closed at once: no challenge
            shut += 1
    assert shut == 3, shut
    for sock in socks:
        sock.close()
    assert until(lambda: master.line.conns == 0)  # the slots come back
    worker = sides("node1", 1, port=master.port)
    assert until(lambda: "node1" in master.line.peers)
    assert worker.stops == []


def test_the_master_listens_on_the_given_address_only(sides):
    master = sides("node0", 0, workers=["node1"])
    assert master.line.server.getsockname()[0] == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", master.port), timeout=2)


def test_a_worker_names_only_itself(sides):
    master = sides("node0", 0, workers=["node1", "node2"])
    node1 = sides("node1", 1, port=master.port)
    sides("node2", 1, port=master.port)
    assert until(lambda: set(master.line.peers) == {"node1", "node2"})
    node1.line.master.send("fail node0 1")
    node1.line.master.send("fail node2 1")
    time.sleep(1.0)
    assert master.failures == [], master.failures  # nobody blamed for node1's word
    assert not any("node0 failed" in s or "node2 failed" in s for s in master.stops)


def test_a_worker_never_obeys_a_master_without_the_secret():
    """An impostor on the port: it challenges, but cannot answer the worker's proof."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def impostor():
        sock, _ = server.accept()
        sock.sendall(b"challenge " + b"11" * 16 + b"\n")
        sock.recv(4096)
        sock.sendall(b"welcome " + b"0" * 64 + b"\nstop you are stopped\n")
        time.sleep(2)
        sock.close()

    threading.Thread(target=impostor, daemon=True).start()
    stops = []
    spec = {"node": "node1", "rank": 1, "master_host": "127.0.0.1", "lifeline_port": port,
            "lifeline_secret": SECRET, "workers": []}  # fmt: skip
    line = L.Lifeline(spec, stops.append, lambda *a: stops.append(a))
    with pytest.raises(ConnectionError, match="did not prove the run's secret"):
        line.open()
        line.run()
    time.sleep(0.5)
    assert stops == []
    server.close()


def test_happy_path_a_worker_fails(sides):
    master = sides("node0", 0, workers=["node1"])
    worker = sides("node1", 1, port=master.port)
    assert until(lambda: "node1" in master.line.peers)
    time.sleep(1.2)  # heartbeats both ways: nobody silent
    assert master.line.peers["node1"].last > time.monotonic() - 1
    assert worker.line.master.last > time.monotonic() - 1
    worker.line.finished("node1", 3, "FAILED")
    assert until(lambda: master.failures == [("node1", 3)])
    assert until(lambda: master.stops == ["node1 failed (exit 3)"])
    master.line.stop_all(master.stops[0])
    assert until(lambda: worker.stops == ["gang: node1 failed (exit 3)"])


def test_happy_path_done_both_ways_and_stop(sides):
    master = sides("node0", 0, workers=["node1", "node2"])
    node1 = sides("node1", 1, port=master.port)
    node2 = sides("node2", 2, port=master.port)
    assert until(lambda: set(master.line.peers) == {"node1", "node2"})
    node1.line.finished("node1", 0, "SUCCEEDED")  # done node1: its close is no loss
    assert until(lambda: master.line.peers["node1"].done)
    node1.close()
    time.sleep(0.5)
    assert master.stops == []
    master.line.stop_all("stopped by invoke stop")
    assert until(lambda: node2.stops == ["gang: stopped by invoke stop"])
    master.line.finished("node0", 0, "SUCCEEDED")
    assert until(lambda: node2.line.master.done)
    assert master.failures == [] and node1.stops == []


def test_a_one_node_run_listens_nowhere(sides):
    master = sides("node0", 0, workers=[])
    assert master.port is None and master.line.server is None
