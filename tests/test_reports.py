"""What a user reads: report sections, kept sandboxes, progress, and every error message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs that start their own pytest (and so their own clean-up of dead owners' leftovers)
# share one xdist worker: a concurrent clean-up would race the leftovers these tests
# plant and inspect on purpose.
pytestmark = pytest.mark.xdist_group("inner-runs")


def run_inner(pytester: pytest.Pytester, base_image: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:benchmark", f"--agentbox-image={base_image}", *args, timeout=300
    )


def run_example(base_image: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The example project's suite as its own run (own run id, so its own clean-up)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:benchmark", "-p", "no:cacheprovider",
         f"--agentbox-image={base_image}", "--agentbox-require-docker", *args, "example_project"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTEST_XDIST_TESTRUNUID": os.urandom(8).hex()},
    )  # fmt: skip


def test_demo_failure_shows_every_report_section_and_no_secret(
    docker_client: Any, base_image: str, tmp_path: Path
) -> None:
    proc = run_example(base_image, "--demo-failure", "-k", "demo_failure")
    out = proc.stdout
    assert proc.returncode == 1, out[-2000:]
    for section in ("agentbox: setup", "agentbox: egress policy", "agentbox: commands",
                    "agentbox: key proxy requests", "agentbox: egress decisions"):  # fmt: skip
        assert section in out, section
    assert "this test fails on purpose" in out
    assert '"path": "/v1/chat/completions"' in out  # the key proxy's request log
    assert '"host": "decoy.agentbox.test"' in out and '"deny"' in out
    assert "sk-test-" not in out  # the example's random keys never reach the report
    assert "forwarder            " in out and "sidecar (parallel)" in out  # setup steps


FAILING = """
def test_breaks(sandbox):
    sandbox.run("echo visible-output")
    assert False, "on purpose"
"""


def test_keep_on_failure_keeps_the_sandbox_and_prints_how_to_enter_it(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    pytester.makepyfile(FAILING)
    result = run_inner(pytester, base_image, "--agentbox-keep-on-failure")
    result.assert_outcomes(failed=1)
    line = next(
        x for x in result.stdout.lines if "kept failing sandbox; step in with: docker exec" in x
    )
    cmd = line.split("step in with: ", 1)[1].split()
    container_id = cmd[-2]
    try:
        assert cmd[:4] == ["docker", "exec", "-it", "-u"]
        user = cmd[4]
        out = docker_client.containers.get(container_id).exec_run(["id", "-u"], user=user)
        assert out.output.decode().strip() == user.split(":")[0] != "0"
    finally:
        docker_client.containers.get(container_id).remove(force=True)


def test_failing_sandbox_is_removed_without_keep(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    pytester.makepyfile(FAILING)
    result = run_inner(pytester, base_image)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*agentbox: commands*", "*visible-output*"])
    assert "kept failing sandbox" not in result.stdout.str()
    result.stdout.fnmatch_lines(["agentbox: 1 sandboxes created; setup median *"])


SLOW_SETUP = """
import pytest
@pytest.mark.agentbox(setup_command="sleep 1")
def test_slow(sandbox):
    pass
"""


@pytest.mark.parametrize(("flag", "shown"), [("-v", True), ("-q", False)])
def test_slow_setup_command_shows_progress_unless_quiet(
    pytester: pytest.Pytester, docker_client: Any, base_image: str, flag: str, shown: bool
) -> None:
    pytester.makepyfile(SLOW_SETUP)
    result = run_inner(pytester, base_image, flag)
    result.assert_outcomes(passed=1)
    assert ("agentbox: running setup_command: sleep 1" in result.stdout.str()) is shown


def test_missing_image_message(pytester: pytest.Pytester, docker_client: Any) -> None:
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    result = pytester.runpytest_subprocess("--agentbox-image=agentbox/does-not-exist:0")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*sandbox image 'agentbox/does-not-exist:0' is not on this Docker engine*"
            "agentbox image build*"
        ]
    )


KEYED = """
import pytest
@pytest.mark.agentbox_keys("openai")
def test_keyed(sandbox):
    pass
"""


def test_missing_key_skips_with_the_command_to_add_it(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    pytester.makepyfile(KEYED)
    result = run_inner(pytester, base_image, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*key 'openai' is required but not in the vault*agentbox keys add openai*"]
    )


def test_missing_key_fails_with_strict_keys(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    pytester.makepyfile(KEYED)
    result = run_inner(pytester, base_image, "--agentbox-strict-keys")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*key 'openai' is required but not in the vault*"])


def test_only_the_keys_a_test_requires_are_decrypted(
    pytester: pytest.Pytester, docker_client: Any, base_image: str
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_agentbox import vault as vault_mod

        @pytest.mark.agentbox_keys("openai")
        def test_one_key(vault, sandbox_factory, monkeypatch, fake_upstream):
            vault.add("openai", "sk-test-aaaaaaaaaaaa")
            vault.add("anthropic", "sk-test-bbbbbbbbbbbb")
            asked = []
            real_get = type(vault).get
            spy = lambda self, p: asked.append(p) or real_get(self, p)
            monkeypatch.setattr(type(vault), "get", spy)
            sandbox_factory()
            assert asked == ["openai"]
        """
    )
    run_inner(pytester, base_image).assert_outcomes(passed=1)


def test_the_example_suite_passes_offline(docker_client: Any, base_image: str) -> None:
    """The README's first command's suite: green, with nothing leaving this machine."""
    proc = run_example(base_image)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1]


