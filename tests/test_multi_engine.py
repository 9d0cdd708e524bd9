"""Several Docker engines in one run: the machine's own engine and ``scripts/engine2``.

The two-engine checks need the second engine (TLS on loopback); they are skipped with
the fix when it is not running (``scripts/engine2 start``). What a test of an inner run
used is read through supported surfaces: ``run_state(config).engine_url`` and the
engine's own API (the sandbox's, its sidecar's and the fake upstream's containers are
looked up on every engine of the run).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from conftest import need_engine2, ours

from pytest_agentbox import paths
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.engine import EngineSpec, parse_engine_url
from pytest_agentbox.plugin.options import OPTIONS, OptionError, resolve
from pytest_agentbox.plugin.session import choose_engine

ROOT = Path(__file__).resolve().parent.parent
ENGINE2 = ROOT / "scripts" / "engine2"

# Its inner runs clean up dead owners' leftovers on both engines, and two tests plant
# such leftovers on purpose: with the project's other inner runs, on one xdist worker.
pytestmark = pytest.mark.xdist_group("inner-runs")


@pytest.fixture(autouse=True)
def _no_agentbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The outer run's own AGENTBOX_* settings must not leak into the inner runs.
    for opt in OPTIONS:
        monkeypatch.delenv(opt.env, raising=False)


# ---- pure rules --------------------------------------------------------------------


def test_workers_are_spread_over_the_engines_by_index_modulo_count() -> None:
    a, b, c = (EngineSpec(f"tcp://127.0.0.1:{p}") for p in (1001, 1002, 1003))
    picks = [choose_engine((a, b), f"gw{i}") for i in range(5)]
    assert picks == [a, b, a, b, a]
    assert [choose_engine((a, b, c), w) for w in ("gw4", "main", "gwx")] == [b, a, a]


@pytest.mark.parametrize(
    ("text", "url", "certs"),
    [
        ("unix:///var/run/docker.sock", "unix:///var/run/docker.sock", None),
        ("tcp://127.0.0.1:23760", "tcp://127.0.0.1:23760", None),
        ("tcp://127.0.0.1:23760/#certs=/etc/e2//tls", "tcp://127.0.0.1:23760", "/etc/e2/tls"),
        ("tcp://[::1]:2376", "tcp://[::1]:2376", None),
        ("ssh://ci@build-3:2222", "ssh://ci@build-3:2222", None),
    ],
)
def test_engine_urls_that_are_accepted(text: str, url: str, certs: str | None) -> None:
    spec = parse_engine_url(text)
    assert (spec.url, spec.cert_dir, spec.from_environment) == (url, certs, False)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("http://127.0.0.1:2375", "is not a Docker engine URL"),
        ("unix://relative.sock", "unix:///absolute/path"),
        ("tcp://127.0.0.1", "tcp://host:port"),
        ("tcp://127.0.0.1:99999", "tcp://host:port"),
        ("tcp://127.0.0.1:1#ca=/x", "certs=DIR"),
        ("tcp://127.0.0.1:1#certs=relative/dir", "absolute path"),
        ("unix:///x.sock#certs=/x", "tcp:// engines only"),
        ("ssh://a b", "ssh://[user@]host[:port]"),
    ],
)
def test_engine_urls_that_are_refused_say_what_a_url_is(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_engine_url(text)
    assert why in str(info.value)


def test_engine_option_precedence_and_list_forms() -> None:
    e1, e2, e3 = "unix:///run/a.sock", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"
    ini = {"engine": [e1]}
    env = {"AGENTBOX_ENGINES": f"{e2},\n{e3}\n"}
    assert resolve(ini=ini, env={}).get("engine") == [e1]
    s = resolve(ini=ini, env=env)
    assert (s.get("engine"), s.source("engine")) == ([e2, e3], "the environment (AGENTBOX_ENGINES)")
    s = resolve(cli={"engine": [e3, f"{e1},{e3}"]}, ini=ini, env=env)  # repeated flag
    assert (s.get("engine"), s.source("engine")) == (
        [e3, e1],
        "the command line (--agentbox-engine)",
    )
    assert resolve(env={}).get("engine") == []  # default: the environment's engine
    with pytest.raises(OptionError, match=r"engine: 'ftp://x' from the environment"):
        resolve(env={"AGENTBOX_ENGINES": "ftp://x"})


def test_a_kept_sandbox_on_another_engine_says_how_to_reach_that_engine() -> None:
    from types import SimpleNamespace

    from pytest_agentbox.plugin.session import RunState

    hint = "docker exec -it -u 1000:1000 -w /home/agent/app abc /bin/sh"
    sb: Any = SimpleNamespace(exec_hint=lambda: hint)
    remote = "tcp://127.0.0.1:1#certs=/etc/e2"
    state = RunState(resolve(cli={"engine": [remote]}, env={}))
    assert state.enter_hint(sb) == (
        f"DOCKER_HOST=tcp://127.0.0.1:1 DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH=/etc/e2 {hint}"
    )
    assert RunState(resolve(env={})).enter_hint(sb) == hint  # the environment's engine


def test_plain_tcp_to_another_machine_is_refused_before_any_connection() -> None:
    # .invalid never resolves, and nothing is looked up or sent: the refusal comes first.
    why = engine.check_engine(parse_engine_url("tcp://engine.invalid:2375"), timeout=1)
    assert why is not None and "no TLS is set for it" in why and "#certs=DIR" in why


def test_an_engine_that_does_not_answer_at_start_fails_the_run_naming_it(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    dead = "tcp://127.0.0.1:9"  # discard port: nothing listens
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--agentbox-engine={dead}", "--agentbox-engine",
        engine.environment_engine().url,
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"no Docker engine answers at {dead}" in err
    assert "Start that engine, correct its URL, or leave it out of --agentbox-engine" in err
    assert "passed" not in result.stdout.str()


# ---- two real engines --------------------------------------------------------------


def engine2_url() -> str:
    """The second engine as one URL: tcp://127.0.0.1:PORT#certs=its client TLS dir."""
    out = subprocess.run([str(ENGINE2), "env"], capture_output=True, text=True, check=True)
    env = dict(
        line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines() if line
    )
    return f"{env['DOCKER_HOST']}#certs={env['DOCKER_CERT_PATH']}"


