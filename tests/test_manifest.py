"""Every rule of the agent manifest, valid and invalid (pure logic, no Docker)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox.errors import ManifestError
from pytest_agentbox.policy.manifest import (
    KNOWN_PROVIDERS,
    OVERRIDE_KEYS,
    KeyRequirement,
    KeyRoute,
    Manifest,
    NetworkRule,
    ProviderInfo,
    Resources,
    apply_overrides,
    is_ip_literal,
    load_manifest,
    manifest_from_dict,
    normalize_domain,
    protected_env_reason,
    resolve_key_routes,
)
from pytest_agentbox.policy.rules import (
    PROTECTED_ENV_FAMILIES,
    check_env_name,
    protected_env_family,
)

PYDANTIC_NOISE = ("pydantic", "errors.pydantic.dev", "validation error for", "Value error,")


def assert_readable(message: str, *needles: str) -> None:
    """The message holds every needle and none of pydantic's own formatting."""
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    for noise in PYDANTIC_NOISE:
        assert noise not in message, f"{noise!r} leaked into {message!r}"


def manifest_error(data: Any) -> str:
    with pytest.raises(ManifestError) as info:
        manifest_from_dict(data, source="agent.yaml")
    return str(info.value)


# ----------------------------------------------------------------------------- providers


def test_known_providers_table_is_exactly_the_seven() -> None:
    expected = {
        "anthropic": (
            "api.anthropic.com",
            "ANTHROPIC_API_KEY",
            "ANTHROPIC_BASE_URL",
            "x-api-key",
            "",
        ),
        "openai": ("api.openai.com", "OPENAI_API_KEY", "OPENAI_BASE_URL", "bearer", "/v1"),
        "google": (
            "generativelanguage.googleapis.com",
            "GOOGLE_API_KEY",
            "GOOGLE_GEMINI_BASE_URL",
            "header:x-goog-api-key",
            "",
        ),
        "groq": ("api.groq.com", "GROQ_API_KEY", "GROQ_BASE_URL", "bearer", ""),
        "mistral": ("api.mistral.ai", "MISTRAL_API_KEY", "MISTRAL_BASE_URL", "bearer", ""),
        "deepseek": ("api.deepseek.com", "DEEPSEEK_API_KEY", "DEEPSEEK_BASE_URL", "bearer", ""),
        "brave": (
            "api.search.brave.com",
            "BRAVE_API_KEY",
            "BRAVE_BASE_URL",
            "header:X-Subscription-Token",
            "",
        ),
    }
    assert {name: ProviderInfo(*row) for name, row in expected.items()} == KNOWN_PROVIDERS


@pytest.mark.parametrize("provider", sorted(KNOWN_PROVIDERS))
def test_known_provider_table_passes_its_own_rules(provider: str) -> None:
    # The table must survive the rules a manifest is held to.
    info = KNOWN_PROVIDERS[provider]
    assert normalize_domain(info.domain) == info.domain
    assert protected_env_reason(info.env_var) is None
    assert protected_env_reason(info.base_url_env) is None
    KeyRequirement(provider=provider, auth_style=info.auth_style)


# ------------------------------------------------------------------------------- domains

IP_FORMS = [
    "10.0.0.1",
    "1.2.3.4",
    "1.2.3.4.",
    "3232235777",
    "0300.0250.0.1",
    "0xC0A80001",
    "0xc0.0xa8.0.1",
    "0XC0.0XA8.0.1",
    "127.1",
    "10.1.1",
    "0",
    "0x7f.1",
    "::1",
    "[::1]",
    "::ffff:1.2.3.4",
    "[::ffff:1.2.3.4]",
    "fe80::1%eth0",
    "[fe80::1%25en0]",
    "2001:db8::1",
    "999.1.1.1",
]


@pytest.mark.parametrize("value", IP_FORMS)
def test_ip_literals_are_detected(value: str) -> None:
    assert is_ip_literal(value)


@pytest.mark.parametrize(
    "value",
    ["example.com", "api.openai.com", "1.example.com", "0x.example.com", "a1", "1a.2b", "", ":"],
)
def test_host_names_are_not_ip_literals(value: str) -> None:
    assert not is_ip_literal(value)


