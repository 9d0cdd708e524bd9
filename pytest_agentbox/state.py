"""Allowlisted state snapshots: clean tar filtering, safe extraction, an atomic store.

At teardown the sandbox streams ``/home/agent/<dir>`` out of the container for each of
:data:`ALLOWED_DIRS`. That stream is untrusted: the agent chose every name, mode and
link in it. :func:`clean_tar` turns it into a tar that holds only regular files and
directories inside the allowed directories, with headers rebuilt from scratch, so the
next sandbox's ``put_archive`` (extracted by the engine as root) can only create plain
files owned by the agent user (seed: "State persistence allowlist", "Safe tar
extraction").

Everything streams: no member's data is held in memory, whatever its size. The checks
are our own and do not depend on the extraction filters that only newer Pythons ship.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import os
import posixpath
import re
import secrets
import stat
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import filelock

from .atomicfile import fsync_dir, replace_atomically
from .errors import StateError

ALLOWED_DIRS: tuple[str, ...] = ("workspace", "data", "output", "state")

#: Mask applied to every mode: no setuid/setgid/sticky, no group/other write.
MODE_MASK = 0o755
#: At most this many dropped members are listed by name; the rest are only counted, so a
#: hostile archive of millions of rejected entries cannot grow the report without bound.
MAX_LISTED_DROPS = 1000
#: ustar holds mtimes up to 8**11 - 1; clamping keeps rebuilt headers free of pax mtimes.
_MAX_MTIME = 8**11 - 1
_COPY_CHUNK = 64 * 1024
_EXT_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_TYPE_REASONS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "sparse file",
    tarfile.CONTTYPE: "contiguous file",
}
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{16}\Z")


@dataclass(frozen=True)
class Limits:
    """Caps on one snapshot (all sources together); defaults no real user hits."""

    max_total_bytes: int = 1 << 30
    max_members: int = 100_000
    max_name_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_members", "max_name_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be positive")

    @property
    def max_ext_header(self) -> int:
        """Largest pax/GNU long-name header read into memory (a long name plus slack)."""
        return 2 * self.max_name_len + 64 * 1024


DEFAULT_LIMITS = Limits()


@dataclass
class FilterReport:
    """What a filtering pass kept and dropped (dropped names are display-safe)."""

    kept: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    total_bytes: int = 0
    files: int = 0
    #: Dropped members beyond :data:`MAX_LISTED_DROPS`, counted but not listed.
    dropped_unlisted: int = 0

    def summary(self, max_items: int = 5) -> str:
        """One line for a test report, e.g. ``kept 9 files, 3 dirs (3.1 MB); dropped 1: …``."""
        dirs = len(self.kept) - self.files
        head = f"kept {self.files} files, {dirs} dirs ({_human(self.total_bytes)})"
        n_dropped = len(self.dropped) + self.dropped_unlisted
        if not n_dropped:
            return f"{head}; dropped nothing"
        items = ", ".join(f"{n} ({r})" for n, r in self.dropped[:max_items])
        more = n_dropped - min(max_items, len(self.dropped))
        tail = f", and {more} more" if more else ""
        return f"{head}; dropped {n_dropped}: {items}{tail}"

    def _drop(self, name: str, reason: str) -> None:
        if len(self.dropped) < MAX_LISTED_DROPS:
            self.dropped.append((_display(name), reason))
        else:
            self.dropped_unlisted += 1


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (docker's ``get_archive`` stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._view = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._view:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._view = memoryview(chunk).cast("B")
        n = min(len(buffer), len(self._view))
        buffer[:n] = self._view[:n]
        self._view = self._view[n:]
        return n


class _Sink(Protocol):
    """Where kept members go; a method returns a reason string when it refuses one."""

    def add_dir(self, name: str, mode: int, mtime: int) -> str | None: ...

    def add_file(
        self, name: str, mode: int, mtime: int, size: int, data: IO[bytes]
    ) -> str | None: ...


class _Detachable:
    """A write-only proxy that can be cut off, so an aborted tar never flushes late.

    Without it, tarfile's stream flushes its buffer when garbage-collected, possibly
    into a file the caller has closed or reused since.
    """

    def __init__(self, target: IO[bytes]) -> None:
        self.target: IO[bytes] | None = target

    def write(self, data: bytes) -> int:
        return self.target.write(data) if self.target is not None else len(data)


class _TarSink:
    """Writes rebuilt headers (never copied ones) to an output tar stream."""

    def __init__(self, dst: IO[bytes], uid: int, gid: int) -> None:
        self._out = _Detachable(dst)
        # Closed by close() or abort(): the sink outlives this call by design.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8"
        )
        self._uid, self._gid = uid, gid

    def _header(self, name: str, kind: bytes, mode: int, mtime: int, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.size = kind, mode, mtime, size
        info.uid, info.gid, info.uname, info.gname = self._uid, self._gid, "", ""
        return info

    def add_dir(self, name: str, mode: int, mtime: int) -> None:
        self._tar.addfile(self._header(name, tarfile.DIRTYPE, mode, mtime, 0))
        self._tar.members.clear()  # TarFile remembers every member; we stream

    def add_file(self, name: str, mode: int, mtime: int, size: int, data: IO[bytes]) -> None:
        self._tar.addfile(self._header(name, tarfile.REGTYPE, mode, mtime, size), data)
        self._tar.members.clear()

    def close(self) -> None:
        self._tar.close()

    def abort(self) -> None:
        """Stop writing: the output is incomplete and must be discarded by the caller."""
        self._out.target = None
        self._tar.close()


class _DirSink:
    """Writes members under a host directory, never following a symlink found there."""

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self._root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open_dir(self, parts: Sequence[str]) -> int:
        """Open ``parts`` below the root one component at a time, refusing symlinks."""
        fd = os.dup(self._root)
        try:
            for part in parts:
                nxt = os.open(part, self._DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def add_dir(self, name: str, mode: int, mtime: int) -> str | None:
        *parents, last = name.split("/")
        try:
            pfd = self._open_dir(parents)
        except OSError as exc:
            return _dest_reason(exc)
        try:
            created = True
            try:
                os.mkdir(last, 0o700, dir_fd=pfd)
            except FileExistsError:
                created = False
            # O_NOFOLLOW: an existing entry must be a real directory, not a symlink.
            fd = os.open(last, self._DIR_FLAGS, dir_fd=pfd)
            if created:  # exactly 0o755 whatever the umask is
                os.fchmod(fd, 0o755)
            os.close(fd)
        except OSError as exc:
            return _dest_reason(exc)
        finally:
            os.close(pfd)
        return None

    def add_file(self, name: str, mode: int, mtime: int, size: int, data: IO[bytes]) -> str | None:
        *parents, last = name.split("/")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            pfd = self._open_dir(parents)
        except OSError as exc:
            return _dest_reason(exc)
        try:
            fd = os.open(last, flags, 0o600, dir_fd=pfd)
        except OSError as exc:
            return _dest_reason(exc)
        finally:
            os.close(pfd)
        with os.fdopen(fd, "wb") as out:
            _copy(data, out, size)
            os.fchmod(out.fileno(), mode)
            out.flush()
            os.utime(out.fileno(), (mtime, mtime))
        return None

    def close(self) -> None:
        os.close(self._root)


def _dest_reason(exc: OSError) -> str:
    if exc.errno == errno.EEXIST:
        return "exists in destination"
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "symlink or non-directory in destination"
    raise StateError(f"cannot write restored state: {exc.strerror}") from exc


def _guarded_tarinfo(limits: Limits) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses to read huge pax/GNU headers into memory.

    tarfile reads an extended header's whole body at once, so an archive could claim a
    multi-gigabyte long name. ``_proc_member`` is tarfile's documented extension point.
    Global pax headers are skipped too: they would silently rename later members.
    """
    cap = limits.max_ext_header

    class GuardedTarInfo(tarfile.TarInfo):
        reject: str | None = None

        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            big = self.type in _EXT_TYPES and self.size > cap
            if not big and self.type != tarfile.XGLTYPE:
                return super()._proc_member(tarfile_)
            _skip(tarfile_.fileobj, self._block(self.size))  # type: ignore[attr-defined]
            try:
                nxt = self.fromtarfile(tarfile_)
            except tarfile.HeaderError as exc:
                raise tarfile.ReadError(f"bad header after extended header: {exc}") from None
            nxt.offset = self.offset
            if big:
                nxt.reject = "oversized extended header"  # type: ignore[attr-defined]
            return nxt

    return GuardedTarInfo


