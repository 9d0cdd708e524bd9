"""The sandbox's sidecar: a container of its own that holds the keys and the network.

The agent's container has no network and no key. It shares one Docker volume with this
sidecar, holding root-only Unix sockets: one for the egress proxy (which checks every
requested host name against the allowlist before connecting) and one per key route
(the key proxy, which holds the real keys in its own PID and mount namespace and
connects upstream through the sidecar's egress proxy). The sidecar's main process is
``supervisor.py``; its stdin is the owner's attach socket, so the sidecar and its keys
end when the owning process does.
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from pytest_agentbox import paths
from pytest_agentbox.backends import tools
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.errors import EgressError, KeyProxyError

SOCKET_DIR = "/run/egress"
DECISIONS_LOG = "/var/log/agentbox-egress.jsonl"
KEYS_EGRESS_SOCKET = "/run/agentbox-keys-egress.sock"


# Egress networks seen to exist, as (engine URL, name): checked once per engine, not
# once per sandbox.
_NETWORKS_SEEN: set[tuple[str, str]] = set()


def check_network(client: Any, name: str) -> None:
    """Refuse an egress network that is missing or not a bridge network of this engine.

    ``host`` would put the sidecar (or an unrestricted agent) in the host's own network
    namespace, ``none``/``container:...`` in no or someone else's; only a bridge network
    gives a namespace of its own with a route out.
    """
    from docker.errors import NotFound

    if (engine.engine_key(client), name) in _NETWORKS_SEEN:
        return
    hint = "Choose another with --agentbox-egress-network / agentbox_egress_network."
    if name in ("host", "none", "default") or name.startswith("container:"):
        raise EgressError(f"egress network {name!r} is not allowed: use a bridge network. {hint}")
    try:
        net = client.networks.get(name)
    except NotFound:
        raise EgressError(
            f"egress network {name!r} does not exist on this Docker engine. "
            f"Create it (`docker network create NAME`) or choose another. {hint}"
        ) from None
    driver = net.attrs.get("Driver")
    if driver != "bridge":
        raise EgressError(
            f"egress network {name!r} has driver {driver!r}: only bridge networks give the "
            f"sidecar a network namespace of its own. {hint}"
        )
    _NETWORKS_SEEN.add((engine.engine_key(client), name))


KEYPROXY_LOG = "/var/log/agentbox-keyproxy.jsonl"


@dataclass
class Sidecar:
    """A running sidecar: its container, the owner channel, and what its daemons said
    (a :class:`~pytest_agentbox.backends.base.Sidecar`)."""

    container: Any
    channel: socket.socket
    ready: dict[str, Any] = field(default_factory=dict)
    socket_dir: str = SOCKET_DIR

    @property
    def id(self) -> str:
        """The sidecar container's id."""
        return str(self.container.id)

    def key_socket(self, provider: str) -> str:
        """The sidecar's Unix socket (a path on the shared volume) for one key route."""
        return str(self.ready["keys"]["sockets"][provider])

    def handoff_socket(self) -> str | None:
        """The supervisor's one-time socket for the forwarder's listeners (shared volume)."""
        return self.ready.get("handoff")

    def decisions(self) -> str:
        """The egress decision log (see :func:`decisions`)."""
        return decisions(self)

    def key_requests(self) -> str:
        """The key proxy's request log (see :func:`key_requests`)."""
        return key_requests(self)

    def close(self) -> None:
        """Drop the owner channel: the supervisor exits and the container stops."""
        with contextlib.suppress(OSError):
            self.channel.close()

    def remove(self) -> None:
        """Remove the container (and its anonymous volumes); never raises."""
        with contextlib.suppress(Exception):
            self.container.remove(force=True, v=True)


