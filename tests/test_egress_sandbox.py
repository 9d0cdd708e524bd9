"""Egress: the agent reaches only declared domains, through a sidecar it cannot control.

All traffic stays on this machine: the "internet" is a fake upstream container on an
internal Docker network, answering for the declared names and for a decoy.
"""

from __future__ import annotations

import base64
import fcntl
import ipaddress
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ours

from pytest_agentbox.errors import EgressError
from pytest_agentbox.plugin.session import DECOY_DOMAIN
from pytest_agentbox.policy.egress import compute_policy

DECLARED = "api.github.com"


def decisions(sb: Any) -> list[dict[str, Any]]:
    text = sb.collect_logs().get("egress decisions", "")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def upstream_ip(fake_upstream: Any) -> str:
    fake_upstream.container.reload()
    nets = fake_upstream.container.attrs["NetworkSettings"]["Networks"]
    return str(nets[fake_upstream.network_name]["IPAddress"])


@pytest.fixture
def declared(fake_upstream: Any, sandbox_factory: Any) -> Any:
    fake_upstream.reply("/*", body="hello from upstream")
    return sandbox_factory(network=[DECLARED])


def test_declared_domain_is_reachable_with_curl_and_urllib(declared: Any) -> None:
    r = declared.run(f"curl -sS https://{DECLARED}/x")
    assert r.exit_code == 0 and r.stdout == "hello from upstream", r.stderr
    py = f"import urllib.request;print(urllib.request.urlopen('https://{DECLARED}/y').read())"
    assert declared.run(["python3", "-c", py]).stdout.strip() == "b'hello from upstream'"
    allowed = [d for d in decisions(declared) if d["decision"] == "allow" and d["event"] == "close"]
    assert {(d["host"], d["port"]) for d in allowed} == {(DECLARED, 443)}
    assert all(d["bytes_down"] > 0 for d in allowed)


def test_undeclared_domain_is_refused_and_logged(declared: Any, fake_upstream: Any) -> None:
    r = declared.run(f"curl -sS -o /dev/null -w '%{{http_code}}' https://{DECOY_DOMAIN}/")
    assert r.exit_code != 0
    assert fake_upstream.requests() == []  # the decoy answers, yet saw nothing
    (d,) = [d for d in decisions(declared) if d["host"] == DECOY_DOMAIN]
    assert d["decision"] == "deny"


def test_ip_literals_are_refused_in_every_form(declared: Any, fake_upstream: Any) -> None:
    ip = ipaddress.IPv4Address(upstream_ip(fake_upstream))  # our decoy's own address
    a, b, c, d = ip.packed
    forms = [
        str(ip),
        str(int(ip)),
        ".".join(f"0{x:o}" for x in ip.packed),
        f"0x{int(ip):08x}",
        f"0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        "[::ffff:" + str(ip) + "]",
    ]
    for form in forms:
        r = declared.run(f"curl -sS -m 10 -o /dev/null https://{form}/")
        assert r.exit_code != 0, form
    assert fake_upstream.requests() == []
    denied = [x for x in decisions(declared) if x["decision"] == "deny"]
    assert len(denied) == len(forms)


def test_sandbox_has_no_route_no_dns_and_only_loopback(declared: Any) -> None:
    r = declared.run("ls /sys/class/net; cat /proc/net/route | wc -l; cat /etc/resolv.conf")
    lines = r.stdout.split("\n")
    assert lines[0] == "lo" and lines[1] == "1"  # route table: header only
    py = (
        "import socket\n"
        "try:\n socket.getaddrinfo('" + DECLARED + "', 443); print('resolved')\n"
        "except OSError as e: print('no-dns', e)\n"
    )
    assert declared.run(["python3", "-c", py]).stdout.startswith("no-dns")