@pytest.mark.parametrize("value", IP_FORMS)
@pytest.mark.parametrize("wildcard", [False, True])
def test_domain_refuses_every_ip_form(value: str, wildcard: bool) -> None:
    with pytest.raises(ValueError) as info:
        normalize_domain(value, allow_wildcard=wildcard)
    text = str(info.value)
    assert "IP address" in text or "needs a letter" in text, text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", "example.com"),
        ("API.Example.COM", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("API.EXAMPLE.COM.", "api.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("a-b.c-d.io", "a-b.c-d.io"),
        ("x1.y2.z3", "x1.y2.z3"),
        ("1.example.com", "1.example.com"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 49] * 5) + ".com", ".".join(["a" * 49] * 5) + ".com"),  # 253 chars
    ],
)
def test_domain_valid_forms_are_normalised(value: str, expected: str) -> None:
    assert normalize_domain(value) == expected


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("localhost", "single-label"),
        ("intranet", "single-label"),
        ("LOCALHOST.", "single-label"),
        ("com", "single-label"),
        ("ü", "single-label"),
        ("example.123", "needs a letter"),
        ("example.0x1f", "needs a letter"),
        ("my_host.example.com", "underscore"),
        ("_dmarc.example.com", "underscore"),
        ("api.example.com:443", "port"),
        ("api.example.com:", "port"),
        ("https://api.example.com", "scheme"),
        ("http://api.example.com/v1", "scheme"),
        ("api.example.com/v1", "path"),
        ("api.example.com?x=1", "path"),
        ("user@api.example.com", "user info"),
        ("api example.com", "whitespace"),
        (" api.example.com", "whitespace"),
        ("api.example.com\n", "whitespace"),
        ("", "empty"),
        ("-api.example.com", "invalid label"),
        ("api-.example.com", "invalid label"),
        ("api.exa!mple.com", "invalid label"),
        ("a..example.com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("a" * 64 + ".com", "longer than 63"),
        (".".join(["a" * 50] * 5) + ".com", "longer than 253"),
        ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "IP address"),  # full-width digits
        ("*.example.com", "wildcard"),
        ("ex\u200b\u200b.c\u200bom\u200b.\u200b", "internationalised"),
    ],
)
def test_domain_invalid_forms_name_the_rule(value: str, rule: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        normalize_domain(value)
    assert rule in str(info.value)


def test_domain_refuses_non_string() -> None:
    with pytest.raises(ValueError, match="string"):
        normalize_domain(123)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("*.example.com", "*.example.com"),
        ("*.API.Example.com.", "*.api.example.com"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("api.example.com", "api.example.com"),
    ],
)
def test_wildcard_accepted_only_when_allowed(value: str, expected: str) -> None:
    assert normalize_domain(value, allow_wildcard=True) == expected


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("*.com", "top-level"),
        ("*", "wildcard"),
        ("*.", "wildcard"),
        ("*example.com", "wildcard"),
        ("api.*.example.com", "only as a leading"),
        ("*.*.example.com", "only as a leading"),
        ("api.example.*", "only as a leading"),
        ("*.10.0.0.1", "IP address"),
        ("*.localhost", "top-level"),
        ("*.my_host.com", "underscore"),
    ],
)
def test_wildcard_invalid_forms(value: str, rule: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_domain(value, allow_wildcard=True)
    assert rule in str(info.value)


# ---------------------------------------------------------------------- protected env

# One or more names per family: an exact name and, where the family is open-ended, a
# member of a prefix or suffix pattern. Lower-case spellings check the case folding of
# protected_env_family (a manifest cannot use them: env names are upper case).
PROTECTED_CASES = [
    # dynamic loader
    ("LD_PRELOAD", "loader"),
    ("LD_AUDIT", "loader"),
    ("LD_BIND_NOW", "loader"),  # prefix LD_*
    ("DYLD_INSERT_LIBRARIES", "loader"),
    ("DYLD_FALLBACK_LIBRARY_PATH", "loader"),  # prefix DYLD_*
    ("ld_library_path", "loader"),
    # libc / malloc
    ("GLIBC_TUNABLES", "libc"),
    ("GCONV_PATH", "libc"),
    ("HOSTALIASES", "libc"),
    ("RES_OPTIONS", "libc"),
    ("LOCALDOMAIN", "libc"),
    ("MALLOC_CHECK_", "libc"),  # prefix MALLOC_*
    ("MALLOC_CONF", "libc"),
    # shells
    ("BASH_ENV", "shell"),
    ("ENV", "shell"),
    ("PS4", "shell"),
    ("SHELLOPTS", "shell"),
    ("BASHOPTS", "shell"),
    ("IFS", "shell"),
    ("CDPATH", "shell"),
    ("PROMPT_COMMAND", "shell"),
    ("BASH_FUNC_X", "shell"),  # prefix BASH_*
    ("ZDOTDIR", "shell"),
    # programs that tools run
    ("EDITOR", "hook"),
    ("LESSOPEN", "hook"),
    ("SSH_ASKPASS", "hook"),  # exact wins over SSH_*
    ("TAR_OPTIONS", "hook"),
    # interpreters
    ("PYTHONPATH", "interpreter"),
    ("PYTHONSTARTUP", "interpreter"),  # prefix PYTHON*
    ("PERL5LIB", "interpreter"),
    ("PERL5OPT", "interpreter"),
    ("PERLLIB", "interpreter"),
    ("RUBYOPT", "interpreter"),
    ("RUBYLIB", "interpreter"),
    ("NODE_OPTIONS", "interpreter"),
    ("NODE_REPL_EXTERNAL_MODULE", "interpreter"),  # prefix NODE_*
    ("LUA_INIT", "interpreter"),
    ("LUA_INIT_5_4", "interpreter"),
    ("LUA_PATH", "interpreter"),
    ("JAVA_TOOL_OPTIONS", "interpreter"),
    ("_JAVA_OPTIONS", "interpreter"),
    ("JDK_JAVA_OPTIONS", "interpreter"),
    ("CLASSPATH", "interpreter"),
    ("DOTNET_STARTUP_HOOKS", "interpreter"),
    ("COMPLUS_ENABLEDIAGNOSTICS", "interpreter"),
    ("complus_dbgenablemanageddebugger", "interpreter"),  # COMPlus_ folds
    ("CORECLR_PROFILER_PATH", "interpreter"),
    ("PHPRC", "interpreter"),
    ("PHP_INI_SCAN_DIR", "interpreter"),
    ("R_PROFILE_USER", "interpreter"),
    ("GOFLAGS", "interpreter"),
    ("GOPROXY", "interpreter"),
    ("GONOSUMDB", "interpreter"),
    ("GOPRIVATE", "interpreter"),
    ("GOTOOLCHAIN", "interpreter"),
    ("CGO_LDFLAGS", "interpreter"),
    ("PYTEST_PLUGINS", "interpreter"),
    # build toolchain
    ("CC", "toolchain"),
    ("LDFLAGS", "toolchain"),
    ("RUSTC_WRAPPER", "toolchain"),
    ("PKG_CONFIG_PATH", "toolchain"),
    ("CMAKE_TOOLCHAIN_FILE", "toolchain"),
    # TLS / CA
    ("SSL_CERT_FILE", "tls"),
    ("SSL_CERT_DIR", "tls"),
    ("REQUESTS_CA_BUNDLE", "tls"),
    ("CURL_CA_BUNDLE", "tls"),
    ("NODE_EXTRA_CA_CERTS", "tls"),  # exact wins over NODE_*
    ("NODE_TLS_REJECT_UNAUTHORIZED", "tls"),
    ("OPENSSL_CONF", "tls"),
    ("OPENSSL_MODULES", "tls"),  # prefix OPENSSL_*
    ("SSLKEYLOGFILE", "tls"),
    ("GIT_SSL_NO_VERIFY", "tls"),  # GIT_SSL_* is longer than GIT_*
    ("GIT_SSL_CAINFO", "tls"),
    ("PYTHONHTTPSVERIFY", "tls"),  # exact wins over PYTHON*
    # proxies, in any case and for any scheme
    ("HTTP_PROXY", "proxy"),
    ("HTTPS_PROXY", "proxy"),
    ("ALL_PROXY", "proxy"),
    ("NO_PROXY", "proxy"),
    ("FTP_PROXY", "proxy"),
    ("http_proxy", "proxy"),
    ("Https_Proxy", "proxy"),
    ("WSS_PROXY", "proxy"),  # suffix *_PROXY
    ("RSYNC_PROXY", "proxy"),
    ("WGETRC", "proxy"),
    # package managers
    ("PIP_INDEX_URL", "package"),
    ("PIP_EXTRA_INDEX_URL", "package"),
    ("PIPX_HOME", "package"),
    ("UV_INDEX_URL", "package"),
    ("POETRY_REPOSITORIES_X_URL", "package"),
    ("NPM_CONFIG_REGISTRY", "package"),
    ("npm_config_registry", "package"),
    ("YARN_NPM_REGISTRY_SERVER", "package"),
    ("CARGO_REGISTRIES_X_INDEX", "package"),
    ("RUSTUP_DIST_SERVER", "package"),
    ("GEM_HOST", "package"),
    ("GEMRC", "package"),
    ("BUNDLE_GEMFILE", "package"),
    ("COMPOSER_HOME", "package"),
    ("CONDA_PKGS_DIRS", "package"),
    ("CONDARC", "package"),
    ("VIRTUAL_ENV", "package"),
    # locale / terminal / time-zone data
    ("LOCPATH", "locale"),
    ("NLSPATH", "locale"),
    ("I18NPATH", "locale"),
    ("TERMINFO", "locale"),
    ("TERMINFO_DIRS", "locale"),
    ("TERMCAP", "locale"),
    ("TZDIR", "locale"),
    ("TZ", "locale"),
    ("LANG", "locale"),
    ("LANGUAGE", "locale"),
    ("LC_ALL", "locale"),
    ("LC_CTYPE", "locale"),  # prefix LC_*
    # Kerberos
    ("KRB5_CONFIG", "kerberos"),
    ("KRB5_KTNAME", "kerberos"),
    ("KRB5CCNAME", "kerberos"),  # prefix KRB5*
    ("KRB5_TRACE", "kerberos"),
    # debuggers and tracing
    ("PYTHONBREAKPOINT", "debugger"),  # exact wins over PYTHON*
    ("PERL5DB", "debugger"),  # exact wins over PERL*
    ("PERLDB_OPTS", "debugger"),
    ("GDBHISTFILE", "debugger"),  # prefix GDB*
    ("ASAN_OPTIONS", "debugger"),  # suffix *SAN_OPTIONS
    ("DEBUGINFOD_URLS", "debugger"),
    ("VALGRIND_OPTS", "debugger"),
    # git
    ("GIT_SSH_COMMAND", "git"),
    ("GIT_DIR", "git"),
    ("GIT_CONFIG_GLOBAL", "git"),
    ("git_exec_path", "git"),
    # system
    ("PATH", "system"),
    ("HOME", "system"),
    ("USER", "system"),
    ("LOGNAME", "system"),
    ("SHELL", "system"),
    ("PWD", "system"),
    ("OLDPWD", "system"),
    ("TERM", "system"),
    ("TMPDIR", "system"),
    ("DISPLAY", "system"),
    ("XDG_CONFIG_HOME", "system"),
    ("SSH_AUTH_SOCK", "system"),
    ("path", "system"),
    # cloud, cluster and engine clients
    ("KUBECONFIG", "cloud"),
    ("DOCKER_HOST", "cloud"),
    ("AWS_SHARED_CREDENTIALS_FILE", "cloud"),
    ("AWS_ENDPOINT_URL", "cloud"),
    ("GOOGLE_APPLICATION_CREDENTIALS", "cloud"),
    # reserved
    ("AGENTBOX_TOKEN", "agentbox"),
    ("AGENTBOX_ANYTHING", "agentbox"),
]

FAMILIES = {f.key: f for f in PROTECTED_ENV_FAMILIES}


def test_every_family_has_cases() -> None:
    assert {family for _, family in PROTECTED_CASES} == set(FAMILIES)


def test_family_table_is_consistent() -> None:
    seen: dict[str, str] = {}
    for family in PROTECTED_ENV_FAMILIES:
        assert family.label and family.why, family.key
        for name in family.names:
            assert name not in seen, f"{name} in {seen.get(name)} and {family.key}"
            seen[name] = family.key
        for text in (*family.names, *family.prefixes, *family.suffixes):
            assert text == text.upper() and re.fullmatch(r"[A-Z0-9_]+", text), text
        for name in family.names:  # every exact name is one a manifest could write
            assert protected_env_family(name) == (family, name)


@pytest.mark.parametrize(("name", "family"), PROTECTED_CASES)
def test_protected_env_names(name: str, family: str) -> None:
    found = protected_env_family(name)
    assert found is not None, name
    assert found[0].key == family
    reason = protected_env_reason(name)
    assert reason is not None
    assert reason.startswith(f"{FAMILIES[family].label} variable (")
    assert FAMILIES[family].why in reason


@pytest.mark.parametrize("field", ["env_var", "base_url_env"])
@pytest.mark.parametrize(("name", "family"), [c for c in PROTECTED_CASES if c[0].isupper()])
def test_manifest_refuses_protected_env_names(name: str, family: str, field: str) -> None:
    message = manifest_error(
        {"name": "agent", "keys": [{"provider": "x", "domain": "x.example.com", field: name}]}
    )
    fam = FAMILIES[family]
    assert_readable(
        message,
        f"agent.yaml: keys[0].{field}: {name!r} is a {fam.label} variable (",
        fam.why,
        "; choose another name",
    )


def test_protected_message_names_family_and_why() -> None:
    message = manifest_error(
        {"name": "agent", "keys": [{"provider": "openai", "env_var": "LD_PRELOAD"}]}
    )
    assert message == (
        "agent.yaml: keys[0].env_var: 'LD_PRELOAD' is a dynamic-loader variable "
        "(it makes every program load attacker code); choose another name"
    )
    # A pattern match names the pattern.
    message = manifest_error(
        {"name": "agent", "keys": [{"provider": "openai", "env_var": "MALLOC_X"}]}
    )
    assert_readable(message, "'MALLOC_X' is a C-library variable (MALLOC_*: ")


@pytest.mark.parametrize(
    "name",
    [
        "ACME_API_KEY",
        "MY_SERVICE_BASE_URL",
        "OPENAI_API_KEY",
        "GOOGLE_API_KEY",  # GO* is exact names only
        "MY_API_KEY",
        "GITHUB_TOKEN",  # GIT_ is a prefix with underscore; GITHUB_ is not it
        "LDAP_URL",  # LD_ needs the underscore
        "NODEREAL_API_KEY",  # NODE_ needs the underscore
        "DOCKERHUB_TOKEN",
        "PATHFINDER_KEY",
        "HOMEPAGE_URL",
        "PROXY_API_KEY",  # *_PROXY is a suffix
        "ENVIRONMENT",
        "TERMINAL_KEY",
        "LANGSMITH_API_KEY",
        "PERPLEXITY_API_KEY",
        "REPLICATE_API_TOKEN",
        "COHERE_API_KEY",
        "AZURE_OPENAI_API_KEY",
        "HF_TOKEN",
        "_PRIVATE_KEY",
        "A" * 64,
    ],
)
def test_unprotected_env_names(name: str) -> None:
    assert protected_env_reason(name) is None
    assert check_env_name(name) == name
    # A known provider's own names are usable by that provider only.
    owner = next((p for p, info in KNOWN_PROVIDERS.items() if info.env_var == name), None)
    key = {"provider": owner} if owner else {"provider": "x", "domain": "x.example.com"}
    manifest = manifest_from_dict({"name": "a", "keys": [{**key, "env_var": name}]})
    assert manifest.keys[0].env_var == name


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("PATH\n", "line break"),  # `$` would accept the newline
        ("OPENAI_API_KEY\n", "line break"),
        ("ACME_API_KEY\r\n", "line break"),
        (" ACME_API_KEY", "whitespace"),
        ("MY KEY", "whitespace"),
        ("acme_api_key", "use upper case"),
        ("Acme_Key", "use upper case"),
        ("http_proxy", "use upper case"),
        ("1ABC", "not starting with a digit"),
        ("9", "not starting with a digit"),
        ("MY-KEY", "environment variable name"),
        ("MY.KEY", "environment variable name"),
        ("BASH_FUNC_X%%", "environment variable name"),
        ("ÄPI_KEY", "environment variable name"),
        ("KEY\x00", "environment variable name"),
        ("", "environment variable name"),
        ("A" * 65, "at most 64 characters"),
    ],
)
def test_env_name_syntax(value: str, hint: str) -> None:
    with pytest.raises(ValueError, match="environment variable name") as info:
        check_env_name(value)
    assert hint in str(info.value)
    assert value.strip() not in str(info.value) or not value.strip()  # never echoed


