"""Training data: label parsing, dataset, augmentation, collate and DataLoader (CPU only)."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.image_io import ImageReadError, read_image
from utils.data_loaders import (
    LabelFormatError,
    WiderFaceDataset,
    build_train_loader,
    dataset_from_root,
    detection_collate,
    images_to_network_input,
    normalize_targets,
    parse_label_file,
)
from utils.data_transformer import (
    INTERPOLATIONS,
    RGB_MEAN_BGR,
    AugmentParams,
    PhotometricParams,
    TrainTransform,
    ValTransform,
    empty_targets,
    flip_targets,
    photometric_distort,
    sample_photometric,
)

NO_LANDMARKS = [-1.0] * 10


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _write_images(root: Path, relpaths: list[str], size: tuple[int, int] = (48, 64)) -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.full((*size, 3), 90, np.uint8))


def _face(x1, y1, x2, y2, landmarks=None) -> list[float]:
    if landmarks is None:
        return [x1, y1, x2, y2, *NO_LANDMARKS, -1.0]
    return [x1, y1, x2, y2, *[float(v) for pt in landmarks for v in pt], 1.0]


def _targets(*faces) -> np.ndarray:
    return np.array(faces, dtype=np.float32).reshape(-1, 15)


def _assert_inside(targets: np.ndarray, size: int) -> None:
    assert targets.dtype == np.float32 and targets.ndim == 2 and targets.shape[1] == 15
    assert np.all(targets[:, 0:4] >= 0) and np.all(targets[:, 0:4] <= size)
    assert np.all(targets[:, 2] > targets[:, 0]) and np.all(targets[:, 3] > targets[:, 1])
    has = targets[:, 14] > 0
    assert np.all(targets[has, 4:14] >= 0) and np.all(targets[has, 4:14] <= size)
    assert np.all(targets[~has, 4:14] == -1)
    assert set(np.unique(targets[:, 14])) <= {-1.0, 1.0}


# --------------------------------------------------------------------------------------------
# label parsing and dataset
# --------------------------------------------------------------------------------------------
def test_shared_sample_label_file(widerface_sample: Path) -> None:
    ds = dataset_from_root(widerface_sample, "val")
    assert ds.format == "retinaface"
    assert len(ds) == 10 and ds.num_faces == 507
    assert ds.num_degenerate == 0 and ds.num_invalid == 0
    assert ds.image_path(0).name == "0_Parade_marchingband_1_311.jpg"
    first = ds.targets(0)[0]  # "204 296 13 11 -1.0 ... 1.0"
    np.testing.assert_array_equal(first, _face(204, 296, 217, 307))
    total = 0
    for i in range(len(ds)):
        image, targets = ds[i]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert targets.dtype == np.float32 and targets.shape[1] == 15
        assert np.all(targets[:, 14] == -1.0) and np.all(targets[:, 4:14] == -1.0)
        assert np.all(targets[:, 2] > targets[:, 0]) and np.all(targets[:, 3] > targets[:, 1])
        total += len(targets)
    assert total == 507


def test_official_format(tmp_path: Path) -> None:
    label = tmp_path / "wider_face_train_bbx_gt.txt"
    label.write_text(
        "a/img1.jpg\n3\n"
        "10 10 5 6 0 0 0 0 0 0 \n"
        "20 20 5 5 0 0 0 1 0 0 \n"  # invalid -> skipped
        "5 5 0 4 0 0 0 0 0 0 \n"  # w == 0 -> degenerate
        "a/img2.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \n"  # no face; the zero line is not a face
        "b/img3.jpg\n1\n1 2 3 4\n"  # custom: just x y w h
    )
    _write_images(tmp_path / "images", ["a/img1.jpg", "a/img2.jpg", "b/img3.jpg"])
    ds = WiderFaceDataset(label, tmp_path / "images")
    assert ds.format == "wider"
    assert len(ds) == 3 and ds.num_faces == 2
    assert ds.num_invalid == 1 and ds.num_degenerate == 1
    np.testing.assert_array_equal(ds.targets(0), _targets(_face(10, 10, 15, 16)))
    assert ds.targets(1).shape == (0, 15)
    np.testing.assert_array_equal(ds.targets(2), _targets(_face(1, 2, 4, 6)))
    image, targets = ds[1]
    assert image.shape == (48, 64, 3) and targets.shape == (0, 15)


def test_retinaface_format(tmp_path: Path) -> None:
    label = tmp_path / "label.txt"
    label.write_text(
        "# a/img1.jpg\n"
        "10 10 20 20 12.0 15.0 0.0 20.0 15.0 0.0 16.0 20.0 1.0 13.0 25.0 0.0 19.0 25.0 0.0 0.82\n"
        "5 5 4 4 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0\n"
        "3 3 -2 4 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 1\n"  # w < 0 -> degenerate
        "\n"
        "# a/img2.jpg\n"  # no face
        "# b/img3.jpg\n"
        "1 1 5 5\n"
        "2 2 3 0\n"  # h == 0 -> degenerate
    )
    _write_images(tmp_path / "images", ["a/img1.jpg", "a/img2.jpg", "b/img3.jpg"])
    ds = WiderFaceDataset(label)  # image_root defaults to images/ beside the label file
    assert len(ds) == 3 and ds.num_faces == 3 and ds.num_degenerate == 2
    lms = [(12, 15), (20, 15), (16, 20), (13, 25), (19, 25)]
    np.testing.assert_array_equal(ds.targets(0), _targets(_face(10, 10, 30, 30, lms), _face(5, 5, 9, 9)))
    assert ds.targets(1).shape == (0, 15)
    np.testing.assert_array_equal(ds.targets(2), _targets(_face(1, 1, 6, 6)))
    parsed = parse_label_file(label)
    assert [a.line for a in parsed.images] == [1, 6, 7]


def test_a_first_landmark_at_x_zero_still_means_the_face_has_landmarks(tmp_path: Path) -> None:
    """Landmarks are absent only when marked -1 (the public loader's ``x >= 0`` rule): a face at the
    left edge whose left eye is at x = 0.0 keeps its landmarks and flag 1."""
    label = tmp_path / "label.txt"
    label.write_text(
        "# a/edge.jpg\n"
        "0 10 20 20 0.0 15.0 0.0 12.0 15.0 0.0 6.0 20.0 0.0 2.0 25.0 0.0 10.0 25.0 0.0 0.9\n"
        "30 10 20 20 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0\n"
    )
    targets = parse_label_file(label).images[0].targets
    lms = [(0, 15), (12, 15), (6, 20), (2, 25), (10, 25)]
    np.testing.assert_array_equal(targets, _targets(_face(0, 10, 20, 30, lms), _face(30, 10, 50, 30)))


@pytest.mark.parametrize(
    "fmt, text, bad_line",
    [
        ("retinaface", "# a.jpg\n1 2 3 4\n1 2 x 4\n", 3),
        ("retinaface", "# a.jpg\n1 2 3 4 5 6 7\n", 2),
        ("retinaface", "\n1 2 3 4\n# a.jpg\n", 2),
        ("retinaface", "# a.jpg\n1 2 3 nan\n", 2),
        ("wider", "a.jpg\n1\n1 2 3 4 0 0 0 0 0 0\nb.jpg\nthree\n", 5),
        ("wider", "a.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n", 3),
        ("wider", "a.jpg\n1\n1 2 3 4 0 0\n", 3),
        ("wider", "a.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n1 2 3 4 0 0 0 0 0 0\n", 4),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, fmt: str, text: str, bad_line: int) -> None:
    label = tmp_path / "labels.txt"
    label.write_text(text)
    with pytest.raises(ValueError) as info:
        parse_label_file(label, fmt)  # type: ignore[arg-type]
    assert isinstance(info.value, LabelFormatError)
    assert f"{label}:{bad_line}:" in str(info.value)


def test_official_format_count_above_its_face_lines_is_named(tmp_path: Path) -> None:
    label = tmp_path / "wider_face_train_bbx_gt.txt"
    label.write_text("a/1.jpg\n3\n1 2 3 4 0 0 0 0 0 0\n5 6 7 8 0 0 0 0 0 0\na/2.jpg\n0\n")
    with pytest.raises(LabelFormatError) as info:
        parse_label_file(label)
    assert str(info.value) == (f"{label}:5: image 'a/1.jpg' (line 1) declares 3 faces but 2 face line(s) follow "
                               "before 'a/2.jpg'")


def test_missing_images_reported_at_construction(tmp_path: Path) -> None:
    names = [f"e/img{i}.jpg" for i in range(8)]
    (tmp_path / "label.txt").write_text("".join(f"# {n}\n1 1 4 4\n" for n in names))
    _write_images(tmp_path / "images", names[:1])
    with pytest.raises(FileNotFoundError) as info:
        WiderFaceDataset(tmp_path / "label.txt")
    message = str(info.value)
    assert "7 of 8 images" in message and str(tmp_path / "images" / names[1]) in message
    assert names[7] not in message  # only the first few are listed
    with pytest.warns(UserWarning, match="7 of 8"):
        ds = WiderFaceDataset(tmp_path / "label.txt", missing="skip")
    assert len(ds) == 1 and ds.num_missing == 7 and ds.image_path(0).name == "img0.jpg"


def test_dataset_from_root_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataset_from_root(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="train"):
        dataset_from_root(tmp_path, "train")
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="label.txt"):
        dataset_from_root(tmp_path, "train")
    (tmp_path / "train" / "label.txt").write_text("")
    assert len(dataset_from_root(tmp_path, "train")) == 0


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
def _expected_kept(targets: np.ndarray, crop: tuple[int, int, int]) -> np.ndarray:
    left, top, side = crop
    cx = (targets[:, 0] + targets[:, 2]) / 2
    cy = (targets[:, 1] + targets[:, 3]) / 2
    return (cx > left) & (cx < left + side) & (cy > top) & (cy < top + side)


def test_train_transform_on_sample_images(widerface_sample: Path) -> None:
    ds = dataset_from_root(widerface_sample, "val")
    size = 320
    transform = TrainTransform(size, rng=7)
    crops = 0
    for i in range(len(ds)):
        image, targets = ds.image_path(i), ds.targets(i)
        image = cv2.imread(str(image))
        for _ in range(4):
            params = transform.sample_params(image.shape, targets)
            out, out_t = transform.apply(image, targets, params)
            assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
            _assert_inside(out_t, size)
            if params.crop is not None:
                crops += 1
                left, top, side = params.crop
                assert side in {int(s * min(image.shape[:2])) for s in (0.3, 0.45, 0.6, 0.8, 1.0)}
                assert left + side <= image.shape[1] and top + side <= image.shape[0]
                # at least one face entirely inside; exactly the faces with centre inside are kept
                fully = ((targets[:, 0] >= left) & (targets[:, 1] >= top)
                         & (targets[:, 2] <= left + side) & (targets[:, 3] <= top + side))
                assert fully.any()
                assert len(out_t) == int(_expected_kept(targets, params.crop).sum()) >= 1
            else:
                assert len(out_t) <= len(targets)
        out, out_t = transform(image, targets)  # the plain call
        assert out.shape == (size, size, 3)
        _assert_inside(out_t, size)
    assert crops > 0


def _synthetic() -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    image = np.full((200, 300, 3), 40, np.uint8)
    image[55:65, 105:115] = (0, 0, 255)  # a marker at x 105..114, y 55..64
    lms = [(110, 60), (130, 60), (120, 75), (112, 90), (128, 90)]
    targets = _targets(
        _face(100, 50, 140, 100, lms),  # inside the crop
        _face(10, 10, 40, 40),  # centre x = 25 < 50: outside the crop -> dropped
        _face(40, 120, 70, 160),  # centre x = 55 inside, box clipped at the crop's left edge
    )
    return image, targets, (50, 0, 200)


def test_explicit_crop_and_flip_exact_coordinates() -> None:
    image, targets, crop = _synthetic()
    transform = TrainTransform(400, rng=0)
    params = AugmentParams(crop=crop, photometric=PhotometricParams(), flip=True, interpolation=cv2.INTER_NEAREST)
    out, out_t = transform.apply(image, targets, params)
    assert out.shape == (400, 400, 3)
    # crop (x - 50), scale x2, mirror x -> 400 - x, swap eyes and mouth corners
    expected = _targets(
        _face(220, 100, 300, 200, [(240, 120), (280, 120), (260, 150), (244, 180), (276, 180)]),
        _face(360, 240, 400, 320),
    )
    np.testing.assert_allclose(out_t, expected, atol=1e-4)
    # the marker (crop x 55..64, y 55..64) lands at output x 400-130 .. 400-110, y 110..129
    np.testing.assert_array_equal(out[110:130, 270:290], np.broadcast_to((0, 0, 255), (20, 20, 3)))
    assert not np.any(np.all(out[:, 110:130] == (0, 0, 255), axis=-1))

    # without the flip the same crop keeps the original order and positions
    _, no_flip = transform.apply(image, targets, AugmentParams(crop, PhotometricParams(), False, cv2.INTER_NEAREST))
    np.testing.assert_allclose(no_flip[0, :14], [100, 100, 180, 200, 120, 120, 160, 120, 140, 150, 124, 180, 156, 180])
    np.testing.assert_allclose(no_flip[1, :4], [0, 240, 40, 320])
    # flipping twice is the identity and the flip is its own inverse on coordinates
    np.testing.assert_allclose(flip_targets(flip_targets(no_flip, 400.0), 400.0), no_flip)
    np.testing.assert_allclose(flip_targets(no_flip, 400.0), out_t, atol=1e-4)


def test_flip_comes_before_the_resize_like_the_public_code() -> None:
    image, targets, crop = _synthetic()  # crop side 200 -> im_size 100 (downscaling) and 400 (upscaling)
    left, top, side = crop
    square = image[top:top + side, left:left + side]
    for size in (100, 400):
        transform = TrainTransform(size, rng=0)
        for interpolation in INTERPOLATIONS:
            out, out_t = transform.apply(image, targets, AugmentParams(crop, PhotometricParams(), True, interpolation))
            # the public order: mirror the square, then resize it
            expected = cv2.resize(cv2.flip(square, 1), (size, size), interpolation=interpolation)
            np.testing.assert_array_equal(out, expected)
            np.testing.assert_allclose(out_t[0, :4], np.array([110, 50, 150, 100]) * size / 200, atol=1e-4)
    # nearest at 200 -> 100 takes source column 2i: the mirrored marker (columns 135..144) lands on 68..72
    out, _ = TrainTransform(100, rng=0).apply(image, targets,
                                              AugmentParams(crop, PhotometricParams(), True, cv2.INTER_NEAREST))
    marker = np.all(out[28:33] == (0, 0, 255), axis=-1)
    assert marker[:, 68:73].all() and not marker[:, :68].any() and not marker[:, 73:].any()


def test_min_face_size_applies_to_the_shorter_side_at_output_scale() -> None:
    """``min_face_size`` keeps a face only when the *shorter* side of its clipped box, at output
    scale, exceeds it: a 40x3 px strip (6 px at the 2x output scale) goes, a 20x20 face (40 px)
    stays, with min_face_size 10 between them."""
    min_face_size, (left, top, side), im_size = 10.0, (10, 20, 100), 200
    faces = [_face(30, 40, 70, 43), _face(50, 60, 70, 80, [(55, 65), (65, 65), (60, 70), (56, 75), (64, 75)])]
    targets = _targets(*faces)
    scale = im_size / side
    kept = [min(x2 - x1, y2 - y1) * scale > min_face_size for x1, y1, x2, y2 in targets[:, :4]]
    assert kept == [False, True]
    expected = targets[kept].copy()
    expected[:, 0:14:2] = (expected[:, 0:14:2] - left) * scale
    expected[:, 1:14:2] = (expected[:, 1:14:2] - top) * scale
    transform = TrainTransform(im_size, rng=0, min_face_size=min_face_size)
    out_t = transform.transform_targets(targets, (200, 300, 3), AugmentParams((left, top, side), PhotometricParams(),
                                                                              False, cv2.INTER_NEAREST))
    np.testing.assert_allclose(out_t, expected, atol=1e-4)
    # the public default (0) keeps both
    everything = TrainTransform(im_size, rng=0).transform_targets(
        targets, (200, 300, 3), AugmentParams((left, top, side), PhotometricParams(), False, cv2.INTER_NEAREST))
    assert len(everything) == 2


def test_crop_offsets_never_touch_the_far_edge_unless_the_side_spans_the_image() -> None:
    # the public code draws the offset with randrange(W - side): 0 .. W - side - 1
    no_faces = np.zeros((0, 15), np.float32)
    transform = TrainTransform(64, rng=5, crop_scales=(1.0,))
    lefts = {transform.sample_crop(100, 103, no_faces)[0] for _ in range(300)}  # side 100
    tops = {transform.sample_crop(104, 100, no_faces)[1] for _ in range(300)}
    assert lefts == {0, 1, 2} and tops == {0, 1, 2, 3}
    assert {transform.sample_crop(100, 100, no_faces)[:2] for _ in range(20)} == {(0, 0)}


def test_pad_to_square_when_no_crop() -> None:
    image = np.full((100, 200, 3), 7, np.uint8)
    targets = _targets(_face(20, 10, 60, 50, [(30, 20), (50, 20), (40, 30), (32, 40), (48, 40)]))
    transform = TrainTransform(200, rng=0)
    out, out_t = transform.apply(image, targets, AugmentParams(None, PhotometricParams(), False, cv2.INTER_NEAREST))
    assert np.all(out[:100] == 7)
    assert np.all(out[100:] == np.array(RGB_MEAN_BGR, np.uint8))  # mean colour, BGR
    np.testing.assert_array_equal(out_t, targets)


@pytest.mark.parametrize("flip", [False, True])
def test_landmarks_outside_the_padded_image_are_clamped_without_a_crop(flip: bool) -> None:
    """The no-crop path keeps annotations as they are, and a landmark may lie outside the image
    (x = -5, y = 130 below a 100 x 60 image padded to 100 x 100): the final clamp puts every
    landmark of a face that has them in ``[0, S]``; a face without landmarks keeps ``-1``."""
    image = np.full((60, 100, 3), 90, np.uint8)
    targets = _targets(_face(20, 10, 60, 50, [(-5, 20), (50, 20), (40, 30), (32, 130), (48, 40)]),
                       _face(70, 10, 90, 40))
    size = 50
    transform = TrainTransform(size, rng=0)
    _, out_t = transform.apply(image, targets, AugmentParams(None, PhotometricParams(), flip, cv2.INTER_NEAREST))
    _assert_inside(out_t, size)
    # the clamp moves only the two outside points: the others are scaled (and mirrored) as they were
    points = targets[0, 4:14].reshape(5, 2) * (size / 100)
    if flip:
        points = points[[1, 0, 2, 4, 3]]
        points[:, 0] = size - points[:, 0]
    np.testing.assert_allclose(out_t[0, 4:14].reshape(5, 2), np.clip(points, 0, size), rtol=0, atol=1e-5)


def test_no_valid_crop_falls_back_to_padding() -> None:
    image = np.full((100, 300, 3), 50, np.uint8)
    targets = _targets(_face(0, 0, 250, 90))  # wider than any square crop (side <= 100)
    transform = TrainTransform(150, rng=3, max_crop_trials=250)
    assert transform.sample_crop(100, 300, targets) is None
    out, out_t = transform(image, targets)
    assert out.shape == (150, 150, 3)
    assert len(out_t) == 1
    _assert_inside(out_t, 150)


def test_empty_targets() -> None:
    image = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    transform = TrainTransform(64, rng=1)
    for targets in (empty_targets(), None, np.zeros((0,), np.float32)):
        out, out_t = transform(image, targets)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        assert out_t.shape == (0, 15) and out_t.dtype == np.float32
    params = transform.sample_params(image.shape, empty_targets())
    assert params.crop is not None  # face-less images still get a random crop


def test_deterministic_for_same_seed() -> None:
    image, targets, _ = _synthetic()
    runs = []
    for seed in (11, 11, 12):
        transform = TrainTransform(160, rng=seed)
        runs.append([transform(image, targets) for _ in range(6)])
    for (a_img, a_t), (b_img, b_t) in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_t, b_t)
    assert any(not np.array_equal(a[0], c[0]) or not np.array_equal(a[1], c[1]) for a, c in zip(runs[0], runs[2]))
    # reseed restarts the stream
    transform = TrainTransform(160, rng=0)
    transform.reseed(11)
    np.testing.assert_array_equal(transform(image, targets)[0], runs[0][0][0])


def _reference_distort(image: np.ndarray, p: PhotometricParams) -> np.ndarray:
    """Float re-statement of the public semantics: trunc(clip(x * a + b)), hue mod 180."""
    def affine(x, a=1.0, b=0.0):
        return np.clip(x.astype(np.float64) * a + b, 0, 255).astype(np.uint8)

    out = image.copy()
    if p.brightness is not None:
        out = affine(out, b=p.brightness)
    if p.contrast is not None and not p.contrast_last:
        out = affine(out, a=p.contrast)
    if p.saturation is not None or p.hue is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
        if p.saturation is not None:
            hsv[:, :, 1] = affine(hsv[:, :, 1], a=p.saturation)
        if p.hue is not None:
            hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + p.hue) % 180
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if p.contrast is not None and p.contrast_last:
        out = affine(out, a=p.contrast)
    return out


def test_photometric_matches_float_reference() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    cases = [sample_photometric(rng) for _ in range(40)] + [
        PhotometricParams(True, -20.5, 1.3, 0.7, -18),
        PhotometricParams(False, 31.0, 0.6, 1.4, 17),
        PhotometricParams(True, 10.0, 1.2, None, None),
        PhotometricParams(),
    ]
    for p in cases:
        np.testing.assert_array_equal(photometric_distort(image, p), _reference_distort(image, p), err_msg=str(p))
    before = image.copy()
    photometric_distort(image[5:30, 5:30], cases[-4])  # works on crop views and never writes in place
    np.testing.assert_array_equal(image, before)


def test_random_draws_cover_the_public_recipe() -> None:
    """Over 20000 seeded draws: the resize interpolation is one of the public recipe's five OpenCV
    flags, each about 1/5 of the time; each photometric op and the flip are on about half the
    time; brightness spans U(-32, 32), contrast and saturation U(0.5, 1.5), and hue is a whole
    number from -18 to +18, both ends included (the public ``random.randint(-18, 18)``)."""
    public_interpolations = {cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST,
                             cv2.INTER_LANCZOS4}
    draws = 20000
    transform = TrainTransform(64, rng=123)
    params = [transform.sample_params((80, 120, 3), empty_targets()) for _ in range(draws)]
    interpolations = [p.interpolation for p in params]
    assert set(interpolations) == public_interpolations
    for flag in public_interpolations:
        assert abs(interpolations.count(flag) / draws - 1 / 5) < 0.02, flag
    assert abs(sum(p.flip for p in params) / draws - 0.5) < 0.02
    photometric = [p.photometric for p in params]
    assert abs(sum(p.contrast_last for p in photometric) / draws - 0.5) < 0.02
    for name, low, high in (("brightness", -32.0, 32.0), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5)):
        values = np.array([getattr(p, name) for p in photometric if getattr(p, name) is not None])
        assert abs(len(values) / draws - 0.5) < 0.02, name
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() < high, name
    hues = [p.hue for p in photometric if p.hue is not None]
    assert abs(len(hues) / draws - 0.5) < 0.02
    assert set(hues) == set(range(-18, 19)) and all(isinstance(h, int) for h in hues)


def test_val_transform_is_identity() -> None:
    image, targets, _ = _synthetic()
    out, out_t = ValTransform()(image, targets)
    assert out is image
    np.testing.assert_array_equal(out_t, targets)


def test_input_validation() -> None:
    transform = TrainTransform(32, rng=0)
    with pytest.raises(ValueError, match="uint8"):
        transform(np.zeros((10, 10, 3), np.float32), empty_targets())
    with pytest.raises(ValueError, match="15"):
        transform(np.zeros((10, 10, 3), np.uint8), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        transform.apply(np.zeros((10, 10, 3), np.uint8), None, AugmentParams(crop=(5, 0, 8)))


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------
def test_detection_collate_and_device_helpers() -> None:
    batch = [
        (np.full((8, 8, 3), (1, 2, 3), np.uint8), _targets(_face(0, 0, 4, 4, [(1, 1)] * 5))),
        (np.zeros((8, 8, 3), np.uint8), empty_targets()),
    ]
    images, targets = detection_collate(batch)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    assert images[0, :, 0, 0].tolist() == [1, 2, 3]  # channel order BGR kept
    assert [t.shape for t in targets] == [(1, 15), (0, 15)] and all(t.dtype == torch.float32 for t in targets)
    net_in = images_to_network_input(images)
    assert net_in.dtype == torch.float32 and net_in[0, :, 0, 0].tolist() == [1 - 104, 2 - 117, 3 - 123]
    norm = normalize_targets(targets[0], 8.0)
    assert norm[0, :4].tolist() == [0, 0, 0.5, 0.5] and norm[0, 4].item() == 0.125 and norm[0, 14].item() == 1
    no_lm = normalize_targets(torch.tensor([_face(2, 2, 4, 4)]), 8.0)
    assert no_lm[0, 4:].tolist() == NO_LANDMARKS + [-1.0]
    with pytest.raises(ValueError, match="one size"):
        detection_collate([batch[0], (np.zeros((9, 8, 3), np.uint8), empty_targets())])


def test_dataloader_two_workers(widerface_sample: Path) -> None:
    size = 256

    def batches(seed: int):
        ds = dataset_from_root(widerface_sample, "val", TrainTransform(size))
        loader = build_train_loader(ds, batch_size=4, workers=2, seed=seed, persistent_workers=False)
        return list(loader)

    first, again = batches(0), batches(0)
    assert len(first) == 2  # 10 images, batch 4, drop_last
    for images, targets in first:
        assert images.dtype == torch.uint8 and images.shape == (4, 3, size, size)
        assert isinstance(targets, list) and len(targets) == 4
        for t in targets:
            assert t.dtype == torch.float32 and t.ndim == 2 and t.shape[1] == 15
            _assert_inside(t.numpy(), size)
    for (a_img, a_t), (b_img, b_t) in zip(first, again):  # seeded workers are reproducible
        assert torch.equal(a_img, b_img)
        assert all(torch.equal(x, y) for x, y in zip(a_t, b_t))


# --------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------
def test_label_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    label = tmp_path / "label.txt"
    label.write_bytes("# a/é.jpg\n1 2 3 4\n# a/b.jpg\n".encode("utf-8") + b"5 6 7 8 \xff\n")
    for fmt in ("auto", "retinaface"):
        with pytest.raises(LabelFormatError, match=rf"^{re.escape(str(label))}:4: not UTF-8 text \(byte 0xff at column 9\)"):
            parse_label_file(label, fmt)
    label.write_bytes("\ufeff# a/b.jpg\n1 2 3 4\n".encode("utf-8"))  # a byte-order mark is not a problem
    assert [a.path for a in parse_label_file(label).images] == ["a/b.jpg"]


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_images_are_unreadable_for_training(tmp_path: Path, ext: str) -> None:
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    _write_images(tmp_path / "images", [f"a/whole{ext}", f"a/cut{ext}"])
    for name in (f"whole{ext}", f"cut{ext}"):
        assert cv2.imwrite(str(tmp_path / "images/a" / name), image)
    cut = tmp_path / "images/a" / f"cut{ext}"
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) * 2 // 3])
    assert cv2.imread(str(cut)) is not None or ext == ".png"  # OpenCV would train on grey fill (JPEG)
    (tmp_path / "label.txt").write_text(f"# a/whole{ext}\n1 2 10 10\n# a/cut{ext}\n1 2 10 10\n")
    dataset = WiderFaceDataset(tmp_path / "label.txt")
    whole, _ = dataset[0]
    np.testing.assert_array_equal(whole, read_image(tmp_path / "images/a" / f"whole{ext}"))
    kind = "JPEG" if ext == ".jpg" else "PNG"
    with pytest.raises(ImageReadError, match=rf"cut{re.escape(ext)}: truncated {kind}"):
        dataset[1]


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"GIF? no, text\n", "not a readable image")])
def test_unreadable_training_files_raise_one_error(tmp_path: Path, content: bytes, reason: str) -> None:
    from utils.data_loaders import read_training_image

    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=f"^{re.escape(str(path))}: {reason}$"):
        read_training_image(path)
    with pytest.raises(ImageReadError, match="file not found"):
        read_training_image(tmp_path / "absent.jpg")


def test_launched_one_ahead_hands_each_result_on_after_the_next_launch():
    from utils.ahead import launched_one_ahead

    events = []

    def launch(item):
        events.append(("launch", item))
        return item

    for result in launched_one_ahead(range(3), launch):
        events.append(("hand on", result))
    assert events == [("launch", 0), ("launch", 1), ("hand on", 0), ("launch", 2), ("hand on", 1), ("hand on", 2)]
    assert list(launched_one_ahead([], launch)) == []
