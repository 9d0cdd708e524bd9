"""Every pytest-agentbox option in one table, with one precedence and one parser.

Each option ``NAME`` has a command-line flag ``--agentbox-NAME``, an ini key
``agentbox_NAME`` and an environment variable ``AGENTBOX_NAME`` (dashes become
underscores; the repeatable ``--agentbox-engine`` reads ``agentbox_engines`` and
``AGENTBOX_ENGINES``). Precedence, highest first::

    marker  >  command line  >  environment  >  ini file  >  default

A per-test value (``@pytest.mark.agentbox(timeout=...)``, ``sandbox_factory(...)``)
beats every run-wide one, for the options whose ``marker`` column says so.

Stdlib only and pytest-free: the plugin registers its options and ini keys from
:data:`OPTIONS`, and the ``agentbox`` command reads the same settings through
:func:`resolve` (without ini files). Bad values raise :class:`OptionError`, which names
the option, where the value came from and what is allowed; the plugin shows it as a
``pytest.UsageError``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pytest_agentbox.errors import AgentboxError
from pytest_agentbox.policy.values import (
    MAX_SECONDS,
    check_image_ref,
    check_runtime_name,
    isolation_runtime,
)

__all__ = [
    "MAX_SECONDS",
    "OPTIONS",
    "Option",
    "OptionError",
    "Settings",
    "check_engine_url",
    "check_image_ref",
    "check_runtime_name",
    "isolation_runtime",
    "option",
    "parse_value",
    "resolve",
]

Kind = Literal["bool", "int", "float", "size", "path", "string", "linelist"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SIZE_RE = re.compile(r"^(\d+)([bkmg]?)$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_LIST_SPLIT = re.compile(r"[\s,]+")


class OptionError(AgentboxError):
    """An option has a value that is not allowed (the message says which, where, why)."""


def check_engine_url(value: str) -> str:
    """``value`` normalised if it is a Docker engine URL, else ValueError (the one rule:
    :func:`pytest_agentbox.backends.docker.engine.parse_engine_url`)."""
    from pytest_agentbox.backends.docker.engine import (
        parse_engine_url,  # stdlib-only at import, like this module
    )

    return parse_engine_url(value).text


@dataclass(frozen=True)
class Option:
    """One option: its name, type, default, help text and whether a marker may set it.

    ``allowed`` says in words what a valid value is (it ends every error message);
    ``minimum`` bounds numbers from below (``> minimum`` for floats, ``>= minimum`` for
    ints and sizes), ``maximum`` from above (``<=``); ``check`` validates strings (each
    item of a list) and may normalise them. ``repeatable`` lets the flag be given several
    times (lists only); ``ini_key`` and ``env_var`` replace the derived names when a
    plural reads better.
    """

    name: str
    kind: Kind
    default: Any
    help: str
    marker: bool = False
    allowed: str = ""
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[str], str] | None = None
    default_doc: str = ""
    repeatable: bool = False
    ini_key: str = ""
    env_var: str = ""

    @property
    def flag(self) -> str:
        """The command-line flag, ``--agentbox-NAME``."""
        return "--agentbox-" + self.name

    @property
    def ini(self) -> str:
        """The ini key, ``agentbox_NAME`` (unless the row names another)."""
        return self.ini_key or "agentbox_" + self.name.replace("-", "_")

    @property
    def env(self) -> str:
        """The environment variable, ``AGENTBOX_NAME`` (unless the row names another)."""
        return self.env_var or "AGENTBOX_" + self.name.upper().replace("-", "_")

    @property
    def marker_key(self) -> str | None:
        """The ``@pytest.mark.agentbox(...)`` keyword, when a marker may set this option."""
        return self.name.replace("-", "_") if self.marker else None

    @property
    def allowed_text(self) -> str:
        """What a valid value is, in words (the end of every error message)."""
        return self.allowed or _KIND_ALLOWED[self.kind]

    @property
    def shown_default(self) -> str:
        """The default as the README and ``--help`` show it."""
        if self.default_doc:
            return self.default_doc
        if self.kind == "bool":
            return "false"
        if self.default in (None, [], ""):
            return "none"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


OPTIONS: tuple[Option, ...] = (
    Option(
        "manifest", "path", None, "agent manifest (agent.yaml) the sandboxes are made from",
        allowed="a path to an agent.yaml file",
    ),
    Option(
        "image", "string", None, "sandbox image (any image with python3 and /bin/sh)",
        marker=True, check=check_image_ref, allowed="a Docker image reference",
        default_doc="manifest `runtime.image`, else `agentbox/base:bookworm`",
    ),
    Option(
        "sidecar-image", "string", None,
        "image of the sidecar that holds the keys and enforces egress (needs python3)",
        check=check_image_ref, allowed="a Docker image reference",
        default_doc="`agentbox/base:bookworm` (never the sandbox image: it runs beside the keys)",
    ),
    Option(
        "runtime", "string", None,
        "Docker runtime the sandboxes run under, e.g. runsc (gVisor)",
        marker=True, check=check_runtime_name,
        allowed="a runtime name the engine knows, such as runsc or runc",
        default_doc="manifest `runtime.isolation` (gvisor -> runsc), else the engine's",
    ),
    Option(
        "keep-on-failure", "bool", False,
        "keep a failing test's sandbox and print how to enter it",
    ),
    Option(
        "require-docker", "bool", False,
        "fail (instead of skip) sandbox tests when no Docker engine answers; CI sets this",
    ),
    Option(
        "strict-keys", "bool", False, "fail (instead of skip) tests whose required key is missing"
    ),
    Option(
        "vault", "path", None, "key vault file", allowed="a path to a vault file",
        default_doc="a fresh vault per test",
    ),
    Option(
        "state-dir", "path", None, "where persisted sandbox state lives",
        allowed="a directory path", default_doc="`.pytest_cache/agentbox/state`",
    ),
    Option(
        "egress-network", "string", "bridge", "Docker network the egress proxy sidecar joins",
        allowed="a Docker network name",
    ),
    Option(
        "timeout", "float", 300.0, "default timeout of sandbox.run, seconds", marker=True,
        minimum=0, maximum=MAX_SECONDS,
        allowed="a number of seconds greater than 0 and at most 604800 (7 days)",
    ),
    Option(
        "state-max-mb", "float", 1024.0, "cap on one persisted state's total size, MB",
        minimum=0, allowed="a number of megabytes greater than 0",
    ),
    Option(
        "state-max-files", "int", 100_000, "cap on one persisted state's member count",
        minimum=1, allowed="a whole number of at least 1",
    ),
    Option(
        "state-max-seconds", "float", 120.0, "time limit of one state snapshot or restore, s",
        minimum=0, maximum=MAX_SECONDS,
        allowed="a number of seconds greater than 0 and at most 604800 (7 days)",
    ),
    Option(
        "fake-upstream-domains", "linelist", [],
        "extra domain names the fake_upstream fixture answers for",
        allowed="domain names, one per ini line (comma- or space-separated on the "
        "command line and in the environment)",
    ),
    Option(
        "engine", "linelist", [],
        "Docker engine URL (repeatable); xdist workers are spread over the engines",
        repeatable=True, ini_key="agentbox_engines", env_var="AGENTBOX_ENGINES",
        check=check_engine_url,
        allowed="unix:///path, tcp://host:port (TLS: tcp://host:port#certs=DIR) or "
        "ssh://[user@]host[:port]; one per ini line, comma- or newline-separated in the "
        "environment",
        default_doc="the environment's engine (`DOCKER_HOST`, else the local socket)",
    ),
)  # fmt: skip

_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    """The table row of ``name`` (``KeyError`` for an unknown one)."""
    return _BY_NAME[name]


_KIND_ALLOWED = {
    "bool": "true or false (also 1/0, yes/no, on/off)",
    "int": "a whole number",
    "float": "a number",
    "size": "a size such as 512m or 2g",
    "path": "a path",
    "string": "text",
    "linelist": "a list of names",
}


def _fail(opt: Option, raw: Any, origin: str, why: str) -> OptionError:
    shown = repr(raw)
    if len(shown) > 80:  # a runaway environment variable must not flood the terminal
        shown = shown[:77] + "..."
    return OptionError(
        f"agentbox option {opt.name}: {shown} from {origin} {why}; allowed: {opt.allowed_text}"
    )


def parse_value(opt: Option, raw: Any, origin: str, *, base: Path | None = None) -> Any:
    """``raw`` (text, or a native value from a marker or ini list) as ``opt``'s type.

    ``origin`` names where ``raw`` came from, for the error message. Relative paths are
    made absolute against ``base`` (the ini file's directory, or the invocation
    directory) when it is given.
    """
    kind = opt.kind
    if kind == "linelist":
        if isinstance(raw, str):
            items = [p for p in _LIST_SPLIT.split(raw.strip()) if p]
        elif isinstance(raw, Sequence) and all(isinstance(p, str) for p in raw):
            # A repeated flag: each value may itself be a list ("a,b").
            split = (_LIST_SPLIT.split(p.strip()) for p in raw) if opt.repeatable else [raw]
            items = [p.strip() for part in split for p in part if p.strip()]
        else:
            raise _fail(opt, raw, origin, "is not a list of names")
        if opt.check is None:
            return items
        checked = []
        for item in items:
            try:
                checked.append(opt.check(item))
            except ValueError as exc:
                raise _fail(opt, item, origin, f"is refused ({exc})") from None
        return list(dict.fromkeys(checked))  # the same engine twice is one engine
    if isinstance(raw, bool) and kind != "bool":
        raise _fail(opt, raw, origin, f"is a boolean, not a value of type {kind}")
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise _fail(opt, raw, origin, "is not a boolean")
    if kind in ("int", "float", "size"):
        return _number(opt, raw, origin)
    if not isinstance(raw, str | os.PathLike):
        raise _fail(opt, raw, origin, f"is a {type(raw).__name__}, not text")
    text = os.fspath(raw)
    if not text.strip() or "\x00" in text:
        raise _fail(opt, raw, origin, "is empty or holds a NUL character")
    if kind == "path":
        path = Path(text).expanduser()
        return str(base / path) if base is not None and not path.is_absolute() else str(path)
    if opt.check is not None:
        try:
            return opt.check(text)
        except ValueError as exc:
            raise _fail(opt, raw, origin, f"is refused ({exc})") from None
    return text


def _number(opt: Option, raw: Any, origin: str) -> float | int:
    value: float | int
    if isinstance(raw, int | float):
        value = raw
    elif isinstance(raw, str):
        text = raw.strip().lower()
        try:
            if opt.kind == "size":
                match = _SIZE_RE.match(text)
                if not match:
                    raise ValueError(text)
                value = int(match[1]) * _SIZE_UNITS[match[2]]
            elif opt.kind == "int":
                value = int(text, 10)
            else:
                value = float(text)
        except ValueError:
            raise _fail(opt, raw, origin, f"is not {_KIND_WORDS[opt.kind]}") from None
    else:
        raise _fail(opt, raw, origin, f"is a {type(raw).__name__}, not a number")
    if opt.kind in ("int", "size") and (isinstance(value, float) and not value.is_integer()):
        raise _fail(opt, raw, origin, "is not a whole number")
    if opt.kind in ("int", "size"):
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(opt, raw, origin, "is not a finite number")
    low = opt.minimum
    if low is not None and (value <= low if opt.kind == "float" else value < low):
        raise _fail(opt, raw, origin, "is out of range")
    if opt.maximum is not None and value > opt.maximum:
        raise _fail(opt, raw, origin, "is out of range")
    return float(value) if opt.kind == "float" else value


_KIND_WORDS = {"int": "a whole number", "float": "a number", "size": "a size"}


@dataclass(frozen=True)
class Settings:
    """Resolved option values and where each came from (``source(name)``)."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]

    def get(self, name: str) -> Any:
        """The value of option ``name``, already of its type (``None`` when unset)."""
        return self.values[option(name).name]

    def source(self, name: str) -> str:
        """Where ``name``'s value came from, e.g. ``the environment (AGENTBOX_TIMEOUT)``."""
        return self.sources[option(name).name]

    def is_default(self, name: str) -> bool:
        """True when no marker, flag, environment variable or ini key set ``name``."""
        return self.source(name) == "default"

    def explicit(self, name: str) -> Any:
        """The value when a source set it, ``None`` when it is only the default."""
        return None if self.is_default(name) else self.get(name)

    def for_test(self, overrides: Mapping[str, Any], where: str = "a marker") -> Settings:
        """These settings with per-test ``overrides`` (marker keywords) on top.

        Only options whose table row allows a marker are taken; other keys are ignored
        (they are the manifest's overrides, not options).
        """
        values, sources = dict(self.values), dict(self.sources)
        for opt in OPTIONS:
            key = opt.marker_key
            if key is None or overrides.get(key) is None:  # image=None: no override
                continue
            origin = f"{where} ({key}=)"
            values[opt.name] = parse_value(opt, overrides[key], origin)
            sources[opt.name] = origin
        return Settings(values, sources)


