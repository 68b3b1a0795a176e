"""Face and head masks from MediaPipe selfie segmentation (the ``--mask`` stage of inference.py).

For every detected face:

- the *head box* is the face box scaled by ``scale`` (4 by default) about its centre and clipped
  to the image (:func:`head_box`);
- the *head mask* is the selfie segmentation of the head crop, thresholded at 0.1
  (:class:`HeadSegmenter`; :class:`SegmenterPool` segments the crops of one image or of several
  with several graphs at once), as uint8 0/255 of the head crop's size;
- the *face mask* is the part of the head mask under the face box (:func:`face_mask_from_head_mask`).
  The face box's position inside the head crop is computed from the boxes themselves
  (:func:`face_box_in_head`), so it stays right when the head box was clipped at an image border
  and the face is no longer centred in the head crop.

Boxes are ``(x1, y1, x2, y2)``; integer boxes are half-open pixel ranges (``image[y1:y2, x1:x2]``).
The geometry functions are pure numpy; only :class:`HeadSegmenter` needs mediapipe, imported when
the first instance is created.
"""
from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from utils.native_stderr import native_stderr_filtered

MASK_THRESHOLD = 0.1  # selfie-segmentation probability above which a pixel is foreground
HEAD_SCALE = 4.0      # head box = face box scaled by this factor about its centre
MAX_MASK_THREADS = 8  # segmentation graphs of SegmenterPool at most (one core each)

#: The lines MediaPipe's native side writes to the process's stderr when a segmentation graph first
#: runs (mediapipe 0.10.21, every run alike): harmless, and noise in a batch job's log.
MEDIAPIPE_START_UP_LINES = re.compile(
    r"Created TensorFlow Lite XNNPACK delegate for CPU|All log messages before absl::InitializeLog\(\)"
    r"|Feedback manager requires a model with a single signature inference")

IntBox = tuple[int, int, int, int]


