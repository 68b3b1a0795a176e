"""Test-time augmentation for WIDER FACE evaluation: several scales, horizontal flips, box voting.

:class:`TTADetector` runs the multi-scale + flip protocol of insightface's RetinaFace evaluation
(``detection/retinaface/test_widerface.py``, mode 1 with ``retinaface.py``'s ``bbox_vote``, which
produced the paper's TTA figures) around a :class:`models.detector.FaceDetector`:

* scales (:func:`pyramid_scale`): per image, the base scale makes the shorter side 800 pixels,
  or the longer side 1200 if it would otherwise round to more; each pass ``s`` of ``scales``
  (500, 800, 1100, 1400, 1700) runs at ``base * s / 800`` (``0``: the original size). There is no
  other cap: a 1024 x 683 image runs its 1700 pass at 2549 x 1700 pixels;
* every pass resizes the image (``cv2.resize``, ``fx = fy``, bilinear, in uint8 as insightface
  reads it), runs it and its mirror image (one forward pass) and keeps all its *raw candidates*:
  scores above the detector's confidence threshold, no top-k, no NMS; boxes are clipped to the
  resized image, mirrored ones mapped back in resized pixels (landmarks: left/right swapped),
  then all are divided by the scale;
* the candidates of all passes are pooled and merged by :func:`box_voting`: greedy NMS in score
  order, a box is *absorbed* by the first kept box it overlaps with IoU ``>= vote_threshold``
  (``+1`` pixel areas, the WIDER FACE convention; a kept box absorbs itself); each kept box becomes
  the score-weighted mean of the boxes (and landmarks) it absorbed and keeps its own, i.e. the
  highest, score; a kept box that absorbed nothing but itself is dropped, except the last
  (lowest-scoring) one; at most 750 merged boxes per image.

Adapted to this project: the coordinates follow its decoding (continuous pixels, mirrors
``x -> width - x``, clipping to ``[0, width]``) where insightface's pixel-index boxes use
``width - 1 - x`` and ``[0, width - 1]``; the vote's IoU keeps the ``+1`` pixel areas of the
single-scale NMS (``pixel_offset``: the public ``py_cpu_nms`` convention on these same boxes),
and the prediction files keep the public Pytorch_Retinaface format. The merge is written with ``torchvision.ops``
and tensor scatter operations instead of insightface's Python loop, and runs on the detector's
device; the network is whichever the detector holds.

    detector = FaceDetector(weights, confidence_threshold=0.02, nms_threshold=0.4)
    tta = TTADetector(detector, TTAConfig(scales=(500, 800, 1100)))
    faces = tta.detect(image)            # Detections in original-image pixels
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torchvision import ops

from models.detector import (Detections, as_image_list, detect_in_batches, images_as_bgr_uint8, resize_image,
                             resize_scale)
from utils.nms import with_pixel_offset

if TYPE_CHECKING:  # for annotations only
    from models.detector import FaceDetector, ImageInput

__all__ = ["DEFAULT_SCALES", "TTAConfig", "TTADetector", "box_voting", "clip_detections", "flip_detections",
           "pyramid_scale"]

#: Shorter-side sizes of the passes of the RetinaFace paper's test protocol.
DEFAULT_SCALES: tuple[int, ...] = (500, 800, 1100, 1400, 1700)
#: insightface's base resize: shorter side 800, unless the longer side would pass 1200.
BASE_SIZE, BASE_MAX_SIZE = 800, 1200
#: insightface's cap on the merged boxes of an image.
MAX_MERGED = 750
#: Landmark order after a horizontal flip: left/right eyes and mouth corners swap.
_FLIP_LANDMARKS = (1, 0, 2, 4, 3)
#: The arrays of a :class:`models.detector.Detections`, in its constructor's order.
_FIELDS = ("boxes", "scores", "landmarks")
#: Upper bound of the (kept x pooled) IoU block computed at once in :func:`box_voting`.
_IOU_BLOCK = 1 << 22


def merged_box_limit(keep_top_k: int | None) -> int | None:
    """test.py's ``--keep_top_k`` under ``--tta`` as :attr:`TTAConfig.keep_top_k`: not given
    (None) -> :data:`MAX_MERGED`, 0 (``all``) -> None (no limit), else the count."""
    return MAX_MERGED if keep_top_k is None else (keep_top_k or None)


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation settings; the defaults are insightface's protocol (module docstring).

    scales: pass sizes ``s``: each pass resizes by ``base * s / 800`` (:func:`pyramid_scale`;
        one pass each, two with ``flip``); 0 = original size.
    flip: also run each scale on the horizontally mirrored image.
    vote_threshold: IoU from which pooled boxes are merged (``None``: the detector's NMS
        threshold).
    min_votes: drop merged boxes supported by fewer pooled boxes than this (1 keeps all) ...
    keep_last: ... except the last (lowest-scoring) one, as insightface's ``bbox_vote`` does.
    keep_top_k: merged detections kept per image (``None``: all).
    """

    scales: tuple[int, ...] = DEFAULT_SCALES
    flip: bool = True
    vote_threshold: float | None = None
    min_votes: int = 2
    keep_last: bool = True
    keep_top_k: int | None = MAX_MERGED

    @property
    def num_passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)


