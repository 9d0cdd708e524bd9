"""Key proxy of an agentbox sandbox: stdlib only, Python 3.9+, one file, run as root.

Keys arrive only in the JSON config line on stdin (never argv, env or disk). Each route
listens on 127.0.0.1 or a 0600 Unix socket (``"unix": PATH``, bound under a umask),
prints ``{"ready": true, "ports": {name: port}, "sockets": {name: path}}`` (or ``{"ready":
false, "error": TEXT}``, naming a field, never a value) and swaps the agent's session
token for the real key. ``"owner_stdin": true``: exit when stdin ends (the owner died).
Security properties:
- Token required (``Authorization: Bearer``, ``x-api-key`` or the route's header),
  constant-time compare, else 403. Nothing the agent sent is ever echoed.
- Heads checked as raw bytes, 64 KiB at most (431): CRLF only, no bare CR/LF, NUL or
  other controls (HTAB in values), no obs-fold, token names, origin-form target without
  controls or "#", never "//"; HTTP/1.0 or 1.1 (505); GET POST PUT PATCH DELETE HEAD
  OPTIONS only (405). No header name spelling "transfer-encoding"; Content-Length is
  digits (repeats identical), over 100 MiB is 413 unread.
- One selector loop reads every head and body: idle or trickling connections hold no
  thread. One deadline per request for head and body (``request_timeout``, 60 s: 408).
  Past ``max_active`` (32) forwarded or ``max_connections`` (1024) open, 503 at once.
  Buffered request bytes capped (256 MiB). No descriptor, thread or agent error ends it.
- The whole request is checked before the upstream is contacted; one request per agent
  connection (``Connection: close``), bytes after the body are never forwarded.
- Upstream pinned per route, TLS verified (system CAs plus ``ca_pem``; memory BIOs, one
  receive per 256 KiB of records), via the egress CONNECT proxy's Unix socket when
  configured (or on the upstream socket it hands over).
  Hop-by-hop, Host, Cookie, Accept-Encoding and the agent's auth headers dropped; the key
  set in the route's style; identity asked for. Upstream connections are pooled
  (``pool_max`` 8 a route, 16 in all, ``pool_idle`` 15 s), reused
  only after an answer read to its exact end with no leak, cut or error, and only while
  quiet (no EOF, no stray byte); a stale one is retried for idempotent methods only.
- The key never comes back. Response headers pass from an allowlist; every passed header
  line and the whole body are scanned for each key: raw (so ``Bearer KEY``), base64 and
  base64url at all three alignments (so of any text holding it), hex (both cases),
  percent-encoded (minimal and every byte, both cases), JSON-escaped (plain, ``\\/``,
  HTML-safe). A hit becomes as many ``*`` (Content-Length holds) and is logged as
  ``{"event": "leak", "route", "path", "where": "body" | "header:NAME", "form",
  "count"}``. The scan streams: only a tail that could begin a pattern waits for the next
  read (SSE events never wait); it searches with libc's memmem (ctypes), else bytes.find.
  gzip and deflate are decoded (100 MiB at most, past it the connection is reset and
  logged with a ``note``) and sent as identity, close-delimited; any other
  content-encoding is 502, nothing passed.
- Errors are fixed texts, never exception text; an answer cut short, malformed or failing
  once begun is a reset. The request log (0600) holds route, method, path without
  query, status, sizes, time, ``reused``, ``note``: no headers, keys, tokens; at most
  ``log_max_bytes`` (8 MiB), then one ``{"event": "log truncated"}`` line.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import http.client
import io
import json
import os
import re
import resource
import select
import selectors
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

HEAD_MAX, BODY_MAX, BUF, DECODED_MAX = 64 * 1024, 100 * 1024 * 1024, 64 * 1024, 100 * 1024**2
TIMEOUT, ACTIVE_MAX, CONNS_MAX, BUFFERED_MAX, LINGER = 60.0, 32, 1024, 256 * 1024**2, 2.0
LOG_MAX = 8 * 1024 * 1024  # the request log, whatever the agent sends
METHODS = frozenset(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
# Idle pooled connections hold tunnels of the egress "keys" listener (64): 32 + 16 fit.
IDEMPOTENT, POOL_MAX, POOL_IDLE, POOL_TOTAL = METHODS - {"POST", "PATCH"}, 8, 15.0, 16
# Headers this proxy sets or drops itself: a key must never be put in one of them.
MANAGED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
MANAGED_HEADERS |= {"te", "trailer", "upgrade", "expect", "accept-encoding"}
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"/(?!/)[\x21\x22\x24-\x7e]*|/")  # origin-form, no "#", never "//"
_VERSION = re.compile(rb"HTTP/[0-9](?:\.[0-9])?")
_DIGITS = re.compile(rb"[0-9]+")
_DOMAIN = re.compile(r"([a-z0-9-]{1,63}\.)+[a-z][a-z0-9-]{0,62}")  # a name, never an IP
_PATH = re.compile(r"/[^\0]{1,106}")  # a Unix socket's path
_BARE = re.compile(rb"(?<!\r)\n|\r[^\n]")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # HTAB is the one control allowed
_NOT_ALNUM = re.compile(rb"[^a-z0-9]")
_SAFE_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"transfer-encoding"}
_DROP = _HOP | {b"host", b"authorization", b"x-api-key", b"cookie", b"content-length", b"expect"}
_DROP |= {b"accept-encoding"}
_ALLOW_WORDS = "content-type content-length content-encoding date cache-control retry-after"
_ALLOW = frozenset(f"{_ALLOW_WORDS} request-id x-request-id openai-processing-ms".split())
_ALLOW |= {"openai-version", "anthropic-version"}
_ALLOW_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "ratelimit-")
_TEXT = {400: "Bad request", 403: "Missing or invalid session token", 408: "Request timed out"}
_TEXT |= {405: "Method not allowed", 413: "Request body too large", 431: "Request head too large"}
_TEXT |= {502: "Upstream connection failed", 503: "Key proxy busy", 504: "Upstream timed out"}
_TEXT |= {505: "HTTP version not supported"}
_URLSAFE = bytes.maketrans(b"+/", b"-_")
LIMITS = {"request_timeout": (0.1, 3600), "pool_max": (0, 64), "pool_idle": (0.1, 300)}
LIMITS |= {"max_active": (1, 4096), "max_connections": (1, 65536), "upstream_port": (1, 65535)}
LIMITS |= {"log_max_bytes": (1024, 1 << 30), "handoff_fd": (3, 1 << 20)}
# What a pooled connection the upstream closed while idle fails with, before any answer.
_STALE = (ConnectionError, http.client.BadStatusLine, ssl.SSLEOFError, ssl.SSLZeroReturnError)
try:  # libc's memmem (glibc: linear time, a 2-byte-hash skip): 2-3x bytes.find on text
    import ctypes

    _MEMMEM: Any = ctypes.CDLL(None).memmem  # the loaded libc's own symbol: no file lookup
    _MEMMEM.restype = ctypes.c_void_p
    _MEMMEM.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
except (ImportError, OSError, AttributeError):  # a python without ctypes: bytes.find, as exact
    _MEMMEM = None

if TYPE_CHECKING:  # aliases only for checkers: "int | None" fails at runtime on 3.9
    Headers = list[tuple[bytes, bytes]]


class Refused(Exception):
    """The request is answered with ``Refused(status)`` and never forwarded."""


class Cut(Exception):
    """The answer had started: the agent's connection is reset (the reason is logged)."""