def iface_ipv4(name: str) -> str:
    """The IPv4 address of a host interface (SIOCGIFADDR), without any tool."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
    return socket.inet_ntoa(packed[20:24])


@pytest.fixture
def host_decoy(docker_client: Any) -> Iterator[tuple[str, int, list[int]]]:
    """A TCP server on the host's own Docker bridge address, counting connections."""
    bridge = docker_client.networks.get("bridge").attrs
    gateway = bridge["IPAM"]["Config"][0].get("Gateway") or iface_ipv4(
        bridge["Options"].get("com.docker.network.bridge.name", "docker0")
    )
    srv = socket.socket()
    srv.bind((gateway, 0))
    srv.listen()
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield gateway, srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def test_host_and_other_containers_are_unreachable(
    declared: Any, fake_upstream: Any, host_decoy: tuple[str, int, list[int]]
) -> None:
    host_ip, port, hits = host_decoy
    probe = (
        "import socket,sys\n"
        "for host,port in [(sys.argv[1],int(sys.argv[2])),(sys.argv[3],443)]:\n"
        "    try:\n"
        "        socket.create_connection((host,port),3); print('REACHED',host)\n"
        "    except OSError as e: print('blocked',host,e.errno)\n"
    )
    r = declared.run(["python3", "-c", probe, host_ip, str(port), upstream_ip(fake_upstream)])
    assert "REACHED" not in r.stdout and r.stdout.count("blocked") == 2
    assert hits == []


def test_key_proxy_upstream_goes_through_egress_to_the_pinned_domain_only(
    vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any
) -> None:
    vault.add("anthropic", random_key)
    fake_upstream.reply("/*", json_body={"ok": True})
    sb = sandbox_factory(keys=["anthropic"])
    r = sb.run('curl -sS -H "x-api-key: $ANTHROPIC_API_KEY" "$ANTHROPIC_BASE_URL/v1/messages"')
    assert json.loads(r.stdout) == {"ok": True}
    allowed = [d for d in decisions(sb) if d["decision"] == "allow" and d["event"] == "connect"]
    assert [(d["host"], d["listener"]) for d in allowed] == [("api.anthropic.com", "keys")]
    # The agent itself may not use that domain directly: it is the proxy's, not the agent's.
    assert "api.anthropic.com" not in sb.config.egress.agent_allowlist()


def test_key_proxy_holds_its_upstream_socket_and_the_log_counts_the_bytes(
    vault: Any, random_key: str, fake_upstream: Any, sandbox_factory: Any
) -> None:
    """The egress proxy hands the key proxy the connected upstream socket (no relay copies
    its bytes), and still logs the tunnel's close with the kernel's byte counts."""
    vault.add("anthropic", random_key)
    body = secrets.token_hex(50_000)  # no pooling: the tunnel ends with the answer
    fake_upstream.reply("/*", body=body, headers={"connection": "close"})
    sb = sandbox_factory(keys=["anthropic"])
    r = sb.run('curl -sS -H "x-api-key: $ANTHROPIC_API_KEY" "$ANTHROPIC_BASE_URL/v1/messages"')
    assert r.stdout == body, r.stderr
    deadline, closed = time.monotonic() + 10, []
    while not closed and time.monotonic() < deadline:
        closed = [d for d in decisions(sb) if d["listener"] == "keys" and d["event"] == "close"]
        time.sleep(0.2)
    assert len(closed) == 1 and closed[0]["given"] is True
    assert len(body) < closed[0]["bytes_down"] < len(body) + 16_384  # TLS records' overhead
    assert 100 < closed[0]["bytes_up"] < 16_384  # the hello and the request, encrypted


