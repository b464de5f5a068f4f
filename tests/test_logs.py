"""Tests for relayd.logs: the formats byte for byte, journald detection on real files and fds.

`setup_logging` changes process-wide state (the root logger), so every test runs under the
`restore_logging` fixture, which puts the root and Hypercorn loggers back as they were.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
from hypercorn.config import Config

from relayd.logs import hypercorn_loggers, is_journal_stream, set_level, setup_logging

LOG = logging.getLogger("relayd.test")
HUMAN_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
)
JOURNAL_LINE = re.compile(r"^<[234567]>")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    hypercorn = [logging.getLogger(f"hypercorn.{name}") for name in ("error", "access")]
    hc = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in hypercorn]
    yield
    root.handlers[:], root.level = saved
    for lg, handlers, propagate, level in hc:
        lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level
    logging.captureWarnings(False)


def journal_env(stream: TextIO) -> dict[str, str]:
    """The environment systemd would set if ``stream`` were its journal stream."""
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def log_a_traceback() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        LOG.exception("agent %s crashed", "agent-3f2c")


def test_journald_format(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w+") as journal:
        setup_logging("debug", stream=journal, environ=journal_env(journal))
        LOG.debug("d")
        LOG.info("i %d", 1)
        LOG.warning("w")
        LOG.error("e")
        LOG.critical("c")
        log_a_traceback()
        journal.seek(0)
        lines = journal.read().splitlines()
    assert lines[:5] == [
        "<7>relayd.test: d",
        "<6>relayd.test: i 1",
        "<4>relayd.test: w",
        "<3>relayd.test: e",
        "<2>relayd.test: c",
    ]
    # The traceback keeps the error priority on every line, including the message's own
    # second line, or journald would file them at info.
    traceback = lines[5:]
    assert traceback[0] == "<3>relayd.test: agent agent-3f2c crashed"
    assert traceback[1] == "<3>Traceback (most recent call last):"
    assert traceback[-2:] == ["<3>RuntimeError: boom", "<3>second line"]
    assert all(line.startswith("<3>") for line in traceback)
    assert all(JOURNAL_LINE.match(line) for line in lines)


def test_human_format_when_journal_stream_names_another_file(tmp_path: Path) -> None:
    with open(tmp_path / "other", "w") as other, open(tmp_path / "out", "w+") as out:
        # JOURNAL_STREAM is inherited by children whose stderr may be anywhere.
        setup_logging("info", stream=out, environ=journal_env(other))
        LOG.warning("hello %s", "world")
        log_a_traceback()
        out.seek(0)
        lines = out.read().splitlines()
    assert HUMAN_LINE.match(lines[0])
    assert lines[0].endswith(" WARNING relayd.test: hello world")
    assert HUMAN_LINE.match(lines[1])
    assert lines[1].endswith(" ERROR relayd.test: agent agent-3f2c crashed")
    assert lines[2] == "Traceback (most recent call last):"
    assert not any(JOURNAL_LINE.match(line) for line in lines)
    assert "\x1b[" not in "".join(lines)  # a file is not a TTY


@pytest.mark.parametrize("value", ["", "1:", ":1", "a:b", "12", "1:2:3"])
def test_malformed_journal_stream_is_not_the_journal(tmp_path: Path, value: str) -> None:
    with open(tmp_path / "f", "w") as f:
        assert not is_journal_stream(f, {"JOURNAL_STREAM": value})
        assert is_journal_stream(f, journal_env(f))


def test_stream_without_fd_is_not_the_journal() -> None:
    assert not is_journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "environ", "coloured"),
    [
        (FakeTty(), {}, True),
        (FakeTty(), {"NO_COLOR": "1"}, False),
        (FakeTty(), {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value counts
        (io.StringIO(), {}, False),
    ],
)
def test_colour_only_on_a_tty_without_no_color(
    stream: io.StringIO, environ: dict[str, str], coloured: bool
) -> None:
    setup_logging("info", stream=stream, environ=environ)
    LOG.error("message with no escapes")
    line = stream.getvalue()
    if coloured:
        assert " \x1b[31mERROR\x1b[0m relayd.test: message with no escapes\n" in line
        assert line.count("\x1b[") == 2  # the level name only
    else:
        assert "\x1b[" not in line
        assert HUMAN_LINE.match(line)


def test_colour_does_not_leak_into_other_handlers() -> None:
    tty, plain = FakeTty(), io.StringIO()
    setup_logging("info", stream=tty, environ={})
    other = logging.StreamHandler(plain)
    logging.getLogger().addHandler(other)
    LOG.warning("shared record")
    assert "\x1b[" in tty.getvalue()
    assert plain.getvalue() == "shared record\n"


def test_second_call_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", stream=first, environ={})
    setup_logging("info", stream=second, environ={})
    LOG.info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_RelaydHandler"]
    assert len(ours) == 1


def test_set_level_at_runtime() -> None:
    out = io.StringIO()
    setup_logging("WARNING", stream=out, environ={})
    LOG.info("hidden")
    set_level("Info")
    LOG.info("shown")
    set_level("error")
    LOG.warning("hidden again")
    assert "hidden" not in out.getvalue()
    assert "shown" in out.getvalue()


@pytest.mark.parametrize("bad", ["verbose", "", "warn", "10", "notset"])
def test_bad_level_raises_before_changing_anything(bad: str) -> None:
    root = logging.getLogger()
    before = root.handlers[:], root.level
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging(bad, stream=io.StringIO(), environ={})
    with pytest.raises(ValueError, match="debug, info, warning, error, critical"):
        set_level(bad)
    assert (root.handlers, root.level) == before


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[TextIO]:
    """A real file, opened outside the async test that writes to it (no blocking open there)."""
    with open(tmp_path / "journal", "w+") as file:
        yield file


async def test_hypercorn_logs_through_our_handler(journal: TextIO) -> None:
    # What Hypercorn's own defaults would leave behind: a private handler, no propagation.
    logging.getLogger("hypercorn.access").addHandler(logging.StreamHandler(sys.stdout))
    logging.getLogger("hypercorn.access").propagate = False
    setup_logging("info", stream=journal, environ=journal_env(journal))
    config = Config()
    config.errorlog, config.accesslog = hypercorn_loggers()
    assert config.log.error_logger is logging.getLogger("hypercorn.error")
    assert config.log.access_logger is logging.getLogger("hypercorn.access")
    assert logging.getLogger("hypercorn.access").handlers == []
    await config.log.warning("Running on %s", "fd://3")
    await config.log.debug("below the level")
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/health",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 5555),
    }
    await config.log.access(scope, {"status": 200, "headers": []}, 0.01)  # type: ignore[arg-type]
    set_level("warning")
    await config.log.access(scope, {"status": 200, "headers": []}, 0.01)  # type: ignore[arg-type]
    journal.seek(0)
    lines = journal.read().splitlines()
    assert lines[0] == "<4>hypercorn.error: Running on fd://3"
    assert lines[1].startswith("<6>hypercorn.access: 127.0.0.1:5555 - - [")
    assert lines[1].endswith('"GET /v1/health 1.1" 200 - "-" "-"')
    assert len(lines) == 2


CHILD = """
import logging, warnings
from relayd.logs import setup_logging
setup_logging("info")
log = logging.getLogger("relayd.child")
log.warning("disk %d%% full", 93)
try:
    1 / 0
