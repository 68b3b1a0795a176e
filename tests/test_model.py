import itertools
import math

import pytest
import torch

from layers.prior_box import num_priors, prior_boxes
from models.retinaface import ModelConfig, RetinaFace
from utils.box_utils import decode_landm

VARIANTS = list(itertools.product(
    ["mobilenet0.25", "resnet18", "resnet50"], [2, 3], [(False, "refine"), (True, "refine"), (True, "residual")],
    ["retina", "tina"]))


@pytest.mark.parametrize("network,num_anchor,cascade,model_version", VARIANTS,
                         ids=[f"{n}-a{a}-{'casc-' + m if c else 'single'}-{v}" for n, a, (c, m), v in VARIANTS])
def test_forward_backward_shapes(network, num_anchor, cascade, model_version):
    torch.manual_seed(0)
    config = ModelConfig(network=network, num_anchor=num_anchor, cascade=cascade[0], cascade_mode=cascade[1],
                         model_version=model_version)
    model = RetinaFace(config).train()
    size = (64, 96)
    n = num_priors(size, num_anchor)
    outputs = model(torch.randn(2, 3, *size))
    assert len(outputs) == (2 if cascade[0] else 1)
    for stage in outputs:
        assert stage.loc.shape == (2, n, 4)
        assert stage.conf.shape == (2, n, 2)
        assert stage.landm.shape == (2, n, 10)
        assert (stage.iou.shape == (2, n, 1)) if model_version == "tina" else stage.iou is None
    loss = sum(t.float().square().mean() for stage in outputs for t in stage if t is not None)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    boxes, scores, landmarks = model.decode_detections(outputs, prior_boxes(size, num_anchor))
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n) and landmarks.shape == (2, n, 10)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_default_config_is_the_original_best_model():
    config = ModelConfig()
    assert (config.network, config.num_anchor, config.cascade, config.model_version) == ("resnet50", 2, True, "retina")
    assert config.fpn_channels == 256


def test_building_a_model_downloads_nothing(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")
    # an empty hub cache: ImageNet weights, if they were asked for, would have to be downloaded
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    RetinaFace(ModelConfig(network="resnet50"))


def test_mobilenet_parameter_names_and_shapes_match_published_file(mobilenet_weights):
    published = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    ours = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)).state_dict()
    assert list(ours) == list(published)
    assert all(ours[k].shape == published[k].shape for k in ours)


def test_resnet50_layout_matches_pytorch_retinaface():
    state = RetinaFace(ModelConfig(network="resnet50", cascade=False)).state_dict()
    expected_shapes = {
        "body.conv1.weight": (64, 3, 7, 7),
        "body.layer4.2.bn3.running_var": (2048,),
        "fpn.output1.0.weight": (256, 512, 1, 1),
        "fpn.output3.0.weight": (256, 2048, 1, 1),
        "fpn.merge2.0.weight": (256, 256, 3, 3),
        "ssh3.conv3X3.0.weight": (128, 256, 3, 3),
        "ssh1.conv7x7_3.1.running_mean": (64,),
        "ClassHead.0.conv1x1.weight": (4, 256, 1, 1),
        "BboxHead.1.conv1x1.weight": (8, 256, 1, 1),
        "LandmarkHead.2.conv1x1.bias": (20,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith(("body.fc", "body.avgpool", "cascade")) for k in state)


def test_activation_rule_follows_out_channels():
    narrow = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))
    wide = RetinaFace(ModelConfig(network="resnet18", cascade=False))
    assert narrow.fpn.merge1[2].negative_slope == 0.1 and narrow.ssh1.conv5X5_1[2].negative_slope == 0.1
    assert wide.fpn.merge1[2].negative_slope == 0.0 and wide.ssh1.conv5X5_1[2].negative_slope == 0.0


def test_cascade_semantics():
    torch.manual_seed(0)
    size = (64, 64)
    priors = prior_boxes(size, 2)
    for mode in ("refine", "residual"):
        model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade_mode=mode)).eval()
        with torch.no_grad():
            outputs = model(torch.randn(1, 3, *size))
        first, second = model.stage_predictions(outputs, priors)
        assert first.anchors is priors
        if mode == "refine":
            from utils.box_utils import center_size, decode
            torch.testing.assert_close(second.anchors, center_size(decode(outputs[0].loc, priors)))
            assert second.loc is outputs[1].loc
        else:  # as the original project's forward: box offsets summed, stage-2 landmarks on their own
            assert second.anchors is priors
            torch.testing.assert_close(second.loc, outputs[0].loc + outputs[1].loc)
            assert second.landm is outputs[1].landm
            _, _, landmarks = model.decode_detections(outputs, priors)
            torch.testing.assert_close(landmarks, decode_landm(outputs[1].landm, priors))
        # test-time scores come from the last stage
        _, scores, _ = model.decode_detections(outputs, priors)
        torch.testing.assert_close(scores, torch.softmax(outputs[1].conf, -1)[..., 1])


