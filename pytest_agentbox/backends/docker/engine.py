"""Thin helpers over the docker SDK: one client per engine, exec with stdin, tar building.

Nothing here runs at import time, so ``pytest --help`` works without an engine.
"""

from __future__ import annotations

import contextlib
import functools
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import struct
import tarfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_agentbox.backends.base import MAX_OUTPUT, ExecOutput
from pytest_agentbox.backends.base import read_ready as _read_ready
from pytest_agentbox.errors import AgentboxError, DockerUnavailable, ImageMissing

LOCAL_SOCKET = "unix:///var/run/docker.sock"

# One client per engine and process, and per engine what was checked on it once: an
# image seen on one engine says nothing about another.
_clients: dict[EngineSpec, Any] = {}
_clients_lock = threading.Lock()
_images_seen: dict[str, set[str]] = {}


class EngineLost(AgentboxError):
    """An engine of the run stopped answering after it was used (it died mid-run).

    Unlike :class:`DockerUnavailable` a test on it fails, never skips: the engine was
    there, so a skip would hide that its tests did not run.
    """


@dataclass(frozen=True)
class EngineSpec:
    """One Docker engine: its URL and, for TLS over ``tcp://``, its client cert directory.

    ``url`` is what the SDK takes (``unix://``, ``tcp://host:port``, ``ssh://``);
    ``cert_dir`` holds ``ca.pem``, ``cert.pem`` and ``key.pem`` (the docker CLI's names).
    ``from_environment`` marks the environment's engine, configured exactly as the
    docker CLI is (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``).
    """

    url: str
    cert_dir: str | None = None
    from_environment: bool = False

    def __str__(self) -> str:
        return self.url

    @property
    def text(self) -> str:
        """The URL as a user writes it: ``#certs=DIR`` included when one was given."""
        given = self.cert_dir and not self.from_environment
        return f"{self.url}#certs={self.cert_dir}" if given else self.url

    def cli_env(self) -> dict[str, str]:
        """The ``DOCKER_*`` variables that point the docker CLI at this engine."""
        if self.from_environment:
            names = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")
            return {n: os.environ[n] for n in names if os.environ.get(n)}
        env = {"DOCKER_HOST": self.url}
        if self.cert_dir:
            env.update(DOCKER_TLS_VERIFY="1", DOCKER_CERT_PATH=self.cert_dir)
        return env


def environment_engine() -> EngineSpec:
    """The engine the environment names: ``DOCKER_HOST``, else the local socket."""
    url = os.environ.get("DOCKER_HOST") or LOCAL_SOCKET
    certs = os.environ.get("DOCKER_CERT_PATH") if os.environ.get("DOCKER_TLS_VERIFY") else None
    return EngineSpec(url, certs or None, from_environment=True)


_TCP_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})/?$")
_SSH_RE = re.compile(r"^ssh://([A-Za-z0-9._-]+@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?/?$")


def parse_engine_url(text: str) -> EngineSpec:
    """``unix:///path``, ``tcp://host:port[#certs=DIR]`` or ``ssh://[user@]host[:port]``.

    Raises ValueError saying what a valid URL is. ``#certs=DIR`` (an absolute path, ``~``
    allowed) turns TLS on for that engine with DIR's ``ca.pem``, ``cert.pem`` and
    ``key.pem``; a ``tcp://`` URL without it uses the environment's TLS settings, as
    ``docker -H`` does.
    """
    value = text.strip()
    url, _, fragment = value.partition("#")
    cert_dir = None
    if fragment:
        key, _, path = fragment.partition("=")
        if key != "certs" or not path:
            raise ValueError(f"{value!r}: the only part after '#' is certs=DIR (TLS files)")
        if not url.startswith("tcp://"):
            raise ValueError(f"{value!r}: #certs= is for tcp:// engines only")
        expanded = os.path.expanduser(path)
        if not os.path.isabs(expanded):
            raise ValueError(f"{value!r}: the certs directory must be an absolute path")
        cert_dir = os.path.normpath(expanded)
    if url.startswith("unix://"):
        if not url.startswith("unix:///") or len(url) <= len("unix:///"):
            raise ValueError(f"{value!r}: a socket URL is unix:///absolute/path")
    elif url.startswith("tcp://"):
        match = _TCP_RE.match(url)
        if not match or not 0 < int(match[2]) < 65536:
            raise ValueError(f"{value!r}: a TCP engine is tcp://host:port")
        url = url.rstrip("/")
    elif url.startswith("ssh://"):
        if not _SSH_RE.match(url):
            raise ValueError(f"{value!r}: an SSH engine is ssh://[user@]host[:port]")
        url = url.rstrip("/")
    else:
        raise ValueError(f"{value!r} is not a Docker engine URL (unix://, tcp:// or ssh://)")
    return EngineSpec(url, cert_dir)


