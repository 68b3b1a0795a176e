"""Finding image files and decoding them in DataLoader worker processes.

Shared by ``inference.py`` and ``test.py``: recursive discovery of image files, detection of
truncated JPEG/PNG files and damaged JPEG data (which OpenCV would decode with grey fill), per-file error
records instead of exceptions (a bad file never stops a batch job), a DataLoader that keeps
OpenCV's thread pool out of forked workers, and grouping of same-size images into batches.
"""
from __future__ import annotations

import errno
import math
import os
import re
import signal
import stat
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from models.padding_mask import padded_size
from utils.errors import is_opencv_error, is_out_of_memory, os_error_reason
from utils.image_io import IMAGE_EXTENSIONS, ImageReadError, as_bgr_uint8, decode_image, read_image_bytes
from utils.names import escape_name
from utils.native_stderr import captured_native_stderr, write_lines

DEFAULT_MAX_PIXELS = 36_000_000  # larger images are downscaled for the network (with a warning)


# --------------------------------------------------------------------------------------------
# File discovery
# --------------------------------------------------------------------------------------------

def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


class UnreadableInputError(OSError):
    """The input folder itself cannot be listed (permission denied, ...); ``str()`` says why."""


def find_images(root: str | Path, exclude: Iterable[str | Path] = (),
                unreadable: list[tuple[str, str]] | None = None, marker_files: Sequence[str] = (),
                marked: list[str] | None = None, loops: list[str] | None = None) -> list[Path]:
    """Image files under ``root`` (recursively; jpg, jpeg, png, bmp, webp in any letter case),
    sorted by relative path. ``root`` may also be a single image file. Hidden files and folders
    (names starting with ``.``: ``.thumbnails/``, macOS's ``._IMG_1.jpg`` resource forks) are not
    searched, as shells and file browsers leave them out; ``root`` itself may be one. Folders in
    ``exclude`` (e.g. the output folder inside the input folder) are not searched, nor are
    sub-folders that hold every file of ``marker_files`` (e.g. the results of an earlier run);
    these are appended to ``marked`` as ``"<relative path>/"`` when it is a list.

    With a list ``unreadable``, a sub-folder that cannot be listed (permission denied ...) is
    appended to it as ``("<relative path>/", reason)`` and the search goes on, and ``root`` itself
    unreadable raises :class:`UnreadableInputError`; without one, such folders are passed over
    silently (``os.walk``'s default). A linked sub-folder that leads back to a folder above it (a
    loop; its images are found there) is not followed, and appended to ``loops`` as
    ``"<relative path>/"`` when that is a list.
    """
    root = Path(root)
    if root.is_file():
        return [root] if is_image_file(root) else []
    excluded = {os.path.realpath(p) for p in exclude}
    problems: list[tuple[str, str]] = []

    def on_error(error: OSError) -> None:
        where = Path(error.filename) if error.filename is not None else root
        if where == root:
            raise UnreadableInputError(error.errno, f"cannot read input folder {root}: {os_error_reason(error)}")
        problems.append((relative_name(where, root) + "/", f"folder not readable: {os_error_reason(error)}"))

    found = []
    # linked folders are followed; one that leads back to a folder above it (a loop) is reported
    above: dict[str, frozenset[str]] = {str(root): frozenset({os.path.realpath(root)})}
    for folder, subfolders, files in os.walk(root, onerror=on_error if unreadable is not None else None,
                                             followlinks=True):
        walked = []
        for name in sorted(subfolders):
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real in excluded:
                continue
            if marker_files and all(os.path.isfile(os.path.join(path, marker)) for marker in marker_files):
                if marked is not None:
                    marked.append(relative_name(path, root) + "/")
                continue
            if real in above[folder]:
                if loops is not None:
                    loops.append(relative_name(path, root) + "/")
                continue
            above[path] = above[folder] | {real}
            walked.append(name)
        subfolders[:] = walked
        found.extend(Path(folder) / name for name in files if is_image_file(name) and not name.startswith("."))
    if unreadable is not None:
        unreadable.extend(sorted(problems))
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


