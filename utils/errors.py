"""User-facing error types, importable without torch so command lines fail fast and light."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or matched to a model; the message says why."""
