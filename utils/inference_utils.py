"""The reusable parts of ``inference.py``: output writers, drawing, the run loop and its summary
(file discovery and image loading: ``utils/image_loader.py``).

Output folder layout (``--inference_save_folder OUT``)::

    OUT/<experiment>_inference_results.txt   image name line, then "x1 y1 x2 y2 score" per face
    OUT/detections.json                      {"<relative path>": [{"box", "score", "landmarks"}]}
    OUT/summary.json                         counts, skipped files with reasons, timings
    OUT/result_images/<relative path>        --save_img: boxes, scores and landmarks drawn
    OUT/masks/<rel dir>/<stem>_<i>.png       --save_mask: face masks (0/255)
    OUT/faces/<rel dir>/<stem>_<i>.<ext>     --save_mask: face crops
    OUT/heads/<rel dir>/<stem>_<i>.<ext>     --save_mask: head crops (face box x4, clipped)
    OUT/head_masks/<rel dir>/<stem>_<i>.png  --save_mask: head masks (0/255)
    OUT/aligned/<rel dir>/<stem>_<i>.<ext>   --save_aligned: faces warped onto the ArcFace template

Exit codes of the command line: :data:`EXIT_OK` (0) every image processed, :data:`EXIT_ERROR`
(1) nothing was run (no images, missing weights, unavailable device, output folder in use or not
writable ...), none of the files found could be processed, or the run stopped on an unexpected error
(its outputs so far are written, with the error in ``summary.json``),
:data:`EXIT_USAGE` (2) bad command-line option, :data:`EXIT_SKIPPED` (3) finished but some
files were skipped (unreadable, truncated, empty, not images, out of memory, in folders that cannot
be listed), 130 interrupted (143 for SIGTERM; the results so far are written in both cases). Names
that hold line breaks or bytes that are not UTF-8 are escaped in the text outputs (:func:`escape_name`).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict, deque
from concurrent.futures import Future, wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np
import torch

from config import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_SKIPPED, UsageError, build_parser,
                    check_option_combinations, detection_limit, moot_option_warnings, one_line)
from utils.atomic_file import atomic_path
from utils.checkpoint import checkpoint_for_run, resolve_weights
from utils.errors import (InferenceError, Terminated, check_input, os_error_reason, sigterm_raises_terminated,
                          unless_out_of_memory)
from utils.image_io import IMAGE_EXTENSIONS
from utils.image_loader import (DEFAULT_MAX_PIXELS, ImageFolderDataset, ImageRecord, SameSizeBatcher, UnreadableInputError,
                                find_images, make_loader, start_loader)
from utils.names import NAME_MAX, escape_name, fit_file_name
from utils.progress import progress_bar

MASK_SUBFOLDERS = ("masks", "faces", "heads", "head_masks")
RESULT_SUBFOLDERS = ("result_images", *MASK_SUBFOLDERS, "aligned")
RESULTS_TXT_SUFFIX = "_inference_results.txt"
DETECTIONS_JSON = "detections.json"
SUMMARY_JSON = "summary.json"
EARLIER_RESULTS_NOTE = (f"not searched: it holds an earlier run's {DETECTIONS_JSON} and {SUMMARY_JSON} (its images "
                        "are outputs)")


EARLIER_OUTPUTS_NOTE = (f"not searched: the input folder holds an earlier run's {DETECTIONS_JSON} and {SUMMARY_JSON}, "
                        "and this is one of that run's output folders")

LINK_LOOP_NOTE = "not searched: a symbolic link to a folder above it (a loop), whose images are searched there"


def earlier_output_subfolders(root: str | Path) -> list[Path]:
    """The output sub-folders (drawn images, masks, crops) of an earlier run written into the
    input folder ``root`` itself (``--inference_save_folder`` = ``--inference_dir``): its images
    are outputs, not inputs. Empty unless ``root`` holds that run's result files."""
    root = Path(root)
    try:
        if not all((root / marker).is_file() for marker in (DETECTIONS_JSON, SUMMARY_JSON)):
            return []
        return [root / name for name in RESULT_SUBFOLDERS if (root / name).is_dir()]
    except OSError:  # a folder that cannot be searched: find_images says so
        return []


# --------------------------------------------------------------------------------------------
# Output folder and writers
# --------------------------------------------------------------------------------------------

def results_txt_name(experiment_name: str) -> str:
    return f"{experiment_name}{RESULTS_TXT_SUFFIX}"


def earlier_results(folder: str | Path) -> list[str]:
    """Names of the result files/folders of an earlier run found in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.name in (DETECTIONS_JSON, SUMMARY_JSON) + RESULT_SUBFOLDERS
                  or entry.name.endswith(RESULTS_TXT_SUFFIX))


def check_output_folder(folder: str | Path, exist_ok: bool) -> Path:
    """Refuse a folder that already holds results unless ``exist_ok`` (nothing is created here)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InferenceError(f"output folder {folder} exists and is not a folder")
    found = earlier_results(folder)
    if found and not exist_ok:
        raise InferenceError(f"output folder {folder} already holds results ({', '.join(found[:3])}"
                             f"{' ...' if len(found) > 3 else ''}); choose another --inference_save_folder "
                             f"or pass --exist_ok true to write into it (from Python: exist_ok=True)")
    return folder


