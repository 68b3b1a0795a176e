"""WIDER FACE validation of a detector: official prediction files, AP, result files.

The reusable part of ``test.py`` (and of the periodic evaluation in training):

* :func:`list_val_images` — the val images of a ``--dataset`` root (``val/label.txt`` order, or
  ``val/images/<event>/*.jpg`` when there is no label file);
* :func:`predict_widerface` — runs a detector over them (images decoded by DataLoader workers,
  same-size images batched, tqdm progress) and writes ``<out_dir>/<event>/<stem>.txt``;
* :func:`evaluate_predictions` / :func:`evaluate_prediction_dir` — easy/medium/hard AP with
  :func:`utils.metric.evaluate`, counting only the images that have predictions when the set is
  partial (``subset``);
* :func:`evaluate_model` — model in, :class:`~utils.metric.WiderFaceResult` out (train.py);
* :func:`write_results` — ``results.txt``, ``results.json``, ``pr_curves.png``
  (:func:`remove_results` deletes those of an earlier run, :func:`check_output_path` checks an
  output location before any work).

Batch rule: a val image that cannot be read or a prediction file that is malformed does not stop
the pass; it is listed (:attr:`PredictionRun.unreadable`, the ``problems`` list of
:func:`evaluate_prediction_dir`) and the other images are evaluated as a subset. The Python APIs
that promise official-protocol numbers (:func:`evaluate_model`, training's periodic evaluation
through :meth:`PredictionRun.complete_predictions`) raise :class:`EvaluationError` after the pass
instead.

Prediction files follow the public Pytorch_Retinaface ``test_widerface.py`` exactly, because AP
depends on the box convention: the image stem, the number of boxes, then per detection (score
order) ``x y w h score`` with ``x = int(x1)``, ``y = int(y1)``, ``w = int(x2) - int(x1)``,
``h = int(y2) - int(y1)`` (truncation of the float32 box corners, no ``+1``) and the float32 score
printed at its shortest round-trip precision. The in-memory predictions evaluated are the values
of those files, so evaluating the folder again gives the same APs bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from config import one_line
from utils.errors import unless_out_of_memory
from utils.text_file import NotUtf8Error, read_utf8

from utils.metric import (GT_FILES, NUM_VAL_IMAGES, SETTINGS, WiderFaceGroundTruth, WiderFaceResult, evaluate,
                          load_ground_truth, plot_pr_curves, prediction_stem, read_prediction_dir)

__all__ = [
    "EvaluationError", "PredictionStopped", "ValImage", "PredictionRun", "PREDICTION_FOLDER", "RESULTS_TXT",
    "RESULTS_JSON", "PR_CURVES_PNG", "list_val_images", "default_gt_dir", "load_gt", "check_images_in_gt",
    "prediction_rows", "format_prediction_file", "predict_widerface", "evaluate_predictions",
    "evaluate_prediction_dir", "evaluate_model", "format_aps", "subset_note", "write_results",
    "remove_results", "check_output_path",
]

PREDICTION_FOLDER = "widerface_txt"
RESULTS_TXT = "results.txt"
RESULTS_JSON = "results.json"
PR_CURVES_PNG = "pr_curves.png"
#: unreadable val images named in the message of :meth:`PredictionRun.complete_predictions`
NAMED_UNREADABLE = 3


class EvaluationError(RuntimeError):
    """Evaluation cannot run (missing data, bad files); the message is one line for the user."""


class PredictionStopped(Exception):
    """:func:`predict_widerface` ended early because its ``stop`` callback asked it to."""


# --------------------------------------------------------------------------------------------
# Images and ground truth
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValImage:
    """One validation image: its file, event folder and file stem (the ground-truth key)."""

    path: Path
    event: str
    stem: str

    @property
    def key(self) -> str:
        return f"{self.event}/{self.stem}"


def _val_image(image_root: Path, relative: str) -> ValImage:
    rel = Path(relative.strip().lstrip("/"))
    if len(rel.parts) < 2:
        raise EvaluationError(f"image {relative!r} is not inside an event folder (expected <event>/<name>.jpg)")
    return ValImage(image_root / rel, rel.parent.name, rel.stem)


def list_val_images(dataset_root: str | os.PathLike[str]) -> list[ValImage]:
    """Validation images of ``<dataset_root>/val``, in label-file order.

    Uses the ``# <event>/<name>.jpg`` headers of ``val/label.txt`` (RetinaFace format; the
    official ``wider_face_val_bbx_gt.txt`` format is accepted too); without a label file every
    ``val/images/<event>/*.jpg`` is used (sorted). Raises :class:`EvaluationError` when the
    folders are missing, the list is empty or a listed image file does not exist.
    """
    root = Path(dataset_root)
    if not root.is_dir():
        raise EvaluationError(f"dataset folder not found: {root} (--dataset must hold val/images/<event>/*.jpg)")
    image_root = root / "val" / "images"
    if not image_root.is_dir():
        raise EvaluationError(f"no val/images/ folder in {root} (expected <dataset>/val/images/<event>/*.jpg)")
    label_file = root / "val" / "label.txt"
    if label_file.is_file():
        try:
            lines = [line.strip() for line in read_utf8(label_file).splitlines()]
        except NotUtf8Error as error:
            raise EvaluationError(str(error)) from None
        names = [line[1:].strip().split()[0] for line in lines if line.startswith("#") and line[1:].strip()]
        if not names:  # official WIDER FACE format: path lines ending in an image extension
            names = [line.split()[0] for line in lines if line and line.split()[0].lower().endswith(
                (".jpg", ".jpeg", ".png"))]
        images = [_val_image(image_root, name) for name in names]
        source = str(label_file)
    else:
        images = [ValImage(p, p.parent.name, p.stem) for p in sorted(image_root.glob("*/*.jpg"))]
        source = f"{image_root}/<event>/*.jpg"
    if not images:
        raise EvaluationError(f"no validation images listed in {source}")
    missing = [im for im in images if not im.path.is_file()]
    if missing:
        raise EvaluationError(f"{len(missing)} of {len(images)} images listed in {source} are missing, "
                              f"e.g. {missing[0].path}; to evaluate only the images present, delete their lines "
                              f"or the label file (then every {image_root}/<event>/*.jpg is used)")
    seen: set[str] = set()
    unique = []
    for im in images:
        if im.key not in seen:
            seen.add(im.key)
            unique.append(im)
    return unique


