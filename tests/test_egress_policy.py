"""The allowlist computed on the host: registries, codeload, wildcards, report text.

Every test passes its own ``env``, ``home`` and ``root`` so the machine's real pip and
npm configuration never leaks in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_agentbox.backends.docker import networks
from pytest_agentbox.errors import ManifestError
from pytest_agentbox.policy import egress
from pytest_agentbox.policy.egress import (
    NEVER_AUTO_ALLOW,
    EgressPolicy,
    compute_policy,
    domain_matches,
    registry_hosts,
)

PIP_DEFAULTS = {"pypi.org", "files.pythonhosted.org"}
NPM_DEFAULT = {"registry.npmjs.org"}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty stand-in for ``/`` so /etc/pip.conf of this machine is not read."""
    path = tmp_path / "root"
    path.mkdir()
    return path


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def hosts(env: dict[str, str], home: Path, root: Path) -> set[str]:
    return set(registry_hosts(env, home, root=root))


# ------------------------------------------------------------------ registries from env


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, PIP_DEFAULTS),
        ({"PIP_INDEX_URL": "https://mirror.corp.example/simple"}, {"mirror.corp.example"}),
        (
            {"PIP_EXTRA_INDEX_URL": "https://a.example.org/s https://B.Example.org./s"},
            PIP_DEFAULTS | {"a.example.org", "b.example.org"},
        ),
        (
            {"PIP_INDEX_URL": "https://pypi.org/simple"},
            PIP_DEFAULTS,  # an explicit pypi.org still needs its files host
        ),
        ({"PIP_INDEX_URL": "file:///opt/pypi/simple"}, set()),
        ({"PIP_FIND_LINKS": "/opt/wheels"}, PIP_DEFAULTS),
        ({"PIP_FIND_LINKS": "https://wheels.example.net/"}, PIP_DEFAULTS | {"wheels.example.net"}),
        ({"PIP_INDEX_URL": "http://10.0.0.5/simple"}, set()),
        ({"PIP_INDEX_URL": "http://[::1]:3141/simple"}, set()),
        ({"PIP_INDEX_URL": "http://devpi:3141/simple"}, set()),
        ({"PIP_INDEX_URL": "https://codeload.github.com/x"}, set()),
        ({"PIP_INDEX_URL": "ftp://ftp.example.com/simple"}, set()),
    ],
    ids=[
        "defaults",
        "index-url",
        "extra-index-url",
        "explicit-pypi",
        "file-url",
        "find-links-path",
        "find-links-url",
        "ipv4-literal",
        "ipv6-literal",
        "single-label",
        "codeload",
        "ftp",
    ],
)
def test_pip_registries_from_env(
    env: dict[str, str], expected: set[str], home: Path, root: Path
) -> None:
    got = hosts(env, home, root) - NPM_DEFAULT
    assert got == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NPM_CONFIG_REGISTRY": "https://npm.corp.example/"}, {"npm.corp.example"}),
        ({"npm_config_registry": "https://npm.lower.example/"}, {"npm.lower.example"}),
        (
            {"npm_config_@acme:registry": "https://acme.npm.example/"},
            NPM_DEFAULT | {"acme.npm.example"},
        ),
    ],
    ids=["upper", "lower", "scoped"],
)
def test_npm_registries_from_env(
    env: dict[str, str], expected: set[str], home: Path, root: Path
) -> None:
    env = {"PIP_INDEX_URL": "file:///nothing", **env}
    assert hosts(env, home, root) == expected


# ------------------------------------------------------------------ registries from files