def png_is_complete(data: bytes) -> bool:
    """Whether the chunks of a PNG byte string run up to its IEND chunk (not a PNG: ``True``, the
    decoder decides)."""
    if not data.startswith(_PNG_SIGNATURE):
        return True
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IEND":
            return True
        pos += 12 + length  # length, type, data, CRC
    return False


def truncation_reason(data: bytes) -> str | None:
    """A reason when the bytes of a JPEG/PNG file are cut short (or, for a JPEG, so damaged that
    its segments never reach the end marker), else ``None`` (other formats: the decoder reports
    truncation itself)."""
    if data.startswith(b"\xff\xd8") and not jpeg_is_complete(data):
        if data.rstrip(b"\x00").endswith(b"\xff\xd9"):  # full length, but the segments are damaged
            return "corrupt JPEG (its segments do not lead to the end-of-image marker)"
        return "truncated JPEG (no end-of-image marker)"
    if data.startswith(_PNG_SIGNATURE) and not png_is_complete(data):
        return "truncated PNG (no IEND chunk)"
    return None


# libjpeg (inside OpenCV) reports damaged entropy-coded data only as a warning on file descriptor
# 2, then fills the rest of the picture with grey: these warnings mean part of the image is lost
_JPEG_DAMAGE_WARNING = re.compile(r"premature end|bad huffman code|instead of RST", re.IGNORECASE)


def decode_jpeg_checked(data: bytes, path: str | Path) -> np.ndarray:
    """:func:`~utils.image_io.decode_image` of JPEG bytes that raises :class:`ImageReadError`
    when libjpeg warns that the scan data is damaged (e.g. a file cut short with an end marker
    appended), which OpenCV would decode with grey fill. Other libjpeg warnings (e.g. extraneous
    bytes before a marker, often harmless) are written to stderr naming ``path``; other lines
    written to stderr meanwhile (other threads) are passed on unchanged."""
    lines: list[str] = []
    try:
        with captured_native_stderr() as lines:
            image = decode_image(data, path)
    finally:
        name = escape_name(str(path))
        write_lines([f"warning: {name}: {line.strip()}" if "JPEG" in line else line for line in lines
                     if line.strip() and not _JPEG_DAMAGE_WARNING.search(line)])
    damage = next((line.strip() for line in lines if _JPEG_DAMAGE_WARNING.search(line)), None)
    if damage is not None:
        raise ImageReadError(f"{path}: corrupt JPEG data (libjpeg: {damage}; the rest would be grey)")
    return image


def read_complete_image(path: str | Path) -> np.ndarray:
    """:func:`~utils.image_io.read_image` that also refuses a JPEG/PNG cut short or a JPEG whose
    scan data is damaged (OpenCV would decode either with grey fill, see
    :func:`decode_jpeg_checked`); the file is read once. :class:`ImageReadError` names the reason
    (also for a path that is missing, a broken link, a folder ...: :func:`_file_problem`)."""
    problem = _file_problem(path)
    if problem is not None:
        raise ImageReadError(f"{path}: {problem}")
    data = read_image_bytes(path)
    problem = truncation_reason(data)
    if problem is not None:
        raise ImageReadError(f"{path}: {problem}")
    if data.startswith(b"\xff\xd8"):
        return decode_jpeg_checked(data, path)
    return decode_image(data, path)


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


def opencv_reason(error: BaseException) -> str:
    """A readable one-line reason for a ``cv2.error`` raised while decoding."""
    detail = " ".join(str(getattr(error, "err", "") or error).split())
    if "CV_IO_MAX_IMAGE_" in detail:
        limit = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS") or str(1 << 30)
        return (f"image too large to decode: over OpenCV's limit of {limit} pixels (environment variable "
                f"OPENCV_IO_MAX_IMAGE_PIXELS) or {1 << 20} pixels a side")
    return f"OpenCV could not decode it: {detail}"


def _reason(error: BaseException, path: str) -> str:
    if is_opencv_error(error):
        return opencv_reason(error)
    if isinstance(error, OSError) and error.filename is not None:
        return os_error_reason(error)
    message = str(error)
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    return " ".join(message.split()) or type(error).__name__  # one line


