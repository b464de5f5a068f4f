"""The ``relayd`` command: argument parsing and exit codes.

This is the only module that calls ``sys.exit``. Exit codes: 0 success, 1 an
error the operator must fix (config, state, address in use), 2 a usage error.

Forms::

    relayd [serve] [--config PATH] [--listen ADDR]... [--state-dir DIR]
    relayd PORT ADMIN_KEY [-listen ADDR]        (ChatGPT-API-server's form)
    relayd check-config [--config PATH]
    relayd users add [--name NAME] | list | delete USER_ID
    relayd import-seed-db PATH/auth.db
    relayd bench [--scenario NAME] ...        (see relayd/bench)
    relayd agent --relay URL (--backend URL | --echo) ...   (see relayd/agent)
    relayd --version
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import trio

from relayd import __version__, logs
from relayd.config import (
    LOG_LEVELS,
    Config,
    ConfigError,
    listen_address_problem,
    load_config,
    plural,
)
from relayd.errors import leaf_exceptions
from relayd.locate import (
    AdminKeyError,
    find_admin_key,
    find_config_path,
    find_state_dir,
    is_system_install,
    prepare_state_dir,
)
from relayd.state import Snapshot, load_agent_keys
from relayd.tls import find_tls_files, tls_context
from relayd.users import UserStore, UserStoreError

if TYPE_CHECKING:
    from relayd.daemon import Daemon

__all__ = ["main"]

log = logging.getLogger("relayd")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print(f"relayd: {message}", file=sys.stderr)
    sys.exit(code)


def _default_state_dir(environ: dict[str, str], config_arg: Path | None = None) -> str:
    """The state directory relayd would use with no --state-dir, for --help."""
    try:
        config = load_config(find_config_path(config_arg, environ))
    except ConfigError:
        return "see docs/configuration.md (the config file has an error)"
    return str(_state_dir(None, config, environ))


def build_parser(
    environ: dict[str, str] | None = None, arguments: Sequence[str] = ()
) -> argparse.ArgumentParser:
    state_default = _default_state_dir(
        dict(os.environ) if environ is None else environ, _config_argument(arguments)
    )
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Relay HTTP API requests to WebSocket agents (ChatGPT-API-server compatible).",
        usage=(
            "relayd [COMMAND] [--config PATH] [--listen ADDR]... [--state-dir DIR]\n"
            f"       {SEED_USAGE}   (ChatGPT-API-server's form)"
        ),
        epilog="With no command, relayd serves. See README.md and docs/ for the configuration.",
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", prog="relayd")

    def common(sub: argparse.ArgumentParser, *, state: bool = True, default: object = None) -> None:
        sub.add_argument(
            "--config",
            type=Path,
            default=default,
            metavar="PATH",
            help="config file (default: $RELAYD_CONFIG, /etc/relayd/relayd.toml, else built-in)",
        )
        if state:
            sub.add_argument(
                "--state-dir",
                type=Path,
                default=default,
                metavar="DIR",
                help=f"where users.toml and the admin key live (default here: {state_default})",
            )

    serve = commands.add_parser("serve", help="run the daemon (the default)")
    common(serve)
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="host:port, [v6]:port, unix:/path or fd://N; repeatable; overrides server.listen",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)}; overrides server.log_level, also on reload",
    )

    check = commands.add_parser("check-config", help="validate the config file and exit")
    common(check, state=False)

    users = commands.add_parser("users", help="manage user tokens in the users file")
    common(users)
    users_commands = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = users_commands.add_parser("add", help="create a user and print its token once")
    add.add_argument("--name", help="a label for the user")
    add.add_argument("--json", action="store_true", help="print JSON")
    listing = users_commands.add_parser("list", help="list users (never their tokens)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    delete = users_commands.add_parser("delete", help="delete a user")
    delete.add_argument("user_id")
    for action in (add, listing, delete):
        # Also after the action (`relayd users add --state-dir DIR`); SUPPRESS keeps
        # a value given before the action when none is given after it.
        common(action, default=argparse.SUPPRESS)

    commands.add_parser(
        "bench",
        help="measure what this machine's relay can carry (relayd bench --help)",
        add_help=False,
    )
    commands.add_parser(
        "agent",
        help="bring an OpenAI-compatible backend online at a relay (relayd agent --help)",
        add_help=False,
    )

    seed = commands.add_parser(
        "import-seed-db", help="import users and tokens from ChatGPT-API-server's Data/auth.db"
    )
    common(seed)
    seed.add_argument("database", type=Path, metavar="PATH/auth.db")
    return parser


def _config_argument(arguments: Sequence[str]) -> Path | None:
    """The value of ``--config`` in ``arguments``, for --help's defaults."""
    for index, argument in enumerate(arguments):
        if argument == "--config" and index + 1 < len(arguments):
            return Path(arguments[index + 1])
        if argument.startswith("--config="):
            return Path(argument.removeprefix("--config="))
    return None


SEED_USAGE = "relayd PORT ADMIN_KEY [-listen HOST]"