class ConfigError(ValueError):
    """A config field is invalid; the message names the field, never its value."""


def auth_header(style: str) -> str:
    """The header of a ``bearer``, ``x-api-key`` or ``header:<Name>`` key (host shares it)."""
    if style in ("bearer", "x-api-key"):
        return "Authorization" if style == "bearer" else "x-api-key"
    if not style.startswith("header:"):
        raise ValueError("auth_style must be 'bearer', 'x-api-key' or 'header:<Name>'")
    name = style[len("header:") :]
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}", name):
        raise ValueError("auth_style header:<Name> needs an HTTP token name of 1-64 characters")
    low = name.lower()
    if low in MANAGED_HEADERS or low.startswith("proxy-"):
        shown = low if low in MANAGED_HEADERS else "proxy-*"
        raise ValueError(f"auth_style header:{shown}: the key proxy sets or drops that header")
    return name


def parse_head(data: bytes) -> tuple[str, str, bytes, Headers]:
    """Strictly parse a head into (method, target, version, [(name, value)])."""
    lines = data.split(b"\r\n")
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
    if parts[0].decode() not in METHODS:  # CONNECT, TRACE and unknown verbs never go out
        raise Refused(405)
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


def leak_forms(key: bytes) -> dict[bytes, str]:
    """Every encoding of ``key`` an echo or debug endpoint could send back, with its name."""
    text = key.decode("ascii")
    escaped = json.dumps(text)[1:-1]
    html = escaped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    forms = {key: "raw"}
    for j in (escaped, escaped.replace("/", "\\/"), html):
        forms.setdefault(j.encode(), "json")
    for plain in list(forms):  # also base64 of a JSON document holding the key
        for shift in range(3):  # the part of base64(prefix + key + suffix) set by the key alone
            core = base64.b64encode(b"\0" * shift + plain)
            core = core[-(-8 * shift // 6) : 8 * (shift + len(plain)) // 6]
            forms.setdefault(core, "base64")
            forms.setdefault(core.translate(_URLSAFE), "base64url")
    for hexed in (key.hex(), key.hex().upper()):
        forms.setdefault(hexed.encode(), "hex")
    for pct in (quote(text, safe=""), "".join(f"%{b:02X}" for b in key)):
        forms.setdefault(pct.encode(), "percent")
        forms.setdefault(re.sub("%..", lambda m: m.group().lower(), pct).encode(), "percent")
    return forms


class Leaks:
    """The leak patterns of all keys, with what a linear, streaming scan needs."""

    def __init__(self, keys: list[bytes], native: bool = True) -> None:
        self.forms: dict[bytes, str] = {}
        for key in keys:
            for pattern, form in leak_forms(key).items():
                self.forms.setdefault(pattern, form)
        self.longest = max(map(len, self.forms))
        self.firsts: dict[int, list[bytes]] = {}
        for p in self.forms:
            self.firsts.setdefault(p[0], []).append(p)
        self.memmem = _MEMMEM if native else None  # native=False: the bytes.find fallback
        # A fill with fewer than k copies of a byte cannot hold a pattern that has k of it.
        # Counting to (at most) 4 by memchr skips the search on fills of few distinct bytes,
        # where memmem's 2-byte hashes can land near a pattern's end and step one byte.
        most = {p: max(set(p), key=p.count) for p in self.forms}
        self.needs = {p: (c, min(4, p.count(c))) for p, c in most.items()}

    def mask(self, buf: bytes) -> tuple[bytes, list[str]]:
        """``buf`` with every pattern replaced by as many ``*``, and the forms found."""
        found = self.scan(out := bytearray(buf), len(buf))
        return (bytes(out) if found else buf), found

    def holds(self, buf: bytearray, end: int, pattern: bytes) -> bool:
        """False if ``buf[:end]`` has too few copies of ``pattern``'s most repeated byte."""
        (byte, count), at = self.needs[pattern], -1
        return all((at := buf.find(byte, at + 1, end)) >= 0 for _ in range(count))

    def any_in(self, buf: bytearray, end: int) -> bool:
        """True if some pattern occurs in ``buf[:end]``: exact, whichever search runs."""
        end = min(end, len(buf))  # memmem never reads past the buffer
        if end <= 0 or not self.memmem:
            return any(self.holds(buf, end, p) and buf.find(p, 0, end) >= 0 for p in self.forms)
        pin = ctypes.c_char.from_buffer(buf)  # while pinned, buf cannot be resized or freed
        at = ctypes.addressof(pin)
        return any(self.holds(buf, end, p) and self.memmem(at, end, p, len(p)) for p in self.forms)

    def scan(self, buf: bytearray, end: int) -> list[str]:
        """Mask every pattern in ``buf[:end]`` in place; return the forms found."""
        if not self.any_in(buf, end):
            return []
        seen, found = bytes(buf[:end]), []  # overlapping hits: find in the unmasked bytes
        for pattern, form in self.forms.items():
            at = seen.find(pattern)
            while at >= 0:
                buf[at : at + len(pattern)] = b"*" * len(pattern)
                found.append(form)
                at = seen.find(pattern, at + 1)
        return found

    def stream(self, read: Any, send: Any, seen: dict) -> None:
        """Send what ``read`` fills, masked, counting each form in ``seen["body", form]``."""
        buf, held = bytearray(4 * BUF + self.longest), 0
        view = memoryview(buf)  # filled in place: the held tail moves to its front, no joins
        while n := read(view[held:]):
            end = held + n
            for form in self.scan(buf, end):
                seen["body", form] = seen.get(("body", form), 0) + 1
            held = self.hold(buf[max(0, end - self.longest) : end])  # masked already
            send(view[: end - held])
            buf[:held] = buf[end - held : end]
        send(view[:held])

    def hold(self, buf: bytes) -> int:
        """Length of the longest end of ``buf`` that could still grow into a pattern."""
        tail, best = buf[max(0, len(buf) - self.longest + 1) :], 0
        for first, patterns in self.firsts.items():  # only where a pattern could begin
            at = tail.find(first)
            while 0 <= at < len(tail) - best:
                if any(len(p) > len(tail) - at and p.startswith(tail[at:]) for p in patterns):
                    best = len(tail) - at
                at = tail.find(first, at + 1)
        return best


class Conn:
    """An agent connection while the loop reads its request or drains it after the answer."""

    def __init__(self, sock: socket.socket, route: dict[str, Any], deadline: float) -> None:
        self.sock, self.route, self.deadline, self.state = sock, route, deadline, "head"
        self.buf, self.held, self.need, self.req = bytearray(), 0, 0, None
        self.start = time.monotonic()
        self.rec: dict[str, Any] = {"route": route["name"], "method": "", "path": ""}
        self.rec.update(status=0, bytes_in=0, bytes_out=0, reused=False)


class Proxy:
    """The validated config, the selector loop and the forwarding workers."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.token = str(cfg["token"]).encode()
        via, self.port = cfg.get("upstream_proxy"), int(cfg.get("upstream_port") or 443)
        self.via = str(via["unix"]) if via else None
        self.handoff_fd = cfg.get("handoff_fd")
        self.timeout = float(cfg.get("request_timeout") or TIMEOUT)
        self.max_active = int(cfg.get("max_active") or ACTIVE_MAX)
        self.max_conns = int(cfg.get("max_connections") or CONNS_MAX)
        self.pool_max = POOL_MAX if cfg.get("pool_max") is None else int(cfg["pool_max"])
        self.pool_idle = float(cfg.get("pool_idle") or POOL_IDLE)
        self.pool: dict[str, list[tuple[float, Any]]] = {}
        self.leaks = Leaks([str(r["key"]).encode() for r in cfg["routes"]])
        self.ctx = ssl.create_default_context()  # system CAs, hostname check, CERT_REQUIRED
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:  # in addition: cadata= in create_default_context replaces them
            if cfg.get("ca_pem"):
                self.ctx.load_verify_locations(cadata=str(cfg["ca_pem"]))
        except (ssl.SSLError, ValueError):
            raise ConfigError("ca_pem is not a valid PEM certificate bundle") from None
        self.lock, self.log_fd, self.active, self.buffered = threading.Lock(), -1, 0, 0
        self.log_left = int(cfg.get("log_max_bytes") or LOG_MAX)  # refusals are logged too
        self.conns: set[Conn] = set()
        self.back: list[Conn] = []
        if cfg.get("log_path"):
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                self.log_fd = os.open(str(cfg["log_path"]), flags, 0o600)
                os.fchmod(self.log_fd, 0o600)
            except OSError as exc:
                raise ConfigError(f"log_path cannot be opened: {exc.strerror}") from None

    def authorized(self, route: dict[str, Any], headers: Headers) -> bool:
        """True if any auth header carries the session token (constant-time compare)."""
        ok, own = False, route["header"].lower()
        bare = own == b"authorization" and route["auth_style"] != "bearer"  # header:Authorization
        for name, value in headers:
            name = name.lower()
            if name == b"authorization":  # a Bearer credential, or bare for its own route
                scheme, _, credential = value.partition(b" ")
                ok |= scheme.lower() == b"bearer" and hmac.compare_digest(credential, self.token)
                ok |= bare and hmac.compare_digest(value, self.token)
            elif name in (b"x-api-key", own):
                ok |= hmac.compare_digest(value, self.token)
        return ok

    def serve(self, listeners: list[tuple[dict[str, Any], socket.socket]]) -> None:
        """Accept and read every connection in one thread; workers only forward."""
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        for sock, data in [(self.wake_r, None), *((s, r) for r, s in listeners)]:
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, data)
        if self.handoff_fd is not None:
            self.sel.register(socket.socket(fileno=self.handoff_fd), selectors.EVENT_READ, "")
        paused, sweep = 0.0, 0.0
        while True:
            try:
                for key, _ in self.sel.select(0.1):
                    if key.data is None:
                        self.take_back()
                    elif key.data == "":
                        self.adopt(key.fileobj, listeners)
                    elif isinstance(key.data, Conn):
                        self.readable(key.data)
                    elif not self.accept(key.fileobj, key.data) and not paused:  # no fds
                        paused = time.monotonic() + 0.1
                        for _, sock in listeners:
                            self.sel.unregister(sock)
                now = time.monotonic()
                if paused and now >= paused:
                    paused = 0.0
                    for route, sock in listeners:
                        self.sel.register(sock, selectors.EVENT_READ, route)
                if now >= sweep:
                    sweep = now + 0.1
                    self.prune(now)
                    for c in [c for c in self.conns if c.deadline <= now]:
                        self.close(c) if c.state == "drain" else self.refuse(c, 408)
            except Exception:
                time.sleep(0.01)

    def accept(self, listener: Any, route: dict[str, Any]) -> bool:
        """Accept what is waiting; False when out of descriptors (the caller backs off)."""
        for _ in range(64):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return True
            except OSError:
                return False
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:  # no delayed-ACK stalls
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            over = len(self.conns) + self.active - self.max_conns
            if over >= 64:  # past the few a 503 is drained for: just close
                sock.close()
                continue
            c = Conn(sock, route, time.monotonic() + self.timeout)
            try:
                self.sel.register(sock, selectors.EVENT_READ, c)
            except (OSError, ValueError):
                sock.close()
                continue
            self.conns.add(c)
            if over >= 0:
                self.refuse(c, 503)
        return True

    def adopt(self, pair: Any, listeners: list) -> None:
        """Accept, from now on, on the listeners the supervisor hands over (once): bound in
        the agent's network namespace by its forwarder, one per route name."""
        self.sel.unregister(pair)
        with pair:
            msg, fds, _, _ = socket.recv_fds(pair, 65536, 16)
        routes = {r["name"]: r for r, _ in listeners}
        for name, fd in zip(json.loads(msg), fds):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, routes[name])
            listeners.append((routes[name], sock))

    def readable(self, c: Conn) -> None:
        try:
            data = c.sock.recv(min(BUF, c.need - len(c.buf)) if c.state == "body" else BUF)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close(c)
        if c.state == "drain":
            return None if data else self.close(c)
        if not data:  # end of input before a whole request
            return self.refuse(c, 400)
        try:
            if self.buffered + len(data) > BUFFERED_MAX:
                raise Refused(503)
            c.buf += data
            self.account(c)
            self.advance(c, len(data))
        except Refused as exc:
            self.refuse(c, exc.args[0])

    def advance(self, c: Conn, new: int) -> None:
        """Check the head once it is complete, then dispatch once the body is."""
        if c.state == "head":
            start = max(0, len(c.buf) - new - 3)
            end = c.buf.find(b"\r\n\r\n", start)
            if end < 0:
                if _BARE.search(c.buf, start):  # a bare-LF client would never send CRLFCRLF
                    raise Refused(400)
                if len(c.buf) > HEAD_MAX + 4:
                    raise Refused(431)
                return
            if end > HEAD_MAX:
                raise Refused(431)
            head, rest = bytes(c.buf[:end]), c.buf[end + 4 :]
            c.rec["bytes_in"] = end + 4
            method, target, version, headers = parse_head(head)
            c.rec.update(method=method, path=target.split("?", 1)[0][:2048])
            length = body_length(headers)
            if not self.authorized(c.route, headers):
                raise Refused(403)
            expect = (b"expect", b"100-continue") in [(n.lower(), v.lower()) for n, v in headers]
            if expect and length and version == b"HTTP/1.1" and len(rest) < length:
                with contextlib.suppress(OSError):
                    c.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            c.req, c.need, c.state = (method, target, headers, length), length or 0, "body"
            c.buf = bytearray(rest[: c.need])  # what follows the body is never forwarded
            self.account(c)
        if len(c.buf) < c.need:
            return
        with self.lock:
            busy = self.active >= self.max_active
            self.active += 0 if busy else 1
        if busy:  # answer at once rather than queue behind slow upstreams
            raise Refused(503)
        self.sel.unregister(c.sock)
        self.conns.discard(c)
        c.rec["bytes_in"] += len(c.buf)
        try:
            threading.Thread(target=self.work, args=(c,), daemon=True).start()
        except RuntimeError:  # out of threads
            with self.lock:
                self.active -= 1
            raise Refused(503) from None

    def account(self, c: Conn) -> None:
        with self.lock:
            self.buffered += len(c.buf) - c.held
        c.held = len(c.buf)

    def refuse(self, c: Conn, status: int) -> None:
        """Answer with a fixed text, log, then drain the connection for LINGER seconds."""
        c.rec["status"] = status
        with contextlib.suppress(OSError):
            c.rec["bytes_out"] += c.sock.send(reply(status))
        self.log_request(c)
        self.drain(c)

    def drain(self, c: Conn) -> None:
        """Half-close, read what is left: closing with unread input would reset the answer."""
        c.buf, c.state, c.deadline = bytearray(), "drain", time.monotonic() + LINGER
        self.account(c)
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_WR)
        if c not in self.conns:
            try:
                c.sock.setblocking(False)
                self.sel.register(c.sock, selectors.EVENT_READ, c)
                self.conns.add(c)
            except (OSError, ValueError):
                c.sock.close()

    def close(self, c: Conn) -> None:
        c.buf = bytearray()
        self.account(c)
        if c in self.conns:
            self.conns.discard(c)
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(c.sock)
        c.sock.close()

    def take_back(self) -> None:
        """Drain the connections the workers are done with."""
        with contextlib.suppress(OSError):
            while self.wake_r.recv(4096):
                pass
        with self.lock:
            done, self.back = self.back, []
        for c in done:
            self.drain(c)

    def work(self, c: Conn) -> None:
        """Forward one checked request and stream its answer, scanned for leaks."""
        up, leaks, reset, reuse = None, {}, False, False
        try:
            c.sock.settimeout(self.timeout)
            try:  # failures before any answer become fixed texts, never exception text
                up, sock, resp = self.exchange(c, bytes(c.buf))
            except socket.timeout:  # noqa: UP041 -- not TimeoutError on Python 3.9
                raise Refused(504) from None
            except Exception:
                raise Refused(502) from None
            finally:
                c.buf = bytearray()
                self.account(c)
            c.rec["status"] = resp.status
            self.relay(c, resp, leaks, sock)
            # Only an answer read to its exact end, clean, may leave its connection open.
            reuse = not leaks and not resp.will_close and ended(up, resp)
        except Refused as exc:
            c.rec["status"] = status = exc.args[0]
            with contextlib.suppress(OSError):
                c.sock.sendall(reply(status))
                c.rec["bytes_out"] += len(reply(status))
        except Cut as exc:
            c.rec["note"], reset = exc.args[0], True
        except http.client.IncompleteRead:  # also a bad chunk size
            c.rec["note"], reset = "upstream body cut short or malformed", True
        except Exception:  # agent or upstream gone mid-answer: a reset says it is incomplete
            reset = True
        finally:
            if up is not None:
                self.give_back(c.route, up, reuse)
            with self.lock:
                self.active -= 1
            self.log_request(c)
            for (where, form), count in leaks.items():
                self.log({"event": "leak", "route": c.route["name"], "path": c.rec["path"]}
                         | {"where": where, "form": form, "count": count})  # fmt: skip
            if reset:  # the body was cut: a reset tells the agent it is incomplete
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.sock.close()
            else:
                with self.lock:
                    self.back.append(c)
                with contextlib.suppress(OSError):
                    self.wake_w.send(b"\0")

    def exchange(self, c: Conn, body: bytes) -> tuple[Any, Any, http.client.HTTPResponse]:
        """Send on a quiet pooled connection, else a new one; if a pooled one turns out
        closed, only an idempotent request is sent again (on a new one): else 502."""
        up = self.take(c.route)
        while True:
            reused = up is not None
            if up is None:  # TLS checks the certificate against the pinned domain either way
                kind = Tunnel if self.via else http.client.HTTPSConnection
                up = kind(c.route["domain"], self.port, timeout=self.timeout, context=self.ctx)
                up.via = self.via  # read by Tunnel only
            try:
                self.forward(up, c.route, c.req, body)
                sock, c.rec["reused"] = up.sock, reused  # getresponse may drop up.sock
                return up, sock, up.getresponse()
            except BaseException as exc:
                up.close()
                if not (reused and isinstance(exc, _STALE) and c.req[0] in IDEMPOTENT):
                    raise
                up, c.rec["reused"] = None, False

    def take(self, route: dict[str, Any]) -> Any:
        """An idle pooled connection that is still quiet (no EOF, no stray bytes), or None."""
        with self.lock:
            idle = self.pool.setdefault(route["name"], [])
            while idle:
                since, up = idle.pop()
                poll = select.poll()
                poll.register(up.sock, select.POLLIN)
                quiet = not up.sock.pending() and not poll.poll(0)
                if quiet and time.monotonic() - since < self.pool_idle:
                    return up
                up.close()
        return None

    def give_back(self, route: dict[str, Any], up: Any, reuse: bool) -> None:
        """Pool ``up`` for the next request of its route, or close it."""
        with self.lock:
            idle = self.pool.setdefault(route["name"], [])
            total = sum(map(len, self.pool.values()))
            if reuse and up.sock is not None and len(idle) < self.pool_max and total < POOL_TOTAL:
                return idle.append((time.monotonic(), up))
        up.close()

    def prune(self, now: float) -> None:
        """Close the pooled connections idle for ``pool_idle`` seconds."""
        with self.lock:
            for idle in self.pool.values():
                while idle and now - idle[0][0] >= self.pool_idle:
                    idle.pop(0)[1].close()

    def forward(self, up: Any, route: dict[str, Any], req: Any, body: bytes) -> None:
        """Send the checked request on ``up`` with the route's key in place of the token."""
        method, target, headers, length = req
        named = [v for n, v in headers if n.lower() == b"connection"]
        drop = {t.strip().lower() for v in named for t in v.split(b",")}
        drop |= _DROP | {route["header"].lower()}
        host_value = route["domain"] if self.port == 443 else f"{route['domain']}:{self.port}"
        up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        up.putheader(b"Host", host_value.encode())
        for name, value in headers:
            if name.lower() not in drop and not name.lower().startswith(b"proxy-"):
                up.putheader(name, value)
        up.putheader(route["header"], route["value"])
        up.putheader(b"Accept-Encoding", b"identity")  # only what the scan can read
        if length is not None:
            up.putheader(b"Content-Length", str(length).encode())
        up.endheaders(body or None)

    def relay(self, c: Conn, resp: http.client.HTTPResponse, leaks: dict, sock: Any) -> None:
        """Send the allowlisted head and the body as it arrives (SSE), both masked."""
        coding = (resp.getheader("content-encoding") or "identity").strip().lower()
        if coding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise Refused(502)  # bytes we cannot scan never reach the agent
        lines = [f"HTTP/1.1 {resp.status} {http.client.responses.get(resp.status, 'Unknown')}"]
        for name, value in allowed_headers(resp, coding != "identity"):
            line, found = self.leaks.mask(f"{name}: {value}".encode("latin-1"))
            for form in found:
                where = "header:" + line.split(b":", 1)[0].decode("latin-1").lower()
                leaks[where, form] = leaks.get((where, form), 0) + 1
            lines.append(line.decode("latin-1"))
        self.send(c, "\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1"))
        self.leaks.stream(reader(resp, coding, sock), lambda data: self.send(c, data), leaks)

    def send(self, c: Conn, data: bytes | memoryview) -> None:
        c.sock.sendall(data)  # also an empty end: one cheap call, no special case
        c.rec["bytes_out"] += len(data)

    def log_request(self, c: Conn) -> None:
        self.log({**c.rec, "ms": int((time.monotonic() - c.start) * 1000)})

    def log(self, rec: dict[str, Any]) -> None:
        """Append one JSON line; the caller passes no header, key, token or query."""
        if self.log_fd >= 0:
            line = json.dumps({"ts": round(time.time(), 3), **rec}, sort_keys=True) + "\n"
            with self.lock, contextlib.suppress(OSError):
                if 0 < self.log_left < len(line) + 64:  # ASCII JSON: characters are bytes
                    line = '{"event": "log truncated"}\n'  # the last line written
                    self.log_left = len(line)
                if self.log_left >= len(line):
                    self.log_left -= os.write(self.log_fd, line.encode())