@pytest.mark.parametrize("field", ["env_var", "base_url_env"])
@pytest.mark.parametrize("value", ["PATH\n", "OPENAI_API_KEY\n", "acme_api_key", "1ABC", "A" * 65])
def test_manifest_refuses_bad_env_syntax(field: str, value: str) -> None:
    message = manifest_error(
        {"name": "agent", "keys": [{"provider": "x", "domain": "x.example.com", field: value}]}
    )
    assert_readable(message, "agent.yaml", f"keys[0].{field}", "environment variable name")
    assert value not in message


@pytest.mark.parametrize(
    ("provider", "field", "default", "label"),
    [
        ("ld", "env_var", "LD_API_KEY", "dynamic-loader"),
        ("python-tools", "env_var", "PYTHON_TOOLS_API_KEY", "interpreter"),
        ("agentbox", "base_url_env", "AGENTBOX_BASE_URL", "pytest-agentbox"),
        ("aws", "env_var", "AWS_API_KEY", "cloud/engine credential"),
    ],
)
def test_default_env_names_meet_the_same_rule(
    provider: str, field: str, default: str, label: str
) -> None:
    key: dict[str, str] = {"provider": provider, "domain": "x.example.com"}
    if field == "base_url_env":
        key["env_var"] = "FINE_API_KEY"
    message = manifest_error({"name": "agent", "keys": [key]})
    assert_readable(
        message,
        f"keys[0].{field}: {default!r} is a {label} variable",
        f"default for provider {provider!r}; set {field} to another name",
    )


