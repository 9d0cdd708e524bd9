"""What every backend ships into a box: our stdlib tools and the tars of code and files.

No engine here: these build bytes (a tar, a tool's argv and stdin) that a backend's
:meth:`~pytest_agentbox.backends.base.Box.exec` or
:meth:`~pytest_agentbox.backends.base.Box.put_archive` carries.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

# The stdlib-only files that run inside containers (see pytest_agentbox.inside).
INSIDE_DIR = Path(__file__).resolve().parents[1] / "inside"


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
BOOT = (
    "import sys;b=sys.stdin.buffer;n=int(b.readline());s=b.read(n);sys.argv=sys.argv[1:];"
    "exec(compile(s,sys.argv[0],'exec'),{'__name__':'__main__'})"
)

# The standard directories, in PATH order. A root step names its interpreter by absolute
# path: it looks in these itself (before any user code has run) instead of through PATH.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_FIND_PYTHON = (
    f"for d in {' '.join(SYSTEM_DIRS)}; do "
    'if [ -x "$d/python3" ]; then exec "$d/python3" -I -S -c "$0" "$@"; fi; done; '
    'echo "agentbox: no python3 in the image (looked in the standard directories)" >&2; '
    "exit 127"
)


@functools.cache
def tool_source(name: str) -> bytes:
    """The source of one of our stdlib tools (``pytest_agentbox/inside/<name>``)."""
    return (INSIDE_DIR / name).read_bytes()


def tool_command(name: str, *args: str, python: str | None = None) -> tuple[list[str], bytes]:
    """(argv, stdin prefix) that run ``pytest_agentbox/inside/<name>`` in a container's python3.

    ``python`` is the interpreter's absolute path; without it ``/bin/sh`` looks for
    ``python3`` in the standard directories (no PATH lookup).
    """
    source = tool_source(name)
    if python:
        argv = [python, "-I", "-S", "-c", BOOT, name, *args]
    else:
        argv = ["/bin/sh", "-c", _FIND_PYTHON, BOOT, name, *args]
    return argv, b"%d\n%s" % (len(source), source)
