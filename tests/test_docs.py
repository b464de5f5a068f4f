"""The README and docs/ stay true to the code and to each other.

What is checked: the configuration page lists exactly the keys of
``relayd.config.SCHEMA``; the module map in docs/internals.md names exactly the
modules under relayd/; the README stays short and opens with the two
first-screen commands; every relative link in the README and docs/ points at a
file that exists, and the README links every page of docs/.
"""

from __future__ import annotations

import re
from pathlib import Path

from relayd.config import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# The README's first-screen commands, verbatim: one installs and starts relayd on
# its embedded defaults, one installs and runs the tests (what .ci/run runs).
START_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/relayd"
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m tests"
)
README_MAX_LINES = 220
FIRST_SCREEN_LINES = 25

# A table row whose first cell is one backticked name: "| `server.listen` | ...".
_FIRST_CELL = re.compile(r"^\|\s*`([^`]+)`\s*\|")
_CONFIG_KEY = re.compile(r"[a-z_]+\.[a-z0-9_]+")
_MODULE_PATH = re.compile(r"relayd/(?:[a-z0-9_]+/)*[a-z0-9_]+\.py")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`[^`]*`")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _first_cells(lines: list[str]) -> list[str]:
    return [match[1] for line in lines if (match := _FIRST_CELL.match(line.strip()))]


def _section(text: str, heading: str) -> list[str]:
    """The prose lines under ``## heading``, up to the next heading of that level."""
    lines = _prose_lines(text)
    start = lines.index(f"## {heading}") + 1
    end = next(
        (i for i in range(start, len(lines)) if lines[i].startswith("## ")),
        len(lines),
    )
    return lines[start:end]


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_configuration_page_lists_exactly_the_schema_keys() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    listed = [cell for cell in _first_cells(_prose_lines(text)) if _CONFIG_KEY.fullmatch(cell)]
    schema = {f"{section}.{name}" for section, keys in SCHEMA.items() for name in keys}
    assert len(listed) == len(set(listed)), "a key is listed twice"
    assert set(listed) - schema == set(), "listed in docs/configuration.md but not in SCHEMA"
    assert schema - set(listed) == set(), "in SCHEMA but missing from docs/configuration.md"


def test_internals_module_map_names_exactly_the_modules() -> None:
    text = (DOCS / "internals.md").read_text(encoding="utf-8")
    cells = _first_cells(_section(text, "Module map"))
    named = [cell for cell in cells if _MODULE_PATH.fullmatch(cell)]
    assert named == cells, "every module map entry is written as relayd/x/y.py"
    assert len(named) == len(set(named)), "a module is named twice"
    present = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "relayd").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    required = {path for path in present if Path(path).name not in ("__init__.py", "__main__.py")}
    assert set(named) - present == set(), "named in docs/internals.md but not in relayd/"
    assert required - set(named) == set(), "in relayd/ but missing from docs/internals.md"


def test_readme_is_short_and_opens_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    first_screen = [line.strip() for line in lines[:FIRST_SCREEN_LINES]]
    assert START_COMMAND in first_screen
    assert TEST_COMMAND in first_screen


def _relative_links(path: Path) -> list[str]:
    links = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # https:, mailto:, ... and anchors within the page
            links.append(target)
    return links


def test_every_relative_link_points_at_an_existing_file() -> None:
    broken = []
    for doc in _doc_files():
        for target in _relative_links(doc):
            file_part = target.split("#", 1)[0]
            if not (doc.parent / file_part).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_readme_links_every_page_of_docs() -> None:
    targets = [target.split("#", 1)[0] for target in _relative_links(README)]
    linked = {(README.parent / target).resolve() for target in targets}
    pages = {page.resolve() for page in DOCS.glob("*.md")}
    assert pages - linked == set()