def test_default_env_name_can_be_renamed_away() -> None:
    manifest = manifest_from_dict(
        {
            "name": "a",
            "keys": [
                {
                    "provider": "ld",
                    "domain": "x.example.com",
                    "env_var": "LDX_API_KEY",
                    "base_url_env": "LDX_BASE_URL",
                }
            ],
        }
    )
    assert manifest.keys[0].effective_env_names() == ("LDX_API_KEY", "LDX_BASE_URL")


@pytest.mark.parametrize("value", ["LD_PRELOAD", "PATH\n", "KRB5_CONFIG"])
def test_overrides_refuse_bad_env_names(value: str) -> None:
    base = manifest_from_dict({"name": "a"})
    with pytest.raises(ManifestError) as info:
        apply_overrides(
            base, {"keys": [{"provider": "p", "domain": "p.example.com", "env_var": value}]}
        )
    assert_readable(str(info.value), "with test overrides", "keys[0].env_var")


# ---------------------------------------------------------------------------- key fields


@pytest.mark.parametrize("provider", ["openai", "my-proxy", "a", "x9", "a" * 40, "local-llm-2"])
def test_provider_names_valid(provider: str) -> None:
    assert KeyRequirement(provider=provider, domain="api.example.com").provider == provider


@pytest.mark.parametrize(
    ("provider", "rule"),
    [
        ("my_proxy", "no '_'"),
        ("OpenAI", "lower-case"),
        ("Openai", "lower-case"),
        ("1provider", "starting with a letter"),
        ("-provider", "starting with a letter"),
        ("", "starting with a letter"),
        ("my proxy", "lower-case"),
        ("a" * 41, "at most 40"),
    ],
)
def test_provider_names_invalid(provider: str, rule: str) -> None:
    message = manifest_error(
        {"name": "agent", "keys": [{"provider": provider, "domain": "api.example.com"}]}
    )
    assert_readable(message, "agent.yaml", "keys[0].provider", rule)


