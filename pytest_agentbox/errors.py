"""Errors a user can meet, each with a message that says what is wrong and how to fix it.

Every error the plugin raises on purpose derives from :class:`AgentboxError`, so the
plugin can show it as one readable line instead of a library traceback.
"""

from __future__ import annotations


class AgentboxError(Exception):
    """Base class of every error pytest-agentbox raises on purpose."""


class ManifestError(AgentboxError):
    """The agent manifest (agent.yaml) is missing, unreadable or breaks a rule."""


class DockerUnavailable(AgentboxError):
    """No Docker engine answers."""


class ImageMissing(AgentboxError):
    """The configured sandbox image is not on the engine."""


class HardeningError(AgentboxError):
    """A root hardening step failed; the sandbox is not handed out (fail closed)."""


class SetupCommandFailed(AgentboxError):
    """The manifest's setup_command exited non-zero."""


class KeyMissing(AgentboxError):
    """A key a test requires is not in the vault."""


class VaultError(AgentboxError):
    """The key vault or its secret is unreadable, corrupted, foreign or too permissive."""


class KeyProxyError(AgentboxError):
    """The in-sandbox key proxy did not start."""


class EgressError(AgentboxError):
    """The egress proxy sidecar did not start (or its network does not exist)."""


class StateError(AgentboxError):
    """Persisted state could not be stored or restored."""
