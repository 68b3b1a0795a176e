"""Aligned face crops from the five detected landmarks (``inference.py --save_aligned``).

A face is warped by the similarity transform (rotation, uniform scale, translation; no
reflection) that maps its five landmarks onto the ArcFace template in the least-squares sense
(Umeyama, 1991), the alignment that face-recognition models such as ArcFace are trained on.

Landmarks are ``(5, 2)`` pixel ``(x, y)`` in the detector's order: left eye, right eye, nose,
left mouth corner, right mouth corner ("left" = the image's left, as in the RetinaFace labels).
"""
from __future__ import annotations

import numbers
from pathlib import Path

import cv2
import numpy as np

# The ArcFace / InsightFace reference points of a 112x112 crop, in the landmark order above.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_SIZE = 112


def template_points(size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The template scaled to a ``size`` x ``size`` crop, ``(5, 2)`` float64 pixels."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    return ARCFACE_TEMPLATE * (size / TEMPLATE_SIZE)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The ``(2, 3)`` similarity matrix ``M`` minimising ``sum |M @ [s, 1] - t|^2`` over point pairs.

    ``source`` and ``target`` are ``(N, 2)`` with N >= 2; the closed form of Umeyama (1991), with
    the sign of the rotation fixed so the result never mirrors. Degenerate ``source`` points (all
    equal) raise ``ValueError``.
    """
    source = np.asarray(source, dtype=np.float64).reshape(-1, 2)
    target = np.asarray(target, dtype=np.float64).reshape(-1, 2)
    if source.shape != target.shape or len(source) < 2:
        raise ValueError(f"need matching (N >= 2, 2) point sets, got {source.shape} and {target.shape}")
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_centred, target_centred = source - source_mean, target - target_mean
    source_variance = (source_centred ** 2).sum() / len(source)
    if not np.isfinite(source_variance) or source_variance < 1e-12:
        raise ValueError("landmarks are degenerate (all points equal or not finite)")
    covariance = target_centred.T @ source_centred / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / source_variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = target_mean - matrix[:, :2] @ source_mean
    return matrix


def align_face(image: np.ndarray | str | Path, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` aligned crop of one face (same channels and dtype as ``image``; a
    path is read as the detector reads it, BGR uint8).

    ``landmarks``: ``(5, 2)`` pixel coordinates in ``image`` (a detection's ``landmarks``, e.g.
    ``faces[0].landmarks``). Pixels outside the image are black.
    """
    if isinstance(image, (str, Path)):
        from utils.image_loader import read_complete_image  # noqa: PLC0415

        image = read_complete_image(image)
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        raise TypeError(f"align_face() takes an image array (H, W[, C]) or a path, got {type(image).__name__}"
                        + (f" of shape {image.shape}" if isinstance(image, np.ndarray) else ""))
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"size is the side of the square crop in pixels (an int), got {size!r}")
    if np.shape(landmarks) not in ((5, 2), (10,)):
        raise ValueError(f"landmarks must be the five (x, y) points of one face, shape (5, 2), got shape "
                         f"{np.shape(landmarks)}")
    size = int(size)
    matrix = similarity_transform(landmarks, template_points(size))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
