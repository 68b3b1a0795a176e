"""Face-detection training data: label-file parsing, a ``Dataset`` and batching helpers.

Label formats (see ``data/README.md``)
--------------------------------------
*RetinaFace* ``label.txt`` (``fmt="retinaface"``)::

    # 0--Parade/0_Parade_marchingband_1_465.jpg
    x y w h  lx0 ly0 v0  lx1 ly1 v1  lx2 ly2 v2  lx3 ly3 v3  lx4 ly4 v4  score
    ...

One ``# relative/path.jpg`` header per image (an optional trailing ``height width`` pair is
ignored), then one line per face with 4, 19 or 20 numbers: the box, optionally five landmark
triples ``(x, y, visibility)`` and optionally a trailing blur/score value (both ignored).
Landmark coordinates are ``-1`` when the face has none; as in the public Pytorch_Retinaface loader
a face has landmarks iff its first landmark x is ``>= 0``. A header followed by no face line is an
image without faces.

*Official WIDER FACE* ``wider_face_{train,val}_bbx_gt.txt`` (``fmt="wider"``)::

    0--Parade/0_Parade_marchingband_1_849.jpg
    1
    449 330 122 149 0 0 0 0 0 0

An image path line, a face-count line, then ``count`` lines ``x1 y1 w h blur expression
illumination invalid occlusion pose`` (lines with just ``x y w h`` are accepted too). A count of
0 is followed by one line of zeros that is not a face (consumed when present). Faces flagged
``invalid`` are skipped (counted in ``num_invalid``). ``fmt="auto"`` picks RetinaFace when the
first non-blank line starts with ``#``.

In both formats boxes with ``w <= 0`` or ``h <= 0`` are dropped and counted
(``num_degenerate``). A line that cannot be parsed, or a byte that is not UTF-8, raises
:class:`LabelFormatError` (a ``ValueError``) whose message starts with ``<file>:<line>:``.

Sample conventions
------------------
``WiderFaceDataset[i]`` returns ``(image, targets)``:

* ``image``: uint8 ``(H, W, 3)`` BGR numpy array — with :class:`~utils.data_transformer.TrainTransform`
  the augmented square ``(S, S, 3)``; float conversion and mean subtraction happen on the device
  (:func:`images_to_network_input`).
* ``targets``: float32 ``(K, 15)`` numpy array, ``K >= 0``, in pixels of the returned image:
  ``x1, y1, x2, y2`` (``x2 = x + w``), five landmarks ``(x, y)`` (left eye, right eye, nose, left
  mouth, right mouth), then a flag ``1.0`` (has landmarks) / ``-1.0`` (none; landmarks are ``-1``).

:func:`detection_collate` turns a list of samples into a uint8 tensor ``(B, 3, S, S)`` (BGR) and a
list of ``B`` float32 tensors ``(K_i, 15)``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from models.retinaface import preprocess
from utils.data_transformer import (
    TARGET_COLUMNS,
    TrainTransform,
    empty_targets,
    seed_worker,
)
from utils.device_augment import DeferredBatch, DeferredImage
from utils.image_io import ImageReadError
from utils.image_loader import opencv_reason, read_complete_image
from utils.text_file import NotUtf8Error, read_utf8

__all__ = [
    "LabelFormatError",
    "read_training_image",
    "ImageAnnotation",
    "LabelFile",
    "parse_label_file",
    "parse_retinaface_labels",
    "parse_wider_labels",
    "WiderFaceDataset",
    "dataset_from_root",
    "detection_collate",
    "images_to_network_input",
    "normalize_targets",
    "build_train_loader",
    "seed_worker",
    "TrainTransform",
]

LabelFormat = Literal["auto", "retinaface", "wider"]
Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
_MAX_LISTED_MISSING = 5


class LabelFormatError(ValueError):
    """A label file line that cannot be parsed; ``str(err)`` starts with ``<file>:<line>:``."""

    def __init__(self, file: str | os.PathLike[str], line: int, reason: str) -> None:
        self.file = str(file)
        self.line = int(line)
        self.reason = reason
        super().__init__(f"{self.file}:{self.line}: {reason}")


@dataclass(frozen=True)
class ImageAnnotation:
    """One image of a label file.

    Attributes:
        path: image path relative to the image root, as written in the label file.
        targets: float32 ``(K, 15)`` in original image pixels (module docstring convention).
        line: 1-based line number of the image's header line in the label file.
    """

    path: str
    targets: np.ndarray
    line: int


@dataclass
class LabelFile:
    """A parsed label file: its images and what was dropped while parsing."""

    file: Path
    format: str
    images: list[ImageAnnotation] = field(default_factory=list)
    num_degenerate: int = 0
    num_invalid: int = 0

    @property
    def num_faces(self) -> int:
        return int(sum(len(a.targets) for a in self.images))


def _parse_floats(tokens: Sequence[str], file: Path, lineno: int) -> list[float]:
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise LabelFormatError(file, lineno, f"expected numbers, got {' '.join(tokens)!r}") from None
    if not all(np.isfinite(values)):
        raise LabelFormatError(file, lineno, f"non-finite value in {' '.join(tokens)!r}")
    return values


def _face_row(x: float, y: float, w: float, h: float, landmarks: Sequence[float] | None) -> np.ndarray:
    row = np.full(TARGET_COLUMNS, -1.0, dtype=np.float32)
    row[0:4] = (x, y, x + w, y + h)
    if landmarks is not None and landmarks[0] >= 0:
        row[4:14] = landmarks
        row[14] = 1.0
    return row


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows).astype(np.float32) if rows else empty_targets()


def _read_text(file: Path) -> str:
    """The label file as text; a byte that is not UTF-8 raises :class:`LabelFormatError` naming the
    file and the line."""
    try:
        return read_utf8(file)
    except NotUtf8Error as error:
        raise LabelFormatError(file, error.line, f"{error.reason}; save the label file as UTF-8") from None


def _read_lines(file: Path) -> list[str]:
    return _read_text(file).splitlines()


def parse_retinaface_labels(file: str | os.PathLike[str]) -> LabelFile:
    """Parse a RetinaFace ``label.txt`` (``# path`` headers, 4/19/20 numbers per face)."""
    file = Path(file)
    result = LabelFile(file, "retinaface")
    path: str | None = None
    header_line = 0
    rows: list[np.ndarray] = []

    def flush() -> None:
        if path is not None:
            result.images.append(ImageAnnotation(path, _stack(rows), header_line))

    for lineno, raw in enumerate(_read_lines(file), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            flush()
            rest = line[1:].strip()
            if not rest:
                raise LabelFormatError(file, lineno, "image header '#' without a path")
            tokens = rest.split()
            if len(tokens) == 3 and tokens[1].isdigit() and tokens[2].isdigit():
                rest = tokens[0]  # "# path height width" variant
            path, header_line, rows = rest, lineno, []
            continue
        if path is None:
            raise LabelFormatError(file, lineno, "face line before the first '# image/path.jpg' header")
        values = _parse_floats(line.split(), file, lineno)
        if len(values) not in (4, 19, 20):
            raise LabelFormatError(
                file, lineno, f"expected 4, 19 or 20 numbers (x y w h [5 x (x y v)] [score]), got {len(values)}"
            )
        x, y, w, h = values[:4]
        if w <= 0 or h <= 0:
            result.num_degenerate += 1
            continue
        landmarks = None
        if len(values) >= 19:
            triples = np.asarray(values[4:19], dtype=np.float32).reshape(5, 3)
            landmarks = triples[:, :2].reshape(10)
        rows.append(_face_row(x, y, w, h, landmarks))
    flush()
    return result


def _is_number_line(line: str) -> bool:
    try:
        [float(t) for t in line.split()]
    except ValueError:
        return False
    return bool(line.split())


def parse_wider_labels(file: str | os.PathLike[str]) -> LabelFile:
    """Parse an official ``wider_face_*_bbx_gt.txt`` (path line, count line, face lines)."""
    file = Path(file)
    result = LabelFile(file, "wider")
    lines = [(n, raw.strip()) for n, raw in enumerate(_read_lines(file), start=1)]
    lines = [(n, s) for n, s in lines if s]
    i = 0
    while i < len(lines):
        header_line, path = lines[i]
        if _is_number_line(path):
            raise LabelFormatError(file, header_line, f"expected an image path, got {path!r}")
        if i + 1 >= len(lines):
            raise LabelFormatError(file, header_line, f"image {path!r} has no face-count line")
        count_line, count_text = lines[i + 1]
        try:
            count = int(count_text)
        except ValueError:
            raise LabelFormatError(file, count_line, f"expected a face count, got {count_text!r}") from None
        if count < 0:
            raise LabelFormatError(file, count_line, f"negative face count {count}")
        i += 2
        rows: list[np.ndarray] = []
        if count == 0:
            # The official files follow a zero count with one line of zeros that is not a face.
            if i < len(lines) and _is_number_line(lines[i][1]):
                n, zeros = lines[i]
                if any(float(t) != 0.0 for t in zeros.split()):
                    raise LabelFormatError(file, n, f"face count is 0 but the next line is not all zeros: {zeros!r}")
                i += 1
        for face in range(count):
            if i >= len(lines):
                raise LabelFormatError(
                    file, lines[-1][0], f"end of file: image {path!r} (line {header_line}) declares {count} faces"
                )
            n, text = lines[i]
            if len(text.split()) == 1 and not _is_number_line(text):  # the next image's path line
                raise LabelFormatError(file, n, f"image {path!r} (line {header_line}) declares {count} faces but "
                                                f"{face} face line(s) follow before {text!r}")
            values = _parse_floats(text.split(), file, n)
            if len(values) not in (4, 10):
                raise LabelFormatError(
                    file, n, f"expected 10 numbers (x1 y1 w h blur expression illumination invalid "
                    f"occlusion pose) or 4, got {len(values)}"
                )
            i += 1
            if len(values) == 10 and values[7] != 0:
                result.num_invalid += 1
                continue
            x, y, w, h = values[:4]
            if w <= 0 or h <= 0:
                result.num_degenerate += 1
                continue
            rows.append(_face_row(x, y, w, h, None))
        result.images.append(ImageAnnotation(path, _stack(rows), header_line))
    return result


def _detect_format(file: Path) -> str:
    for raw in _read_lines(file):
        line = raw.strip()
        if line:
            return "retinaface" if line.startswith("#") else "wider"
    return "retinaface"


def parse_label_file(file: str | os.PathLike[str], fmt: LabelFormat = "auto") -> LabelFile:
    """Parse a label file in RetinaFace or official WIDER FACE format (``fmt="auto"`` detects it).

    Raises:
        FileNotFoundError: the file does not exist.
        LabelFormatError: a malformed line (message ``<file>:<line>: reason``).
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"label file not found: {file}")
    if fmt == "auto":
        fmt = _detect_format(file)  # type: ignore[assignment]
    if fmt == "retinaface":
        return parse_retinaface_labels(file)
    if fmt == "wider":
        return parse_wider_labels(file)
    raise ValueError(f"unknown label format {fmt!r} (expected 'auto', 'retinaface' or 'wider')")


def read_training_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a training image as BGR uint8 ``(H, W, 3)`` (:func:`utils.image_loader.read_complete_image`).

    Every problem is an :class:`~utils.image_io.ImageReadError` (message ``<path>: reason``), so
    training can replace the sample: a missing, unreadable, empty or undecodable file, a JPEG/PNG
    that is cut short, an image over OpenCV's size limit.
    """
    try:
        return read_complete_image(path)
    except cv2.error as error:
        raise ImageReadError(f"{path}: {opencv_reason(error)}") from None
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read the file ({error.strerror or error})") from None


class WiderFaceDataset(Dataset):
    """Face-detection dataset over a label file and an image folder.

    Args:
        label_file: RetinaFace ``label.txt`` or official ``wider_face_*_bbx_gt.txt``.
        image_root: folder the label paths are relative to (default: ``images/`` beside the
            label file).
        transform: ``(image, targets) -> (image, targets)``, e.g. :class:`TrainTransform`;
            ``None`` returns the decoded image and the original targets.
        fmt: ``"auto"``, ``"retinaface"`` or ``"wider"``.
        missing: what to do with images listed but absent on disk, checked at construction:
            ``"raise"`` (default, ``FileNotFoundError`` with the count and the first paths) or
            ``"skip"`` (drop them and emit a warning).

    Items are ``(image, targets)`` with the conventions of the module docstring. Annotations are
    held in one contiguous array (plus offsets) so forked DataLoader workers share them. Images
    are read with :func:`read_training_image`: an unreadable, empty or truncated file raises
    :class:`~utils.image_io.ImageReadError` when its item is loaded (training replaces such
    samples, see :class:`utils.train_data.EpochSeededDataset`); nothing is decoded up front.

    Attributes:
        num_degenerate: boxes dropped because ``w <= 0`` or ``h <= 0``.
        num_invalid: official-format faces dropped because flagged invalid.
        num_missing: images skipped because missing (``missing="skip"``).
        num_faces: faces kept over all images.
    """

    def __init__(
        self,
        label_file: str | os.PathLike[str],
        image_root: str | os.PathLike[str] | None = None,
        transform: Transform | None = None,
        *,
        fmt: LabelFormat = "auto",
        missing: Literal["raise", "skip"] = "raise",
    ) -> None:
        if missing not in ("raise", "skip"):
            raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
        self.label_file = Path(label_file)
        self.image_root = Path(image_root) if image_root is not None else self.label_file.parent / "images"
        self.transform = transform
        parsed = parse_label_file(self.label_file, fmt)
        self.format = parsed.format
        self.num_degenerate = parsed.num_degenerate
        self.num_invalid = parsed.num_invalid

        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_root} (labels: {self.label_file})")
        images = parsed.images
        missing_paths = [a for a in images if not (self.image_root / a.path).is_file()]
        self.num_missing = len(missing_paths)
        if missing_paths:
            listed = ", ".join(str(self.image_root / a.path) for a in missing_paths[:_MAX_LISTED_MISSING])
            more = "" if len(missing_paths) <= _MAX_LISTED_MISSING else ", ..."
            message = (
                f"{len(missing_paths)} of {len(images)} images listed in {self.label_file} are missing "
                f"under {self.image_root}: {listed}{more}"
            )
            if missing == "raise":
                raise FileNotFoundError(message + "; restore them, or delete their entries from the label file "
                                        "to train without them")
            warnings.warn(message + " (skipped)", stacklevel=2)
            absent = {id(a) for a in missing_paths}
            images = [a for a in images if id(a) not in absent]

        counts = np.array([len(a.targets) for a in images], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._targets = (
            np.concatenate([a.targets for a in images]).astype(np.float32) if len(images) else empty_targets()
        )
        self._paths = np.array([a.path for a in images], dtype=np.str_)

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def num_faces(self) -> int:
        return int(len(self._targets))

    def image_path(self, index: int) -> Path:
        """Absolute path of image ``index``."""
        return self.image_root / str(self._paths[index])

    def targets(self, index: int) -> np.ndarray:
        """Original targets of image ``index``: float32 ``(K, 15)`` in original pixels (a copy)."""
        return self._targets[self._offsets[index]:self._offsets[index + 1]].copy()

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = read_training_image(self.image_path(index))  # ImageReadError for bad/truncated files
        targets = self.targets(index)
        if self.transform is not None:
            image, targets = self.transform(image, targets)
        return image, targets

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.label_file)!r}, images={len(self)}, faces={self.num_faces}, "
            f"degenerate={self.num_degenerate}, invalid={self.num_invalid}, transform={self.transform!r})"
        )


