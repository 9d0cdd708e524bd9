"""The egress sidecar: a container that runs ``egressproxy.py serve`` for one sandbox.

The sandbox has no network of its own. It shares only a Docker volume with this
sidecar, holding a root-only Unix socket; the sidecar is the one attached to a network
and it checks every requested host name against the allowlist before connecting.
"""

from __future__ import annotations

from typing import Any

from . import engine, paths
from .errors import EgressError

SOCKET_DIR = "/run/egress"
DECISIONS_LOG = "/var/log/agentbox-egress.jsonl"


# Egress networks seen to exist in this process: checked once, not once per sandbox.
_NETWORKS_SEEN: set[str] = set()


def _check_network(client: Any, name: str) -> None:
    from docker.errors import NotFound

    try:
        client.networks.get(name)
    except NotFound:
        raise EgressError(
            f"egress network {name!r} does not exist on this Docker engine. "
            "Create it (`docker network create NAME`) or choose another with "
            "--agentbox-egress-network / agentbox_egress_network."
        ) from None
    _NETWORKS_SEEN.add(name)


def create_volume(client: Any, owner: paths.Owner) -> Any:
    """The volume the sandbox and its sidecar share (it holds only the socket)."""
    return client.volumes.create(name=paths.unique_name("egress"), labels=owner.labels("egress"))


def start(client: Any, config: Any, owner: paths.Owner, volume: Any) -> Any:
    """Start the sidecar on ``volume``; returns the container (removed again on failure)."""
    if config.egress_network not in _NETWORKS_SEEN:
        _check_network(client, config.egress_network)
    sidecar = client.containers.create(
        config.image,
        command=["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600; done"],
        name=paths.unique_name("egress"),
        user="0",
        init=True,
        labels=owner.labels("egress"),
        network=config.egress_network,
        volumes={volume.name: {"bind": SOCKET_DIR, "mode": "rw"}},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        mem_limit="256m",
        pids_limit=256,
        detach=True,
    )
    try:
        sidecar.start()
        _serve(client, sidecar, config.egress)
    except BaseException:
        sidecar.remove(force=True)
        raise
    return sidecar


def _serve(client: Any, sidecar: Any, policy: Any) -> None:
    config = {
        "listen_unix": f"{SOCKET_DIR}/egress.sock",
        "listen_tcp": None,
        "allow": list(policy.allowlist()),
        # A declared *.github.com must still not reach codeload.github.com.
        "deny": list(policy.denylist()),
        "ports": [80, 443],
        "log_path": DECISIONS_LOG,
        "socket_mode": 0o600,
    }
    cmd, source = engine.tool_command("egressproxy.py", "serve")
    if not engine.start_daemon(client, sidecar.id, cmd, config, stdin_prefix=source):
        raise EgressError("the egress proxy sidecar did not start (no ready line)")


def decisions(client: Any, sidecar: Any) -> str:
    """The sidecar's decision log (host, port, allowed or refused, bytes), as JSON lines."""
    out = engine.exec_run(client, sidecar.id, ["cat", DECISIONS_LOG], user="0")
    return out.stdout.decode(errors="replace")
