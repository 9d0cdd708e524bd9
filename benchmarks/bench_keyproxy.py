"""Key proxy cost: added latency per small request and streaming throughput, vs direct.

    python benchmarks/bench_keyproxy.py [--requests 200] [--rounds 3] [--no-diagnose]
                                        [--body uniform|text]

One sandbox with the openai key route and egress to a local fake upstream (internal
Docker network, nothing leaves the machine). A stdlib client INSIDE the sandbox does
each batch in one ``sandbox.run`` and prints per-request times, so docker exec is never
counted:

- direct:  ``https://api.openai.com/...`` via ``$HTTPS_PROXY`` (the sidecar's egress
  proxy, which relays to the upstream) with the test CA, a new connection per request;
- proxied: ``http://127.0.0.1:PORT/v1/...`` through the key proxy, whose upstream
  connection the same egress proxy checks and then hands over (one request per agent
  connection by design).

Rounds alternate the order of the two so noise hits both alike. Streaming: a 50 MB
body (``body_size``) each way, MB/s: ``uniform`` is ``b"x"`` repeated (the transport's
figure), ``text`` a 64 KiB block of SSE chat events with varied words repeated (what a
provider streams; the scan's cost depends on the bytes, see ``bench_scan.py``).
Targets (issue 11): p50 proxied <= 1.1x direct; throughput proxied >= 80% of direct.
The key proxy keeps its upstream connections alive (pooled), so after the first request
"proxied" pays no CONNECT and no TLS handshake, while "direct" pays both on every
request.

Ceiling (same run): the key proxy's own work on this machine, in one process on the host
with no container: a loopback TLS server sends the same body; the reader does what the
key proxy does per byte (its TLS and reader filling one buffer, the in-place leak
scan with a random key of the bench's shape, one send to a drained socket pair), and
again without the scan. No proxied figure can beat it: it bounds the streaming ratio.

Unless ``--no-diagnose``, the latency part is repeated with TCP_NODELAY patched into
the fake upstream and the sandbox's forwarder and key proxy (benchmark-side patches,
see ``_common.py``): the shipped code stalls ~40 ms per fresh connection on Nagle vs
delayed ACK, which hides the key proxy's own cost.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import secrets
import socket
import ssl
import threading
import time
from typing import Any

import trustme
from _common import (
    CLIENT,
    MB,
    egress_sandbox,
    median,
    nodelay_tools,
    percentile,
    run_json,
    start_upstream,
    upstream_nodelay,
)

from pytest_agentbox.backends.docker import engine
from pytest_agentbox.inside import keyproxy
from pytest_agentbox.sandbox import DEFAULT_IMAGE

SMALL, BIG = "/v1/bench/small", "/v1/bench/big"
WORDS = b"the of and to in is was that for it with as his on be at by had are but from".split()


def text_block(size: int = 64 * 1024) -> bytes:
    """SSE chat-completion chunks as a provider streams them (one completion's id, time
    and fingerprint in every chunk, words of varied case), ``size`` bytes, seeded."""
    rng, out = random.Random(11), bytearray()
    alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    head = {"id": "chatcmpl-" + "".join(rng.choices(alnum, k=29))}
    head |= {"object": "chat.completion.chunk", "created": rng.randrange(10**9, 2 * 10**9)}
    head |= {"model": "gpt-4o-2024-08-06", "system_fingerprint": f"fp_{rng.randbytes(5).hex()}"}
    while len(out) < size:
        words = b" ".join(rng.choices(WORDS, k=8)).decode()
        words = words.capitalize() if rng.random() < 0.3 else words
        delta = {"index": 0, "delta": {"content": " " + words}, "finish_reason": None}
        out += b"data: " + json.dumps({**head, "choices": [delta]}).encode() + b"\n\n"
    return bytes(out[:size])


MODES = ("direct", "proxied")


def latency(sb: Any, n: int, rounds: int) -> dict[str, list[list[float]]]:
    """Per round and mode, the per-request seconds of one in-sandbox batch of ``n``."""
    out: dict[str, list[list[float]]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            out[mode].append(run_json(sb, CLIENT, mode, "latency", SMALL, str(n)))
    return out


def report_latency(title: str, res: dict[str, list[list[float]]]) -> float:
    """Print pooled p50/p95 and per-round p50s; return the ratio of pooled p50s."""
    print(title)
    p50 = {}
    for mode in MODES:
        pooled = [t for batch in res[mode] for t in batch]
        p50[mode] = percentile(pooled, 50)
        rounds = ", ".join(f"{percentile(b, 50) * 1000:.1f}" for b in res[mode])
        print(
            f"  {mode:<8} n={len(pooled):<4} p50 {p50[mode] * 1000:6.1f} ms  "
            f"p95 {percentile(pooled, 95) * 1000:6.1f} ms  (per-round p50: {rounds})"
        )
    ratio = p50["proxied"] / p50["direct"]
    added = (p50["proxied"] - p50["direct"]) * 1000
    print(
        f"  added p50 latency {added:+.1f} ms; ratio proxied/direct {ratio:.2f}x (target <= 1.1x)"
    )
    return ratio


class Unscanned(keyproxy.Leaks):
    """The key proxy's body loop with the scan (and so the held tail) taken out."""

    def scan(self, buf: bytearray, end: int) -> list[str]:
        return []

    def hold(self, buf: bytes) -> int:
        return 0


