"""Egress proxy of an agentbox sandbox: stdlib only, Python 3.9+, one file.

``serve`` (sidecar) is the sandbox's only way out; ``forward`` (root, in the sandbox,
network "none") relays 127.0.0.1:PORT to serve's Unix socket. Both read one JSON config
line on stdin and print one JSON ready line. Security properties of ``serve``:
- Decided on the name before any DNS lookup or connection: IP literals in any form,
  non-FQDNs, unlisted ports, deny-listed and unlisted names get 403, never a connection.
- All resolved addresses are checked (loopback, link-local, unspecified, multicast,
  0.0.0.0/8, reserved, metadata, also v4-mapped/NAT64) and only those are dialled.
- One JSON log line per decision (tunnels when closed, with byte counts).
- Strict byte-level heads: CRLF only, no controls, 16 KiB, 30 s. Plain HTTP: Host from
  the URL, hop-by-hop headers dropped, no bodies, no pipelining. Bounded threads;
  tunnels idle out after 300 s. Limit: TLS SNI inside a tunnel is not seen.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

HEAD_MAX, HEAD_TIMEOUT, TUNNEL_IDLE, POLL = 16 * 1024, 30.0, 300.0, 60.0
BUF, CONNECT_TIMEOUT, SLOTS = 64 * 1024, 10.0, threading.BoundedSemaphore(256)
METADATA = frozenset({"169.254.169.254", "fd00:ec2::254"})
NAT64, THIS_NET = ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("0.0.0.0/8")
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


def address_refused(ip: str) -> str | None:
    """Why a resolved address must not be contacted, or None when it may be."""
    a = ipaddress.ip_address(ip.split("%", 1)[0])
    if a.version == 6 and (a.ipv4_mapped or a in NAT64):  # judge the IPv4 address inside
        a = ipaddress.IPv4Address(int(a) & 0xFFFFFFFF)
    bad = {"metadata": str(a) in METADATA, "loopback": a.is_loopback}
    bad.update({"link-local": a.is_link_local, "unspecified": a.is_unspecified})
    bad.update(
        multicast=a.is_multicast, reserved=a.version == 4 and (a in THIS_NET or a.is_reserved)
    )
    return next((f"{name} address" for name, hit in bad.items() if hit), None)


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


def open_upstream(host: str, port: int) -> socket.socket:
    """Resolve, refuse if any address is forbidden, connect only to checked addresses."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Refused(502, "DNS resolution failed") from exc
    for info in infos:
        reason = address_refused(info[4][0])
        if reason:
            raise Refused(403, "resolves to " + reason)
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(addr)
            return sock
        except OSError:
            sock.close()
    raise Refused(502, "upstream connect failed")


def pump(src: socket.socket, dst: socket.socket, counter: list, idx: int, seen: list) -> None:
    """Copy src to dst with a 64 KiB buffer until EOF, then pass the half-close on."""
    view = memoryview(bytearray(BUF))
    for s in (src, dst):  # one value: a socket's timeout is shared by both directions
        s.settimeout(POLL)
    try:
        while True:
            try:
                n = src.recv_into(view)
            except socket.timeout:  # noqa: UP041 -- not TimeoutError on Python 3.9
                if time.monotonic() - seen[0] < TUNNEL_IDLE:
                    continue  # the other direction is still busy
                raise
            if not n:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(view[:n])
            counter[idx] += n
            seen[0] = time.monotonic()
    except OSError:
        for s in (src, dst):  # unblock the other direction too
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def relay(a: socket.socket, b: socket.socket, counter: list) -> None:
    """Relay both directions (a->b counted at 0, b->a at 1), then close both."""
    seen = [time.monotonic()]
    up = threading.Thread(target=pump, args=(a, b, counter, 0, seen), daemon=True)
    up.start()
    pump(b, a, counter, 1, seen)
    up.join()
    a.close()
    b.close()


def serve_one(cfg: dict, lock: threading.Lock, conn: socket.socket) -> None:
    """Decide and log one request, then tunnel (CONNECT) or forward (GET/HEAD) it."""
    start, counter = time.monotonic(), [0, 0]
    rec = {"method": "", "host": "", "port": 0, "decision": "deny", "reason": ""}
    try:
        head, rest = read_head(conn)
        method, host, port, path, headers = parse_head(head)
        rec.update(method=method, host=host[:255], port=port)
        ok, reason = host_allowed(host, cfg.get("allow") or [], cfg.get("deny") or [])
        if ok and port not in cfg.get("ports", [80, 443]):
            ok, reason = False, "port not allowed"
        if not ok:
            raise Refused(403, reason)
        host = normalize_host(host)
        with open_upstream(host, port) as upstream:
            rec.update(decision="allow", reason=reason)
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
            pump(upstream, conn, counter, 1, [time.monotonic()])
    except Refused as exc:
        (status, reason), word = exc.args, _WORDS.get(exc.args[0], "Refused")
        rec.update(decision="deny", reason=reason)
        reply = f"HTTP/1.1 {status} {word}\r\nContent-Type: text/plain\r\nContent-Length: "
        reply += f"{len(reason) + 1}\r\nConnection: close\r\n\r\n{reason}\n"
        with contextlib.suppress(OSError):
            conn.sendall(reply.encode())
    except OSError as exc:
        rec["reason"] = rec["reason"] or f"client error: {type(exc).__name__}"
    finally:
        conn.close()
        ms = int((time.monotonic() - start) * 1000)
        rec.update(bytes_up=counter[0], bytes_down=counter[1], ms=ms, ts=round(time.time(), 3))
        log = cfg.get("log_path") or os.devnull
        with lock, contextlib.suppress(OSError), open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def run(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        with contextlib.suppress(OSError):  # a peer gone early is not worth a traceback
            handler(conn)
    finally:
        SLOTS.release()


def accept_loop(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    """Accept forever; one daemon thread per connection, at most 256 in all."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            time.sleep(0.1)  # e.g. out of file descriptors: back off, keep serving
            continue
        if SLOTS.acquire(blocking=False):
            threading.Thread(target=run, args=(handler, conn), daemon=True).start()
        else:
            conn.close()  # overloaded: refuse rather than queue without bound


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


def main(argv: list[str]) -> int:
    """Entry point: ``egressproxy.py serve|forward`` with a JSON config line on stdin."""
    mode = argv[1] if len(argv) == 2 else ""
    if mode not in ("serve", "forward"):
        sys.stderr.write("usage: egressproxy.py serve|forward  (JSON config on stdin)\n")
        return 2
    try:
        cfg = json.loads(sys.stdin.readline())
        if mode == "serve":
            handler = functools.partial(serve_one, cfg, threading.Lock())
            unix, mode_bits = cfg.get("listen_unix"), int(cfg.get("socket_mode", 0o600))
            listeners = [listen(str(unix), mode_bits)] if unix else []
            listeners += [listen(cfg["listen_tcp"])] if cfg.get("listen_tcp") else []
            if not listeners:
                raise ValueError("no listen_unix or listen_tcp")
            port = listeners[-1].getsockname()[1] if cfg.get("listen_tcp") else None
            ready = {"ready": True, "tcp_port": port}
        else:
            listeners, unix_path = [listen(cfg["listen"])], str(cfg["unix"])
            ready = {"ready": True, "port": listeners[0].getsockname()[1]}
            handler = functools.partial(forward_one, unix_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(ready), flush=True)
    if mode == "forward":  # the launcher may detach: never write to a closed pipe
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
    for extra in listeners[1:]:
        threading.Thread(target=accept_loop, args=(extra, handler), daemon=True).start()
    accept_loop(listeners[0], handler)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
