"""Reading the project's small text files (label files, prediction files) with errors that point
at the offending byte. No heavy imports: ``test.py --pred_dir`` uses it without torch."""
from __future__ import annotations

import os
from pathlib import Path


class NotUtf8Error(ValueError):
    """A text file holds a byte sequence that is not UTF-8; ``str(err)`` is
    ``<file>:<line>: not UTF-8 text (byte 0xNN at column C)``."""

    def __init__(self, file: str | os.PathLike[str], line: int, reason: str) -> None:
        self.file, self.line, self.reason = str(file), line, reason
        super().__init__(f"{self.file}:{line}: {reason}")


def read_utf8(path: str | os.PathLike[str]) -> str:
    """The file as text (UTF-8, a leading byte-order mark dropped); raises :class:`NotUtf8Error`
    naming the line and column (1-based) of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise NotUtf8Error(path, line, f"not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})") from None
