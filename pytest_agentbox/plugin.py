"""pytest hooks and fixtures of pytest-agentbox. Thin: the work lives in plain modules.

Fixtures: ``sandbox``, ``sandbox_factory``, ``vault``, ``fake_upstream``,
``agentbox_manifest``. Markers: ``agentbox(...)``, ``agentbox_keys(...)``,
``agentbox_network(...)``.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Any

import pytest

from . import session as abs_session
from .errors import AgentboxError, DockerUnavailable, KeyMissing, ManifestError

_STATE_KEY = pytest.StashKey["abs_session.RunState"]()
_SANDBOXES = pytest.StashKey[list]()
_CALL_FAILED = pytest.StashKey[bool]()

_PATH_OPTIONS = ("manifest", "vault", "state-dir")

_MARKERS = (
    "agentbox(**overrides): per-test sandbox overrides: image=, setup_command=, resources=, "
    "keys=, network=, network_unrestricted=, state=, timeout=",
    "agentbox_keys(*providers): keys this test needs; the sandbox gets a session token and a "
    "local base URL for each",
    "agentbox_network(*domains): extra domains this test's sandbox may reach",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("agentbox", "hardened Docker sandboxes for agent tests")

    def both(name: str, help: str, *, flag: bool = False, default: Any = None) -> None:
        opt = "--agentbox-" + name
        ini = "agentbox_" + name.replace("-", "_")
        if flag:
            group.addoption(opt, action="store_true", default=None, help=help)
            parser.addini(ini, help, type="bool", default=bool(default))
        else:
            group.addoption(opt, default=None, metavar="VALUE", help=help)
            parser.addini(ini, help, default=default)

    both("manifest", "agent manifest (agent.yaml) the sandboxes are made from")
    both("image", f"sandbox image (default {abs_session.DEFAULT_IMAGE})")
    both("keep-on-failure", "keep a failing test's sandbox and print how to enter it", flag=True)
    both(
        "require-docker",
        "fail (instead of skip) sandbox tests when no Docker engine answers; CI sets this",
        flag=True,
    )
    both("strict-keys", "fail (instead of skip) tests whose required key is missing", flag=True)
    both("vault", "key vault file (default: a fresh vault per test; env AGENTBOX_VAULT)")
    both("state-dir", "where persisted sandbox state lives (default: .pytest_cache/agentbox)")
    both(
        "egress-network",
        "Docker network the egress proxy sidecar joins (default: bridge)",
        default="bridge",
    )
    both("timeout", "default timeout of sandbox.run, seconds (default 300)", default="300")
    both("state-max-mb", "cap on one persisted state's total size, MB (default 1024)")
    both("state-max-files", "cap on one persisted state's member count (default 100000)")
    parser.addini(
        "agentbox_fake_upstream_domains",
        "extra domain names the fake_upstream fixture answers for",
        type="linelist",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    try:
        state = abs_session.RunState(_Options(config))
    except ManifestError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_STATE_KEY] = state
    atexit.register(abs_session.close_all)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(_STATE_KEY, None)
    return state.header_lines() if state else []


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Ctrl-C and internal errors end here too: nothing of ours keeps running.
    abs_session.close_all()


class _Options:
    """Option values with the precedence command line > ini > environment > default."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config

    def get(self, name: str) -> Any:
        cli = self._config.getoption("--agentbox-" + name)
        if cli is not None:
            return cli
        ini = self._config.getini("agentbox_" + name.replace("-", "_"))
        if ini not in (None, "", []):
            # Paths in an ini file are relative to that file, wherever pytest runs from.
            if name in _PATH_OPTIONS and self._config.inipath is not None:
                return str(self._config.inipath.parent / ini)
            return ini
        return os.environ.get("AGENTBOX_" + name.upper().replace("-", "_")) or None

    @property
    def rootpath(self) -> Path:
        return self._config.rootpath

    @property
    def cache_dir(self) -> Path:
        try:
            return Path(self._config.getini("cache_dir") or ".pytest_cache")
        except ValueError:  # -p no:cacheprovider removes the ini key, not the need
            return Path(".pytest_cache")


