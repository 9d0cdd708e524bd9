"""The key never comes back through the key proxy: local processes on 127.0.0.1 only.

A scripted TLS upstream in this process (certificate from a throwaway ``trustme`` CA)
answers with bytes each test writes itself: the real key in every encoding, in the body
(plain, gzip, deflate, chunked at every offset, SSE) and in allowlisted headers, or an
echo of the request the proxy sent it. The agent's side must see none of it, with the
same length where a length was declared, and the request log must hold a leak record
(never the key).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import random
import secrets
import socket
import ssl
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import accept_forever
from test_keyproxy_local import DOMAINS, KeyProxy, parse, trusted

from pytest_agentbox.inside import keyproxy

Answer = Callable[[bytes], list[Any]]  # the request head -> bytes to write, or pauses (float)


class Scripted:
    """A TLS upstream whose answer to each request is ``self.answer(head)``."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*DOMAINS).configure_cert(self.ctx)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.heads = self.sock.getsockname()[1], []
        self.answer: Answer = lambda head: [b"HTTP/1.1 204 No Content\r\n\r\n"]
        accept_forever(self.sock, self._serve)

    def _serve(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError), raw, self.ctx.wrap_socket(raw, server_side=True) as s:
            s.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0]
            self.heads.append(head)
            for part in self.answer(head):
                if isinstance(part, float):
                    time.sleep(part)
                else:
                    s.sendall(part)

    def close(self) -> None:
        self.sock.close()


def response(
    body: bytes, headers: dict[str, str] | None = None, status: bytes = b"200 OK"
) -> bytes:
    lines = [b"HTTP/1.1 " + status, b"Content-Length: %d" % len(body), b"Connection: close"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(pieces: list[bytes], headers: dict[str, str] | None = None) -> list[Any]:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in (headers or {}).items())
    return [head + b"\r\n", *(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p), b"0\r\n\r\n"]


def encodings(key: str) -> dict[str, bytes]:
    """What a debug or echo endpoint could send back, computed here independently."""
    raw, bearer = key.encode(), f"Bearer {key}".encode()
    out = {
        "raw": raw,
        "bearer": bearer,
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
    }
    for name, text in (("key", raw), ("bearer", bearer), ("basic", b"user:" + raw)):
        out[f"b64-{name}"] = base64.b64encode(text)
        out[f"b64url-{name}"] = base64.urlsafe_b64encode(text)
        out[f"b64-{name}-nopad"] = base64.b64encode(text).rstrip(b"=")
    out["b64-in-json"] = base64.b64encode(json.dumps({"authorization": f"Bearer {key}"}).encode())
    out["pct"] = urllib.parse.quote(key, safe="").encode()
    out["pct-bearer"] = urllib.parse.quote(f"Bearer {key}", safe="").encode()
    out["pct-all"] = "".join(f"%{b:02X}" for b in raw).encode()
    out["pct-all-lower"] = "".join(f"%{b:02x}" for b in raw).encode()
    out["json"] = json.dumps({"h": f"Bearer {key}"}).encode()
    out["json-slash"] = json.dumps(key).replace("/", "\\/").encode()
    html = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}  # as Go's encoding/json
    out["json-html"] = "".join(html.get(c, c) for c in json.dumps(key)).encode()
    return out


def leaked(key: str, data: bytes) -> list[str]:
    """Names of the encodings of ``key`` found in ``data`` (8+ key bytes of each)."""
    found = [name for name, blob in encodings(key).items() if blob in data]
    # base64 masked at the key's own characters: no 12-char run of any alignment is left
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + key.encode())[4:-4]
        for variant in (enc, enc.translate(bytes.maketrans(b"+/", b"-_"))):
            if any(variant[i : i + 12] in data for i in range(0, len(variant) - 12, 4)):
                found.append(f"b64-fragment-{shift}")
    return found


# Printable specials so every form differs from the raw key: percent, JSON, base64url.
KEY = "sk-test-" + secrets.token_hex(12) + '/+?>~&<"\\=%'


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def upstream(ca: trustme.CA) -> Iterator[Scripted]:
    server = Scripted(ca)
    yield server
    server.close()


@pytest.fixture(scope="module")
def shared(
    ca: trustme.CA, upstream: Scripted, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KeyProxy]:
    routes = [
        {"name": "openai", "domain": "api.openai.com", "auth_style": "bearer", "key": KEY},
        {"name": "anthropic", "domain": "api.anthropic.com", "auth_style": "x-api-key"},
    ]
    kp = KeyProxy(tmp_path_factory.mktemp("proxy"), upstream.port, trusted(ca), routes=routes)
    yield kp
    kp.close()


