"""Per-run state behind the plugin: options, manifest, once-per-run work, statistics.

Kept apart from :mod:`.hooks` so that the hooks stay thin and everything here can be
driven without pytest (``RunState(settings)`` takes
:class:`pytest_agentbox.plugin.options.Settings`).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_agentbox import paths
from pytest_agentbox.backends.base import DEFAULT_IMAGE, Backend, backend_for
from pytest_agentbox.backends.docker import engine
from pytest_agentbox.backends.docker.engine import EngineSpec
from pytest_agentbox.errors import (
    AgentboxError,
    DockerUnavailable,
    ImageMissing,
    KeyMissing,
    ManifestError,
)
from pytest_agentbox.plugin.options import OptionError, Settings, isolation_runtime, marker_keys
from pytest_agentbox.plugin.options import resolve as resolve_options
from pytest_agentbox.plugin.redaction import HIDDEN, redactor

# Kept light on purpose: the plugin loads this in every pytest run of an environment
# where pytest-agentbox is installed, and in every xdist process. pydantic (manifest),
# filelock and the sandbox code load on first use.
if TYPE_CHECKING:
    from pytest_agentbox.policy.manifest import Manifest
    from pytest_agentbox.sandbox import Sandbox, SandboxConfig

__all__ = [
    "DEFAULT_IMAGE",
    "STATS",
    "RunState",
    "choose_engine",
    "close_all",
    "hidden_of",
    "redactor",
    "report_sections",
    "setup_summary",
]

DECOY_DOMAIN = "decoy.agentbox.test"
_TEST_ONLY_OVERRIDES = ("state", "cap_add")


@dataclass
class Stats:
    """What the terminal summary reports; fed from reports so it works under xdist."""

    setups: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    cleaned: int = 0
    engines: dict[str, int] = field(default_factory=dict)  # engine URL -> sandboxes made

    def add_setup(self, value: Any) -> None:
        if isinstance(value, dict):
            self.setups.append(value)
            if isinstance(value.get("engine"), str):
                self.engines[value["engine"]] = self.engines.get(value["engine"], 0) + 1

    def summary_lines(self) -> list[str]:
        lines = []
        if self.setups:
            times = [s["seconds"] for s in self.setups]
            slow = max(self.setups, key=lambda s: s["seconds"])
            lines.append(
                f"agentbox: {len(times)} sandboxes created; setup median "
                f"{statistics.median(times):.2f}s, slowest {slow['seconds']:.2f}s "
                f"(mostly {slow['dominant']}); leaked resources cleaned: {self.cleaned}"
            )
        elif self.cleaned:
            lines.append(f"agentbox: leaked resources cleaned: {self.cleaned}")
        if len(self.engines) > 1:
            per = ", ".join(f"{url} {n}" for url, n in sorted(self.engines.items()))
            lines.append(f"agentbox: sandboxes per engine: {per}")
        for hint in self.kept:
            lines.append(f"agentbox: kept failing sandbox; step in with: {hint}")
        return lines


STATS = Stats()


def setup_summary(sb: Sandbox, engine_url: str = "") -> dict[str, Any]:
    """Total setup seconds, the step that took longest and the engine (for the summary)."""
    steps = sb.steps or []
    dominant = max(steps, key=lambda s: s.seconds).name if steps else "-"
    out: dict[str, Any] = {"seconds": round(sb.setup_seconds, 3), "dominant": dominant}
    if engine_url:
        out["engine"] = engine_url
    return out


def choose_engine(engines: Sequence[EngineSpec], worker: str) -> EngineSpec:
    """The engine of one pytest process: xdist worker ``gwN`` gets ``engines[N % count]``,
    any other process (``-n 0``, the controller) the first."""
    match = re.fullmatch(r"gw(\d+)", worker)
    return engines[int(match[1]) % len(engines)] if match else engines[0]


def _hidden(sb: Sandbox) -> list[str]:
    """What a report must never show of ``sb``: its real keys and the agent's tokens."""
    routes = {r.env_var for r in sb.config.key_routes}
    return list(sb.config.keys.values()) + [v for k, v in sb.env.items() if k in routes]


