"""Sandbox setup + teardown against ``docker run --rm IMAGE true``, measured in one run.

    python benchmarks/bench_sandbox_setup.py [--rounds 15] [--image agentbox/base:bookworm]
        [--keys]

Prints medians and the ratio (target: at most 3x). Rounds alternate between the
kinds so that machine noise hits them alike. ``--keys`` adds a keyed sandbox (the openai
route, egress through the sidecar, a local fake upstream) to every round.

To compare with another checkout in the same session, run this file with that checkout
first on ``PYTHONPATH`` (it uses only the API both have).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.box import DockerBackend
from pytest_agentbox.sandbox import DEFAULT_IMAGE, Sandbox, SandboxConfig


def keyed_config(image: str, upstream: Any) -> SandboxConfig:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import openai_route

    from pytest_agentbox.policy.egress import compute_policy

    route = openai_route()
    policy = compute_policy(
        declared=[], key_domains=[route.domain], has_setup_command=False, unrestricted=False
    )
    extra = {}
    if "egress_pins" in {f.name for f in dataclasses.fields(SandboxConfig)}:
        extra["egress_pins"] = upstream.pins
    return SandboxConfig(
        image=image, key_routes=(route,), keys={"openai": "sk-bench-" + "0" * 40},
        egress=policy, egress_network=upstream.network_name, extra_ca_pem=upstream.ca_pem,
        **extra,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--keys", action="store_true")
    args = ap.parse_args()
    client = engine.get_client()
    engine.ensure_image(client, args.image)
    upstream = None
    if args.keys:
        from pytest_agentbox.backends.docker.fakeupstream import FakeUpstream

        upstream = FakeUpstream(["api.openai.com"], image=args.image, client=client).start()
    times: dict[str, list[float]] = {"docker run --rm": [], "sandbox": [], "keyed sandbox": []}
    steps: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            t = time.perf_counter()
            subprocess.run(["docker", "run", "--rm", args.image, "true"], check=True)
            times["docker run --rm"].append(time.perf_counter() - t)
            configs = [("sandbox", SandboxConfig(image=args.image))]
            if upstream is not None:
                configs.append(("keyed sandbox", keyed_config(args.image, upstream)))
            for kind, config in configs:
                t = time.perf_counter()
                sb = Sandbox.create(config, DockerBackend.from_client(client))
                sb.close()
                times[kind].append(time.perf_counter() - t)
                for s in sb.steps:
                    steps.setdefault(f"{kind}: {s.name}", []).append(s.seconds)
    finally:
        if upstream is not None:
            upstream.close()
    base = statistics.median(times["docker run --rm"])
    for kind, values in times.items():
        if values:
            med = statistics.median(values)
            print(f"{kind + ':':<18} median {med:.3f}s over {len(values)}  ({med / base:.2f}x)")
    for name, values in steps.items():
        print(f"  step {name:<34} median {statistics.median(values):.3f}s")
    print(f"ratio sandbox / docker run: {statistics.median(times['sandbox']) / base:.2f}x "
          "(target <= 3x)")  # fmt: skip


if __name__ == "__main__":
    main()