@pytest.fixture
def kp(shared: KeyProxy, upstream: Scripted) -> KeyProxy:
    upstream.heads.clear()
    shared.log_path.write_text("")
    return shared


def get(kp: KeyProxy, route: str = "openai", path: str = "/v1/x") -> bytes:
    return kp.raw(f"GET {path} HTTP/1.1\r\nx-api-key: @T@\r\n\r\n".encode(), route=route)


def leak_records(kp: KeyProxy, count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(x) for x in kp.log_path.read_text().splitlines() if x]
        leaks = [x for x in lines if x.get("event") == "leak"]
        if len(leaks) >= count or time.monotonic() > deadline:
            text = kp.log_path.read_text()
            for secret in (*kp.keys.values(), kp.token):
                assert secret not in text and json.dumps(secret)[1:-1] not in text
            return leaks


def masked(data: bytes) -> bytes:
    """``data`` with the key proxy's own patterns masked: what the agent must receive."""
    out = bytearray(data)
    for pattern in keyproxy.Leaks([KEY.encode()]).forms:
        at = data.find(pattern)
        while at >= 0:
            out[at : at + len(pattern)] = b"*" * len(pattern)
            at = data.find(pattern, at + 1)
    return bytes(out)


# ------------------------------------------------------------------------------ body


def test_every_encoding_of_the_key_in_a_plain_body_is_masked_same_length(
    kp: KeyProxy, upstream: Scripted
) -> None:
    body = b"".join(b"<%s:%s>\n" % (n.encode(), v) for n, v in encodings(KEY).items())
    upstream.answer = lambda head: [response(body, {"content-type": "application/json"})]
    status, headers, got = parse(get(kp))
    assert status == 200 and headers["content-length"] == [str(len(body))] == [str(len(got))]
    assert leaked(KEY, got) == []
    assert got.count(b"<") == len(encodings(KEY)) and b"<hex:" in got  # the rest intact
    forms = {r["form"] for r in leak_records(kp)}
    assert {"raw", "base64", "base64url", "hex", "percent", "json"} <= forms
    assert all(r["where"] == "body" and r["route"] == "openai" for r in leak_records(kp))


def test_an_echo_of_the_forwarded_request_is_masked(kp: KeyProxy, upstream: Scripted) -> None:
    def echo(head: bytes) -> list[Any]:
        assert f"Authorization: Bearer {KEY}".encode() in head  # the upstream got the key
        b64, url = base64.b64encode(head).decode(), urllib.parse.quote(head)
        body = json.dumps({"headers": head.decode(), "b64": b64, "hex": head.hex(), "url": url})
        return [response(body.encode())]

    upstream.answer = echo
    status, _, got = parse(get(kp))
    assert status == 200 and leaked(KEY, got) == []
    assert b"api.openai.com" in got  # what is not the key passes
    assert json.loads(got)["headers"].startswith("GET /v1/x HTTP/1.1")


def test_other_routes_keys_are_masked_too(kp: KeyProxy, upstream: Scripted) -> None:
    other = kp.keys["anthropic"]
    upstream.answer = lambda head: [response(f"{other} {KEY}".encode())]
    got = parse(get(kp, route="openai"))[2]
    assert other.encode() not in got and KEY.encode() not in got
    assert got == b"*" * len(other) + b" " + b"*" * len(KEY)


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate-zlib", "deflate-raw"])
def test_compressed_bodies_are_decoded_scanned_and_sent_as_identity(
    kp: KeyProxy, upstream: Scripted, coding: str
) -> None:
    body = b"".join(b"%s %s\n" % (n.encode(), v) for n, v in encodings(KEY).items()) * 50
    if "gzip" in coding:
        packed = gzip.compress(body)
    else:
        z = zlib.compressobj(wbits=15 if coding == "deflate-zlib" else -15)
        packed = z.compress(body) + z.flush()
    name = coding if "gzip" in coding else "deflate"
    upstream.answer = lambda head: [response(packed, {"content-encoding": name})]
    status, headers, got = parse(get(kp))
    assert status == 200 and "content-encoding" not in headers
    assert "content-length" not in headers  # close-delimited after decoding
    assert got == masked(body) and leaked(KEY, got) == []
    assert b"Accept-Encoding: identity" in upstream.heads[0]
    assert leak_records(kp)


