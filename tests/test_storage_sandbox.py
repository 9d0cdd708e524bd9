"""The sandbox's writable storage is capped: real containers on the real engine.

The engine here (overlay2 on ext4) has no per-container quota, so the home and /tmp are
size-capped tmpfs volumes and the root file system is read-only for everything after
hardening. These tests write past the caps and watch the host's disk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import as_root, built_image, ours, start_holding_run

from pytest_agentbox import paths
from pytest_agentbox.backends.docker import cleanup, engine
from pytest_agentbox.errors import AgentboxError, ManifestError
from pytest_agentbox.inside import hardening
from pytest_agentbox.policy.manifest import Resources, manifest_from_dict
from pytest_agentbox.state import StateStore

MIB = 1024 * 1024

# The dead-owner test plants leftovers on purpose: it shares the worker of the other
# tests that start their own runs (their own clean-ups would race it).
pytestmark = pytest.mark.xdist_group("inner-runs")


def host_free(docker_client: Any) -> int:
    """Free bytes on the file system holding the engine's containers and volumes."""
    st = os.statvfs(docker_client.info()["DockerRootDir"])
    return st.f_bavail * st.f_frsize


# ---------------------------------------------------------------- the manifest field


def test_disk_defaults_to_a_quarter_of_the_memory() -> None:
    assert Resources().disk is None and Resources().disk_bytes == 256 * MIB
    # Less where a quarter would let the full places squeeze the processes (2d+64m<=3/4).
    assert Resources(memory="128m").disk_bytes == 16 * MIB
    assert Resources(memory="16m").disk_bytes == 1 * MIB
    assert Resources(memory="4g").disk_bytes == 1024 * MIB
    assert Resources(memory="8g", disk="2G").disk_bytes == 2 * 1024 * MIB
    got = manifest_from_dict({"name": "a", "runtime": {"resources": {"disk": "64m"}}})
    assert got.runtime.resources.disk == "64m"


@pytest.mark.parametrize(
    ("resources", "words"),
    [
        ({"disk": "2g"}, ["runtime.resources", "more than memory", "raise memory"]),
        ({"memory": "64m", "disk": "65m"}, ["more than memory"]),
        ({"disk": "512k"}, ["runtime.resources.disk", "minimum of 1m"]),
        ({"disk": "lots"}, ["runtime.resources.disk", "not a size"]),
        ({"disk": 1.5}, ["runtime.resources.disk", "must be a size"]),
    ],
)
def test_disk_is_validated_with_a_clear_error(resources: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ManifestError) as exc:
        manifest_from_dict({"name": "a", "runtime": {"resources": resources}})
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))


def test_check_judges_the_storage_report() -> None:
    base = {"user": {"name": "agent", "uid": 1000, "home": "/home/agent"}, "runner_python": "p",
            "hidepid": True, "subreaper": True}  # fmt: skip
    ok = {"home": "/home/agent", "root_readonly": True}
    assert hardening.check({**base, "storage": ok}, keys_in_use=False) == []
    # Without keys a /proc lacking hidepid=2 only warns; the storage rules never bend.
    warned = hardening.check({**base, "hidepid": False, "storage": ok}, keys_in_use=False)
    assert any("hidepid=2" in w for w in warned)
    with pytest.raises(Exception, match="could not be made read-only"):
        hardening.check({**base, "storage": {**ok, "root_readonly": False}}, keys_in_use=False)
    with pytest.raises(Exception, match=r"home is '/home/agent'.*capped writable storage"):
        hardening.check({**base, "storage": {**ok, "home": "/home/x"}}, keys_in_use=False)


# ------------------------------------------------------------------- real containers