def _check_writable(folder: Path) -> None:
    """Write and remove a probe file in ``folder``; InferenceError when that fails."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise InferenceError(f"output folder {folder} is not writable: {os_error_reason(error)}") from None


def prepare_output_folder(folder: str | Path, subfolders: Iterable[str] = ()) -> list[Path]:
    """Create ``folder`` (with its parents) and check that files can be written in it and in those of
    ``subfolders`` that already exist (e.g. ``result_images`` of an earlier run with ``--exist_ok``),
    so that a read-only or uncreatable output folder stops the run before any image is processed.

    Returns the folders created here, deepest first (:func:`remove_created_folders` undoes them
    when the run cannot start after all). Raises :class:`InferenceError` with a one-line reason.
    """
    folder = Path(folder)
    created = []
    try:
        missing = folder
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        remove_created_folders(created)
        raise InferenceError(f"cannot create output folder {folder}: {os_error_reason(error)}") from None
    try:
        _check_writable(folder)
        for name in subfolders:
            sub = folder / name
            if sub.exists() or sub.is_symlink():
                if not sub.is_dir():
                    raise InferenceError(f"output folder {folder}: {name} exists and is not a folder")
                _check_writable(sub)
    except InferenceError:
        remove_created_folders(created)
        raise
    return created


def remove_created_folders(created: Iterable[Path]) -> None:
    """Remove the (still empty) folders :func:`prepare_output_folder` created, deepest first."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def write_file(path: Path, data: bytes | np.ndarray) -> None:
    """Write ``data`` to ``path`` under the name ``<name>.partial``, renamed when complete: a
    write that fails part-way (disk full, a file size limit, Ctrl-C) leaves no truncated file,
    and an earlier file of that name stays whole. Raises OSError naming ``path``."""
    try:
        with atomic_path(path) as partial:
            partial.write_bytes(memoryview(data))
    except OSError as error:
        raise OSError(f"cannot write {escape_name(str(path))}: {os_error_reason(error)}") from None


def write_image(path: str | Path, image: np.ndarray) -> None:
    """``cv2.imwrite`` that creates folders, works with non-ASCII paths, writes through
    :func:`write_file` and raises on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise OSError(f"could not encode {escape_name(str(path))}")
    write_file(path, encoded)


class BackgroundWriter:
    """Image outputs drawn, encoded and written on threads (OpenCV and file I/O release the
    GIL), so the main loop goes on with the next batch while they are written. At most
    ``max_pending`` images wait (bounded memory); a failed write raises in the main thread at the
    next :meth:`write` or at :meth:`close`. ``timings["write"]`` gets the threads' seconds."""

    def __init__(self, timings: dict[str, float], threads: int = 2, max_pending: int = 16) -> None:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        self.timings = timings
        self.max_pending = max_pending
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="inference-writer")
        self.pending: deque = deque()

    def write(self, path: Path, make_image: Callable[[], np.ndarray]) -> None:
        """Write ``make_image()`` (called on a thread) to ``path``."""
        while len(self.pending) >= self.max_pending:
            self._collect(self.pending.popleft())
        self.pending.append(self.pool.submit(self._write, path, make_image))

    @staticmethod
    def _write(path: Path, make_image: Callable[[], np.ndarray]) -> float:
        started = time.perf_counter()
        write_image(path, make_image())
        return time.perf_counter() - started

    def _collect(self, future) -> None:
        self.timings["write"] += future.result()  # re-raises the thread's error here

    def close(self) -> None:
        """Wait for every pending write (raising the first error)."""
        try:
            while self.pending:
                self._collect(self.pending.popleft())
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _atomic_write_text(path: Path, text: str) -> None:
    write_file(path, text.encode("utf-8"))


def format_results_txt(results: Iterable[tuple[str, Any]]) -> str:
    """The original project's text format: the image name, then ``x1 y1 x2 y2 score`` per face
    (coordinates truncated to integers, score with 6 decimals). A name that holds a line break
    (or starts with a backslash) is escaped (:func:`escape_name`) so that every image stays one
    name line; ``detections.json`` has the names as they are."""
    lines = []
    for name, detections in results:
        lines.append(escape_name(name))
        for box, score in zip(detections.boxes, detections.scores):
            x1, y1, x2, y2 = (int(v) for v in box)
            lines.append("%d %d %d %d %f" % (x1, y1, x2, y2, float(score)))
    return "".join(line + "\n" for line in lines)


def write_results_txt(path: str | Path, results: Iterable[tuple[str, Any]]) -> None:
    _atomic_write_text(Path(path), format_results_txt(results))


