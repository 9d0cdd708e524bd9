"""The egress proxy as real local processes on loopback, plus its pure decision functions.

``serve`` runs under a small launcher that replaces ``socket.getaddrinfo`` with a table:
names in the table resolve to the given address, every other lookup fails and is
recorded. So no test ever asks a real DNS server, and a test can prove that a refused
request was decided *before* any lookup. The launcher can also make thread starts fail
and lower the file limit (the proxy's resilience). The enforcement file itself has no
test hook. Nothing here connects anywhere but 127.0.0.1, ::1 and this machine's own
addresses; metadata and other special addresses are only ever judged by rule, in tables.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import selectors
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox.inside import egressproxy
from pytest_agentbox.inside.egressproxy import (
    address_class,
    host_allowed,
    is_ip_literal,
    parse_head,
    valid_fqdn,
)
from pytest_agentbox.policy import egress

SCRIPT = str(Path(egressproxy.__file__).resolve())
ALLOWED = "api.example.test"

# Runs egressproxy.py unchanged, with a table resolver that never touches the network.
LAUNCHER = r"""
import json, os, resource, runpy, socket, sys, threading
if os.environ.get("EGX_NOFILE"):
    n = int(os.environ["EGX_NOFILE"])
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
if os.environ.get("EGX_THREAD_FLAG"):  # while this file exists, no thread can start
    start = threading.Thread.start
    def failing_start(self):
        if os.path.exists(os.environ["EGX_THREAD_FLAG"]):
            raise RuntimeError("can't start new thread")
        return start(self)
    threading.Thread.start = failing_start
table = json.loads(os.environ["EGX_RESOLVE"])
lookups = os.environ["EGX_LOOKUPS"]
def getaddrinfo(host, port, *args, **kwargs):
    with open(lookups, "a") as f:
        f.write(str(host) + "\n")
    if host not in table:
        raise socket.gaierror(socket.EAI_NONAME, "test resolver: unknown name")
    ip = table[host]
    if ":" in ip:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))]
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
socket.getaddrinfo = getaddrinfo
sys.argv = [sys.argv[1], sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ---------------------------------------------------------------------------- helpers


class Listener:
    """A TCP server that records every connection and request head it receives."""

    def __init__(self, host: str, port: int = 0, reply: bytes = b"") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family)
        self.port = self.sock.getsockname()[1]
        self.reply, self.heads, self.accepted = reply, [], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                if self.reply:
                    conn.settimeout(5)
                    data = b""
                    with contextlib.suppress(OSError):
                        while b"\r\n\r\n" not in data:
                            chunk = conn.recv(4096)
                            if not chunk:
                                break
                            data += chunk
                        self.heads.append(data)
                        conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def decoy() -> Iterator[list[Listener]]:
    """Decoys on 127.0.0.1 and (when possible) ::1 on the same port; nothing may reach them."""
    for _ in range(20):
        v4 = Listener("127.0.0.1")
        try:
            v6 = Listener("::1", v4.port)
        except OSError:
            v4.close()
            continue
        yield [v4, v6]
        v4.close()
        v6.close()
        return
    v4 = Listener("127.0.0.1")
    yield [v4]
    v4.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: a Unix socket path must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="egx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launch() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]]]:
    """Start ``egressproxy.py MODE`` with a JSON config on stdin; killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        mode: str,
        cfg: dict[str, Any],
        resolve: dict[str, str] | None = None,
        lookups: str = "",
        **launcher_env: str,
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        argv = [sys.executable, SCRIPT, mode]
        env = dict(os.environ)
        if resolve is not None:
            argv = [sys.executable, "-c", LAUNCHER, SCRIPT, mode]
            env.update(EGX_RESOLVE=json.dumps(resolve), EGX_LOOKUPS=lookups, **launcher_env)
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        procs.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(cfg).encode() + b"\n")
        proc.stdin.close()
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, f"{mode} printed no ready line"
        return proc, json.loads(proc.stdout.readline())

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


class Served:
    """A running ``serve`` process with its ports, log and lookup record."""

    def __init__(
        self, proc: Any, ports: dict[str, int], sock_path: Path, log: Path, lookups: Path
    ) -> None:
        self.proc, self.ports, self.tcp_port = proc, ports, ports["tcp"]
        self.sock_path, self.log, self.lookups = sock_path, log, lookups

    def records(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """Wait for ``count`` log lines (a refusal's comes after the client's EOF)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.02)

    def looked_up(self) -> list[str]:
        return self.lookups.read_text().split() if self.lookups.exists() else []


# IP literals are listed on purpose: they must be refused all the same.
ALLOW = [ALLOWED, "*.wild.example.test", "127.0.0.1", "::1", "2130706433"]


@pytest.fixture
def serve(
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]],
    short_dir: Path,
    decoy: list[Listener],
) -> Callable[..., Served]:
    def start(
        resolve: dict[str, str] | None = None,
        ports: list[int] | None = None,
        *,
        allow: list[str] | None = None,
        listeners: list[dict[str, Any]] | None = None,
        launcher_env: dict[str, str] | None = None,
        **top: Any,
    ) -> Served:
        sock_path, log, lookups = short_dir / "e.sock", short_dir / "d.jsonl", short_dir / "lk"
        allow = ALLOW if allow is None else allow
        cfg = {
            "listeners": [
                {"name": "agent", "unix": str(sock_path), "mode": 0o600, "allow": allow},
                {"name": "tcp", "tcp": ["127.0.0.1", 0], "allow": allow},
                *(listeners or []),
            ],
            "ports": ports or [80, 443, decoy[0].port],
            "log_path": str(log),
            **top,
        }
        proc, ready = launch("serve", cfg, resolve or {}, str(lookups), **(launcher_env or {}))
        assert ready["ready"] is True, ready
        assert isinstance(ready["tcp_ports"]["tcp"], int)
        return Served(proc, ready["tcp_ports"], sock_path, log, lookups)

    return start