def test_a_compressed_key_split_across_reads_is_masked(kp: KeyProxy, upstream: Scripted) -> None:
    packed = gzip.compress(b"a" * 70_000 + KEY.encode() + b"b" * 70_000)
    pieces = [packed[i : i + 7] for i in range(0, len(packed), 7)]
    upstream.answer = lambda head: chunked(pieces, {"content-encoding": "gzip"})
    got = parse(get(kp))[2]
    assert got == b"a" * 70_000 + b"*" * len(KEY) + b"b" * 70_000


@pytest.mark.parametrize(
    "coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "identity, x"]
)
def test_unknown_content_encoding_is_502_and_nothing_passes(
    kp: KeyProxy, upstream: Scripted, coding: str
) -> None:
    upstream.answer = lambda head: [
        response(b"opaque bytes " + KEY.encode(), {"content-encoding": coding})
    ]
    status, _, got = parse(get(kp))
    assert (status, got) == (502, b"Upstream connection failed")


def test_a_decompression_bomb_is_cut_at_100_mib(kp: KeyProxy, upstream: Scripted) -> None:
    z = zlib.compressobj(1, wbits=31)
    block = b"\0" * (1 << 20)
    packed = b"".join(z.compress(block) for _ in range(120)) + z.flush()
    upstream.answer = lambda head: [response(packed, {"content-encoding": "gzip"})]
    total, started = 0, time.monotonic()
    with kp.connect() as s:
        s.sendall(b"GET /v1/x HTTP/1.1\r\nx-api-key: %s\r\n\r\n" % kp.token.encode())
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(1 << 20):
                total += len(chunk)
    assert total <= 100 * 1024 * 1024 + 4096 and time.monotonic() - started < 10
    entry = next(x for x in kp.log_entries(1) if x.get("path") == "/v1/x")
    assert entry["note"] == "decoded body over 100 MiB"


def test_a_key_split_at_every_offset_across_chunks_is_masked(
    kp: KeyProxy, upstream: Scripted
) -> None:
    forms = list(keyproxy.Leaks([KEY.encode()]).forms)
    pieces, expected = [], b""
    for form in forms:
        for cut in range(1, len(form)):
            pieces += [b"[" + form[:cut], form[cut:] + b"]"]
            expected += b"[" + b"*" * len(form) + b"]"
    pieces += [b"[" + KEY.encode()[:5]]  # a key-like start at the very end: sent at the end
    expected += b"[" + KEY.encode()[:5]
    upstream.answer = lambda head: chunked(pieces)
    status, headers, got = parse(get(kp))
    assert status == 200 and "transfer-encoding" not in headers
    assert got == expected
    counts = {}
    for r in leak_records(kp):
        counts[r["form"]] = counts.get(r["form"], 0) + r["count"]
    assert sum(counts.values()) == sum(len(f) - 1 for f in forms)


def test_sse_events_with_the_key_are_masked_and_still_stream(
    kp: KeyProxy, upstream: Scripted
) -> None:
    key, half = KEY.encode(), len(KEY) // 2
    events = [b'data: {"n": 1, "echo": "%s"}\n\n' % key, b'data: {"key": "' + key[:half],
              key[half:] + b'"}\n\n', b"data: [DONE]\n\n"]  # fmt: skip
    head, *chunks, end = chunked(events, {"content-type": "text/event-stream"})
    upstream.answer = lambda _: [head, *chunks[:3], 1.5, chunks[3], end]
    started, data, both = time.monotonic(), b"", 0.0
    with kp.connect() as s:
        s.sendall(b"GET /v1/stream HTTP/1.1\r\nx-api-key: %s\r\n\r\n" % kp.token.encode())
        while chunk := s.recv(65536):
            data += chunk
            if not both and data.count(b"*" * len(KEY)) == 2 and data.endswith(b"\n\n"):
                both = time.monotonic() - started
    status, headers, body = parse(data)
    assert status == 200 and headers["content-type"] == ["text/event-stream"]
    assert leaked(KEY, body) == [] and body.endswith(b'"}\n\ndata: [DONE]\n\n')
    assert 0 < both < 1.0 < time.monotonic() - started  # the keyed events did not wait


def plain(body: bytes, framing: str) -> bytes:
    """A head for ``body`` framed by its Content-Length or by the connection's close."""
    length = b"Content-Length: %d\r\n" % len(body) if framing == "length" else b""
    return b"HTTP/1.1 200 OK\r\n" + length + b"Connection: close\r\n\r\n"


