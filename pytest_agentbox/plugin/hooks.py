"""pytest hooks and fixtures of pytest-agentbox. Thin: the work lives in plain modules.

Fixtures: ``sandbox``, ``sandbox_factory``, ``vault``, ``fake_upstream``,
``agentbox_manifest``. Markers: ``agentbox(...)``, ``agentbox_keys(...)``,
``agentbox_network(...)``. For a ``conftest.py``: :func:`run_state` (this run's state,
manifest and once-per-run clean-up) and :func:`agentbox_settings` (every option's
resolved value and where it came from). Options come from one table in
:mod:`pytest_agentbox.plugin.options`.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox.errors import AgentboxError, DockerUnavailable, KeyMissing, ManifestError
from pytest_agentbox.plugin import options as abs_options
from pytest_agentbox.plugin import redaction
from pytest_agentbox.plugin import session as abs_session
from pytest_agentbox.plugin.options import OptionError

_STATE_KEY = pytest.StashKey["abs_session.RunState"]()
_SANDBOXES = pytest.StashKey[list]()
_CALL_FAILED = pytest.StashKey[bool]()

_MARKERS = (
    "agentbox(**overrides): per-test sandbox overrides: image=, runtime=, setup_command=, "
    "resources=, keys=, network=, network_unrestricted=, state=, timeout=",
    "agentbox_keys(*providers): keys this test needs; the sandbox gets a session token and a "
    "local base URL for each",
    "agentbox_network(*domains): extra domains this test's sandbox may reach",
)


# ini types pytest parses natively, so that a TOML `agentbox_require_docker = true` or
# `agentbox_timeout = 5` under [tool.pytest] is read; the rest are text options.py parses.
_INI_TYPES = {"bool": "bool", "linelist": "linelist"}
if pytest.version_tuple >= (8, 4):  # the int and float ini types are new in 8.4
    _INI_TYPES.update({"int": "int", "float": "float"})


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_agentbox.plugin import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(trylast=True)
def pytest_agentbox_make_backend(config: pytest.Config, url: str | None) -> Any:
    """The default: the registered backend of ``url``'s scheme (Docker for unix://,
    tcp://, ssh:// and npipe://, and for the environment's engine)."""
    from pytest_agentbox.backends.base import backend_for

    return backend_for(url)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("agentbox", "hardened Docker sandboxes for agent tests")
    # Registered from the one table. options.py parses every value (pytest only reads
    # the ini types it has), so a bad value names its option and source wherever it is.
    for opt in abs_options.OPTIONS:
        shown = opt.shown_default.replace("`", "")
        text = f"{opt.help} (default: {shown}; env {opt.env})"
        if opt.kind == "bool":
            group.addoption(opt.flag, action="store_true", default=None, help=text)
        elif opt.repeatable:
            metavar = opt.name.rsplit("-", 1)[-1].upper()
            group.addoption(opt.flag, action="append", default=None, metavar=metavar, help=text)
        else:
            metavar = opt.name.rsplit("-", 1)[-1].upper()
            group.addoption(opt.flag, default=None, metavar=metavar, help=text)
        kind = _INI_TYPES.get(opt.kind, "string")
        # default None: an unset key must stay distinguishable from one set to false/0.
        parser.addini(opt.ini, text, type=kind, default=[] if kind == "linelist" else None)


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    try:
        settings = _resolve(config)
        state = abs_session.RunState(
            settings,
            rootpath=config.rootpath,
            cache_dir=_cache_dir(config),
            make_backend=lambda url: config.hook.pytest_agentbox_make_backend(
                config=config, url=url
            ),
        )
    except (ManifestError, OptionError) as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_STATE_KEY] = state
    atexit.register(abs_session.close_all)