def exchange(port: int, raw: bytes, *, half_close: bool = False, host: str = "127.0.0.1") -> bytes:
    """Send ``raw`` to a proxy and read until it closes."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


# ---------------------------------------------------------------- decisions before connect


IP_TARGETS = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "127.1",
    "127.0.0.1.",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[0:0:0:0:0:0:0:1]",
]


@pytest.mark.parametrize("target", IP_TARGETS)
@pytest.mark.parametrize("method", ["CONNECT", "GET"])
def test_ip_literals_refused_before_any_lookup(
    serve: Callable[..., Served], decoy: list[Listener], target: str, method: str
) -> None:
    proxy = serve()
    port = decoy[0].port
    if method == "CONNECT":
        raw = f"CONNECT {target}:{port} HTTP/1.1\r\nHost: {target}:{port}\r\n\r\n"
    else:
        raw = f"GET http://{target}:{port}/ HTTP/1.1\r\nHost: {target}\r\n\r\n"
    reply = exchange(proxy.tcp_port, raw.encode())
    assert status(reply) == 403
    assert b"IP literal refused" in reply
    (rec,) = proxy.records(1)
    assert (rec["decision"], rec["reason"], rec["method"]) == ("deny", "IP literal refused", method)
    assert rec["port"] == port
    assert proxy.looked_up() == []
    assert [d.accepted for d in decoy] == [0] * len(decoy)


@pytest.mark.parametrize(
    ("target", "code", "reason"),
    [
        ("not-declared.example.test:443", 403, "host not in allowlist"),
        ("wild.example.test:443", 403, "host not in allowlist"),
        ("badwild.example.test:443", 403, "host not in allowlist"),
        ("api.example.test.evil.test:443", 403, "host not in allowlist"),
        ("localhost:443", 403, "invalid host name"),
        ("under_score.example.test:443", 403, "invalid host name"),
        ("-lead.example.test:443", 403, "invalid host name"),
        ("a..example.test:443", 403, "invalid host name"),
        ("api.example.test:8443", 403, "port not allowed"),
        ("api.example.test:0", 400, "missing or invalid port"),
        ("api.example.test:99999", 400, "missing or invalid port"),
        ("api.example.test", 400, "missing or invalid port"),
        ("user@api.example.test:443", 400, "userinfo"),
    ],
)
def test_names_and_ports_refused_before_any_lookup(
    serve: Callable[..., Served], decoy: list[Listener], target: str, code: int, reason: str
) -> None:
    proxy = serve()
    reply = exchange(proxy.tcp_port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    assert status(reply) == code
    (rec,) = proxy.records(1)
    assert rec["decision"] == "deny"
    assert reason in rec["reason"]
    assert rec["bytes_up"] == rec["bytes_down"] == 0
    assert proxy.looked_up() == []
    assert [d.accepted for d in decoy] == [0] * len(decoy)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"CONNECT api.example.test:443 HTTP/1.1\nHost: x\n\n", 400),  # bare LF
        (b"CONNECT api.example.test:443 HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
        (b"CONNECT api.example.test:443 HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
        (b"CONNECT api.example.test:443 HTTP/1.1\r\nX: a\r\n  folded\r\n\r\n", 400),
        (b"CONNECT api.example.test:443  HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT api.example.test:443 HTTP/2.0\r\n\r\n", 400),
        (b"GET http://api.example.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET http://api.example.test/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400),
        (b"POST http://api.example.test/ HTTP/1.1\r\n\r\n", 405),
        (b"GET https://api.example.test/ HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n", 405),
        (b"CONNECT api.example.test:443 HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 400),
    ],
    ids=[
        "bare-lf",
        "nul",
        "bare-cr",
        "obs-fold",
        "double-space",
        "http2",
        "transfer-encoding",
        "body",
        "post",
        "https-get",
        "origin-form",
        "oversize",
    ],
)
def test_malformed_heads_refused_and_logged(
    serve: Callable[..., Served], raw: bytes, code: int
) -> None:
    proxy = serve()
    try:
        assert status(exchange(proxy.tcp_port, raw)) == code
    except ConnectionResetError:
        # The proxy stops reading at the cap, so closing may reset the unread rest.
        assert len(raw) > egressproxy.HEAD_MAX
    (rec,) = proxy.records(1)
    assert rec["decision"] == "deny"
    assert rec["reason"]
    assert proxy.looked_up() == []


def test_every_decision_is_one_log_line_with_all_fields(serve: Callable[..., Served]) -> None:
    proxy = serve()
    targets = ["127.0.0.1:443", "nope.example.test:443", "api.example.test:22"]
    for target in targets:
        exchange(proxy.tcp_port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    exchange(proxy.tcp_port, b"garbage\r\n\r\n")
    recs = proxy.records(4)
    assert len(recs) == 4
    fields = {"ts", "method", "host", "port", "decision", "reason", "bytes_up", "bytes_down", "ms"}
    fields |= {"event", "id", "listener", "address", "class", "pinned", "given"}
    assert all(set(rec) == fields for rec in recs)
    assert {r["event"] for r in recs} == {"connect"} and {r["listener"] for r in recs} == {"tcp"}
    assert len({r["id"] for r in recs}) == 4
    assert sorted(r["host"] for r in recs) == [
        "",
        "127.0.0.1",
        "api.example.test",
        "nope.example.test",
    ]
    assert all(r["decision"] == "deny" for r in recs)


# ------------------------------------------------------------- decisions after resolving


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "rfc1918"),
        ("172.17.0.1", "rfc1918"),
        ("192.168.1.1", "rfc1918"),
        ("100.64.0.1", "shared-100.64"),
        ("100.100.100.200", "metadata"),
        ("fd00::2", "ula"),
        ("::ffff:10.0.0.1", "rfc1918"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("2002:a00:1::1", "rfc1918"),
        ("192.0.2.2", "documentation"),
    ],
)
def test_forbidden_resolutions_refused_without_connecting(
    serve: Callable[..., Served], decoy: list[Listener], address: str, reason: str
) -> None:
    proxy = serve(resolve={ALLOWED: address})
    reply = exchange(proxy.tcp_port, f"CONNECT {ALLOWED}:443 HTTP/1.1\r\n\r\n".encode())
    assert status(reply) == 403
    (rec,) = proxy.records(1)
    assert rec["decision"] == "deny"
    assert rec["reason"] == f"resolves to {reason} address"
    assert (rec["class"], rec["address"], rec["pinned"]) == (reason, address, False)
    assert proxy.looked_up() == [ALLOWED]
    assert [d.accepted for d in decoy] == [0] * len(decoy)


def test_unresolvable_allowed_name_is_502(serve: Callable[..., Served]) -> None:
    proxy = serve(resolve={})
    reply = exchange(proxy.tcp_port, b"CONNECT sub.wild.example.test:443 HTTP/1.1\r\n\r\n")
    assert status(reply) == 502
    (rec,) = proxy.records(1)
    assert (rec["decision"], rec["reason"]) == ("deny", "DNS resolution failed")
    assert proxy.looked_up() == ["sub.wild.example.test"]


BODY = b"hello from upstream"
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)


@pytest.fixture
def upstream() -> Iterator[Listener]:
    """The local upstream on 127.0.0.1: reached only through a pin (loopback after DNS is
    refused whatever the name)."""
    server = Listener("127.0.0.1", reply=REPLY)
    yield server
    server.close()


def test_allowed_connect_tunnel_relays_and_logs_bytes(
    serve: Callable[..., Served], upstream: Listener
) -> None:
    name = "Sub.Wild.Example.Test."
    proxy = serve(pins={"sub.wild.example.test": "127.0.0.1"}, ports=[upstream.port])
    inner = b"GET /tunnelled HTTP/1.1\r\nHost: sub.wild.example.test\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.tcp_port), timeout=10) as sock:
        sock.sendall(f"CONNECT {name}:{upstream.port} HTTP/1.1\r\n\r\n".encode())
        established = b""
        while b"\r\n\r\n" not in established:
            established += sock.recv(1)
        assert established == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sock.sendall(inner)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data == upstream.reply
    assert upstream.heads == [inner]
    opened, closed = proxy.records(2)
    assert (opened["event"], closed["event"], opened["id"]) == ("connect", "close", closed["id"])
    for rec in (opened, closed):
        assert (rec["decision"], rec["reason"], rec["host"]) == ("allow", "allowlisted", name)
        assert (rec["address"], rec["class"], rec["pinned"]) == ("127.0.0.1", "loopback", True)
    assert (opened["bytes_up"], opened["bytes_down"]) == (0, 0)
    assert (closed["bytes_up"], closed["bytes_down"]) == (len(inner), len(upstream.reply))
    assert proxy.looked_up() == []  # a pin never asks DNS


def test_give_listener_hands_over_the_upstream_socket_and_logs_its_bytes(
    serve: Callable[..., Served], upstream: Listener, short_dir: Path
) -> None:
    """The key proxy's listener (``give``) passes the connected upstream socket itself:
    the client talks on it directly, the tunnel ends when the client's end of the Unix
    connection closes, and its bytes come from the kernel's count. Other listeners relay."""
    given = short_dir / "keys.sock"
    lsn = {"name": "keys", "unix": str(given), "allow": [ALLOWED], "give": True}
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[upstream.port], listeners=[lsn])
    inner = b"GET /given HTTP/1.1\r\nHost: x\r\n\r\n"
    for path, gives in ((given, True), (proxy.sock_path, False)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(10)
            control.connect(str(path))
            control.sendall(f"CONNECT {ALLOWED}:{upstream.port} HTTP/1.1\r\n\r\n".encode())
            head, fds, _, _ = socket.recv_fds(control, 4096, 4)
            assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
            assert len(fds) == (1 if gives else 0)
            if not gives:
                control.sendall(inner)
                data = b""
                while chunk := control.recv(65536):
                    data += chunk
                assert data == upstream.reply
                continue
            with socket.socket(fileno=fds[0]) as sock:
                assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
                sock.settimeout(10)
                sock.sendall(inner)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            assert data == upstream.reply
            time.sleep(0.3)
            assert len(proxy.records(1, timeout=0)) == 1  # open while the control end is
    by_id: dict[int, list[dict[str, Any]]] = {}
    for rec in proxy.records(4):
        by_id.setdefault(rec["id"], []).append(rec)
    (opened, closed), relayed = by_id.values()  # the first tunnel's lines come first
    opened_closed = ["connect", "close"]
    assert [r["event"] for r in (opened, closed)] == opened_closed
    assert (opened["listener"], closed["decision"]) == ("keys", "allow")
    assert (opened["given"], closed["given"], relayed[1]["given"]) == (False, True, False)
    assert (closed["bytes_up"], closed["bytes_down"]) == (len(inner), len(upstream.reply))
    assert [(r["listener"], r["event"]) for r in relayed] == [("agent", e) for e in opened_closed]
    assert upstream.heads == [inner, inner]


def test_allowed_plain_http_is_rewritten_to_origin_form(
    serve: Callable[..., Served], upstream: Listener
) -> None:
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[upstream.port])
    raw = (
        f"GET http://{ALLOWED}:{upstream.port}/p?q=1 HTTP/1.1\r\n"
        "Host: other.example.test\r\nProxy-Connection: keep-alive\r\n"
        "Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nAccept: */*\r\n\r\n"
    )
    reply = exchange(proxy.tcp_port, raw.encode())
    assert reply == upstream.reply
    (head,) = upstream.heads
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /p?q=1 HTTP/1.1"
    assert f"Host: {ALLOWED}:{upstream.port}".encode() in lines
    assert b"Connection: close" in lines
    assert b"Accept: */*" in lines
    for gone in (b"other.example.test", b"Proxy-Connection", b"keep-alive", b"X-Secret-Hop"):
        assert gone not in head
    _, rec = proxy.records(2)
    assert (rec["event"], rec["decision"]) == ("close", "allow")
    assert rec["bytes_down"] == len(upstream.reply)


