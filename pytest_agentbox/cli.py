"""The ``agentbox`` command line: ``agentbox keys add|list|remove`` (more groups later).

Each group registers itself on the shared ``subparsers`` object in :func:`build_parser`
and each command is one ``_cmd_<group>_<command>(args) -> int`` function. Errors the
tool raises on purpose (:class:`AgentboxError`) become one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from .errors import AgentboxError, KeyMissing, VaultError
from .vault import Vault, validate_provider

EXIT_OK = 0
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; add a command group with one ``_add_<group>_group`` call."""
    parser = argparse.ArgumentParser(
        prog="agentbox", description="Manage pytest-agentbox keys, images and state."
    )
    subparsers = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    _add_keys_group(subparsers)
    return parser


def _add_keys_group(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vault_opt = argparse.ArgumentParser(add_help=False)
    vault_opt.add_argument(
        "--vault",
        type=Path,
        default=None,
        metavar="PATH",
        help="vault file (default: $AGENTBOX_VAULT or ~/.config/agentbox/vault.json)",
    )
    keys = subparsers.add_parser("keys", help="manage the API keys in the encrypted vault")
    cmds = keys.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # There is deliberately no positional key argument: argv is visible to every local
    # user through ps and /proc, and lands in shell history.
    add = cmds.add_parser(
        "add",
        parents=[vault_opt],
        help="store a key (read from stdin, or a hidden prompt on a terminal)",
    )
    add.add_argument("provider", metavar="PROVIDER")
    add.set_defaults(func=_cmd_keys_add)

    lst = cmds.add_parser("list", parents=[vault_opt], help="list the providers (names only)")
    lst.set_defaults(func=_cmd_keys_list)

    rm = cmds.add_parser("remove", parents=[vault_opt], help="delete a provider's key")
    rm.add_argument("provider", metavar="PROVIDER")
    rm.set_defaults(func=_cmd_keys_remove)


def _vault(args: argparse.Namespace) -> Vault:
    return Vault(args.vault if args.vault is not None else Vault.default_path())


def _read_key(provider: str) -> str:
    if sys.stdin is not None and not sys.stdin.isatty():
        key = sys.stdin.read()
        # Strip exactly one line ending (echo/printf add it); anything else is the key's.
        if key.endswith("\r\n"):
            key = key[:-2]
        elif key.endswith("\n"):
            key = key[:-1]
    else:
        try:
            key = getpass.getpass(f"API key for {provider} (input hidden): ")
        except EOFError:
            key = ""
    if not key:
        raise VaultError(
            f"no key given for '{provider}' (pipe it on stdin or type it at the prompt)"
        )
    return key


def _cmd_keys_add(args: argparse.Namespace) -> int:
    provider = validate_provider(args.provider)
    vault = _vault(args)
    vault.add(provider, _read_key(provider))
    print(f"stored the key for '{provider}' in {vault.path}")
    return EXIT_OK


def _cmd_keys_list(args: argparse.Namespace) -> int:
    vault = _vault(args)
    names = vault.list()
    for name in names:
        print(name)
    if not names:
        print(f"no keys in {vault.path}", file=sys.stderr)
    return EXIT_OK


def _cmd_keys_remove(args: argparse.Namespace) -> int:
    vault = _vault(args)
    if not vault.remove(args.provider):
        raise KeyMissing(f"no key for provider '{args.provider}' in the vault {vault.path}")
    print(f"removed the key for '{args.provider}' from {vault.path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the ``agentbox`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AgentboxError as exc:
        print(f"agentbox: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("agentbox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
