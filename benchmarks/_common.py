"""Shared helpers of the network and state benchmarks (not a benchmark itself).

Every benchmark keeps all traffic on this machine: the "internet" is a
:class:`~pytest_agentbox.backends.docker.fakeupstream.FakeUpstream` on an internal Docker network.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pytest_agentbox.backends.docker.fakeupstream import FakeUpstream
from pytest_agentbox.policy.egress import compute_policy
from pytest_agentbox.policy.manifest import KNOWN_PROVIDERS, KeyRoute
from pytest_agentbox.sandbox import Sandbox, SandboxConfig

DOMAIN = "api.openai.com"
MB = 1024 * 1024
# Inserted into tool sources by the diagnostic patches below.
_NODELAY = "socket.IPPROTO_TCP, socket.TCP_NODELAY, 1"


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least pct% of values <= it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def start_upstream(client: Any, image: str) -> FakeUpstream:
    """The fake provider answering for ``api.openai.com`` on its own internal network."""
    return FakeUpstream([DOMAIN], image=image, client=client).start()


def openai_route() -> KeyRoute:
    info = KNOWN_PROVIDERS["openai"]
    return KeyRoute(
        provider="openai",
        env_var=info.env_var,
        base_url_env=info.base_url_env,
        domain=info.domain,
        auth_style=info.auth_style,
        base_path=info.base_path,
        required=True,
    )


def egress_sandbox(
    client: Any, image: str, upstream: FakeUpstream, *, keys: bool, unrestricted: bool = False
) -> Sandbox:
    """A sandbox reaching ``api.openai.com`` through egress (or attached directly).

    ``keys`` adds the openai key route with a random throwaway key (never printed).
    """
    routes = (openai_route(),) if keys else ()
    policy = compute_policy(
        declared=[DOMAIN],
        key_domains=[r.domain for r in routes],
        has_setup_command=False,
        unrestricted=unrestricted,
    )
    config = SandboxConfig(
        image=image,
        key_routes=routes,
        keys={"openai": "sk-bench-" + secrets.token_hex(20)} if keys else {},
        egress=policy,
        egress_network=upstream.network_name,
        extra_ca_pem=upstream.ca_pem,
        egress_pins=upstream.pins,
    )
    from pytest_agentbox.backends.docker.box import DockerBackend

    return Sandbox.create(config, DockerBackend.from_client(client))


def run_json(sb: Sandbox, script: str, *args: str, timeout: float = 120.0) -> Any:
    """Run a Python client inside the sandbox and parse the JSON on its last stdout line."""
    result = sb.run(["python3", "-c", script, *args], timeout=timeout)
    if not result.ok:
        raise RuntimeError(f"in-sandbox client failed ({result.exit_code}): {result.stderr[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# The in-sandbox client of the network benchmarks: stdlib only, so docker exec and
# interpreter start-up are paid once per batch and never counted per request.
#   argv: MODE ACTION PATH N
#   MODE   direct  -> https://api.openai.com through $HTTPS_PROXY when set, else dialled
#          proxied -> http://127.0.0.1:PORT from $OPENAI_BASE_URL with the session token
#   ACTION latency   -> N requests, a new connection each (the key proxy serves one
#                       request per connection, so both sides do the same work)
#          keepalive -> N requests on one connection (direct only; informational)
#          download  -> one request, body read in 1 MiB pieces
# Prints one JSON line: a list of per-request seconds, or {"bytes": B, "seconds": S}.
CLIENT = r"""
import http.client, json, os, ssl, sys, time
from urllib.parse import urlsplit
mode, action, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context()  # honours SSL_CERT_FILE: the bundle with the test CA
proxy = os.environ.get("HTTPS_PROXY")
def connect():
    if mode == "proxied":
        u = urlsplit(os.environ["OPENAI_BASE_URL"])
        auth = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
        return http.client.HTTPConnection(u.hostname, u.port, timeout=60), auth
    if proxy:
        u = urlsplit(proxy)
        c = http.client.HTTPSConnection(u.hostname, u.port, timeout=60, context=ctx)
        c.set_tunnel("api.openai.com", 443)
        return c, {}
    return http.client.HTTPSConnection("api.openai.com", 443, timeout=60, context=ctx), {}
