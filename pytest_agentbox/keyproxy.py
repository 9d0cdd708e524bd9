"""Key proxy of an agentbox sandbox: stdlib only, Python 3.9+, one file, run as root.

One JSON config line on stdin is the only way real keys arrive (never argv, env or
disk). It binds one 127.0.0.1 port per route, prints ``{"ready": true, "ports": {...}}``
and serves: the agent holds a session token, the proxy swaps it for the real key.
Security properties:
- Token required (``Authorization: Bearer``, ``x-api-key`` or the route's header),
  compared in constant time; else 403. Nothing the agent sent is ever echoed.
- The head is checked as raw bytes (no lenient parser), 64 KiB at most (431): CRLF
  line ends only; no bare CR/LF, NUL or other controls (HTAB only in values); no
  obs-fold; token header names; origin-form target without spaces, controls or "#";
  HTTP/1.0 or 1.1 only (505). Any header name spelling "transfer-encoding" is refused;
  Content-Length is digits (repeats identical); over 100 MiB is 413 unread.
- The whole request is read and checked before the upstream is contacted; one request
  per connection (``Connection: close``), bytes after the body are never forwarded;
  60 s socket timeouts; at most 64 connections served at once.
- Upstream pinned per route, TLS verified (system CAs plus ``ca_pem``), through the
  egress CONNECT proxy when configured. Hop-by-hop, Host, Cookie and the agent's auth
  headers are dropped; the real key is set in the route's style.
- Response headers pass only from an allowlist; the body streams as it arrives (SSE).
- Errors are fixed texts, never exception text. The request log (0600) holds route,
  method, path without query, status, sizes, time: no headers, keys or tokens.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import http.client
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

HEAD_MAX, BODY_MAX, BUF = 64 * 1024, 100 * 1024 * 1024, 64 * 1024
TIMEOUT = 60.0
LINGER, SLOTS = 2.0, threading.BoundedSemaphore(64)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*")  # origin-form: visible ASCII, no "#"
_VERSION = re.compile(rb"HTTP/[0-9](?:\.[0-9])?")
_DIGITS = re.compile(rb"[0-9]+")
_DOMAIN = re.compile(r"([a-z0-9-]{1,63}\.)+[a-z][a-z0-9-]{0,62}")  # a name, never an IP
_BARE = re.compile(rb"(?<!\r)\n|\r[^\n]")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # HTAB is the one control allowed
_NOT_ALNUM = re.compile(rb"[^a-z0-9]")
_SAFE_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"transfer-encoding"}
_DROP = _HOP | {b"host", b"authorization", b"x-api-key", b"cookie", b"content-length", b"expect"}
_ALLOW_WORDS = "content-type content-length content-encoding date cache-control retry-after"
_ALLOW = frozenset(f"{_ALLOW_WORDS} request-id x-request-id openai-processing-ms".split())
_ALLOW |= {"openai-version", "anthropic-version"}
_ALLOW_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "ratelimit-")
_TEXT = {400: "Bad request", 403: "Missing or invalid session token", 408: "Request timed out"}
_TEXT |= {413: "Request body too large", 431: "Request head too large"}
_TEXT |= {502: "Upstream connection failed", 504: "Upstream timed out"}
_TEXT |= {505: "HTTP version not supported"}
if TYPE_CHECKING:  # aliases only for checkers: "int | None" fails at runtime on 3.9
    Headers = list[tuple[bytes, bytes]]
    Request = tuple[str, str, Headers, int | None, bytes]


class Refused(Exception):
    """The request is answered with ``Refused(status)`` and never forwarded."""


class ConfigError(ValueError):
    """A config field is invalid; the message is a fixed text, never a value."""


def read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """Read up to CRLFCRLF within 64 KiB and 60 s; return (head, bytes after it)."""
    data, deadline = bytearray(), time.monotonic() + TIMEOUT
    while True:
        start = max(0, len(data) - 3)
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(BUF)
        if not chunk:
            raise Refused(400)
        data += chunk
        end = data.find(b"\r\n\r\n", start)
        if end >= 0:
            if end > HEAD_MAX:
                raise Refused(431)
            return bytes(data[:end]), bytes(data[end + 4 :])
        if _BARE.search(data, start):  # a bare-LF client would never send CRLFCRLF
            raise Refused(400)
        if len(data) > HEAD_MAX + 4:
            raise Refused(431)


def parse_head(head: bytes) -> tuple[str, str, bytes, Headers]:
    """Strictly parse a head into (method, target, version, [(name, value)])."""
    lines = head.split(b"\r\n")
    if any(_CTL.search(line) for line in lines):
        raise Refused(400)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise Refused(400)
    if parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise Refused(505 if _VERSION.fullmatch(parts[2]) else 400)
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if b"transferencoding" in _NOT_ALNUM.sub(b"", name.lower()):
            raise Refused(400)  # any spelling a lenient server might still honour
        if not colon or not _TOKEN.fullmatch(name):  # also obs-fold: name starts with SP
            raise Refused(400)
        headers.append((name, value.strip(b" \t")))
    return parts[0].decode(), parts[1].decode(), parts[2], headers


def body_length(headers: Headers) -> int | None:
    """The declared body length (None if undeclared); 400 if invalid, 413 if too big."""
    values = {v for n, v in headers if n.lower() == b"content-length"}
    if not values:
        return None
    value = values.pop()
    if values or not _DIGITS.fullmatch(value):
        raise Refused(400)
    value = value.lstrip(b"0") or b"0"
    if len(value) > 10 or int(value) > BODY_MAX:  # no giant int() on a 64 KiB number
        raise Refused(413)
    return int(value)


class Proxy:
    """The validated config plus what every connection shares (TLS context, log)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.token = str(cfg["token"]).encode()
        self.port = int(cfg.get("upstream_port") or 443)
        self.via = cfg.get("upstream_proxy")
        self.ctx = ssl.create_default_context()  # system CAs, hostname check, CERT_REQUIRED
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.get("ca_pem"):  # in addition: cadata= in create_default_context replaces them
            self.ctx.load_verify_locations(cadata=str(cfg["ca_pem"]))
        self.lock, self.log_fd = threading.Lock(), -1
        if cfg.get("log_path"):
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.log_fd = os.open(str(cfg["log_path"]), flags, 0o600)
            os.fchmod(self.log_fd, 0o600)

    def authorized(self, route: dict[str, Any], headers: Headers) -> bool:
        """True if any auth header carries the session token (constant-time compare)."""
        ok, own = False, route["header"].lower()
        for name, value in headers:
            name = name.lower()
            if name == b"authorization":  # only as a Bearer credential
                scheme, _, credential = value.partition(b" ")
                ok |= scheme.lower() == b"bearer" and hmac.compare_digest(credential, self.token)
            elif name in (b"x-api-key", own):
                ok |= hmac.compare_digest(value, self.token)
        return ok

    def receive(self, route: dict[str, Any], conn: socket.socket, rec: dict[str, Any]) -> Request:
        """Read and check one whole request; Refused(status) on any failure."""
        head, rest = read_head(conn)
        rec["bytes_in"] = len(head) + 4
        method, target, version, headers = parse_head(head)
        rec.update(method=method[:32], path=target.split("?", 1)[0][:2048])
        length = body_length(headers)
        if not self.authorized(route, headers):
            raise Refused(403)
        expect = any(n.lower() == b"expect" and v.lower() == b"100-continue" for n, v in headers)
        if expect and length and version == b"HTTP/1.1" and len(rest) < length:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray(rest[: length or 0])
        while length and len(body) < length:
            conn.settimeout(TIMEOUT)
            chunk = conn.recv(min(BUF, length - len(body)))  # never read past the body
            if not chunk:
                raise Refused(400)
            body += chunk
        rec["bytes_in"] += len(body)
        return method, target, headers, length, bytes(body)

    def forward(self, route: dict[str, Any], req: Request) -> http.client.HTTPSConnection:
        """Open the pinned upstream (tunnelled when configured) and send the request."""
        method, target, headers, length, body = req
        if self.via:
            host, port = str(self.via["host"]), int(self.via["port"])
        else:
            host, port = route["domain"], self.port
        up = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=self.ctx)
        if self.via:  # TLS still checks the certificate against the pinned domain
            up.set_tunnel(route["domain"], self.port)
        named = [v for n, v in headers if n.lower() == b"connection"]
        drop = {t.strip().lower() for v in named for t in v.split(b",")}
        drop |= _DROP | {route["header"].lower()}
        host_value = route["domain"] if self.port == 443 else f"{route['domain']}:{self.port}"
        try:
            up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            up.putheader(b"Host", host_value.encode())
            for name, value in headers:
                if name.lower() not in drop and not name.lower().startswith(b"proxy-"):
                    up.putheader(name, value)
            up.putheader(route["header"], route["value"])
            if length is not None:
                up.putheader(b"Content-Length", str(length).encode())
            up.endheaders(body or None)
        except BaseException:
            up.close()
            raise
        return up

    def handle(self, route: dict[str, Any], conn: socket.socket) -> None:
        """Serve exactly one request on ``conn``, log it, close the connection."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stalls
        start, upstream = time.monotonic(), None
        rec: dict[str, Any] = {"route": route["name"], "method": "", "path": "", "status": 0}
        rec.update(bytes_in=0, bytes_out=0)
        try:
            try:  # 1. the whole request is read and checked before anything is forwarded
                req = self.receive(route, conn, rec)
            except socket.timeout:  # noqa: UP041 -- not TimeoutError on Python 3.9
                raise Refused(408) from None
            try:  # 2. failures before any answer become fixed texts, never exception text
                upstream = self.forward(route, req)
                resp = upstream.getresponse()
            except socket.timeout:  # noqa: UP041
                raise Refused(504) from None
            except Exception:
                raise Refused(502) from None
            out, rec["status"] = response_head(resp), resp.status
            conn.settimeout(TIMEOUT)
            while out:  # 3. stream: what has arrived goes out at once (SSE)
                conn.sendall(out)
                rec["bytes_out"] += len(out)
                out = resp.read1(BUF)
        except Refused as exc:
            rec["status"] = status = exc.args[0]
            reply = f"HTTP/1.1 {status} {http.client.responses[status]}\r\n"
            reply += "Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
            reply += f"Content-Length: {len(_TEXT[status])}\r\n\r\n{_TEXT[status]}"
            with contextlib.suppress(OSError):
                conn.sendall(reply.encode())
                rec["bytes_out"] += len(reply)
        except Exception:  # noqa: S110 -- agent or upstream gone mid-answer: just close
            pass
        finally:
            if upstream is not None:
                upstream.close()
            rec["ms"] = int((time.monotonic() - start) * 1000)
            self.log(rec)
            linger_close(conn)

    def log(self, rec: dict[str, Any]) -> None:
        """Append one JSON line; the caller passes no header, key, token or query."""
        if self.log_fd >= 0:
            line = json.dumps({"ts": round(time.time(), 3), **rec}, sort_keys=True) + "\n"
            with self.lock, contextlib.suppress(OSError):
                os.write(self.log_fd, line.encode())


def response_head(resp: http.client.HTTPResponse) -> bytes:
    """Status line, allowlisted headers with safe values, ``Connection: close``."""
    lines = [f"HTTP/1.1 {resp.status} {http.client.responses.get(resp.status, 'Unknown')}"]
    for name, value in resp.getheaders():
        low, ok_name = name.lower(), _TOKEN.fullmatch(name.encode("latin-1"))
        allowed = low in _ALLOW or low.startswith(_ALLOW_PREFIXES)
        if allowed and ok_name and low != "content-length" and _SAFE_VALUE.fullmatch(value):
            lines.append(f"{name}: {value}")
    length = resp.headers.get("content-length") or ""
    if _DIGITS.fullmatch(length.encode("latin-1")) and not resp.chunked:
        lines.append(f"Content-Length: {length}")  # only the value http.client frames by
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def linger_close(conn: socket.socket) -> None:
    """Half-close, then drain briefly: closing with unread input would reset the answer."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            if not conn.recv(BUF):
                break
    conn.close()