def _copy(src: IO[bytes], dst: IO[bytes], n: int) -> None:
    while n:
        block = src.read(min(n, _COPY_CHUNK))
        if not block:
            raise tarfile.ReadError("unexpected end of data")
        dst.write(block)
        n -= len(block)


def _skip(fileobj: IO[bytes], n: int) -> None:
    while n:
        got = len(fileobj.read(min(n, _COPY_CHUNK)))
        if not got:
            raise tarfile.ReadError("unexpected end of data")
        n -= got


class _Cleaner:
    """The member checks shared by clean_tar, safe_extract and StateStore.save_from.

    One instance spans all sources of a snapshot, so duplicates and caps are judged on
    the merged result.
    """

    def __init__(self, sink: _Sink, limits: Limits, allowed_dirs: Sequence[str] | None) -> None:
        if allowed_dirs is not None:
            for d in allowed_dirs:
                if not d or "/" in d or d in (".", "..") or _bad_chars(d):
                    raise ValueError(f"allowed dir {d!r} must be one plain path component")
        self._allowed = None if allowed_dirs is None else frozenset(allowed_dirs)
        self._sink, self._limits = sink, limits
        self._tarinfo = _guarded_tarinfo(limits)
        self._kinds: dict[str, bool] = {}  # kept name -> is a directory
        self._synthesised: set[str] = set()  # parents emitted before their own member
        self._capped: str | None = None
        self.report = FilterReport()

    def feed(self, src: IO[bytes] | Iterable[bytes]) -> None:
        """Filter one source tar into the sink."""
        try:
            with tarfile.open(
                fileobj=_as_reader(src), mode="r|*", tarinfo=self._tarinfo, encoding="utf-8"
            ) as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # TarFile remembers every member; we stream
                    self._member(tar, member)
        # ValueError: older 3.11 releases let some malformed pax records escape as one.
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise StateError(f"state archive unreadable: {exc}") from exc

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        report = self.report
        reason = getattr(m, "reject", None) or self._check(m)
        if reason:
            report._drop(m.name, reason)
            return
        name = posixpath.normpath(m.name)
        is_dir = m.type == tarfile.DIRTYPE
        parts = name.split("/")
        if self._allowed is not None and len(parts) == 1 and not is_dir:
            report._drop(m.name, "not a directory")
            return
        if is_dir and name in self._synthesised:
            # Its parent-first stand-in is already out; the stream cannot be rewound to
            # fix that header's mode, and the stand-in's 0o755 is a safe one.
            self._synthesised.discard(name)
            return
        if name in self._kinds:
            was_dir = self._kinds[name]
            dup = "duplicate" if was_dir == is_dir else None
            report._drop(m.name, dup or f"conflicts with {'directory' if was_dir else 'file'}")
            return
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(self._kinds.get(a) is False for a in ancestors):
            report._drop(m.name, "parent is a file")
            return
        missing = [a for a in ancestors if a not in self._kinds]
        size = 0 if is_dir else m.size
        if self._capped is None and len(report.kept) + len(missing) >= self._limits.max_members:
            self._capped = "member cap"
        if self._capped:
            report._drop(m.name, self._capped)
            return
        # Only the member that does not fit is dropped: one runaway file must not cost
        # the agent every legitimate file that happens to come after it.
        if report.total_bytes + size > self._limits.max_total_bytes:
            report._drop(m.name, "size cap")
            return
        mtime = _mtime(m.mtime)
        for parent in missing:  # parents are emitted before their children
            if reason := self._sink.add_dir(parent, 0o755, mtime):
                report._drop(m.name, reason)
                return
            self._keep(parent, True, 0)
            self._synthesised.add(parent)
        if is_dir:
            reason = self._sink.add_dir(name, m.mode & MODE_MASK, mtime)
        else:
            data = tar.extractfile(m)
            if data is None:  # cannot happen for REGTYPE; refuse rather than assume
                report._drop(m.name, "no file data")
                return
            reason = self._sink.add_file(name, m.mode & MODE_MASK, mtime, size, data)
        if reason:
            report._drop(m.name, reason)
            return
        self._keep(name, is_dir, size)

    def _check(self, m: tarfile.TarInfo) -> str | None:
        """Why this member may not be kept at all, or None."""
        raw = m.name
        if len(raw.encode("utf-8", "surrogateescape")) > self._limits.max_name_len:
            return "name too long"
        if m.type in _TYPE_REASONS:
            return _TYPE_REASONS[m.type]
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
            return f"unsupported type {m.type!r}"
        if m.sparse is not None:
            return "sparse file"
        if raw.startswith("/"):
            return "absolute path"
        if ".." in raw.split("/"):
            return "'..' component"
        if _bad_chars(raw):
            return "control character in name"
        if any(0xDC80 <= ord(c) <= 0xDCFF for c in raw):
            return "name not UTF-8"
        norm = posixpath.normpath(raw) if raw else "."
        if norm == ".":
            return "empty name"
        first = norm.split("/", 1)[0]
        if norm.startswith("/") or first == "..":
            return "escapes after normalisation"
        if self._allowed is not None and first not in self._allowed:
            return "outside allowed dirs"
        return None

    def _keep(self, name: str, is_dir: bool, size: int) -> None:
        self._kinds[name] = is_dir
        self.report.kept.append(name)
        self.report.total_bytes += size
        self.report.files += not is_dir


