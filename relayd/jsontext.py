"""Strings that JSON can carry and Unicode cannot.

JSON's ``\\uXXXX`` escapes can spell a lone surrogate (``"\\ud800"``): valid
JSON, and Python decodes it into a ``str``, but not Unicode, so encoding it
as UTF-8 raises. Everything relayd receives as JSON (client bodies, agent
frames) is checked here once, where it arrives; past that point every string
is known to encode. Pure functions, no I/O.
"""

from __future__ import annotations

import re

__all__ = ["may_hold_surrogate", "unencodable_string"]

# A \uD800-\uDFFF escape; only a body with one can hold a string that is not Unicode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def unencodable_string(value: object, where: str = "the body") -> str | None:
    """Where in a decoded JSON document a string cannot be encoded as UTF-8, or None.

    Keys are checked as well as values; ``where`` names the place for the message
    (``field 'content'``, ``field 'messages'[2]``).
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"field {key!r}" if where == "the body" else f"{where}[{key!r}]"
            problem = unencodable_string(key, f"a field name in {where}")
            if problem is None:
                problem = unencodable_string(item, name)
            if problem is not None:
                return problem
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = unencodable_string(item, f"{where}[{index}]")
            if problem is not None:
                return problem
    return None


def may_hold_surrogate(json_text: str) -> bool:
    """Whether JSON text could decode to a lone surrogate: cheap, so that only
    such text pays for :func:`unencodable_string`'s walk."""
    return _SURROGATE_ESCAPE.search(json_text) is not None
