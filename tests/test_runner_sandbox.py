"""What one user command may cost the host: time, processes, pytest's memory. Real containers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pytest_agentbox.sandbox import DEFAULT_TIMEOUT


def test_timeout_kills_every_process_of_the_command_setsid_ones_too(sandbox: Any) -> None:
    r = sandbox.run(
        "setsid sh -c 'sleep 300' & (setsid nohup sleep 301 >/dev/null 2>&1 &) ; "
        "sh -c 'sleep 302' & sleep 60",
        timeout=2,
    )
    assert r.timed_out and r.exit_code == 124
    left = sandbox.run("ps -eo args | grep '[s]leep 30'; true").stdout
    assert left == "", left


def test_a_command_that_ends_leaves_its_background_helpers_alone(sandbox: Any) -> None:
    # Only a timeout kills what a command started; a setup_command may leave a helper.
    assert sandbox.run("(setsid sleep 303 >/dev/null 2>&1 &); true").ok
    assert "sleep 303" in sandbox.run("ps -eo args").stdout


def test_a_silent_command_may_run_as_long_as_its_timeout(sandbox: Any) -> None:
    # The client's own socket timeout (120 s) must not end a quiet command early.
    assert DEFAULT_TIMEOUT >= 300
    start = time.monotonic()
    r = sandbox.run("sleep 150; echo done", timeout=300)
    assert r.ok and r.stdout == "done\n", (r.exit_code, r.stderr)
    assert time.monotonic() - start >= 150


# Run in its own process so that its peak memory is its own.
PRINTS_300_MB = r"""
import json, resource, sys
from pytest_agentbox.sandbox import Sandbox, SandboxConfig
with Sandbox.create(SandboxConfig(image=sys.argv[1])) as sb:
    sb.run("true")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = sb.run("head -c 300000000 /dev/zero | tr '\\0' x; head -c 5000000 /dev/zero >&2")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kb": after - before, "kept": len(r.stdout), "dropped": r.stdout_dropped,
                  "err_kept": len(r.stderr), "err_dropped": r.stderr_dropped,
                  "tail": r.stdout[-120:], "ok": r.ok}))
"""


def test_300_mb_of_output_costs_pytest_less_than_50_mb(
    docker_client: Any, base_image: str, tmp_path: Path
) -> None:
    script = tmp_path / "prints.py"
    script.write_text(PRINTS_300_MB)
    out = subprocess.run(
        [sys.executable, str(script), base_image], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"]
    assert res["grew_kb"] < 50 * 1024, res
    cap = 16 * 1024 * 1024
    assert res["dropped"] == 300_000_000 - cap
    assert "more bytes of stdout dropped past the output cap" in res["tail"]
    assert res["err_dropped"] == 0 and res["err_kept"] == 5_000_000


def test_write_file_onto_a_fifo_the_agent_planted_fails_at_once(sandbox: Any) -> None:
    import pytest

    from pytest_agentbox.errors import AgentboxError

    sandbox.run("mkfifo ~/app/trap")
    start = time.monotonic()
    with pytest.raises(AgentboxError, match="write_file"):
        sandbox.write_file("trap", "data")
    assert time.monotonic() - start < 60


def test_image_healthcheck_never_runs(
    docker_client: Any, base_image: str, make_sandbox: Any
) -> None:
    from conftest import built_image

    line = 'HEALTHCHECK --interval=1s CMD ["/bin/sh", "-c", "id -u > /tmp/health-ran"]'
    with built_image(docker_client, "health", base_image, line) as tag:
        sb = make_sandbox(image=tag)
        time.sleep(3)
        assert sb.run("test -e /tmp/health-ran").exit_code == 1
