"""Image names as one line of text, for results files, warnings and summaries: a file name may
hold a line break, which would otherwise split a line in two."""
from __future__ import annotations

import re

__all__ = ["escape_name", "unescape_name"]

_LINE_BREAKS = re.compile(r"[\\\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def escape_name(name: str) -> str:
    """``name`` as one line of text: unchanged unless it holds a line break (any character
    ``str.splitlines`` splits at) or starts with a backslash; then the line starts with ``\\``,
    backslashes are doubled and the breaks are written ``\\n``, ``\\r`` or ``\\xHH`` / ``\\uHHHH``
    (like ``sha256sum`` writes such names). :func:`unescape_name` reverses it."""
    if not name.startswith("\\") and not any(ch != "\\" for ch in _LINE_BREAKS.findall(name)):
        return name
    named = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}

    def code(character: str) -> str:
        return f"\\x{ord(character):02x}" if ord(character) < 256 else f"\\u{ord(character):04x}"

    return "\\" + _LINE_BREAKS.sub(lambda m: named.get(m.group()) or code(m.group()), name)


def unescape_name(line: str) -> str:
    """The image name written as ``line`` by :func:`escape_name`."""
    if not line.startswith("\\"):
        return line
    return re.sub(r"\\(\\|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})",
                  lambda m: {"\\": "\\", "n": "\n", "r": "\r"}.get(m.group(1)) or chr(int(m.group(1)[1:], 16)),
                  line[1:])
