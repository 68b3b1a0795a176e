import torch

from utils.box_utils import center_size, decode, decode_landm, encode, encode_landm, point_form


def random_boxes(generator, shape):
    xy = torch.rand(*shape, 2, generator=generator) * 500
    wh = torch.rand(*shape, 2, generator=generator) * 200 + 1
    return torch.cat([xy, xy + wh], dim=-1)


def test_point_form_center_size_inverse():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(g, (7,))
    torch.testing.assert_close(point_form(center_size(boxes)), boxes)


def test_encode_decode_round_trip_batched():
    g = torch.Generator().manual_seed(1)
    priors = center_size(random_boxes(g, (50,)))
    boxes = random_boxes(g, (3, 50))
    codes = encode(boxes, priors)
    assert codes.shape == (3, 50, 4)
    torch.testing.assert_close(decode(codes, priors), boxes, rtol=1e-5, atol=1e-3)
    # per-image anchors (B, N, 4), as used by the cascade stage
    per_image = center_size(random_boxes(g, (3, 50)))
    torch.testing.assert_close(decode(encode(boxes, per_image), per_image), boxes, rtol=1e-5, atol=1e-3)


def test_encode_known_values():
    priors = torch.tensor([[100.0, 100.0, 50.0, 50.0]])
    box = torch.tensor([[80.0, 90.0, 130.0, 140.0]])  # centre (105, 115), size 50x50
    codes = encode(box, priors)
    torch.testing.assert_close(codes, torch.tensor([[5 / (0.1 * 50), 15 / (0.1 * 50), 0.0, 0.0]]))


def test_landmark_round_trip_and_scale_invariance():
    g = torch.Generator().manual_seed(2)
    priors = center_size(random_boxes(g, (20,)))
    points = torch.rand(2, 20, 10, generator=g) * 600
    codes = encode_landm(points, priors)
    torch.testing.assert_close(decode_landm(codes, priors), points, rtol=1e-5, atol=1e-3)
    # offsets do not depend on the unit: pixels or normalised give the same codes
    scale = torch.tensor([640.0, 480.0] * 2)
    torch.testing.assert_close(encode_landm(points / torch.tensor([640.0, 480.0] * 5), priors / scale), codes,
                               rtol=1e-4, atol=1e-4)