class Tunnel(http.client.HTTPSConnection):
    """HTTPS through the egress proxy's CONNECT on its Unix socket ``via`` (this box's own
    file system): on the upstream socket it hands over, else relayed on that socket."""

    via = ""

    def connect(self) -> None:
        sock, fds, control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), [], None
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.via)
            target = f"{self.host}:{self.port}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head, more = b"", b"-"  # nothing comes past the answer before our hello
            while more and not head.endswith(b"\r\n\r\n") and len(head) < HEAD_MAX:
                more, got, _, _ = socket.recv_fds(sock, 4096, 1)
                head, fds = head + more, fds + got
            if head.split(b" ", 2)[1:2] != [b"200"] or not head.endswith(b"\r\n\r\n"):
                raise ConnectionError("the egress proxy refused the tunnel")
            if fds:  # given the upstream socket itself: its bytes skip the relay's copies
                control, sock = sock, socket.socket(fileno=fds[0])
                del fds[0]  # owned by sock now; the finally closes only what is not
                sock.settimeout(self.timeout)
            self.sock = TLS(sock, self._context, self.host, control)
        except BaseException:
            for end in filter(None, (sock, control)):
                end.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)


class TLS:
    """Client TLS through memory BIOs, the part of a socket http.client and this file use,
    verified as ``ctx`` says: one recv of up to 256 KiB feeds many records (SSLSocket: 2 each)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, host: str, control: Any = None):
        self.sock, self.control, self.files, self.closed = sock, control, 0, False
        self.inc, self.out, self.raw = ssl.MemoryBIO(), ssl.MemoryBIO(), bytearray(4 * BUF)
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname=host)  # checks the name
        self.fileno, self.settimeout = sock.fileno, sock.settimeout
        self.step(self.tls.do_handshake)

    def close(self, file: bool = False) -> None:
        """As a socket's: open until its files close too (http.client closes before the body)."""
        self.files -= file
        self.closed = self.closed or not file
        if self.closed and not self.files:
            self.sock.close()
            if self.control:  # the egress proxy now logs the tunnel's end and shuts it
                self.control.close()

    def step(self, op: Any, *args: Any) -> Any:
        """``op`` once it has the ciphertext it needs; what it wrote is sent first."""
        while True:
            try:
                result = op(*args)
            except ssl.SSLWantReadError:
                self.flush()
            except ssl.SSLError:
                with contextlib.suppress(OSError):  # its alert, if the peer still listens
                    self.flush()
                raise
            else:
                self.flush()
                return result
            n = self.sock.recv_into(self.raw)  # one receive: at most this waits in ``inc``
            self.inc.write(memoryview(self.raw)[:n]) if n else self.inc.write_eof()

    def flush(self) -> None:
        if self.out.pending:
            self.sock.sendall(self.out.read())

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), 4 * BUF):  # ``out`` holds one piece's records at a time
            self.step(self.tls.write, view[at : at + 4 * BUF])

    def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        try:
            return self.step(self.tls.read, nbytes or len(buf), buf)
        except ssl.SSLEOFError:  # EOF without close_notify ends the stream, as in ssl's default
            return 0

    def pending(self) -> int:
        return self.tls.pending() or self.inc.pending

    def makefile(self, mode: str) -> io.BufferedReader:
        self.files += 1
        return io.BufferedReader(_Raw(self))