def pyramid_scale(height: int, width: int, size: int) -> float:
    """Resize factor of the pass ``size`` (a shorter side at the base scale; 0: original size) of
    a ``height`` x ``width`` image: ``size / 800`` times the scale that makes the shorter side 800,
    or the longer side 1200 where the shorter-side rule would round it to more (insightface's
    ``test_widerface.py``, in its order of operations)."""
    if size == 0:
        return 1.0
    return float(size) / BASE_SIZE * resize_scale(height, width, BASE_SIZE, BASE_MAX_SIZE)


def clip_detections(detections: Detections, width: float, height: float) -> Detections:
    """``detections`` with their boxes clipped to ``[0, width] x [0, height]`` (landmarks unchanged)."""
    boxes = detections.boxes.copy()
    np.clip(boxes[:, 0::2], 0.0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0.0, height, out=boxes[:, 1::2])
    return type(detections)(boxes, detections.scores, detections.landmarks)


def flip_detections(detections: Detections, width: float) -> Detections:
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
               min_votes: int = 1, keep_last: bool = False, keep_top_k: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Merge overlapping detections by score-weighted box voting (see the module docstring).

    Args:
        boxes: ``(N, 4)`` x1, y1, x2, y2; scores: ``(N,)``; landmarks: optional ``(N, L)``. A
            box or score that is not finite is left out (it has no place in an IoU order).
        iou_threshold: boxes overlapping a kept box with IoU ``>=`` this are merged into it.
        pixel_offset: 1.0 for ``+1`` pixel areas (WIDER FACE / public NMS), 0.0 continuous.
        min_votes: keep only merged boxes built from at least this many input boxes ...
        keep_last: ... and the lowest-scoring merged box whatever its votes (insightface).
        keep_top_k: keep at most this many merged boxes (highest scores), after ``min_votes``.

    Returns:
        ``(boxes (K, 4), scores (K,), landmarks (K, L) or None, votes (K,) int64)`` sorted by
        decreasing score; every output score is the highest score of its group.
    """
    boxes = boxes.float().reshape(-1, 4)
    scores = scores.float().reshape(-1)
    if landmarks is not None:  # (N, L); (N, 5, 2) is flattened. -1 alone cannot size the L of N = 0
        landmarks = landmarks.float().flatten(1) if landmarks.dim() > 1 else landmarks.float().reshape(len(boxes), -1)
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    if not finite.all():
        boxes, scores = boxes[finite], scores[finite]
        landmarks = None if landmarks is None else landmarks[finite]
    if len(boxes) == 0:
        empty_landmarks = None if landmarks is None else landmarks[:0]
        return boxes[:0], scores[:0], empty_landmarks, torch.zeros(0, dtype=torch.int64, device=boxes.device)
    shifted = with_pixel_offset(boxes, pixel_offset)
    # torchvision suppresses IoU > t; the voting scripts merge IoU >= t. IoUs are float32, so
    # "> the next double below t" is ">= t" for them.
    keep = ops.nms(shifted, scores, math.nextafter(float(iou_threshold), -math.inf))  # by score
    num_kept = len(keep)
    owner = _owners(shifted, keep, iou_threshold)
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
        enough = votes >= min_votes
        enough[-1] |= keep_last
        selected = selected[enough]
    if keep_top_k is not None:
        selected = selected[:keep_top_k]
    return (voted_boxes[selected], scores[keep][selected],
            None if voted_landmarks is None else voted_landmarks[selected], votes[selected])


def _owners(shifted: torch.Tensor, keep: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """(N,) index into ``keep`` of the first kept box (in score order) that overlaps each of the
    (N, 4) ``shifted`` boxes with IoU ``>= iou_threshold`` (the kept boxes' own entries are the
    caller's to set).

    The boxes are taken in chunks of neighbours by ``x1``, each compared with the kept boxes
    whose x range meets the chunk's; the others have no intersection with it, so IoU 0. On the
    crowded sample image (97,776 candidates of 10 passes, 2,799 kept) :func:`box_voting` took
    0.5 s on the 2-core CPU, 0.3 s of it NMS, against 3.0 s comparing every pair (same output)."""
    owner = torch.zeros(len(shifted), dtype=torch.int64, device=shifted.device)
    kept_boxes = shifted[keep]
    chunk = max(1, _IOU_BLOCK // max(len(keep), 1))
    by_x1 = torch.argsort(shifted[:, 0])
    for start in range(0, len(shifted), chunk):
        rows = by_x1[start:start + chunk]
        boxes = shifted[rows]
        meets = (kept_boxes[:, 0] < boxes[:, 2].max()) & (kept_boxes[:, 2] > boxes[:, 0].min())
        near = torch.nonzero(meets | (iou_threshold <= 0))[:, 0]  # IoU 0 >= a threshold <= 0
        if len(near) == 0:  # only kept boxes of zero width (their owner is set by the caller)
            continue
        iou = ops.box_iou(kept_boxes[near], boxes)                                # (k, n)
        hits = iou >= iou_threshold
        first = hits.to(torch.uint8).argmax(dim=0)                               # first True
        # Float rounding can leave a suppressed box without any hit: give it its best overlap.
        none = ~hits.any(dim=0)
        if none.any():
            first[none] = iou[:, none].argmax(dim=0)
        owner[rows] = near[first]
    return owner


class TTADetector:
    """Multi-scale + flip detector around a :class:`models.detector.FaceDetector` (the protocol
    of the module docstring).

    The passes run through a shallow copy of ``detector`` without NMS or top-k cuts (same
    network, device, precision and ``timings``), made at each call: the confidence threshold, and
    the NMS threshold that is the default voting IoU, are the detector's of that moment.
    ``detect``/``detect_batch`` mirror the FaceDetector methods and return
    :class:`models.detector.Detections` in original-image pixels.
    """

    def __init__(self, detector: FaceDetector, config: TTAConfig | None = None) -> None:
        self.detector = detector
        self.config = config or TTAConfig()
        if not self.config.scales:
            raise ValueError("TTA needs at least one scale")
        self.vote_threshold  # noqa: B018 - refused now, not at the first image, when there is none

    @property
    def vote_threshold(self) -> float:
        """``TTAConfig.vote_threshold``, else the detector's NMS threshold of the moment."""
        threshold = self.config.vote_threshold
        threshold = self.detector.nms_threshold if threshold is None else threshold
        if threshold is None:
            raise ValueError("TTA needs a voting IoU: give the detector an NMS threshold or TTAConfig.vote_threshold")
        return threshold

    def _candidates(self) -> FaceDetector:
        """The detector with its settings of the moment (confidence threshold ...), without NMS, top-k
        cuts and resizing: runs the resized images as they are and keeps every candidate."""
        return self.detector.with_settings(target_size=None, max_size=None, nms_threshold=None, top_k=None,
                                           keep_top_k=None, channel_order="bgr")

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
        return detect_in_batches(self, images)

    __call__ = detect

    def detect_batch(self, images: Sequence[ImageInput]) -> list[Detections]:
        """One :class:`models.detector.Detections` per image, merged over all passes."""
        return [self.merge([found for _, _, found in parts]) for parts in self.run_passes(images)]

    def run_passes(self, images: Sequence[ImageInput]) -> list[list[tuple[int, bool, Detections]]]:
        """Per image, ``(size, flipped, candidates)`` of every pass: its raw candidates (no NMS),
        clipped to the resized image, in original-image pixels, not merged. A size's image and its
        mirror share one forward pass."""
        images = as_image_list(images, "detect_batch")
        arrays = images_as_bgr_uint8(images, self.detector.channel_order)
        candidates = self._candidates()
        pooled: list[list[tuple[int, bool, Detections]]] = [[] for _ in arrays]
        pending = []
        for size in self.config.scales:
            # every size's forward passes are queued before the first is post-processed: on a GPU
            # the host resizes the next size's images while the network runs the previous one
            started = time.perf_counter()
            scales = [pyramid_scale(a.shape[0], a.shape[1], size) for a in arrays]
            resized = [a if s == 1.0 else resize_image(a, s, to_float=False) for a, s in zip(arrays, scales)]
            if self.config.flip:
                resized += [np.ascontiguousarray(r[:, ::-1]) for r in resized]
            self.timings["preprocess"] += time.perf_counter() - started
            pending.append((size, scales, resized, candidates.submit(resized)))
        for size, scales, resized, handle in pending:
            found = handle.result()  # in resized pixels
            for index, scale in enumerate(scales):
                height, width = resized[index].shape[:2]
                pooled[index].append((size, False, clip_detections(found[index], width, height).rescaled(scale)))
                if self.config.flip:
                    mirrored = clip_detections(found[len(arrays) + index], width, height)
                    pooled[index].append((size, True, flip_detections(mirrored, width).rescaled(scale)))
        return pooled

    def merge(self, parts: Sequence[Detections]) -> Detections:
        """Box voting over the candidates of several passes of one image, on the detector's device
        (a voting IoU of 0 or less: no voting, as in insightface; all candidates by score)."""
        pooled = Detections(*(np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS))
        if self.vote_threshold <= 0:
            order = np.argsort(-pooled.scores, kind="stable")
            return Detections(pooled.boxes[order], pooled.scores[order], pooled.landmarks[order])
        device = getattr(self.detector, "device", "cpu")
        boxes, scores, landmarks = (torch.from_numpy(getattr(pooled, name)).to(device) for name in _FIELDS)
        config = self.config
        boxes, scores, landmarks, _ = box_voting(boxes, scores, self.vote_threshold, landmarks,
                                                 pixel_offset=getattr(self.detector, "pixel_offset", 1.0),
                                                 min_votes=config.min_votes, keep_last=config.keep_last,
                                                 keep_top_k=config.keep_top_k)
        return Detections(boxes.cpu().numpy(), scores.cpu().numpy(), landmarks.cpu().numpy().reshape(-1, 5, 2))
