"""Allowlisted state snapshots: the clean tar filter (the safe extractor) and an atomic store.

At teardown the sandbox streams ``/home/agent/<dir>`` out of the container for each of
:data:`ALLOWED_DIRS`. That stream is untrusted: the agent chose every name, mode, link
and declared size in it. :func:`clean_tar` turns it into a tar that holds only regular
files and directories inside the allowed directories, with headers rebuilt from
scratch (seed: "State persistence allowlist").

Restore is the same filter again and then the engine: the stored tar is passed through
:func:`clean_tar` once more (the store is a file on disk anything with the user's rights
could have replaced) and the clean result is unpacked by the engine's archive API into
the new sandbox's fresh home volume, before any user code has run there. So what the
engine unpacks holds no absolute name, no ``..``, no link of any kind, no device, no
setid bit, only members of the four directories, owned by the agent user; and the tree
it lands in holds nothing the agent made (seed: "Safe tar extraction").

Everything streams: no member's data is held in memory, whatever its size. The tar
headers are parsed here, not by :mod:`tarfile`, for the bounded subset we accept:
ustar, pax and GNU headers with their magic (anything else, compressed data included,
is refused), extended headers bounded in size and count per member and per snapshot,
and pax records parsed in linear time (3.11's tarfile is quadratic on crafted ones).

Declared sizes are never read through blindly. A member that cannot be kept is passed
over by seeking when the source is a file on disk (a declared size past the end of the
file refuses the archive at once); on a stream (the engine's) it is read past only while
the whole snapshot stays within ``max_total_bytes + read_margin`` bytes read and never
when it alone is larger than ``max_total_bytes``: otherwise the stream is closed unread
and the snapshot refused (:class:`ArchiveRefused`), so a 16 TiB sparse file costs one
header, not 16 TiB of zeros. ``max_seconds`` bounds a snapshot's time the same way.

Hard links: the second name of a file arrives as a link member naming the first. It is
stored as a second regular file with the first one's content, re-read from the output
(the input stream cannot be rewound). A link that comes before its target waits for it
(in the same snapshot); one whose target is never kept, is a directory or lies outside
the allowed dirs is dropped and reported.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import posixpath
import re
import secrets
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import filelock

from pytest_agentbox.atomicfile import fsync_dir, replace_atomically
from pytest_agentbox.backends.base import Box
from pytest_agentbox.errors import StateError

ALLOWED_DIRS: tuple[str, ...] = ("workspace", "data", "output", "state")

#: Mask applied to every mode: no setuid/setgid/sticky, no group/other write.
MODE_MASK = 0o755
#: At most this many dropped members are listed by name; the rest are only counted, so a
#: hostile archive of millions of rejected entries cannot grow the report without bound.
MAX_LISTED_DROPS = 1000
#: Extended headers (pax, GNU long name/link, global) allowed before one member.
MAX_EXT_CHAIN = 8
#: GNU sparse extension blocks allowed after one old-style sparse header.
MAX_SPARSE_BLOCKS = 64
#: ustar holds mtimes up to 8**11 - 1; clamping keeps rebuilt headers free of pax mtimes.
_MAX_MTIME = 8**11 - 1
_COPY_CHUNK = 64 * 1024
_BLOCK = 512
_RECORD = 20 * _BLOCK
_ZERO_BLOCK = bytes(_BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"
_HEADER_ONLY = frozenset(b"123456")  # link, symlink, char, block, dir, fifo: no data
_EXT_TYPES = frozenset(b"xXgLK")
_COMPRESSED = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x1f\x9d", "compress"),
)
_TYPE_REASONS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "sparse file",
    tarfile.CONTTYPE: "contiguous file",
}
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{16}\Z")


@dataclass(frozen=True)
class Limits:
    """Caps on one snapshot (all sources together); defaults no real user hits.

    ``read_margin`` is what may be read beyond ``max_total_bytes``: headers, padding and
    the data of dropped members that a stream forces us to read past. ``max_seconds``
    bounds one snapshot or restore. The ``max_ext_*`` and ``max_pax_records`` caps bound
    extended headers: per header (records), per snapshot (count and bytes).
    """

    max_total_bytes: int = 1 << 30
    max_members: int = 100_000
    max_name_len: int = 4096
    max_seconds: float = 120.0
    read_margin: int = 256 << 20
    max_pax_records: int = 256
    max_ext_headers: int = 200_000
    max_ext_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for name in (
            "max_total_bytes", "max_members", "max_name_len", "max_seconds", "read_margin",
            "max_pax_records", "max_ext_headers", "max_ext_bytes",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive")

    @property
    def max_ext_header(self) -> int:
        """Largest pax/GNU long-name header read into memory (a long name plus slack)."""
        return 2 * self.max_name_len + 64 * 1024

    @property
    def max_read_bytes(self) -> int:
        """The most one snapshot reads from its sources (all of them together)."""
        return self.max_total_bytes + self.read_margin


DEFAULT_LIMITS = Limits()


class ArchiveRefused(StateError):
    """A state archive given up on a limit: nothing of it may be stored or restored.

    On a stream the source was closed without reading the rest (``closed_unread``).
    """

    def __init__(self, why: str, *, closed_unread: bool = False) -> None:
        tail = "; stream closed, the rest was not read" if closed_unread else ""
        super().__init__(f"state archive refused: {why}{tail}")
        self.why, self.closed_unread = why, closed_unread


@dataclass
class FilterReport:
    """What a filtering pass kept and dropped (dropped names are display-safe)."""

    kept: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    total_bytes: int = 0
    files: int = 0
    #: Dropped members beyond :data:`MAX_LISTED_DROPS`, counted but not listed.
    dropped_unlisted: int = 0
    #: Bytes read from the sources (headers and padding included).
    bytes_read: int = 0

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

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()


# ---------------------------------------------------------------- reading


class _Budget:
    """What one snapshot may still read and for how long (shared by all its sources)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds
        self.read = 0
        self.ext_headers = 0
        self.ext_bytes = 0

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def time_up(self, closed_unread: bool) -> ArchiveRefused:
        return ArchiveRefused(
            f"took longer than {self.limits.max_seconds:g} s (max_seconds)",
            closed_unread=closed_unread,
        )


