"""The research assistant's test suite: each test runs in its own hardened sandbox."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.agentbox_keys("openai")


def test_agent_replies(sandbox: Any, llm: Any) -> None:
    llm.says("hello", " from the model")
    result = sandbox.run("python3 agent.py --once hello")
    assert result.exit_code == 0, result.stderr
    assert "hello from the model" in result.stdout


def test_agent_sends_the_question_to_the_model(sandbox: Any, llm: Any) -> None:
    llm.says("42")
    sandbox.run("python3 agent.py --once 'what is six times seven?'")
    (request,) = llm.upstream.requests()
    assert request["path"] == "/v1/chat/completions"
    assert "what is six times seven?" in request["body"]
    assert '"stream": true' in request["body"]


def test_agent_streams_deltas_then_the_full_message(sandbox: Any, llm: Any) -> None:
    llm.says("Py", "test ", "9", delay=0.2)
    with sandbox.spawn("python3 agent.py") as agent:
        assert agent.read_json()["type"] == "ready"
        agent.send({"type": "message", "text": "latest pytest?"})
        replies = [agent.read_json() for _ in range(4)]
    assert [r["type"] for r in replies] == ["delta", "delta", "delta", "message"]
    assert [r["text"] for r in replies[:3]] == ["Py", "test ", "9"]
    assert replies[3]["text"] == "Pytest 9"


def test_agent_never_sees_the_real_key_but_the_upstream_gets_it(sandbox: Any, llm: Any) -> None:
    llm.says("ok")
    assert sandbox.run("python3 agent.py --once hi").exit_code == 0
    (request,) = llm.upstream.requests()
    auth = [v for k, v in request["headers"] if k.lower() == "authorization"]
    assert auth == [f"Bearer {llm.key}"]
    assert sandbox.env["OPENAI_API_KEY"] != llm.key
    assert sandbox.env["OPENAI_BASE_URL"].startswith("http://127.0.0.1:")
    # Everything the agent user can read: its env, every visible process, common dirs.
    scan = sandbox.run(
        "cat /proc/*/environ /proc/*/cmdline 2>/dev/null; "
        "grep -rs --binary-files=text -l . /tmp /opt /etc /home /run /dev/shm 2>/dev/null "
        "| xargs cat 2>/dev/null; env"
    )
    assert llm.key not in scan.stdout


def test_agent_survives_an_upstream_500_with_a_clear_message(sandbox: Any, llm: Any) -> None:
    llm.fails(500, "the model is overloaded")
    with sandbox.spawn("python3 agent.py") as agent:
        agent.read_json()
        agent.send({"type": "message", "text": "hi"})
        error = agent.read_json()
        assert error["type"] == "error"
        assert "upstream error 500" in error["message"]
        llm.says("back again")
        agent.send({"type": "message", "text": "hi again"})
        replies = [agent.read_json() for _ in range(2)]
    assert replies[-1] == {"type": "message", "text": "back again"}


@pytest.mark.agentbox(state="memory")
def test_agent_keeps_its_state_between_sessions(sandbox_factory: Any, llm: Any) -> None:
    llm.says("Paris")
    first = sandbox_factory()
    first.run("rm -rf ~/state/*")  # start from a clean memory whatever earlier runs left
    assert first.run("python3 agent.py --once 'capital of France?'").exit_code == 0
    first.close()  # teardown snapshots ~/state

    second = sandbox_factory()
    with second.spawn("python3 agent.py") as agent:
        assert agent.read_json() == {"type": "ready", "remembered": 1}
    memory = second.read_file(f"{second.home}/state/memory.jsonl").decode()
    assert "capital of France?" in memory and "Paris" in memory


def test_agent_cannot_reach_an_undeclared_domain(sandbox: Any, llm: Any) -> None:
    probe = (
        "import urllib.request\n"
        "try:\n"
        "    urllib.request.urlopen('https://decoy.agentbox.test/', timeout=10)\n"
        "    print('REACHED')\n"
        "except Exception as exc:\n"
        "    print('refused', exc)\n"
    )
    result = sandbox.run(["python3", "-c", probe])
    assert "REACHED" not in result.stdout
    assert "refused" in result.stdout
    decisions = sandbox.collect_logs()["egress decisions"]
    assert '"host": "decoy.agentbox.test"' in decisions and '"deny"' in decisions


def test_agent_handshake_and_shutdown(sandbox: Any, llm: Any) -> None:
    with sandbox.spawn("python3 agent.py") as agent:
        assert agent.read_json()["type"] == "ready"
        agent.send({"type": "shutdown"})
        assert agent.read_json() == {"type": "shutdown"}
    assert agent.close() == 0


def test_agent_rejects_malformed_input_and_keeps_going(sandbox: Any, llm: Any) -> None:
    llm.says("fine")
    with sandbox.spawn("python3 agent.py") as agent:
        agent.read_json()
        agent.send("this is not json")
        assert agent.read_json() == {"type": "error", "message": "input is not JSON"}
        agent.send({"type": "message", "text": "still there?"})
        assert [agent.read_json() for _ in range(2)][-1] == {"type": "message", "text": "fine"}


def test_agent_runs_unprivileged_after_setup(sandbox: Any) -> None:
    assert sandbox.run("id -u").stdout.strip() != "0"
    # setup_command compiled the agent as the user, after hardening.
    assert sandbox.run("ls __pycache__").stdout.startswith("agent.")


@pytest.mark.agentbox(keys=[])
def test_agent_without_a_key_says_what_is_missing(sandbox_factory: Any) -> None:
    sb = sandbox_factory()
    result = sb.run("env -u OPENAI_API_KEY python3 agent.py --once hi")
    assert result.exit_code == 2
    assert "OPENAI_API_KEY is not set" in result.stderr


def test_two_agents_in_one_test_are_isolated(sandbox_factory: Any, llm: Any) -> None:
    a, b = sandbox_factory(), sandbox_factory()
    a.write_file("secret.txt", "only a")
    assert b.run("cat secret.txt").exit_code != 0
    assert a.env["OPENAI_API_KEY"] != b.env["OPENAI_API_KEY"]


@pytest.mark.demo_failure
def test_demo_failure_shows_the_report_sections(sandbox: Any, llm: Any) -> None:
    llm.says("an answer the test does not expect")
    result = sandbox.run("python3 agent.py --once 'what is the answer?'")
    decoy = "import urllib.request as u; u.urlopen('https://decoy.agentbox.test', timeout=5)"
    sandbox.run(["python3", "-c", decoy])
    assert "42" in result.stdout, "the agent did not answer 42 (this test fails on purpose)"
