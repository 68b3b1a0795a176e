"""The training augmentation split in two: random decisions, crop and box geometry in the
DataLoader workers, pixel work (photometric distortion, padding, flip, resize) batched on the
training device.

Why: a fast GPU trains the small models faster than a machine's cores can feed them. Per image a
worker spends 7.90 ms on decoding, ``TrainTransform`` and batching, against 3.47 ms with
:class:`DeferredTrainTransform`, which leaves it the decoding and an array slice (one core of the
2-core CPU machine, sample WIDER images, 640 px, ``python tools/benchmark_augmentation.py``,
2026-11-26). Inside ``TrainTransform`` the resize dominates (Lanczos draws alone cost 11-15 ms);
here it runs batched on the device, two matrix products per group of images of similar sizes.
The photometric step works on the real pixels only (the flat buffer, not the padded canvas) with
table lookups: per-image 256-entry tables and two whole-colour tables for BGR<->HSV (made once
per device by OpenCV), a few passes over the pixels instead of some fifty.

Same recipe, same random draws: :class:`DeferredTrainTransform` draws the parameters exactly like
:class:`TrainTransform` (same generator calls) and computes the targets with the same function,
so targets are identical. Pixels follow OpenCV: the photometric step uses the same lookup tables
and OpenCV's own BGR<->HSV conversions of every colour (:func:`_hsv_conversion_tables`); the
resize is ``W_y @ image @ W_x^T`` with the weights OpenCV's ``resize`` uses for each of the five
interpolations (half-pixel centres, replicated borders, cubic a = -0.75, Lanczos-4, area averaging
when shrinking), rounded to uint8 values like OpenCV's output. OpenCV's resize computes in fixed
point (and may call IPP), and its HSV->BGR conversion rounds the last pixels of a row differently
from the rest, so a pixel can differ: by at most 2 levels, 0.05 on average and without a bias
beyond 0.05 on the sample images (the tests bound it).

Flow: ``dataset[i]`` -> ``(DeferredImage, targets)``; :func:`utils.data_loaders.detection_collate`
-> ``(DeferredBatch, targets)``; the DataLoader pins it (``DeferredBatch.pin_memory``);
:func:`utils.data_loaders.images_to_network_input` -> :meth:`DeferredBatch.network_input`: float32
``(B, 3, S, S)`` minus the mean, on the device.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
import torch

from utils.data_transformer import (
    _IDENTITY_LUT, RGB_MEAN_BGR, AugmentParams, TrainTransform, _check_image, photometric_tables,
)
#: Width of the image of colours that OpenCV converts into the colour tables: rows this wide (a
#: multiple of every SIMD width) go through its vectorised path only, as an image's rows do but
#: for their last few pixels.
_TABLE_ROW = 4096


# --------------------------------------------------------------------------------------------
# Resize weights (OpenCV's cv2.resize, one axis)
# --------------------------------------------------------------------------------------------
def _cubic_coefficients(fx: np.ndarray) -> np.ndarray:
    a = np.float32(-0.75)
    x = fx.astype(np.float32)
    c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    return np.stack([c0, c1, c2, 1 - c0 - c1 - c2], axis=1)


def _lanczos4_coefficients(fx: np.ndarray) -> np.ndarray:
    taps = np.arange(8)
    distance = fx[:, None].astype(np.float64) + 3 - taps[None, :]   # from each tap to the sample
    with np.errstate(divide="ignore", invalid="ignore"):
        y = distance * math.pi / 4
        coefficients = np.sin(4 * y) * np.sin(y) / (4 * y * y)          # sinc(d) * sinc(d / 4)
    coefficients = coefficients / coefficients.sum(axis=1, keepdims=True)
    on_grid = fx < np.finfo(np.float32).eps
    coefficients[on_grid] = 0.0
    coefficients[on_grid, 3] = 1.0
    return coefficients.astype(np.float32)


def _scale(src: int, dst: int) -> float:
    # OpenCV's 1 / (dst / src), not src / dst: the last bit decides cvFloor at exact multiples
    return 1.0 / (dst / src)


def _area_shrink_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Box filter of the pixel overlaps (OpenCV's INTER_AREA when shrinking)."""
    scale = _scale(src, dst)
    rows: list[list[tuple[int, float]]] = []
    for dx in range(dst):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, src - fsx1)
        sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
        sx2 = min(sx2, src - 1)
        sx1 = min(sx1, sx2)
        row = []
        if sx1 - fsx1 > 1e-3:
            row.append((sx1 - 1, (sx1 - fsx1) / cell))
        row.extend((sx, 1.0 / cell) for sx in range(sx1, sx2))
        if fsx2 - sx2 > 1e-3:
            row.append((sx2, min(min(fsx2 - sx2, 1.0), cell) / cell))
        rows.append(row)
    width = max(len(r) for r in rows)
    index = np.zeros((dst, width), dtype=np.int64)
    weight = np.zeros((dst, width), dtype=np.float32)
    for dx, row in enumerate(rows):
        for k, (sx, w) in enumerate(row):
            index[dx, k], weight[dx, k] = sx, w
    return index, weight