def test_report_redacts_encoded_keys(random_key: str) -> None:
    import base64
    from urllib.parse import quote

    from pytest_agentbox.plugin.session import redactor

    redact = redactor([random_key])
    raw = random_key.encode()
    leaks = [random_key, raw.hex(), raw.hex().upper(), quote("k=" + random_key, safe="")]
    for prefix in (b"", b"x", b"xy", b"Bearer "):  # every base64 alignment
        leaks += [base64.b64encode(prefix + raw).decode(),
                  base64.urlsafe_b64encode(prefix + raw).decode()]  # fmt: skip
    for leak in leaks:
        text = redact(f"before {leak} after")
        assert "[redacted]" in text and text.startswith("before ") and text.endswith(" after")
        # Nothing left that decodes back to the key.
        assert random_key[4:-4] not in text and raw.hex()[8:-8] not in text.lower()
    assert redact("nothing secret here") == "nothing secret here"


LEAKY_TEST = """
import base64, logging, sys
import pytest

KEY = {key!r}

@pytest.mark.agentbox_keys("openai")
def test_leaky(vault, sandbox_factory, fake_upstream):
    vault.add("openai", KEY)
    sb = sandbox_factory()
    print("stdout", KEY, KEY.encode().hex().upper())
    print("stderr", base64.b64encode(KEY.encode()).decode(), file=sys.stderr)
    logging.getLogger("agent").warning("log %s", KEY)
    out = sb.run("echo $OPENAI_API_KEY").stdout.strip()  # the agent's token, not the key
    print("token", out)
    assert out == KEY
"""


def test_pytest_captured_output_and_failure_text_are_redacted(
    pytester: pytest.Pytester, docker_client: Any, base_image: str, random_key: str
) -> None:
    # The key never reaches the agent, but the test's own code may print it: pytest's
    # captured stdout/stderr/log sections and the assertion text are redacted too.
    pytester.makepyfile(LEAKY_TEST.format(key=random_key))
    junit = pytester.path / "junit.xml"
    result = run_inner(pytester, base_image, "-rA", f"--junitxml={junit}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str() + result.stderr.str() + junit.read_text()
    for section in ("Captured stdout call", "Captured stderr call", "Captured log call"):
        assert section in out, section
    assert "[redacted]" in out
    lowered = out.lower()
    assert random_key.lower() not in lowered
    assert random_key.encode().hex() not in lowered
    assert random_key[4:-4] not in out


# Where else a key a test handled can surface (found by the session-3 attack).
LEAK_INNER = """
import logging, warnings
import pytest

KEY = {key!r}

@pytest.fixture
def sb(vault, sandbox_factory, fake_upstream):
    vault.add("openai", KEY)
    return sandbox_factory()

@pytest.mark.agentbox_keys("openai")
def test_vector(sb, record_property):
{body}
"""

VECTORS = {
    # Live logging (log_cli, common in ini files) writes records as they happen.
    "log_cli": (
        "    logging.getLogger('agent').warning('live %s', KEY)",
        ["-o", "log_cli=true", "-o", "log_cli_level=WARNING"],
    ),
    # The warnings summary comes from pytest_warning_recorded, not from the report.
    "warning": ("    warnings.warn(f'warned {KEY}')", []),
    # report.wasxfail is shown by -rx and written as junit's skipped message.
    "xfail": ("    pytest.xfail(f'xfailed {KEY}')", ["-rx"]),
    # user_properties go to junit <property> (and --report-log / xdist) unredacted.
    "record_property": ("    record_property('agent_output', f'prop {KEY}')", []),
    # The canonical leak check: pytest shortens the term to 42 chars before we see it.
    "not_in_truncated": ("    assert KEY not in 'agent said: ' + KEY", []),
}


def _key_spans(key: str, text: str, n: int = 16) -> int:
    """How many of the key's n-character windows appear in ``text``."""
    return sum(key[i : i + n] in text for i in range(len(key) - n + 1))


@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_no_key_reaches_terminal_or_junit(
    pytester: pytest.Pytester, docker_client: Any, base_image: str, random_key: str, vector: str
) -> None:
    body, args = VECTORS[vector]
    pytester.makepyfile(LEAK_INNER.format(key=random_key, body=body))
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:benchmark", f"--agentbox-image={base_image}", f"--junitxml={junit}",
        *args, timeout=300,
    )  # fmt: skip
    out = result.stdout.str() + result.stderr.str() + junit.read_text()
    # The test file's own source listing is not a leak path we attack: drop its lines.
    out = "\n".join(line for line in out.splitlines() if "KEY = " not in line)
    assert "INTERNALERROR" not in out
    assert random_key not in out, vector
    assert _key_spans(random_key, out) == 0, (vector, "partial key in the output")


def test_a_skip_reason_with_a_token_does_not_crash_the_terminal_summary(
    pytester: pytest.Pytester, docker_client: Any, base_image: str, random_key: str
) -> None:
    # A skip's longrepr is a (path, line, reason) tuple that pytest's skip summary and
    # junit unpack: redaction must keep that shape (it once made it one string).
    pytester.makepyfile(
        LEAK_INNER.format(key=random_key, body="    pytest.skip(f'no quota: {KEY}')")
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:benchmark", f"--agentbox-image={base_image}", "-rs",
        f"--junitxml={pytester.path / 'j.xml'}", timeout=300,
    )  # fmt: skip
    out = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in out, out[-1500:]
    assert result.ret == 0
