"""Remote engines: ``tcp://`` with TLS (the second engine ``scripts/engine2`` starts) and
``ssh://`` (a throwaway sshd on loopback in front of the main engine, see ``ssh_engine``).

Each check runs in a fresh interpreter: the package keeps one client per process, and
what is tested is how that client is made from the environment. The TLS checks are
skipped with the fix when the second engine is not running (``scripts/engine2 start``),
the ssh ones when there is no sshd (``scripts/dev test`` installs openssh-server).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SshEngine, need_engine2, ours, running_sshd
from test_redteam_fixes import owner_dies_with_a_forked_child

from pytest_agentbox import paths

# The ssh tests start their own pytest runs against the main engine, and each such run
# cleans up dead owners' leftovers there: they share one xdist worker with the tests that
# plant leftovers on purpose (the inner-runs group), or that clean-up would race them.
pytestmark = pytest.mark.xdist_group("inner-runs")

ROOT = Path(__file__).resolve().parent.parent
ENGINE2 = ROOT / "scripts" / "engine2"

# What the fresh interpreter does: make the package's client, print what answered.
PROBE = """
import json
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.errors import DockerUnavailable
try:
    client = engine.get_client()
except DockerUnavailable as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"version": client.version()["Version"], "url": client.api.base_url}))
"""


def engine2_env() -> dict[str, str]:
    """The DOCKER_* variables of the second engine, as ``scripts/engine2 env`` says."""
    out = subprocess.run([str(ENGINE2), "env"], capture_output=True, text=True, check=True)
    env = {}
    for line in out.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value
    return env


@pytest.fixture(scope="module")
def tls_env() -> dict[str, str]:
    if subprocess.run([str(ENGINE2), "status"], capture_output=True).returncode != 0:
        need_engine2("the second engine is not running: start it with `scripts/engine2 start`")
    return engine2_env()


def probe(env: dict[str, str], *, inherit: bool = True) -> dict[str, str]:
    """What PROBE prints in a fresh interpreter with ``env`` (on top of ``os.environ``
    unless ``inherit`` is false: then ``env`` is the whole environment)."""
    full = {**(os.environ if inherit else {}), **env, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_tls_engine_answers_although_requests_ca_bundle_names_other_cas(
    tls_env: dict[str, str],
) -> None:
    # CI machines commonly set these; requests would let them replace the engine's CA.
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    env = {**tls_env, "REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle}
    got = probe(env)
    assert "error" not in got, got["error"]
    assert got["url"].startswith("https://127.0.0.1:")


def test_tls_engine_with_a_certificate_from_another_ca_is_refused_with_the_fix(
    tls_env: dict[str, str], tmp_path: Path
) -> None:
    # The client's own certificate is the real one: only the CA it trusts differs, so
    # a connect here would mean the engine's certificate was never checked.
    import trustme

    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    real = Path(tls_env["DOCKER_CERT_PATH"])
    for name in ("cert.pem", "key.pem"):
        (cert_dir / name).write_bytes((real / name).read_bytes())
    trustme.CA().cert_pem.write_to_path(str(cert_dir / "ca.pem"))
    got = probe({**tls_env, "DOCKER_CERT_PATH": str(cert_dir)})
    assert "error" in got, f"connected to {got.get('url')} through a CA that never signed it"
    assert "TLS failed" in got["error"] and "DOCKER_CERT_PATH" in got["error"]
    assert "no Docker engine answers at tcp://127.0.0.1:" in got["error"]


def test_tls_engine_refuses_a_client_without_a_certificate(tls_env: dict[str, str]) -> None:
    # Only the CA, no client certificate: the engine itself must turn the client away
    # (it runs with --tlsverify), or anyone on the machine could drive it.
    import ssl
    import urllib.request

    host, port = tls_env["DOCKER_HOST"].removeprefix("tcp://").split(":")
    ctx = ssl.create_default_context(cafile=str(Path(tls_env["DOCKER_CERT_PATH"]) / "ca.pem"))
    with pytest.raises((ssl.SSLError, OSError)):
        urllib.request.urlopen(f"https://{host}:{port}/version", context=ctx, timeout=30).read()


# ---- ssh:// ------------------------------------------------------------------------

# The agent's test, run by the plugin over the ssh engine: what it checks is the
# hardening of the sandbox it got; what it writes down lets the outer test see where.
HARDENED_OVER_SSH = """
import json, os
from pytest_agentbox.backends.docker import engine

def test_hardened(sandbox):
    r = sandbox.run(["sh", "-c", "id -u; grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; "
                     "touch /etc/agentbox-probe 2>&1 || echo READ-ONLY"])
    assert r.ok, r.stderr
    lines = r.stdout.split()
    assert lines[0] != "0"                               # not root
    assert "CapEff:" in lines and lines[lines.index("CapEff:") + 1] == "0" * 16
    assert "NoNewPrivs:" in lines and lines[lines.index("NoNewPrivs:") + 1] == "1"
    assert "READ-ONLY" in lines                          # the root file system
    client = engine.get_client()
    with open(os.environ["AGENTBOX_PROBE_OUT"], "w") as fh:
        json.dump({"container": sandbox.container_id, "engine_id": client.info()["ID"],
                   "base_url": client.api.base_url}, fh)