def write_detections_json(path: str | Path, results: Iterable[tuple[str, Any]]) -> None:
    """``{"<relative path>": [{"box": [x1, y1, x2, y2], "score": s, "landmarks": [[x, y] x5]}]}``."""
    payload = {name: detections.to_list() for name, detections in results}
    _atomic_write_text(Path(path), json.dumps(payload, indent=1))


LANDMARK_COLOURS = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))  # BGR


#: pixels beyond the image edges where :func:`draw_detections` clamps points (more than its lines'
#: and landmark dots reach into the image)
DRAW_MARGIN = 16


def draw_detections(image: np.ndarray, detections: Any) -> np.ndarray:
    """A copy of ``image`` (BGR uint8, H x W x 3) with boxes (red), scores and the five landmarks
    drawn, as the public RetinaFace demo draws them. ``detections``: a
    :class:`models.detector.Detections` in the pixels of ``image`` (boxes x1, y1, x2, y2)."""
    canvas = image.copy()
    height, width = canvas.shape[:2]
    # OpenCV takes int32 points: a barely trained model's boxes can lie 1e9 pixels away, or be NaN.
    # Clamped a margin beyond the image, what is drawn inside it stays the same.
    points = np.concatenate([np.asarray(detections.boxes, np.float64).reshape(-1, 2, 2),
                             np.asarray(detections.landmarks, np.float64).reshape(-1, 5, 2)], axis=1)
    points = np.clip(np.nan_to_num(points, nan=-DRAW_MARGIN), -DRAW_MARGIN,
                     [width + DRAW_MARGIN, height + DRAW_MARGIN]).round().astype(int).tolist()
    for face, score in zip(points, detections.scores):
        (x1, y1), corner = face[0], face[1]
        cv2.rectangle(canvas, (x1, y1), tuple(corner), (0, 0, 255), 2)
        text_x = min(max(x1, 0), max(width - 60, 0))  # keep the score readable at borders
        text_y = min(max(y1, 0) + 12, height - 2)
        cv2.putText(canvas, f"{float(score):.4f}", (text_x, text_y), cv2.FONT_HERSHEY_DUPLEX, 0.5, (255, 255, 255))
        for point, colour in zip(face[2:], LANDMARK_COLOURS):
            cv2.circle(canvas, tuple(point), 1, colour, 4)
    return canvas


#: bytes kept free after a crop stem for ``_<face index><extension>`` (up to ``_9999.jpeg``)
CROP_SUFFIX_BYTES = 16


def fit_name_length(stem: str, key: str) -> str:
    """``stem`` (``<rel dir>/<name>``) whose last part leaves :data:`CROP_SUFFIX_BYTES` of a
    file name (:data:`utils.names.NAME_MAX` bytes) free; a longer one is cut and ends ``~`` plus 8
    hex digits of ``key``'s hash (the image's relative path), so that cut names stay apart."""
    folder, _, name = stem.rpartition("/")
    name = fit_file_name(name, NAME_MAX - CROP_SUFFIX_BYTES, key)
    return f"{folder}/{name}" if folder else name


def crop_stems(names: Sequence[str]) -> dict[str, str]:
    """``<rel dir>/<stem>`` used to name an image's crops and masks, one per image. When images of
    one folder share a stem (``a.jpg``, ``a.png``) their extension is added (``a_jpg``, ``a_png``),
    and a number (``a_jpg_2``) when that name is also another image's stem (``a_jpg.png``). A name
    too long for a crop's file name is cut (:func:`fit_name_length`)."""
    stems = {name: Path(name).with_suffix("").as_posix() for name in names}
    counts: dict[str, int] = defaultdict(int)
    for stem in stems.values():
        counts[stem] += 1
    taken = {stem for stem, count in counts.items() if count == 1}
    result = {}
    for name in sorted(names):
        stem = stems[name]
        if counts[stem] > 1:
            base = f"{stem}_{Path(name).suffix.lstrip('.')}"
            stem, number = base, 2
            while stem in taken:
                stem, number = f"{base}_{number}", number + 1
            taken.add(stem)
        result[name] = fit_name_length(stem, name)
    return result


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------

TIMING_KEYS = ("load", "preprocess", "forward", "postprocess", "masks", "write")


@dataclass
class InferenceSummary:
    """What a run did; ``timings`` are seconds summed over the processed images."""

    output_folder: str
    total_files: int = 0
    processed: int = 0
    faces: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {key: 0.0 for key in TIMING_KEYS})
    model_load_s: float = 0.0
    wall_s: float = 0.0
    device: str = ""
    weights: str = ""  # the checkpoint that was run
    interrupted: bool = False
    interrupt_status: int = EXIT_INTERRUPTED  # 143 for SIGTERM
    error: str | None = None  # what stopped the run part-way (it then raises)

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_ERROR
        if self.interrupted:
            return self.interrupt_status
        return EXIT_SKIPPED if self.skipped else EXIT_OK

    def ms_per_image(self) -> dict[str, float]:
        count = max(self.processed, 1)
        return {key: 1000.0 * value / count for key, value in self.timings.items()}

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"output_folder": self.output_folder, "files": self.total_files, "processed": self.processed,
                "faces": self.faces, "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "notes": [{"file": f, "note": n} for f, n in self.notes],
                "ms_per_image": {k: round(v, 3) for k, v in self.ms_per_image().items()},
                "images_per_s": round(self.images_per_s, 3), "wall_s": round(self.wall_s, 3),
                "model_load_s": round(self.model_load_s, 3), "device": self.device, "weights": self.weights,
                "interrupted": self.interrupted, "error": self.error, "exit_code": self.exit_code}


