"""Shared fixtures of the project's own tests.

Docker-backed tests get the engine through ``docker_client`` (the test's own look, as an
attacker with the engine would have it) and ``backend`` (what the package itself uses):
skipped with one reason when no engine answers, failed when Docker is required
(``--agentbox-require-docker``, ``AGENTBOX_REQUIRE_DOCKER`` or the ini key; CI).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox import paths
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.box import DockerBackend
from pytest_agentbox.errors import DockerUnavailable, ImageMissing
from pytest_agentbox.plugin.hooks import run_state
from pytest_agentbox.sandbox import Sandbox, SandboxConfig


@pytest.fixture(scope="session")
def docker_client(pytestconfig: pytest.Config) -> Any:
    state = run_state(pytestconfig)
    try:
        client = engine.get_client()
        engine.ensure_image(client, image_name(pytestconfig))
    except (DockerUnavailable, ImageMissing) as exc:
        # The plugin's one precedence: --agentbox-require-docker, AGENTBOX_REQUIRE_DOCKER
        # or agentbox_require_docker in the ini file.
        if state.require_docker:
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    # This run's once-per-run clean-up of dead owners' leftovers happens now, before any
    # test plants leftovers on purpose: otherwise another worker's first sandbox could
    # remove them mid-test.
    state.clean_up_once(DockerBackend.from_client(client))
    return client


@pytest.fixture(scope="session")
def backend(docker_client: Any) -> DockerBackend:
    """The environment's engine as the package's backend (``Sandbox.create(cfg, backend)``)."""
    return DockerBackend.from_client(docker_client)


def image_name(config: pytest.Config) -> str:
    return run_state(config).default_image


@pytest.fixture(scope="session")
def base_image(pytestconfig: pytest.Config) -> str:
    return image_name(pytestconfig)


@pytest.fixture
def make_sandbox(backend: DockerBackend, base_image: str) -> Iterator[Any]:
    """Sandbox.create without the plugin (for configs the markers cannot express)."""
    made: list[Sandbox] = []

    def make(**kwargs: Any) -> Sandbox:
        kwargs.setdefault("image", base_image)
        return Sandbox.create(SandboxConfig(**kwargs), backend, on_created=made.append)

    yield make
    for sb in made:
        sb.close()


@contextlib.contextmanager
def built_image(client: Any, name: str, base: str, *run_lines: str) -> Iterator[str]:
    """A throwaway image: ``base`` plus Dockerfile lines, removed afterwards."""
    tag = f"agentbox-test/{name}:{secrets.token_hex(4)}"
    dockerfile = "\n".join([f"FROM {base}", *run_lines]) + "\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    try:
        yield tag
    finally:
        client.images.remove(tag, force=True)


@pytest.fixture
def random_key() -> str:
    """A fake API key, random per run: nothing real ever appears in tests."""
    return "sk-test-" + secrets.token_hex(20)


def as_root(sb: Sandbox, cmd: list[str], stdin: bytes | None = None) -> engine.ExecOutput:
    """Root in a sandbox's container, straight through the engine: the test's own look
    (or an attacker's, who has root there) -- never something the package does itself
    once user code has run."""
    client = engine.get_client()
    return engine.exec_run(client, sb.container_id, cmd, user="0", stdin=stdin, timeout=300)


def inspect_box(box_id: str) -> dict[str, Any]:
    """The engine's inspect of a sandbox's (or sidecar's) container: the test's own look."""
    return dict(engine.get_client().api.inspect_container(box_id))


def ours(client: Any, run_id: str) -> list[Any]:
    """Containers, networks and volumes labelled with ``run_id``."""
    flt = {"label": f"{paths.LABEL_RUN}={run_id}"}
    return [
        *client.containers.list(all=True, filters=flt, ignore_removed=True),
        *client.networks.list(filters=flt),
        *client.volumes.list(filters=flt),
    ]


# Creates two sandboxes, says READY, then waits to be interrupted or killed.
HOLDS_TWO_SANDBOXES = """
import time
def test_holds(sandbox, sandbox_factory):
    sandbox_factory()
    print("READY", flush=True)
    time.sleep(600)
"""


def start_holding_run(path: Path, image: str, run_id: str) -> subprocess.Popen[str]:
    """A pytest run (its own process) that holds two live sandboxes until signalled."""
    (path / "test_holds.py").write_text(HOLDS_TWO_SANDBOXES)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", "-p", "no:benchmark",
         f"--agentbox-image={image}", "test_holds.py"],
        cwd=path, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTEST_XDIST_TESTRUNUID": run_id},
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if "READY" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("the holding run never said READY:\n" + "".join(seen)[-3000:])


def need_engine2(why: str) -> None:
    """Skip a test that needs the second engine, or fail it where the run requires one
    (``scripts/dev test`` starts it and sets AGENTBOX_REQUIRE_ENGINE2)."""
    if os.environ.get("AGENTBOX_REQUIRE_ENGINE2"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


def accept_forever(sock: Any, handle: Any) -> None:
    """Serve each connection ``sock`` accepts with ``handle(conn)`` in a thread of its own,
    until ``sock`` is closed (the local fakes of the proxy tests)."""

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
