"""The reusable parts of ``inference.py``: file discovery, image loading in DataLoader workers,
same-size batching, output writers, drawing, the run loop and its summary.

Output folder layout (``--inference_save_folder OUT``)::

    OUT/<experiment>_inference_results.txt   image name line, then "x1 y1 x2 y2 score" per face
    OUT/detections.json                      {"<relative path>": [{"box", "score", "landmarks"}]}
    OUT/summary.json                         counts, skipped files with reasons, timings
    OUT/result_images/<relative path>        --save_img: boxes, scores and landmarks drawn
    OUT/masks/<rel dir>/<stem>_<i>.png       --save_mask: face masks (0/255)
    OUT/faces/<rel dir>/<stem>_<i>.<ext>     --save_mask: face crops
    OUT/heads/<rel dir>/<stem>_<i>.<ext>     --save_mask: head crops (face box x4, clipped)
    OUT/head_masks/<rel dir>/<stem>_<i>.png  --save_mask: head masks (0/255)

Exit codes of the command line: :data:`EXIT_OK` (0) every image processed, :data:`EXIT_ERROR`
(1) nothing was run (no images, missing weights, unknown device, output folder in use ...),
:data:`EXIT_USAGE` (2) bad command-line option, :data:`EXIT_SKIPPED` (3) finished but some
files were skipped (unreadable, truncated, empty, not images, out of memory), 130 interrupted.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import time
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from config import EXIT_INTERRUPTED, EXIT_OK
from utils.checkpoint import checkpoint_for_run
from utils.image_io import IMAGE_EXTENSIONS, ImageReadError, read_image

EXIT_SKIPPED = 3  # the run finished but some files were skipped (the others: config.EXIT_*)

RESULT_SUBFOLDERS = ("result_images", "masks", "faces", "heads", "head_masks")
RESULTS_TXT_SUFFIX = "_inference_results.txt"
DETECTIONS_JSON = "detections.json"
SUMMARY_JSON = "summary.json"
DEFAULT_MAX_PIXELS = 36_000_000  # larger images are downscaled for the network (with a warning)


class InferenceError(RuntimeError):
    """A run cannot start (or go on); the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------
# File discovery
# --------------------------------------------------------------------------------------------

def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: str | Path, exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Image files under ``root`` (recursively; jpg, jpeg, png, bmp, webp in any letter case),
    sorted by relative path. ``root`` may also be a single image file. Folders in ``exclude``
    (e.g. the output folder inside the input folder) are not searched."""
    root = Path(root)
    if root.is_file():
        return [root] if is_image_file(root) else []
    excluded = {os.path.realpath(p) for p in exclude}
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if os.path.realpath(os.path.join(folder, d)) not in excluded)
        found.extend(Path(folder) / name for name in files if is_image_file(name))
    return sorted(found, key=lambda p: relative_name(p, root))


def relative_name(path: str | Path, root: str | Path) -> str:
    """``path`` relative to the input folder, with ``/`` separators (the file name when ``root``
    is the file itself). This is the image's key in every output."""
    path, root = Path(path), Path(root)
    if path == root:
        return path.name
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------------------------------
# Truncated files (cv2 decodes a truncated JPEG without complaint, filling the rest with grey)
# --------------------------------------------------------------------------------------------

_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # a marker inside/after entropy-coded data
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_is_complete(data: bytes) -> bool:
    """Whether a JPEG byte string reaches its end-of-image marker (walking the segments, so an
    EXIF thumbnail's marker or data after the end, e.g. motion photos, do not mislead)."""
    n, pos = len(data), 2
    while pos < n:
        if data[pos] != 0xFF:  # junk between segments: resynchronise on the next marker
            match = _JPEG_NEXT_MARKER.search(data, pos)
            if match is None:
                return False
            pos = match.start()
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return False
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            continue
        if pos + 2 > n:
            return False
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return False
        pos += length
        if pos > n:
            return False
        if marker == 0xDA:  # start of scan: skip the entropy-coded data
            match = _JPEG_NEXT_MARKER.search(data, pos)
            if match is None:
                return False
            pos = match.start()
    return False


