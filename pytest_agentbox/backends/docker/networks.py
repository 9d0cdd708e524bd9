"""What the egress proxy must refuse, asked of the Docker engine: its own address ranges.

The policy (:mod:`pytest_agentbox.policy.egress`) stays pure; this is the engine's side
of it, read once per engine and process.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

from pytest_agentbox.backends.docker.engine import engine_key
from pytest_agentbox.policy.egress import parse_host_addresses

# The engine's own ranges, per engine URL: read once per process and engine (one
# throwaway container each); an engine's ranges say nothing about another engine's.
_ENGINE_NETS: dict[str, list[str]] = {}
_ENGINE_NETS_LOCK = threading.Lock()


def cached_engine_nets(client: Any, image: str) -> list[str]:
    """:func:`engine_private_nets` of ``client``'s engine with its host's addresses, read
    once per engine and process."""
    key = engine_key(client)
    with _ENGINE_NETS_LOCK:
        if key in _ENGINE_NETS:
            return _ENGINE_NETS[key]
    nets = engine_private_nets(client, host_image=image)
    with _ENGINE_NETS_LOCK:
        return _ENGINE_NETS.setdefault(key, nets)


def engine_private_nets(client: Any, *, host_image: str | None = None) -> list[str]:
    """The engine's own ranges, for the egress proxy's ``refuse_nets``: every subnet and
    gateway of every network it knows (bridges, user networks, other tests' internal
    networks) and, with ``host_image``, every address of the engine host itself (read in a
    throwaway container in the host's network namespace, so a remote engine works too).

    A network made later is not in it, but a sidecar's view is taken when it starts.
    """
    nets: set[str] = set()
    for network in client.networks.list():
        for cfg in (network.attrs.get("IPAM") or {}).get("Config") or []:
            for key in ("Subnet", "Gateway", "IPRange"):
                if cfg.get(key):
                    nets.add(str(ipaddress.ip_network(cfg[key], strict=False)))
    if host_image is not None:
        nets.update(
            f"{ip}/{32 if '.' in ip else 128}" for ip in engine_host_addresses(client, host_image)
        )
    return sorted(nets)


def engine_host_addresses(client: Any, image: str) -> list[str]:
    """Every local address of the engine host (IPv4 from /proc/net/fib_trie, IPv6 from
    /proc/net/if_inet6), read by ``cat`` in a container on the host's network."""
    out = client.containers.run(
        image, ["cat", "/proc/net/fib_trie", "/proc/net/if_inet6"], network_mode="host",
        cap_drop=["ALL"], security_opt=["no-new-privileges"], user="65534", remove=True,
        labels={"agentbox.role": "host-addresses"},
    )  # fmt: skip
    return parse_host_addresses(out.decode(errors="replace"))
