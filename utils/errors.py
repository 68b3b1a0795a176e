"""User-facing error types, importable without torch so command lines fail fast and light."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or matched to a model; the message says why."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure of the device or the host (CUDA, cuBLAS, cuDNN, CPU)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory", "alloc_failed"))
