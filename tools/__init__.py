"""Benchmarks, checks and export scripts; run them from the repository root (``python tools/NAME.py``)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    """The read-only shared folder (sample data, published weights): ``$RETINAFACE_SHARED``, else
    ``shared/`` beside the checkout, as the tests find it."""
    return Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")).resolve()