def test_registry_auto_allow_follows_pip_config_only_with_setup_command(
    monkeypatch: pytest.MonkeyPatch, fake_upstream: Any, sandbox_factory: Any
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", f"https://{DECOY_DOMAIN}/simple")
    fake_upstream.reply("/simple/*", body="<html></html>")
    without = sandbox_factory(network=[DECLARED])
    assert DECOY_DOMAIN not in without.config.egress.allowlist()
    assert without.run(f"curl -sS -o /dev/null https://{DECOY_DOMAIN}/simple/").exit_code != 0
    with_setup = sandbox_factory(network=[DECLARED], setup_command="true")
    assert DECOY_DOMAIN in with_setup.config.egress.allowlist()
    assert "codeload.github.com" not in with_setup.config.egress.allowlist()
    r = with_setup.run(f"curl -sS https://{DECOY_DOMAIN}/simple/")
    assert r.stdout == "<html></html>"


def test_nothing_declared_means_no_network_at_all(sandbox: Any, fake_upstream: Any) -> None:
    assert sandbox.sidecar is None
    assert "HTTPS_PROXY" not in sandbox.env
    r = sandbox.run(f"ls /sys/class/net; curl -sS -m 5 https://{DECLARED}/")
    assert r.stdout.split() == ["lo"] and r.exit_code != 0
    assert "no network" in sandbox.config.egress.describe().lower()


@pytest.mark.agentbox(network_unrestricted=True)
def test_network_unrestricted_has_no_filter_and_says_so(sandbox: Any, fake_upstream: Any) -> None:
    fake_upstream.reply("/*", body="direct")
    ip = upstream_ip(fake_upstream)
    r = sandbox.run(f"curl -sS -k https://{ip}/")  # an IP literal: only unfiltered allows it
    assert r.stdout == "direct"
    assert "UNRESTRICTED" in sandbox.config.egress.describe().upper()


@pytest.mark.agentbox_network(DECLARED)
def test_network_marker_adds_a_domain(sandbox: Any, fake_upstream: Any) -> None:
    fake_upstream.reply("/*", body="marker ok")
    assert sandbox.run(f"curl -sS https://{DECLARED}/").stdout == "marker ok"


def test_wildcard_matches_on_label_boundary(fake_upstream: Any, sandbox_factory: Any) -> None:
    fake_upstream.reply("/*", body="wild")
    sb = sandbox_factory(network=["*.github.com"])
    assert sb.run(f"curl -sS https://{DECLARED}/").stdout == "wild"
    assert sb.run(f"curl -sS -o /dev/null https://{DECOY_DOMAIN}/").exit_code != 0


def tiny_wheel() -> bytes:
    """A valid pure-Python wheel built in memory (nothing downloaded to make it)."""
    import hashlib
    import io
    import zipfile

    files = {
        "demo_pkg/__init__.py": b"VALUE = 42\n",
        "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("demo_pkg-1.0.dist-info/RECORD,,")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("demo_pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return buf.getvalue()


def test_pip_download_from_a_declared_index_uses_only_the_sandbox_environment(
    fake_upstream: Any, sandbox_factory: Any
) -> None:
    index = "pypi.agentbox.test"
    wheel = "demo_pkg-1.0-py3-none-any.whl"
    page = f'<html><body><a href="https://{index}/files/{wheel}">{wheel}</a></body></html>'
    fake_upstream.program(
        [
            {"method": "GET", "path": "/simple/demo-pkg/", "body": page,
             "headers": {"content-type": "text/html"}},
            {"method": "GET", "path": f"/files/{wheel}",
             "body_b64": base64.b64encode(tiny_wheel()).decode()},
        ]
    )  # fmt: skip
    sb = sandbox_factory(network=[index])
    r = sb.run(
        f"python3 -m pip download --no-deps --disable-pip-version-check -d ~/dl "
        f"--index-url https://{index}/simple demo-pkg && ls ~/dl",
        timeout=120,
    )
    assert r.exit_code == 0, r.stdout + r.stderr
    assert wheel in r.stdout
    hosts = {d["host"] for d in decisions(sb) if d["decision"] == "allow"}
    assert hosts == {index}


def test_a_failing_sidecar_leaves_nothing_behind_and_says_why(
    make_sandbox: Any, docker_client: Any
) -> None:
    # The sidecar starts in a thread beside the sandbox's own setup: when it fails, the
    # error is the sidecar's, and the sandbox container and shared volume go too.
    run_id = secrets.token_hex(8)
    missing = f"agentbox-test-missing-{run_id}"
    policy = compute_policy(
        declared=["example.test"], key_domains=[], has_setup_command=False, unrestricted=False
    )
    with pytest.raises(EgressError, match=f"egress network '{missing}' does not exist"):
        make_sandbox(egress=policy, egress_network=missing, run_id=run_id)
    assert ours(docker_client, run_id) == []
