"""The agent's container holds no key, root never acts there after user code, and a dead
owner's keys die with it. Real containers on a real engine; the agent's moves are played
out for real (root in the agent's container is reached through the engine on purpose, as
an attacker with root there would have it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import as_root, built_image

from pytest_agentbox import paths
from pytest_agentbox.backends.docker import cleanup
from pytest_agentbox.errors import HardeningError

# The crash and inner-run tests leave dead owners' containers on purpose; runs that
# start their own pytest (and so their own clean-up) share one xdist worker with them.
pytestmark = pytest.mark.xdist_group("inner-runs")


def key_forms(key: str) -> list[str]:
    """The key as a leak would carry it: plain, base64 (of the key and its header), url, hex."""
    raw = key.encode()
    forms = {key, raw.hex(), raw.hex().upper(), quote(key, safe="")}
    for data in (raw, b"Bearer " + raw):
        forms.add(base64.b64encode(data).decode().rstrip("="))
        forms.add(base64.urlsafe_b64encode(data).decode().rstrip("="))
    return sorted(forms)


# Run as root in the agent's container: reads every file, every environment and command
# line, every readable memory region of every process, /proc/net/unix, and reports where
# any of the needles occur. It prints what it managed to read, so a scan that read
# nothing cannot pass for a clean one.
SCANNER = r"""
import json, os, sys
needles = [n.encode() for n in json.loads(sys.stdin.readline())]
found, read = [], {"files": 0, "bytes": 0, "mem_regions": 0, "pids": 0}
def look(where, data):
    read["bytes"] += len(data)
    for n in needles:
        if n in data:
            found.append([where, n.decode()])
for top in ("/",):
    for d, dirs, files in os.walk(top):
        if d in ("/proc", "/sys", "/dev"):
            dirs[:] = []
            continue
        for f in files:
            p = os.path.join(d, f)
            try:
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                with open(p, "rb") as fh:
                    look(p, fh.read(64 << 20))
                read["files"] += 1
            except OSError:
                pass
me = str(os.getpid())  # the needles themselves are in this process's memory
for pid in [p for p in os.listdir("/proc") if p.isdigit() and p != me]:
    read["pids"] += 1
    for part in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as fh:
                look(f"/proc/{pid}/{part}", fh.read())
        except OSError:
            pass
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", 0)
    except OSError:
        continue
    for line in maps:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if "r" not in line.split()[1] or hi - lo > (512 << 20):
            continue
        try:
            mem.seek(lo)
            look(f"/proc/{pid}/mem", mem.read(hi - lo))
            read["mem_regions"] += 1
        except (OSError, ValueError, OverflowError):
            pass
for name in ("/proc/net/unix", "/proc/net/tcp", "/proc/net/tcp6"):
    try:
        look(name, open(name, "rb").read())
    except OSError:
        pass
print(json.dumps({"found": found, "read": read}))
"""


@pytest.fixture
def keyed(vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any) -> Any:
    vault.add("openai", random_key)
    fake_upstream.reply("/v1/*", json_body={"ok": True})
    sb = sandbox_factory(keys=["openai"])
    sb.key = random_key
    return sb


CALL = 'curl -sS -H "Authorization: Bearer $OPENAI_API_KEY" "$OPENAI_BASE_URL/models"'


def test_root_in_the_agent_container_finds_no_key_anywhere(keyed: Any, fake_upstream: Any) -> None:
    # Traffic first, so any buffer that ever held the key would still hold it.
    assert json.loads(keyed.run(CALL).stdout) == {"ok": True}
    token = keyed.env["OPENAI_API_KEY"]
    keyed.write_file("token-copy.txt", token)  # the scan's proof that it finds what is there
    needles = [*key_forms(keyed.key), token]
    out = as_root(keyed, ["python3", "-c", SCANNER], stdin=json.dumps(needles).encode() + b"\n")
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert report["read"]["files"] > 1000 and report["read"]["mem_regions"] > 10, report["read"]
    hits = {n for _, n in report["found"]}
    assert token in hits, "the scan did not find the planted token: it proves nothing"
    assert hits == {token}, [f for f in report["found"] if f[1] != token]
    # The same sandbox's agent is still served, and the provider saw the real key.
    assert json.loads(keyed.run(CALL).stdout) == {"ok": True}
    auth = [r["headers"] for r in fake_upstream.requests()]
    assert all(f"Bearer {keyed.key}" in json.dumps(h) for h in auth) and len(auth) == 2


def test_key_domain_is_not_in_the_agents_own_allowlist(keyed: Any) -> None:
    # Straight to the provider through the egress proxy: refused (only the key proxy
    # in the sidecar may talk to it).
    r = keyed.run("curl -sS -o /dev/null -w '%{http_code}' https://api.openai.com/v1/models")
    assert r.stdout != "200"
    assert "api.openai.com" not in keyed.env.get("NO_PROXY", "")


# A helper the setup_command leaves running: it swaps the upload target for symlinks to
# root-owned places in a tight loop, for as long as the sandbox lives.
SWAPPER = r"""
import os, sys, time
home = os.path.expanduser("~")
target = os.path.join(home, "app", "drop")
aims = ["/etc", "/usr/local", "/usr/local/bin", sys.argv[1]]
end = time.time() + 120
i = 0
while time.time() < end:
    aim = aims[i % len(aims)]
    i += 1
    try:
        if os.path.islink(target):
            os.unlink(target)
        elif os.path.isdir(target):
            os.rename(target, target + ".%d" % i)
        os.symlink(aim, target)
    except OSError:
        pass