# ---------------------------------------------------------------- unix socket and forward


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_unix_socket_gets_the_configured_mode(
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]],
    short_dir: Path,
    mode: int,
) -> None:
    sock_path = short_dir / "m.sock"
    cfg = {"listeners": [{"name": "agent", "unix": str(sock_path), "mode": mode, "allow": []}]}
    _, ready = launch("serve", cfg)
    assert ready == {"ready": True, "tcp_ports": {}}
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_forward_relays_to_serve_over_the_unix_socket(
    serve: Callable[..., Served],
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]],
    decoy: list[Listener],
) -> None:
    proxy = serve()
    routes = [{"name": "egress", "unix": str(proxy.sock_path)}]
    _, ready = launch("forward", {"routes": routes})
    assert ready["ready"] is True
    port = ready["ports"]["egress"]
    assert port != proxy.tcp_port
    # Half-close: the client stops sending right after its request and still gets the answer.
    raw = b"CONNECT undeclared.example.test:443 HTTP/1.1\r\n\r\n"
    reply = exchange(port, raw, half_close=True)
    assert status(reply) == 403
    assert reply.endswith(b"host not in allowlist\n")
    reply = exchange(port, f"CONNECT 127.1:{decoy[0].port} HTTP/1.1\r\n\r\n".encode())
    assert status(reply) == 403
    recs = proxy.records(2)
    assert [r["host"] for r in recs] == ["undeclared.example.test", "127.1"]
    assert {r["listener"] for r in recs} == {"agent"}
    assert [d.accepted for d in decoy] == [0] * len(decoy)


