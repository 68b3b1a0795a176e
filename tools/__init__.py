"""Benchmarks, checks and export scripts; run them from the repository root (``python tools/NAME.py``)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    """The read-only shared folder (sample data, published weights): ``$RETINAFACE_SHARED``, else
    ``shared/`` beside the checkout, as the tests find it."""
    return Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")).resolve()


def check_inputs(prog: str, device: str | None = None, paths: dict[str, str | Path] | None = None,
                 out: str | Path | None = None) -> None:
    """Exit with one line before any work: status 2 for an unusable ``device`` (``cpu``, ``cuda``,
    ``cuda:N``), status 1 for a path of ``paths`` (``{"--option": path}``) that does not exist or an
    ``--out`` file that cannot be appended to (a folder, a path that cannot be created): found
    before a benchmark's minutes, not when its report is written."""
    import sys

    if device is not None:
        from models.detector import resolve_device

        try:
            resolve_device(device)
        except ValueError as error:
            print(f"{prog}: error: --device: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    for option, path in (paths or {}).items():
        if not Path(path).exists():
            print(f"{prog}: error: {option}: {path} not found", file=sys.stderr)
            raise SystemExit(1)
    if out is not None:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a", encoding="utf-8"):
                pass
        except OSError as error:
            print(f"{prog}: error: --out {out}: {error.strerror or error}", file=sys.stderr)
            raise SystemExit(1) from None
