"""A detached run's master port, handed from the preflight runner to the run's supervisor
(masterport.hand_over / take_over), here on one machine: gang_runner.py fed on stdin as
launch.Member feeds it, this process as the supervisor. Linux only (abstract unix sockets,
SO_PEERCRED)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import pytest

from tests.unit.test_gang_runner import (  # noqa: F401 (the `runners` fixture)
    compete,
    node_module,
    runners,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the runner needs Linux")
masterport = node_module("masterport.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offered(runners, port: int, then=lambda: None):  # noqa: F811 (the fixture)
    """A master's runner that checked `port` (holding it: `then()` runs) and was told to hand
    it over: (runner, offer)."""
    r = runners("", listen=port, watchdog=0)
    assert r.event("facts")["listen"] == {"ok": True, "error": None}
    then()
    name = f"ddpfleet-port.{r.run_id}.test"
    r.proc.stdin.write(json.dumps({"handoff": name}).encode() + b"\n")
    r.proc.stdin.flush()
    offer = r.event("handoff")
    assert offer["name"] == name and offer["uid"] == os.getuid(), offer
    return r, {**offer, "port": port}


def test_the_held_port_goes_to_the_supervisor_never_free_on_the_way(runners):  # noqa: F811
    port, rival = free_port(), []
    r, offer = offered(runners, port, then=lambda: rival.extend(compete(port)))
    taken, done = rival
    held = masterport.take_over(offer)
    try:
        assert r.proc.wait(timeout=10) == 0  # the runner is gone: the port lives in `held`
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            held.settimeout(5)
            held.accept()[0].close()  # the very socket the preflight listened on
    finally:
        done.set()
        held.close()
    assert not taken, f"another listener got port {port} during the hand-off"


def test_a_peer_that_is_not_root_gets_nothing_and_root_still_does(runners):  # noqa: F811
    if os.getuid() != 0:
        pytest.skip("the runner hands the port to root only; refusing another uid needs root")
    port = free_port()
    r, offer = offered(runners, port)
    child = os.fork()
    if child == 0:  # a local user who found the socket in /proc/net/unix
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            masterport.take_over(offer)
        except ValueError as e:
            code = 0 if "sent 0 sockets" in str(e) else 3
        finally:
            os._exit(code)
    assert os.waitpid(child, 0)[1] == 0
    held = masterport.take_over(offer)
    held.close()
    assert r.proc.wait(timeout=10) == 0


def test_the_supervisor_takes_no_socket_from_another_process():
    name = f"ddpfleet-port.test.{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as impostor:
        impostor.bind("\0" + name)
        impostor.listen()
        with pytest.raises(ValueError, match=r"held by pid \d+ uid \d+, not by the preflight"):
            masterport.take_over({"name": name, "pid": 1, "uid": 0, "port": 29500})


def test_the_supervisor_takes_only_a_socket_listening_on_the_port():
    if os.getuid() != 0:
        pytest.skip("hand_over gives the socket to root only")
    name, port = f"ddpfleet-port.test.{os.getpid()}", free_port()
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        ready, cancel = threading.Event(), os.pipe()
        giver = threading.Thread(
            target=masterport.hand_over, args=(other, name, cancel[0], ready.set, 10)
        )
        giver.start()
        assert ready.wait(10)
        try:
            with pytest.raises(ValueError, match=f"port {port} .* does not listen on it"):
                masterport.take_over({"name": name, "pid": os.getpid(), "uid": 0, "port": port})
        finally:
            giver.join()
            os.close(cancel[0])
            os.close(cancel[1])


def test_called_off_the_runner_frees_the_port(runners):  # noqa: F811
    port = free_port()
    r, _ = offered(runners, port)
    r.proc.stdin.close()  # the controller gave up: the supervisor never came
    events = r.events()
    assert "called off" in events[-1]["error"], r.text
    assert r.proc.wait(timeout=10) == 1
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # free again
