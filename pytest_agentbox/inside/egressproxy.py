"""Egress proxy of an agentbox sandbox: stdlib only, Python 3.9+, one file.

``serve`` (sidecar) is the sandbox's only way out; ``forward`` (root, in the sandbox,
before user code) binds 127.0.0.1:PORT and hands the listener to the sidecar, which then
accepts on it itself (``hand_over``/``adopt``); where that is refused, it relays each
connection to serve's Unix socket. Both read one JSON config
line on stdin and print one JSON ready line. Security properties of ``serve``:
- Decided on the name before any DNS lookup or connection: IP literals in any form,
  non-FQDNs, unlisted ports, deny-listed and unlisted names get 403, never a connection.
  Each listener has its own allowlist (the agent's; the key proxy's own way out).
- Every DNS answer is judged by ``address_class``, the one rule (every non-public class,
  also inside mapped/compatible/NAT64/6to4 forms, and the engine's ``refuse_nets``); one
  bad answer refuses the name. ``private_ok`` names may reach rfc1918/100.64/ULA only.
  ``pins``: exact name -> address from the harness (no DNS, no class check; allowlisted).
- A JSON line when each decision is made, one when a tunnel closes (bytes, ms); at
  ``log_max_bytes`` one "log truncated" line ends the log.
- Strict heads: CRLF only, no controls, 16 KiB, 30 s. Plain HTTP: Host from the URL,
  hop-by-hop headers dropped, no bodies, no pipelining. One thread per connection, at
  most ``max_conns`` per listener, past it 503 at once; no connection's error ends the
  process. Tunnels idle out after 300 s; their bytes move by splice (recv/send where
  refused). A ``give`` listener (the key proxy's, on its own Unix socket) passes the
  connected upstream socket itself (SCM_RIGHTS): the tunnel lasts while the client's end
  stays open, counted by TCP_INFO, then is shut. Limit: TLS SNI inside a tunnel is not seen.
Config: {"listeners": [{"name", "unix": path, "mode"} or {"name", "tcp": [host, port]},
with "allow", "deny", "max_conns"?, "give"?], "ports", "pins", "private_ok", "refuse_nets",
"log_path", "log_max_bytes", "max_conns"}. Ready: {"ready": true, "tcp_ports": {name: port}}.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import itertools
import json
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

HEAD_MAX, HEAD_TIMEOUT, TUNNEL_IDLE, POLL = 16 * 1024, 30.0, 300.0, 60.0
BUF, CONNECT_TIMEOUT, SLOTS = 64 * 1024, 10.0, threading.BoundedSemaphore(256)
PIPE_SIZE, _SPLICE_FLAGS = 1024 * 1024, getattr(os, "SPLICE_F_MOVE", 1) | 2  # 2: NONBLOCK
_NO_SPLICE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}  # splice refused
LOG_MAX, _IDS = 8 * 1024 * 1024, itertools.count(1)
# Cloud metadata/credential endpoints (AWS, ECS, EKS, GCP, Azure incl. its public
# WireServer, Alibaba, Oracle, Tencent): named apart so a refusal says what was at stake.
METADATA = frozenset(["169.254.169.254", "fd00:ec2::254", "169.254.170.2", "169.254.170.23",
                      "fd00:ec2::23", "100.100.100.200", "192.0.0.192", "168.63.129.16",
                      "169.254.0.23"])  # fmt: skip
_CLASSES = [(line.split()[0], [ipaddress.ip_network(n) for n in line.split()[1:]]) for line in """
unspecified 0.0.0.0/32 ::/128
this-network 0.0.0.0/8
loopback 127.0.0.0/8 ::1/128
rfc1918 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16
shared-100.64 100.64.0.0/10
link-local 169.254.0.0/16 fe80::/10
ietf-protocol 192.0.0.0/24 2001::/23
benchmarking 198.18.0.0/15
documentation 192.0.2.0/24 198.51.100.0/24 203.0.113.0/24 2001:db8::/32 3fff::/20
multicast 224.0.0.0/4 ff00::/8
broadcast 255.255.255.255/32
reserved 240.0.0.0/4 100::/64
ula fc00::/7
site-local fec0::/10""".splitlines()[1:]]  # fmt: skip
# IPv6 forms carrying an IPv4 address: (range, bits right of it, class when it is public).
_WRAPS = [(ipaddress.ip_network(net), shift, outer) for net, shift, outer in (
    ("::ffff:0:0/96", 0, None),  # mapped: the kernel dials the IPv4 address itself
    ("::ffff:0:0:0/96", 0, "reserved"),  # SIIT-translated
    ("64:ff9b::/96", 0, None),  # NAT64 well-known prefix: DNS64's answer for a public host
    ("64:ff9b:1::/48", 0, "nat64-local"),  # local-use NAT64: a local network, always refused
    ("2002::/16", 80, None),  # 6to4
    ("::/96", 0, "ipv4-compatible"),  # deprecated: nothing legitimate resolves to it
)]  # fmt: skip
GLOBAL6 = ipaddress.ip_network("2000::/3")
PRIVATE_OK = frozenset({"rfc1918", "shared-100.64", "ula"})  # the most private_ok opens
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_NUMERIC = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) ([\x21-\x7e]{1,8000}) HTTP/1\.[01]\Z")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*\Z")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BAD_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # HTAB is the one control allowed
_HOP = frozenset(b"connection proxy-connection keep-alive te trailer upgrade host".split())
_HOP |= {b"proxy-authorization", b"proxy-authenticate"}
_WORDS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 502: "Bad Gateway"}


def normalize_host(host: str) -> str:
    """Lower-case and drop one trailing dot (``Example.COM.`` -> ``example.com``)."""
    host = host.strip().lower()
    return host[:-1] if host.endswith(".") and not host.endswith("..") else host


def is_ip_literal(host: str) -> bool:
    """True for anything a resolver or URL parser may read as an IP address."""
    h = normalize_host(host)
    if h.startswith("[") or h.endswith("]") or ":" in h:
        return True  # IPv6 in any form; a colon is never part of a valid name anyway
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(h)
        return True
    # WHATWG "ends in a number": inet_aton and browsers read 127.1, 0x7f000001 as IPv4
    return bool(h) and _NUMERIC.match(h.rsplit(".", 1)[-1]) is not None


def valid_fqdn(host: str) -> bool:
    """An ASCII fully qualified name: 2+ labels of [a-z0-9-], a letter in the TLD."""
    h = normalize_host(host)
    if not h or len(h) > 253 or not h.isascii() or is_ip_literal(h):
        return False
    labels = h.split(".")
    ok = len(labels) > 1 and all(_LABEL.match(label) for label in labels)
    return ok and any(c.isalpha() for c in labels[-1])  # numeric TLDs: is_ip_literal


def host_allowed(host: str, allow: Sequence[str], deny: Sequence[str] = ()) -> tuple[bool, str]:
    """``(ok, reason)``: patterns match exactly or as ``*.suffix`` strictly below suffix."""
    if is_ip_literal(host) or not valid_fqdn(host):
        return False, "IP literal refused" if is_ip_literal(host) else "invalid host name"
    h = normalize_host(host)  # valid, so ending in ".suffix" means a label boundary below it
    hits = [p == h or (p[:2] == "*." and h.endswith(p[1:])) for p in map(normalize_host, deny)]
    if any(hits):
        return False, "host on deny list"
    if any(p == h or (p[:2] == "*." and h.endswith(p[1:])) for p in map(normalize_host, allow)):
        return True, "allowlisted"
    return False, "host not in allowlist"


def address_class(ip: str, extra: Sequence = ()) -> str | None:
    """The class of a non-public address ("rfc1918", "metadata", ...), None if public.

    The one rule, shared with the host. ``extra``: ip_network objects of the engine's own
    networks and addresses, class "engine-network" (checked first: private_ok never opens
    them). An embedded IPv4 address is judged by this same function.
    """
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "invalid"
    if str(a) in METADATA:
        return "metadata"
    if any(a in net for net in extra):
        return "engine-network"
    if a.version == 6 and int(a) > 1:  # :: and ::1 are themselves, not IPv4-compatible
        for net, shift, outer in _WRAPS:
            if a in net:
                inner = ipaddress.IPv4Address(int(a) >> shift & 0xFFFFFFFF)
                return address_class(str(inner), extra) or outer
    for name, nets in _CLASSES:
        if any(a in net for net in nets):
            return name
    # Outside global unicast, or anything else the stdlib knows to be non-global.
    return "reserved" if (a.version == 6 and a not in GLOBAL6) or not a.is_global else None


class Refused(Exception):
    """A request refused: ``Refused(status, reason)``, the reason a short fixed text."""


def read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """Read until CRLFCRLF within the size and time limits; return (head, rest)."""
    data, deadline = b"", time.monotonic() + HEAD_TIMEOUT
    while b"\r\n\r\n" not in data:
        if _BARE_LF.search(data):  # never wait for a CRLFCRLF that an LF client won't send
            raise Refused(400, "bare LF in request head")
        if len(data) >= HEAD_MAX + 4 or time.monotonic() > deadline:
            raise Refused(400, "request head too large or too slow")
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = conn.recv(min(4096, HEAD_MAX + 4 - len(data)))  # never read past the cap
        if not chunk:
            raise Refused(400, "connection closed before request head")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def parse_head(head: bytes) -> tuple[str, str, int, bytes, list[tuple[bytes, bytes]]]:
    """Strictly parse a request head into (method, host, port, path, headers)."""
    lines = head.split(b"\r\n")
    if len(lines) > 101 or any(_BAD_BYTES.search(line) for line in lines):
        raise Refused(400, "control byte, bare CR/LF or too many lines in request head")
    m = _REQUEST_LINE.match(lines[0])
    if m is None:
        raise Refused(400, "malformed request line")
    method, target = m.group(1).decode(), m.group(2).decode("ascii")
    headers = [h.groups() for h in map(_HEADER.match, lines[1:]) if h is not None]
    if len(headers) != len(lines) - 1:
        raise Refused(400, "malformed header line")
    path = b""
    if method == "CONNECT":
        authority = target
    elif method in ("GET", "HEAD") and target[:7].lower() == "http://":
        authority, sep, rest = target[7:].partition("/")
        path = ("/" + rest if sep else "/").encode()
        if any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers):
            raise Refused(400, "request bodies are not forwarded")
    else:
        raise Refused(405, "only CONNECT and absolute-form http:// GET or HEAD")
    if any(c in authority for c in "@?#"):
        raise Refused(400, "userinfo, query or fragment in authority")
    host, sep, port_s = authority.rpartition(":")
    if not sep or "]" in port_s:  # no port, or the colons belong to a bracketed IPv6
        host, port_s = authority, "" if method == "CONNECT" else "80"
    if not (port_s.isdigit() and len(port_s) <= 5 and 0 < int(port_s) < 65536):
        raise Refused(400, "missing or invalid port")
    return method, host, int(port_s), path, headers


class Log:
    """One JSON line per event, flushed at once, at most ``cap`` bytes in all (then one
    "log truncated" line): no agent can fill the sidecar's disk or memory through it."""

    def __init__(self, path: str | None, cap: int) -> None:
        self.file = open(path or os.devnull, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.left, self.lock = int(cap), threading.Lock()

    def write(self, rec: dict) -> None:
        line = json.dumps(dict(rec, ts=round(time.time(), 3)), sort_keys=True) + "\n"
        with self.lock, contextlib.suppress(OSError, ValueError):
            if 0 < self.left < len(line) + 64:  # ASCII JSON: characters are bytes
                line = '{"event": "log truncated"}\n'
                self.left = len(line)  # the last line written
            if self.left >= len(line):
                self.file.write(line)
                self.left -= len(line)


def open_upstream(cfg: dict, host: str, port: int, rec: dict) -> socket.socket:
    """Pinned address, or resolve and refuse if any answer is non-public; then connect."""
    pin = cfg["pins"].get(host)
    if pin:  # set by the harness for its own fakes: no DNS, no class check
        family = socket.AF_INET6 if ":" in pin else socket.AF_INET
        infos = [(family, socket.SOCK_STREAM, 0, "", (pin, port))]
        rec.update(pinned=True, address=pin)
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Refused(502, "DNS resolution failed") from exc
        private_ok = host_allowed(host, cfg["private_ok"])[0]
        for info in infos:
            rec.update({"address": info[4][0], "class": address_class(info[4][0], cfg["nets"])})
            if rec["class"] and not (private_ok and rec["class"] in PRIVATE_OK):
                raise Refused(403, f"resolves to {rec['class']} address")
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(addr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rec.update({"address": addr[0], "class": address_class(addr[0], cfg["nets"])})
            return sock
        except OSError:
            sock.close()
    raise Refused(502, "upstream connect failed")


def pump(src: socket.socket, dst: socket.socket, counter: list, idx: int) -> None:
    """Copy src to dst until EOF (one direction: the plain-HTTP response)."""
    for s in (src, dst):
        s.settimeout(TUNNEL_IDLE)
    while True:
        data = src.recv(BUF)
        if not data:
            return
        dst.sendall(data)
        counter[idx] += len(data)


def relay(a: socket.socket, b: socket.socket, counter: list, splice: bool = True) -> None:
    """Relay both ways (a->b counted at 0, b->a at 1) in this one thread, then close both.

    One thread, not two: threads are pids, and the sidecar's are capped. Non-blocking,
    each direction holding at most one read (sent before the next read), so neither waits
    on the other; EOF is passed on (half-close) once. With ``splice`` the bytes move
    through a pipe in the kernel; where splice is refused (gVisor, Python < 3.10) plain
    recv/send take over, without losing a byte.
    """
    dirs = [[a, b, b"", False, 0, None], [b, a, b"", False, 1, None]]
    poller, seen = select.poll(), time.monotonic()
    try:
        a.setblocking(False)
        b.setblocking(False)
        for d in dirs if splice and hasattr(os, "splice") else ():
            d[2], d[5] = 0, os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # pending: bytes in pipe
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(d[5][1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        while not (dirs[0][3] and dirs[1][3]):  # EOF only ever comes with nothing pending
            want = {a.fileno(): 0, b.fileno(): 0}
            for src, dst, pending, eof, _, _ in dirs:  # a send waits for dst, a recv for src
                if pending or not eof:
                    fd = dst.fileno() if pending else src.fileno()
                    want[fd] |= select.POLLOUT if pending else select.POLLIN
            for fd, bits in want.items():
                poller.register(fd, bits)  # bits 0: only hang-up/error, which end it anyway
            if not poller.poll(POLL * 1000) and time.monotonic() - seen > TUNNEL_IDLE:
                return
            seen = time.monotonic()
            for d in dirs:  # just try both: a socket not ready says BlockingIOError
                with contextlib.suppress(BlockingIOError):
                    move(d, counter)
    except OSError:
        pass  # reset, broken pipe: the tunnel is over either way
    finally:
        a.close()
        b.close()
        for fd in (fd for d in dirs for fd in d[5] or ()):
            os.close(fd)


def tcp_info(sock: socket.socket) -> tuple[int, ...] | None:
    """(ms since data sent, since data received, data bytes acked, data bytes received),
    or None where the kernel's TCP_INFO lacks the byte counts (Linux < 4.2, gVisor)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 192)
    if len(info) < 136:
        return None
    acked, received = struct.unpack_from("QQ", info, 120)  # SYN and FINs count one each
    fin_acked, fin_in = info[0] in (5, 6), info[0] in (6, 8, 9, 11)  # by the TCP state
    return (*struct.unpack_from("I4xI", info, 44), acked - 1 - fin_acked, received - fin_in)


def watch(conn: socket.socket, upstream: socket.socket, counter: list) -> None:
    """For a ``give`` listener: the client (the key proxy) now holds ``upstream`` itself,
    so no byte passes through here; its end of ``conn`` closing ends the tunnel. Idle out
    as ``relay`` does; then count the bytes from TCP_INFO and shut the connection."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    try:
        while not poller.poll(POLL * 1000):
            if min((tcp_info(upstream) or (0, 0))[:2]) > TUNNEL_IDLE * 1000:
                break
        counter[0], counter[1] = (tcp_info(upstream) or (0, 0, 0, 0))[2:]
    finally:
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)  # whatever the client does with its copy


def move(d: list, counter: list) -> None:
    """For direction ``d`` of ``relay``: read if nothing is pending, then send what is."""
    src, dst, _, eof, idx, pipe = d
    try:
        if not d[2] and not eof:
            fd = src.fileno()
            d[2] = os.splice(fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS) if pipe else src.recv(BUF)
            if not d[2]:
                d[3] = True
                return dst.shutdown(socket.SHUT_WR)
        if d[2]:  # at once: a second poll per read would double the wake-ups
            n = (
                os.splice(pipe[0], dst.fileno(), d[2], flags=_SPLICE_FLAGS)
                if pipe
                else dst.send(d[2])
            )
            d[2], counter[idx] = d[2] - n if pipe else d[2][n:], counter[idx] + n
    except BlockingIOError:
        raise
    except OSError as exc:
        if pipe is None or exc.errno not in _NO_SPLICE:
            raise
        d[2], d[5] = os.read(pipe[0], d[2]) if d[2] else b"", None  # the pipe's bytes
        for fd in pipe:
            os.close(fd)
    return None


def serve_one(cfg: dict, log: Log, lsn: dict, conn: socket.socket) -> None:
    """Decide and log one request, then tunnel (CONNECT) or forward (GET/HEAD) it."""
    start, counter, opened = time.monotonic(), [0, 0], False
    rec = {"event": "connect", "id": next(_IDS), "listener": lsn["name"], "method": "",
           "host": "", "port": 0, "decision": "deny", "reason": "", "address": None, "class":
           None, "pinned": False, "given": False, "bytes_up": 0, "bytes_down": 0}  # fmt: skip
    try:
        if conn.family != socket.AF_UNIX:  # small relayed writes meet delayed ACKs: +40 ms
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head, rest = read_head(conn)
        method, host, port, path, headers = parse_head(head)
        rec.update(method=method, host=host[:255], port=port)
        ok, reason = host_allowed(host, lsn.get("allow") or [], lsn.get("deny") or [])
        if ok and port not in cfg.get("ports", [80, 443]):
            ok, reason = False, "port not allowed"
        if not ok:
            raise Refused(403, reason)
        host = normalize_host(host)
        with open_upstream(cfg, host, port, rec) as upstream:
            rec.update(decision="allow", reason=reason, ms=int((time.monotonic() - start) * 1000))
            log.write(rec)  # logged when decided: an open tunnel is in the log already
            opened = True
            if method == "CONNECT" and lsn.get("give") and not rest and tcp_info(upstream):
                socket.send_fds(conn, [b"HTTP/1.1 200 Connection established\r\n\r\n"],
                                [upstream.fileno()])  # fmt: skip
                rec["given"] = True
                return watch(conn, upstream, counter)
            if method == "CONNECT":
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                upstream.sendall(rest)
                counter[0] += len(rest)
                return relay(conn, upstream, counter)
            authority = host if port == 80 else f"{host}:{port}"
            named = [v for n, v in headers if n.lower() == b"connection"]  # more hop-by-hop names
            drop = _HOP | {t.strip().lower() for v in named for t in v.split(b",")}
            out = [b"%s %s HTTP/1.1" % (method.encode(), path), b"Host: " + authority.encode()]
            out += [n + b": " + v for n, v in headers if n.lower() not in drop]
            request = b"\r\n".join([*out, b"Connection: close", b"", b""])
            upstream.sendall(request)
            counter[0] += len(request)
            conn.shutdown(socket.SHUT_RD)  # nothing past the one checked request
            pump(upstream, conn, counter, 1)
    except Refused as exc:
        (status, reason), word = exc.args, _WORDS.get(exc.args[0], "Refused")
        rec.update(decision="deny", reason=reason)
        reply = f"HTTP/1.1 {status} {word}\r\nContent-Type: text/plain\r\nContent-Length: "
        reply += f"{len(reason) + 1}\r\nConnection: close\r\n\r\n{reason}\n"
        with contextlib.suppress(OSError):
            conn.sendall(reply.encode())
    except OSError as exc:
        rec["reason"] = rec["reason"] or f"client error: {type(exc).__name__}"
    finally:  # logged before the close: a client that saw the end finds its line
        ms, event = int((time.monotonic() - start) * 1000), "close" if opened else "connect"
        log.write(dict(rec, bytes_up=counter[0], bytes_down=counter[1], ms=ms, event=event))
        conn.close()


def refuse_busy(log: Log, name: str, conn: socket.socket, why: str) -> None:
    """Past the cap (or no thread to be had): 503 at once, without reading the request."""
    with contextlib.suppress(OSError), conn:
        conn.setblocking(False)
        conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        conn.shutdown(socket.SHUT_WR)
        conn.recv(HEAD_MAX)  # what has come of the request: closing on unread data resets
    log.write({"event": "connect", "id": next(_IDS), "listener": name, "decision": "deny",
               "reason": why, "host": "", "port": 0, "bytes_up": 0, "bytes_down": 0})  # fmt: skip


def run(handler: Callable, conn: socket.socket, slots: Any) -> None:
    try:
        handler(conn)
    except Exception:  # noqa: S110 -- one connection's failure is never the proxy's
        pass
    finally:
        slots.release()
        conn.close()


def accept_loop(sock: socket.socket, handler: Callable, slots: Any = SLOTS, busy: Any = None):
    """Accept forever, one daemon thread per connection, at most ``slots`` at once; past
    that, or when no thread can start (pids, memory), ``busy`` answers (default: close)."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            time.sleep(0.1)  # EMFILE/ENFILE, ECONNABORTED: back off, keep serving
            continue
        why = "too many connections"
        if slots.acquire(blocking=False):
            try:
                threading.Thread(target=run, args=(handler, conn, slots), daemon=True).start()
                continue
            except Exception:  # RuntimeError "can't start new thread"
                slots.release()
                why = "no thread for the connection"
        with contextlib.suppress(Exception):  # not even a failed refusal ends the loop
            (busy or (lambda c, _: c.close()))(conn, why)


def serve(cfg: dict) -> int:
    """``serve``: check the config, bind every listener, print the ready line, serve."""
    try:
        pins = {normalize_host(h): ip for h, ip in (cfg.get("pins") or {}).items()}
        if not all(valid_fqdn(h) and ipaddress.ip_address(ip) for h, ip in pins.items()):
            raise ValueError("pins: a name that is no host name")
        nets = [ipaddress.ip_network(n, strict=False) for n in cfg.get("refuse_nets") or []]
        cfg = dict(cfg, pins=pins, nets=nets, private_ok=list(cfg.get("private_ok") or []))
        log, loops, ports = Log(cfg.get("log_path"), cfg.get("log_max_bytes", LOG_MAX)), [], {}
        names = [str(spec["name"]) for spec in cfg["listeners"]]
        if not names or len(set(names)) != len(names):
            raise ValueError("listeners: none, or two with one name")
        for spec in cfg["listeners"]:
            name = str(spec["name"])
            sock = listen(spec.get("tcp") or str(spec["unix"]), int(spec.get("mode", 0o600)))
            if spec.get("tcp"):
                ports[name] = sock.getsockname()[1]
            cap = threading.BoundedSemaphore(int(spec.get("max_conns", cfg.get("max_conns", 256))))
            busy = functools.partial(refuse_busy, log, name)
            loops.append((sock, functools.partial(serve_one, cfg, log, spec), cap, busy))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    for args in loops[1:]:
        threading.Thread(target=accept_loop, args=args, daemon=True).start()
    if cfg.get("handoff_fd") is not None:
        by_name = dict(zip(names, loops))
        threading.Thread(target=adopt, args=(int(cfg["handoff_fd"]), by_name), daemon=True).start()
    print(json.dumps({"ready": True, "tcp_ports": ports}), flush=True)
    accept_loop(*loops[0])
    return 0


def adopt(fd: int, loops: dict) -> None:
    """Serve the listeners the supervisor passes over ``fd`` once (see ``forward``), each
    with its own listener's rules, handler and cap."""
    with socket.socket(fileno=fd) as pair:
        msg, fds, _, _ = socket.recv_fds(pair, 65536, 16)
    for name, got in zip(json.loads(msg), fds):
        _, handler, cap, busy = loops[name]
        args = (socket.socket(fileno=got), handler, cap, busy)
        threading.Thread(target=accept_loop, args=args, daemon=True).start()


def listen(cfg_addr: list | str, mode: int = 0o600) -> socket.socket:
    """A TCP listener for ``[host, port]``, or a Unix one for a path (stale socket replaced)."""
    if isinstance(cfg_addr, str):
        if os.path.lexists(cfg_addr):
            os.unlink(cfg_addr)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777)  # no window in which the socket is reachable by others
        sock.bind(cfg_addr)  # (a failure ends the process: no umask to restore)
        os.umask(old)
        os.chmod(cfg_addr, mode)
        sock.listen(128)
        return sock
    family = socket.AF_INET6 if ":" in str(cfg_addr[0]) else socket.AF_INET
    return socket.create_server((str(cfg_addr[0]), int(cfg_addr[1])), family=family, backlog=128)


def forward_one(unix_path: str, conn: socket.socket) -> None:
    """Relay one accepted TCP connection byte for byte to the Unix socket."""
    # Without NODELAY, relayed small writes meet the client's delayed ACK: +40 ms each.
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
        up.connect(unix_path)
        relay(conn, up, [0, 0])


def hand_over(path: str, names: list[str], socks: list) -> str:
    """Pass the bound listeners to the sidecar's supervisor over SCM_RIGHTS: "ok", or why
    not (then this process relays; gVisor's sockets, for one, cannot leave its kernel)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(path)
            socket.send_fds(conn, [json.dumps(names).encode()], [s.fileno() for s, _ in socks])
            conn.shutdown(socket.SHUT_WR)
            answer = json.loads(conn.recv(4096) or b"{}")
        return "ok" if answer.get("ok") is True else str(answer.get("error") or "refused")[:200]
    except (OSError, ValueError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]


def main(argv: list[str]) -> int:
    """Entry point: ``egressproxy.py serve|forward`` with a JSON config line on stdin."""
    mode = argv[1] if len(argv) == 2 else ""
    if mode not in ("serve", "forward"):
        sys.stderr.write("usage: egressproxy.py serve|forward  (JSON config on stdin)\n")
        return 2
    try:
        cfg = json.loads(sys.stdin.readline())
        if mode == "serve":
            return serve(cfg)
        # forward: one 127.0.0.1 port per route, each relayed to its Unix socket
        routes = [(str(r["name"]), str(r["unix"])) for r in cfg["routes"]]
        socks = [(listen([cfg.get("host", "127.0.0.1"), 0]), path) for _, path in routes]
        ports = {routes[i][0]: sock.getsockname()[1] for i, (sock, _) in enumerate(socks)}
        first = socks[0]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    handed = hand_over(cfg["handoff"], [n for n, _ in routes], socks) if cfg.get("handoff") else ""
    print(json.dumps({"ready": True, "ports": ports, "handoff": handed}), flush=True)
    if handed == "ok":  # the sidecar accepts on our ports itself: no relay, no root process
        return 0
    null = os.open(os.devnull, os.O_RDWR)  # the launcher may detach: never write to a closed pipe
    os.dup2(null, 1)
    os.dup2(null, 2)
    for sock, path in socks[1:]:
        handler = functools.partial(forward_one, path)
        threading.Thread(target=accept_loop, args=(sock, handler), daemon=True).start()
    accept_loop(first[0], functools.partial(forward_one, first[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
