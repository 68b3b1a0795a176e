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


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
                pixel_offset: float = PUBLIC_PIXEL_OFFSET) -> torch.Tensor:
    """NMS applied independently within each group id of ``groups`` (N,), e.g. the image index of
    each box in a batch. Returns kept indices sorted by decreasing score.

    Groups are kept apart by moving each one past the coordinate span of all boxes, in float64
    so the IoUs stay exact. (``torchvision.ops.batched_nms`` offsets by the largest coordinate,
    which assumes coordinates >= 0; decoded boxes at image borders can be negative, and a box of
    one image could then suppress a box of another.)
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    shifted = with_pixel_offset(boxes.double(), pixel_offset)
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