"""


def test_upload_race_never_writes_outside_the_agents_files(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    sb = sandbox_factory()
    tools = sb.hardening["tools_dir"]
    sb.write_file("swapper.py", SWAPPER)
    sb.run(f"nohup python3 swapper.py {tools} >/dev/null 2>&1 &")
    watched = ["/etc", "/usr/local", "/usr/local/bin", "/usr/local/lib", tools]
    before = as_root(sb, ["stat", "-c", "%n %u %g %a", *watched]).stdout
    tree = tmp_path / "tree"
    for rel in ("bin/evil", "etc/evil.conf", "plain.txt", "sub/dir/file"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("agentbox-race " + rel)
    for _ in range(25):
        with contextlib.suppress(Exception):  # an upload into a moving target may fail
            sb.upload(tree, "drop")
    assert as_root(sb, ["stat", "-c", "%n %u %g %a", *watched]).stdout == before
    leaked = as_root(sb, ["grep", "-rl", "agentbox-race", "/etc", "/usr", "/run", "/var"])
    assert leaked.stdout == b"", leaked.stdout
    # With the swapper gone, the same upload lands where it should.
    sb.run("pkill -f '[s]wapper.py'; sleep 0.2; rm -rf ~/app/drop")
    sb.upload(tree, "drop")
    assert sb.read_file("drop/bin/evil") == b"agentbox-race bin/evil"


PLANTED_TEST = r"""
import pytest

NAMES = ["cat", "sh", "tar", "ls", "python3", "find", "kill", "id", "stat", "ps"]
RECORDER = '''#!/bin/sh
/usr/bin/id -u > "/tmp/euid-rec/$(/usr/bin/basename "$0").$$.$(/usr/bin/id -u)"
exec /usr/bin/env -i PATH=/usr/bin:/bin "/usr/bin/$(/usr/bin/basename "$0")" "$@"
'''

@pytest.mark.agentbox_keys("openai")
def test_plants_and_fails(sandbox, vault):
    sb = sandbox
    sb.run("mkdir -m 777 /tmp/euid-rec")
    dirs = sb.run(
        "for d in $HOME $HOME/app $HOME/app/workspace /tmp /var/tmp /dev/shm "
        "$(echo $PATH | tr : ' '); do mkdir -p $d 2>/dev/null; "
        "[ -w $d ] && echo $d; done"
    ).stdout.split()
    assert "/tmp" in dirs
    for d in dirs:
        for n in NAMES:
            sb.write_file(f"{d}/{n}", RECORDER)
            sb.run(f"chmod 755 {d}/{n}")
    # The planted programs work: run as the agent, they record its euid.
    assert sb.run("PATH=/tmp:$PATH cat /etc/hostname").ok
    print("PLANTED", sorted(dirs))
    assert False, "fails on purpose: the report, snapshot and teardown must not run them"
