"""The key vault: encryption round trip, file safety, concurrency and clear errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest

from pytest_agentbox import vault as vault_mod
from pytest_agentbox.errors import KeyMissing, VaultError
from pytest_agentbox.vault import (
    FileSecretStore,
    KeychainSecretStore,
    Vault,
    atomic_write,
    default_secret_store,
)

MACHINE = b"test-machine-id"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGENTBOX_VAULT_PASSWORD", "AGENTBOX_VAULT", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def vpath(tmp_path: Path) -> Path:
    return tmp_path / "cfg" / "vault.json"


def new_vault(path: Path, **kw: Any) -> Vault:
    kw.setdefault("machine_id", MACHINE)
    return Vault(path, **kw)


def key() -> str:
    return "sk-" + secrets.token_hex(24)


# --------------------------------------------------------------------------- basics


def test_round_trip_and_replace(vpath: Path) -> None:
    v = new_vault(vpath)
    k1, k2, k3 = key(), key(), key()
    v.add("openai", k1)
    v.add("anthropic", k2)
    assert new_vault(vpath).get("openai") == k1
    assert new_vault(vpath).get("anthropic") == k2
    v.add("openai", k3)
    assert new_vault(vpath).get("openai") == k3
    assert v.list() == ["anthropic", "openai"]


def test_missing_vault_reads_empty_and_creates_nothing(vpath: Path) -> None:
    v = new_vault(vpath)
    assert v.list() == []
    assert not v.has("openai")
    assert v.remove("openai") is False
    with pytest.raises(KeyMissing, match=r"agentbox keys add openai"):
        v.get("openai")
    assert not vpath.parent.exists()


def test_file_holds_no_plaintext_and_list_has_no_values(vpath: Path) -> None:
    v = new_vault(vpath)
    k = key()
    v.add("openai", k)
    raw = vpath.read_text()
    assert k not in raw
    doc = json.loads(raw)
    assert doc["format"] == "agentbox-vault"
    assert doc["version"] == 1
    assert set(doc["entries"]) == {"openai"}
    assert v.list() == ["openai"]
    assert k not in repr(v) and k not in repr(v.list())
    secret_hex = vpath.with_name("vault.json.secret").read_text().strip()
    assert secret_hex not in repr(v)


def test_modes_of_created_files(vpath: Path) -> None:
    new_vault(vpath).add("openai", key())
    assert stat.S_IMODE(vpath.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(vpath.stat().st_mode) == 0o600
    secret = vpath.with_name("vault.json.secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(bytes.fromhex(secret.read_text().strip())) == 32


def test_remove_and_has(vpath: Path) -> None:
    v = new_vault(vpath)
    v.add("openai", key())
    v.add("groq", key())
    assert v.has("groq")
    assert v.remove("groq") is True
    assert v.remove("groq") is False
    assert not v.has("groq")
    assert v.list() == ["openai"]


@pytest.mark.parametrize("name", ["open_ai", "OpenAI", "1ai", "-ai", "", "ai key", "ai\n"])
def test_provider_names_validated(vpath: Path, name: str) -> None:
    v = new_vault(vpath)
    for call in (lambda: v.add(name, key()), lambda: v.get(name), lambda: v.has(name)):
        with pytest.raises(VaultError, match="invalid provider name"):
            call()


@pytest.mark.parametrize("bad", ["", "sk-abc\n", "sk\r\nX-Evil: 1", "a\x00b"])
def test_bad_key_values_refused(vpath: Path, bad: str) -> None:
    with pytest.raises(VaultError) as info:
        new_vault(vpath).add("openai", bad)
    assert bad == "" or bad not in str(info.value)


def test_only_requested_entry_is_decrypted(vpath: Path) -> None:
    v = new_vault(vpath)
    k = key()
    v.add("openai", k)
    v.add("groq", key())
    doc = json.loads(vpath.read_text())
    doc["entries"]["groq"] = doc["entries"]["groq"][:-8] + "AAAAAAAA"
    atomic_write(vpath, json.dumps(doc).encode())
    assert v.get("openai") == k
    with pytest.raises(VaultError, match=r"cannot decrypt the key 'groq' in .*vault\.json"):
        v.get("groq")


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Vault.default_path() == tmp_path / "home" / ".config" / "agentbox" / "vault.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert Vault.default_path() == tmp_path / "xdg" / "agentbox" / "vault.json"
    monkeypatch.setenv("AGENTBOX_VAULT", str(tmp_path / "v.json"))
    assert Vault.default_path() == tmp_path / "v.json"


# --------------------------------------------------------------------------- permissions


def _chmod_vault(p: Path) -> Path:
    return p


def _chmod_secret(p: Path) -> Path:
    return p.with_name(p.name + ".secret")


@pytest.mark.parametrize("which", [_chmod_vault, _chmod_secret], ids=["vault", "secret"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_too_open_files_refused_not_fixed(vpath: Path, which: Any, mode: int) -> None:
    v = new_vault(vpath)
    v.add("openai", key())
    target = which(vpath)
    target.chmod(mode)
    with pytest.raises(VaultError) as info:
        v.get("openai")
    msg = str(info.value)
    assert f"chmod 600 {target}" in msg
    assert stat.S_IMODE(target.stat().st_mode) == mode  # never silently chmod-ed


@pytest.mark.parametrize("op", ["list", "has", "get"])
def test_vault_permission_checked_on_every_read(vpath: Path, op: str) -> None:
    v = new_vault(vpath)
    v.add("openai", key())
    vpath.chmod(0o644)
    with pytest.raises(VaultError, match="chmod 600"):
        getattr(v, op)(*(() if op == "list" else ("openai",)))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_foreign_owner_refused(vpath: Path) -> None:
    v = new_vault(vpath)
    v.add("openai", key())
    os.chown(vpath, 4242, -1)
    with pytest.raises(VaultError, match=r"owned by uid 4242"):
        v.list()


def test_symlink_at_vault_path_refused(vpath: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    new_vault(real).add("openai", key())
    vpath.parent.mkdir(mode=0o700)
    vpath.symlink_to(real)
    v = new_vault(vpath)
    with pytest.raises(VaultError, match=r"is a symlink"):
        v.list()
    with pytest.raises(VaultError, match=r"is a symlink"):
        v.add("groq", key())
    assert vpath.is_symlink()


def test_symlink_at_secret_path_refused(vpath: Path, tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    decoy.write_text(secrets.token_hex(32))
    decoy.chmod(0o600)
    vpath.parent.mkdir(mode=0o700)
    vpath.with_name("vault.json.secret").symlink_to(decoy)
    with pytest.raises(VaultError, match=r"symlink"):
        new_vault(vpath).add("openai", key())


def test_fifo_at_vault_path_refused_without_hanging(vpath: Path) -> None:
    vpath.parent.mkdir(mode=0o700)
    os.mkfifo(vpath, 0o600)
    with pytest.raises(VaultError, match="not a regular file"):
        new_vault(vpath).list()


def test_atomic_write_never_follows_planted_symlinks(tmp_path: Path, monkeypatch: Any) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "vault.json"
    # Make the "random" temp name predictable so an attacker's symlink sits exactly there.
    monkeypatch.setattr(vault_mod.secrets, "token_hex", lambda n=8: "0" * (2 * n))
    (tmp_path / f".vault.json.{'0' * 16}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"data")
    assert victim.read_text() == "untouched"
    assert not target.exists()


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# --------------------------------------------------------------------------- errors


def test_wrong_password(vpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = secrets.token_hex(8)
    k = key()
    new_vault(vpath, password=pw).add("openai", k)
    monkeypatch.setenv("AGENTBOX_VAULT_PASSWORD", pw)
    assert new_vault(vpath).get("openai") == k  # env var is the default password
    monkeypatch.setenv("AGENTBOX_VAULT_PASSWORD", "not-" + pw)
    with pytest.raises(VaultError) as info:
        new_vault(vpath).get("openai")
    msg = str(info.value)
    assert "AGENTBOX_VAULT_PASSWORD" in msg and str(vpath) in msg and "'openai'" in msg
    assert pw not in msg and k not in msg


def test_add_with_wrong_password_does_not_mix_keys(vpath: Path) -> None:
    new_vault(vpath, password="a").add("openai", key())
    before = vpath.read_bytes()
    with pytest.raises(VaultError, match="cannot decrypt"):
        new_vault(vpath, password="b").add("groq", key())
    assert vpath.read_bytes() == before


def test_foreign_machine_refused(vpath: Path) -> None:
    new_vault(vpath, machine_id=b"machine-a").add("openai", key())
    with pytest.raises(VaultError, match="another machine"):
        new_vault(vpath, machine_id=b"machine-b").get("openai")


def test_foreign_secret_refused(vpath: Path, tmp_path: Path) -> None:
    new_vault(vpath).add("openai", key())
    other = FileSecretStore(tmp_path / "other.secret")
    other.create()
    with pytest.raises(VaultError, match="another secret"):
        new_vault(vpath, secret_store=other).get("openai")


def test_lost_secret_is_a_clear_error_not_a_new_secret(vpath: Path) -> None:
    new_vault(vpath).add("openai", key())
    secret = vpath.with_name("vault.json.secret")
    secret.unlink()
    with pytest.raises(VaultError, match="secret is missing"):
        new_vault(vpath).get("openai")
    with pytest.raises(VaultError, match="secret is missing"):
        new_vault(vpath).add("groq", key())
    assert not secret.exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not an agentbox vault"),
        (b'{"format": "other", "version": 1, "salt": "", "entries": {}}', "not an agentbox"),
        (b'{"format": "agentbox-vault", "version": 9, "entries": {}}', "version 9"),
        (b'{"format": "agentbox-vault", "version": 1, "salt": "!!", "entries": {}}', "salt"),
        (
            b'{"format": "agentbox-vault", "version": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA==",'
            b' "entries": {"Bad_Name": "x"}}',
            "corrupted entries",
        ),
    ],
)
def test_corrupted_file_names_the_file(vpath: Path, content: bytes, fragment: str) -> None:
    vpath.parent.mkdir(mode=0o700)
    atomic_write(vpath, content)
    with pytest.raises(VaultError) as info:
        new_vault(vpath).list()
    assert str(vpath) in str(info.value)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- key derivation


def test_key_derived_once_per_process(vpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = vault_mod._derive_key

    def counting(material: bytes, salt: bytes) -> bytes:
        calls.append(1)
        return real(material, salt)

    monkeypatch.setattr(vault_mod, "_KEY_CACHE", {})
    monkeypatch.setattr(vault_mod, "_derive_key", counting)
    k1, k2 = key(), key()
    new_vault(vpath).add("openai", k1)
    new_vault(vpath).add("groq", k2)
    for _ in range(3):
        assert new_vault(vpath).get("openai") == k1
        assert new_vault(vpath).get("groq") == k2
    assert len(calls) == 1
    other = vpath.with_name("second.json")
    new_vault(other, password="x").add("openai", k1)
    assert len(calls) == 2  # different inputs really derive again


def test_derivation_uses_600k_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, int] = {}
    real = vault_mod.PBKDF2HMAC

    def spy(**kw: Any) -> Any:
        seen["iterations"] = kw["iterations"]
        return real(**kw)

    monkeypatch.setattr(vault_mod, "PBKDF2HMAC", spy)
    vault_mod._derive_key(b"m", b"s" * 16)
    assert seen["iterations"] == 600_000


def test_machine_id_reads_a_stable_value() -> None:
    assert vault_mod.machine_id() == vault_mod.machine_id() != b""


# --------------------------------------------------------------------------- secret stores


class FakeKeychain:
    """Stands in for keyring's macOS backend; records what it was given."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, account: str) -> str | None:
        if self.fail:
            raise RuntimeError("User interaction is not allowed.")
        return self.items.get((service, account))

    def set_password(self, service: str, account: str, value: str) -> None:
        if self.fail:
            raise RuntimeError("User interaction is not allowed.")
        self.items[(service, account)] = value