def test_forward_without_serve_closes_the_connection(
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]], short_dir: Path
) -> None:
    _, ready = launch("forward", {"routes": [{"name": "egress", "unix": str(short_dir / "none")}]})
    # Closed at once: an empty read, or a reset because the request was left unread.
    with contextlib.suppress(ConnectionResetError):
        assert (
            exchange(ready["ports"]["egress"], b"CONNECT a.example.test:443 HTTP/1.1\r\n\r\n")
            == b""
        )


@pytest.mark.parametrize(
    ("mode", "cfg"),
    [
        ("serve", {"allow": []}),
        ("serve", {"listeners": []}),
        ("forward", {"listen": ["127.0.0.1", 0]}),
        ("serve", {"listeners": [{"name": "t", "tcp": ["256.0.0.1", 0]}]}),
        ("serve", {"listeners": [{"name": "t", "tcp": ["127.0.0.1", 0]}] * 2}),
        ("serve", {"listeners": [{"name": "t", "tcp": ["127.0.0.1", 0]}], "pins": {"a.test": "x"}}),
        (
            "serve",
            {"listeners": [{"name": "t", "tcp": ["127.0.0.1", 0]}], "pins": {"a": "1.2.3.4"}},
        ),
        ("serve", {"listeners": [{"name": "t", "tcp": ["127.0.0.1", 0]}], "refuse_nets": ["x/8"]}),
    ],
    ids=[
        "no-listener",
        "empty-listeners",
        "no-unix",
        "bad-address",
        "same-name",
        "bad-pin-ip",
        "bad-pin-name",
        "bad-refuse-net",
    ],
)
def test_bad_config_reports_not_ready(
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]],
    mode: str,
    cfg: dict[str, Any],
) -> None:
    proc, ready = launch(mode, cfg)
    assert ready["ready"] is False
    assert ready["error"]
    assert proc.wait(timeout=10) == 1


def test_usage_error() -> None:
    result = subprocess.run([sys.executable, SCRIPT, "bogus"], capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"usage" in result.stderr


# ---------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("3232235777", True),
        ("0300.0250.0.1", True),
        ("0xC0A80001", True),
        ("0xc0.0xa8.0.1", True),
        ("127.1", True),
        ("1.2.3.4.", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:169.254.169.254", True),
        ("[::ffff:a9fe:a9fe]", True),
        ("fe80::1%eth0", True),
        ("999.1.1.1", True),
        ("foo.0x1", True),
        ("example.com", False),
        ("1e100.net", False),
        ("0x.example.com", False),
        ("", False),
    ],
)
def test_is_ip_literal(host: str, expected: bool) -> None:
    assert is_ip_literal(host) is expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", True),
        ("API.Example.COM.", True),
        ("xn--bcher-kva.example", True),
        ("a-b.c-d.io", True),
        ("a.b.c.d.e.example.org", True),
        ("localhost", False),
        ("example.com..", False),
        (".example.com", False),
        ("under_score.example.com", False),
        ("-lead.example.com", False),
        ("trail-.example.com", False),
        ("bücher.example", False),
        ("a.123", False),
        ("127.0.0.1", False),
        ("exa mple.com", False),
        ("*.example.com", False),
        ("a" * 64 + ".example.com", False),
        (".".join(["a" * 50] * 5) + ".com", False),  # 259 > 253 characters
        ("", False),
    ],
)
def test_valid_fqdn(host: str, expected: bool) -> None:
    assert valid_fqdn(host) is expected


@pytest.mark.parametrize(
    ("host", "allow", "deny", "expected"),
    [
        ("api.example.com", ["api.example.com"], [], (True, "allowlisted")),
        ("API.EXAMPLE.COM.", ["api.example.com"], [], (True, "allowlisted")),
        ("a.example.com", ["*.example.com"], [], (True, "allowlisted")),
        ("a.b.example.com", ["*.Example.com."], [], (True, "allowlisted")),
        ("example.com", ["*.example.com"], [], (False, "host not in allowlist")),
        ("badexample.com", ["*.example.com"], [], (False, "host not in allowlist")),
        ("other.com", ["api.example.com"], [], (False, "host not in allowlist")),
        ("other.com", [], [], (False, "host not in allowlist")),
        ("127.0.0.1", ["127.0.0.1"], [], (False, "IP literal refused")),
        ("[::1]", ["[::1]"], [], (False, "IP literal refused")),
        ("localhost", ["localhost"], [], (False, "invalid host name")),
        (
            "codeload.github.com",
            ["*.github.com"],
            ["codeload.github.com"],
            (False, "host on deny list"),
        ),
        ("api.github.com", ["*.github.com"], ["codeload.github.com"], (True, "allowlisted")),
    ],
)
def test_host_allowed(
    host: str, allow: list[str], deny: list[str], expected: tuple[bool, str]
) -> None:
    assert host_allowed(host, allow, deny) == expected


