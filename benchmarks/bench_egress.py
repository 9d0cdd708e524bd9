"""Egress path cost: 50 MB download and connection set-up, egress vs attached directly.

    python benchmarks/bench_egress.py [--rounds 5] [--requests 100] [--no-diagnose]

Both sandboxes fetch from the same local fake upstream (internal Docker network,
nothing leaves the machine) with a stdlib client run INSIDE the sandbox (one
``sandbox.run`` per batch, so docker exec is never counted):

- egress: the filtered path, sandbox -> 127.0.0.1 (a listener handed to the sidecar's
  egress proxy; relayed through a root forwarder only where the handoff is refused) ->
  upstream, via ``$HTTPS_PROXY``;
- direct: a ``network_unrestricted`` sandbox attached to the upstream's network,
  dialling ``api.openai.com:443`` itself.

Rounds alternate the order. Figures: download MB/s (median of rounds) and the round
trip of a tiny HTTPS request on a new connection (TCP + CONNECT + TLS + request), p50
and p95 over all rounds. Target: egress throughput >= 50% of direct.

Unless ``--no-diagnose``, set-up time is measured again after restarting the fake
upstream with TCP_NODELAY (its Nagle stall otherwise hides everything else), and once
more with TCP_NODELAY patched into the sandbox's forwarder (benchmark-side patch, see
``_common.py``), to show what the egress path itself costs and what the fix saves.
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

from pytest_agentbox.backends.docker import engine
from pytest_agentbox.sandbox import DEFAULT_IMAGE

SMALL, BIG = "/v1/bench/small", "/v1/bench/big"


def alternate(names: list[str], rounds: int) -> list[list[str]]:
    """Round r runs the names rotated by r, so no one always goes first."""
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)]


def setup_times(boxes: dict[str, Any], n: int, rounds: int) -> dict[str, list[float]]:
    """Per sandbox, all per-request seconds of ``rounds`` in-sandbox batches of ``n``."""
    out: dict[str, list[float]] = {name: [] for name in boxes}
    for order in alternate(list(boxes), rounds):
        for name in order:
            out[name] += run_json(boxes[name], CLIENT, "direct", "latency", SMALL, str(n))
    return out


def print_setup(title: str, res: dict[str, list[float]]) -> dict[str, float]:
    print(title)
    p50 = {}
    for name, times in res.items():
        p50[name] = percentile(times, 50)
        print(
            f"  {name:<16} n={len(times):<4} p50 {p50[name] * 1000:6.1f} ms  "
            f"p95 {percentile(times, 95) * 1000:6.1f} ms"
        )
    return p50


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--no-diagnose", action="store_true")
    args = ap.parse_args()
    client = engine.get_client()
    engine.ensure_image(client, args.image)
    started = time.perf_counter()
    up = start_upstream(client, args.image)
    try:
        up.program(
            [
                {"path": SMALL, "body": '{"ok":true}'},
                {"path": BIG, "body_size": args.size_mb * MB},
            ]
        )
        with (
            egress_sandbox(client, args.image, up, keys=False) as egress,
            egress_sandbox(client, args.image, up, keys=False, unrestricted=True) as direct,
        ):
            assert egress.env.get("HTTPS_PROXY") and not direct.env.get("HTTPS_PROXY")
            boxes = {"egress": egress, "direct": direct}
            speeds: dict[str, list[float]] = {"egress": [], "direct": []}
            for order in alternate(list(boxes), args.rounds):
                for name in order:
                    res = run_json(boxes[name], CLIENT, "direct", "download", BIG, "1")
                    if res["bytes"] != args.size_mb * MB:
                        raise RuntimeError(f"{name}: got {res['bytes']} bytes")
                    speeds[name].append(res["bytes"] / MB / res["seconds"])
            print(f"download {args.size_mb} MB ({args.rounds} rounds, median):")
            for name, values in speeds.items():
                each = ", ".join(f"{v:.0f}" for v in values)
                print(f"  {name:<8} {median(values):6.1f} MB/s  (rounds: {each})")
            share = median(speeds["egress"]) / median(speeds["direct"])
            print(f"  throughput egress/direct {share:.0%} (target >= 50%)")
            p50 = print_setup(
                f"connection set-up + tiny request ({args.rounds} rounds x {args.requests}, "
                "fake upstream as shipped):",
                setup_times(boxes, args.requests, args.rounds),
            )
            print(f"  ratio egress/direct p50 {p50['egress'] / p50['direct']:.2f}x")
            if not args.no_diagnose:
                upstream_nodelay(up)
                with nodelay_tools(), egress_sandbox(client, args.image, up, keys=False) as fixed:
                    boxes["egress+nodelay"] = fixed
                    p50 = print_setup(
                        "diagnostic: same, fake upstream with TCP_NODELAY; "
                        "egress+nodelay = forwarder patched with TCP_NODELAY:",
                        setup_times(boxes, args.requests, args.rounds),
                    )
                for name in ("egress", "egress+nodelay"):
                    ratio = p50[name] / p50["direct"]
                    print(f"  ratio {name}/direct p50 {ratio:.2f}x")
    finally:
        up.close()
    print(f"target {'met' if share >= 0.5 else 'MISSED'}: egress throughput {share:.0%} of direct")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
