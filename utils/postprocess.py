"""Batched post-processing of decoded detections: score threshold, top-k, NMS, keep-top-k.

Runs on the tensors' device for the whole batch at once; only the final detections leave it.
Semantics follow the public RetinaFace pipeline: keep scores ``> confidence_threshold``, the
``top_k`` best of those enter NMS (IoU ``> nms_threshold`` suppresses, +1 pixel areas), and the
``keep_top_k`` best survivors are returned (``None``: no limit, as the public WIDER FACE test).
A box that is not finite (the exp of an untrained or diverged network's offsets overflows) is
dropped before top-k, as if its score were under the threshold: it cannot be drawn, written or
evaluated, and must not take the place of a real candidate.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from utils.nms import PUBLIC_PIXEL_OFFSET, batched_nms


class BatchDetections(NamedTuple):
    """Detections of a batch, concatenated over images and sorted by image then score.

    image_index (K,) int64; boxes (K, 4) x1y1x2y2; scores (K,); landmarks (K, 10); counts (B,)
    number of detections per image (a Python list: the one host sync of post-processing).
    """

    image_index: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    counts: list[int]


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor,
                confidence_threshold: float, nms_threshold: float, top_k: int | None = 5000,
                keep_top_k: int | None = 750, pixel_offset: float = PUBLIC_PIXEL_OFFSET,
                nms_chunk: int | None = None) -> BatchDetections:
    """Select the final detections of each image.

    ``boxes`` (B, N, 4) x1y1x2y2, ``scores`` (B, N), ``landmarks`` (B, N, 10), in pixels (of
    the original images, for the public NMS convention: its +1 is one pixel of the original).
    ``nms_chunk``: candidates per NMS call (:func:`utils.nms.batched_nms`; same result; default:
    :func:`utils.nms.nms_chunk` of the device).
    """
    batch, num_priors = scores.shape
    k = num_priors if top_k is None else min(top_k, num_priors)
    # a box that is not finite, or a NaN score (topk ranks NaN first), takes no top-k place
    scores = scores.masked_fill(~torch.isfinite(boxes).all(dim=2) | scores.isnan(), float("-inf"))
    top_scores, top_index = scores.topk(k, dim=1, sorted=True)              # (B, k)
    image_index, rank = torch.nonzero(top_scores > confidence_threshold, as_tuple=True)
    prior_index = top_index[image_index, rank]
    candidate_scores = top_scores[image_index, rank]
    candidate_boxes = boxes[image_index, prior_index]
    candidate_landmarks = landmarks[image_index, prior_index]

    keep = batched_nms(candidate_boxes, candidate_scores, image_index, nms_threshold, pixel_offset, nms_chunk)
    # keep is sorted by score over the whole batch; regroup by image (stable keeps score order).
    keep = keep[torch.sort(image_index[keep], stable=True).indices]
    kept_image = image_index[keep]
    # per-image counts without torch.bincount, which reads the largest index back to the host (two
    # host syncs per batch on CUDA, H100 run 5's sync sites)
    counts = torch.zeros(batch, dtype=torch.long, device=kept_image.device).index_add_(
        0, kept_image, torch.ones_like(kept_image))
    count_list = counts.tolist()
    if keep_top_k is not None and max(count_list, default=0) > keep_top_k:
        first_of_image = torch.cumsum(counts, 0) - counts
        rank_in_image = torch.arange(keep.numel(), device=keep.device) - first_of_image[kept_image]
        keep = keep[rank_in_image < keep_top_k]
        count_list = [min(count, keep_top_k) for count in count_list]
    return BatchDetections(image_index[keep], candidate_boxes[keep], candidate_scores[keep],
                           candidate_landmarks[keep], count_list)