class _Raw(io.RawIOBase):
    """What ``TLS.makefile`` buffers (http.client reads heads through it)."""

    def __init__(self, tls: TLS) -> None:
        self.tls = tls

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        return self.tls.recv_into(buf)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self.tls.close(file=True)


def allowed_headers(resp: http.client.HTTPResponse, decoding: bool) -> list[tuple[str, str]]:
    """Allowlisted headers with safe values; the framing ones only where they still hold."""
    out = []
    for name, value in resp.getheaders():
        low, ok_name = name.lower(), _TOKEN.fullmatch(name.encode("latin-1"))
        allowed = low in _ALLOW or low.startswith(_ALLOW_PREFIXES)
        framing = low == "content-length" or (decoding and low == "content-encoding")
        if allowed and ok_name and not framing and _SAFE_VALUE.fullmatch(value):
            out.append((name, value))
    length = resp.headers.get("content-length") or ""
    if _DIGITS.fullmatch(length.encode("latin-1")) and not resp.chunked and not decoding:
        out.append(("Content-Length", length))  # only the value http.client frames by
    return out


def ended(up: Any, resp: http.client.HTTPResponse) -> bool:
    """True if ``resp`` was read to its exact end and no byte (nor EOF) follows it yet."""
    try:  # a byte http.client read ahead, one on the socket, or EOF: not reusable
        if not resp.isclosed() and resp.length == 0:
            up.sock.settimeout(0)
            resp.fp.read1(1)
        return resp.isclosed()
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except OSError:
        return False
    finally:
        resp.close()
        if up.sock is not None:
            up.sock.settimeout(up.timeout)


