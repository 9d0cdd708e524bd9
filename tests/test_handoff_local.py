"""The listener handoff, in process and without Docker: the sandbox's forwarder binds
127.0.0.1 ports and passes them (SCM_RIGHTS) to the sidecar's supervisor, which checks
each and passes it on to the daemon that accepts on it. Real-container proof of the same
path: tests/test_keys_sandbox.py (``forwarding == "handed over"``, the agent's moves)."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_agentbox.inside import egressproxy, supervisor


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ho-", dir="/tmp"))  # Unix paths: 108 bytes at most
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def run_supervisor_side(path: Path) -> tuple[threading.Thread, dict[str, socket.socket]]:
    """``supervisor.hand_over`` on ``path`` with a socket pair standing in for each daemon."""
    ours, theirs = {}, {}
    for daemon in ("egress", "keys"):
        ours[daemon], theirs[daemon] = socket.socketpair()
    lsn = supervisor.listen(str(path))
    thread = threading.Thread(target=supervisor.hand_over, args=(lsn, str(path), ours))
    thread.start()
    return thread, theirs


def send(path: Path, names: list[str], socks: list[socket.socket]) -> str:
    pairs = [(s, "") for s in socks]
    return egressproxy.hand_over(str(path), names, pairs)


def test_a_loopback_listener_reaches_its_daemon_and_serves_there(short_dir: Path) -> None:
    path = short_dir / "handoff.sock"
    thread, daemons = run_supervisor_side(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"  # root's only
    agent = socket.create_server(("127.0.0.1", 0))
    key = socket.create_server(("127.0.0.1", 0))
    port = agent.getsockname()[1]
    assert send(path, ["egress:agent", "keys:openai"], [agent, key]) == "ok"
    thread.join(10)
    assert not path.exists()  # once: nobody hands anything over later
    agent.close()  # the forwarder exits: the daemon's copy is what listens now
    key.close()
    msg, fds, _, _ = socket.recv_fds(daemons["egress"], 4096, 4)
    assert json.loads(msg) == ["agent"] and len(fds) == 1
    msg_k, fds_k, _, _ = socket.recv_fds(daemons["keys"], 4096, 4)
    assert json.loads(msg_k) == ["openai"] and len(fds_k) == 1
    with socket.socket(fileno=fds[0]) as adopted, socket.create_connection(("127.0.0.1", port)):
        conn, _ = adopted.accept()  # the connection the forwarder would have relayed
        conn.close()
    os.close(fds_k[0])


@pytest.mark.parametrize(
    "case", ["connected", "not-listening", "other-address", "unix", "unknown-daemon", "count"]
)
def test_the_supervisor_refuses_anything_but_a_loopback_listener(
    short_dir: Path, case: str
) -> None:
    path = short_dir / "handoff.sock"
    thread, daemons = run_supervisor_side(path)
    names, made = ["egress:agent"], []
    if case == "connected":  # a connected socket, not a listener
        srv = socket.create_server(("127.0.0.1", 0))
        made = [srv, socket.create_connection(srv.getsockname())]
        socks = [made[1]]
    elif case == "not-listening":
        made = socks = [socket.socket()]
        socks[0].bind(("127.0.0.1", 0))
    elif case == "other-address":  # only 127.0.0.1 is what the agent was told
        made = socks = [socket.create_server(("127.0.0.2", 0))]
    elif case == "unix":
        made = socks = [socket.socket(socket.AF_UNIX)]
        socks[0].bind(str(short_dir / "other.sock"))
        socks[0].listen(1)
    elif case == "unknown-daemon":
        made = socks = [socket.create_server(("127.0.0.1", 0))]
        names = ["root:shell"]
    else:
        made = socks = [socket.create_server(("127.0.0.1", 0))]
        names = ["egress:agent", "keys:openai"]
    answer = send(path, names, socks)
    thread.join(10)
    assert answer.startswith("ValueError"), answer
    for daemon in daemons.values():  # nothing reached any daemon (EOF or nothing yet)
        daemon.setblocking(False)
        try:
            got = daemon.recv(1)
        except BlockingIOError:
            got = b""
        assert got == b""
    for sock in made:
        sock.close()


def test_without_a_handoff_the_forwarder_says_why(short_dir: Path) -> None:
    lsn = socket.create_server(("127.0.0.1", 0))
    why = send(short_dir / "absent.sock", ["egress:agent"], [lsn])
    assert why.startswith("FileNotFoundError"), why  # the forwarder then relays
    lsn.close()