def test_writing_past_the_cap_fails_and_the_host_disk_is_untouched(
    make_sandbox: Any, docker_client: Any
) -> None:
    cap = 32 * MIB
    sb = make_sandbox(resources=Resources(disk="32m"))
    assert sb.hardening["storage"]["cap"] == "32m"
    assert sb.hardening["storage"]["quota"].startswith("none (")
    before = host_free(docker_client)
    # 512 MiB into each place, 16 times the cap: without the cap all of it lands on disk.
    r = sb.run(
        "for d in ~ /tmp; do dd if=/dev/zero of=$d/fill bs=1M count=512 2>&1 | head -1; "
        "stat -c %s $d/fill; done",
        timeout=120,
    )
    after = host_free(docker_client)
    lines = r.stdout.splitlines()
    assert [line.endswith("No space left on device") for line in lines[0::2]] == [True, True], r
    assert all(int(n) <= cap for n in lines[1::2]), r.stdout
    # The capped places are RAM; other helpers share this disk, hence the cap as slack.
    assert before - after <= cap, (before - after) / MIB
    # Nothing else takes a byte either, root's own paths included.
    r = sb.run("for p in /var/tmp /opt /usr /etc /run; do touch $p/x 2>&- || echo refused; done")
    assert r.stdout.count("refused") == 5, r.stdout
    assert "Read-only file system" in sb.run("touch /usr/x").stderr
    assert "Read-only file system" in as_root(sb, ["touch", "/etc/x"]).stderr.decode()
    # The agent can neither lift the flag nor the cap (it holds no capability).
    for cmd in ("mount -o remount,rw /", "mount -o remount,size=2g ~"):
        assert sb.run(cmd).exit_code != 0
    # The report says which cap was hit (and it is read as the user, no root step).
    full = sb.collect_logs()["storage"]
    assert f"storage: {sb.home} full (32m cap)" in full and "storage: /tmp full (32m cap)" in full
    assert sb.storage_usage()[sb.home][1] == cap


def test_what_the_home_holds_counts_against_memory(make_sandbox: Any) -> None:
    sb = make_sandbox(resources=Resources(memory="256m", disk="64m"))
    grab = "python3 -c 'b = bytearray(200 * 2**20); b[::4096] = b\"x\" * len(b[::4096])'"
    assert sb.run(grab).ok  # 200m for a process fits in 256m...
    assert sb.run("dd if=/dev/zero of=$HOME/f bs=1M count=60 2>/dev/null").ok
    assert not sb.run(grab).ok  # ...but not beside 60m of files: the kernel kills it
    assert sb.run(f"rm $HOME/f && {grab}").ok


