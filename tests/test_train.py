"""Training pipeline: batched matching, loss variants, short CPU runs (resume, DDP, NaN stop).

Everything runs on the CPU with tiny inputs; the runs use the shared 10-image sample set.
"""
from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import box_iou

from config import parse_args
from layers.multibox_loss import MultiBoxLoss, loss_keys, match_anchors, pad_targets
from layers.prior_box import prior_boxes
from models.retinaface import ModelConfig, RetinaFace
from utils.box_utils import point_form
import utils.distributed as distributed
import utils.lr_schedule as lr_schedule
import utils.train_data as train_data
import utils.train_state as train_state
import utils.train_utils as tu

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------
def reference_match(boxes: torch.Tensor, anchors: torch.Tensor, threshold: float = 0.35,
                    force_min_iou: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image port of the protocol: IoU matrix, best face per anchor, every face's best anchor
    forced to it (when that IoU >= 0.2; later faces win shared anchors), positives at 0.35."""
    num_anchors = anchors.shape[0]
    if boxes.shape[0] == 0:
        return torch.zeros(num_anchors, dtype=torch.bool), torch.zeros(num_anchors, dtype=torch.long)
    iou = box_iou(boxes, point_form(anchors))  # (K, N)
    best_anchor_iou, best_anchor = iou.max(dim=1)
    best_face_iou, best_face = iou.max(dim=0)
    for j in range(boxes.shape[0]):
        if best_anchor_iou[j] >= force_min_iou:
            best_face[best_anchor[j]] = j
            best_face_iou[best_anchor[j]] = 2.0
    return best_face_iou >= threshold, best_face


def random_faces(generator: torch.Generator, count: int, size: int) -> torch.Tensor:
    centre = torch.rand(count, 2, generator=generator) * size
    side = torch.exp(torch.rand(count, 2, generator=generator) * math.log(size / 3.0)) + 2.0
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1).clamp(0, size)
    targets = torch.full((count, 15), -1.0)
    targets[:, :4] = boxes
    return targets


@pytest.mark.parametrize("per_image_anchors", [False, True])
def test_batched_matching_equals_per_image_reference(per_image_anchors):
    generator = torch.Generator().manual_seed(0)
    size = 160
    priors = prior_boxes((size, size), 3)
    counts = [0, 1, 7, 0, 25, 3]
    faces = [random_faces(generator, k, size) for k in counts]
    faces[2][3] = faces[2][1]           # two identical faces share their best anchor: the later wins
    faces[2][4, :4] = torch.tensor([50.0, 50.0, 51.0, 51.0])  # 1-pixel face: best IoU < 0.2, claims nothing
    if per_image_anchors:  # jittered anchors per image, like the refine cascade's stage 2
        anchors = priors.expand(len(counts), -1, -1).clone()
        anchors[..., :2] += torch.randn(anchors[..., :2].shape, generator=generator) * 3
        anchors[..., 2:] *= torch.exp(torch.randn(anchors[..., 2:].shape, generator=generator) * 0.2)
    else:
        anchors = priors
    padded, valid, _ = pad_targets(faces)
    result = match_anchors(padded[..., :4], valid, anchors)
    # groups of 5 faces, across image boundaries: the IoU is computed twice, per group
    chunked = match_anchors(padded[..., :4], valid, anchors, max_elements=5 * priors.shape[0])
    assert all(torch.equal(a, b) for a, b in zip(result, chunked))
    # the face index pad_targets computes on the host when it moves a batch
    moved = pad_targets(faces, "cpu")
    assert moved.faces.shape == (2, sum(counts))
    from_host = match_anchors(moved.targets[..., :4], moved.valid, anchors, faces=moved.faces)
    assert all(torch.equal(a, b) for a, b in zip(result, from_host))
    total_positives = 0
    for b, image_faces in enumerate(faces):
        image_anchors = anchors[b] if per_image_anchors else anchors
        positive, face = reference_match(image_faces[:, :4], image_anchors)
        assert torch.equal(result.positive[b], positive), f"image {b}"
        assert torch.equal(result.face_index[b][positive], face[positive]), f"image {b}"
        assert torch.equal(chunked.positive[b], positive)
        assert torch.equal(chunked.face_index[b][positive], face[positive])
        total_positives += int(positive.sum())
        if len(image_faces) == 0:
            assert not result.positive[b].any()
    assert total_positives > 20
    image_anchors = anchors[2] if per_image_anchors else anchors
    best = box_iou(faces[2][3:4, :4], point_form(image_anchors))[0].argmax()
    assert result.positive[2, best] and result.face_index[2, best] == 3  # the later duplicate wins


def test_matching_batch_without_faces():
    priors = prior_boxes((64, 64), 2)
    padded, valid, _ = pad_targets([torch.zeros(0, 15), torch.zeros(0, 15)])
    assert padded.shape == (2, 1, 15) and not valid.any()
    result = match_anchors(padded[..., :4], valid, priors)
    assert not result.positive.any()


# ---------------------------------------------------------------------------------------------
# Loss variants
# ---------------------------------------------------------------------------------------------
def _targets(with_landmarks: bool) -> list[torch.Tensor]:
    faces = torch.tensor([[10.0, 12.0, 40.0, 46.0], [50.0, 20.0, 90.0, 70.0], [5.0, 60.0, 21.0, 78.0]])
    rows = torch.full((3, 15), -1.0)
    rows[:, :4] = faces
    if with_landmarks:
        cx, cy = (faces[:, 0] + faces[:, 2]) / 2, (faces[:, 1] + faces[:, 3]) / 2
        rows[:2, 4:14] = torch.stack([cx, cy] * 5, dim=1)[:2] + torch.arange(10.0)
        rows[:2, 14] = 1.0
    return [rows, torch.zeros(0, 15)]


_CASCADES = [(False, "refine"), (True, "refine"), (True, "residual")]


@pytest.mark.parametrize("num_anchor", [2, 3])
@pytest.mark.parametrize("cascade,cascade_mode", _CASCADES, ids=["single", "refine", "residual"])
@pytest.mark.parametrize("version", ["retina", "tina"])
def test_loss_variants(num_anchor, cascade, cascade_mode, version):
    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", num_anchor=num_anchor, cascade=cascade,
                         cascade_mode=cascade_mode, model_version=version)
    model = RetinaFace(config)
    images = torch.randn(2, 3, 96, 96) * 50
    priors = prior_boxes((96, 96), num_anchor)
    outputs = model(images)
    losses = MultiBoxLoss(config)(model, outputs, priors, _targets(with_landmarks=True))
    assert sorted(losses) == sorted(loss_keys(config.num_stages))
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    assert losses["loss_box"] > 0 and losses["loss_cls"] > 0 and losses["loss_landm"] > 0
    assert (losses["loss_iou"] > 0) == (version == "tina")
    stage_sum = sum(losses[f"stage{s}/total"] for s in range(1, config.num_stages + 1))
    assert torch.allclose(losses["total"], stage_sum)
    expected = sum(2 * losses[f"stage{s}/loss_box"] + losses[f"stage{s}/loss_cls"] + losses[f"stage{s}/loss_landm"]
                   + losses[f"stage{s}/loss_iou"] for s in range(1, config.num_stages + 1))
    assert torch.allclose(losses["total"], expected)
    losses["total"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.zero_grad()
    without = MultiBoxLoss(config)(model, model(images), priors, _targets(with_landmarks=False))
    assert without["loss_landm"] == 0 and torch.isfinite(without["total"])
    switched_off = MultiBoxLoss(config, landmark_loss=False)(model, model(images), priors, _targets(True))
    assert switched_off["loss_landm"] == 0
    switched_off["total"].backward()  # the landmark heads stay in the graph (zero gradients): DDP-safe
    assert all(p.grad is not None for p in model.parameters())


def test_empty_image_negatives():
    """An image without faces adds no loss term by default (the public rule); with
    ``empty_image_negatives=K`` its K anchors of highest background cross-entropy enter the class
    loss, normalised by the positives of the batch. Images with faces keep their 7:1 mining."""
    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=False)
    model = RetinaFace(config)
    images = torch.randn(2, 3, 96, 96) * 50
    priors = prior_boxes((96, 96), 2)
    targets = _targets(with_landmarks=False)  # image 0: three faces, image 1: none
    padded, valid, _ = pad_targets(targets)
    num_pos = match_anchors(padded[..., :4], valid, priors).positive.sum()
    outputs = model(images)
    conf = outputs[0].conf
    conf.retain_grad()
    background_ce = (torch.logsumexp(conf[1], dim=-1) - conf[1, :, 0]).detach()  # image 1's anchors

    default = MultiBoxLoss(config)(model, outputs, priors, targets)
    default["loss_cls"].backward(retain_graph=True)
    assert not conf.grad[1].any() and conf.grad[0].any()

    conf.grad = None
    k = 5
    mined = MultiBoxLoss(config, empty_image_negatives=k)(model, outputs, priors, targets)
    expected = default["loss_cls"] + background_ce.topk(k).values.sum() / num_pos
    assert torch.allclose(mined["loss_cls"], expected)
    assert torch.equal(mined["loss_box"], default["loss_box"])
    mined["loss_cls"].backward()
    assert set(conf.grad[1].abs().sum(-1).nonzero().flatten().tolist()) == set(background_ce.topk(k).indices.tolist())

    everything = MultiBoxLoss(config, empty_image_negatives=10 ** 9)(model, outputs, priors, targets)
    expected = default["loss_cls"] + background_ce.topk(priors.shape[0] - 1).values.sum() / num_pos
    assert torch.allclose(everything["loss_cls"], expected)  # at most N - 1 negatives, as 7:1 mining


def test_landmark_loss_is_divided_by_the_positives_with_landmarks_only():
    """The landmark term averages over the positive anchors whose face has landmarks (the public
    loss's ``num_pos_landm``): a face without landmarks added to the other image makes more
    positives, not more landmark positives, and leaves the landmark loss as it was."""
    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=False)
    model = RetinaFace(config)
    images = torch.randn(2, 3, 96, 96) * 50
    priors = prior_boxes((96, 96), 2)
    outputs = model(images)
    targets = _targets(with_landmarks=True)  # image 0: two faces with landmarks, one without; image 1: none
    extra = torch.full((1, 15), -1.0)
    extra[0, :4] = torch.tensor([30.0, 30.0, 70.0, 70.0])  # image 1, no landmarks
    before = MultiBoxLoss(config)(model, outputs, priors, targets)
    after = MultiBoxLoss(config)(model, outputs, priors, [targets[0], extra])
    assert after["num_pos"] > before["num_pos"]
    assert not torch.allclose(after["loss_box"], before["loss_box"])  # divided by all positives
    assert before["loss_landm"] > 0
    torch.testing.assert_close(after["loss_landm"], before["loss_landm"], rtol=1e-6, atol=0)


def test_hard_negatives_are_the_highest_losses_among_the_non_positive_anchors():
    """Positive anchors take no place in the negative ranking, even when their own losses are the
    largest: each image gets ``min(ratio * positives, N - 1)`` negatives (as many as there are
    non-positive anchors at most), the highest-loss non-positives, re-ranked here by hand."""
    from layers.multibox_loss import hard_negative_mask

    generator = torch.Generator().manual_seed(0)
    num_anchors = 20
    cls_loss = torch.rand(3, num_anchors, generator=generator)  # distinct values: no ties
    positive = torch.zeros(3, num_anchors, dtype=torch.bool)
    positive[0, [3, 7]] = True          # 2 positives, ratio 3: 6 negatives out of 18
    positive[1, :12] = True             # 12 positives: min(36, N - 1) = 19, but only 8 anchors are not positive
    # image 2: no positive, no negative (the public rule)
    cls_loss[positive] = 10.0 + torch.arange(int(positive.sum()), dtype=torch.float32)  # the largest losses
    mask = hard_negative_mask(cls_loss, positive, 3.0)
    assert mask.shape == positive.shape and mask.dtype == torch.bool
    for image in range(3):
        num_pos = int(positive[image].sum())
        candidates = [i for i in range(num_anchors) if not positive[image, i]]
        count = min(3 * num_pos, num_anchors - 1, len(candidates))
        ranked = sorted(candidates, key=lambda i: -cls_loss[image, i].item())
        assert mask[image].nonzero().flatten().tolist() == sorted(ranked[:count]), image
    assert mask.sum(dim=1).tolist() == [6, 8, 0]


def test_refine_stage2_matches_against_stage1_boxes():
    """Stage 2 of the refine cascade is matched against the decoded stage-1 boxes: offsets that
    move stage-1 boxes onto a face make anchors positive that are negative for the priors."""
    config = ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=True, cascade_mode="refine")
    model = RetinaFace(config)
    priors = prior_boxes((64, 64), 2)
    n = priors.shape[0]
    face = torch.tensor([[20.0, 20.0, 44.0, 44.0]])
    target = torch.full((1, 15), -1.0)
    target[0, :4] = face
    from models.retinaface import StageOutput
    from utils.box_utils import encode
    loc1 = encode(face.expand(n, 4), priors).unsqueeze(0)  # every stage-1 box decodes onto the face
    zeros = lambda c: torch.zeros(1, n, c)  # noqa: E731
    outputs = [StageOutput(loc1, zeros(2), zeros(10), None), StageOutput(zeros(4), zeros(2), zeros(10), None)]
    losses = MultiBoxLoss(config)(model, outputs, priors, [target])
    assert losses["stage2/loss_box"] < 1e-4  # zero stage-2 offsets are exactly right for every anchor
    stages = model.stage_predictions(outputs, priors)
    padded, valid, _ = pad_targets([target])
    assert match_anchors(padded[..., :4], valid, stages[1].anchors).positive.all()
    assert match_anchors(padded[..., :4], valid, priors).positive.sum() < n // 4


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def test_schedules():
    step = lr_schedule.LRSchedule("step", total_iters=250 * 10, warmup_iters=10, milestones=[1900, 2200])
    assert step(0) == pytest.approx(0.1) and step(9) == pytest.approx(1.0)
    assert step(1899) == 1.0 and step(1900) == pytest.approx(0.1) and step(2200) == pytest.approx(0.01)
    cosine = lr_schedule.LRSchedule("cosine", total_iters=100, warmup_iters=0)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    args = parse_args("train", ["--network", "mobilenet0.25"])
    assert lr_schedule.resolve_epochs_and_steps(args, "mobilenet0.25") == (250, [190, 220])
    assert lr_schedule.resolve_epochs_and_steps(args, "resnet50") == (100, [70, 90])
    args = parse_args("train", ["--epochs", "50"])
    assert lr_schedule.resolve_epochs_and_steps(args, "resnet50") == (50, [35, 45])


def test_sampler_skip_and_shards():
    full = train_data.ResumableSampler(10, seed=3)
    full.set_epoch(2)
    order = [i for i, _ in full]
    assert sorted(order) == list(range(10))
    full.set_epoch(2, skip=4)
    assert [i for i, _ in full] == order[4:] and len(full) == 6
    shards = [train_data.ResumableSampler(11, 2, r, seed=3) for r in range(2)]
    for s in shards:
        s.set_epoch(0)
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(i for s in shards for i, _ in s) == set(range(11))


def test_sampler_shuffles_each_epoch_anew():
    """The permutation is drawn from ``seed + epoch``: consecutive epochs see the images in other
    orders (two of 50! orders coincide with chance 1/50!), and an epoch's order is reproducible."""
    sampler = train_data.ResumableSampler(50, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append([i for i, e in sampler if e == epoch])
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert orders[0] != orders[1] and orders[0] == orders[2]
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert orders[1] == expected


def test_build_model_backbone_errors(monkeypatch, tmp_path, mobilenet_backbone_weights, mobilenet_weights):
    monkeypatch.setattr(tu, "DEFAULT_MOBILENET_BACKBONE", tmp_path / "absent.tar")
    args = parse_args("train", ["--network", "mobilenet0.25"])
    with pytest.raises(tu.TrainingSetupError, match="--backbone_weights"):
        tu.build_model(args)
    args = parse_args("train", ["--network", "mobilenet0.25", "--backbone_weights", str(mobilenet_backbone_weights)])
    model, notes = tu.build_model(args)
    assert "ImageNet" in notes[0]
    # weights of another backbone, and a detector checkpoint, are named as such in one line
    args = parse_args("train", ["--network", "resnet18", "--backbone_weights", str(mobilenet_backbone_weights)])
    with pytest.raises(tu.TrainingSetupError) as info:
        tu.build_model(args)
    import torchvision

    # the counts, from the two state dicts: BatchNorm counters are optional (filled in), so not counted
    resnet_keys = [k for k in torchvision.models.resnet18().state_dict() if not k.endswith("num_batches_tracked")]
    file_keys = {k.removeprefix("module.") for k in torch.load(mobilenet_backbone_weights, map_location="cpu",
                                                                weights_only=True)["state_dict"]}
    missing = [k for k in resnet_keys if k not in file_keys]
    assert (len(missing), len(resnet_keys)) == (100, 102)
    assert set(resnet_keys) - set(missing) == {"fc.weight", "fc.bias"}
    assert str(info.value).startswith(f"--backbone_weights: {mobilenet_backbone_weights} does not hold ResNet backbone "
                                      f"weights: {len(missing)} of its {len(resnet_keys)} tensors missing (e.g. "
                                      "conv1.weight), 1 of another shape (e.g. fc.weight: (1000, 256) in the file, "
                                      "(1000, 512) here)")
    args = parse_args("train", ["--network", "mobilenet0.25", "--backbone_weights", str(mobilenet_weights)])
    with pytest.raises(tu.TrainingSetupError, match=r"detector checkpoint: fine-tune from it with --init_weights$"):
        tu.build_model(args)
    # a backbone file of PyTorch < 0.4.1 has no BatchNorm counters: loaded, as load_state_dict would
    resnet = torchvision.models.resnet18()
    old_file = {k: v for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old_file, tmp_path / "resnet18_old.pth")
    args = parse_args("train", ["--network", "resnet18", "--cascade", "false",
                                "--backbone_weights", str(tmp_path / "resnet18_old.pth")])
    model, _ = tu.build_model(args)
    assert torch.equal(model.body.conv1.weight, resnet.conv1.weight)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    # torch.hub's downloader is looked up at call time (torchvision holds its own name for
    # load_state_dict_from_url); an empty hub cache makes the download necessary
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    args = parse_args("train", ["--network", "resnet18"])
    with pytest.raises(tu.TrainingSetupError, match="--pretrained false"):
        tu.build_model(args)


def test_init_weights_from_published_checkpoint(mobilenet_weights, mobilenet_backbone_weights):
    args = parse_args("train", ["--init_weights", str(mobilenet_weights)])
    model, notes = tu.build_model(args)
    assert not any("--backbone_weights" in note for note in notes)
    assert model.config == ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=False)
    published = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    key = "ClassHead.0.conv1x1.weight"
    assert torch.equal(model.state_dict()[key], published[key])
    args = parse_args("train", ["--init_weights", str(mobilenet_weights), "--cascade", "true",
                                "--model_version", "tina"])
    model, notes = tu.build_model(args)
    assert model.config.cascade and model.config.model_version == "tina"
    assert torch.equal(model.state_dict()[key], published[key]) and "newly initialised" in notes[0]
    args = parse_args("train", ["--init_weights", str(mobilenet_weights), "--backbone_weights",
                                str(mobilenet_backbone_weights)])
    _, notes = tu.build_model(args)
    assert notes[-1] == "note: --backbone_weights ignored: the --init_weights checkpoint holds the backbone"


# ---------------------------------------------------------------------------------------------
# Short training runs on the sample set
# ---------------------------------------------------------------------------------------------
def _fixed_batch(root: Path, size: int, count: int):
    from utils.data_loaders import dataset_from_root, detection_collate, images_to_network_input
    from utils.data_transformer import TrainTransform

    dataset = dataset_from_root(root, "val", TrainTransform(size, rng=0))
    images, targets = detection_collate([dataset[i] for i in range(count)])
    return images_to_network_input(images), targets


def test_a_few_iterations_lower_the_loss(widerface_sample):
    torch.manual_seed(0)
    inputs, targets = _fixed_batch(widerface_sample, 192, 4)
    args = parse_args("train", ["--network", "mobilenet0.25", "--pretrained", "false", "--cascade", "true",
                                "--lr", "0.01"])
    model, _ = tu.build_model(args)
    optimizer = tu.build_optimizer(model, args)
    criterion = MultiBoxLoss(model.config)
    priors = prior_boxes((192, 192), model.config.num_anchor)
    padded = pad_targets(targets)
    model.train()
    history = []
    for _ in range(8):
        losses = criterion(model, model(inputs), priors, padded)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append(float(losses["total"].detach()))
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.8 * history[0], history


def test_training_loader_pads_the_targets_in_its_workers(widerface_sample):
    """build_train_loader's batches carry one padded target tensor (and its mask), not one tensor
    per image: the rows are each image's faces, as the per-image samples give them, and the loss
    of the padded batch is the loss of the list."""
    from layers.multibox_loss import PaddedTargets
    from utils.data_loaders import images_to_network_input

    args = parse_args("train", _run_args(widerface_sample, "pad", "--workers", "2", "--batch_size", "4"))
    loader, sampler, dataset = train_data.build_train_loader(args, distributed.DistInfo(), seed=3)
    sampler.set_epoch(0)
    indices = list(sampler)
    images, padded, report = next(iter(loader))
    assert isinstance(padded, PaddedTargets) and not report.skipped
    assert pad_targets(padded) is padded  # already padded: nothing to do on the CPU
    # the same seeded augmentation, sample by sample
    per_image = [torch.as_tensor(loader.dataset[index][1], dtype=torch.float32) for index in indices[:4]]
    counts = [len(t) for t in per_image]
    assert sum(counts) > 20 and len(set(counts)) > 1  # faces, and different counts per image
    assert padded.targets.shape == (4, max(counts), 15) and padded.valid.sum(1).tolist() == counts
    for b, faces in enumerate(per_image):
        assert torch.equal(padded.targets[b, :counts[b]], faces)
        assert not padded.targets[b, counts[b]:].any() and not padded.valid[b, counts[b]:].any()

    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=True)).train()
    outputs = model(images_to_network_input(images))
    priors = prior_boxes((args.im_size, args.im_size), model.config.num_anchor)
    from_padded = MultiBoxLoss(model.config)(model, outputs, priors, padded)
    from_list = MultiBoxLoss(model.config)(model, outputs, priors, per_image)
    assert float(from_padded["num_pos"]) > 0
    for key, value in from_list.items():
        torch.testing.assert_close(from_padded[key], value, msg=key)