def test_failing_keychain_no_fallback(vpath: Path, tmp_path: Path) -> None:
    store = KeychainSecretStore(str(vpath), backend=FakeKeychain(fail=True))
    with pytest.raises(VaultError, match="does not fall back"):
        new_vault(vpath, secret_store=store).add("openai", key())
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []


def test_keychain_stores_hex_and_round_trips(vpath: Path) -> None:
    chain = FakeKeychain()
    store = KeychainSecretStore(str(vpath), backend=chain)
    k = key()
    new_vault(vpath, secret_store=store).add("openai", k)
    (value,) = chain.items.values()
    assert len(bytes.fromhex(value)) == 32
    assert new_vault(vpath, secret_store=store).get("openai") == k
    assert not vpath.with_name("vault.json.secret").exists()


def test_keychain_corrupted_value(vpath: Path) -> None:
    chain = FakeKeychain()
    chain.items[(vault_mod.KEYCHAIN_SERVICE, "acct")] = "not hex"
    with pytest.raises(VaultError, match="corrupted"):
        KeychainSecretStore("acct", backend=chain).load()


@pytest.mark.parametrize(
    ("platform", "kind"), [("darwin", KeychainSecretStore), ("linux", FileSecretStore)]
)
def test_default_secret_store_by_platform(
    monkeypatch: pytest.MonkeyPatch, vpath: Path, platform: str, kind: type
) -> None:
    monkeypatch.setattr(vault_mod.sys, "platform", platform)
    assert isinstance(default_secret_store(vpath), kind)


