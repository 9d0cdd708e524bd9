"""A remote engine over tcp:// with TLS: the second engine that ``scripts/engine2`` starts.

Each check runs in a fresh interpreter: the package keeps one client per process, and
what is tested is how that client is made from the environment. Skipped with the fix
when the second engine is not running (``scripts/engine2 start``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_engine2

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


def probe(env: dict[str, str]) -> dict[str, str]:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
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