def _image_hw(image_shape: Sequence[int]) -> tuple[int, int]:
    height, width = int(image_shape[0]), int(image_shape[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image shape {tuple(image_shape)}")
    return height, width


def _clip_span(start: float, stop: float, size: int) -> tuple[int, int]:
    """``floor(start), ceil(stop)`` clipped to ``[0, size]``, at least one pixel wide."""
    lo = min(max(math.floor(start), 0), size - 1)
    hi = max(min(math.ceil(stop), size), lo + 1)
    return lo, hi


def pixel_box(box: Sequence[float], image_shape: Sequence[int]) -> IntBox:
    """The pixels a (float) box covers, clipped to the image: ``floor`` of the top-left corner,
    ``ceil`` of the bottom-right one; never empty (at least 1x1, inside the image)."""
    height, width = _image_hw(image_shape)
    x1, x2 = _clip_span(float(box[0]), float(box[2]), width)
    y1, y2 = _clip_span(float(box[1]), float(box[3]), height)
    return x1, y1, x2, y2


def head_box(face_box: Sequence[float], image_shape: Sequence[int], scale: float = HEAD_SCALE) -> IntBox:
    """The face box scaled by ``scale`` about its centre, as a pixel box clipped to the image.

    For ``scale >= 1`` the result contains :func:`pixel_box` of the face box.
    """
    x1, y1, x2, y2 = (float(v) for v in face_box[:4])
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half_w, half_h = scale * (x2 - x1) / 2.0, scale * (y2 - y1) / 2.0
    return pixel_box((cx - half_w, cy - half_h, cx + half_w, cy + half_h), image_shape)


def face_box_in_head(face_box: Sequence[float], head: Sequence[int]) -> IntBox:
    """The face's pixel box in head-crop coordinates (clipped to the head crop, never empty).

    ``face_box`` is in image coordinates (float allowed; rounded outwards like :func:`pixel_box`),
    ``head`` the integer head box in image coordinates (see :func:`head_box`).
    """
    hx1, hy1, hx2, hy2 = (int(v) for v in head[:4])
    x1, y1, x2, y2 = (float(v) for v in face_box[:4])
    return pixel_box((x1 - hx1, y1 - hy1, x2 - hx1, y2 - hy1), (hy2 - hy1, hx2 - hx1))


def face_mask_from_head_mask(head_mask: np.ndarray, face_box: Sequence[float], head: Sequence[int]) -> np.ndarray:
    """The part of ``head_mask`` (the mask of the crop ``image[hy1:hy2, hx1:hx2]``) under the face.

    The cut is at the face box's real offset inside the head crop (:func:`face_box_in_head`), which
    differs from the centre when the head box was clipped at an image border. Returns a copy of
    shape ``(fy2 - fy1, fx2 - fx1) + head_mask.shape[2:]``, the shape of the matching face crop.
    """
    hx1, hy1, hx2, hy2 = (int(v) for v in head[:4])
    if head_mask.shape[:2] != (hy2 - hy1, hx2 - hx1):
        raise ValueError(f"head mask of shape {head_mask.shape[:2]} does not match head box {tuple(head[:4])}")
    fx1, fy1, fx2, fy2 = face_box_in_head(face_box, head)
    return head_mask[fy1:fy2, fx1:fx2].copy()


def binarize(probabilities: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Segmentation probabilities -> uint8 mask, 255 where ``> threshold`` else 0."""
    return np.where(np.asarray(probabilities) > threshold, 255, 0).astype(np.uint8)


def selfie_segmentation_module():
    """``mediapipe.solutions.selfie_segmentation``, imported on first use; ``RuntimeError`` with
    an installation hint when mediapipe (or its legacy solutions API) is missing."""
    try:
        import mediapipe as mp  # noqa: PLC0415 (lazy: only the mask stage needs it)
    except ImportError as error:
        raise RuntimeError(f"the mask stage needs mediapipe (pip install mediapipe==0.10.21): {error}") from None
    try:
        return mp.solutions.selfie_segmentation
    except AttributeError:
        raise RuntimeError(f"mediapipe {getattr(mp, '__version__', '?')} has no legacy selfie segmentation "
                           f"solution; the mask stage needs mediapipe==0.10.21") from None


class HeadSegmenter:
    """One MediaPipe ``SelfieSegmentation(model_selection=0)`` graph for a whole run.

        with HeadSegmenter() as segmenter:
            mask = segmenter.segment(head_crop_bgr)   # (H, W) uint8 0/255

    mediapipe is imported here, not at module import, so the detector runs where it is absent.
    """

    def __init__(self, model_selection: int = 0, threshold: float = MASK_THRESHOLD) -> None:
        self.threshold = threshold
        # the graph's first run prints MediaPipe's start-up lines: a blank image takes it here, with
        # them filtered out (harmless: a result does not depend on the images before it, tested)
        with native_stderr_filtered(MEDIAPIPE_START_UP_LINES):
            self._segmentation = selfie_segmentation_module().SelfieSegmentation(model_selection=model_selection)
            self._segmentation.process(np.zeros((16, 16, 3), np.uint8))

    def probabilities(self, image_bgr: np.ndarray) -> np.ndarray:
        """Foreground probability (H, W) float32 of a BGR uint8 image (MediaPipe takes RGB)."""
        if self._segmentation is None:
            raise RuntimeError("HeadSegmenter is closed")
        rgb = np.ascontiguousarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
        result = self._segmentation.process(rgb)
        if result.segmentation_mask is None:
            return np.zeros(image_bgr.shape[:2], np.float32)
        return np.asarray(result.segmentation_mask, dtype=np.float32)

    def segment(self, image_bgr: np.ndarray) -> np.ndarray:
        """Binary mask (H, W) uint8 0/255 of a BGR uint8 image."""
        return binarize(self.probabilities(image_bgr), self.threshold)

    def segment_all(self, images_bgr: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`segment` of each image, in order."""
        return [self.segment(image) for image in images_bgr]

    def close(self) -> None:
        if self._segmentation is not None:
            self._segmentation.close()
            self._segmentation = None

    def __enter__(self) -> "HeadSegmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mask_threads() -> int:
    """Graphs of the mask stage's :class:`SegmenterPool`: one per core this process may use, at
    most :data:`MAX_MASK_THREADS`."""
    return max(1, min(MAX_MASK_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


class SegmenterPool:
    """``threads`` :class:`HeadSegmenter` graphs (default :func:`mask_threads`) on as many threads:
    every image handed to :meth:`submit` or :meth:`segment_all` is a task that the next free
    graph takes (a single image given to :meth:`segment_all` is segmented on the calling thread;
    not to be called from inside a task: with every graph busy it would wait for itself).
    MediaPipe runs a graph's inference on one core and releases the GIL meanwhile, so the faces
    of a crowded image are segmented in parallel (60 head crops of the sample photos: 7.8 ms each
    on one graph, 4.3 ms with two graphs on two threads, 2-core CPU machine, 2026-11-28), and so
    are the faces of images submitted one after another while the caller goes on (inference.py's
    mask stage). The masks are those of one graph: a mask does not depend on the images segmented
    before it (tested)."""

    def __init__(self, threads: int | None = None, threshold: float = MASK_THRESHOLD) -> None:
        count = mask_threads() if threads is None else int(threads)
        if count < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self._segmenters: list[HeadSegmenter] = []
        self._executor: ThreadPoolExecutor | None = None
        try:
            for _ in range(count):
                self._segmenters.append(HeadSegmenter(threshold=threshold))
        except BaseException:
            self.close()
            raise
        self._idle: queue.SimpleQueue[HeadSegmenter] = queue.SimpleQueue()
        for segmenter in self._segmenters:
            self._idle.put(segmenter)
        self._executor = ThreadPoolExecutor(count, thread_name_prefix="mask")
        self._busy_lock = threading.Lock()
        self.busy_seconds = 0.0  # segmentation time summed over the graphs

    @property
    def threads(self) -> int:
        return len(self._segmenters)

    def submit(self, images_bgr: Sequence[np.ndarray]) -> list[Future]:
        """One future per BGR uint8 image, whose result is its binary mask (H, W) uint8 0/255;
        the images are segmented by the graphs as they come free, this call returns at once."""
        if self._executor is None:
            raise RuntimeError("SegmenterPool is closed")
        return [self._executor.submit(self._segment, image) for image in images_bgr]

    def segment_all(self, images_bgr: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Binary masks (H, W) uint8 0/255 of BGR uint8 images, in order (one image: segmented on
        the calling thread, by a free graph)."""
        if self._executor is None:
            raise RuntimeError("SegmenterPool is closed")
        if len(images_bgr) == 1:
            return [self._segment(images_bgr[0])]
        futures = self.submit(images_bgr)
        wait(futures)  # all of them, also when one fails: no graph may still be busy when this returns
        return [future.result() for future in futures]

    def _segment(self, image_bgr: np.ndarray) -> np.ndarray:
        segmenter = self._idle.get()  # a task finds one free (as many graphs as threads); the caller may wait
        started = time.perf_counter()
        try:
            return segmenter.segment(image_bgr)
        finally:
            with self._busy_lock:
                self.busy_seconds += time.perf_counter() - started
            self._idle.put(segmenter)

    def close(self) -> None:
        """Wait for the images submitted, then close the graphs."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        segmenters, self._segmenters = self._segmenters, []
        for segmenter in segmenters:
            segmenter.close()

    def __enter__(self) -> "SegmenterPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def head_crops(image: np.ndarray, face_boxes: Sequence[Sequence[float]], scale: float = HEAD_SCALE
               ) -> tuple[list[tuple[int, int, int, int]], list[np.ndarray]]:
    """The head box (:func:`head_box`) of each face of a BGR image and its crop (a view of ``image``)."""
    heads = [head_box(face_box, image.shape, scale) for face_box in face_boxes]
    return heads, [image[hy1:hy2, hx1:hx2] for hx1, hy1, hx2, hy2 in heads]


def mask_parts(face_boxes: Sequence[Sequence[float]], heads: Sequence[tuple[int, int, int, int]],
               crops: Sequence[np.ndarray], head_masks: Sequence[np.ndarray]) -> list[dict[str, object]]:
    """The dicts of :func:`masks_of_faces` from the faces' head boxes, crops and head masks."""
    out = []
    for face_box, head, head_crop, head_mask in zip(face_boxes, heads, crops, head_masks):
        fx1, fy1, fx2, fy2 = face_in_head = face_box_in_head(face_box, head)
        out.append({"head_box": head, "face_box": face_in_head, "head": head_crop,
                    "face": head_crop[fy1:fy2, fx1:fx2],
                    "head_mask": head_mask, "face_mask": face_mask_from_head_mask(head_mask, face_box, head)})
    return out


def masks_of_faces(image: np.ndarray | str | Path, face_boxes: Sequence[Sequence[float]] | Any,
                   segmenter: HeadSegmenter | SegmenterPool, scale: float = HEAD_SCALE) -> list[dict[str, object]]:
    """Everything the mask stage produces for each face of a BGR image (or an image as the
    detector takes it: a path, grayscale, float in [0, 1] ...), in the order of ``face_boxes``
    (x1, y1, x2, y2 rows, or the :class:`models.detector.Detections` of the image); the head crops
    are segmented by ``segmenter.segment_all`` (a :class:`SegmenterPool` segments them in parallel).

    Each dict holds ``head_box`` (image coordinates), ``face_box`` (head-crop coordinates),
    ``head``/``face`` (BGR crops, views of ``image``, or of its converted copy when it was not BGR
    uint8), ``head_mask``/``face_mask`` ((h, w) uint8 0/255, the sizes of the crops).
    """
    from utils.image_loader import image_as_bgr_uint8  # noqa: PLC0415

    image = image_as_bgr_uint8(image)
    face_boxes = getattr(face_boxes, "boxes", face_boxes)  # Detections: their boxes
    heads, crops = head_crops(image, face_boxes, scale)
    return mask_parts(face_boxes, heads, crops, segmenter.segment_all(crops))
