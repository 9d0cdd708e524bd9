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

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any


def start(boot: str, name: str, args: list, source: str, cfg: dict, pair: Any = None) -> tuple:
    """Start one daemon from its source; returns (process, its ready line as a dict).
    ``pair``: the daemon's end of a socket pair, over which ``hand_over`` passes it the
    agent-side listeners (its number is ``handoff_fd`` in its config)."""
    if pair is not None:
        cfg = dict(cfg, handoff_fd=pair.fileno())
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", boot, name, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=() if pair is None else (pair.fileno(),),
    )
    if pair is not None:
        pair.close()  # the daemon's now
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


def listen(path: str) -> socket.socket:
    """A Unix listener only root reaches (the directory is root's, the socket 0600)."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window in which others could connect
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(1)
    return sock


def hand_over(lsn: socket.socket, path: str, pairs: dict) -> None:
    """Take the agent-side listeners from the sandbox's forwarder, once, and pass each to
    its daemon ("egress:LISTENER" or "keys:ROUTE"). Each must be a listening TCP socket on
    127.0.0.1: the sidecar then accepts, in the agent's network namespace, exactly the
    connections the forwarder would have relayed, and no root process stays there."""
    with lsn:
        conn, _ = lsn.accept()
    os.unlink(path)  # once: nobody hands anything over later
    socks, answer = [], {"ok": True}
    with conn:
        try:
            conn.settimeout(30)
            msg, fds, _, _ = socket.recv_fds(conn, 65536, 16)
            socks = [socket.socket(fileno=fd) for fd in fds]
            names = json.loads(msg)
            if not isinstance(names, list) or len(names) != len(socks):
                raise ValueError("the names do not match the listeners")
            by_daemon: dict = {}
            for name, sock in zip(names, socks):
                daemon, _, own = str(name).partition(":")
                accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                local = sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
                if daemon not in pairs or not own or not (accepting and local):
                    raise ValueError(f"{name}: not a 127.0.0.1 listener for this sidecar")
                by_daemon.setdefault(daemon, []).append((own, sock.fileno()))
            for daemon, given in by_daemon.items():
                message = json.dumps([own for own, _ in given]).encode()
                socket.send_fds(pairs[daemon], [message], [fd for _, fd in given])
        except (OSError, ValueError) as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
        finally:
            for sock in socks:
                sock.close()  # the daemons hold their own copies
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(answer).encode())


def main() -> int:
    procs, ours, theirs = [], {}, {}
    try:
        cfg = json.loads(sys.stdin.readline())
        ready: dict = {"ready": True}
        for daemon in ("egress", "keys"):
            if cfg.get(daemon) and cfg.get("handoff"):
                ours[daemon], theirs[daemon] = socket.socketpair()
        if cfg.get("egress"):
            proc, ready["egress"] = start(
                cfg["boot"], "egressproxy.py", ["serve"],
                cfg["sources"]["egressproxy.py"], cfg["egress"], theirs.get("egress"),
            )  # fmt: skip
            procs.append(proc)
        if cfg.get("keys"):
            keys = dict(cfg["keys"], owner_stdin=True)
            # Its way out is the egress listener "keys", on a Unix socket of this box only.
            lsns = (cfg.get("egress") or {}).get("listeners", [])
            outs = [spec for spec in lsns if spec["name"] == "keys"]
            keys["upstream_proxy"] = {"unix": outs[0]["unix"]} if outs else None
            proc, ready["keys"] = start(
                cfg["boot"], "keyproxy.py", [], cfg["sources"]["keyproxy.py"], keys,
                theirs.get("keys"),
            )  # fmt: skip
            procs.append(proc)
        if ours:
            lsn = listen(cfg["handoff"])
            args = (lsn, cfg["handoff"], ours)
            threading.Thread(target=hand_over, args=args, daemon=True).start()
            ready["handoff"] = cfg["handoff"]
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
