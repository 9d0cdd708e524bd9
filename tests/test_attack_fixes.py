"""The attacker's findings against the storage cap, the runner's deadlines and the
options (probes p1-p16), each fixed and proven: real containers on the real engine for
every security property, pure logic where there is nothing to run."""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any

import pytest
from conftest import built_image, ours

from pytest_agentbox import sandbox
from pytest_agentbox.errors import AgentboxError, HardeningError, ManifestError
from pytest_agentbox.inside import hardening
from pytest_agentbox.plugin import options
from pytest_agentbox.plugin.options import OptionError, parse_value
from pytest_agentbox.plugin.session import report_sections
from pytest_agentbox.policy.manifest import Resources, manifest_from_dict
from pytest_agentbox.sandbox import (
    HISTORY_BYTES,
    HISTORY_LENGTH,
    RUNNER_GRACE,
    TEARDOWN_BUDGET,
    Sandbox,
    SandboxConfig,
)

MIB = 1024 * 1024


def host_free(docker_client: Any) -> int:
    st = os.statvfs(docker_client.info()["DockerRootDir"])
    return st.f_bavail * st.f_frsize


def in_thread(fn: Any, limit: float) -> tuple[Any, float]:
    """``fn()`` in a thread; fails (instead of hanging the run) when it takes past ``limit``."""
    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test's own thread
            box["error"] = exc

    start = time.monotonic()
    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(limit)
    took = time.monotonic() - start
    assert not th.is_alive(), f"still waiting after {limit:.0f}s"
    if "error" in box:
        raise box["error"]
    return box.get("value"), took


# --- 1. image VOLUMEs are read-only: nothing reaches the host's disk past the cap -----


def test_an_image_volume_is_read_only_and_the_host_disk_untouched(
    make_sandbox: Any, docker_client: Any, base_image: str
) -> None:
    with built_image(
        docker_client, "vol", base_image,
        "RUN mkdir -m 1777 /data && echo from-image > /data/seed", "VOLUME /data",
    ) as tag:  # fmt: skip
        sb = make_sandbox(image=tag, resources=Resources(disk="16m"))
        before = host_free(docker_client)
        r = sb.run(
            "cat /data/seed; dd if=/dev/zero of=/data/big bs=1M count=100 2>&1 | tail -1; "
            "grep ' /data ' /proc/mounts"
        )
        after = host_free(docker_client)
        lines = r.stdout.splitlines()
        assert lines[0] == "from-image", r  # what the image put there stays readable
        assert "Read-only file system" in lines[1], r
        assert " ro," in lines[2] and "nosuid" in lines[2] and "nodev" in lines[2], r
        assert before - after <= 16 * MIB, (before - after) / MIB
        assert sb.run("dd if=/dev/zero of=$HOME/f bs=1M count=4 2>/dev/null").ok  # home works


def test_a_volume_left_writable_fails_closed() -> None:
    base = {"user": {"name": "agent", "uid": 1000, "home": "/home/agent"},
            "runner_python": "p", "hidepid": True, "subreaper": True}  # fmt: skip
    storage = {"home": "/home/agent", "root_readonly": True, "volumes_writable": {}}
    assert hardening.check({**base, "storage": storage}, keys_in_use=False) == []
    bad = {**storage, "volumes_writable": {"/data": "permission denied"}}
    with pytest.raises(HardeningError, match=r"VOLUME directories could not be made read-only"):
        hardening.check({**base, "storage": bad}, keys_in_use=False)


# --- 2. a runner the agent stopped: the host's deadline, never a hang -------------------


