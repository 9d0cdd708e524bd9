"""The one options table: precedence, bad values, paths, the README, and the three env
variables that used to be ignored (AGENTBOX_REQUIRE_DOCKER, _TIMEOUT, _EGRESS_NETWORK).

Pure precedence rules are checked on ``options.resolve``; the plugin-level ones through
pytester, reading what a test's sandbox would be made from with the supported
``run_state(config).sandbox_config(...)``; the env variables also against a real engine.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox.plugin import options
from pytest_agentbox.plugin.options import OPTIONS, Option, OptionError, parse_value, resolve

README = Path(__file__).resolve().parent.parent / "README.md"
NO_ENGINE = "unix:///nonexistent/agentbox-test-docker.sock"

# What a sandbox of this test would be made from, printed as one JSON line.
PROBE = """
import json
import pytest
from pytest_agentbox.plugin.hooks import agentbox_settings, run_state

{marker}
def test_probe(request, vault):
    cfg = run_state(request.config).sandbox_config(request.node, {factory}, vault=vault)
    s = agentbox_settings(request.config)
    print("PROBE " + json.dumps({{
        "image": cfg.image, "timeout": cfg.timeout, "runtime": cfg.runtime,
        "egress_network": cfg.egress_network,
        "max_seconds": cfg.state_limits.max_seconds,
        "max_bytes": cfg.state_limits.max_total_bytes,
        "require_docker": s.get("require-docker"), "state_dir": s.get("state-dir"),
        "domains": s.get("fake-upstream-domains"), "sources": dict(s.sources),
    }}))
