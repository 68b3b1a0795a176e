"""Image names as one line of text, for results files, warnings and summaries: a file name may
hold a line break, which would otherwise split a line in two, or bytes that are not UTF-8 (which
Python holds as lone surrogates, characters no UTF-8 text can encode)."""
from __future__ import annotations

import hashlib
import os
import re

__all__ = ["NAME_MAX", "escape_name", "fit_file_name", "unescape_name"]

#: bytes of a file name most file systems take (ext4, XFS, APFS; NTFS counts UTF-16 units)
NAME_MAX = 255

#: what is escaped: line breaks and the surrogates ``os.fsdecode`` gives each byte of a file name that is
#: not UTF-8 (``"caf\\udce9.jpg"`` for the Latin-1 name ``b"caf\\xe9.jpg"``)
_ESCAPED = re.compile(r"[\\\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\udc80-\udcff]")


def escape_name(name: str) -> str:
    """``name`` as one line of text that UTF-8 can encode: unchanged unless it holds a line break
    (any character ``str.splitlines`` splits at), a byte that is not UTF-8 (a lone surrogate) or
    starts with a backslash; then the line starts with ``\\``, backslashes are doubled, the breaks
    are written ``\\n``, ``\\r`` or ``\\xHH`` / ``\\uHHHH`` (like ``sha256sum`` writes such names) and
    the surrogates ``\\udcHH``. :func:`unescape_name` reverses it."""
    if not name.startswith("\\") and not any(ch != "\\" for ch in _ESCAPED.findall(name)):
        return name
    named = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}

    def code(character: str) -> str:
        return f"\\x{ord(character):02x}" if ord(character) < 256 else f"\\u{ord(character):04x}"

    return "\\" + _ESCAPED.sub(lambda m: named.get(m.group()) or code(m.group()), name)


def unescape_name(line: str) -> str:
    """The image name written as ``line`` by :func:`escape_name`."""
    if not line.startswith("\\"):
        return line
    return re.sub(r"\\(\\|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})",
                  lambda m: {"\\": "\\", "n": "\n", "r": "\r"}.get(m.group(1)) or chr(int(m.group(1)[1:], 16)),
                  line[1:])


def fit_file_name(name: str, max_bytes: int, key: str | None = None) -> str:
    """``name`` if it takes at most ``max_bytes`` bytes (``os.fsencode``), else cut and ended by
    ``~`` and 8 hex digits of a hash of ``key`` (default: ``name``), so that two long names that
    share their start stay apart."""
    if len(os.fsencode(name)) <= max_bytes:
        return name
    digest = "~" + hashlib.sha1(os.fsencode(name if key is None else key)).hexdigest()[:8]
    while name and len(os.fsencode(name + digest)) > max_bytes:
        name = name[:-1]
    return name + digest
