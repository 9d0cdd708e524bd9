"""The egress proxy as real local processes on loopback, plus its pure decision functions.

``serve`` runs under a small launcher that replaces ``socket.getaddrinfo`` with a table:
names in the table resolve to the given address, every other lookup fails and is
recorded. So no test ever asks a real DNS server, and a test can prove that a refused
request was decided *before* any lookup. The enforcement file itself has no test hook.
Nothing here connects anywhere but 127.0.0.1, ::1 and this machine's own address.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
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

from pytest_agentbox import egressproxy
from pytest_agentbox.egressproxy import (
    address_refused,
    host_allowed,
    is_ip_literal,
    parse_head,
    valid_fqdn,
)

SCRIPT = str(Path(egressproxy.__file__).resolve())
ALLOWED = "api.example.test"

# Runs egressproxy.py unchanged, with a table resolver that never touches the network.
LAUNCHER = r"""
import json, os, runpy, socket, sys
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
        mode: str, cfg: dict[str, Any], resolve: dict[str, str] | None = None, lookups: str = ""
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        argv = [sys.executable, SCRIPT, mode]
        env = dict(os.environ)
        if resolve is not None:
            argv = [sys.executable, "-c", LAUNCHER, SCRIPT, mode]
            env.update(EGX_RESOLVE=json.dumps(resolve), EGX_LOOKUPS=lookups)
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

    def __init__(self, tcp_port: int, sock_path: Path, log: Path, lookups: Path) -> None:
        self.tcp_port, self.sock_path, self.log, self.lookups = tcp_port, sock_path, log, lookups

    def records(self, count: int) -> list[dict[str, Any]]:
        """Wait for ``count`` decision lines (they are written after the client's EOF)."""
        deadline = time.monotonic() + 10
        while True:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.02)

    def looked_up(self) -> list[str]:
        return self.lookups.read_text().split() if self.lookups.exists() else []


@pytest.fixture
def serve(
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]],
    short_dir: Path,
    decoy: list[Listener],
) -> Callable[..., Served]:
    def start(resolve: dict[str, str] | None = None, ports: list[int] | None = None) -> Served:
        sock_path, log, lookups = short_dir / "e.sock", short_dir / "d.jsonl", short_dir / "lk"
        cfg = {
            "listen_unix": str(sock_path),
            "listen_tcp": ["127.0.0.1", 0],
            # IP literals are listed on purpose: they must be refused all the same.
            "allow": [ALLOWED, "*.wild.example.test", "127.0.0.1", "::1", "2130706433"],
            "ports": ports or [80, 443, decoy[0].port],
            "log_path": str(log),
            "socket_mode": 0o600,
        }
        _, ready = launch("serve", cfg, resolve or {}, str(lookups))
        assert ready["ready"] is True
        assert isinstance(ready["tcp_port"], int)
        return Served(ready["tcp_port"], sock_path, log, lookups)

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
    assert all(set(rec) == fields for rec in recs)
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
    assert proxy.looked_up() == [ALLOWED]
    assert [d.accepted for d in decoy] == [0] * len(decoy)


def test_unresolvable_allowed_name_is_502(serve: Callable[..., Served]) -> None:
    proxy = serve(resolve={})
    reply = exchange(proxy.tcp_port, b"CONNECT sub.wild.example.test:443 HTTP/1.1\r\n\r\n")
    assert status(reply) == 502
    (rec,) = proxy.records(1)
    assert (rec["decision"], rec["reason"]) == ("deny", "DNS resolution failed")
    assert proxy.looked_up() == ["sub.wild.example.test"]


def own_address() -> str | None:
    """A non-loopback address of this machine, found without sending any packet."""
    with contextlib.suppress(OSError):
        ip = socket.gethostbyname(socket.gethostname())
        if address_refused(ip) is None:
            return ip
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("192.0.2.1", 9))  # UDP connect only picks a route; nothing is sent
        ip = udp.getsockname()[0]
        if address_refused(ip) is None:
            return ip
    return None


@pytest.fixture
def upstream() -> Iterator[Listener]:
    ip = own_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback address; the container tests cover allow")
    body = b"hello from upstream"
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(body),
        body,
    )
    server = Listener(ip, reply=reply)
    yield server
    server.close()