def format_summary(summary: InferenceSummary) -> str:
    """Human-readable end-of-run report."""
    ms = summary.ms_per_image()
    lines = [f"images: {summary.processed} done, {len(summary.skipped)} skipped of {summary.total_files}; "
             f"faces found: {summary.faces}"
             + (("  [terminated (SIGTERM)]" if summary.interrupt_status == Terminated.exit_status else "  [interrupted]")
                if summary.interrupted else "")]
    for name, reason in summary.skipped:
        lines.append(f"  skipped {escape_name(name)}: {reason}")
    for name, note in summary.notes:
        lines.append(f"  note {escape_name(name)}: {note}")
    lines.append("ms/img: " + ", ".join(f"{key} {ms[key]:.1f}" for key in TIMING_KEYS)
                 + " (load runs in DataLoader workers and write on background threads, overlapping the "
                   "network; masks: segmentation time per graph plus cutting crops and masks)")
    lines.append(f"throughput: {summary.images_per_s:.2f} images/s ({summary.processed} "
                 f"image{'' if summary.processed == 1 else 's'} in "
                 f"{summary.wall_s:.2f} s on {summary.device}; model load {summary.model_load_s:.2f} s)")
    lines.append(f"weights: {escape_name(summary.weights)}")
    lines.append(f"results: {escape_name(summary.output_folder)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclass
class FaceMaskResult:
    """Mask-stage output of one face (see :func:`utils.face_mask.masks_of_faces`)."""

    face_box: tuple[int, int, int, int]   # in head-crop coordinates
    head_box: tuple[int, int, int, int]   # in image coordinates
    face_mask: np.ndarray                 # (h, w) uint8 0/255, face-crop size
    head_mask: np.ndarray                 # (H, W) uint8 0/255, head-crop size


@dataclass
class ImageResult:
    """One processed image of :func:`run_inference`."""

    name: str                      # path relative to --inference_dir
    path: str
    shape: tuple[int, ...]         # original (H, W, 3)
    detections: Any                # models.detector.Detections, original-image pixels
    masks: list[FaceMaskResult] | None = None


@dataclass
class InferenceRun:
    """Everything :func:`run_inference` produced: per-image results in input order + summary."""

    results: list[ImageResult]
    summary: InferenceSummary


def _warn(bar, message: str) -> None:
    bar.write(f"warning: {message}", file=sys.stderr)


def masks_overlap_network(device: torch.device) -> bool:
    """Whether the mask stage segments an image's head crops while the network runs the next
    images (on CUDA, where the network leaves the CPU cores free), or finishes each image before
    the next (on the CPU, where the segmentation threads and PyTorch's would share the cores: on
    the 2-core machine the 24 photos ran at 4.60 and 4.15 images/s overlapped against 5.52 and
    5.14 image by image, ``tools/benchmark_masks.py``, 2026-11-28)."""
    return device.type == "cuda"


#: Images of the mask stage waiting for their segmentation, per segmentation thread, before
#: :meth:`_Runner.finish_masks` waits for the oldest (bounds the images held in memory).
MAX_PENDING_MASKS_PER_THREAD = 4


def _mask_stage_error(record: ImageRecord, error: Exception) -> RuntimeError:
    return RuntimeError(f"mask stage failed on {escape_name(record.name)}: {error}")


def _done_future(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


@dataclass
class _PendingMasks:
    """An image of the mask stage: its head boxes, crops and the futures of their masks."""

    record: ImageRecord
    result: ImageResult
    heads: list[tuple[int, int, int, int]]
    crops: list[np.ndarray]
    futures: list[Future]


class _Runner:
    """The main loop of :func:`run_inference` (state shared by its steps)."""

    def __init__(self, args: Any, detector: Any, output: Path, names: list[str], collect: bool,
                 summary: InferenceSummary, bar) -> None:
        self.args = args
        self.detector = detector
        self.output = output
        self.collect = collect
        self.summary = summary
        self.bar = bar
        self.mask = bool(args.mask or args.save_mask)
        self.stems = crop_stems(names)
        self.results: dict[int, ImageResult] = {}
        self.segmenter = None
        self.writer = BackgroundWriter(summary.timings)
        self.in_flight: tuple[list[ImageRecord], Any] | None = None  # (batch, FaceDetector.submit handle)
        self.pending_masks: deque[_PendingMasks] = deque()  # images whose head crops are being segmented
        self.overlap_masks = masks_overlap_network(torch.device(getattr(detector, "device", None) or "cpu"))

    def skip(self, record: ImageRecord, reason: str) -> None:
        self.summary.skipped.append((record.name, reason))
        _warn(self.bar, f"skipped {escape_name(record.name)}: {reason}")
        self.bar.update(1)

    def detect_queued(self, batch: list[ImageRecord]) -> None:
        """:meth:`detect` with one batch in flight: this batch's forward passes are queued
        (``FaceDetector.submit``) before the batch queued earlier is finished (post-processing,
        masks, drawings, files), so that a GPU computes them meanwhile. Out of memory, or a
        detector without ``submit``: :meth:`detect` and its fallbacks."""
        submit = getattr(self.detector, "submit", None)
        handle = unless_out_of_memory(submit, [r.net_image for r in batch]) if submit is not None else None
        self.finish_queued()
        if handle is None:
            self.detect(batch)
        else:
            self.in_flight = (batch, handle)

    def finish_queued(self) -> None:
        """Finish the batch in flight, if any (its post-processing out of memory: :meth:`detect` again)."""
        if self.in_flight is None:
            return
        batch, handle = self.in_flight
        self.in_flight = None
        found = unless_out_of_memory(handle.result)
        if found is None:
            self._free_device_memory()
            self.detect(batch)
            return
        for record, detections in zip(batch, found):
            self.finish(record, detections.rescaled(*record.net_scale))

    def detect(self, batch: list[ImageRecord]) -> None:
        """Detect faces in a batch (same-size images go in one forward pass), then finish each."""
        found = unless_out_of_memory(self.detector.detect_batch, [r.net_image for r in batch])
        if found is None:  # out of memory: one image at a time, then smaller
            self._free_device_memory()
            if len(batch) > 1:
                for record in batch:
                    self.detect([record])
                return
            found = [self._detect_downscaled(batch[0])]
            if found[0] is None:
                return
        for record, detections in zip(batch, found):
            self.finish(record, detections.rescaled(*record.net_scale))

    def _free_device_memory(self) -> None:
        release = getattr(self.detector, "release_memory", None)
        if release is not None:
            release()

    def _detect_downscaled(self, record: ImageRecord, attempts: int = 3):
        """One image that ran out of memory: again at its size (the memory freed above may be
        enough), then at half size up to ``attempts`` times."""
        found = unless_out_of_memory(self.detector.detect_batch, [record.net_image])
        if found is not None:
            return found[0]
        image, scale = record.net_image, record.net_scale
        for _ in range(attempts):
            self._free_device_memory()
            h, w = image.shape[:2]
            if min(h, w) < 32:
                break
            image = unless_out_of_memory(lambda: cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
            if image is None:
                break
            scale = (scale[0] * (w // 2) / w, scale[1] * (h // 2) / h)
            found = unless_out_of_memory(self.detector.detect_batch, [image])
            if found is None:
                continue
            detections = found[0]
            record.net_scale = scale
            note = f"out of memory at {w}x{h}: detected at {w // 2}x{h // 2} (boxes mapped back)"
            record.notes.append(note)
            _warn(self.bar, f"{escape_name(record.name)}: {note}")
            return detections
        self.skip(record, "out of memory even after downscaling (try --max_size)")
        return None

    def finish(self, record: ImageRecord, detections: Any) -> None:
        """Image outputs of one image whose detections are known; with masks, its head crops go to
        the segmentation threads and the image is completed by :meth:`finish_masks`."""
        args, image = self.args, record.image
        result = ImageResult(record.name, record.path, tuple(image.shape), detections)
        if args.save_img:
            self.writer.write(self.output / "result_images" / record.name,
                              lambda: draw_detections(image, detections))
        if args.save_aligned:
            self.write_aligned(record, detections)
        if self.mask:
            record.net_image = None  # only the original is cut into head crops
            self.queue_masks(record, result)
        else:
            self.complete(record, result)

    def queue_masks(self, record: ImageRecord, result: ImageResult) -> None:
        """Hand the image's head crops to the :class:`utils.face_mask.SegmenterPool` (graphs for the
        whole run, one per core, at most 8) and complete the images whose masks are ready. With
        :func:`masks_overlap_network` the network goes on meanwhile and the graphs segment the crops
        of several images at once; otherwise this image's masks are waited for."""
        from utils.face_mask import SegmenterPool, head_crops  # noqa: PLC0415

        if self.segmenter is None:
            self.segmenter = SegmenterPool()
        started = time.perf_counter()
        heads, crops = head_crops(record.image, result.detections.boxes)
        self.summary.timings["masks"] += time.perf_counter() - started  # the graphs' time: busy_seconds
        if self.overlap_masks:
            futures = self.segmenter.submit(crops)
        else:
            try:
                futures = [_done_future(mask) for mask in self.segmenter.segment_all(crops)]
            except Exception as error:
                raise _mask_stage_error(record, error) from error
        self.pending_masks.append(_PendingMasks(record, result, heads, crops, futures))
        self.finish_masks()

    def finish_masks(self, wait: bool = False) -> None:
        """Complete, in order, the queued images whose masks are ready, waiting for the oldest while
        more than :data:`MAX_PENDING_MASKS_PER_THREAD` images per segmentation thread are queued
        (``wait``: for all of them). A segmentation error is raised here, naming its image."""
        from utils.face_mask import mask_parts  # noqa: PLC0415

        limit = 0 if wait else MAX_PENDING_MASKS_PER_THREAD * self.segmenter.threads
        while self.pending_masks:
            job = self.pending_masks[0]
            if len(self.pending_masks) <= limit and not all(future.done() for future in job.futures):
                return
            wait_for(job.futures)  # an interruption here leaves the image queued
            self.pending_masks.popleft()
            started = time.perf_counter()
            record, boxes = job.record, job.result.detections.boxes
            try:
                head_masks = [future.result() for future in job.futures]
            except Exception as error:
                raise _mask_stage_error(record, error) from error
            job.result.masks = self.mask_outputs(record, mask_parts(boxes, job.heads, job.crops, head_masks))
            self.summary.timings["masks"] += time.perf_counter() - started
            self.complete(record, job.result)

    def mask_outputs(self, record: ImageRecord, faces: list[dict[str, Any]]) -> list[FaceMaskResult]:
        """The :class:`FaceMaskResult` of each face; with ``--save_mask`` its crops and masks are written."""
        out = []
        stem = self.stems[record.name]
        extension = Path(record.name).suffix
        for index, parts in enumerate(faces):
            out.append(FaceMaskResult(parts["face_box"], parts["head_box"], parts["face_mask"], parts["head_mask"]))
            if self.args.save_mask:
                base = f"{stem}_{index}"
                for folder, name, key in (("masks", f"{base}.png", "face_mask"),
                                          ("head_masks", f"{base}.png", "head_mask"),
                                          ("faces", f"{base}{extension}", "face"),
                                          ("heads", f"{base}{extension}", "head")):
                    self.writer.write(self.output / folder / name, lambda array=parts[key]: array)
        return out

    def drop_pending_masks(self) -> None:
        """Give up the queued images (an interrupted run): their crops not yet segmented are not."""
        for job in self.pending_masks:
            for future in job.futures:
                future.cancel()
        self.pending_masks.clear()

    def complete(self, record: ImageRecord, result: ImageResult) -> None:
        """Record a finished image (its result, notes and counts) and release its pixels."""
        if not self.collect:
            result.masks = None
        self.results[record.index] = result
        for note in record.notes:
            self.summary.notes.append((record.name, note))
        self.summary.processed += 1
        self.summary.faces += len(result.detections)
        self.summary.timings["load"] += record.load_s
        record.image = record.net_image = None
        self.bar.update(1)

    def write_aligned(self, record: ImageRecord, detections: Any) -> None:
        from utils.face_align import align_face  # noqa: PLC0415

        image, stem, extension = record.image, self.stems[record.name], Path(record.name).suffix
        for index, points in enumerate(detections.landmarks):
            self.writer.write(self.output / "aligned" / f"{stem}_{index}{extension}",
                              lambda points=points: align_face(image, points, self.args.aligned_size))

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            if self.segmenter is not None:
                threads = self.segmenter.threads
                self.segmenter.close()
                # the graphs' segmentation time per graph: the stage's time when they all work at once
                self.summary.timings["masks"] += self.segmenter.busy_seconds / threads
                self.segmenter = None


def complete_args(args: Any = None, **overrides: Any) -> argparse.Namespace:
    """``args`` with every inference option present (missing ones get their defaults), so a
    notebook can pass a hand-made ``Namespace(inference_dir=..., weights=...)`` (or a dict).

    The values given are checked as the command line checks them (strings are converted, e.g.
    ``batch_size="4"``; ``None`` stands for the default); an unknown option name (a typo would
    otherwise be ignored) or a value the command line refuses raises :class:`InferenceError`."""
    parser = build_parser("inference")
    full = parser.parse_args([])
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    if args is not None and not isinstance(args, (argparse.Namespace, Mapping)):
        raise InferenceError(f"expected an argparse.Namespace or a dict of options, got {type(args).__name__}")
    given = {**(dict(args) if isinstance(args, Mapping) else vars(args or argparse.Namespace())), **overrides}
    unknown = sorted(set(given) - set(actions))
    if unknown:
        close = {name: difflib.get_close_matches(name, list(actions), n=1) for name in unknown}
        raise InferenceError("unknown inference option(s): " + ", ".join(
            name + (f" (did you mean {close[name][0]}?)" if close[name] else "") for name in unknown))
    for key, value in given.items():
        action = actions[key]
        if value is None:
            continue  # the default, as on a command line without the option
        if action.type is not None or action.choices:
            try:
                converted = action.type(value if isinstance(value, bool) else str(value)) if action.type else value
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                raise InferenceError(f"{key}={value!r}: {one_line(error) or 'invalid value'}") from None
            if action.choices and converted not in action.choices:
                raise InferenceError(f"{key}={value!r}: expected one of {', '.join(map(str, action.choices))}")
            value = converted  # as the command line would hold it (e.g. half=1 -> True)
        setattr(full, key, value)
    try:
        check_option_combinations("inference", full)
    except UsageError as error:
        raise InferenceError(str(error)) from None
    return full


def run_inference(args: Any, collect: bool = True, progress: bool | None = None) -> InferenceRun:
    """Run the detector (and the mask stage) over ``args.inference_dir`` and write the outputs.

    ``args`` is the namespace of ``config.parse_args('inference', ...)``, or any namespace holding some
    of its options (the others take their defaults, see :func:`complete_args`). ``collect=False`` drops
    the masks from the returned results as soon as they are written (the detections are kept).
    Raises :class:`InferenceError` / ``CheckpointError`` (one-line messages) when the run cannot
    start; bad image files are skipped and listed in the summary instead.
    """
    from models.detector import FaceDetector, resolve_device, use_device  # noqa: PLC0415 (keeps imports light)
    from config import architecture_overrides  # noqa: PLC0415

    args = complete_args(args)  # raises InferenceError without --inference_dir
    root = Path(args.inference_dir)
    check_input(root)
    output = Path(args.inference_save_folder)
    unreadable: list[tuple[str, str]] = []
    earlier_results: list[str] = []
    link_loops: list[str] = []
    earlier_outputs = earlier_output_subfolders(root)
    try:
        # the output folder (when inside the input), the result sub-folders of earlier runs there
        # (when it is the input folder itself) and other output folders of earlier runs below the
        # input folder (drawn images would be detected again) are outputs, not inputs
        files = find_images(root, exclude=[output, *(output / name for name in RESULT_SUBFOLDERS),
                                           *earlier_outputs],
                            unreadable=unreadable, marker_files=(DETECTIONS_JSON, SUMMARY_JSON),
                            marked=earlier_results, loops=link_loops)
    except UnreadableInputError as error:
        raise InferenceError(error.strerror) from None
    if not files:
        also = (f" ({len(unreadable)} folder(s) could not be read, e.g. {unreadable[0][0]}: "
                f"{unreadable[0][1]})" if unreadable else "")
        also += (f" ({len(earlier_results)} folder(s) of earlier results not searched, e.g. {earlier_results[0]})"
                 if earlier_results else "")
        kinds = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        if root.is_file():
            raise InferenceError(f"--inference_dir {root} is a file but not an image ({kinds}); "
                                 "give an image or a folder")
        raise InferenceError(f"no images ({kinds}) found in {root}{also}")
    try:
        device = resolve_device(args.device, args.gpu_num)
        use_device(device)
    except (ValueError, RuntimeError) as error:
        raise InferenceError(f"unusable device: {error}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InferenceError(f"unusable device: cuda:{device.index} requested (--gpu_num) but only "
                             f"{torch.cuda.device_count()} GPU(s) exist")
    weights = checkpoint_for_run(args.weights, args.model_weight, args.experiment_name)
    check_output_folder(output, args.exist_ok)
    if args.mask or args.save_mask:  # fail before any work when mediapipe is missing
        from utils.face_mask import selfie_segmentation_module  # noqa: PLC0415
        try:
            selfie_segmentation_module()
        except RuntimeError as error:
            raise InferenceError(f"--mask: {error}") from None

    # the output folder must take files before any image is processed (results are written at the end)
    created = prepare_output_folder(output, (["result_images"] if args.save_img else [])
                                    + (list(MASK_SUBFOLDERS) if args.save_mask else [])
                                    + (["aligned"] if args.save_aligned else []))

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="half precision is only used on CUDA")
            detector = FaceDetector(
                weights, device=device, overrides=architecture_overrides(args),
                confidence_threshold=args.confidence_threshold, nms_threshold=args.nms_threshold,
                top_k=detection_limit(args.top_k), keep_top_k=detection_limit(args.keep_top_k), max_size=args.max_size,
                batch_size=args.batch_size, half=args.half, channels_last=getattr(args, "channels_last", None),
                cuda_graphs=getattr(args, "cuda_graphs", True), pad_to=max(1, getattr(args, "pad_to", 0)))
    except BaseException:
        remove_created_folders(created)  # nothing was run: leave no empty output folder behind
        raise
    summary = InferenceSummary(output_folder=str(output), total_files=len(files) + len(unreadable),
                               device=str(device), weights=str(resolve_weights(weights)), skipped=list(unreadable))
    summary.model_load_s = time.perf_counter() - started

    dataset = ImageFolderDataset(files, root, getattr(args, "max_pixels", DEFAULT_MAX_PIXELS))
    loader = make_loader(dataset, batch_size=args.batch_size, workers=args.workers)
    print(f"weights: {escape_name(summary.weights)} ({detector.config}) on {device}", file=sys.stderr, flush=True)
    bar = progress_bar(len(files), "inference", progress is not False)  # None: drawn, as True
    for name, reason in unreadable:
        _warn(bar, f"skipped {escape_name(name)}: {reason}")
    for name, note in ([(name, EARLIER_RESULTS_NOTE) for name in earlier_results]
                       + [(folder.name + "/", EARLIER_OUTPUTS_NOTE) for folder in earlier_outputs]
                       + [(name, LINK_LOOP_NOTE) for name in link_loops]):
        summary.notes.append((name, note))
        _warn(bar, f"{escape_name(name)}: {note}")
    runner = _Runner(args, detector, output, dataset.names, collect, summary, bar)
    # --pad_to groups by canvas too: the detector runs each call's images in one padded pass
    grouped = args.infer_imsize_same or detector.pad_to > 1
    batcher = SameSizeBatcher(args.batch_size, pad_to=detector.pad_to) if grouped else None
    for warning in moot_option_warnings(args, device, {"save_aligned": "aligned_size"}):
        _warn(bar, warning)
    loop_started = time.perf_counter()
    loop_error: BaseException | None = None
    terminate = sigterm_raises_terminated().__enter__()  # SIGTERM (a batch job's time limit) as Ctrl-C
    try:
        for records in start_loader(loader):
            good = []
            for record in records:
                if record.ok:
                    good.append(record)
                else:
                    summary.timings["load"] += record.load_s
                    runner.skip(record, record.error)
                for note in record.notes:
                    _warn(bar, f"{escape_name(record.name)}: {note}")
            if batcher is None:
                if good:
                    runner.detect_queued(good)
            else:
                for record in good:
                    for batch in batcher.add(record):
                        runner.detect_queued(batch)
        if batcher is not None:
            for batch in batcher.flush():
                runner.detect_queued(batch)
        runner.finish_queued()
        runner.finish_masks(wait=True)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (utils.errors.Terminated)
        summary.interrupted = True
        summary.interrupt_status = getattr(stop, "exit_status", EXIT_INTERRUPTED)
    except BaseException as error:  # e.g. a CUDA error or a killed decoding worker: outputs so far are kept
        summary.error = f"{type(error).__name__}: {error}"
        loop_error = error
        raise
    finally:
        terminate.__exit__()
        if runner.in_flight is not None:  # stopped part-way (Ctrl-C, an error): the batch already queued still counts
            with contextlib.suppress(Exception):
                runner.finish_queued()
        if summary.interrupted:  # Ctrl-C: the images whose masks are not made yet are not waited for
            runner.drop_pending_masks()
        while runner.pending_masks:  # an error: the images whose masks are being made count (one failed: the others)
            with contextlib.suppress(Exception):
                runner.finish_masks(wait=True)
        close_error = None
        try:
            runner.close()  # the last image writes can fail here, after the loop
        except BaseException as error:
            close_error = error
            summary.error = summary.error or f"{type(error).__name__}: {error}"
        bar.close()
        summary.wall_s = time.perf_counter() - loop_started
        for key in ("preprocess", "forward", "postprocess"):
            summary.timings[key] = float(detector.timings.get(key, 0.0))
        ordered = [runner.results[i] for i in sorted(runner.results)]
        named = [(r.name, r.detections) for r in ordered]
        # each results file on its own: one that cannot be written (disk full, permissions) does not
        # cost the others, and summary.json (written last) records it
        write_error = None
        if not (summary.processed or summary.interrupted or summary.error) and summary.skipped:
            name, reason = summary.skipped[0]
            summary.error = (f"none of the {summary.total_files} files found could be processed "
                             f"(e.g. {escape_name(name)}: {reason}; each is listed in the summary)")
        for path, write in ((output / results_txt_name(args.experiment_name), write_results_txt),
                            (output / DETECTIONS_JSON, write_detections_json)):
            try:
                write(path, named)
            except OSError as error:
                write_error = write_error or error
                summary.error = summary.error or str(error)  # write_file's "cannot write PATH: reason"
        try:
            _atomic_write_text(output / SUMMARY_JSON, json.dumps(summary.to_dict(), indent=1))
        except OSError as error:
            write_error = write_error or error
        if loop_error is None and (close_error or write_error) is not None:
            raise close_error or write_error
    return InferenceRun(ordered, summary)


def legacy_outputs(run: InferenceRun) -> tuple[list, list, list, list, list]:
    """The original ``inference()`` return value built from a run (see ``inference.inference``)."""
    result_bboxes = [r.detections.boxes.astype(int) for r in run.results]
    face_bboxes, face_masks, head_bboxes, head_masks = [], [], [], []
    if any(r.masks is not None for r in run.results):
        for r in run.results:
            masks = r.masks or []
            face_bboxes.append([list(m.face_box) for m in masks])
            face_masks.append([np.repeat(m.face_mask[:, :, None], 3, axis=2) for m in masks])
            head_bboxes.append([list(m.head_box) for m in masks])
            head_masks.append([np.repeat(m.head_mask[:, :, None], 3, axis=2) for m in masks])
    return result_bboxes, face_bboxes, face_masks, head_bboxes, head_masks