"""


@pytest.fixture(autouse=True)
def _no_agentbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The outer run's own AGENTBOX_* settings must not leak into what these tests prove.
    for opt in OPTIONS:
        monkeypatch.delenv(opt.env, raising=False)


def probe(
    pytester: pytest.Pytester, *args: str, marker: str = "", factory: str = "{}"
) -> dict[str, Any]:
    pytester.makepyfile(test_probe=PROBE.format(marker=marker, factory=factory))
    result = pytester.runpytest_inprocess("-s", "-p", "no:cacheprovider", *args)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    line = next(x for x in result.outlines if x.startswith("PROBE ") or "PROBE {" in x)
    return json.loads(line[line.index("PROBE ") + 6 :])


# ---- the table itself ------------------------------------------------------------


def test_every_option_has_one_flag_ini_key_and_env_variable() -> None:
    names = [o.name for o in OPTIONS]
    assert len(set(names)) == len(names)
    # A repeatable flag's ini key and env variable read as plurals.
    plural = {"engine": ("agentbox_engines", "AGENTBOX_ENGINES")}
    for opt in OPTIONS:
        stem = opt.name.replace("-", "_")
        ini, env = plural.get(opt.name, (f"agentbox_{stem}", f"AGENTBOX_{stem.upper()}"))
        assert (opt.flag, opt.ini, opt.env) == (f"--agentbox-{opt.name}", ini, env)
        assert opt.help and opt.kind in ("bool", "int", "float", "size", "path", "string",
                                         "linelist")  # fmt: skip
    required = {
        "manifest", "image", "keep-on-failure", "require-docker", "strict-keys", "vault",
        "state-dir", "egress-network", "timeout", "state-max-mb", "state-max-files",
        "state-max-seconds", "runtime", "fake-upstream-domains", "engine",
    }  # fmt: skip
    assert required <= set(names)


def _readme_rows() -> dict[str, list[str]]:
    text = README.read_text()
    section = text[text.index("## Options, ini keys and markers") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_readme_table_agrees_with_the_options_table() -> None:
    rows = _readme_rows()
    assert set(rows) == {o.name for o in OPTIONS}, "README rows differ from options.OPTIONS"
    for opt in OPTIONS:
        _, flag, ini, env, default, marker, meaning = rows[opt.name]
        assert (flag, ini, env) == (f"`{opt.flag}`", f"`{opt.ini}`", f"`{opt.env}`"), opt.name
        assert default.replace("`", "") == opt.shown_default.replace("`", ""), opt.name
        assert marker == (f"yes (`{opt.marker_key}=`)" if opt.marker else "no"), opt.name
        assert meaning == opt.help, opt.name


def test_help_lists_every_flag_and_ini_key(pytester: pytest.Pytester) -> None:
    out = pytester.runpytest_inprocess("--help").stdout.str()
    for opt in OPTIONS:
        assert opt.flag in out, opt.flag
        assert opt.ini in out, opt.ini
        assert opt.env in out, opt.env


# ---- precedence: pure rules ------------------------------------------------------


def test_command_line_beats_environment() -> None:
    s = resolve(cli={"timeout": "5"}, env={"AGENTBOX_TIMEOUT": "7"}, ini={"timeout": "9"})
    assert (s.get("timeout"), s.source("timeout")) == (5.0, "the command line (--agentbox-timeout)")


def test_environment_beats_ini() -> None:
    s = resolve(env={"AGENTBOX_TIMEOUT": "7"}, ini={"timeout": "9"})
    assert (s.get("timeout"), s.source("timeout")) == (7.0, "the environment (AGENTBOX_TIMEOUT)")


def test_ini_beats_default() -> None:
    s = resolve(env={}, ini={"timeout": "9", "require-docker": "true"})
    assert (s.get("timeout"), s.source("timeout")) == (9.0, "the ini file (agentbox_timeout)")
    assert s.get("require-docker") is True


def test_default_when_nothing_is_set() -> None:
    s = resolve(env={}, ini={"timeout": "", "egress-network": ""})
    assert (s.get("timeout"), s.get("egress-network")) == (300.0, "bridge")
    assert s.is_default("timeout") and s.explicit("image") is None


def test_marker_beats_command_line() -> None:
    s = resolve(cli={"timeout": "5", "image": "cli/img:1"}, env={})
    t = s.for_test({"timeout": 2, "image": "marker/img:1", "network": ["x.test"]})
    assert (t.get("timeout"), t.get("image")) == (2.0, "marker/img:1")
    assert s.get("timeout") == 5.0, "per-test values do not change the run's"
    assert s.for_test({"image": None}).get("image") == "cli/img:1", "None is no override"


def test_an_empty_environment_variable_counts_as_unset() -> None:
    s = resolve(env={"AGENTBOX_REQUIRE_DOCKER": "", "AGENTBOX_TIMEOUT": ""}, ini={})
    assert s.get("require-docker") is False and s.get("timeout") == 300.0


def test_booleans_and_lists_from_every_source() -> None:
    for raw, want in (("1", True), ("Yes", True), ("on", True), ("0", False), ("off", False)):
        assert resolve(env={"AGENTBOX_STRICT_KEYS": raw}).get("strict-keys") is want
    env = {"AGENTBOX_FAKE_UPSTREAM_DOMAINS": "a.test, b.test c.test"}
    assert resolve(env=env).get("fake-upstream-domains") == ["a.test", "b.test", "c.test"]
    ini = {"fake-upstream-domains": ["x.test", " y.test "]}
    assert resolve(env={}, ini=ini).get("fake-upstream-domains") == ["x.test", "y.test"]


def test_sizes_parse_with_units() -> None:
    opt = Option("disk", "size", None, "a size", minimum=1)
    assert parse_value(opt, "2g", "here") == 2 << 30
    assert parse_value(opt, "512M", "here") == 512 << 20
    with pytest.raises(OptionError, match=r"disk: '2 gigs' from here is not a size"):
        parse_value(opt, "2 gigs", "here")


def test_paths_from_the_ini_file_stay_relative_to_it(tmp_path: Path) -> None:
    s = resolve(
        cli={"vault": "v.json"}, env={"AGENTBOX_MANIFEST": "m/agent.yaml"},
        ini={"state-dir": "state", "manifest": "ignored.yaml"},
        ini_dir=tmp_path / "proj", cwd=tmp_path / "here",
    )  # fmt: skip
    assert s.get("state-dir") == str(tmp_path / "proj" / "state")
    assert s.get("manifest") == str(tmp_path / "here" / "m" / "agent.yaml")
    assert s.get("vault") == str(tmp_path / "here" / "v.json")


def test_isolation_maps_to_a_docker_runtime() -> None:
    assert options.isolation_runtime("gvisor") == "runsc"
    assert options.isolation_runtime("runc") == "runc"
    assert options.isolation_runtime(None) is None


# ---- bad values ------------------------------------------------------------------

BAD_VALUES = [
    # (option, source kwargs, words the message must hold)
    ("timeout", {"env": {"AGENTBOX_TIMEOUT": "soon"}}, ["AGENTBOX_TIMEOUT", "'soon'"]),
    ("timeout", {"cli": {"timeout": "-3"}}, ["--agentbox-timeout", "out of range"]),
    ("timeout", {"ini": {"timeout": "nan"}}, ["agentbox_timeout", "finite"]),
    ("timeout", {"env": {"AGENTBOX_TIMEOUT": "inf"}}, ["finite"]),
    ("require-docker", {"env": {"AGENTBOX_REQUIRE_DOCKER": "maybe"}},
     ["AGENTBOX_REQUIRE_DOCKER", "'maybe'", "true or false"]),
    ("keep-on-failure", {"ini": {"keep-on-failure": "sometimes"}}, ["agentbox_keep_on_failure"]),
    ("state-max-files", {"env": {"AGENTBOX_STATE_MAX_FILES": "1.5"}}, ["whole number"]),
    ("state-max-files", {"cli": {"state-max-files": "0"}}, ["at least 1"]),
    ("state-max-mb", {"env": {"AGENTBOX_STATE_MAX_MB": "lots"}}, ["megabytes"]),
    ("state-max-seconds", {"env": {"AGENTBOX_STATE_MAX_SECONDS": "0"}}, ["greater than 0"]),
    ("image", {"cli": {"image": "-rm"}}, ["Docker image reference"]),
    ("runtime", {"env": {"AGENTBOX_RUNTIME": "run sc"}}, ["Docker runtime name"]),
    ("manifest", {"env": {"AGENTBOX_MANIFEST": "a\x00b"}}, ["NUL"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "source", "words"), BAD_VALUES)
def test_bad_value_names_option_source_and_what_is_allowed(
    name: str, source: dict[str, Any], words: list[str]
) -> None:
    kwargs = {"env": {}, **source}
    with pytest.raises(OptionError) as info:
        resolve(**kwargs)
    message = str(info.value)
    assert f"agentbox option {name}:" in message and "allowed:" in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize(
    "bad", [{"timeout": "soon"}, {"timeout": True}, {"image": "a b"}, {"runtime": 3}]
)
def test_bad_marker_value_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(
        OptionError, match=r"the agentbox marker of t::x \((timeout|image|runtime)=\)"
    ):
        resolve(env={}).for_test(bad, where="the agentbox marker of t::x")


@pytest.mark.parametrize(
    ("setup", "args", "words"),
    [
        ({"AGENTBOX_TIMEOUT": "soon"}, [], ["timeout", "AGENTBOX_TIMEOUT", "number of seconds"]),
        ({"AGENTBOX_REQUIRE_DOCKER": "maybe"}, [], ["require-docker", "'maybe'", "true or false"]),
        ({}, ["--agentbox-state-max-seconds=never"], ["--agentbox-state-max-seconds"]),
        ({}, ["-o", "agentbox_state_max_files=many"], ["agentbox_state_max_files", "whole"]),
    ],
)
def test_bad_run_wide_value_is_a_usage_error(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    setup: dict[str, str],
    args: list[str],
    words: list[str],
) -> None:
    for key, value in setup.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err


@pytest.mark.skipif(pytest.version_tuple < (9,), reason="native [tool.pytest] is pytest 9")
def test_native_toml_values_are_read(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        "[tool.pytest]\nagentbox_require_docker = true\nagentbox_timeout = 5\n"
        'agentbox_state_max_files = 7\nagentbox_fake_upstream_domains = ["a.test"]\n'
    )
    got = probe(pytester)
    assert (got["require_docker"], got["timeout"], got["domains"]) == (True, 5.0, ["a.test"])


@pytest.mark.skipif(pytest.version_tuple < (9,), reason="native [tool.pytest] is pytest 9")
def test_native_toml_value_of_the_wrong_type_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml('[tool.pytest]\nagentbox_require_docker = "maybe"\n')
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "agentbox option require-docker" in err and "agentbox_require_docker" in err, err
    assert "true or false" in err, err


def test_bad_marker_value_is_a_usage_error_before_any_test_runs(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest
        def test_first():
            pass
        @pytest.mark.agentbox(timeout="soon")
        def test_bad(sandbox):
            pass
        """
    )
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "timeout" in err and "test_bad" in err and "'soon'" in err, err
    assert "1 passed" not in result.stdout.str()