"""


def test_planted_binaries_never_run_as_root(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    run_id = "planted-" + secrets.token_hex(4)
    pytester.makepyfile(test_planted=PLANTED_TEST)
    pytester.makefile(".yaml", agent="name: planted\nversion: 0.1.0\nkeys:\n  - provider: openai\n")
    pytester.makeini("[pytest]\nagentbox_state_dir = state\n")
    vault_dir = pytester.path / "vault.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTEST_XDIST_TESTRUNUID", run_id)
        from pytest_agentbox.vault import Vault

        Vault(vault_dir).add("openai", "sk-test-" + secrets.token_hex(20))
        result = pytester.runpytest_subprocess(
            "-p", "no:benchmark", f"--agentbox-image={base_image}",
            "--agentbox-manifest=agent.yaml", f"--agentbox-vault={vault_dir}",
            "--agentbox-keep-on-failure", "-rA",
        )  # fmt: skip
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "PLANTED" in text and "key proxy requests" in text
    (kept,) = [
        c for c in docker_client.containers.list(all=True, filters={
            "label": [f"{paths.LABEL_RUN}={run_id}", f"{paths.LABEL_ROLE}=sandbox"]})
    ]  # fmt: skip
    try:
        stream, _ = kept.get_archive("/tmp/euid-rec")
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            names = [m.name.rsplit("/", 1)[1] for m in tar if m.isreg()]
    finally:
        for c in docker_client.containers.list(
            all=True, filters={"label": f"{paths.LABEL_RUN}={run_id}"}
        ):
            c.remove(force=True, v=True)
        for v in docker_client.volumes.list(filters={"label": f"{paths.LABEL_RUN}={run_id}"}):
            v.remove(force=True)
    assert names, "no planted program ever ran: the test proves nothing"
    assert all(n.endswith(".1000") or not n.endswith(".0") for n in names), names
    assert not [n for n in names if n.endswith(".0")], names


def test_uid0_agent_user_is_refused(docker_client: Any, base_image: str, make_sandbox: Any) -> None:
    with pytest.raises(HardeningError, match=r"'root' has uid 0"):
        make_sandbox(user="root")
    with (
        built_image(
            docker_client, "uid0", base_image, "RUN echo 'boss:x:0:0::/root:/bin/sh' >> /etc/passwd"
        ) as tag,
        pytest.raises(HardeningError, match=rf"image '{tag}'.*'boss' has uid 0"),
    ):
        make_sandbox(image=tag, user="boss")


def test_setuid_file_in_an_image_volume_is_stripped_and_reported(
    docker_client: Any, base_image: str, make_sandbox: Any
) -> None:
    lines = ("RUN mkdir /vol && cp /bin/ls /vol/suid-ls && chmod 4755 /vol/suid-ls", "VOLUME /vol")
    with built_image(docker_client, "volsuid", base_image, *lines) as tag:
        sb = make_sandbox(image=tag)
        mode = sb.run("stat -c %a /vol/suid-ls").stdout.strip()
        assert mode == "755"
        assert any("/vol/suid-ls" in w for w in sb.warnings), sb.warnings


# The owner of a keyed sandbox, as a process of its own: reads its config (the key
# included) from stdin, starts an agent that calls the provider in a loop, says READY.
OWNER = r"""
import json, sys, time
from pytest_agentbox.policy.egress import compute_policy
from pytest_agentbox.policy.manifest import KeyRoute
from pytest_agentbox.sandbox import Sandbox, SandboxConfig
cfg = json.loads(sys.stdin.readline())
route = KeyRoute(provider="openai", env_var="OPENAI_API_KEY", base_url_env="OPENAI_BASE_URL",
                 domain="api.openai.com", auth_style="bearer", base_path="/v1", required=True)
policy = compute_policy(declared=[], key_domains=[route.domain], has_setup_command=False,
                        unrestricted=False)
sb = Sandbox.create(SandboxConfig(
    image=cfg["image"], key_routes=(route,), keys={"openai": cfg["key"]}, egress=policy,
    egress_network=cfg["network"], extra_ca_pem=cfg["ca"], run_id=cfg["run_id"],
    egress_pins=cfg["pins"]))
sb.run("nohup sh -c 'while :; do curl -s -m 2 -H \"Authorization: Bearer $OPENAI_API_KEY\" "
       "$OPENAI_BASE_URL/models >/dev/null; sleep 0.2; done' >/dev/null 2>&1 &")