@pytest.fixture(scope="module")
def two_engines(docker_client: Any, base_image: str) -> tuple[str, str]:
    if subprocess.run([str(ENGINE2), "status"], capture_output=True).returncode != 0:
        need_engine2("the second engine is not running: start it with `scripts/engine2 start`")
    local, second = engine.environment_engine().url, engine2_url()
    if parse_engine_url(second).url == local:
        pytest.skip("DOCKER_HOST already is the second engine: nothing to spread over")
    engine.ensure_image(engine.get_client(second), base_image)
    return local, second


# Each test reports what it ran on: its process's engine, and on which engines of the
# run its sandbox, sidecar and fake upstream containers exist.
SUITE = """
import json
import pytest
from docker.errors import NotFound
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.fakeupstream import header
from pytest_agentbox.plugin.hooks import run_state


def record(request, record_property, **containers):
    state = run_state(request.config)
    where = {}
    for role, cid in containers.items():
        where[role] = []
        for spec in state.engines:
            try:
                engine.get_client(spec).containers.get(cid)
                where[role].append(spec.url)
            except NotFound:
                pass
    line = {"test": request.node.name, "engine": state.engine_url, "where": where}
    record_property("record", json.dumps(line))


@pytest.mark.parametrize("i", range(2))
def test_plain(request, record_property, sandbox, i):
    assert sandbox.run(f"echo hi-{i}").stdout == f"hi-{i}\\n"
    record(request, record_property, sandbox=sandbox.container_id)


@pytest.mark.parametrize("i", range(2))
def test_declared_domain(request, record_property, fake_upstream, sandbox_factory, i):
    fake_upstream.reply("/*", body=f"upstream-{i}")
    sb = sandbox_factory(network=["api.github.com"])
    r = sb.run("curl -sS https://api.github.com/x")
    assert r.stdout == f"upstream-{i}", r.stderr
    assert fake_upstream.engine_url == run_state(request.config).engine_url
    record(request, record_property, sandbox=sb.container_id, sidecar=sb.sidecar.id,
           upstream=fake_upstream.container.id)


@pytest.mark.parametrize("i", range(2))
def test_key_through_the_sidecar(
    request, record_property, vault, fake_upstream, sandbox_factory, i
):
    key = "sk-test-" + __import__("secrets").token_hex(20)
    vault.add("anthropic", key)
    fake_upstream.reply("/*", json_body={"ok": i})
    sb = sandbox_factory(keys=["anthropic"])
    r = sb.run('curl -sS -H "x-api-key: $ANTHROPIC_API_KEY" "$ANTHROPIC_BASE_URL/v1/messages"')
    assert json.loads(r.stdout) == {"ok": i}, r.stderr
    assert [header(q, "x-api-key") for q in fake_upstream.requests()] == [[key]]
    record(request, record_property, sandbox=sb.container_id, sidecar=sb.sidecar.id,
           upstream=fake_upstream.container.id)
"""


