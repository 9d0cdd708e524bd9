"""Backends: where boxes run. Only :mod:`.docker` imports the Docker SDK."""
