"""The backend seam: what the sandbox asks of "a box" and of "a backend", typed.

The sandbox's ordered setup, its run/spawn/files API and its teardown are written
against these Protocols only; :mod:`pytest_agentbox.backends.docker` is the one package
that implements them (and the one that imports the Docker SDK). Nothing here imports an
engine's client library.

- :class:`BoxSpec` is what a box *is* (image, users, limits, network mode, runtime,
  labels, main command, capabilities): everything a backend needs to build one before a
  test says which keys, routes, tokens or state it wants (those stay with the sandbox).
- :class:`ExecConfig` is one process in a box; :class:`ExecOutput` what it printed.
- :class:`Box`, :class:`ExecStream`, :class:`Channel`, :class:`Volume` and
  :class:`Sidecar` are the handles a backend gives out; :class:`Backend` makes them.
- :func:`register_backend` / :func:`backend_for` pick a backend by URL scheme or name
  (the pytest plugin asks through its ``pytest_agentbox_make_backend`` hook first).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pytest_agentbox.paths import Owner

DEFAULT_IMAGE = "agentbox/base:bookworm"

# Output kept per stream of one command; the rest is counted, not held (a command that
# prints gigabytes must not grow pytest by gigabytes).
MAX_OUTPUT = 16 * 1024 * 1024


@dataclass(frozen=True)
class BoxSpec:
    """What one box is, independent of the test that will use it.

    ``command`` is the main process (argv, run as ``user``); ``agent_user``/``agent_uid``
    the unprivileged user all user code runs as. ``writable`` names the only places the
    box may write once hardened, with their modes: each is a capped in-memory volume of
    ``disk_bytes`` (:meth:`Backend.create_volume`), mounted at create time. ``network``
    is None for no network at all, else the name of the network the box joins.
    ``runtime`` is the engine's OCI runtime (None: its default). Every box a backend
    makes also has, whatever the spec says: all other capabilities dropped,
    no-new-privileges, an init process, no health check, and the main process's stdin
    held by the owner (:meth:`Box.attach`).
    """

    image: str
    command: tuple[str, ...]
    user: str = "0"
    agent_user: str = "agent"
    agent_uid: int = 1000
    hostname: str = "agentbox"
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    role: str = "sandbox"
    memory_bytes: int = 1024**3
    cpus: float = 1.0
    pids: int = 512
    disk_bytes: int = 256 * 1024**2
    writable: tuple[tuple[str, int], ...] = ()
    network: str | None = None
    runtime: str | None = None
    cap_add: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecConfig:
    """One process in a box, backend-neutral (cf. testcontainers' ``exec``).

    ``env`` values of None unset a variable the image's ENV sets. ``timeout`` bounds
    each wait for output (None: as long as the command runs). ``deadline`` bounds the
    whole call in seconds for :meth:`Box.exec` (past it the exec is left running and the
    result says so); for :meth:`Box.exec_stream` it bounds the start alone.
    ``max_output``: bytes kept per stream by :meth:`Box.exec`.
    """

    argv: tuple[str, ...] | list[str]
    user: str
    env: Mapping[str, str | None] = field(default_factory=dict)
    workdir: str | None = None
    stdin: bytes | None = None
    timeout: float | None = 120.0
    deadline: float | None = None
    max_output: int = MAX_OUTPUT


@dataclass
class ExecOutput:
    """What one exec printed, and how it ended."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    dropped: tuple[int, int] = (0, 0)  # bytes of stdout, stderr past the output cap
    # The exec was still running at its deadline: left running, exit_code -1, the
    # output what came until then.
    deadline_passed: bool = False


@dataclass(frozen=True)
class BoxState:
    """A box as its backend sees it: ``status`` (``running``, ``exited`` ...) and whether
    the kernel killed it for memory."""

    status: str
    oom_killed: bool = False


@dataclass(frozen=True)
class BackendInfo:
    """What a backend's engine offers: its whole memory (0: unknown), its runtimes, and
    why (or whether) it can cap a box's own writable layer.

    ``default_runtime``: the one a box gets when its spec names none.
    ``gvisor_runtimes``: the runtimes that are gVisor. ``memory_root_runtimes``: those
    that keep a box's root file system in memory, charged to the box's memory limit
    (gVisor's ``--overlay2=root:memory``), so a root left writable cannot reach the
    host's disk.
    """

    memory_total: int
    runtimes: tuple[str, ...]
    storage_quota: str
    gvisor_runtimes: tuple[str, ...] = ()
    memory_root_runtimes: tuple[str, ...] = ()
    default_runtime: str = ""


@dataclass(frozen=True)
class Owned:
    """One object a backend holds with our labels: kind, name, labels, engine URL."""

    kind: str  # container | network | volume (or the backend's own kinds)
    name: str
    labels: Mapping[str, str]
    engine: str = ""


@runtime_checkable
class FrameSource(Protocol):
    """A process's output as (stream, data) frames: 1 is stdout, 2 stderr."""

    def frames(self) -> Iterator[tuple[int, bytes]]: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def gettimeout(self) -> float | None: ...


@runtime_checkable
class ExecStream(FrameSource, Protocol):
    """A started process with its stdin open (:meth:`Box.exec_stream`)."""

    id: str

    def sendall(self, data: bytes) -> None: ...
    def shutdown_write(self) -> None:
        """End the process's stdin (its output can still be read)."""
        ...

    def close(self) -> None: ...
    def exit_code(self, wait: float = 30.0) -> int:
        """The exit code once the process ended (-1 when it has not within ``wait``)."""
        ...


@runtime_checkable
class Channel(Protocol):
    """The owner's hold on a box's main process: its stdin. Closing it (or the owner's
    death) ends the box; the main process reads one command from it (``keep``)."""

    def sendall(self, data: bytes) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Volume(Protocol):
    """A volume a backend made (a capped in-memory one, or a shared one)."""

    name: str

    def remove(self) -> None: ...


@runtime_checkable
class Box(Protocol):
    """One running (or created) box of a backend."""

    @property
    def id(self) -> str: ...
    @property
    def short_id(self) -> str: ...
    @property
    def name(self) -> str:
        """The box's name on its backend (what :meth:`Backend.owned` lists)."""
        ...

    @property
    def image_id(self) -> str:
        """The id of the image the box was made from (immutable: a cache key)."""
        ...

    @property
    def env(self) -> tuple[str, ...]:
        """``NAME=value`` every exec inherits (image ENV merged with the spec's env)."""
        ...

    @property
    def volume_mounts(self) -> tuple[str, ...]:
        """Where volumes are mounted in the box: ours and the image's own (VOLUME)."""
        ...

    def attach(self) -> Channel:
        """The owner channel to the main process (before :meth:`start`)."""
        ...

    def start(self) -> None: ...
    def exec(self, cfg: ExecConfig) -> ExecOutput:
        """Run to completion, bounded by ``cfg.deadline`` and ``cfg.max_output``."""
        ...

    def exec_stream(self, cfg: ExecConfig) -> ExecStream | None:
        """Start a process with stdin attached; None when not started by ``cfg.deadline``."""
        ...

    def put_archive(self, path: str, data: Any) -> bool:
        """Unpack a tar (bytes or a binary file) at ``path``, by the backend, not a process."""
        ...

    def get_archive(self, path: str) -> Any:
        """A readable, abortable (``abort()``) tar stream of ``path``; None if absent."""
        ...

    def read_file(self, path: str, limit: int = 4 * 1024 * 1024) -> bytes | None:
        """One regular file's first ``limit`` bytes through the archive API (None: none)."""
        ...

    def logs(self, tail: int = 20) -> bytes: ...
    def state(self) -> BoxState: ...
    def stop(self) -> None: ...
    def remove(self) -> None:
        """Remove the box and the anonymous volumes it made; never raises."""
        ...

    def enter_hint(self, user: str, workdir: str) -> str:
        """The command a person runs to step into the box as ``user``."""
        ...


@runtime_checkable
class Sidecar(Protocol):
    """The box holding a sandbox's keys and network (egress and key proxy).

    In Docker a container of its own sharing a volume with the sandbox; in Kubernetes a
    pod sidecar. Its sockets appear in the sandbox under the shared volume's mount.
    """

    socket_dir: str
    ready: dict[str, Any]

    @property
    def id(self) -> str: ...
    def key_socket(self, provider: str) -> str: ...
    def handoff_socket(self) -> str | None:
        """Where the sandbox's forwarder hands its 127.0.0.1 listeners over (SCM_RIGHTS)
        so the sidecar accepts on them itself; None: the forwarder relays."""
        ...

    def decisions(self) -> str:
        """The egress decision log, JSON lines (no keys, no tokens)."""
        ...

    def key_requests(self) -> str:
        """The key proxy's request log, JSON lines (no keys, no tokens)."""
        ...

    def close(self) -> None:
        """Drop the owner channel: the sidecar and its keys end."""
        ...

    def remove(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Where boxes run: one engine (or cluster) and what it holds of ours."""

    name: str

    @property
    def url(self) -> str:
        """The engine's URL: what per-engine caches are keyed by."""
        ...

    def ensure_image(
        self, image: str, *, what: str = "sandbox image", option: str = "image"
    ) -> None:
        """ImageMissing when ``image`` is not there: the message names ``what`` it is and
        the agentbox ``option`` that chooses another."""
        ...

    def read_image_tar(
        self, image: str, path: str, *, limit: int, labels: Mapping[str, str]
    ) -> bytes:
        """``path`` of ``image`` as a tar (at most ``limit`` bytes), from a box that never
        starts (b"" when the image has no such path)."""
        ...

    def create_box(self, spec: BoxSpec, *, mounts: Mapping[str, Volume] = {}) -> Box:
        """Create (not start) a box; ``mounts``: mount path -> volume."""
        ...

    def create_volume(
        self, name: str, labels: Mapping[str, str], *, size: int | None = None, mode: int = 0o700
    ) -> Volume:
        """A volume: with ``size``, a capped in-memory one (RAM, gone with the box)."""
        ...

    def info(self) -> BackendInfo: ...
    def check_network(self, name: str) -> None:
        """Refuse (EgressError) a network a box may not join for egress."""
        ...

    def start_sidecar(
        self,
        config: Any,
        owner: Owner,
        volume: Volume,
        *,
        agent_allow: list[str],
        routes: list[dict[str, Any]],
        token: str,
    ) -> Sidecar:
        """Start the sidecar of a sandbox on ``volume``; removed again on failure.

        ``config`` is the sandbox's :class:`~pytest_agentbox.sandbox.SandboxConfig`,
        ``routes`` the key proxy's routes with their real keys (for its stdin only).
        """
        ...

    def start_fake_upstream(self, domains: Sequence[str], *, image: str, run_id: str) -> Any:
        """A local fake of the providers' APIs that this backend's boxes reach through
        their egress (``network_name``, ``pins``, ``ca_pem``, ``close()``)."""
        ...

    def owned(self, run_id: str | None = None) -> list[Owned]:
        """Every object with our labels (of one run, when given)."""
        ...

    def clean_up_dead_owners(
        self, *, dry_run: bool = False, run_id: str | None = None
    ) -> list[Any]:
        """Remove (or list) what owners that are gone left behind (of one run, when
        given); never what a live owner holds, nor anything without our labels."""
        ...


# ---- the registry ------------------------------------------------------------------

BackendFactory = Callable[[str | None], Backend]

_FACTORIES: dict[str, BackendFactory] = {}
_FACTORIES_LOCK = threading.Lock()


def _docker(url: str | None) -> Backend:
    # Imported on first use: choosing a backend must not load an engine's client library.
    from pytest_agentbox.backends.docker.box import DockerBackend

    return DockerBackend(url)


def register_backend(scheme_or_name: str, factory: BackendFactory) -> None:
    """Make ``backend_for`` build ``factory(url)`` for URLs ``scheme_or_name://...`` (or
    for the bare name). A later registration of the same name replaces the earlier."""
    with _FACTORIES_LOCK:
        _FACTORIES[scheme_or_name.lower()] = factory


def registered_backends() -> list[str]:
    """The names and URL schemes :func:`backend_for` knows."""
    with _FACTORIES_LOCK:
        return sorted(_FACTORIES)


def backend_for(engine_url: str | None = None) -> Backend:
    """The backend of ``engine_url``, by its scheme (``unix``, ``tcp``, ``ssh``, ``npipe``:
    Docker) or a registered name; None: the environment's engine (Docker's ``DOCKER_HOST``
    or its local socket). ValueError for a scheme nobody registered."""
    if engine_url is None:
        key = "docker"
    else:
        key = engine_url.split("://", 1)[0].lower() if "://" in engine_url else engine_url
    with _FACTORIES_LOCK:
        factory = _FACTORIES.get(key)
    if factory is None:
        raise ValueError(
            f"no backend for {engine_url!r}: known are {', '.join(registered_backends())}"
        )
    return factory(None if key == engine_url else engine_url)


for _scheme in ("docker", "unix", "tcp", "ssh", "npipe"):
    register_backend(_scheme, _docker)


# ---- one-line daemons over any backend's exec stream --------------------------------

# The daemon's own stderr kept for its error (the end of it: that is where the reason is).
_DAEMON_STDERR = 4096


def read_ready(
    source: FrameSource, timeout: float = 30.0, *, with_stderr: bool = False
) -> dict[str, Any]:
    """The first stdout line of a daemon as JSON; {} when none comes within ``timeout``.

    A line with ``"ready": false`` is returned as it is, so its ``error`` reaches the user.
    With ``with_stderr``, when the daemon is not ready, whatever it wrote to stderr (a
    traceback, a refusal) is added to ``error``: a daemon that fails to start is seen by
    its own words. Only for daemons that hold no secret (an exception's text can quote
    its config): the sidecar, which holds keys, relays its daemons' errors itself.
    """
    line, err = b"", bytearray()
    old = source.gettimeout()
    done = False
    frames = source.frames()
    try:
        source.settimeout(timeout)
        for stream, data in frames:
            if stream == 2:
                err.extend(data)
                del err[:-_DAEMON_STDERR]
            elif stream == 1:
                line += data
                if b"\n" in line:
                    done = True
                    break
    except OSError:
        pass
    ready = _parse_ready(line)
    if done and not ready.get("ready"):
        # It said no, and is likely exiting: its stderr may follow the line.
        deadline = time.monotonic() + 2.0
        with contextlib.suppress(OSError):
            source.settimeout(2.0)
            for stream, data in frames:
                if stream == 2:
                    err.extend(data)
                    del err[:-_DAEMON_STDERR]
                if time.monotonic() > deadline:
                    break
    with contextlib.suppress(OSError):
        source.settimeout(old)
    text = err.decode("utf-8", "replace").strip() if with_stderr else ""
    if text and not ready.get("ready"):
        said = ready.get("error")
        ready["error"] = f"{said}; its stderr: {text}" if said else text
    return ready


def _parse_ready(line: bytes) -> dict[str, Any]:
    try:
        ready = json.loads(line.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return dict(ready) if isinstance(ready, dict) else {}


def start_daemon(
    box: Box,
    cfg: ExecConfig,
    config: Mapping[str, Any],
    *,
    stdin_prefix: bytes = b"",
    with_stderr: bool = False,
) -> dict[str, Any]:
    """Start a tool in ``box`` that reads one JSON config line and answers with one ready
    line, and leave it running; the ready line ({} if none came).

    Secrets in ``config`` travel only over the exec's stdin, never argv or env.
    ``stdin_prefix`` goes first (the tool's source); ``with_stderr`` as for
    :func:`read_ready`.
    """
    stream = box.exec_stream(cfg)
    if stream is None:
        return {}
    try:
        stream.sendall(stdin_prefix + json.dumps(config).encode() + b"\n")
        return read_ready(stream, with_stderr=with_stderr)
    except OSError:
        return {}
    finally:
        stream.close()