def records(junit: Path) -> list[dict[str, Any]]:
    """Each test's ``record`` property, and the engine the plugin reported for it."""
    out = []
    for case in ElementTree.parse(junit).iter("testcase"):  # noqa: S314 (our own file)
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "record" in props:
            out.append({**json.loads(props["record"]), "reported": props.get("agentbox_engine")})
    return out


def test_two_engines_in_one_xdist_run_each_test_on_one_engine_nothing_left(
    pytester: pytest.Pytester, two_engines: tuple[str, str], base_image: str
) -> None:
    local, second = two_engines
    run_id = "multi-" + secrets.token_hex(6)
    pytester.makepyfile(test_suite=SUITE)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", f"--testrunuid={run_id}", f"--junitxml={junit}",
        "--agentbox-require-docker", f"--agentbox-image={base_image}",
        f"--agentbox-engine={local}", f"--agentbox-engine={second}",
        "--agentbox-fake-upstream-domains=api.github.com",
    )  # fmt: skip
    out = result.stdout.str()
    assert result.ret == 0, out[-4000:] + result.stderr.str()[-2000:]
    result.assert_outcomes(passed=6)
    got = records(junit)
    assert len(got) == 6
    urls = {local, parse_engine_url(second).url}
    assert {r["engine"] for r in got} == urls, got  # sandboxes on both engines
    for r in got:
        # Each container of the test on exactly its process's engine, none elsewhere.
        assert r["where"] and all(w == [r["engine"]] for w in r["where"].values()), r
        assert r["reported"] == r["engine"]  # the plugin's own record of the engine
    assert f"agentbox: engines {local}, {second}" in out  # the header names them
    assert "agentbox: sandboxes per engine: " in out
    for url in (local, second):
        assert ours(engine.get_client(url), run_id) == [], f"left on {url}"


def test_the_run_start_clean_up_covers_every_engine(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    two_engines: tuple[str, str],
    base_image: str,
) -> None:
    local, second = two_engines
    # A run of its own: under xdist the outer run's id would be inherited, and its
    # once-per-run clean-up is already done.
    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "cleanup-" + secrets.token_hex(6))
    client = engine.get_client(second)
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    labels = paths.Owner.current("dead-" + secrets.token_hex(4)).labels("sandbox")
    labels[paths.LABEL_OWNER_PID] = str(dead_pid.pid)
    dead = client.containers.create(base_image, ["true"], labels=labels)
    stranger = client.containers.create(base_image, ["true"])
    try:
        pytester.makepyfile("def test_x(sandbox):\n    assert sandbox.run('true').ok\n")
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-n", "0", "--agentbox-require-docker",
            f"--agentbox-image={base_image}", f"--agentbox-engine={local}",
            f"--agentbox-engine={second}",
        )  # fmt: skip
        assert result.ret == 0, result.stdout.str()[-3000:]
        # -n 0 runs on the first engine only; the leftover was on the second.
        with pytest.raises(Exception, match=r"No such container|404"):
            dead.reload()
        stranger.reload()
    finally:
        for c in (dead, stranger):
            with contextlib.suppress(Exception):
                c.remove(force=True)


