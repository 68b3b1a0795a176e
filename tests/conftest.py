"""Shared pytest fixtures.

The read-only sample data and published weights live in ``$RETINAFACE_SHARED`` (default
``../shared`` beside the checkout). Tests that need them skip with a reason when the folder is
absent, except when ``REQUIRE_SHARED=1`` (set by ``.ci/run``), where they fail instead; the same
holds for optional packages (mediapipe, the ONNX exporter), which CI installs.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) the cores are shared out between the workers: each worker and the
    processes its tests start (``OMP_NUM_THREADS``) get ``cpu_count // N`` intra-op threads instead of
    all of them (2-core machine: 535 s against 620 s with two threads per worker; README, Tests)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def shared_root() -> Path:
    return Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared")).resolve()


def require_shared(relative: str) -> Path:
    """Path of ``relative`` inside the shared folder, or skip (fail under REQUIRE_SHARED=1)."""
    path = shared_root() / relative
    if not path.exists():
        reason = f"shared test data not found: {path} (set RETINAFACE_SHARED to the shared/ folder)"
        if os.environ.get("REQUIRE_SHARED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def require_installed(module: str, reason: str):
    """Import ``module``, or skip (fail under REQUIRE_SHARED=1: CI installs every requirement, so
    a missing package there is a broken install, not an optional feature)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"{reason} ({error})"
        if os.environ.get("REQUIRE_SHARED") == "1":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="session")
def widerface_sample() -> Path:
    """``shared/data/widerface_sample``: val/images/<event>/*.jpg, val/label.txt, ground_truth/*.mat."""
    return require_shared("data/widerface_sample")


@pytest.fixture(scope="session")
def widerface_gt_dir() -> Path:
    return require_shared("data/widerface_sample/ground_truth")


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """Published Pytorch_Retinaface mobilenet0.25 detector weights."""
    return require_shared("weights/mobilenet0.25_Final.pth")


@pytest.fixture(scope="session")
def mobilenet_backbone_weights() -> Path:
    """ImageNet-pretrained MobileNetV1x0.25 backbone ({'state_dict': {'module.stage1...'}})."""
    return require_shared("weights/mobilenetV1X0.25_pretrain.tar")


@pytest.fixture(scope="session")
def sample_mask_images() -> Path:
    return require_shared("data/sample_mask/images")


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    return require_shared("data/photos")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny CPU workloads: one intra-op thread is faster and immune to oversubscription."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def detection_fails_on_call(monkeypatch):
    """``fail(call, error)``: from now on ``FaceDetector.submit`` (what ``detect_batch`` calls, and
    test.py's pass directly) raises ``error`` on its ``call``-th call (1-based) and works normally
    otherwise; ``error`` may be a ``signal.Signals`` instead, raised in the process there (what a
    batch scheduler's SIGTERM does); returns the original method."""
    import signal

    from models.detector import FaceDetector

    original = FaceDetector.submit

    def fail(call: int, error: BaseException | signal.Signals):
        calls = []

        def submit(self, images):
            calls.append(1)
            if len(calls) == call:
                if isinstance(error, signal.Signals):
                    signal.raise_signal(error)
                else:
                    raise error
            return original(self, images)

        monkeypatch.setattr(FaceDetector, "submit", submit)
        return original

    return fail


@pytest.fixture
def after_training_step(monkeypatch):
    """``after(number, action)``: from now on ``action()`` runs right after training step
    ``number`` (1-based) of train.py's loop, which steps its ``LambdaLR`` once per training step
    (and once when it is built); returns ``restore()``, which puts the plain method back (for a
    resume in the same test)."""
    import torch

    original = torch.optim.lr_scheduler.LambdaLR.step

    def after(number: int, action):
        calls = []

        def step(self, *args, **kwargs):
            original(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == number + 1:
                action()

        monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
        return lambda: monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", original)

    return after


@pytest.fixture
def detector_layouts(monkeypatch) -> list[bool]:
    """The ``channels_last`` setting of every ``FaceDetector`` built from now on, in order."""
    from models.detector import FaceDetector

    layouts: list[bool] = []
    init = FaceDetector.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        layouts.append(self.dense.channels_last)

    monkeypatch.setattr(FaceDetector, "__init__", recording_init)
    return layouts


class QueueingDetector:
    """A stand-in for ``FaceDetector``'s ``submit`` / ``result()`` (test.py and inference.py keep one
    batch in flight): records ``("submit", n)``, ``("result", n)`` and ``("detect_batch", images)``
    events; the result of submit number ``oom_result`` runs out of memory; ``found(images)`` gives
    the detections of a batch."""

    device = None
    timings: dict = {}

    def __init__(self, found, oom_result: int, batch_size: int = 1) -> None:
        self.found, self.oom_result, self.batch_size = found, oom_result, batch_size
        self.events: list[tuple[str, int]] = []
        self.releases = 0

    def submit(self, images):
        number = sum(event[0] == "submit" for event in self.events) + 1
        self.events.append(("submit", number))
        detector = self

        class Handle:
            def result(self):
                detector.events.append(("result", number))
                if number == detector.oom_result:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return detector.found(images)
        return Handle()

    def detect_batch(self, images):
        self.events.append(("detect_batch", len(images)))
        return self.found(images)

    def release_memory(self) -> None:
        self.releases += 1