class _KeptBatchesProbe:
    """TrainBatchCollate, reporting with each batch how many image batches its process keeps and
    whether the newest kept one is this batch's images."""

    def __init__(self, keep: int) -> None:
        self.collate = train_data.TrainBatchCollate(keep=keep)

    def __call__(self, batch):
        images, targets, report = self.collate(batch)
        recent = self.collate._recent
        return images, len(recent), bool(recent) and recent[-1] is images


@pytest.mark.parametrize("workers", [0, 1])
def test_training_collate_keeps_the_last_image_batches_in_workers_only(workers):
    """A worker keeps its last `keep` image batches (so that it, not the training process, unmaps
    their shared memory); the training process itself (--workers 0) keeps nothing."""
    import numpy as np
    from torch.utils.data import DataLoader

    samples = [(np.full((8, 8, 3), i, np.uint8), np.zeros((1, 15), np.float32), train_data.LoadReport())
               for i in range(10)]
    loader = DataLoader(samples, batch_size=2, num_workers=workers, collate_fn=_KeptBatchesProbe(keep=3))
    batches = list(loader)
    assert [int(images[0, 0, 0, 0]) for images, _, _ in batches] == [0, 2, 4, 6, 8]
    if workers:
        assert [kept for _, kept, _ in batches] == [1, 2, 3, 3, 3]
        assert all(newest for _, _, newest in batches)
    else:
        assert [kept for _, kept, _ in batches] == [0] * 5


