"""The encrypted key vault: real API keys at rest, readable only by their owner.

A vault is one JSON file::

    {"format": "agentbox-vault", "version": 1, "salt": "<base64>",
     "entries": {"openai": "<Fernet token>", ...}}

Each key is its own Fernet token, so a test that needs one key decrypts only that one;
``list``/``has``/``remove`` decrypt nothing. The Fernet key is derived with
PBKDF2-HMAC-SHA256 (600 000 iterations) from the vault's salt, a machine id, a random
32-byte secret held outside the vault (a ``0600`` file on Linux, the login keychain on
macOS) and an optional password (``AGENTBOX_VAULT_PASSWORD``). A copied vault file is
useless without the secret, on another machine, or without the password.

Seed lines covered: "Key vault atomic writes", "Key vault permission checks",
"macOS keychain hex encoding", "macOS keychain no silent fallback",
"Linux vault secret atomic creation". Usable without pytest.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import inspect
import json
import os
import re
import secrets
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import filelock
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from pytest_agentbox.atomicfile import fsync_dir, replace_atomically
from pytest_agentbox.errors import KeyMissing, VaultError

FORMAT = "agentbox-vault"
VERSION = 1
PBKDF2_ITERATIONS = 600_000
SECRET_BYTES = 32
SALT_BYTES = 16
PASSWORD_ENV = "AGENTBOX_VAULT_PASSWORD"  # noqa: S105 (a variable name, not a password)
PATH_ENV = "AGENTBOX_VAULT"
KEYCHAIN_SERVICE = "pytest-agentbox-vault"
LOCK_TIMEOUT = 60.0
PROVIDER_RE = re.compile(r"^[a-z][a-z0-9-]*$")

_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
# O_NONBLOCK: opening a FIFO planted at our path must fail the type check, not hang.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


# --------------------------------------------------------------------------- file safety


def _open_checked(path: Path, what: str) -> int | None:
    """Open ``path`` for reading after proving it is ours alone; None when it is absent.

    Checks run on the open descriptor (fstat), so nothing can be swapped in between the
    check and the read; O_NOFOLLOW makes a symlink at ``path`` fail instead of being read.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VaultError(
                f"the {what} {path} is a symlink; refusing to follow it "
                f"(replace it with the real file)"
            ) from None
        raise VaultError(f"cannot open the {what} {path}: {exc.strerror}") from None
    try:
        _check_private(os.fstat(fd), path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_private(st: os.stat_result, path: Path, what: str) -> None:
    """Refuse a file that is not a regular file owned by us with no group/other bits.

    We never chmod on the user's behalf: a too-open file may already have leaked, and
    the user should know.
    """
    if not stat.S_ISREG(st.st_mode):
        raise VaultError(f"the {what} {path} is not a regular file; remove it and retry")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise VaultError(
            f"the {what} {path} is owned by uid {st.st_uid}, not by you (uid {uid}); "
            f"fix: chown {uid} {path}"
        )
    if st.st_mode & 0o077:
        raise VaultError(
            f"the {what} {path} is readable or writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); fix: chmod 600 {path}"
        )


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist, never through a symlink) at 0600 with ``data``."""
    fd = os.open(path, _CREATE_FLAGS, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)  # loops over short writes, unlike a bare os.write
        os.fsync(fd)
    except BaseException:
        os.unlink(path)  # ours: O_EXCL proved we created it
        raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half.

    The temp file has an unpredictable name in the same directory and is created with
    O_EXCL|O_NOFOLLOW at 0600, so a planted symlink is never followed and the content
    is never world-readable, not even briefly (seed: "Key vault atomic writes").
    """
    with replace_atomically(path, tmp_name=f".{path.name}.{secrets.token_hex(8)}.tmp") as fh:
        fh.write(data)


# --------------------------------------------------------------------------- secret stores


class SecretStore(Protocol):
    """Where the vault's random 32-byte secret lives, outside the vault file."""

    def load(self) -> bytes | None:
        """The secret, or None when none exists yet. Raises VaultError when unsafe."""
        ...

    def create(self) -> bytes:
        """Make and store a new secret; if another process just made one, return that."""
        ...

    def describe(self) -> str:
        """Where the secret lives, for error messages (never the secret itself)."""
        ...