def get_client(spec: EngineSpec | str | None = None) -> Any:
    """The process's docker client for one engine, created and pinged on first use.

    ``spec`` is an :class:`EngineSpec`, a URL for :func:`parse_engine_url`, or None for
    the environment's engine, configured like the docker CLI: ``DOCKER_HOST``
    (``unix://``, ``tcp://``, ``ssh://``), and for TLS ``DOCKER_TLS_VERIFY`` and
    ``DOCKER_CERT_PATH`` (``ca.pem``, ``cert.pem``, ``key.pem``). The engine's CA is the
    only one its certificate is checked against, whatever ``REQUESTS_CA_BUNDLE`` says.

    Raises :class:`DockerUnavailable` naming the engine, with the fix, when it does not
    answer.
    """
    if spec is None:
        spec = environment_engine()
    elif isinstance(spec, str):
        spec = parse_engine_url(spec)
    with _clients_lock:
        client = _clients.get(spec)
        if client is not None:
            return client
    client = _connect(spec, timeout=120)
    with _clients_lock:
        return _clients.setdefault(spec, client)


def drop_client(spec: EngineSpec | str) -> None:
    """Forget the cached client of ``spec``: the next :func:`get_client` connects anew.

    For an engine that went away and may come back (with new TLS files, or a new
    address behind the same URL): a stale client would keep failing.
    """
    if isinstance(spec, str):
        spec = parse_engine_url(spec)
    with _clients_lock:
        client = _clients.pop(spec, None)
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


def _connect(spec: EngineSpec, *, timeout: float) -> Any:
    """A new client of ``spec``, pinged (DockerUnavailable naming the engine when not)."""
    from docker.errors import DockerException  # lazily: collection and --help must not need it

    try:
        client = _new_client(spec, timeout=timeout)
        client.ping()
    except (DockerException, OSError, *_ssh_errors()) as exc:
        why = _tls_hint(exc, spec) or _short(exc)
        raise DockerUnavailable(
            f"no Docker engine answers at {spec.text} ({why}). {_engine_fix(spec)}"
        ) from None
    client.agentbox_engine = client.api.agentbox_engine = spec
    return client


def _ssh_errors() -> tuple[type[BaseException], ...]:
    """paramiko's own errors (host key unknown, key refused): not OSErrors."""
    try:
        from paramiko import SSHException
    except ImportError:
        return ()
    return (SSHException,)


def _ssh_fix(url: str) -> str:
    """What an ``ssh://`` engine needs of the client side, as a command to try."""
    parts = urllib.parse.urlsplit(url)
    port = f"-p {parts.port} " if parts.port else ""
    who = f"{parts.username}@{parts.hostname}" if parts.username else parts.hostname
    return (
        f"`ssh {port}{who} docker version` must work without a prompt: that host's key "
        "in ~/.ssh/known_hosts (an unknown host is refused), a key it accepts in ~/.ssh "
        "(or IdentityFile in ~/.ssh/config, or the ssh agent), and there a docker CLI "
        "whose engine that user may use."
    )


def _engine_fix(spec: EngineSpec) -> str:
    if spec.url.startswith("ssh://"):
        where = (
            "Or set DOCKER_HOST to another engine. Without --agentbox-require-docker, "
            "sandbox tests are skipped instead."
            if spec.from_environment
            else "Or leave it out of --agentbox-engine / AGENTBOX_ENGINES / agentbox_engines."
        )
        return f"{_ssh_fix(spec.url)} {where}"
    if spec.from_environment:
        return (
            "Start Docker (e.g. `sudo systemctl start docker` or `dockerd &`), or set "
            "DOCKER_HOST. Without --agentbox-require-docker, sandbox tests are skipped instead."
        )
    return (
        "Start that engine, correct its URL, or leave it out of --agentbox-engine / "
        "AGENTBOX_ENGINES / agentbox_engines (a tcp:// engine with TLS: URL#certs=DIR, "
        "DIR holding ca.pem, cert.pem and key.pem)."
    )


def _new_client(spec: EngineSpec, *, timeout: float) -> Any:
    import docker

    cls = _client_class()
    if spec.from_environment:
        # What DockerClient.from_env does, plus the ssh options when DOCKER_HOST is ssh://.
        env_kwargs: dict[str, Any] = {**docker.utils.kwargs_from_env(), "timeout": timeout}
        if str(env_kwargs.get("base_url") or "").startswith("ssh://"):
            env_kwargs.update(_SSH_OPTIONS)
        return cls(**env_kwargs)
    kwargs: dict[str, Any] = {"base_url": spec.url, "timeout": timeout}
    if spec.cert_dir:
        files = [os.path.join(spec.cert_dir, n) for n in ("ca.pem", "cert.pem", "key.pem")]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise docker.errors.TLSParameterError(f"missing TLS file(s): {', '.join(missing)}")
        kwargs["tls"] = docker.tls.TLSConfig(
            client_cert=(files[1], files[2]), ca_cert=files[0], verify=True
        )
    elif spec.url.startswith("tcp://"):
        # As `docker -H tcp://...`: the environment's TLS settings apply to the URL.
        tls = docker.utils.kwargs_from_env().get("tls")
        if tls:
            kwargs["tls"] = tls
        elif not _loopback(spec.url):
            # Plain HTTP to another machine: anyone on the path could drive the engine.
            raise DockerUnavailable(
                f"{spec.url} is another machine and no TLS is set for it: anyone on the "
                "network path could drive that engine. Give its client certificates as "
                f"{spec.url}#certs=DIR (ca.pem, cert.pem, key.pem)."
            )
    elif spec.url.startswith("ssh://"):
        kwargs.update(_SSH_OPTIONS)
    return cls(**kwargs)


