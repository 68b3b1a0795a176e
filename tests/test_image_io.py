import re
import struct

import cv2
import numpy as np
import pytest

from utils.image_io import ImageReadError, as_bgr_uint8, read_image
from utils.image_loader import read_complete_image


def test_arrays_of_every_layout_become_bgr_uint8():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (as_bgr_uint8(gray)[..., 0] == gray).all() and as_bgr_uint8(gray).shape == (3, 4, 3)
    bgra = np.dstack([np.full((2, 2), v, np.uint8) for v in (10, 20, 30, 40)])
    assert as_bgr_uint8(bgra)[0, 0].tolist() == [10, 20, 30]
    deep = np.full((2, 2, 3), 0x1234, np.uint16)
    assert as_bgr_uint8(deep)[0, 0, 0] == 0x12
    unit = np.full((2, 2, 3), 0.5, np.float32)
    assert as_bgr_uint8(unit)[0, 0, 0] == 128
    with pytest.raises(ValueError, match="shape"):
        as_bgr_uint8(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError):
        as_bgr_uint8(np.zeros((2, 2, 3), np.int64))


def test_files_are_read_like_imread_color(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    unusual = tmp_path / "visage été.png"  # non-ASCII name
    cv2.imwrite(str(tmp_path / "plain.png"), image)
    (tmp_path / "plain.png").rename(unusual)
    np.testing.assert_array_equal(read_image(unusual), image)
    gray16 = (np.arange(80, dtype=np.uint16).reshape(8, 10) * 800)
    cv2.imwrite(str(tmp_path / "deep.png"), gray16)
    assert read_image(tmp_path / "deep.png").shape == (8, 10, 3)
    assert read_image(tmp_path / "deep.png").dtype == np.uint8


def jpeg_with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an EXIF segment (APP1) right after its start marker whose one tag is Orientation."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + app1 + jpeg[2:]


@pytest.mark.parametrize("orientation,upright", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                                 (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied_as_imread_does(tmp_path, orientation, upright):
    # Phones store portraits sideways with an Orientation tag; cv2.imread (the public pipeline's reader)
    # turns them upright, so every reader of ours must too, or the detections differ.
    image = np.zeros((16, 32, 3), np.uint8)
    image[:8, :16] = (0, 0, 255)  # a red quarter marks the top-left corner
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    path = tmp_path / "phone.jpg"
    path.write_bytes(jpeg_with_exif_orientation(encoded.tobytes(), orientation))
    expected = cv2.imread(str(path), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(expected, upright(cv2.imdecode(encoded, cv2.IMREAD_COLOR)))
    np.testing.assert_array_equal(read_image(path), expected)
    np.testing.assert_array_equal(read_complete_image(path), expected)


@pytest.mark.parametrize("content,message", [(b"", "empty file"), (b"not an image", "not a readable image")])
def test_bad_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message):
        read_image(path)
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.jpg")


def test_the_python_api_reads_paths_as_the_command_line_does(tmp_path):
    """FaceDetector, TTADetector and onnx_detections read a path as inference.py does: the same files
    refused for the same reasons (a damaged JPEG used to be detected half grey, a folder was "not found")."""
    from models.detector import FaceDetector
    from models.retinaface import ModelConfig, RetinaFace
    from utils.image_loader import image_as_bgr_uint8, load_record

    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    cases = {"truncated.jpg": data[:len(data) // 2], "damaged.jpg": data[:len(data) // 2] + b"\xff\xd9",
             "no_end_marker.jpg": data[:-2], "empty.jpg": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    detector = FaceDetector(model=RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)), device="cpu")
    for name in [*cases, "folder.jpg", "broken.jpg", "missing.jpg"]:
        reason = load_record(0, tmp_path / name, name).error
        assert reason, name
        with pytest.raises(ImageReadError) as raised:
            image_as_bgr_uint8(tmp_path / name)
        assert str(raised.value) == f"{tmp_path / name}: {reason}"
        with pytest.raises(ImageReadError, match=re.escape(reason)):
            detector.detect(str(tmp_path / name))
    (tmp_path / "good.jpg").write_bytes(data)
    np.testing.assert_array_equal(image_as_bgr_uint8(tmp_path / "good.jpg"), cv2.imdecode(np.frombuffer(data, np.uint8),
                                                                                          cv2.IMREAD_COLOR))
