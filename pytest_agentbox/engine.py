"""Thin helpers over the docker SDK: one client per process, exec with stdin, tar building.

Nothing here runs at import time, so ``pytest --help`` works without an engine.
"""

from __future__ import annotations

import functools
import io
import json
import os
import socket
import struct
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DockerUnavailable, ImageMissing

DEFAULT_IMAGE = "agentbox/base:bookworm"

_client: Any = None
_images_seen: set[str] = set()


def get_client() -> Any:
    """The process's docker client, created and pinged on first use.

    Raises :class:`DockerUnavailable` with the fix when no engine answers.
    """
    global _client
    if _client is not None:
        return _client
    import docker  # imported lazily: collection and --help must not need it
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (DockerException, OSError) as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerUnavailable(
            f"no Docker engine answers at {where} ({type(exc).__name__}). Start Docker "
            "(e.g. `sudo systemctl start docker` or `dockerd &`), or set DOCKER_HOST. "
            "Without --agentbox-require-docker, sandbox tests are skipped instead."
        ) from None
    _client = client
    return client


def ensure_image(client: Any, image: str) -> None:
    """Fail with a clear message when ``image`` is not on the engine (checked once per process)."""
    if image in _images_seen:
        return
    from docker.errors import ImageNotFound

    try:
        client.images.get(image)
    except ImageNotFound:
        raise ImageMissing(
            f"sandbox image {image!r} is not on this Docker engine. Build the default one with "
            "`agentbox image build` (or images/build-base-image.sh), `docker pull` yours, "
            "or choose another with --agentbox-image / agentbox_image."
        ) from None
    _images_seen.add(image)


@dataclass
class ExecOutput:
    """What one exec printed, and how it ended."""

    exit_code: int
    stdout: bytes
    stderr: bytes


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
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> tuple[str, socket.socket]:
    """Start an exec with stdin attached; returns its id and the raw duplex socket."""
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
    sock = raw_socket(api.exec_start(exec_id, socket=True))
    return exec_id, sock


def exec_run(
    client: Any,
    container_id: str,
    cmd: list[str],
    *,
    user: str,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> ExecOutput:
    """Run ``cmd`` to completion, feeding ``stdin`` if given; one round trip for output."""
    exec_id, sock = exec_start(client, container_id, cmd, user=user, env=env, workdir=workdir)
    out, err = bytearray(), bytearray()
    try:
        if stdin:
            sock.sendall(stdin)
        sock.shutdown(socket.SHUT_WR)
        for stream, data in _frames(sock):
            (err if stream == 2 else out).extend(data)
    finally:
        sock.close()
    return ExecOutput(exec_exit_code(client, exec_id), bytes(out), bytes(err))


def exec_exit_code(client: Any, exec_id: str) -> int:
    """The exit code of a finished exec (polls: the engine may lag the stream's end).

    A busy engine (many parallel workers on few cores) can lag by seconds, hence the
    generous deadline; -1 only if it never reports one.
    """
    deadline = time.monotonic() + 30
    pause = 0.005
    while True:
        info = client.api.exec_inspect(exec_id)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        if time.monotonic() > deadline:
            return -1
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def tar_bytes(
    files: Iterable[tuple[str, bytes, int]],
    *,
    uid: int = 0,
    gid: int = 0,
    dirs: Iterable[tuple[str, int]] = (),
) -> bytes:
    """A tar of (name, data, mode) files and (name, mode) dirs, all owned by uid:gid."""
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, now
            info.uid, info.gid = uid, gid
            tar.addfile(info)
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, now
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# Never shipped into a sandbox: version control, caches, virtualenvs, and the state
# directories (state comes back only through the state store's safe path).
_UPLOAD_SKIP = {
    ".git", ".hg", ".svn", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".tox", ".venv", "venv", "node_modules", "workspace", "data", "output", "state",
}  # fmt: skip


def tar_directory(
    local_dir: Path, *, uid: int, gid: int, skip: set[str] | None = None, prefix: str = ""
) -> bytes:
    """A tar of ``local_dir``'s contents owned by uid:gid; symlinks and specials are left out.

    With ``prefix`` every member lies under that directory, which the tar itself creates
    (so the engine makes it, owned by uid:gid, without an exec in the container).
    """
    skip = _UPLOAD_SKIP if skip is None else skip
    buf = io.BytesIO()
    root = Path(local_dir)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if prefix:
            info = tarfile.TarInfo(prefix)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o755, uid, gid
            info.mtime = int(time.time())
            tar.addfile(info)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            rel_dir = Path(prefix) / Path(dirpath).relative_to(root)
            for name in [*dirnames, *sorted(filenames)]:
                path = Path(dirpath) / name
                st = path.lstat()
                if not (path.is_dir() or path.is_file()) or path.is_symlink():
                    continue
                if name.endswith(".pyc"):
                    continue
                info = tarfile.TarInfo(str(rel_dir / name))
                info.uid, info.gid, info.mtime = uid, gid, int(st.st_mtime)
                if path.is_dir():
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.size, info.mode = st.st_size, 0o755 if st.st_mode & 0o111 else 0o644
                    with path.open("rb") as fh:
                        tar.addfile(info, fh)
    return buf.getvalue()


# Runs one of our stdlib tools from its source on stdin: a length line, then the source,
# then whatever the tool itself reads. Nothing needs writing into the container first
# (an archive upload costs the engine a process start), and -I -S keep the image's
# site-packages and PYTHON* variables out of a root process.
_BOOT = (
    "import sys;b=sys.stdin.buffer;n=int(b.readline());s=b.read(n);sys.argv=sys.argv[1:];"
    "exec(compile(s,sys.argv[0],'exec'),{'__name__':'__main__'})"
)


@functools.cache
def tool_source(name: str) -> bytes:
    """The source of one of our stdlib tools (``pytest_agentbox/<name>``)."""
    return (Path(__file__).parent / name).read_bytes()


def tool_command(name: str, *args: str) -> tuple[list[str], bytes]:
    """(argv, stdin prefix) that run ``pytest_agentbox/<name>`` in a container's python3."""
    source = tool_source(name)
    return ["python3", "-I", "-S", "-c", _BOOT, name, *args], b"%d\n%s" % (len(source), source)


def start_daemon(
    client: Any,
    container_id: str,
    cmd: list[str],
    config: Mapping[str, Any],
    *,
    stdin_prefix: bytes = b"",
) -> dict[str, Any]:
    """Start a root tool that reads one JSON config line and answers with one ready line.

    Secrets in ``config`` travel only over the exec's stdin, never argv or env. The
    tool keeps running after we detach; an empty dict means it never said it was ready.
    ``stdin_prefix`` goes first (the tool's source, see :func:`tool_command`).
    """
    _exec_id, sock = exec_start(client, container_id, cmd, user="0")
    line = b""
    try:
        sock.settimeout(30)
        sock.sendall(stdin_prefix + json.dumps(config).encode() + b"\n")
        for stream, data in _frames(sock):
            if stream == 1:
                line += data
                if b"\n" in line:
                    break
    except OSError:
        pass
    finally:
        sock.close()
    try:
        ready = json.loads(line.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return dict(ready) if isinstance(ready, dict) and ready.get("ready") else {}
