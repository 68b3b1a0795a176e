import cv2
import numpy as np
import pytest

from utils.image_io import ImageReadError, as_bgr_uint8, read_image


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


@pytest.mark.parametrize("content,message", [(b"", "empty file"), (b"not an image", "not a readable image")])
def test_bad_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message):
        read_image(path)
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.jpg")
