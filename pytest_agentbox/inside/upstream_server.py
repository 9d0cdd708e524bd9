"""A fake provider API for tests: stdlib only, HTTPS, programmable by rewriting a file.

``python3 upstream_server.py --cert C --key K --port 443 --rules RULES.json --log LOG``

RULES.json is re-read on every request: a list of rules, the first match wins::

    {"method": "POST" | "*", "path": "/v1/chat/completions" | "/v1/*",
     "status": 200, "headers": {...}, "body": "text" | null, "gzip": false,
    "body_b64": "<base64 bytes>" | null, "body_size": N | null, "block_b64": "<base64>",
     "sse": [{"data": "...", "delay": 0.0}, ...] | null, "chunk_delay": 0.0,
     "hang": seconds, "close": true}

``sse`` answers ``text/event-stream`` in chunked encoding, each event flushed after its
delay; ``body_size`` streams ``block_b64`` (default ``x``) repeated to N bytes (never held
whole, not gzipped); ``gzip`` compresses the body; ``chunk_delay`` sends the body in
``chunk_size`` (default 1024) byte pieces with that pause between them; ``hang`` waits before
answering; ``close`` drops the connection unanswered. No match is a 404 JSON answer.
Every request but ``GET /__health`` is appended to LOG as one JSON line (method, path
with query, all headers as received, body length and its first 64 KiB as text).
On start one line ``{"ready": true, "port": N}`` goes to stdout (``--port 0`` works).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOG_BODY_MAX = 64 * 1024


def load_rules(path: str) -> list[dict[str, Any]]:
    """The rules list; a file caught mid-write is read again once."""
    for attempt in range(2):
        try:
            with open(path, encoding="utf-8") as f:
                rules = json.load(f)
            return rules if isinstance(rules, list) else []
        except (OSError, ValueError):
            if attempt == 0:
                time.sleep(0.05)
    return []


def match(rules: list[dict[str, Any]], method: str, path: str) -> dict[str, Any] | None:
    """First rule whose method (or "*") and path (exact, or prefix ending in "*") fit."""
    path = path.split("?", 1)[0]
    for rule in rules:
        want = str(rule.get("path", "*"))
        path_ok = path.startswith(want[:-1]) if want.endswith("*") else path == want
        if rule.get("method", "*") in ("*", method) and path_ok:
            return rule
    return None


class Handler(BaseHTTPRequestHandler):
    """Answers every method from the rules file; see the module docstring."""

    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        # The TLS handshake runs here, in the connection's thread, never in accept().
        self.request.settimeout(30)
        # Small writes must not wait for delayed ACKs, or latency figures hide real stalls.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.do_handshake()
        super().setup()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any method token, not only the well-known ones
            return self.answer
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the JSON request log is the record."""

    def answer(self) -> None:
        """Read the body, log the request, answer from the first matching rule."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if self.command == "GET" and self.path == "/__health":
            return self.send_bytes(200, {"content-type": "text/plain"}, b"ok")
        self.server.record(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_len": len(body),
                "body": body[:LOG_BODY_MAX].decode("utf-8", errors="replace"),
            }
        )
        rule = match(load_rules(self.server.rules_path), self.command, self.path)
        if rule is None:
            body = json.dumps({"error": "no rule matches", "path": self.path}).encode()
            return self.send_bytes(404, {"content-type": "application/json"}, body)
        time.sleep(float(rule.get("hang") or 0))
        if rule.get("close"):
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return None
        status, headers = int(rule.get("status", 200)), dict(rule.get("headers") or {})
        if rule.get("sse") is not None:
            return self.send_sse(status, headers, rule["sse"])
        headers.setdefault("content-type", "text/plain; charset=utf-8")
        if rule.get("body_b64"):  # binary payloads: wheels, archives
            data = base64.b64decode(rule["body_b64"])
        elif rule.get("body_size"):  # throughput benchmarks: streamed, any size fits
            block, size = base64.b64decode(rule.get("block_b64") or "eA=="), int(rule["body_size"])
            piece = block * max(1, (1 << 20) // len(block))
            self.start(status, {**headers, "content-length": str(size)})
            while size > 0 and self.command != "HEAD":
                self.wfile.write(piece[:size])
                size -= len(piece)
            return self.wfile.flush()
        else:
            data = str(rule.get("body") or "").encode()
        if rule.get("gzip"):
            data = gzip.compress(data)
            headers["content-encoding"] = "gzip"
        delay, size = float(rule.get("chunk_delay") or 0), int(rule.get("chunk_size") or 1024)
        return self.send_bytes(status, headers, data, delay, size)

    def start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.end_headers()

    def send_bytes(
        self, status: int, headers: dict[str, str], data: bytes, delay: float = 0, size: int = 0
    ) -> None:
        self.start(status, {**headers, "content-length": str(len(data))})
        if self.command == "HEAD":
            return
        pieces = [data[i : i + size] for i in range(0, len(data), size)] if delay else [data]
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(delay)
            self.wfile.write(piece)
            self.wfile.flush()

    def send_sse(self, status: int, headers: dict[str, str], events: list[dict]) -> None:
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache", **headers}
        self.start(status, {**headers, "transfer-encoding": "chunked"})
        for event in events:
            time.sleep(float(event.get("delay") or 0))
            data = f"data: {event.get('data', '')}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    """HTTPS with the handshake in each connection's thread; appends the request log."""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], ctx: ssl.SSLContext, rules: str, log: str) -> None:
        super().__init__(addr, Handler)
        self.ctx, self.rules_path, self.log_path = ctx, rules, log
        self.lock = threading.Lock()

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: failed handshakes are what some tests are about."""

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, print the ready line, serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    for flag in ("--cert", "--key", "--rules", "--log"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 -- an internal test network
    args = parser.parse_args(argv)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    server = Server((args.host, args.port), ctx, args.rules, args.log)
    print(json.dumps({"ready": True, "port": server.server_address[1]}), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
