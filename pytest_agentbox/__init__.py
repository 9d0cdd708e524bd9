"""pytest-agentbox: hardened Docker sandboxes for testing AI agents (untrusted code).

The pytest plugin lives in :mod:`pytest_agentbox.plugin`; everything else is usable
without pytest.
"""

from __future__ import annotations

from .errors import (
    AgentboxError,
    DockerUnavailable,
    HardeningError,
    ImageMissing,
    KeyMissing,
    ManifestError,
    SetupCommandFailed,
    VaultError,
)
from .sandbox import CommandResult, Sandbox, SandboxConfig, Spawned

__version__ = "0.2.0"

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
