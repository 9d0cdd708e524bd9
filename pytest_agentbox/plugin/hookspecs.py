"""The plugin's own hooks, one per seam (as pytest-xdist does): a ``conftest.py`` or
plugin implements them to change what the plugin builds.

Added with ``pluginmanager.add_hookspecs`` from :func:`pytest_agentbox.plugin.hooks.
pytest_addhooks`; the plugin's default implementations come last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_agentbox.backends.base import Backend


@pytest.hookspec(firstresult=True)
def pytest_agentbox_make_backend(config: pytest.Config, url: str | None) -> Backend | None:
    """The backend sandboxes of this run are made on, for one engine URL.

    ``url`` is an engine of ``--agentbox-engine`` as the user wrote it (``#certs=``
    included), or None for the environment's engine (``DOCKER_HOST``, else the local
    socket). Return a :class:`~pytest_agentbox.backends.base.Backend`, or None to leave
    it to the next implementation; the plugin's own calls
    :func:`~pytest_agentbox.backends.base.backend_for`. Called once per use (a backend
    that caches a connection keeps it itself); raising
    :class:`~pytest_agentbox.errors.DockerUnavailable` says the engine does not answer.
    """
