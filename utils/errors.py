"""User-facing error types and out-of-memory handling, importable without torch so command lines
fail fast and light."""

from typing import Any, Callable


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or matched to a model; the message says why."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure of the device or the host (CUDA, cuBLAS, cuDNN, CPU)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
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