def png_is_complete(path: str | Path) -> bool:
    """Whether a PNG file's chunks run up to its IEND chunk."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        if handle.read(8) != _PNG_SIGNATURE:
            return True  # not a PNG: the decoder decides
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return False
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                return True
            position = handle.tell() + length + 4  # data + CRC
            if position > size:
                return False
            handle.seek(position)


def truncation_problem(path: str | Path) -> str | None:
    """A reason when a JPEG/PNG file is cut short, else ``None`` (other formats: the decoder
    reports truncation itself)."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(8)
    if head.startswith(b"\xff\xd8"):
        if not jpeg_is_complete(path.read_bytes()):
            return "truncated JPEG (no end-of-image marker)"
    elif head.startswith(_PNG_SIGNATURE):
        if not png_is_complete(path):
            return "truncated PNG (no IEND chunk)"
    return None


# --------------------------------------------------------------------------------------------
# Loading images in DataLoader workers
# --------------------------------------------------------------------------------------------

@dataclass
class ImageRecord:
    """One input file after loading: the image or the reason it was skipped.

    ``image`` is the decoded BGR uint8 image at its original size; ``net_image`` what the
    detector gets (the same array unless it had more than ``max_pixels`` pixels, then downscaled
    by ``net_scale`` = (sx, sy)); ``notes`` are warnings (e.g. downscaled).
    """

    index: int
    name: str
    path: str
    image: np.ndarray | None = None
    net_image: np.ndarray | None = None
    net_scale: tuple[float, float] = (1.0, 1.0)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    load_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _reason(error: BaseException, path: str) -> str:
    message = str(error) or type(error).__name__
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def downscale_for_memory(image: np.ndarray, max_pixels: int | None) -> tuple[np.ndarray, tuple[float, float]]:
    """``image`` resized (INTER_AREA) to at most ``max_pixels`` pixels, and the (sx, sy) applied."""
    height, width = image.shape[:2]
    if not max_pixels or height * width <= max_pixels:
        return image, (1.0, 1.0)
    scale = math.sqrt(max_pixels / (height * width))
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return resized, (new_w / width, new_h / height)