def test_cascade_stage_reads_the_fpn_features_not_stage_1s_ssh_outputs():
    """The cascade stage is "a second detection stage on the same FPN features" (ModelConfig):
    it has its own SSH modules on the FPN outputs, so changing stage 1's SSH weights changes
    stage 1's outputs and leaves stage 2's as they were."""
    torch.manual_seed(0)
    for mode in ("refine", "residual"):
        model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=True, cascade_mode=mode)).eval()
        x = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            before = model(x)
            for ssh in (model.ssh1, model.ssh2, model.ssh3):
                for parameter in ssh.parameters():
                    parameter.add_(torch.randn_like(parameter))
            after = model(x)
        assert not torch.allclose(before[0].conf, after[0].conf)
        for a, b in zip(before[1], after[1]):
            if a is not None:
                torch.testing.assert_close(b, a)


def test_refine_stage_decodes_boxes_and_landmarks_from_the_stage_1_boxes():
    """``refine``: stage 2 "regresses boxes and landmarks from the stage-1 decoded boxes"
    (ModelConfig). Decoded here by hand: the stage-1 box of each prior becomes the anchor
    (centre, size) of the stage-2 box and landmark offsets (variances 0.1 and 0.2)."""
    from models.retinaface import StageOutput

    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=True, cascade_mode="refine")).eval()
    priors = torch.tensor([[32.0, 32.0, 16.0, 16.0], [48.0, 16.0, 32.0, 32.0], [100.0, 60.0, 64.0, 64.0]])
    generator = torch.Generator().manual_seed(0)
    loc1, loc2 = torch.randn(1, 3, 4, generator=generator), torch.randn(1, 3, 4, generator=generator)
    landm1, landm2 = torch.randn(1, 3, 10, generator=generator), torch.randn(1, 3, 10, generator=generator)
    conf1, conf2 = torch.randn(1, 3, 2, generator=generator), torch.randn(1, 3, 2, generator=generator)
    outputs = [StageOutput(loc1, conf1, landm1, None), StageOutput(loc2, conf2, landm2, None)]
    boxes, scores, landmarks = model.decode_detections(outputs, priors)

    for i, (px, py, pw, ph) in enumerate(priors.tolist()):
        dx, dy, dw, dh = loc1[0, i].tolist()
        ax, ay = px + dx * 0.1 * pw, py + dy * 0.1 * ph  # the stage-1 box: the stage-2 anchor
        aw, ah = pw * math.exp(dw * 0.2), ph * math.exp(dh * 0.2)
        dx, dy, dw, dh = loc2[0, i].tolist()
        cx, cy = ax + dx * 0.1 * aw, ay + dy * 0.1 * ah
        w, h = aw * math.exp(dw * 0.2), ah * math.exp(dh * 0.2)
        torch.testing.assert_close(boxes[0, i], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
        points = landm2[0, i].view(5, 2)
        expected = torch.stack([ax + points[:, 0] * 0.1 * aw, ay + points[:, 1] * 0.1 * ah], dim=1).flatten()
        torch.testing.assert_close(landmarks[0, i], expected)
        odds = math.exp(conf2[0, i, 1].item() - conf2[0, i, 0].item())
        assert scores[0, i].item() == pytest.approx(odds / (1 + odds), rel=1e-5)


def test_tina_score_is_geometric_mean():
    torch.manual_seed(0)
    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False, model_version="tina")).eval()
    priors = prior_boxes((32, 32), 2)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 32, 32))
    _, scores, _ = model.decode_detections(outputs, priors)
    expected = torch.sqrt(torch.softmax(outputs[0].conf, -1)[..., 1] * torch.sigmoid(outputs[0].iou[..., 0]))
    torch.testing.assert_close(scores, expected)


def test_invalid_config_values():
    with pytest.raises(ValueError, match="network"):
        ModelConfig(network="vgg16")
    with pytest.raises(ValueError, match="cascade_mode"):
        ModelConfig(cascade_mode="stacked")
    with pytest.raises(ValueError, match="unknown model configuration keys"):
        ModelConfig.from_dict({"network": "resnet50", "depth": 50})


@pytest.mark.parametrize("network", ["mobilenet0.25", "resnet18", "resnet50"])
def test_batchnorm_folding_keeps_outputs(network):
    from models.net import fuse_conv_bn
    torch.manual_seed(0)
    model = RetinaFace(ModelConfig(network=network, model_version="tina")).train()
    for module in model.modules():  # non-trivial statistics so that folding has something to do
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.bias.data.uniform_(-0.5, 0.5)
    fused = fuse_conv_bn(model)
    assert model.training, "the original model keeps its mode"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for expected, got in zip(model.eval()(x), fused(x)):
            for a, b in zip(expected, got):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_sync_batchnorm_of_multi_gpu_training_is_folded_too():
    from models.net import fuse_conv_bn
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(RetinaFace(ModelConfig(network="mobilenet0.25")))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())


