"""Exact padding (models/padding_mask.py): each image of a padded batch gets its outputs alone."""
import pytest
import torch

from layers.prior_box import num_priors, prior_boxes
from models.padding_mask import PaddingMask, position_mask, valid_priors
from models.retinaface import ModelConfig, RetinaFace, preprocess

# odd, even and stride-unaligned heights and widths, one filling the canvas in each direction
SIZES = [(97, 130), (64, 64), (121, 77), (128, 101)]
CANVAS = (128, 130)


def padded_batch(images: list[torch.Tensor], canvas: tuple[int, int]) -> torch.Tensor:
    batch = torch.full((len(images), *canvas, 3), 117, dtype=torch.uint8)
    for slot, image in zip(batch, images):
        slot[:image.shape[0], :image.shape[1]] = image
    return batch


@pytest.mark.parametrize("network, cascade, channels_last", [
    ("mobilenet0.25", False, False), ("mobilenet0.25", False, True), ("resnet50", True, True)])
def test_padded_batch_gives_each_image_its_outputs_alone(network, cascade, channels_last):
    torch.manual_seed(0)
    model = RetinaFace(ModelConfig(network=network, cascade=cascade)).eval()
    for module in model.modules():  # trained-like BatchNorm shifts: the padding's activations are not zero
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data.normal_(0, 0.5)
            module.running_mean.normal_(0, 0.5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator) for h, w in SIZES]
    sizes = torch.tensor(SIZES)
    inputs = preprocess(padded_batch(images, CANVAS)).contiguous(memory_format=fmt)
    mask = PaddingMask(model)
    with torch.no_grad():
        with mask.active(sizes, CANVAS):
            masked = model(inputs)
        unmasked = model(inputs)
        inside = valid_priors(sizes, CANVAS, model.config.num_anchor)
        for index, image in enumerate(images):
            alone = model(preprocess(image[None]).contiguous(memory_format=fmt))
            for stage_alone, stage_masked, stage_unmasked in zip(alone, masked, unmasked):
                for field in ("loc", "conf", "landm"):
                    want = getattr(stage_alone, field)[0]
                    got = getattr(stage_masked, field)[index][inside[index]]
                    spread = want.abs().max().item()
                    # float rounding of a different batch shape only (random ResNet-50 outputs reach ~200)
                    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * spread)
                    if SIZES[index] != CANVAS:  # what the mask is for: plain padding changes the outputs
                        plain = getattr(stage_unmasked, field)[index][inside[index]]
                        assert (plain - want).abs().max().item() > 1e-2 * spread
    assert all(not layer._forward_pre_hooks for layer in mask.layers)  # hooks only while active


@pytest.mark.parametrize("num_anchor", [2, 3])
def test_valid_priors_are_the_priors_of_each_image(num_anchor):
    sizes = torch.tensor(SIZES)
    inside = valid_priors(sizes, CANVAS, num_anchor)
    canvas_priors = prior_boxes(CANVAS, num_anchor)
    assert inside.shape == (len(SIZES), num_priors(CANVAS, num_anchor))
    for index, size in enumerate(SIZES):
        # pixel priors do not depend on the canvas: the canvas priors inside an image are its own
        assert torch.equal(canvas_priors[inside[index]], prior_boxes(size, num_anchor))


def test_position_mask_refuses_maps_that_are_not_the_canvas_halved():
    assert position_mask(torch.tensor([[5, 3]]), (9, 9), (3, 3))[0, 0].sum().item() == 2 * 1
    with pytest.raises(ValueError, match="not the input"):
        position_mask(torch.tensor([[5, 5]]), (9, 9), (4, 5))


def test_dense_path_checks_the_sizes_and_skips_the_mask_when_nothing_is_padded():
    from models.dense_path import DensePath

    dense = DensePath(RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)), torch.device("cpu"))
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for bad in ([[65, 64], [64, 64]], [[64, 64]], [[0, 64], [64, 64]]):
        with pytest.raises(ValueError, match="within"):
            dense(images, sizes=torch.tensor(bad))
    masked = []
    active = dense.padding_mask.active

    def counted(*args, **kwargs):
        masked.append(args)
        return active(*args, **kwargs)

    dense.padding_mask.active = counted
    full = dense(images, sizes=torch.tensor([[64, 64], [64, 64]]))
    assert masked == []  # the masking hooks were never installed
    assert all(torch.equal(a, b) for a, b in zip(full, dense(images)))
    assert torch.isfinite(full[1]).all()
    dense(images, sizes=torch.tensor([[64, 64], [40, 64]]))
    assert len(masked) == 1  # a padded batch is masked