def test_file_secret_created_once(tmp_path: Path) -> None:
    store = FileSecretStore(tmp_path / "s")
    assert store.load() is None
    first = store.create()
    assert store.create() == first == store.load()
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


# --------------------------------------------------------------------------- concurrency
# Workers live at module level so the "spawn" start method can import them.


def _create_secret(path: str, barrier: Any, out: Any) -> None:
    barrier.wait()
    out.put(FileSecretStore(path).create().hex())


def _add_key(path: str, provider: str, value: str, barrier: Any) -> None:
    barrier.wait()
    Vault(path, machine_id=MACHINE).add(provider, value)


def _run_all(procs: list[Any]) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_two_processes_create_the_same_secret(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(3):
        path = str(tmp_path / f"secret-{round_}")
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_create_secret, args=(path, barrier, out)) for _ in range(2)]
        _run_all(procs)
        got = {out.get(timeout=10), out.get(timeout=10)}
        assert len(got) == 1
        assert FileSecretStore(path).load().hex() in got


def test_eight_processes_lose_no_key(vpath: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    keys = {f"p{i}": key() for i in range(8)}
    barrier = ctx.Barrier(len(keys))
    procs = [
        ctx.Process(target=_add_key, args=(str(vpath), name, value, barrier))
        for name, value in keys.items()
    ]
    _run_all(procs)
    v = new_vault(vpath)
    assert v.list() == sorted(keys)
    for name, value in keys.items():
        assert v.get(name) == value
    assert Path(str(vpath) + ".lock").exists()  # never unlinked
    assert not [p for p in vpath.parent.iterdir() if p.name.endswith(".tmp")]
