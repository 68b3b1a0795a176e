import pytest
import torch

from layers.prior_box import MIN_SIZES, STEPS, num_priors, prior_boxes
from models.retinaface import ModelConfig, RetinaFace
from tools.public_pipeline import python_loop_priors


@pytest.mark.parametrize("num_anchor", [2, 3])
@pytest.mark.parametrize("size", [(64, 64), (100, 37), (480, 640), (33, 1), (257, 511)])
def test_priors_match_reference_loop(size, num_anchor):
    expected = python_loop_priors(*size, MIN_SIZES[num_anchor], STEPS)
    normalised = prior_boxes(size, num_anchor, normalized=True)
    assert normalised.shape == expected.shape == (num_priors(size, num_anchor), 4)
    torch.testing.assert_close(normalised, expected, rtol=1e-6, atol=1e-7)
    pixels = prior_boxes(size, num_anchor)
    torch.testing.assert_close(pixels / torch.tensor([size[1], size[0]] * 2), expected, rtol=1e-6, atol=1e-7)


def test_prior_count_and_first_anchors():
    # 640x480: levels of 80x60, 40x30, 20x15 cells, two anchors each
    assert num_priors((480, 640), 2) == (80 * 60 + 40 * 30 + 20 * 15) * 2 == 12600
    pixels = prior_boxes((480, 640), 2)
    assert pixels[:4].tolist() == [[4, 4, 16, 16], [4, 4, 32, 32], [12, 4, 16, 16], [12, 4, 32, 32]]
    second_level_start = 80 * 60 * 2
    assert pixels[second_level_start].tolist() == [8, 8, 64, 64]
    assert pixels[-1].tolist() == [19.5 * 32, 14.5 * 32, 512, 512]


def test_priors_are_cached_per_size_and_device():
    assert prior_boxes((96, 128), 2) is prior_boxes((96, 128), 2)
    assert prior_boxes((96, 128), 2) is not prior_boxes((96, 128), 3)


@pytest.mark.parametrize("network", ["mobilenet0.25", "resnet18"])
@pytest.mark.parametrize("size", [(67, 45), (128, 96), (33, 1)])
def test_network_outputs_one_prediction_per_prior(network, size):
    model = RetinaFace(ModelConfig(network=network, cascade=False, num_anchor=3)).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, *size))[0]
    assert out.loc.shape[1] == num_priors(size, 3)


def test_invalid_anchor_count():
    with pytest.raises(ValueError, match="num_anchor"):
        prior_boxes((64, 64), 4)


def test_priors_first_made_under_inference_mode_serve_autograd():
    """Detection (inference mode) and training share the cached priors."""
    with torch.inference_mode():
        cached = prior_boxes((40, 72), 2)
    assert not cached.is_inference()
    offsets = torch.zeros(1, cached.shape[0], 4, requires_grad=True)
    (offsets * cached).sum().backward()  # autograd saves the priors: fails for inference tensors
    assert torch.equal(offsets.grad[0], cached)