def load_record(index: int, path: str | Path, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageRecord:
    """Read one file into an :class:`ImageRecord`; never raises for a bad file."""
    started = time.perf_counter()
    record = ImageRecord(index=index, name=name, path=str(path))
    try:
        problem = truncation_problem(path) if Path(path).is_file() and Path(path).stat().st_size else None
        if problem is not None:
            raise ImageReadError(problem)
        image = read_image(path)
        record.image = image
        record.net_image, record.net_scale = downscale_for_memory(image, max_pixels)
        if record.net_scale != (1.0, 1.0):
            h, w = image.shape[:2]
            nh, nw = record.net_image.shape[:2]
            record.notes.append(f"{w}x{h} has more than {max_pixels} pixels: detected at {nw}x{nh} "
                                f"(boxes mapped back; use --max_size to choose the scale)")
    except MemoryError:
        record.image = record.net_image = None
        record.error = "out of memory while decoding"
    except (ImageReadError, OSError, ValueError, cv2.error) as error:
        record.image = record.net_image = None
        record.error = _reason(error, str(path))
    record.load_s = time.perf_counter() - started
    return record


class ImageFolderDataset(Dataset):
    """Map-style dataset over image files; items are :class:`ImageRecord` (errors carried)."""

    def __init__(self, files: Sequence[str | Path], root: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.files = [str(f) for f in files]
        self.names = [relative_name(f, root) for f in files]
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ImageRecord:
        return load_record(index, self.files[index], self.names[index], self.max_pixels)


def collate_records(batch: list[ImageRecord]) -> list[ImageRecord]:
    """Keep the records as they are: numpy images of any size, per-file errors included."""
    return list(batch)


def make_loader(dataset: ImageFolderDataset, batch_size: int = 1, workers: int = 2) -> DataLoader:
    """A DataLoader decoding images in ``workers`` processes (0: in this process), in order.

    Iterate it with :func:`start_loader`, which keeps OpenCV's thread pool out of the forked
    workers.
    """
    workers = min(workers, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_records, prefetch_factor=2 if workers else None,
                      persistent_workers=False)


def start_loader(loader: DataLoader) -> Iterator[list[ImageRecord]]:
    """``iter(loader)`` with OpenCV's worker threads stopped while the workers are forked.

    OpenCV's pthreads pool has no fork handler: a forked child inherits the pool's bookkeeping
    (and possibly a locked mutex) without its threads, and ``cv2.setNumThreads`` there blocks
    forever. ``setNumThreads(1)`` joins the pool's threads in this process first, so the workers
    start clean and decode single-threaded; the previous setting is restored right after.
    """
    if loader.num_workers == 0:
        return iter(loader)
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return iter(loader)  # the worker processes are forked here
    finally:
        cv2.setNumThreads(previous)


class SameSizeBatcher:
    """Groups records by network-input size into batches of ``batch_size`` (``--infer_imsize_same``).

    :meth:`add` returns the batches that became full; at most ``max_pending`` images wait (the
    largest group is released early beyond that); :meth:`flush` returns what is left.
    """

    def __init__(self, batch_size: int, max_pending: int | None = None) -> None:
        self.batch_size = batch_size
        self.max_pending = max_pending or max(4 * batch_size, 16)
        self.groups: OrderedDict[tuple[int, ...], list[ImageRecord]] = OrderedDict()
        self.pending = 0

    def add(self, record: ImageRecord) -> list[list[ImageRecord]]:
        key = tuple(record.net_image.shape)
        self.groups.setdefault(key, []).append(record)
        self.pending += 1
        ready = []
        if len(self.groups[key]) >= self.batch_size:
            ready.append(self._pop(key))
        while self.pending > self.max_pending:
            ready.append(self._pop(max(self.groups, key=lambda k: len(self.groups[k]))))
        return ready

    def flush(self) -> list[list[ImageRecord]]:
        return [self._pop(key) for key in list(self.groups)]

    def _pop(self, key: tuple[int, ...]) -> list[ImageRecord]:
        batch = self.groups.pop(key)
        self.pending -= len(batch)
        return batch


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
                             f"or pass --exist_ok true to write into it")
    return folder


def write_image(path: str | Path, image: np.ndarray) -> None:
    """``cv2.imwrite`` that creates folders, works with non-ASCII paths and raises on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    encoded.tofile(str(path))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_results_txt(results: Iterable[tuple[str, Any]]) -> str:
    """The original project's text format: the image name, then ``x1 y1 x2 y2 score`` per face
    (coordinates truncated to integers, score with 6 decimals)."""
    lines = []
    for name, detections in results:
        lines.append(name)
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


def draw_detections(image: np.ndarray, detections: Any) -> np.ndarray:
    """A copy of ``image`` with boxes (red), scores and the five landmarks drawn, as the public
    RetinaFace demo draws them."""
    canvas = image.copy()
    for box, score, points in zip(detections.boxes, detections.scores, detections.landmarks):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 0, 255), 2)
        text_x = min(max(x1, 0), max(canvas.shape[1] - 60, 0))  # keep the score readable at borders
        text_y = min(max(y1, 0) + 12, canvas.shape[0] - 2)
        cv2.putText(canvas, f"{float(score):.4f}", (text_x, text_y), cv2.FONT_HERSHEY_DUPLEX, 0.5, (255, 255, 255))
        for (x, y), colour in zip(points, LANDMARK_COLOURS):
            cv2.circle(canvas, (int(round(float(x))), int(round(float(y)))), 1, colour, 4)
    return canvas


def crop_stems(names: Sequence[str]) -> dict[str, str]:
    """``<rel dir>/<stem>`` used to name an image's crops and masks; when two images of one
    folder share a stem (``a.jpg``, ``a.png``) their extension is added (``a_jpg``, ``a_png``)."""
    stems = {name: str(Path(name).with_suffix("").as_posix()) for name in names}
    counts: dict[str, int] = defaultdict(int)
    for stem in stems.values():
        counts[stem] += 1
    return {name: stem if counts[stem] == 1 else f"{stem}_{Path(name).suffix.lstrip('.')}"
            for name, stem in stems.items()}


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
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
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
                "model_load_s": round(self.model_load_s, 3), "device": self.device,
                "interrupted": self.interrupted, "exit_code": self.exit_code}


def format_summary(summary: InferenceSummary) -> str:
    """Human-readable end-of-run report."""
    ms = summary.ms_per_image()
    lines = [f"images: {summary.processed} done, {len(summary.skipped)} skipped of {summary.total_files}; "
             f"faces found: {summary.faces}"
             + ("  [interrupted]" if summary.interrupted else "")]
    for name, reason in summary.skipped:
        lines.append(f"  skipped {name}: {reason}")
    for name, note in summary.notes:
        lines.append(f"  note {name}: {note}")
    lines.append("ms/img: " + ", ".join(f"{key} {ms[key]:.1f}" for key in TIMING_KEYS)
                 + f" (load runs in DataLoader workers, overlapping the network)")
    lines.append(f"throughput: {summary.images_per_s:.2f} images/s ({summary.processed} images in "
                 f"{summary.wall_s:.2f} s on {summary.device}; model load {summary.model_load_s:.2f} s)")
    lines.append(f"results: {summary.output_folder}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclass
class FaceMaskResult:
    """Mask-stage output of one face (see :func:`utils.face_mask.face_and_head_masks`)."""

    face_box: tuple[int, int, int, int]   # in head-crop coordinates
    head_box: tuple[int, int, int, int]   # in image coordinates
    face_mask: np.ndarray                 # (h, w) uint8 0/255, face-crop size
    head_mask: np.ndarray                 # (H, W) uint8 0/255, head-crop size


@dataclass
class ImageResult:
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


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def scale_detections(detections: Any, scale: tuple[float, float]) -> Any:
    """Detections found on an image resized by (sx, sy), in the original image's pixels."""
    sx, sy = scale
    if (sx, sy) == (1.0, 1.0) or len(detections) == 0:
        return detections
    factor = np.array([sx, sy], dtype=np.float32)
    boxes = (detections.boxes.reshape(-1, 2, 2) / factor).reshape(-1, 4)
    return type(detections)(boxes.astype(np.float32), detections.scores,
                            (detections.landmarks / factor).astype(np.float32))


def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, unit="img", desc="inference", file=sys.stderr, dynamic_ncols=True,
                disable=enabled is False)