# ssh:// engines go through paramiko (docker[ssh]), not the ssh binary: the SDK's
# shell-out socket ignores timeouts and half-closes (an exec's stdin would never end)
# and starts an ssh process per connection; paramiko runs them all as channels (SSH
# sessions) of one connection. The SDK keeps a connection pool per request URL, each
# holding its idle session open: its default of 9 pools leaves no room under sshd's
# default MaxSessions of 10 for what a sandbox holds (two owner channels with its
# sidecar, one per running exec). Two pools: the least recently used closes.
_SSH_OPTIONS: dict[str, Any] = {"use_ssh_client": False, "num_pools": 2}


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def engine_of(client: Any) -> EngineSpec:
    """The engine ``client`` talks to (clients made here know it; others, their URL)."""
    spec = getattr(client, "agentbox_engine", None)
    if isinstance(spec, EngineSpec):
        return spec
    return EngineSpec(str(getattr(getattr(client, "api", None), "base_url", "unknown")))


def engine_key(client: Any) -> str:
    """What per-engine caches are keyed by: the engine's URL."""
    return engine_of(client).url


def check_engine(spec: EngineSpec, *, timeout: float = 10.0) -> str | None:
    """None when ``spec`` answers a ping within ``timeout`` s, else why not (one line).

    A client of its own (not the cached one, whose timeout is long): a dead or hung
    engine costs at most ``timeout``.
    """
    # In a thread of its own: paramiko's ssh connect takes no timeout, so a host that
    # drops packets would otherwise hold the run's start forever.
    found: list[str | None] = []

    def ping() -> None:
        try:
            client = _connect(spec, timeout=timeout)
        except DockerUnavailable as exc:
            found.append(str(exc))
            return
        except Exception as exc:  # reported, never raised from a daemon thread
            found.append(f"the Docker engine at {spec.text} does not answer ({_short(exc)})")
            return
        with contextlib.suppress(Exception):
            client.close()
        found.append(None)

    thread = threading.Thread(target=ping, name="agentbox-engine-check", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if not found:
        return (
            f"the Docker engine at {spec.text} did not answer within {timeout + 5:.0f} s "
            "(the connection hangs: is the host up and its port reachable from here?). "
            f"{_engine_fix(spec)}"
        )
    return found[0]


# What an engine that went away looks like to the SDK: refused or reset connections,
# timeouts, and the SDK's own errors wrapping them.
def is_engine_error(exc: BaseException) -> bool:
    """Whether ``exc`` could come from an engine that stopped answering."""
    if isinstance(exc, (DockerUnavailable, EngineLost, OSError, *_ssh_errors())):
        return True
    try:
        import requests
        from docker.errors import DockerException
    except ImportError:
        return False
    return isinstance(exc, requests.exceptions.RequestException | DockerException)


def lost(spec: EngineSpec, reason: str) -> EngineLost:
    """The error of a test whose engine stopped answering mid-run, naming the engine."""
    return EngineLost(
        f"the Docker engine at {spec.text} stopped answering mid-run ({reason}). The tests "
        "on it fail; the other engines' tests go on. Bring it back (is its dockerd running?) "
        f"and remove what it still holds with `agentbox gc --engine {spec.text}`."
    )


def _tls_hint(exc: BaseException, spec: EngineSpec | None = None) -> str:
    """What to check when the engine's TLS set-up or handshake failed ("" otherwise)."""
    if "TLS" in type(exc).__name__ or "SSL" in str(exc):
        if spec is not None and spec.cert_dir and not spec.from_environment:
            return (
                f"{type(exc).__name__}: TLS failed; {spec.cert_dir} must hold the engine's "
                "ca.pem and a client cert.pem/key.pem"
            )
        return (
            f"{type(exc).__name__}: TLS failed; DOCKER_CERT_PATH must hold the engine's "
            "ca.pem and a client cert.pem/key.pem, with DOCKER_TLS_VERIFY=1"
        )
    return ""


# The root cause inside the SDK's wrapped connection errors, e.g.
# "... NewConnectionError(...: [Errno 111] Connection refused')".
_ERRNO_RE = re.compile(r"\[Errno (-?\d+)\] ([^'\")\]]+)")


def _short(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` in one line of at most ``limit`` characters, root cause first."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    if root := _ERRNO_RE.search(text):
        return f"{root[2].strip()} (errno {root[1]})"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.cache
def _client_class() -> Any:
    """``docker.DockerClient`` whose HTTP session keeps the engine's own CA.

    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` replace a session's CA on
    every request (psf/requests#3829): with either set (common on CI machines) no
    TLS engine verifies, or worse, one signed by a public CA would be trusted instead.
    """
    import docker

    refused: tuple[type[BaseException], ...] = ()
    with contextlib.suppress(ImportError):
        from paramiko import ChannelException

        refused = (ChannelException,)

    class EngineAPI(docker.APIClient):  # type: ignore[misc]
        def request(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().request(*args, **kwargs)
            except refused as exc:  # an ssh:// engine's sshd opened no more sessions
                raise AgentboxError(
                    f"the sshd of {engine_of(self).text} refused another session ({exc}): "
                    "it allows MaxSessions (10 by default) per connection, and each live "
                    "sandbox holds one or two, each running exec one more. Raise MaxSessions "
                    "in that host's sshd_config (e.g. 64) and reload sshd."
                ) from exc

        def merge_environment_settings(
            self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
        ) -> Any:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if isinstance(self.verify, str):  # a CA file from DOCKER_CERT_PATH
                settings["verify"] = self.verify
            return settings

    class EngineClient(docker.DockerClient):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.api = EngineAPI(*args, **kwargs)

    return EngineClient


def ensure_image(
    client: Any, image: str, *, what: str = "sandbox image", option: str = "image"
) -> None:
    """Fail with a clear message, naming ``what`` the image is for and the agentbox
    ``option`` that picks another, when ``image`` is not on the engine (once per engine)."""
    key = engine_key(client)
    if image in _images_seen.get(key, ()):
        return
    from docker.errors import ImageNotFound

    try:
        client.images.get(image)
    except ImageNotFound:
        spec = engine_of(client)
        where = "this Docker engine" if spec.from_environment else f"the engine {spec.text}"
        raise ImageMissing(
            f"{what} {image!r} is not on {where}. Build the default one with "
            f"`agentbox image build{_engine_arg(spec)}` (or copy it from an engine that has "
            "it with `--copy-from URL`), `docker pull` yours, or choose another with "
            f"--agentbox-{option} / agentbox_{option.replace('-', '_')}."
        ) from None
    _images_seen.setdefault(key, set()).add(image)


def loader_unset(client: Any, image: str) -> dict[str, str | None]:
    """The loader variables ``image``'s ENV sets, each mapped to None: given as a box's
    or an exec's environment, the engine leaves them out (an entry without ``=``)."""
    from pytest_agentbox.inside.runner import is_loader_variable

    key = (engine_key(client), image)
    if key not in _LOADER_UNSET:  # once per engine and image, like ensure_image's check
        env = client.images.get(image).attrs.get("Config", {}).get("Env") or []
        names = (v.split("=", 1)[0] for v in env)
        _LOADER_UNSET[key] = {n: None for n in names if is_loader_variable(n)}
    return dict(_LOADER_UNSET[key])


_LOADER_UNSET: dict[tuple[str, str], dict[str, str | None]] = {}


def copy_image(
    src: Any, dst: Any, tag: str, source: EngineSpec, target: EngineSpec, *, say: Any = print
) -> None:
    """``docker save TAG | docker load`` from client ``src`` to ``dst``, streamed through
    the API; AgentboxError saying what to do when ``source`` does not have ``tag``."""
    from docker.errors import ImageNotFound

    try:
        image = src.images.get(tag)
    except ImageNotFound:
        raise AgentboxError(
            f"image {tag!r} is not on {source.text}: build it there first "
            f"(`agentbox image build --engine {source.text}`)"
        ) from None
    say(f"agentbox: copying {tag} from {source.text} to {target.text}", flush=True)
    dst.images.load(image.save(named=True))
    dst.images.get(tag)  # loaded under its name, or ImageNotFound says it was not
    say(f"agentbox: {tag} is on {target.text}")


def _engine_arg(spec: EngineSpec) -> str:
    return "" if spec.from_environment else f" --engine {spec.text}"


def create_tmpfs_volume(
    client: Any, name: str, labels: Mapping[str, str], *, size: int, mode: int = 0o700
) -> Any:
    """A named volume that is a size-limited tmpfs (RAM, never the host's disk).

    Named rather than ``--tmpfs``: the engine's archive API, which uploads code and
    state and takes the snapshots, sees named volumes but not tmpfs mounts. The tmpfs
    is mounted when a container starts and dropped, contents and all, when it stops.
    The engine's copy of the image's files into a new volume is lost with it (the copy
    is mounted, made and unmounted at create time), so the volume starts empty.
    """
    opts = {"type": "tmpfs", "device": "tmpfs", "o": f"size={size},mode={mode:o},nodev,nosuid"}
    return client.volumes.create(name=name, driver="local", driver_opts=opts, labels=dict(labels))


# engine URL -> its `docker info`: asked once per engine and process, read by every check.
_INFO: dict[str, dict[str, Any]] = {}


def engine_info(client: Any) -> dict[str, Any]:
    """The engine's ``docker info`` (memory, runtimes, storage driver), cached per engine."""
    key = engine_key(client)
    if key not in _INFO:
        _INFO[key] = dict(client.info())
    return _INFO[key]


def _engine_info(client: Any) -> tuple[str, str]:
    info = engine_info(client)
    status = dict(tuple(pair) for pair in info.get("DriverStatus") or [] if len(pair) == 2)
    return str(info.get("Driver", "")), str(status.get("Backing Filesystem", ""))


def storage_quota(client: Any) -> str:
    """Why the engine cannot cap a container's own writable layer (we then use tmpfs).

    Only overlay2 on xfs mounted with ``pquota`` (and a few rarer drivers) honour
    ``--storage-opt size=``; none of those is used or tested here, so this only names
    the engine's storage for the report.
    """
    try:
        driver, backing = _engine_info(client)
    except Exception as exc:  # only a description: never the reason a sandbox fails
        return f"unknown ({type(exc).__name__})"
    return f"none ({driver or 'unknown driver'} on {backing or 'unknown file system'})"


def gvisor_runtimes(info: Mapping[str, Any]) -> tuple[str, ...]:
    """The runtimes of ``docker info`` whose program is gVisor's ``runsc``."""
    runtimes = (info.get("Runtimes") or {}).items()
    return tuple(n for n, r in sorted(runtimes) if str((r or {}).get("path", "")).endswith("runsc"))


def memory_root_runtimes(info: Mapping[str, Any]) -> tuple[str, ...]:
    """The runtimes of ``docker info`` that keep a container's root in memory.

    gVisor's ``--overlay2=root:memory`` (or ``all:memory``, or the older ``--overlay``)
    puts the root file system's writes in the sandbox's own memory, charged to its
    memory limit. A directory medium (``root:/path``) writes to the host's disk: not one.
    """
    found, gvisor = [], gvisor_runtimes(info)
    for name, runtime in sorted((info.get("Runtimes") or {}).items()):
        if name not in gvisor:
            continue
        args = [str(a) for a in (runtime or {}).get("runtimeArgs") or []]
        medium, i = "", 0
        while i < len(args):  # as runsc's flag parser reads them: the last one wins
            key, eq, value = args[i].lstrip("-").partition("=")
            if key == "overlay2" and not eq and i + 1 < len(args):
                i += 1
                value = args[i]
            if key == "overlay":  # a boolean flag
                medium = "all:memory" if value in ("", "true", "1") else "none"
            elif key == "overlay2":
                medium = value
            i += 1
        if medium in ("root:memory", "all:memory"):
            found.append(name)
    return tuple(found)


def _frames(sock: Any) -> Iterator[tuple[int, bytes]]:
    """Demultiplex docker's attach stream (8-byte header: stream id, size) from a raw socket."""
    buf = b""
    while True:
        while len(buf) < 8:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
        stream, size = struct.unpack(">BxxxL", buf[:8])
        while len(buf) < 8 + size:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
        yield stream, buf[8 : 8 + size]
        buf = buf[8 + size :]


def raw_socket(sock: Any) -> socket.socket:
    """The real socket behind what ``exec_start(socket=True)`` returns."""
    return getattr(sock, "_sock", sock)


def exec_start(
    client: Any,
    container_id: str,
    cmd: list[str],
    *,
    user: str,
    env: Mapping[str, str | None] | None = None,
    workdir: str | None = None,
    timeout: float | None = None,
) -> tuple[str, socket.socket]:
    """Start an exec with stdin attached; returns its id and the raw duplex socket.

    ``timeout`` bounds each wait for output on the socket (None: wait as long as the
    command runs; the client's own default would end a silent command after 120 s).
    """
    api = client.api
    exec_id = api.exec_create(
        container_id,
        cmd,
        stdin=True,
        stdout=True,
        stderr=True,
        user=user,
        environment=dict(env or {}),
        workdir=workdir,
    )["Id"]
    if str(api.base_url).startswith("https://"):
        sock: Any = _tls_exec_start(api, exec_id)
    else:
        sock = raw_socket(api.exec_start(exec_id, socket=True))
    sock.settimeout(timeout)
    return exec_id, sock


class TLSStream:
    """A TLS connection whose sending side can end alone, as a socket-like object.

    The engine sees end-of-file on an exec's stdin only when the client half-closes.
    Over TLS that is a close_notify alert while still reading, which ``ssl.SSLSocket``
    cannot do: its ``shutdown()`` drops the TLS layer, so every later ``recv`` returns
    ciphertext. Here TLS runs over memory buffers on a plain socket, so the alert can
    go out on its own. Reads and writes may come from two threads (``Spawned``).
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str) -> None:
        self._sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._lock = threading.Lock()  # the TLS state; never held while blocked on the socket
        self._send_lock = threading.Lock()  # records leave in the order they were made
        self._pending = b""  # plaintext read past the HTTP response head
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("the engine closed the TLS handshake") from None
        self._flush()

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._outgoing.read()
            if data:
                self._sock.sendall(data)

    def _fill(self) -> bool:
        data = self._sock.recv(65536)
        with self._lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()
        return bool(data)

    def recv(self, size: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        while True:
            try:
                with self._lock:
                    return self._tls.read(size)
            except ssl.SSLWantReadError:
                self._flush()  # e.g. a TLS 1.3 key update needs an answer
                if not self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self._lock:
                n = self._tls.write(view[:65536])
            view = view[n:]
            self._flush()

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            with contextlib.suppress(ssl.SSLError), self._lock:
                self._tls.unwrap()  # sends close_notify, then wants the peer's: not waited for
            with contextlib.suppress(OSError):
                self._flush()
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._sock.shutdown(how)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def read_response_head(self) -> bytes:
        """The HTTP response head; anything read past it is kept for :meth:`recv`."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 65536:
                break
        head, _, rest = buf.partition(b"\r\n\r\n")
        self._pending = rest + self._pending
        return head


def _tls_context(api: Any) -> ssl.SSLContext:
    """The SSL context the SDK's session verifies and authenticates with (DOCKER_CERT_PATH)."""
    verify, cert = api.verify, api.cert
    if isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    else:
        context = ssl.create_default_context()
        if verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    if isinstance(cert, tuple):
        context.load_cert_chain(*cert)
    elif cert:
        context.load_cert_chain(cert)
    return context


def _tls_exec_start(api: Any, exec_id: str) -> TLSStream:
    """``POST /exec/{id}/start`` upgraded to a raw stream over a connection of our own."""
    url = urllib.parse.urlsplit(api._url("/exec/{0}/start", exec_id))
    host, port = url.hostname or "localhost", url.port or 2376
    timeout = getattr(api, "timeout", None)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        stream = TLSStream(sock, _tls_context(api), host)
        body = json.dumps({"Detach": False, "Tty": False}).encode()
        stream.sendall(
            f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            "Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = stream.read_response_head()
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith((b"HTTP/1.1 101", b"HTTP/1.1 200", b"HTTP/1.0 200")):
            from docker.errors import APIError

            raise APIError(f"exec start failed: {status.decode(errors='replace')}")
    except BaseException:
        sock.close()
        raise
    return stream


def attach(client: Any, container_id: str) -> Any:
    """The main process's stdin, stdout and stderr as one raw socket (attach before start).

    Containers made with ``stdin_open`` and ``stdin_once`` see end-of-file on stdin when
    this socket closes, also when the process holding it is SIGKILLed: that is how a
    sandbox notices its owner is gone.
    """
    params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
    sdk = raw_socket(client.api.attach_socket(container_id, params=params))
    # The SDK's makefile() reader holds a reference on its socket that makes close()
    # leave the descriptor open, so closing the channel would not end the main process
    # (a kept sandbox's sidecar, keys in it, lived on until pytest exited).
    sock: Any
    if isinstance(sdk, ssl.SSLSocket):  # a TLS engine: the descriptor carries TLS
        sock = TLSChannel(sdk)
    elif type(sdk).__module__.startswith("paramiko"):  # an ssh:// engine: one SSH channel
        sock = SSHChannel(sdk)
    else:  # the descriptor moves to a socket of our own
        sock = socket.socket(sdk.family, sdk.type, sdk.proto, fileno=sdk.detach())
        sock.set_inheritable(False)  # already the default for Python sockets: made sure
    sock.settimeout(None)
    with _ATTACHED_LOCK:
        _ATTACHED.add(sock)
    return sock


class TLSChannel:
    """An owner channel over a TLS engine, as a socket: ``close()`` ends the connection.

    The descriptor cannot move to a plain socket (it carries TLS), so close shuts it down
    first, which the SDK reader's reference cannot keep open.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def close_in_child(self) -> None:
        """Drop a forked child's copy of the descriptor without ending the parent's."""
        with contextlib.suppress(OSError):
            os.close(self._sock.detach())


class SSHChannel:
    """An owner channel over an ``ssh://`` engine (a paramiko channel running the remote
    ``docker system dial-stdio``): ``close()`` closes the SSH channel, which ends the
    remote end's connection to the engine whatever references the SDK's reader holds.
    """

    def __init__(self, channel: Any) -> None:
        self._chan = channel
        self._in_child = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chan, name)

    def fileno(self) -> int:
        """-1 once closed; else the descriptor of the SSH connection carrying it (paramiko's
        own ``fileno()`` would make a pipe)."""
        if self._in_child or self._chan.closed:
            return -1
        return int(self._chan.get_transport().sock.fileno())

    def close(self) -> None:
        self._chan.close()

    def close_in_child(self) -> None:
        """Drop a forked child's copy of the SSH connection's descriptor (the parent's
        connection, and so its channels, stay up; the child cannot use it anyway: the
        transport's thread did not fork along)."""
        self._in_child = True
        transport = self._chan.get_transport()
        sock = getattr(transport, "sock", None)
        if isinstance(sock, socket.socket):
            fd = sock.detach()  # -1 when another channel of the same connection did it
            if fd != -1:
                os.close(fd)


# Every owner channel of this process. A forked child (multiprocessing, os.fork from a
# test) would hold a copy of each: one that outlived us would keep its sandbox running.
_ATTACHED: weakref.WeakSet[Any] = weakref.WeakSet()
_ATTACHED_LOCK = threading.Lock()


def _close_attached_in_child() -> None:
    # Only the child's copies of the descriptors: the parent's channels stay open (no
    # shutdown, which would end them for both). The lock may be held by a parent thread
    # that does not exist here: a new one replaces it.
    global _ATTACHED_LOCK
    _ATTACHED_LOCK = threading.Lock()
    for sock in list(_ATTACHED):
        with contextlib.suppress(OSError):
            getattr(sock, "close_in_child", sock.close)()
    _ATTACHED.clear()


os.register_at_fork(after_in_child=_close_attached_in_child)


def attached_count() -> int:
    """How many owner channels (attach sockets) this process holds open (0 in a forked child)."""
    return sum(1 for s in list(_ATTACHED) if s.fileno() != -1)


class _SocketFrames:
    """A raw attach or exec socket as a :class:`~pytest_agentbox.backends.base.FrameSource`."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def frames(self) -> Iterator[tuple[int, bytes]]:
        return _frames(self.sock)

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()  # type: ignore[no-any-return]


def read_ready(sock: Any, timeout: float = 30.0, *, with_stderr: bool = False) -> dict[str, Any]:
    """:func:`pytest_agentbox.backends.base.read_ready` on a raw attach or exec socket."""
    return _read_ready(_SocketFrames(sock), timeout, with_stderr=with_stderr)


class _DeadlinePassed(Exception):
    pass


class _Bounded:
    """A socket whose every wait ends by an absolute deadline (and each by ``idle``)."""

    def __init__(self, sock: socket.socket, end: float | None, idle: float | None) -> None:
        self.sock, self.end, self.idle = sock, end, idle

    def _arm(self) -> None:
        wait = self.idle
        if self.end is not None:
            left = self.end - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed
            wait = left if wait is None else min(wait, left)
        self.sock.settimeout(wait)

    def _call(self, fn: Any, *args: Any) -> Any:
        self._arm()
        try:
            return fn(*args)
        except TimeoutError:
            if self.end is not None and time.monotonic() >= self.end:
                raise _DeadlinePassed from None
            raise

    def recv(self, size: int) -> bytes:
        return bytes(self._call(self.sock.recv, size))

    def sendall(self, data: bytes) -> None:
        self._call(self.sock.sendall, data)


def exec_start_within(
    seconds: float, *args: Any, **kwargs: Any
) -> tuple[str, socket.socket] | None:
    """:func:`exec_start`, or None when the engine has not started it within ``seconds``."""
    return _start_by(time.monotonic() + seconds, *args, **kwargs)


def _start_by(end: float | None, *args: Any, **kwargs: Any) -> tuple[str, socket.socket] | None:
    """:func:`exec_start`, or None when it has not returned by ``end``.

    The engine's own calls can stall too: the exec's ``runc init`` runs as the exec's
    user in the container, where the agent can stop it, and the engine then holds the
    next exec's create. A call past ``end`` is left to finish in its thread, which
    closes what it got.
    """
    if end is None:
        return exec_start(*args, **kwargs)
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def start() -> None:
        try:
            got = exec_start(*args, **kwargs)
        except Exception as exc:
            got, box["error"] = None, exc
        with lock:
            if box.get("abandoned") and got is not None:
                with contextlib.suppress(OSError):
                    got[1].close()
            else:
                box["started"] = got

    worker = threading.Thread(target=start, name="agentbox-exec-start", daemon=True)
    worker.start()
    worker.join(max(0.0, end - time.monotonic()))
    with lock:
        if worker.is_alive():
            box["abandoned"] = True
            return None
    if "error" in box:
        raise box["error"]
    return box["started"]  # type: ignore[no-any-return]


def exec_run(
    client: Any,
    container_id: str,
    cmd: list[str],
    *,
    user: str,
    stdin: bytes | None = None,
    env: Mapping[str, str | None] | None = None,
    workdir: str | None = None,
    timeout: float | None = 120.0,
    deadline: float | None = None,
    max_output: int = MAX_OUTPUT,
) -> ExecOutput:
    """Run ``cmd`` to completion, feeding ``stdin`` if given; one round trip for output.

    Each stream keeps its first ``max_output`` bytes; ``dropped`` counts the rest.
    ``timeout`` bounds each wait for output (TimeoutError past it); ``deadline`` bounds
    the whole call in seconds, whatever the command prints: past it the exec is left
    running and the result has ``deadline_passed`` set (a process in the container,
    the agent's for one, can stop the command's runner; only the host's clock is sure).
    """
    end = None if deadline is None else time.monotonic() + deadline
    started = _start_by(
        end, client, container_id, cmd, user=user, env=env, workdir=workdir, timeout=timeout
    )
    if started is None:
        return ExecOutput(-1, b"", b"", (0, 0), True)
    exec_id, sock = started
    bounded = _Bounded(sock, end, timeout)
    out, err = bytearray(), bytearray()
    dropped = [0, 0]
    try:
        if stdin:
            bounded.sendall(stdin)
        sock.shutdown(socket.SHUT_WR)
        for stream, data in _frames(bounded):
            buf, i = (err, 1) if stream == 2 else (out, 0)
            room = max_output - len(buf)
            if room > 0:
                buf.extend(data[:room])
            dropped[i] += max(0, len(data) - max(room, 0))
    except _DeadlinePassed:
        return ExecOutput(-1, bytes(out), bytes(err), (dropped[0], dropped[1]), True)
    finally:
        sock.close()
    # The stream ended: the engine's exit code follows, within what is left (some).
    wait = 30.0 if end is None else min(30.0, max(2.0, end - time.monotonic()))
    return ExecOutput(exec_exit_code(client, exec_id, wait=wait), bytes(out), bytes(err),
                      (dropped[0], dropped[1]))  # fmt: skip


def exec_exit_code(client: Any, exec_id: str, *, wait: float = 30.0) -> int:
    """The exit code of a finished exec (polls: the engine may lag the stream's end).

    A busy engine (many parallel workers on few cores) can lag by seconds, hence the
    generous default ``wait``; -1 if it reports none within it (or it still runs).
    """
    deadline = time.monotonic() + wait
    pause = 0.005
    while True:
        info = client.api.exec_inspect(exec_id)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        if time.monotonic() > deadline:
            return -1
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def read_archive_file(container: Any, path: str, limit: int = 4 * 1024 * 1024) -> bytes | None:
    """One regular file's first ``limit`` bytes, read through the engine's archive API.

    No process runs in the container for it (nothing there can answer in its place),
    and the stream is shut as soon as ``limit`` bytes are in. None when there is no file.
    """
    archive = open_engine_archive(container, path)
    if archive is None:
        return None
    try:
        with tarfile.open(fileobj=archive, mode="r|") as tar:
            member = tar.next()
            if member is None or not member.isreg():
                return None
            fh = tar.extractfile(member)
            return fh.read(min(member.size, limit)) if fh is not None else None
    except (tarfile.TarError, EOFError, OSError):
        return None
    finally:
        archive.close()  # shuts the stream down unless it was read to its end


class EngineArchive(io.RawIOBase):
    """One ``GET /containers/{id}/archive`` response, read raw and closable at once.

    The docker SDK's ``get_archive`` generator turns the socket timeout off and, when
    abandoned, leaves the HTTP response open: the engine keeps streaming (and holds the
    container's lock, so removing the container waits). :meth:`abort` shuts the socket
    down, from any thread: a blocked read returns at once and the engine stops.
    """

    def __init__(self, response: Any, sock: Any) -> None:
        super().__init__()
        self._response, self._sock = response, sock
        self._lock = threading.Lock()
        self.aborted = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.aborted:
            raise OSError("archive stream aborted")
        data = self._response.raw.read(len(buffer), decode_content=False)
        buffer[: len(data)] = data
        return len(data)

    def abort(self) -> None:
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if not self.closed:
            complete = False
            with contextlib.suppress(Exception):
                complete = bool(self._response.raw.isclosed())
            if not complete:
                self.abort()  # the rest is never read: the connection must not be reused
            with contextlib.suppress(Exception):
                self._response.close()
        super().close()


def open_engine_archive(container: Any, path: str) -> EngineArchive | None:
    """Start streaming ``path`` out of ``container`` (None when it does not exist)."""
    api = container.client.api
    response = api._get(
        api._url("/containers/{0}/archive", container.id),
        params={"path": path},
        stream=True,
        headers={"Accept-Encoding": "identity"},  # plain tar: nothing to decompress
    )
    if response.status_code == 404:
        response.close()
        return None
    api._raise_for_status(response)
    sock = None
    with contextlib.suppress(Exception):
        raw = api._get_raw_response_socket(response)
        sock = getattr(raw, "_sock", raw)
    return EngineArchive(response, sock)
