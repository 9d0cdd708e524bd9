"""The Docker Engine as a :class:`~pytest_agentbox.backends.base.Backend`.

Thin wrappers over :mod:`.engine` (clients, exec, archives), :mod:`.sidecar` and
:mod:`.cleanup`: the behaviour, and its tests, stay there; this module gives it the
seam's types. A box is a container, a volume a Docker volume (a capped one is a tmpfs
volume), the sidecar a container of its own.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pytest_agentbox import paths
from pytest_agentbox.backends.base import (
    BackendInfo,
    BoxSpec,
    BoxState,
    ExecConfig,
    ExecOutput,
    Owned,
    Volume,
)
from pytest_agentbox.backends.docker import cleanup, engine
from pytest_agentbox.backends.docker import sidecar as _sidecar
from pytest_agentbox.backends.docker.engine import EngineSpec


class DockerVolume:
    """A Docker volume (:class:`~pytest_agentbox.backends.base.Volume`)."""

    def __init__(self, volume: Any) -> None:
        self.volume = volume
        self.name = str(volume.name)

    def remove(self) -> None:
        """Remove it (and its contents); never raises."""
        with contextlib.suppress(Exception):
            self.volume.remove(force=True)


class DockerExecStream:
    """A started exec and its raw duplex socket (a
    :class:`~pytest_agentbox.backends.base.ExecStream`)."""

    def __init__(self, client: Any, exec_id: str, sock: Any) -> None:
        self._client, self.id, self._sock = client, exec_id, sock

    def frames(self) -> Iterator[tuple[int, bytes]]:
        return engine._frames(self._sock)

    def recv(self, size: int) -> bytes:
        return bytes(self._sock.recv(size))

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def shutdown_write(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()  # type: ignore[no-any-return]

    def close(self) -> None:
        self._sock.close()

    def exit_code(self, wait: float = 30.0) -> int:
        return engine.exec_exit_code(self._client, self.id, wait=wait)


class DockerBox:
    """One container (:class:`~pytest_agentbox.backends.base.Box`).

    What it was made from (image, environment, mounts) is read once, from the inspect
    the create returned: nothing the box's processes do changes it.
    """

    def __init__(self, backend: DockerBackend, container: Any) -> None:
        self._backend = backend
        self._container = container
        attrs = getattr(container, "attrs", None) or {}
        self._image_id = str(attrs.get("Image", ""))
        self._env = tuple((attrs.get("Config") or {}).get("Env") or [])
        self._mounts = tuple(
            str(m["Destination"])
            for m in attrs.get("Mounts") or []
            if m.get("Type") == "volume" and m.get("Destination")
        )

    @property
    def id(self) -> str:
        return str(self._container.id)

    @property
    def short_id(self) -> str:
        return str(self._container.short_id)

    @property
    def name(self) -> str:
        return str(self._container.name)

    @property
    def image_id(self) -> str:
        return self._image_id

    @property
    def env(self) -> tuple[str, ...]:
        return self._env

    @property
    def volume_mounts(self) -> tuple[str, ...]:
        return self._mounts

    def attach(self) -> Any:
        return engine.attach(self._backend.client, self.id)

    def start(self) -> None:
        self._container.start()

    def exec(self, cfg: ExecConfig) -> ExecOutput:
        return engine.exec_run(
            self._backend.client, self.id, list(cfg.argv), user=cfg.user, stdin=cfg.stdin,
            env=cfg.env, workdir=cfg.workdir, timeout=cfg.timeout, deadline=cfg.deadline,
            max_output=cfg.max_output,
        )  # fmt: skip

    def exec_stream(self, cfg: ExecConfig) -> DockerExecStream | None:
        client = self._backend.client
        kwargs: dict[str, Any] = {"user": cfg.user, "env": cfg.env, "workdir": cfg.workdir,
                                  "timeout": cfg.timeout}  # fmt: skip
        if cfg.deadline is None:
            started: tuple[str, Any] | None = engine.exec_start(
                client, self.id, list(cfg.argv), **kwargs
            )
        else:
            started = engine.exec_start_within(
                cfg.deadline, client, self.id, list(cfg.argv), **kwargs
            )
        if started is None:
            return None
        stream = DockerExecStream(client, *started)
        if cfg.stdin:
            stream.sendall(cfg.stdin)
        return stream

    def put_archive(self, path: str, data: Any) -> bool:
        return bool(self._container.put_archive(path, data))

    def get_archive(self, path: str) -> engine.EngineArchive | None:
        return engine.open_engine_archive(self._container, path)

    def read_file(self, path: str, limit: int = 4 * 1024 * 1024) -> bytes | None:
        return engine.read_archive_file(self._container, path, limit)

    def logs(self, tail: int = 20) -> bytes:
        return bytes(self._container.logs(tail=tail))

    def state(self) -> BoxState:
        self._container.reload()
        oom = bool((self._container.attrs.get("State") or {}).get("OOMKilled"))
        return BoxState(str(self._container.status), oom)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._container.stop(timeout=1)

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self._container.remove(force=True, v=True)

    def enter_hint(self, user: str, workdir: str) -> str:
        return f"docker exec -it -u {user} -w {workdir} {self.id} /bin/sh"


class DockerBackend:
    """One Docker engine (:class:`~pytest_agentbox.backends.base.Backend`).

    ``engine_url``: an :class:`~.engine.EngineSpec`, a URL (``unix://``, ``tcp://...
    [#certs=DIR]``, ``ssh://``, ``npipe://``) or None for the environment's engine
    (``DOCKER_HOST``, else the local socket). Connects (and pings) at once:
    :class:`~pytest_agentbox.errors.DockerUnavailable` naming the engine when it does
    not answer. :meth:`from_client` wraps a docker client someone already has.
    """

    name = "docker"

    def __init__(self, engine_url: EngineSpec | str | None = None) -> None:
        self._fixed: Any = None
        if isinstance(engine_url, str) and engine_url.startswith("npipe://"):
            self.spec = EngineSpec(engine_url)  # Windows' pipe: the SDK's own URL rules
        elif isinstance(engine_url, str):
            self.spec = engine.parse_engine_url(engine_url)
        else:
            self.spec = engine_url or engine.environment_engine()
        self.client  # noqa: B018  (connect now: an engine that is not there says so here)

    @classmethod
    def from_client(cls, client: Any) -> DockerBackend:
        """The backend of a docker client made elsewhere (it stays that client)."""
        backend = cls.__new__(cls)
        backend._fixed = client
        backend.spec = engine.engine_of(client)
        return backend

    @property
    def client(self) -> Any:
        """The docker client of this engine (the process's cached one: a dropped client,
        see :func:`~.engine.drop_client`, is replaced on the next use)."""
        return self._fixed if self._fixed is not None else engine.get_client(self.spec)

    @property
    def url(self) -> str:
        return engine.engine_key(self.client)

    @property
    def text(self) -> str:
        """The engine as a user writes it (``#certs=`` included)."""
        return self.spec.text

    def __repr__(self) -> str:
        return f"<DockerBackend {self.spec.text}>"

    # ---- images and boxes ------------------------------------------------------

    def ensure_image(
        self, image: str, *, what: str = "sandbox image", option: str = "image"
    ) -> None:
        engine.ensure_image(self.client, image, what=what, option=option)

    def read_image_tar(
        self, image: str, path: str, *, limit: int, labels: Mapping[str, str]
    ) -> bytes:
        probe = self.client.containers.create(
            image, entrypoint=["/bin/true"], command=[], network_mode="none",
            name=paths.unique_name("seed"), labels=dict(labels),
        )  # fmt: skip
        try:
            archive = engine.open_engine_archive(probe, path)
            if archive is None:
                return b""
            with archive:
                return archive.read(limit) or b""
        finally:
            with contextlib.suppress(Exception):
                probe.remove(force=True, v=True)  # and any image VOLUME it made

    def create_box(self, spec: BoxSpec, *, mounts: Mapping[str, Volume] = {}) -> DockerBox:
        container = self.client.containers.create(
            spec.image,
            # Neither the image's ENTRYPOINT nor its HEALTHCHECK may run: both would run
            # as root, the health check periodically, after user code.
            entrypoint=list(spec.command[:1]),
            command=list(spec.command[1:]),
            healthcheck={"test": ["NONE"]},
            name=paths.unique_name(spec.role),
            hostname=spec.hostname,
            user=spec.user,
            init=True,
            environment=dict(spec.env),
            labels=dict(spec.labels),
            network_mode=spec.network or "none",
            cap_drop=["ALL"],
            cap_add=list(spec.cap_add),
            security_opt=["no-new-privileges"],
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            nano_cpus=int(spec.cpus * 1e9),
            pids_limit=spec.pids,
            volumes={vol.name: {"bind": where, "mode": "rw"} for where, vol in mounts.items()},
            runtime=spec.runtime,
            # With detach=False the SDK sets StdinOnce: stdin ends when our attach does.
            stdin_open=True,
            detach=False,
        )
        return DockerBox(self, container)

    def create_volume(
        self, name: str, labels: Mapping[str, str], *, size: int | None = None, mode: int = 0o700
    ) -> DockerVolume:
        if size is None:
            return DockerVolume(self.client.volumes.create(name=name, labels=dict(labels)))
        vol = engine.create_tmpfs_volume(self.client, name, labels, size=size, mode=mode)
        return DockerVolume(vol)

    def info(self) -> BackendInfo:
        found = engine.engine_info(self.client)
        return BackendInfo(
            memory_total=int(found.get("MemTotal") or 0),
            runtimes=tuple(sorted(found.get("Runtimes") or {})),
            storage_quota=engine.storage_quota(self.client),
            gvisor_runtimes=engine.gvisor_runtimes(found),
            memory_root_runtimes=engine.memory_root_runtimes(found),
            default_runtime=str(found.get("DefaultRuntime") or ""),
        )

    def check_network(self, name: str) -> None:
        _sidecar.check_network(self.client, name)

    def start_sidecar(
        self,
        config: Any,
        owner: paths.Owner,
        volume: Volume,
        *,
        agent_allow: list[str],
        routes: list[dict[str, Any]],
        token: str,
    ) -> _sidecar.Sidecar:
        return _sidecar.start(self.client, config, owner, volume,
                              agent_allow=agent_allow, routes=routes, token=token)  # fmt: skip

    def start_fake_upstream(self, domains: Sequence[str], *, image: str, run_id: str) -> Any:
        """A started :class:`~.fakeupstream.FakeUpstream` on this engine."""
        from pytest_agentbox.backends.docker.fakeupstream import FakeUpstream

        return FakeUpstream(domains, image=image, client=self.client, run_id=run_id).start()

    # ---- what we own -------------------------------------------------------------

    def owned(self, run_id: str | None = None) -> list[Owned]:
        label = f"{paths.LABEL_RUN}={run_id}" if run_id else f"{paths.LABEL_MANAGED}=1"
        flt = {"label": label}
        client, where = self.client, self.url
        found = [
            Owned("container", c.name, dict(c.labels), where)
            for c in client.containers.list(all=True, filters=flt, ignore_removed=True)
        ]
        found += [
            Owned("network", n.name, dict(n.attrs.get("Labels") or {}), where)
            for n in client.networks.list(filters=flt)
        ]
        found += [
            Owned("volume", v.name, dict(v.attrs.get("Labels") or {}), where)
            for v in client.volumes.list(filters=flt)
        ]
        return found

    def clean_up_dead_owners(
        self, *, dry_run: bool = False, run_id: str | None = None
    ) -> list[cleanup.Leaked]:
        return cleanup.collect(self.client, dry_run=dry_run, run_id=run_id)

    def copy_image_from(self, source: DockerBackend, tag: str) -> None:
        """``docker save TAG | docker load`` from ``source``'s engine to this one."""
        engine.copy_image(source.client, self.client, tag, source.spec, self.spec)