@pytest.mark.parametrize("field", ["env_var", "base_url_env"])
@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("LD_PRELOAD", "dynamic-loader variable"),
        ("HTTP_PROXY", "proxy variable"),
        ("PATH", "system variable"),
        ("PIP_INDEX_URL", "package-manager variable"),
        ("AGENTBOX_X", "pytest-agentbox variable"),
        ("1ABC", "environment variable name"),
        ("MY-KEY", "environment variable name"),
        ("MY KEY", "environment variable name"),
        ("", "environment variable name"),
    ],
)
def test_key_env_names_invalid(field: str, value: str, rule: str) -> None:
    message = manifest_error(
        {"name": "agent", "keys": [{"provider": "x", "domain": "x.example.com", field: value}]}
    )
    assert_readable(message, "agent.yaml", f"keys[0].{field}", rule)


def test_bad_env_name_is_not_echoed() -> None:
    # A key pasted into env_var must not end up in an error message or log.
    secret = "sk-live-" + "ab12" * 8
    message = manifest_error({"name": "agent", "keys": [{"provider": "openai", "env_var": secret}]})
    assert_readable(message, "keys[0].env_var", "environment variable name")
    assert secret not in message


@pytest.mark.parametrize(
    "style", ["bearer", "x-api-key", "header:x-goog-api-key", "header:X-Subscription-Token"]
)
def test_auth_style_valid(style: str) -> None:
    assert (
        KeyRequirement(provider="x", domain="x.example.com", auth_style=style).auth_style == style
    )


@pytest.mark.parametrize(
    ("style", "rule"),
    [
        ("Bearer", "auth_style must be 'bearer', 'x-api-key' or 'header:<Name>'"),
        ("basic", "auth_style must be 'bearer', 'x-api-key' or 'header:<Name>'"),
        ("header:", "HTTP token"),
        ("header:X Key", "HTTP token"),
        ("header:X-Key\r\nEvil: 1", "HTTP token"),
        ("header:X:Y", "HTTP token"),
        ("header:Host", "the key proxy sets or drops that header"),
        ("header:Transfer-Encoding", "the key proxy sets or drops that header"),
        ("header:content-length", "the key proxy sets or drops that header"),
    ],
)
def test_auth_style_invalid(style: str, rule: str) -> None:
    message = manifest_error(
        {"name": "a", "keys": [{"provider": "x", "domain": "x.example.com", "auth_style": style}]}
    )
    assert_readable(message, "keys[0].auth_style", rule)


@pytest.mark.parametrize(
    ("base_path", "ok"),
    [("/v1", True), ("/openai/v1", True), ("", True), ("v1", False), ("/v1/", False),
     ("/../admin", False), ("/v1?x=1", False), ("/a b", False)],
)  # fmt: skip
def test_base_path_rule(base_path: str, ok: bool) -> None:
    data = {
        "name": "a",
        "keys": [{"provider": "x", "domain": "x.example.com", "base_path": base_path}],
    }
    if ok:
        assert manifest_from_dict(data).keys[0].base_path == base_path
    else:
        assert_readable(manifest_error(data), "keys[0].base_path", "not a base path")


def test_key_domain_refuses_ip_with_the_documented_message() -> None:
    message = manifest_error(
        {"name": "agent", "keys": [{"provider": "local", "domain": "10.0.0.1"}]}
    )
    assert message == (
        "agent.yaml: keys[0].domain: '10.0.0.1' is an IP address; "
        "declare a host name such as api.example.com"
    )


def test_key_domain_refuses_wildcard() -> None:
    message = manifest_error({"name": "a", "keys": [{"provider": "x", "domain": "*.example.com"}]})
    assert_readable(message, "keys[0].domain", "wildcard")


def test_key_written_as_plain_provider_name() -> None:
    manifest = manifest_from_dict({"name": "a", "keys": ["openai", "anthropic"]})
    assert [k.provider for k in manifest.keys] == ["openai", "anthropic"]


# ------------------------------------------------------------------- cross-key rules


@pytest.mark.parametrize(
    ("keys", "path", "words"),
    [
        (  # env_var vs another key's base_url_env
            [
                {"provider": "a", "domain": "a.example.com", "env_var": "SHARED_NAME"},
                {"provider": "b", "domain": "b.example.com", "base_url_env": "SHARED_NAME"},
            ],
            "keys[1].base_url_env",
            "already used by keys[0].env_var",
        ),
        (  # same key: env_var equal to its own base_url_env
            [
                {
                    "provider": "a",
                    "domain": "a.example.com",
                    "env_var": "X_KEY",
                    "base_url_env": "X_KEY",
                }
            ],
            "keys[0].base_url_env",
            "already used by keys[0].env_var",
        ),
        (  # an explicit name equal to another key's default
            [
                {"provider": "foo", "domain": "foo.example.com"},
                {"provider": "bar", "domain": "bar.example.com", "env_var": "FOO_BASE_URL"},
            ],
            "keys[1].env_var",
            "already used by keys[0].base_url_env",
        ),
        (  # defaults collide: "my-p" and a declared MY_P_API_KEY
            [
                {"provider": "my-p", "domain": "p.example.com"},
                {"provider": "other", "domain": "o.example.com", "env_var": "MY_P_API_KEY"},
            ],
            "keys[1].env_var",
            "already used",
        ),
        (
            [{"provider": "openai"}, {"provider": "openai", "env_var": "SECOND_KEY"}],
            "keys[1].provider",
            "declared twice",
        ),
        (
            [{"provider": "myproxy", "domain": "proxy.example.com", "env_var": "OPENAI_API_KEY"}],
            "keys[0].env_var",
            "belongs to the known provider 'openai'",
        ),
        (
            [{"provider": "myproxy", "domain": "p.example.com", "base_url_env": "OPENAI_BASE_URL"}],
            "keys[0].base_url_env",
            "belongs to the known provider 'openai'",
        ),
        (
            [{"provider": "anthropic", "env_var": "GROQ_API_KEY"}],
            "keys[0].env_var",
            "belongs to the known provider 'groq'",
        ),
        (
            [{"provider": "myproxy"}],
            "keys[0].domain",
            "not a known provider, so it must declare its API domain",
        ),
    ],
)
def test_cross_key_rules(keys: list[dict[str, str]], path: str, words: str) -> None:
    assert_readable(manifest_error({"name": "agent", "keys": keys}), "agent.yaml", path, words)