@pytest.mark.parametrize(
    ("relpath", "text", "expected"),
    [
        (
            "home/.config/pip/pip.conf",
            "[global]\nindex-url = https://mirror.example.com/simple\n",
            {"mirror.example.com"},
        ),
        (
            "home/.pip/pip.conf",
            "[global]\nindex_url = https://legacy.example.com/simple\n",
            {"legacy.example.com"},
        ),
        (
            "root/etc/pip.conf",
            "[install]\nindex-url = https://site.example.com/simple\n"
            "[download]\nindex-url = https://site.example.com/simple\n",
            {"site.example.com"},
        ),
        (
            "root/etc/xdg/pip/pip.conf",
            "[global]\nextra-index-url =\n    https://one.example.com/s\n"
            "    file:///opt/local\n    https://two.example.com/s\n",
            PIP_DEFAULTS | {"one.example.com", "two.example.com"},
        ),
        (
            "home/.config/pip/pip.conf",
            "[global]\nfind-links = /opt/wheels https://links.example.com/\n",
            PIP_DEFAULTS | {"links.example.com"},
        ),
        (
            "home/.config/pip/pip.conf",
            "[freeze]\nindex-url = https://unrelated.example.com/simple\n",
            PIP_DEFAULTS,
        ),
        (
            "home/.config/pip/pip.conf",
            # only `download` is redirected, so `install` still needs pypi.org
            "[download]\nindex-url = https://dl.example.com/simple\n",
            PIP_DEFAULTS | {"dl.example.com"},
        ),
        ("home/.config/pip/pip.conf", "this is [not an ini file\n", PIP_DEFAULTS),
    ],
    ids=[
        "user",
        "legacy-underscore",
        "site-commands",
        "xdg-multiline",
        "find-links",
        "other-section",
        "download-only",
        "garbage",
    ],
)
def test_pip_registries_from_files(
    relpath: str, text: str, expected: set[str], tmp_path: Path, home: Path, root: Path
) -> None:
    write(tmp_path / relpath, text)
    assert hosts({}, home, root) - NPM_DEFAULT == expected


def test_pip_precedence_command_section_and_env(tmp_path: Path, home: Path, root: Path) -> None:
    write(root / "etc/pip.conf", "[global]\nindex-url = https://low.example.com/s\n")
    write(home / ".config/pip/pip.conf", "[global]\nindex-url = https://user.example.com/s\n")
    # The user file beats the site file ...
    assert hosts({}, home, root) - NPM_DEFAULT == {"user.example.com"}
    # ... PIP_CONFIG_FILE beats both ...
    env_file = tmp_path / "env.conf"
    write(env_file, "[global]\nindex-url = https://envfile.example.com/s\n")
    env = {"PIP_CONFIG_FILE": str(env_file)}
    assert hosts(env, home, root) - NPM_DEFAULT == {"envfile.example.com"}
    # ... and the PIP_INDEX_URL variable beats every file.
    env["PIP_INDEX_URL"] = "https://var.example.com/s"
    assert hosts(env, home, root) - NPM_DEFAULT == {"var.example.com"}


def test_pip_config_file_devnull_loads_no_files(home: Path, root: Path) -> None:
    write(home / ".config/pip/pip.conf", "[global]\nindex-url = https://user.example.com/s\n")
    assert hosts({"PIP_CONFIG_FILE": "/dev/null"}, home, root) - NPM_DEFAULT == PIP_DEFAULTS


def test_xdg_config_home_is_honoured(tmp_path: Path, home: Path, root: Path) -> None:
    xdg = tmp_path / "xdg"
    write(xdg / "pip/pip.conf", "[global]\nindex-url = https://xdg.example.com/s\n")
    env = {"XDG_CONFIG_HOME": str(xdg)}
    assert hosts(env, home, root) - NPM_DEFAULT == {"xdg.example.com"}