def one(c, h):
    c.request("GET", path, headers=h)
    r = c.getresponse()
    body = r.read()
    if r.status != 200:
        raise SystemExit("status %d: %r" % (r.status, body[:200]))
    return body
if action == "download":
    t, cpu = time.perf_counter(), time.process_time()
    c, h = connect()
    c.request("GET", path, headers=h)
    r = c.getresponse()
    buf, total = bytearray(1 << 20), 0
    while True:
        k = r.readinto(buf)
        if not k:
            break
        total += k
    c.close()
    cpu = time.process_time() - cpu
    print(json.dumps({"bytes": total, "seconds": time.perf_counter() - t, "status": r.status,
                      "cpu": cpu}))
    raise SystemExit(0)
times = []
if action == "keepalive":
    c, h = connect()
    for i in range(5 + n):
        t = time.perf_counter()
        one(c, h)
        if i >= 5:
            times.append(time.perf_counter() - t)
    c.close()
else:
    for i in range(5 + n):  # 5 warm-up requests, not recorded
        t = time.perf_counter()
        c, h = connect()
        one(c, h)
        c.close()
        if i >= 5:
            times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def upstream_nodelay(upstream: FakeUpstream) -> None:
    """Diagnostic only: restart the fake upstream with TCP_NODELAY on its sockets.

    The shipped server writes a response head and body (and TLS 1.3 tickets) in
    separate small segments with Nagle on; against the client's delayed ACK that costs
    ~40 ms per fresh connection, which would swamp what the benchmarks measure. The
    patched copy lives only in this container; the product file is untouched.
    """
    from pytest_agentbox.backends import tools
    from pytest_agentbox.backends.docker import fakeupstream as fu

    path = Path(fu.__file__).parent / "upstream_server.py"
    anchor = "        self.request.settimeout(30)\n"
    source = path.read_text()
    if anchor not in source:
        raise RuntimeError("upstream_server.py changed; update upstream_nodelay()")
    patched = source.replace(anchor, anchor + f"        self.request.setsockopt({_NODELAY})\n")
    name = f"{fu._DIR.lstrip('/')}/upstream_server.py"
    upstream.container.put_archive("/", tools.tar_bytes([(name, patched.encode(), 0o644)]))
    upstream.container.restart(timeout=1)
    upstream._wait_healthy()


# (tool, anchor line, line inserted after it): TCP_NODELAY on the sockets that relay
# small TLS records or write a response head and body separately.
# Empty since the shipped forwarder, egress proxy and key proxy set TCP_NODELAY on their
# TCP legs themselves; kept as the place to try the next such patch without editing them.
_TOOL_PATCHES: tuple[tuple[str, str, str], ...] = ()


@contextlib.contextmanager
def nodelay_tools() -> Iterator[None]:
    """Diagnostic only: sandboxes created inside get TCP_NODELAY in forwarder and key proxy.

    Swaps the in-process function that reads the root tools shipped into a sandbox,
    so the suggested fix can be measured without editing the product files.
    """
    from pytest_agentbox.backends import tools

    original = tools.tool_source

    def patched(name: str) -> bytes:
        source = original(name).decode()
        for tool, anchor, line in _TOOL_PATCHES:
            if tool == name:
                if anchor not in source:
                    raise RuntimeError(f"{tool} changed; update _TOOL_PATCHES")
                source = source.replace(anchor, anchor + line)
        return source.encode()

    tools.tool_source = patched  # type: ignore[assignment]
    try:
        yield
    finally:
        tools.tool_source = original  # type: ignore[assignment]