def _parse_hex_secret(text: str, where: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise VaultError(
            f"the vault secret in {where} is corrupted (expected {SECRET_BYTES} bytes)"
        )
    return secret


class FileSecretStore:
    """The secret as hex text in a ``0600`` file (Linux and other non-macOS systems).

    Creation is TOCTOU-safe (seed: "Linux vault secret atomic creation"): the secret is
    written to a fresh O_CREAT|O_EXCL|O_NOFOLLOW 0600 temp file and then hard-linked to
    its final name. link() fails if the name exists (even as a dangling symlink), so two
    creators cannot both win, and nobody ever sees a half-written secret file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileSecretStore(path={str(self.path)!r})"

    def describe(self) -> str:
        return str(self.path)

    def load(self) -> bytes | None:
        fd = _open_checked(self.path, "vault secret file")
        if fd is None:
            return None
        return _parse_hex_secret(_read_all(fd).decode("ascii", "replace"), str(self.path))

    def create(self) -> bytes:
        secret = secrets.token_bytes(SECRET_BYTES)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        try:
            _write_new(tmp, secret.hex().encode("ascii") + b"\n")
        except OSError as exc:
            raise VaultError(f"cannot create the vault secret file {self.path}: {exc}") from None
        try:
            os.link(tmp, self.path, follow_symlinks=False)
        except FileExistsError:
            existing = self.load()
            if existing is None:  # the name exists but vanished again: let the caller retry
                raise VaultError(f"the vault secret file {self.path} vanished while read") from None
            return existing
        except OSError as exc:
            raise VaultError(f"cannot create the vault secret file {self.path}: {exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(self.path.parent)
        return secret


class KeychainSecretStore:
    """The secret, hex-encoded, in the macOS login keychain.

    We use ``keyring``'s macOS backend rather than the ``security`` CLI because keyring
    calls the Security framework directly: the secret never appears on a command line
    where ``ps`` could read it (seed: "macOS keychain hex encoding"). Any keychain
    failure is a VaultError; there is deliberately no fallback to a file, which would
    silently weaken the protection the user chose (seed: "macOS keychain no silent
    fallback").
    """

    def __init__(self, account: str, *, backend: Any = None) -> None:
        self.account = account
        self._backend = backend

    def __repr__(self) -> str:
        return f"KeychainSecretStore(account={self.account!r})"

    def describe(self) -> str:
        return f"the macOS keychain (service {KEYCHAIN_SERVICE!r}, account {self.account!r})"

    def _keyring(self) -> Any:
        if self._backend is None:
            try:
                from keyring.backends.macOS import Keyring
            except Exception as exc:
                raise self._error("load the keyring library", exc) from None
            self._backend = Keyring()
        return self._backend

    def _error(self, action: str, exc: BaseException) -> VaultError:
        return VaultError(
            f"cannot {action} for the vault secret in {self.describe()}: "
            f"{type(exc).__name__}: {exc}. Unlock the keychain (or install 'keyring') and "
            f"retry; the vault does not fall back to a secret file"
        )

    def load(self) -> bytes | None:
        backend = self._keyring()
        try:
            value = backend.get_password(KEYCHAIN_SERVICE, self.account)
        except Exception as exc:
            raise self._error("read the keychain", exc) from None
        if value is None:
            return None
        return _parse_hex_secret(value, self.describe())

    def create(self) -> bytes:
        # Not atomic on its own: Vault calls it only under the vault's file lock.
        existing = self.load()
        if existing is not None:
            return existing
        secret = secrets.token_bytes(SECRET_BYTES)
        try:
            self._keyring().set_password(KEYCHAIN_SERVICE, self.account, secret.hex())
        except VaultError:
            raise
        except Exception as exc:
            raise self._error("write to the keychain", exc) from None
        return secret


def default_secret_store(vault_path: str | os.PathLike[str]) -> SecretStore:
    """The keychain on macOS, else a ``0600`` file ``<vault>.secret`` beside the vault."""
    path = Path(vault_path)
    if sys.platform == "darwin":
        return KeychainSecretStore(str(path.expanduser().absolute()))
    return FileSecretStore(path.with_name(path.name + ".secret"))


# --------------------------------------------------------------------------- key derivation


def machine_id() -> bytes:
    """A stable id of this machine, one input of the key derivation.

    Linux: /etc/machine-id or /var/lib/dbus/machine-id. macOS: IOPlatformUUID from
    ``ioreg``. Only when neither exists (minimal containers, other systems) we fall back
    to the host name; that still binds the vault to this host, but a renamed host (or a
    new container, whose host name is its id) can no longer read its vault.
    """
    for name in _MACHINE_ID_FILES:
        with contextlib.suppress(OSError):
            value = Path(name).read_bytes().strip()
            if value:
                return value
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            match = re.search(r'"IOPlatformUUID"\s*=\s*"([^"]+)"', out)
            if match:
                return match.group(1).encode()
    return socket.gethostname().encode()


def _derive_key(material: bytes, salt: bytes) -> bytes:
    """PBKDF2-HMAC-SHA256 over ``material``; the expensive step, run once per process."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=PBKDF2_ITERATIONS)
    return base64.urlsafe_b64encode(kdf.derive(material))


# Fingerprint of the inputs -> Fernet key. Deriving costs ~0.2 s by design, so a test
# session must pay it once, not on every key lookup.
_KEY_CACHE: dict[bytes, bytes] = {}
_KEY_CACHE_LOCK = threading.Lock()


def _fernet_key(machine: bytes, secret: bytes, password: str, salt: bytes) -> bytes:
    # Length-prefixed so that no two different input tuples give the same material.
    material = b"".join(
        len(part).to_bytes(4, "big") + part
        for part in (b"agentbox-vault-v1", machine, secret, password.encode("utf-8"))
    )
    fingerprint = hashlib.sha256(salt + material).digest()
    with _KEY_CACHE_LOCK:
        key = _KEY_CACHE.get(fingerprint)
        if key is None:
            key = _derive_key(material, salt)
            _KEY_CACHE[fingerprint] = key
    return key


# --------------------------------------------------------------------------- the vault


def validate_provider(provider: str) -> str:
    """Return ``provider`` if it matches ``^[a-z][a-z0-9-]*$``, else raise VaultError."""
    if not isinstance(provider, str) or not PROVIDER_RE.fullmatch(provider):
        # The bad value is not echoed: people paste a key where the name belongs.
        raise VaultError(
            "invalid provider name: use lowercase letters, digits and '-', "
            "starting with a letter (e.g. 'openai', 'anthropic')"
        )
    return provider


def _lock_kwargs() -> dict[str, Any]:
    # Never unlink the lock file: a deleted lock path lets two processes lock two
    # different inodes. Newer filelock releases can remove it on release unless told not to.
    params = inspect.signature(filelock.FileLock.__init__).parameters
    kwargs: dict[str, Any] = {"timeout": LOCK_TIMEOUT, "mode": 0o600}
    if "preserve_lock_file" in params:
        kwargs["preserve_lock_file"] = True
    return kwargs


class Vault:
    """An encrypted store of provider API keys in one JSON file.

    ``secret_store`` defaults to :func:`default_secret_store`; ``password`` defaults to
    ``$AGENTBOX_VAULT_PASSWORD`` (empty if unset); ``machine_id`` defaults to
    :func:`machine_id`. Nothing secret is kept in the repr or in error messages.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        secret_store: SecretStore | None = None,
        password: str | None = None,
        machine_id: bytes | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self._store = secret_store if secret_store is not None else default_secret_store(self.path)
        self._password = password if password is not None else os.environ.get(PASSWORD_ENV, "")
        self._machine_id = machine_id

    def __repr__(self) -> str:
        return f"Vault(path={str(self.path)!r})"

    @staticmethod
    def default_path() -> Path:
        """``$AGENTBOX_VAULT``, else ``$XDG_CONFIG_HOME/agentbox/vault.json``, else
        ``~/.config/agentbox/vault.json``."""
        explicit = os.environ.get(PATH_ENV)
        if explicit:
            return Path(explicit).expanduser()
        config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config) / "agentbox" / "vault.json"

    # -- public API

    def add(self, provider: str, key: str) -> None:
        """Store ``key`` for ``provider``, replacing any key it had."""
        validate_provider(provider)
        if not isinstance(key, str) or not key:
            raise VaultError(f"refusing to store an empty key for '{provider}'")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
            # A CR/LF in a key would end up in an HTTP header of the key proxy.
            raise VaultError(f"the key for '{provider}' contains control characters (newline?)")
        with self._locked():
            doc = self._read()
            if doc is None:
                doc = {
                    "format": FORMAT,
                    "version": VERSION,
                    "salt": base64.b64encode(secrets.token_bytes(SALT_BYTES)).decode(),
                    "entries": {},
                }
                fernet = Fernet(self._key(doc, create_secret=True))
            else:
                fernet = Fernet(self._key(doc, create_secret=not doc["entries"]))
                # Prove the key opens what is already there, so one vault never mixes
                # keys made with different passwords or secrets.
                for name, token in doc["entries"].items():
                    self._decrypt(fernet, name, token)
                    break
            doc["entries"][provider] = fernet.encrypt(key.encode("utf-8")).decode("ascii")
            self._write(doc)

    def get(self, provider: str) -> str:
        """The key of ``provider``; KeyMissing when the vault has none."""
        validate_provider(provider)
        doc = self._read()
        token = None if doc is None else doc["entries"].get(provider)
        if doc is None or token is None:
            raise KeyMissing(
                f"no key for provider '{provider}' in the vault {self.path}; "
                f"add it with `agentbox keys add {provider}`"
            )
        return self._decrypt(Fernet(self._key(doc, create_secret=False)), provider, token)

    def has(self, provider: str) -> bool:
        """Whether the vault holds a key for ``provider`` (decrypts nothing)."""
        validate_provider(provider)
        doc = self._read()
        return doc is not None and provider in doc["entries"]

    def remove(self, provider: str) -> bool:
        """Delete the key of ``provider``; False if there was none."""
        validate_provider(provider)
        if not self.has(provider):  # don't create a directory and lock file for nothing
            return False
        with self._locked():
            doc = self._read()
            if doc is None or provider not in doc["entries"]:
                return False
            del doc["entries"][provider]
            self._write(doc)
            return True

    def list(self) -> list[str]:
        """Provider names with a key, sorted (no values, decrypts nothing)."""
        doc = self._read()
        return [] if doc is None else sorted(doc["entries"])

    # -- internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_dir()
        lock = filelock.FileLock(str(self.path) + ".lock", **_lock_kwargs())
        try:
            lock.acquire()
        except filelock.Timeout:
            raise VaultError(
                f"the vault {self.path} stayed locked for {LOCK_TIMEOUT:.0f}s by another "
                f"process (lock file {self.path}.lock)"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _ensure_dir(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _read(self) -> dict[str, Any] | None:
        """The parsed vault, or None when the file does not exist yet. Checks every time."""
        fd = _open_checked(self.path, "vault file")
        if fd is None:
            return None
        raw = _read_all(fd)
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise VaultError(
                f"the vault file {self.path} is not valid JSON (corrupted?); restore it "
                f"from a backup or delete it and add the keys again"
            ) from None
        self._validate(doc)
        return doc

    def _validate(self, doc: Any) -> None:
        where = f"the vault file {self.path}"
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise VaultError(f"{where} is not an agentbox vault (format marker missing)")
        if doc.get("version") != VERSION:
            raise VaultError(
                f"{where} has version {doc.get('version')!r}; this agentbox reads version "
                f"{VERSION} (made by a newer agentbox?)"
            )
        try:
            salt = base64.b64decode(doc.get("salt", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            salt = b""
        if len(salt) < SALT_BYTES:
            raise VaultError(f"{where} has a missing or corrupted salt")
        entries = doc.get("entries")
        if not isinstance(entries, dict) or not all(
            isinstance(k, str) and PROVIDER_RE.fullmatch(k) and isinstance(v, str)
            for k, v in entries.items()
        ):
            raise VaultError(f"{where} has corrupted entries")

    def _write(self, doc: dict[str, Any]) -> None:
        self._ensure_dir()
        atomic_write(self.path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")

    def _key(self, doc: dict[str, Any], *, create_secret: bool) -> bytes:
        secret = self._store.load()
        if secret is None:
            if not create_secret:
                raise VaultError(
                    f"the vault {self.path} has keys but its secret is missing from "
                    f"{self._store.describe()}; the keys cannot be decrypted without it"
                )
            secret = self._store.create()
        machine = self._machine_id if self._machine_id is not None else machine_id()
        return _fernet_key(machine, secret, self._password, base64.b64decode(doc["salt"]))

    def _decrypt(self, fernet: Fernet, provider: str, token: str) -> str:
        try:
            return fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise VaultError(
                f"cannot decrypt the key '{provider}' in {self.path}: wrong "
                f"{PASSWORD_ENV}, or the vault was made on another machine or with another "
                f"secret ({self._store.describe()}), or the entry is corrupted"
            ) from None