@pytest.mark.parametrize(
    ("relpath", "text", "env", "expected"),
    [
        ("home/.npmrc", "registry=https://npm.user.example/\n", {}, {"npm.user.example"}),
        (
            "home/.npmrc",
            '; comment\n# comment\n@acme:registry = "https://acme.example.com/"\n'
            "//acme.example.com/:_authToken=${NPM_TOKEN}\n",
            {},
            NPM_DEFAULT | {"acme.example.com"},
        ),
        (
            "root/usr/local/etc/npmrc",
            "registry=https://npm.global.example/\n",
            {},
            {"npm.global.example"},
        ),
        (
            "prefix/etc/npmrc",
            "registry=https://npm.prefix.example/\n",
            {"NPM_CONFIG_PREFIX": "{tmp}/prefix"},
            {"npm.prefix.example"},
        ),
        (
            "home/.npmrc",
            "registry=https://${NPM_HOST}/\n",
            {"NPM_HOST": "expanded.example.org"},
            {"expanded.example.org"},
        ),
        ("home/.npmrc", "[section]\nregistry=https://nested.example/\n", {}, NPM_DEFAULT),
        ("home/.npmrc", "registry=http://192.168.1.10:4873/\n", {}, set()),
    ],
    ids=["user", "scoped-quoted", "global", "prefix", "env-expansion", "section", "ip"],
)
def test_npm_registries_from_files(
    relpath: str,
    text: str,
    env: dict[str, str],
    expected: set[str],
    tmp_path: Path,
    home: Path,
    root: Path,
) -> None:
    write(tmp_path / relpath, text)
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    env["PIP_INDEX_URL"] = "file:///nothing"
    assert hosts(env, home, root) == expected


def test_npm_user_config_beats_global(home: Path, root: Path) -> None:
    write(root / "usr/etc/npmrc", "registry=https://global.example.com/\n")
    write(home / ".npmrc", "registry=https://user.example.com/\n")
    env = {"PIP_INDEX_URL": "file:///nothing"}
    assert hosts(env, home, root) == {"user.example.com"}
    env["NPM_CONFIG_REGISTRY"] = "https://env.example.com/"
    assert hosts(env, home, root) == {"env.example.com"}


# ------------------------------------------------------------------ codeload


def test_codeload_never_returned_even_when_configured(home: Path, root: Path) -> None:
    write(home / ".npmrc", "@gh:registry=https://codeload.github.com/\n")
    env = {
        "PIP_INDEX_URL": "https://codeload.github.com/simple",
        "PIP_EXTRA_INDEX_URL": "https://CODELOAD.github.com./x",
    }
    assert not set(registry_hosts(env, home, root=root)) & NEVER_AUTO_ALLOW
    policy = compute_policy(
        declared=["codeload.github.com", "api.example.com"],
        key_domains=[],
        has_setup_command=True,
        unrestricted=False,
        env=env,
        home=home,
        root=root,
    )
    assert "codeload.github.com" not in policy.allowlist()
    assert "api.example.com" in policy.allowlist()
    assert policy.denylist() == ("codeload.github.com",)
    assert "codeload.github.com (declared, but never allowed)" in policy.describe()


# ------------------------------------------------------------------ compute_policy


@pytest.mark.parametrize("has_setup", [True, False])
def test_registries_only_with_setup_command(has_setup: bool, home: Path, root: Path) -> None:
    policy = compute_policy(
        declared=["api.example.com"],
        key_domains=["api.openai.com"],
        has_setup_command=has_setup,
        unrestricted=False,
        env={"PIP_INDEX_URL": "https://mirror.example.com/simple"},
        home=home,
        root=root,
    )
    expected_registries = ("mirror.example.com", "registry.npmjs.org") if has_setup else ()
    assert policy.registries == expected_registries
    assert set(policy.allowlist()) == {"api.example.com", "api.openai.com", *expected_registries}
    assert ("mirror.example.com" in policy.describe()) is has_setup


def test_domains_are_normalized_deduplicated_and_sorted(home: Path, root: Path) -> None:
    policy = compute_policy(
        declared=["B.example.com.", "a.example.com", "*.Wild.example.org", "b.example.com"],
        key_domains=["API.openai.com"],
        has_setup_command=False,
        unrestricted=False,
        env={},
        home=home,
        root=root,
    )
    assert policy.domains == ("*.wild.example.org", "a.example.com", "b.example.com")
    assert policy.key_domains == ("api.openai.com",)
    assert policy.allowlist() == (
        "*.wild.example.org",
        "a.example.com",
        "api.openai.com",
        "b.example.com",
    )


