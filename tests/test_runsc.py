"""gVisor (runsc) as the agent container's runtime, on an engine that has it registered.

``scripts/engine2 start`` registers Debian's runsc on the second engine; run the suite
against it (``eval "$(scripts/engine2 env)"``) and these run, on any other engine they
are skipped with that hint. What is proven here is what holds under runsc today; the
probe findings for the rest are in issue 12.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import pytest
from conftest import ours

from pytest_agentbox.errors import HardeningError
from pytest_agentbox.policy.manifest import KeyRoute

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


def test_under_runsc_the_storage_cap_fails_closed_for_want_of_a_read_only_root(
    make_sandbox: Any, docker_client: Any, runsc: str
) -> None:
    # The storage cap needs the root file system remounted read-only after hardening;
    # gVisor's runsc (Debian, 2022-12) refuses that remount. Without it the agent could
    # write past its cap onto the host's disk, so the sandbox must not start: it fails
    # closed with the reason, and nothing is left on the engine.
    run_id = secrets.token_hex(8)
    with pytest.raises(HardeningError, match=r"failed closed.*could not be made read-only"):
        make_sandbox(runtime=runsc, run_id=run_id)
    assert ours(docker_client, run_id) == []


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