except ZeroDivisionError:
    log.exception("request failed")
warnings.warn("old API", DeprecationWarning, stacklevel=1)
"""


@pytest.mark.parametrize("journal", [True, False])
def test_real_stderr_fd_in_a_subprocess(tmp_path: Path, journal: bool) -> None:
    """The real case: systemd connects fd 2 to the journal and sets JOURNAL_STREAM to match."""
    stderr_path, elsewhere = tmp_path / "stderr", tmp_path / "elsewhere"
    elsewhere.touch()
    with open(stderr_path, "w") as stderr:
        st = os.fstat(stderr.fileno()) if journal else os.stat(elsewhere)
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run(
            [sys.executable, "-W", "always", "-c", CHILD],
            stderr=stderr,
            env=env,
            check=True,
            timeout=60,
        )
    lines = stderr_path.read_text().splitlines()
    if journal:
        assert lines[0] == "<4>relayd.child: disk 93% full"
        assert lines[1] == "<3>relayd.child: request failed"
        assert lines[-1] == "<4>py.warnings: <string>:11: DeprecationWarning: old API"
        assert all(JOURNAL_LINE.match(line) for line in lines)
        assert "<3>ZeroDivisionError: division by zero" in lines
    else:
        assert HUMAN_LINE.match(lines[0])
        assert lines[0].endswith(" WARNING relayd.child: disk 93% full")
        assert not any(JOURNAL_LINE.match(line) for line in lines)
