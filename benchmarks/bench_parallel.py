"""Parallel speed-up: a 24-test sandbox suite with ``pytest -n 0`` vs ``pytest -n 2``.

    python benchmarks/bench_parallel.py [--rounds 3] [--workers 2] [--all-plugins] [--busy N]
    python benchmarks/bench_parallel.py --second-engine URL [--first-engine URL] [--workers 2]

With ``--second-engine`` it compares engines instead: the same suite with ``-n
WORKERS`` on one engine (``--agentbox-engine`` = the first) and spread over two (the
first and ``URL``, e.g. ``tcp://127.0.0.1:23760#certs=DIR`` from ``scripts/engine2
env``), alternating per round; each run's summary says how many sandboxes each engine
made, and both runs must pass all 24.

Writes a throwaway suite to a temp dir (24 tests, each with the ``sandbox`` fixture
and one or two commands; no network) and runs it in subprocesses, alternating the
order per round so noise hits every mode alike. Speed-up = median wall time of
``-n 0`` / median of ``-n 2``; target >= 1.6x on 2 cores.

Baseline, measured in the same run: the same 24 tests against a plain-Docker
``sandbox`` fixture (a conftest that creates the container with the same image,
limits and security options, starts it, runs one exec, and removes it: the
engine work of a sandbox without the plugin's own). Its speed-up is what this
engine and pytest-xdist allow on this machine; the plugin's speed-up is reported
against it as well.

``--busy N`` makes the 12 echo tests also run a CPU loop of N steps in their sandbox
(20000000 is about 0.6 s here), for a suite whose tests do work of their own.

Also prints the summed per-phase test durations (``--durations=0``): when they grow
under ``-n 2`` the workers are waiting on the shared engine.

By default only pytest-xdist and pytest-agentbox are loaded
(``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` plus ``-p``), as in a project's own venv: other
plugins that happen to be installed on the machine (hypothesis alone takes 0.85 s to
import here, once per xdist process) would otherwise be timed too. ``--all-plugins``
keeps whatever is installed.
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


BUSY = 0  # --busy: each test also burns this many loop steps of CPU in its sandbox


@pytest.mark.parametrize("i", range(12))
def test_echo(sandbox, i):
    if BUSY:
        assert sandbox.run(["python3", "-c", f"for _ in range({BUSY}): pass"]).ok
    r = sandbox.run(f"echo hello-{i}")
    assert r.exit_code == 0 and r.stdout == f"hello-{i}\\n"


@pytest.mark.parametrize("i", range(12))
def test_write_then_read(sandbox, i):
    r = sandbox.run(["python3", "-c", f"open('out.txt','w').write('x' * {i})"])
    assert r.ok, r.stderr
    assert sandbox.run("wc -c < out.txt").stdout.strip() == str(i)
'''

# The baseline's fixture: what the engine does for one sandbox, without the plugin.
BASELINE_CONFTEST = """
import shlex
from types import SimpleNamespace

import docker
import pytest

IMAGE = {image!r}
_client = docker.from_env()


@pytest.fixture
def sandbox():
    ct = _client.containers.create(
        IMAGE, command=["sleep", "3600"], user="0", init=True, network_mode="none",
        cap_drop=["ALL"], cap_add=["SYS_ADMIN", "CHOWN", "FOWNER"],
        security_opt=["no-new-privileges"], mem_limit="1g", memswap_limit="1g",
        nano_cpus=10**9, pids_limit=512, detach=True,
    )
    ct.start()
    ct.exec_run(["mkdir", "-p", "/home/agent/app"], user="1000")  # one exec, as hardening

    def run(cmd):
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        code, (out, err) = ct.exec_run(argv, user="1000", workdir="/home/agent/app", demux=True)
        out, err = (out or b"").decode(), (err or b"").decode()
        return SimpleNamespace(exit_code=code, ok=code == 0, stdout=out, stderr=err)

    yield SimpleNamespace(run=run)
    ct.remove(force=True)