def _seed_arguments(argv: list[str]) -> argparse.Namespace | None:
    """ChatGPT-API-server's ``PORT ADMIN_KEY [-listen HOST]``, or None if not that form.

    As with the Go flag package it came from, ``-listen HOST``, ``-listen=HOST``
    and the double-dash spellings are all accepted; the port is always the
    first argument, so ``-listen`` takes a host alone.
    """
    if not argv or not argv[0].isdigit():
        return None
    parser = argparse.ArgumentParser(prog="relayd", usage=SEED_USAGE)
    parser.add_argument("port", type=int)
    parser.add_argument("admin_key")
    parser.add_argument("-listen", "--listen", metavar="HOST", default="127.0.0.1")
    parser.add_argument("--config", type=Path, metavar="PATH")
    parser.add_argument("--state-dir", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"port must be 1-65535, got {args.port}")
    host = args.listen
    problem = _seed_host_problem(host)
    if problem:
        parser.error(f"-listen takes a host, the port being the first argument: {problem}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    args.command = "serve"
    args.listen = [f"{host}:{args.port}"]
    return args


def _seed_host_problem(host: str) -> str | None:
    """Why ``host`` is not a host for ``-listen`` (a host:port, say), or None."""
    if not host:
        return "got an empty host"
    if host.startswith("["):
        if host.endswith("]") and host.count("]") == 1:
            return None
        return f"got {host!r}; write -listen {host.partition(']')[0]}] and the port first"
    if host.startswith("unix:"):
        return f"got {host!r}; for a Unix socket use relayd serve --listen {host}"
    if host.count(":") == 1:  # one colon: host:port (an IPv6 address has several)
        name, _, port = host.partition(":")
        # Go's ":8093" is every interface.
        return (
            f"got {host!r}; did you mean relayd {port or 'PORT'} ADMIN_KEY "
            f"-listen {name or '0.0.0.0'}?"
        )
    if any(character.isspace() or character in "/?#" for character in host):
        return f"got {host!r}"
    return None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] == "bench":
        # The benchmark has its own parser (and imports the load generator lazily).
        from relayd.bench import main as bench_main

        sys.exit(bench_main(arguments[1:]))
    if arguments and arguments[0] == "agent":
        # The reference agent has its own parser (and loads the openai SDK lazily).
        from relayd.agent import main as agent_main

        sys.exit(agent_main(arguments[1:]))
    args = _seed_arguments(arguments)
    seed_key: str | None = None
    if args is not None:
        seed_key = args.admin_key
    else:
        if not arguments or (
            arguments[0].startswith("-")
            and arguments[0]
            not in (
                "-h",
                "--help",
                "--version",
            )
        ):
            arguments.insert(0, "serve")
        args = build_parser(arguments=arguments).parse_args(arguments)
        if args.command is None:
            args = build_parser(arguments=arguments).parse_args(["serve", *arguments])
    environ = dict(os.environ)
    handlers = {
        "serve": lambda: serve(args, environ, seed_key),
        "check-config": lambda: check_config(args, environ),
        "users": lambda: users_command(args, environ),
        "import-seed-db": lambda: import_seed_db(args, environ),
    }
    sys.exit(handlers[args.command]())


# -- shared start-up -----------------------------------------------------------------


