"""The sandbox holds: each property proven against a real container on a real engine."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import as_root, built_image, inspect_box, ours

from pytest_agentbox.errors import HardeningError, SetupCommandFailed
from pytest_agentbox.policy.manifest import KeyRoute
from pytest_agentbox.sandbox import FORWARDED_ENV, HARDENING_CAPS


def test_user_code_runs_unprivileged_without_capabilities(sandbox: Any) -> None:
    r = sandbox.run("id -u; grep -E '^(NoNewPrivs|CapEff|CapPrm|CapAmb)' /proc/self/status")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] != "0"
    status = dict(line.split(":\t") for line in lines[1:] if line)
    assert status == {
        "NoNewPrivs": "1",
        "CapEff": "0000000000000000",
        "CapPrm": "0000000000000000",
        "CapAmb": "0000000000000000",
    }


def test_sudo_and_su_are_gone_and_fail(sandbox: Any) -> None:
    # The base image ships sudo on purpose: its absence here is the hardening's work.
    r = sandbox.run("command -v sudo su; sudo -n true; echo sudo=$?; su -c true; echo su=$?")
    assert "/sudo" not in r.stdout and "/su\n" not in r.stdout
    assert "sudo=127" in r.stdout and "su=127" in r.stdout


def test_no_setuid_or_setgid_file_left(sandbox: Any) -> None:
    r = sandbox.run("find / -xdev -perm /6000 -type f 2>/dev/null; true")
    assert r.stdout.strip() == ""
    # And root agrees: nothing it can see either (the user may not read every dir).
    out = as_root(sandbox, ["find", "/", "-xdev", "-perm", "/6000", "-type", "f"])
    assert out.stdout.strip() == b""


def test_processes_of_other_users_are_invisible(sandbox: Any) -> None:
    r = sandbox.run("ps -eo user= | sort -u; test -e /proc/1 && echo pid1-visible; true")
    assert r.stdout.split() == [sandbox.user["name"]]
    # The kernel reports hidepid=2 as "invisible".
    mounts = sandbox.read_file("/proc/mounts").decode()
    proc_line = next(line for line in mounts.splitlines() if line.split()[1] == "/proc")
    assert "hidepid=invisible" in proc_line or "hidepid=2" in proc_line


def test_root_home_unreadable_and_no_docker_socket(sandbox: Any) -> None:
    r = sandbox.run("ls /root")
    assert r.exit_code != 0 and "Permission denied" in r.stderr
    r = sandbox.run("ls -la /var/run/docker.sock /run/docker.sock /docker.sock")
    assert r.exit_code != 0
    assert "No such file" in r.stderr


def test_only_the_ten_allowlisted_host_variables_reach_the_sandbox(
    monkeypatch: pytest.MonkeyPatch, sandbox_factory: Any
) -> None:
    secret = secrets.token_hex(16)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    values = {name: f"v{secrets.token_hex(4)}" for name in FORWARDED_ENV}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    sb = sandbox_factory()
    r = sb.run("env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'")
    assert secret not in r.stdout
    assert "LD_PRELOAD" not in r.stdout
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert {k: env.get(k) for k in FORWARDED_ENV} == values
    assert len(FORWARDED_ENV) == 10
    # The container's own config holds nothing else from the host either.
    cfg_env = inspect_box(sb.container_id)["Config"]["Env"]
    assert not any(secret in e for e in cfg_env)


def _route() -> KeyRoute:
    return KeyRoute(
        provider="openai",
        env_var="OPENAI_API_KEY",
        base_url_env="OPENAI_BASE_URL",
        domain="api.openai.com",
        auth_style="bearer",
        base_path="/v1",
        required=True,
    )


def test_hidepid_impossible_with_keys_fails_closed(
    make_sandbox: Any, docker_client: Any, random_key: str
) -> None:
    run_id = secrets.token_hex(8)
    no_sys_admin = tuple(c for c in HARDENING_CAPS if c != "SYS_ADMIN")
    with pytest.raises(HardeningError, match="failed closed") as exc:
        make_sandbox(
            cap_add=no_sys_admin, key_routes=(_route(),), keys={"openai": random_key},
            run_id=run_id,
        )  # fmt: skip
    assert random_key not in str(exc.value)
    assert ours(docker_client, run_id) == []


def test_without_sys_admin_and_keys_fails_closed_on_the_read_only_root(
    make_sandbox: Any,
) -> None:
    # Without keys a /proc lacking hidepid=2 is only a warning (test_storage_sandbox.py
    # checks that rule), but the root file system must become read-only regardless:
    # otherwise the agent could write past its storage cap onto the host's disk.
    no_sys_admin = tuple(c for c in HARDENING_CAPS if c != "SYS_ADMIN")
    with pytest.raises(HardeningError, match="could not be made read-only"):
        make_sandbox(cap_add=no_sys_admin)


def test_setup_command_runs_as_user_after_hardening(sandbox_factory: Any) -> None:
    sb = sandbox_factory(
        setup_command=(
            "id -u > ~/setup-uid; ps -eo user= | sort -u > ~/setup-users; "
            "command -v sudo > ~/setup-sudo; "
            "grep ' /proc proc ' /proc/mounts | grep -c hidepid > ~/setup-hidepid"
        )
    )
    assert sb.read_file(f"{sb.home}/setup-uid").decode().strip() == str(sb.user["uid"])
    assert sb.read_file(f"{sb.home}/setup-users").split() == [sb.user["name"].encode()]
    assert sb.read_file(f"{sb.home}/setup-sudo") == b""
    assert sb.read_file(f"{sb.home}/setup-hidepid").strip() == b"1"


def test_failing_setup_command_fails_with_its_output_and_leaves_nothing(
    make_sandbox: Any, docker_client: Any
) -> None:
    run_id = secrets.token_hex(8)
    with pytest.raises(SetupCommandFailed) as exc:
        make_sandbox(setup_command="echo building; echo 'boom: no such package' >&2; exit 3",
                     run_id=run_id)  # fmt: skip
    msg = str(exc.value)
    assert "exit code 3" in msg and "boom: no such package" in msg and "building" in msg
    assert ours(docker_client, run_id) == []


def test_timed_out_command_is_killed_with_its_children(sandbox: Any) -> None:
    r = sandbox.run("sleep 60 & sleep 61; echo never", timeout=1)
    assert r.timed_out and r.exit_code == 124
    assert "never" not in r.stdout
    assert "timed out after 1s" in r.stderr
    left = sandbox.run("ps -eo args=")
    assert "sleep 6" not in left.stdout
    # Within its time a command keeps its own exit code.
    quick = sandbox.run("sleep 0.3; exit 3", timeout=30)
    assert quick.exit_code == 3 and not quick.timed_out


def test_limits_from_the_manifest_are_applied(sandbox_factory: Any) -> None:
    sb = sandbox_factory(resources={"memory": "256m", "cpus": 0.5, "pids": 64})
    host = inspect_box(sb.container_id)["HostConfig"]
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 64
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(HARDENING_CAPS)
    # The pids limit really bites: 80 background sleeps cannot all start.
    r = sb.run("for i in $(seq 80); do sleep 5 & done 2>/dev/null; wait", timeout=20)
    assert r.exit_code != 0 or "fork" in r.stderr.lower() or "resource" in r.stderr.lower()


def test_missing_user_is_created(make_sandbox: Any) -> None:
    sb = make_sandbox(user="newbie", uid=1000)
    r = sb.run("id -un; id -u; echo $HOME; pwd")
    name, uid, home, cwd = r.stdout.split()
    assert name == "newbie" and uid != "0" and home == "/home/newbie"
    assert cwd == "/home/newbie/app"


def test_temp_paths_inside_the_sandbox_are_unpredictable(make_sandbox: Any) -> None:
    a, b = make_sandbox(), make_sandbox()
    assert a.hardening["tools_dir"] != b.hardening["tools_dir"]
    suffix = a.hardening["tools_dir"].rsplit("-", 1)[1]
    assert len(suffix) == 16 and int(suffix, 16) >= 0
    r = as_root(a, ["stat", "-c", "%a %U", a.hardening["tools_dir"]])
    assert r.stdout.split() == [b"700", b"root"]
    assert a.run(f"ls {a.hardening['tools_dir']}").exit_code != 0


def test_sandbox_api_round_trips(sandbox: Any, tmp_path: Any) -> None:
    assert sandbox.run(["printf", "%s|", "a b", "$HOME"]).stdout == "a b|$HOME|"
    assert sandbox.run("echo $X", env={"X": "yes"}).stdout == "yes\n"
    assert sandbox.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    sandbox.write_file("x.txt", b"\x00bin")
    assert sandbox.read_file("x.txt") == b"\x00bin"
    with pytest.raises(PermissionError):
        sandbox.read_file("/etc/shadow")
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("/nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("up\n")
    sandbox.upload(tmp_path / "d", "uploaded")
    assert sandbox.run("cat uploaded/f.txt; stat -c %U uploaded/f.txt").stdout.split() == [
        "up",
        sandbox.user["name"],
    ]
    assert sandbox.env["HOME"] == sandbox.home
    assert len(sandbox.container_id) == 64


def test_spawn_speaks_ndjson(sandbox: Any) -> None:
    agent = (
        "import json,sys\n"
        "print(json.dumps({'type':'ready'}),flush=True)\n"
        "for line in sys.stdin:\n"
        "    m=json.loads(line)\n"
        "    print(json.dumps({'type':'echo','text':m['text'][::-1]}),flush=True)\n"
    )
    sandbox.write_file("echo.py", agent)
    with sandbox.spawn("python3 echo.py") as proc:
        assert proc.read_json(timeout=10) == {"type": "ready"}
        proc.send({"text": "abc"})
        assert proc.read_json(timeout=10) == {"type": "echo", "text": "cba"}
    assert proc.close() == 0


def test_agent_can_write_its_own_dirs_but_not_the_system(sandbox: Any) -> None:
    r = sandbox.run("touch /etc/x 2>&1; mkdir -p ~/workspace && touch ~/workspace/ok && echo ok")
    # Refused twice over: /etc is root's, and the root file system is read-only.
    assert "Read-only file system" in r.stdout and r.stdout.strip().endswith("ok")
    assert json.loads(sandbox.run("python3 -c 'import json,os;print(json.dumps(os.getuid()))'")
                      .stdout) != 0  # fmt: skip


@pytest.fixture(scope="module")
def planted_image(docker_client: Any, base_image: str) -> Iterator[str]:
    """The base image plus setuid/setgid files at odd paths and a 0700 home."""
    with built_image(
        docker_client,
        "planted",
        base_image,
        "RUN mkdir -p /opt/odd/deep && cp /bin/true /opt/odd/deep/suid-tool "
        "&& chmod 4755 /opt/odd/deep/suid-tool && cp /bin/true /var/sgid-tool "
        "&& chmod 2755 /var/sgid-tool && chmod 700 /home/agent",
    ) as tag:
        yield tag


def test_every_sandbox_of_an_image_is_stripped_also_from_the_cached_scan(
    make_sandbox: Any, planted_image: str
) -> None:
    # The first sandbox of an image scans the whole file system; later ones strip the
    # list that scan found. Both must end up with nothing setuid/setgid.
    planted = ["/opt/odd/deep/suid-tool", "/var/sgid-tool"]
    first = make_sandbox(image=planted_image)
    assert set(planted) <= set(first.hardening["found"])
    second = make_sandbox(image=planted_image)
    assert first.hardening["scanned"] and not second.hardening["scanned"]
    for sb in (first, second):
        out = as_root(sb, ["find", "/", "-xdev", "-perm", "/6000", "-type", "f"])
        assert out.stdout.strip() == b""
        modes = as_root(sb, ["stat", "-c", "%a", *planted]).stdout.split()
        assert modes == [b"755", b"755"]


@pytest.mark.parametrize("home_mode", ["755", "700"])
def test_app_dir_is_made_and_the_home_mode_is_left_as_it_was(
    make_sandbox: Any, base_image: str, planted_image: str, home_mode: str
) -> None:
    sb = make_sandbox(image=base_image if home_mode == "755" else planted_image)
    assert [s.name for s in sb.steps if s.name == "upload code"] == []  # made by root, no upload
    r = sb.run("stat -c '%a %U' ~ ~/app; pwd; touch ~/app/x && echo writable")
    assert r.stdout.split("\n")[:4] == [
        f"{home_mode} agent",
        "755 agent",
        "/home/agent/app",
        "writable",
    ]