def reader(resp: http.client.HTTPResponse, coding: str, sock: Any) -> Any:
    """A function filling a memoryview with the body's next bytes, returning their count (0:
    the end). Content-Length or close-delimited identity bodies are read straight from TLS,
    all records there in one fill (SSE never waits); others come from ``decoded``."""
    pieces = decoded(resp, coding) if coding != "identity" or resp.chunked else None
    poll, first = select.poll(), True
    poll.register(sock, select.POLLIN)

    def fill(into: memoryview) -> int:
        nonlocal first
        if pieces is not None:  # an inflate step may give nothing yet: that is not the end
            data = next((piece for piece in pieces if piece), b"")  # at most BUF: it fits
            into[: len(data)] = data
            return len(data)
        got = 0
        while resp.length != 0 and resp.fp is not None and got < len(into):
            size = len(into) - got if resp.length is None else min(len(into) - got, resp.length)
            if first:  # what http.client buffered (at most 8 KiB) goes first
                data, first = resp.read1(size), False
                into[got : got + len(data)], n = data, len(data)
            else:
                n = sock.recv_into(into[got:], size)
                resp.length = None if resp.length is None else resp.length - n
            if not n:
                if resp.length:
                    raise Cut("body shorter than its Content-Length")
                resp.close()  # close-delimited: this was its end
                break
            got += n
            if not (sock.pending() or poll.poll(0)):
                break
        return got

    return fill


