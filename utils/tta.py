"""Test-time augmentation for WIDER FACE evaluation: several scales, horizontal flips, box voting.

The RetinaFace paper evaluates with flips and the shorter image side at 500, 800, 1100, 1400 and
1700 pixels. :class:`TTADetector` runs a :class:`models.detector.FaceDetector` once per scale on
each image and on its mirror image (both in one forward pass, they have the same size), maps the
mirrored detections back, pools every pass's detections (each pass already thresholded, NMS'd and
cut to ``keep_top_k`` by the detector) and merges them with :func:`box_voting`:

* the pooled boxes go through greedy NMS in score order; a box is *absorbed* by the first
  (highest-scoring) kept box it overlaps with IoU ``>= vote_threshold`` (``+1`` pixel areas, the
  WIDER FACE convention) — every box, kept ones included (a kept box absorbs itself);
* each kept box is replaced by the score-weighted mean of the boxes (and landmarks) it absorbed,
  and keeps its own, i.e. the highest, score.

This is the ``bbox_vote`` merge of the SSH / S3FD / insightface RetinaFace evaluation scripts,
written with ``torchvision.ops`` and tensor scatter operations instead of a Python loop. (Those
scripts also drop a kept box that absorbed nothing but itself; ``min_votes=2`` does that, the
default ``min_votes=1`` keeps it.) How the pipeline around the merge (scales, pooling after each
pass's NMS, no 750 cap) differs from insightface's ``test_widerface.py``: README, Evaluation.

Scales: the shorter side is resized to each of ``scales`` unless the longer side would then
exceed ``max_size`` (then the longer side becomes ``max_size``), exactly like the single-scale
``--target_size/--max_size`` setting (:func:`models.detector.resize_scale`); a scale of ``0``
is the original size (longer side still capped at ``max_size``).

    detector = FaceDetector(weights, confidence_threshold=0.02, nms_threshold=0.4)
    tta = TTADetector(detector, TTAConfig(scales=(500, 800, 1100)))
    faces = tta.detect(image)            # Detections in original-image pixels
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torchvision import ops

from utils.image_io import as_bgr_uint8, read_image
from utils.nms import with_pixel_offset

if TYPE_CHECKING:  # for annotations only
    from models.detector import Detections, FaceDetector, ImageInput

__all__ = ["DEFAULT_SCALES", "DEFAULT_MAX_SIZE", "TTAConfig", "TTADetector", "box_voting",
           "flip_detections"]

#: Shorter-side scales of the RetinaFace paper's test protocol.
DEFAULT_SCALES: tuple[int, ...] = (500, 800, 1100, 1400, 1700)
#: Cap of the longer side (the published "1600/2150" setting's cap).
DEFAULT_MAX_SIZE = 2150
#: Landmark order after a horizontal flip: left/right eyes and mouth corners swap.
_FLIP_LANDMARKS = (1, 0, 2, 4, 3)
#: Upper bound of the (kept x pooled) IoU block computed at once in :func:`box_voting`.
_IOU_BLOCK = 1 << 22


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation settings.

    scales: shorter-side sizes (one pass each, two with ``flip``); 0 = original size.
    max_size: cap of the longer side at every scale (``None``: no cap).
    flip: also run each scale on the horizontally mirrored image.
    vote_threshold: IoU from which pooled boxes are merged (``None``: the detector's NMS
        threshold).
    min_votes: drop merged boxes supported by fewer pooled boxes than this (1 keeps all).
    keep_top_k: merged detections kept per image (``None``: the detector's ``keep_top_k``).
    """

    scales: tuple[int, ...] = DEFAULT_SCALES
    max_size: int | None = DEFAULT_MAX_SIZE
    flip: bool = True
    vote_threshold: float | None = None
    min_votes: int = 1
    keep_top_k: int | None = None

    @property
    def num_passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)


