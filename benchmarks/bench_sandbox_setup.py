"""Sandbox setup + teardown against ``docker run --rm IMAGE true``, measured in one run.

    python benchmarks/bench_sandbox_setup.py [--rounds 15] [--image agentbox/base:bookworm]

Prints medians and the ratio (target: at most 3x). Rounds alternate between the two
so that machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from pytest_agentbox import engine
from pytest_agentbox.sandbox import DEFAULT_IMAGE, Sandbox, SandboxConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    args = ap.parse_args()
    client = engine.get_client()
    engine.ensure_image(client, args.image)
    ours, baseline, steps = [], [], {}
    for _ in range(args.rounds):
        t = time.perf_counter()
        subprocess.run(["docker", "run", "--rm", args.image, "true"], check=True)
        baseline.append(time.perf_counter() - t)
        t = time.perf_counter()
        sb = Sandbox.create(SandboxConfig(image=args.image), client)
        sb.close()
        ours.append(time.perf_counter() - t)
        for s in sb.steps:
            steps.setdefault(s.name, []).append(s.seconds)
    b, o = statistics.median(baseline), statistics.median(ours)
    print(f"docker run --rm {args.image} true: median {b:.3f}s over {args.rounds}")
    print(f"sandbox setup+teardown:           median {o:.3f}s over {args.rounds}")
    for name, values in steps.items():
        print(f"  step {name:<18} median {statistics.median(values):.3f}s")
    print(f"ratio: {o / b:.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