@pytest.mark.parametrize("bad", ["10.0.0.1", "localhost", "http://x.example.com", "a_b.example"])
def test_invalid_declared_domain_is_a_manifest_error(bad: str, home: Path, root: Path) -> None:
    with pytest.raises(ManifestError, match="network domain"):
        compute_policy(
            declared=[bad],
            key_domains=[],
            has_setup_command=False,
            unrestricted=False,
            env={},
            home=home,
            root=root,
        )


def test_wildcard_key_domain_refused(home: Path, root: Path) -> None:
    with pytest.raises(ManifestError):
        compute_policy(
            declared=[],
            key_domains=["*.openai.com"],
            has_setup_command=False,
            unrestricted=False,
            env={},
            home=home,
            root=root,
        )


def test_empty_policy_is_no_network(home: Path, root: Path) -> None:
    policy = compute_policy(
        declared=[],
        key_domains=[],
        has_setup_command=False,
        unrestricted=False,
        env={"PIP_INDEX_URL": "https://mirror.example.com/simple"},
        home=home,
        root=root,
    )
    assert policy.allowlist() == ()
    assert policy.enabled is False
    assert "no network" in policy.describe()


def test_unrestricted_policy_is_loud(home: Path, root: Path) -> None:
    policy = compute_policy(
        declared=[],
        key_domains=[],
        has_setup_command=False,
        unrestricted=True,
        env={},
        home=home,
        root=root,
    )
    assert policy.enabled is True
    assert policy.allowlist() == ()
    text = policy.describe()
    assert "UNRESTRICTED" in text
    assert "ANY host" in text
    assert "no network" not in text


def test_describe_lists_every_group_and_ignored_notes(home: Path, root: Path) -> None:
    env = {
        "PIP_INDEX_URL": "https://mirror.example.com/simple",
        "PIP_EXTRA_INDEX_URL": "http://10.1.2.3/simple http://devpi:3141/simple",
    }
    policy = compute_policy(
        declared=["data.example.org"],
        key_domains=["api.anthropic.com"],
        has_setup_command=True,
        unrestricted=False,
        env=env,
        home=home,
        root=root,
    )
    text = policy.describe()
    lines = text.splitlines()
    assert lines[0].startswith(f"egress allowlist ({len(policy.allowlist())} hosts")
    assert any(line.split()[0] == "declared:" and "data.example.org" in line for line in lines)
    assert any(line.split()[0] == "key" and "api.anthropic.com" in line for line in lines)
    assert any(line.split()[0] == "registries:" and "mirror.example.com" in line for line in lines)
    assert "10.1.2.3 (IP literal: the egress proxy refuses IP addresses)" in text
    assert "devpi (not a fully qualified domain name)" in text
    assert "never allowed: codeload.github.com" in text
    assert "UNRESTRICTED" not in text


@pytest.mark.parametrize(
    ("unrestricted", "domains", "enabled"),
    [(False, (), False), (False, ("a.example.com",), True), (True, (), True)],
)
def test_enabled(unrestricted: bool, domains: tuple[str, ...], enabled: bool) -> None:
    policy = EgressPolicy(unrestricted, domains, (), ())
    assert policy.enabled is enabled


def test_codeload_only_policy_is_no_network() -> None:
    policy = EgressPolicy(False, ("codeload.github.com",), (), ())
    assert policy.allowlist() == ()
    assert policy.enabled is False


# ------------------------------------------------------------------ wildcard matching


@pytest.mark.parametrize(
    ("host", "pattern", "matches"),
    [
        ("api.example.com", "api.example.com", True),
        ("API.Example.COM.", "api.example.com", True),
        ("api.example.com", "API.EXAMPLE.COM.", True),
        ("a.example.com", "*.example.com", True),
        ("a.b.example.com", "*.example.com", True),
        ("example.com", "*.example.com", False),
        ("badexample.com", "*.example.com", False),
        ("a.example.com.evil.net", "*.example.com", False),
        ("example.com", "api.example.com", False),
        ("api.example.com", "example.com", False),
        ("127.0.0.1", "127.0.0.1", False),
        ("1.example.com", "*.example.com", True),
        ("a.0x7f", "*.0x7f", False),
        ("under_score.example.com", "*.example.com", False),
    ],
)
def test_domain_matches(host: str, pattern: str, matches: bool) -> None:
    assert domain_matches(host, pattern) is matches