def decoded(resp: http.client.HTTPResponse, coding: str) -> Any:
    """A chunked or compressed body's bytes as they arrive, decoded up to DECODED_MAX."""
    inflate, total = None, 0
    while chunk := resp.read1(BUF):
        if coding == "identity":
            yield chunk
            continue
        if inflate is None:  # "deflate" is zlib-wrapped by the spec, raw in the wild
            zlib_header = (
                len(chunk) > 1 and chunk[0] & 15 == 8 and int.from_bytes(chunk[:2], "big") % 31 == 0
            )
            inflate = zlib.decompressobj(31 if "gzip" in coding else 15 if zlib_header else -15)
        while chunk and not inflate.eof:
            try:
                data = inflate.decompress(chunk, BUF)
            except zlib.error:
                raise Cut("undecodable body") from None
            chunk, total = inflate.unconsumed_tail, total + len(data)
            if total > DECODED_MAX:
                raise Cut("decoded body over 100 MiB")
            yield data
    if inflate is not None and not inflate.eof:
        raise Cut("truncated compressed body")


def reply(status: int) -> bytes:
    text = _TEXT[status]
    allow = "Allow: " + ", ".join(sorted(METHODS)) + "\r\n" if status == 405 else ""
    head = f"HTTP/1.1 {status} {http.client.responses[status]}\r\n{allow}"
    head += "Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
    return f"{head}Content-Length: {len(text)}\r\n\r\n{text}".encode()


