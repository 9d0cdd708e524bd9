"""The sidecar's main process: starts the egress and key proxies, lives as long as its owner.

Stdlib only: it runs in the sidecar container (the sandbox's image, which we do not
control), started with its source on stdin (see ``tools.tool_command``), then one JSON
line::

    {"boot": BOOT, "sources": {"egressproxy.py": ..., "keyproxy.py": ...},
     "egress": <egressproxy serve config> | null, "keys": <keyproxy config> | null}

It starts the egress proxy, hands the key proxy the egress listener named "keys" as its
upstream, prints one ready line (or ``{"ready": false, "error": ...}`` carrying the
failing daemon's own message) and then reads its stdin until end-of-file. Its stdin is
the owner's attach socket: when the owning pytest process ends in any way, SIGKILL
included, the engine closes it, this process exits, and with it the container and the
keys it held. Keys reach the key proxy over a pipe, never argv, env or disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def start(boot: str, name: str, args: list, source: str, cfg: dict) -> tuple:
    """Start one daemon from its source; returns (process, its ready line as a dict)."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", boot, name, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    src = source.encode()
    try:
        # The pipe stays open: the key proxy exits when it closes (owner_stdin).
        proc.stdin.write(b"%d\n" % len(src) + src + json.dumps(cfg).encode() + b"\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        ready = json.loads(line) if line.strip() else {}
    except (OSError, ValueError):
        ready = {}
    if not isinstance(ready, dict) or not ready.get("ready"):
        error = ready.get("error") if isinstance(ready, dict) else None
        proc.kill()
        raise RuntimeError(f"{name}: {error or 'exited without a ready line'}")
    return proc, ready


def main() -> int:
    procs = []
    try:
        cfg = json.loads(sys.stdin.readline())
        ready = {"ready": True}
        if cfg.get("egress"):
            proc, ready["egress"] = start(
                cfg["boot"], "egressproxy.py", ["serve"],
                cfg["sources"]["egressproxy.py"], cfg["egress"],
            )  # fmt: skip
            procs.append(proc)
        if cfg.get("keys"):
            keys = dict(cfg["keys"], owner_stdin=True)
            port = ready.get("egress", {}).get("tcp_ports", {}).get("keys")
            keys["upstream_proxy"] = {"host": "127.0.0.1", "port": port} if port else None
            proc, ready["keys"] = start(
                cfg["boot"], "keyproxy.py", [], cfg["sources"]["keyproxy.py"], keys
            )
            procs.append(proc)
    except Exception as exc:  # the config holds keys: only our own texts go out
        for proc in procs:
            proc.kill()
        msg = str(exc) if isinstance(exc, RuntimeError) else type(exc).__name__
        print(json.dumps({"ready": False, "error": msg}), flush=True)
        return 1
    print(json.dumps(ready), flush=True)
    null = os.open(os.devnull, os.O_WRONLY)  # nobody reads our stdout from here on
    os.dup2(null, 1)
    os.dup2(null, 2)
    while sys.stdin.buffer.read(65536):  # until the owner's channel closes
        pass
    for proc in procs:
        proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