def _as_reader(src: IO[bytes] | Iterable[bytes]) -> IO[bytes]:
    """A file whose read(n) returns n bytes unless at EOF (tarfile's sniffing needs it)."""
    if isinstance(src, bytes | bytearray | memoryview):
        return io.BytesIO(src)
    if isinstance(src, io.RawIOBase):
        return io.BufferedReader(src, _COPY_CHUNK)
    if hasattr(src, "read"):
        return src  # type: ignore[return-value]
    return io.BufferedReader(ChunkReader(src), _COPY_CHUNK)  # type: ignore[arg-type]


def _bad_chars(name: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)


def _mtime(value: float) -> int:
    try:
        return min(max(int(value), 0), _MAX_MTIME)
    except (ValueError, OverflowError):  # NaN or inf from a pax header
        return 0


def _display(name: str, limit: int = 200) -> str:
    """A name safe to print in one line of a report: escaped and shortened."""
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def _human(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KB", "MB", "GB"):  # noqa: B007 - the last unit is used below
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"


def clean_tar(
    src: IO[bytes] | Iterable[bytes],
    dst: IO[bytes],
    *,
    limits: Limits = DEFAULT_LIMITS,
    uid: int = 1000,
    gid: int = 1000,
    allowed_dirs: Sequence[str] = ALLOWED_DIRS,
) -> FilterReport:
    """Stream the untrusted tar ``src`` into ``dst``, keeping only safe, allowed members.

    Only regular files and directories under ``allowed_dirs`` survive; every header is
    rebuilt (owner ``uid``/``gid``, no names, mode masked by :data:`MODE_MASK`, no pax
    extras such as xattrs). Rejected members are listed in the report, not raised.
    Raises :class:`StateError` when ``src`` is not a readable tar or ends early; ``dst``
    then holds a partial archive the caller must discard.
    """
    return _clean_sources([src], dst, limits=limits, uid=uid, gid=gid, allowed_dirs=allowed_dirs)


def _clean_sources(
    sources: Iterable[IO[bytes] | Iterable[bytes]],
    dst: IO[bytes],
    *,
    limits: Limits,
    uid: int,
    gid: int,
    allowed_dirs: Sequence[str],
) -> FilterReport:
    """Clean several source tars into one: caps and duplicates are judged on the whole."""
    sink = _TarSink(dst, uid, gid)
    try:
        cleaner = _Cleaner(sink, limits, allowed_dirs)
        for src in sources:
            cleaner.feed(src)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    return cleaner.report


def safe_extract(
    src: IO[bytes] | Iterable[bytes],
    dest: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    allowed_dirs: Sequence[str] | None = ALLOWED_DIRS,
) -> FilterReport:
    """Extract the untrusted tar ``src`` under ``dest`` with :func:`clean_tar`'s checks.

    Files are created with ``O_EXCL | O_NOFOLLOW`` relative to directory descriptors
    opened with ``O_NOFOLLOW``, so a symlink already in ``dest`` is never followed and
    an existing file is never overwritten (both are reported as dropped). Directories
    are created 0o755. ``allowed_dirs=None`` accepts any relative name.
    """
    sink = _DirSink(Path(dest))
    try:
        cleaner = _Cleaner(sink, limits, allowed_dirs)
        cleaner.feed(src)
    finally:
        sink.close()
    return cleaner.report


@dataclass(frozen=True)
class StateInfo:
    """One stored snapshot."""

    scope: str
    path: Path
    size: int
    mtime: float
    members: int


class StateStore:
    """Clean snapshots on the host, one tar per scope, replaced atomically under a lock."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, scope: str) -> Path:
        """The tar file of ``scope``: a readable prefix plus a hash, so scopes never collide."""
        if not isinstance(scope, str) or not scope:
            raise ValueError("state scope must be a non-empty string")
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", scope).lstrip("._-")[:80] or "state"
        digest = hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()[:24]
        return self.root / f"{readable}-{digest}.tar"

    def lock(self, scope: str) -> filelock.FileLock:
        """The inter-process lock of ``scope`` (its file is never unlinked)."""
        self._mkroot()
        return filelock.FileLock(f"{self.path_for(scope)}.lock")

    def load(self, scope: str) -> Path | None:
        """The stored clean tar of ``scope``, or None when nothing was saved."""
        path = self.path_for(scope)
        try:
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except FileNotFoundError:
            return None

    def save_from(
        self,
        scope: str,
        sources: Iterable[IO[bytes] | Iterable[bytes]],
        *,
        limits: Limits = DEFAULT_LIMITS,
        uid: int = 1000,
        gid: int = 1000,
    ) -> FilterReport:
        """Clean and merge ``sources`` (one tar per directory) into the snapshot of ``scope``.

        The new tar is written to a private temp file, fsynced and renamed over the old
        one, so any failure before the rename leaves the previous snapshot untouched.
        Temp files of crashed savers are removed here: under the lock, none can be live.
        """
        target = self.path_for(scope)
        with self.lock(scope):
            started = time.time()
            self._remove_temps(target, older_than=started)
            self._write_scope_name(target, scope)
            tmp_name = f"{target.name}.tmp-{secrets.token_hex(8)}"
            with replace_atomically(target, tmp_name=tmp_name) as out:
                return _clean_sources(
                    sources, out, limits=limits, uid=uid, gid=gid, allowed_dirs=ALLOWED_DIRS
                )

    def list(self) -> list[StateInfo]:
        """Every stored snapshot, sorted by scope."""
        infos = []
        for path in sorted(self.root.glob("*.tar")) if self.root.is_dir() else []:
            try:
                st = os.lstat(path)
                scope = Path(f"{path}.scope").read_text(encoding="utf-8")
                members = _count_members(path)
            except (OSError, tarfile.TarError):
                continue  # removed meanwhile, or not one of ours
            if stat.S_ISREG(st.st_mode):
                infos.append(StateInfo(scope, path, st.st_size, st.st_mtime, members))
        return sorted(infos, key=lambda i: i.scope)

    def clear(self, scope: str | None = None) -> int:
        """Remove the snapshot of ``scope`` (or all snapshots); returns how many went."""
        if scope is not None:
            targets = [self.path_for(scope)]
        elif self.root.is_dir():
            targets = sorted(self.root.glob("*.tar"))
        else:
            targets = []
        removed = 0
        for target in targets:
            with filelock.FileLock(f"{target}.lock"):
                self._remove_temps(target, older_than=time.time())
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{target}.scope")
                try:
                    os.unlink(target)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            fsync_dir(self.root)
        return removed

    def _mkroot(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _remove_temps(self, target: Path, *, older_than: float) -> None:
        """Unlink temp files of ``target`` left by savers that died (caller holds the lock)."""
        for tmp in self.root.glob(f"{glob.escape(target.name)}.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if _TMP_RE.search(tmp.name) and os.lstat(tmp).st_mtime <= older_than:
                    os.unlink(tmp)

    @staticmethod
    def _write_scope_name(target: Path, scope: str) -> None:
        """Record the scope beside its tar for list(); the content is fixed per path."""
        meta = Path(f"{target}.scope")
        if meta.exists():
            return
        with replace_atomically(meta, tmp_name=f"{meta.name}.tmp-{secrets.token_hex(8)}") as fh:
            fh.write(scope.encode())


def _count_members(path: Path) -> int:
    with tarfile.open(path, mode="r:") as tar:
        return sum(1 for _ in tar)


def default_state_dir(rootdir_cache: Path) -> Path:
    """Where the plugin keeps snapshots: ``<pytest cache dir>/agentbox/state``."""
    return Path(rootdir_cache) / "agentbox" / "state"
