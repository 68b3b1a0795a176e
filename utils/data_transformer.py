"""Training-time augmentation for RetinaFace (the published recipe, re-implemented in uint8).

Target convention (shared with :mod:`utils.data_loaders`)
---------------------------------------------------------
``targets`` is a float32 array of shape ``(K, 15)``, ``K >= 0``, one row per face, every
coordinate in **pixels** of the image it accompanies:

====== ==========================================================================
column meaning
====== ==========================================================================
0..3   box ``x1, y1, x2, y2`` (``x2 = x + w``, ``y2 = y + h`` of the ``x y w h`` label)
4..13  five landmarks ``(x, y)``: left eye, right eye, nose, left mouth, right mouth
14     landmark flag: ``1.0`` the face has landmarks, ``-1.0`` it has none (then
       columns 4..13 are ``-1``)
====== ==========================================================================

Images are ``uint8`` ``(H, W, 3)`` **BGR** arrays as returned by ``cv2.imread``. The training
transform returns a square ``(S, S, 3)`` uint8 BGR image; the float conversion and the mean
subtraction are left to the training loop (on the accelerator, see
:func:`utils.data_loaders.images_to_network_input`), so DataLoader workers stay cheap.

The recipe (:class:`TrainTransform`), in the order of the public Pytorch_Retinaface ``preproc``:

1. **Random square crop.** Up to ``max_crop_trials`` (250) candidates are drawn: the side is
   ``int(scale * short_side)`` with ``scale`` picked uniformly from ``crop_scales``
   (``0.3, 0.45, 0.6, 0.8, 1.0``), the offset uniformly in ``[0, W - side - 1]`` (``0`` when the
   side spans the image; the public code's ``randrange``, so a crop never touches the far edge).
   A candidate is accepted when at least one face lies *entirely* inside it and at least one
   face is kept, where a face is kept when its box centre lies strictly inside the crop and its
   clipped box, measured at output scale, has a shorter side ``> min_face_size`` pixels.
   The public code carries a comment about a 16 px minimum but its test is ``> 0``, i.e. every
   face whose centre is inside is kept; ``min_face_size=0.0`` (the default) reproduces that.
   Kept boxes are clipped to the crop, landmarks are shifted and clamped to the crop.
   When no candidate is accepted the whole image is kept and later padded to a square. Images
   without faces (``K == 0``) take the first candidate (any crop of a face-less image is valid);
   the public code cannot train on such images.
2. **Photometric distortion** of the crop (each op with probability 0.5, two orders chosen with
   probability 0.5 like the public code): brightness ``+U(-32, 32)``, contrast ``*U(0.5, 1.5)``,
   then in HSV saturation ``*U(0.5, 1.5)`` and hue ``+randint(-18, 18)`` (mod 180, OpenCV's 8-bit
   hue); in the second order contrast comes after the HSV step. Values are clipped to
   ``[0, 255]`` and truncated to integers exactly as the public float code does, but through
   256-entry lookup tables; consecutive brightness/contrast tables are composed into one, and
   the BGR->HSV->BGR round trip is skipped when neither saturation nor hue is applied (the public
   code always does the lossy round trip).
3. **Pad to square** with ``rgb_mean`` (BGR ``104, 117, 123``), image at the top-left corner —
   only when the crop step kept the whole image.
4. **Horizontal flip** with probability ``flip_prob`` (0.5): ``x -> side - x`` for boxes
   (``x1' = side - x2``, ``x2' = side - x1``) and landmarks, and the left/right landmarks are
   swapped (0 <-> 1 eyes, 3 <-> 4 mouth corners) so "left eye" stays the image-left eye.
   The flip comes before the resize, as in the public code (the other order gives the same
   coordinates but, with ``INTER_NEAREST``, samples other source columns).
5. **Resize** to ``im_size`` x ``im_size`` with an interpolation drawn uniformly from
   ``INTER_LINEAR, INTER_CUBIC, INTER_AREA, INTER_NEAREST, INTER_LANCZOS4``; coordinates are
   multiplied by ``im_size / side``.

Finally boxes are clipped to ``[0, im_size]`` and faces whose box became empty are dropped (this
only matters for annotations that extend outside the original image on the no-crop path);
landmarks of faces that have them are clamped to ``[0, im_size]``.

Randomness lives in a :class:`numpy.random.Generator` owned by the transform (``rng=`` accepts
a seed, a Generator or ``None``). Use :func:`seed_worker` as the DataLoader ``worker_init_fn``
so each worker reseeds its copy from the DataLoader's per-worker seed (reproducible when the
DataLoader gets a seeded ``generator``). No global random state is read or written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cv2
import numpy as np

__all__ = [
    "RGB_MEAN_BGR",
    "CROP_SCALES",
    "INTERPOLATIONS",
    "LANDMARK_FLIP_ORDER",
    "TARGET_COLUMNS",
    "PhotometricParams",
    "AugmentParams",
    "TrainTransform",
    "ValTransform",
    "photometric_distort",
    "photometric_tables",
    "PhotometricTables",
    "sample_photometric",
    "crop_targets",
    "flip_targets",
    "scale_targets",
    "make_rng",
    "seed_worker",
    "empty_targets",
]

RGB_MEAN_BGR: tuple[int, int, int] = (104, 117, 123)
"""Mean colour in BGR order (the name follows the public project's ``rgb_mean``)."""

CROP_SCALES: tuple[float, ...] = (0.3, 0.45, 0.6, 0.8, 1.0)
"""Crop side as a fraction of the image's short side."""

INTERPOLATIONS: tuple[int, ...] = (
    cv2.INTER_LINEAR,
    cv2.INTER_CUBIC,
    cv2.INTER_AREA,
    cv2.INTER_NEAREST,
    cv2.INTER_LANCZOS4,
)

LANDMARK_FLIP_ORDER: tuple[int, ...] = (1, 0, 2, 4, 3)
"""Landmark permutation applied on a horizontal flip (left/right eye, left/right mouth)."""

TARGET_COLUMNS: int = 15

_IDENTITY_LUT = np.arange(256, dtype=np.uint8)


def empty_targets() -> np.ndarray:
    """A ``(0, 15)`` float32 target array (an image without faces)."""
    return np.zeros((0, TARGET_COLUMNS), dtype=np.float32)


def make_rng(rng: np.random.Generator | int | Sequence[int] | None = None) -> np.random.Generator:
    """A Generator from a seed / seed sequence / Generator (returned as is) / ``None`` (fresh entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _check_targets(targets: np.ndarray | None) -> np.ndarray:
    if targets is None:
        return empty_targets()
    targets = np.asarray(targets, dtype=np.float32)
    if targets.size == 0:
        return empty_targets()
    if targets.ndim != 2 or targets.shape[1] != TARGET_COLUMNS:
        raise ValueError(f"targets must have shape (K, {TARGET_COLUMNS}), got {targets.shape}")
    return targets


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image must be a uint8 (H, W, 3) BGR array, got shape {shape} dtype {dtype}")


# --------------------------------------------------------------------------------------------
# Geometry on targets (pure functions, pixel coordinates)
# --------------------------------------------------------------------------------------------
def _has_landmarks(targets: np.ndarray) -> np.ndarray:
    return targets[:, 14] > 0


def crop_targets(
    targets: np.ndarray, left: int, top: int, side: int, keep: np.ndarray | None = None
) -> np.ndarray:
    """Targets of the faces kept in the square crop ``[left, left+side) x [top, top+side)``.

    Args:
        targets: ``(K, 15)`` float32, pixels of the input image.
        left, top, side: the crop in input pixels.
        keep: optional boolean ``(K,)`` mask of faces to keep; default: box centre strictly
            inside the crop.

    Returns:
        ``(K', 15)`` float32 in crop pixels: boxes clipped to ``[0, side]``, landmarks shifted and
        clamped to ``[0, side]``; faces without landmarks keep ``-1`` landmarks.
    """
    targets = _check_targets(targets)
    if keep is None:
        cx = (targets[:, 0] + targets[:, 2]) * 0.5
        cy = (targets[:, 1] + targets[:, 3]) * 0.5
        keep = (cx > left) & (cx < left + side) & (cy > top) & (cy < top + side)
    out = targets[keep].copy()
    offset = np.array([left, top], dtype=np.float32)
    boxes = out[:, 0:4].reshape(-1, 2, 2)
    boxes -= offset
    np.clip(boxes, 0.0, float(side), out=boxes)
    out[:, 0:4] = boxes.reshape(-1, 4)
    lm_mask = _has_landmarks(out)
    if lm_mask.any():
        landmarks = out[lm_mask, 4:14].reshape(-1, 5, 2) - offset
        np.clip(landmarks, 0.0, float(side), out=landmarks)
        out[lm_mask, 4:14] = landmarks.reshape(-1, 10)
    return out


def flip_targets(targets: np.ndarray, width: float) -> np.ndarray:
    """Mirror targets horizontally in an image of ``width`` pixels.

    ``x -> width - x`` for boxes (``x1' = width - x2``, ``x2' = width - x1``) and landmarks; the
    landmark order is permuted by :data:`LANDMARK_FLIP_ORDER` (eyes and mouth corners swap) for
    faces that have landmarks. Returns a new ``(K, 15)`` float32 array.
    """
    targets = _check_targets(targets)
    out = targets.copy()
    out[:, 0] = width - targets[:, 2]
    out[:, 2] = width - targets[:, 0]
    lm_mask = _has_landmarks(out)
    if lm_mask.any():
        landmarks = targets[lm_mask, 4:14].reshape(-1, 5, 2)[:, LANDMARK_FLIP_ORDER, :].copy()
        landmarks[:, :, 0] = width - landmarks[:, :, 0]
        out[lm_mask, 4:14] = landmarks.reshape(-1, 10)
    return out


def scale_targets(targets: np.ndarray, factor: float) -> np.ndarray:
    """Multiply box and landmark coordinates by ``factor`` (absent landmarks stay ``-1``)."""
    targets = _check_targets(targets)
    out = targets.copy()
    out[:, 0:4] *= factor
    lm_mask = _has_landmarks(out)
    out[lm_mask, 4:14] *= factor
    return out


# --------------------------------------------------------------------------------------------
# Photometric distortion (uint8 lookup tables)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhotometricParams:
    """One draw of the photometric distortion; ``None`` means the op is not applied.

    Attributes:
        contrast_last: ``False``: brightness, contrast, then saturation/hue in HSV;
            ``True``: brightness, saturation/hue in HSV, then contrast.
        brightness: additive ``beta`` in ``[-32, 32]``.
        contrast: multiplicative ``alpha`` in ``[0.5, 1.5]``.
        saturation: multiplicative factor on the HSV S channel in ``[0.5, 1.5]``.
        hue: integer shift of OpenCV's 8-bit hue (0..179, wraps mod 180) in ``[-18, 18]``.
    """

    contrast_last: bool = False
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: int | None = None

    @property
    def is_identity(self) -> bool:
        return self.brightness is None and self.contrast is None and self.saturation is None and self.hue is None


def sample_photometric(rng: np.random.Generator) -> PhotometricParams:
    """Draw :class:`PhotometricParams` with the public recipe's probabilities (each op 1/2)."""
    contrast_last = bool(rng.integers(2))
    brightness = float(rng.uniform(-32.0, 32.0)) if rng.integers(2) else None
    contrast = float(rng.uniform(0.5, 1.5)) if rng.integers(2) else None
    saturation = float(rng.uniform(0.5, 1.5)) if rng.integers(2) else None
    hue = int(rng.integers(-18, 19)) if rng.integers(2) else None
    return PhotometricParams(contrast_last, brightness, contrast, saturation, hue)


def _affine_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """uint8 table of ``trunc(clip(v * alpha + beta, 0, 255))`` (the public float semantics)."""
    values = np.arange(256, dtype=np.float64) * alpha + beta
    return np.clip(values, 0.0, 255.0).astype(np.uint8)


def _compose(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    if first is None:
        return second
    if second is None:
        return first
    return second[first]


class PhotometricTables(NamedTuple):
    """:class:`PhotometricParams` as uint8 lookup tables (256,): ``before`` (BGR, ahead of the
    HSV step), ``hue`` and ``saturation`` (HSV H and S channels), ``after`` (BGR, behind it).
    ``None`` = identity; ``use_hsv`` says whether the BGR->HSV->BGR round trip happens."""

    before: np.ndarray | None
    hue: np.ndarray | None
    saturation: np.ndarray | None
    after: np.ndarray | None
    use_hsv: bool


def photometric_tables(params: PhotometricParams) -> PhotometricTables:
    """Lookup tables of ``params`` (consecutive brightness/contrast tables composed into one)."""
    brightness = None if params.brightness is None else _affine_lut(beta=params.brightness)
    contrast = None if params.contrast is None else _affine_lut(alpha=params.contrast)
    use_hsv = params.saturation is not None or params.hue is not None
    if params.contrast_last and use_hsv:
        before, after = brightness, contrast
    else:
        before, after = _compose(brightness, contrast), None
    hue = None if params.hue is None else ((np.arange(256) + params.hue) % 180).astype(np.uint8)
    saturation = None if params.saturation is None else _affine_lut(alpha=params.saturation)
    return PhotometricTables(before, hue, saturation, after, use_hsv)


def photometric_distort(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
    """Apply ``params`` to a uint8 BGR image; returns a new array (or ``image`` itself when identity).

    Per-pixel results equal the public float implementation (``trunc(clip(x*a+b, 0, 255))`` at
    each step, hue ``(h + d) mod 180``), except that the BGR->HSV->BGR round trip is skipped when
    neither saturation nor hue is applied.
    """
    tables = photometric_tables(params)
    out = image
    if tables.before is not None:
        out = cv2.LUT(out, tables.before)
    if tables.use_hsv:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
        hue = _IDENTITY_LUT if tables.hue is None else tables.hue
        saturation = _IDENTITY_LUT if tables.saturation is None else tables.saturation
        table = np.stack([hue, saturation, _IDENTITY_LUT], axis=-1).reshape(256, 1, 3)
        hsv = cv2.LUT(hsv, table)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if tables.after is not None:
        out = cv2.LUT(out, tables.after)
    return out


# --------------------------------------------------------------------------------------------
# The training transform
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentParams:
    """Every random decision of one :class:`TrainTransform` call (explicit, so tests can force them).

    Attributes:
        crop: ``(left, top, side)`` of the square crop in input pixels, or ``None`` to keep the
            whole image and pad it to a square (top-left aligned) with the mean colour.
        photometric: the photometric distortion to apply to the crop.
        flip: mirror horizontally.
        interpolation: OpenCV interpolation flag for the final resize.
    """

    crop: tuple[int, int, int] | None
    photometric: PhotometricParams = PhotometricParams()
    flip: bool = False
    interpolation: int = cv2.INTER_LINEAR


class TrainTransform:
    """RetinaFace training augmentation: ``(image, targets) -> (square image, targets)``.

    Args:
        im_size: output side ``S`` in pixels (default 640).
        rgb_mean: padding colour, BGR order (default ``(104, 117, 123)``).
        rng: seed, :class:`numpy.random.Generator` or ``None``; see :meth:`reseed`.
        crop_scales: crop side as fractions of the short side, picked uniformly.
        max_crop_trials: candidates tried before falling back to pad-to-square (250).
        min_face_size: a face is kept in a crop only when the shorter side of its clipped box is
            ``> min_face_size`` pixels at output scale (public semantics: ``0.0``).
        flip_prob: probability of the horizontal flip.
        interpolations: resize interpolations, picked uniformly.
        distort: apply the photometric distortion.

    Call with ``image`` uint8 ``(H, W, 3)`` BGR and ``targets`` float32 ``(K, 15)`` in input
    pixels (``K`` may be 0); returns uint8 ``(S, S, 3)`` BGR and float32 ``(K', 15)`` in output
    pixels (``0 <= x, y <= S``), ``K' <= K``. See the module docstring for the recipe.
    """

    def __init__(
        self,
        im_size: int = 640,
        rgb_mean: Sequence[float] = RGB_MEAN_BGR,
        *,
        rng: np.random.Generator | int | Sequence[int] | None = None,
        crop_scales: Sequence[float] = CROP_SCALES,
        max_crop_trials: int = 250,
        min_face_size: float = 0.0,
        flip_prob: float = 0.5,
        interpolations: Sequence[int] = INTERPOLATIONS,
        distort: bool = True,
    ) -> None:
        if im_size <= 0:
            raise ValueError(f"im_size must be positive, got {im_size}")
        if len(rgb_mean) != 3:
            raise ValueError(f"rgb_mean must have 3 values (BGR), got {rgb_mean!r}")
        if not crop_scales or any(not 0.0 < s <= 1.0 for s in crop_scales):
            raise ValueError(f"crop_scales must be non-empty values in (0, 1], got {crop_scales!r}")
        if max_crop_trials < 0:
            raise ValueError(f"max_crop_trials must be >= 0, got {max_crop_trials}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if not interpolations:
            raise ValueError("interpolations must not be empty")
        self.im_size = int(im_size)
        self.rgb_mean = tuple(float(v) for v in rgb_mean)
        self.crop_scales = np.asarray(crop_scales, dtype=np.float64)
        self.max_crop_trials = int(max_crop_trials)
        self.min_face_size = float(min_face_size)
        self.flip_prob = float(flip_prob)
        self.interpolations = tuple(int(i) for i in interpolations)
        self.distort = bool(distort)
        self.rng = make_rng(rng)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(im_size={self.im_size}, rgb_mean={self.rgb_mean}, "
            f"crop_scales={tuple(self.crop_scales.tolist())}, max_crop_trials={self.max_crop_trials}, "
            f"min_face_size={self.min_face_size}, flip_prob={self.flip_prob}, distort={self.distort})"
        )

    def reseed(self, seed: np.random.Generator | int | Sequence[int] | None) -> None:
        """Replace the transform's generator (used by :func:`seed_worker` in each worker)."""
        self.rng = make_rng(seed)

    # ---- crop ------------------------------------------------------------------------------
    def _kept_in_crop(self, targets: np.ndarray, left: np.ndarray, top: np.ndarray, side: np.ndarray) -> np.ndarray:
        """Boolean ``(N, K)``: face centre strictly inside and clipped box large enough."""
        left = left[:, None].astype(np.float32)
        top = top[:, None].astype(np.float32)
        side_f = side[:, None].astype(np.float32)
        right, bottom = left + side_f, top + side_f
        x1, y1, x2, y2 = (targets[None, :, i] for i in range(4))
        cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
        keep = (cx > left) & (cx < right) & (cy > top) & (cy < bottom)
        clipped_w = np.minimum(x2, right) - np.maximum(x1, left)
        clipped_h = np.minimum(y2, bottom) - np.maximum(y1, top)
        scale = np.float32(self.im_size) / side_f
        keep &= np.minimum(clipped_w, clipped_h) * scale > self.min_face_size
        return keep

    def sample_crop(self, height: int, width: int, targets: np.ndarray) -> tuple[int, int, int] | None:
        """Draw the square crop ``(left, top, side)`` or ``None`` (keep the image, pad it).

        A candidate is accepted when one face is entirely inside it and at least one face is
        kept (see the module docstring); candidates are evaluated in vectorised batches, the
        first accepted one in draw order wins. Images with ``K == 0`` take the first candidate.
        """
        targets = _check_targets(targets)
        short = min(height, width)
        remaining = self.max_crop_trials
        batch = 16
        while remaining > 0:
            n = min(batch, remaining)
            remaining -= n
            batch = remaining  # first a small batch (usually enough), then all the rest at once
            scales = self.crop_scales[self.rng.integers(len(self.crop_scales), size=n)]
            sides = np.maximum((scales * short).astype(np.int64), 1)
            # offsets in [0, W - side - 1] (0 when the side spans W), the public code's randrange
            lefts = (self.rng.random(n) * np.maximum(width - sides, 1)).astype(np.int64)
            tops = (self.rng.random(n) * np.maximum(height - sides, 1)).astype(np.int64)
            if len(targets) == 0:
                return int(lefts[0]), int(tops[0]), int(sides[0])
            rights, bottoms = lefts + sides, tops + sides
            inside = (
                (targets[None, :, 0] >= lefts[:, None])
                & (targets[None, :, 1] >= tops[:, None])
                & (targets[None, :, 2] <= rights[:, None])
                & (targets[None, :, 3] <= bottoms[:, None])
            ).any(axis=1)
            if not inside.any():
                continue
            accepted = inside & self._kept_in_crop(targets, lefts, tops, sides).any(axis=1)
            if accepted.any():
                i = int(np.argmax(accepted))
                return int(lefts[i]), int(tops[i]), int(sides[i])
        return None

    def sample_params(self, image_shape: Sequence[int], targets: np.ndarray) -> AugmentParams:
        """Draw all random decisions for an image of ``image_shape`` ``(H, W, ...)``."""
        height, width = int(image_shape[0]), int(image_shape[1])
        crop = self.sample_crop(height, width, targets)
        photometric = sample_photometric(self.rng) if self.distort else PhotometricParams()
        flip = bool(self.rng.random() < self.flip_prob)
        interpolation = self.interpolations[int(self.rng.integers(len(self.interpolations)))]
        return AugmentParams(crop, photometric, flip, interpolation)

    # ---- apply -----------------------------------------------------------------------------
    def _check_params(self, image_shape: Sequence[int], params: AugmentParams) -> None:
        if params.crop is not None:
            left, top, side = params.crop
            if side <= 0 or left < 0 or top < 0 or left + side > image_shape[1] or top + side > image_shape[0]:
                raise ValueError(f"crop {params.crop} does not fit in an image of shape {tuple(image_shape)}")

    def transform_targets(self, targets: np.ndarray, image_shape: Sequence[int], params: AugmentParams
                          ) -> np.ndarray:
        """The geometric half of :meth:`apply`: ``targets`` (K, 15) in pixels of an image of
        ``image_shape`` -> float32 (K', 15) in pixels of the ``im_size`` output (crop, flip,
        resize, clip). Shared by the pixel paths on the CPU and on the device."""
        targets = _check_targets(targets)
        self._check_params(image_shape, params)
        size = self.im_size
        if params.crop is not None:
            left, top, side = params.crop
            keep = self._kept_in_crop(
                targets, np.array([left]), np.array([top]), np.array([side])
            )[0] if len(targets) else np.zeros(0, dtype=bool)
            out_targets = crop_targets(targets, left, top, side, keep)
        else:
            out_targets = targets.copy()
            side = max(int(image_shape[0]), int(image_shape[1]))
        out_targets = scale_targets(out_targets, size / side)
        if params.flip:
            out_targets = flip_targets(out_targets, float(size))
        np.clip(out_targets[:, 0:4], 0.0, float(size), out=out_targets[:, 0:4])
        lm_mask = _has_landmarks(out_targets)
        out_targets[lm_mask, 4:14] = np.clip(out_targets[lm_mask, 4:14], 0.0, float(size))
        valid = (out_targets[:, 2] > out_targets[:, 0]) & (out_targets[:, 3] > out_targets[:, 1])
        if not valid.all():
            out_targets = out_targets[valid]
        return out_targets.astype(np.float32, copy=False)

    @staticmethod
    def crop_pixels(image: np.ndarray, params: AugmentParams) -> np.ndarray:
        """The square crop of ``params`` (a view), or the whole image when ``params.crop`` is None."""
        if params.crop is None:
            return image
        left, top, side = params.crop
        return image[top:top + side, left:left + side]

    def apply(
        self, image: np.ndarray, targets: np.ndarray | None, params: AugmentParams
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply explicit ``params`` (deterministic). Shapes/conventions as in :meth:`__call__`."""
        _check_image(image)
        out_targets = self.transform_targets(targets, image.shape, params)
        size = self.im_size
        out = photometric_distort(self.crop_pixels(image, params), params.photometric)
        height, width = out.shape[:2]
        side = max(height, width)
        if height != width:
            out = cv2.copyMakeBorder(
                out, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT, value=self.rgb_mean
            )
        if params.flip:  # before the resize, as the public code: same pixels for every interpolation
            out = cv2.flip(out, 1)
        out = cv2.resize(out, (size, size), interpolation=params.interpolation)
        return np.ascontiguousarray(out), out_targets

    def __call__(self, image: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Augment one image.

        Args:
            image: uint8 ``(H, W, 3)`` BGR.
            targets: float32 ``(K, 15)`` in input pixels (see module docstring), ``K >= 0``.

        Returns:
            ``(image, targets)``: uint8 ``(S, S, 3)`` BGR with ``S = im_size``, and float32
            ``(K', 15)`` in output pixels (x1, y1, x2, y2, 5 x (x, y), flag).
        """
        _check_image(image)
        targets = _check_targets(targets)
        params = self.sample_params(image.shape, targets)
        return self.apply(image, targets, params)


class ValTransform:
    """No augmentation: returns the image (uint8 ``(H, W, 3)`` BGR) and the targets unchanged.

    The images keep their own sizes, so batching them with
    :func:`utils.data_loaders.detection_collate` needs ``batch_size=1`` (or equal sizes).
    """

    def __call__(self, image: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        _check_image(image)
        return image, _check_targets(targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the worker's copy of the dataset transform.

    Uses the per-worker seed PyTorch derives from the loader's base seed (``get_worker_info().seed``;
    pass ``generator=torch.Generator().manual_seed(s)`` to the DataLoader for reproducible runs).
    Any ``transform`` attribute with a ``reseed`` method is reseeded, looking through wrapper
    datasets (``Subset``'s ``.dataset``, ``ConcatDataset``'s ``.datasets``). Each dataset in a
    ``ConcatDataset`` gets its own seed stream.
    """
    import torch.utils.data  # local import: this module itself needs only numpy and cv2

    info = torch.utils.data.get_worker_info()
    if info is None:  # called outside a worker: nothing to do
        return
    base = int(info.seed) % (2**63)
    stack = [info.dataset]
    seen: set[int] = set()
    index = 0
    while stack:
        dataset = stack.pop()
        if id(dataset) in seen:
            continue
        seen.add(id(dataset))
        transform = getattr(dataset, "transform", None)
        if transform is not None and hasattr(transform, "reseed"):
            transform.reseed([base, index])
            index += 1
        inner = getattr(dataset, "dataset", None)
        if inner is not None:
            stack.append(inner)
        stack.extend(getattr(dataset, "datasets", ()) or ())
