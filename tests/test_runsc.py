"""gVisor (runsc) as the agent container's runtime, on an engine that has it registered.

``scripts/engine2 start`` registers Debian's runsc on the second engine; run the suite
against it (``eval "$(scripts/engine2 env)"``) and these run, on any other engine they
are skipped with that hint. What is proven here is what holds under runsc today; the
probe findings for the rest are in issue 12.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from conftest import as_root, ours

from pytest_agentbox.errors import HardeningError
from pytest_agentbox.manifest import KeyRoute

RUNTIME = "runsc"


@pytest.fixture(scope="module")
def runsc(docker_client: Any) -> str:
    if RUNTIME not in (docker_client.info().get("Runtimes") or {}):
        pytest.skip(
            "no runsc runtime on this engine: `scripts/engine2 start`, then "
            '`eval "$(scripts/engine2 env)"` and run again'
        )
    return RUNTIME


def test_agent_container_runs_under_gvisor_not_the_host_kernel(
    make_sandbox: Any, runsc: str
) -> None:
    sb = make_sandbox(runtime=runsc)
    assert sb.container.attrs["HostConfig"]["Runtime"] == runsc
    # gVisor's Sentry answers for the kernel: its /proc/version is its own, never the
    # host's (the engine is on this machine, so the host's is readable here).
    seen = as_root(sb, ["cat", "/proc/version"]).stdout.decode()
    assert seen and seen != Path("/proc/version").read_text()


def test_keys_under_runsc_fail_closed_for_want_of_hidepid(
    make_sandbox: Any, docker_client: Any, runsc: str
) -> None:
    # gVisor's /proc has no hidepid: with keys in use that must stop the sandbox, with
    # the reason, the key in no message, and nothing left on the engine.
    key = "sk-test-" + secrets.token_hex(20)
    route = KeyRoute(
        provider="openai", env_var="OPENAI_API_KEY", base_url_env="OPENAI_BASE_URL",
        domain="api.openai.com", auth_style="bearer", base_path="/v1", required=True,
    )  # fmt: skip
    run_id = secrets.token_hex(8)
    with pytest.raises(HardeningError, match=r"failed closed.*hidepid") as exc:
        make_sandbox(runtime=runsc, key_routes=(route,), keys={"openai": key}, run_id=run_id)
    assert key not in str(exc.value)
    assert ours(docker_client, run_id) == []