def load_config(line: str) -> dict[str, Any]:
    """Parse and check the config; each route gets its auth ``header`` and ``value``."""
    try:
        cfg = json.loads(line)
    except ValueError:
        raise ConfigError("the config must be one JSON object on one line") from None
    if not isinstance(cfg, dict) or not re.fullmatch(r"[0-9a-f]{32,256}", str(cfg.get("token"))):
        raise ConfigError("token must be 32+ lowercase hex digits")
    routes, names = cfg.get("routes"), set()
    if not isinstance(routes, list) or not routes or not all(isinstance(r, dict) for r in routes):
        raise ConfigError("routes must be a non-empty list of objects")
    for r in routes:
        name = r.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise ConfigError("each route needs a name of 1-64 letters, digits or ._-")
        domain, key, unix = str(r.get("domain")), str(r.get("key")), r.get("unix")
        if name in names:
            raise ConfigError(f"route {name}: the name is used twice")
        if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
            raise ConfigError(f"route {name}: domain must be a lowercase host name, not an IP")
        if not re.fullmatch(r"[\x21-\x7e]{8,8192}", key):
            raise ConfigError(f"route {name}: key must be 8 to 8192 visible ASCII characters")
        if unix is not None and not _PATH.fullmatch(str(unix)):
            raise ConfigError(f"route {name}: unix must be an absolute path under 108 bytes")
        try:
            header = auth_header(str(r.get("auth_style")))
        except ValueError as exc:
            raise ConfigError(f"route {name}: {exc}") from None
        names.add(name)
        r["header"] = header.encode()
        r["value"] = ("Bearer " + key if r["auth_style"] == "bearer" else key).encode()
    via = cfg.get("upstream_proxy")
    if via is not None and not (isinstance(via, dict) and _PATH.fullmatch(str(via.get("unix")))):
        raise ConfigError("upstream_proxy must be null or {unix: an absolute path}")
    for name, (low, high) in LIMITS.items():
        value = cfg.get(name)
        if value is not None and not (type(value) in (int, float) and low <= value <= high):
            raise ConfigError(f"{name} must be a number from {low} to {high}")
    return cfg