class _Input:
    """One source tar: exact reads counted against the budget, skips by seek or read."""

    def __init__(self, src: IO[bytes] | Iterable[bytes], budget: _Budget) -> None:
        self.src, self.budget = src, budget
        self.fh = _as_reader(src)
        self.pos = 0
        self.end: int | None = None  # known size of a seekable file
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if self.fh.seekable():
                start = self.fh.tell()
                self.end = self.fh.seek(0, io.SEEK_END) - start
                self.fh.seek(start)

    @property
    def seekable(self) -> bool:
        return self.end is not None

    def refuse(self, why: str) -> ArchiveRefused:
        return ArchiveRefused(why, closed_unread=not self.seekable)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the source)."""
        budget = self.budget
        if budget.expired():
            raise budget.time_up(not self.seekable)
        if budget.read + n > budget.limits.max_read_bytes:
            raise self.refuse(
                f"more than {_human(budget.limits.max_read_bytes)} to read "
                "(max_total_bytes + read_margin)"
            )
        parts, got = [], 0
        while got < n:
            try:
                block = self.fh.read(n - got)
            except Exception as exc:
                if budget.expired():  # the watchdog cut the stream
                    raise budget.time_up(not self.seekable) from exc
                raise StateError(f"state archive unreadable: {exc}") from exc
            if not block:
                break
            parts.append(block)
            got += len(block)
        budget.read += got
        self.pos += got
        return b"".join(parts)

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise StateError("state archive unreadable: unexpected end of data")
        return data

    def skip(self, n: int, what: str) -> None:
        """Pass over ``n`` bytes: seek on a file, read on a stream only within budget."""
        if n <= 0:
            return
        if self.end is not None:
            if self.pos + n > self.end:
                raise StateError(
                    f"state archive unreadable: {what} declares {_human(n)}, past the end "
                    "of the file"
                )
            self.fh.seek(n, io.SEEK_CUR)
            self.pos += n
            return
        limits = self.budget.limits
        if n > limits.max_total_bytes + _RECORD:
            raise self.refuse(
                f"{what} declares {_human(n)}, more than the state can hold "
                f"({_human(limits.max_total_bytes)}, max_total_bytes)"
            )
        if self.budget.read + n > limits.max_read_bytes:
            raise self.refuse(
                f"passing over {what} ({_human(n)}) would read more than "
                f"{_human(limits.max_read_bytes)} (max_total_bytes + read_margin)"
            )
        while n:
            got = len(self.read(min(n, _COPY_CHUNK)))
            if not got:
                raise StateError("state archive unreadable: unexpected end of data")
            n -= got

    def close_stream(self) -> None:
        """Close a stream source (never a caller's seekable file)."""
        if self.seekable:
            return
        for obj in (self.fh, self.src):
            close = getattr(obj, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()


@dataclass
class _Member:
    """One archive member as parsed here (names already decoded, pax applied)."""

    name: str
    type: bytes
    mode: int
    mtime: float
    size: int
    linkname: str
    sparse: bool
    reject: str | None
    data_len: int
    data: _MemberData | None = None


class _MemberData:
    """Reads exactly one member's data from its input (an early end is an error)."""

    def __init__(self, inp: _Input, n: int) -> None:
        self._inp, self.left = inp, n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        if not n:
            return b""
        data = self._inp.read_exact(n)
        self.left -= n
        return data


def _blocks(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def _num(field_: bytes) -> int:
    """A numeric header field: octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field_ and field_[0] in (0o200, 0o377):
        n = int.from_bytes(field_[1:], "big")
        return n - 256 ** (len(field_) - 1) if field_[0] == 0o377 else n
    text = field_.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise StateError("state archive unreadable: bad number in header") from None


def _nts(field_: bytes) -> str:
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    try:
        want = _num(block[148:156])
    except StateError:
        return False
    rest = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(rest)
    signed = unsigned - 256 * sum(1 for b in rest if b > 127)
    return want in (unsigned, signed)


def _format_error(block: bytes) -> str:
    for magic, kind in _COMPRESSED:
        if block.startswith(magic):
            return f"{kind}-compressed data (only a plain ustar, pax or GNU tar is accepted)"
    return "not a ustar, pax or GNU tar header"


def _parse_pax(body: bytes, max_records: int) -> dict[str, bytes] | None:
    """pax records ``"<len> <key>=<value>\\n"`` in one linear pass; None: too many."""
    out: dict[str, bytes] = {}
    pos, n, count = 0, len(body), 0
    while pos < n and body[pos]:
        space = body.find(b" ", pos, pos + 21)
        digits = body[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise StateError("state archive unreadable: malformed pax record")
        end = pos + int(digits)
        equals = body.find(b"=", space + 1, end)
        if end > n or end <= space + 1 or body[end - 1] != 0x0A or equals < 0:
            raise StateError("state archive unreadable: malformed pax record")
        count += 1
        if count > max_records:
            return None
        out[body[space + 1 : equals].decode("utf-8", "surrogateescape")] = body[
            equals + 1 : end - 1
        ]
        pos = end
    return out


def _members(inp: _Input) -> Iterator[_Member]:
    """The members of one tar; after each, what its consumer left unread is skipped."""
    budget = inp.budget
    limits = budget.limits
    first = True
    while True:
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        reject: str | None = None
        chain = 0
        while True:
            block = inp.read(_BLOCK)
            if not block and not first:
                return  # ended at a header boundary without end blocks: accepted
            if len(block) < _BLOCK:
                raise StateError("state archive unreadable: unexpected end of data")
            if block == _ZERO_BLOCK:
                if first:
                    raise StateError("state archive unreadable: empty archive")
                return
            magic = block[257:265]
            if magic not in (_POSIX_MAGIC, _GNU_MAGIC) or not _checksum_ok(block):
                why = (
                    _format_error(block)
                    if first or magic not in (_POSIX_MAGIC, _GNU_MAGIC)
                    else "bad header checksum"
                )
                raise StateError(f"state archive unreadable: {why}")
            first = False
            kind = block[156:157]
            size = _num(block[124:136])
            if size < 0:
                raise StateError("state archive unreadable: negative size in header")
            if kind[0:1] and kind[0] in _EXT_TYPES:
                chain += 1
                budget.ext_headers += 1
                if chain > MAX_EXT_CHAIN:
                    raise inp.refuse(
                        f"more than {MAX_EXT_CHAIN} extended headers before one member"
                    )
                if budget.ext_headers > limits.max_ext_headers:
                    raise inp.refuse(
                        f"more than {limits.max_ext_headers} extended headers (max_ext_headers)"
                    )
                if size > limits.max_ext_header:  # never read into memory
                    reject = "oversized extended header"
                    inp.skip(_blocks(size), "an extended header")
                    continue
                budget.ext_bytes += _blocks(size)
                if budget.ext_bytes > limits.max_ext_bytes:
                    raise inp.refuse(
                        f"extended headers over {_human(limits.max_ext_bytes)} (max_ext_bytes)"
                    )
                body = inp.read_exact(_blocks(size))[:size]
                if kind == b"g":
                    continue  # global headers would silently rename later members
                if kind == b"L":
                    long_name = _nts(body)
                elif kind == b"K":
                    long_link = _nts(body)
                else:
                    records = _parse_pax(body, limits.max_pax_records)
                    if records is None:
                        reject = reject or "too many pax records"
                    else:
                        pax.update(records)
                continue
            break
        name = _nts(block[0:100])
        if magic == _POSIX_MAGIC and block[345] and kind not in (b"L", b"K", b"S"):
            name = _nts(block[345:500]) + "/" + name
        if long_name is not None:
            name = long_name
        linkname = long_link if long_link is not None else _nts(block[157:257])
        if pax.get("path"):
            name = pax["path"].decode("utf-8", "surrogateescape")
        if pax.get("linkpath"):
            linkname = pax["linkpath"].decode("utf-8", "surrogateescape")
        if pax.get("size"):
            if not pax["size"].isdigit() or len(pax["size"]) > 24:
                raise StateError("state archive unreadable: bad pax size")
            size = int(pax["size"])
        mtime: float = _num(block[136:148])
        if pax.get("mtime"):
            try:
                mtime = float(pax["mtime"][:64])
            except ValueError:
                mtime = 0
        if kind == tarfile.AREGTYPE and name.endswith("/"):
            kind = tarfile.DIRTYPE  # old tars mark directories with a trailing slash
        if kind == tarfile.DIRTYPE:
            name = name.rstrip("/")
        sparse = kind == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in pax)
        if kind == tarfile.GNUTYPE_SPARSE and block[482]:
            for _ in range(MAX_SPARSE_BLOCKS):  # old GNU sparse maps continue in blocks
                if not inp.read_exact(_BLOCK)[504]:
                    break
            else:
                raise inp.refuse("too many GNU sparse map blocks")
        data_len = 0 if kind[0:1] and kind[0] in _HEADER_ONLY else size
        if inp.end is not None and inp.pos + data_len > inp.end:
            raise StateError(
                f"state archive unreadable: {_display(name)} declares {_human(data_len)}, "
                "past the end of the file"
            )
        member = _Member(
            name, kind, _num(block[100:108]) & 0o7777, mtime, size, linkname, sparse,
            reject, data_len,
        )  # fmt: skip
        member.data = _MemberData(inp, data_len)
        yield member
        left = member.data.left
        pad = _blocks(data_len) - data_len
        if left:
            inp.skip(left, _display(name))
        inp.skip(pad, "padding")


# ---------------------------------------------------------------- writing


class _Sink(Protocol):
    """Where kept members go; a method returns a reason string when it refuses one."""

    def add_dir(self, name: str, mode: int, mtime: int) -> str | None: ...

    def add_file(
        self, name: str, mode: int, mtime: int, size: int, data: IO[bytes] | _MemberData
    ) -> str | None: ...

    def copy_file(self, name: str, mode: int, mtime: int, size: int, of: str) -> str | None:
        """A second regular file ``name`` with the content of the kept file ``of``."""
        ...


#: Reads ``n`` bytes at ``offset`` of what a :class:`_TarSink` wrote (hard-link copies).
Reread = Callable[[int, int], bytes]


def _rereader(dst: IO[bytes]) -> Reread | None:
    """Read-back of a readable, seekable ``dst`` (BytesIO, a ``w+b`` temp file)."""
    try:
        if not (dst.readable() and dst.seekable()):
            return None
        base = dst.tell()
    except (AttributeError, OSError, ValueError):
        return None

    def reread(offset: int, n: int) -> bytes:
        pos = dst.tell()
        try:
            dst.seek(base + offset)
            return dst.read(n)
        finally:
            dst.seek(pos)

    return reread


class _TarSink:
    """Writes rebuilt headers (never copied ones) to an output tar stream.

    Written directly (no buffering of ours), so the offset of every kept file's data is
    known and a hard link's second name can be copied from what was already written.
    After :meth:`abort` nothing more reaches ``dst``.
    """

    def __init__(self, dst: IO[bytes], uid: int, gid: int, reread: Reread | None = None) -> None:
        self._dst: IO[bytes] | None = dst
        self._pos = 0
        self._uid, self._gid = uid, gid
        self._reread = reread if reread is not None else _rereader(dst)
        self._data_at: dict[str, tuple[int, int]] = {}  # kept file -> (offset, size)

    def _write(self, data: bytes) -> None:
        if self._dst is not None:
            self._dst.write(data)
        self._pos += len(data)

    def _header(self, name: str, kind: bytes, mode: int, mtime: int, size: int) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.size = kind, mode, mtime, size
        info.uid, info.gid, info.uname, info.gname = self._uid, self._gid, "", ""
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add_dir(self, name: str, mode: int, mtime: int) -> None:
        self._header(name, tarfile.DIRTYPE, mode, mtime, 0)

    def add_file(
        self, name: str, mode: int, mtime: int, size: int, data: IO[bytes] | _MemberData
    ) -> None:
        self._header(name, tarfile.REGTYPE, mode, mtime, size)
        self._data_at[name] = (self._pos, size)
        left = size
        while left:
            block = data.read(min(left, _COPY_CHUNK))
            if not block:
                raise StateError("state archive unreadable: unexpected end of data")
            self._write(block)
            left -= len(block)
        self._write(bytes(_blocks(size) - size))

    def copy_file(self, name: str, mode: int, mtime: int, size: int, of: str) -> str | None:
        if self._reread is None or of not in self._data_at:
            return "hard link target cannot be re-read"
        if self._dst is not None:
            self._dst.flush()
        offset, _ = self._data_at[of]
        self._header(name, tarfile.REGTYPE, mode, mtime, size)
        self._data_at[name] = (self._pos, size)
        done = 0
        while done < size:
            block = self._reread(offset + done, min(size - done, _COPY_CHUNK))
            if not block:
                raise StateError("state output changed under us while copying a hard link")
            self._write(block)
            done += len(block)
        self._write(bytes(_blocks(size) - size))
        return None

    def close(self) -> None:
        self._write(bytes(2 * _BLOCK))
        self._write(bytes(-self._pos % _RECORD))

    def abort(self) -> None:
        """Stop writing: the output is incomplete and must be discarded by the caller."""
        self._dst = None


def _copy(src: IO[bytes] | _MemberData, dst: IO[bytes], n: int) -> None:
    while n:
        block = src.read(min(n, _COPY_CHUNK))
        if not block:
            raise StateError("state archive unreadable: unexpected end of data")
        dst.write(block)
        n -= len(block)


# ---------------------------------------------------------------- filtering


@dataclass
class _Link:
    raw: str
    name: str
    mode: int
    mtime: int


class _Cleaner:
    """The member checks shared by clean_tar and StateStore.save_from.

    One instance spans all sources of a snapshot, so duplicates, caps, the read budget
    and hard links are judged on the merged result. Call :meth:`finish` after the last
    source: links still waiting for their target are dropped there.
    """

    def __init__(self, sink: _Sink, limits: Limits, allowed_dirs: Sequence[str] | None) -> None:
        if allowed_dirs is not None:
            for d in allowed_dirs:
                if not d or "/" in d or d in (".", "..") or _bad_chars(d):
                    raise ValueError(f"allowed dir {d!r} must be one plain path component")
        self._allowed = None if allowed_dirs is None else frozenset(allowed_dirs)
        self._sink, self._limits = sink, limits
        self._budget = _Budget(limits)
        self._kinds: dict[str, bool] = {}  # kept name -> is a directory
        self._files: dict[str, int] = {}  # kept regular file -> size
        self._pending: dict[str, list[_Link]] = {}  # link target not seen yet -> links
        self._n_pending = 0
        self._synthesised: set[str] = set()  # parents emitted before their own member
        self._capped: str | None = None
        self.report = FilterReport()

    def feed(self, src: IO[bytes] | Iterable[bytes]) -> None:
        """Filter one source tar into the sink; a refused stream is closed unread."""
        inp = _Input(src, self._budget)
        try:
            for member in _members(inp):
                self._member(member)
        except StateError:
            inp.close_stream()
            raise
        except (OSError, EOFError, ValueError) as exc:
            inp.close_stream()
            raise StateError(f"state archive unreadable: {exc}") from exc
        finally:
            self.report.bytes_read = self._budget.read

    def finish(self) -> None:
        for links in self._pending.values():
            for link in links:
                self.report._drop(link.raw, "hard link target not kept")
        self._pending.clear()

    def _member(self, m: _Member) -> None:
        report = self.report
        reason = m.reject or self._check(m)
        if reason:
            report._drop(m.name, reason)
            return
        name = posixpath.normpath(m.name)
        mtime = _mtime(m.mtime)
        if m.type == tarfile.LNKTYPE:
            self._link(m, name, mtime)
            return
        is_dir = m.type == tarfile.DIRTYPE
        if is_dir and name in self._synthesised:
            # Its parent-first stand-in is already out; the stream cannot be rewound to
            # fix that header's mode, and the stand-in's 0o755 is a safe one.
            self._synthesised.discard(name)
            return
        size = 0 if is_dir else m.size
        if not self._admit(m.name, name, is_dir, size, mtime):
            return
        if is_dir:
            reason = self._sink.add_dir(name, m.mode & MODE_MASK, mtime)
        else:
            assert m.data is not None
            reason = self._sink.add_file(name, m.mode & MODE_MASK, mtime, size, m.data)
        if reason:
            report._drop(m.name, reason)
            return
        self._keep(name, is_dir, size)

    def _admit(self, raw: str, name: str, is_dir: bool, size: int, mtime: int) -> bool:
        """Placement checks and caps; emits missing parents. False: dropped (reported)."""
        report = self.report
        parts = name.split("/")
        if self._allowed is not None and len(parts) == 1 and not is_dir:
            report._drop(raw, "not a directory")
            return False
        if name in self._kinds:
            was_dir = self._kinds[name]
            dup = "duplicate" if was_dir == is_dir else None
            report._drop(raw, dup or f"conflicts with {'directory' if was_dir else 'file'}")
            return False
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(self._kinds.get(a) is False for a in ancestors):
            report._drop(raw, "parent is a file")
            return False
        missing = [a for a in ancestors if a not in self._kinds]
        if self._capped is None and len(report.kept) + len(missing) >= self._limits.max_members:
            self._capped = "member cap"
        if self._capped:
            report._drop(raw, self._capped)
            return False
        # Only the member that does not fit is dropped: one runaway file must not cost
        # the agent every legitimate file that happens to come after it. Its data is
        # passed over by seek, or on a stream within the read budget (else refused).
        if report.total_bytes + size > self._limits.max_total_bytes:
            report._drop(raw, "size cap")
            return False
        for parent in missing:  # parents are emitted before their children
            if reason := self._sink.add_dir(parent, 0o755, mtime):
                report._drop(raw, reason)
                return False
            self._keep(parent, True, 0)
            self._synthesised.add(parent)
        return True

    def _link(self, m: _Member, name: str, mtime: int) -> None:
        """A hard link: a copy of its (kept) target, now or once the target arrives."""
        if why := self._path_reason(m.linkname):
            self.report._drop(m.name, f"hard link target: {why}")
            return
        target = posixpath.normpath(m.linkname)
        link = _Link(m.name, name, m.mode & MODE_MASK, mtime)
        if target in self._files:
            self._copy_link(link, target)
        elif self._kinds.get(target):
            self.report._drop(m.name, "hard link to a directory")
        elif self._n_pending >= self._limits.max_members:
            self.report._drop(m.name, "member cap")
        else:  # its target may still come (archive order is the writer's choice)
            self._pending.setdefault(target, []).append(link)
            self._n_pending += 1

    def _copy_link(self, link: _Link, target: str) -> None:
        work = [(link, target)]
        while work:
            link, target = work.pop()
            size = self._files[target]
            if not self._admit(link.raw, link.name, False, size, link.mtime):
                continue
            if reason := self._sink.copy_file(link.name, link.mode, link.mtime, size, target):
                self.report._drop(link.raw, reason)
                continue
            self._keep(link.name, False, size)
            work += [(w, link.name) for w in self._waiting(link.name)]

    def _waiting(self, name: str) -> list[_Link]:
        links = self._pending.pop(name, [])
        self._n_pending -= len(links)
        return links

    def _check(self, m: _Member) -> str | None:
        """Why this member may not be kept at all, or None."""
        if len(m.name.encode("utf-8", "surrogateescape")) > self._limits.max_name_len:
            return "name too long"
        if m.type in _TYPE_REASONS:
            return _TYPE_REASONS[m.type]
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE):
            return f"unsupported type {m.type!r}"
        if m.sparse:
            return "sparse file"
        return self._path_reason(m.name)

    def _path_reason(self, raw: str) -> str | None:
        if len(raw.encode("utf-8", "surrogateescape")) > self._limits.max_name_len:
            return "name too long"
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
        if not is_dir:
            self._files[name] = size
            if self._pending:
                links = self._waiting(name)
                if links:
                    for link in links:
                        self._copy_link(link, name)


def _as_reader(src: IO[bytes] | Iterable[bytes]) -> IO[bytes]:
    """A file whose read(n) returns n bytes unless at EOF."""
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


def _human(n: float) -> str:
    if n < 1000:
        return f"{n:g} B"
    value, unit = float(n), "B"
    for unit in ("KB", "MB", "GB", "TB", "PB", "EB"):  # noqa: B007 - the last one is used
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
    extras such as xattrs); a hard link becomes a second regular file (that needs a
    readable, seekable ``dst``). Rejected members are listed in the report, not raised.
    Raises :class:`StateError` when ``src`` is not a plain tar or ends early, and
    :class:`ArchiveRefused` past a limit; ``dst`` then holds a partial archive the
    caller must discard.
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
    reread: Reread | None = None,
) -> FilterReport:
    """Clean several source tars into one: caps and duplicates are judged on the whole."""
    sink = _TarSink(dst, uid, gid, reread)
    it = iter(sources)
    try:
        cleaner = _Cleaner(sink, limits, allowed_dirs)
        for src in it:
            cleaner.feed(src)
        cleaner.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        close = getattr(it, "close", None)
        if close is not None:  # a generator of engine streams closes the open one now
            close()
    sink.close()
    return cleaner.report


# ---------------------------------------------------------------- the engine side


def open_engine_archive(box: Box, path: str) -> Any:
    """``path`` of ``box`` as a tar stream through its backend (None when it is absent)."""
    return box.get_archive(path)


def snapshot_container(
    container: Box,
    home: str,
    store: StateStore,
    scope: str,
    *,
    limits: Limits = DEFAULT_LIMITS,
    uid: int = 1000,
    gid: int = 1000,
) -> FilterReport:
    """Snapshot ``home``'s allowed dirs of ``container`` (a backend's box) into ``store``
    under ``scope``.

    One archive at a time: the engine holds the container's lock while an archive
    stream is open, so the next one is asked for only once the previous is closed.
    A watchdog aborts the open stream at ``limits.max_seconds``; a refusal (size, read
    budget, time) raises :class:`ArchiveRefused` and the stored state stays as it was.
    """
    opener = open_engine_archive  # looked up per call: tests swap it
    open_now: list[Any] = []
    expired = threading.Event()

    def on_deadline() -> None:
        expired.set()
        for archive in list(open_now):
            abort = getattr(archive, "abort", None) or getattr(archive, "close", None)
            if abort is not None:
                with contextlib.suppress(Exception):
                    abort()

    timer = threading.Timer(limits.max_seconds, on_deadline)
    timer.daemon = True
    started = False

    def sources() -> Iterator[Any]:
        nonlocal started
        for name in ALLOWED_DIRS:
            if expired.is_set():
                raise ArchiveRefused(
                    f"took longer than {limits.max_seconds:g} s (max_seconds)", closed_unread=True
                )
            archive = opener(container, f"{home}/{name}")
            if archive is None:
                continue
            open_now.append(archive)
            if not started:
                timer.start()
                started = True
            try:
                yield archive
            finally:
                open_now.remove(archive)
                close = getattr(archive, "close", None)
                if close is not None:
                    close()

    try:
        return store.save_from(scope, sources(), limits=limits, uid=uid, gid=gid)
    finally:
        timer.cancel()
        for archive in open_now:  # not reached normally: the generator closed it
            with contextlib.suppress(Exception):
                archive.close()


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
            with (
                replace_atomically(target, tmp_name=tmp_name) as out,
                _reread_fd(target.with_name(tmp_name), out) as reread,
            ):
                return _clean_sources(
                    sources, out, limits=limits, uid=uid, gid=gid,
                    allowed_dirs=ALLOWED_DIRS, reread=reread,
                )  # fmt: skip

    def list(self) -> list[StateInfo]:
        """Every stored snapshot, sorted by scope."""
        infos = []
        for path in sorted(self.root.glob("*.tar")) if self.root.is_dir() else []:
            try:
                st = os.lstat(path)
                scope = Path(f"{path}.scope").read_text(encoding="utf-8")
                members = _count_members(path)
            except (OSError, StateError):
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


@contextlib.contextmanager
def _reread_fd(path: Path, out: IO[bytes]) -> Iterator[Reread]:
    """Read-back of the write-only temp file ``out`` (same inode, opened O_NOFOLLOW)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mine, theirs = os.fstat(fd), os.fstat(out.fileno())
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            raise StateError("state temp file was replaced while saving")

        def reread(offset: int, n: int) -> bytes:
            out.flush()
            return os.pread(fd, n, offset)

        yield reread
    finally:
        os.close(fd)


def _count_members(path: Path) -> int:
    """Members of a stored tar, parsed as restore would (a crafted file raises fast)."""
    with open(path, "rb") as fh:
        inp = _Input(fh, _Budget(DEFAULT_LIMITS))
        return sum(1 for _ in _members(inp))


def default_state_dir(rootdir_cache: Path) -> Path:
    """Where the plugin keeps snapshots: ``<pytest cache dir>/agentbox/state``."""
    return Path(rootdir_cache) / "agentbox" / "state"