print("READY", flush=True)
time.sleep(600)
"""


def test_sigkilled_owner_stops_its_keys_within_5_seconds(
    docker_client: Any, base_image: str, fake_upstream: Any, random_key: str, tmp_path: Path
) -> None:
    fake_upstream.reply("/v1/*", json_body={"ok": True})
    run_id = "owner-" + secrets.token_hex(4)
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTEST_XDIST_WORKER": "owner"},
    )  # fmt: skip
    stranger = docker_client.containers.run(base_image, ["sleep", "300"], detach=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({
            "image": base_image, "key": random_key, "network": fake_upstream.network_name,
            "ca": fake_upstream.ca_pem, "run_id": run_id, "pins": fake_upstream.pins,
        }) + "\n")  # fmt: skip
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 30
        while not fake_upstream.requests() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fake_upstream.requests(), "the agent never reached the provider"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(5)
        at_5s = len(fake_upstream.requests())
        time.sleep(3)
        assert len(fake_upstream.requests()) == at_5s, "the real key was still in use > 5 s on"
        flt = {"label": f"{paths.LABEL_RUN}={run_id}"}
        mine = docker_client.containers.list(all=True, filters=flt)
        # Another pytest run on this engine (an inner run of this suite, say) may have
        # removed this dead owner's leftovers already; none of them may still run.
        assert all(c.status == "exited" for c in mine), [(c.name, c.status) for c in mine]
        cleaned = cleanup.collect(docker_client)
        assert {c.name for c in mine} <= {leak.name for leak in cleaned}
        assert docker_client.containers.list(all=True, filters=flt) == []
        stranger.reload()
        assert stranger.status == "running"
    finally:
        proc.kill()
        stranger.remove(force=True)
        for c in docker_client.containers.list(
            all=True, filters={"label": f"{paths.LABEL_RUN}={run_id}"}
        ):
            c.remove(force=True, v=True)


def test_agent_sees_the_same_syscall_verdicts_as_plain_docker(
    sandbox: Any, docker_client: Any, base_image: str
) -> None:
    probe = (Path(__file__).parent / "probes" / "syscalls.py").read_text()
    sandbox.write_file("probe.py", probe)
    r = sandbox.run("python3 probe.py")
    assert r.ok, r.stderr
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    plain = docker_client.containers.run(
        base_image, ["python3", "-c", probe], user="1000", cap_drop=["ALL"],
        security_opt=["no-new-privileges"], network_mode="none", remove=True,
        labels=paths.Owner.current("probe-" + secrets.token_hex(4)).labels("probe"),
    )  # fmt: skip
    theirs = json.loads(plain.decode().strip().splitlines()[-1])
    assert ours == theirs
    # The probe sees the difference that matters: without the filter, the sandbox's
    # SYS_ADMIN would let the agent make a user namespace.
    assert len(ours) >= 10 and all(v != "ok" for k, v in ours.items() if "unshare" in k), ours


# Left running by the agent: watches for new runner processes (every user command starts
# as one) and tries to take them over before their seccomp filter is in place: ptrace
# attach, and opening their memory for writing. Records each try; as a control, also
# attaches to a process of its own, which must work.
TRACER = r"""
import ctypes, os, subprocess, time
libc = ctypes.CDLL(None, use_errno=True)
own = subprocess.Popen(["sleep", "300"])
time.sleep(0.2)
ok = libc.ptrace(16, own.pid, 0, 0)  # PTRACE_ATTACH
with open("/tmp/tracer.log", "a") as log:
    log.write(f"control {ok} {ctypes.get_errno()}\n")
seen = set()
end = time.time() + 60
while time.time() < end:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in seen:
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        kind = "runner" if b"runner_main" in cmd else "child" if b"agentbox-marker" in cmd else ""
        if not kind:
            continue
        seen.add(pid)
        if kind == "child":  # seen is enough: attaching would stop the test's command
            with open("/tmp/tracer.log", "a") as log:
                log.write(f"child {pid}\n")
            continue
        r = libc.ptrace(16, int(pid), 0, 0)
        err = ctypes.get_errno()
        if r == 0:
            libc.ptrace(17, int(pid), 0, 0)  # PTRACE_DETACH: report, do not hang the test
            os.kill(int(pid), 18)  # SIGCONT: attaching stopped it
        try:
            open(f"/proc/{pid}/mem", "r+b").close()
            mem = "open"
        except OSError as exc:
            mem = type(exc).__name__
        with open("/tmp/tracer.log", "a") as log:
            log.write(f"runner {pid} {r} {err} {mem}\n")
"""


def test_a_leftover_process_cannot_take_over_a_starting_runner(sandbox: Any) -> None:
    sandbox.write_file("tracer.py", TRACER)
    sandbox.run("nohup python3 tracer.py >/dev/null 2>&1 &")
    for _ in range(10):
        sandbox.run("sleep 0.3; : agentbox-marker")
    log = sandbox.read_file("/tmp/tracer.log").decode().splitlines()
    assert log[0].split()[:2] == ["control", "0"], log  # ptrace works in this container
    # It sees the commands (dumpable, and already behind the filter) while their runners
    # are alive, so it was watching; the runners themselves stay out of its reach: not
    # dumpable from their first instruction, hence invisible under hidepid=2.
    assert len([x for x in log if x.startswith("child")]) >= 5, log
    tries = [line.split() for line in log if line.startswith("runner")]
    for _, _pid, result, errno, mem in tries:
        assert result == "-1" and errno in ("1", "3"), tries  # EPERM (or ESRCH: gone)
        assert mem in ("PermissionError", "FileNotFoundError", "ProcessLookupError"), tries
