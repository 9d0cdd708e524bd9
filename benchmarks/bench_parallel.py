"""Parallel speed-up: a 24-test sandbox suite with ``pytest -n 0`` vs ``pytest -n 2``.

    python benchmarks/bench_parallel.py [--rounds 3] [--workers 2]

Writes a throwaway suite to a temp dir (24 tests, each with the ``sandbox`` fixture
and one or two commands; no network) and runs it in subprocesses, alternating the
order (n0, n2, n2, n0, ...) so noise hits both alike. Speed-up = median wall time
of ``-n 0`` / median of ``-n 2``; target >= 1.6x on 2 cores. Also prints the summed
per-phase test durations (``--durations=0``): when they grow under ``-n 2`` the
workers are waiting on the shared engine rather than working in parallel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import median

SUITE = '''
"""24 small sandbox tests: one or two commands each."""

import pytest


@pytest.mark.parametrize("i", range(12))
def test_echo(sandbox, i):
    r = sandbox.run(f"echo hello-{i}")
    assert r.exit_code == 0 and r.stdout == f"hello-{i}\\n"


@pytest.mark.parametrize("i", range(12))
def test_write_then_read(sandbox, i):
    r = sandbox.run(["python3", "-c", f"open('out.txt','w').write('x' * {i})"])
    assert r.ok, r.stderr
    assert sandbox.run("wc -c < out.txt").stdout.strip() == str(i)
'''

DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s", re.M)
SUMMARY = re.compile(r"(\d+) passed")


def run_suite(suite: Path, workers: int, image: str | None) -> tuple[float, dict[str, float]]:
    """Wall seconds of one pytest run and its summed durations per phase."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", str(workers),
           "--agentbox-require-docker", "-p", "no:cacheprovider", "-p", "no:benchmark",
           "--durations=0", "--durations-min=0"]  # fmt: skip
    if image:
        cmd += ["--agentbox-image", image]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    t = time.perf_counter()
    out = subprocess.run(
        cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    wall = time.perf_counter() - t
    passed = SUMMARY.search(out.stdout)
    if out.returncode != 0 or not passed or passed.group(1) != "24":
        raise RuntimeError(
            f"suite failed (-n {workers}):\n{out.stdout[-3000:]}{out.stderr[-2000:]}"
        )
    phases: dict[str, float] = {"setup": 0.0, "call": 0.0, "teardown": 0.0}
    for seconds, phase in DURATION.findall(out.stdout):
        phases[phase] += float(seconds)
    return wall, phases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image", default=None)
    args = ap.parse_args()
    started = time.perf_counter()
    modes = (0, args.workers)
    walls: dict[int, list[float]] = {m: [] for m in modes}
    phases: dict[int, list[dict[str, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="agentbox-bench-parallel-") as tmp:
        suite = Path(tmp)
        (suite / "pytest.ini").write_text("[pytest]\n")
        (suite / "test_suite.py").write_text(SUITE)
        for r in range(args.rounds):
            for workers in modes if r % 2 == 0 else modes[::-1]:
                wall, summed = run_suite(suite, workers, args.image)
                walls[workers].append(wall)
                phases[workers].append(summed)
                print(f"  round {r + 1}: -n {workers}: {wall:.1f}s", flush=True)
    for workers in modes:
        sums = {p: median([d[p] for d in phases[workers]]) for p in ("setup", "call", "teardown")}
        detail = ", ".join(f"{p} {s:.1f}s" for p, s in sums.items())
        print(
            f"pytest -n {workers}: median wall {median(walls[workers]):.1f}s "
            f"(summed test durations: {detail})"
        )
    speedup = median(walls[0]) / median(walls[args.workers])
    verdict = "met" if speedup >= 1.6 else "MISSED"
    cores = os.cpu_count()
    print(f"speed-up n0/n{args.workers}: {speedup:.2f}x (target >= 1.6x: {verdict}); cores {cores}")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