def _v4_forms(v4: str) -> list[str]:
    """Every IPv6 form that carries the IPv4 address ``v4`` (the proxy judges the inner one)."""
    n = int(ipaddress.IPv4Address(v4))
    six = lambda x: str(ipaddress.IPv6Address(x))  # noqa: E731
    return [
        f"::ffff:{v4}",  # IPv4-mapped
        six(n),  # IPv4-compatible (::a.b.c.d)
        six((0xFFFF << 48) | n),  # SIIT ::ffff:0:a.b.c.d
        six((0x64FF9B << 96) | n),  # NAT64 well-known 64:ff9b::/96
        six((0x64FF9B0001 << 80) | n),  # NAT64 local-use 64:ff9b:1::/48
        six((0x2002 << 112) | (n << 80) | 1),  # 6to4 2002:aabb:ccdd::1
    ]


# One address (or more) of every class; no packet is ever sent to any of them.
CLASS_TABLE = {
    "metadata": [
        "169.254.169.254",
        "fd00:ec2::254",
        "100.100.100.200",
        "192.0.0.192",
        "169.254.170.2",
        "168.63.129.16",
        "fd00:ec2::23",
    ],
    "unspecified": ["0.0.0.0", "::"],
    "this-network": ["0.1.2.3", "0.255.255.255"],
    "loopback": ["127.0.0.1", "127.8.9.10", "127.255.255.255", "::1"],
    "rfc1918": [
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "172.17.0.1",
        "192.168.0.1",
        "192.168.255.255",
    ],
    "shared-100.64": ["100.64.0.1", "100.127.255.254"],
    "link-local": ["169.254.0.1", "169.254.10.20", "fe80::1", "fe80::1%eth0", "febf::1"],
    "ietf-protocol": [
        "192.0.0.1",
        "192.0.0.9",
        "192.0.0.170",
        "2001::1",
        "2001:1::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    ],  # Teredo
    "benchmarking": ["198.18.0.1", "198.19.255.254"],
    "documentation": ["192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1", "3fff::1"],
    "multicast": ["224.0.0.1", "239.255.255.250", "ff02::1", "ff05::1:3"],
    "broadcast": ["255.255.255.255"],
    "reserved": ["240.0.0.1", "255.255.255.254", "100::1", "4000::1", "::ffff:0:8.8.8.8"],
    "ula": ["fc00::1", "fd00::2", "fdff:ffff::1"],
    "site-local": ["fec0::1"],
    "ipv4-compatible": ["::8.8.8.8"],
    "nat64-local": ["64:ff9b:1::808:808"],
    "invalid": ["", "not-an-address", "1.2.3.256"],
}
NON_PUBLIC_V4 = {
    "metadata": "169.254.169.254", "loopback": "127.0.0.1", "rfc1918": "10.1.2.3",
    "shared-100.64": "100.64.1.1", "link-local": "169.254.1.1", "this-network": "0.1.2.3",
    "unspecified": "0.0.0.0", "ietf-protocol": "192.0.0.8", "benchmarking": "198.18.0.1",
    "documentation": "203.0.113.5", "multicast": "224.0.0.251", "broadcast": "255.255.255.255",
    "reserved": "240.1.2.3",
}  # fmt: skip
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0", "172.15.255.255",
          "172.32.0.0", "192.167.255.255", "192.169.0.0", "198.17.255.255", "198.20.0.0",
          "223.255.255.255", "2606:4700::1111", "2a00:1450:4001::200e", "2001:4860:4860::8888",
          "64:ff9b::808:808", "::ffff:8.8.8.8", "2002:808:808::1"]  # fmt: skip


@pytest.mark.parametrize(
    ("ip", "cls"), [(ip, cls) for cls, ips in CLASS_TABLE.items() for ip in ips]
)
def test_address_class_names_every_class(ip: str, cls: str) -> None:
    assert address_class(ip) == cls


@pytest.mark.parametrize(("cls", "v4"), sorted(NON_PUBLIC_V4.items()))
def test_address_class_sees_through_every_embedded_form(cls: str, v4: str) -> None:
    assert address_class(v4) == cls
    for form in _v4_forms(v4):
        assert address_class(form) == cls, form


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_have_no_class(ip: str) -> None:
    assert address_class(ip) is None


def test_public_v4_in_a_deprecated_or_local_wrapper_is_still_refused() -> None:
    # Mapped, NAT64 well-known and 6to4 of a public address are public; the rest never are.
    forms = dict(zip(["mapped", "compat", "siit", "nat64", "nat64-local", "6to4"],
                     _v4_forms("8.8.8.8"), strict=True))  # fmt: skip
    got = {name: address_class(form) for name, form in forms.items()}
    assert got == {"mapped": None, "compat": "ipv4-compatible", "siit": "reserved",
                   "nat64": None, "nat64-local": "nat64-local", "6to4": None}  # fmt: skip


def test_refuse_nets_are_engine_networks_in_every_form() -> None:
    nets = ["172.18.0.0/16", "203.0.113.7/32", "2001:db8:1::/48", "5.6.7.0/24"]
    extra = [ipaddress.ip_network(n) for n in nets]
    assert address_class("172.18.0.2", extra) == "engine-network"  # not just "rfc1918"
    assert address_class("203.0.113.7", extra) == "engine-network"
    assert address_class("2001:db8:1::5", extra) == "engine-network"
    assert address_class("5.6.7.8", extra) == "engine-network"  # a public range the engine uses
    assert all(address_class(f, extra) == "engine-network" for f in _v4_forms("5.6.7.8")[:1])
    assert address_class("64:ff9b::506:708", extra) == "engine-network"
    assert address_class("5.6.8.1", extra) is None
    assert address_class("169.254.169.254", extra) == "metadata"  # named first, always


