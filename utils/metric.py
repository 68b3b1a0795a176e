"""WIDER FACE validation metric (easy / medium / hard AP), exact and vectorised.

This module reproduces, number for number, the python evaluation that the WIDER FACE community
uses (wondervictor's ``WiderFace-Evaluation``, bundled with Pytorch_Retinaface as
``widerface_evaluate/evaluation.py``), without its per-image, per-threshold python loops.

Protocol, per difficulty setting (``easy``, ``medium``, ``hard``):

* Ground truth comes from ``wider_face_val.mat`` (boxes ``x y w h`` in pixels, 61 events,
  3226 images) and ``wider_{easy,medium,hard}_val.mat`` (per image a 1-based *keep list* of the
  faces that belong to the setting). Faces outside the keep list are *ignored* faces.
* Prediction scores are min-max normalised over the whole prediction set (every array passed in),
  with the public tool's quirk that the minimum starts at 1 and the maximum at 0, i.e.
  ``lo = min(1, min score)``, ``hi = max(0, max score)``, ``s' = (s - lo) / (hi - lo)``
  (``nan`` for every score when ``hi == lo``, which then never passes a threshold).
* Per image, predictions are visited in descending score order (stable: equal scores keep their
  order of the input array; ``sort_predictions=False`` keeps the input order exactly like the
  public tool, which never sorts). Boxes ``x y w h`` become ``x1 y1 x2 y2`` by
  ``x2 = x1 + w``, ``y2 = y1 + h`` and overlaps use the ``+1`` pixel area convention:
  ``iw = min(x2, X2) - max(x1, X1) + 1``, ``ih`` likewise, IoU ``= iw*ih / (area_p + area_g - iw*ih)``
  with ``area = (x2 - x1 + 1) * (y2 - y1 + 1)`` when ``iw > 0`` and ``ih > 0``, else 0.
* Each prediction looks only at its best-overlap face (first one on ties). If that IoU is
  ``>= iou_threshold``: an ignored face makes the prediction neither a true nor a false positive
  (it is not counted as a proposal); a kept face not yet recalled becomes recalled; a kept face
  already recalled leaves the prediction a false positive. Otherwise the prediction is a false
  positive.
* Images with no ground-truth box or no prediction are skipped (their predictions count nowhere),
  but every evaluated image's keep-list length counts into the number of faces.
* For ``thresh_num`` (1000) thresholds ``th_t = 1 - (t + 1) / thresh_num`` each image contributes,
  at its last visited prediction with normalised score ``>= th_t``, the number of proposals up to
  and including it and the number of faces recalled so far. Sums over images give
  ``precision_t = recalled / proposals`` (``nan`` where there are no proposals, as numpy's
  ``0/0``) and ``recall_t = recalled / num_faces``.
* AP is the VOC area under the monotone precision envelope of that curve (``voc_ap``). A ``nan``
  precision propagates through the envelope like ``np.maximum`` does, exactly as in the public
  code; it never reaches the area because it only occurs where recall is still 0.

Coordinates are pixels, ``x`` to the right and ``y`` down; ``x y w h`` boxes are the official
WIDER FACE annotation / prediction-file convention.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from utils.text_file import read_utf8

__all__ = [
    "SETTINGS",
    "NUM_VAL_IMAGES",
    "GT_FILES",
    "WiderFaceGroundTruth",
    "PRCurve",
    "WiderFaceResult",
    "load_ground_truth",
    "write_prediction_file",
    "prediction_stem",
    "read_prediction_file",
    "read_prediction_dir",
    "boxes_xyxy_to_xywh",
    "normalize_scores",
    "bbox_overlaps_plus1",
    "voc_ap",
    "evaluate",
    "plot_pr_curves",
]

PathLike = Union[str, "os.PathLike[str]"]
Predictions = Mapping[str, Mapping[str, np.ndarray]]

#: The three WIDER FACE difficulty settings, in the order the public tool reports them.
SETTINGS: tuple[str, ...] = ("easy", "medium", "hard")
#: Number of images in the official WIDER FACE validation ground truth.
NUM_VAL_IMAGES = 3226

#: (prediction, face) pairs per IoU block: bounds the temporary memory (~40 bytes per pair).
_PAIR_CHUNK = 1 << 19
#: Images with more faces than this are matched one by one (broadcasting), the others batched.
_SMALL_IMAGE_FACES = 16

_GT_FILE = "wider_face_val.mat"
_SETTING_FILES = {s: f"wider_{s}_val.mat" for s in SETTINGS}
#: The official ground-truth files that a ground-truth folder holds.
GT_FILES: tuple[str, ...] = (_GT_FILE, *_SETTING_FILES.values())


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class WiderFaceGroundTruth:
    """Parsed WIDER FACE validation ground truth, stored flat.

    Attributes:
        events: event folder names (e.g. ``"0--Parade"``), in ``.mat`` order.
        image_event: ``(I,)`` int64, index into ``events`` of every image.
        image_stems: ``I`` image names without ``.jpg`` (e.g. ``"0_Parade_marchingband_1_465"``).
        boxes_xywh: ``(M, 4)`` float64 face boxes ``x y w h`` in pixels (top-left corner, width,
            height, as stored in the ``.mat``), all images concatenated.
        box_offsets: ``(I + 1,)`` int64; image ``i`` owns ``boxes_xywh[box_offsets[i]:box_offsets[i+1]]``.
        keep: setting -> ``(M,)`` bool, True where the face is in that setting's keep list
            (False = ignored face for that setting).
        keep_counts: setting -> ``(I,)`` int64, length of each image's keep list (what the public
            tool adds to its face count).
    """

    events: tuple[str, ...]
    image_event: np.ndarray
    image_stems: tuple[str, ...]
    boxes_xywh: np.ndarray
    box_offsets: np.ndarray
    keep: dict[str, np.ndarray]
    keep_counts: dict[str, np.ndarray]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.image_stems)
        if self.image_event.shape != (n,) or self.box_offsets.shape != (n + 1,):
            raise ValueError("inconsistent ground-truth arrays (image_event / box_offsets)")
        if self.boxes_xywh.ndim != 2 or self.boxes_xywh.shape[1] != 4:
            raise ValueError(f"boxes_xywh must be (M, 4), got {self.boxes_xywh.shape}")
        if int(self.box_offsets[-1]) != self.boxes_xywh.shape[0]:
            raise ValueError("box_offsets[-1] must equal the number of boxes")
        for s in SETTINGS:
            if self.keep[s].shape != (self.boxes_xywh.shape[0],) or self.keep_counts[s].shape != (n,):
                raise ValueError(f"inconsistent keep arrays for setting {s!r}")
        index = {f"{self.events[e]}/{stem}": i for i, (e, stem) in enumerate(zip(self.image_event, self.image_stems))}
        if len(index) != n:
            raise ValueError("duplicate event/image names in the ground truth")
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_records(
        cls, records: Iterable[tuple[str, str, np.ndarray, Mapping[str, np.ndarray]]]
    ) -> "WiderFaceGroundTruth":
        """Build ground truth from ``(event, stem, boxes_xywh (k, 4), {setting: keep list})`` records.

        Keep lists are 1-based face indices as in the official ``.mat`` files (any shape, e.g.
        ``(n, 1)``); a setting missing from the mapping has an empty keep list. Useful for
        synthetic tests or for ground truth that does not come from the ``.mat`` files.
        """
        events: list[str] = []
        event_index: dict[str, int] = {}
        image_event: list[int] = []
        stems: list[str] = []
        boxes: list[np.ndarray] = []
        keep_idx: dict[str, list[np.ndarray]] = {s: [] for s in SETTINGS}
        for event, stem, b, keep in records:
            if event not in event_index:
                event_index[event] = len(events)
                events.append(event)
            image_event.append(event_index[event])
            stems.append(stem)
            b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
            boxes.append(b)
            for s in SETTINGS:
                k = np.asarray(keep.get(s, ()), dtype=np.int64).reshape(-1)
                if k.size and (k.min() < 1 or k.max() > len(b)):
                    raise ValueError(f"{s} keep index out of range 1..{len(b)} for {event}/{stem}")
                keep_idx[s].append(k)
        counts = np.array([len(b) for b in boxes], dtype=np.int64)
        offsets = np.zeros(len(boxes) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        keep_mask: dict[str, np.ndarray] = {}
        keep_counts: dict[str, np.ndarray] = {}
        for s in SETTINGS:
            mask = np.zeros(len(all_boxes), dtype=bool)
            lens = np.array([len(k) for k in keep_idx[s]], dtype=np.int64)
            if lens.sum():
                mask[np.concatenate(keep_idx[s]) - 1 + np.repeat(offsets[:-1], lens)] = True
            keep_mask[s] = mask
            keep_counts[s] = lens
        return cls(
            events=tuple(events),
            image_event=np.asarray(image_event, dtype=np.int64),
            image_stems=tuple(stems),
            boxes_xywh=all_boxes,
            box_offsets=offsets,
            keep=keep_mask,
            keep_counts=keep_counts,
        )

    def __repr__(self) -> str:
        faces = ", ".join(f"{s}={self.num_faces(s)}" for s in SETTINGS)
        return (
            f"WiderFaceGroundTruth(images={self.num_images}, events={len(self.events)}, "
            f"boxes={len(self.boxes_xywh)}, faces: {faces})"
        )

    @property
    def num_images(self) -> int:
        """Number of images (3226 for the official validation set)."""
        return len(self.image_stems)

    def image_keys(self) -> list[str]:
        """``"event/stem"`` key of every image, in ground-truth order."""
        return list(self._index)

    def index_of(self, event: str, stem: str) -> int:
        """Image index of ``event/stem``; KeyError if the image is not in the ground truth."""
        return self._index[f"{event}/{stem}"]

    def has_image(self, event: str, stem: str) -> bool:
        return f"{event}/{stem}" in self._index

    def image_boxes(self, i: int) -> np.ndarray:
        """``(k, 4)`` float64 ``x y w h`` boxes of image ``i`` (a view)."""
        return self.boxes_xywh[self.box_offsets[i] : self.box_offsets[i + 1]]

    def image_keep(self, i: int, setting: str) -> np.ndarray:
        """``(k,)`` bool keep mask of image ``i`` for ``setting``."""
        return self.keep[setting][self.box_offsets[i] : self.box_offsets[i + 1]]

    def num_faces(self, setting: str) -> int:
        """Total keep-list length of ``setting`` over all images (the public ``count_face``)."""
        return int(self.keep_counts[setting].sum())


def _mat_str(cell: np.ndarray) -> str:
    """Unwrap a MATLAB char cell as loaded by scipy (``array([['name']])`` style)."""
    while isinstance(cell, np.ndarray):
        cell = cell.reshape(-1)[0]
    return str(cell)


def _load_mat(path: Path, variables: Iterable[str]) -> dict:
    """``scipy.io.loadmat(path)`` holding ``variables``; ValueError naming the file when it is not
    a readable MATLAB file (truncated, corrupt, another format) or lacks one of them. OSError
    naming the file (permission denied ...) and MemoryError pass through."""
    from scipy.io import loadmat  # local import: scipy is only needed for loading

    try:
        mat = loadmat(str(path))
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - scipy raises MatReadError, ValueError, TypeError,
        # IndexError, OSError("could not read bytes") ... for a damaged file, depending on where it is cut
        if isinstance(error, OSError) and error.filename is not None:
            raise  # e.g. permission denied: the message names the file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path}: not a readable MATLAB .mat file ({reason})") from None
    for name in variables:
        if name not in mat:
            raise ValueError(f"{path}: missing variable {name!r}")
    return mat


def _cell_column(path: Path, value: object, name: str) -> list:
    """The entries ``value[i][0]`` of a MATLAB cell column, ValueError naming the file if it is not one."""
    try:
        return [value[i][0] for i in range(len(value))]  # type: ignore[index, arg-type]
    except (IndexError, TypeError, KeyError) as error:
        raise ValueError(f"{path}: variable {name!r} is not a cell array as in the WIDER FACE kit "
                         f"({type(error).__name__}: {error})") from None


def load_ground_truth(gt_dir: PathLike) -> WiderFaceGroundTruth:
    """Load the official WIDER FACE validation ground truth from ``gt_dir``.

    ``gt_dir`` must contain ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat``
    (the files shipped with the official evaluation kit). Raises FileNotFoundError naming the
    first missing file, ValueError naming the file when one is not a readable ``.mat`` file
    (e.g. truncated), lacks a variable or does not fit the others.
    """
    gt_dir = Path(gt_dir)
    for name in GT_FILES:
        if not (gt_dir / name).is_file():
            raise FileNotFoundError(
                f"WIDER FACE ground-truth file not found: {gt_dir / name} "
                f"(the folder must contain {', '.join(GT_FILES)})"
            )
    main_path = gt_dir / _GT_FILE
    main = _load_mat(main_path, ("face_bbx_list", "event_list", "file_list"))
    event_cells = _cell_column(main_path, main["event_list"], "event_list")
    file_cells = _cell_column(main_path, main["file_list"], "file_list")
    bbx_cells = _cell_column(main_path, main["face_bbx_list"], "face_bbx_list")
    if not len(event_cells) == len(file_cells) == len(bbx_cells):
        raise ValueError(f"{main_path}: event_list, file_list and face_bbx_list differ in length")
    events: list[tuple[str, list[str], list[np.ndarray]]] = []  # (event, file stems, boxes)
    try:
        for e in range(len(event_cells)):
            event = _mat_str(event_cells[e])
            files = [_mat_str(f) for f in _cell_column(main_path, file_cells[e], f"file_list{{{e + 1}}}")]
            bbx = [np.asarray(b) for b in _cell_column(main_path, bbx_cells[e], f"face_bbx_list{{{e + 1}}}")]
            if len(bbx) != len(files):
                raise ValueError(f"{main_path}: event {event} has {len(files)} files but {len(bbx)} box lists")
            events.append((event, files, bbx))
    except (IndexError, TypeError, AttributeError) as error:
        raise ValueError(f"{main_path}: unexpected content ({type(error).__name__}: {error})") from None

    keeps: dict[str, list[list[np.ndarray]]] = {}
    for s, name in _SETTING_FILES.items():
        path = gt_dir / name
        cells = _cell_column(path, _load_mat(path, ("gt_list",))["gt_list"], "gt_list")
        if len(cells) != len(events):
            raise ValueError(f"{path}: {len(cells)} events but {_GT_FILE} has {len(events)}")
        keeps[s] = []
        for e, (event, files, _) in enumerate(events):
            keep = [np.asarray(k) for k in _cell_column(path, cells[e], f"gt_list{{{e + 1}}}")]
            if len(keep) != len(files):
                raise ValueError(f"{path}: event {event} does not match {_GT_FILE}")
            keeps[s].append(keep)

    records = [(event, files[j], bbx[j], {s: keeps[s][e][j] for s in SETTINGS})
               for e, (event, files, bbx) in enumerate(events) for j in range(len(files))]
    try:
        return WiderFaceGroundTruth.from_records(records)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{gt_dir}: unexpected ground-truth content ({' '.join(str(error).split())})") from None


# --------------------------------------------------------------------------------------------
# Prediction files (official format)
# --------------------------------------------------------------------------------------------
def boxes_xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``(N, >=4)`` ``x1 y1 x2 y2 [...]`` -> same shape with columns 2, 3 turned into ``w = x2 - x1``,
    ``h = y2 - y1`` (the WIDER FACE prediction convention, no ``+1``). Returns a float64 copy."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    if out.ndim != 2 or out.shape[1] < 4:
        raise ValueError(f"expected an (N, >=4) array, got shape {out.shape}")
    out[:, 2] -= out[:, 0]
    out[:, 3] -= out[:, 1]
    return out


def write_prediction_file(path: PathLike, image_stem: str, boxes_xywh_score: np.ndarray) -> None:
    """Write one image's detections in the official WIDER FACE format.

    ``boxes_xywh_score``: ``(N, 5)`` rows ``x y w h score`` (pixels, top-left corner + size).
    The file holds the image stem, the count, then one ``x y w h score`` line per box; floats
    are written with ``repr`` so they read back bit-exactly. Parent folders are created.
    """
    arr = np.asarray(boxes_xywh_score, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 5)
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise ValueError(f"boxes_xywh_score must be (N, 5) x y w h score, got shape {arr.shape}")
    if "/" in image_stem or "\n" in image_stem:
        raise ValueError(f"image_stem must be a bare name without folders: {image_stem!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [image_stem, str(len(arr))]
    lines.extend(" ".join(repr(float(v)) for v in row) for row in arr)
    path.write_text("\n".join(lines) + "\n")


def prediction_stem(first_line: str) -> str:
    """The image stem a prediction file's first line names: folders and a ``.jpg`` suffix removed,
    as the public tool does (``0--Parade/0_Parade_marchingband_1_465.jpg`` -> ``0_Parade_marchingband_1_465``)."""
    stem = first_line.strip().split("/")[-1]
    return stem[: -len(".jpg")] if stem.endswith(".jpg") else stem


def read_prediction_file(path: PathLike) -> tuple[str, np.ndarray]:
    """Read one official-format prediction file -> ``(image stem, (N, 5) float64 x y w h score)``.

    The stem is taken from the first line (folders and a ``.jpg`` suffix removed, as the public
    tool does). Blank lines after the count are ignored; values beyond the fifth on a line are
    ignored. Raises ValueError naming ``file:line`` on a malformed line, a byte sequence that is not
    UTF-8 or a count that does not match the number of boxes.
    """
    path = Path(path)
    lines = read_utf8(path).splitlines()  # NotUtf8Error (a ValueError) names file:line
    if len(lines) < 2:
        raise ValueError(f"{path}:{len(lines) + 1}: expected the image name and the box count")
    stem = prediction_stem(lines[0])
    if not stem:
        raise ValueError(f"{path}:1: empty image name")
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise ValueError(f"{path}:2: box count is not an integer: {lines[1]!r}") from None
    body = lines[2:]
    split_lines = [parts for parts in (line.split() for line in body) if parts]
    if len(split_lines) == count and all(len(parts) == 5 for parts in split_lines):
        try:  # the common, well-formed case in one conversion; errors are located below
            values = np.array(split_lines, dtype=np.float64).reshape(-1, 5)
        except ValueError:
            values = None
        if values is not None and np.isfinite(values).all():
            return stem, values
    rows: list[list[float]] = []
    for lineno, line in enumerate(body, start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5:
            raise ValueError(f"{path}:{lineno}: expected 'x y w h score', got {line!r}")
        try:
            row = [float(p) for p in parts[:5]]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not a number in {line!r}") from None
        if not all(math.isfinite(v) for v in row):
            raise ValueError(f"{path}:{lineno}: non-finite value in {line!r}")
        rows.append(row)
    if count != len(rows):
        # the official tools disagree on such a file: MATLAB's read_pred reads `count` box lines (and
        # fails on the file when fewer follow), the public Python tool ignores the count and reads
        # every line; neither reading is safe
        matlab = (f"read the first {count}" if count < len(rows) else
                  f"look for {count} box lines and fail on the file")
        raise ValueError(f"{path}:2: the count line says {count} boxes but {len(rows)} box lines follow (the "
                         f"official MATLAB tool would {matlab}, the public Python tool read {len(rows)})")
    return stem, np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def read_prediction_dir(pred_dir: PathLike, problems: list[str] | None = None,
                        known_image: Callable[[str, str], bool] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Read a prediction folder ``<pred_dir>/<event>/<image stem>.txt``.

    Returns ``{event: {stem: (N, 5) float64 x y w h score}}``; the stem is the one written in the
    file's first line, as the public Python tool reads it. Only ``*.txt`` files in event
    sub-folders are read (other entries are ignored). Raises FileNotFoundError if ``pred_dir`` is
    not a folder. A malformed or unreadable file, a file whose image ``known_image(event, stem)``
    rejects (e.g. not in the ground truth), or a second file claiming an image already read
    raises ValueError (OSError) naming ``file:line``; of two files claiming one image, the one
    named after it is kept. With ``problems`` (a list) such a file is skipped instead and that
    one-line message appended, so that every bad file of the folder is found in one pass.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")

    def reject(error: OSError | ValueError, txt: Path) -> None:
        if problems is None:
            raise error
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        problems.append(" ".join((reason if reason.startswith(str(txt)) else f"{txt}: {reason}").split()))

    out: dict[str, dict[str, np.ndarray]] = {}
    for event_dir in sorted(p for p in pred_dir.iterdir() if p.is_dir()):
        event: dict[str, np.ndarray] = {}
        read_from: dict[str, Path] = {}
        for txt in sorted(event_dir.glob("*.txt")):
            try:
                stem, boxes = read_prediction_file(txt)
                if known_image is not None and not known_image(event_dir.name, stem):
                    raise ValueError(f"{txt}:1: names image {event_dir.name}/{stem}, which the ground truth "
                                     "does not have")
            except (OSError, ValueError) as error:
                reject(error, txt)
                continue
            first = read_from.get(stem)
            if first is not None:
                kept, dropped = (txt, first) if txt.stem == stem != first.stem else (first, txt)
                message = f"{dropped}:1: image {event_dir.name}/{stem} is read from {kept.name} instead"
                reject(ValueError(message), dropped)
                if kept is first:
                    continue
            event[stem] = boxes
            read_from[stem] = txt
        out[event_dir.name] = event
    return out


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def bbox_overlaps_plus1(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    """IoU matrix with the ``+1`` pixel convention of the public Cython ``bbox_overlaps``.

    ``boxes``: ``(N, 4)``, ``query_boxes``: ``(K, 4)``, both ``x1 y1 x2 y2`` (inclusive pixel
    corners). Returns ``(N, K)`` float64; pairs with ``iw <= 0`` or ``ih <= 0`` are 0. The float
    operations are done in the same order as the Cython kernel, so results are bit-identical.
    """
    b = np.asarray(boxes, dtype=np.float64)
    q = np.asarray(query_boxes, dtype=np.float64)
    iw = np.minimum(b[:, 2:3], q[:, 2]) - np.maximum(b[:, 0:1], q[:, 0]) + 1
    ih = np.minimum(b[:, 3:4], q[:, 3]) - np.maximum(b[:, 1:2], q[:, 1]) + 1
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    area_q = (q[:, 2] - q[:, 0] + 1) * (q[:, 3] - q[:, 1] + 1)
    inter = iw * ih
    ua = (area_b[:, None] + area_q[None, :]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / ua
    iou[~((iw > 0) & (ih > 0))] = 0.0
    return iou


def normalize_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise ``scores`` exactly like the public tool's ``norm_score``.

    ``lo = min(1, scores.min())``, ``hi = max(0, scores.max())``, result ``(s - lo) / (hi - lo)``
    in float64; all ``nan`` when ``hi == lo`` (numpy ``0/0``). Empty input returns empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s.copy()
    lo = min(float(s.min()), 1.0)
    hi = max(float(s.max()), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (s - lo) / np.float64(hi - lo)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC area under the monotone precision envelope (the public ``voc_ap``), vectorised.

    ``recall``/``precision``: ``(T,)`` curves in threshold order. Sentinels ``(0, 0)`` and
    ``(1, 0)`` are added, precision is replaced by its running maximum from the right (``nan``
    propagates like ``np.maximum``), and ``sum(Δrecall * envelope)`` is taken where recall changes.
    """
    mrec = np.concatenate(([0.0], np.asarray(recall, dtype=np.float64), [1.0]))
    mpre = np.concatenate(([0.0], np.asarray(precision, dtype=np.float64), [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PRCurve:
    """Precision/recall of one setting at the ``T`` score thresholds.

    ``thresholds``: ``(T,)`` decreasing, ``1 - (t + 1) / T``; ``precision``/``recall``: ``(T,)``
    float64 (precision is ``nan`` where no proposal passes the threshold yet);
    ``proposals``/``recalled``: ``(T,)`` int64 raw counts summed over images; ``num_faces``: the
    face count (recall denominator).
    """

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    proposals: np.ndarray
    recalled: np.ndarray
    num_faces: int


@dataclass(frozen=True)
class WiderFaceResult:
    """Result of :func:`evaluate`.

    ``easy``/``medium``/``hard``: AP per setting (``nan`` only when a setting has no face).
    ``curves``: setting -> :class:`PRCurve`. ``num_images``: images counted (all ground-truth
    images, or the chosen subset); ``num_gt_images``: images in the ground truth (3226 for the
    official set); ``num_images_matched``: counted images with at least one prediction and one
    ground-truth box (the others are skipped); ``num_predictions``: boxes in those images;
    ``subset``: True when only part of the ground truth was counted.
    """

    easy: float
    medium: float
    hard: float
    curves: dict[str, PRCurve] = field(repr=False)
    num_images: int
    num_gt_images: int
    num_images_matched: int
    num_predictions: int
    subset: bool
    iou_threshold: float

    @property
    def aps(self) -> dict[str, float]:
        """``{"easy": ap, "medium": ap, "hard": ap}``."""
        return {"easy": self.easy, "medium": self.medium, "hard": self.hard}


def _as_pred_array(arr: object, key: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.size == 0:
        return a.reshape(0, 5)
    if a.ndim != 2 or a.shape[1] != 5:
        raise ValueError(f"predictions for {key} must be (N, 5) x y w h score, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"predictions for {key} contain nan/inf")
    return a


def _select_images(
    predictions: Predictions, gt: WiderFaceGroundTruth, subset: bool, images: Iterable[str] | None
) -> np.ndarray:
    """Indices (ground-truth order) of the images to count; every one must have predictions."""
    unknown = [f"{e}/{s}" for e, per in predictions.items() for s in per if not gt.has_image(e, s)]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted image(s) are not in the ground truth, e.g. {unknown[:3]} "
            "(keys must be event folder -> image stem without .jpg)"
        )
    if images is not None:
        idx = []
        for key in images:
            event, _, stem = str(key).rpartition("/")
            if stem.endswith(".jpg"):
                stem = stem[: -len(".jpg")]
            if not gt.has_image(event, stem):
                raise ValueError(f"image {key!r} is not in the ground truth (use 'event/stem')")
            idx.append(gt.index_of(event, stem))
        selected = np.unique(np.asarray(idx, dtype=np.int64))
    elif subset:
        idx = [gt.index_of(e, s) for e, per in predictions.items() for s in per]
        selected = np.unique(np.asarray(idx, dtype=np.int64))
    else:
        selected = np.arange(gt.num_images, dtype=np.int64)
    missing = [
        f"{gt.events[gt.image_event[i]]}/{gt.image_stems[i]}"
        for i in selected
        if gt.image_stems[i] not in predictions.get(gt.events[gt.image_event[i]], {})
    ]
    if missing:
        raise ValueError(
            f"predictions missing for {len(missing)} of the {len(selected)} images to evaluate, e.g. "
            f"{missing[:3]}; pass an empty (0, 5) array for an image without detections"
            + ("" if subset or images is not None else ", or subset=True / images=[...] to evaluate part of the set")
        )
    return selected


def _iou_block(
    px1: np.ndarray, py1: np.ndarray, px2: np.ndarray, py2: np.ndarray, parea: np.ndarray,
    gx1: np.ndarray, gy1: np.ndarray, gx2: np.ndarray, gy2: np.ndarray, garea: np.ndarray,
) -> np.ndarray:
    """IoU (+1 convention, Cython operation order) of broadcastable prediction / face arrays."""
    iw = np.minimum(px2, gx2) - np.maximum(px1, gx1) + 1
    ih = np.minimum(py2, gy2) - np.maximum(py1, gy1) + 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inter = iw * ih  # padding faces overflow to inf here; they are masked just below
        iou = inter / ((parea + garea) - inter)
    iou[~((iw > 0) & (ih > 0))] = 0.0
    return iou


def _best_overlaps(
    pred_xyxy: np.ndarray, pred_offsets: np.ndarray, gt_xyxy: np.ndarray, gt_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU and index (into ``gt_xyxy``) of the best-overlap face, first on ties, per prediction.

    ``pred_xyxy`` ``(N, 4)`` / ``gt_xyxy`` ``(M, 4)``: ``x1 y1 x2 y2`` of all images concatenated,
    image ``i`` owning rows ``offsets[i]:offsets[i+1]`` (every image has >= 1 face).
    Images with many faces (which hold almost all pairs) are done one by one with broadcasting;
    the many small images are batched by padded face count (next power of two), their faces
    gathered into ``(n, K)`` blocks padded with a far-away box that overlaps nothing.
    """
    n_img = len(pred_offsets) - 1
    n_pred = pred_offsets[1:] - pred_offsets[:-1]
    n_gt = gt_offsets[1:] - gt_offsets[:-1]
    total = int(pred_offsets[-1])
    best_iou = np.zeros(total, dtype=np.float64)
    best_idx = np.zeros(total, dtype=np.int64)
    if total == 0:
        return best_iou, best_idx
    px1, py1, px2, py2 = (np.ascontiguousarray(pred_xyxy[:, c]) for c in range(4))
    parea = (px2 - px1 + 1) * (py2 - py1 + 1)
    # Far-away padding face: iw = min(.) - max(.) + 1 < 0 for every finite prediction.
    g = np.concatenate([gt_xyxy, np.full((1, 4), -1e300)])
    gx1, gy1, gx2, gy2 = (np.ascontiguousarray(g[:, c]) for c in range(4))
    garea = (gx2 - gx1 + 1) * (gy2 - gy1 + 1)
    pad = len(gt_xyxy)

    big = np.nonzero(n_gt > _SMALL_IMAGE_FACES)[0]
    for i in big:
        a, b = pred_offsets[i], pred_offsets[i + 1]
        c, d = gt_offsets[i], gt_offsets[i + 1]
        iou = _iou_block(
            px1[a:b, None], py1[a:b, None], px2[a:b, None], py2[a:b, None], parea[a:b, None],
            gx1[c:d], gy1[c:d], gx2[c:d], gy2[c:d], garea[c:d],
        )
        j = iou.argmax(axis=1)
        best_idx[a:b] = c + j
        best_iou[a:b] = iou[np.arange(b - a), j]

    img_of_pred = np.repeat(np.arange(n_img), n_pred)
    width = 1 << np.ceil(np.log2(np.maximum(n_gt, 1))).astype(np.int64)
    width[n_gt > _SMALL_IMAGE_FACES] = 0
    for k in np.unique(width[width > 0]):
        preds = np.nonzero(width[img_of_pred] == k)[0]
        cols = np.arange(k)
        rows_per_chunk = max(1, _PAIR_CHUNK // int(k))
        for start in range(0, len(preds), rows_per_chunk):
            p = preds[start : start + rows_per_chunk]
            img = img_of_pred[p]
            gi = gt_offsets[img][:, None] + cols
            gi[cols >= n_gt[img][:, None]] = pad
            iou = _iou_block(
                px1[p, None], py1[p, None], px2[p, None], py2[p, None], parea[p, None],
                gx1[gi], gy1[gi], gx2[gi], gy2[gi], garea[gi],
            )
            j = iou.argmax(axis=1)  # padding sits after the real faces: never the first maximum
            rows = np.arange(len(p))
            best_idx[p] = gi[rows, j]
            best_iou[p] = iou[rows, j]
    return best_iou, best_idx


def _segment_starts(offsets: np.ndarray) -> np.ndarray:
    """Start offset of the segment each element belongs to (``offsets``: ``(S + 1,)`` bounds)."""
    lens = offsets[1:] - offsets[:-1]
    return np.repeat(offsets[:-1], lens)


def evaluate(
    predictions: Predictions,
    gt: WiderFaceGroundTruth,
    iou_threshold: float = 0.5,
    *,
    subset: bool = False,
    images: Iterable[str] | None = None,
    sort_predictions: bool = True,
    thresh_num: int = 1000,
) -> WiderFaceResult:
    """Official WIDER FACE easy / medium / hard AP of ``predictions`` (vectorised).

    Args:
        predictions: ``{event: {image stem: (N, 5) x y w h score}}`` in pixels (``x y`` the
            top-left corner), as returned by :func:`read_prediction_dir`. Empty ``(0, 5)`` arrays
            mean "no detection". Scores are min-max normalised over every array in this mapping.
        gt: ground truth from :func:`load_ground_truth`.
        iou_threshold: IoU (``+1`` pixel convention) from which a detection matches a face.
        subset: False (default): every ground-truth image must have an entry (the official
            protocol). True: count only the images present in ``predictions`` (faces of the
            other images are not counted either).
        images: explicit ``"event/stem"`` keys to count (implies a subset); predictions of other
            images still take part in score normalisation but nowhere else.
        sort_predictions: visit each image's predictions in descending score order (stable
            sort, the order the public tool assumes). False keeps the given order, which
            reproduces the public tool on files that are not sorted.
        thresh_num: number of score thresholds (1000 in the official protocol).

    Returns:
        :class:`WiderFaceResult`. Raises ValueError for malformed arrays, images unknown to the
        ground truth, or missing images when ``subset`` is False and ``images`` is None.
    """
    if thresh_num < 1:
        raise ValueError("thresh_num must be >= 1")
    checked: dict[str, dict[str, np.ndarray]] = {
        e: {s: _as_pred_array(a, f"{e}/{s}") for s, a in per.items()} for e, per in predictions.items()
    }
    selected = _select_images(checked, gt, subset, images)
    is_subset = images is not None or bool(subset)

    # Score normalisation over the whole prediction set (public: lo starts at 1, hi at 0).
    all_arrays = [a for per in checked.values() for a in per.values() if len(a)]
    lo, hi = 1.0, 0.0
    if all_arrays:
        all_scores = np.concatenate([a[:, 4] for a in all_arrays])
        lo = min(float(all_scores.min()), 1.0)
        hi = max(float(all_scores.max()), 0.0)
    diff = np.float64(hi - lo)

    # Images that take part in matching: at least one prediction and one face.
    n_gt = gt.box_offsets[1:] - gt.box_offsets[:-1]
    used: list[int] = []
    arrays: list[np.ndarray] = []
    for i in selected:
        a = checked[gt.events[gt.image_event[i]]][gt.image_stems[i]]
        if len(a) and n_gt[i] > 0:
            used.append(int(i))
            arrays.append(a)
    used_idx = np.asarray(used, dtype=np.int64)
    n_pred = np.array([len(a) for a in arrays], dtype=np.int64)
    pred_offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(n_pred, out=pred_offsets[1:])
    total = int(pred_offsets[-1])
    preds = np.concatenate(arrays) if arrays else np.zeros((0, 5))
    img_of_pred = np.repeat(np.arange(len(arrays)), n_pred)
    if sort_predictions and total:
        order = np.lexsort((-preds[:, 4], img_of_pred))  # lexsort is stable
        preds = preds[order]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (preds[:, 4] - lo) / diff

    pred_xyxy = preds[:, :4].copy()
    pred_xyxy[:, 2] = preds[:, 2] + preds[:, 0]
    pred_xyxy[:, 3] = preds[:, 3] + preds[:, 1]
    gt_lens = n_gt[used_idx]
    gt_offsets = np.zeros(len(used_idx) + 1, dtype=np.int64)
    np.cumsum(gt_lens, out=gt_offsets[1:])
    gt_rows = np.repeat(gt.box_offsets[used_idx] - gt_offsets[:-1], gt_lens) + np.arange(int(gt_offsets[-1]))
    gt_xywh = gt.boxes_xywh[gt_rows]
    gt_xyxy = gt_xywh.copy()
    gt_xyxy[:, 2] = gt_xywh[:, 2] + gt_xywh[:, 0]
    gt_xyxy[:, 3] = gt_xywh[:, 3] + gt_xywh[:, 1]
    best_iou, best_local = _best_overlaps(pred_xyxy, pred_offsets, gt_xyxy, gt_offsets)
    hit = best_iou >= iou_threshold
    best_face = gt_rows[best_local] if total else best_local  # index into gt.boxes_xywh

    # First threshold index each prediction passes: th_t = 1 - (t+1)/T is decreasing, so the
    # prediction passes for t >= first_t where first_t = #{t : th_t > score}; nan never passes.
    thresholds = 1 - np.arange(1, thresh_num + 1) / thresh_num
    ascending = thresholds[::-1]
    first_t = thresh_num - np.searchsorted(ascending, score, side="right")
    first_t[np.isnan(score)] = thresh_num
    # An image reports, at threshold t, its LAST prediction (visit order) passing t. Prediction
    # i is that one for t in [first_t[i], next_t[i]) where next_t[i] is the smallest first_t of
    # the later predictions of the same image (segmented suffix minimum, computed on the
    # reversed array with a per-image offset so the running minimum restarts at each image).
    if total:
        span = thresh_num + 2
        seg_rev = (len(arrays) - 1 - img_of_pred)[::-1]  # non-decreasing along the reversed array
        shifted = first_t[::-1].astype(np.int64) - seg_rev * span
        suffix_min = (np.minimum.accumulate(shifted) + seg_rev * span)[::-1]  # min over j >= i
        next_t = np.full(total, thresh_num, dtype=np.int64)
        same = img_of_pred[1:] == img_of_pred[:-1]
        next_t[:-1][same] = suffix_min[1:][same]
        active = first_t < next_t
        t_lo, t_hi = first_t[active], next_t[active]
    starts = _segment_starts(pred_offsets)

    def per_image_cumsum(x: np.ndarray) -> np.ndarray:
        c = np.cumsum(x, dtype=np.int64)
        return c - (c[starts] - x[starts])

    def threshold_sum(values: np.ndarray) -> np.ndarray:
        if not total:
            return np.zeros(thresh_num, dtype=np.int64)
        v = values[active]
        delta = np.bincount(t_lo, weights=v, minlength=thresh_num + 1) - np.bincount(
            t_hi, weights=v, minlength=thresh_num + 1
        )
        return np.rint(np.cumsum(delta[:thresh_num])).astype(np.int64)

    aps: dict[str, float] = {}
    curves: dict[str, PRCurve] = {}
    for setting in SETTINGS:
        num_faces = int(gt.keep_counts[setting][selected].sum())
        kept = gt.keep[setting][best_face] if total else np.zeros(0, dtype=bool)
        proposal = ~(hit & ~kept)  # flag 1; detections on ignored faces are no proposals
        cand = np.nonzero(hit & kept)[0]
        newly = np.zeros(total, dtype=np.int64)
        if len(cand):
            _, first = np.unique(best_face[cand], return_index=True)  # first visit per face
            newly[cand[first]] = 1
        proposals = threshold_sum(per_image_cumsum(proposal.astype(np.int64)))
        recalled = threshold_sum(per_image_cumsum(newly))
        rec_f = recalled.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = rec_f / proposals.astype(np.float64)
            recall = rec_f / np.float64(num_faces)
        aps[setting] = voc_ap(recall, precision)
        curves[setting] = PRCurve(
            thresholds=thresholds,
            precision=precision,
            recall=recall,
            proposals=proposals,
            recalled=recalled,
            num_faces=num_faces,
        )
    return WiderFaceResult(
        easy=aps["easy"],
        medium=aps["medium"],
        hard=aps["hard"],
        curves=curves,
        num_images=len(selected),
        num_gt_images=gt.num_images,
        num_images_matched=len(used_idx),
        num_predictions=total,
        subset=is_subset,
        iou_threshold=float(iou_threshold),
    )


def plot_pr_curves(result: WiderFaceResult, path: PathLike, title: str | None = None) -> Path:
    """Write a PNG with the easy / medium / hard precision-recall curves of ``result``.

    Uses matplotlib's Agg canvas directly (no global backend switch). Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for setting in SETTINGS:
        c = result.curves[setting]
        ax.plot(c.recall, c.precision, label=f"{setting}: AP {result.aps[setting]:.4f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    suffix = f" (subset: {result.num_images}/{result.num_gt_images} images)" if result.subset else ""
    ax.set_title((title or "WIDER FACE val") + suffix)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