def dataset_from_root(
    root: str | os.PathLike[str],
    split: str = "train",
    transform: Transform | None = None,
    **kwargs: Any,
) -> WiderFaceDataset:
    """Dataset for the ``--dataset`` layout ``<root>/<split>/label.txt`` + ``<root>/<split>/images/``.

    ``kwargs`` go to :class:`WiderFaceDataset` (``fmt``, ``missing``).

    Raises:
        FileNotFoundError: naming the missing folder or file.
    """
    root = Path(root)
    split_dir = root / split
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir} (expected <dataset>/{split}/label.txt "
                                f"and <dataset>/{split}/images/; see data/README.md)")
    label_file = split_dir / "label.txt"
    image_root = split_dir / "images"
    absent = [str(p) for p in (label_file, image_root) if not p.exists()]
    if absent:
        raise FileNotFoundError(f"missing in dataset split {split_dir}: {', '.join(absent)} (see data/README.md)")
    return WiderFaceDataset(label_file, image_root, transform, **kwargs)


def detection_collate(
    batch: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
) -> tuple[torch.Tensor | DeferredBatch, list[torch.Tensor]]:
    """Batch ``(image, targets)`` samples.

    Images (uint8 ``(S, S, 3)`` HWC numpy arrays, or ``(3, S, S)`` tensors) are stacked into a
    uint8 tensor ``(B, 3, S, S)`` (channel order BGR, unchanged values); HWC arrays are copied once,
    as they are, so the result has channels-last strides (the memory format training runs in on
    CUDA) and, in a DataLoader worker, lives in shared memory already (no second copy on the way
    to the main process). Targets become a list of ``B`` float32 tensors ``(K_i, 15)`` in pixels
    (``K_i`` may be 0). Samples of :class:`~utils.device_augment.DeferredTrainTransform` become a
    :class:`~utils.device_augment.DeferredBatch` instead of the image tensor.

    Raises:
        ValueError: the images do not all have the same size (e.g. ``ValTransform`` with
            ``batch_size > 1``).
    """
    batch = list(batch)
    if not batch:
        raise ValueError("empty batch")
    targets = [_targets_tensor(target) for _, target in batch]
    images = [image for image, _ in batch]
    if isinstance(images[0], DeferredImage):
        return DeferredBatch.collate(images), targets
    for image in images:
        if isinstance(image, np.ndarray) and (image.ndim != 3 or image.shape[2] != 3):
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    shapes = {tuple(im.shape[:2]) if isinstance(im, np.ndarray) else tuple(im.shape[1:]) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in a batch must share one size, got {sorted(shapes)}; use batch_size=1 "
                         "or a transform that resizes (TrainTransform)")
    if not all(isinstance(im, np.ndarray) for im in images):
        return torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
                            if isinstance(im, np.ndarray) else im for im in images]).contiguous(), targets
    height, width = shapes.pop()
    stacked = _batch_buffer((len(images), height, width, 3))
    np.stack(images, out=stacked.numpy())
    return stacked.permute(0, 3, 1, 2), targets


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory inside a DataLoader worker (what
    ``default_collate`` does, so that sending the batch to the main process copies nothing)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _targets_tensor(target: np.ndarray | torch.Tensor) -> torch.Tensor:
    target_t = torch.as_tensor(np.asarray(target, dtype=np.float32) if not torch.is_tensor(target) else target)
    return target_t.float().reshape(-1, TARGET_COLUMNS)


