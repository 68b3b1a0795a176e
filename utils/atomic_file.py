"""Files written whole or not at all: checkpoints, exported models, inference outputs."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from utils.names import NAME_MAX, fit_file_name

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".partial") -> Iterator[Path]:
    """A name beside ``path`` (``<name><suffix>``) to write the file to; it is renamed onto ``path``
    when the block ends without an error, and removed otherwise (an error, Ctrl-C). A write that
    stops part-way (a full disk, a kill between the two) so leaves no truncated file under
    ``path``, and an earlier file of that name stays whole. The file is created with the usual
    permissions (``0o666`` less the umask). A name too long for the suffix (file names take 255
    bytes) is cut before it, with a hash of the whole name so that two such files stay apart."""
    path = Path(path)
    partial = path.with_name(fit_file_name(path.name, NAME_MAX - len(os.fsencode(suffix))) + suffix)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # after a failure (gone already after the rename)