def default_gt_dir(dataset_root: str | os.PathLike[str]) -> Path:
    """``<dataset>/ground_truth``, where ``--gt_dir`` points by default."""
    return Path(dataset_root) / "ground_truth"


def load_gt(gt_dir: str | os.PathLike[str] | WiderFaceGroundTruth) -> WiderFaceGroundTruth:
    """:func:`utils.metric.load_ground_truth` with one-line :class:`EvaluationError` messages."""
    if isinstance(gt_dir, WiderFaceGroundTruth):
        return gt_dir
    path = Path(gt_dir)
    if path.exists() and not path.is_dir():
        hint = f" (did you mean its folder {path.parent}?)" if path.name in GT_FILES else ""
        raise EvaluationError(f"--gt_dir {path} is a file; --gt_dir is the folder holding {', '.join(GT_FILES)}"
                              + hint)
    if not path.is_dir():
        raise EvaluationError(f"ground-truth folder not found: {path} (--gt_dir must hold wider_face_val.mat "
                              f"and wider_easy/medium/hard_val.mat)")
    try:
        return load_ground_truth(path)
    except (OSError, ValueError, KeyError) as error:
        raise EvaluationError(f"cannot read the ground truth in {path}: {one_line(error)}") from None


def check_images_in_gt(images: Sequence[ValImage], gt: WiderFaceGroundTruth) -> None:
    """Raise :class:`EvaluationError` when an image is not in the WIDER FACE val ground truth."""
    unknown = [im.key for im in images if not gt.has_image(im.event, im.stem)]
    if unknown:
        raise EvaluationError(f"{len(unknown)} of {len(images)} images are not in the ground truth, "
                              f"e.g. {unknown[0]} (is --gt_dir the WIDER FACE val ground truth?)")