def test_known_provider_may_rename_its_env_names() -> None:
    manifest = manifest_from_dict(
        {
            "name": "a",
            "keys": [{"provider": "openai", "env_var": "MY_OAI", "base_url_env": "MY_OAI_URL"}],
        }
    )
    (route,) = resolve_key_routes(manifest)
    assert (route.env_var, route.base_url_env, route.domain) == (
        "MY_OAI",
        "MY_OAI_URL",
        "api.openai.com",
    )


# -------------------------------------------------------------------------- key routes


def test_known_provider_is_pinned_whatever_the_manifest_says() -> None:
    manifest = manifest_from_dict(
        {
            "name": "a",
            "keys": [
                {
                    "provider": "openai",
                    "domain": "evil.example.com",
                    "auth_style": "header:X-Leak",
                    "base_path": "/steal",
                }
            ],
        }
    )
    assert resolve_key_routes(manifest) == [
        KeyRoute(
            "openai", "OPENAI_API_KEY", "OPENAI_BASE_URL", "api.openai.com", "bearer", "/v1", True
        )
    ]


def test_unknown_provider_defaults() -> None:
    manifest = manifest_from_dict(
        {
            "name": "a",
            "keys": [{"provider": "my-llm", "domain": "LLM.Example.com.", "required": False}],
        }
    )
    assert resolve_key_routes(manifest) == [
        KeyRoute(
            "my-llm", "MY_LLM_API_KEY", "MY_LLM_BASE_URL", "llm.example.com", "bearer", "", False
        )
    ]


def test_unknown_provider_explicit_fields() -> None:
    key = {
        "provider": "corp",
        "domain": "llm.corp.example",
        "env_var": "CORP_TOKEN",
        "base_url_env": "CORP_URL",
        "auth_style": "header:X-Corp-Key",
        "base_path": "/api/v2",
    }
    (route,) = resolve_key_routes(manifest_from_dict({"name": "a", "keys": [key]}))
    assert route == KeyRoute(
        "corp", "CORP_TOKEN", "CORP_URL", "llm.corp.example", "header:X-Corp-Key", "/api/v2", True
    )


def test_extra_known_provider_from_marker() -> None:
    manifest = manifest_from_dict(
        {"name": "a", "keys": [{"provider": "openai", "required": False}]}
    )
    routes = resolve_key_routes(manifest, ["anthropic", "openai", "anthropic"])
    assert [(r.provider, r.required) for r in routes] == [("openai", False), ("anthropic", True)]
    assert routes[1] == KeyRoute(
        "anthropic",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "api.anthropic.com",
        "x-api-key",
        "",
        True,
    )


def test_extra_unknown_provider_must_be_declared() -> None:
    manifest = manifest_from_dict({"name": "a"})
    with pytest.raises(ManifestError) as info:
        resolve_key_routes(manifest, ["myproxy"])
    assert_readable(str(info.value), "'myproxy'", "declare it under `keys:` in agent.yaml")


def test_extra_unknown_provider_declared_in_manifest_is_fine() -> None:
    manifest = manifest_from_dict(
        {"name": "a", "keys": [{"provider": "mine", "domain": "m.example.com"}]}
    )
    assert [r.provider for r in resolve_key_routes(manifest, ["mine"])] == ["mine"]


def test_duplicate_env_in_final_routes_is_refused() -> None:
    # Only reachable by bypassing validation; the route builder must still check.
    key = KeyRequirement(provider="mine", domain="m.example.com", env_var="MINE_KEY")
    clash = KeyRequirement(provider="other", domain="o.example.com", base_url_env="MINE_KEY")
    manifest = Manifest.model_construct(name="a", keys=[key, clash])
    with pytest.raises(ManifestError, match="already used"):
        resolve_key_routes(manifest)


# ------------------------------------------------------------------------ other fields


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({}, ("1g", 1.0, 512)),
        ({"memory": "512m", "cpus": 0.5, "pids": 16}, ("512m", 0.5, 16)),
        ({"memory": "2G", "cpus": 64, "pids": 32768}, ("2g", 64.0, 32768)),
        ({"memory": "16m"}, ("16m", 1.0, 512)),
        ({"memory": "16384k"}, ("16384k", 1.0, 512)),
        ({"memory": 16 * 1024 * 1024}, (str(16 * 1024 * 1024), 1.0, 512)),
        ({"memory": "1073741824b"}, ("1073741824b", 1.0, 512)),
    ],
)
def test_resources_valid(resources: dict[str, Any], expected: tuple[str, float, int]) -> None:
    got = manifest_from_dict({"name": "a", "runtime": {"resources": resources}}).runtime.resources
    assert (got.memory, got.cpus, got.pids) == expected


def test_memory_bytes() -> None:
    assert Resources(memory="512m").memory_bytes == 512 * 1024 * 1024
    assert Resources(memory="2g").memory_bytes == 2 * 1024**3


@pytest.mark.parametrize(
    ("resources", "path", "rule"),
    [
        ({"memory": "15m"}, "memory", "minimum of 16m"),
        ({"memory": "1000"}, "memory", "minimum of 16m"),
        ({"memory": "1t"}, "memory", "not a size"),
        ({"memory": "1.5g"}, "memory", "not a size"),
        ({"memory": "-1g"}, "memory", "not a size"),
        ({"memory": "lots"}, "memory", "not a size"),
        ({"cpus": 0}, "cpus", "greater than 0"),
        ({"cpus": -1}, "cpus", "greater than 0"),
        ({"cpus": 64.5}, "cpus", "less than or equal to 64"),
        ({"cpus": float("inf")}, "cpus", "finite"),
        ({"cpus": "2"}, "cpus", "expected a number"),
        ({"pids": 15}, "pids", "greater than or equal to 16"),
        ({"pids": 32769}, "pids", "less than or equal to 32768"),
        ({"pids": True}, "pids", "whole number"),
        ({"pids": 100.5}, "pids", "whole number"),
        ({"swap": "1g"}, "swap", "unknown field"),
    ],
)
def test_resources_invalid(resources: dict[str, Any], path: str, rule: str) -> None:
    message = manifest_error({"name": "a", "runtime": {"resources": resources}})
    assert_readable(message, f"runtime.resources.{path}", rule)