def images_to_network_input(images: torch.Tensor | DeferredBatch, device: torch.device | str | None = None,
                            channels_last: bool = False, compile_augment: bool = False) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` BGR -> float32 network input on ``device``: the public preprocessing
    (``float(image) - (104, 117, 123)``, no scaling) run after the transfer, on the accelerator;
    in channels_last memory format with ``channels_last``. A
    :class:`~utils.device_augment.DeferredBatch` is augmented there first (by the compiled kernels
    with ``compile_augment``: :func:`~utils.device_augment.augment`)."""
    if isinstance(images, DeferredBatch):
        return images.network_input(device, compiled=compile_augment, channels_last=channels_last)
    if device is not None:
        images = images.to(device=device, non_blocking=True)
    inputs = preprocess(images, channels_last_input=False)
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


def normalize_targets(targets: torch.Tensor, width: float, height: float | None = None) -> torch.Tensor:
    """Pixel targets ``(K, 15)`` -> coordinates in ``[0, 1]`` (what the public MultiBoxLoss expects).

    x columns are divided by ``width``, y columns by ``height`` (default ``width``); absent
    landmarks (flag ``-1``) keep ``-1``; the flag column is unchanged. Returns a new tensor.
    """
    height = width if height is None else height
    out = targets.clone()
    scale = torch.tensor([width, height] * 7, dtype=out.dtype, device=out.device)
    has_lm = out[:, 14] > 0
    out[:, 0:4] /= scale[0:4]
    out[has_lm, 4:14] /= scale[4:14]
    return out


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 2,
    seed: int | None = None,
    *,
    shuffle: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
) -> DataLoader:
    """DataLoader wired with :func:`detection_collate` and :func:`seed_worker`.

    With ``seed`` set, the shuffling order and every worker's augmentation stream are
    reproducible for a given ``workers`` count. With ``workers == 0`` the dataset's own transform
    generator is used (seed it when constructing the transform).
    """
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    if persistent_workers is None:
        persistent_workers = workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=detection_collate,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and workers > 0,
    )