def hidden_of(sandboxes: list[Sandbox]) -> list[str]:
    """The keys and tokens of ``sandboxes``, also remembered for process-wide output."""
    hidden = [h for sb in sandboxes for h in _hidden(sb)]
    HIDDEN.add(hidden)
    return hidden


def report_sections(sandboxes: list[Sandbox]) -> list[tuple[str, str]]:
    """Report sections for a failed test: setup, egress policy, commands, logs, state.

    Every section passes through the redactor: keys and session tokens never appear,
    in any form, whichever section (command output, a warning, a log) carried them.
    """
    out: list[tuple[str, str]] = []
    for i, sb in enumerate(sandboxes):
        tag = f" #{i + 1}" if len(sandboxes) > 1 else ""
        redact = redactor(_hidden(sb))
        logs = sb.collect_logs()
        steps = "\n".join(f"{s.name:<18} {s.seconds:7.3f}s" for s in sb.steps)
        steps += "".join(f"\nwarning: {w}" for w in sb.warnings)
        mine = [(f"setup{tag}", f"image {sb.config.image}\n{steps}")]
        if sb.config.egress is not None:
            mine.append((f"egress policy{tag}", sb.config.egress.describe()))
        if sb.history:
            cmds = [
                f"$ {c.command}  [exit {c.exit_code}, {c.duration:.2f}s"
                f"{', TIMED OUT' if c.timed_out else ''}{_dropped(c)}]\n"
                f"{_tail(c.stdout)}{_tail(c.stderr)}"
                for c in sb.history
            ]
            mine.append((f"commands{tag}", "\n".join(cmds)))
        for title, text in logs.items():
            mine.append((f"{title}{tag}", text.strip() or "(empty)"))
        if sb.state_report:
            mine.append((f"state{tag}", sb.state_report))
        out += [(redact(title), redact(text)) for title, text in mine]
    return out


def _dropped(result: Any) -> str:
    n = result.stdout_dropped + result.stderr_dropped
    return f", {n} bytes of its output not kept" if n else ""


def _tail(text: str, lines: int = 30) -> str:
    return "".join(line + "\n" for line in text.splitlines()[-lines:])