@pytest.mark.parametrize("name", ["agent", "my-agent", "a.b_c-d", "0agent", "a" * 64])
def test_manifest_name_valid(name: str) -> None:
    assert manifest_from_dict({"name": name}).name == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("Agent", "not an agent name"),
        ("-agent", "not an agent name"),
        ("my agent", "not an agent name"),
        ("a/b", "not an agent name"),
        ("", "not an agent name"),
        ("a" * 65, "at most 64"),
        (12, "expected text"),
    ],
)
def test_manifest_name_invalid(name: Any, rule: str) -> None:
    assert_readable(manifest_error({"name": name}), "agent.yaml: name:", rule)


def test_name_is_required() -> None:
    assert_readable(manifest_error({"version": "1"}), "name: this field is required")


@pytest.mark.parametrize(
    ("data", "path", "rule"),
    [
        ({"nmae": "a"}, "nmae", "did you mean 'name'?"),
        ({"name": "a", "runtime": {"imag": "x"}}, "runtime.imag", "did you mean 'image'?"),
        ({"name": "a", "permissions": {"netwrok": []}}, "permissions.netwrok", "'network'?"),
        ({"name": "a", "keys": [{"provider": "openai", "envvar": "X"}]}, "keys[0].envvar",
         "did you mean 'env_var'?"),
        ({"name": "a", "permissions": {"network": [{"domain": "a.example.com", "why": "x"}]}},
         "permissions.network[0].why", "unknown field"),
    ],
)  # fmt: skip
def test_typos_are_errors_with_hints(data: dict[str, Any], path: str, rule: str) -> None:
    message = manifest_error(data)
    assert_readable(message, "agent.yaml: ", f"{path}: unknown field", rule)


@pytest.mark.parametrize(
    ("runtime", "path", "rule"),
    [
        ({"image": "-v /:/host"}, "runtime.image", "not a Docker image reference"),
        ({"image": "python 3"}, "runtime.image", "not a Docker image reference"),
        ({"setup_command": "  "}, "runtime.setup_command", "non-empty"),
        ({"run_command": "a\x00b"}, "runtime.run_command", "NUL"),
        ({"resources": "big"}, "runtime.resources", "expected a mapping"),
    ],
)
def test_runtime_invalid(runtime: dict[str, Any], path: str, rule: str) -> None:
    assert_readable(manifest_error({"name": "a", "runtime": runtime}), path, rule)


def test_runtime_valid() -> None:
    runtime = {
        "image": "ghcr.io/org/agent:1.2@sha256:" + "a" * 64,
        "setup_command": "pip install -e .",
        "run_command": "python -m agent",
    }
    assert manifest_from_dict({"name": "a", "runtime": runtime}).runtime.image == runtime["image"]


@pytest.mark.parametrize(
    ("permissions", "path", "rule"),
    [
        ({"network": ["10.0.0.1"]}, "permissions.network[0].domain", "IP address"),
        ({"network": [{"domain": "localhost"}]}, "permissions.network[0].domain", "single-label"),
        ({"network": ["a.example.com", "A.Example.com."]}, "permissions.network", "listed twice"),
        ({"network": "a.example.com"}, "permissions.network", "expected a list"),
        ({"network": [5]}, "permissions.network[0]", "expected a mapping"),
        ({"network_unrestricted": "yes"}, "permissions.network_unrestricted", "true or false"),
    ],
)
def test_permissions_invalid(permissions: dict[str, Any], path: str, rule: str) -> None:
    assert_readable(manifest_error({"name": "a", "permissions": permissions}), path, rule)


def test_permissions_valid_forms() -> None:
    manifest = manifest_from_dict(
        {"name": "a", "permissions": {"network": ["API.example.com", {"domain": "*.cdn.example.net",
                                                                    "reason": "assets"}]}}
    )  # fmt: skip
    assert manifest.permissions.network == [
        NetworkRule(domain="api.example.com"),
        NetworkRule(domain="*.cdn.example.net", reason="assets"),
    ]


def test_models_are_frozen() -> None:
    manifest = manifest_from_dict({"name": "a"})
    with pytest.raises(Exception, match="frozen"):
        manifest.name = "b"  # type: ignore[misc]


def test_version_number_from_yaml_becomes_text() -> None:
    assert manifest_from_dict({"name": "a", "version": 1.5}).version == "1.5"


def test_several_errors_are_joined() -> None:
    message = manifest_error(
        {"name": "Bad", "keys": [{"provider": "x_y", "domain": "localhost"}], "extra": 1}
    )
    assert_readable(message, "name: ", "keys[0].provider", "keys[0].domain", "extra: unknown field")
    assert message.count("; ") >= 3
    assert "\n" not in message


@pytest.mark.parametrize(("data", "got"), [(None, "empty document"), ([1], "list"), ("x", "str")])
def test_top_level_must_be_mapping(data: Any, got: str) -> None:
    assert_readable(manifest_error(data), "agent.yaml", "top level must be a mapping", got)