def test_a_stopped_runner_gives_a_timed_out_result_chatty_or_silent(make_sandbox: Any) -> None:
    sb = make_sandbox()
    commands = {
        "chatter": "kill -STOP $PPID; while :; do echo x; sleep 1; done",
        "silent": "kill -STOP $PPID; sleep 1000",
    }
    results: dict[str, Any] = {}

    def both() -> None:
        threads = [
            threading.Thread(target=lambda k=k, c=c: results.__setitem__(k, sb.run(c, timeout=3)))
            for k, c in commands.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    in_thread(both, 3 + RUNNER_GRACE + 30)
    for name in commands:
        r = results[name]
        assert r.timed_out and r.exit_code == 124, (name, r)
        assert "runner stopped answering" in r.stderr and "kill -STOP" in r.stderr, r.stderr
        assert r.duration < 3 + RUNNER_GRACE + 10, (name, r.duration)
    assert results["chatter"].stdout.startswith("x\n")  # what came before is kept
    assert sb.run("echo alive", timeout=10).stdout == "alive\n"


def test_a_freezing_agent_delays_run_and_the_report_by_seconds(make_sandbox: Any) -> None:
    sb = make_sandbox(timeout=10.0)
    # Stops every other process of the agent's user, every new runner included.
    sb.write_file(
        "/tmp/freeze.py",
        "import os,signal,time\nwhile True:\n try: os.kill(-1, signal.SIGSTOP)\n"
        " except Exception: pass\n time.sleep(0.001)\n",
    )
    assert (
        "started" in sb.run("setsid python3 /tmp/freeze.py >/dev/null 2>&1 & echo started").stdout
    )
    time.sleep(0.5)
    r, _ = in_thread(lambda: sb.run("echo hi", timeout=2), 2 + RUNNER_GRACE + 30)
    assert r.timed_out and "runner stopped answering" in r.stderr, r
    usage, took = in_thread(sb.storage_usage, TEARDOWN_BUDGET + 20)
    assert usage == {} and took < TEARDOWN_BUDGET + 10, (usage, took)
    assert sb.memory_events() == {"oom_killed": False, "oom_kills": None}
    # The whole failure report: both teardown reads together, within seconds.
    sections, took = in_thread(lambda: report_sections([sb]), TEARDOWN_BUDGET + 30)
    assert took < TEARDOWN_BUDGET + 10, took
    assert any("TIMED OUT" in text for _, text in sections)
    with pytest.raises(AgentboxError, match="runner stopped answering"):
        in_thread(lambda: sb.write_file("/tmp/x", "y"), 10 + RUNNER_GRACE + 30)
    # Removal is not held up either (no inspect waits on the stuck exec start).
    _, took = in_thread(sb.close, 60)
    assert took < 30, took


# --- 3. memory: the storage rule, the engine's own memory, OOM kills reported ----------


@pytest.mark.parametrize(
    ("memory", "disk", "ok"),
    [
        ("1g", "352m", True),
        ("1g", "353m", False),
        ("256m", "64m", True),
        ("96m", "64m", False),
        ("4g", "2g", False),
    ],
)
def test_disk_must_leave_a_quarter_of_the_memory(memory: str, disk: str, ok: bool) -> None:
    if ok:
        assert Resources(memory=memory, disk=disk).disk == disk
        return
    with pytest.raises(ManifestError) as exc:
        manifest_from_dict({"name": "a", "runtime": {"resources": {"memory": memory,
                                                                    "disk": disk}}})  # fmt: skip
    text = str(exc.value)
    assert "raise memory to at least" in text and "2 * disk + 64m <= 3/4 of memory" in text
    # What it says to raise memory to, or lower disk to, is enough.
    need = text.split("raise memory to at least ", 1)[1].split()[0]
    assert Resources(memory=need, disk=disk).disk == disk
    room = text.split("lower disk to at most ", 1)[1].split()[0]
    assert Resources(memory=memory, disk=room).disk == room


def test_the_default_disk_obeys_the_rule() -> None:
    for memory in ("128m", "256m", "512m", "1g", "4g"):
        r = Resources(memory=memory)
        assert 2 * r.disk_bytes + 64 * MIB <= r.memory_bytes * 3 // 4, memory
        Resources(memory=memory, disk=f"{r.disk_bytes // MIB}m")  # accepted explicitly too


def test_memory_above_the_engines_is_refused_and_nothing_is_left(
    make_sandbox: Any, docker_client: Any
) -> None:
    total = int(docker_client.info()["MemTotal"])
    memory = f"{total // 2**30 + 8}g"
    run_id = "f2" + secrets.token_hex(6)
    with pytest.raises(AgentboxError, match=r"more than the Docker engine's whole memory"):
        make_sandbox(resources=Resources(memory=memory, disk="1g"), run_id=run_id)
    assert ours(docker_client, run_id) == []


def test_an_oom_kill_is_in_the_report(make_sandbox: Any) -> None:
    sb = make_sandbox(resources=Resources(memory="128m"))
    assert sb.collect_logs().get("memory") is None  # nothing yet, nothing said
    grab = "python3 -c 'b = bytearray(400 * 2**20); b[::4096] = b\"x\" * len(b[::4096])'"
    assert sb.run(grab).exit_code == 137
    assert sb.memory_events()["oom_kills"] >= 1
    said = sb.collect_logs()["memory"]
    assert "killed" in said and "for memory (128m limit" in said and "resources.memory" in said


# --- 4. an image home larger than the cap: what to raise, not a raw engine error --------


def test_an_image_home_larger_than_the_cap_says_raise_disk(
    make_sandbox: Any, docker_client: Any, base_image: str
) -> None:
    with built_image(
        docker_client, "bighome", base_image,
        "RUN mkdir -p /home/agent && head -c 12000000 /dev/urandom > /home/agent/big "
        "&& chown -R 1000:1000 /home/agent",
    ) as tag:  # fmt: skip
        run_id = "f2" + secrets.token_hex(6)
        with pytest.raises(AgentboxError) as exc:
            make_sandbox(image=tag, resources=Resources(disk="8m"), run_id=run_id)
        assert type(exc.value) is AgentboxError, repr(exc.value)
        assert "8m disk cap" in str(exc.value) and "Raise resources.disk" in str(exc.value)
        assert "500" not in str(exc.value)
        assert ours(docker_client, run_id) == []
        sb = make_sandbox(image=tag, resources=Resources(disk="32m"))
        assert sb.run("stat -c %s ~/big").stdout.strip() == "12000000"


# --- 5. a history cut never leaves part of a key behind --------------------------------


@pytest.mark.parametrize("where", [1, 8, 20])
def test_a_key_across_the_history_cut_is_never_partly_in_the_report(
    make_sandbox: Any, random_key: str, where: int
) -> None:
    sb = make_sandbox(keys={"decoy": random_key})
    limit = HISTORY_BYTES // (2 * HISTORY_LENGTH)
    # The cut falls ``where`` characters into the key.
    after = limit - (len(random_key) - where)
    sb.write_file("/tmp/out", "a" * 5000 + random_key + "b" * after)
    r = sb.run("cat /tmp/out")
    assert random_key in r.stdout  # run() itself returns everything
    text = "\n".join(t for _, t in report_sections([sb]))
    kept = sb.history[-1]
    assert kept.stdout_dropped > 0 and "earlier bytes of stdout not kept" in text
    for n in range(8, len(random_key) + 1):  # no piece the redactor could have missed
        assert random_key[-n:] not in text, n
        assert random_key[:n] not in text, n


# --- 6. the image's loader variables never reach a root step ------------------------------


def test_an_image_ld_preload_does_not_break_the_root_steps(
    make_sandbox: Any, docker_client: Any, base_image: str
) -> None:
    with built_image(docker_client, "preload", base_image, "ENV LD_PRELOAD=/missing.so") as tag:
        sb = make_sandbox(image=tag)
        assert "LD_PRELOAD" not in sb.hardening["env_names"]
        r = sb.run("echo $LD_PRELOAD")  # still the command's, as the image says
        assert r.stdout.strip() == "/missing.so", r


def test_a_loader_variable_that_reached_a_root_step_is_named() -> None:
    result = {"user": {"name": "agent", "uid": 1000, "home": "/home/agent"},
              "runner_python": "", "subreaper": True,
              "env_names": ["HOME", "LD_PRELOAD", "PATH"]}  # fmt: skip
    with pytest.raises(HardeningError, match=r"loader variables \(LD_PRELOAD\) reached the root"):
        hardening.check(result, keys_in_use=False, image="x")


# --- 7. edge values: bounded timeouts, whole-string names, cap_add -------------------------


@pytest.mark.parametrize("raw", ["1e12", "604801", 1e308, "inf"])
def test_a_huge_timeout_option_is_refused(raw: Any) -> None:
    with pytest.raises(OptionError, match=r"at most 604800 \(7 days\)"):
        parse_value(options.option("timeout"), raw, "AGENTBOX_TIMEOUT")
    assert parse_value(options.option("timeout"), "604800", "x") == 604800.0


def test_a_huge_timeout_is_refused_by_the_config_and_by_run() -> None:
    for bad in (1e12, 0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="7 days"):
            SandboxConfig(timeout=bad)
    with pytest.raises(ValueError, match="7 days"):
        SandboxConfig(setup_timeout=1e12)


def test_run_refuses_a_huge_timeout(make_sandbox: Any) -> None:
    sb = make_sandbox()
    for bad in (1e308, 1e12, 0):
        with pytest.raises(ValueError, match="7 days"):
            sb.run("echo ok", timeout=bad)
    assert sb.run("echo ok", timeout=1e-3 + 5).ok


@pytest.mark.parametrize("value", ["x\n", "python:3.12\n", "a\nb"])
def test_names_with_a_newline_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        options.check_image_ref(value)
    with pytest.raises(ValueError):
        options.check_runtime_name(value)
    with pytest.raises(ManifestError):
        manifest_from_dict({"name": value})


@pytest.mark.parametrize("caps", [("ALL",), ("NET_ADMIN",), ("SYS_ADMIN", "SYS_PTRACE"), "KILL"])
def test_cap_add_beyond_the_hardening_set_is_refused(
    caps: Any, docker_client: Any, backend: Any
) -> None:
    with pytest.raises(AgentboxError, match=r"only the hardening set|not a list"):
        SandboxConfig(cap_add=caps)
    # Also when set on a config after it was made: refused before any container exists.
    cfg = SandboxConfig(run_id="f2" + secrets.token_hex(6))
    cfg.cap_add = caps
    with pytest.raises(AgentboxError, match=r"only the hardening set|not a list"):
        Sandbox.create(cfg, backend)
    assert ours(docker_client, cfg.run_id) == []
    assert sandbox.check_cap_add(["cap_kill", "SYS_ADMIN"]) == ("KILL", "SYS_ADMIN")


MARKED = """
import pytest

@pytest.mark.agentbox(cap_add=["ALL"])
def test_probe(request, vault):
    from pytest_agentbox.plugin.hooks import run_state
    run_state(request.config).sandbox_config(request.node, {}, vault=vault)
"""


def test_a_markers_cap_add_is_refused_with_a_clear_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_probe=MARKED)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    out = result.stdout.str()
    assert result.ret != 0 and "cap_add ['ALL'] is refused" in out, out