def accept_loop(listener: socket.socket, handler: Any) -> None:
    """Accept forever; one thread per connection, 64 at most (then the backlog queues)."""

    def run(conn: socket.socket) -> None:
        try:
            handler(conn)
        finally:
            SLOTS.release()

    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # e.g. out of descriptors: back off, keep serving
            time.sleep(0.1)
            continue
        SLOTS.acquire()
        try:
            threading.Thread(target=run, args=(conn,), daemon=True).start()
        except RuntimeError:  # out of threads
            SLOTS.release()
            conn.close()


def load_config(line: str) -> dict[str, Any]:
    """Parse and check the config; each route gets its auth ``header`` and ``value``."""
    cfg = json.loads(line)
    if not isinstance(cfg, dict) or not re.fullmatch(r"[0-9a-f]{32,256}", str(cfg.get("token"))):
        raise ConfigError("token must be 32+ lowercase hex digits")
    routes, names = cfg.get("routes"), set()
    if not isinstance(routes, list) or not routes:
        raise ConfigError("routes must be a non-empty list")
    for r in routes:
        domain, style, key = str(r.get("domain")), str(r.get("auth_style")), str(r.get("key"))
        if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
            raise ConfigError("route domain must be a lowercase host name, not an IP")
        if not re.fullmatch(r"[\x21-\x7e]{1,8192}", key) or r.get("name") in names:
            raise ConfigError("route key must be visible ASCII; route names unique")
        names.add(r.get("name"))
        header = {"bearer": "Authorization", "x-api-key": "x-api-key"}.get(style)
        if style.startswith("header:"):
            header = style[7:]
            low = header.lower().encode()
            if not _TOKEN.fullmatch(header.encode()) or low in _DROP or low.startswith(b"proxy-"):
                raise ConfigError("auth_style header:<Name> needs a token name not managed here")
        if header is None:
            raise ConfigError("auth_style must be bearer, x-api-key or header:<Name>")
        r["header"] = header.encode()
        r["value"] = ("Bearer " + key if style == "bearer" else key).encode()
    via = cfg.get("upstream_proxy")
    if via is not None and not (isinstance(via, dict) and via.get("host") and int(via["port"])):
        raise ConfigError("upstream_proxy must be null or {host, port}")
    return cfg


def main() -> int:
    """Read the config line, bind, print the ready line, serve forever."""
    try:
        cfg = load_config(sys.stdin.readline())
        proxy = Proxy(cfg)
        listeners = [(r, socket.create_server(("127.0.0.1", 0))) for r in cfg["routes"]]
    except Exception as exc:  # the config holds keys: report a fixed text or a type only
        error = str(exc) if isinstance(exc, ConfigError) else type(exc).__name__
        print(json.dumps({"ready": False, "error": error}), flush=True)
        return 1
    ports = {str(r["name"]): s.getsockname()[1] for r, s in listeners}
    print(json.dumps({"ready": True, "ports": ports}), flush=True)
    null = os.open(os.devnull, os.O_RDWR)  # the launcher may detach: never write to a closed pipe
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for route, sock in listeners[1:]:
        handler = functools.partial(proxy.handle, route)
        threading.Thread(target=accept_loop, args=(sock, handler), daemon=True).start()
    route, sock = listeners[0]
    accept_loop(sock, functools.partial(proxy.handle, route))
    return 0


if __name__ == "__main__":
    sys.exit(main())