def _state(config: pytest.Config) -> abs_session.RunState:
    return config.stash[_STATE_KEY]


# ---- reports ---------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    sandboxes = item.stash.get(_SANDBOXES, [])
    if report.failed and sandboxes:
        for title, text in abs_session.report_sections(sandboxes):
            report.sections.append((f"agentbox: {title}", text))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Runs on the xdist controller too, fed by the workers' reports. Every phase's
    # report carries the item's user_properties: read them once, at teardown.
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == "agentbox_setup":
            abs_session.STATS.add_setup(value)
        elif name == "agentbox_kept":
            abs_session.STATS.kept.append(value)
        elif name == "agentbox_cleaned":
            abs_session.STATS.cleaned += int(value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in abs_session.STATS.summary_lines():
        terminalreporter.write_line(line)


# ---- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="session")
def agentbox_manifest(pytestconfig: pytest.Config) -> Any:
    """The loaded manifest (a pydantic model), or the built-in default without one."""
    return _state(pytestconfig).manifest


@pytest.fixture
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The key vault: ``--agentbox-vault`` when set, else a fresh one for this test."""
    return _state(request.config).open_vault(tmp_path)


@pytest.fixture(scope="session")
def _agentbox_upstream(request: pytest.FixtureRequest) -> Iterator[Any]:
    state = _state(request.config)
    with _engine_guard(state):
        extra = request.config.getini("agentbox_fake_upstream_domains")
        upstream = state.start_fake_upstream(tuple(extra))
    try:
        yield upstream
    finally:
        upstream.close()


@pytest.fixture
def fake_upstream(_agentbox_upstream: Any) -> Any:
    """A local TLS fake of the providers' APIs; sandboxes of this test reach it."""
    _agentbox_upstream.reset()
    return _agentbox_upstream


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest, vault: Any) -> Iterator[Callable[..., Any]]:
    """Make sandboxes: ``sandbox_factory(**overrides)``; each is removed at test end."""
    state = _state(request.config)
    item = request.node
    made: list[Any] = item.stash.setdefault(_SANDBOXES, [])
    upstream = (
        request.getfixturevalue("fake_upstream")
        if "fake_upstream" in request.fixturenames
        else None
    )

    def make(**overrides: Any) -> Any:
        with _engine_guard(state):
            try:
                config = state.sandbox_config(item, overrides, vault=vault, upstream=upstream)
                config.progress = _progress(request.config, item.nodeid)
            except KeyMissing as exc:
                if state.strict_keys:
                    pytest.fail(str(exc), pytrace=False)
                pytest.skip(str(exc))
            sb = state.create_sandbox(config, on_created=made.append)
        item.user_properties.append(("agentbox_setup", abs_session.setup_summary(sb)))
        return sb

    try:
        yield make
    finally:
        failed = item.stash.get(_CALL_FAILED, False)
        for sb in made:
            keep = failed and state.keep_on_failure
            sb.close(keep=keep)
            if keep:
                item.user_properties.append(("agentbox_kept", sb.exec_hint()))
        cleaned = state.take_cleaned()
        if cleaned:
            item.user_properties.append(("agentbox_cleaned", cleaned))


def _progress(config: pytest.Config, nodeid: str) -> Callable[[str], None] | None:
    """A line on the terminal before a long step, so a slow setup is not a silent pause.

    Quiet under -q, and under xdist workers (they have no terminal of their own).
    """
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or config.get_verbosity() < 0 or hasattr(config, "workerinput"):
        return None

    def show(message: str) -> None:
        with capman.global_and_fixture_disabled() if capman else _nullcontext():
            reporter.write_line(f"{message}  [{nodeid}]")

    return show


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., Any]) -> Any:
    """A fresh hardened sandbox for this test, made from the manifest and the markers."""
    return sandbox_factory()


class _engine_guard:
    """Turns engine and configuration errors into one readable skip or failure."""

    def __init__(self, state: abs_session.RunState) -> None:
        self._state = state

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, DockerUnavailable) and not self._state.require_docker:
            pytest.skip(str(exc))
        if isinstance(exc, AgentboxError):
            pytest.fail(str(exc), pytrace=False)
        return False
