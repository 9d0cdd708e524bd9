"""Validation rules for host names, env names and auth styles.

Shared by the manifest and the egress policy. Pure functions with no pydantic or provider
knowledge: each returns the (normalised) value or raises ValueError naming the rule.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "ENV_NAME_MAX",
    "PROTECTED_ENV_FAMILIES",
    "EnvFamily",
    "check_auth_style",
    "check_base_path",
    "check_env_name",
    "is_ip_literal",
    "normalize_domain",
    "protected_env_family",
    "protected_env_reason",
]


# ----------------------------------------------------------------------------- domains

_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_HEX_RE = re.compile(r"^0x[0-9a-f]*$")
_DOMAIN_EXAMPLE = "declare a host name such as api.example.com"


def _is_ipv4_part(part: str) -> bool:
    """Whether one dotted part is a number to inet_aton(3) and the WHATWG URL parser.

    Hex, octal and decimal all count, in or out of range ("999", "08"): a resolver or URL
    parser may wrap or reinterpret them, and no real host name label looks like that.
    """
    return bool(_HEX_RE.match(part.lower())) or (part.isascii() and part.isdigit())


def _is_ipv4_literal(host: str) -> bool:
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]  # "1.2.3.4." is still 1.2.3.4
    return 1 <= len(parts) <= 4 and all(_is_ipv4_part(p) for p in parts)


def is_ip_literal(value: str) -> bool:
    """Whether ``value`` is an IP address in any spelling a resolver or URL parser accepts.

    Covers dotted, decimal (``3232235777``), octal (``0300.0250.0.1``), hex
    (``0xC0A80001``, ``0xc0.0xa8.0.1``) and shortened (``127.1``) IPv4, and IPv6 with or
    without brackets, embedded IPv4 (``::ffff:1.2.3.4``) and zone ids (``fe80::1%eth0``).
    """
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            # A zone id may hold characters ipaddress refuses ("fe80::1%25en0").
            try:
                ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                return False
        return True
    return bool(host) and _is_ipv4_literal(host)


def _fail(value: str, rule: str) -> ValueError:
    return ValueError(f"{value!r} {rule}")


def normalize_domain(value: str, *, allow_wildcard: bool = False) -> str:
    """Return ``value`` as a lower-case fully qualified host name, or raise ValueError.

    Non-ASCII names are mapped to their ``xn--`` form with the stdlib ``idna`` codec and
    checked afterwards (the mapping can turn full-width digits into an IP address). With
    ``allow_wildcard`` one leading ``*.`` is accepted in front of a name of 2+ labels.
    """
    if not isinstance(value, str):
        raise ValueError(f"a domain must be a string, got {type(value).__name__}")
    if value == "":
        raise ValueError(f"a domain must not be empty; {_DOMAIN_EXAMPLE}")
    if any(c.isspace() for c in value):
        raise _fail(value, "contains whitespace; a domain is one host name")
    if "://" in value:
        raise _fail(value, "has a URL scheme; give the bare host name such as api.example.com")
    if "/" in value or "?" in value or "#" in value:
        raise _fail(value, "has a path; give the bare host name such as api.example.com")
    if "@" in value:
        raise _fail(value, "has user info ('@'); give the bare host name")
    if is_ip_literal(value):
        raise _fail(value, f"is an IP address; {_DOMAIN_EXAMPLE}")
    if ":" in value:
        raise _fail(value, "has a port; ports are not part of a domain rule, give the host only")
    host = value
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _fail(value, "is not a valid internationalised domain name") from None
        if is_ip_literal(host):
            raise _fail(value, f"is an IP address once mapped to ASCII ({host}); {_DOMAIN_EXAMPLE}")
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    prefix = ""
    if allow_wildcard and host.startswith("*."):
        prefix, host = "*.", host[2:]
    if "*" in host:
        where = "allowed only as a leading '*.'" if allow_wildcard else "not allowed here"
        raise _fail(value, f"has a wildcard '*'; wildcards are {where}")
    if prefix and is_ip_literal(host):
        raise _fail(value, f"is a wildcard over an IP address; {_DOMAIN_EXAMPLE}")
    if "_" in host:
        raise _fail(value, "contains an underscore; host names allow letters, digits, '-' and '.'")
    labels = host.split(".")
    if len(labels) < 2:
        rule = "is a single-label host name; declare a fully qualified name such as api.example.com"
        if prefix:
            rule = "is a wildcard over a top-level domain; use at least '*.example.com'"
        raise _fail(value, rule)
    if len(prefix + host) > 253:
        raise _fail(value, "is longer than 253 characters")
    for label in labels:
        if not label:
            raise _fail(value, "has an empty label ('..' or a leading dot)")
        if len(label) > 63:
            raise _fail(value, f"has a label longer than 63 characters ({label[:20]}...)")
        if not _LABEL_RE.match(label):
            raise _fail(
                value,
                f"has an invalid label {label!r}; labels use a-z, 0-9 and '-', "
                "and do not start or end with '-'",
            )
    last = labels[-1]
    if last.isdigit() or _HEX_RE.match(last):
        # URL parsers treat a name ending in a number as an IPv4 address.
        raise _fail(value, "ends in a number; the last label (top-level domain) needs a letter")
    return prefix + host


# ------------------------------------------------------------------------- environment

ENV_NAME_MAX = 64
# Upper case only, matched with fullmatch: `$` would also accept a trailing newline.
_ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")


@dataclass(frozen=True)
class EnvFamily:
    """A group of env names a manifest may not claim, and why.

    ``names`` are exact; ``prefixes`` and ``suffixes`` cover open-ended families. Names
    are upper case (env names must be), and lookups fold case.
    """

    key: str
    label: str
    why: str
    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()


def _family(
    key: str, label: str, why: str, names: str = "", prefixes: str = "", suffixes: str = ""
) -> EnvFamily:
    return EnvFamily(
        key, label, why, frozenset(names.split()), tuple(prefixes.split()), tuple(suffixes.split())
    )


# The sandbox puts each key's env_var and base_url_env into the agent's environment, so a
# manifest choosing one of these would set it for every program the agent runs. Exact
# names win over patterns, and a longer pattern over a shorter one (GIT_SSL_* is TLS).
PROTECTED_ENV_FAMILIES: tuple[EnvFamily, ...] = (
    # ld.so / dyld: LD_PRELOAD, LD_AUDIT, LD_LIBRARY_PATH, DYLD_INSERT_LIBRARIES inject
    # shared objects into every dynamically linked program.
    _family(
        "loader",
        "dynamic-loader",
        "it makes every program load attacker code",
        names="LD_PRELOAD LD_LIBRARY_PATH LD_AUDIT LD_DEBUG_OUTPUT DYLD_INSERT_LIBRARIES"
        " DYLD_LIBRARY_PATH",
        prefixes="LD_ DYLD_",
    ),
    # glibc reads these at every start: tunables (CVE-2023-4911), iconv modules
    # (GCONV_PATH loads .so files), resolver host files and options, malloc hooks.
    _family(
        "libc",
        "C-library",
        "libc reads it at every program start to load modules, tune malloc or resolve names",
        names="GCONV_PATH HOSTALIASES RESOLV_HOST_CONF RES_OPTIONS LOCALDOMAIN NIS_PATH"
        " GETCONF_DIR LIBC_FATAL_STDERR_ POSIXLY_CORRECT",
        prefixes="GLIBC_ MALLOC_ MEMUSAGE_",
    ),
    # sh/bash/zsh source or evaluate these at start-up (ENV, BASH_ENV, PS4 with $(...),
    # exported BASH_FUNC_ functions) or change how every script splits and finds things.
    _family(
        "shell",
        "shell start-up",
        "shells run or evaluate it when they start, so it runs commands in every script",
        names="ENV ZDOTDIR PS1 PS2 PS3 PS4 PROMPT_COMMAND SHELLOPTS BASHOPTS IFS CDPATH"
        " GLOBIGNORE EXECIGNORE FPATH INPUTRC HISTFILE SHLVL",
        prefixes="BASH_",
    ),
    # Tools start the program these name (git commit runs $EDITOR, man runs $PAGER, less
    # runs $LESSOPEN, tar honours --to-command in TAR_OPTIONS, rsync runs $RSYNC_RSH).
    _family(
        "hook",
        "command-hook",
        "tools run the program it names",
        names="EDITOR VISUAL PAGER MANPAGER BROWSER LESSOPEN LESSCLOSE LESSKEY SUDO_ASKPASS"
        " SSH_ASKPASS RSYNC_RSH RSYNC_CONNECT_PROG CVS_RSH TAR_OPTIONS",
    ),
    # Language runtimes load code from these at start-up: PYTHONSTARTUP, PERL5OPT=-M,
    # RUBYOPT=-r, NODE_OPTIONS=--require, LUA_INIT, JAVA_TOOL_OPTIONS=-javaagent,
    # DOTNET_STARTUP_HOOKS, CORECLR_PROFILER_PATH, PHPRC, R_PROFILE, PYTEST_PLUGINS; the Go
    # ones pick the toolchain and module source (GOTOOLCHAIN downloads and runs a compiler).
    _family(
        "interpreter",
        "interpreter",
        "the language runtime or its toolchain loads, fetches or runs code it names",
        names="PERLLIB CLASSPATH JAVA_TOOL_OPTIONS _JAVA_OPTIONS JDK_JAVA_OPTIONS JAVA_OPTS"
        " JAVA_HOME IRBRC PHPRC TCLLIBPATH ELECTRON_RUN_AS_NODE"
        " GOFLAGS GOPROXY GONOPROXY GOSUMDB GONOSUMDB GONOSUMCHECK GOPRIVATE GOINSECURE"
        " GOTOOLCHAIN GOPATH GOROOT GOBIN GOENV GOCACHE GOMODCACHE GOWORK GOVCS GOAUTH"
        " GOEXPERIMENT GODEBUG GOOS GOARCH GCCGO",
        prefixes="PYTHON PERL RUBY NODE_ LUA_ DOTNET_ COMPLUS_ CORECLR_ PHP_ R_ DENO_ BUN_"
        " CGO_ JULIA_ ERL_ PYTEST_",
    ),
    # Source builds (pip install of an sdist, npm native modules, cargo) run whatever
    # compiler, linker or make flags these name.
    _family(
        "toolchain",
        "build-toolchain",
        "source builds run the compiler, linker or flags it names",
        names="CC CXX CPP LD AR AS NM RANLIB STRIP CFLAGS CXXFLAGS CPPFLAGS LDFLAGS LDLIBS"
        " LIBRARY_PATH CPATH C_INCLUDE_PATH CPLUS_INCLUDE_PATH OBJC_INCLUDE_PATH MAKEFLAGS"
        " MFLAGS GNUMAKEFLAGS MAKEFILES RUSTC RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER"
        " RUSTFLAGS RUSTDOCFLAGS",
        prefixes="PKG_CONFIG CMAKE_ CCACHE_ DISTCC_",
    ),
    # Trust stores and TLS settings: a manifest-chosen CA bundle or OpenSSL config (which
    # can load engines/providers) un-verifies traffic; SSLKEYLOGFILE writes session keys.
    _family(
        "tls",
        "TLS/CA",
        "it changes which certificates are trusted, loads TLS modules or leaks session keys",
        names="SSLKEYLOGFILE REQUESTS_CA_BUNDLE NODE_EXTRA_CA_CERTS NODE_TLS_REJECT_UNAUTHORIZED"
        " GRPC_DEFAULT_SSL_ROOTS_FILE_PATH DENO_CERT HTTPLIB2_CA_CERTS PYTHONHTTPSVERIFY",
        prefixes="SSL_ OPENSSL_ GIT_SSL_ GNUTLS_ CURL_",
    ),
    # http_proxy and friends, in any case and for any scheme (wss_proxy, rsync_proxy ...),
    # plus client config files that set a proxy.
    _family(
        "proxy",
        "proxy",
        "it sends a program's traffic through another host",
        names="HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY FTP_PROXY WGETRC SOCKS_SERVER"
        " SOCKS5_SERVER",
        suffixes="_PROXY",
    ),
    # Package managers: index URLs, registries, config files and install hooks.
    _family(
        "package",
        "package-manager",
        "it changes where packages come from or what an install runs",
        names="VIRTUAL_ENV GEMRC CONDARC",
        prefixes="PIP_ PIPX_ UV_ POETRY_ PDM_ HATCH_ CONDA_ MAMBA_ NPM_CONFIG_ YARN_ PNPM_"
        " COREPACK_ CARGO_ RUSTUP_ GEM_ BUNDLE_ BUNDLER_ COMPOSER_ NUGET_ MAVEN_ GRADLE_"
        " HOMEBREW_",
    ),
    # libc and curses parse locale, message catalogue, terminfo and zone files from these
    # paths (a locale name with '/' is a path too); their parsers have had memory bugs.
    _family(
        "locale",
        "locale-data",
        "libc or curses parses locale, terminal or time-zone data from where it points",
        names="LOCPATH NLSPATH I18NPATH TERMINFO TERMINFO_DIRS TERMCAP TERMPATH LANG"
        " LANGUAGE TZ TZDIR",
        prefixes="LC_",
    ),
    # GSSAPI/Kerberos: another krb5.conf, keytab, replay cache or credential cache.
    _family(
        "kerberos",
        "Kerberos",
        "it points Kerberos at another configuration, keytab or credential cache",
        prefixes="KRB5 GSS_",
    ),
    # Debugger and tracing hooks run code (PYTHONBREAKPOINT, PERL5DB) or write files
    # (sanitizer log_path, GDB history); debuginfod makes gdb fetch from a URL.
    _family(
        "debugger",
        "debugger/tracing",
        "it attaches a debugger, tracer or sanitizer hook that runs code or writes files",
        names="PYTHONBREAKPOINT PERL5DB PERLDB_OPTS",
        prefixes="GDB VALGRIND_ DEBUGINFOD_",
        suffixes="SAN_OPTIONS",
    ),
    # git runs GIT_SSH_COMMAND, GIT_EXTERNAL_DIFF, GIT_ASKPASS and reads GIT_CONFIG_*,
    # GIT_DIR (whose config can set core.fsmonitor to any command).
    _family(
        "git",
        "git",
        "git runs the command or reads the config and repository it names",
        prefixes="GIT_",
    ),
    # Set by the sandbox itself, or moving the user's home, config dirs, agent and bus.
    _family(
        "system",
        "system",
        "the sandbox sets it, or it moves the user's home, configuration or sessions",
        names="PATH HOME USER LOGNAME SHELL PWD OLDPWD TERM COLORTERM NO_COLOR FORCE_COLOR"
        " TMPDIR TMP TEMP TEMPDIR HOSTNAME MAIL MAILPATH UID EUID DISPLAY WAYLAND_DISPLAY"
        " DBUS_SESSION_BUS_ADDRESS",
        prefixes="XDG_ SSH_ SUDO_",
    ),
    # Cloud, cluster and container-engine clients: other credentials, endpoints, engines.
    _family(
        "cloud",
        "cloud/engine credential",
        "it points cloud, cluster or container tools at other credentials or endpoints",
        names="KUBECONFIG GOOGLE_APPLICATION_CREDENTIALS CONTAINER_HOST",
        prefixes="AWS_ CLOUDSDK_ DOCKER_",
    ),
    _family(
        "agentbox",
        "pytest-agentbox",
        "pytest-agentbox reserves these names for itself",
        prefixes="AGENTBOX_",
    ),
)


def _build_env_index() -> tuple[dict[str, EnvFamily], list[tuple[str, str, EnvFamily]]]:
    exact: dict[str, EnvFamily] = {}
    patterns: list[tuple[str, str, EnvFamily]] = []  # (kind, text, family)
    for family in PROTECTED_ENV_FAMILIES:
        for name in family.names:
            if name in exact:
                raise RuntimeError(
                    f"{name} is in two env families: {exact[name].key}, {family.key}"
                )
            exact[name] = family
        patterns += [("prefix", p, family) for p in family.prefixes]
        patterns += [("suffix", s, family) for s in family.suffixes]
    texts = [text for _, text, _ in patterns]
    if len(texts) != len(set(texts)):
        raise RuntimeError("an env name pattern is in two families")
    patterns.sort(key=lambda p: -len(p[1]))
    return exact, patterns


_PROTECTED_EXACT, _PROTECTED_PATTERNS = _build_env_index()


def protected_env_family(name: str) -> tuple[EnvFamily, str] | None:
    """The family ``name`` belongs to and the rule that matched (``LD_*``), or None.

    Case is folded, so the answer holds for any spelling a caller passes.
    """
    upper = name.upper()
    if upper in _PROTECTED_EXACT:
        return _PROTECTED_EXACT[upper], upper
    for kind, text, family in _PROTECTED_PATTERNS:
        if kind == "prefix" and upper.startswith(text):
            return family, f"{text}*"
        if kind == "suffix" and upper.endswith(text):
            return family, f"*{text}"
    return None


def protected_env_reason(name: str) -> str | None:
    """Why ``name`` may not be used as a key's env var, or None.

    For example ``"dynamic-loader variable (LD_*: it makes every program load attacker
    code)"``; an exact name gives just the reason in parentheses.
    """
    found = protected_env_family(name)
    if found is None:
        return None
    family, rule = found
    why = family.why if rule == name.upper() else f"{rule}: {family.why}"
    return f"{family.label} variable ({why})"


def check_env_name(value: str) -> str:
    """Return ``value`` if it is a usable, unprotected env var name, else raise ValueError.

    Usable means ``[A-Z_][A-Z0-9_]*`` in full, at most :data:`ENV_NAME_MAX` characters.
    """
    if not isinstance(value, str) or not _ENV_NAME_RE.fullmatch(value):
        # The value is not echoed: a mis-pasted key would otherwise land in the message.
        hint = ""
        if isinstance(value, str):
            if any(c.isspace() for c in value):
                hint = " (it contains whitespace or a line break)"
            elif value and _ENV_NAME_RE.fullmatch(value.upper()):
                hint = " (use upper case)"
        raise ValueError(
            "must be an environment variable name: upper-case letters, digits and '_', "
            f"not starting with a digit{hint}"
        )
    if len(value) > ENV_NAME_MAX:
        raise ValueError(
            f"must be an environment variable name of at most {ENV_NAME_MAX} characters"
        )
    if reason := protected_env_reason(value):
        raise ValueError(f"{value!r} is a {reason}; choose another name")
    return value


# ---------------------------------------------------------------------- auth and paths

_BASE_PATH_RE = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$")


def check_auth_style(value: str) -> str:
    """Return ``value`` if the key proxy accepts it as an auth style, else raise.

    The rule is the key proxy's own (``keyproxy.auth_header``): a manifest that passes
    here is one the key proxy starts with.
    """
    from pytest_agentbox.inside.keyproxy import auth_header

    try:
        auth_header(value)
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value


def check_base_path(value: str) -> str:
    """Return ``value`` if it is empty or a clean ``/segment/...`` path, else raise ValueError."""
    if value and (
        not _BASE_PATH_RE.match(value)
        or len(value) > 200
        or any(seg in (".", "..") for seg in value.split("/"))
    ):
        raise ValueError(
            f"{value!r} is not a base path; use '/segment/...' without '..', query or trailing '/'"
        )
    return value