def start(
    client: Any,
    config: Any,
    owner: paths.Owner,
    volume: Any,
    *,
    agent_allow: list[str],
    routes: list[dict[str, Any]],
    token: str,
) -> Sidecar:
    """Start the sidecar on ``volume``; removed again on failure.

    ``agent_allow`` is what the agent may reach (empty: no egress listener for it);
    ``routes`` are the key proxy's routes with their real keys (empty: no key proxy).
    """
    check_network(client, config.egress_network)
    from pytest_agentbox.backends.docker.networks import cached_engine_nets

    refuse = cached_engine_nets(client, config.sidecar_image)
    argv, source = tools.tool_command("supervisor.py")
    container = client.containers.create(
        config.sidecar_image,
        # This box holds the real keys and runs from an image we do not control: the
        # loader must not act on the image's LD_PRELOAD and friends before our code.
        environment=engine.loader_unset(client, config.sidecar_image),
        entrypoint=argv[:1],  # not the image's ENTRYPOINT, nor its HEALTHCHECK
        command=argv[1:],
        healthcheck={"test": ["NONE"]},
        name=paths.unique_name("egress"),
        user="0",
        init=True,
        labels=owner.labels("egress"),
        network=config.egress_network,
        # No config.runtime here: the engine's default runtime. runsc (Debian, 2022-12)
        # starts boxes only without a network, and this box must reach its upstreams.
        volumes={volume.name: {"bind": SOCKET_DIR, "mode": "rw"}},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        # The key proxy may hold 100 MiB bodies and 256 MiB of buffered requests.
        mem_limit="1g",
        pids_limit=1024,  # a thread per tunnel: 256 agent + 64 key proxy + the key proxy's
        # With detach=False the SDK sets StdinOnce: stdin ends when our attach does.
        stdin_open=True,
        detach=False,
    )
    channel = None
    try:
        channel = engine.attach(client, container.id)
        container.start()
        cfg = _config(config, agent_allow, routes, token, refuse)
        channel.sendall(source + json.dumps(cfg).encode() + b"\n")
        ready = engine.read_ready(channel)
        if not ready.get("ready"):
            why = ready.get("error") or "no ready line"
            err = KeyProxyError if routes else EgressError
            raise err(f"the sandbox's sidecar did not start: {why}")
    except BaseException:
        if channel is not None:
            channel.close()
        container.remove(force=True)
        raise
    return Sidecar(container, channel, ready)


def _config(
    config: Any,
    agent_allow: list[str],
    routes: list[dict[str, Any]],
    token: str,
    refuse: list[str],
) -> dict[str, Any]:
    policy = config.egress
    deny = list(policy.denylist()) if policy is not None else []
    listeners: list[dict[str, Any]] = []
    if agent_allow:
        listeners.append({"name": "agent", "unix": f"{SOCKET_DIR}/egress.sock", "mode": 0o600,
                          "allow": list(agent_allow), "deny": deny})  # fmt: skip
    if routes:  # the key proxy's own way out: its pinned domains and nothing else
        domains = sorted({r["domain"] for r in routes})
        # On this box's own file system: no agent-side mount holds it.
        # "give": the key proxy gets the checked upstream socket itself, so no relay copies
        # the bytes it decrypts and scans anyway (a socket only our own code ever holds).
        listeners.append({"name": "keys", "unix": KEYS_EGRESS_SOCKET, "allow": domains,
                          "deny": deny, "max_conns": 64, "give": True})  # fmt: skip
    egress = {
        "listeners": listeners,
        "ports": [80, 443],
        "log_path": DECISIONS_LOG,
        "log_max_bytes": 8 * 1024 * 1024,
        "max_conns": 256,
        # Test fakes by exact name -> address, no DNS; nothing else gets a hole.
        "pins": dict(config.egress_pins or {}),
        "private_ok": list(policy.private_domains) if policy is not None else [],
        "refuse_nets": refuse,
    }
    keys = None
    if routes:
        keys = {
            "token": token,
            "routes": [dict(r, unix=f"{SOCKET_DIR}/key-{r['name']}.sock") for r in routes],
            "upstream_port": 443,
            "ca_pem": config.extra_ca_pem,
            "log_path": KEYPROXY_LOG,
        }
    needed = ("egressproxy.py", "keyproxy.py") if routes else ("egressproxy.py",)
    sources = {n: tools.tool_source(n).decode() for n in needed}
    return {"boot": tools.BOOT, "sources": sources, "egress": egress, "keys": keys,
            "handoff": f"{SOCKET_DIR}/handoff.sock"}  # fmt: skip


def decisions(sidecar: Sidecar) -> str:
    """The egress decision log (host, port, allowed or refused, bytes), as JSON lines."""
    data = engine.read_archive_file(sidecar.container, DECISIONS_LOG)
    return (data or b"").decode(errors="replace")


def key_requests(sidecar: Sidecar) -> str:
    """The key proxy's request log (no keys, tokens or query strings), as JSON lines."""
    data = engine.read_archive_file(sidecar.container, KEYPROXY_LOG)
    return (data or b"").decode(errors="replace")
