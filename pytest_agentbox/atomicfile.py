"""Replace a file atomically: readers see the old or the new content, never half.

Shared by the vault and the state store. The temp file lives in the target's
directory under a caller-chosen unpredictable name, is created with
``O_CREAT|O_EXCL|O_NOFOLLOW`` at 0600 (a planted symlink is never followed and the
content is never world-readable, not even briefly), is fsynced, renamed over the
target, and the directory is fsynced so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def replace_atomically(path: Path, *, tmp_name: str) -> Iterator[BinaryIO]:
    """Yield a file to write; on a clean exit it replaces ``path``, else it is removed."""
    tmp = path.with_name(tmp_name)
    fd = os.open(tmp, CREATE_FLAGS, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # ours: O_EXCL proved we created it
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (some file systems refuse: ignored)."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
