"""Files that run inside containers: stdlib-only, each one file, each auditable alone.

They are sent to a container's own ``python3 -I -S`` (see
:func:`pytest_agentbox.backends.tools.tool_command`), so none may import anything
but the standard library, and they must run on any Python 3 an image ships:

- :mod:`.hardening`: the root step that runs before any user code (sudo/su gone,
  ``/proc`` hidepid, read-only root, capped storage); prints one JSON line of findings.
- :mod:`.runner`: the unprivileged command runner behind ``sandbox.run``/``spawn``.
- :mod:`.userfilter`: the seccomp filter the runner installs for user code.
- :mod:`.keyproxy`: the reverse proxy that holds the real keys (sidecar only).
- :mod:`.egressproxy`: egress enforcement and the agent's forwarder.
- :mod:`.supervisor`: the sidecar's process keeper.
- :mod:`.upstream_server`: the fake TLS upstream used by tests.

The host imports some of them for the facts it shares with them (what an IP literal is,
auth styles, loader variables), so each fact is defined once.
"""