@lru_cache(maxsize=4096)
def resize_taps(src: int, dst: int, interpolation: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of ``cv2.resize`` along one axis of ``src`` -> ``dst`` pixels.

    Returns ``index`` int64 ``(dst, T)`` and ``weight`` float32 ``(dst, T)``: output pixel ``i`` is
    ``sum_k weight[i, k] * input[index[i, k]]``. ``interpolation`` is one of ``cv2.INTER_LINEAR,
    INTER_CUBIC, INTER_AREA, INTER_NEAREST, INTER_LANCZOS4``. Cached (crop sides repeat); the
    arrays are read-only.
    """
    index, weight = _resize_taps(src, dst, interpolation)
    index.setflags(write=False)
    weight.setflags(write=False)
    return index, weight


def _resize_taps(src: int, dst: int, interpolation: int) -> tuple[np.ndarray, np.ndarray]:
    if src <= 0 or dst <= 0:
        raise ValueError(f"sizes must be positive, got {src} -> {dst}")
    if src == dst:  # cv2.resize copies
        return np.arange(dst, dtype=np.int64)[:, None], np.ones((dst, 1), dtype=np.float32)
    scale = _scale(src, dst)
    dx = np.arange(dst, dtype=np.float64)
    if interpolation == cv2.INTER_NEAREST:
        index = np.minimum(np.floor(dx * scale).astype(np.int64), src - 1)
        return index[:, None], np.ones((dst, 1), dtype=np.float32)
    if interpolation == cv2.INTER_AREA and scale >= 1:
        return _area_shrink_taps(src, dst)
    taps = {cv2.INTER_LINEAR: 2, cv2.INTER_AREA: 2, cv2.INTER_CUBIC: 4, cv2.INTER_LANCZOS4: 8}.get(interpolation)
    if taps is None:
        raise ValueError(f"unsupported interpolation {interpolation}")
    if interpolation == cv2.INTER_AREA:  # enlarging: linear weights measured on pixel areas
        sx = np.floor(dx * scale).astype(np.int64)
        fx = ((dx + 1) - (sx + 1) * (dst / src)).astype(np.float32)
        fx = np.where(fx <= 0, np.float32(0), fx - np.floor(fx)).astype(np.float32)
    else:
        position = ((dx + 0.5) * scale - 0.5).astype(np.float32)
        sx = np.floor(position).astype(np.int64)
        fx = position - sx.astype(np.float32)
    if interpolation in (cv2.INTER_LINEAR, cv2.INTER_AREA):
        low, high = sx < 0, sx >= src - 1
        fx = np.where(low | high, np.float32(0), fx)
        sx = np.where(low, 0, np.where(high, src - 1, sx))
        coefficients = np.stack([1 - fx, fx], axis=1).astype(np.float32)
    elif interpolation == cv2.INTER_CUBIC:
        coefficients = _cubic_coefficients(fx)
    else:
        coefficients = _lanczos4_coefficients(fx)
    index = sx[:, None] - taps // 2 + 1 + np.arange(taps)[None, :]
    return np.clip(index, 0, src - 1), coefficients


# --------------------------------------------------------------------------------------------
# One sample, prepared in a worker
# --------------------------------------------------------------------------------------------
@dataclass
class DeferredImage:
    """What a worker hands over for one image.

    pixels: uint8 ``(h, w, 3)`` BGR, the crop (or the whole image, padded to a square later).
    tables: uint8 ``(4, 256)`` lookup tables ``before, hue, saturation, after`` (identity rows
        where an op is off); use_hsv: whether the HSV round trip happens.
    rows, cols: ``(index, weight)`` resize taps ``(S, T)`` for the output rows and columns of
        the padded square; ``cols`` includes the flip.
    """

    pixels: np.ndarray
    tables: np.ndarray
    use_hsv: bool
    rows: tuple[np.ndarray, np.ndarray]
    cols: tuple[np.ndarray, np.ndarray]


def defer_pixels(image: np.ndarray, params: AugmentParams, size: int) -> DeferredImage:
    """The pixel half of :meth:`TrainTransform.apply` for ``params``, as data for the device."""
    pixels = TrainTransform.crop_pixels(image, params)
    side = max(pixels.shape[0], pixels.shape[1])
    tables = photometric_tables(params.photometric)
    stacked = np.stack([_IDENTITY_LUT if t is None else t
                        for t in (tables.before, tables.hue, tables.saturation, tables.after)])
    rows = resize_taps(side, size, params.interpolation)
    cols = rows
    if params.flip:  # TrainTransform flips the square before resizing it
        index, weight = rows
        cols = (side - 1 - index, weight)
    return DeferredImage(np.ascontiguousarray(pixels), stacked, tables.use_hsv, rows, cols)


class DeferredTrainTransform(TrainTransform):
    """:class:`TrainTransform` whose pixel work is left to the device: calls return
    ``(DeferredImage, targets)``; targets and random draws equal ``TrainTransform``'s for the same
    generator state. Batch with :func:`utils.data_loaders.detection_collate`. The padding colour
    is the network mean applied by ``DeferredBatch.network_input``; ``rgb_mean`` is not used."""

    def apply(self, image: np.ndarray, targets: np.ndarray | None,  # type: ignore[override]
              params: AugmentParams) -> tuple[DeferredImage, np.ndarray]:
        """Explicit ``params`` (deterministic), like :meth:`TrainTransform.apply`."""
        _check_image(image)
        out_targets = self.transform_targets(targets, image.shape, params)
        return defer_pixels(image, params, self.im_size), out_targets


# --------------------------------------------------------------------------------------------
# A batch, pinned and moved as a few tensors
# --------------------------------------------------------------------------------------------
def _stack_taps(taps: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, weight)`` pairs of (S, T_i) -> int64 and float32 (len(taps), S, max(2, T_i)), zero
    weights in the padding (at least two taps: one tap would be a case of its own for the compiled
    kernels)."""
    width = max(2, max(index.shape[1] for index, _ in taps))
    size = taps[0][0].shape[0]
    index = np.zeros((len(taps), size, width), dtype=np.int64)
    weight = np.zeros((len(taps), size, width), dtype=np.float32)
    for slot, (i, w) in enumerate(taps):
        index[slot, :, :i.shape[1]] = i
        weight[slot, :, :w.shape[1]] = w
    return torch.from_numpy(index), torch.from_numpy(weight)


def _pixel_starts(sizes: Sequence[tuple[int, int]], order: Sequence[int]) -> list[int]:
    """Where each image of ``order`` starts in pixels that hold the images in that order (``(h, w)``
    ``sizes``), and the total last."""
    return np.cumsum([0] + [sizes[i][0] * sizes[i][1] for i in order]).tolist()


@dataclass
class DeferredBatch:
    """A batch of :class:`DeferredImage`: the pixels of all images in one flat uint8 tensor, the
    rest as small tensors, so pinning and the host-to-device copy are one operation each.

    The images' pixels, shapes and tables are stored in ``photometric_order_list``: the images
    whose colours make the HSV round trip first (those with a table after it leading), so that
    each step of :func:`photometric` runs on one leading range of the pixels, not on all of them.
    pixels (sum h*w*3,) uint8, shapes (B, 2) int64 (h, w) and tables (B, 4, 256) uint8 in that
    order; ``hsv_images`` and ``after_images``: how many images of that order lead with the HSV
    round trip and with an ``after`` table that is not the identity.
    ``sizes`` (h, w) and ``use_hsv_list``: per image of the batch, in its own order;
    ``resize_order_list``: the images by increasing side (``max(h, w)``), the order :func:`augment`
    resizes them in, and resize_slots (B,) int64 the place of each image in that order;
    tap_index (2, B, S, T) int64 and tap_weight (2, B, S, T) float32: the resize taps of the output
    rows (``[0]``) and columns (``[1]``) of the images in ``resize_order_list``; resize_boxes (B, 3)
    int64: ``(first pixel in pixels, h, w)`` of those images (for the compiled kernels, which read
    them on the device).
    """

    pixels: torch.Tensor
    shapes: torch.Tensor
    sizes: list[tuple[int, int]]
    tables: torch.Tensor
    use_hsv_list: list[bool]
    photometric_order_list: list[int]
    hsv_images: int
    after_images: int
    resize_slots: torch.Tensor
    resize_order_list: list[int]
    tap_index: torch.Tensor
    tap_weight: torch.Tensor
    resize_boxes: torch.Tensor

    _TENSORS = ("pixels", "shapes", "tables", "resize_slots", "tap_index", "tap_weight", "resize_boxes")

    @classmethod
    def collate(cls, images: Sequence[DeferredImage]) -> "DeferredBatch":
        if not images:
            raise ValueError("empty batch")
        sizes = [(int(d.pixels.shape[0]), int(d.pixels.shape[1])) for d in images]
        use_hsv = [bool(d.use_hsv) for d in images]
        has_after = [not np.array_equal(d.tables[3], _IDENTITY_LUT) for d in images]
        # stable: the HSV images first, within them (and within the others) those with an after table
        colour_order = sorted(range(len(images)), key=lambda i: (not use_hsv[i], not has_after[i]))
        after_images = max((slot + 1 for slot, i in enumerate(colour_order) if has_after[i]), default=0)
        pixels = torch.from_numpy(np.concatenate([images[i].pixels.reshape(-1) for i in colour_order]))
        order = sorted(range(len(sizes)), key=lambda i: max(sizes[i]))
        tap_index, tap_weight = _stack_taps([images[i].rows for i in order] + [images[i].cols for i in order])
        slots = torch.empty(len(order), dtype=torch.int64)
        slots[order] = torch.arange(len(order))
        first_pixel = dict(zip(colour_order, _pixel_starts(sizes, colour_order)))
        boxes = torch.tensor([(first_pixel[i], *sizes[i]) for i in order], dtype=torch.int64)
        return cls(pixels, torch.tensor([sizes[i] for i in colour_order], dtype=torch.int64), sizes,
                   torch.from_numpy(np.stack([images[i].tables for i in colour_order])), use_hsv,
                   colour_order, sum(use_hsv), after_images, slots, order,
                   tap_index.unflatten(0, (2, len(images))), tap_weight.unflatten(0, (2, len(images))), boxes)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def image_size(self) -> int:
        return int(self.tap_index.shape[2])

    @property
    def pixel_starts(self) -> list[int]:
        """Where the pixels of each image of ``photometric_order_list`` start in ``pixels`` (in
        pixels, not bytes), and the total last."""
        return _pixel_starts(self.sizes, self.photometric_order_list)

    def pixel_spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each image's pixels in ``pixels``, in the batch's order."""
        starts = self.pixel_starts
        spans = [(0, 0)] * len(self)
        for slot, image in enumerate(self.photometric_order_list):
            spans[image] = (starts[slot], starts[slot + 1])
        return spans

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's tensors: what pinning and the host-to-device copy move."""
        return sum(getattr(self, name).nbytes for name in self._TENSORS)

    def _map(self, fn) -> "DeferredBatch":
        return dataclasses.replace(self, **{name: fn(getattr(self, name)) for name in self._TENSORS})

    def pin_memory(self) -> "DeferredBatch":
        """Called by a ``pin_memory=True`` DataLoader."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "DeferredBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """``Tensor.record_stream`` of each tensor: a batch copied on one CUDA stream and read on another."""
        for name in self._TENSORS:
            getattr(self, name).record_stream(stream)

    def network_input(self, device: torch.device | str | None = None, mean: Sequence[float] = RGB_MEAN_BGR,
                      compiled: bool = False, channels_last: bool = False) -> torch.Tensor:
        """Augmented batch as the network input: float32 ``(B, 3, S, S)``, BGR minus ``mean``, on
        ``device`` (default: where the batch is); see :func:`augment` for the other arguments."""
        batch = self if device is None else self.to(device, non_blocking=True)
        return augment(batch, mean, compiled=compiled, channels_last=channels_last)


# --------------------------------------------------------------------------------------------
# Pixel work on the device
# --------------------------------------------------------------------------------------------
def table_rows(image_ids: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """(P,) image of every pixel -> (P, C) int32 start of each pixel channel's table in the
    flattened (n, C, 256) tables of :func:`apply_tables` (made once, used for every lookup)."""
    offsets = torch.arange(channels, device=image_ids.device, dtype=torch.int32) * 256
    return image_ids.to(torch.int32)[:, None] * (channels * 256) + offsets


def apply_tables(pixels: torch.Tensor, tables: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pixels`` uint8 (P, C) of several images through each image's 256-entry tables
    ``tables`` (n, C, 256), ``rows`` from :func:`table_rows`. Returns uint8 (P, C)."""
    index = torch.add(rows, pixels)  # int32: one pass, no separate conversion
    return tables.reshape(-1).index_select(0, index.view(-1)).view(pixels.shape)


#: Real pixels whose photometric step runs at once: bounds its integer temporaries (about 50 bytes
#: per pixel); a batch of 32 WIDER crops (sides <= 1024) is one chunk.
MAX_PHOTOMETRIC_PIXELS = 32 << 20
#: Canvas pixels (images x side^2) of one resize group: bounds the float canvas and the products'
#: intermediates for batches of large photos; 32 WIDER crops (sides <= 1024) fit in one group.
MAX_CANVAS_PIXELS = 48 << 20
#: An extra resize group must save this share of the resize work of one canvas for the whole batch
#: (a group costs six kernel launches plus one per image).
GROUP_SAVING = 0.03


def augment(batch: DeferredBatch, mean: Sequence[float] = RGB_MEAN_BGR, resize_dtype: torch.dtype | None = None,
            compiled: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Photometric distortion, padding to a square, flip and resize of ``batch`` where its
    tensors are; returns float32 (B, 3, S, S) BGR minus ``mean`` (in channels_last memory format
    with ``channels_last``). No host synchronisation (with deterministic algorithms on, PyTorch's
    deterministic ``scatter_add_`` on CUDA syncs). Runs outside any autocast region the caller is in.

    The photometric step runs on the real pixels (:func:`photometric`). The resize runs on
    groups of images of similar sides (:func:`resize_groups`), each group on a canvas as large as
    its largest image, as two batched matrix products in ``resize_dtype`` (default float16 on
    CUDA, else float32).

    ``compiled`` (train.py ``--compile_augment``): the same work written for ``torch.compile``
    (:func:`_augment_compiled`), a few fused kernels instead of some sixty; the same values but
    for rare one-level differences, where the dense resize weights, summed in another order, round
    a pixel the other way (float32 on the CPU: 6 of 812.9 M values in 12 batches of 32 sample crops
    at 840 px, ``tools/benchmark_augmentation.py``'s ``compiled_vs_eager``; the tests' batches
    have none). Each kernel compiles when it first meets a case: a few per run."""
    device = batch.pixels.device
    dtype = resize_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    mean_u8, mean_f32 = _mean_tensors(device, tuple(float(m) for m in mean))
    with torch.autocast(device.type, enabled=False):  # the resize's dtype is chosen here
        out = _augment_compiled(batch, dtype, mean_u8, mean_f32, channels_last) if compiled else None
        if out is not None:
            return out
        out = _augment(batch, dtype, mean_u8, mean_f32)  # eager (also past the recompile limit)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _augment(batch: DeferredBatch, dtype: torch.dtype, mean_u8: torch.Tensor, mean_f32: torch.Tensor
             ) -> torch.Tensor:
    device = batch.pixels.device
    colours = photometric(batch)
    count, size = len(batch), batch.image_size
    spans = batch.pixel_spans()
    order = batch.resize_order_list
    sides = [max(batch.sizes[image]) for image in order]
    resized = torch.empty((count, size, 3, size), dtype=dtype, device=device)   # rows, channels, columns
    for first, stop in resize_groups(sides, size):
        side = sides[stop - 1]
        planes = torch.empty((stop - first, side, 3, side), dtype=dtype, device=device)
        planes.copy_(mean_u8.view(1, 1, 3, 1).expand_as(planes))
        for slot, image in enumerate(order[first:stop]):  # each image top-left on a canvas of the mean colour
            height, width = batch.sizes[image]
            pixel_start, pixel_stop = spans[image]
            pixels = colours[pixel_start:pixel_stop, :3].view(height, width, 3)
            planes[slot, :height, :, :width] = pixels.transpose(1, 2)
        _resize(planes, batch.tap_index[:, first:stop], batch.tap_weight[:, first:stop], resized[first:stop])
    resized.round_().clamp_(0, 255)
    out = torch.empty((count, 3, size, size), dtype=torch.float32, device=device)
    return torch.sub(resized.index_select(0, batch.resize_slots).permute(0, 2, 1, 3), mean_f32, out=out)


def resize_groups(sides: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Ranges ``[first, stop)`` of the images sorted by side (:meth:`DeferredBatch.collate`'s
    ``resize_order_list``) that are resized together, on a canvas of their largest side ``M``.

    A group's products cost ``count * (size * M^2 + size^2 * M)``. The partition minimises that
    summed over groups, plus :data:`GROUP_SAVING` of the one-group cost per group, with at most
    :data:`MAX_CANVAS_PIXELS` canvas pixels per group (a larger image is a group of its own)."""
    ordered = sorted(sides)
    count = len(ordered)

    def work(first: int, stop: int) -> float:
        side = ordered[stop - 1]
        return (stop - first) * (size * side * side + size * size * side)

    penalty = GROUP_SAVING * work(0, count)
    best = [0.0] + [math.inf] * count      # best[i]: cheapest partition of the first i images
    cut = [0] * (count + 1)
    for stop in range(1, count + 1):
        for first in range(stop - 1, -1, -1):
            if first < stop - 1 and (stop - first) * ordered[stop - 1] ** 2 > MAX_CANVAS_PIXELS:
                break
            cost = best[first] + work(first, stop) + penalty
            if cost < best[stop]:
                best[stop], cut[stop] = cost, first
    groups, stop = [], count
    while stop > 0:
        groups.append((cut[stop], stop))
        stop = cut[stop]
    return groups[::-1]


def _resize(planes: torch.Tensor, tap_index: torch.Tensor, tap_weight: torch.Tensor, out: torch.Tensor) -> None:
    """``planes`` (n, M, 3, M) (rows, channels, columns) and the (2, n, S, T) taps of the output
    rows and columns -> ``out`` (n, S, 3, S), in ``planes``' dtype: ``W_y @ plane @ W_x^T``.

    uint8 values are exact in float16; its 11-bit weights keep the result within a level."""
    side = planes.shape[1]
    dense = torch.zeros((*tap_index.shape[:3], side), dtype=torch.float32, device=planes.device)
    _resize_products(planes, dense.scatter_add_(3, tap_index, tap_weight).to(planes.dtype), out)


def _resize_products(planes: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """``planes`` (n, M, 3, M) and the dense weights (2, n, S, M) of the output rows and columns
    -> ``out`` (n, S, 3, S): the two batched matrix products of :func:`_resize`."""
    count, side = planes.shape[0], planes.shape[1]
    size = out.shape[1]
    weights_y, weights_x = weights
    rows = torch.bmm(weights_y, planes.view(count, side, 3 * side))                        # (n, S, 3M)
    torch.bmm(rows.view(count, 3 * size, side), weights_x.transpose(1, 2), out=out.view(count, 3 * size, size))


def photometric(batch: DeferredBatch) -> torch.Tensor:
    """The photometric step of every image, each with its own tables, on the real pixels only
    (the flat buffer, images in ``photometric_order_list``), in chunks of at most
    :data:`MAX_PHOTOMETRIC_PIXELS`.

    Returns uint8 (P, 4) in the order of ``pixels``: B, G, R and a zero byte, so that a pixel read
    as int32 is its colour code (:func:`_hsv_conversion_tables`) without arithmetic."""
    starts = batch.pixel_starts
    chunks, start = [], 0
    while start < len(batch):
        stop = start + 1
        while stop < len(batch) and starts[stop + 1] - starts[start] <= MAX_PHOTOMETRIC_PIXELS:
            stop += 1
        pixels = batch.pixels[starts[start] * 3:starts[stop] * 3].view(-1, 3)
        chunks.append(_photometric_images(batch, start, stop, starts, pixels))
        start = stop
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _photometric_images(batch: DeferredBatch, start: int, stop: int, starts: list[int], pixels: torch.Tensor
                        ) -> torch.Tensor:
    """Images ``start:stop`` of ``batch.photometric_order_list`` (``starts``: the batch's
    :attr:`~DeferredBatch.pixel_starts`), their (P, 3) uint8 pixels -> (P, 4) after the step. The
    HSV round trip and the ``after`` tables run on the leading pixels of the images that need them
    (:class:`DeferredBatch`), written in place."""
    device = pixels.device
    count = stop - start
    rows = table_rows(_image_ids(batch.shapes[start:stop], pixels.shape[0]))
    before, hue, saturation, after = batch.tables[start:stop].unbind(1)          # (n, 256) each
    identity = _identity_table(device).expand(count, 256)  # keeps the zero byte (and V) as they are
    pixels = apply_tables(torch.nn.functional.pad(pixels, (0, 1)), torch.stack([before] * 3 + [identity], 1), rows)
    hsv_end = starts[min(max(batch.hsv_images, start), stop)] - starts[start]      # pixels of the chunk
    after_end = starts[min(max(batch.after_images, start), stop)] - starts[start]
    if hsv_end:
        to_hsv, to_bgr = _hsv_conversion_tables(device)
        codes = pixels.view(torch.int32).view(-1)[:hsv_end]
        hsv = to_hsv.index_select(0, codes).view(torch.uint8).view(-1, 4)
        hsv = apply_tables(hsv, torch.stack([hue, saturation, identity, identity], 1), rows[:hsv_end])
        torch.index_select(to_bgr, 0, hsv.view(torch.int32).view(-1), out=codes)  # the prefix of pixels
        del codes, hsv  # not alive during the last lookup
    if after_end:
        after_tables = torch.stack([after] * 3 + [identity], 1)
        pixels[:after_end] = apply_tables(pixels[:after_end], after_tables, rows[:after_end])
    return pixels


# --------------------------------------------------------------------------------------------
# The same pixel work written for torch.compile (``augment(compiled=True)``)
# --------------------------------------------------------------------------------------------
# Eagerly each step of the photometric lookups and each image's copy onto its canvas is a kernel
# of its own with its temporaries in memory (about sixty kernels per batch of 32): 3.3 ms of H200
# device time per batch of 32 at 640 px, against 11.8 / 15.8 ms per fixed-batch mobilenet0.25
# bs32@640 training step in fp16 / bf16 with CUDA graphs (2026-11-28, before the searchsorted and
# HSV-prefix changes). Written as per-pixel arithmetic on indices, the photometric step and the
# canvas become one kernel each under torch.compile (inductor) and the batch's ends one more;
# eagerly these formulations would materialise canvas-sized index tensors, so :func:`_augment`
# keeps its own. The photometric kernel is not cut into chunks: about 12 bytes of temporaries per
# pixel (image ids, codes), 120 MB for 10 M pixels (32 WIDER crops).
def _colour_codes(pixels: torch.Tensor, image_ids: torch.Tensor, tables: torch.Tensor, hsv_images: int,
                  to_hsv: torch.Tensor, to_bgr: torch.Tensor) -> torch.Tensor:
    """The photometric step of :func:`photometric` as one expression: ``pixels`` uint8 (P, 3) in
    ``photometric_order_list``, ``image_ids`` (P,) each pixel's image in that order, ``tables``
    (n, 4, 256) uint8, the first ``hsv_images`` images making the HSV round trip. Returns (P,)
    int32 colour codes ``B | G << 8 | R << 16``."""
    channels = pixels.to(torch.int32)
    flat = tables.view(-1).to(torch.int32)
    table = image_ids.to(torch.int32) * 1024          # (n, 4, 256): before, hue, saturation, after

    def looked_up(offset: int, code: torch.Tensor) -> torch.Tensor:  # each byte through a table
        return (flat[table + offset + (code & 255)] | flat[table + offset + ((code >> 8) & 255)] << 8
                | flat[table + offset + ((code >> 16) & 255)] << 16)

    code = looked_up(0, channels[:, 0] | channels[:, 1] << 8 | channels[:, 2] << 16)
    # pixels without the round trip read entry 0 of the colour tables (one cached line, not a
    # random read in 64 MB), and their result is not used
    round_trip = image_ids < hsv_images
    hsv = to_hsv[torch.where(round_trip, code, 0)]
    hue, saturation = flat[table + 256 + (hsv & 255)], flat[table + 512 + ((hsv >> 8) & 255)]
    converted = to_bgr[torch.where(round_trip, hue | saturation << 8 | (hsv & 0xFF0000), 0)]
    return looked_up(768, torch.where(round_trip, converted, code))


def _canvas_and_weights(codes: torch.Tensor, boxes: torch.Tensor, tap_index: torch.Tensor,
                        tap_weight: torch.Tensor, mean_u8: torch.Tensor, side: int, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One resize group: ``codes`` from :func:`_colour_codes`, ``boxes`` (n, 3) its images'
    ``(first pixel, h, w)``, taps (2, n, S, T) -> the canvas (n, side, 3, side) (each image
    top-left on the mean colour) and the dense weights (2, n, S, side), both in ``dtype``: what
    :func:`_augment` and :func:`_resize` feed the matrix products."""
    count = boxes.shape[0]
    first, height, width = (boxes[:, k].view(count, 1, 1, 1) for k in range(3))
    y = torch.arange(side, device=codes.device).view(1, side, 1, 1)
    channel = torch.arange(3, device=codes.device).view(1, 1, 3, 1)
    x = torch.arange(side, device=codes.device).view(1, 1, 1, side)
    inside = (y < height) & (x < width)
    value = (codes[torch.where(inside, first + y * width + x, 0)] >> (8 * channel)) & 255
    canvas = torch.where(inside, value, mean_u8.view(1, 1, 3, 1).to(value.dtype)).to(dtype)
    columns = torch.arange(side, device=codes.device)
    weights = (tap_weight[..., None] * (tap_index[..., None] == columns)).sum(3)   # as scatter_add_ does
    return canvas, weights.to(dtype)


def _finish(resized: torch.Tensor, slots: torch.Tensor, mean_f32: torch.Tensor, channels_last: bool
            ) -> torch.Tensor:
    """(B, S, 3, S) resized images in resize order -> float32 (B, 3, S, S) network input in the
    batch's order (channels_last memory format with ``channels_last``)."""
    images = resized.round().clamp(0, 255).index_select(0, slots)
    if channels_last:  # written as (B, S, S, 3), seen as (B, 3, S, S)
        return (images.permute(0, 1, 3, 2).float().contiguous() - mean_f32.view(1, 1, 1, 3)).permute(0, 3, 1, 2)
    return images.permute(0, 2, 1, 3).float().contiguous() - mean_f32


@lru_cache(maxsize=None)
def _compiled(function):
    """``function`` under ``torch.compile`` with dynamic shapes (pixel counts, sides, image and
    tap counts change from batch to batch), made once per process."""
    return torch.compile(function, dynamic=True, fullgraph=True)


def _static(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    """``tensor`` with ``dims`` marked static for torch.compile: sizes that never change (colour
    channels, table sizes, the output size), which with ``dynamic=True`` would otherwise become
    symbols that a batch's image or tap count can happen to equal (a compiled case of its own)."""
    for dim in dims:
        torch._dynamo.mark_static(tensor, dim)
    return tensor


#: Set once the compiled kernels met more cases than torch.compile keeps (its ``recompile_limit``):
#: from then on :func:`augment` runs the eager kernels for such batches (a warning says so once).
_RECOMPILE_LIMIT_WARNED: list[bool] = []


def _augment_compiled(batch: DeferredBatch, dtype: torch.dtype, mean_u8: torch.Tensor, mean_f32: torch.Tensor,
                      channels_last: bool) -> torch.Tensor | None:
    """:func:`augment` by the compiled kernels. Each kernel is compiled for a few cases (for
    instance a batch or a resize group of one image); should a run meet more of them than
    torch.compile keeps (its ``recompile_limit``), this returns None and :func:`augment` runs the
    eager kernels for that batch.
    ``fullgraph=True`` makes dynamo raise there instead of running the compiled formulations
    eagerly, whose index tensors would be as large as the canvases. A compiler that fails (no C
    compiler, a Triton error) raises :class:`utils.errors.TrainingSetupError`: train.py reports it
    in one line."""
    import torch._dynamo.exc

    try:
        with torch.no_grad():
            return _run_compiled(batch, dtype, mean_u8, mean_f32, channels_last)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        pass  # the eager kernels run after this returns: inside the handler its traceback would keep tensors alive
    except torch._dynamo.exc.BackendCompilerFailed as error:  # inductor's InductorError too: a compiler set-up
        from utils.errors import TrainingSetupError

        raise TrainingSetupError(f"--compile_augment: torch.compile could not compile the augmentation's kernels "
                                 f"({type(error).__name__}: {_first_line(error)}); train without --compile_augment, "
                                 "or fix the compiler set-up (a C compiler and Python headers for inductor)") from error
    if not _RECOMPILE_LIMIT_WARNED:
        _RECOMPILE_LIMIT_WARNED.append(True)
        warnings.warn("--compile_augment: torch.compile's recompile limit reached; batches of new cases run the eager "
                      "kernels (same values; dynamo logs each such batch)", RuntimeWarning, stacklevel=3)
    return None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def _run_compiled(batch: DeferredBatch, dtype: torch.dtype, mean_u8: torch.Tensor, mean_f32: torch.Tensor,
                  channels_last: bool) -> torch.Tensor:
    device = batch.pixels.device
    image_ids = _image_ids(batch.shapes, batch.pixels.shape[0] // 3)
    to_hsv, to_bgr = _hsv_conversion_tables(device)
    codes = _compiled(_colour_codes)(_static(batch.pixels.view(-1, 3), 1), image_ids, _static(batch.tables, 1, 2),
                                     batch.hsv_images, _static(to_hsv, 0), _static(to_bgr, 0))
    count, size = len(batch), batch.image_size
    sides = [max(batch.sizes[image]) for image in batch.resize_order_list]
    resized = torch.empty((count, size, 3, size), dtype=dtype, device=device)
    for first, stop in resize_groups(sides, size):
        # copies of the group's rows: a slice's offset and strides would each make a case of their own
        boxes = _static(batch.resize_boxes[first:stop].clone(), 1)
        tap_index = _static(batch.tap_index[:, first:stop].clone(), 0, 2)
        tap_weight = _static(batch.tap_weight[:, first:stop].clone(), 0, 2)
        canvas, weights = _compiled(_canvas_and_weights)(codes, boxes, tap_index, tap_weight, _static(mean_u8, 0),
                                                         sides[stop - 1], dtype)
        _resize_products(canvas, weights, resized[first:stop])
    return _compiled(_finish)(_static(resized, 1, 2, 3), batch.resize_slots, _static(mean_f32, 0, 1, 2, 3),
                              channels_last)


def _image_ids(shapes: torch.Tensor, pixel_count: int) -> torch.Tensor:
    """(n, 2) ``(h, w)`` of images stored one after another -> (pixel_count,) int32 image of each
    pixel: how many images end at or before it. Not ``repeat_interleave``, whose CUDA kernel gives
    each image one warp: 0.93 ms of the 3.3 ms busy device time of a batch of 32 at 640 px on the
    H200 (``pixels_profile``, 2026-11-28)."""
    ends = shapes.prod(1).cumsum(0).to(torch.int32)
    return torch.searchsorted(ends, torch.arange(pixel_count, device=shapes.device, dtype=torch.int32),
                              right=True, out_int32=True)


@lru_cache(maxsize=None)
def _hsv_conversion_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cv2.COLOR_BGR2HSV`` and ``cv2.COLOR_HSV2BGR`` of every colour, as (2^24,) int32 tables
    (64 MB each), made once per device by OpenCV itself on rows of :data:`_TABLE_ROW` colours.
    Entry ``c0 | c1 << 8 | c2 << 16`` holds the converted colour's bytes ``(c0', c1', c2', 0)``:
    on a little-endian machine both the index and the entry are the colour's 4 bytes read as one
    int32. Hues >= 180 do not occur in HSV input; their entries are unused.

    Why OpenCV and not its formula: its vectorised HSV->BGR path truncates where its scalar path
    (rows narrower than a vector, the last pixels of a row) rounds, so the formula, which rounds,
    was a third of a level brighter than ``TrainTransform`` on average (2026-11-27). These tables
    give what the vectorised path gives, as it does for all but the last few pixels of each row of
    an image (OpenCV 4.11 on x86-64: up to 31); the conversion to HSV is exact in both paths."""
    if sys.byteorder != "little":
        raise RuntimeError("the device augmentation's colour tables need a little-endian machine")
    codes = np.arange(1 << 24, dtype=np.uint32).view(np.uint8).reshape(-1, _TABLE_ROW, 4)

    def table(conversion: int) -> torch.Tensor:
        out = np.zeros(((1 << 24) // _TABLE_ROW, _TABLE_ROW, 4), dtype=np.uint8)
        for first in range(0, len(codes), 256):  # 1 Mi colours at a time (12 MB temporaries)
            colours = np.ascontiguousarray(codes[first:first + 256, :, :3])
            out[first:first + 256, :, :3] = cv2.cvtColor(colours, conversion)
        return torch.from_numpy(out.reshape(-1).view(np.int32)).to(device)

    return table(cv2.COLOR_BGR2HSV), table(cv2.COLOR_HSV2BGR)


@lru_cache(maxsize=None)
def _identity_table(device: torch.device) -> torch.Tensor:
    """(256,) uint8 ``0..255``, made once per device: a new tensor per batch would be a blocking
    host-to-device copy."""
    return torch.arange(256, dtype=torch.uint8, device=device)


@lru_cache(maxsize=None)
def _mean_tensors(device: torch.device, mean: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` as uint8 (3,) (the padding colour) and float32 (1, 3, 1, 1), once per device."""
    return (torch.tensor([round(m) for m in mean], dtype=torch.uint8, device=device),
            torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
