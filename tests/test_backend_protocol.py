"""The backend seam holds: every backend this machine has, through the protocol.

Each target is a real engine: Docker on the environment's engine, and Docker on the
second engine (TLS over loopback) when ``scripts/engine2`` runs it (skipped otherwise,
failed where AGENTBOX_REQUIRE_ENGINE2 is set). Boxes have no network. What is checked
is what the sandbox relies on: a box from a spec with its limits, exec bounded by a
deadline and an output cap, a streamed exec, archives in and out, a bounded read that
stops the stream, state, stop and removal that leave nothing, and the owner-labelled
objects and their clean-up. Plus the registry, the pytest hook, and that only
``backends/docker`` imports the Docker SDK.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import secrets
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import need_engine2

from pytest_agentbox import paths
from pytest_agentbox.backends import base, tools
from pytest_agentbox.backends.base import Backend, Box, BoxSpec, ExecConfig
from pytest_agentbox.errors import DockerUnavailable

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pytest_agentbox"
ENGINE2 = ROOT / "scripts" / "engine2"
MIB = 1024 * 1024

# The main process of every test box: it waits on its stdin (the owner's channel).
MAIN = ("/bin/sh", "-c", "while read -r line; do :; done")


def engine2_url() -> str | None:
    """The second engine as one URL (None when it is not running)."""
    if not ENGINE2.exists():
        return None
    if subprocess.run([str(ENGINE2), "status"], capture_output=True).returncode != 0:
        return None
    out = subprocess.run([str(ENGINE2), "env"], capture_output=True, text=True, check=True)
    env = dict(
        line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines() if line
    )
    return f"{env['DOCKER_HOST']}#certs={env['DOCKER_CERT_PATH']}"


# (id, which engine, runtime): the environment's engine and the second engine. Not yet
# runsc: under Debian's gVisor (2022-12) a user exec that reads stdin in a shell, or a
# statfs of a tmpfs volume, can wedge or end the box (urpc WaitPID EOF); that runtime's
# guarantees are tests/test_runsc.py's, which fail closed.
TARGETS = [("docker", "local", None), ("docker-engine2", "engine2", None)]


@dataclass
class Target:
    backend: Backend
    runtime: str | None
    image: str
    run_id: str = field(default_factory=lambda: "proto-" + secrets.token_hex(6))

    def owner(self) -> paths.Owner:
        return paths.Owner.current(self.run_id)


@pytest.fixture(scope="module", params=TARGETS, ids=[t[0] for t in TARGETS])
def target(request: pytest.FixtureRequest, base_image: str) -> Target:
    _name, where, runtime = request.param
    if where == "local":
        request.getfixturevalue("docker_client")  # skips (or fails) without an engine
        backend = base.backend_for(None)
    else:
        url = engine2_url()
        if url is None:
            need_engine2("the second engine is not running: start it with `scripts/engine2 start`")
        backend = base.backend_for(url)
    backend.ensure_image(base_image)
    if runtime is not None and runtime not in backend.info().runtimes:
        need_engine2(f"no {runtime} runtime on {backend.url}")
    return Target(backend, runtime, base_image)


@contextlib.contextmanager
def a_box(t: Target, **changes: Any) -> Iterator[Box]:
    """A started box from a spec (two capped writable places), removed with its volumes."""
    spec = BoxSpec(
        image=t.image, command=MAIN, labels=t.owner().labels("protocol"), role="protocol",
        memory_bytes=256 * MIB, cpus=0.5, pids=64, disk_bytes=8 * MIB,
        writable=(("/home/agent", 0o700), ("/tmp", 0o1777)), runtime=t.runtime,
    )  # fmt: skip
    spec = dataclasses.replace(spec, **changes)
    volumes = {
        where: t.backend.create_volume(
            paths.unique_name("storage"),
            t.owner().labels("storage"),
            size=spec.disk_bytes,
            mode=mode,
        )
        for where, mode in spec.writable
    }
    box = None
    channel = None
    try:
        box = t.backend.create_box(spec, mounts=volumes)
        channel = box.attach()
        box.start()
        yield box
    finally:
        if channel is not None:
            channel.close()
        if box is not None:
            box.remove()
        for vol in volumes.values():
            vol.remove()


def user(cmd: list[str], **kwargs: Any) -> ExecConfig:
    return ExecConfig(cmd, user="1000:1000", **kwargs)


def test_the_docker_classes_satisfy_the_protocols(target: Target) -> None:
    from pytest_agentbox.backends.docker.box import DockerExecStream

    assert isinstance(target.backend, Backend)
    with a_box(target) as box:
        assert isinstance(box, Box)
        stream = box.exec_stream(user(["true"]))
        assert isinstance(stream, base.ExecStream) and isinstance(stream, DockerExecStream)
        stream.close()


def test_a_box_is_what_its_spec_says(target: Target) -> None:
    with a_box(target, env={"AGENTBOX_PROBE": "1"}) as box:
        assert box.id.startswith(box.short_id) and box.image_id.startswith("sha256:")
        assert "AGENTBOX_PROBE=1" in box.env
        assert {"/home/agent", "/tmp"} <= set(box.volume_mounts)
        assert box.state().status == "running"
        probe = "id -u; grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; df -k /tmp | tail -1"
        out = box.exec(user(["/bin/sh", "-c", probe]))
        lines = out.stdout.decode().splitlines()
        assert out.exit_code == 0, out.stderr
        assert lines[0] == "1000"
        status = dict(line.split() for line in lines[1:3])
        assert status == {"NoNewPrivs:": "1", "CapEff:": "0000000000000000"}
        assert int(lines[3].split()[1]) <= 8 * 1024  # the writable place's cap, in KiB
        assert str(box.id) in box.enter_hint("1000:1000", "/home/agent")
        assert isinstance(box.logs(), bytes)


def test_exec_is_bounded_by_its_deadline_and_output_cap(target: Target) -> None:
    with a_box(target) as box:
        started = time.monotonic()
        out = box.exec(user(["sleep", "60"], timeout=None, deadline=1.5))
        assert out.deadline_passed and out.exit_code == -1
        assert time.monotonic() - started < 10
        big = box.exec(user(["head", "-c", "3000000", "/dev/zero"], max_output=1000))
        assert big.exit_code == 0
        assert len(big.stdout) == 1000 and big.dropped == (3000000 - 1000, 0)
        fed = box.exec(user(["cat"], stdin=b"through stdin"))
        assert fed.stdout == b"through stdin"
        env = box.exec(user(["/bin/sh", "-c", 'echo "${GONE-unset} $ADDED"'],
                            env={"ADDED": "yes", "GONE": None}))  # fmt: skip
        assert env.stdout.decode().split() == ["unset", "yes"]


def test_exec_stream_talks_both_ways_and_reports_its_exit(target: Target) -> None:
    with a_box(target) as box:
        stream = box.exec_stream(user(["/bin/sh", "-c", "cat; echo err >&2; exit 7"],
                                      timeout=30, deadline=30))  # fmt: skip
        assert stream is not None
        stream.sendall(b"line one\n")
        stream.shutdown_write()
        got: dict[int, bytes] = {1: b"", 2: b""}
        for fd, data in stream.frames():
            got[fd] += data
        stream.close()
        assert got == {1: b"line one\n", 2: b"err\n"}
        assert stream.exit_code(wait=30) == 7


def test_a_daemon_started_over_the_stream_says_ready_and_stays(target: Target) -> None:
    script = 'read -r cfg; echo "{\\"ready\\": true, \\"got\\": $cfg}"; exec sleep 60'
    with a_box(target) as box:
        ready = base.start_daemon(box, user(["/bin/sh", "-c", script], timeout=30),
                                  {"x": 1})  # fmt: skip
        assert ready == {"ready": True, "got": {"x": 1}}
        ps = box.exec(user(["/bin/sh", "-c", "ps -eo args 2>/dev/null || cat /proc/*/cmdline"]))
        assert b"sleep 60" in ps.stdout


def test_archives_in_and_out_and_a_bounded_read(target: Target) -> None:
    with a_box(target) as box:
        tar = tools.tar_bytes([("in/a.txt", b"hello", 0o644)], uid=1000, gid=1000,
                              dirs=[("in", 0o755)])  # fmt: skip
        assert box.put_archive("/tmp", tar)
        owner = box.exec(user(["stat", "-c", "%u %a", "/tmp/in/a.txt"]))
        assert owner.stdout.split() == [b"1000", b"644"]
        archive = box.get_archive("/tmp/in")
        with archive, tarfile.open(fileobj=archive, mode="r|") as got:
            members = {m.name: (got.extractfile(m) or io.BytesIO()).read() for m in got}
        assert members == {"in": b"", "in/a.txt": b"hello"}
        assert box.get_archive("/tmp/nothing-here") is None
        assert box.read_file("/tmp/in/a.txt", limit=2) == b"he"
        assert box.read_file("/tmp/nothing-here") is None
        assert box.read_file("/tmp/in") is None  # a directory is no file
        # A 6 MiB file, read 1000 bytes of: the stream is shut at once, and the box
        # can still be removed without waiting on an engine that streams the rest.
        made = box.exec(user(["/bin/sh", "-c", f"head -c {6 * MIB} /dev/urandom > /tmp/big"]))
        assert made.exit_code == 0, made.stderr
        started = time.monotonic()
        assert len(box.read_file("/tmp/big", limit=1000) or b"") == 1000
        stream = box.get_archive("/tmp/big")
        assert stream.read(100)
        stream.abort()
        with pytest.raises(OSError):
            stream.read(100)
        stream.close()
        assert time.monotonic() - started < 10


def test_stop_and_remove_leave_nothing(target: Target) -> None:
    with a_box(target) as box:
        box.stop()
        assert box.state().status == "exited"
        assert not box.state().oom_killed
        assert {o.kind for o in target.backend.owned(target.run_id)} == {"container", "volume"}
    assert target.backend.owned(target.run_id) == []
    box.remove()  # again: no error for what is gone


def test_owned_objects_and_only_dead_owners_are_cleaned_up(target: Target) -> None:
    # One run holds a dead owner's box and volume and a live owner's volume. The clean-up
    # is scoped to that run: other tests' planted leftovers are theirs to see removed.
    backend, run_id = target.backend, "proto-gc-" + secrets.token_hex(4)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = paths.Owner.current(run_id).labels("protocol")
    dead[paths.LABEL_OWNER_PID] = str(gone.pid)
    live = paths.Owner.current(run_id).labels("protocol")
    spec = BoxSpec(image=target.image, command=("/bin/true",), labels=dead, role="protocol",
                   runtime=target.runtime)  # fmt: skip
    box = backend.create_box(spec)
    left = backend.create_volume(paths.unique_name("storage"), dead, size=MIB)
    kept = backend.create_volume(paths.unique_name("storage"), live)
    try:
        mine = {(o.kind, o.name) for o in backend.owned(run_id)}
        assert mine == {("volume", left.name), ("volume", kept.name), ("container", box.name)}
        assert all(o.engine == backend.url for o in backend.owned(run_id))
        listed = {x.name for x in backend.clean_up_dead_owners(dry_run=True, run_id=run_id)}
        assert listed == {left.name, box.name}
        assert len(backend.owned(run_id)) == 3  # a dry run removes nothing
        cleaned = {x.name for x in backend.clean_up_dead_owners(run_id=run_id)}
        assert cleaned == {left.name, box.name}
        assert [o.name for o in backend.owned(run_id)] == [kept.name]
    finally:
        box.remove()
        left.remove()
        kept.remove()
    assert backend.owned(run_id) == []


def test_a_full_sandbox_runs_on_the_backend(target: Target) -> None:
    from pytest_agentbox.sandbox import Sandbox, SandboxConfig

    config = SandboxConfig(image=target.image, run_id=target.run_id)
    with Sandbox.create(config, target.backend) as sb:
        assert sb.backend is target.backend
        assert sb.run("id -u").stdout.strip() == "1000"
        with sb.spawn(["cat"]) as proc:
            proc.send({"ping": 1})
            assert proc.read_json() == {"ping": 1}
    assert target.backend.owned(target.run_id) == []


# ---- the registry and the hook (no engine) ------------------------------------------


class _Named:
    def __init__(self, url: str | None) -> None:
        self.url = url


def test_backend_for_picks_by_scheme_and_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_FACTORIES", dict(base._FACTORIES))
    assert {"docker", "unix", "tcp", "ssh", "npipe"} <= set(base.registered_backends())
    base.register_backend("k8s", _Named)  # type: ignore[arg-type]
    assert base.backend_for("k8s://cluster/ns").url == "k8s://cluster/ns"  # type: ignore[attr-defined]
    assert base.backend_for("k8s").url is None  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"no backend for 'nomad://x'.*docker"):
        base.backend_for("nomad://x")


def test_sandbox_create_refuses_what_is_not_a_backend() -> None:
    from pytest_agentbox.sandbox import Sandbox, SandboxConfig

    with pytest.raises(TypeError, match=r"DockerBackend\.from_client"):
        Sandbox.create(SandboxConfig(), object())  # type: ignore[arg-type]


def test_a_sandbox_made_by_its_constructor_refuses_a_with_block_with_the_fix() -> None:
    from pytest_agentbox.errors import AgentboxError
    from pytest_agentbox.sandbox import Sandbox, SandboxConfig

    made = Sandbox(SandboxConfig(), object())  # type: ignore[arg-type]
    fix = r"never set up: use `with Sandbox\.create\(config\)"
    with pytest.raises(AgentboxError, match=fix), made:
        pytest.fail("the block ran without a box")


HOOK_CONFTEST = """
from pytest_agentbox.errors import DockerUnavailable