def _face_target(box) -> torch.Tensor:
    """One ``(1, 15)`` training target without landmarks (pixels of the network input)."""
    target = torch.full((1, 15), -1.0)
    target[0, :4] = torch.tensor(box)
    return target


def test_refine_stage2_loss_sends_no_gradient_into_stage1_boxes():
    """Stage 2 of the refine cascade is matched and encoded against the *detached* stage-1 boxes:
    its loss must not train the stage-1 box head (only the stage-1 loss does)."""
    from layers.multibox_loss import MultiBoxLoss
    from models.retinaface import StageOutput

    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=True, cascade_mode="refine")
    model = RetinaFace(config)
    priors = prior_boxes((64, 64), 2)
    n = priors.shape[0]
    loc1 = (0.3 * torch.randn(1, n, 4)).requires_grad_()
    second = StageOutput((0.3 * torch.randn(1, n, 4)).requires_grad_(), torch.randn(1, n, 2), torch.randn(1, n, 10),
                         None)
    outputs = [StageOutput(loc1, torch.randn(1, n, 2), torch.randn(1, n, 10), None), second]
    losses = MultiBoxLoss(config)(model, outputs, priors, [_face_target([20.0, 20.0, 44.0, 44.0])])
    assert losses["stage2/loss_box"] > 0 and losses["num_pos"] > 0
    (grad,) = torch.autograd.grad(losses["stage2/total"], loc1, retain_graph=True, allow_unused=True)
    assert grad is None or not grad.any()
    (grad,) = torch.autograd.grad(losses["stage1/total"], loc1)
    assert grad.any()  # the stage-1 loss does reach them


def test_tina_iou_target_is_the_iou_of_the_predicted_box():
    """``loss_iou`` is the binary cross-entropy between the IoU logit and the IoU of each
    positive's *predicted* (decoded) box with its face, summed over positives and divided by their
    number; recomputed here from the protocol: torchvision IoUs, the 0.35 / best-anchor
    positives, the offsets decoded by hand."""
    from torchvision.ops import box_iou

    from layers.multibox_loss import MultiBoxLoss
    from models.retinaface import StageOutput
    from utils.box_utils import point_form

    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=False, model_version="tina")
    model = RetinaFace(config)
    priors = prior_boxes((64, 64), 2)
    n = priors.shape[0]
    face = torch.tensor([[18.0, 22.0, 42.0, 50.0]])
    loc, iou_logit = 0.5 * torch.randn(1, n, 4), torch.randn(1, n, 1)
    outputs = [StageOutput(loc, torch.randn(1, n, 2), torch.randn(1, n, 10), iou_logit)]
    losses = MultiBoxLoss(config)(model, outputs, priors, [_face_target(face[0].tolist())])

    overlaps = box_iou(face, point_form(priors))[0]
    positive = overlaps >= 0.35
    assert overlaps.max() >= 0.2
    positive[overlaps.argmax()] = True
    anchors, offsets = priors[positive], loc[0, positive]
    centre = anchors[:, :2] + offsets[:, :2] * 0.1 * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(offsets[:, 2:] * 0.2)
    predicted = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    target = box_iou(predicted, face)[:, 0]
    assert 0.05 < target.min() and target.max() < 0.95  # far from the matched box's IoU of 1
    probability = torch.sigmoid(iou_logit[0, positive, 0])
    bce = -(target * torch.log(probability) + (1 - target) * torch.log(1 - probability))
    torch.testing.assert_close(losses["stage1/loss_iou"], bce.sum() / positive.sum())


def test_a_face_claims_its_best_anchor_at_exactly_the_minimum_iou():
    """A face claims its best anchor when that IoU is ``>= 0.2`` (the public ``match``), even below
    the 0.35 positive threshold: a 10x2 face at the top of a 10x10 anchor has IoU 20 / 100,
    exactly float32(0.2); a 10x1.5 face (IoU 0.15) claims nothing."""
    from layers.multibox_loss import box_iou_batched, match_anchors, pad_targets

    anchors = torch.tensor([[5.0, 5.0, 10.0, 10.0], [100.0, 100.0, 10.0, 10.0]])  # cx, cy, w, h
    for height, claimed in ((2.0, True), (1.5, False)):
        face = torch.tensor([[0.0, 0.0, 10.0, height]])
        iou = box_iou_batched(face[None], torch.tensor([[0.0, 0.0, 10.0, 10.0]]))[0, 0, 0]
        assert iou.item() == (torch.tensor(0.2).item() if claimed else torch.tensor(0.15).item())
        padded, valid, _ = pad_targets([_face_target(face[0].tolist())])
        match = match_anchors(padded[..., :4], valid, anchors)
        assert match.positive[0].tolist() == [claimed, False], height