def test_everything_but_the_capped_places_is_read_only_and_setup_still_works(
    make_sandbox: Any, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print('hi')\n")
    store, scope = StateStore(tmp_path / "store"), "storage/ro"
    sb = make_sandbox(
        code_dir=code,
        setup_command="mkdir -p ~/state && echo from-setup > ~/state/s && echo t > /tmp/t",
        state_scope=scope,
        state_store=store,
    )
    storage = sb.hardening["storage"]
    assert storage["root_readonly"] and storage["mode"] == "tmpfs volumes, read-only root"
    assert sb.run("python3 main.py").stdout == "hi\n"  # uploaded code, in the home volume
    up = tmp_path / "up"
    up.mkdir()
    (up / "f").write_text("uploaded")
    sb.upload(up, "sub")
    assert sb.read_file("sub/f") == b"uploaded"
    mounts = sb.read_file("/proc/mounts").decode().splitlines()
    root = next(m.split() for m in mounts if m.split()[1] == "/")
    assert root[3].split(",")[0] == "ro"
    for where in (sb.home, "/tmp"):
        line = next(m.split() for m in mounts if m.split()[1] == where)
        assert line[2] == "tmpfs" and {"nosuid", "nodev"} <= set(line[3].split(",")), line
    sb.close()
    # Snapshot while it ran (tmpfs is gone once it stops), restore into the next one.
    again = make_sandbox(state_scope=scope, state_store=store)
    assert again.read_file(f"{again.home}/state/s") == b"from-setup\n"
    assert again.run("ls /tmp").stdout == ""  # /tmp starts empty, as after a boot


def test_code_larger_than_the_cap_fails_with_what_to_do(make_sandbox: Any, tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(os.urandom(3 * MIB))
    with pytest.raises(AgentboxError, match=r"code directory does not fit .*\(2m cap\)"):
        make_sandbox(code_dir=tmp_path, resources=Resources(disk="2m"))


def test_the_home_is_filled_from_the_image_without_setid_bits(
    make_sandbox: Any, docker_client: Any, base_image: str
) -> None:
    with built_image(
        docker_client,
        "homeseed",
        base_image,
        "RUN mkdir -p /home/agent/.config/tool /home/agent/private "
        "&& echo cfg > /home/agent/.config/tool/rc && cp /bin/true /home/agent/suid "
        "&& chmod 4755 /home/agent/suid && ln -s /etc/hostname /home/agent/link "
        "&& echo secret > /home/agent/private/k && chmod 600 /home/agent/private/k "
        "&& chmod 700 /home/agent/private && touch /home/agent/rootfile "
        "&& chown -R agent:agent /home/agent && chown root:root /home/agent/rootfile",
    ) as tag:
        sb = make_sandbox(image=tag, resources=Resources(disk="16m"))
        r = sb.run(
            "cd ~ && stat -c '%n %a %U' .config/tool/rc suid private private/k rootfile app "
            "&& cat .config/tool/rc private/k && readlink link && df -P . | tail -1"
        )
        assert r.stdout.splitlines()[:8] == [
            ".config/tool/rc 644 agent",
            "suid 755 agent",  # the setuid bit is dropped on the way in
            "private 700 agent",
            "private/k 600 agent",
            "rootfile 644 root",
            "app 755 agent",
            "cfg",
            "secret",
        ], r.stdout + r.stderr
        assert r.stdout.splitlines()[8] == "/etc/hostname"  # a link stays a link
        assert r.stdout.splitlines()[9].split()[0] == "tmpfs"
        assert sb.hardening["storage"]["seeded_files"] == 4 + 3  # and the image's dotfiles


def test_a_kept_sandbox_keeps_the_agents_files_and_ends_its_processes(
    make_sandbox: Any, docker_client: Any
) -> None:
    sb = make_sandbox()
    token = secrets.token_hex(8)
    sb.run(f"echo {token} > ~/kept && echo {token} > /tmp/kept")
    sb.run("nohup sleep 600 >/dev/null 2>&1 &")
    sb.close(keep=True)
    try:
        time.sleep(2)  # our attach socket is closed: the old main process would be gone
        box = docker_client.containers.get(sb.container_id)
        assert box.status == "running"
        out = box.exec_run(["/bin/sh", "-c", "cat ~/kept /tmp/kept; pgrep -x sleep -u agent"],
                           user=sb.user_spec, environment={"HOME": sb.home})  # fmt: skip
        assert out.output.decode().split() == [token, token], out.output
        assert sb.warnings == []
    finally:
        box = docker_client.containers.get(sb.container_id)
        box.remove(force=True)
        for vol in sb.storage_volumes:
            vol.remove()


def test_volumes_are_gone_after_teardown(make_sandbox: Any, docker_client: Any) -> None:
    run_id = secrets.token_hex(8)
    sb = make_sandbox(run_id=run_id)
    roles = sorted(v.attrs["Labels"][paths.LABEL_ROLE] for v in docker_client.volumes.list(
        filters={"label": f"{paths.LABEL_RUN}={run_id}"}))  # fmt: skip
    assert roles == ["storage", "storage"]
    sb.close()
    assert ours(docker_client, run_id) == []


def test_volumes_of_a_killed_run_go_with_the_dead_owner_clean_up(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    run_id = secrets.token_hex(8)
    proc = start_holding_run(pytester.path, base_image, run_id)
    vols = docker_client.volumes.list(filters={"label": f"{paths.LABEL_RUN}={run_id}"})
    assert len(vols) == 4  # two sandboxes, a home and a /tmp each
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    cleanup.collect(docker_client)
    assert ours(docker_client, run_id) == []


def test_agentbox_gc_removes_a_dead_owners_storage_volume(docker_client: Any) -> None:
    owner = paths.Owner.current("dead-" + secrets.token_hex(4))
    labels = owner.labels("storage")
    gone = subprocess.Popen(["true"])
    gone.wait()
    labels[paths.LABEL_OWNER_PID] = str(gone.pid)
    vol = engine.create_tmpfs_volume(docker_client, paths.unique_name("storage"), labels, size=MIB)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest_agentbox.cli", "gc"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        # Another run's clean-up may have been quicker; either way the volume is gone.
        assert out.returncode == 0, out.stderr
        assert docker_client.volumes.list(filters={"name": vol.name}) == []
    finally:
        with contextlib.suppress(Exception):
            vol.remove(force=True)


FILLS_ITS_HOME = """
import pytest

@pytest.mark.agentbox(resources={"disk": "8m"})
def test_fills(sandbox):
    r = sandbox.run("dd if=/dev/zero of=$HOME/big bs=1M count=64")
    assert r.ok, "on purpose"
"""


def test_the_report_says_when_the_cap_was_hit(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    pytester.makepyfile(FILLS_ITS_HOME)
    result = pytester.runpytest_subprocess(
        "-p", "no:benchmark", f"--agentbox-image={base_image}", timeout=300
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*agentbox: storage*", "storage: /home/agent full (8m cap)*Raise resources.disk*"]
    )