def _file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be opened as a file (missing, dangling or looping link, not a regular
    file, permission denied), else ``None``."""
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno == errno.ENOENT and os.path.islink(path):
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        if error.errno == errno.ENOENT:
            return "file not found"
        return os_error_reason(error)
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"  # a FIFO or device: opening it could block
    return None


#: the channel orders an array may come in (``FaceDetector(channel_order=...)``)
CHANNEL_ORDERS = ("bgr", "rgb")


def check_channel_order(channel_order: str) -> str:
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'bgr' (cv2.imread's order) or 'rgb' (PIL's, matplotlib's), "
                         f"got {channel_order!r}")
    return channel_order


def is_pil_image(image: Any) -> bool:
    """Whether ``image`` is a PIL image (without importing PIL: none can exist before it is)."""
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(image, pil.Image)


def _pil_as_bgr_uint8(image: Any) -> np.ndarray:
    """A PIL image as BGR uint8. 16-bit, 32-bit integer and float modes go through
    :func:`~utils.image_io.as_bgr_uint8` as arrays (``convert("RGB")`` would clip them: a 16-bit
    image white, a float one in [0, 1] black); the others are converted from RGB."""
    if image.mode.startswith("I;16") or image.mode == "F":
        return as_bgr_uint8(np.asarray(image))
    if image.mode == "I":  # 32-bit integers: 16-bit PNGs open so in some Pillow versions
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"a PIL image of mode I with values outside 0..65535 ({values.min()}..{values.max()})")
        return as_bgr_uint8(values.astype(np.uint16))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def image_as_bgr_uint8(image: Any, channel_order: str = "bgr") -> np.ndarray:
    """A path read as inference.py reads it (:func:`read_complete_image`: a truncated or damaged
    file raises :class:`ImageReadError` with the reason the command line gives), a PIL image
    converted from its RGB (as PIL gives it: its EXIF orientation is not applied, see
    ``PIL.ImageOps.exif_transpose``), an array converted with :func:`~utils.image_io.as_bgr_uint8`
    after reversing its channels when ``channel_order`` is ``"rgb"`` (the order of a path's or a
    PIL image's pixels is known: never reversed)."""
    if isinstance(image, (str, Path)):
        return read_complete_image(image)
    if is_pil_image(image):
        return _pil_as_bgr_uint8(image)
    bgr = as_bgr_uint8(image)
    return np.ascontiguousarray(bgr[:, :, ::-1]) if check_channel_order(channel_order) == "rgb" else bgr


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
        image = read_complete_image(path)
        record.image = image
        record.net_image, record.net_scale = downscale_for_memory(image, max_pixels)
        if record.net_scale != (1.0, 1.0):
            h, w = image.shape[:2]
            nh, nw = record.net_image.shape[:2]
            record.notes.append(f"{w}x{h} has more than {max_pixels} pixels: downscaled to {nw}x{nh} "
                                f"before detection (boxes mapped back; --max_pixels 0 turns this off)")
    except (ImageReadError, OSError, ValueError, MemoryError, cv2.error) as error:
        record.image = record.net_image = None
        record.error = "out of memory while decoding" if is_out_of_memory(error) else _reason(error, str(path))
    record.load_s = time.perf_counter() - started
    return record


class ImageFolderDataset(Dataset):
    """Map-style dataset over image files; items are :class:`ImageRecord` (errors carried)."""

    def __init__(self, files: Sequence[str | Path], root: str | Path | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.files = [str(f) for f in files]
        self.names = [relative_name(f, root) if root is not None else Path(f).as_posix() for f in files]
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ImageRecord:
        return load_record(index, self.files[index], self.names[index], self.max_pixels)


def collate_records(batch: list[ImageRecord]) -> list[ImageRecord]:
    """Keep the records as they are: numpy images of any size, per-file errors included."""
    return list(batch)


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the workers too (one process group). They
    ignore it and end with the loader. A worker that stopped on it instead would exit without
    closing its queue and wait, up to DataLoader's join timeout, for the main process to read the
    images it still holds (seconds per worker); forked training workers would also run the
    training process's :class:`~utils.train_utils.StopRequest` handler (one message each).
    SIGTERM too: a batch scheduler sends it to every process of a job, and training saves
    ``last.pth`` on it, for which it still needs its workers; once the main process is gone,
    PyTorch's workers end themselves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: ImageFolderDataset, batch_size: int = 1, workers: int = 2) -> DataLoader:
    """A DataLoader decoding images in ``workers`` processes (0: in this process), in order;
    Ctrl-C stops the main process only (:func:`ignore_interrupts_in_worker`).

    Iterate it with :func:`start_loader`, which keeps OpenCV's thread pool out of the forked
    workers.
    """
    workers = min(workers, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_records, prefetch_factor=2 if workers else None,
                      persistent_workers=False, worker_init_fn=ignore_interrupts_in_worker if workers else None)


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


#: canvases up to this many pixels (WIDER FACE images: about 1 M) are topped up with any smaller image
TOP_UP_FREE_PIXELS = 1 << 22
#: a larger canvas takes only images whose canvas has at least 1 / this of its pixels
TOP_UP_MAX_WASTE = 4


class SameSizeBatcher:
    """Groups records by network-input size into batches of ``batch_size`` (``--infer_imsize_same``).

    :meth:`add` returns the batches that became full; at most ``max_pending`` images wait (the
    largest group is released early beyond that); :meth:`flush` returns what is left.

    With ``pad_to`` > 1 (``--pad_to``) a group is a canvas: the sizes rounded up to a multiple of
    ``pad_to``. Beyond ``max_pending`` and at the end the largest canvas is released first, and a
    group released before it is full is topped up with waiting images of canvases that fit inside
    it (padding is exact), largest first, so that nearly every batch has ``batch_size`` images: a
    batch shape (size and count) new to the process costs cuDNN and CUDA-graph set-up on a GPU.
    A canvas of more than :data:`TOP_UP_FREE_PIXELS` pixels takes only images whose own canvas is
    at least a :data:`TOP_UP_MAX_WASTE`-th of it: a few small photos next to a 36-megapixel one
    would otherwise each run (and take memory) at its size.
    """

    def __init__(self, batch_size: int, max_pending: int | None = None, pad_to: int = 1) -> None:
        self.batch_size = batch_size
        self.max_pending = max_pending or max(4 * batch_size, 16)
        self.pad_to = max(1, pad_to)
        self.groups: OrderedDict[tuple[int, ...], list[ImageRecord]] = OrderedDict()
        self.pending = 0

    def add(self, record: ImageRecord) -> list[list[ImageRecord]]:
        height, width, *channels = record.net_image.shape
        key = (*padded_size(height, width, self.pad_to), *channels)
        self.groups.setdefault(key, []).append(record)
        self.pending += 1
        ready = []
        if len(self.groups[key]) >= self.batch_size:
            ready.append(self._pop(key))
        while self.pending > self.max_pending:
            ready.append(self._pop(max(self.groups, key=self._release_order)))
        return ready

    def _release_order(self, key: tuple[int, ...]) -> int:
        # padded: the largest canvas, which the others can top up; exact sizes: the largest group
        return key[0] * key[1] if self.pad_to > 1 else len(self.groups[key])

    def flush(self) -> list[list[ImageRecord]]:
        if self.pad_to == 1:
            return [self._pop(key) for key in list(self.groups)]
        ready = []
        while self.groups:
            ready.append(self._pop(max(self.groups, key=self._release_order)))
        return ready

    def _pop(self, key: tuple[int, ...]) -> list[ImageRecord]:
        batch = self.groups.pop(key)
        if self.pad_to > 1:
            self._top_up(batch, key)
        self.pending -= len(batch)
        return batch

    def _top_up(self, batch: list[ImageRecord], canvas: tuple[int, ...]) -> None:
        area = canvas[0] * canvas[1]
        smallest = 0 if area <= TOP_UP_FREE_PIXELS else area / TOP_UP_MAX_WASTE
        fitting = sorted((key for key in self.groups if key[0] <= canvas[0] and key[1] <= canvas[1]
                          and key[2:] == canvas[2:] and key[0] * key[1] >= smallest),
                         key=lambda k: k[0] * k[1], reverse=True)
        for key in fitting:
            waiting = self.groups[key]
            taken = waiting[:self.batch_size - len(batch)]
            batch.extend(taken)
            del waiting[:len(taken)]
            if not waiting:
                del self.groups[key]
            if len(batch) >= self.batch_size:
                break
