"""packaging/systemd/relayd-agent.service: checked by systemd-analyze, installed by install.sh.

As tests/test_packaging.py does for relayd's units: ``verify`` must say nothing
about the unit (a misspelt key is only a warning, so a broken copy proves the
check can fail), ``security --offline=yes`` must rate it at most 2.0, and the
settings the agent's code relies on must be there. The credential fallback is
checked against the code: the unit's lone-newline credentials mean "no key".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from relayd.agent.config import AGENT_KEY_CREDENTIAL, BACKEND_KEY_CREDENTIAL, SCHEMA
from relayd.config import parse_duration
from relayd.stopping import HARD_STOP_MARGIN
from tests.support import console_script, service_environment
from tests.test_packaging import install_env, run_script, unit_settings, verify_problems

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "packaging" / "systemd" / "relayd-agent.service"
EXPOSURE_THRESHOLD = 2.0  # achieved 1.1 with systemd 252; see the top of the unit


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path is not None, "systemd-analyze is required to check the units (apt install systemd)"
    return path


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (None, None),
        (("ProtectClock=yes", "ProtectClocks=yes"), "Unknown key 'ProtectClocks'"),
        (("Type=notify", "Type=notifyish"), "Failed to parse service type"),
    ],
)
def test_systemd_analyze_verify(
    analyze: str, tmp_path: Path, edit: tuple[str, str] | None, problem: str | None
) -> None:
    text = UNIT.read_text()
    # verify wants ExecStart= executable; /usr/bin/relayd exists only once installed.
    text = text.replace("ExecStart=/usr/bin/relayd ", f"ExecStart={console_script()} ")
    if edit is not None:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1])
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    problems = verify_problems(analyze, unit)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in line for line in problems), problems


def test_security_exposure(analyze: str) -> None:
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    match = re.search(
        r"Overall exposure level for relayd-agent\.service: (\d+\.\d+)", result.stdout
    )
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= EXPOSURE_THRESHOLD, result.stdout


def test_the_unit_keeps_its_contract_with_the_code() -> None:
    settings = unit_settings(UNIT.read_text())
    for required in [
        ("Type", "notify"),  # READY=1, STATUS=, WATCHDOG=1 (relayd.systemd)
        ("NotifyAccess", "main"),
        ("ExecStart", "/usr/bin/relayd agent --config /etc/relayd/agent.toml"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),  # SIGHUP: reload
        ("WatchdogSec", "30s"),
        ("KillMode", "mixed"),  # SIGTERM to the agent alone: it drains
        ("DynamicUser", "yes"),
        ("StateDirectory", "relayd-agent"),  # $STATE_DIRECTORY: find_state_dir
        ("StateDirectoryMode", "0700"),
        ("LoadCredential", f"{AGENT_KEY_CREDENTIAL}:/etc/relayd/agent_key"),
        ("SetCredential", f"{AGENT_KEY_CREDENTIAL}:\\n"),
        ("LoadCredential", f"{BACKEND_KEY_CREDENTIAL}:/etc/relayd/backend_key"),
        ("SetCredential", f"{BACKEND_KEY_CREDENTIAL}:\\n"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
    ]:
        assert required in settings, required
    # systemd's SIGKILL comes after the agent's own drain grace and hard stop.
    stop = parse_duration(dict(settings)["TimeoutStopSec"])
    grace = parse_duration(SCHEMA["drain_grace"].default)
    assert stop > grace + HARD_STOP_MARGIN


def test_the_units_credentials_read_as_the_code_expects(tmp_path: Path) -> None:
    """What systemd hands the agent when /etc/relayd/agent_key is absent (the
    fallback newline) is "no key"; when present, the key, named by its source."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in (AGENT_KEY_CREDENTIAL, BACKEND_KEY_CREDENTIAL):
        (credentials / name).write_text("\n")
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nrelay = "wss://relay.example.com"\nbackend = "http://h:1/v1"\n')
    env = {
        **service_environment(),
        "CREDENTIALS_DIRECTORY": str(credentials),
        "STATE_DIRECTORY": str(tmp_path / "state"),
    }
    command = [console_script(), "agent", "--config", str(config), "--check"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "agent key: none" in result.stdout and "backend key: none" in result.stdout
    (credentials / AGENT_KEY_CREDENTIAL).write_text("a-real-agent-key-0123456789\n")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert "agent key: credential agent_key" in result.stdout
    assert "a-real-agent-key" not in result.stdout + result.stderr


@pytest.mark.slow
def test_install_and_uninstall_carry_the_agent_unit(tmp_path: Path) -> None:
    config_src = tmp_path / "relayd.toml"
    config_src.write_text((ROOT / "etc" / "relayd.toml").read_text())
    root = tmp_path / "root"
    env = install_env(root, config_src, RELAYD_SKIP_PIP="1")
    out = run_script(ROOT / "packaging" / "install.sh", env).stdout
    installed = root / "etc/systemd/system/relayd-agent.service"
    assert installed.read_text() == UNIT.read_text()  # default paths: verbatim
    assert installed.stat().st_mode & 0o777 == 0o644
    assert "systemctl enable --now relayd-agent" in out
    (root / "var/lib/private/relayd-agent").mkdir(parents=True)  # what DynamicUser= makes
    run_script(ROOT / "packaging" / "uninstall.sh", env)
    assert not installed.exists()
    assert (root / "var/lib/private/relayd-agent").exists()  # kept without --purge
    run_script(ROOT / "packaging" / "uninstall.sh", env, "--purge")
    assert not (root / "var/lib/private/relayd-agent").exists()
    # Other paths are rewritten in the agent's unit too.
    custom = install_env(
        root, config_src, RELAYD_SKIP_PIP="1", RELAYD_BINDIR="/usr/local/bin",
        RELAYD_CONFDIR="/srv/relayd-etc",
    )  # fmt: skip
    run_script(ROOT / "packaging" / "install.sh", custom)
    settings = unit_settings(installed.read_text())
    assert ("ExecStart", "/usr/local/bin/relayd agent --config /srv/relayd-etc/agent.toml") in (
        settings
    )
    assert ("LoadCredential", "agent_key:/srv/relayd-etc/agent_key") in settings
