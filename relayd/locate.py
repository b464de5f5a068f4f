"""Where relayd finds its config file, its state directory and its admin key.

Each ``find_*`` function takes the environment and the command-line values as
arguments (no globals), applies the documented order, and says where the
answer came from so that the log can tell the operator.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relayd.config import DEFAULT_CONFIG_PATH, Config, ConfigError, read_problem
from relayd.users import atomic_write, secret_digest

__all__ = [
    "AdminKey",
    "AdminKeyError",
    "find_admin_key",
    "find_config_path",
    "find_state_dir",
    "is_system_install",
    "prepare_state_dir",
]

ADMIN_KEY_FILE = "admin_key"


class AdminKeyError(Exception):
    """The admin key cannot be read or created; the message names the file."""


def find_config_path(
    cli_path: Path | None, environ: Mapping[str, str], default: Path = DEFAULT_CONFIG_PATH
) -> Path | None:
    """``--config``, ``$RELAYD_CONFIG``, the default file if it exists, else None (defaults)."""
    if cli_path is not None:
        return cli_path
    if environ.get("RELAYD_CONFIG"):
        return Path(environ["RELAYD_CONFIG"])
    if default.exists():
        return default
    return None


# The service's state directory (packaging/systemd/relayd.service: StateDirectory=relayd).
SERVICE_STATE_DIR = Path("/var/lib/relayd")


def find_state_dir(
    cli_dir: Path | None,
    config: Config,
    environ: Mapping[str, str],
    *,
    system_install: bool = False,
) -> Path:
    """The first of: ``--state-dir``, ``$RELAYD_STATE_DIR``, ``server.state_dir``,
    ``$STATE_DIRECTORY`` (systemd; the first if it lists several), then
    :data:`SERVICE_STATE_DIR` for root on a system install (``system_install``:
    the config in use is ``/etc/relayd/relayd.toml``, so ``sudo relayd users
    add`` writes where the service reads), ``$XDG_STATE_HOME/relayd``,
    ``~/.local/state/relayd``."""
    if cli_dir is not None:
        return cli_dir
    if environ.get("RELAYD_STATE_DIR"):
        return Path(environ["RELAYD_STATE_DIR"])
    if config.server.state_dir is not None:
        return config.server.state_dir
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if system_install:
        return SERVICE_STATE_DIR
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "relayd"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "relayd"


def is_system_install(config_path: Path | None, euid: int) -> bool:
    """Root using the system config: the CLI then shares the service's state."""
    return euid == 0 and config_path == DEFAULT_CONFIG_PATH


def prepare_state_dir(path: Path) -> None:
    """Create the state directory (mode 0700) if it is missing.

    Raises ConfigError naming the directory if it cannot be created or used.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the state directory: {error.strerror}", source=str(path)
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("the state directory is not writable", source=str(path))


@dataclass(frozen=True)
class AdminKey:
    """The admin key, kept only as a digest, with where it came from."""

    digest: bytes = field(repr=False)
    source: str
    generated: str | None = field(default=None, repr=False)  # set only when created just now

    @classmethod
    def of(cls, key: str, source: str, *, generated: bool = False) -> AdminKey:
        return cls(secret_digest(key), source, key if generated else None)

    def verify(self, candidate: str) -> bool:
        """Constant-time: compares digests, so neither length nor prefix leaks."""
        return hmac.compare_digest(secret_digest(candidate), self.digest)


def _read_key_file(path: Path) -> str:
    try:
        key = path.read_text("utf-8").strip()
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or a NUL in the path
        raise AdminKeyError(f"{path}: cannot read the admin key: {read_problem(error)}") from None
    if not key:
        raise AdminKeyError(f"{path}: the admin key file is empty")
    return key


def _has_content(path: Path) -> bool:
    try:
        return bool(path.read_bytes().strip())
    except OSError:
        return False


def find_admin_key(
    config: Config,
    environ: Mapping[str, str],
    state_dir: Path,
    *,
    cli_key: str | None = None,
) -> AdminKey:
    """The first of: ``$RELAYD_ADMIN_KEY``, ``auth.admin_key_file``,
    ``$CREDENTIALS_DIRECTORY/admin_key``, the seed's positional argument,
    ``<state_dir>/admin_key`` (generated there, mode 0600, on first start).

    Raises AdminKeyError naming the file that could not be read or written.
    """
    if environ.get("RELAYD_ADMIN_KEY"):
        return AdminKey.of(environ["RELAYD_ADMIN_KEY"], "$RELAYD_ADMIN_KEY")
    if config.auth.admin_key_file is not None:
        path = config.auth.admin_key_file
        return AdminKey.of(_read_key_file(path), str(path))
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    # The unit gives the credential an empty fallback (SetCredential=), because
    # systemd 252 cannot make LoadCredential= optional: empty means "not set".
    if credentials and _has_content(Path(credentials) / ADMIN_KEY_FILE):
        path = Path(credentials) / ADMIN_KEY_FILE
        return AdminKey.of(_read_key_file(path), f"credential {ADMIN_KEY_FILE} ({path})")
    if cli_key:
        return AdminKey.of(cli_key, "the command line")
    path = state_dir / ADMIN_KEY_FILE
    if path.exists():
        return AdminKey.of(_read_key_file(path), str(path))
    key = secrets.token_urlsafe(32)
    try:
        atomic_write(path, (key + "\n").encode())
    except OSError as error:
        raise AdminKeyError(f"{path}: cannot write a new admin key: {error.strerror}") from None
    return AdminKey.of(key, str(path), generated=True)
