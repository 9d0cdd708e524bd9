"""The agent manifest (``agent.yaml``): pydantic models, known providers, loading, overrides.

Everything here is pure logic, usable without pytest or Docker. The plugin refuses a bad
manifest before it touches Docker, with one readable line that names the file, the field
and the rule (seed: "Manifest validation hardened"). The field-level rules live in
:mod:`pytest_agentbox.policy.rules`; the public ones are re-exported here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pytest_agentbox.errors import ManifestError
from pytest_agentbox.policy.rules import (
    check_auth_style,
    check_base_path,
    check_env_name,
    is_ip_literal,
    normalize_domain,
    protected_env_reason,
)
from pytest_agentbox.policy.values import check_image_ref

__all__ = [
    "KNOWN_PROVIDERS",
    "OVERRIDE_KEYS",
    "KeyRequirement",
    "KeyRoute",
    "Manifest",
    "NetworkRule",
    "Permissions",
    "ProviderInfo",
    "Resources",
    "Runtime",
    "apply_overrides",
    "is_ip_literal",
    "load_manifest",
    "manifest_from_dict",
    "normalize_domain",
    "protected_env_reason",
    "resolve_key_routes",
]


# --------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class ProviderInfo:
    """Where a known provider's API lives and how its key is presented.

    ``auth_style`` is ``"bearer"``, ``"x-api-key"`` or ``"header:<name>"``. ``base_path``
    is appended to the local proxy URL put in ``base_url_env`` because some SDKs expect
    it in the base URL (the OpenAI SDK's default base URL ends in ``/v1``).
    """

    domain: str
    env_var: str
    base_url_env: str
    auth_style: str
    base_path: str = ""


KNOWN_PROVIDERS: dict[str, ProviderInfo] = {
    "anthropic": ProviderInfo(
        "api.anthropic.com", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "x-api-key"
    ),
    "openai": ProviderInfo("api.openai.com", "OPENAI_API_KEY", "OPENAI_BASE_URL", "bearer", "/v1"),
    "google": ProviderInfo(
        "generativelanguage.googleapis.com",
        "GOOGLE_API_KEY",
        "GOOGLE_GEMINI_BASE_URL",
        "header:x-goog-api-key",
    ),
    "groq": ProviderInfo("api.groq.com", "GROQ_API_KEY", "GROQ_BASE_URL", "bearer"),
    "mistral": ProviderInfo("api.mistral.ai", "MISTRAL_API_KEY", "MISTRAL_BASE_URL", "bearer"),
    "deepseek": ProviderInfo("api.deepseek.com", "DEEPSEEK_API_KEY", "DEEPSEEK_BASE_URL", "bearer"),
    "brave": ProviderInfo(
        "api.search.brave.com", "BRAVE_API_KEY", "BRAVE_BASE_URL", "header:X-Subscription-Token"
    ),
}

# Env name (upper case) -> the known provider that owns it; an unrelated key may not claim
# one, or an agent reading OPENAI_API_KEY would talk to somebody else's endpoint.
_KNOWN_ENV_OWNER: dict[str, str] = {
    name: provider
    for provider, info in KNOWN_PROVIDERS.items()
    for name in (info.env_var, info.base_url_env)
}


# ------------------------------------------------------------------------------ models

_FROZEN = ConfigDict(extra="forbid", frozen=True)
# Matched whole (fullmatch), here and below: with ``$`` a trailing newline would pass.
_SIZE_RE = re.compile(r"([0-9]+)([bkmg]?)")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_MIN_MEMORY = 16 * 1024**2


class NetworkRule(BaseModel):
    """One allowed destination: an exact host or a ``*.`` wildcard over a domain's subdomains.

    ``private: true`` lets the name resolve to private addresses (RFC 1918, 100.64/10, ULA;
    never loopback, link-local, metadata or the engine's networks); it needs a reason.
    """

    model_config = _FROZEN

    domain: str
    reason: str = ""
    private: bool = Field(False, strict=True)

    @model_validator(mode="after")
    def _private_has_reason(self) -> NetworkRule:
        if self.private and not self.reason.strip():
            raise ValueError(f"{self.domain!r}: private: true needs a reason")
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        # `network: [api.example.com]` is the natural way to write it.
        return {"domain": data} if isinstance(data, str) else data

    @field_validator("domain", mode="before")
    @classmethod
    def _domain(cls, value: Any) -> str:
        return normalize_domain(value, allow_wildcard=True)


_MIN_DISK = 1024**2


def _parse_size(value: Any, field: str, minimum: int) -> str:
    """A Docker-style size (``512m``), lower-cased; ValueError with the rule otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a size such as '512m' or '2g'")
    size = value.strip().lower()
    match = _SIZE_RE.fullmatch(size)
    if not match:
        raise ValueError(f"{value!r} is not a size; use digits and one of b, k, m, g ('512m')")
    if int(match[1]) * _SIZE_UNITS[match[2]] < minimum:
        raise ValueError(f"{value!r} is below the minimum of {minimum // 2**20}m")
    return size


def _size_bytes(size: str) -> int:
    match = _SIZE_RE.fullmatch(size)
    assert match  # guaranteed by the validators
    return int(match[1]) * _SIZE_UNITS[match[2]]


def format_size(n: int) -> str:
    """``n`` bytes the way sizes are written here: ``512m``, ``1.5g``, ``64k``."""
    for unit, factor in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n >= factor:
            return f"{n / factor:.1f}".removesuffix(".0") + unit
    return f"{n}b"


# The engine's /dev/shm: a tmpfs of its own the agent can fill, also held in memory.
SHM_BYTES = 64 * 1024**2


def _disk_room(memory: int) -> int:
    """The largest disk cap for ``memory``: the home, /tmp and /dev/shm all full must
    leave a quarter of the memory to the agent's processes (2 * disk + 64m <= 3/4)."""
    return (memory * 3 // 4 - SHM_BYTES) // 2


class Resources(BaseModel):
    """Container limits: memory (Docker size such as ``512m``), CPUs, process count, disk.

    ``disk`` caps each of the sandbox's writable places, the home and ``/tmp``
    (everything else is read-only). Both live in memory, so what is written there also
    counts against ``memory``, and so does the engine's 64m ``/dev/shm``: ``2 * disk +
    64m`` may be at most three quarters of ``memory``, so that with every place full the
    agent's processes still have a quarter (a full place then fails writes with "No
    space left on device" instead of the kernel killing processes for memory). Unset,
    ``disk`` is a quarter of ``memory`` (256m of the default 1g), less when that rule
    needs it, at least 1m.
    """

    model_config = _FROZEN

    memory: str = "1g"
    cpus: float = Field(1.0, strict=True, gt=0, le=64, allow_inf_nan=False)
    pids: int = Field(512, strict=True, ge=16, le=32768)

    disk: str | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> str:
        return _parse_size(value, "memory", _MIN_MEMORY)

    @field_validator("disk", mode="before")
    @classmethod
    def _disk(cls, value: Any) -> str | None:
        return None if value is None else _parse_size(value, "disk", _MIN_DISK)

    @model_validator(mode="after")
    def _disk_fits_memory(self) -> Resources:
        # A cap the memory cannot hold could never be reached: the kernel would kill
        # processes for memory first, which reads as a crash instead of "disk full".
        if self.disk is None:
            return self
        disk = _size_bytes(self.disk)
        if disk > self.memory_bytes:
            raise ValueError(
                f"disk {self.disk!r} is more than memory {self.memory!r}: the sandbox's home "
                "and /tmp are in-memory file systems whose contents count against memory; "
                "raise memory along with disk"
            )
        if disk > _disk_room(self.memory_bytes):
            need = -(-(2 * disk + SHM_BYTES) * 4 // 3)
            room = _disk_room(self.memory_bytes)
            lower = f"lower disk to at most {room // 2**20}m" if room >= _MIN_DISK else ""
            raise ValueError(
                f"disk {self.disk!r} with memory {self.memory!r}: the home and /tmp (each up "
                "to disk) and /dev/shm (64m) are all held in memory, and full they would "
                "leave the agent's processes less than a quarter of it (the kernel would "
                "kill them instead of writes failing with 'No space left on device'); "
                f"raise memory to at least {-(-need // 2**20)}m"
                + (f" or {lower}" if lower else "")
                + " (rule: 2 * disk + 64m <= 3/4 of memory)"
            )
        return self

    @property
    def memory_bytes(self) -> int:
        """The memory limit in bytes."""
        return _size_bytes(self.memory)

    @property
    def disk_bytes(self) -> int:
        """The cap of the home and of ``/tmp`` (each) in bytes, the default applied."""
        if self.disk is not None:
            return _size_bytes(self.disk)
        room = _disk_room(self.memory_bytes) // _MIN_DISK * _MIN_DISK
        return max(_MIN_DISK, min(self.memory_bytes // 4, room))


class Runtime(BaseModel):
    """How the agent runs: image, setup command (as the user), run command, limits."""

    model_config = _FROZEN

    image: str | None = None
    setup_command: str | None = None
    run_command: str | None = None
    resources: Resources = Resources()
    # gvisor runs the sandbox under runsc; runc is the engine's usual runtime. The
    # --agentbox-runtime option and a test's runtime= beat it (options.py).
    isolation: Literal["gvisor", "runc"] | None = None

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        # One rule for the manifest and the --agentbox-image option.
        return value if value is None else check_image_ref(value)

    @field_validator("setup_command", "run_command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\x00" in value):
            raise ValueError("a command must be non-empty text without NUL characters")
        return value


class Permissions(BaseModel):
    """What the agent may reach on the network."""

    model_config = _FROZEN

    network: list[NetworkRule] = []
    network_unrestricted: bool = Field(False, strict=True)

    @field_validator("network")
    @classmethod
    def _unique(cls, rules: list[NetworkRule]) -> list[NetworkRule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.domain in seen:
                raise ValueError(f"{rule.domain!r} is listed twice")
            seen.add(rule.domain)
        return rules


_PROVIDER_RE = re.compile(r"[a-z][a-z0-9-]*")


class KeyRequirement(BaseModel):
    """An API key the agent uses, served through the in-sandbox key proxy.

    Known providers are pinned to their domain, base path and auth style; only their env
    names may be renamed. Unknown providers must declare ``domain``.
    """

    model_config = _FROZEN

    provider: str = Field(max_length=40)
    env_var: str | None = None
    required: bool = Field(True, strict=True)
    domain: str | None = None
    base_url_env: str | None = None
    auth_style: str | None = None
    base_path: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"provider": data} if isinstance(data, str) else data

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str) -> str:
        if not _PROVIDER_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a provider name; use lower-case letters, digits and '-', "
                "starting with a letter (no '_')"
            )
        return value

    @field_validator("env_var", "base_url_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        return None if value is None else check_env_name(value)

    @field_validator("domain", mode="before")
    @classmethod
    def _domain(cls, value: Any) -> str | None:
        # Exact host only: the proxy pins each key to this one name.
        return None if value is None else normalize_domain(value)

    @field_validator("auth_style")
    @classmethod
    def _auth(cls, value: str | None) -> str | None:
        return None if value is None else check_auth_style(value)

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str | None) -> str | None:
        return None if value is None else check_base_path(value)

    @property
    def known(self) -> ProviderInfo | None:
        """The pinned table entry when this is a known provider."""
        return KNOWN_PROVIDERS.get(self.provider)

    def effective_env_names(self) -> tuple[str, str]:
        """``(env_var, base_url_env)`` after defaults are applied."""
        info = self.known
        stem = self.provider.upper().replace("-", "_")
        env = self.env_var or (info.env_var if info else f"{stem}_API_KEY")
        base = self.base_url_env or (info.base_url_env if info else f"{stem}_BASE_URL")
        return env, base


_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")


class Manifest(BaseModel):
    """The whole ``agent.yaml``."""

    model_config = _FROZEN

    name: str = Field(max_length=64)
    version: str = "0.0.0"
    description: str = ""
    runtime: Runtime = Runtime()
    permissions: Permissions = Permissions()
    keys: list[KeyRequirement] = []

    _source: Path | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an agent name; use lower-case letters, digits, '.', '_' "
                "and '-', starting with a letter or digit"
            )
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # `version: 1.0` arrives from YAML as a float.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @model_validator(mode="after")
    def _keys_consistent(self) -> Manifest:
        _check_keys(self.keys)
        return self

    @property
    def source(self) -> Path | None:
        """The file this manifest was loaded from, if any."""
        return self._source


def _check_keys(keys: Sequence[KeyRequirement]) -> None:
    """Cross-key rules; messages name the offending entry because pydantic cannot."""
    providers: dict[str, int] = {}
    env_owner: dict[str, str] = {}
    for i, key in enumerate(keys):
        where = f"keys[{i}]"
        if key.provider in providers:
            raise ValueError(
                f"{where}.provider: {key.provider!r} is declared twice "
                f"(also keys[{providers[key.provider]}])"
            )
        providers[key.provider] = i
        if key.known is None and key.domain is None:
            raise ValueError(
                f"{where}.domain: provider {key.provider!r} is not a known provider, "
                "so it must declare its API domain (domain: api.example.com)"
            )
        env, base = key.effective_env_names()
        for field, name in (("env_var", env), ("base_url_env", base)):
            if getattr(key, field) is None:
                # A default derived from the provider name ('ld' -> LD_API_KEY) meets the
                # same rule as a declared name.
                try:
                    check_env_name(name)
                except ValueError as exc:
                    raise ValueError(
                        f"{where}.{field}: {exc} (it is the default for provider "
                        f"{key.provider!r}; set {field} to another name)"
                    ) from None
            upper = name.upper()
            owner = _KNOWN_ENV_OWNER.get(upper)
            if owner is not None and owner != key.provider:
                raise ValueError(
                    f"{where}.{field}: {name!r} belongs to the known provider {owner!r}; "
                    "choose another name"
                )
            if upper in env_owner:
                raise ValueError(
                    f"{where}.{field}: {name!r} is already used by {env_owner[upper]}; "
                    "every key needs its own env names"
                )
            env_owner[upper] = f"{where}.{field}"


# ------------------------------------------------------------------------------ routes


@dataclass(frozen=True)
class KeyRoute:
    """One key as the key proxy serves it: where it goes and how it is presented."""

    provider: str
    env_var: str
    base_url_env: str
    domain: str
    auth_style: str
    base_path: str
    required: bool


def _route(key: KeyRequirement) -> KeyRoute:
    env, base = key.effective_env_names()
    info = key.known
    if info is not None:
        # Pinned: a manifest cannot send a known provider's key to another host.
        domain, auth, base_path = info.domain, info.auth_style, info.base_path
    else:
        assert key.domain is not None  # guaranteed by Manifest validation
        domain, auth, base_path = key.domain, key.auth_style or "bearer", key.base_path or ""
    return KeyRoute(
        provider=key.provider,
        env_var=env,
        base_url_env=base,
        domain=domain,
        auth_style=auth,
        base_path=base_path,
        required=key.required,
    )


def resolve_key_routes(manifest: Manifest, extra_providers: Sequence[str] = ()) -> list[KeyRoute]:
    """The key routes for a sandbox: the manifest's keys plus providers a marker names.

    An extra known provider gets its table route (required); an extra unknown provider
    must be declared in the manifest, because only there can its domain be pinned.
    """
    keys = list(manifest.keys)
    declared = {k.provider for k in keys}
    for name in extra_providers:
        if name in declared:
            continue
        if name not in KNOWN_PROVIDERS:
            raise ManifestError(
                f"provider {name!r} is not a known provider ({', '.join(KNOWN_PROVIDERS)}); "
                f"declare it under `keys:` in agent.yaml with its domain"
            )
        keys.append(KeyRequirement(provider=name))
        declared.add(name)
    try:
        _check_keys(keys)
    except ValueError as exc:
        raise ManifestError(f"{_source_label(manifest)}: {exc}") from None
    return [_route(k) for k in keys]


# ------------------------------------------------------------------------------ errors

_TYPE_WORDS = {
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping (key: value pairs)",
    "model_type": "expected a mapping (key: value pairs)",
    "model_attributes_type": "expected a mapping (key: value pairs)",
    "missing": "this field is required",
    "finite_number": "expected a finite number",
}


def _loc_path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names valid at ``loc``'s parent, for "did you mean" hints on typos."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None)
        current = args[0] if args else ann
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
    return list(current.model_fields)


def _describe(err: Mapping[str, Any], model: type[BaseModel]) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "value_error":
        text = str(err["ctx"]["error"])
    elif kind == "extra_forbidden":
        allowed = _allowed_fields(model, loc)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        text = "unknown field" + (f", did you mean {hint[0]!r}?" if hint else "")
        if allowed:
            text += f" (allowed: {', '.join(allowed)})"
    elif kind in _TYPE_WORDS:
        text = _TYPE_WORDS[kind]
        if kind not in ("missing", "finite_number"):
            text += f", got {type(err['input']).__name__}"
    else:
        # Constraint errors ("Input should be greater than 0") are plain English already;
        # only numbers are echoed, text might be a mis-pasted secret.
        text = err["msg"]
        if isinstance(err.get("input"), int | float) and not isinstance(err["input"], bool):
            text += f", got {err['input']!r}"
    path = _loc_path(loc)
    # Cross-key rules put their own path in the message.
    return f"{path}: {text}" if path else text


def _convert(exc: ValidationError, source: str, model: type[BaseModel]) -> ManifestError:
    parts = [_describe(e, model) for e in exc.errors(include_url=False)]
    return ManifestError(f"{source}: " + "; ".join(parts))


def _source_label(manifest: Manifest) -> str:
    return str(manifest.source) if manifest.source else "<manifest>"


# ------------------------------------------------------------------------------ loading

_MAX_MANIFEST_BYTES = 1024 * 1024


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML silently overwrites."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str | int | float | bool | None):
            continue  # unhashable keys get construct_mapping's own error below
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_no_duplicates,  # type: ignore[arg-type]
)


def _yaml_message(exc: yaml.YAMLError) -> str:
    # Only problem, context and position: str(exc) quotes the offending line.
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{where}YAML syntax error: {detail}"


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``agent.yaml``; every problem becomes one readable ManifestError."""
    p = Path(path)
    label = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"agent manifest not found: {label}; pass --agentbox-manifest=PATH "
            "or set agentbox_manifest in pytest.ini"
        ) from None
    except IsADirectoryError:
        raise ManifestError(f"{label}: is a directory, expected the agent.yaml file") from None
    except OSError as exc:
        raise ManifestError(f"{label}: cannot be read ({exc.strerror})") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise ManifestError(f"{label}: is larger than 1 MiB; this is not an agent manifest")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{label}: is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ManifestError(f"{label}: {_yaml_message(exc)}") from None
    manifest = manifest_from_dict(data, source=label)
    manifest._source = p
    return manifest


def manifest_from_dict(data: Any, source: str = "<manifest>") -> Manifest:
    """Validate already-parsed manifest data; errors name ``source`` like load_manifest."""
    if not isinstance(data, Mapping):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise ManifestError(
            f"{source}: the top level must be a mapping (name: ..., keys: ...), got {got}"
        )
    try:
        return Manifest.model_validate(dict(data))
    except ValidationError as exc:
        raise _convert(exc, source, Manifest) from None


# ---------------------------------------------------------------------------- overrides

OVERRIDE_KEYS: tuple[str, ...] = (
    "image",
    "setup_command",
    "run_command",
    "resources",
    "network",
    "network_unrestricted",
    "keys",
)
"""Override names :func:`apply_overrides` consumes; the caller owns every other name."""


def _as_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, str | Mapping | KeyRequirement | NetworkRule):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    raise ManifestError(f"override {name}=: expected a list, got {type(value).__name__}")


def _merge_keys(current: list[dict[str, Any]], value: Any) -> list[dict[str, Any]]:
    keys = list(current)
    for item in _as_list("keys", value):
        entry = item.model_dump(exclude_none=True) if isinstance(item, KeyRequirement) else item
        if isinstance(entry, str):
            if any(k["provider"] == entry for k in keys):
                continue
            if entry not in KNOWN_PROVIDERS:
                raise ManifestError(
                    f"override keys=: provider {entry!r} is not a known provider "
                    f"({', '.join(KNOWN_PROVIDERS)}); declare it under `keys:` in agent.yaml "
                    "or pass a mapping with its domain"
                )
            keys.append({"provider": entry})
        elif isinstance(entry, Mapping):
            # A mapping for an already declared provider replaces that declaration.
            keys = [k for k in keys if k.get("provider") != entry.get("provider")]
            keys.append(dict(entry))
        else:
            raise ManifestError(
                f"override keys=: expected provider names or mappings, got {type(entry).__name__}"
            )
    return keys


def _merge_network(current: list[dict[str, Any]], value: Any) -> list[dict[str, Any]]:
    rules = list(current)
    present = {r["domain"] for r in rules}
    for item in _as_list("network", value):
        entry = item.model_dump() if isinstance(item, NetworkRule) else item
        domain = entry if isinstance(entry, str) else None
        if isinstance(entry, Mapping):
            domain = entry.get("domain")
        try:
            normal = normalize_domain(domain, allow_wildcard=True)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ManifestError(f"override network=: {exc}") from None
        if normal in present:
            continue  # adding an already allowed domain is harmless
        present.add(normal)
        rules.append({"domain": entry} if isinstance(entry, str) else dict(entry))
    return rules


def apply_overrides(
    manifest: Manifest, overrides: Mapping[str, Any]
) -> tuple[Manifest, dict[str, Any]]:
    """Apply per-test overrides (``@pytest.mark.agentbox(...)``, ``sandbox_factory(...)``).

    Consumes the names in :data:`OVERRIDE_KEYS` and returns the re-validated manifest and
    the overrides it did not consume, for the caller to handle or refuse. ``network``
    and ``keys`` add to the manifest; ``resources`` merges over the current limits.
    """
    data = manifest.model_dump(exclude_none=True)
    runtime = data.setdefault("runtime", {})
    permissions = data.setdefault("permissions", {})
    leftover: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in ("image", "setup_command", "run_command"):
            runtime[name] = value
        elif name == "resources":
            if not isinstance(value, Mapping):
                raise ManifestError(
                    f"override resources=: expected a mapping such as {{'memory': '2g'}}, "
                    f"got {type(value).__name__}"
                )
            runtime["resources"] = {**runtime.get("resources", {}), **value}
        elif name == "network":
            permissions["network"] = _merge_network(permissions.get("network", []), value)
        elif name == "network_unrestricted":
            permissions["network_unrestricted"] = value
        elif name == "keys":
            data["keys"] = _merge_keys(data.get("keys", []), value)
        else:
            leftover[name] = value
    label = f"{_source_label(manifest)} with test overrides"
    result = manifest_from_dict(data, source=label)
    result._source = manifest.source
    return result, leftover