def test_private_ok_opens_only_lan_classes() -> None:
    assert {"rfc1918", "shared-100.64", "ula"} == egressproxy.PRIVATE_OK
    never = {"metadata", "loopback", "unspecified", "link-local", "this-network", "reserved"}
    assert not never & egressproxy.PRIVATE_OK


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"CONNECT a.example.com:443 HTTP/1.1", ("CONNECT", "a.example.com", 443, b"")),
        (b"GET http://a.example.com/x HTTP/1.1", ("GET", "a.example.com", 80, b"/x")),
        (b"GET HTTP://a.example.com HTTP/1.0", ("GET", "a.example.com", 80, b"/")),
        (b"HEAD http://a.example.com:8080/ HTTP/1.1", ("HEAD", "a.example.com", 8080, b"/")),
        (b"GET http://[::1]/ HTTP/1.1", ("GET", "[::1]", 80, b"/")),
        (b"CONNECT [::1]:443 HTTP/1.1", ("CONNECT", "[::1]", 443, b"")),
    ],
)
def test_parse_head(head: bytes, expected: tuple[str, str, int, bytes]) -> None:
    assert parse_head(head)[:4] == expected


# ------------------------------------------------- pins, private_ok, listeners, the log


class Holder:
    """A TCP server on 127.0.0.1 holding every connection until its client's EOF (the far
    end of held tunnels), in one thread."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port, self.sel = self.sock.getsockname()[1], selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while True:
                for key, _ in self.sel.select():
                    if key.fileobj is self.sock:
                        self.sel.register(self.sock.accept()[0], selectors.EVENT_READ)
                    elif not key.fileobj.recv(65536):  # type: ignore[union-attr]
                        self.sel.unregister(key.fileobj)
                        key.fileobj.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def holder() -> Iterator[Holder]:
    server = Holder()
    yield server
    server.close()


def tunnel(port: int, target: str) -> tuple[socket.socket, int]:
    """CONNECT through the proxy; (socket, status), the socket left open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, status(head) if head else 0


def lan_address() -> str | None:
    """An address of this machine in a class private_ok opens (rfc1918 or ULA), if any."""
    text = "".join(
        Path(f).read_text()
        for f in ("/proc/net/fib_trie", "/proc/net/if_inet6")
        if Path(f).exists()
    )
    found = [
        ip
        for ip in egress.parse_host_addresses(text)
        if address_class(ip) in egressproxy.PRIVATE_OK
    ]
    return min(found, key=lambda ip: ":" in ip) if found else None


def test_pin_is_exact_skips_dns_and_still_needs_the_allowlist(
    serve: Callable[..., Served], upstream: Listener
) -> None:
    pins = {ALLOWED: "127.0.0.1", "unlisted.example.test": "127.0.0.1"}
    proxy = serve(pins=pins, ports=[upstream.port])
    assert (
        exchange(proxy.tcp_port, f"GET http://{ALLOWED}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode())
        == REPLY
    )
    # Pinned but not allowlisted: refused before anything; a pin never covers a sub-name.
    for host in ("unlisted.example.test", f"x.{ALLOWED}"):
        reply = exchange(
            proxy.tcp_port, f"CONNECT {host}:{upstream.port} HTTP/1.1\r\n\r\n".encode()
        )
        assert status(reply) == 403
    # A wildcard-allowed name that is not pinned goes to DNS, and loopback there is refused.
    reply = exchange(
        proxy.tcp_port, f"CONNECT a.wild.example.test:{upstream.port} HTTP/1.1\r\n\r\n".encode()
    )
    assert status(reply) in (403, 502)
    recs = proxy.records(5)
    # The first tunnel's close line may come after the next requests' lines.
    pinned = [(r["event"], r["decision"]) for r in recs if r["pinned"]]
    assert pinned == [("connect", "allow"), ("close", "allow")]
    # A refusal is logged after the client's EOF, so the three deny lines come in any order.
    refused = [r["reason"] for r in recs if r["decision"] == "deny"]
    assert len(refused) == 3
    assert refused.count("host not in allowlist") == 2
    assert proxy.looked_up() == ["a.wild.example.test"]
    assert upstream.accepted == 1


def test_private_ok_reaches_a_lan_address_and_nothing_else(
    serve: Callable[..., Served], decoy: list[Listener]
) -> None:
    ip = lan_address()
    if ip is None:
        pytest.skip("this machine has no rfc1918 or ULA address to stand in for a LAN host")
    lan = Listener(ip, reply=REPLY)
    try:
        resolve = {"db.corp.example.test": ip, "meta.corp.example.test": "169.254.169.254",
                   "lo.corp.example.test": "127.0.0.1", "ll.corp.example.test": "169.254.1.1",
                   "other.wild.example.test": ip}  # fmt: skip
        allow = ["*.corp.example.test", "*.wild.example.test"]
        proxy = serve(
            resolve,
            ports=[lan.port, decoy[0].port],
            allow=allow,
            private_ok=["*.corp.example.test"],
        )
        target = f"[{ip}]" if ":" in ip else ip
        raw = f"GET http://db.corp.example.test:{lan.port}/ HTTP/1.1\r\n\r\n".encode()
        assert exchange(proxy.tcp_port, raw) == REPLY
        assert target not in lan.heads[0].decode()  # the name went upstream, not the address
        for host, cls in [("meta", "metadata"), ("lo", "loopback"), ("ll", "link-local")]:
            raw = f"CONNECT {host}.corp.example.test:{decoy[0].port} HTTP/1.1\r\n\r\n".encode()
            assert status(exchange(proxy.tcp_port, raw)) == 403, cls
        raw = f"CONNECT other.wild.example.test:{lan.port} HTTP/1.1\r\n\r\n".encode()
        assert status(exchange(proxy.tcp_port, raw)) == 403  # not opted in
        recs = proxy.records(6)
        assert (recs[0]["decision"], recs[0]["class"], recs[0]["address"]) == (
            "allow",
            address_class(ip),
            ip,
        )
        classes = ["metadata", "loopback", "link-local", address_class(ip)]
        # The GET's close line comes when its connection ends: it may follow the refusals.
        refused = [r["reason"] for r in recs if r.get("event") == "connect"][1:]
        assert refused == [f"resolves to {c} address" for c in classes]
        assert lan.accepted == 1 and [d.accepted for d in decoy] == [0] * len(decoy)
    finally:
        lan.close()


def test_refuse_nets_win_over_private_ok(
    serve: Callable[..., Served], decoy: list[Listener]
) -> None:
    resolve = {"db.corp.example.test": "10.9.8.7"}
    proxy = serve(resolve, allow=["*.corp.example.test"], private_ok=["*.corp.example.test"],
                  refuse_nets=["10.9.0.0/16"])  # fmt: skip
    reply = exchange(
        proxy.tcp_port, f"CONNECT db.corp.example.test:{decoy[0].port} HTTP/1.1\r\n\r\n".encode()
    )
    assert status(reply) == 403
    (rec,) = proxy.records(1)
    assert (rec["reason"], rec["class"]) == ("resolves to engine-network address", "engine-network")


def test_each_listener_has_its_own_allowlist(
    serve: Callable[..., Served], upstream: Listener
) -> None:
    keys = {"name": "keys", "tcp": ["127.0.0.1", 0], "allow": ["api.provider.example.test"]}
    pins = {ALLOWED: "127.0.0.1", "api.provider.example.test": "127.0.0.1"}
    proxy = serve(pins=pins, ports=[upstream.port], listeners=[keys])
    assert set(proxy.ports) == {"tcp", "keys"}
    ok_keys = f"GET http://api.provider.example.test:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
    ok_agent = f"GET http://{ALLOWED}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
    assert exchange(proxy.ports["keys"], ok_keys) == REPLY
    assert status(exchange(proxy.ports["keys"], ok_agent)) == 403
    assert status(exchange(proxy.tcp_port, ok_keys)) == 403
    recs = [r for r in proxy.records(4) if r["event"] == "connect"]
    assert [(r["listener"], r["decision"]) for r in recs] == [
        ("keys", "allow"), ("keys", "deny"), ("tcp", "deny")]  # fmt: skip


def test_open_tunnel_is_logged_at_connect_and_listed_as_open(
    serve: Callable[..., Served], holder: Holder
) -> None:
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[holder.port])
    sock, code = tunnel(proxy.tcp_port, f"{ALLOWED}:{holder.port}")
    with sock:
        assert code == 200
        sock.sendall(b"some bytes")
        (rec,) = proxy.records(1)
        assert (rec["event"], rec["decision"], rec["host"]) == ("connect", "allow", ALLOWED)
        assert [r["id"] for r in egress.open_tunnels(proxy.log.read_text())] == [rec["id"]]
    recs = proxy.records(2)
    assert recs[1]["event"] == "close" and recs[1]["bytes_up"] == len(b"some bytes")
    assert egress.open_tunnels(proxy.log.read_text()) == []


