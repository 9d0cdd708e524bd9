"""keyproxy.TLS: the key proxy's client TLS through memory BIOs, against a real ssl server.

The server is Python's own SSLSocket in a thread over a socket pair, its certificate from
a throwaway ``trustme`` CA: nothing leaves the process. The key proxy's request and
answer paths run on TLS in every test of test_keyproxy_local.py and on a real sidecar in
test_keys_sandbox.py; these pin down what it promises beside them: every byte both ways,
both kinds of end, verification as the context says, and one receive per many records.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme

from pytest_agentbox.inside.keyproxy import BUF, TLS

NAME = "api.example.test"


class Counting:
    """The socket TLS is given, counting its receives (a fake of nothing: it delegates)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.recvs = sock, 0
        self.fileno, self.settimeout, self.close = sock.fileno, sock.settimeout, sock.close
        self.sendall = sock.sendall

    def recv_into(self, buf: Any) -> int:
        self.recvs += 1
        return self.sock.recv_into(buf)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server(ca: trustme.CA) -> Iterator[Callable[..., tuple[Counting, threading.Thread]]]:
    """Start ``script(ssl_socket)`` as the TLS server; returns (client end, its thread)."""
    started: list[tuple[socket.socket, threading.Thread]] = []

    def start(script: Callable[[ssl.SSLSocket], None], names: tuple[str, ...] = (NAME,)) -> Any:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*names).configure_cert(ctx)
        mine, theirs = socket.socketpair()
        with contextlib.suppress(OSError):  # room for every record before the first read
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

        def serve() -> None:
            with contextlib.suppress(ssl.SSLError, OSError):
                script(ctx.wrap_socket(theirs, server_side=True))
            theirs.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        mine.settimeout(10)
        started.append((mine, thread))
        return Counting(mine), thread

    yield start
    for sock, thread in started:
        sock.close()
        thread.join(10)


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def read_all(tls: TLS, size: int = 100_000) -> bytes:
    out, buf = bytearray(), bytearray(size)
    while n := tls.recv_into(buf):
        out += buf[:n]
    return bytes(out)


@pytest.mark.parametrize("end", ["close_notify", "eof without close_notify"])
def test_every_byte_both_ways_and_either_end_is_the_end(
    server: Callable[..., Any], ca: trustme.CA, end: str
) -> None:
    up, down = secrets.token_bytes(3 * 4 * BUF + 7), secrets.token_bytes(5 * 4 * BUF + 11)

    def script(ss: ssl.SSLSocket) -> None:
        got = b""
        while len(got) < len(up):
            got += ss.recv(1 << 16)
        ss.sendall(hashlib.sha256(got).digest())
        for at, size in enumerate([1, 100, 16384, 70_000, len(down)]):  # records of all sizes
            ss.sendall(down[sum([1, 100, 16384, 70_000][:at]) :][:size])
        if end == "close_notify":
            ss.unwrap()

    sock, _ = server(script)
    tls = TLS(sock, client_ctx(ca), NAME)  # type: ignore[arg-type]
    tls.sendall(up)
    assert read_all(tls, 32) == hashlib.sha256(up).digest() + down
    assert tls.recv_into(bytearray(10)) == 0  # and stays ended


@pytest.mark.parametrize("case", ["other name", "untrusted CA"])
def test_the_certificate_and_name_are_checked(
    server: Callable[..., Any], ca: trustme.CA, case: str
) -> None:
    sock, _ = server(lambda ss: ss.sendall(b"never read"), ("other.example.test",))
    ctx = client_ctx(ca if case == "other name" else trustme.CA())
    with pytest.raises(ssl.SSLCertVerificationError):
        TLS(sock, ctx, NAME)  # type: ignore[arg-type]


def test_one_receive_feeds_many_records_and_pending_counts_them(
    server: Callable[..., Any], ca: trustme.CA
) -> None:
    """Eight 16 KiB records already waiting: an SSLSocket would make 16 receives (header,
    then body, per record); TLS makes one or two, and says the rest is pending."""
    body, sent = secrets.token_bytes(8 * 16384), threading.Event()

    def script(ss: ssl.SSLSocket) -> None:
        ss.recv(1)
        for at in range(0, len(body), 16384):
            ss.sendall(body[at : at + 16384])
        sent.set()
        ss.recv(1)  # hold the connection until the client is done

    sock, _ = server(script)
    tls = TLS(sock, client_ctx(ca), NAME)  # type: ignore[arg-type]
    tls.sendall(b"!")
    assert sent.wait(10)
    before, buf = sock.recvs, bytearray(16384)
    assert tls.recv_into(buf) == 16384 and buf == body[:16384]
    assert tls.pending() > 0  # the other records wait in memory, not in the kernel
    got = bytes(buf)
    while len(got) < len(body):
        got += buf[: tls.recv_into(buf)]
    assert got == body
    assert sock.recvs - before <= 2
    tls.sendall(b"!")


def test_close_waits_for_the_files_made_from_it_then_ends_the_control_too(
    server: Callable[..., Any], ca: trustme.CA
) -> None:
    """http.client closes a ``Connection: close`` answer's connection before its body is
    read: the descriptor (and the egress proxy's control end, whose close shuts the
    upstream) must outlive that until the response's file is closed."""
    done = threading.Event()

    def script(ss: ssl.SSLSocket) -> None:
        ss.sendall(b"the body")
        done.wait(10)

    sock, _ = server(script)
    control, egress_end = socket.socketpair()
    tls = TLS(sock, client_ctx(ca), NAME, control)  # type: ignore[arg-type]
    body = tls.makefile("rb")
    tls.close()
    assert body.read(8) == b"the body"
    assert sock.sock.fileno() >= 0 and control.fileno() >= 0
    body.close()
    done.set()
    assert sock.sock.fileno() == -1 and control.fileno() == -1
    assert egress_end.recv(1) == b""  # what the egress proxy sees: the tunnel is over
    egress_end.close()