# ------------------------------------------------------------- private opt-in, engine nets


def test_private_domains_are_carried_and_shown(home: Path, root: Path) -> None:
    policy = compute_policy(
        declared=["db.corp.example", "api.example.com"],
        key_domains=[],
        has_setup_command=False,
        unrestricted=False,
        env={},
        home=home,
        root=root,
        private=["DB.corp.example."],
    )
    assert policy.private_domains == ("db.corp.example",)
    text = policy.describe()
    assert "PRIVATE OK:  db.corp.example" in text
    assert "private addresses are refused after DNS" in text


def test_private_domain_must_be_declared(home: Path, root: Path) -> None:
    with pytest.raises(ManifestError, match="private but not declared"):
        compute_policy(
            declared=["api.example.com"],
            key_domains=[],
            has_setup_command=False,
            unrestricted=False,
            env={},
            home=home,
            root=root,
            private=["db.corp.example"],
        )


def test_manifest_network_rule_private_needs_a_reason() -> None:
    from pydantic import ValidationError

    from pytest_agentbox.policy.manifest import NetworkRule

    rule = NetworkRule.model_validate(
        {"domain": "db.corp.example", "private": True, "reason": "db"}
    )
    assert rule.private is True
    assert NetworkRule.model_validate("api.example.com").private is False
    with pytest.raises(ValidationError, match="needs a reason"):
        NetworkRule.model_validate({"domain": "db.corp.example", "private": True})
    with pytest.raises(ValidationError):
        NetworkRule.model_validate({"domain": "db.corp.example", "private": "yes", "reason": "x"})


def test_parse_host_addresses_reads_fib_trie_and_if_inet6() -> None:
    text = (
        "Main:\n  +-- 0.0.0.0/0 3 0 4\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
        "           |-- 172.17.0.0\n              /16 link UNICAST\n"
        "           |-- 172.17.0.1\n              /32 host LOCAL\n"
        "        |-- 172.17.255.255\n           /32 link BROADCAST\n"
        "           |-- 203.0.113.5\n              /32 host LOCAL\n"
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fd000000000000000000000000000002 04 40 00 82     eth0\n"
    )
    assert egress.parse_host_addresses(text) == ["172.17.0.1", "203.0.113.5", "::1", "fd00::2"]


class _Net:
    def __init__(self, config: list[dict[str, str]]) -> None:
        self.attrs = {"IPAM": {"Config": config}}


class _Client:
    class networks:
        @staticmethod
        def list() -> list[_Net]:
            return [
                _Net([{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}]),
                _Net(
                    [
                        {"Subnet": "fd00:dead::/64"},
                        {"Subnet": "10.5.0.0/24", "IPRange": "10.5.0.128/25"},
                    ]
                ),
                _Net([]),
            ]


def test_engine_private_nets_lists_every_subnet_and_gateway() -> None:
    assert networks.engine_private_nets(_Client()) == sorted(
        ["172.17.0.0/16", "172.17.0.1/32", "fd00:dead::/64", "10.5.0.0/24", "10.5.0.128/25"]
    )


def test_open_tunnels_are_connects_without_a_close() -> None:
    lines = [
        {"event": "connect", "id": 1, "decision": "allow", "host": "a.example.com"},
        {"event": "connect", "id": 2, "decision": "deny", "host": "b.example.com"},
        {"event": "connect", "id": 3, "decision": "allow", "host": "c.example.com"},
        {"event": "close", "id": 1, "decision": "allow", "host": "a.example.com"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n[1]\n"
    assert [r["host"] for r in egress.open_tunnels(text)] == ["c.example.com"]
