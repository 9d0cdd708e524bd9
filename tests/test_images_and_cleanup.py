"""Foreign images, Ctrl-C, and the clean-up commands, against the real engine."""

from __future__ import annotations

import contextlib
import io
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import built_image, ours, start_holding_run

from pytest_agentbox import paths

ROOT = Path(__file__).resolve().parents[1]

# Runs that start their own pytest (and so their own clean-up of dead owners' leftovers)
# share one xdist worker: a concurrent clean-up would race the leftovers these tests
# plant and inspect on purpose.
pytestmark = pytest.mark.xdist_group("inner-runs")


@pytest.fixture(scope="module")
def foreign_image(docker_client: Any, base_image: str) -> Iterator[str]:
    """An image we did not prepare: no agent user, sudo reinstalled, a different default user."""
    with built_image(
        docker_client,
        "foreign",
        base_image,
        "RUN userdel -r agent && chmod 4755 /usr/bin/sudo",
        "USER nobody",
        "WORKDIR /",
    ) as tag:
        yield tag


def test_an_image_we_did_not_build_works_and_gets_the_user(
    pytester: pytest.Pytester, foreign_image: str
) -> None:
    pytester.makepyfile(
        """
        def test_foreign(sandbox):
            r = sandbox.run("id -un; id -u; command -v sudo; ls /home")
            assert r.stdout.split() == ["agent", "1000", "agent"]
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:benchmark", f"--agentbox-image={foreign_image}", "--agentbox-require-docker"
    )
    result.assert_outcomes(passed=1)


def test_ctrl_c_tears_down_every_live_sandbox(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    run_id = secrets.token_hex(8)
    proc = start_holding_run(pytester.path, base_image, run_id)
    assert proc.stdout is not None
    assert len([o for o in ours(docker_client, run_id) if hasattr(o, "status")]) == 2
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == pytest.ExitCode.INTERRUPTED, rest
    assert ours(docker_client, run_id) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def leaked(docker_client: Any, base_image: str) -> Iterator[Any]:
    """A container labelled as ours whose owning process is gone, and a stranger."""
    owner = paths.Owner.current("dead-" + secrets.token_hex(4))
    labels = owner.labels("sandbox")
    labels[paths.LABEL_OWNER_PID] = str(_dead_pid())
    dead = docker_client.containers.create(base_image, ["true"], labels=labels)
    stranger = docker_client.containers.create(base_image, ["true"])
    yield dead, stranger
    for c in (dead, stranger):
        with contextlib.suppress(Exception):
            c.remove(force=True)


def agentbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_agentbox.cli", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_gc_dry_run_lists_and_gc_removes_only_dead_owners(
    docker_client: Any, leaked: tuple[Any, Any]
) -> None:
    dead, stranger = leaked
    dry = agentbox("gc", "--dry-run")
    assert dry.returncode == 0 and f"would remove container {dead.name}" in dry.stdout
    dead.reload()  # still there
    real = agentbox("gc")
    assert f"removed container {dead.name}" in real.stdout
    assert stranger.name not in real.stdout
    with pytest.raises(Exception, match=r"No such container|404"):
        dead.reload()
    stranger.reload()


def test_gc_survives_a_container_removed_while_it_lists(
    docker_client: Any, base_image: str, leaked: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another worker's teardown can remove a container between the engine's list and the
    # SDK's per-container fetch. Here that interleaving is forced: the clean-up must go on
    # and still remove the other dead owner's container.
    from pytest_agentbox.backends.docker import cleanup

    dead, _stranger = leaked
    vanishing = docker_client.containers.create(base_image, ["true"], labels=dead.labels)
    real_list = docker_client.api.containers

    def list_then_remove(*args: Any, **kwargs: Any) -> Any:
        listed = real_list(*args, **kwargs)
        if any(c["Id"] == vanishing.id for c in listed):
            vanishing.remove(force=True)
        return listed

    monkeypatch.setattr(docker_client.api, "containers", list_then_remove)
    done = cleanup.collect(docker_client)
    assert dead.name in {d.name for d in done}
    assert vanishing.name not in {d.name for d in done}
    with pytest.raises(Exception, match=r"No such container|404"):
        dead.reload()


def test_state_list_and_clear(tmp_path: Path) -> None:
    from pytest_agentbox.state import StateStore

    store = StateStore(tmp_path)
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("state/a.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    store.save_from("demo/memory", [io.BytesIO(buf.getvalue())])
    listed = agentbox("state", "list", "--state-dir", str(tmp_path))
    assert "demo/memory" in listed.stdout
    cleared = agentbox("state", "clear", "--state-dir", str(tmp_path), "demo/memory")
    assert "removed 1" in cleared.stdout
    assert store.load("demo/memory") is None


def test_a_failing_clean_up_warns_and_never_fails_the_test(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pytest_agentbox.plugin.options import resolve
    from pytest_agentbox.plugin.session import RunState

    def broken_clean_up(**_: Any) -> list[Any]:
        raise RuntimeError("engine hiccup")

    state = RunState(resolve(env={}), rootpath=tmp_path, cache_dir=Path(".c"))
    state.run_id = secrets.token_hex(8)
    backend = SimpleNamespace(url="fake://hiccup", clean_up_dead_owners=broken_clean_up)
    with pytest.warns(UserWarning, match="clean-up of leaked resources failed: engine hiccup"):
        state.clean_up_once(backend)  # type: ignore[arg-type]
