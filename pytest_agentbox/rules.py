"""Validation rules for host names, env names and auth styles.

Shared by the manifest and the egress policy. Pure functions with no pydantic or provider
knowledge: each returns the (normalised) value or raises ValueError naming the rule.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "check_auth_style",
    "check_base_path",
    "check_env_name",
    "is_ip_literal",
    "normalize_domain",
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

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_LOADER = "loader variable (changes what code a program loads or runs)"
_PROXY = "proxy/CA variable (redirects or un-verifies network traffic)"
_PACKAGES = "package manager variable (changes where packages come from)"
_SYSTEM = "system variable"
_RESERVED = "reserved for pytest-agentbox"

_LOADER_NAMES = (
    "NODE_OPTIONS NODE_PATH BASH_ENV ENV PERL5LIB PERL5OPT PERLLIB RUBYOPT RUBYLIB"
    " JAVA_TOOL_OPTIONS _JAVA_OPTIONS JDK_JAVA_OPTIONS CLASSPATH GCONV_PATH GLIBC_TUNABLES"
    " LOCPATH NLSPATH HOSTALIASES RESOLV_HOST_CONF LOCALDOMAIN RES_OPTIONS ZDOTDIR"
    " PROMPT_COMMAND CDPATH GLOBIGNORE SHELLOPTS BASHOPTS EDITOR VISUAL PAGER BROWSER"
)
_PROXY_NAMES = (
    "HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY FTP_PROXY SSL_CERT_FILE SSL_CERT_DIR"
    " REQUESTS_CA_BUNDLE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS NODE_TLS_REJECT_UNAUTHORIZED"
    " GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"
)
_SYSTEM_NAMES = (
    "PATH HOME USER LOGNAME SHELL PWD OLDPWD TMPDIR TMP TEMP IFS PS1 PS2 PS3 PS4"
    " TERM LANG LANGUAGE TZ HOSTNAME MAIL UID EUID"
)
_PROTECTED_EXACT: dict[str, str] = {
    **dict.fromkeys(_LOADER_NAMES.split(), _LOADER),
    **dict.fromkeys(_PROXY_NAMES.split(), _PROXY),
    **dict.fromkeys(_SYSTEM_NAMES.split(), _SYSTEM),
}

_PROTECTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("LD_", _LOADER),
    ("DYLD_", _LOADER),
    ("PYTHON", _LOADER),
    ("GIT_", _LOADER),
    ("BASH_FUNC_", _LOADER),
    ("PIP_", _PACKAGES),
    ("NPM_CONFIG_", _PACKAGES),
    ("UV_", _PACKAGES),
    ("YARN_", _PACKAGES),
    ("LC_", _SYSTEM),
    ("AGENTBOX_", _RESERVED),
)


def protected_env_reason(name: str) -> str | None:
    """Why ``name`` may not be used as a key's env var (case-insensitive), or None.

    The sandbox sets key env vars for the agent; letting a manifest pick one of these
    would let it load code, redirect traffic or break the system environment.
    """
    upper = name.upper()
    if upper in _PROTECTED_EXACT:
        return _PROTECTED_EXACT[upper]
    for prefix, reason in _PROTECTED_PREFIXES:
        if upper.startswith(prefix):
            return reason
    if upper.endswith("_PROXY"):
        # Many tools read <scheme>_proxy (wss_proxy, socks_proxy, rsync_proxy ...).
        return _PROXY
    return None


def check_env_name(value: str) -> str:
    """Return ``value`` if it is a usable, unprotected env var name, else raise ValueError."""
    if not _ENV_NAME_RE.match(value):
        # The value is not echoed: a mis-pasted key would otherwise land in the message.
        raise ValueError(
            "must be an environment variable name (letters, digits and '_', "
            "not starting with a digit)"
        )
    if reason := protected_env_reason(value):
        raise ValueError(f"{value!r} is a protected name ({reason}); choose another name")
    return value


# ---------------------------------------------------------------------- auth and paths

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")
# Hop-by-hop and framing headers: the proxy owns them, a key must not overwrite them.
_AUTH_HEADERS_REFUSED = (
    "host content-length transfer-encoding connection keep-alive te trailer upgrade"
    " proxy-authorization proxy-connection expect"
)
_FORBIDDEN_AUTH_HEADERS = frozenset(_AUTH_HEADERS_REFUSED.split())
_BASE_PATH_RE = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$")


def check_auth_style(value: str) -> str:
    """Return ``value`` if it is ``bearer``, ``x-api-key`` or ``header:<token>``, else raise."""
    if value in ("bearer", "x-api-key"):
        return value
    if value.startswith("header:"):
        header = value.removeprefix("header:")
        if not _TOKEN_RE.match(header):
            raise ValueError(
                f"{value!r}: the header name after 'header:' must be an HTTP token "
                "(letters, digits and !#$%&'*+-.^_`|~, at most 64)"
            )
        if header.lower() in _FORBIDDEN_AUTH_HEADERS:
            raise ValueError(f"{value!r}: {header!r} is managed by the proxy, not an auth header")
        return value
    raise ValueError(
        f"{value!r} is not an auth style; use 'bearer', 'x-api-key' or 'header:<Name>'"
    )


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