"""


def test_an_ssh_engine_runs_a_hardened_sandbox_through_the_plugin(
    ssh_engine: SshEngine, docker_client: Any, base_image: str, tmp_path: Path
) -> None:
    (tmp_path / "test_agent.py").write_text(HARDENED_OVER_SSH)
    out_file = tmp_path / "where.json"
    run_id = secrets.token_hex(8)
    env = ssh_engine.environ(
        PYTHONPATH=str(ROOT), AGENTBOX_PROBE_OUT=str(out_file), PYTEST_XDIST_TESTRUNUID=run_id
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
         "--agentbox-require-docker", f"--agentbox-image={base_image}", "test_agent.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    where = json.loads(out_file.read_text())
    # Through the SDK's ssh transport, to the engine behind that sshd (the main one),
    # logged in with this run's key: nothing reached the engine's socket directly.
    assert where["base_url"] == "http+docker://ssh"
    assert where["engine_id"] == docker_client.info()["ID"]
    assert "Accepted publickey for" in ssh_engine.log.read_text()
    # Its sandbox, and everything of the run, is gone from that engine.
    assert ours(docker_client, run_id) == []


@pytest.fixture
def internal_net(docker_client: Any) -> Iterator[Any]:
    """An internal network on the main engine (the one behind the sshd) for the sidecar."""
    labels = paths.Owner.current(paths.token()).labels("remote-test")
    net = docker_client.networks.create(
        paths.unique_name("net"), driver="bridge", internal=True, labels=labels
    )
    yield net
    net.remove()


def test_over_ssh_an_owner_killed_with_a_forked_child_alive_still_ends_its_sandbox(
    ssh_engine: SshEngine, docker_client: Any, base_image: str, internal_net: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    # The owner channels (sandbox and egress sidecar) run as SSH channels of one
    # connection; a forked child holds a copy of that connection's descriptor. Killed
    # without any clean-up, the owner must still end both containers: the child's copy
    # is dropped at fork, so the connection ends and with it the containers' stdin.
    owner_dies_with_a_forked_child(
        docker_client, base_image, internal_net.name, tmp_path,
        env=ssh_engine.environ(PYTHONPATH=str(ROOT)),
    )  # fmt: skip


def _ssh_refusal(env: dict[str, str], url: str) -> str:
    got = probe({**env, "DOCKER_HOST": url}, inherit=False)
    assert "error" in got, f"connected to {got.get('url')}"
    port = url.rsplit(":", 1)[1]
    user = url.removeprefix("ssh://").split("@")[0]
    # Names the engine, and the command that shows what is wrong and what it needs.
    assert f"no Docker engine answers at {url} (" in got["error"]
    assert f"`ssh -p {port} {user}@127.0.0.1 docker version` must work" in got["error"]
    assert "~/.ssh/known_hosts" in got["error"]
    return got["error"]


def test_an_ssh_engine_nobody_listens_on_fails_with_what_to_do(ssh_engine: SshEngine) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = ssh_engine.url.removeprefix("ssh://").split("@")[0]
    why = _ssh_refusal(ssh_engine.environ(), f"ssh://{user}@127.0.0.1:{port}")
    assert "Unable to connect" in why


def test_an_ssh_engine_with_an_unknown_host_key_is_refused(
    ssh_engine: SshEngine, tmp_path: Path
) -> None:
    # The same sshd and a key it accepts, but its host key is not pinned: a connect
    # here would trust whoever answers on that address.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    for name in ("id_ed25519", "config"):
        (home / ".ssh" / name).write_bytes((ssh_engine.home / ".ssh" / name).read_bytes())
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    why = _ssh_refusal(ssh_engine.environ(HOME=str(home)), ssh_engine.url)
    assert "not found in known_hosts" in why


def test_an_ssh_engine_that_refuses_the_key_is_refused_with_what_to_do(
    ssh_engine: SshEngine, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    for name in ("known_hosts", "config"):
        (home / ".ssh" / name).write_bytes((ssh_engine.home / ".ssh" / name).read_bytes())
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / ".ssh" / "id_ed25519")],
        check=True, capture_output=True,
    )  # fmt: skip
    why = _ssh_refusal(ssh_engine.environ(HOME=str(home)), ssh_engine.url)
    assert "Authentication failed" in why


def test_the_plugin_fails_a_run_whose_ssh_engine_does_not_answer_with_the_fix(
    ssh_engine: SshEngine, base_image: str, tmp_path: Path
) -> None:
    (tmp_path / "test_agent.py").write_text("def test_it(sandbox):\n    pass\n")
    user = ssh_engine.url.removeprefix("ssh://").split("@")[0]
    url = f"ssh://{user}@127.0.0.1:1"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
         "--agentbox-require-docker", f"--agentbox-image={base_image}", "test_agent.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=ssh_engine.environ(PYTHONPATH=str(ROOT), DOCKER_HOST=url),
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert f"no Docker engine answers at {url}" in text, text[-3000:]
    assert f"`ssh -p 1 {user}@127.0.0.1 docker version` must work" in text, text[-3000:]


SANDBOXES_UNTIL_REFUSED = """
import sys
from pytest_agentbox.errors import AgentboxError
from pytest_agentbox.sandbox import Sandbox, SandboxConfig
made = []
try:
    for _ in range(4):
        made.append(Sandbox.create(SandboxConfig(image=sys.argv[1])))