def _shared_memory_free(monkeypatch, free_bytes: int) -> None:
    """Make utils.train_data see ``free_bytes`` free in any folder's file system."""
    monkeypatch.setattr(train_data.shutil, "disk_usage", lambda folder: SimpleNamespace(total=free_bytes, used=0,
                                                                                free=free_bytes))


def test_shared_memory_plan_keeps_batches_when_they_fit_and_fails_when_not_even_the_prefetch_fits(
        tmp_path, monkeypatch):
    args = SimpleNamespace(workers=3, batch_size=2, im_size=100)
    batch = 2 * 3 * 100 * 100
    _shared_memory_free(monkeypatch, 3 * train_data.TRAIN_KEPT_BATCHES * batch)
    assert train_data.shared_memory_keep(args, folder=str(tmp_path)) == train_data.TRAIN_KEPT_BATCHES
    with pytest.raises(tu.TrainingSetupError, match=r"has 1 MiB free, but 2 processes x --workers 3 x 5 batches "
                                                     r"of 0.057 MiB \(--batch_size 2 at --im_size 100\) need 1.7 MiB"):
        train_data.shared_memory_keep(args, processes_on_node=2, folder=str(tmp_path))  # the two share the folder
    _shared_memory_free(monkeypatch, 3 * train_data.TRAIN_KEPT_BATCHES * batch - 1)
    assert train_data.shared_memory_keep(args, folder=str(tmp_path)) == 0
    _shared_memory_free(monkeypatch, 3 * (train_data.TRAIN_PREFETCH_FACTOR + 1) * batch - 1)
    with pytest.raises(tu.TrainingSetupError, match=r"at most 2 fit\).*\(Docker: --shm-size=2g\)$"):
        train_data.shared_memory_keep(args, folder=str(tmp_path))
    _shared_memory_free(monkeypatch, 1000)
    with pytest.raises(tu.TrainingSetupError, match="use --workers 0 .* or a smaller --batch_size or --im_size"):
        train_data.shared_memory_keep(args, folder=str(tmp_path))
    # no workers, or no such folder (not Linux): nothing to check
    assert train_data.shared_memory_keep(SimpleNamespace(workers=0, batch_size=2, im_size=100), folder=str(tmp_path)) \
        == train_data.TRAIN_KEPT_BATCHES
    assert train_data.shared_memory_keep(args, folder=str(tmp_path / "absent")) == train_data.TRAIN_KEPT_BATCHES


def test_training_fails_fast_with_one_line_when_shared_memory_is_too_small(widerface_sample, tmp_path,
                                                                           monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_data, "SHARED_MEMORY_DIR", str(tmp_path))
    _shared_memory_free(monkeypatch, 2 ** 19)
    assert train.main(_run_args(widerface_sample, "noshm", "--workers", "2", "--max_iters", "1")) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"train.py: error: {tmp_path} has 0.5 MiB free, but --workers 2 x 5 batches"), message
    assert not (tmp_path / "experiments/noshm/ckpt/last.pth").exists()
    # room for the prefetched batches only: the run trains, the workers keep nothing, the log says so
    batch = 2 * 3 * 128 * 128
    _shared_memory_free(monkeypatch, 2 * (train_data.TRAIN_PREFETCH_FACTOR + 1) * batch)
    assert train.main(_run_args(widerface_sample, "tightshm", "--workers", "2", "--max_iters", "1")) == 0
    assert "note: little room in" in (tmp_path / "experiments/tightshm/log/logs.txt").read_text()


def _run_args(root: Path, name: str, *extra: str) -> list[str]:
    return ["--dataset", str(root), "--train_split", "val", "--experiment_name", name,
            "--network", "mobilenet0.25", "--pretrained", "false", "--cascade", "true", "--im_size", "128",
            "--batch_size", "2", "--workers", "0", "--eval_every", "0", "--warmup_epochs", "0.5",
            "--device", "cpu", "--log_every", "1", *extra]