def _load(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    """The config with command-line overrides; exits 1 with the error."""
    path = find_config_path(getattr(args, "config", None), environ)
    try:
        config = load_config(path)
    except ConfigError as error:
        _fail(str(error))
    listen = getattr(args, "listen", None)
    if listen:
        for address in listen:
            problem = listen_address_problem(address)
            if problem:
                _fail(f"--listen: expected {problem}", EXIT_USAGE)
        config = config.replace_server(listen=tuple(listen))
    if getattr(args, "log_level", None):
        config = config.replace_server(log_level=args.log_level)
    return config


def _state_dir(args: argparse.Namespace | None, config: Config, environ: dict[str, str]) -> Path:
    config_path = find_config_path(getattr(args, "config", None), environ)
    return find_state_dir(
        getattr(args, "state_dir", None),
        config,
        environ,
        system_install=is_system_install(config_path, os.geteuid()),
    )


def _store(args: argparse.Namespace, config: Config, environ: dict[str, str]) -> UserStore:
    state_dir = _state_dir(args, config, environ)
    try:
        prepare_state_dir(state_dir)
    except ConfigError as error:
        _fail(str(error))
    return UserStore(state_dir)


# -- commands ------------------------------------------------------------------------


def serve(args: argparse.Namespace, environ: dict[str, str], seed_key: str | None) -> int:
    # Imported here so that `relayd users ...` does not pay for Hypercorn and Quart.
    from relayd.daemon import Daemon, assemble
    from relayd.systemd import Notifier
    from relayd.tls import TlsTerms

    config = _load(args, environ)
    logs.setup_logging(config.server.log_level)
    store = _store(args, config, environ)
    try:
        users = store.load()
        agent_keys = load_agent_keys(config)
        if seed_key:
            log.warning(
                "the admin key was given on the command line, where `ps` shows it to "
                "every user; prefer $RELAYD_ADMIN_KEY or auth.admin_key_file"
            )
        admin = find_admin_key(config, environ, store.path.parent, cli_key=seed_key)
    except (UserStoreError, ConfigError, AdminKeyError) as error:
        log.error("%s", error)
        return EXIT_ERROR
    log.info("relayd %s starting: %s", __version__, config.summary())
    log.info("state directory %s: %s", store.path.parent, plural(len(users), "user"))
    if admin.generated is not None:
        log.warning("generated a new admin key in %s (mode 0600)", admin.source)
        if sys.stderr.isatty():
            print(f"\n  admin key (shown once): {admin.generated}\n", file=sys.stderr)
    else:
        log.info("admin key from %s", admin.source)
    if not agent_keys and not config.agents.allow_loopback_without_key:
        log.warning(
            "no agent keys and agents.allow_loopback_without_key is false: no agent can connect"
        )
    elif not agent_keys:
        log.info("no agent keys configured: only agents on loopback can connect")
    config_path = find_config_path(getattr(args, "config", None), environ)
    state, heartbeat = assemble(
        Snapshot(config, users, agent_keys),
        admin=admin,
        store=store,
        state_dir=store.path.parent,
        config_path=config_path,
    )

    def reload_config() -> Config:
        fresh = load_config(config_path)
        if args.listen:
            fresh = fresh.replace_server(listen=tuple(args.listen))
        if getattr(args, "log_level", None):
            fresh = fresh.replace_server(log_level=args.log_level)
        return fresh

    tls: TlsTerms | None = None
    try:
        files = find_tls_files(config, environ)
        if files is not None:
            tls = TlsTerms(files)
            log.info("TLS: certificate from %s: %s", files.source, files.certificate)
    except ConfigError as error:
        log.error("%s", error)
        return EXIT_ERROR
    notifier = Notifier.from_environ(environ, unset_environment=True)
    daemon = Daemon(state, heartbeat, reload_config, notifier, environ, tls=tls)
    try:
        return _run_daemon(daemon)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        notifier.close()


def _run_daemon(daemon: Daemon) -> int:
    """Run the daemon; an OS error from binding comes out of the nurseries in a group."""
    failed = False
    try:
        trio.run(daemon.run)
    except* OSError as group:
        for error in leaf_exceptions(group):
            log.error("cannot serve: %s", error)
        failed = True
    return EXIT_ERROR if failed else EXIT_OK


def check_config(args: argparse.Namespace, environ: dict[str, str]) -> int:
    config = _load(args, environ)
    try:
        load_agent_keys(config)
        files = find_tls_files(config, environ)
        if files is not None:
            tls_context(files)  # the pair loads
    except ConfigError as error:
        _fail(str(error))
    print(f"relayd: configuration OK: {config.summary()}")
    return EXIT_OK


def users_command(args: argparse.Namespace, environ: dict[str, str]) -> int:
    config = _load(args, environ)
    store = _store(args, config, environ)
    try:
        if args.users_command == "add":
            user, token, _ = store.add(args.name)
            if args.json:
                print(json.dumps({"user_id": user.user_id, "name": user.name, "token": token}))
            else:
                print(f"user_id: {user.user_id}")
                print(f"token:   {token}")
                print(
                    "The token is shown only now. A running relayd picks the user up on "
                    "`systemctl reload relayd` (SIGHUP).",
                    file=sys.stderr,
                )
        elif args.users_command == "list":
            table = store.load()
            if args.json:
                print(json.dumps({"users": [user.public() for user in table.users]}))
            else:
                for user in table.users:
                    public = user.public()
                    print(
                        f"{public['user_id']}  {public['created']}  {public['name'] or ''}".rstrip()
                    )
                print(f"{len(table)} users in {store.path}", file=sys.stderr)
        elif args.users_command == "delete":
            if store.delete(args.user_id) is None:
                _fail(f"no user {args.user_id} in {store.path}")
            print(f"deleted {args.user_id}; reload relayd (SIGHUP) to apply")
    except UserStoreError as error:
        _fail(str(error))
    return EXIT_OK


def import_seed_db(args: argparse.Namespace, environ: dict[str, str]) -> int:
    config = _load(args, environ)
    store = _store(args, config, environ)
    path: Path = args.database
    if not path.is_file():
        _fail(f"{path}: no such file")
    try:
        # As a file: URI (escaped: "#", "?" and "%" are legal in a path), read-only.
        connection = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            rows = connection.execute("SELECT user_id, token FROM tokens").fetchall()
        finally:
            connection.close()
    except sqlite3.Error as error:
        _fail(f"{path}: cannot read the seed's tokens table: {error}")
    pairs = []
    for user_id, token in rows:
        if isinstance(user_id, str) and isinstance(token, str) and user_id and token:
            pairs.append((user_id, token))
    bad = len(rows) - len(pairs)
    try:
        imported, skipped, _ = store.import_tokens(pairs)
    except UserStoreError as error:
        _fail(str(error))
    print(
        f"imported {imported} users, skipped {skipped} already present"
        + (f", ignored {bad} malformed rows" if bad else "")
        + f" into {store.path}"
    )
    return EXIT_OK