def _redact_live_logging(config: pytest.Config) -> None:
    # Live logging (log_cli) and --log-file write records as they happen, past the
    # reports: their handlers redact each record for every sandbox of this process.
    logging_plugin = config.pluginmanager.get_plugin("logging-plugin")
    for name in ("log_cli_handler", "log_file_handler"):
        handler = getattr(logging_plugin, name, None)
        if handler is not None:
            handler.addFilter(redaction.LogRedactor())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A bad per-test option value is a usage error before any sandbox is made, not a
    # failure found an hour into the run. Not on xdist workers: a usage error there is
    # an INTERNALERROR of the controller; the test fails at set-up with the same message.
    if hasattr(config, "workerinput"):
        return
    settings = agentbox_settings(config)
    for item in items:
        for mark in item.iter_markers("agentbox"):
            try:
                settings.for_test(mark.kwargs, where=f"the agentbox marker of {item.nodeid}")
            except OptionError as exc:
                raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # Engines named for this run must all answer before any test (or xdist worker)
    # starts: a typo or a stopped engine is one message, not a run of failures.
    # Workers skip it (their controller checked); so do --help and --collect-only.
    config = session.config
    _redact_live_logging(config)  # the logging plugin is registered by now
    state = config.stash.get(_STATE_KEY, None)
    if state is None or not state.engines_explicit or hasattr(config, "workerinput"):
        return
    if config.option.collectonly:
        return
    problems = state.check_engines()
    if problems:
        raise pytest.UsageError(
            "agentbox: not every engine of this run can be used:\n  " + "\n  ".join(problems)
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(_STATE_KEY, None)
    return state.header_lines() if state else []


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Ctrl-C and internal errors end here too: nothing of ours keeps running.
    abs_session.close_all()


def _resolve(config: pytest.Config) -> abs_options.Settings:
    """The run-wide settings: command line > environment > ini > default."""
    cli = {o.name: config.getoption(o.flag) for o in abs_options.OPTIONS}
    ini = {o.name: _getini(config, o) for o in abs_options.OPTIONS}
    return abs_options.resolve(
        cli=cli,
        ini=ini,
        # Paths in an ini file are relative to that file, wherever pytest runs from.
        ini_dir=config.inipath.parent if config.inipath is not None else None,
        cwd=config.invocation_params.dir,
    )


def _getini(config: pytest.Config, opt: abs_options.Option) -> Any:
    try:
        return config.getini(opt.ini)
    except (ValueError, TypeError) as exc:  # pytest's own parse of a bool/int/float key
        raise OptionError(
            f"agentbox option {opt.name}: the ini file ({opt.ini}) holds a value pytest "
            f"cannot read ({exc}); allowed: {opt.allowed_text}"
        ) from None


def _cache_dir(config: pytest.Config) -> Path:
    try:
        return Path(config.getini("cache_dir") or ".pytest_cache")
    except ValueError:  # -p no:cacheprovider removes the ini key, not the need
        return Path(".pytest_cache")


def run_state(config: pytest.Config) -> abs_session.RunState:
    """This run's :class:`~pytest_agentbox.plugin.session.RunState` (settings, manifest, clean-up).

    The supported way for a ``conftest.py`` to reach the plugin's per-run state, e.g.
    ``run_state(config).clean_up_once(backend)`` or ``run_state(config).default_image``.
    """
    return config.stash[_STATE_KEY]


def agentbox_settings(config: pytest.Config) -> abs_options.Settings:
    """This run's resolved option values; ``.get(name)`` and ``.source(name)`` per option."""
    return run_state(config).settings


# ---- reports ---------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    sandboxes = item.stash.get(_SANDBOXES, [])
    if report.failed and sandboxes and call.excinfo is not None:
        # A test body that failed because its engine went away says which engine.
        lost = run_state(item.config).engine_failure(call.excinfo.value)
        if lost is not None and hasattr(report.longrepr, "addsection"):
            # Part of the failure itself (shown after the traceback, kept by xdist and
            # in junit's failure text), not only a report section.
            report.longrepr.addsection("agentbox: engine", str(lost))
        elif lost is not None:
            report.sections.append(("agentbox: engine", str(lost)))
    if report.failed and sandboxes:
        for title, text in abs_session.report_sections(sandboxes):
            report.sections.append((f"agentbox: {title}", text))
    if sandboxes:
        redaction.redact_report(report, abs_session.hidden_of(sandboxes))
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_warning_recorded(warning_message: Any) -> None:
    # Before the terminal keeps it for the summary (or a worker sends it on).
    redaction.redact_warning(warning_message)


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
    return run_state(pytestconfig).manifest


@pytest.fixture
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The key vault: ``--agentbox-vault`` when set, else a fresh one for this test."""
    return run_state(request.config).open_vault(tmp_path)


@pytest.fixture(scope="session")
def _agentbox_upstream(request: pytest.FixtureRequest) -> Iterator[Any]:
    state = run_state(request.config)
    with _engine_guard(state):
        extra = state.settings.get("fake-upstream-domains")
        upstream = state.start_fake_upstream(tuple(extra))
    try:
        yield upstream
    finally:
        upstream.close()


@pytest.fixture
def fake_upstream(request: pytest.FixtureRequest, _agentbox_upstream: Any) -> Any:
    """A local TLS fake of the providers' APIs; sandboxes of this test reach it."""
    with _engine_guard(run_state(request.config)):
        _agentbox_upstream.reset()
    return _agentbox_upstream


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest, vault: Any) -> Iterator[Callable[..., Any]]:
    """Make sandboxes: ``sandbox_factory(**overrides)``; each is removed at test end."""
    state = run_state(request.config)
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
        summary = abs_session.setup_summary(sb, state.engine_url)
        item.user_properties.append(("agentbox_setup", summary))
        item.user_properties.append(("agentbox_engine", state.engine_url))
        return sb

    try:
        yield make
    finally:
        failed = item.stash.get(_CALL_FAILED, False)
        for sb in made:
            keep = failed and state.keep_on_failure
            sb.close(keep=keep)
            if keep:
                item.user_properties.append(("agentbox_kept", state.enter_hint(sb)))
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
    """Turns engine and configuration errors into one readable skip or failure.

    An engine that stopped answering mid-run fails the test with a message naming it.
    """

    def __init__(self, state: abs_session.RunState) -> None:
        self._state = state

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        if isinstance(exc, DockerUnavailable) and not self._state.require_docker:
            pytest.skip(str(exc))
        lost = self._state.engine_failure(exc)
        if lost is not None:
            pytest.fail(str(lost), pytrace=False)
        if isinstance(exc, AgentboxError):
            pytest.fail(str(exc), pytrace=False)
        return False