def test_resume_reproduces_an_uninterrupted_run(widerface_sample, tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    common = ("--deterministic", "true", "--epochs", "3", "--lr", "0.005")
    summary = train.run(_run_args(widerface_sample, "full", *common, "--max_iters", "7"))
    assert summary["step"] == 7
    train.run(_run_args(widerface_sample, "part", *common, "--max_iters", "3"))
    first = torch.load(tmp_path / "experiments/part/ckpt/last.pth", weights_only=True)
    assert first["step"] == 3 and first["epoch"] == 0 and first["iters_per_epoch"] == 5
    assert {"optimizer", "scheduler", "scaler", "rng_state", "best_metric", "model_config"} <= set(first)
    # only the resume flags: the other options come from the checkpoint; one DataLoader worker
    # process instead of none must not change anything either
    train.run(["--resume", "experiments/part/ckpt/last.pth", "--max_iters", "7", "--workers", "1",
                "--device", "cpu"])
    full = torch.load(tmp_path / "experiments/full/ckpt/last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "experiments/part/ckpt/last.pth", weights_only=True)
    assert resumed["step"] == full["step"] == 7
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, state in full["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert full["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == 7
    log = (tmp_path / "experiments/part/log/logs.txt").read_text()
    assert "resumed from" in log
    shares = [int(m) for m in re.findall(r"data wait (\d+)%", log)]  # one per logged iteration
    assert len(shares) == 7 and all(0 <= share <= 100 for share in shares)
    assert list((tmp_path / "experiments/part/log").glob("events.out.tfevents.*"))


def test_resume_applies_changed_schedule_options_and_converts_the_step_for_a_new_batch_size(
        widerface_sample, tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    train.run(_run_args(widerface_sample, "run", "--epochs", "2", "--lr", "0.005", "--max_iters", "3"))
    # a new batch size: step 3 of 5 per epoch is step 6 of 10 per epoch, and the new options apply
    train.run(["--resume", "experiments/run/ckpt/last.pth", "--batch_size", "1", "--max_iters", "8",
               "--device", "cpu", "--seed", "5"])
    state = torch.load(tmp_path / "experiments/run/ckpt/last.pth", weights_only=True)
    assert state["step"] == 8 and state["iters_per_epoch"] == 10 and state["scheduler"]["last_epoch"] == 8
    log = (tmp_path / "experiments/run/log/logs.txt").read_text()
    assert "step 3 of the checkpoint is step 6 here" in log
    assert "--seed ignored when resuming (the run keeps its seed 42 " in log
    # extending the finished run: more epochs, another schedule and learning rate, from step 20 on
    train.run(["--resume", "experiments/run/ckpt/last.pth", "--max_iters", "0", "--device", "cpu"])
    train.run(["--resume", "experiments/run/ckpt/last.pth", "--epochs", "4", "--lr", "0.01",
               "--lr_schedule", "cosine", "--max_iters", "24", "--device", "cpu", "--landmark_loss", "false",
               "--workers", "1", "--log_every", "2", "--dataset", f"{widerface_sample}/"])
    state = torch.load(tmp_path / "experiments/run/ckpt/last.pth", weights_only=True)
    schedule = lr_schedule.LRSchedule("cosine", total_iters=40, warmup_iters=round(0.5 * 10))
    assert state["step"] == 24 and state["scheduler"]["base_lrs"] == [0.01]
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * schedule(24))
    log = (tmp_path / "experiments/run/log/logs.txt").read_text()
    assert "differ from the checkpoint's: --lr 0.005 -> 0.01, --lr_schedule step -> cosine, --epochs 2 -> 4;" in log
    assert log.count("differ from the checkpoint's") == 1  # a new batch size alone changes no option
    # the run's other options too (not --workers, --max_iters or --device, the session's, nor --log_every, nor
    # the same dataset folder written another way)
    assert log.count("resuming with other options than the checkpoint's") == 1
    assert "resuming with other options than the checkpoint's: --landmark_loss true -> false (from step 20 on)" in log


def test_options_a_resume_ignores_are_not_recorded_and_a_finished_run_trains_nothing(widerface_sample, tmp_path,
                                                                                     monkeypatch):
    """``--network``/``--cascade``/``--seed``/``--init_weights`` given with ``--resume`` are ignored,
    and the checkpoint and the logged options keep the run's own values (a later resume does not
    report them again); a resume of a run at the end of its schedule trains and saves nothing."""
    import json

    import train

    monkeypatch.chdir(tmp_path)
    train.run(_run_args(widerface_sample, "run", "--epochs", "2", "--max_iters", "2"))
    last = tmp_path / "experiments/run/ckpt/last.pth"
    train.run(["--resume", str(last), "--max_iters", "3", "--device", "cpu", "--network", "resnet50",
               "--cascade", "false", "--seed", "7", "--init_weights", "mobilenet0.25"])
    state = torch.load(last, weights_only=True)
    assert state["step"] == 3 and state["model_config"]["network"] == "mobilenet0.25"
    assert (state["args"]["network"], state["args"]["cascade"], state["args"]["seed"],
            state["args"]["init_weights"]) == ("mobilenet0.25", True, 42, None)
    log = (tmp_path / "experiments/run/log/logs.txt").read_text()
    logged = [json.loads(line.split("options: ", 1)[1]) for line in log.splitlines() if " options: " in line]
    assert len(logged) == 2 and logged[-1]["network"] == "mobilenet0.25" and logged[-1]["seed"] == 42
    assert log.count("ignoring {") == 1 and "'network': 'resnet50'" in log

    train.run(["--resume", str(last), "--device", "cpu"])  # on to the end of its 2 epochs (10 steps)
    log = (tmp_path / "experiments/run/log/logs.txt").read_text()
    assert log.count("ignoring {") == 1 and torch.load(last, weights_only=True)["step"] == 10
    finished = last.read_bytes()
    events = sorted((tmp_path / "experiments/run/log").glob("events.out.tfevents.*"))
    summary = train.run(["--resume", str(last), "--device", "cpu"])
    assert summary["step"] == 10 and summary["loss_history"] == []
    assert last.read_bytes() == finished
    assert sorted((tmp_path / "experiments/run/log").glob("events.out.tfevents.*")) == events
    log_lines = (tmp_path / "experiments/run/log/logs.txt").read_text().strip().splitlines()
    assert log_lines[-1].endswith(f"nothing to train: {last} is at step 10, at the end of its 2 epochs; give a "
                                  "larger --epochs to train on"), log_lines[-1]
    train.run(["--resume", str(last), "--device", "cpu", "--epochs", "3", "--max_iters", "4"])
    assert last.read_bytes() == finished
    log_lines = (tmp_path / "experiments/run/log/logs.txt").read_text().strip().splitlines()
    assert log_lines[-1].endswith("is at step 10, past --max_iters 4; give a larger --max_iters, or leave it out "
                                  "for the whole schedule"), log_lines[-1]
    # another batch size: the step it names is the converted one, and the conversion is logged before it
    train.run(["--resume", str(last), "--device", "cpu", "--batch_size", "1"])
    assert last.read_bytes() == finished
    log_lines = (tmp_path / "experiments/run/log/logs.txt").read_text().strip().splitlines()
    assert "step 10 of the checkpoint is step 20 here" in log_lines[-2], log_lines[-2]
    assert log_lines[-1].endswith("is at step 20, at the end of its 2 epochs; give a larger --epochs to train on")


def test_resume_without_experiment_name_continues_in_the_checkpoints_folder(widerface_sample, tmp_path, monkeypatch,
                                                                             capsys):
    """From another working directory, ``--resume <run>/ckpt/last.pth`` alone continues <run>
    (not a new experiments/<name> below the working directory); a relative --dataset taken from
    the checkpoint that does not resolve there is named as such."""
    import train

    monkeypatch.chdir(tmp_path)
    train.run(_run_args(widerface_sample, "run", "--epochs", "2", "--max_iters", "2"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train.run(["--resume", str(tmp_path / "experiments/run/ckpt/last.pth"), "--max_iters", "3", "--device", "cpu"])
    assert torch.load(tmp_path / "experiments/run/ckpt/last.pth", weights_only=True)["step"] == 3
    assert not (elsewhere / "experiments").exists()
    state = torch.load(tmp_path / "experiments/run/ckpt/last.pth", weights_only=True)
    state["args"]["dataset"] = "relative/widerface"
    (elsewhere / "moved/ckpt").mkdir(parents=True)
    torch.save(state, elsewhere / "moved/ckpt/last.pth")
    assert train.main(["--resume", "moved/ckpt/last.pth", "--device", "cpu"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: training data: dataset folder not found: relative/widerface"), message
    assert message.endswith("(--dataset relative/widerface was taken from the checkpoint, relative to the folder "
                            "that run started in: give --dataset)"), message
    # the hint is for a relative dataset path that is not found, not for every data error of a resume
    assert train.main(["--resume", str(tmp_path / "experiments/run/ckpt/last.pth"), "--batch_size", "64",
                       "--device", "cpu"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fewer than --batch_size 64" in message and "taken from the checkpoint" not in message, message


@pytest.mark.parametrize("signal_name, status, said", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_stops_at_the_step_boundary_saves_last_and_the_run_resumes(
        signal_name, status, said, widerface_sample, tmp_path, monkeypatch, capfd, after_training_step):
    """SIGTERM is what a batch scheduler (SLURM's time limit, pre-emption) or ``docker stop`` sends,
    to every process of the job: it ended the run at once, losing the steps since the last save."""
    import multiprocessing
    import signal

    import train

    monkeypatch.chdir(tmp_path)
    number = getattr(signal, signal_name)
    workers_alive = []

    def stop():  # the worker gets it too
        workers = multiprocessing.active_children()
        assert workers
        for worker in workers:
            os.kill(worker.pid, number)
        for worker in workers:  # one that did not ignore it would end within this wait
            worker.join(timeout=2.0)
        workers_alive.append(all(worker.is_alive() for worker in workers))  # they ignore it
        signal.raise_signal(number)

    restore = after_training_step(3, stop)
    before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    code = train.main(_run_args(widerface_sample, "stop", "--epochs", "2", "--workers", "1"))
    assert code == status and {n: signal.getsignal(n) for n in before} == before
    err = capfd.readouterr().err
    assert err.count("stopping after this step") == 1, err  # not from the worker too
    assert f"train.py: {said}: stopping after this step" in err
    state = torch.load(tmp_path / "experiments/stop/ckpt/last.pth", weights_only=True)
    assert state["step"] == 3 and workers_alive == [True]
    log = (tmp_path / "experiments/stop/log/logs.txt").read_text()
    assert f"interrupted ({said}) at step 3: continue with --resume experiments/stop/ckpt/last.pth" in log
    restore()
    summary = train.run(["--resume", "experiments/stop/ckpt/last.pth", "--device", "cpu"])
    assert summary["step"] == 10


def test_a_second_ctrl_c_stops_at_once_and_logs_says_what_last_pth_holds(widerface_sample, tmp_path, monkeypatch,
                                                                           capfd, after_training_step):
    """Stopped at once (a second Ctrl-C here; Ctrl-C or SIGTERM under torchrun, whose processes cannot agree on a
    step to stop at), logs.txt ended without a word about it."""
    import signal

    import train

    monkeypatch.chdir(tmp_path)

    def twice():
        signal.raise_signal(signal.SIGINT)  # the request
        signal.raise_signal(signal.SIGINT)  # at once: KeyboardInterrupt here, in step 7

    after_training_step(7, twice)
    assert train.main(_run_args(widerface_sample, "stop", "--epochs", "2", "--save_every", "3")) == 130
    log = (tmp_path / "experiments/stop/log/logs.txt").read_text().splitlines()
    assert log[-1].endswith("interrupted (Ctrl-C) after step 6, stopped at once; last.pth holds step 6: continue "
                            "with --resume experiments/stop/ckpt/last.pth"), log[-3:]
    assert torch.load(tmp_path / "experiments/stop/ckpt/last.pth", weights_only=True)["step"] == 6


def test_warmup_notes_say_when_the_warm_up_swallows_part_of_the_schedule():
    schedule = [lr_schedule.LRSchedule("cosine", total_iters=20, warmup_iters=50)(step) for step in range(20)]
    assert schedule[-1] == pytest.approx(0.4)  # what the note says: 2 of 5 warm-up epochs run
    assert lr_schedule.warmup_notes(5, 2, "cosine") == [
        "note: the warm-up (--warmup_epochs 5) lasts the whole 2-epoch run: the lr ends at 40% of --lr; the cosine "
        "decay never starts"]
    assert lr_schedule.warmup_notes(1, 1, "step", [1]) == [
        "note: the warm-up (--warmup_epochs 1) lasts the whole 1-epoch run: the lr reaches --lr only at the last step"]
    step = lr_schedule.LRSchedule("step", total_iters=100, warmup_iters=90, milestones=[80, 90])
    assert step(89) == 1.0 and step(90) == pytest.approx(0.01)  # up to --lr inside the decayed phase, then down
    assert lr_schedule.warmup_notes(9, 10, "step", [8, 9]) == [
        "note: decay epoch(s) [8] fall inside the 9-epoch warm-up (--warmup_epochs): the lr rises to --lr until the "
        "warm-up ends, then drops by them at once"]
    assert lr_schedule.warmup_notes(1, 250, "step", [190, 220]) == lr_schedule.warmup_notes(0, 1, "step") == []
    assert lr_schedule.warmup_notes(9, 10, "cosine", [8, 9]) == []


def test_decay_epoch_notes_name_late_and_coinciding_epochs_and_where_they_come_from():
    assert lr_schedule.decay_epoch_notes([190, 220], 250, given=False) == []
    assert lr_schedule.decay_epoch_notes([3, 3], 5, given=True) == [
        "note: decay epochs [3, 3] coincide (--lr_steps): the lr drops by more than x0.1 at once"]
    assert lr_schedule.decay_epoch_notes([2, 300], 250, given=True) == [
        "note: decay epoch(s) [300] (--lr_steps) fall at or after the end of the 250-epoch run: never applied"]
    late, same = lr_schedule.decay_epoch_notes([2, 2, 4], 4, given=False)
    assert "[4] (the recipe's, scaled to 4 epochs; --lr_steps sets them)" in late and "[2, 2] coincide" in same


def test_log_gives_the_run_eta_and_notes_a_cpu_fallback_and_late_decay_epochs(widerface_sample, tmp_path,
                                                                                     monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a for a in _run_args(widerface_sample, "notes", "--epochs", "2", "--max_iters", "3", "--gpu_num", "0")
            if a not in ("--device", "cpu")]
    train.run(argv)
    log = (tmp_path / "experiments/notes/log/logs.txt").read_text()
    assert "--gpu_num 0 given, but CUDA is not available: training on the CPU" in log
    # mobilenet0.25's 190 and 220 of 250 scaled to 2 epochs: both at the end of the run
    assert ("decay epoch(s) [2, 2] (the recipe's, scaled to 2 epochs; --lr_steps sets them) fall at or after the "
            "end of the 2-epoch run: never applied") in log
    etas = re.findall(r"step (\d) lr .* run ETA (\d\d):(\d\d)\)", log)
    assert [int(step) for step, _, _ in etas] == [1, 2, 3] and etas[-1][1:] == ("00", "00")
    assert re.search(r"finished at step 3 of \d+ \(--max_iters; --resume experiments/notes/ckpt/last.pth continues "
                     r"the schedule\) after \d\d:\d\d;", log)
    assert tu._format_duration(90061.4) == "1d 01:01:01" and tu._format_duration(3599.6) == "01:00:00"


def test_background_images_train_only_with_empty_image_negatives(widerface_sample, tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "background"
    (root / "train").mkdir(parents=True)
    (root / "train/images").symlink_to(widerface_sample / "val/images")
    blocks = (widerface_sample / "val/label.txt").read_text().split("# ")[1:6]
    # five images, one with its faces (a set without any face cannot train): the one that the first epoch
    # leaves out (5 images, 2 batches of 2), so that both steps see background images only
    left_out = train_data.ResumableSampler(len(blocks), seed=7).indices()[-1]
    (root / "train/label.txt").write_text("".join(
        "# " + (block if index == left_out else block.splitlines()[0] + "\n") for index, block in enumerate(blocks)))
    losses = {}
    for negatives in (0, 16):
        summary = train.run(_run_args(root, f"neg{negatives}", "--train_split", "train", "--max_iters", "2",
                                      "--seed", "7", "--empty_image_negatives", str(negatives)))
        losses[negatives] = [loss for _, loss in summary["loss_history"]]
    assert len(losses[0]) == len(losses[16]) == 2
    assert losses[0] == [0.0, 0.0]  # the public rule: no positives, no mined negatives, no loss
    assert all(loss > 0 for loss in losses[16])


def _optimizer_context(sizes: tuple[int, ...], momentum: float, fused: bool | None) -> SimpleNamespace:
    """The parts of a TrainContext that load_training_state touches, for parameters of ``sizes``."""
    params = [torch.nn.Parameter(torch.ones(size)) for size in sizes]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=momentum, fused=fused)
    return SimpleNamespace(params=params, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu"), iters_per_epoch=4,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))


def _checkpoint_of(context: SimpleNamespace) -> dict:
    return {"optimizer": context.optimizer.state_dict(), "scheduler": context.scheduler.state_dict(),
            "scaler": context.scaler.state_dict(), "step": 1}


def test_resume_keeps_the_optimizer_kernel_of_this_run():
    # a checkpoint of an unfused run (e.g. on the CPU) resumed where the step is fused (CUDA):
    # load_state_dict would bring back fused=None, and a GradScaler then passes fused-only
    # arguments to the plain step ("Expected grad_scale and found_inf to be None")
    saved = _optimizer_context((3,), 0.9, fused=None)
    saved.params[0].sum().backward()
    saved.optimizer.step()
    resumed = _optimizer_context((3,), 0.9, fused=True)
    train_state.load_training_state(resumed, _checkpoint_of(saved))
    assert resumed.optimizer.param_groups[0]["fused"] is True
    assert resumed.global_step == 1
    torch.testing.assert_close(resumed.optimizer.state[resumed.params[0]]["momentum_buffer"],
                               saved.optimizer.state[saved.params[0]]["momentum_buffer"])
    resumed.scaler.scale((resumed.params[0] * 2).sum()).backward()
    resumed.scaler.step(resumed.optimizer)  # fp16-style scaled step on the fused kernel
    resumed.scaler.update()


def test_resume_into_a_fused_step_gives_every_parameter_a_momentum_buffer():
    """A checkpoint without momentum buffers (a --momentum 0 run; parameters that never had a
    gradient) resumed into fused SGD with momentum: load_state_dict drops the zeroed buffers that
    build_optimizer made, and the fused kernel would take its first-step path again (unwritten
    buffers after a step the scaler skips) or fail on a mix of buffers and none."""
    for momentum, graded in ((0.0, 2), (0.9, 1)):  # no buffers at all; a buffer for the first parameter only
        saved = _optimizer_context((3, 2), momentum, fused=None)
        sum(p.sum() for p in saved.params[:graded]).backward()
        saved.optimizer.step()
        resumed = _optimizer_context((3, 2), 0.9, fused=True)
        train_state.load_training_state(resumed, _checkpoint_of(saved))
        buffers = [resumed.optimizer.state[p].get("momentum_buffer") for p in resumed.params]
        assert all(buffer is not None for buffer in buffers), momentum
        for buffer, param in zip(buffers, saved.params):
            want = saved.optimizer.state[param].get("momentum_buffer")
            torch.testing.assert_close(buffer, torch.zeros_like(param) if want is None else want)
        before = [buffer.clone() for buffer in buffers]
        resumed.scaler.scale(sum((p * 2).sum() for p in resumed.params)).backward()
        resumed.params[0].grad[0] = float("inf")
        resumed.scaler.step(resumed.optimizer)  # skipped: the buffers stay as they were
        resumed.scaler.update()
        after = [resumed.optimizer.state[p]["momentum_buffer"] for p in resumed.params]
        assert all(torch.equal(a, b) for a, b in zip(after, before)), momentum


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
def test_wrap_model_channels_last_with_and_without_compile(compile_backend):
    """The CUDA set-up (channels_last) on the CPU: a local import in wrap_model once broke it
    for every eager CUDA run (UnboundLocalError on `torch`), which no CPU test reached."""
    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))
    wrapped = tu.wrap_model(model, distributed.DistInfo(), channels_last=True, compile_backend=compile_backend)
    assert tu.unwrap(wrapped) is model
    first_conv = next(p for p in model.parameters() if p.dim() == 4)  # 3 -> 8 channels, 3x3
    assert not first_conv.is_contiguous() and first_conv.is_contiguous(memory_format=torch.channels_last)
    assert (wrapped is model) == (compile_backend is None)


def test_compiled_training_follows_the_eager_run_and_saves_plain_weights(widerface_sample, tmp_path, monkeypatch):
    """--compile: the same steps as eager (aot_eager: torch.compile's tracing and autograd
    without inductor's kernels, so the wiring is tested in seconds), a checkpoint with the
    model's own names, a resume without compile; saving and evaluation get the eager model."""
    from torch._dynamo.utils import counters

    import train

    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))
    compiled_model = tu.wrap_model(model, distributed.DistInfo(), compile_backend="aot_eager")
    assert compiled_model is not model and tu.unwrap(compiled_model) is model
    monkeypatch.chdir(tmp_path)
    common = ("--deterministic", "true", "--epochs", "3", "--lr", "0.005", "--max_iters", "3")
    eager_run = train.run(_run_args(widerface_sample, "eager", *common))
    counters.clear()
    compiled_run = train.run(_run_args(widerface_sample, "compiled", *common, "--compile", "aot_eager"))
    assert counters["stats"]["unique_graphs"] >= 1  # the forward passes did go through torch.compile
    eager_losses = [loss for _, loss in eager_run["loss_history"]]
    assert [loss for _, loss in compiled_run["loss_history"]] == pytest.approx(eager_losses, rel=1e-4)
    eager = torch.load(tmp_path / "experiments/eager/ckpt/last.pth", weights_only=True)
    compiled = torch.load(tmp_path / "experiments/compiled/ckpt/last.pth", weights_only=True)
    assert list(compiled["model"]) == list(eager["model"])  # the model's own names, no _orig_mod.
    for key, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    log = (tmp_path / "experiments/compiled/log/logs.txt").read_text()
    assert "torch.compile (backend aot_eager)" in log
    train.run(["--resume", "experiments/compiled/ckpt/last.pth", "--max_iters", "4", "--compile", "false",
               "--device", "cpu"])
    assert torch.load(tmp_path / "experiments/compiled/ckpt/last.pth", weights_only=True)["step"] == 4


def test_unknown_compile_backend_fails_with_one_line(widerface_sample, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    assert train.main(_run_args(widerface_sample, "nobackend", "--compile", "no_such_backend")) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: --compile no_such_backend: not a torch.compile backend"), message
    assert "inductor" in message
    assert not (tmp_path / "experiments/nobackend/ckpt/last.pth").exists()


def test_starting_a_run_again_does_not_overwrite_it(widerface_sample, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    train.run(_run_args(widerface_sample, "once", "--max_iters", "1"))
    before = (tmp_path / "experiments/once/ckpt/last.pth").read_bytes()
    assert train.main(_run_args(widerface_sample, "once", "--max_iters", "2")) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already holds a run" in message and "--resume experiments/once/ckpt/last.pth" in message, message
    assert (tmp_path / "experiments/once/ckpt/last.pth").read_bytes() == before


def test_a_step_saved_by_save_every_at_an_epoch_end_is_saved_once(widerface_sample, tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    train.run(_run_args(widerface_sample, "saves", "--epochs", "1", "--save_every", "5"))  # 5 steps per epoch
    log = (tmp_path / "experiments/saves/log/logs.txt").read_text()
    assert re.findall(r"saved checkpoint \S+ \(.*\)", log) == [
        "saved checkpoint experiments/saves/ckpt/last.pth (epoch 1/1 iter 5/5, step 5)"], log


@pytest.mark.parametrize("first_bad_step,options,steps,kept", [
    (4, ("--save_every", "2"), "at step 4", "the last checkpoint saved before that, experiments/nan/ckpt/last.pth "
                                            "(step 2), was kept"),
    (3, ("--log_every", "5"), "between step 1 and step 5", "no checkpoint had been written yet"),
], ids=["one-step-window", "five-step-window"])
def test_nan_loss_stops_and_names_the_checkpoint_saved_before_it(widerface_sample, tmp_path, monkeypatch, capsys,
                                                                 first_bad_step, options, steps, kept):
    import train

    monkeypatch.chdir(tmp_path)
    original = MultiBoxLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= first_bad_step:
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(MultiBoxLoss, "forward", poisoned)
    assert train.main(_run_args(widerface_sample, "nan", *options, "--max_iters", "10")) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    # the checkpoint only had a finite loss: its weights may already be diverging, so never "good"
    assert message.startswith(f"train.py: error: loss became NaN/inf {steps} (epoch 1); training stopped and "
                              f"{kept}. Try a lower --lr, "), message
    assert "good" not in message
    assert message in (tmp_path / "experiments/nan/log/logs.txt").read_text().replace("error: ", "train.py: error: ")
    last = tmp_path / "experiments/nan/ckpt/last.pth"
    if "(step 2)" in kept:
        saved = torch.load(last, weights_only=True)
        assert saved["step"] == 2
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    else:
        assert not last.exists()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_infinite_loss_stops_like_a_nan_loss(widerface_sample, tmp_path, monkeypatch, capsys, bad):
    """An overflowing loss (inf, not NaN) is just as diverged: the run stops at that step with the
    same one-line error instead of training on with infinite gradients."""
    import train

    monkeypatch.chdir(tmp_path)
    original = MultiBoxLoss.forward
    calls = {"n": 0}

    def overflowing(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:
            losses["total"] = losses["total"] + bad
        return losses

    monkeypatch.setattr(MultiBoxLoss, "forward", overflowing)
    assert train.main(_run_args(widerface_sample, "inf", "--max_iters", "4")) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: loss became NaN/inf at step 2 (epoch 1); training stopped and no "
                              "checkpoint had been written yet. Try a lower --lr, "), message
    assert calls["n"] == 2 and not (tmp_path / "experiments/inf/ckpt/last.pth").exists()


def test_resuming_an_earlier_checkpoint_of_a_run_does_not_overwrite_its_later_last_pth(widerface_sample, tmp_path,
                                                                                        monkeypatch, capsys):
    import shutil

    import train

    monkeypatch.chdir(tmp_path)
    train.run(_run_args(widerface_sample, "bo", "--epochs", "2", "--max_iters", "3"))
    ckpt = tmp_path / "experiments/bo/ckpt"
    shutil.copy(ckpt / "last.pth", ckpt / "best.pth")  # e.g. the best epoch, at step 3
    train.run(["--resume", "experiments/bo/ckpt/last.pth", "--max_iters", "8", "--device", "cpu"])
    assert sorted(path.name for path in ckpt.iterdir()) == ["best.pth", "last.pth"]  # no probe file left
    later = (ckpt / "last.pth").read_bytes()
    assert train.main(["--resume", "experiments/bo/ckpt/best.pth", "--device", "cpu"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: experiments/bo/ckpt/last.pth is at step 8, ahead of the step-3 "
                              "checkpoint being resumed (experiments/bo/ckpt/best.pth): resuming would overwrite "
                              "it;"), message
    assert "new --experiment_name" in message
    assert (ckpt / "last.pth").read_bytes() == later
    # the start-up line and the save lines count epochs as the progress lines do (1-based)
    log = (tmp_path / "experiments/bo/log/logs.txt").read_text()
    assert "amp off (CPU), seed 42" in log  # --amp true (the default) has no effect on the CPU
    assert "saved checkpoint experiments/bo/ckpt/last.pth (epoch 1/2 iter 3/5, step 3)" in log
    assert "epoch 2/2 iter 3/5 step 8 lr" in log
    assert "saved checkpoint experiments/bo/ckpt/last.pth (epoch 2/2 iter 3/5, step 8)" in log
    assert torch.load(ckpt / "last.pth", weights_only=True)["epoch"] == 1  # stored: epochs completed


def test_resuming_into_another_run_folder_does_not_overwrite_that_run(widerface_sample, tmp_path, monkeypatch,
                                                                       capsys):
    import shutil

    import train

    monkeypatch.chdir(tmp_path)
    train.run(_run_args(widerface_sample, "A", "--max_iters", "2"))
    train.run(_run_args(widerface_sample, "B", "--max_iters", "1"))
    run_b, run_a = (tmp_path / f"experiments/{name}/ckpt/last.pth" for name in "BA")
    before_b, before_a = run_b.read_bytes(), run_a.read_bytes()
    assert train.main(["--resume", "experiments/A/ckpt/last.pth", "--experiment_name", "B", "--device", "cpu"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: experiments/B already holds a run (experiments/B/ckpt/last.pth) and "
                              "--resume experiments/A/ckpt/last.pth is not one of its checkpoints"), message
    # a copy resumed without --experiment_name takes the run's name from the checkpoint: A, which it is not part of
    shutil.copy(run_a, tmp_path / "copy.pth")
    assert train.main(["--resume", "copy.pth", "--device", "cpu"]) == 1
    assert "experiments/A already holds a run" in capsys.readouterr().err
    assert run_b.read_bytes() == before_b and run_a.read_bytes() == before_a
    # branching off into a new name works, and leaves A as it was
    summary = train.run(["--resume", "experiments/A/ckpt/last.pth", "--experiment_name", "C", "--max_iters", "3",
                         "--device", "cpu"])
    assert summary["step"] == 3 and summary["last"] == "experiments/C/ckpt/last.pth"
    assert run_a.read_bytes() == before_a


def test_an_unusable_run_folder_stops_at_start_up_with_one_line(widerface_sample, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments/u2").mkdir(parents=True)
    (tmp_path / "experiments/u2/ckpt").write_text("a file where the checkpoint folder belongs\n")
    epochs = []
    monkeypatch.setattr(tu, "train_one_epoch", lambda *args, **kwargs: epochs.append(1))
    assert train.main(_run_args(widerface_sample, "u2", "--max_iters", "1")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("train.py: error: cannot write the run's files to experiments/u2/ckpt: it "
                                            "exists and is not a folder (choose another --experiment_name or fix "
                                            "that path)")
    assert epochs == []  # before any training


def test_finetune_run_evaluates_and_writes_best(widerface_sample, widerface_gt_dir, mobilenet_weights,
                                                tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", str(widerface_sample), "--train_split", "val", "--experiment_name", "ft",
            "--init_weights", str(mobilenet_weights), "--im_size", "320", "--batch_size", "5",
            "--workers", "0", "--epochs", "1", "--lr", "1e-5", "--warmup_epochs", "0", "--eval_every", "1",
            "--val_dataset", str(widerface_sample), "--gt_dir", str(widerface_gt_dir), "--device", "cpu"]
    summary = train.run(argv)
    assert summary["step"] == 2 and summary["best"] is not None
    best = torch.load(summary["best"], weights_only=True)
    assert best["best_metric"] == pytest.approx(summary["metrics"]["hard"]) and best["best_epoch"] == 1
    assert summary["metrics"]["easy"] > 0.6 and summary["metrics"]["hard"] > 0.4, summary["metrics"]
    assert "val AP after epoch 1" in (tmp_path / "experiments/ft/log/logs.txt").read_text()


# train.py, with a check at the moment the process group is destroyed: how many DDP wrappers are
# still alive (their reducer must not be the one to free the group: see train_utils.train)
DDP_RUN = """
import gc, pathlib, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import train

destroy = dist.destroy_process_group

def checked(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    pathlib.Path(f"ddp_alive_rank{dist.get_rank()}.txt").write_text(str(alive))
    return destroy(*args, **kwargs)

dist.destroy_process_group = checked
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("compile_backend", ["false", "aot_eager"])
def test_two_process_gloo_ddp(widerface_sample, tmp_path, compile_backend):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    (tmp_path / "ddp_run.py").write_text(DDP_RUN)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(tmp_path / "ddp_run.py"),
               *_run_args(widerface_sample, "ddp", "--max_iters", "2", "--compile", compile_backend)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # both ranks freed their DDP wrapper before destroying the process group
    assert [(tmp_path / f"ddp_alive_rank{r}.txt").read_text() for r in (0, 1)] == ["0", "0"]
    ckpt_dir = tmp_path / "experiments/ddp/ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pth"]
    saved = torch.load(ckpt_dir / "last.pth", weights_only=True)
    assert saved["step"] == 2 and saved["iters_per_epoch"] == 2  # 5 images per process, batch 2
    assert not any(k.startswith("module.") for k in saved["model"])
    log = (tmp_path / "experiments/ddp/log/logs.txt").read_text()
    assert log.count("saved checkpoint") == 1 and "x2 process(es)" in log
    assert ("torch.compile (backend aot_eager)" in log) == (compile_backend == "aot_eager")


def test_recipe_differences_name_the_public_settings():

    default = lr_schedule.recipe_differences(SimpleNamespace(batch_size=16, im_size=640), ModelConfig())
    assert "--batch_size 24" in default and "--im_size 840" in default and "--cascade false" in default
    public_mnet = SimpleNamespace(batch_size=32, im_size=640)
    assert lr_schedule.recipe_differences(public_mnet, ModelConfig(network="mobilenet0.25", cascade=False)) is None
    four_gpus = SimpleNamespace(batch_size=6, im_size=840)  # 4 x 6 = the public global batch of 24
    assert lr_schedule.recipe_differences(four_gpus, ModelConfig(cascade=False), world_size=4) is None
    # a resume keeps the checkpoint's cascade stage whatever --cascade says: no option suggested
    resumed = lr_schedule.recipe_differences(SimpleNamespace(batch_size=24, im_size=840, resume="last.pth"),
                                             ModelConfig())
    assert resumed == ("note: differs from the public ResNet recipe in cascade stage on (the published models "
                       "are single-stage)")


def test_single_process_set_up_makes_the_training_gpu_current(monkeypatch):
    """``--device cuda:1`` or ``--gpu_num 1`` in one process: cuda:1 becomes the current GPU, since
    CUDA-graph capture (``--cuda_graphs``), streams and events work on the current one."""
    current = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert distributed.setup_distributed("cuda:1").device == torch.device("cuda", 1)
    assert distributed.setup_distributed(None, 1).device == torch.device("cuda", 1)
    assert distributed.setup_distributed("cpu").device == torch.device("cpu")
    assert current == [torch.device("cuda", 1)] * 2


def test_cores_per_process_shares_the_node(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert tu.cores_per_process() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun --nproc_per_node=8
    assert tu.cores_per_process() == 2


_DDP_LOSS_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from layers.multibox_loss import MultiBoxLoss
from layers.prior_box import prior_boxes
from models.retinaface import ModelConfig, RetinaFace

dist.init_process_group("gloo")
rank = dist.get_rank()
data = torch.load(sys.argv[1])
model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=True))
model.load_state_dict(data["state"])
model.eval()  # BatchNorm from running statistics: the same per image whatever the split
loss = MultiBoxLoss(model.config)(model, model(data["images"][rank:rank + 1]), prior_boxes((96, 96), 2),
                                  [data["targets"][rank]])["total"]
loss.backward()
grads = []
for param in model.parameters():
    dist.all_reduce(param.grad)  # what DDP does: the mean gradient over the processes
    grads.append(param.grad / dist.get_world_size())
if rank == 0:
    torch.save(grads, sys.argv[2])
dist.destroy_process_group()
"""


def test_distributed_loss_is_normalised_by_the_whole_batch(tmp_path):
    # the public recipe divides by the positives of the whole batch; with one image per process
    # and 3 faces against 1, a per-process division would weight the single face 3x
    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", cascade=True)
    model = RetinaFace(config).eval()
    images = torch.randn(2, 3, 96, 96) * 50
    lone_face = torch.full((1, 15), -1.0)
    lone_face[0, :4] = torch.tensor([30.0, 28.0, 62.0, 66.0])
    targets = [_targets(with_landmarks=True)[0], lone_face]
    torch.save({"state": model.state_dict(), "images": images, "targets": targets}, tmp_path / "data.pt")
    (tmp_path / "ranks.py").write_text(_DDP_LOSS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "ranks.py", "data.pt", "grads.pt"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    distributed = torch.load(tmp_path / "grads.pt")

    def gradients(batches):
        model.zero_grad()
        total = sum(MultiBoxLoss(config)(model, model(images[i]), prior_boxes((96, 96), 2),
                                         [targets[j] for j in range(i.start, i.stop)])["total"]
                    for i in batches) / len(batches)
        total.backward()
        return [p.grad.clone() for p in model.parameters()]

    whole_batch = gradients([slice(0, 2)])
    per_image_mean = gradients([slice(0, 1), slice(1, 2)])  # each image normalised by its own positives
    def relative_error(a, b):
        return max(float((x - y).norm() / y.norm().clamp(min=1e-12)) for x, y in zip(a, b))

    assert relative_error(distributed, whole_batch) < 1e-2  # float noise; a per-process division: 0.8
    assert relative_error(per_image_mean, whole_batch) > 0.05


def test_loss_denominators_floor_the_whole_batchs_count_not_each_processs_share(monkeypatch):
    """The public loss divides by max(positives of the batch, 1). On 2 processes each divides by
    half of that: with 1 landmark positive in the whole batch, 0.5 each (before: the share 0.5 was
    raised to 1, halving that face's landmark gradient against one process)."""
    from layers.multibox_loss import loss_denominators

    assert torch.equal(loss_denominators(torch.tensor([3.0, 0.0])), torch.tensor([3.0, 1.0]))  # one process
    other_process = torch.tensor([2.0, 0.0])  # positives, landmark positives of the other rank

    def all_reduce(counts):
        counts += other_process

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert torch.equal(loss_denominators(torch.tensor([3.0, 1.0])), torch.tensor([2.5, 0.5]))
    other_process = torch.tensor([0.0, 0.0])
    assert torch.equal(loss_denominators(torch.tensor([0.0, 0.0])), torch.tensor([0.5, 0.5]))


def test_two_process_evaluation_shares_the_images_and_equals_one_process(widerface_sample, tmp_path):
    from utils.checkpoint import load_model
    from utils.metric import load_ground_truth

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    args = _run_args(widerface_sample, "ddp_eval", "--max_iters", "2")
    args[args.index("--eval_every") + 1] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO_ROOT / "train.py"), *args]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = torch.load(tmp_path / "experiments/ddp_eval/ckpt/last.pth", weights_only=True)
    assert saved["step"] == 2 and set(saved["metrics"]) == {"easy", "medium", "hard"}
    assert (tmp_path / "experiments/ddp_eval/ckpt/best.pth").is_file()
    gt = load_ground_truth(widerface_sample / "ground_truth")
    alone = tu.evaluate_widerface(load_model(tmp_path / "experiments/ddp_eval/ckpt/last.pth"), widerface_sample,
                                  gt, torch.device("cpu"))
    assert alone == pytest.approx(saved["metrics"], abs=1e-9)


def test_loader_hint_names_the_remedies():
    assert tu.loader_hint(0.1, 2, "workers", 16) is None
    hint = tu.loader_hint(0.45, 2, "workers", 16)
    assert "45%" in hint and "--workers (now 2; 16 CPU cores per process)" in hint and "--augment_on device" in hint
    hint = tu.loader_hint(0.45, 15, "device", 16)
    assert "--workers" not in hint and "--augment_on" not in hint and "storage" in hint


def test_overfit_check_repeats_the_sample_and_keeps_the_trained_weights(widerface_sample, widerface_gt_dir,
                                                                      tmp_path, capsys):
    """tools/overfit_check.py for another network from scratch (how tools/gpu_check.sh gets trained
    ResNet-50 cascade weights): the training split lists the sample --copies times, and --save keeps
    the final checkpoint, the one the last AP point measured."""
    import json

    from tools import overfit_check
    from utils.checkpoint import load_model

    repeated = overfit_check.repeated_sample(widerface_sample, tmp_path / "repeated", 3)
    listed = [line[2:] for line in (repeated / "val/label.txt").read_text().splitlines() if line.startswith("#")]
    original = [line[2:] for line in (widerface_sample / "val/label.txt").read_text().splitlines()
                if line.startswith("#")]
    assert listed == [f"copy{k}/{name}" for k in range(3) for name in original]
    assert all((repeated / "val/images" / name).is_file() for name in listed)
    faces = sum(1 for line in (repeated / "val/label.txt").read_text().splitlines() if line and line[0] != "#")
    assert faces == 3 * 507

    # a two-image data set keeps the two AP evaluations short (a subset of the val ground truth)
    small = tmp_path / "small"
    blocks = (widerface_sample / "val/label.txt").read_text().split("# ")[1:3]
    for block in blocks:
        name = block.splitlines()[0]
        (small / "val/images" / name).parent.mkdir(parents=True, exist_ok=True)
        (small / "val/images" / name).symlink_to(widerface_sample / "val/images" / name)
    (small / "val/label.txt").write_text("".join("# " + block for block in blocks))
    saved = tmp_path / "kept" / "resnet18.pth"
    code = overfit_check.main(["--network", "resnet18", "--cascade", "true", "--copies", "5", "--batch_size", "4",
                               "--im_size", "64", "--iters", "2", "--eval_every", "2", "--min_hard_ap", "0",
                               "--dataset", str(small), "--gt_dir", str(widerface_gt_dir),
                               "--workdir", str(tmp_path / "work"), "--save", str(saved)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"]  # --min_hard_ap 0 asks for nothing: 2 steps need not raise the AP
    assert [p["iteration"] for p in report["curve"]] == [0, 2]
    assert "resnet18 cascade from scratch" in report["check"] and "--pretrained false" in report["train_args"]
    log = (tmp_path / "work/experiments/overfit_check/log/logs.txt").read_text()
    two_image_faces = sum(len(block.splitlines()) - 1 for block in blocks)
    assert f"10 images ({5 * two_image_faces} faces), 2 iterations/epoch of 4" in log  # five copies of two images
    model = load_model(saved)
    assert model.config.network == "resnet18" and model.config.cascade
    trained = torch.load(tmp_path / "work/experiments/overfit_check/ckpt/last.pth", map_location="cpu",
                         weights_only=False)
    assert trained["step"] == 2


# ---------------------------------------------------------------------------------------------
# --cuda_graphs (the capture itself needs CUDA: tests/test_cuda.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["retina", "tina"])  # tina: the IoU head fills StageOutput.iou
def test_graphed_training_network_follows_plain_training(widerface_sample, monkeypatch, version):
    """Everything of GraphedTrainingNetwork but the capture (make_graphed_callables, CUDA only,
    replaced by the flattened network itself): the outputs keep the network's structure, the loss
    and unwrap find the network, the BatchNorm statistics changed while capturing are put back, eval
    mode runs the network, another batch shape is refused, and training steps equal plain ones."""
    from utils.graphed_training import GraphedTrainingNetwork

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", lambda module, sample_args, **options: module)
    inputs, targets = _fixed_batch(widerface_sample, 128, 2)
    config = ModelConfig(network="mobilenet0.25", cascade=True, model_version=version)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(RetinaFace(config))
    plain, network = models
    before = {name: value.clone() for name, value in network.named_buffers()}
    graphed = GraphedTrainingNetwork(network, inputs.shape, channels_last=False, autocast_dtype=None)
    for name, value in network.named_buffers():
        assert torch.equal(value, before[name]), name
    assert tu.unwrap(graphed) is network and list(graphed.parameters()) == list(network.parameters())

    criterion = MultiBoxLoss(config)
    priors = prior_boxes((128, 128), config.num_anchor)
    padded = pad_targets(targets)
    args = parse_args("train", ["--lr", "0.01"])
    histories = []
    for runner, model in ((plain, plain), (graphed, network)):
        optimizer = tu.build_optimizer(model, args)
        runner.train()
        history = []
        for _ in range(3):
            outputs = runner(inputs)
            assert len(outputs) == 2 and all((stage.iou is not None) == (version == "tina") for stage in outputs)
            losses = criterion(runner, outputs, priors, padded)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            history.append(float(losses["total"].detach()))
        histories.append(history)
    assert histories[0] == histories[1]
    for (name, mine), theirs in zip(network.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(mine, theirs), name
    with pytest.raises(ValueError, match=r"captured for batches of shape \(2, 3, 128, 128\), got \(1, 3, 128, 128\)"):
        graphed(inputs[:1])
    graphed.eval()
    assert not network.training
    with torch.no_grad():
        for got, want in zip(graphed(inputs[:1]), network(inputs[:1])):
            assert torch.equal(got.loc, want.loc) and torch.equal(got.conf, want.conf)


def test_cuda_graphs_option_on_the_cpu_with_compile_and_with_several_processes(widerface_sample, tmp_path,
                                                                               monkeypatch, capsys):
    import train

    monkeypatch.chdir(tmp_path)
    assert train.main(_run_args(widerface_sample, "graphs", "--max_iters", "1", "--cuda_graphs", "true")) == 0
    log = (tmp_path / "experiments/graphs/log/logs.txt").read_text()
    assert "note: --cuda_graphs true ignored on the CPU (CUDA graphs need a GPU)" in log
    capsys.readouterr()
    assert train.main(_run_args(widerface_sample, "both", "--cuda_graphs", "true", "--compile", "true")) == 2
    assert "--cuda_graphs true and --compile are alternatives" in capsys.readouterr().err
    assert not (tmp_path / "experiments/both").exists()
    ctx = SimpleNamespace(info=SimpleNamespace(device=torch.device("cuda"), distributed=True))
    with pytest.raises(tu.TrainingSetupError, match="leave it false under torchrun with several processes"):
        tu.graph_training_network(ctx, parse_args("train", ["--cuda_graphs", "true"]), None)
    inherited = parse_args("train", ["--cuda_graphs", "true"])
    inherited.compile = "inductor"  # as a --resume of a compiled run takes it over
    with pytest.raises(tu.TrainingSetupError, match="--cuda_graphs true and --compile are alternatives"):
        tu.graph_training_network(ctx, inherited, None)


def test_loss_scaled_fused_sgd_skips_an_overflow_step_entirely(monkeypatch):
    """fp16's GradScaler with build_optimizer's fused SGD (CUDA parameters): a step the scaler skips
    (inf in a gradient) must leave weights and momentum alone, and the steps after it must equal
    plain SGD's (foreach, unscaled) on the batches it did take. torch's fused kernel alone fails this
    on a skipped first step: it allocates the momentum buffers without writing them and the next
    step reads that memory (fp16 training went NaN on an H200); build_optimizer creates them zeroed.
    The parameters look like CUDA ones while the optimizer is built (torch's fused SGD runs on the
    CPU too); the steps run on the CPU with a CPU GradScaler."""
    args = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(0)
    batches = [torch.randn(3, 4) for _ in range(4)]
    initial = torch.nn.Linear(4, 2)

    def fused_sgd(build):
        model = copy.deepcopy(initial)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
            optimizer = build(model)
        assert optimizer.param_groups[0]["fused"]
        return model, optimizer

    def scaled_step(model, optimizer, scaler, batch, overflow):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(model(batch).pow(2).sum()).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()

    # torch's fused SGD on its own: a skipped first step leaves momentum buffers behind, unwritten
    model, optimizer = fused_sgd(lambda m: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=args.momentum,
                                                          weight_decay=args.weight_decay, fused=True))
    scaled_step(model, optimizer, torch.amp.GradScaler("cpu"), batches[0], overflow=True)
    assert optimizer.state, "torch's fused SGD now leaves skipped steps alone: the zeroed buffers may go"

    model, optimizer = fused_sgd(lambda m: tu.build_optimizer(m, args))
    reference = copy.deepcopy(initial)
    plain = torch.optim.SGD(reference.parameters(), lr=args.lr, momentum=args.momentum,
                            weight_decay=args.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaled_step(model, optimizer, scaler, batches[0], overflow=True)
    assert scaler.get_scale() == 2.0 ** 15
    for param, start in zip(model.parameters(), initial.parameters()):
        assert torch.equal(param, start)
        assert torch.equal(optimizer.state[param]["momentum_buffer"], torch.zeros_like(param))
    for batch in batches[1:]:
        scaled_step(model, optimizer, scaler, batch, overflow=False)
        plain.zero_grad(set_to_none=True)
        reference(batch).pow(2).sum().backward()
        plain.step()
        for param, want in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(param, want, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(optimizer.state[param]["momentum_buffer"],
                                       plain.state[want]["momentum_buffer"], rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.weight, initial.weight)


def test_cuda_graphs_auto_graphs_one_process_on_a_gpu_without_compile(monkeypatch):
    """--cuda_graphs auto (the default) graphs the network when --cuda_graphs true would be accepted
    on a GPU (one process, no --compile), in every precision (fp16 with loss scaling since its CUDA
    tests passed on the H200, 2026-11-28); elsewhere it leaves the model alone without a note. false
    never graphs. (The capture itself is replaced here: it needs CUDA.)"""
    import utils.graphed_training as graphed_training

    monkeypatch.setattr(graphed_training, "GraphedTrainingNetwork",
                        lambda network, shape, channels_last, dtype: ("graphed", network, shape))
    assert parse_args("train", []).cuda_graphs is None
    for device, several_processes, options, graphed in (
            ("cuda", False, [], True),
            ("cuda", False, ["--amp_dtype", "fp16"], True),
            ("cuda", False, ["--amp_dtype", "fp16", "--cuda_graphs", "true"], True),
            ("cuda", False, ["--cuda_graphs", "auto", "--batch_size", "8", "--im_size", "320"], True),
            ("cuda", True, [], False),
            ("cuda", False, ["--compile", "true"], False),
            ("cuda", False, ["--cuda_graphs", "false"], False),
            ("cpu", False, [], False)):
        ctx = SimpleNamespace(info=SimpleNamespace(device=torch.device(device), distributed=several_processes),
                              model="network", channels_last=True)
        args = parse_args("train", options)
        dtype = torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16
        notes = tu.graph_training_network(ctx, args, dtype)
        assert (ctx.model != "network") == graphed, (device, several_processes, options)
        if graphed:
            assert ctx.model == ("graphed", "network", (args.batch_size, 3, args.im_size, args.im_size))
            assert len(notes) == 1 and notes[0].startswith("CUDA graphs: the network's forward and backward")
        else:
            assert notes == []


def test_amp_dtype_chooses_the_autocast_type_and_the_loss_scaler(capsys):
    """--amp_dtype: bf16 trains without loss scaling, fp16 with a GradScaler; on the CPU there is no
    autocast whatever the choice, and an unknown type fails with one line."""
    import warnings

    cuda = torch.device("cuda")  # the choice only: no GPU needed to read it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GradScaler is enabled, but CUDA is not available" on this machine
        fp16, fp16_scaler = tu.autocast_settings(cuda, True, "fp16")
        bf16, bf16_scaler = tu.autocast_settings(cuda, True, "bf16")
    assert fp16 == torch.float16 and bf16 == torch.bfloat16 and not bf16_scaler.is_enabled()
    assert fp16_scaler.is_enabled() == torch.cuda.is_available()  # GradScaler turns itself off without CUDA
    # auto: bf16 from compute capability 8 (A100, H100) of the training GPU; fp16 below, where bf16
    # is only emulated (torch.cuda.is_bf16_supported() says yes there, e.g. on a T4)
    capabilities = {0: (9, 0), 1: (7, 5)}
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[torch.device(device).index])
        patch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert tu.autocast_settings(torch.device("cuda", 0), True, "auto")[0] == torch.bfloat16
        assert tu.autocast_settings(torch.device("cuda", 1), True, "auto")[0] == torch.float16
    for amp_dtype in ("auto", "bf16", "fp16"):
        dtype, scaler = tu.autocast_settings(torch.device("cpu"), True, amp_dtype)
        assert dtype is None and not scaler.is_enabled()
    assert tu.autocast_settings(cuda, False, "fp16")[0] is None
    with pytest.raises(ValueError, match="amp_dtype"):
        tu.autocast_settings(cuda, True, "fp8")
    assert parse_args("train", ["--amp_dtype", "fp16"]).amp_dtype == "fp16"
    assert parse_args("train", []).amp_dtype == "auto"
    with pytest.raises(SystemExit):
        parse_args("train", ["--amp_dtype", "fp8"])
    assert "--amp_dtype: invalid choice: 'fp8'" in capsys.readouterr().err
    assert tu.describe_amp(fp16, cuda, True) == "float16 with loss scaling"


def test_a_resume_replaces_the_tensorboard_steps_logged_after_last_pth(widerface_sample, tmp_path, monkeypatch,
                                                                       after_training_step):
    """A run that dies after logging steps 4 and 5 but saving last.pth at step 3 (an epoch end) is
    resumed from step 3: TensorBoard shows each step once, with the resumed run's values."""
    import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)

    def die():
        raise RuntimeError("killed")

    restore = after_training_step(6, die)  # steps 4 and 5 were logged
    # 3 iterations per epoch: last.pth at step 3; 0.5 warm-up epochs: another lr at each of the first steps
    argv = _run_args(widerface_sample, "tb", "--epochs", "4", "--batch_size", "3", "--lr", "0.001")
    with pytest.raises(RuntimeError, match="killed"):
        train.run(argv)
    restore()
    assert torch.load(tmp_path / "experiments/tb/ckpt/last.pth", weights_only=True)["step"] == 3
    train.run(["--resume", "experiments/tb/ckpt/last.pth", "--device", "cpu", "--lr", "0.002", "--max_iters", "6"])
    events = EventAccumulator(str(tmp_path / "experiments/tb/log"))
    events.Reload()
    lr = events.Scalars("train/lr")
    assert [event.step for event in lr] == [1, 2, 3, 4, 5, 6]
    assert lr[3].value == pytest.approx(0.002) and lr[2].value == pytest.approx(0.001)  # step 4: the resumed run's


def test_a_resume_with_another_batch_size_keeps_the_tensorboard_curves_logged_before_last_pth(
        widerface_sample, tmp_path, monkeypatch, after_training_step):
    """Another batch size converts the step (step 6 of 5 iterations per epoch is step 2 of 2); TensorBoard's
    steps go on from the checkpoint's instead of going back, which replaced steps 3-6 logged before last.pth."""
    import signal

    import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    after_training_step(6, lambda: signal.raise_signal(signal.SIGINT))
    assert train.main(_run_args(widerface_sample, "tb", "--epochs", "3", "--lr", "0.001")) == 130  # 5 it/epoch
    before = EventAccumulator(str(tmp_path / "experiments/tb/log"))
    before.Reload()
    logged = [(event.step, event.value) for event in before.Scalars("train/total")]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    summary = train.run(["--resume", "experiments/tb/ckpt/last.pth", "--device", "cpu", "--batch_size", "5"])
    epoch, done = divmod(6, 5)   # the checkpoint's place in its epochs, 2 iterations per epoch here
    converted = epoch * 2 + round(done * 2 / 5)
    assert summary["step"] == 3 * 2 and converted == 2
    saved = torch.load(tmp_path / "experiments/tb/ckpt/last.pth", weights_only=True)
    assert saved["tensorboard_offset"] == 6 - converted
    after = EventAccumulator(str(tmp_path / "experiments/tb/log"))
    after.Reload()
    events = [(event.step, event.value) for event in after.Scalars("train/total")]
    assert events[:6] == logged  # the first run's curve is kept whole
    assert [step for step, _ in events[6:]] == list(range(7, 7 + 3 * 2 - converted))


def test_options_that_other_options_make_moot_get_a_note():
    argv = ["--lr_schedule", "cosine", "--lr_steps", "5,8", "--amp", "false", "--amp_dtype", "fp16",
            "--eval_every", "0", "--val_dataset", "v", "--gt_dir", "g"]
    args = parse_args("train", argv)
    assert tu.ignored_option_notes(args, tu.explicit_options(argv)) == [
        "note: --lr_steps ignored: --lr_schedule cosine has no decay epochs",
        "note: --amp_dtype ignored: --amp false trains in float32",
        "note: --val_dataset ignored: --eval_every 0 turns validation off",
        "note: --gt_dir ignored: --eval_every 0 turns validation off"]
    # taken from a resumed run's checkpoint (not given), or in effect: no note
    assert tu.ignored_option_notes(args, set()) == []
    used = ["--lr_steps", "5,8", "--amp_dtype", "fp16", "--val_dataset", "v"]
    assert tu.ignored_option_notes(parse_args("train", used), tu.explicit_options(used)) == []


def test_a_branch_is_told_where_the_best_checkpoint_it_carries_on_is(tmp_path):
    """``--resume experiments/a/ckpt/best.pth --experiment_name b`` logged "best hard 0.93 at epoch 2" with no
    best.pth in b: the note says whose AP that is and where its best.pth is."""
    from types import SimpleNamespace

    ctx = SimpleNamespace(ckpt_dir=tmp_path / "b/ckpt", best_metric=0.93141, best_epoch=2)
    (notes,) = tu.branch_notes(ctx, str(tmp_path / "a/ckpt/best.pth"))
    assert notes == (f"note: the best hard AP so far, 0.9314 (epoch 2), is the resumed run's; its best.pth stays in "
                     f"{tmp_path / 'a/ckpt'}, and {tmp_path / 'b/ckpt/best.pth'} is written when a validation here "
                     "beats it")
    assert tu.branch_notes(ctx, str(tmp_path / "b/ckpt/last.pth")) == []  # the same run
    assert tu.branch_notes(SimpleNamespace(ckpt_dir=ctx.ckpt_dir, best_metric=None, best_epoch=None),
                           str(tmp_path / "a/ckpt/last.pth")) == []  # no AP carried on


def test_validation_runs_every_eval_every_epochs_and_after_the_last_and_best_follows_the_hard_ap(
        widerface_sample, widerface_gt_dir, tmp_path, monkeypatch):
    """--epochs 3 --eval_every 2 validates after epoch 2 and after the last epoch (3, not a multiple
    of 2), and best.pth is the epoch of the highest *hard* AP (the WIDER FACE model-selection set),
    whatever easy and medium do. The APs are scripted: hard falls from 0.6 to 0.5 while medium
    rises from 0.3 to 0.7."""
    import train

    monkeypatch.chdir(tmp_path)
    scripted = [{"easy": 0.8, "medium": 0.3, "hard": 0.6}, {"easy": 0.9, "medium": 0.7, "hard": 0.5}]
    steps = []

    def scripted_aps(model, *args, **kwargs):
        steps.append(len(steps))
        return dict(scripted[min(len(steps) - 1, len(scripted) - 1)])

    monkeypatch.setattr(tu, "evaluate_widerface", scripted_aps)
    summary = train.run(_run_args(widerface_sample, "sched", "--epochs", "3", "--eval_every", "2",
                                  "--val_dataset", str(widerface_sample), "--gt_dir", str(widerface_gt_dir)))
    assert summary["step"] == 15  # 3 epochs of 5 steps
    log = (tmp_path / "experiments/sched/log/logs.txt").read_text()
    assert re.findall(r"val AP after epoch (\d+)", log) == ["2", "3"]
    assert len(steps) == 2
    best_hard = max(aps["hard"] for aps in scripted)
    best = torch.load(tmp_path / "experiments/sched/ckpt/best.pth", weights_only=True)
    assert (best["best_epoch"], best["best_metric"]) == (2, pytest.approx(best_hard))
    assert best["step"] == 10  # the weights of the end of epoch 2
    last = torch.load(tmp_path / "experiments/sched/ckpt/last.pth", weights_only=True)
    assert (last["best_epoch"], last["best_metric"]) == (2, pytest.approx(best_hard))
    assert summary["best_metric"] == pytest.approx(best_hard) and summary["metrics"] == scripted[-1]
