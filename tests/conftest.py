"""Shared fixtures of the project's own tests.

Docker-backed tests get the engine through ``docker_client`` (the test's own look, as an
attacker with the engine would have it) and ``backend`` (what the package itself uses):
skipped with one reason when no engine answers, failed when Docker is required
(``--agentbox-require-docker``, ``AGENTBOX_REQUIRE_DOCKER`` or the ini key; CI).
"""

from __future__ import annotations

import contextlib
import getpass
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox import paths
from pytest_agentbox.backends.base import ExecOutput
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.box import DockerBackend
from pytest_agentbox.errors import DockerUnavailable, HardeningError, ImageMissing
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
def make_sandbox(
    backend: DockerBackend, base_image: str, pytestconfig: pytest.Config
) -> Iterator[Any]:
    """Sandbox.create without the plugin (for configs the markers cannot express)."""
    made: list[Sandbox] = []

    def make(**kwargs: Any) -> Sandbox:
        kwargs.setdefault("image", base_image)
        # The run's runtime (--agentbox-runtime): the conformance suite's runsc pass.
        kwargs.setdefault("runtime", run_state(pytestconfig).default_runtime)
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


def as_root(sb: Sandbox, cmd: list[str], stdin: bytes | None = None) -> ExecOutput:
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


# The conformance suite (tests/conformance.txt) also runs with --agentbox-runtime=runsc
# (scripts/dev test). Where gVisor cannot give a guarantee, the sandbox must fail closed
# with the reason. With Debian's runsc (2022-12) registered as scripts/engine2 does, the
# subreaper stops every sandbox before anything else, and a pids limit below gVisor's
# floor stops it before its box is made (each proven on its own in tests/test_runsc.py).
# A test whose sandbox failed closed for one of them (raised, or reported by the
# plugin's fixtures, or met where the test expected another error) is reported xfailed
# with it; any other error, and fail-closed for any other reason, stay failures.
# Under runc nothing is converted.
RUNSC_FAILS_CLOSED = {
    "no child subreaper, so run(timeout=) could not end setsid'ed processes": (
        "sandbox hardening failed closed: this kernel refuses PR_SET_CHILD_SUBREAPER"
    ),
    "a pids limit too low for gVisor's own threads (64 would hang the engine's exec)": (
        "which gVisor (runsc) needs for its own threads"
    ),
}


def _runsc_run(config: pytest.Config) -> bool:
    return run_state(config).default_runtime == "runsc"


def _failed_closed_under_runsc(exc: BaseException | None) -> str | None:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, HardeningError | pytest.fail.Exception | AssertionError):
            text = str(exc)
            for reason, message in RUNSC_FAILS_CLOSED.items():
                if message in text:
                    return reason
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if call.excinfo is None or not report.failed or not _runsc_run(item.config):
        return
    if reason := _failed_closed_under_runsc(call.excinfo.value):
        report.outcome = "skipped"
        report.wasxfail = f"fails closed under runsc: {reason}"


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


# ---- ssh:// engines: a throwaway sshd on loopback in front of the main engine -------

SSHD = "/usr/sbin/sshd"


@dataclass
class SshEngine:
    """A local sshd (own config, host key and client key, all made for this run) that
    lets its user run ``docker system dial-stdio`` against the main engine's socket.

    :meth:`environ` is a client process's environment: ``DOCKER_HOST`` and a ``HOME``
    whose ``~/.ssh`` holds the client key and the pinned host key (what both paramiko and
    the ssh binary read). ``log`` is sshd's log (who logged in, and how).
    """

    url: str
    port: int
    home: Path
    log: Path

    def environ(self, **extra: str) -> dict[str, str]:
        """``os.environ`` pointed at this engine, without an ssh agent or TLS settings."""
        drop = ("SSH_AUTH_SOCK", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONTEXT")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        return {**env, "DOCKER_HOST": self.url, "HOME": str(self.home), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return path.with_suffix(".pub").read_text().strip()


def _sshd_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def need_sshd() -> None:
    """Skip without an sshd, or fail where the run requires one (``scripts/dev test``
    installs openssh-server and sets AGENTBOX_REQUIRE_SSHD)."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        why = f"no {SSHD}: install openssh-server (scripts/dev test does)"
        if os.environ.get("AGENTBOX_REQUIRE_SSHD"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


@contextlib.contextmanager
def running_sshd(d: Path, *extra_config: str) -> Iterator[SshEngine]:
    """An sshd on ``127.0.0.1`` with its files in ``d``: host key, the one client key it
    accepts (both made here), key-only login as the current user; ``extra_config`` lines
    go into its sshd_config. Stopped on exit."""
    need_sshd()
    user = getpass.getuser()
    host_pub = _keygen(d / "host_ed25519", "agentbox-test-host")
    client_pub = _keygen(d / "client_ed25519", "agentbox-test-client")
    (d / "authorized_keys").write_text(client_pub + "\n")
    if os.geteuid() == 0:
        # sshd refuses to start as root without its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = d / "sshd.log"
    for _attempt in range(5):  # the free port may be taken between probe and bind
        port = _free_port()
        (d / "sshd_config").write_text(
            "\n".join([
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {d / 'host_ed25519'}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                f"AllowUsers {user}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                # The files live under /tmp (world-writable), which StrictModes rejects.
                "StrictModes no",
                "UsePAM no",
                "AllowTcpForwarding no",
                "AllowAgentForwarding no",
                "X11Forwarding no",
                "PermitTunnel no",
                "LogLevel VERBOSE",
                *extra_config,
                "",
            ])
        )  # fmt: skip
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            stdout=subprocess.DEVNULL, stderr=log.open("ab"), stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None and not _sshd_answers(port):
            time.sleep(0.1)
        if proc.poll() is None and _sshd_answers(port):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"sshd did not start:\n{log.read_text()[-2000:]}", pytrace=False)
    home = d / "home"
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    (ssh_dir / "id_ed25519").write_bytes((d / "client_ed25519").read_bytes())
    (ssh_dir / "id_ed25519").chmod(0o600)
    # Pinned: paramiko (RejectPolicy) and ssh both refuse a host key they do not know.
    (ssh_dir / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    (ssh_dir / "config").write_text(
        "Host 127.0.0.1\n  IdentitiesOnly yes\n  IdentityFile ~/.ssh/id_ed25519\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n"
    )
    try:
        yield SshEngine(url=f"ssh://{user}@127.0.0.1:{port}", port=port, home=home, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def ssh_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshEngine]:
    """An ``ssh://user@127.0.0.1:PORT`` engine in front of the main engine's socket: a
    stock sshd (MaxSessions 10 and all) with key-only login, keys made per run."""
    with running_sshd(tmp_path_factory.mktemp("sshd")) as sshd:
        yield sshd