def test_allowed_connect_tunnel_relays_and_logs_bytes(
    serve: Callable[..., Served], upstream: Listener
) -> None:
    ip = upstream.sock.getsockname()[0]
    name = "Sub.Wild.Example.Test."
    proxy = serve(resolve={"sub.wild.example.test": ip}, ports=[upstream.port])
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
    (rec,) = proxy.records(1)
    assert (rec["decision"], rec["reason"], rec["host"]) == ("allow", "allowlisted", name)
    assert (rec["bytes_up"], rec["bytes_down"]) == (len(inner), len(upstream.reply))


def test_allowed_plain_http_is_rewritten_to_origin_form(
    serve: Callable[..., Served], upstream: Listener
) -> None:
    ip = upstream.sock.getsockname()[0]
    proxy = serve(resolve={ALLOWED: ip}, ports=[upstream.port])
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
    (rec,) = proxy.records(1)
    assert rec["decision"] == "allow"
    assert rec["bytes_down"] == len(upstream.reply)


# ---------------------------------------------------------------- unix socket and forward


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_unix_socket_gets_the_configured_mode(
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]],
    short_dir: Path,
    mode: int,
) -> None:
    sock_path = short_dir / "m.sock"
    cfg = {"listen_unix": str(sock_path), "listen_tcp": None, "allow": [], "socket_mode": mode}
    _, ready = launch("serve", cfg)
    assert ready == {"ready": True, "tcp_port": None}
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_forward_relays_to_serve_over_the_unix_socket(
    serve: Callable[..., Served],
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]],
    decoy: list[Listener],
) -> None:
    proxy = serve()
    _, ready = launch("forward", {"listen": ["127.0.0.1", 0], "unix": str(proxy.sock_path)})
    assert ready["ready"] is True
    assert ready["port"] != proxy.tcp_port
    # Half-close: the client stops sending right after its request and still gets the answer.
    raw = b"CONNECT undeclared.example.test:443 HTTP/1.1\r\n\r\n"
    reply = exchange(ready["port"], raw, half_close=True)
    assert status(reply) == 403
    assert reply.endswith(b"host not in allowlist\n")
    reply = exchange(ready["port"], f"CONNECT 127.1:{decoy[0].port} HTTP/1.1\r\n\r\n".encode())
    assert status(reply) == 403
    recs = proxy.records(2)
    assert [r["host"] for r in recs] == ["undeclared.example.test", "127.1"]
    assert [d.accepted for d in decoy] == [0] * len(decoy)


def test_forward_without_serve_closes_the_connection(
    launch: Callable[..., tuple[subprocess.Popen[bytes], dict[str, Any]]], short_dir: Path
) -> None:
    _, ready = launch("forward", {"listen": ["127.0.0.1", 0], "unix": str(short_dir / "none")})
    # Closed at once: an empty read, or a reset because the request was left unread.
    with contextlib.suppress(ConnectionResetError):
        assert exchange(ready["port"], b"CONNECT a.example.test:443 HTTP/1.1\r\n\r\n") == b""


@pytest.mark.parametrize(
    ("mode", "cfg"),
    [
        ("serve", {"allow": []}),
        ("forward", {"listen": ["127.0.0.1", 0]}),
        ("serve", {"listen_tcp": ["256.0.0.1", 0]}),
    ],
    ids=["no-listener", "no-unix", "bad-address"],
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


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("169.254.169.254", "metadata address"),
        ("fd00:ec2::254", "metadata address"),
        ("::ffff:169.254.169.254", "metadata address"),
        ("64:ff9b::a9fe:a9fe", "metadata address"),
        ("127.0.0.1", "loopback address"),
        ("127.255.0.1", "loopback address"),
        ("::1", "loopback address"),
        ("::ffff:127.0.0.1", "loopback address"),
        ("169.254.10.20", "link-local address"),
        ("fe80::1", "link-local address"),
        ("fe80::1%eth0", "link-local address"),
        ("0.0.0.0", "unspecified address"),
        ("::", "unspecified address"),
        ("224.0.0.1", "multicast address"),
        ("ff02::1", "multicast address"),
        ("0.1.2.3", "reserved address"),
        ("255.255.255.255", "reserved address"),
        ("10.1.2.3", None),
        ("172.17.0.2", None),
        ("192.168.1.1", None),
        ("fd00::2", None),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_refused(ip: str, reason: str | None) -> None:
    assert address_refused(ip) == reason


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