def test_log_stops_at_its_cap_with_one_truncated_line(serve: Callable[..., Served]) -> None:
    proxy = serve(log_max_bytes=2000)
    for _ in range(30):
        exchange(proxy.tcp_port, b"CONNECT nope.example.test:443 HTTP/1.1\r\n\r\n")
    time.sleep(0.5)
    text = proxy.log.read_text()
    assert len(text) <= 2000
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[-1]["event"] == "log truncated"
    assert sum(r["event"] == "log truncated" for r in lines) == 1
    assert (
        status(exchange(proxy.tcp_port, b"CONNECT nope.example.test:443 HTTP/1.1\r\n\r\n")) == 403
    )


# ------------------------------------------------------------- load and resilience


def test_connections_past_the_cap_get_503_at_once_and_are_logged(
    serve: Callable[..., Served], holder: Holder, upstream: Listener
) -> None:
    pins = {ALLOWED: "127.0.0.1"}
    proxy = serve(pins=pins, ports=[holder.port, upstream.port], max_conns=3)
    held = [tunnel(proxy.tcp_port, f"{ALLOWED}:{holder.port}") for _ in range(3)]
    assert [code for _, code in held] == [200] * 3
    t0 = time.monotonic()
    sock, code = tunnel(proxy.tcp_port, f"{ALLOWED}:{holder.port}")
    assert code == 503 and time.monotonic() - t0 < 2
    sock.close()
    for s, _ in held:
        s.close()
    recs = proxy.records(7)
    busy = [r for r in recs if r["reason"] == "too many connections"]
    assert len(busy) == 1 and busy[0]["decision"] == "deny" and busy[0]["listener"] == "tcp"
    deadline = time.monotonic() + 10
    while sum(r["event"] == "close" for r in proxy.records(0)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        exchange(proxy.tcp_port, f"GET http://{ALLOWED}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode())
        == REPLY
    )


def test_300_held_tunnels_do_not_kill_the_proxy(
    serve: Callable[..., Served], holder: Holder, upstream: Listener
) -> None:
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[holder.port, upstream.port])
    held = [tunnel(proxy.tcp_port, f"{ALLOWED}:{holder.port}") for _ in range(300)]
    codes = [code for _, code in held]
    cap = 256  # the default max_conns
    assert codes.count(200) == cap and codes.count(503) == 300 - cap
    for s, code in held:
        if code == 200:
            s.sendall(b"x")  # every held tunnel carries data
    assert proxy.proc.poll() is None
    connects = [r for r in proxy.records(300) if r["event"] == "connect"]
    assert len(connects) == 300 and len({r["id"] for r in connects}) == 300
    for s, _ in held:
        s.close()
    deadline = time.monotonic() + 20
    while (
        sum(r["event"] == "close" for r in proxy.records(0)) < cap and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert sum(r["event"] == "close" for r in proxy.records(0)) == cap
    raw = f"GET http://{ALLOWED}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
    assert exchange(proxy.tcp_port, raw) == REPLY
    assert proxy.proc.poll() is None


def test_thread_start_failure_is_a_503_not_a_crash(
    serve: Callable[..., Served], short_dir: Path, upstream: Listener
) -> None:
    flag = short_dir / "no-threads"
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[upstream.port],
                  launcher_env={"EGX_THREAD_FLAG": str(flag)})  # fmt: skip
    raw = f"GET http://{ALLOWED}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
    flag.touch()
    for _ in range(3):
        assert status(exchange(proxy.tcp_port, raw)) == 503
    flag.unlink()
    assert exchange(proxy.tcp_port, raw) == REPLY
    recs = proxy.records(5)
    assert [r["reason"] for r in recs[:3]] == ["no thread for the connection"] * 3
    assert proxy.proc.poll() is None


