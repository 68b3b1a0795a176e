"""Aligned face crops: the similarity fit, the warp, and inference.py --save_aligned on real photos."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from scipy.optimize import least_squares

import inference
from utils.face_align import align_face, similarity_transform, template_points


def _similarity(angle: float, scale: float, shift) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_exact_similarity_is_recovered():
    rng = np.random.default_rng(0)
    for _ in range(20):
        source = rng.uniform(0, 800, (5, 2))
        truth = _similarity(rng.uniform(-np.pi, np.pi), rng.uniform(0.05, 5), rng.uniform(-300, 300, 2))
        np.testing.assert_allclose(similarity_transform(source, _apply(truth, source)), truth, atol=1e-9)
        opencv, _ = cv2.estimateAffinePartial2D(source, _apply(truth, source))
        np.testing.assert_allclose(opencv, truth, rtol=1e-4, atol=1e-3)


def test_noisy_points_get_the_least_squares_similarity():
    rng = np.random.default_rng(1)
    for _ in range(10):
        source = rng.uniform(0, 200, (5, 2))
        target = _apply(_similarity(0.3, 0.6, (10, -5)), source) + rng.normal(0, 4, (5, 2))

        def residual(p):  # independent fit: a generic least-squares solver over (a, b, tx, ty)
            return (_apply(np.array([[p[0], -p[1], p[2]], [p[1], p[0], p[3]]]), source) - target).ravel()

        fit = least_squares(residual, x0=np.array([1.0, 0.0, 0.0, 0.0]), xtol=1e-14, ftol=1e-14).x
        expected = np.array([[fit[0], -fit[1], fit[2]], [fit[1], fit[0], fit[3]]])
        np.testing.assert_allclose(similarity_transform(source, target), expected, atol=1e-6)


def test_template_is_the_112_pixel_arcface_template_scaled_to_the_crop():
    """Other crop sizes scale the 112x112 ArcFace points uniformly (the template_points
    docstring), so a 224 crop is the 112 crop at twice the resolution."""
    from utils.face_align import ARCFACE_TEMPLATE

    np.testing.assert_array_equal(template_points(), ARCFACE_TEMPLATE)
    np.testing.assert_array_equal(template_points(112), ARCFACE_TEMPLATE)
    np.testing.assert_allclose(template_points(224), 2 * ARCFACE_TEMPLATE, rtol=1e-15)
    np.testing.assert_allclose(template_points(160), ARCFACE_TEMPLATE * 160 / 112, rtol=1e-15)
    np.testing.assert_allclose(template_points(56), ARCFACE_TEMPLATE / 2, rtol=1e-15)
    with pytest.raises(ValueError, match="positive"):
        template_points(0)


def test_never_mirrors_and_rejects_degenerate_points():
    source = np.array([[0.0, 0.0], [10, 0], [5, 5], [2, 10], [8, 10]])
    mirrored = source * np.array([-1.0, 1.0])
    assert np.linalg.det(similarity_transform(source, mirrored)[:, :2]) > 0
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), source)
    with pytest.raises(ValueError, match="matching"):
        similarity_transform(source[:4], source)


def test_mirrored_points_get_the_least_squares_proper_similarity():
    """Landmarks that a reflection would fit best (e.g. a mirrored face) still get the best
    rotation + uniform scale + shift: the same fit as a generic least-squares solver over
    (a, b, tx, ty), scale included."""
    rng = np.random.default_rng(2)
    for _ in range(10):
        source = rng.uniform(0, 200, (5, 2))
        target = _apply(_similarity(rng.uniform(-np.pi, np.pi), 0.8, (20, 5)), source * np.array([-1.0, 1.0]))
        target += rng.normal(0, 2, (5, 2))

        def residual(p):
            return (_apply(np.array([[p[0], -p[1], p[2]], [p[1], p[0], p[3]]]), source) - target).ravel()

        fit = least_squares(residual, x0=np.array([1.0, 0.0, 0.0, 0.0]), xtol=1e-14, ftol=1e-14).x
        expected = np.array([[fit[0], -fit[1], fit[2]], [fit[1], fit[0], fit[3]]])
        np.testing.assert_allclose(similarity_transform(source, target), expected, atol=1e-6)


def test_warp_puts_the_landmarks_on_the_template():
    """Draw a dot at each known landmark of a rotated, scaled face, align, find the dots again."""
    size = 112
    landmarks = _apply(_similarity(0.5, 2.3, (300.0, 100.0)), template_points(size))  # a tilted face, 2.3x larger
    for k, (point, expected) in enumerate(zip(landmarks, template_points(size))):
        image = np.zeros((480, 640, 3), np.uint8)
        cv2.circle(image, (int(round(point[0])), int(round(point[1]))), 5, (255, 255, 255), -1)
        crop = align_face(image, landmarks, size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        weights = crop[..., 0].astype(np.float64)
        ys, xs = np.indices(weights.shape)
        centre = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()
        assert np.abs(centre - expected).max() < 1.0, (k, centre, expected)


def test_save_aligned_on_photos(photos_dir, mobilenet_weights, tmp_path, capsys):
    """Every detected face gets one crop of --aligned_size, and re-detecting a face in its crop
    finds its landmarks where the warp moved them (so the warp goes the right way and keeps the
    landmark order); within the detector's own landmark noise, about 5 px at 160x160."""
    from models.detector import FaceDetector

    out = tmp_path / "out"
    code = inference.main(["--weights", str(mobilenet_weights), "--inference_dir", str(photos_dir),
                           "--inference_save_folder", str(out), "--save_aligned", "true",
                           "--aligned_size", "160", "--workers", "0"])
    capsys.readouterr()
    assert code == 0
    detections = json.loads((out / "detections.json").read_text())
    assert len(list((out / "aligned").iterdir())) == sum(len(faces) for faces in detections.values()) > 0
    detector = FaceDetector(str(mobilenet_weights), confidence_threshold=0.5)
    errors, fit_errors, missed = [], [], []
    for name, faces in detections.items():
        stem, extension = name.rsplit(".", 1)
        for index, face in enumerate(faces):
            crop = cv2.imread(str(out / "aligned" / f"{stem}_{index}.{extension}"))
            assert crop is not None and crop.shape == (160, 160, 3), (name, index)
            x1, y1, x2, y2 = face["box"]
            if min(x2 - x1, y2 - y1) < 40:
                continue  # small faces: too blurry in a 160-pixel crop to re-detect reliably
            found = detector.detect(cv2.copyMakeBorder(crop, 80, 80, 80, 80, cv2.BORDER_CONSTANT,
                                                       value=(104, 117, 123)))
            if len(found) == 0:
                missed.append((name, index))
                continue
            points = np.array(face["landmarks"])
            matrix = similarity_transform(points, template_points(160))
            redetected = found.landmarks[int(np.argmax(found.scores))] - 80
            errors.append(np.abs(redetected - _apply(matrix, points)).max())
            fit_errors.append(np.abs(_apply(matrix, points) - template_points(160)).max())
    assert len(errors) >= 20 and len(missed) <= 0.1 * len(errors), missed
    assert np.median(errors) < 8.0, sorted(errors)
    # the detector's landmark order is the template's: upright faces fit it closely (a template
    # with the eyes swapped leaves residuals of about a third of the crop)
    assert np.median(fit_errors) < 8.0, sorted(fit_errors)


def test_align_face_takes_a_path_and_names_wrong_arguments(tmp_path):
    landmarks = _apply(_similarity(0.2, 1.5, (60.0, 50.0)), template_points(112))
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), image)
    expected = align_face(image, landmarks)
    for source in (path, str(path)):
        np.testing.assert_array_equal(align_face(source, landmarks), expected)
    np.testing.assert_array_equal(align_face(image, landmarks, np.int64(112)), expected)
    np.testing.assert_array_equal(align_face(image, landmarks.reshape(10)), expected)
    with pytest.raises(TypeError, match=r"size is the side of the square crop in pixels \(an int\), got \(112, 112\)"):
        align_face(image, landmarks, (112, 112))
    with pytest.raises(TypeError, match="size is the side .* got 112.0"):
        align_face(image, landmarks, 112.0)
    with pytest.raises(ValueError, match=r"the five \(x, y\) points of one face, shape \(5, 2\), got shape \(2, 5, 2\)"):
        align_face(image, np.stack([landmarks, landmarks]))
    with pytest.raises(TypeError, match="takes an image array .* got list"):
        align_face([image], landmarks)
