"""What native libraries (libjpeg inside OpenCV, MediaPipe) write to file descriptor 2, below
``sys.stderr``: captured around a short block, so that it can be read or filtered."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from typing import IO, Iterator

_process_file: tuple[int, IO[bytes]] | None = None  # (pid, temporary file), reused by this process
_in_use = False
# file descriptor 2 is one per process: captures in several threads take turns (re-entrant, for a
# nested block); interleaved, a thread would restore another's capture file as stderr for good
_turn = threading.RLock()
# a fork waits for another thread's capture to end (its child would start with stderr redirected
# and the turn taken for good); the forking thread's own capture goes on in the child
os.register_at_fork(before=_turn.acquire, after_in_parent=_turn.release, after_in_child=_turn.release)


def _reusable_file() -> IO[bytes]:
    """This process's capture file (not inherited: forked DataLoader workers would share its
    offset)."""
    global _process_file
    if _process_file is None or _process_file[0] != os.getpid():
        _process_file = (os.getpid(), tempfile.TemporaryFile())
    return _process_file[1]


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """Inside the block, file descriptor 2 goes to a temporary file; when the block ends (also by
    an exception) the lines written there, by Python or native code, fill the yielded list and
    none reaches the real stderr. Keep the block short: the process's other threads write there
    too. One file per process is reused (no file is opened per call); a nested block gets its own.
    Blocks in several threads take turns.
    """
    with _turn:
        with _captured() as lines:
            yield lines


@contextlib.contextmanager
def _captured() -> Iterator[list[str]]:
    global _in_use
    lines: list[str] = []
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to capture
        yield lines
        return
    nested = _in_use
    capture = tempfile.TemporaryFile() if nested else _reusable_file()
    _in_use = True
    os.dup2(capture.fileno(), 2)
    try:
        yield lines
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        _in_use = nested
        fd = capture.fileno()  # file-descriptor calls: a Python file object would not see the native writes
        size = os.lseek(fd, 0, os.SEEK_END)
        if size:
            lines.extend(os.pread(fd, size, 0).decode(errors="replace").splitlines())
        if nested:
            capture.close()
        else:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)


@contextlib.contextmanager
def native_stderr_filtered(harmless: re.Pattern[str]) -> Iterator[None]:
    """Inside the block, file descriptor 2 is captured (:func:`captured_native_stderr`);
    afterwards every line of it that does not match ``harmless`` is written to ``sys.stderr``, so
    nothing else is lost. Keep the block short: the process's other threads write there too."""
    lines: list[str] = []
    try:
        with captured_native_stderr() as lines:
            yield
    finally:
        write_lines([line for line in lines if not harmless.search(line)])


def write_lines(lines: list[str]) -> None:
    """Write captured ``lines`` (if any) to ``sys.stderr``, one per line."""
    if lines:
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