def test_out_of_file_descriptors_the_proxy_waits_and_serves_again(
    serve: Callable[..., Served], holder: Holder, upstream: Listener
) -> None:
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[holder.port, upstream.port],
                  launcher_env={"EGX_NOFILE": "40"})  # fmt: skip
    held = []
    for _ in range(25):  # each tunnel costs the proxy two descriptors: it runs out
        with contextlib.suppress(OSError):
            sock = socket.create_connection(("127.0.0.1", proxy.tcp_port), timeout=2)
            sock.sendall(f"CONNECT {ALLOWED}:{holder.port} HTTP/1.1\r\n\r\n".encode())
            held.append(sock)
    time.sleep(1)
    assert proxy.proc.poll() is None
    for s in held:
        s.close()
    time.sleep(1)
    raw = f"GET http://{ALLOWED}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
    assert exchange(proxy.tcp_port, raw) == REPLY
    assert proxy.proc.poll() is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00" * 5000, b"\xff\xfe" * 100 + b"\r\n\r\n", b"CONNECT " + b"a" * 20000,
     b"GET http://%s/ HTTP/1.1\r\n\r\n" % b".".join([b"a"] * 200), b"CONNECT :443 HTTP/1.1\r\n\r\n",
     b"CONNECT [::1 HTTP/1.1\r\n\r\n", b"CONNECT \xc3\xa9.example.test:443 HTTP/1.1\r\n\r\n"],
)  # fmt: skip
def test_malformed_input_never_kills_the_proxy(
    serve: Callable[..., Served], upstream: Listener, raw: bytes
) -> None:
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[upstream.port])
    for _ in range(3):
        with contextlib.suppress(OSError):
            exchange(proxy.tcp_port, raw, half_close=True)
    ok = f"GET http://{ALLOWED}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
    assert exchange(proxy.tcp_port, ok) == REPLY
    assert proxy.proc.poll() is None


def test_tunnel_relays_both_ways_at_once_in_one_thread(
    serve: Callable[..., Served], short_dir: Path
) -> None:
    # An echo upstream that writes while the client is still writing: neither may stall.
    echo = socket.create_server(("127.0.0.1", 0))

    def run_echo() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=run_echo, daemon=True).start()
    port = echo.getsockname()[1]
    proxy = serve(pins={ALLOWED: "127.0.0.1"}, ports=[port])
    sock, code = tunnel(proxy.tcp_port, f"{ALLOWED}:{port}")
    assert code == 200
    blob, got = os.urandom(4 * 1024 * 1024), bytearray()

    def reader() -> None:
        while len(got) < len(blob) and (chunk := sock.recv(65536)):
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    sock.sendall(blob)
    sock.shutdown(socket.SHUT_WR)
    t.join(30)
    sock.close()
    echo.close()
    assert bytes(got) == blob
    _, closed = proxy.records(2)
    assert closed["bytes_up"] == closed["bytes_down"] == len(blob)


# ------------------------------------------------------ relay: splice and its fallback


def relay_both_ways(size: int = 3 * 1024 * 1024) -> tuple[bytes, bytes, list[int]]:
    """Run ``egressproxy.relay`` in process between two socket pairs; return what each
    far end received and the relay's counters. Both ends write at once, then half-close."""
    a_far, a = socket.socketpair()
    b, b_far = socket.socketpair()
    up, down = os.urandom(size), os.urandom(size // 2 + 7)
    got = {a_far.fileno(): bytearray(), b_far.fileno(): bytearray()}
    counter = [0, 0]
    relay = threading.Thread(target=egressproxy.relay, args=(a, b, counter))
    relay.start()

    def end(sock: socket.socket, data: bytes) -> None:
        writer = threading.Thread(
            target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR))
        )
        writer.start()
        while chunk := sock.recv(65536):
            got[sock.fileno()].extend(chunk)
        writer.join(30)

    ends = [threading.Thread(target=end, args=p) for p in ((a_far, up), (b_far, down))]
    for t in ends:
        t.start()
    for t in (*ends, relay):
        t.join(30)
    received = bytes(got[b_far.fileno()]), bytes(got[a_far.fileno()])
    a_far.close()
    b_far.close()
    assert received == (up, down)
    return received[0], received[1], counter


def test_relay_splices_both_ways_without_losing_a_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    real = os.splice

    def counting(*args: Any, **kwargs: Any) -> int:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "splice", counting)
    up, down, counter = relay_both_ways()
    assert counter == [len(up), len(down)]
    assert calls[0] > 0  # the kernel moved the bytes


@pytest.mark.parametrize("refused_at", [1, 7, 40])
def test_relay_falls_back_to_recv_send_when_splice_is_refused(
    monkeypatch: pytest.MonkeyPatch, refused_at: int
) -> None:
    # As under gVisor: splice fails with EINVAL, at once or after some bytes already
    # sit in the pipe (a refused send): those bytes must still arrive, in order.
    import errno

    calls = [0]
    real = os.splice

    def refusing(*args: Any, **kwargs: Any) -> int:
        calls[0] += 1
        if calls[0] >= refused_at:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "splice", refusing)
    up, down, counter = relay_both_ways()
    assert counter == [len(up), len(down)]


def test_relay_works_without_os_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "splice")  # Python 3.9
    up, down, counter = relay_both_ways(512 * 1024)
    assert counter == [len(up), len(down)]


def test_egressproxy_stays_short_enough_to_audit() -> None:
    source = Path(egressproxy.__file__).read_text()
    # 556 with the handoff, 590 with the upstream socket given to the key proxy (its
    # bytes skip a relay); issue 11 aims at 450.
    assert len(source.splitlines()) <= 590
    assert "Security properties of ``serve``:" in source
