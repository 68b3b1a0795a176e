"""Non-maximum suppression.

The public RetinaFace/WIDER FACE code measures box areas with the "+1 pixel" convention
(``(x2 - x1 + 1) * (y2 - y1 + 1)``, inclusive pixel coordinates). ``pixel_offset=1.0`` reproduces
it exactly with ``torchvision.ops``, by shifting x2/y2 by one pixel before the call; use
``pixel_offset=0.0`` for the continuous convention. Boxes are (x1, y1, x2, y2).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision import ops

PUBLIC_PIXEL_OFFSET = 1.0


def with_pixel_offset(boxes: torch.Tensor, pixel_offset: float) -> torch.Tensor:
    """(N, 4) boxes with x2/y2 moved by ``pixel_offset``: continuous-convention IoUs of the result
    are the "+1 pixel" IoUs of the input when ``pixel_offset`` is 1."""
    if pixel_offset == 0.0:
        return boxes
    return torch.cat([boxes[:, :2], boxes[:, 2:] + pixel_offset], dim=1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        pixel_offset: float = PUBLIC_PIXEL_OFFSET) -> torch.Tensor:
    """Indices (int64, decreasing score) of the boxes (N, 4) kept, on the tensors' device.

    A box is suppressed when its IoU with a higher-scoring kept box exceeds ``iou_threshold``.
    """
    return ops.nms(with_pixel_offset(boxes.float(), pixel_offset), scores.float(), iou_threshold)


# Boxes per torchvision NMS call in batched_nms, by device type. Its CUDA kernel builds an
# N x N/64 bit mask and copies all of it to the host (N^2/8 bytes: 50 MB for 20,000 candidates of
# a 32-image batch), so one call for a whole batch costs more than a few calls of whole images
# each; a split batch also costs two host syncs (the group sizes: unique_consecutive, tolist).
# tools/benchmark_nms.py on an H100 (README, GPU benchmarks, run 5): 4096 was fastest or within
# 0.1 ms of one call in 3 of 4 cases and faster than 2048 in all 4; on a 2-core CPU 1024-2048
# were fastest (4096 +17 %).
NMS_CHUNKS = {"cuda": 4096, "cpu": 2048}


def nms_chunk(device: torch.device | str) -> int:
    """The default candidates per NMS call on ``device`` (:data:`NMS_CHUNKS`; CPU's for other types)."""
    return NMS_CHUNKS.get(torch.device(device).type, NMS_CHUNKS["cpu"])


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
                pixel_offset: float = PUBLIC_PIXEL_OFFSET, chunk: int | None = None) -> torch.Tensor:
    """NMS applied independently within each group id of ``groups`` (N,), e.g. the image index of
    each box in a batch. Returns kept indices sorted by decreasing score.

    Groups are kept apart by moving each one past the coordinate span of all boxes, in float64
    so the IoUs stay exact. (``torchvision.ops.batched_nms`` offsets by the largest coordinate,
    which assumes coordinates >= 0; decoded boxes at image borders can be negative, and a box of
    one image could then suppress a box of another.) Over ``chunk`` boxes (default:
    :func:`nms_chunk` of the boxes' device), whole groups go into calls of at most ``chunk`` boxes
    (a larger group alone): the result is the same, the pairwise work and the host copy shrink
    (two host syncs more, for the group sizes).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if chunk is None:
        chunk = nms_chunk(boxes.device)
    if boxes.shape[0] <= chunk:
        return _offset_nms(boxes, scores, groups, iou_threshold, pixel_offset)
    by_group = torch.sort(groups, stable=True).indices
    sizes = torch.unique_consecutive(groups[by_group], return_counts=True)[1].tolist()
    kept, start, end = [], 0, 0
    for size in sizes + [chunk + 1]:  # the sentinel flushes the last chunk
        if end > start and end - start + size > chunk:
            members = by_group[start:end]
            kept.append(members[_offset_nms(boxes[members], scores[members], groups[members], iou_threshold,
                                            pixel_offset)])
            start = end
        end += size
    keep = torch.cat(kept)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


#: pixels; far beyond any image, small enough that float64 keeps a pixel's precision after the offsets
_COORDINATE_BOUND = 1e7


def _offset_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
                pixel_offset: float) -> torch.Tensor:
    """One torchvision NMS call over all groups (offset apart, see :func:`batched_nms`)."""
    # coordinates bounded first: one finite but huge box of an untrained network (exp of a large
    # offset, 1e17 px and more) would set an offset that rounds every other box to zero width
    shifted = with_pixel_offset(boxes.double().clamp(-_COORDINATE_BOUND, _COORDINATE_BOUND), pixel_offset)
    low = shifted.min()
    offsets = groups.to(shifted) * (shifted.max() - low + 1) - low
    return ops.nms(shifted + offsets[:, None], scores.double(), iou_threshold)


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
              pixel_offset: float = PUBLIC_PIXEL_OFFSET) -> np.ndarray:
    """NumPy NMS for CPU-only use; same semantics and result as :func:`nms`.

    ``boxes`` (N, 4) x1y1x2y2, ``scores`` (N,). Returns kept indices (int64) by decreasing score.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + pixel_offset) * (y2 - y1 + pixel_offset)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + pixel_offset)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + pixel_offset)
        intersection = width * height
        iou = intersection / (areas[best] + areas[rest] - intersection)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)