# --------------------------------------------- the runtime and the egress network asked for


def test_a_runtime_the_engine_lacks_is_refused_not_replaced_by_runc(
    make_sandbox: Any, docker_client: Any
) -> None:
    # Before, runtime="runsc" on an engine without it ran the sandbox under runc silently.
    run_id = "rt-" + secrets.token_hex(4)
    with pytest.raises(AgentboxError, match="'no-such-runtime' is not registered") as err:
        make_sandbox(runtime="no-such-runtime", run_id=run_id)
    assert "runc" in str(err.value)  # it says what the engine has
    assert ours(docker_client, run_id) == []


@pytest.mark.parametrize("network", ["host", "none", "container:abc"])
@pytest.mark.parametrize("unrestricted", [True, False])
def test_the_egress_network_is_never_the_hosts_or_none(
    make_sandbox: Any, docker_client: Any, network: str, unrestricted: bool
) -> None:
    # An unrestricted agent (or the sidecar) on "host" would share the host's network
    # namespace: its interfaces and loopback listeners (a second dockerd, say).
    from pytest_agentbox.errors import EgressError
    from pytest_agentbox.policy.egress import EgressPolicy

    run_id = "net-" + secrets.token_hex(4)
    domains = () if unrestricted else ("api.example.test",)
    policy = EgressPolicy(unrestricted=unrestricted, domains=domains, key_domains=(),
                          registries=())  # fmt: skip
    with pytest.raises(EgressError, match="is not allowed: use a bridge network"):
        make_sandbox(egress=policy, egress_network=network, run_id=run_id)
    assert ours(docker_client, run_id) == []


def test_an_egress_network_of_another_driver_is_refused(
    make_sandbox: Any, docker_client: Any
) -> None:
    # The "none" network named by its id passes the name rule; its driver does not.
    from pytest_agentbox.errors import EgressError
    from pytest_agentbox.policy.egress import EgressPolicy

    run_id = "net-" + secrets.token_hex(4)
    null_id = docker_client.networks.get("none").id
    policy = EgressPolicy(unrestricted=True, domains=(), key_domains=(), registries=())
    with pytest.raises(EgressError, match="has driver 'null'"):
        make_sandbox(egress=policy, egress_network=null_id, run_id=run_id)
    assert ours(docker_client, run_id) == []
