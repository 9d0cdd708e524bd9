"""gVisor (runsc) as the agent container's runtime, on an engine that has it registered.

``scripts/engine2 start`` registers Debian's runsc on the second engine; run the suite
against it (``eval "$(scripts/engine2 env)"``) and these run, on any other engine they
are skipped with that hint. What is proven here is what holds under runsc today, and
that every sandbox fails closed there, with its reason, before any user code runs.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import pytest
from conftest import ours

from pytest_agentbox.errors import HardeningError
from pytest_agentbox.policy.manifest import KeyRoute
from pytest_agentbox.sandbox import GVISOR_PIDS_MIN, Resources, Sandbox, SandboxConfig

RUNTIME = "runsc"


@pytest.fixture(scope="module")
def runsc(docker_client: Any) -> str:
    if RUNTIME not in (docker_client.info().get("Runtimes") or {}):
        why = (
            "no runsc runtime on this engine: `scripts/engine2 start`, then "
            '`eval "$(scripts/engine2 env)"` and run again'
        )
        if os.environ.get("AGENTBOX_REQUIRE_RUNSC"):  # scripts/dev's gVisor pass
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return RUNTIME


def test_under_runsc_every_sandbox_fails_closed_for_want_of_a_child_subreaper(
    backend: Any, base_image: str, docker_client: Any, runsc: str
) -> None:
    # run(timeout=) ends a command's setsid grandchildren because the runner is their
    # subreaper; gVisor refuses PR_SET_CHILD_SUBREAPER (EINVAL), so they would reparent
    # to init and outlive every timeout. The root step finds that first and stops there
    # (no scan, nothing changed); the sandbox fails closed with the reason, before any
    # user code, and nothing is left on the engine.
    run_id, seen = secrets.token_hex(8), []
    config = SandboxConfig(image=base_image, runtime=runsc, run_id=run_id)
    with pytest.raises(HardeningError, match=r"failed closed.*PR_SET_CHILD_SUBREAPER.*gVisor"):
        Sandbox.create(config, backend, on_created=seen.append)
    report = seen[0].hardening
    assert report["gvisor"] is True and report["subreaper"] is False, report
    assert "storage" not in report and "stripped" not in report, report
    assert ours(docker_client, run_id) == []


def test_keys_under_runsc_fail_closed_and_no_message_holds_the_key(
    make_sandbox: Any, docker_client: Any, runsc: str
) -> None:
    # With keys in use the sandbox stops the same way (gVisor's /proc has no hidepid
    # either, which alone would stop a keyed sandbox): the key in no message, and
    # nothing left on the engine, its sidecar included.
    key = "sk-test-" + secrets.token_hex(20)
    route = KeyRoute(
        provider="openai", env_var="OPENAI_API_KEY", base_url_env="OPENAI_BASE_URL",
        domain="api.openai.com", auth_style="bearer", base_path="/v1", required=True,
    )  # fmt: skip
    run_id = secrets.token_hex(8)
    with pytest.raises(HardeningError, match=r"failed closed.*SUBREAPER") as exc:
        make_sandbox(runtime=runsc, key_routes=(route,), keys={"openai": key}, run_id=run_id)
    assert key not in str(exc.value)
    assert ours(docker_client, run_id) == []


@pytest.mark.parametrize("pids", [64, 95])
def test_a_pids_limit_too_low_for_gvisor_fails_closed_at_once(
    backend: Any, base_image: str, docker_client: Any, runsc: str, pids: int
) -> None:
    # With 64, gVisor's own threads starve and the engine's first exec hangs until the
    # client's 120 s timeout; the sandbox refuses before it creates anything, and says
    # what to change. 96 is the measured floor (it reaches the subreaper refusal).
    run_id = secrets.token_hex(8)
    config = SandboxConfig(
        image=base_image, runtime=runsc, run_id=run_id, resources=Resources(pids=pids)
    )
    with pytest.raises(HardeningError, match=rf"pids limit of {pids} is below {GVISOR_PIDS_MIN}"):
        Sandbox.create(config, backend)
    assert ours(docker_client, run_id) == []
    floor = SandboxConfig(image=base_image, runtime=runsc, resources=Resources(pids=96))
    with pytest.raises(HardeningError, match="PR_SET_CHILD_SUBREAPER"):
        Sandbox.create(floor, backend)