@pytest.mark.parametrize("framing", ["length", "close"])
def test_a_key_split_across_reads_of_an_unchunked_body_is_masked(
    kp: KeyProxy, upstream: Scripted, framing: str
) -> None:
    # Unchunked bodies are read straight from TLS into one buffer: the pauses end each
    # fill inside a pattern, so the held tail must carry it into the next fill.
    pieces, body = [], b""
    for form in keyproxy.Leaks([KEY.encode()]).forms:
        for cut in (1, len(form) // 2, len(form) - 1):
            pieces += [b"[" + form[:cut], 0.02, form[cut:] + b"]", 0.02]
            body += b"[" + form + b"]"
    upstream.answer = lambda head: [plain(body, framing), *pieces]
    status, headers, got = parse(get(kp))
    assert status == 200 and got == masked(body) and leaked(KEY, got) == []
    assert headers.get("content-length", [str(len(body))]) == [str(len(body))]


@pytest.mark.parametrize("framing", ["length", "close"])
def test_a_long_body_is_masked_across_every_buffer_fill(
    kp: KeyProxy, upstream: Scripted, framing: str
) -> None:
    # 3 MB in one write with a key every 10007 bytes: keys straddle fill boundaries
    # wherever they fall, and nothing is lost or repeated between fills.
    text = b'{"delta": "lorem ipsum dolor sit amet"}\n' * 80_000
    body = b"".join(text[i : i + 10007] + KEY.encode() for i in range(0, len(text), 10007))
    upstream.answer = lambda head: [plain(body, framing) + body]
    got = parse(get(kp))[2]
    assert len(got) == len(body) and got == masked(body)
    assert sum(r["count"] for r in leak_records(kp)) == body.count(KEY.encode())


TRUNCATED = {  # an answer that ends early or is malformed, and the note it is logged with
    "short-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                     "body shorter than its Content-Length"),
    "short-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n0123456789",
                    "upstream body cut short or malformed"),
    "bad-chunk-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"a\r\n0123456789\r\nzz\r\nmore\r\n0\r\n\r\n",
                       "upstream body cut short or malformed"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TRUNCATED))
def test_an_answer_cut_short_or_malformed_is_a_reset_and_logged(
    kp: KeyProxy, upstream: Scripted, case: str
) -> None:
    answer, note = TRUNCATED[case]
    upstream.answer = lambda head: [answer]
    with pytest.raises(ConnectionResetError):  # never a clean end the agent would trust
        get(kp)
    entry = next(x for x in kp.log_entries(1) if x.get("path") == "/v1/x")
    assert entry["note"] == note


