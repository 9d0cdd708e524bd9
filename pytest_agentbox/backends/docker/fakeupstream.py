"""A fake provider API for tests: a TLS server in a container on an internal network.

The container answers to the provider's real domain names (network aliases) with a
certificate from a throwaway CA (``trustme``); sandboxes that use it trust that CA and
reach it only through their egress proxy. Tests program responses (including SSE
streams) and read back what the upstream received, so they can assert "the upstream
got the real key, the agent only ever saw the token" without any traffic leaving the
machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pytest_agentbox import paths
from pytest_agentbox.backends import tools
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.errors import AgentboxError

_DIR = "/srv/agentbox-upstream"


class FakeUpstream:
    """One fake upstream server answering for ``domains`` on port 443."""

    def __init__(
        self, domains: Sequence[str], *, image: str, client: Any = None, run_id: str = ""
    ) -> None:
        import trustme

        self.domains = tuple(dict.fromkeys(d.lower() for d in domains))
        self.image = image
        self._client = client or engine.get_client()
        self._owner = paths.Owner.current(run_id or paths.token())
        self._ca = trustme.CA()
        self.ca_pem = self._ca.cert_pem.bytes().decode()
        self.network: Any = None
        self.container: Any = None
        self._address: str | None = None

    @property
    def engine_url(self) -> str:
        """The engine this fake runs on: sandboxes reach it only from the same engine."""
        return engine.engine_of(self._client).url

    @property
    def network_name(self) -> str:
        return str(self.network.name)

    @property
    def pins(self) -> dict[str, str]:
        """Each of its domain names -> its address, for the egress proxy to use without DNS.

        Its address is private (an internal Docker network), which the egress proxy refuses
        after any DNS answer; an exact pin is the one way in, and it opens nothing else.
        """
        if self._address is None:
            self.container.reload()
            nets = self.container.attrs["NetworkSettings"]["Networks"]
            self._address = str(nets[self.network.name]["IPAddress"])
        return {d: self._address for d in self.domains}

    def start(self) -> FakeUpstream:
        """Create the internal network and the server; returns self."""
        engine.ensure_image(self._client, self.image)
        labels = self._owner.labels("upstream")
        # internal=True: nothing on this network has a route off the machine.
        self.network = self._client.networks.create(
            paths.unique_name("net"), driver="bridge", internal=True, labels=labels
        )
        try:
            self._create_container(labels)
            self._wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def _create_container(self, labels: dict[str, str]) -> None:
        cert = self._ca.issue_cert(*self.domains)
        files = [
            ("upstream_server.py", tools.tool_source("upstream_server.py")),
            ("cert.pem", cert.cert_chain_pems[0].bytes()),
            ("key.pem", cert.private_key_pem.bytes()),
            ("rules.json", b"[]"),
        ]
        prefix = _DIR.lstrip("/")
        endpoint = self._client.api.create_endpoint_config(aliases=list(self.domains))
        command = ["python3", f"{_DIR}/upstream_server.py", "--port", "443"]
        for flag, name in (("--cert", "cert.pem"), ("--key", "key.pem"),
                           ("--rules", "rules.json"), ("--log", "requests.jsonl")):  # fmt: skip
            command += [flag, f"{_DIR}/{name}"]
        self.container = self._client.containers.create(
            self.image,
            command=command,
            name=paths.unique_name("upstream"),
            labels=labels,
            network=self.network.name,
            networking_config={self.network.name: endpoint},
            cap_drop=["ALL"],
            cap_add=["NET_BIND_SERVICE"],
            security_opt=["no-new-privileges"],
            mem_limit="256m",
            detach=True,
        )
        tar = tools.tar_bytes(
            [(f"{prefix}/{name}", data, 0o644) for name, data in files], dirs=[(prefix, 0o755)]
        )
        self.container.put_archive("/", tar)
        self.container.start()

    def _wait_healthy(self, timeout: float = 20.0) -> None:
        probe = (
            "import socket,sys\n"
            "s=socket.create_connection(('127.0.0.1',443),1)\n"
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = engine.exec_run(
                self._client, self.container.id, ["python3", "-c", probe], user="0"
            )
            if out.exit_code == 0:
                return
            time.sleep(0.1)
        logs = self.container.logs(tail=20).decode(errors="replace")
        raise AgentboxError(f"the fake upstream did not start listening on 443: {logs}")

    def program(self, rules: Iterable[Mapping[str, Any]]) -> None:
        """Replace the response rules (first match wins; see upstream_server.py)."""
        data = json.dumps(list(rules)).encode()
        prefix = _DIR.lstrip("/")
        self.container.put_archive("/", tools.tar_bytes([(f"{prefix}/rules.json", data, 0o644)]))

    def reply(
        self,
        path: str,
        *,
        method: str = "*",
        status: int = 200,
        json_body: Any = None,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
        sse: Sequence[Mapping[str, Any]] | None = None,
        gzip: bool = False,
        data: bytes | None = None,
    ) -> None:
        """Program a single response rule (a shortcut for :meth:`program`)."""
        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body)
            hdrs.setdefault("content-type", "application/json")
        rule: dict[str, Any] = {"method": method, "path": path, "status": status,
                                "headers": hdrs, "body": body, "gzip": gzip}  # fmt: skip
        if sse is not None:
            rule["sse"] = list(sse)
        if data is not None:
            rule["body_b64"] = base64.b64encode(data).decode()
        self.program([rule])

    def requests(self) -> list[dict[str, Any]]:
        """Every request the upstream received since the last :meth:`reset`."""
        out = engine.exec_run(
            self._client, self.container.id, ["cat", f"{_DIR}/requests.jsonl"], user="0"
        )
        return [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]

    def reset(self) -> None:
        """Forget programmed rules and received requests (cheap: one exec)."""
        engine.exec_run(
            self._client, self.container.id,
            ["/bin/sh", "-c", f"echo '[]' > {_DIR}/rules.json; : > {_DIR}/requests.jsonl"],
            user="0",
        )  # fmt: skip

    def close(self) -> None:
        """Remove the server and its network."""
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.remove(force=True)
            self.container = None
        if self.network is not None:
            with contextlib.suppress(Exception):
                self.network.remove()
            self.network = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def header(request: Mapping[str, Any], name: str) -> list[str]:
    """All values of header ``name`` (case-insensitive) in a recorded request."""
    return [v for k, v in request.get("headers", []) if k.lower() == name.lower()]