ASKED = []

def pytest_agentbox_make_backend(config, url):
    ASKED.append(url)
    raise DockerUnavailable(f"made by the conftest hook for {url}")
"""

HOOK_TESTS = """
import conftest

def test_uses_a_sandbox(sandbox):
    pass

def test_the_hook_was_asked_for_the_environments_engine():
    assert conftest.ASKED == [None]
"""


def test_the_make_backend_hook_decides_where_sandboxes_go(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTBOX_REQUIRE_DOCKER", raising=False)
    pytester.makeconftest(HOOK_CONFTEST)
    pytester.makepyfile(test_hooked=HOOK_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*made by the conftest hook for None*"])


def test_the_default_hook_is_the_registry() -> None:
    from pytest_agentbox.plugin import hooks

    with pytest.raises(ValueError, match="no backend for 'nomad://x'"):
        hooks.pytest_agentbox_make_backend(config=None, url="nomad://x")  # type: ignore[arg-type]
    assert DockerUnavailable  # the hook's way to say an engine is not there


# ---- exactly one package imports the Docker SDK ------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _sdk(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "docker" or m.startswith("docker.")}


def test_only_backends_docker_imports_the_docker_sdk() -> None:
    docker_pkg = PACKAGE / "backends" / "docker"
    outside = {
        str(p.relative_to(ROOT)): sorted(_sdk(_imports(p)))
        for p in PACKAGE.rglob("*.py")
        if docker_pkg not in p.parents and _sdk(_imports(p))
    }
    assert outside == {}
    # The check sees real imports: the one package does import the SDK.
    assert _sdk(_imports(docker_pkg / "engine.py"))


def test_the_sandbox_and_state_know_no_backend_but_the_protocol() -> None:
    docker = "pytest_agentbox.backends.docker"
    for name in ("sandbox.py", "state.py", "backends/tools.py", "policy/egress.py"):
        assert not {m for m in _imports(PACKAGE / name) if m.startswith(docker)}, name
    # The registry's one way to Docker: a factory that imports it on first use.
    assert {m for m in _imports(PACKAGE / "backends" / "base.py") if m.startswith(docker)} == {
        f"{docker}.box"
    }
