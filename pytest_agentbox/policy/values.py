"""What a name or limit may be: one rule each, shared by options, manifest and sandbox."""

from __future__ import annotations

import re
from collections.abc import Mapping

# A leading '-' would be read as an option by anything that shells out.
# Matched whole (fullmatch): with ``$`` a trailing newline would pass.
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
_RUNTIME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The longest time limit taken (7 days): far past any test, and well inside what a
# socket timeout or an interval timer can hold (1e12 s overflows them).
MAX_SECONDS = 7 * 24 * 3600.0

# The manifest's ``runtime.isolation`` names, and the Docker runtime each one means.
ISOLATION_RUNTIMES: Mapping[str, str] = {"gvisor": "runsc", "runc": "runc"}


def check_image_ref(value: str) -> str:
    """``value`` if it is a Docker image reference such as ``python:3.12``, else ValueError."""
    if not _IMAGE_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a Docker image reference such as 'python:3.12'")
    return value


def check_runtime_name(value: str) -> str:
    """``value`` if it can name a Docker runtime (``runc``, ``runsc``), else ValueError."""
    if not _RUNTIME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Docker runtime name such as 'runsc' or 'runc' "
            "(letters, digits, '.', '_', '-'; at most 64)"
        )
    return value


def isolation_runtime(isolation: str | None) -> str | None:
    """The Docker runtime a manifest ``runtime.isolation`` value stands for (gvisor -> runsc)."""
    return None if isolation is None else ISOLATION_RUNTIMES[isolation]