def test_gc_covers_every_engine_and_leaves_strangers(
    two_engines: tuple[str, str], base_image: str
) -> None:
    local, second = two_engines
    made: list[Any] = []
    try:
        dead_pid = subprocess.Popen(["true"])
        dead_pid.wait()
        for url in (local, second):
            client = engine.get_client(url)
            labels = paths.Owner.current("dead-" + secrets.token_hex(4)).labels("sandbox")
            labels[paths.LABEL_OWNER_PID] = str(dead_pid.pid)
            made.append(client.containers.create(base_image, ["true"], labels=labels))
            made.append(client.containers.create(base_image, ["true"]))  # a stranger's
        out = subprocess.run(
            [sys.executable, "-m", "pytest_agentbox.cli", "gc", "--engine", local,
             "--engine", second],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        dead_local, stranger_local, dead_second, stranger_second = made
        assert f"removed container {dead_local.name} on {local}" in out.stdout
        assert f"removed container {dead_second.name} on {second}" in out.stdout
        for gone in (dead_local, dead_second):
            with pytest.raises(Exception, match=r"No such container|404"):
                gone.reload()
        for kept in (stranger_local, stranger_second):
            kept.reload()
            assert kept.name not in out.stdout
    finally:
        for c in made:
            with contextlib.suppress(Exception):
                c.remove(force=True)


def test_image_build_copy_from_provisions_another_engine(
    two_engines: tuple[str, str], base_image: str
) -> None:
    local, second = two_engines
    tag = f"agentbox-test/copy:{secrets.token_hex(4)}"
    src, dst = engine.get_client(local), engine.get_client(second)
    src.images.get(base_image).tag(tag)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest_agentbox.cli", "image", "build", "--tag", tag,
             "--engine", second, "--copy-from", local],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert dst.images.get(tag).id == src.images.get(tag).id  # the same image, by digest
        missing = subprocess.run(
            [sys.executable, "-m", "pytest_agentbox.cli", "image", "build", "--tag",
             tag + "-absent", "--engine", second, "--copy-from", local],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert missing.returncode == 2
        assert f"is not on {local}: build it there first" in missing.stderr
    finally:
        for client in (src, dst):
            with contextlib.suppress(Exception):
                client.images.remove(tag, force=True)


def test_an_image_missing_on_one_engine_fails_the_run_with_the_command_to_copy_it(
    pytester: pytest.Pytester, two_engines: tuple[str, str], base_image: str
) -> None:
    local, second = two_engines
    tag = f"agentbox-test/only-local:{secrets.token_hex(4)}"
    src = engine.get_client(local)
    src.images.get(base_image).tag(tag)
    try:
        pytester.makepyfile("def test_x(sandbox):\n    pass\n")
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--agentbox-image={tag}",
            f"--agentbox-engine={local}", f"--agentbox-engine={second}",
        )  # fmt: skip
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        err = result.stderr.str()
        assert f"sandbox image {tag!r} is not on the engine {second}" in err
        assert f"agentbox image build --engine {second}" in err and "--copy-from" in err
    finally:
        with contextlib.suppress(Exception):
            src.images.remove(tag, force=True)


# ---- an engine that dies mid-run ---------------------------------------------------

ENGINE3 = {"AGENTBOX_ENGINE2_INSTANCE": "3"}  # an engine of this test's own, to kill
ENGINE3_PIDFILE = Path("/var/run/agentbox-engine3.pid")


def engine3(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENGINE2), command], capture_output=True, text=True, timeout=300,
        env={**os.environ, **ENGINE3},
    )  # fmt: skip


