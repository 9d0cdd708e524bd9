"""pytest-agentbox: hardened Docker sandboxes for testing AI agents (untrusted code).

The pytest plugin lives in :mod:`pytest_agentbox.plugin.hooks`; everything else is usable
without pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_agentbox.errors import (
    AgentboxError,
    DockerUnavailable,
    HardeningError,
    ImageMissing,
    KeyMissing,
    ManifestError,
    SetupCommandFailed,
    VaultError,
)

if TYPE_CHECKING:
    from pytest_agentbox.sandbox import CommandResult, Sandbox, SandboxConfig, Spawned

__version__ = "0.2.0"

_FROM_SANDBOX = ("CommandResult", "Sandbox", "SandboxConfig", "Spawned")


def __getattr__(name: str) -> Any:
    # Loaded on first use: the pytest plugin imports this package in every test run of
    # the environment, and the sandbox code pulls in pydantic.
    if name in _FROM_SANDBOX:
        from pytest_agentbox import sandbox

        return getattr(sandbox, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AgentboxError",
    "CommandResult",
    "DockerUnavailable",
    "HardeningError",
    "ImageMissing",
    "KeyMissing",
    "ManifestError",
    "Sandbox",
    "SandboxConfig",
    "SetupCommandFailed",
    "Spawned",
    "VaultError",
]