class RunState:
    """Options and once-per-run work for one pytest process (controller or worker)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        rootpath: Path | None = None,
        cache_dir: Path = Path(".pytest_cache"),
        make_backend: Callable[[str | None], Backend] | None = None,
    ) -> None:
        """``settings`` from :func:`pytest_agentbox.plugin.options.resolve` (default: resolved
        from the environment alone); ``rootpath`` and ``cache_dir`` place the default
        state directory. ``make_backend(url)`` builds the backend of an engine URL (None:
        the environment's engine); default
        :func:`~pytest_agentbox.backends.base.backend_for` (the plugin passes its
        ``pytest_agentbox_make_backend`` hook)."""
        self.settings = settings if settings is not None else resolve_options()
        self._make_backend = make_backend or backend_for
        get = self.settings.get
        self.rootpath = rootpath if rootpath is not None else Path.cwd()
        self.cache_dir = cache_dir
        self.image_option: str | None = self.settings.explicit("image")
        self.keep_on_failure: bool = get("keep-on-failure")
        self.require_docker: bool = get("require-docker")
        self.strict_keys: bool = get("strict-keys")
        self.vault_path: str | None = get("vault")
        self.egress_network: str = get("egress-network")
        self.timeout: float = get("timeout")
        self.run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or paths.token()
        self._state_dir: str | None = get("state-dir")
        self.state_max_mb: float = get("state-max-mb")
        self.state_max_files: int = get("state-max-files")
        self.state_max_seconds: float = get("state-max-seconds")
        self._cleaned = 0
        # Run-wide engines, in the order given; this process uses one of them.
        self.engines_explicit = bool(get("engine"))
        self.engines: tuple[EngineSpec, ...] = (
            tuple(engine.parse_engine_url(u) for u in get("engine"))
            if self.engines_explicit
            else (engine.environment_engine(),)
        )
        self.engine: EngineSpec = choose_engine(self.engines, paths.worker_id())
        manifest_path = get("manifest")
        self.manifest_path = Path(manifest_path).resolve() if manifest_path else None
        self._manifest: Manifest | None = None
        if self.manifest_path:  # a bad manifest is a usage error at start-up, not per test
            from pytest_agentbox.policy.manifest import load_manifest

            self._manifest = load_manifest(self.manifest_path)

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            from pytest_agentbox.policy.manifest import Manifest

            self._manifest = Manifest(name="agentbox-default")
        return self._manifest

    def header_lines(self) -> list[str]:
        where = self.manifest_path or "none (built-in defaults)"
        runtime = f"; runtime {self.default_runtime}" if self.default_runtime else ""
        lines = [
            f"agentbox: manifest {where}; image {self.default_image}{runtime}; run {self.run_id}"
        ]
        if self.engines_explicit:
            lines.append("agentbox: engines " + ", ".join(e.text for e in self.engines))
        return lines

    # ---- engines ----------------------------------------------------------------

    @property
    def engine_url(self) -> str:
        """The URL of this process's engine (where its sandboxes, sidecars and fake
        upstream live)."""
        return self.engine.url

    def backend_of(self, spec: EngineSpec) -> Backend:
        """The backend of one engine of the run (DockerUnavailable when it does not answer)."""
        return self._make_backend(None if spec.from_environment else spec.text)

    def backend(self) -> Backend:
        """The backend of this process's engine.

        An engine named with ``--agentbox-engine`` answered at the start of the run, so
        one that does not answer now died mid-run:
        :class:`~pytest_agentbox.backends.docker.engine.EngineLost` (the test fails,
        whatever ``--agentbox-require-docker`` says).
        """
        try:
            return self.backend_of(self.engine)
        except DockerUnavailable as exc:
            if self.engines_explicit:
                raise engine.lost(self.engine, "it no longer answers") from exc
            raise

    def enter_hint(self, sb: Sandbox) -> str:
        """The command that steps into a kept sandbox, pointed at its engine when that is
        not the environment's (``DOCKER_HOST=... docker exec ...``)."""
        hint = sb.exec_hint()
        if self.engine.from_environment:
            return hint
        env = " ".join(f"{k}={v}" for k, v in self.engine.cli_env().items())
        return f"{env} {hint}"

    def check_engines(self, *, timeout: float = 10.0) -> list[str]:
        """Why each run-wide engine cannot be used, one line each ([] when all can).

        Every engine is pinged (side by side, at most ``timeout`` s in all) and asked
        for the default image; run once at the start of a run with explicit engines.
        """

        def check(spec: EngineSpec) -> str | None:
            why = engine.check_engine(spec, timeout=timeout)
            if why is not None:
                return why
            try:
                self.backend_of(spec).ensure_image(self.default_image)
            except AgentboxError as exc:
                return str(exc)
            return None

        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            found = list(pool.map(check, self.engines))
        return [why for why in found if why]

    def engine_failure(self, exc: BaseException) -> engine.EngineLost | None:
        """The :class:`~pytest_agentbox.backends.docker.engine.EngineLost` behind ``exc`` when this
        process's engine no longer answers (None: the engine is fine, or ``exc`` is a
        configuration error). Pings the engine, so call it only for a failure."""
        if isinstance(exc, engine.EngineLost):
            return exc
        config_errors = (ManifestError, KeyMissing, OptionError, ImageMissing)
        if isinstance(exc, config_errors):
            return None
        if not (engine.is_engine_error(exc) or isinstance(exc, AgentboxError)):
            return None
        why = engine.check_engine(self.engine)
        if why is None:
            return None
        engine.drop_client(self.engine)  # should it come back, the next test reconnects
        return engine.lost(self.engine, f"{type(exc).__name__} during the test")

    @property
    def default_runtime(self) -> str | None:
        """The Docker runtime of sandboxes without a per-test ``runtime=`` (None: engine's)."""
        from_manifest = (
            isolation_runtime(self._manifest.runtime.isolation) if self._manifest else None
        )
        return self.settings.explicit("runtime") or from_manifest

    @property
    def default_image(self) -> str:
        from_manifest = self._manifest.runtime.image if self._manifest is not None else None
        return self.image_option or from_manifest or DEFAULT_IMAGE

    @property
    def state_dir(self) -> Path:
        if self._state_dir:
            return Path(self._state_dir)
        return self.rootpath / self.cache_dir / "agentbox" / "state"

    # ---- once per run, shared by xdist workers --------------------------------

    def _shared_dir(self) -> Path:
        d = Path(tempfile.gettempdir()) / f"agentbox-{os.getuid()}"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def clean_up_once(self, backend: Backend | None = None) -> None:
        """Remove leaked objects of dead owners on every engine of the run (and on
        ``backend``, when given), once per run, behind a file lock.

        The plugin calls it before the first sandbox; a ``conftest.py`` that plants
        leftovers on purpose calls it first, so that no worker removes them mid-test.
        An engine that does not answer is a warning here (the test that needs it fails).
        """
        if getattr(self, "_gc_done", False):
            return
        shared = self._shared_dir()
        marker = shared / f"gc-{self.run_id}.done"
        from filelock import FileLock

        # The lock file is never unlinked: unlinking lets two holders exist at once.
        with FileLock(str(shared / "gc.lock")):
            if not marker.exists():
                given: dict[str, Backend] = {}
                if backend is not None:
                    given[backend.url] = backend
                specs = {e.url: e for e in self.engines}
                for url in dict.fromkeys([*specs, *given]):
                    try:
                        got = given.get(url) or self.backend_of(specs[url])
                        self._cleaned += len(got.clean_up_dead_owners())
                    except Exception as exc:  # housekeeping: never the reason a test fails
                        msg = f"agentbox: clean-up of leaked resources failed: {exc} (on {url})"
                        warnings.warn(msg, stacklevel=2)
                marker.touch()
        self._gc_done = True

    def take_cleaned(self) -> int:
        n, self._cleaned = self._cleaned, 0
        return n

    # ---- fixtures' work -------------------------------------------------------

    def open_vault(self, tmp_path: Path) -> Any:
        from pytest_agentbox.vault import FileSecretStore, Vault

        if self.vault_path:
            return Vault(self.vault_path)
        private = tmp_path / "agentbox-vault"
        private.mkdir(mode=0o700)
        return Vault(private / "vault.json", secret_store=FileSecretStore(private / "secret"))

    def start_fake_upstream(self, extra_domains: tuple[str, ...] = ()) -> Any:
        from pytest_agentbox.policy.manifest import KNOWN_PROVIDERS

        backend = self.backend()
        self.clean_up_once(backend)
        domains = [p.domain for p in KNOWN_PROVIDERS.values()]
        domains += [r.domain for r in self.manifest.permissions.network if "*" not in r.domain]
        domains += [k.domain for k in self.manifest.keys if k.domain]
        # A decoy that really answers, so negative tests prove refusal, not a DNS miss.
        domains += [DECOY_DOMAIN, *extra_domains]
        return backend.start_fake_upstream(domains, image=self.default_image, run_id=self.run_id)

    def sandbox_config(
        self, item: Any, overrides: Mapping[str, Any], *, vault: Any, upstream: Any = None
    ) -> SandboxConfig:
        """Manifest + markers + factory overrides -> a validated SandboxConfig."""
        from pytest_agentbox.policy.egress import compute_policy
        from pytest_agentbox.policy.manifest import apply_overrides
        from pytest_agentbox.policy.manifest import resolve_key_routes as _routes
        from pytest_agentbox.sandbox import SandboxConfig
        from pytest_agentbox.state import Limits, StateStore

        merged: dict[str, Any] = {}
        for mark in reversed(list(item.iter_markers("agentbox"))):
            merged.update(mark.kwargs)
        # Per-test option values (image, runtime, timeout) beat every run-wide source,
        # and a factory call beats the markers; taken out of the manifest overrides so
        # that the manifest's own values rank below the run's options.
        try:
            settings = self.settings.for_test(
                merged, where=f"the agentbox marker of {item.nodeid}"
            ).for_test(overrides, where=f"sandbox_factory() in {item.nodeid}")
        except OptionError as exc:
            raise ManifestError(str(exc)) from None
        merged.update(overrides)
        for key in marker_keys():
            merged.pop(key, None)
        extra_keys = [p for m in item.iter_markers("agentbox_keys") for p in m.args]
        extra_net = [d for m in item.iter_markers("agentbox_network") for d in m.args]
        if extra_net:
            merged["network"] = [*list(merged.get("network") or []), *extra_net]
        manifest, rest = apply_overrides(self.manifest, merged)
        unknown = set(rest) - set(_TEST_ONLY_OVERRIDES)
        if unknown:
            raise ManifestError(
                f"unknown sandbox override(s) {sorted(unknown)}; allowed: image, runtime, "
                "setup_command, run_command, resources, keys, network, network_unrestricted, "
                "state, timeout, cap_add"
            )
        routes = _routes(manifest, extra_keys)
        keys = self._keys_for(routes, vault)
        live = tuple(r for r in routes if r.provider in keys)
        policy = compute_policy(
            declared=[r.domain for r in manifest.permissions.network],
            key_domains=[r.domain for r in live],
            has_setup_command=bool(manifest.runtime.setup_command),
            unrestricted=manifest.permissions.network_unrestricted,
            private=[r.domain for r in manifest.permissions.network if r.private],
        )
        state_key = rest.get("state")
        config = SandboxConfig(
            image=settings.explicit("image") or manifest.runtime.image or DEFAULT_IMAGE,
            sidecar_image=settings.get("sidecar-image") or DEFAULT_IMAGE,
            runtime=settings.explicit("runtime") or isolation_runtime(manifest.runtime.isolation),
            code_dir=self.manifest_path.parent if self.manifest_path else None,
            setup_command=manifest.runtime.setup_command,
            resources=manifest.runtime.resources,
            key_routes=live,
            keys=keys,
            egress=policy,
            egress_network=upstream.network_name if upstream is not None else self.egress_network,
            extra_ca_pem=upstream.ca_pem if upstream is not None else None,
            egress_pins=upstream.pins if upstream is not None else {},
            state_scope=f"{manifest.name}/{state_key}" if state_key else None,
            state_store=StateStore(self.state_dir) if state_key else None,
            state_limits=Limits(
                max_total_bytes=int(self.state_max_mb * 1024 * 1024),
                max_members=self.state_max_files,
                max_seconds=self.state_max_seconds,
            ),
            timeout=settings.get("timeout"),
            run_id=self.run_id,
        )
        if "cap_add" in rest:
            from pytest_agentbox.sandbox import check_cap_add

            try:  # only the hardening set: anything else widens the engine's seccomp profile
                config.cap_add = check_cap_add(rest["cap_add"])
            except AgentboxError as exc:
                raise ManifestError(f"{item.nodeid}: {exc}") from None
        return config

    def _keys_for(self, routes: list[Any], vault: Any) -> dict[str, str]:
        """Decrypt only the keys this sandbox needs; a missing required key is KeyMissing."""
        keys: dict[str, str] = {}
        for r in routes:
            if vault.has(r.provider):
                keys[r.provider] = vault.get(r.provider)
            elif r.required:
                raise KeyMissing(
                    f"key {r.provider!r} is required but not in the vault ({vault.path}); "
                    f"add it with `agentbox keys add {r.provider}` (reads the key from stdin), "
                    f"or `vault.add({r.provider!r}, key)` in the test"
                )
        return keys

    def create_sandbox(self, config: SandboxConfig, on_created: Callable[[Sandbox], None]) -> Any:
        from pytest_agentbox.sandbox import Sandbox

        backend = self.backend()
        self.clean_up_once(backend)
        return Sandbox.create(config, backend, on_created=on_created)


def close_all() -> None:
    """Remove every live sandbox of this process (none exist if the sandbox code never loaded)."""
    loaded = sys.modules.get(f"{__package__}.sandbox")
    if loaded is not None:
        loaded.close_all()