def test_bad_marker_value_under_xdist_fails_that_test_with_the_same_message(
    pytester: pytest.Pytester,
) -> None:
    # Workers cannot stop the run with a usage error (xdist reports an INTERNALERROR).
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.agentbox(timeout="soon")
        def test_bad(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    assert "agentbox option timeout: 'soon' from the agentbox marker of" in out, out


def test_bad_manifest_isolation_is_one_readable_error(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", agent="name: demo\nruntime: {isolation: firecracker}\n")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("--agentbox-manifest=agent.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "runtime.isolation" in err and "gvisor" in err, err


# ---- precedence through the plugin ------------------------------------------------


def test_plugin_marker_beats_command_line(pytester: pytest.Pytester) -> None:
    got = probe(
        pytester, "--agentbox-image=cli/img:1", "--agentbox-timeout=50",
        "--agentbox-runtime=runc",
        marker='@pytest.mark.agentbox(image="marker/img:1", timeout=7, runtime="runsc")',
    )  # fmt: skip
    assert (got["image"], got["timeout"], got["runtime"]) == ("marker/img:1", 7.0, "runsc")


def test_plugin_factory_call_beats_marker(pytester: pytest.Pytester) -> None:
    got = probe(
        pytester, "--agentbox-timeout=50",
        marker="@pytest.mark.agentbox(timeout=7)", factory="{'timeout': 3}",
    )  # fmt: skip
    assert got["timeout"] == 3.0


def test_plugin_per_test_marker_beats_run_wide_options_from_every_source(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTBOX_IMAGE", "env/img:1")
    pytester.makeini("[pytest]\nagentbox_timeout = 40\nagentbox_runtime = runc\n")
    got = probe(
        pytester,
        marker='@pytest.mark.agentbox(image="marker/img:1", timeout=7, runtime="runsc")',
    )
    assert (got["image"], got["timeout"], got["runtime"]) == ("marker/img:1", 7.0, "runsc")


def test_plugin_command_line_beats_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTBOX_IMAGE", "env/img:1")
    monkeypatch.setenv("AGENTBOX_TIMEOUT", "11")
    got = probe(pytester, "--agentbox-image=cli/img:1", "--agentbox-timeout=22")
    assert (got["image"], got["timeout"]) == ("cli/img:1", 22.0)
    assert got["sources"]["image"] == "the command line (--agentbox-image)"


def test_plugin_environment_beats_ini(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini(
        "[pytest]\nagentbox_timeout = 40\nagentbox_egress_network = ini-net\n"
        "agentbox_require_docker = false\nagentbox_image = ini/img:1\n"
    )
    monkeypatch.setenv("AGENTBOX_TIMEOUT", "11")
    monkeypatch.setenv("AGENTBOX_EGRESS_NETWORK", "env-net")
    monkeypatch.setenv("AGENTBOX_REQUIRE_DOCKER", "1")
    monkeypatch.setenv("AGENTBOX_IMAGE", "env/img:1")
    got = probe(pytester)
    assert (got["timeout"], got["egress_network"]) == (11.0, "env-net")
    assert (got["require_docker"], got["image"]) == (True, "env/img:1")


def test_plugin_ini_beats_default_and_manifest_ranks_below_options(
    pytester: pytest.Pytester,
) -> None:
    pytester.makefile(
        ".yaml", agent="name: demo\nruntime: {image: manifest/img:1, isolation: gvisor}\n"
    )
    pytester.makeini(
        "[pytest]\nagentbox_manifest = agent.yaml\nagentbox_state_max_seconds = 9\n"
        "agentbox_state_max_mb = 2\nagentbox_fake_upstream_domains =\n  a.test\n  b.test\n"
    )
    got = probe(pytester)
    assert (got["image"], got["runtime"]) == ("manifest/img:1", "runsc")
    assert (got["max_seconds"], got["max_bytes"]) == (9.0, 2 << 20)
    assert got["domains"] == ["a.test", "b.test"]
    got = probe(pytester, "--agentbox-image=cli/img:1", "--agentbox-runtime=runc")
    assert (got["image"], got["runtime"]) == ("cli/img:1", "runc")


def test_plugin_defaults(pytester: pytest.Pytester) -> None:
    got = probe(pytester)
    assert (got["image"], got["timeout"], got["runtime"]) == (
        "agentbox/base:bookworm", 300.0, None
    )  # fmt: skip
    assert (got["egress_network"], got["max_seconds"], got["require_docker"]) == (
        "bridge", 120.0, False
    )  # fmt: skip
    assert set(got["sources"].values()) == {"default"}


def test_plugin_ini_paths_are_relative_to_the_ini_file(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nagentbox_state_dir = stored\n")
    sub = pytester.mkdir("sub")
    (sub / "test_probe.py").write_text(PROBE.format(marker="", factory="{}"))
    monkeypatch.chdir(sub)
    result = pytester.runpytest_inprocess("-s", "-p", "no:cacheprovider")
    line = next(x for x in result.outlines if "PROBE " in x)
    got = json.loads(line[line.index("PROBE ") + 6 :])
    assert got["state_dir"] == str(pytester.path / "stored")


# ---- the env variables that used to be ignored, end to end ---------------------


def test_agentbox_require_docker_env_fails_instead_of_skipping(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    pytester.makepyfile("def test_uses(sandbox):\n    pass\n")
    skipped = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    skipped.assert_outcomes(skipped=1)
    # The ini file says no; the environment outranks it.
    pytester.makeini("[pytest]\nagentbox_require_docker = false\n")
    monkeypatch.setenv("AGENTBOX_REQUIRE_DOCKER", "1")
    failed = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    failed.assert_outcomes(errors=1)
    failed.stdout.fnmatch_lines(["*no Docker engine answers at*nonexistent*"])


def _inner_docker_args(config: pytest.Config) -> list[str]:
    from pytest_agentbox.plugin.hooks import run_state

    return ["-p", "no:cacheprovider", "--agentbox-require-docker",
            f"--agentbox-image={run_state(config).default_image}"]  # fmt: skip


def test_agentbox_timeout_env_reaches_the_sandbox_and_a_marker_beats_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, docker_client: Any,
    pytestconfig: pytest.Config,
) -> None:  # fmt: skip
    monkeypatch.setenv("AGENTBOX_TIMEOUT", "1")
    pytester.makepyfile(
        """
        import pytest

        def test_env_timeout(sandbox):
            result = sandbox.run("sleep 20")
            assert result.timed_out and result.duration < 10, result

        @pytest.mark.agentbox(timeout=30)
        def test_marker_beats_env_and_cli(sandbox):
            result = sandbox.run("sleep 2")
            assert not result.timed_out and result.exit_code == 0, result
        """
    )
    result = pytester.runpytest_subprocess(*_inner_docker_args(pytestconfig))
    result.assert_outcomes(passed=2)


def test_agentbox_egress_network_env_reaches_the_sidecar(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, docker_client: Any,
    pytestconfig: pytest.Config,
) -> None:  # fmt: skip
    # A network that does not exist: the sidecar's start must name it, which it can only
    # do if it read AGENTBOX_EGRESS_NETWORK (the default, bridge, always exists).
    missing = f"agentbox-test-missing-{secrets.token_hex(6)}"
    monkeypatch.setenv("AGENTBOX_EGRESS_NETWORK", missing)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.agentbox(network=["decoy.agentbox.test"])
        def test_egress(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*_inner_docker_args(pytestconfig))
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert re.search(rf"egress network '{missing}' does not exist", out), out[-3000:]


# ---- the agentbox command reads the same settings ----------------------------------


def test_cli_reads_state_dir_and_vault_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_agentbox import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGENTBOX_STATE_DIR", "from-env")
    assert cli.main(["state", "list"]) == 0
    assert f"no stored state in {tmp_path / 'from-env'}" in capsys.readouterr().out
    assert cli.main(["state", "list", "--state-dir", "flag"]) == 0
    assert "no stored state in flag" in capsys.readouterr().out
    monkeypatch.setenv("AGENTBOX_VAULT", str(tmp_path / "env-vault.json"))
    monkeypatch.setenv("AGENTBOX_VAULT_PASSWORD", secrets.token_hex(16))
    assert cli.main(["keys", "list"]) == 0
    assert str(tmp_path / "env-vault.json") in capsys.readouterr().err
