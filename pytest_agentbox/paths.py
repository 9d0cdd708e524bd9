"""Unique names and paths, safe under pytest-xdist and across concurrent runs.

Every Docker object and every temp path carries ``secrets.token_hex(8)`` so that no two
workers, runs or sandboxes can collide and no path inside a sandbox is predictable
(seed: "Unique /tmp paths").
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

LABEL_PREFIX = "org.agentbox"
LABEL_MANAGED = f"{LABEL_PREFIX}.managed"
LABEL_RUN = f"{LABEL_PREFIX}.run"
LABEL_WORKER = f"{LABEL_PREFIX}.worker"
LABEL_OWNER_PID = f"{LABEL_PREFIX}.owner-pid"
LABEL_OWNER_START = f"{LABEL_PREFIX}.owner-start"
LABEL_OWNER_HOST = f"{LABEL_PREFIX}.owner-host"
LABEL_ROLE = f"{LABEL_PREFIX}.role"


def token() -> str:
    """16 hex characters of randomness, the suffix of every name we create."""
    return secrets.token_hex(8)


def unique_name(kind: str) -> str:
    """A Docker object name such as ``agentbox-sandbox-gw1-3f2a...``, unique per call."""
    return f"agentbox-{kind}-{worker_id()}-{token()}"


def sandbox_tmp(kind: str) -> str:
    """An unpredictable absolute path under ``/tmp`` for use inside a sandbox."""
    return f"/tmp/agentbox-{kind}-{token()}"


def worker_id() -> str:
    """The pytest-xdist worker id (``gw0`` ...) or ``main`` outside xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def process_start_time(pid: int) -> str:
    """The kernel's start time of ``pid`` (clock ticks since boot), or "" when unknown.

    Together with the pid it identifies a process even after the pid is reused, which
    is what lets a later run decide that a container's owner is really gone.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            # Field 22; the command name (field 2) may hold spaces, so split after ")".
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_alive(host: str, pid: str, start: str) -> bool:
    """Whether the process that labelled a Docker object still runs.

    Objects made on another host (a shared remote engine) are always treated as alive:
    we cannot see their owner, and removing another machine's sandboxes would be worse
    than leaking them.
    """
    if host != socket.gethostname():
        return True
    try:
        pid_int = int(pid)
        os.kill(pid_int, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return not start or process_start_time(pid_int) == start


@dataclass(frozen=True)
class Owner:
    """Labels that tie a Docker object to the run, worker and process that made it."""

    run_id: str
    worker: str
    pid: int
    start: str
    host: str

    @classmethod
    def current(cls, run_id: str) -> Owner:
        pid = os.getpid()
        return cls(run_id, worker_id(), pid, process_start_time(pid), socket.gethostname())

    def labels(self, role: str) -> dict[str, str]:
        return {
            LABEL_MANAGED: "1",
            LABEL_RUN: self.run_id,
            LABEL_WORKER: self.worker,
            LABEL_OWNER_PID: str(self.pid),
            LABEL_OWNER_START: self.start,
            LABEL_OWNER_HOST: self.host,
            LABEL_ROLE: role,
        }
