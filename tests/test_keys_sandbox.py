"""Keys never reach the agent: the key proxy in a real sandbox, against a local fake upstream."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trustme
from conftest import as_root, inspect_box
from test_isolation_sandbox import key_forms

from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.fakeupstream import header
from pytest_agentbox.policy.egress import compute_policy
from pytest_agentbox.policy.manifest import KeyRoute

# A raw HTTP client run inside the sandbox: sends exactly the bytes given, prints the
# status line and the headers it got back (so framing checks are not softened by a
# client library).
RAW_CLIENT = r"""
import os, socket, sys
port = int(os.environ["OPENAI_BASE_URL"].rsplit(":", 1)[1].split("/")[0])
data = sys.stdin.buffer.read().replace(b"@TOKEN@", os.environ["OPENAI_API_KEY"].encode())
s = socket.create_connection(("127.0.0.1", port), 10)
s.sendall(data)
out = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    out += chunk
sys.stdout.write(out.decode("latin-1"))
"""


def raw(sb: Any, request: bytes) -> str:
    sb.write_file("/tmp/raw_client.py", RAW_CLIENT)
    out = engine.exec_run(
        engine.get_client(), sb.container_id, ["python3", "/tmp/raw_client.py"],
        user=sb.user_spec, stdin=request, env=sb.env,
    )  # fmt: skip
    return out.stdout.decode("latin-1")


@pytest.fixture
def keyed(vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any) -> Any:
    vault.add("openai", random_key)
    fake_upstream.reply("/v1/*", json_body={"ok": True}, headers={
        "set-cookie": "session=upstream-secret", "server": "fake/1.0",
        "x-request-id": "req-123", "x-custom-leak": "nope",
    })  # fmt: skip
    sb = sandbox_factory(keys=["openai"])
    sb.key = random_key
    return sb


def test_agent_env_holds_a_session_token_and_local_base_url(keyed: Any) -> None:
    token = keyed.env["OPENAI_API_KEY"]
    assert token != keyed.key
    assert len(token) == 32 and int(token, 16) >= 0  # 128 bits from secrets
    port = keyed.proxy_ports["openai"]
    assert keyed.env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{port}/v1"


def test_no_readable_place_in_the_sandbox_holds_the_key(keyed: Any) -> None:
    scan = keyed.run(
        "cat /proc/*/environ /proc/*/cmdline 2>/dev/null; "
        "find /tmp /opt /etc /home /run /dev/shm /var -type f -readable 2>/dev/null "
        "| xargs -r cat 2>/dev/null; env"
    )
    assert len(scan.stdout) > 1000  # the scan really read things
    assert keyed.key not in scan.stdout
    assert keyed.key not in json.dumps(inspect_box(keyed.container_id))


def test_no_key_proxy_and_no_root_daemon_in_the_agents_container(keyed: Any) -> None:
    # The forwarder bound the 127.0.0.1 ports, handed them to the sidecar and exited:
    # the sidecar accepts on them itself, and no process of ours stays in this container.
    assert keyed.forwarding == "handed over"
    procs = as_root(keyed, ["/bin/sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
    assert b"/sbin/docker-init" in procs.stdout  # the read really listed processes
    assert b"keyproxy" not in procs.stdout and b"egressproxy" not in procs.stdout
    tools = keyed.hardening["tools_dir"]
    r = keyed.run(
        f"cat {tools}/egressproxy.py; echo read=$?; ls {tools}; echo list=$?; "
        "ls /proc/1 >/dev/null 2>&1; echo visible=$?; kill -TERM 1; echo kill=$?; "
        "ps -eo user= | sort -u"
    )
    assert "read=1" in r.stdout and "list=2" in r.stdout
    assert "visible=2" in r.stdout and "kill=1" in r.stdout
    mode = as_root(keyed, ["stat", "-c", "%a %U", tools])
    assert mode.stdout.split() == [b"700", b"root"]
    assert r.stdout.split()[-1] == keyed.user["name"]  # no process of root is listed


# The agent's moves against the handed-over listeners: bind the same port (plain and with
# SO_REUSEPORT/SO_REUSEADDR) to take its connections, or reach the handoff socket to pass
# a listener of its own. Each must fail, and the port must still answer with the key
# proxy afterwards.
TAKE_PORT = r"""
import os, socket
port = int(os.environ["OPENAI_BASE_URL"].rsplit(":", 1)[1].split("/")[0])
for opt in (None, socket.SO_REUSEADDR, socket.SO_REUSEPORT):
    s = socket.socket()
    if opt is not None:
        s.setsockopt(socket.SOL_SOCKET, opt, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        print("took", opt)
    except OSError as exc:
        print("refused", opt, exc.errno)
"""


def test_the_agent_cannot_take_a_handed_over_port(keyed: Any, fake_upstream: Any) -> None:
    keyed.write_file("/tmp/take.py", TAKE_PORT)
    r = keyed.run("python3 /tmp/take.py")
    assert r.stdout.count("refused") == 3 and "took" not in r.stdout, r
    # The handoff socket took one handover and is gone; the relay sockets are root's.
    listing = keyed.run("ls -la /run/agentbox-egress-*/")
    assert "key-openai.sock" in listing.stdout and "handoff" not in listing.stdout, listing
    dial = keyed.run(
        "python3 -c 'import glob, socket; s = socket.socket(socket.AF_UNIX); "
        's.connect(glob.glob("/run/agentbox-egress-*/key-openai.sock")[0])\''
    )
    assert "PermissionError" in dial.stderr, dial
    r = keyed.run('curl -sS -H "Authorization: Bearer $OPENAI_API_KEY" "$OPENAI_BASE_URL/models"')
    assert r.exit_code == 0 and json.loads(r.stdout) == {"ok": True}
    assert header(fake_upstream.requests()[0], "authorization") == [f"Bearer {keyed.key}"]


def test_a_key_the_upstream_sends_back_never_reaches_the_agent(
    keyed: Any, fake_upstream: Any
) -> None:
    # An upstream that echoes the key in every form, in a header, gzipped, as an SSE event
    # and back to back in a 700 KB body (so wherever the key proxy's reads end, one cuts a
    # key): the agent, through the real key proxy in the sidecar, gets none of it.
    key, raw = keyed.key, keyed.key.encode()
    text = " ".join(["echo:", *key_forms(key), base64.b64encode(b"Bearer " + raw).decode()])
    big = (raw + b"\n") * (700_000 // (len(raw) + 1))
    plain = {"body": text, "headers": {"x-request-id": key}, "gzip": False, "status": 200}
    fake_upstream.program([
        {"path": "/v1/echo", **plain},
        {"path": "/v1/echo-gz", **plain, "gzip": True},
        {"path": "/v1/echo-sse", "sse": [{"data": json.dumps({"content": key})}]},
        {"path": "/v1/echo-big", "body_b64": base64.b64encode(big).decode()},
    ])  # fmt: skip
    seen = {}
    for path in ("echo", "echo-gz", "echo-sse", "echo-big"):
        r = keyed.run(
            f'curl -sS -D - -H "Authorization: Bearer $OPENAI_API_KEY" "$OPENAI_BASE_URL/{path}"'
        )
        assert r.exit_code == 0, r
        seen[path] = r.stdout
        assert not [f for f in key_forms(key) if f in r.stdout], path
        assert "*" * len(key) in r.stdout, path
    body = seen["echo-big"].partition("\r\n\r\n")[2]
    assert len(body) == len(big) and body.count("*" * len(key)) == big.count(raw)
    log = keyed.collect_logs()["key proxy requests"]
    leaks = [json.loads(line) for line in log.splitlines() if '"leak"' in line]
    assert {("header:x-request-id", "/v1/echo"), ("body", "/v1/echo-big")} <= {
        (r["where"], r["path"]) for r in leaks
    }
    assert key not in log


def test_upstream_gets_the_real_key_and_the_pinned_host(keyed: Any, fake_upstream: Any) -> None:
    r = keyed.run('curl -sS -H "Authorization: Bearer $OPENAI_API_KEY" "$OPENAI_BASE_URL/models"')
    assert r.exit_code == 0 and json.loads(r.stdout) == {"ok": True}
    (req,) = fake_upstream.requests()
    assert header(req, "authorization") == [f"Bearer {keyed.key}"]
    assert header(req, "host") == ["api.openai.com"]
    assert keyed.env["OPENAI_API_KEY"] not in json.dumps(req)


def test_x_api_key_header_carries_the_token_too(keyed: Any, fake_upstream: Any) -> None:
    r = keyed.run('curl -sS -o /dev/null -w "%{http_code}" -H "x-api-key: $OPENAI_API_KEY" '
                  '"$OPENAI_BASE_URL/models"')  # fmt: skip
    assert r.stdout == "200"
    assert header(fake_upstream.requests()[0], "authorization") == [f"Bearer {keyed.key}"]


@pytest.mark.parametrize(
    "auth", ["", "-H 'Authorization: Bearer 00000000000000000000000000000000'", "-H 'x-api-key: x'"]
)
def test_wrong_or_missing_token_is_403_and_nothing_is_forwarded(
    keyed: Any, fake_upstream: Any, auth: str
) -> None:
    r = keyed.run(f'curl -sS -o /dev/null -w "%{{http_code}}" {auth} "$OPENAI_BASE_URL/models"')
    assert r.stdout == "403"
    assert fake_upstream.requests() == []


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer @TOKEN@\r\n"
            b"X-A: b\r\nInjected: yes\n\r\n",
            "400",
        ),  # bare LF: header injection
        (b"GET /v1/models\r\nX: y HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n\r\n", "400"),
        (
            b"POST /v1/chat HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "400",
        ),
        (
            b"POST /v1/chat HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n"
            b"Content-Length: 104857601\r\n\r\n",
            "413",
        ),
        (b"GET http://evil.example/ HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n\r\n", "400"),
    ],
    ids=["bare-lf", "crlf-in-target", "chunked", "oversize", "absolute-form"],
)
def test_malformed_requests_are_refused_before_the_upstream(
    keyed: Any, fake_upstream: Any, request_bytes: bytes, status: str
) -> None:
    response = raw(keyed, request_bytes)
    assert response.split(" ")[1] == status, response[:200]
    assert fake_upstream.requests() == []


def test_only_one_request_per_connection_is_forwarded(keyed: Any, fake_upstream: Any) -> None:
    one = b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n\r\n"
    response = raw(keyed, one + one.replace(b"models", b"second"))
    assert response.count("HTTP/1.1 ") == 1
    assert [r["path"] for r in fake_upstream.requests()] == ["/v1/models"]


def test_response_headers_are_allowlisted(keyed: Any) -> None:
    response = raw(keyed, b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n\r\n")
    head = response.split("\r\n\r\n", 1)[0].lower()
    assert "x-request-id: req-123" in head and "content-type: application/json" in head
    for dropped in ("set-cookie", "upstream-secret", "server:", "x-custom-leak"):
        assert dropped not in head
    assert "connection: close" in head


def test_gzip_response_is_scanned_and_reaches_the_agent_decoded(
    keyed: Any, fake_upstream: Any
) -> None:
    fake_upstream.reply("/v1/zipped", body="compressed hello", gzip=True)
    r = keyed.run('curl -sS --compressed -D - -H "x-api-key: $OPENAI_API_KEY" '
                  '"$OPENAI_BASE_URL/zipped"')  # fmt: skip
    # The key proxy decompresses to scan for the key, and sends the agent identity.
    assert "content-encoding" not in r.stdout.lower()
    assert r.stdout.endswith("compressed hello")


def test_sse_first_event_arrives_before_the_upstream_finishes(
    keyed: Any, fake_upstream: Any
) -> None:
    events = [{"data": "first", "delay": 0}, {"data": "last", "delay": 4}]
    fake_upstream.reply("/v1/stream", sse=events)
    client = (
        "import os,time,urllib.request\n"
        "req=urllib.request.Request(os.environ['OPENAI_BASE_URL']+'/stream',"
        "headers={'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']})\n"
        "t=time.monotonic();r=urllib.request.urlopen(req)\n"
        "for line in r:\n"
        "    if line.strip():\n"
        "        print(round(time.monotonic()-t,2), line.decode().strip(), flush=True)\n"
    )
    out = [line.split(" ", 1) for line in keyed.run(["python3", "-c", client]).stdout.splitlines()]
    assert [text for _, text in out] == ["data: first", "data: last"]
    # The upstream waits 4 s before its last event; the first must not wait for it.
    assert float(out[0][0]) < float(out[1][0]) - 2


def test_upstream_failure_is_a_generic_502(keyed: Any, fake_upstream: Any) -> None:
    fake_upstream.program([{"method": "*", "path": "/v1/*", "close": True}])
    response = raw(keyed, b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n\r\n")
    assert response.startswith("HTTP/1.1 502")
    assert response.endswith("Upstream connection failed")
    assert "Error" not in response and "Traceback" not in response


def test_an_upstream_certificate_the_sidecar_does_not_trust_is_a_502_before_any_request(
    make_sandbox: Any, fake_upstream: Any, random_key: str
) -> None:
    """The key proxy's TLS (memory BIOs, on the socket the egress proxy hands over) checks
    the upstream as the context says: the fake upstream's CA left out, the handshake fails,
    no request (so no key) reaches it, and the agent gets only the fixed 502."""
    fake_upstream.reply("/v1/*", json_body={"ok": True})
    route = KeyRoute(provider="openai", env_var="OPENAI_API_KEY", base_url_env="OPENAI_BASE_URL",
                     domain="api.openai.com", auth_style="bearer", base_path="/v1",
                     required=True)  # fmt: skip
    policy = compute_policy(declared=[], key_domains=[route.domain], has_setup_command=False,
                            unrestricted=False)  # fmt: skip
    sb = make_sandbox(
        key_routes=(route,), keys={"openai": random_key}, egress=policy,
        egress_network=fake_upstream.network_name, egress_pins=fake_upstream.pins,
        extra_ca_pem=trustme.CA().cert_pem.bytes().decode(),  # not the upstream's CA
    )  # fmt: skip
    response = raw(sb, b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer @TOKEN@\r\n\r\n")
    assert response.startswith("HTTP/1.1 502") and response.endswith("Upstream connection failed")
    assert fake_upstream.requests() == []
    decisions = sb.collect_logs()["egress decisions"]
    given = [json.loads(line) for line in decisions.splitlines() if '"keys"' in line]
    assert given and all(d["decision"] == "allow" for d in given)  # reached, then refused by TLS


def test_request_log_has_no_key_token_or_query(keyed: Any) -> None:
    keyed.run('curl -sS -H "x-api-key: $OPENAI_API_KEY" "$OPENAI_BASE_URL/models?api_key=leak"')
    log = keyed.collect_logs()["key proxy requests"]
    entry = json.loads(log.splitlines()[-1])
    assert entry["path"] == "/v1/models" and entry["status"] == 200
    for secret in (keyed.key, keyed.env["OPENAI_API_KEY"], "leak"):
        assert secret not in log


def test_known_provider_stays_pinned_whatever_the_manifest_says(
    vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any
) -> None:
    vault.add("openai", random_key)
    fake_upstream.reply("/v1/*", json_body={"ok": True})
    sb = sandbox_factory(keys=[{"provider": "openai", "domain": "decoy.agentbox.test"}])
    sb.run('curl -sS -H "x-api-key: $OPENAI_API_KEY" "$OPENAI_BASE_URL/models"')
    (req,) = fake_upstream.requests()
    assert header(req, "host") == ["api.openai.com"]
    decisions = sb.collect_logs()["egress decisions"]
    assert "api.openai.com" in decisions and "decoy.agentbox.test" not in decisions


def test_proxy_is_listening_before_setup_command_runs(
    vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any
) -> None:
    vault.add("openai", random_key)
    sb = sandbox_factory(keys=["openai"], setup_command="cat /proc/net/tcp > ~/tcp-at-setup")
    port_hex = f"{sb.proxy_ports['openai']:04X}"
    table = sb.read_file(f"{sb.home}/tcp-at-setup").decode()
    listening = [line.split()[1] for line in table.splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port_hex}" in listening


def test_setup_command_sees_the_token_not_the_key(
    vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any
) -> None:
    vault.add("openai", random_key)
    sb = sandbox_factory(keys=["openai"], setup_command="env > ~/env-at-setup")
    env = sb.read_file(f"{sb.home}/env-at-setup").decode()
    assert random_key not in env and f"OPENAI_API_KEY={sb.env['OPENAI_API_KEY']}" in env


@pytest.mark.parametrize("style", ["header:Authorization", "header:Cookie"])
def test_a_manifest_auth_style_that_validates_also_starts(
    vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any, style: str
) -> None:
    # One rule (keyproxy.auth_header) for the manifest and the key proxy: no style passes
    # validation only to be refused when the proxy starts.
    vault.add("acme", random_key)
    fake_upstream.reply("/v1/*", json_body={"ok": True})
    sb = sandbox_factory(keys=[{"provider": "acme", "domain": "api.openai.com",
                                "auth_style": style}])  # fmt: skip
    r = sb.run('curl -sS -H "Authorization: Bearer $ACME_API_KEY" "$ACME_BASE_URL/v1/models"')
    assert json.loads(r.stdout) == {"ok": True}, r.stderr
    (req,) = fake_upstream.requests()
    assert header(req, style.split(":", 1)[1].lower()) == [random_key]
