"""Diagnostic: CPU seconds of each process on the key proxy and egress paths per download.

    python benchmarks/diag_cpu_split.py [SIZE_MB] [text]

One keyed sandbox and the local fake upstream (internal Docker network, nothing leaves
the machine). For a direct and a proxied download (as in ``bench_keyproxy.py``, twice
each) it prints MB/s and the CPU seconds (user + system, from ``/proc``) each process
spent meanwhile: the fake upstream, the sidecar's egress proxy and key proxy, the
sandbox's forwarder, counting only processes in this run's three containers (by cgroup:
other sandboxes on a shared machine are left out). The in-sandbox client has exited by then:
it reports its own CPU seconds for the download. ``text``: the body is
``bench_keyproxy.py --body text``'s SSE events instead of ``b"x"`` repeated.
"""

from __future__ import annotations

import base64
import glob
import os
import sys
from typing import Any

from _common import CLIENT, MB, egress_sandbox, run_json, start_upstream
from bench_keyproxy import text_block

from pytest_agentbox.backends.docker import engine
from pytest_agentbox.sandbox import DEFAULT_IMAGE

ROLES = {  # a piece of the command line -> the role shown
    "upstream_server.py": "fake upstream",
    "egressproxy.py forward": "forwarder (sandbox)",
    "egressproxy.py": "egress proxy (sidecar)",
    "keyproxy.py": "key proxy (sidecar)",
}


def cpu_by_pid(ids: tuple[str, ...]) -> dict[str, tuple[str, float]]:
    """pid -> (role, CPU seconds) for the role processes in the containers ``ids``."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(d + "/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(d + "/cgroup") as f:
                cgroup = f.read()
            with open(d + "/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # The sidecar's daemons run from source on stdin: their argv[1] names the tool.
        role = next((r for k, r in ROLES.items() if k in cmd), None)
        if role is not None and any(i in cgroup for i in ids):  # exec'd processes too
            out[d[6:]] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return out


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    client = engine.get_client()
    up = start_upstream(client, DEFAULT_IMAGE)
    try:
        block = text_block() if sys.argv[2:] == ["text"] else b"x"
        rule = {"path": "/v1/big", "body_size": size * MB}
        up.program([{**rule, "block_b64": base64.b64encode(block).decode()}])
        with egress_sandbox(client, DEFAULT_IMAGE, up, keys=True) as sb:
            ids = (up.container.id, sb.container_id, sb.sidecar.id)
            for mode in ("direct", "proxied", "direct", "proxied"):
                before = cpu_by_pid(ids)
                res: Any = run_json(sb, CLIENT, mode, "download", "/v1/big", "1")
                after = cpu_by_pid(ids)
                print(f"{mode} {size} MB: {res['bytes'] / MB / res['seconds']:.0f} MB/s")
                print(f"    {'client (sandbox)':<24} {res['cpu']:5.2f} s")
                for pid, (role, seconds) in sorted(after.items(), key=lambda kv: kv[1][0]):
                    spent = seconds - before.get(pid, (role, 0.0))[1]
                    if spent >= 0.02:
                        print(f"    {role:<24} {spent:5.2f} s")
    finally:
        up.close()


if __name__ == "__main__":
    main()