# ---------------------------------------------------------------------------- loading


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_load_manifest_full_example(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: my-agent
        version: 1.0.0
        description: An agent
        runtime:
          image: python:3.12-slim
          setup_command: pip install -r requirements.txt
          run_command: python agent.py
          resources: {memory: 2g, cpus: 2, pids: 256}
        permissions:
          network:
            - domain: api.github.com
              reason: issues
            - "*.wikipedia.org"
        keys:
          - provider: anthropic
          - provider: local-llm
            domain: llm.internal.example.com
            required: false
        """,
    )
    manifest = load_manifest(path)
    assert manifest.source == path
    assert manifest.runtime.resources.cpus == 2.0
    assert [r.domain for r in manifest.permissions.network] == ["api.github.com", "*.wikipedia.org"]
    routes = resolve_key_routes(manifest)
    assert [(r.env_var, r.domain) for r in routes] == [
        ("ANTHROPIC_API_KEY", "api.anthropic.com"),
        ("LOCAL_LLM_API_KEY", "llm.internal.example.com"),
    ]


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (
            "name: a\nkeys:\n  - provider: local\n    domain: 10.0.0.1\n",
            ["keys[0].domain", "'10.0.0.1' is an IP address", "api.example.com"],
        ),
        (
            "name: a\nkeys:\n  - provider: x\n    domain: x.example.com\n    env_var: HTTP_PROXY\n",
            ["keys[0].env_var", "'HTTP_PROXY' is a proxy variable", "choose another name"],
        ),
        (
            "name: a\npermissions:\n  network: [localhost]\n",
            ["permissions.network[0].domain", "single-label"],
        ),
        ("name: a\nname: b\n", ["line 2", "duplicate key 'name'"]),
        ("- a\n- b\n", ["top level must be a mapping", "list"]),
        ("", ["top level must be a mapping", "empty document"]),
        ("# only a comment\n", ["top level must be a mapping", "empty document"]),
    ],
)
def test_load_manifest_messages(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert_readable(str(info.value), str(path), *needles)


def test_load_manifest_message_names_the_file_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "name: a\nkeys:\n  - provider: openai\n    env_var: LD_PRELOAD\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError) as info:
        load_manifest("agent.yaml")
    assert str(info.value).startswith(
        "agent.yaml: keys[0].env_var: 'LD_PRELOAD' is a dynamic-loader variable"
    )


def test_yaml_syntax_error_has_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\nruntime:\n  image: [unclosed\n  run_command: x\nkeys: {\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert_readable(message, str(path), "YAML syntax error", "line ")
    assert "\n" not in message


def test_yaml_syntax_error_line_is_right(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\nversion: 1\ndescription: x: y\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert_readable(str(info.value), "line 3", "YAML syntax error", "mapping values")


def test_yaml_unsafe_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert_readable(str(info.value), str(path), "YAML syntax error")


def test_missing_file_message(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "agent.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == (
        f"agent manifest not found: {path}; pass --agentbox-manifest=PATH "
        "or set agentbox_manifest in pytest.ini"
    )


def test_directory_and_binary_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path)
    binary = tmp_path / "agent.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(binary)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ndescription: " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ManifestError, match="larger than 1 MiB"):
        load_manifest(path)


# -------------------------------------------------------------------------- overrides


@pytest.fixture
def base() -> Manifest:
    return manifest_from_dict(
        {
            "name": "agent",
            "runtime": {
                "image": "img:1",
                "setup_command": "make",
                "resources": {"memory": "2g", "pids": 100},
            },
            "permissions": {"network": [{"domain": "api.github.com", "reason": "issues"}]},
            "keys": [{"provider": "openai", "required": False}],
        }
    )


def test_overrides_runtime_fields(base: Manifest) -> None:
    result, leftover = apply_overrides(
        base, {"image": "img:2", "run_command": "python a.py", "setup_command": None}
    )
    assert leftover == {}
    assert (result.runtime.image, result.runtime.run_command, result.runtime.setup_command) == (
        "img:2", "python a.py", None,
    )  # fmt: skip
    assert base.runtime.image == "img:1"  # the original is untouched


def test_overrides_resources_merge(base: Manifest) -> None:
    result, _ = apply_overrides(base, {"resources": {"cpus": 2}})
    got = result.runtime.resources
    assert (got.memory, got.cpus, got.pids) == ("2g", 2.0, 100)


def test_overrides_network_is_added(base: Manifest) -> None:
    result, _ = apply_overrides(
        base,
        {
            "network": [
                "Example.org",
                {"domain": "*.cdn.example.net", "reason": "assets"},
                "api.github.com",
            ]
        },
    )
    assert [(r.domain, r.reason) for r in result.permissions.network] == [
        ("api.github.com", "issues"),
        ("example.org", ""),
        ("*.cdn.example.net", "assets"),
    ]


def test_overrides_network_unrestricted(base: Manifest) -> None:
    result, _ = apply_overrides(base, {"network_unrestricted": True})
    assert result.permissions.network_unrestricted is True


def test_overrides_keys(base: Manifest) -> None:
    result, _ = apply_overrides(
        base,
        {"keys": ["anthropic", "openai", {"provider": "corp", "domain": "llm.corp.example"}]},
    )
    assert [(k.provider, k.required) for k in result.keys] == [
        ("openai", False),
        ("anthropic", True),
        ("corp", True),
    ]
    result, _ = apply_overrides(base, {"keys": [KeyRequirement(provider="openai", env_var="OAI")]})
    assert [(k.provider, k.env_var, k.required) for k in result.keys] == [("openai", "OAI", True)]


def test_overrides_return_leftovers(base: Manifest) -> None:
    result, leftover = apply_overrides(
        base, {"state": "fresh", "cap_drop": ["ALL"], "image": "img:3"}
    )
    assert leftover == {"state": "fresh", "cap_drop": ["ALL"]}
    assert result.runtime.image == "img:3"
    assert set(OVERRIDE_KEYS) == {
        "image", "setup_command", "run_command", "resources", "network",
        "network_unrestricted", "keys",
    }  # fmt: skip


def test_overrides_keep_the_source(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, "name: a\n"))
    result, _ = apply_overrides(manifest, {"image": "x:1"})
    assert result.source == manifest.source


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"network": ["10.0.0.1"]}, ["network", "IP address"]),
        ({"network": ["localhost"]}, ["network", "single-label"]),
        ({"network": 5}, ["network=", "expected a list"]),
        ({"keys": ["myproxy"]}, ["'myproxy'", "declare it under `keys:` in agent.yaml"]),
        ({"keys": [{"provider": "p", "domain": "p.example.com", "env_var": "OPENAI_API_KEY"}]},
         ["keys[1].env_var", "known provider 'openai'"]),
        ({"keys": [{"provider": "p"}]}, ["keys[1].domain", "must declare its API domain"]),
        ({"keys": [3]}, ["keys=", "provider names or mappings"]),
        ({"resources": {"memory": "1m"}}, ["runtime.resources.memory", "16m"]),
        ({"resources": "big"}, ["resources=", "expected a mapping"]),
        ({"resources": {"gpus": 1}}, ["runtime.resources.gpus", "unknown field"]),
        ({"network_unrestricted": "yes"}, ["permissions.network_unrestricted", "true or false"]),
        ({"image": "-evil"}, ["runtime.image", "Docker image reference"]),
    ],
)  # fmt: skip
def test_overrides_are_revalidated(
    base: Manifest, overrides: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(ManifestError) as info:
        apply_overrides(base, overrides)
    assert_readable(str(info.value), *needles)
