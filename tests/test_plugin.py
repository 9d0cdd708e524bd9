"""Plugin behaviour through pytester: options, markers, skip versus fail, bad manifests."""

from __future__ import annotations

import subprocess
import sys

import pytest

NO_ENGINE = "unix:///nonexistent/agentbox-test-docker.sock"

# Inner runs that make sandboxes clean up dead owners' leftovers on the engine: they
# share a worker with the tests that plant leftovers on purpose.
pytestmark = pytest.mark.xdist_group("inner-runs")

SANDBOX_TEST = """
def test_uses_sandbox(sandbox):
    assert sandbox.run("true").exit_code == 0
"""


def test_options_show_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    for opt in (
        "--agentbox-manifest",
        "--agentbox-image",
        "--agentbox-keep-on-failure",
        "--agentbox-require-docker",
        "--agentbox-strict-keys",
        "--agentbox-vault",
        "--agentbox-state-dir",
        "agentbox_manifest (string)",
        "agentbox_image (string)",
    ):
        assert opt in result.stdout.str(), opt


def test_help_works_without_an_engine(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.agentbox(**overrides)*", "@pytest.mark.agentbox_keys(*providers)*",
         "@pytest.mark.agentbox_network(*domains)*"]
    )  # fmt: skip


def test_no_engine_skips_with_one_clear_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    pytester.makepyfile(SANDBOX_TEST)
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no Docker engine answers at*nonexistent*Start Docker*"])


def test_no_engine_fails_when_docker_is_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    pytester.makepyfile(SANDBOX_TEST)
    result = pytester.runpytest_subprocess("--agentbox-require-docker")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no Docker engine answers at*"])
    assert "Traceback" not in result.stdout.str()


def test_require_docker_from_ini(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    pytester.makeini("[pytest]\nagentbox_require_docker = true\n")
    pytester.makepyfile(SANDBOX_TEST)
    pytester.runpytest_subprocess().assert_outcomes(errors=1)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "name: demo\nkeys:\n  - provider: my_api\n    domain: api.example.com\n",
            ["agent.yaml", "keys[0].provider", "my_api"],
        ),
        (
            "name: demo\npermissions:\n  network:\n    - domain: 10.0.0.1\n",
            ["agent.yaml", "permissions.network[0]", "IP"],
        ),
        (
            "name: demo\nkeys:\n  - provider: custom\n    domain: api.custom.dev\n"
            "    env_var: LD_PRELOAD\n",
            ["agent.yaml", "keys[0].env_var", "LD_PRELOAD"],
        ),
        ("name: demo\nruntime: [1, 2\n", ["agent.yaml", "line"]),
        ("name: demo\nruntyme: {}\n", ["agent.yaml", "runtyme"]),
    ],
)
def test_bad_manifest_is_one_readable_error(
    pytester: pytest.Pytester, yaml_text: str, expected: list[str]
) -> None:
    pytester.makefile(".yaml", agent=yaml_text)
    pytester.makepyfile(SANDBOX_TEST)
    result = pytester.runpytest_subprocess("--agentbox-manifest=agent.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    for word in expected:
        assert word in err, (word, err)
    for noise in ("Traceback", "pydantic", "validation error for", "errors.pydantic.dev"):
        assert noise not in err, (noise, err)


def test_missing_manifest_names_the_file_and_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SANDBOX_TEST)
    result = pytester.runpytest_subprocess("--agentbox-manifest=nope/agent.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*agent manifest not found*nope/agent.yaml*--agentbox-manifest*"])


def test_manifest_from_ini_is_shown_in_the_header(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", agent="name: demo\n")
    pytester.makeini("[pytest]\nagentbox_manifest = agent.yaml\n")
    pytester.makepyfile(
        "def test_x(agentbox_manifest):\n    assert agentbox_manifest.name == 'demo'\n"
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["agentbox: manifest *agent.yaml; image *"])


def test_unknown_marker_override_is_a_clear_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.agentbox(imagee="x")
        def test_typo(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*imagee*"])


def test_loading_the_plugin_pulls_in_no_heavy_dependency() -> None:
    # pytest loads the plugin in every run of an environment where it is installed, and
    # once more per xdist worker: pydantic, docker, yaml and the sandbox code wait until
    # a sandbox, manifest or vault is used.
    heavy = ["pydantic", "docker", "yaml", "filelock", "cryptography", "pytest_agentbox.sandbox"]
    code = (
        "import sys, pytest_agentbox, pytest_agentbox.plugin.hooks\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
        "pytest_agentbox.Sandbox\n"
        "print('pytest_agentbox.sandbox' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["[]", "True"]