def flip_detections(detections: Detections, width: int) -> Detections:
    """Detections found on a horizontally mirrored image of width ``width``, in the coordinates
    of the unmirrored image (continuous pixel coordinates: ``x -> width - x``)."""
    boxes = detections.boxes.copy()
    boxes[:, 0] = width - detections.boxes[:, 2]
    boxes[:, 2] = width - detections.boxes[:, 0]
    landmarks = detections.landmarks[:, _FLIP_LANDMARKS].copy()
    landmarks[..., 0] = width - landmarks[..., 0]
    return type(detections)(boxes, detections.scores, landmarks)


def box_voting(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
               landmarks: torch.Tensor | None = None, *, pixel_offset: float = 1.0,
               min_votes: int = 1, keep_top_k: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Merge overlapping detections by score-weighted box voting (see the module docstring).

    Args:
        boxes: ``(N, 4)`` x1, y1, x2, y2; scores: ``(N,)``; landmarks: optional ``(N, L)``.
        iou_threshold: boxes overlapping a kept box with IoU ``>=`` this are merged into it.
        pixel_offset: 1.0 for ``+1`` pixel areas (WIDER FACE / public NMS), 0.0 continuous.
        min_votes: keep only merged boxes built from at least this many input boxes.
        keep_top_k: keep at most this many merged boxes (highest scores).

    Returns:
        ``(boxes (K, 4), scores (K,), landmarks (K, L) or None, votes (K,) int64)`` sorted by
        decreasing score; every output score is the highest score of its group.
    """
    boxes = boxes.float().reshape(-1, 4)
    scores = scores.float().reshape(-1)
    if landmarks is not None:  # (N, L); (N, 5, 2) is flattened. -1 alone cannot size the L of N = 0
        landmarks = landmarks.float().flatten(1) if landmarks.dim() > 1 else landmarks.float().reshape(len(boxes), -1)
    if len(boxes) == 0:
        empty_landmarks = None if landmarks is None else landmarks[:0]
        return boxes[:0], scores[:0], empty_landmarks, torch.zeros(0, dtype=torch.int64, device=boxes.device)
    shifted = with_pixel_offset(boxes, pixel_offset)
    # torchvision suppresses IoU > t; the voting scripts merge IoU >= t. IoUs are float32, so
    # "> the next double below t" is ">= t" for them.
    keep = ops.nms(shifted, scores, math.nextafter(float(iou_threshold), -math.inf))  # by score
    num_kept = len(keep)
    # Owner of every box: the first kept box (in score order) overlapping it with IoU >= t.
    owner = torch.empty(len(boxes), dtype=torch.int64, device=boxes.device)
    chunk = max(1, _IOU_BLOCK // max(num_kept, 1))
    kept_boxes = shifted[keep]
    for start in range(0, len(boxes), chunk):
        iou = ops.box_iou(kept_boxes, shifted[start:start + chunk])            # (K, n)
        hits = iou >= iou_threshold
        first = hits.to(torch.uint8).argmax(dim=0)                               # first True
        # Float rounding can leave a suppressed box without any hit: give it its best overlap.
        none = ~hits.any(dim=0)
        if none.any():
            first[none] = iou[:, none].argmax(dim=0)
        owner[start:start + chunk] = first
    owner[keep] = torch.arange(num_kept, device=boxes.device)                   # kept: itself
    weights = scores.unsqueeze(1)
    weight_sum = torch.zeros(num_kept, 1, device=boxes.device).index_add_(0, owner, weights)
    voted_boxes = torch.zeros(num_kept, 4, device=boxes.device).index_add_(0, owner, boxes * weights) / weight_sum
    voted_landmarks = None
    if landmarks is not None:
        voted_landmarks = torch.zeros(num_kept, landmarks.shape[1], device=boxes.device).index_add_(
            0, owner, landmarks * weights) / weight_sum
    votes = torch.bincount(owner, minlength=num_kept)
    selected = torch.arange(num_kept, device=boxes.device)
    if min_votes > 1:
        selected = selected[votes >= min_votes]
    if keep_top_k is not None:
        selected = selected[:keep_top_k]
    return (voted_boxes[selected], scores[keep][selected],
            None if voted_landmarks is None else voted_landmarks[selected], votes[selected])


class TTADetector:
    """Multi-scale + flip detector around a :class:`models.detector.FaceDetector`.

    Each scale runs through a shallow copy of ``detector`` with ``target_size``/``max_size``
    set (same network, thresholds, device, precision and ``timings``). ``detect``/``detect_batch``
    mirror the FaceDetector methods and return :class:`models.detector.Detections` in
    original-image pixels.
    """

    def __init__(self, detector: FaceDetector, config: TTAConfig | None = None) -> None:
        self.detector = detector
        self.config = config or TTAConfig()
        if not self.config.scales:
            raise ValueError("TTA needs at least one scale")
        self.vote_threshold = (detector.nms_threshold if self.config.vote_threshold is None
                               else self.config.vote_threshold)
        self.keep_top_k = detector.keep_top_k if self.config.keep_top_k is None else self.config.keep_top_k
        self._passes = []
        for size in self.config.scales:
            scaled = copy.copy(detector)
            scaled.target_size, scaled.max_size = (int(size) or None), self.config.max_size
            self._passes.append(scaled)

    @property
    def timings(self) -> dict[str, float]:
        return self.detector.timings

    @property
    def batch_size(self) -> int:
        return self.detector.batch_size

    def release_memory(self) -> None:
        self.detector.release_memory()  # the passes share the detector's network and graphs

    def detect(self, images: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        """As :meth:`models.detector.FaceDetector.detect`: one image -> Detections, a list -> a list."""
        if isinstance(images, (np.ndarray, str, Path)):
            return self.detect_batch([images])[0]
        size = self.batch_size
        return [d for start in range(0, len(images), size) for d in self.detect_batch(images[start:start + size])]

    __call__ = detect

    def detect_batch(self, images: Sequence[ImageInput]) -> list[Detections]:
        """One :class:`models.detector.Detections` per image, merged over all passes."""
        return [self.merge([found for _, _, found in parts]) for parts in self.run_passes(images)]

    def run_passes(self, images: Sequence[ImageInput]) -> list[list[tuple[int, bool, Detections]]]:
        """Per image, ``(scale, flipped, detections)`` of every pass, in original-image pixels
        (not merged). A scale's original and mirrored images share one forward pass."""
        arrays = [read_image(im) if isinstance(im, (str, Path)) else as_bgr_uint8(im) for im in images]
        inputs = list(arrays)
        if self.config.flip:
            inputs += [np.ascontiguousarray(a[:, ::-1]) for a in arrays]
        pooled: list[list[tuple[int, bool, Detections]]] = [[] for _ in arrays]
        for size, scaled in zip(self.config.scales, self._passes):
            found = scaled.detect_batch(inputs)  # same-size images share a forward pass
            for index, array in enumerate(arrays):
                pooled[index].append((size, False, found[index]))
                if self.config.flip:
                    flipped = flip_detections(found[len(arrays) + index], array.shape[1])
                    pooled[index].append((size, True, flipped))
        return pooled

    def merge(self, parts: Sequence[Detections]) -> Detections:
        """Box voting over the detections of several passes of one image."""
        kind = type(parts[0])
        boxes = torch.from_numpy(np.concatenate([p.boxes.reshape(-1, 4) for p in parts]))
        scores = torch.from_numpy(np.concatenate([p.scores.reshape(-1) for p in parts]))
        landmarks = torch.from_numpy(np.concatenate([p.landmarks.reshape(-1, 10) for p in parts]))
        pixel_offset = getattr(self.detector, "pixel_offset", 1.0)
        boxes, scores, landmarks, _ = box_voting(boxes, scores, self.vote_threshold, landmarks,
                                                 pixel_offset=pixel_offset, min_votes=self.config.min_votes,
                                                 keep_top_k=self.keep_top_k)
        return kind(boxes.numpy().astype(np.float32), scores.numpy().astype(np.float32),
                    landmarks.numpy().astype(np.float32).reshape(-1, 5, 2))
