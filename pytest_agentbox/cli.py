"""The ``agentbox`` command line: ``keys add|list|remove``, ``image build``, ``gc``, ``state``.

Each group registers itself on the shared ``subparsers`` object in :func:`build_parser`
and each command is one ``_cmd_<group>_<command>(args) -> int`` function. Errors the
tool raises on purpose (:class:`AgentboxError`) become one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pytest_agentbox.errors import AgentboxError, KeyMissing, VaultError
from pytest_agentbox.sandbox import DEFAULT_IMAGE
from pytest_agentbox.vault import Vault, validate_provider

EXIT_OK = 0
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; add a command group with one ``_add_<group>_group`` call."""
    parser = argparse.ArgumentParser(
        prog="agentbox", description="Manage pytest-agentbox keys, images and state."
    )
    subparsers = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    _add_keys_group(subparsers)
    _add_image_group(subparsers)
    _add_gc_group(subparsers)
    _add_state_group(subparsers)
    return parser


def _add_image_group(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = subparsers.add_parser("image", help="build the sandbox base image")
    cmds = image.add_subparsers(dest="command", metavar="COMMAND", required=True)
    build = cmds.add_parser(
        "build", help="debootstrap a Debian base image and docker import it (no registry needed)"
    )
    build.add_argument(
        "--tag", default=None, help=f"image tag (default: $AGENTBOX_IMAGE, else {DEFAULT_IMAGE})"
    )
    build.add_argument(
        "--engine", default=None, metavar="URL",
        help="the engine to provision (unix://, tcp://host:port[#certs=DIR], ssh://; "
        "default: the environment's, DOCKER_HOST)",
    )  # fmt: skip
    build.add_argument(
        "--copy-from", default=None, metavar="URL",
        help="copy the tag from this engine (docker save | docker load through the API, "
        "no registry, no debootstrap) instead of building it",
    )  # fmt: skip
    build.set_defaults(func=_cmd_image_build)


def _add_gc_group(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gc = subparsers.add_parser(
        "gc", help="remove sandboxes, networks and volumes that crashed runs left behind"
    )
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.add_argument(
        "--engine", action="append", default=None, metavar="URL",
        help="an engine to clean (repeatable; default: $AGENTBOX_ENGINES, else the "
        "environment's engine)",
    )  # fmt: skip
    gc.set_defaults(func=_cmd_gc)


def _add_state_group(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dir_opt = argparse.ArgumentParser(add_help=False)
    dir_opt.add_argument(
        "--state-dir", type=Path, default=None, metavar="DIR",
        help="state store (default: $AGENTBOX_STATE_DIR, else .pytest_cache/agentbox/state)",
    )  # fmt: skip
    state = subparsers.add_parser("state", help="list or clear persisted sandbox state")
    cmds = state.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmds.add_parser("list", parents=[dir_opt], help="list stored states").set_defaults(
        func=_cmd_state_list
    )
    clear = cmds.add_parser("clear", parents=[dir_opt], help="delete one state, or all")
    clear.add_argument("scope", nargs="?", help="e.g. research-assistant/memory (default: all)")
    clear.set_defaults(func=_cmd_state_clear)


def _cmd_image_build(args: argparse.Namespace) -> int:
    from pytest_agentbox.backends.docker import engine

    tag = args.tag or _setting("image") or DEFAULT_IMAGE
    target = _engine(args.engine) if args.engine else engine.environment_engine()
    if args.copy_from:
        _copy_image(tag, _engine(args.copy_from), target)
        return EXIT_OK
    script = Path(__file__).parent / "build-base-image.sh"
    # The script's `docker import` goes to the target engine, as the docker CLI would.
    env = {**os.environ, **target.cli_env()}
    # Progress goes straight to the terminal: a debootstrap takes minutes.
    return subprocess.call(["bash", str(script), tag], env=env)


def _engine(url: str) -> Any:
    from pytest_agentbox.backends.docker import engine

    try:
        return engine.parse_engine_url(url)
    except ValueError as exc:
        raise AgentboxError(f"--engine / --copy-from: {exc}") from None


def _copy_image(tag: str, source: Any, target: Any) -> None:
    """``docker save TAG | docker load`` between two engines, streamed through the API."""
    from pytest_agentbox.backends.docker.box import DockerBackend

    src = DockerBackend(source)  # the source is asked first, as before the seam
    DockerBackend(target).copy_image_from(src, tag)


def _cmd_gc(args: argparse.Namespace) -> int:
    from pytest_agentbox.backends.base import backend_for
    from pytest_agentbox.backends.docker import engine
    from pytest_agentbox.errors import DockerUnavailable

    urls = args.engine or _setting("engine")
    specs = [_engine(u) for u in urls] if urls else [engine.environment_engine()]
    verb = "would remove" if args.dry_run else "removed"
    status = EXIT_OK
    for spec in specs:
        where = f" on {spec.text}" if len(specs) > 1 or not spec.from_environment else ""
        try:
            backend = backend_for(None if spec.from_environment else spec.text)
            leaked = backend.clean_up_dead_owners(dry_run=args.dry_run)
        except DockerUnavailable as exc:  # the other engines are still cleaned
            print(f"agentbox: error: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        for item in leaked:
            print(f"{verb} {item.kind} {item.name}{where} (owner pid {item.owner} is gone)")
        print(f"{verb} {len(leaked)} leaked object(s){where}")
    return status


def _cmd_state_list(args: argparse.Namespace) -> int:
    from pytest_agentbox.state import StateStore

    state_dir = _state_dir(args)
    infos = StateStore(state_dir).list()
    for info in infos:
        print(f"{info.scope}\t{info.members} members\t{info.size} bytes")
    if not infos:
        print(f"no stored state in {state_dir}")
    return EXIT_OK


def _cmd_state_clear(args: argparse.Namespace) -> int:
    from pytest_agentbox.state import StateStore

    n = StateStore(_state_dir(args)).clear(args.scope)
    print(f"removed {n} stored state(s)")
    return EXIT_OK


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


def _setting(name: str) -> Any:
    """An option as the pytest plugin would read it, without an ini file: env > default.

    A bad value is an OptionError (an AgentboxError): one line on stderr, exit 2.
    """
    from pytest_agentbox.plugin.options import resolve

    return resolve(cwd=Path.cwd(), names=[name]).get(name)


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir)
    return Path(_setting("state-dir") or ".pytest_cache/agentbox/state")


def _vault(args: argparse.Namespace) -> Vault:
    if args.vault is not None:
        return Vault(args.vault)
    return Vault(_setting("vault") or Vault.default_path())


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
