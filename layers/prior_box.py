"""Anchor (prior) boxes of RetinaFace.

Each feature-map level ``k`` (stride ``steps[k]``) places ``len(min_sizes[k])`` square anchors at
every cell centre ``((col + 0.5) * step, (row + 0.5) * step)``. The order is level -> row ->
column -> size, matching the head outputs concatenated over levels and the published
Pytorch_Retinaface ``PriorBox``. Feature-map sizes are ``ceil(H / step) x ceil(W / step)``, which
is what the stride-2 convolutions of both backbones produce.
"""
from __future__ import annotations

from functools import lru_cache

import torch

STEPS = (8, 16, 32)
MIN_SIZES = {
    2: ((16, 32), (64, 128), (256, 512)),
    3: ((8, 16, 32), (32, 64, 128), (128, 256, 512)),
}


def anchor_sizes(num_anchor: int) -> tuple[tuple[int, ...], ...]:
    """Anchor side lengths (pixels) per level for 2 or 3 anchors per location."""
    if num_anchor not in MIN_SIZES:
        raise ValueError(f"num_anchor must be 2 or 3, got {num_anchor}")
    return MIN_SIZES[num_anchor]


def feature_map_sizes(image_size: tuple[int, int], steps: tuple[int, ...] = STEPS) -> list[tuple[int, int]]:
    """``ceil(H / step) x ceil(W / step)`` per level, in integer arithmetic (exact, and valid for
    the symbolic sizes of ``torch.export``)."""
    height, width = image_size
    return [((height + step - 1) // step, (width + step - 1) // step) for step in steps]


def num_priors(image_size: tuple[int, int], num_anchor: int = 2) -> int:
    """Number of anchors N of an input of ``image_size = (height, width)`` pixels."""
    return sum(h * w for h, w in feature_map_sizes(image_size)) * num_anchor


@lru_cache(maxsize=64)
def _priors_cached(height: int, width: int, min_sizes: tuple[tuple[int, ...], ...], steps: tuple[int, ...],
                   normalized: bool, device: torch.device) -> torch.Tensor:
    # a normal tensor even when first asked for under torch.inference_mode (detection): the same
    # cached priors may later enter a loss that autograd records (training)
    with torch.inference_mode(False):
        return make_priors(height, width, min_sizes, steps, normalized, device)


def make_priors(height: int, width: int, min_sizes: tuple[tuple[int, ...], ...], steps: tuple[int, ...] = STEPS,
                normalized: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uncached :func:`prior_boxes` for explicit anchor sizes: float32 (N, 4) ``cx, cy, w, h`` in
    pixels (or divided by ``(W, H, W, H)`` with ``normalized``). ``height`` and ``width`` may be the
    symbolic sizes of a model being exported (``tools/export_onnx.py`` builds its priors in the graph)."""
    # built on the device itself (no host computation and copy of the grid per new input size);
    # float64 arithmetic is exactly rounded everywhere, so every device gets the same values
    levels = []
    for (rows, cols), sizes, step in zip(feature_map_sizes((height, width), steps), min_sizes, steps):
        cy = (torch.arange(rows, dtype=torch.float64, device=device) + 0.5) * step
        cx = (torch.arange(cols, dtype=torch.float64, device=device) + 0.5) * step
        side = torch.stack([torch.full((), float(size), dtype=torch.float64, device=device) for size in sizes])
        grid_cy, grid_cx, grid_side = torch.meshgrid(cy, cx, side, indexing="ij")  # (rows, cols, sizes)
        levels.append(torch.stack([grid_cx, grid_cy, grid_side, grid_side], dim=-1).reshape(-1, 4))
    priors = torch.cat(levels)
    if normalized:
        priors = priors / priors.new_tensor([width, height, width, height])
    priors = priors.to(torch.float32)
    priors.requires_grad_(False)
    return priors


def prior_boxes(image_size: tuple[int, int], num_anchor: int = 2, device: torch.device | str = "cpu",
                normalized: bool = False) -> torch.Tensor:
    """Anchors for an input of ``image_size = (height, width)``.

    Returns a float32 tensor (N, 4) of (cx, cy, w, h) on ``device``: pixels by default, or divided
    by (W, H, W, H) with ``normalized=True`` (the Pytorch_Retinaface convention). Pixel anchors do
    not depend on the image size beyond their count, so images padded to a larger canvas share the
    anchors of the original image. Cached per (size, anchors, device): treat the result as read-only.
    """
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    return _priors_cached(height, width, anchor_sizes(num_anchor), STEPS, normalized, torch.device(device))