def listen(route: dict[str, Any]) -> socket.socket:
    """A 127.0.0.1 listener, or a 0600 Unix one (a stale socket file is replaced)."""
    path = route.get("unix")
    try:
        if path is None:
            return socket.create_server(("127.0.0.1", 0), backlog=512)
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no window in which others could connect
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(512)
        return sock
    except OSError as exc:
        raise ConfigError(f"route {route['name']}: cannot listen: {exc.strerror}") from None


def watch_owner() -> None:
    """Exit the whole process when the owner's end of stdin closes."""
    with contextlib.suppress(Exception):
        while os.read(0, 65536):
            pass
    os._exit(0)


def main() -> int:
    """Read the config line, bind, print the ready line, serve forever."""
    try:
        cfg = load_config(sys.stdin.readline())
        proxy = Proxy(cfg)
        listeners = [(r, listen(r)) for r in cfg["routes"]]
    except Exception as exc:  # the config holds keys: report a fixed text or a type only
        error = str(exc) if isinstance(exc, ConfigError) else f"start failed: {type(exc).__name__}"
        print(json.dumps({"ready": False, "error": error}), flush=True)
        return 1
    with contextlib.suppress(ValueError, OSError):  # descriptors for max_connections
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    ports = {r["name"]: s.getsockname()[1] for r, s in listeners if r.get("unix") is None}
    sockets = {r["name"]: r["unix"] for r, _ in listeners if r.get("unix") is not None}
    print(json.dumps({"ready": True, "ports": ports, "sockets": sockets}), flush=True)
    null = os.open(os.devnull, os.O_RDWR)  # the launcher may detach: never write to a closed pipe
    for fd in (1, 2) if cfg.get("owner_stdin") else (0, 1, 2):
        os.dup2(null, fd)
    if cfg.get("owner_stdin"):
        threading.Thread(target=watch_owner, daemon=True).start()
    threading.stack_size(512 * 1024)  # workers are shallow; many fit a pids/memory limit
    proxy.serve(listeners)
    return 0


if __name__ == "__main__":
    sys.exit(main())
