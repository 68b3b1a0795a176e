"""User-facing error types, signals as exceptions, the input check inference.py makes before
importing torch, and out-of-memory handling: importable without torch so command lines fail fast
and light."""

import errno
import os
from typing import Any, Callable


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or matched to a model; the message says why."""


class InferenceError(RuntimeError):
    """An inference run cannot start (or go on); the message is one line meant for the user."""


class TrainingSetupError(RuntimeError):
    """The run cannot start (missing data or weights, bad options); the message says what to do."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last checkpoint saved before it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit or pre-emption, ``docker stop``, ``kill``): handled
    like Ctrl-C, which it derives from, but the command lines exit with ``128 + SIGTERM`` (143)."""

    exit_status = 143
    what = "terminated (SIGTERM)"


class sigterm_raises_terminated:  # noqa: N801 - used as a context manager, like contextlib's
    """Within the block, SIGTERM raises :class:`Terminated` where the program is (as Ctrl-C raises
    KeyboardInterrupt), so that the code that handles Ctrl-C (partial results written, a log line)
    runs for it too; Python's default would end the process without a word. Main thread only
    (elsewhere it does nothing)."""

    def __enter__(self) -> "sigterm_raises_terminated":
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise Terminated()

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self._previous)


def os_error_reason(error: OSError) -> str:
    """``permission denied``-style text of an OSError, without the path it names."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


def check_input(root: "str | os.PathLike[str]") -> None:
    """:class:`InferenceError` with a one-line reason when ``--inference_dir`` cannot be opened at
    all (inference.py checks it before importing torch, and ``run_inference`` again)."""
    try:
        os.stat(root)
    except OSError as error:
        if os.path.islink(root) and error.errno == errno.ENOENT:
            raise InferenceError(f"input not found: {root} (broken symbolic link to {os.readlink(root)})") from None
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InferenceError(f"input not found: {root}") from None
        raise InferenceError(f"cannot read input {root}: {os_error_reason(error)}") from None


CV_NO_MEMORY = -4  # cv::Error::StsNoMem: "(-4:Insufficient memory) Failed to allocate N bytes"


def is_opencv_error(error: BaseException) -> bool:
    """Whether ``error`` is a ``cv2.error`` (recognised without importing OpenCV)."""
    return type(error).__name__ == "error" and type(error).__module__.split(".")[0] == "cv2"


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure of the device or the host (CUDA, cuBLAS, cuDNN, CPU, OpenCV)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    if is_opencv_error(error):
        return getattr(error, "code", None) == CV_NO_MEMORY or "insufficient memory" in text
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory", "alloc_failed"))


def unless_out_of_memory(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, or None when it runs out of memory. The caller recovers (frees memory,
    retries smaller) after this returns: inside the ``except`` block the live exception would
    still hold the failed call's tensors."""
    try:
        return function(*args)
    except Exception as error:  # noqa: BLE001 - only out-of-memory is handled here
        if not is_out_of_memory(error):
            raise
    return None
