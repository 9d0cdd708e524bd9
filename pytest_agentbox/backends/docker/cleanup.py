"""Removal of what crashed runs left behind: only our objects, only of dead owners.

Every container, network and volume we create carries labels naming the owning host,
pid and process start time. A later run (or ``agentbox gc``) removes those whose owner
is gone, on every engine of the run. Objects without our labels, and objects of live
owners, are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

from pytest_agentbox import paths


@dataclass(frozen=True)
class Leaked:
    """One object of a dead owner: its kind, name, owner pid and engine URL."""

    kind: str  # container | network | volume
    name: str
    owner: str
    engine: str = ""


def _dead(labels: dict[str, str]) -> bool:
    return labels.get(paths.LABEL_MANAGED) == "1" and not paths.owner_alive(
        labels.get(paths.LABEL_OWNER_HOST, ""),
        labels.get(paths.LABEL_OWNER_PID, ""),
        labels.get(paths.LABEL_OWNER_START, ""),
    )


def find_leaked(client: Any, run_id: str | None = None) -> list[tuple[Leaked, Any]]:
    """Our objects whose owning process is gone, containers first (they hold the rest);
    with ``run_id``, only that run's."""
    labels = [f"{paths.LABEL_MANAGED}=1"]
    if run_id:
        labels.append(f"{paths.LABEL_RUN}={run_id}")
    flt: dict[str, Any] = {"label": labels}
    found: list[tuple[Leaked, Any]] = []
    # ignore_removed: the SDK fetches each listed container again, and one that another
    # process removes in between would otherwise fail the whole clean-up (NotFound).
    for c in client.containers.list(all=True, filters=flt, ignore_removed=True):
        if _dead(c.labels):
            found.append((Leaked("container", c.name, c.labels[paths.LABEL_OWNER_PID]), c))
    for n in client.networks.list(filters=flt):
        if _dead(n.attrs.get("Labels") or {}):
            found.append((Leaked("network", n.name, n.attrs["Labels"][paths.LABEL_OWNER_PID]), n))
    for v in client.volumes.list(filters=flt):
        if _dead(v.attrs.get("Labels") or {}):
            found.append((Leaked("volume", v.name, v.attrs["Labels"][paths.LABEL_OWNER_PID]), v))
    return found


def collect(client: Any, *, dry_run: bool = False, run_id: str | None = None) -> list[Leaked]:
    """Remove (or with ``dry_run`` only list) leaked objects of dead owners on ``client``'s
    engine (each :class:`Leaked` names it); with ``run_id``, only that run's."""
    from pytest_agentbox.backends.docker.engine import engine_key

    where = engine_key(client)
    done: list[Leaked] = []
    for found, obj in find_leaked(client, run_id):
        leaked = dataclasses.replace(found, engine=where)
        if not dry_run:
            with contextlib.suppress(Exception):
                if leaked.kind == "container":
                    obj.remove(force=True, v=True)
                elif leaked.kind == "volume":
                    obj.remove(force=True)
                else:
                    obj.remove()
        done.append(leaked)
    return done
