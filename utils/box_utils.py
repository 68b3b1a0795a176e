"""Box and landmark coding of RetinaFace (SSD-style offsets with variances).

Conventions: ``priors`` are (cx, cy, w, h); boxes are (x1, y1, x2, y2) in the same units as the
priors (pixels or normalised - the offsets are scale-free, so both give the same codes);
landmarks are 5 (x, y) points flattened to 10 values. Every function broadcasts over leading
batch dimensions: ``(..., N, 4)`` against priors ``(N, 4)`` or ``(..., N, 4)``.
"""
from __future__ import annotations

import torch

VARIANCES = (0.1, 0.2)


def point_form(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], dim=-1)


def center_size(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)


def encode(matched: torch.Tensor, priors: torch.Tensor,
           variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Offsets (dx, dy, dw, dh) of x1y1x2y2 boxes ``matched`` (..., N, 4) relative to ``priors``."""
    centre = ((matched[..., :2] + matched[..., 2:]) / 2 - priors[..., :2]) / (variances[0] * priors[..., 2:])
    size = torch.log((matched[..., 2:] - matched[..., :2]) / priors[..., 2:]) / variances[1]
    return torch.cat([centre, size], dim=-1)


def decode(loc: torch.Tensor, priors: torch.Tensor,
           variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Inverse of :func:`encode`: offsets (..., N, 4) -> x1y1x2y2 boxes (..., N, 4)."""
    centre = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    size = priors[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def encode_landm(matched: torch.Tensor, priors: torch.Tensor,
                 variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Offsets of 5-point landmarks ``matched`` (..., N, 10) relative to the prior centres."""
    points = matched.unflatten(-1, (5, 2))
    offsets = (points - priors[..., None, :2]) / (variances[0] * priors[..., None, 2:])
    return offsets.flatten(-2)


def decode_landm(pre: torch.Tensor, priors: torch.Tensor,
                 variances: tuple[float, float] = VARIANCES) -> torch.Tensor:
    """Inverse of :func:`encode_landm`: offsets (..., N, 10) -> landmark coordinates (..., N, 10)."""
    points = priors[..., None, :2] + pre.unflatten(-1, (5, 2)) * variances[0] * priors[..., None, 2:]
    return points.flatten(-2)
