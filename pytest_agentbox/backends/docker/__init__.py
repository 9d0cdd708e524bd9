"""The Docker Engine backend (local socket, ``tcp://`` with TLS, ``ssh://``).

- :mod:`.engine`: the one module that talks to the Docker SDK: clients, containers, exec,
  archives, images, networks, volumes.
- :mod:`.sidecar`: the per-sandbox sidecar container (egress proxy, key proxy).
- :mod:`.fakeupstream`: local fake upstream APIs for tests (TLS, test CA).
- :mod:`.cleanup`: removal of what dead owners left, on every engine of a run.
"""