except AgentboxError as exc:
    print(exc)
finally:
    for sb in made:
        sb.close()
"""


def test_an_sshd_out_of_sessions_says_to_raise_max_sessions(
    base_image: str, docker_client: Any, tmp_path: Path
) -> None:
    # Two sessions per connection: the client's pool and one owner channel fill it.
    with running_sshd(tmp_path, "MaxSessions 2") as sshd:
        out = subprocess.run(
            [sys.executable, "-c", SANDBOXES_UNTIL_REFUSED, base_image],
            capture_output=True, text=True, timeout=300,
            env=sshd.environ(PYTHONPATH=str(ROOT)),
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"the sshd of {sshd.url} refused another session" in out.stdout, out.stdout
    assert "Raise MaxSessions in that host's sshd_config" in out.stdout


def test_an_ssh_engine_whose_connect_hangs_is_reported_within_the_check_timeout() -> None:
    # A host that drops packets: paramiko's connect has no timeout of its own. Stood in
    # for by a local listener whose accept queue is full, so the kernel drops new SYNs.
    import socket

    from pytest_agentbox.backends.docker import engine

    pytest.importorskip("paramiko")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; later SYNs go unanswered
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.5)
        spec = engine.parse_engine_url(f"ssh://agentbox@127.0.0.1:{port}")
        start = time.monotonic()
        why = engine.check_engine(spec, timeout=2)
        took = time.monotonic() - start
    finally:
        for c in fillers:
            c.close()
        lsock.close()
    assert why is not None and took < 30, (why, took)
    assert f"127.0.0.1:{port}" in why and "did not answer within" in why


# `agentbox image build --engine ssh://`: the script's `docker import` goes through the
# docker CLI, whose ssh binary reads ~/.ssh from the passwd entry, not $HOME: a wrapper on
# PATH gives it the test's files, as a user's own ~/.ssh would. No mirror is reachable
# here, so debootstrap's stand-in unpacks the base image's files (minus the agent user,
# which the script makes); everything after it is the shipped script.
SSH_WRAPPER = """#!/bin/sh
exec /usr/bin/ssh -F "$HOME/.ssh/config" -i "$HOME/.ssh/id_ed25519" \\
  -o UserKnownHostsFile="$HOME/.ssh/known_hosts" "$@"
"""
DEBOOTSTRAP_STAND_IN = """#!/bin/sh
set -e
echo "$@" > "$AGENTBOX_TEST_ARGS"
tar -x -f "$AGENTBOX_TEST_ROOTFS" -C "$4"
chroot "$4" userdel --remove agent
"""


def test_image_build_provisions_an_ssh_engine(
    ssh_engine: SshEngine, docker_client: Any, base_image: str, tmp_path: Path
) -> None:
    rootfs, args, bin_dir = tmp_path / "rootfs.tar", tmp_path / "args", tmp_path / "bin"
    box = docker_client.containers.create(base_image, ["true"])
    try:
        with rootfs.open("wb") as fh:
            for chunk in box.export():
                fh.write(chunk)
    finally:
        box.remove(force=True)
    bin_dir.mkdir()
    for name, text in (("ssh", SSH_WRAPPER), ("debootstrap", DEBOOTSTRAP_STAND_IN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    tag = f"agentbox-test/over-ssh:{secrets.token_hex(4)}"
    logins = ssh_engine.log.read_text().count("Accepted publickey for")
    env = ssh_engine.environ(
        PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT),
        AGENTBOX_TEST_ROOTFS=str(rootfs), AGENTBOX_TEST_ARGS=str(args),
    )  # fmt: skip
    del env["DOCKER_HOST"]  # the engine is the --engine URL alone
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest_agentbox.cli", "image", "build", "--tag", tag,
             "--engine", ssh_engine.url],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert f"agentbox: built {tag}" in out.stdout
        assert args.read_text().split()[2] == "bookworm"  # the script's own suite
        # On the engine behind that sshd, imported through a login with this run's key.
        assert ssh_engine.log.read_text().count("Accepted publickey for") > logins
        image = docker_client.images.get(tag)
        assert image.labels.get("org.agentbox.image") == "base"
        uid = docker_client.containers.run(tag, ["id", "-u", "agent"], remove=True)
        assert uid.strip() == b"1000"  # the agent user the plugin expects, made by the script
    finally:
        with contextlib.suppress(Exception):
            docker_client.images.remove(tag, force=True)
