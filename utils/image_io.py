"""Reading images as the detector expects them: BGR uint8 (H, W, 3)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageReadError(ValueError):
    """An image file is missing, empty, not an image or cannot be decoded."""


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of an image file; :class:`ImageReadError` when it is missing or not a file."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    return path.read_bytes()


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as BGR uint8 (H, W, 3).

    Decoded like the public RetinaFace pipeline (``cv2.IMREAD_COLOR``): grayscale is expanded to
    three channels, an alpha channel is dropped, 16-bit images are reduced to 8 bits and EXIF
    orientation is applied.
    """
    return decode_image(read_image_bytes(path), path)


def decode_image(data: bytes, path: str | Path = "<memory>") -> np.ndarray:
    """Decode the bytes of an image file like :func:`read_image`; ``path`` only names the file in
    the :class:`ImageReadError`. A ``cv2.error`` (image over OpenCV's size limit, out of memory)
    passes through."""
    if not data:
        raise ImageReadError(f"{path}: empty file")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: not a readable image")
    return image


#: above this a float image is taken for 0..255 values and refused; up to it, values over 1 (what a
#: cubic or Lanczos resize of a [0, 1] image gives: up to 1.03 on a sample image) are clipped
FLOAT_IMAGE_MAX = 2.0
#: below this a float image is taken for a normalised one (mean subtracted) and refused; above it,
#: values under 0 (the undershoot of such a resize) are clipped
FLOAT_IMAGE_MIN = -0.25

#: the message for an image that is None: what ``cv2.imread`` returns for a file it cannot read
NONE_IMAGE = ("the image is None (cv2.imread returns None for a file it cannot read: pass the path instead to "
              "get the reason)")


def as_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """Validate/convert an in-memory image to BGR uint8 (H, W, 3).

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) BGR and (H, W, 4) BGRA arrays of dtype uint8,
    uint16 (reduced to 8 bits) or float in [0, 1] (clipped: a resized image over- and undershoots a
    little). Input that would be read wrongly without a word is refused: a float image holding
    values above 2 (0..255, as ``np.float32(cv2.imread(...))`` gives), below -0.25 (normalised, mean
    subtracted) or NaN, a uint16 image whose values all lie below 256 but not all at 0 (8-bit data,
    which the reduction would turn black). The channel order is not checked: RGB arrays (PIL, matplotlib,
    ``torchvision.io``) need ``image[:, :, ::-1]`` first, or ``FaceDetector(channel_order="rgb")``.
    """
    if image is None:
        raise TypeError(NONE_IMAGE)
    if not isinstance(image, np.ndarray):
        hint = ""
        if type(image).__module__.startswith("torch"):
            hint = ("; for a tensor pass tensor.permute(1, 2, 0).cpu().numpy() ((H, W, 3), BGR order, uint8 or "
                    "float in [0, 1])")
        raise TypeError(f"expected a numpy image (BGR, as cv2.imread gives) or a path, got "
                        f"{type(image).__name__}{hint}")
    if image.dtype == np.uint16:
        if image.size and 0 < int(image.max()) < 256:  # (all zeros: a black frame, black either way)
            raise ValueError("a uint16 image holds 16-bit values and is reduced to its high 8 bits, but all of "
                             "this one's are below 256 (8-bit data in a uint16 array would read as black): pass "
                             "image.astype(np.uint8)")
        image = (image >> 8).astype(np.uint8)
    elif image.dtype.kind == "f":
        highest = float(image.max()) if image.size else 0.0
        lowest = float(image.min()) if image.size else 0.0
        if highest != highest:
            raise ValueError("the float image holds NaN values")
        if highest > FLOAT_IMAGE_MAX:
            raise ValueError(f"a float image must hold values in [0, 1], this one reaches {highest:.4g}; for "
                             "0..255 values pass image.astype(np.uint8)")
        if lowest < FLOAT_IMAGE_MIN:
            raise ValueError(f"a float image must hold values in [0, 1], this one goes down to {lowest:.4g} (a "
                             "normalised image? the detector subtracts its own mean): pass the image before "
                             "normalisation")
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise TypeError(f"unsupported image dtype {image.dtype} (uint8, uint16 or float in [0, 1])")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an (H, W, 3) BGR image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    return image
