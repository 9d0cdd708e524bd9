"""Fixtures of the example agent's suite.

Offline by default: ``fake_upstream`` stands in for api.openai.com (a TLS server in a
container on an internal network). With a real vault (``--agentbox-vault``) holding an
``openai`` key, the same tests reach whatever that key's domain answers.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--demo-failure",
        action="store_true",
        help="also run a test that fails on purpose, to show agentbox's report sections",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--demo-failure"):
        return
    skip = pytest.mark.skip(reason="demo failure: run with --demo-failure to see the report")
    for item in items:
        if "demo_failure" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def openai_key(vault: Any) -> str:
    """The key the upstream must receive; random per test unless the vault has one.

    Autouse, so the key is in the vault before any sandbox fixture asks for it.
    """
    if not vault.has("openai"):
        vault.add("openai", "sk-test-" + secrets.token_hex(24))
    return vault.get("openai")


def chunks(*parts: str, delay: float = 0.0) -> list[dict[str, Any]]:
    """An OpenAI-style SSE stream of ``parts``, then [DONE]."""
    events: list[dict[str, Any]] = [
        {"data": json.dumps({"choices": [{"delta": {"content": p}}]}), "delay": delay}
        for p in parts
    ]
    events.append({"data": "[DONE]", "delay": 0.0})
    return events


@pytest.fixture
def llm(fake_upstream: Any, openai_key: str) -> Any:
    """Program the fake model: ``llm.says("Hello", " world")``."""

    class Model:
        upstream = fake_upstream
        key = openai_key

        def says(self, *parts: str, delay: float = 0.0) -> None:
            fake_upstream.reply(
                "/v1/chat/completions", method="POST", sse=chunks(*parts, delay=delay)
            )

        def fails(self, status: int, message: str) -> None:
            fake_upstream.reply(
                "/v1/chat/completions", status=status, json_body={"error": {"message": message}}
            )

    return Model()