def _warn(bar, message: str) -> None:
    bar.write(f"warning: {message}", file=sys.stderr)


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

    def skip(self, record: ImageRecord, reason: str) -> None:
        self.summary.skipped.append((record.name, reason))
        _warn(self.bar, f"skipped {record.name}: {reason}")
        self.bar.update(1)

    def detect(self, batch: list[ImageRecord]) -> None:
        """Detect faces in a batch (same-size images go in one forward pass), then finish each."""
        try:
            found = self.detector.detect_batch([r.net_image for r in batch])
        except Exception as error:  # noqa: BLE001 - only out-of-memory is handled here
            if not _is_out_of_memory(error):
                raise
            if len(batch) > 1:
                for record in batch:
                    self.detect([record])
                return
            found = [self._detect_downscaled(batch[0])]
            if found[0] is None:
                return
        for record, detections in zip(batch, found):
            self.finish(record, scale_detections(detections, record.net_scale))

    def _detect_downscaled(self, record: ImageRecord, attempts: int = 3):
        image, scale = record.net_image, record.net_scale
        for _ in range(attempts):
            if _is_cuda(self.detector):
                torch.cuda.empty_cache()
            h, w = image.shape[:2]
            if min(h, w) < 32:
                break
            image = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
            scale = (scale[0] * (w // 2) / w, scale[1] * (h // 2) / h)
            try:
                detections = self.detector.detect_batch([image])[0]
            except Exception as error:  # noqa: BLE001
                if not _is_out_of_memory(error):
                    raise
                continue
            record.net_scale = scale
            note = f"out of memory at {w}x{h}: detected at {w // 2}x{h // 2} (boxes mapped back)"
            record.notes.append(note)
            _warn(self.bar, f"{record.name}: {note}")
            return detections
        self.skip(record, "out of memory even after downscaling (try --max_size)")
        return None

    def finish(self, record: ImageRecord, detections: Any) -> None:
        """Masks and image outputs of one image whose detections are known."""
        args, image = self.args, record.image
        result = ImageResult(record.name, record.path, tuple(image.shape), detections)
        if self.mask:
            started = time.perf_counter()
            result.masks = self.masks(record, detections)
            self.summary.timings["masks"] += time.perf_counter() - started
        if args.save_img:
            started = time.perf_counter()
            write_image(self.output / "result_images" / record.name, draw_detections(image, detections))
            self.summary.timings["write"] += time.perf_counter() - started
        if not self.collect:
            result.masks = None
        self.results[record.index] = result
        for note in record.notes:
            self.summary.notes.append((record.name, note))
        self.summary.processed += 1
        self.summary.faces += len(detections)
        self.summary.timings["load"] += record.load_s
        record.image = record.net_image = None
        self.bar.update(1)

    def masks(self, record: ImageRecord, detections: Any) -> list[FaceMaskResult]:
        from utils.face_mask import HeadSegmenter, face_and_head_masks  # noqa: PLC0415

        if self.segmenter is None:
            self.segmenter = HeadSegmenter()  # one graph for the whole run
        image, out = record.image, []
        stem = self.stems[record.name]
        extension = Path(record.name).suffix
        for index, box in enumerate(detections.boxes):
            parts = face_and_head_masks(image, box, self.segmenter)
            out.append(FaceMaskResult(parts["face_box"], parts["head_box"], parts["face_mask"], parts["head_mask"]))
            if self.args.save_mask:
                started = time.perf_counter()
                base = f"{stem}_{index}"
                write_image(self.output / "masks" / f"{base}.png", parts["face_mask"])
                write_image(self.output / "head_masks" / f"{base}.png", parts["head_mask"])
                write_image(self.output / "faces" / f"{base}{extension}", parts["face"])
                write_image(self.output / "heads" / f"{base}{extension}", parts["head"])
                elapsed = time.perf_counter() - started
                self.summary.timings["write"] += elapsed
                self.summary.timings["masks"] -= elapsed  # finish() times the whole stage; writing is "write"
        return out

    def close(self) -> None:
        if self.segmenter is not None:
            self.segmenter.close()
            self.segmenter = None


def _is_cuda(detector: Any) -> bool:
    return getattr(getattr(detector, "device", None), "type", "") == "cuda"


def run_inference(args: Any, collect: bool = True, progress: bool | None = None) -> InferenceRun:
    """Run the detector (and the mask stage) over ``args.inference_dir`` and write the outputs.

    ``args`` is the namespace of ``config.parse_args('inference', ...)``. ``collect=False`` drops
    the masks from the returned results as soon as they are written (constant memory).
    Raises :class:`InferenceError` / ``CheckpointError`` (one-line messages) when the run cannot
    start; bad image files are skipped and listed in the summary instead.
    """
    from models.detector import FaceDetector, resolve_device  # noqa: PLC0415 (keeps imports light)
    from config import architecture_overrides  # noqa: PLC0415

    if not args.inference_dir:
        raise InferenceError("no input: pass --inference_dir DIR (a folder of images, searched recursively)")
    root = Path(args.inference_dir)
    if not root.exists():
        raise InferenceError(f"input folder not found: {root}")
    output = Path(args.inference_save_folder)
    files = find_images(root, exclude=[output])
    if not files:
        raise InferenceError(f"no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}) found in {root}")
    try:
        device = resolve_device(args.device, args.gpu_num)
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

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="half precision is only used on CUDA")
        detector = FaceDetector(
            weights, device=device, overrides=architecture_overrides(args),
            confidence_threshold=args.confidence_threshold, nms_threshold=args.nms_threshold,
            top_k=args.top_k, keep_top_k=args.keep_top_k, max_size=args.max_size,
            batch_size=args.batch_size, half=args.half)
    summary = InferenceSummary(output_folder=str(output), total_files=len(files), device=str(device))
    summary.model_load_s = time.perf_counter() - started
    output.mkdir(parents=True, exist_ok=True)

    dataset = ImageFolderDataset(files, root, getattr(args, "max_pixels", DEFAULT_MAX_PIXELS))
    loader = make_loader(dataset, batch_size=args.batch_size, workers=args.workers)
    bar = _progress(len(files), progress)
    runner = _Runner(args, detector, output, dataset.names, collect, summary, bar)
    batcher = SameSizeBatcher(args.batch_size) if args.infer_imsize_same else None
    if args.half and device.type != "cuda":
        _warn(bar, "--half is only used on CUDA; running in float32")
    loop_started = time.perf_counter()
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
                    _warn(bar, f"{record.name}: {note}")
            if batcher is None:
                if good:
                    runner.detect(good)
            else:
                for record in good:
                    for batch in batcher.add(record):
                        runner.detect(batch)
        if batcher is not None:
            for batch in batcher.flush():
                runner.detect(batch)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        runner.close()
        bar.close()
        summary.wall_s = time.perf_counter() - loop_started
        for key in ("preprocess", "forward", "postprocess"):
            summary.timings[key] = float(detector.timings.get(key, 0.0))
        ordered = [runner.results[i] for i in sorted(runner.results)]
        named = [(r.name, r.detections) for r in ordered]
        write_results_txt(output / results_txt_name(args.experiment_name), named)
        write_detections_json(output / DETECTIONS_JSON, named)
        _atomic_write_text(output / SUMMARY_JSON, json.dumps(summary.to_dict(), indent=1))
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
