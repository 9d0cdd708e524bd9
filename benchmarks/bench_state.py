"""State persistence cost: snapshot (teardown) and restore (setup) vs a stateless sandbox.

    python benchmarks/bench_state.py [--rounds 5] [--files 1000] [--big-mb 50]

Two scopes are seeded once: 1000 small files (1 KiB each, under ``~/workspace``) and
one 50 MB random file (``~/data``). Each round then creates a sandbox per scope (the
state is restored during setup) and closes it (the state is snapshotted during
teardown), plus a baseline sandbox with no state; the order rotates per round. The
state cost is the difference to the baseline; the ``restore state`` setup step is
also reported on its own.

In the same rounds, two more scopes with the same tiny seeded state (3 small files):
one closed as is ("tiny state", a normal snapshot) and one in which the sandbox first
creates a 16 TiB sparse file in ``~/workspace`` (not timed). Its snapshot must be
refused at the member's header (stream closed, previous state kept), so its teardown
should cost about the same as the normal one. No network is used.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import median

from pytest_agentbox.backends.docker import engine
from pytest_agentbox.sandbox import DEFAULT_IMAGE, Sandbox, SandboxConfig
from pytest_agentbox.state import StateStore

TINY = (
    "mkdir -p ~/workspace ~/state"
    " && echo a > ~/workspace/a && echo b > ~/workspace/b && echo s > ~/state/s"
)
# 16 TiB; ext4 (the usual overlay2 backing) stops 4 KiB short of it.
SPARSE = (
    "truncate -s 16T ~/workspace/huge.img 2>/dev/null"
    " || truncate -s 17592186040320 ~/workspace/huge.img"
)
SPARSE_NAME = "16 TiB sparse"

SMALL_FILES = (
    "import os,sys\n"
    "d=os.path.expanduser('~/workspace/files'); os.makedirs(d)\n"
    "blob=os.urandom(1024)\n"
    "for i in range(int(sys.argv[1])):\n"
    "    open(os.path.join(d,'f%04d.txt'%i),'wb').write(blob)\n"
)


def make(client: Any, image: str, store: StateStore, scope: str | None) -> Sandbox:
    cfg = SandboxConfig(image=image, state_scope=scope, state_store=store if scope else None)
    from pytest_agentbox.backends.docker.box import DockerBackend

    return Sandbox.create(cfg, DockerBackend.from_client(client))


def seed(client: Any, image: str, store: StateStore, scope: str, command: list[str]) -> None:
    sb = make(client, image, store, scope)
    try:
        result = sb.run(command, timeout=120)
        if not result.ok:
            raise RuntimeError(f"seeding {scope} failed: {result.stderr[-500:]}")
    finally:
        sb.close()
    if sb.warnings:
        raise RuntimeError(f"seeding {scope}: {sb.warnings}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--big-mb", type=int, default=50)
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    args = ap.parse_args()
    client = engine.get_client()
    engine.ensure_image(client, args.image)
    started = time.perf_counter()
    scopes = {
        "baseline": None,
        "small files": "bench/small-files",
        "one big file": "bench/big",
        "tiny state": "bench/tiny",
        SPARSE_NAME: "bench/tiny-sparse",
    }
    checks = {
        "small files": ("find ~/workspace/files -type f | wc -l", str(args.files)),
        "one big file": ("stat -c %s ~/data/big.bin", str(args.big_mb * 1024 * 1024)),
    }
    with tempfile.TemporaryDirectory(prefix="agentbox-bench-state-") as tmp:
        store = StateStore(Path(tmp) / "store")
        seed(client, args.image, store, "bench/small-files",
             ["python3", "-c", SMALL_FILES, str(args.files)])  # fmt: skip
        big = (
            f"mkdir -p ~/data && head -c {args.big_mb * 1024 * 1024} /dev/urandom > ~/data/big.bin"
        )
        seed(client, args.image, store, "bench/big", ["/bin/sh", "-c", big])
        for scope in ("bench/tiny", "bench/tiny-sparse"):
            seed(client, args.image, store, scope, ["/bin/sh", "-c", TINY])
        sparse_before = store.load("bench/tiny-sparse").read_bytes()  # type: ignore[union-attr]
        for name, scope in scopes.items():
            if scope:
                path = store.load(scope)
                assert path is not None
                print(f"stored {name}: {path.stat().st_size / 1024 / 1024:.1f} MiB tar")
        setup: dict[str, list[float]] = {n: [] for n in scopes}
        teardown: dict[str, list[float]] = {n: [] for n in scopes}
        restore: dict[str, list[float]] = {n: [] for n in scopes}
        names = list(scopes)
        refusal = ""
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                sb = make(client, args.image, store, scopes[name])
                setup[name].append(time.perf_counter() - t)
                restore[name] += [s.seconds for s in sb.steps if s.name == "restore state"]
                if r == 0 and name in checks:  # not timed: prove the state really came back
                    command, want = checks[name]
                    got = sb.run(command).stdout.strip()
                    if got != want:
                        sb.close()
                        raise RuntimeError(f"{name}: restored {got!r}, expected {want!r}")
                if name == SPARSE_NAME:  # not timed: the agent makes the 16 TiB file
                    made = sb.run(["/bin/sh", "-c", SPARSE], timeout=60)
                    if not made.ok:
                        sb.close()
                        raise RuntimeError(f"truncate failed: {made.stderr[-300:]}")
                t = time.perf_counter()
                sb.close()
                teardown[name].append(time.perf_counter() - t)
                if name == SPARSE_NAME:
                    if not any("state archive refused" in w for w in sb.warnings):
                        raise RuntimeError(f"sparse snapshot was not refused: {sb.warnings}")
                    refusal = sb.state_report
                elif sb.warnings:
                    raise RuntimeError(f"{name}: {sb.warnings}")
        if store.load("bench/tiny-sparse").read_bytes() != sparse_before:  # type: ignore[union-attr]
            raise RuntimeError("the refused snapshot changed the stored state")
    base_s, base_t = median(setup["baseline"]), median(teardown["baseline"])
    print(f"medians over {args.rounds} rounds (setup = create with restore, teardown = close):")
    for name in names:
        s, t = median(setup[name]), median(teardown[name])
        line = f"  {name:<13} setup {s:6.3f}s  teardown {t:6.3f}s"
        if name != "baseline":
            line += (
                f"  | restore step {median(restore[name]):.3f}s; state cost: restore "
                f"{s - base_s:+.3f}s, snapshot {t - base_t:+.3f}s"
            )
        print(line)
    normal, sparse = median(teardown["tiny state"]), median(teardown[SPARSE_NAME])
    print(
        f"teardown with a 16 TiB sparse file {sparse:.3f}s vs normal snapshot {normal:.3f}s "
        f"({sparse / normal:.2f}x); previous state kept byte for byte"
    )
    print(f"  report: {refusal}")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