@pytest.fixture
def killable_engine(docker_client: Any, base_image: str) -> Iterator[str]:
    """A third engine (``AGENTBOX_ENGINE2_INSTANCE=3 scripts/engine2``), stopped after."""
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("starting an engine of its own needs root and dockerd")
    started = engine3("start")
    if started.returncode != 0:
        pytest.fail(f"could not start a third engine: {started.stderr[-2000:]}")
    out = engine3("env").stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line)
    try:
        yield f"{env['DOCKER_HOST']}#certs={env['DOCKER_CERT_PATH']}"
    finally:
        stopped = engine3("stop")
        assert stopped.returncode == 0, f"the third engine did not stop: {stopped.stderr}"


# --dist each: every test runs on both workers, gw0 on the first engine and gw1 on the
# one that dies while test_2 waits.
DYING_SUITE = """
import time
from pathlib import Path
import pytest
from pytest_agentbox.plugin.hooks import run_state

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _which_engine(request, record_property):
    record_property("engine", run_state(request.config).engine_url)


def test_1_before(sandbox):
    assert sandbox.run("echo before").ok


def test_2_engine_dies_during_the_test(request, sandbox):
    if run_state(request.config).engine_url == DYING:
        (HERE / "ready").touch()
        deadline = time.monotonic() + 180
        while not (HERE / "killed").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    assert sandbox.run("echo after").ok


def test_3_after(sandbox):
    assert sandbox.run("echo later").ok
"""


def test_an_engine_that_dies_mid_run_fails_only_its_tests_naming_it(
    pytester: pytest.Pytester, killable_engine: str, base_image: str
) -> None:
    local, dying = engine.environment_engine().url, killable_engine
    dying_url = parse_engine_url(dying).url
    run_id = "dying-" + secrets.token_hex(6)
    pytester.makepyfile(test_dying=DYING_SUITE.replace("DYING", repr(dying_url)))
    junit = pytester.path / "junit.xml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "each",
         f"--testrunuid={run_id}", f"--junitxml={junit}", "--agentbox-require-docker",
         f"--agentbox-image={base_image}", f"--agentbox-engine={local}",
         f"--agentbox-engine={dying}"],
        cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        ready = pytester.path / "ready"
        for _ in range(900):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert ready.exists(), "the test on the dying engine never got its sandbox"
        os.kill(int(ENGINE3_PIDFILE.read_text()), signal.SIGKILL)  # the engine dies
        for _ in range(100):  # until its API is gone for good
            if engine.check_engine(parse_engine_url(dying), timeout=1) is not None:
                break
            time.sleep(0.1)
        (pytester.path / "killed").touch()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out[-4000:]
    cases = {}
    for case in ElementTree.parse(junit).iter("testcase"):  # noqa: S314 (our own file)
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        bad = [*case.iter("failure"), *case.iter("error")]
        text = " ".join((b.get("message") or "") + (b.text or "") for b in bad)
        cases[case.get("name"), props.get("engine")] = (not bad, text)
    names = ("test_1_before", "test_2_engine_dies_during_the_test", "test_3_after")
    assert set(cases) == {(n, url) for n in names for url in (local, dying_url)}, cases
    for name in names:
        assert cases[name, local] == (True, ""), f"{name} on the engine that lives"
    assert cases["test_1_before", dying_url][0], "before the kill, the test on it passes"
    for name in names[1:]:
        passed, text = cases[name, dying_url]
        assert not passed, name
        assert f"the Docker engine at {dying} stopped answering mid-run" in text, (name, text)
    # Back up, the engine still holds the dead run's boxes: gc removes them. Its restart
    # must leave the first engine's default bridge alone (see scripts/engine2).
    assert engine3("start").returncode == 0
    opts = engine.get_client(local).networks.get("bridge").attrs.get("Options") or {}
    first_bridge = opts.get("com.docker.network.bridge.name", "docker0")
    assert Path("/sys/class/net", first_bridge).exists(), f"{first_bridge} was deleted"
    engine.drop_client(dying)  # the restart made new TLS files
    gc = subprocess.run(
        [sys.executable, "-m", "pytest_agentbox.cli", "gc", "--engine", dying],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gc.returncode == 0, gc.stderr
    assert ours(engine.get_client(dying), run_id) == []
    assert ours(engine.get_client(local), run_id) == []