def test_chunk_extensions_and_trailers_are_read_and_never_passed(
    kp: KeyProxy, upstream: Scripted
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunks = b"5;ext=1\r\nhello\r\n6;a=b;c\r\n world\r\n0\r\nX-Trailer: " + KEY.encode()
    upstream.answer = lambda _: [head, chunks, 0.05, b"\r\n\r\n"]
    status, headers, got = parse(get(kp))
    assert (status, got) == (200, b"hello world") and "x-trailer" not in headers


# --------------------------------------------------------------------------- headers


def test_the_key_in_allowlisted_header_values_and_names_is_masked(
    kp: KeyProxy, upstream: Scripted
) -> None:
    forms = encodings(KEY)
    sent = {
        "x-request-id": KEY, "request-id": forms["b64-bearer"].decode(),
        "x-ratelimit-remaining": forms["hex"].decode(), "openai-version": forms["pct-all"].decode(),
        f"x-ratelimit-{forms['hex'].decode()}": "1", "cache-control": f"Bearer {KEY}",
        "content-type": "application/json",
    }  # fmt: skip
    upstream.answer = lambda head: [response(b"{}", sent)]
    status, headers, body = parse(get(kp))
    assert (status, body) == (200, b"{}")
    head = get(kp).split(b"\r\n\r\n")[0]
    assert leaked(KEY, head) == []
    assert headers["x-request-id"] == ["*" * len(KEY)]
    assert headers["cache-control"] == ["Bearer " + "*" * len(KEY)]
    assert headers["content-type"] == ["application/json"]
    assert len(headers["request-id"][0]) == len(sent["request-id"])
    assert "x-ratelimit-" + "*" * len(forms["hex"]) in headers
    where = {r["where"] for r in leak_records(kp, 6)}
    assert {"header:x-request-id", "header:request-id", "header:cache-control"} <= where
    assert {"header:x-ratelimit-remaining", "header:openai-version"} <= where


# ------------------------------------------------------------------------ the scanner


def test_scanner_masks_at_every_split_and_alignment_in_process() -> None:
    key = ("sk-" + secrets.token_hex(20)).encode()
    leaks = keyproxy.Leaks([key])
    for prefix in (b"", b"a", b"ab", b"Bearer ", b"user:", b"xyz12"):
        text = b"{" + base64.b64encode(prefix + key + b"tail") + b"}"
        masked_text, found = leaks.mask(text)
        assert found == ["base64"] and len(masked_text) == len(text)
        assert b"*" * (len(key) * 4 // 3 - 2) in masked_text  # all the key's own characters
    stream = b"head " + key + b" middle " + key.hex().encode() + b" end"
    for cut in range(len(stream)):
        out, tail = b"", b""
        for part in (stream[:cut], stream[cut:]):
            buf, _ = leaks.mask(tail + part)
            keep = leaks.hold(buf)
            out, tail = out + buf[: len(buf) - keep], buf[len(buf) - keep :]
        out += tail
        assert out == b"head " + b"*" * len(key) + b" middle " + b"*" * (2 * len(key)) + b" end"


def test_scanner_holds_back_only_a_possible_key_start() -> None:
    leaks = keyproxy.Leaks([b"sk-test-0123456789abcdef"])
    assert leaks.hold(b"data: {}\n\n") == 0
    assert leaks.hold(b"data: sk-te") == 5
    assert leaks.hold(b"x" * 100) == 0
    big = b"y" * 1_000_000  # its cost is a benchmark's (bench_scan.py), not a test's
    assert leaks.mask(big) == (big, []) and leaks.hold(big) == 0


@pytest.mark.parametrize("native", [True, False], ids=["memmem", "bytes.find"])
@pytest.mark.parametrize("distinct", [False, True], ids=["hex-key", "distinct-bytes-key"])
def test_the_scan_finds_every_form_whichever_search_runs(native: bool, distinct: bool) -> None:
    key = ("sk-bench-" + secrets.token_hex(20)).encode()
    if distinct:  # its raw form has no repeated byte: the count check's smallest count
        key = b"sk-" + bytes(random.sample(b"0123456789abcdefghijklmnopqrstuvwxyz", 36))
    leaks = keyproxy.Leaks([key], native=native)
    assert (leaks.memmem is not None) is native  # this host's python has ctypes and memmem
    words = b"the of and to in is was that for it with as his on be at by had are but".split()
    rng = random.Random(7)
    events = (
        b'data: {"delta": "%s"}\n\n' % b" ".join(rng.choices(words, k=6)) for _ in range(9000)
    )
    text = b"".join(events)[: 4 * keyproxy.BUF]
    same = key[-1:] * len(text)  # the pattern's own byte everywhere: the count check passes
    none = b"\0" * len(text)  # the pattern's bytes only where it is: the count check's edge
    for body in (text, same, none, random.randbytes(len(text))):
        for pattern, form in leaks.forms.items():
            for at in (0, 12345, len(body) - len(pattern)):
                buf = bytearray(body[:at] + pattern + body[at + len(pattern) :])
                assert form in leaks.scan(buf, len(buf)), (form, at)
                assert buf[at : at + len(pattern)] == b"*" * len(pattern)
                assert key not in buf and bytes(buf).count(b"*") >= len(pattern)
        assert leaks.scan(bytearray(body), len(body)) == []  # nothing where nothing is


def test_log_leak_record_names_route_where_and_form_but_never_the_key(
    kp: KeyProxy, upstream: Scripted
) -> None:
    upstream.answer = lambda head: [response(base64.b64encode(KEY.encode()), {"x-request-id": KEY})]
    get(kp, path="/v1/models?api_key=q")
    records = leak_records(kp, 2)
    assert {(r["route"], r["path"], r["where"], r["form"], r["count"]) for r in records} == {
        ("openai", "/v1/models", "body", "base64", 1),
        ("openai", "/v1/models", "header:x-request-id", "raw", 1),
    }  # fmt: skip
    assert all(
        set(r) == {"ts", "event", "route", "path", "where", "form", "count"} for r in records
    )
    assert "api_key" not in Path(kp.log_path).read_text()
