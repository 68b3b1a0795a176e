"""Exact padding: a batch of images of different sizes, padded at the bottom and right to one
canvas, gives every image the network outputs it gets alone.

Padding alone is not exact. A convolution sees zeros beyond an image's border, but after the
first layer the padded area holds activations (biases, BatchNorm shifts), so the features near
the bottom and right borders of a padded image differ from its features alone (a face next to
the padding can move to IoU 0.97 of its unpadded box). :class:`PaddingMask` zeroes the padded
area of the input of every layer that mixes neighbouring positions (convolutions larger than
1x1, max pooling) on the batch it is told about. Elementwise layers (1x1 convolutions,
BatchNorm, activations, sums) cannot carry the padding's values into an image, and the FPN's
nearest upsampling of the RetinaFace feature maps reads, at an image's positions, only
positions of the same image.

Why this is exact: with stride-2 layers of kernel 3 and padding 1 (or 7/3, or 1x1 with padding
0) an input of ``h`` rows gives ``ceil(h / 2)``, so at ``2**k``-times downsampling an image of
``h`` rows covers the first ``ceil(h / 2**k)`` rows of the canvas's map, and those positions read
exactly the values (and zeros) they read when the image is alone. Max pooling follows a ReLU in
the ResNets: its inputs are >= 0, so a zero in place of its -inf padding changes no maximum. The
detection heads' outputs at positions outside an image are meaningless; :func:`valid_priors`
tells which priors lie inside each image.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from layers.prior_box import STEPS, feature_map_sizes


def padded_size(height: int, width: int, multiple: int = 1) -> tuple[int, int]:
    """``(height, width)`` rounded up to a multiple of ``multiple`` pixels: the canvas of a
    forward pass with ``FaceDetector(pad_to=multiple)`` (``--pad_to``)."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def mixes_positions(module: nn.Module) -> bool:
    """Whether ``module``'s output at a position depends on other positions of its input."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size != (1, 1)
    return isinstance(module, nn.MaxPool2d)


def _downsampling_steps(canvas: int, size: int) -> int:
    """``k`` such that ``size`` is ``canvas`` halved (rounding up) ``k`` times."""
    steps = 0
    while canvas > size:
        canvas = (canvas + 1) // 2
        steps += 1
    if canvas != size:
        raise ValueError(f"a feature map of {size} is not the input of {canvas} halved; exact padding needs "
                         "stride-2 layers that map n to ceil(n / 2)")
    return steps


def _ceil_div(values: torch.Tensor, power_of_two_exponent: int) -> torch.Tensor:
    divisor = 1 << power_of_two_exponent
    return torch.div(values + divisor - 1, divisor, rounding_mode="floor")


def position_mask(sizes: torch.Tensor, canvas: tuple[int, int], map_size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) bool: which positions of a ``map_size = (h, w)`` feature map of a ``canvas =
    (H, W)`` input lie inside each image. ``sizes`` (B, 2) int64 (height, width) in input pixels."""
    rows_steps = _downsampling_steps(canvas[0], map_size[0])
    cols_steps = _downsampling_steps(canvas[1], map_size[1])
    valid_rows = _ceil_div(sizes[:, 0], rows_steps)
    valid_cols = _ceil_div(sizes[:, 1], cols_steps)
    rows = torch.arange(map_size[0], device=sizes.device)[None] < valid_rows[:, None]  # (B, h)
    cols = torch.arange(map_size[1], device=sizes.device)[None] < valid_cols[:, None]  # (B, w)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def valid_priors(sizes: torch.Tensor, canvas: tuple[int, int], num_anchor: int) -> torch.Tensor:
    """(B, N) bool: which of the ``N`` priors of a ``canvas = (H, W)`` input lie inside each image
    (prior order of ``layers.prior_box``: level, row, column, anchor). ``sizes`` (B, 2) int64
    (height, width) in pixels, each at most the canvas."""
    levels = []
    for rows, cols in feature_map_sizes(canvas, STEPS):
        inside = position_mask(sizes, canvas, (rows, cols))[:, 0]  # (B, rows, cols)
        levels.append(inside[..., None].expand(-1, -1, -1, num_anchor).reshape(sizes.shape[0], -1))
    return torch.cat(levels, dim=1)


class PaddingMask:
    """Zeroes, inside :meth:`active`, the padded area of the input of every layer of ``network``
    that mixes positions (see the module doc), in place: for inference (no autograd).

    The hooks exist only inside :meth:`active` (a hook on every layer would slow each unpadded
    forward pass). The masks are built from the ``sizes`` tensor with device operations only (no
    host sync), so a masked forward pass can be captured in a CUDA graph whose static input
    includes ``sizes``.
    """

    def __init__(self, network: nn.Module) -> None:
        self._sizes = torch.empty(0, 2, dtype=torch.int64)  # set by active()
        self._canvas: tuple[int, int] = (0, 0)
        self._masks: dict[tuple[int, int, int, torch.dtype], torch.Tensor] = {}
        self.layers = [m for m in network.modules() if mixes_positions(m)]

    @contextmanager
    def active(self, sizes: torch.Tensor, canvas: tuple[int, int]) -> Iterator[None]:
        """Mask the forward passes run inside: ``sizes`` (B, 2) int64 (height, width) of each
        image of a batch padded to ``canvas = (H, W)``, on the network's device."""
        self._sizes, self._canvas, self._masks = sizes, (int(canvas[0]), int(canvas[1])), {}
        handles = [layer.register_forward_pre_hook(self._zero_padding) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._masks = {}

    def _zero_padding(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        features = args[0]
        channels_last = features.is_contiguous(memory_format=torch.channels_last)
        # a mask broadcast over few NHWC channels is a slow pattern for CPU kernels (4x for 3
        # channels): such maps get a mask of their full shape (small: few channels)
        channels = features.shape[1] if channels_last and features.shape[1] < 16 else 1
        key = (channels, features.shape[-2], features.shape[-1], features.dtype)
        mask = self._masks.get(key)
        if mask is None:
            mask = position_mask(self._sizes, self._canvas, key[1:3]).to(features.dtype)
            if channels > 1:
                mask = mask.expand(-1, channels, -1, -1).contiguous(memory_format=torch.channels_last)
            self._masks[key] = mask
        # a multiplication (4x faster than masked_fill_ on the CPU): the padding's activations are
        # finite, as the canvas is filled with finite values
        return (features.mul_(mask), *args[1:])