#: how the image formats a validation set may hold start (JPEG, PNG, BMP, WebP's RIFF container)
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"RIFF")


def check_image_files(images: Sequence[ValImage]) -> None:
    """Raise :class:`EvaluationError` when a listed image is empty, not an image file (a text or
    HTML page saved under an image name) or a JPEG/PNG cut short: the bytes are read, not decoded
    (the full WIDER FACE val set, 3,226 files, 360 MB, is read in seconds), so that training finds
    such a file at start-up and not at its first validation, epochs later. Damage inside the
    compressed data shows only when decoding; that validation then fails with the reason."""
    from utils.image_loader import truncation_reason  # noqa: PLC0415 (imports torch's DataLoader)

    bad = []
    for image in images:
        data = image.path.read_bytes()
        problem = ("empty file" if not data else truncation_reason(data)
                   or (None if data.startswith(_IMAGE_SIGNATURES) else "not a JPEG, PNG, BMP or WebP image"))
        if problem:
            bad.append((image.path, problem))
    if bad:
        raise EvaluationError(f"{len(bad)} of {len(images)} validation images cannot be read, e.g. {bad[0][0]}: "
                              f"{bad[0][1]}; replace them, or delete their lines from the label file")


# --------------------------------------------------------------------------------------------
# Prediction files (public test_widerface.py convention)
# --------------------------------------------------------------------------------------------
BOX_COORDINATE_BOUND = 1e15  # pixels; float32 and int64 both hold it


