"""``agentbox keys``: keys come in on stdin or a hidden prompt, never via argv or output."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_agentbox import cli
from pytest_agentbox.vault import Vault


class FakeStdin(io.StringIO):
    def __init__(self, text: str, tty: bool = False) -> None:
        super().__init__(text)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTBOX_VAULT_PASSWORD", raising=False)
    monkeypatch.delenv("AGENTBOX_VAULT", raising=False)


@pytest.fixture
def vpath(tmp_path: Path) -> Path:
    return tmp_path / "agentbox" / "vault.json"


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], stdin: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", FakeStdin(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("ending", ["", "\n", "\r\n"])
def test_add_from_stdin_then_list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], vpath: Path, ending: str
) -> None:
    key = "sk-" + secrets.token_hex(20)
    code, out, err = run(
        monkeypatch, capsys, ["keys", "add", "openai", "--vault", str(vpath)], key + ending
    )
    assert code == 0, err
    assert key not in out + err
    assert Vault(vpath).get("openai") == key  # exactly one line ending stripped

    code, out, err = run(monkeypatch, capsys, ["keys", "list", "--vault", str(vpath)], "")
    assert code == 0
    assert out.split() == ["openai"]
    assert key not in out + err


def test_hidden_prompt_on_a_tty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], vpath: Path
) -> None:
    key = secrets.token_hex(20)
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return key

    monkeypatch.setattr(cli.getpass, "getpass", fake_getpass)
    monkeypatch.setattr(sys, "stdin", FakeStdin("not-this", tty=True))
    assert cli.main(["keys", "add", "groq", "--vault", str(vpath)]) == 0
    assert prompts and "groq" in prompts[0]
    assert Vault(vpath).get("groq") == key
    assert key not in "".join(capsys.readouterr())


def test_no_key_argument_exists(capsys: pytest.CaptureFixture[str], vpath: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["keys", "add", "openai", "sk-" + secrets.token_hex(8), "--vault", str(vpath)])
    assert info.value.code == 2
    assert not vpath.exists()


def test_remove(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], vpath: Path
) -> None:
    v = Vault(vpath)
    v.add("openai", secrets.token_hex(16))
    v.add("groq", secrets.token_hex(16))
    code, _out, err = run(
        monkeypatch, capsys, ["keys", "remove", "groq", "--vault", str(vpath)], ""
    )
    assert code == 0, err
    assert v.list() == ["openai"]
    code, _out, err = run(
        monkeypatch, capsys, ["keys", "remove", "groq", "--vault", str(vpath)], ""
    )
    assert code == 2
    assert err.startswith("agentbox: error: ") and "groq" in err


@pytest.mark.parametrize(
    ("argv", "stdin", "fragment"),
    [
        (["keys", "add", "open_ai"], "k", "invalid provider name"),
        (["keys", "add", "openai"], "", "no key given"),
        (["keys", "add", "openai"], "\n", "no key given"),
    ],
)
def test_errors_are_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    vpath: Path,
    argv: list[str],
    stdin: str,
    fragment: str,
) -> None:
    code, out, err = run(monkeypatch, capsys, [*argv, "--vault", str(vpath)], stdin)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("agentbox: error: ") and fragment in err
    assert "Traceback" not in err


def test_permission_error_via_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], vpath: Path
) -> None:
    Vault(vpath).add("openai", secrets.token_hex(16))
    vpath.chmod(0o644)
    code, _out, err = run(monkeypatch, capsys, ["keys", "list", "--vault", str(vpath)], "")
    assert code == 2
    assert f"chmod 600 {vpath}" in err


def test_default_vault_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], vpath: Path
) -> None:
    monkeypatch.setenv("AGENTBOX_VAULT", str(vpath))
    code, _out, err = run(monkeypatch, capsys, ["keys", "add", "mistral"], secrets.token_hex(8))
    assert code == 0, err
    assert Vault(vpath).list() == ["mistral"]


def test_real_process_key_only_on_stdin(vpath: Path) -> None:
    key = "sk-" + secrets.token_hex(24)
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parent.parent)}
    base = [sys.executable, "-m", "pytest_agentbox.cli", "keys"]
    add = subprocess.run(
        [*base, "add", "anthropic", "--vault", str(vpath)],
        input=key + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert add.returncode == 0, add.stderr
    assert key not in add.stdout + add.stderr
    lst = subprocess.run(
        [*base, "list", "--vault", str(vpath)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert lst.returncode == 0
    assert lst.stdout.split() == ["anthropic"]
    assert key not in lst.stdout + lst.stderr
    assert Vault(vpath).get("anthropic") == key
