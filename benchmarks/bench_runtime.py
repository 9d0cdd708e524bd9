"""Sandbox setup + teardown under gVisor (runsc) vs runc, on one engine, in one run.

    eval "$(scripts/engine2 env)"     # the second engine: it has runsc registered
    python benchmarks/bench_runtime.py [--rounds 7] [--image agentbox/base:bookworm]

Per round, in alternating order: ``Sandbox.create`` + ``close()`` under each runtime, and
the engine's own floor, a container run to its end (``docker run --rm --network none``
through the SDK), under each. Prints medians and the runsc / runc ratios.

Under Debian's runsc (2022-12) a sandbox does not come up: hardening cannot remount the
root file system read-only, so it fails closed (see the README's limits). What is timed
for runsc is therefore create until that refusal, clean-up included; the script checks
each time that it was that refusal and that nothing of the sandbox is left.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from typing import Any

from pytest_agentbox import paths
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.box import DockerBackend
from pytest_agentbox.errors import HardeningError
from pytest_agentbox.sandbox import DEFAULT_IMAGE, Sandbox, SandboxConfig

RUNTIMES = ("runc", "runsc")
FAILS_CLOSED = "sandbox hardening failed closed: this kernel refuses PR_SET_CHILD_SUBREAPER"


def left_behind(client: Any, run_id: str) -> list[str]:
    flt = {"label": f"{paths.LABEL_RUN}={run_id}"}
    found = client.containers.list(all=True, filters=flt) + client.volumes.list(filters=flt)
    return [getattr(o, "name", "?") for o in found]


def sandbox_round(client: Any, image: str, runtime: str) -> tuple[float, str]:
    """Seconds of create + close (or create until it fails closed) and what happened."""
    run_id = secrets.token_hex(8)
    config = SandboxConfig(image=image, runtime=runtime, run_id=run_id)
    t = time.perf_counter()
    try:
        sb = Sandbox.create(config, DockerBackend.from_client(client))
    except HardeningError as exc:
        seconds = time.perf_counter() - t
        if not str(exc).startswith(FAILS_CLOSED):
            raise
        outcome = "failed closed (no child subreaper)"
    else:
        sb.close()
        seconds = time.perf_counter() - t
        outcome = "set up and torn down"
    if rest := left_behind(client, run_id):
        raise RuntimeError(f"{runtime}: left behind {rest}")
    return seconds, outcome


def floor_round(client: Any, image: str, runtime: str) -> float:
    t = time.perf_counter()
    client.containers.run(image, ["true"], runtime=runtime, network_mode="none", remove=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    args = ap.parse_args()
    client = engine.get_client()
    engine.ensure_image(client, args.image)
    have = set(engine.engine_info(client).get("Runtimes") or {})
    if missing := [r for r in RUNTIMES if r not in have]:
        raise SystemExit(f'this engine lacks {missing}: eval "$(scripts/engine2 env)" first')
    print(f"engine {engine.engine_of(client).text}, image {args.image}, {args.rounds} rounds")
    sandbox_round(client, args.image, "runc")  # warm-up: image scan cache, first exec
    sandbox_round(client, args.image, "runsc")
    sandbox: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    floor: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    outcomes: dict[str, set[str]] = {r: set() for r in RUNTIMES}
    for i in range(args.rounds):
        order = RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]
        for runtime in order:
            seconds, outcome = sandbox_round(client, args.image, runtime)
            sandbox[runtime].append(seconds)
            outcomes[runtime].add(outcome)
            floor[runtime].append(floor_round(client, args.image, runtime))
    med = {k: {r: statistics.median(v[r]) for r in RUNTIMES} for k, v in
           (("sandbox", sandbox), ("floor", floor))}  # fmt: skip
    for runtime in RUNTIMES:
        print(
            f"{runtime:<6} sandbox median {med['sandbox'][runtime]:.3f}s "
            f"(min {min(sandbox[runtime]):.3f}, max {max(sandbox[runtime]):.3f}; "
            f"{', '.join(sorted(outcomes[runtime]))}); "
            f"container run --rm median {med['floor'][runtime]:.3f}s"
        )
    print(
        f"runsc / runc: sandbox {med['sandbox']['runsc'] / med['sandbox']['runc']:.2f}x, "
        f"container run {med['floor']['runsc'] / med['floor']['runc']:.2f}x"
    )


if __name__ == "__main__":
    main()
