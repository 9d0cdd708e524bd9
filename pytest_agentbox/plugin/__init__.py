"""The pytest plugin: thin hooks and fixtures over the sandbox, vault and state code.

- :mod:`.hooks`: the hooks and fixtures pytest loads (entry point ``agentbox``).
- :mod:`.options`: every option's one precedence table (marker > CLI > env > ini > default).
- :mod:`.session`: per-run state: engines, manifest, reports, clean-up.
- :mod:`.hookspecs`: the plugin's own hooks (``pytest_agentbox_make_backend``).

Nothing outside this subpackage imports pytest.
"""