def ceiling(size: int, rounds: int, block: bytes) -> dict[str, float]:
    """MB/s of the key proxy's per-byte work in process (median of rounds), see above."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)  # an IP: no name to resolve
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    block = (block * (MB // len(block) + 1))[:MB]

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            with server_ctx.wrap_socket(raw, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(head)
                for _ in range(size // MB):
                    tls.sendall(block)

    def drain(sock: socket.socket) -> None:
        while sock.recv(MB):
            pass

    threading.Thread(target=serve, daemon=True).start()
    keys = [("sk-bench-" + secrets.token_hex(20)).encode()]
    leaks, unscanned = keyproxy.Leaks(keys), Unscanned(keys)
    out: dict[str, list[float]] = {"TLS read + scan + send": [], "TLS read + send": []}
    try:
        for _ in range(rounds):
            for name, speeds in out.items():
                a, b = socket.socketpair()
                threading.Thread(target=drain, args=(b,), daemon=True).start()
                up = http.client.HTTPConnection("127.0.0.1")
                raw = socket.create_connection(listener.getsockname())
                up.sock = keyproxy.TLS(raw, client_ctx, "127.0.0.1")  # the key proxy's TLS
                up.request("GET", "/")
                resp, started = up.getresponse(), time.perf_counter()
                # The key proxy's own body loop (Proxy.relay), no client.
                (leaks if "scan" in name else unscanned).stream(
                    keyproxy.reader(resp, "identity", up.sock), a.sendall, {}
                )
                speeds.append(size / MB / (time.perf_counter() - started))
                up.close()
                a.close()
        piece = bytearray(block[: 4 * keyproxy.BUF])
        started = time.perf_counter()
        for _ in range(0, size, len(piece)):
            leaks.scan(piece, len(piece))
        scan_only = size / MB / (time.perf_counter() - started)
    finally:
        listener.close()
    return {**{k: median(v) for k, v in out.items()}, "scan alone": scan_only}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--no-diagnose", action="store_true")
    ap.add_argument("--body", choices=("uniform", "text"), default="uniform")
    args = ap.parse_args()
    block = text_block() if args.body == "text" else b"x"
    block_b64 = base64.b64encode(block).decode()
    client = engine.get_client()
    engine.ensure_image(client, args.image)
    started = time.perf_counter()
    up = start_upstream(client, args.image)
    try:
        json_type = {"content-type": "application/json"}
        up.program(
            [
                {"path": SMALL, "body": '{"ok":true}', "headers": json_type},
                {"path": BIG, "body_size": args.size_mb * MB, "block_b64": block_b64},
            ]
        )
        with egress_sandbox(client, args.image, up, keys=True) as sb:
            steps = ", ".join(f"{s.name} {s.seconds:.2f}s" for s in sb.steps)
            print(f"sandbox steps: {steps}")
            ratio = report_latency(
                f"small request latency (GET {SMALL}, new connection each, "
                f"{args.rounds} rounds x {args.requests}):",
                latency(sb, args.requests, args.rounds),
            )
            speeds: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    res = run_json(sb, CLIENT, mode, "download", BIG, "1")
                    if res["bytes"] != args.size_mb * MB:
                        raise RuntimeError(f"{mode}: got {res['bytes']} bytes")
                    speeds[mode].append(res["bytes"] / MB / res["seconds"])
        print(f"streaming {args.size_mb} MB of {args.body} ({args.rounds} rounds, median):")
        for mode in MODES:
            each = ", ".join(f"{s:.0f}" for s in speeds[mode])
            print(f"  {mode:<8} {median(speeds[mode]):6.1f} MB/s  (rounds: {each})")
        share = median(speeds["proxied"]) / median(speeds["direct"])
        print(f"  throughput proxied/direct {share:.0%} (issue 11 target >= 80%)")
        bound = ceiling(args.size_mb * MB, args.rounds, block)
        print("ceiling: the key proxy's per-byte work in one process, no container (MB/s):")
        for name, speed in bound.items():
            print(f"  {name:<24} {speed:7.1f}")
        top = bound["TLS read + scan + send"]
        print(f"  direct is {median(speeds['direct']) / top:.0%} of the ceiling, proxied "
              f"{median(speeds['proxied']) / top:.0%}")  # fmt: skip
        if not args.no_diagnose:
            upstream_nodelay(up)
            with nodelay_tools(), egress_sandbox(client, args.image, up, keys=True) as sb:
                report_latency(
                    "diagnostic: same latency test with TCP_NODELAY in fake upstream, "
                    "forwarder and key proxy:",
                    latency(sb, args.requests, args.rounds),
                )
    finally:
        up.close()
    verdict = "met" if ratio <= 1.1 and share >= 0.8 else "MISSED"
    print(f"targets {verdict}: latency ratio {ratio:.2f}x, throughput {share:.0%}")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
