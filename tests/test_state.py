"""Tests of the state filter (the safe extractor restore goes through) and the atomic store.

Every archive here is crafted with tarfile in the test; no Docker is involved.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox.errors import StateError
from pytest_agentbox.state import (
    ALLOWED_DIRS,
    MAX_LISTED_DROPS,
    ArchiveRefused,
    ChunkReader,
    FilterReport,
    Limits,
    StateStore,
    clean_tar,
    default_state_dir,
)

MB = 1 << 20


@dataclass
class E:
    """One crafted archive member."""

    name: str
    kind: str = "file"
    data: bytes = b"x"
    mode: int = 0o644
    pax: dict[str, str] = field(default_factory=dict)
    link: str = "workspace/a"


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "sparse": tarfile.GNUTYPE_SPARSE,
    "other": b"Z",
}


def build_tar(entries: list[E], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _KINDS[e.kind]
            info.mode, info.uid, info.gid, info.uname, info.gname = e.mode, 0, 0, "root", "root"
            info.mtime = 1_700_000_000
            info.pax_headers = dict(e.pax)
            if e.kind in ("symlink", "hardlink"):
                info.linkname = "/etc/shadow" if e.kind == "symlink" else e.link
            if e.kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3
            has_data = e.kind in ("file", "other")
            info.size = len(e.data) if has_data else 0
            tar.addfile(info, io.BytesIO(e.data) if has_data else None)
    return buf.getvalue()


def read_tar(data: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        out = []
        for m in tar:
            fh = tar.extractfile(m) if m.isreg() else None
            out.append((m, fh.read() if fh else None))
        return out


def run_clean(data: bytes, **kwargs: object) -> tuple[FilterReport, bytes]:
    out = io.BytesIO()
    report = clean_tar(io.BytesIO(data), out, **kwargs)  # type: ignore[arg-type]
    return report, out.getvalue()


W = E("workspace", "dir", mode=0o755)
LONG = "workspace/" + "d" * 150 + "/" + "f" * 120

# (id, members, kept names in order, {displayed name: reason} that must be dropped, kwargs)
CASES = [
    (
        "absolute",
        [W, E("/workspace/x"), E("/etc/passwd")],
        ["workspace"],
        {"/workspace/x": "absolute path", "/etc/passwd": "absolute path"},
        {},
    ),
    (
        "dotdot",
        [W, E("workspace/../etc/passwd"), E("../x")],
        ["workspace"],
        {"workspace/../etc/passwd": "'..' component", "../x": "'..' component"},
        {},
    ),
    (
        "state-escape",
        [E("state", "dir"), E("state/../escape")],
        ["state"],
        {"state/../escape": "'..' component"},
        {},
    ),
    (
        "double-escape",
        [W, E("workspace/../../etc/x")],
        ["workspace"],
        {"workspace/../../etc/x": "'..' component"},
        {},
    ),
    (
        "symlink",
        [W, E("workspace/link", "symlink")],
        ["workspace"],
        {"workspace/link": "symlink"},
        {},
    ),
    (
        "hardlink",
        [W, E("workspace/a"), E("workspace/hl", "hardlink")],
        ["workspace", "workspace/a", "workspace/hl"],
        {},
        {},
    ),
    (
        "hardlink-before-target",
        [W, E("workspace/hl", "hardlink"), E("workspace/a")],
        ["workspace", "workspace/a", "workspace/hl"],
        {},
        {},
    ),
    (
        "hardlink-escapes",
        [
            W,
            E("workspace/a"),
            E("workspace/abs", "hardlink", link="/etc/shadow"),
            E("workspace/up", "hardlink", link="workspace/../../etc/shadow"),
            E("workspace/dot", "hardlink", link=".bashrc"),
            E("workspace/dir", "hardlink", link="workspace"),
            E("workspace/sym", "symlink"),
            E("workspace/tosym", "hardlink", link="workspace/sym"),
            E("workspace/never", "hardlink", link="workspace/missing"),
            E(".ssh/k", "hardlink", link="workspace/a"),
        ],
        ["workspace", "workspace/a"],
        {
            "workspace/abs": "hard link target: absolute path",
            "workspace/up": "hard link target: '..' component",
            "workspace/dot": "hard link target: outside allowed dirs",
            "workspace/dir": "hard link to a directory",
            "workspace/sym": "symlink",
            "workspace/tosym": "hard link target not kept",
            "workspace/never": "hard link target not kept",
            ".ssh/k": "outside allowed dirs",
        },
        {},
    ),
    (
        "hardlink-size-cap",
        [W, E("workspace/a", data=b"a" * 600), E("workspace/hl", "hardlink")],
        ["workspace", "workspace/a"],
        {"workspace/hl": "size cap"},
        {"limits": Limits(max_total_bytes=1000)},
    ),
    (
        "devices",
        [W, E("workspace/tty", "chr"), E("workspace/sda", "blk")],
        ["workspace"],
        {"workspace/tty": "character device", "workspace/sda": "block device"},
        {},
    ),
    ("fifo", [W, E("workspace/pipe", "fifo")], ["workspace"], {"workspace/pipe": "FIFO"}, {}),
    # An unknown type carries data; the member after it proves the data was skipped.
    (
        "unknown-type",
        [W, E("workspace/odd", "other", b"y" * 700), E("workspace/after")],
        ["workspace", "workspace/after"],
        {"workspace/odd": "unsupported type b'Z'"},
        {},
    ),
    (
        "outside",
        [
            E(".bashrc"),
            E(".ssh", "dir"),
            E(".ssh/authorized_keys"),
            E(".config/x"),
            E("workspace2/x"),
            E("Workspace/x"),
            W,
        ],
        ["workspace"],
        {
            ".bashrc": "outside allowed dirs",
            ".ssh": "outside allowed dirs",
            ".ssh/authorized_keys": "outside allowed dirs",
            ".config/x": "outside allowed dirs",
            "workspace2/x": "outside allowed dirs",
            "Workspace/x": "outside allowed dirs",
        },
        {},
    ),
    (
        "top-level-file",
        [E("workspace"), E("data", "dir")],
        ["data"],
        {"workspace": "not a directory"},
        {},
    ),
    (
        "control-char",
        [W, E("workspace/a\nb"), E("workspace/c\x00d", pax={"path": "workspace/c\x00d"})],
        ["workspace"],
        {
            "workspace/a\\nb": "control character in name",
            "workspace/c\\x00d": "control character in name",
        },
        {},
    ),
    (
        "not-utf8",
        [W, E("workspace/\udcff")],
        ["workspace"],
        {"workspace/\\udcff": "name not UTF-8"},
        {},
    ),
    (
        "duplicate",
        [W, E("workspace/a", data=b"first"), E("workspace/a", data=b"second")],
        ["workspace", "workspace/a"],
        {"workspace/a": "duplicate"},
        {},
    ),
    (
        "dir-then-file",
        [W, E("workspace/x", "dir"), E("workspace/x")],
        ["workspace", "workspace/x"],
        {"workspace/x": "conflicts with directory"},
        {},
    ),
    (
        "file-then-dir",
        [W, E("workspace/x"), E("workspace/x", "dir"), E("workspace/x/y")],
        ["workspace", "workspace/x"],
        {"workspace/x": "conflicts with file", "workspace/x/y": "parent is a file"},
        {},
    ),
    (
        "normalised",
        [E("./workspace//a/./b")],
        ["workspace", "workspace/a", "workspace/a/b"],
        {},
        {},
    ),
    (
        "parents-synthesised",
        [E("data/x/y/z"), E("data/x", "dir")],
        ["data", "data/x", "data/x/y", "data/x/y/z"],
        {},
        {},
    ),
    ("long-pax", [W, E(LONG)], ["workspace", LONG.rsplit("/", 1)[0], LONG], {}, {}),
    (
        "long-gnu",
        [W, E(LONG)],
        ["workspace", LONG.rsplit("/", 1)[0], LONG],
        {},
        {"fmt": tarfile.GNU_FORMAT},
    ),
    (
        "name-too-long",
        [W, E("workspace/" + "n" * 300)],
        ["workspace"],
        {"workspace/" + "n" * 187 + "...": "name too long"},
        {"limits": Limits(max_name_len=200)},
    ),
    (
        "oversized-pax-header",
        [W, E("workspace/big-hdr", pax={"comment": "c" * 200_000}), E("workspace/ok")],
        ["workspace", "workspace/ok"],
        {"workspace/big-hdr": "oversized extended header"},
        {},
    ),
    (
        "size-cap",
        [
            W,
            E("workspace/a", data=b"a" * 100_000),
            E("workspace/big", data=b"b" * 2 * MB),
            E("workspace/c", data=b"c" * 10),
            E("data", "dir"),
        ],
        ["workspace", "workspace/a", "workspace/c", "data"],
        {"workspace/big": "size cap"},
        {"limits": Limits(max_total_bytes=MB)},
    ),
    (
        "member-cap",
        [W] + [E(f"workspace/f{i}") for i in range(8)],
        ["workspace"] + [f"workspace/f{i}" for i in range(4)],
        {f"workspace/f{i}": "member cap" for i in range(4, 8)},
        {"limits": Limits(max_members=5)},
    ),
    (
        "member-cap-counts-parents",
        [E("data/a/b/c")],
        [],
        {"data/a/b/c": "member cap"},
        {"limits": Limits(max_members=3)},
    ),
]


@pytest.mark.parametrize(
    ("members", "kept", "drops", "kwargs"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_clean_tar_filters(
    members: list[E], kept: list[str], drops: dict[str, str], kwargs: dict[str, object]
) -> None:
    fmt = kwargs.pop("fmt", tarfile.PAX_FORMAT)
    report, out = run_clean(build_tar(members, fmt), **kwargs)  # type: ignore[arg-type]
    parsed = read_tar(out)
    names = [m.name for m, _ in parsed]
    assert names == kept == report.kept
    assert dict(report.dropped) == drops
    seen: set[str] = set()
    for m, _ in parsed:
        assert m.isreg() or m.isdir(), m.name
        assert (m.uid, m.gid, m.uname, m.gname) == (1000, 1000, "", "")
        parent = m.name.rsplit("/", 1)[0] if "/" in m.name else None
        assert parent is None or parent in seen, f"{m.name} before its parent"
        seen.add(m.name)
    assert report.total_bytes == sum(len(d) for _, d in parsed if d is not None)


def test_duplicate_keeps_first_content() -> None:
    data = build_tar([W, E("workspace/a", data=b"first"), E("workspace/a", data=b"second!")])
    _, out = run_clean(data)
    assert [d for m, d in read_tar(out) if m.name == "workspace/a"] == [b"first"]


def test_sparse_member_dropped() -> None:
    report, out = run_clean(build_tar([W, E("workspace/s", "sparse")], tarfile.GNU_FORMAT))
    assert report.dropped == [("workspace/s", "sparse file")]
    assert [m.name for m, _ in read_tar(out)] == ["workspace"]


@pytest.mark.parametrize(
    ("kind", "mode", "expected"),
    [
        ("file", 0o4755, 0o755),  # setuid
        ("file", 0o2777, 0o755),  # setgid, group/other write
        ("file", 0o600, 0o600),
        ("dir", 0o1777, 0o755),  # sticky, world-writable
        ("dir", 0o700, 0o700),
    ],
)
def test_modes_masked(kind: str, mode: int, expected: int) -> None:
    _, out = run_clean(build_tar([W, E("workspace/m", kind, mode=mode)]))
    got = {m.name: m.mode for m, _ in read_tar(out)}
    assert got["workspace/m"] == expected


def test_headers_rebuilt_not_copied() -> None:
    pax = {
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "comment": "hi",
        "uname": "root",
    }
    report, out = run_clean(build_tar([W, E("workspace/f", pax=pax)]), uid=1234, gid=5678)
    (_, _), (f, data) = read_tar(out)
    assert report.kept == ["workspace", "workspace/f"]
    assert data == b"x"
    assert not any(k.startswith("SCHILY") or k == "comment" for k in f.pax_headers)
    assert (f.uid, f.gid, f.uname, f.gname, f.mtime) == (1234, 5678, "", "", 1_700_000_000)


@pytest.mark.parametrize(
    "field_name",
    [
        "max_total_bytes", "max_members", "max_name_len", "max_seconds", "read_margin",
        "max_pax_records", "max_ext_headers", "max_ext_bytes",
    ],
)  # fmt: skip
def test_limits_must_be_positive(field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        Limits(**{field_name: 0})


def test_custom_allowed_dirs() -> None:
    data = build_tar([W, E("extra", "dir"), E("extra/f")])
    report, _ = run_clean(data, allowed_dirs=("extra",))
    assert report.kept == ["extra", "extra/f"]
    with pytest.raises(ValueError, match="one plain path component"):
        run_clean(data, allowed_dirs=("a/b",))


@pytest.mark.parametrize("chunking", ["bytes-1", "bytes-7-with-empties", "one-chunk"])
def test_chunk_sources_match_file_source(chunking: str) -> None:
    data = build_tar([W, E("workspace/a", data=os.urandom(5000)), E(LONG), E(".bashrc")])
    expected = run_clean(data)[1]
    raw = data
    if chunking == "bytes-1":
        chunks: list[bytes] = [raw[i : i + 1] for i in range(len(raw))]
    elif chunking == "bytes-7-with-empties":
        chunks = [b for i in range(0, len(raw), 7) for b in (b"", raw[i : i + 7])]
    else:
        chunks = [raw]
    out = io.BytesIO()
    clean_tar(iter(chunks), out)
    assert out.getvalue() == expected


def test_chunk_reader_reads_across_chunks() -> None:
    reader = io.BufferedReader(ChunkReader(iter([b"ab", b"", b"cde", b"f"])))
    assert reader.read(4) == b"abcd"
    assert reader.read() == b"ef"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"this is not a tar archive at all" * 40, id="garbage"),
        pytest.param(build_tar([W, E("workspace/a", data=b"z" * 5000)])[:1500], id="truncated"),
    ],
)
def test_unreadable_archive_raises_state_error(data: bytes) -> None:
    with pytest.raises(StateError, match="state archive unreadable"):
        run_clean(data)


def test_dropped_list_is_bounded_and_summary_is_one_line() -> None:
    entries = [W] + [E(f"workspace/l{i}", "symlink") for i in range(MAX_LISTED_DROPS + 5)]
    entries.append(E("workspace/evil\nname"))
    report, _ = run_clean(build_tar(entries))
    assert len(report.dropped) == MAX_LISTED_DROPS
    assert report.dropped_unlisted == 6
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith("kept 0 files, 1 dirs (0 B); dropped 1006: workspace/l0 (symlink)")
    assert summary.endswith("and 1001 more")


def test_summary_sizes() -> None:
    report, _ = run_clean(build_tar([W, E("workspace/a", data=b"a" * 3_100_000)]))
    assert report.summary() == "kept 1 files, 1 dirs (3.1 MB); dropped nothing"


def _big_tar_stream(size: int, chunk: bytes) -> Iterator[bytes]:
    """A tar with one ``size``-byte member, generated lazily from one reused chunk."""
    for name, kind, n in (
        ("workspace", tarfile.DIRTYPE, 0),
        ("workspace/big", tarfile.REGTYPE, size),
    ):
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, n
        yield info.tobuf(tarfile.PAX_FORMAT)
    for _ in range(size // len(chunk)):
        yield chunk
    yield b"\0" * (-size % 512) + b"\0" * 1024


def test_streaming_does_not_hold_member_in_memory(tmp_path: Path) -> None:
    size, chunk = 50 * MB, os.urandom(MB)
    out_path = tmp_path / "out.tar"
    with out_path.open("wb") as out:
        tracemalloc.start()
        try:
            report = clean_tar(_big_tar_stream(size, chunk), out)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert report.kept == ["workspace", "workspace/big"]
    assert report.total_bytes == size
    assert peak < 16 * MB, f"peak {peak / MB:.1f} MB while streaming 50 MB"
    with tarfile.open(out_path) as tar:
        fh = tar.extractfile("workspace/big")
        assert fh is not None
        digest = hashlib.sha256()
        while block := fh.read(MB):
            digest.update(block)
    assert digest.digest() == hashlib.sha256(chunk * 50).digest()


# ---------------------------------------------------------------- StateStore


def _src(*entries: E) -> Iterator[bytes]:
    data = build_tar(list(entries))
    return iter([data[i : i + 1000] for i in range(0, len(data), 1000)])


def _names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_path_for_is_safe_and_collision_free(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    scopes = ["agent/key", "agent_key", "agent key", "../../etc/passwd", "x" * 500, ".", "é/ü"]
    paths = [store.path_for(s) for s in scopes]
    assert len(set(paths)) == len(scopes)
    for p in paths:
        assert p.parent == tmp_path
        assert len(p.name) < 200 and not p.name.startswith(".")
    assert store.path_for("agent/key") == StateStore(tmp_path).path_for("agent/key")
    with pytest.raises(ValueError, match="non-empty"):
        store.path_for("")


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "store")
    assert store.load("m/k") is None
    report = store.save_from(
        "m/k",
        [
            _src(W, E("workspace/a", data=b"A"), E("workspace/l", "symlink")),
            _src(E("data", "dir"), E("data/b", data=b"B"), E("workspace/a", data=b"dup")),
        ],
    )
    path = store.load("m/k")
    assert path is not None
    assert _names(path) == report.kept == ["workspace", "workspace/a", "data", "data/b"]
    assert dict(report.dropped) == {"workspace/l": "symlink", "workspace/a": "duplicate"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_caps_apply_to_merged_sources(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    report = store.save_from(
        "s",
        [
            _src(W, E("workspace/a", data=b"a" * 600)),
            _src(E("data", "dir"), E("data/b", data=b"b" * 600)),
        ],
        limits=Limits(max_total_bytes=1000),
    )
    assert report.kept == ["workspace", "workspace/a", "data"]
    assert report.dropped == [("data/b", "size cap")]


def _failing_source() -> Iterator[bytes]:
    data = build_tar([W, E("workspace/new", data=b"n" * 50_000)])
    yield data[:20_000]
    raise ConnectionError("stream broke")


@pytest.mark.parametrize("failure", ["source-raises", "replace-fails"])
def test_failed_save_keeps_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    store = StateStore(tmp_path)
    store.save_from("s", [_src(W, E("workspace/old", data=b"old"))])
    path = store.load("s")
    assert path is not None
    before = path.read_bytes()
    if failure == "source-raises":
        with pytest.raises(StateError, match="stream broke"):
            store.save_from("s", [_src(E("data", "dir")), _failing_source()])
    else:

        def broken_replace(*args: object) -> None:
            raise OSError("disk gone")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError, match="disk gone"):
            store.save_from("s", [_src(W, E("workspace/new"))])
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


WORKER = textwrap.dedent(
    """
    import io, os, sys, tarfile, time
    from pathlib import Path
    from pytest_agentbox.state import StateStore

    root, scope, label, mode, sync = sys.argv[1:6]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(20):
            body = (label * 2000).encode()
            info = tarfile.TarInfo(f"workspace/{label}-{i}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()

    def chunks():
        for i in range(0, len(data), 4096):
            if mode == "crash" and i > len(data) // 2:
                os._exit(3)
            time.sleep(0.01)
            yield data[i : i + 4096]

    Path(sync, label).touch()
    while len(os.listdir(sync)) < (2 if mode == "race" else 1):
        time.sleep(0.005)
    StateStore(root).save_from(scope, [chunks()])
    """
)


def _worker(tmp_path: Path, label: str, mode: str, sync: Path) -> subprocess.Popen[bytes]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    sync.mkdir(exist_ok=True)
    args = [sys.executable, str(script), str(tmp_path / "store"), "scope", label, mode, str(sync)]
    return subprocess.Popen(args)


def test_concurrent_saves_yield_one_complete_state(tmp_path: Path) -> None:
    procs = [_worker(tmp_path, label, "race", tmp_path / "sync") for label in ("A", "B")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    path = StateStore(tmp_path / "store").load("scope")
    assert path is not None
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]
    labels = {name.split("/")[1][0] for name in members}
    assert len(labels) == 1 and len(members) == 20
    (label,) = labels
    assert all(body == (label * 2000).encode() for body in members.values())


def test_save_waits_for_scope_lock(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "store")
    with store.lock("scope"):
        proc = _worker(tmp_path, "A", "once", tmp_path / "sync")
        time.sleep(1.0)
        assert proc.poll() is None, "save finished while another process held the lock"
        assert store.load("scope") is None
    assert proc.wait(timeout=60) == 0
    assert store.load("scope") is not None


def test_hard_crash_leaves_state_and_next_save_cleans_temp(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "store")
    store.save_from("scope", [_src(W, E("workspace/old"))])
    path = store.load("scope")
    assert path is not None
    before = path.read_bytes()
    assert _worker(tmp_path, "A", "crash", tmp_path / "sync").wait(timeout=60) == 3
    temps = [p for p in store.root.iterdir() if ".tmp-" in p.name]
    assert len(temps) == 1
    assert path.read_bytes() == before
    store.save_from("scope", [_src(W, E("workspace/new"))])
    assert not temps[0].exists()
    assert _names(path) == ["workspace", "workspace/new"]


def test_list_and_clear(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "store")
    assert store.list() == [] and store.clear() == 0
    r1 = store.save_from("agent/one", [_src(W, E("workspace/a"), E("workspace/b"))])
    r2 = store.save_from("agent/two", [_src(E("data", "dir"))])
    infos = store.list()
    assert [(i.scope, i.members) for i in infos] == [
        ("agent/one", len(r1.kept)),
        ("agent/two", len(r2.kept)),
    ]
    assert all(i.size == i.path.stat().st_size and i.mtime > 0 for i in infos)
    assert store.clear("agent/one") == 1
    assert store.load("agent/one") is None and store.load("agent/two") is not None
    assert store.clear("agent/one") == 0
    assert store.clear() == 1
    assert store.list() == []
    locks = [p.name for p in store.root.iterdir()]
    assert locks and all(name.endswith(".lock") for name in locks)


def test_default_state_dir(tmp_path: Path) -> None:
    assert default_state_dir(tmp_path) == tmp_path / "agentbox" / "state"
    assert ALLOWED_DIRS == ("workspace", "data", "output", "state")


# ---------------------------------------------------------------- crafted archives
# Each refusal is proven by what was read (a counting source), never by wall time.


class Counting(io.RawIOBase):
    """A source over ``data`` counting the bytes handed out; ``seekable`` on demand."""

    def __init__(self, data: bytes, *, seekable: bool) -> None:
        super().__init__()
        self._buf, self._seekable, self.read_bytes = io.BytesIO(data), seekable, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = 0) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("seek")
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._buf.readinto(b)
        self.read_bytes += n
        return n


class Endless:
    """An engine-like stream: ``head``, then zeros without end; counts and records close."""

    def __init__(self, head: bytes, chunk: int = 1 << 20) -> None:
        self.head, self.zeros, self.pulled, self.closed = head, bytes(chunk), 0, False

    def __iter__(self) -> Iterator[bytes]:
        return self._gen()

    def _gen(self) -> Iterator[bytes]:
        try:
            self.pulled += len(self.head)
            yield self.head
            while True:
                self.pulled += len(self.zeros)
                yield self.zeros
        finally:
            self.closed = True


def _header(name: str, size: int, *, kind: bytes = tarfile.REGTYPE, **pax: str) -> bytes:
    """One header as a writer declaring ``size`` would emit it, with no data after."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.pax_headers = kind, size, dict(pax)
    return info.tobuf(tarfile.PAX_FORMAT)


def _pax_block(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


PAX_HUGE = 10**14
HUGE_TAR = _header("workspace", 0, kind=tarfile.DIRTYPE) + _header("workspace/big", PAX_HUGE)


def test_pax_size_1e14_file_is_refused_without_reading_through() -> None:
    assert len(HUGE_TAR) <= 2048  # the 1.5 KB crafted store file of the issue
    src = Counting(HUGE_TAR + b"x" * 512, seekable=True)
    with pytest.raises(StateError, match=r"declares 100\.0 TB, past the end of the file"):
        clean_tar(src, io.BytesIO())
    assert src.read_bytes <= len(HUGE_TAR) + 512


@pytest.mark.parametrize("kind", ["kept-dir", "dropped-name"])
def test_pax_size_1e14_stream_is_abandoned_at_its_header(kind: str) -> None:
    name = "workspace/big" if kind == "kept-dir" else ".bashrc"
    head = _header("workspace", 0, kind=tarfile.DIRTYPE) + _header(name, PAX_HUGE)
    stream = Endless(head)
    with pytest.raises(ArchiveRefused, match=r"declares 100\.0 TB, more than the state") as info:
        clean_tar(iter(stream), io.BytesIO())
    assert info.value.closed_unread and "the rest was not read" in str(info.value)
    assert stream.pulled <= len(head) + (1 << 20)  # at most one chunk past the header
    assert stream.closed


def test_restore_from_crafted_file_on_disk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "crafted.tar"
    path.write_bytes(HUGE_TAR)
    with path.open("rb") as fh, pytest.raises(StateError, match="past the end of the file"):
        clean_tar(fh, io.BytesIO())
        assert fh.tell() <= len(HUGE_TAR)


def _bomb(kind: str) -> bytes:
    """A compressed tar of one member declaring 64 MiB of zeros (compressed lazily)."""
    import bz2
    import lzma
    import zlib

    comp: Any = {
        "gzip": lambda: zlib.compressobj(1, zlib.DEFLATED, 31),
        "bz2": lambda: bz2.BZ2Compressor(1),
        "xz": lambda: lzma.LZMACompressor(preset=0),
    }[kind]()
    size, chunk = 64 * MB, bytes(MB)
    out = [comp.compress(_header("workspace/z", size))]
    out += [comp.compress(chunk) for _ in range(size // MB)]
    out += [comp.compress(bytes(1024)), comp.flush()]
    return b"".join(out)


@pytest.mark.parametrize("kind", ["gzip", "bz2", "xz"])
@pytest.mark.parametrize("seekable", [True, False], ids=["file", "stream"])
def test_compressed_store_files_are_refused_by_magic(kind: str, seekable: bool) -> None:
    data = _bomb(kind)
    src = Counting(data, seekable=seekable)
    with pytest.raises(StateError, match=f"{'bzip2' if kind == 'bz2' else kind}-compressed"):
        clean_tar(src, io.BytesIO())
    assert src.read_bytes <= 64 * 1024  # one header block (plus a buffered read)


def test_100k_pax_headers_before_one_member_are_refused_after_a_few() -> None:
    one = _pax_block(b"16 comment=abcd\n")
    data = one * 100_000 + _header("workspace/f", 0) + bytes(1024)
    src = Counting(data, seekable=False)
    with pytest.raises(ArchiveRefused, match="more than 8 extended headers before one member"):
        clean_tar(src, io.BytesIO())
    assert src.read_bytes <= 64 * 1024 + 10 * len(one)


def test_100k_pax_records_in_one_header_drop_that_member_only() -> None:
    # 100k records = 1.3 MB: over the per-header cap (a seek on a file, a read within the
    # budget on a stream). 5000 records fit the cap but not the record count.
    many = _pax_block(b"13 comment=x\n" * 100_000) + _header("workspace/a", 0)
    some = _pax_block(b"13 comment=x\n" * 5_000) + _header("workspace/b", 0)
    data = build_tar([W])[:512] + many + some + _header("workspace/ok", 0) + bytes(1024)
    for seekable in (True, False):
        src = Counting(data, seekable=seekable)
        report = clean_tar(src, io.BytesIO())
        assert report.kept == ["workspace", "workspace/ok"]
        assert report.dropped == [
            ("workspace/a", "oversized extended header"),
            ("workspace/b", "too many pax records"),
        ]
        assert src.read_bytes <= len(data) + 64 * 1024


def test_pathological_pax_record_is_refused_linearly() -> None:
    # What makes 3.11's tarfile regex quadratic: long runs with no '=' or a bad length.
    for records in (b"9" * 60_000 + b"\n", b"60000 " + b"a" * 59_990 + b"\n", b"5 a\n"):
        data = _pax_block(records) + _header("workspace/f", 0) + bytes(1024)
        with pytest.raises(StateError, match="malformed pax record"):
            clean_tar(io.BytesIO(data), io.BytesIO())


def test_extended_headers_are_bounded_per_snapshot() -> None:
    limits = Limits(max_ext_headers=100)
    entries = [W] + [E(f"workspace/{'n' * 120}{i}") for i in range(150)]  # pax path each
    with pytest.raises(ArchiveRefused, match="more than 100 extended headers"):
        run_clean(build_tar(entries), limits=limits)
    with pytest.raises(ArchiveRefused, match="extended headers over"):
        run_clean(build_tar(entries), limits=Limits(max_ext_bytes=20_000))
    assert len(run_clean(build_tar(entries))[0].kept) == 151


def test_huge_extended_header_on_a_stream_is_abandoned() -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, PAX_HUGE
    stream = Endless(build_tar([W])[:512] + info.tobuf(tarfile.GNU_FORMAT))
    with pytest.raises(ArchiveRefused, match=r"an extended header declares 100\.0 TB"):
        clean_tar(iter(stream), io.BytesIO())
    assert stream.pulled <= 2 * MB and stream.closed


def test_stream_reads_at_most_the_cap_plus_the_margin() -> None:
    # Each duplicate fits the cap alone, so it is read past, until the budget is spent.
    limits = Limits(max_total_bytes=100_000, read_margin=200_000)
    entries = [W, E("workspace/a", data=b"a" * 90_000)]
    entries += [E("workspace/a", data=b"d" * 90_000) for _ in range(20)]
    data = build_tar(entries)
    src = Counting(data, seekable=False)
    with pytest.raises(ArchiveRefused, match=r"would read more than 300\.0 KB"):
        clean_tar(src, io.BytesIO(), limits=limits)
    assert src.read_bytes <= limits.max_read_bytes + 64 * 1024
    # The same archive from a file is passed over by seeking: no budget is spent on it.
    report, _ = run_clean(data, limits=limits)
    assert report.kept == ["workspace", "workspace/a"]
    assert report.bytes_read < 200_000


def test_member_over_the_cap_on_a_stream_refuses_the_snapshot(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_from("s", [_src(W, E("workspace/old", data=b"old"))])
    path = store.load("s")
    assert path is not None
    before = path.read_bytes()
    stream = Endless(
        _header("workspace", 0, kind=tarfile.DIRTYPE) + _header("workspace/x", 1 << 44)
    )
    with pytest.raises(ArchiveRefused, match=r"declares 17\.6 TB"):
        store.save_from(
            "s", [_src(E("data", "dir")), iter(stream)], limits=Limits(max_total_bytes=MB)
        )
    assert stream.closed and stream.pulled <= 2 * MB
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_slow_stream_is_abandoned_at_max_seconds() -> None:
    pulled = []

    def trickle() -> Iterator[bytes]:
        yield build_tar([W])[:512] + _header("workspace/slow", 10 * MB)
        while True:
            time.sleep(0.05)
            pulled.append(1)
            yield b"z" * 512

    with pytest.raises(ArchiveRefused, match=r"took longer than 0\.3 s \(max_seconds\)"):
        clean_tar(trickle(), io.BytesIO(), limits=Limits(max_seconds=0.3))
    assert len(pulled) < 1000  # stopped long before the declared 10 MB


class _BlockingArchive(io.RawIOBase):
    """An engine stream that sends one header, then blocks until aborted."""

    def __init__(self) -> None:
        super().__init__()
        self._head = _header("workspace", 0, kind=tarfile.DIRTYPE)
        self._unblock = __import__("threading").Event()
        self.aborted = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n, self._head = len(self._head), b""
            b[:n] = _header("workspace", 0, kind=tarfile.DIRTYPE)
            return n
        self._unblock.wait(60)
        raise OSError("connection shut down")

    def abort(self) -> None:
        self.aborted = True
        self._unblock.set()


def test_snapshot_watchdog_aborts_a_blocked_engine_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_agentbox import state

    opened: list[_BlockingArchive] = []

    def opener(container: object, path: str) -> _BlockingArchive | None:
        if not path.endswith("/workspace"):
            return None
        opened.append(_BlockingArchive())
        return opened[-1]

    monkeypatch.setattr(state, "open_engine_archive", opener)
    store = StateStore(tmp_path)
    store.save_from("s", [_src(W, E("workspace/old"))])
    before = store.load("s").read_bytes()  # type: ignore[union-attr]
    with pytest.raises(ArchiveRefused, match=r"took longer than 0\.5 s"):
        state.snapshot_container(
            object(), "/home/agent", store, "s", limits=Limits(max_seconds=0.5)
        )
    assert [a.aborted for a in opened] == [True]
    assert store.load("s").read_bytes() == before  # type: ignore[union-attr]


def test_hard_links_survive_the_store_in_both_orders(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    body = os.urandom(300_000)
    report = store.save_from(
        "s",
        [
            _src(W, E("workspace/hl", "hardlink", link="workspace/a"), E("workspace/a", data=body)),
            _src(
                E("data", "dir"),
                E("data/x", data=b"X"),
                E("data/y", "hardlink", link="data/x"),
                E("data/z", "hardlink", link="data/y"),
            ),
        ],
    )
    assert report.dropped == []
    path = store.load("s")
    assert path is not None
    with tarfile.open(path) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]
        assert all(m.isreg() or m.isdir() for m in tar.getmembers())
    assert got == {"workspace/a": body, "workspace/hl": body, "data/x": b"X", "data/y": b"X",
                   "data/z": b"X"}  # fmt: skip
    assert report.total_bytes == 2 * len(body) + 3
    # The stored file restores cleanly: it holds no link members.
    out = io.BytesIO()
    with path.open("rb") as fh:
        again = clean_tar(fh, out)
    assert sorted(again.kept) == sorted(report.kept) and again.dropped == []


def test_hard_link_without_a_readable_output_is_dropped() -> None:
    class WriteOnly(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            return len(b)

    report = clean_tar(
        io.BytesIO(build_tar([W, E("workspace/a"), E("workspace/hl", "hardlink")])), WriteOnly()
    )
    assert report.dropped == [("workspace/hl", "hard link target cannot be re-read")]


def test_list_skips_crafted_store_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_from("good", [_src(W, E("workspace/a"))])
    for name, data in (("huge", HUGE_TAR), ("bz2", _bomb("bz2"))):
        (tmp_path / f"{name}.tar").write_bytes(data)
        (tmp_path / f"{name}.tar.scope").write_text(name)
    assert [i.scope for i in store.list()] == ["good"]