def marker_keys() -> tuple[str, ...]:
    """The ``@pytest.mark.agentbox(...)`` keywords that are options."""
    return tuple(o.marker_key for o in OPTIONS if o.marker_key)


def resolve(
    *,
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    ini: Mapping[str, Any] | None = None,
    ini_dir: Path | None = None,
    cwd: Path | None = None,
    names: Sequence[str] | None = None,
) -> Settings:
    """Resolve every option (or only ``names``): command line > environment > ini > default.

    ``cli`` and ``ini`` map option names to raw values (``None``, ``""`` and ``[]`` mean
    unset); ``env`` defaults to ``os.environ``. Relative paths from the ini file are
    taken from ``ini_dir``; from the command line and the environment, from ``cwd``.
    """
    cli = cli or {}
    ini = ini or {}
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS if names is None else [option(n) for n in names]:
        candidates = (
            (cli.get(opt.name), f"the command line ({opt.flag})", cwd),
            (env.get(opt.env), f"the environment ({opt.env})", cwd),
            (ini.get(opt.name), f"the ini file ({opt.ini})", ini_dir),
        )
        for raw, origin, base in candidates:
            if raw is None or (isinstance(raw, str | list | tuple) and not raw):
                continue
            values[opt.name] = parse_value(opt, raw, origin, base=base)
            sources[opt.name] = origin
            break
        else:
            values[opt.name] = list(opt.default) if opt.kind == "linelist" else opt.default
            sources[opt.name] = "default"
    return Settings(values, sources)
