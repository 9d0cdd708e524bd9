"""Policy: what a sandbox may do, decided on the host without Docker or network.

- :mod:`.manifest`: the ``agent.yaml`` model (keys, domains, resources, setup).
- :mod:`.rules`: key providers, auth styles and the environment rules for user code.
- :mod:`.values`: what an image, runtime name or time limit may be.
- :mod:`.egress`: the egress allowlist a sandbox gets (declared domains, key domains,
  package registries when a setup command needs them).
"""