def prediction_rows(detections: Any) -> tuple[np.ndarray, list[str]]:
    """``(rows (N, 5) float64 x y w h score, text lines)`` of one image's detections.

    ``detections`` has ``boxes`` (N, 4) x1 y1 x2 y2 and ``scores`` (N,) sorted by score. Box
    values are the public convention (module docstring); ``rows`` hold exactly the numbers the
    text lines spell.
    """
    boxes = np.asarray(detections.boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(detections.scores, dtype=np.float32).reshape(-1)
    # truncation toward zero, as int() of a float32; an untrained network's boxes can exceed
    # int64 (exp overflow short of inf): bounded first, so they stay far outside every image
    corners = np.clip(boxes, -BOX_COORDINATE_BOUND, BOX_COORDINATE_BOUND).astype(np.int64)
    xywh = np.stack([corners[:, 0], corners[:, 1], corners[:, 2] - corners[:, 0],
                     corners[:, 3] - corners[:, 1]], axis=1)
    score_text = scores.astype(str)  # shortest repr of each float32, like str(np.float32)
    lines = [f"{x} {y} {w} {h} {s}" for (x, y, w, h), s in zip(xywh.tolist(), score_text)]
    rows = np.empty((len(scores), 5), dtype=np.float64)
    rows[:, :4] = xywh
    rows[:, 4] = score_text.astype(np.float64) if len(scores) else 0.0
    return rows, lines


def format_prediction_file(stem: str, detections: Any) -> tuple[str, np.ndarray]:
    """``(file text, rows)``: the stem line, the count line, then ``x y w h score`` lines."""
    rows, lines = prediction_rows(detections)
    return "\n".join([stem, str(len(lines)), *lines]) + "\n", rows


# --------------------------------------------------------------------------------------------
# Running a detector over the val images
# --------------------------------------------------------------------------------------------
def _is_prediction_file(path: Path) -> bool:
    """Whether ``path``'s first line names its own image, as prediction files do (ours, the public
    ``test_widerface.py``'s, and those naming ``<event>/<stem>.jpg``; read as ``--pred_dir`` reads them)."""
    try:
        with path.open("rb") as file:
            first = file.readline(4096)
        return prediction_stem(first.decode("utf-8-sig")) == path.stem
    except (OSError, UnicodeDecodeError):
        return False


@dataclass
class PredictionRun:
    """What :func:`predict_widerface` did.

    ``predictions``: ``{event: {stem: (N, 5) x y w h score}}`` (the values of the files);
    ``num_images``: images detected (the unreadable ones not counted);
    ``seconds``: wall time of the whole pass (decoding, network, post-processing, writing);
    ``timings``: the detector's per-stage seconds (preprocess, forward, postprocess);
    ``unreadable``: ``(path, reason)`` of every val image that could not be read (no prediction
    file was written for it), in image-list order.
    """

    predictions: dict[str, dict[str, np.ndarray]]
    num_images: int
    seconds: float
    out_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def complete_predictions(self) -> dict[str, dict[str, np.ndarray]]:
        """``predictions`` when every image was read; else raise :class:`EvaluationError` naming
        how many images could not be read and the first few (every val image counts in an
        official-protocol AP, so a run missing some must not be reported as one)."""
        if not self.unreadable:
            return self.predictions
        named = "; ".join(f"{path}: {reason}" for path, reason in self.unreadable[:NAMED_UNREADABLE])
        more = len(self.unreadable) - NAMED_UNREADABLE
        total = self.num_images + len(self.unreadable)
        raise EvaluationError(f"cannot read {named}{f' and {more} more' if more > 0 else ''} "
                              f"({len(self.unreadable)} of {total} val images unreadable; every val image "
                              f"counts in the AP)")

    @property
    def fps(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def num_detections(self) -> int:
        return int(sum(len(a) for per in self.predictions.values() for a in per.values()))


def _detect_or_retry(detector: Any, images: list[np.ndarray], paths: list) -> list:
    """Detections of a batch; out of memory -> free what the detector holds and run the images
    one at a time. An image that does not fit alone stops the run with an
    :class:`EvaluationError` (every val image counts in the AP, none may be skipped)."""
    found = unless_out_of_memory(detector.detect_batch, images)
    if found is not None:
        return found
    release = getattr(detector, "release_memory", lambda: None)
    release()
    found = []
    for image, path in zip(images, paths):
        single = unless_out_of_memory(detector.detect_batch, [image])
        if single is None:
            release()
            single = unless_out_of_memory(detector.detect_batch, [image])
        if single is None:
            height, width = image.shape[:2]
            raise EvaluationError(f"out of memory on {path} ({width}x{height}) even alone; use a smaller "
                                  "--max_size / --target_size (with --tta: smaller --tta_scales) or a device with more memory")
        found += single
    return found


def predict_widerface(detector: Any, dataset_root: str | os.PathLike[str] | None = None,
                      out_dir: str | os.PathLike[str] | None = None, *,
                      images: Sequence[ValImage] | None = None, batch_size: int | None = None,
                      workers: int = 2, progress: bool | None = True, max_pending: int | None = None,
                      clean: bool = True, progress_label: str = "test",
                      stop: Callable[[], bool] | None = None) -> PredictionRun:
    """Detect faces in every val image and (with ``out_dir``) write the official prediction files.

    Args:
        detector: a :class:`models.detector.FaceDetector` or :class:`utils.tta.TTADetector`
            (anything with ``detect_batch(list of BGR arrays) -> list of Detections``); its
            thresholds define the run (AP: confidence 0.02, NMS 0.4).
        dataset_root: ``--dataset`` root (``val/images``, ``val/label.txt``); or give ``images``.
        out_dir: folder for ``<event>/<stem>.txt`` (one file per image, ``0`` boxes when none);
            ``None`` writes nothing. With ``clean``, the prediction files of earlier runs
            (``<out_dir>/*/*.txt`` whose first line is their stem) are deleted before the first
            image is run, so that the folder holds no predictions but this run's, also when it
            stops part-way (error, Ctrl-C); other files there are left alone.
        batch_size: images per forward pass (default: the detector's). Images wait in per-size
            groups until a group is full (at most ``max_pending`` images wait; default
            ``4 * batch_size``), so only same-size images share a pass, like FaceDetector does;
            with the detector's ``pad_to`` > 1 the groups are its canvases, topped up with
            smaller ones (``utils.image_loader.SameSizeBatcher``).
        workers: DataLoader processes decoding images while the network runs (0: in-process).
        progress: progress bar on stderr (``None``: only on a terminal; not on a terminal, a line
            every 30 s, :func:`utils.progress.progress_bar`), labelled ``progress_label``.
        stop: asked after every image read; once it returns True the pass ends by raising
            :class:`PredictionStopped` (train.py's Ctrl-C during a validation).

    An image that cannot be read (missing, corrupt, truncated ...) does not stop the pass: it is
    recorded in :attr:`PredictionRun.unreadable` and has no prediction file. Out of memory on an
    image even alone raises :class:`EvaluationError` (see :func:`_detect_or_retry`).
    """
    if images is None:
        if dataset_root is None:
            raise ValueError("give dataset_root or images")
        images = list_val_images(dataset_root)
    batch_size = int(batch_size or getattr(detector, "batch_size", 1) or 1)
    pad_to = int(getattr(detector, "pad_to", 1))
    max_pending = max_pending or max(4 * batch_size, batch_size)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if clean:
            for stale in out.glob("*/*.txt"):
                if _is_prediction_file(stale):
                    stale.unlink()
    timings = getattr(detector, "timings", None)
    before = dict(timings) if timings is not None else {}
    predictions: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    unreadable: list[tuple[str, str]] = []

    from utils.progress import progress_bar  # noqa: PLC0415
    bar = progress_bar(len(images), progress_label, progress)
    from utils.image_loader import ImageFolderDataset, SameSizeBatcher, make_loader, start_loader  # torch

    batcher = SameSizeBatcher(batch_size, max_pending, pad_to)
    submit = getattr(detector, "submit", None)  # FaceDetector: forward passes queued ahead
    in_flight: list = []  # at most one (batch, handle): its network runs while the previous batch is post-processed

    def run(batch: list) -> None:
        handle = unless_out_of_memory(submit, [record.image for record in batch]) if submit else None
        finish_in_flight()
        if handle is None:  # no submit, or out of memory: the batch alone, with the fallbacks
            write(batch, _detect_or_retry(detector, [record.image for record in batch], [r.path for r in batch]))
        else:
            in_flight.append((batch, handle))

    def finish_in_flight() -> None:
        if in_flight:
            batch, handle = in_flight.pop()
            found = unless_out_of_memory(handle.result)
            if found is None:
                found = _detect_or_retry(detector, [record.image for record in batch], [r.path for r in batch])
            write(batch, found)

    def write(batch: list, found: list) -> None:
        for record, detections in zip(batch, found):
            image = images[record.index]
            text, rows = format_prediction_file(image.stem, detections)
            predictions[image.event][image.stem] = rows
            if out is not None:
                path = out / image.event / f"{image.stem}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        bar.update(len(batch))

    dataset = ImageFolderDataset([im.path for im in images], max_pixels=None)
    started = time.perf_counter()
    try:
        for records in start_loader(make_loader(dataset, workers=workers)):
            if stop is not None and stop():
                raise PredictionStopped("the pass over the val images was stopped")
            for record in records:
                if not record.ok:  # listed; the caller decides (subset, or an error after the pass)
                    unreadable.append((record.path, str(record.error)))
                    bar.update(1)
                    continue
                for batch in batcher.add(record):
                    run(batch)
        for batch in batcher.flush():
            run(batch)
        finish_in_flight()
    finally:
        if in_flight:  # stopped part-way (Ctrl-C, an error): the batch already submitted is still written
            with contextlib.suppress(Exception):
                finish_in_flight()
        bar.close()
    seconds = time.perf_counter() - started
    spent = {k: float(v) - float(before.get(k, 0.0)) for k, v in (timings or {}).items()}
    return PredictionRun({e: dict(p) for e, p in predictions.items()}, len(images) - len(unreadable), seconds,
                         out, spent, unreadable)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def evaluate_predictions(predictions: Mapping[str, Mapping[str, np.ndarray]],
                         gt: WiderFaceGroundTruth | str | os.PathLike[str],
                         iou_threshold: float = 0.5) -> WiderFaceResult:
    """Easy/medium/hard AP of ``{event: {stem: (N, 5) x y w h score}}``.

    When every ground-truth image has predictions this is the official protocol; otherwise only
    the images present are counted (``result.subset`` is True; see :func:`subset_note`).
    Raises :class:`EvaluationError` for images unknown to the ground truth or bad arrays.
    """
    gt = load_gt(gt)
    present = sum(len(per) for per in predictions.values())
    if present == 0:
        raise EvaluationError("no predictions to evaluate")
    try:
        return evaluate(predictions, gt, iou_threshold, subset=present < gt.num_images)
    except ValueError as error:
        raise EvaluationError(one_line(error)) from None


def _prediction_folder_hint(path: Path) -> str:
    """Where the prediction files are when ``path`` holds none in ``<event>/*.txt``: a folder up to
    three levels below that does (``--pred_dir`` one level too high, e.g. the results folder
    instead of its ``widerface_txt``), or ``path``'s parent when ``path`` holds ``.txt`` files
    itself (an event folder given); else ``""``."""
    for depth in range(1, 4):
        found = next(path.glob("*/" * depth + "*/*.txt"), None)
        if found is not None:
            return f"; {found.parents[1]} holds event folders with .txt files: use --pred_dir {found.parents[1]}"
    if next(path.glob("*.txt"), None) is not None:
        return (f"; {path} holds .txt files itself, so it looks like one event folder: use --pred_dir "
                f"{path.parent}")
    return ""


def evaluate_prediction_dir(pred_dir: str | os.PathLike[str],
                            gt: WiderFaceGroundTruth | str | os.PathLike[str],
                            iou_threshold: float = 0.5, *, problems: list[str] | None = None) -> WiderFaceResult:
    """AP of a prediction folder ``<pred_dir>/<event>/<stem>.txt`` (official format), the
    replacement of the public Cython/python evaluation tool.

    A malformed file, or one whose first line names an image the ground truth does not have,
    raises :class:`EvaluationError` naming ``file:line``; with ``problems`` (a list) every such
    or unreadable file is skipped and its one-line message appended, and the other files are
    evaluated (a subset). A missing folder, a folder without prediction files (with a hint where
    they are) or one where no file could be read raise :class:`EvaluationError` (with a hint, the
    files of the wrong folder are not appended to ``problems``).
    """
    path = Path(pred_dir)
    if path.exists() and not path.is_dir():
        raise EvaluationError(f"--pred_dir {path} is a file; it must be the folder holding <event>/<image stem>.txt")
    if not path.is_dir():
        raise EvaluationError(f"prediction folder not found: {path}")
    gt = load_gt(gt)
    known = len(problems) if problems is not None else 0
    try:
        predictions = read_prediction_dir(path, problems, known_image=gt.has_image)
    except (OSError, ValueError) as error:
        raise EvaluationError(one_line(error)) from None
    if not any(predictions.values()):
        skipped = len(problems) - known if problems is not None else 0
        hint = _prediction_folder_hint(path)
        if skipped:
            if hint:  # the wrong folder (e.g. a --pred_dir run's results.txt read as predictions): the hint helps
                del problems[known:]
            raise EvaluationError(f"none of the {skipped} prediction files in {path} could be read" + hint)
        raise EvaluationError(f"no prediction files in {path} (expected <event>/<image stem>.txt)" + hint)
    return evaluate_predictions(predictions, gt, iou_threshold)


def protocol_detector(model_or_weights: Any, device: Any = None, *, confidence_threshold: float = 0.02,
                      nms_threshold: float = 0.4, batch_size: int = 1, half: bool = False) -> Any:
    """A :class:`models.detector.FaceDetector` (of a model, or of a checkpoint path/name) set up
    like the public test_widerface.py: original scale, the given thresholds, no top-k cuts."""
    from models.detector import FaceDetector  # noqa: PLC0415 (the --pred_dir mode needs no torch)

    source = ({"weights": model_or_weights} if isinstance(model_or_weights, (str, os.PathLike))
              else {"model": model_or_weights})
    return FaceDetector(**source, device=device, confidence_threshold=confidence_threshold,
                        nms_threshold=nms_threshold, top_k=None, keep_top_k=None, batch_size=batch_size, half=half)


def evaluate_model(model: Any, dataset_root: str | os.PathLike[str],
                   gt: WiderFaceGroundTruth | str | os.PathLike[str], device: Any = None, *,
                   confidence_threshold: float = 0.02, nms_threshold: float = 0.4,
                   out_dir: str | os.PathLike[str] | None = None, batch_size: int = 1,
                   workers: int = 0, half: bool = False, progress: bool | None = False
                   ) -> WiderFaceResult:
    """Official-protocol AP of a model (or a ready detector) on ``<dataset_root>/val`` — the call
    for periodic evaluation during training.

    ``model``: a :class:`models.retinaface.RetinaFace` (moved to ``device``; a BN-folded copy is
    run, the model's own train/eval mode and weights are left untouched; unwrap DDP first),
    detected at original scale with the given thresholds, ``half`` and no top-k cuts (the public
    test_widerface.py); or a ready FaceDetector / TTADetector, used as it is (its own thresholds
    and scales; ``confidence_threshold``, ``nms_threshold`` and ``half`` do not apply).
    ``batch_size`` images are detected per call either way. ``gt``: a loaded ground truth (load it
    once per run) or its folder. Predictions in the public file convention (written to
    ``out_dir`` when given); partial val sets are evaluated as a subset. Val images that cannot
    be read raise :class:`EvaluationError` after the pass, naming how many and the first few
    (:meth:`PredictionRun.complete_predictions`).
    """
    gt = load_gt(gt)
    images = list_val_images(dataset_root)
    check_images_in_gt(images, gt)
    detector = model if hasattr(model, "detect_batch") else protocol_detector(
        model, device, confidence_threshold=confidence_threshold, nms_threshold=nms_threshold,
        batch_size=batch_size, half=half)
    run = predict_widerface(detector, images=images, out_dir=out_dir, batch_size=batch_size,
                            workers=workers, progress=progress)
    return evaluate_predictions(run.complete_predictions(), gt)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def format_aps(result: WiderFaceResult) -> str:
    """``Easy AP: 0.xxxxxx  Medium AP: 0.xxxxxx  Hard AP: 0.xxxxxx`` (``nan`` for a setting with
    no face in a subset)."""
    return "  ".join(f"{s.capitalize()} AP: {result.aps[s]:.6f}" for s in SETTINGS)


def subset_note(result: WiderFaceResult) -> str | None:
    """The warning printed for partial val sets, else ``None``."""
    if not result.subset:
        return None
    total = result.num_gt_images or NUM_VAL_IMAGES
    return f"subset: {result.num_images} of {total} images, not comparable with full-val numbers"


def _json_number(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def write_results(results_dir: str | os.PathLike[str], result: WiderFaceResult, *,
                  seconds: float | None = None, num_images: int | None = None,
                  details: Iterable[str] = (), json_path: str | os.PathLike[str] | None = None,
                  plot: bool = True, title: str | None = None, unreadable: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``results.txt``, ``results.json`` and ``pr_curves.png`` into ``results_dir``.

    ``seconds``: wall time of the detection pass (``None`` when only a prediction folder was
    evaluated: time and fps are then ``null`` in the JSON and absent from the text);
    ``num_images``: images run (default: the images evaluated); ``details``: extra lines for
    ``results.txt`` (weights, scale setting ...); ``json_path``: also write the JSON there;
    ``unreadable``: one line per input file left out because it could not be read (val images,
    malformed prediction files), each naming the file and the reason.
    Returns the JSON dict ``{"easy", "medium", "hard", "num_images", "subset", "seconds", "fps",
    "unreadable_files"}`` (APs ``null`` when nan; ``unreadable_files`` the list of those lines).
    """
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    count = result.num_images if num_images is None else int(num_images)
    fps = count / seconds if seconds else None
    data: dict[str, Any] = {
        "easy": _json_number(result.easy),
        "medium": _json_number(result.medium),
        "hard": _json_number(result.hard),
        "num_images": count,
        "subset": bool(result.subset),
        "seconds": None if seconds is None else round(float(seconds), 6),
        "fps": _json_number(fps),
        "unreadable_files": list(unreadable),
    }
    lines = [f"test images: {count}"]
    if seconds is not None:
        lines += [f"total time: {seconds:.3f} s",
                  f"time per image: {seconds / max(count, 1):.4f} s",
                  f"fps: {fps:.2f}"]
    lines += list(details)
    if unreadable:
        lines.append(f"unreadable files (not evaluated): {len(unreadable)}")
        lines += [f"  {problem}" for problem in unreadable]
    note = subset_note(result)
    if note:
        lines.append(note)
    lines += [f"{s.capitalize()} AP: {result.aps[s]:.6f}" for s in SETTINGS]
    (folder / RESULTS_TXT).write_text("\n".join(lines) + "\n")
    text = json.dumps(data, indent=2) + "\n"
    (folder / RESULTS_JSON).write_text(text)
    if json_path is not None:
        target = Path(json_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    if plot:
        plot_pr_curves(result, folder / PR_CURVES_PNG, title=title)
    return data


def remove_results(results_dir: str | os.PathLike[str], json_path: str | os.PathLike[str] | None = None) -> None:
    """Delete the ``results.txt``, ``results.json`` and ``pr_curves.png`` of an earlier run from
    ``results_dir`` (and ``json_path``), before a run that will write new ones: a run that stops
    part-way then leaves no results that describe another run."""
    folder = Path(results_dir)
    for path in (folder / RESULTS_TXT, folder / RESULTS_JSON, folder / PR_CURVES_PNG,
                 *([Path(json_path)] if json_path is not None else [])):
        path.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike[str], option: str, *, is_file: bool = False) -> None:
    """Raise :class:`EvaluationError` (one line naming ``option``) when ``path`` cannot become an
    output folder (``is_file``: an output file): it, or a folder above it, is a file (or
    ``is_file`` and it is a folder), or the nearest existing folder is not writable. Nothing is
    created, so a run can check its outputs before it checks its inputs."""
    target = Path(path)
    if target.is_dir() and is_file:
        raise EvaluationError(f"{option} {target} is a folder; give a file path (e.g. {target / RESULTS_JSON})")
    if target.exists() and not target.is_dir() and not is_file:
        raise EvaluationError(f"{option} {target} is a file, not a folder")
    if target.exists():
        existing = target
    else:
        existing = target.parent if is_file else target
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise EvaluationError(f"{option} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | (0 if existing.is_file() else os.X_OK)):
        raise EvaluationError(f"{option} {target}: {existing} is not writable")
