"""The sandbox's network allowlist, computed on the host before any container exists.

A sandbox may reach: the domains its manifest and markers declare, the pinned key
domains (through the key proxy), and -- only when a ``setup_command`` exists -- the
package registries the user's own pip and npm configuration point at. The GitHub
codeload host is never auto-allowed (seed 0.2.0: "Package registry allowlist
tightened"). Enforcement lives in :mod:`pytest_agentbox.inside.egressproxy`; this module is
pure (no Docker, no network) so it can be tested as a table. The engine's own ranges
are asked of the engine by :mod:`pytest_agentbox.backends.docker.networks`.

After DNS the proxy refuses every non-public address (``egressproxy.address_class``, the
one rule) and the engine's own networks and addresses. A declared domain with
``private: true`` may resolve to RFC 1918, 100.64/10 and ULA addresses -- never to
loopback, link-local, metadata, other special ranges or the engine's own networks.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_agentbox.errors import ManifestError
from pytest_agentbox.inside import egressproxy
from pytest_agentbox.policy.manifest import normalize_domain

DEFAULT_PIP_INDEX = "https://pypi.org/simple"
# pypi.org serves its index from one host and the files it lists from another.
PYPI_FILES_HOST = "files.pythonhosted.org"
DEFAULT_NPM_REGISTRY = "https://registry.npmjs.org/"
NEVER_AUTO_ALLOW = frozenset({"codeload.github.com"})

_PIP_KEYS = ("index-url", "extra-index-url", "find-links")
_PIP_COMMANDS = ("install", "download")
_ENV_REF = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class EgressPolicy:
    """Which hosts a sandbox may reach, and why each one is there.

    ``ignored`` holds human-readable notes on configured registries that were left out
    (IP literals, non-FQDNs, codeload), so the report can explain a failing install.
    ``private_domains``: declared domains (``private: true``) that may resolve to private
    addresses (the egress proxy's ``private_ok``).
    """

    unrestricted: bool
    domains: tuple[str, ...]
    key_domains: tuple[str, ...]
    registries: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    private_domains: tuple[str, ...] = ()

    def allowlist(self) -> tuple[str, ...]:
        """Sorted union of declared, key and registry hosts; codeload is never in it."""
        hosts = {*self.domains, *self.key_domains, *self.registries} - NEVER_AUTO_ALLOW
        return tuple(sorted(hosts))

    def agent_allowlist(self) -> tuple[str, ...]:
        """What the agent itself may reach: the allowlist without the key domains, which
        only the key proxy (in the sidecar) talks to; a declared domain stays."""
        hosts = {*self.domains, *self.registries} - NEVER_AUTO_ALLOW
        return tuple(sorted(hosts))

    def denylist(self) -> tuple[str, ...]:
        """Hosts the proxy refuses even when a declared ``*.`` wildcard covers them."""
        return tuple(sorted(NEVER_AUTO_ALLOW))

    @property
    def enabled(self) -> bool:
        """True when any traffic may leave the sandbox."""
        return self.unrestricted or bool(self.allowlist())

    def describe(self) -> str:
        """Multi-line text for the test report."""
        if self.unrestricted:
            lines = [
                "NETWORK UNRESTRICTED: the sandbox may connect to ANY host, IP address and port.",
                "No egress proxy, no allowlist, no decision log "
                "(manifest permissions.network_unrestricted).",
            ]
            if self.allowlist():
                lines.append("(allowlist not enforced: " + ", ".join(self.allowlist()) + ")")
            return "\n".join(lines)
        allowed = self.allowlist()
        if not allowed:
            lines = ["egress: no network (nothing declared, no key routes, no registries);"]
            lines.append("the sandbox has loopback only.")
        else:
            lines = [
                f"egress allowlist ({len(allowed)} hosts, through the egress proxy; "
                "everything else is refused and logged):"
            ]
            for label, hosts in (
                ("declared", [d for d in self.domains if d not in NEVER_AUTO_ALLOW]),
                ("key routes", self.key_domains),
                ("registries", self.registries),
            ):
                if hosts:
                    lines.append(f"  {label + ':':<12}{', '.join(hosts)}")
            lines.append("  IP addresses are always refused (only host names are allowed).")
            lines.append(
                "  private addresses are refused after DNS (RFC 1918, 100.64/10, ULA, "
                "loopback, link-local, metadata, other special ranges, the engine's networks)"
            )
            if self.private_domains:
                lines.append(
                    f"  PRIVATE OK:  {', '.join(self.private_domains)} (may resolve to RFC 1918, "
                    "100.64/10 and ULA addresses; manifest private: true)"
                )
            lines.append(f"  never allowed: {', '.join(self.denylist())}")
        lines += [f"  ignored: {note}" for note in self.ignored]
        return "\n".join(lines)


def domain_matches(host: str, pattern: str) -> bool:
    """Whether ``host`` matches ``pattern`` exactly or below a ``*.`` wildcard.

    The same rule the egress proxy enforces: ``*.example.com`` matches ``a.example.com``
    but neither ``example.com`` nor ``badexample.com``; case and a trailing dot do not
    matter; IP literals and invalid names never match.
    """
    return egressproxy.host_allowed(host, [pattern])[0]


def registry_hosts(
    env: Mapping[str, str] | None = None, home: Path | None = None, *, root: Path = Path("/")
) -> tuple[str, ...]:
    """Package registry hosts from the user's own pip and npm configuration.

    ``root`` relocates the system-wide files (``/etc/pip.conf`` ...) for tests.
    """
    return _scan_registries(env, home, root)[0]


def compute_policy(
    *,
    declared: Sequence[str],
    key_domains: Sequence[str],
    has_setup_command: bool,
    unrestricted: bool,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    root: Path = Path("/"),
    private: Sequence[str] = (),
) -> EgressPolicy:
    """The policy of one sandbox; registries only when a ``setup_command`` exists.

    ``private``: declared domains opted in to private addresses (``private: true``).
    Raises :class:`ManifestError` when a declared or key domain is not a valid name, or a
    private one is not declared.
    """
    domains = _normalized(declared, allow_wildcard=True)
    private_domains = _normalized(private, allow_wildcard=True)
    if set(private_domains) - set(domains):
        missing = ", ".join(sorted(set(private_domains) - set(domains)))
        raise ManifestError(f"network domain: {missing} is private but not declared")
    keys = _normalized(key_domains, allow_wildcard=False)
    registries: tuple[str, ...] = ()
    ignored = [f"{d} (declared, but never allowed)" for d in domains if d in NEVER_AUTO_ALLOW]
    if has_setup_command:
        registries, notes = _scan_registries(env, home, root)
        ignored += notes
    return EgressPolicy(unrestricted, domains, keys, registries, tuple(ignored), private_domains)


def parse_host_addresses(text: str) -> list[str]:
    """Local addresses in fib_trie (``|-- A`` then ``/32 host LOCAL``) and if_inet6 text."""
    found, last = set(), ""
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "|--":
            last = words[1]
        elif line.strip().startswith("/32 host LOCAL") and last:
            found.add(str(ipaddress.ip_address(last)))
        elif len(words) == 6 and len(words[0]) == 32:
            found.add(str(ipaddress.IPv6Address(int(words[0], 16))))
    return sorted(found)


def open_tunnels(decisions: str) -> list[dict[str, Any]]:
    """Allowed connections of a decision log that have no close line yet (for the report
    at teardown: tunnels still open)."""
    opened: dict[Any, dict[str, Any]] = {}
    for line in decisions.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("event") == "connect" and rec.get("decision") == "allow":
            opened[rec.get("id")] = rec
        elif rec.get("event") == "close":
            opened.pop(rec.get("id"), None)
    return list(opened.values())


def _normalized(values: Iterable[str], *, allow_wildcard: bool) -> tuple[str, ...]:
    out = set()
    for value in values:
        try:
            out.add(normalize_domain(value, allow_wildcard=allow_wildcard))
        except ValueError as exc:
            raise ManifestError(f"network domain: {exc}") from None
    return tuple(sorted(out))


def _scan_registries(
    env: Mapping[str, str] | None, home: Path | None, root: Path
) -> tuple[tuple[str, ...], list[str]]:
    """(registry hosts, notes on configured URLs that were left out)."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    hosts: set[str] = set()
    notes: list[str] = []
    for url in [*_pip_urls(env, home, root), *_npm_urls(env, home, root)]:
        host = _url_host(url, notes)
        if host:
            hosts.add(host)
            if host == "pypi.org":
                hosts.add(PYPI_FILES_HOST)
    return tuple(sorted(hosts)), sorted(set(notes))


def _url_host(url: str, notes: list[str]) -> str | None:
    """The host of an http(s) URL, or None (noted when the reason is worth telling)."""
    try:
        parts = urlsplit(url.strip())
        raw = parts.hostname or ""
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not raw:
        return None  # file://, local paths: nothing to allow
    if egressproxy.is_ip_literal(raw):
        notes.append(f"{raw} (IP literal: the egress proxy refuses IP addresses)")
        return None
    try:
        host = normalize_domain(raw)
    except ValueError:
        notes.append(f"{raw} (not a fully qualified domain name)")
        return None
    if host in NEVER_AUTO_ALLOW:
        notes.append(f"{host} (never auto-allowed)")
        return None
    return host


# ------------------------------------------------------------------------------- pip


def _pip_files(env: Mapping[str, str], home: Path, root: Path) -> list[Path]:
    """pip's config files, lowest precedence first (as pip itself orders them)."""
    env_file = env.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:
        return []  # pip's documented way to load no configuration file at all
    xdg_dirs = env.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [_under(root, Path(d) / "pip" / "pip.conf") for d in reversed(xdg_dirs.split(":"))]
    files.append(_under(root, Path("/etc/pip.conf")))
    files.append(home / ".pip" / "pip.conf")
    xdg_home = env.get("XDG_CONFIG_HOME")
    files.append((Path(xdg_home) if xdg_home else home / ".config") / "pip" / "pip.conf")
    if env_file:
        files.append(Path(env_file))
    return files


def _pip_urls(env: Mapping[str, str], home: Path, root: Path) -> list[str]:
    """Every index, extra index and find-links URL pip would use for install/download."""
    merged: dict[tuple[str, str], str] = {}
    for path in _pip_files(env, home, root):
        parser = configparser.RawConfigParser(strict=False)
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # pip would fail loudly on its own; we just do not widen the list
        for section in parser.sections():
            for key, value in parser.items(section):
                merged[(section.lower(), key.replace("_", "-").lower())] = value
    urls: list[str] = []
    for command in _PIP_COMMANDS:
        effective = {}
        for key in _PIP_KEYS:
            env_value = env.get("PIP_" + key.replace("-", "_").upper())
            for value in (env_value, merged.get((command, key)), merged.get(("global", key))):
                if value:
                    effective[key] = value
                    break
        index = effective.get("index-url")
        urls += (index or DEFAULT_PIP_INDEX).split()
        urls += effective.get("extra-index-url", "").split()
        urls += effective.get("find-links", "").split()
    return urls


# ------------------------------------------------------------------------------- npm


def _npmrc(path: Path, env: Mapping[str, str]) -> dict[str, str]:
    """Top-level ``key=value`` pairs of an npmrc, ``${VAR}`` expanded like npm does."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    out, in_section = {}, False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            in_section = True  # keys inside sections are not top-level settings
            continue
        key, sep, value = line.partition("=")
        if not sep or in_section:
            continue
        value = value.strip().strip('"').strip("'")
        out[key.strip()] = _ENV_REF.sub(lambda m: env.get(m.group(1), ""), value)
    return out


def _npm_urls(env: Mapping[str, str], home: Path, root: Path) -> list[str]:
    """The default and every scoped registry npm would use (env > user > global)."""
    lower_env = {k.lower(): v for k, v in env.items()}
    prefix = lower_env.get("npm_config_prefix") or env.get("PREFIX")
    global_files = [_under(root, Path(p, "etc/npmrc")) for p in ("/usr", "/usr/local")]
    if lower_env.get("npm_config_globalconfig"):
        global_files = [Path(lower_env["npm_config_globalconfig"])]
    elif prefix:  # npm's own prefix: where node is installed unless configured
        global_files = [Path(prefix, "etc/npmrc")]
    userconfig = lower_env.get("npm_config_userconfig")
    settings: dict[str, str] = {}
    for path in [*global_files, Path(userconfig) if userconfig else home / ".npmrc"]:
        settings.update(_npmrc(path, env))
    for key, value in lower_env.items():
        if key.startswith("npm_config_") and value:
            settings[key[len("npm_config_") :]] = value
    urls = [settings.get("registry") or DEFAULT_NPM_REGISTRY]
    urls += [v for k, v in settings.items() if k.startswith("@") and k.endswith(":registry")]
    return urls


def _under(root: Path, path: Path) -> Path:
    """``path`` (absolute) re-rooted below ``root``."""
    return root / path.relative_to(path.anchor)
