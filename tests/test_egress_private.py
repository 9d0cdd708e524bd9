"""The egress proxy in a real container on an internal Docker network, against decoys.

A declared name that the engine's DNS (a network alias) resolves to a decoy container's
private address is refused and logged with its class; one resolving (through the proxy
container's hosts file) to the engine host's bridge address, where a decoy listens, is
refused the same way; a name opted in with ``private_ok`` reaches its decoy, unless that
address is one of the engine's own networks (``refuse_nets`` from
``networks.engine_private_nets``). Networks are ``internal``: nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_agentbox import paths
from pytest_agentbox.backends import tools
from pytest_agentbox.backends.docker import engine, networks

DECOY_NAME = "decoy.private.example.test"
OPTED_NAME = "opted.private.example.test"
HOSTGW_NAME = "hostgw.private.example.test"
LOG = "/tmp/egress.jsonl"
DECOY_SERVER = (
    "import socket\n"
    "s=socket.create_server(('0.0.0.0',8080))\n"
    "while True:\n"
    " c,_=s.accept(); c.recv(4096)\n"
    " c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\ndecoy'); c.close()\n"
)
# Runs in the proxy's container: one request through the proxy on 127.0.0.1.
CLIENT = (
    "import socket,sys\n"
    "s=socket.create_connection(('127.0.0.1',int(sys.argv[1])),10)\n"
    "s.sendall(('GET http://%s:8080/ HTTP/1.1\\r\\n\\r\\n' % sys.argv[2]).encode())\n"
    "d=b''\n"
    "while True:\n"
    " c=s.recv(65536)\n"
    " if not c: break\n"
    " d+=c\n"
    "sys.stdout.write(d.decode(errors='replace'))\n"
)


@pytest.fixture
def private_net(docker_client: Any, base_image: str) -> Iterator[dict[str, Any]]:
    """An internal network with a decoy container answering for two aliases."""
    owner = paths.Owner.current(paths.token())
    labels = owner.labels("egress-private-test")
    net = docker_client.networks.create(
        paths.unique_name("net"), driver="bridge", internal=True, labels=labels
    )
    made: list[Any] = []
    try:
        endpoint = docker_client.api.create_endpoint_config(aliases=[DECOY_NAME, OPTED_NAME])
        decoy = docker_client.containers.create(
            base_image, command=["python3", "-c", DECOY_SERVER], name=paths.unique_name("decoy"),
            labels=labels, network=net.name, networking_config={net.name: endpoint},
            cap_drop=["ALL"], security_opt=["no-new-privileges"], user="65534", detach=True,
        )  # fmt: skip
        made.append(decoy)
        decoy.start()
        decoy.reload()
        ip = decoy.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        net.reload()
        gateway = ((net.attrs.get("IPAM") or {}).get("Config") or [{}])[0].get("Gateway")
        yield {"net": net, "decoy_ip": ip, "gateway": gateway, "labels": labels, "made": made}
    finally:
        for c in made:
            with contextlib.suppress(Exception):
                c.remove(force=True)
        net.remove()


def start_proxy(client: Any, image: str, env: dict[str, Any], cfg: dict[str, Any]) -> Any:
    """``egressproxy.py serve`` in a container on the private network, config on stdin."""
    argv, source = tools.tool_command("egressproxy.py", "serve")
    extra_hosts = {HOSTGW_NAME: env["gateway"]} if env["gateway"] else {}
    container = client.containers.create(
        image, command=argv, name=paths.unique_name("egress-test"), labels=env["labels"],
        network=env["net"].name, cap_drop=["ALL"], security_opt=["no-new-privileges"],
        extra_hosts=extra_hosts, stdin_open=True, detach=False,
    )  # fmt: skip
    env["made"].append(container)
    channel = engine.attach(client, container.id)
    container.start()
    channel.sendall(source + json.dumps(cfg).encode() + b"\n")
    ready = engine.read_ready(channel)
    assert ready.get("ready") is True, ready
    container.channel = channel  # stdin stays open: closing it is harmless, but keep it
    return container, ready["tcp_ports"]["agent"]


def through(client: Any, container: Any, port: int, host: str) -> str:
    cmd = ["python3", "-c", CLIENT, str(port), host]
    out = engine.exec_run(client, container.id, cmd, user="65534", timeout=60)
    return out.stdout.decode(errors="replace")


def decisions(container: Any) -> list[dict[str, Any]]:
    data = engine.read_archive_file(container, LOG) or b""
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def config(**top: Any) -> dict[str, Any]:
    allow = [DECOY_NAME, OPTED_NAME, HOSTGW_NAME]
    return {"listeners": [{"name": "agent", "tcp": ["127.0.0.1", 0], "allow": allow}],
            "ports": [8080], "log_path": LOG, **top}  # fmt: skip


def test_dns_answer_pointing_at_a_private_container_is_refused_and_logged(
    docker_client: Any, base_image: str, private_net: dict[str, Any]
) -> None:
    proxy, port = start_proxy(docker_client, base_image, private_net, config())
    reply = through(docker_client, proxy, port, DECOY_NAME)
    assert reply.startswith("HTTP/1.1 403") and "decoy" not in reply.split("\r\n\r\n", 1)[1]
    (rec,) = [r for r in decisions(proxy) if r["host"] == DECOY_NAME]
    assert (rec["decision"], rec["class"], rec["address"]) == (
        "deny",
        "rfc1918",
        private_net["decoy_ip"],
    )
    assert rec["reason"] == "resolves to rfc1918 address"


def test_private_ok_name_reaches_its_decoy_but_engine_networks_stay_closed(
    docker_client: Any, base_image: str, private_net: dict[str, Any]
) -> None:
    proxy, port = start_proxy(docker_client, base_image, private_net,
                              config(private_ok=[OPTED_NAME]))  # fmt: skip
    assert through(docker_client, proxy, port, OPTED_NAME).endswith("decoy")
    assert through(docker_client, proxy, port, DECOY_NAME).startswith("HTTP/1.1 403")
    recs = [r for r in decisions(proxy) if r["event"] == "connect"]
    assert [(r["host"], r["decision"], r["class"]) for r in recs] == [
        (OPTED_NAME, "allow", "rfc1918"), (DECOY_NAME, "deny", "rfc1918")]  # fmt: skip
    # With the engine's own networks refused, as the sidecar runs it, even private_ok is no way in.
    nets = networks.engine_private_nets(docker_client)
    decoy_ip = ipaddress.ip_address(private_net["decoy_ip"])
    assert any(decoy_ip in ipaddress.ip_network(n) for n in nets)
    proxy2, port2 = start_proxy(docker_client, base_image, private_net,
                                config(private_ok=[OPTED_NAME], refuse_nets=nets))  # fmt: skip
    assert through(docker_client, proxy2, port2, OPTED_NAME).startswith("HTTP/1.1 403")
    (rec,) = decisions(proxy2)
    assert (rec["decision"], rec["class"]) == ("deny", "engine-network")


def host_decoy(ip: str) -> tuple[socket.socket, list[int]] | None:
    """A decoy on this machine at the network's gateway address (the engine host's side of
    the bridge); None when the engine is not this machine."""
    try:
        sock = socket.create_server((ip, 8080))
    except OSError:
        return None
    hits: list[int] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = sock.accept()
                hits.append(1)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock, hits


def test_name_resolving_to_the_engine_hosts_bridge_address_is_refused(
    docker_client: Any, base_image: str, private_net: dict[str, Any]
) -> None:
    gateway = private_net["gateway"]
    if not gateway:
        pytest.skip("the internal network has no gateway address")
    decoy = host_decoy(gateway)
    if decoy is None:
        pytest.skip("the engine host is not this machine: no decoy on its bridge address")
    sock, hits = decoy
    try:
        nets = networks.engine_private_nets(docker_client, host_image=base_image)
        assert f"{gateway}/32" in nets
        for top in ({}, {"private_ok": [HOSTGW_NAME], "refuse_nets": nets}):
            proxy, port = start_proxy(docker_client, base_image, private_net, config(**top))
            assert through(docker_client, proxy, port, HOSTGW_NAME).startswith("HTTP/1.1 403")
            (rec,) = decisions(proxy)
            assert rec["address"] == gateway
            assert rec["class"] == ("engine-network" if top else "rfc1918")
        time.sleep(0.5)
        assert hits == []
    finally:
        sock.close()
