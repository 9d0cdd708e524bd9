"""Key proxy cost: added latency per small request and streaming throughput, vs direct.

    python benchmarks/bench_keyproxy.py [--requests 200] [--rounds 3] [--no-diagnose]

One sandbox with the openai key route and egress to a local fake upstream (internal
Docker network, nothing leaves the machine). A stdlib client INSIDE the sandbox does
each batch in one ``sandbox.run`` and prints per-request times, so docker exec is never
counted:

- direct:  ``https://api.openai.com/...`` via ``$HTTPS_PROXY`` (forwarder -> sidecar ->
  upstream) with the test CA, a new connection per request;
- proxied: ``http://127.0.0.1:PORT/v1/...`` through the key proxy, which itself goes
  through the same egress path (one request per connection by design).

Rounds alternate the order of the two so noise hits both alike. Streaming: a 50 MB
body (``body_size``) each way, MB/s. Targets: p50 proxied within 2x of direct;
throughput proxied >= 50% of direct.

Unless ``--no-diagnose``, the latency part is repeated with TCP_NODELAY patched into
the fake upstream and the sandbox's forwarder and key proxy (benchmark-side patches,
see ``_common.py``): the shipped code stalls ~40 ms per fresh connection on Nagle vs
delayed ACK, which hides the key proxy's own cost.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

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

from pytest_agentbox import engine
from pytest_agentbox.sandbox import DEFAULT_IMAGE

SMALL, BIG = "/v1/bench/small", "/v1/bench/big"
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
    print(f"  added p50 latency {added:+.1f} ms; ratio proxied/direct {ratio:.2f}x (target <= 2x)")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--no-diagnose", action="store_true")
    args = ap.parse_args()
    client = engine.get_client()
    engine.ensure_image(client, args.image)
    started = time.perf_counter()
    up = start_upstream(client, args.image)
    try:
        json_type = {"content-type": "application/json"}
        up.program(
            [
                {"path": SMALL, "body": '{"ok":true}', "headers": json_type},
                {"path": BIG, "body_size": args.size_mb * MB},
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
        print(f"streaming {args.size_mb} MB ({args.rounds} rounds, median):")
        for mode in MODES:
            each = ", ".join(f"{s:.0f}" for s in speeds[mode])
            print(f"  {mode:<8} {median(speeds[mode]):6.1f} MB/s  (rounds: {each})")
        share = median(speeds["proxied"]) / median(speeds["direct"])
        print(f"  throughput proxied/direct {share:.0%} (target >= 50%)")
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
    verdict = "met" if ratio <= 2 and share >= 0.5 else "MISSED"
    print(f"targets {verdict}: latency ratio {ratio:.2f}x, throughput {share:.0%}")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