"""

DURATION = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s", re.M)
SUMMARY = re.compile(r"(\d+) passed")


def run_suite(
    suite: Path, workers: int, image: str, all_plugins: bool, extra: tuple[str, ...] = ()
) -> tuple[float, dict[str, float]]:
    """Wall seconds of one pytest run and its summed durations per phase."""
    baseline = (suite / "conftest.py").exists()
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:cacheprovider",
           "--durations=0", "--durations-min=0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    if all_plugins:
        cmd += ["-p", "no:benchmark"]
    else:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        cmd += ["-p", "xdist.plugin"]
    if baseline:
        cmd += ["-p", "no:agentbox"]
    else:
        cmd += ["--agentbox-require-docker", "--agentbox-image", image, *extra]
        if not all_plugins:
            cmd += ["-p", "pytest_agentbox.plugin.hooks"]
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
    if per := PER_ENGINE.search(out.stdout):
        print(f"    {per.group(0).strip()}", flush=True)
    return wall, phases


PER_ENGINE = re.compile(r"agentbox: sandboxes per engine: .*$", re.M)


def compare_engines(args: argparse.Namespace) -> None:
    """The suite with -n WORKERS on one engine vs spread over two, in one session."""
    from pytest_agentbox.backends.docker.engine import environment_engine

    first = args.first_engine or environment_engine().url
    modes = {
        "one engine": (f"--agentbox-engine={first}",),
        "two engines": (f"--agentbox-engine={first}", f"--agentbox-engine={args.second_engine}"),
    }
    started = time.perf_counter()
    walls: dict[str, list[float]] = {m: [] for m in modes}
    phases: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    order = list(modes)
    with tempfile.TemporaryDirectory(prefix="agentbox-bench-engines-") as tmp:
        suite = Path(tmp)
        (suite / "pytest.ini").write_text("[pytest]\n")
        (suite / "test_suite.py").write_text(SUITE.replace("BUSY = 0", f"BUSY = {args.busy}", 1))
        for r in range(args.rounds):
            for mode in order if r % 2 == 0 else order[::-1]:
                wall, summed = run_suite(
                    suite, args.workers, args.image, args.all_plugins, modes[mode]
                )
                walls[mode].append(wall)
                phases[mode].append(summed)
                print(f"  round {r + 1}: {mode} -n {args.workers}: {wall:.1f}s", flush=True)
    for mode in modes:
        sums = {p: median([d[p] for d in phases[mode]]) for p in ("setup", "call", "teardown")}
        detail = ", ".join(f"{p} {s:.1f}s" for p, s in sums.items())
        print(
            f"{mode:11s} pytest -n {args.workers}: median wall {median(walls[mode]):.1f}s "
            f"(summed test durations: {detail})"
        )
    ratio = median(walls["one engine"]) / median(walls["two engines"])
    print(
        f"two engines vs one: {ratio:.2f}x the speed (wall one / wall two); "
        f"cores {os.cpu_count()}; total {time.perf_counter() - started:.0f}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image", default="agentbox/base:bookworm")
    ap.add_argument("--all-plugins", action="store_true", help="load every installed plugin")
    ap.add_argument(
        "--busy", type=int, default=0, help="CPU loop steps per echo test, run in the sandbox"
    )
    ap.add_argument(
        "--second-engine", default=None, metavar="URL",
        help="compare one engine with two: this URL is the second (see the docstring)",
    )  # fmt: skip
    ap.add_argument(
        "--first-engine", default=None, metavar="URL",
        help="the first engine (default: the environment's)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.second_engine:
        compare_engines(args)
        return
    started = time.perf_counter()
    runs = [(kind, n) for kind in ("agentbox", "baseline") for n in (0, args.workers)]
    walls: dict[tuple[str, int], list[float]] = {r: [] for r in runs}
    phases: dict[tuple[str, int], list[dict[str, float]]] = {r: [] for r in runs}
    with tempfile.TemporaryDirectory(prefix="agentbox-bench-parallel-") as tmp:
        suites = {"agentbox": Path(tmp, "agentbox"), "baseline": Path(tmp, "baseline")}
        for path in suites.values():
            path.mkdir()
            (path / "pytest.ini").write_text("[pytest]\n")
            suite = SUITE.replace("BUSY = 0", f"BUSY = {args.busy}", 1)
            (path / "test_suite.py").write_text(suite)
        (suites["baseline"] / "conftest.py").write_text(BASELINE_CONFTEST.format(image=args.image))
        for r in range(args.rounds):
            for kind, workers in runs if r % 2 == 0 else runs[::-1]:
                wall, summed = run_suite(suites[kind], workers, args.image, args.all_plugins)
                walls[kind, workers].append(wall)
                phases[kind, workers].append(summed)
                print(f"  round {r + 1}: {kind} -n {workers}: {wall:.1f}s", flush=True)
    for kind, workers in runs:
        done = phases[kind, workers]
        sums = {p: median([d[p] for d in done]) for p in ("setup", "call", "teardown")}
        detail = ", ".join(f"{p} {s:.1f}s" for p, s in sums.items())
        print(
            f"{kind:8s} pytest -n {workers}: median wall {median(walls[kind, workers]):.1f}s "
            f"(summed test durations: {detail})"
        )
    speedup = {k: median(walls[k, 0]) / median(walls[k, args.workers]) for k in suites}
    verdict = "met" if speedup["agentbox"] >= 1.6 else "MISSED"
    plugins = "all installed" if args.all_plugins else "xdist (+ agentbox) only"
    print(
        f"speed-up n0/n{args.workers}: agentbox {speedup['agentbox']:.2f}x "
        f"(target >= 1.6x: {verdict}), plain-Docker baseline {speedup['baseline']:.2f}x; "
        f"agentbox reaches {speedup['agentbox'] / speedup['baseline']:.0%} of the baseline's "
        f"speed-up; cores {os.cpu_count()}; plugins: {plugins}"
    )
    ratio = median(walls["agentbox", 0]) / median(walls["baseline", 0])
    print(f"agentbox -n 0 wall / baseline -n 0 wall: {ratio:.2f}x")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
