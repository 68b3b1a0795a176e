"""Training throughput benchmark: fixed batches and the real data pipeline, fp32 vs bf16 autocast,
against a public-style training step timed in the same run.

    python tools/benchmark_train.py [--device cuda] [--configs mobilenet0.25:32:640,resnet50:24:840]
        [--variants public,fp32,bf16,bf16+cuda_graphs] [--iters 20] [--warmup 5] [--workers 14]
        [--dataset ../shared/data/widerface_sample --split val] [--profile] [--out FILE]

``--configs``: comma-separated ``MODEL:BATCH:SIZE`` (models of ``tools/benchmark_inference.MODELS``:
``mobilenet0.25``, ``resnet50`` (the published single-stage architecture), ``resnet50_cascade``
(``ModelConfig()``, the default model)). Default: the two public reference settings,
mobilenet0.25 bs32@640 and ResNet-50 bs24@840, plus the ResNet-50 cascade bs24@840.

What one run measures, per config
---------------------------------
* ``fixed``: img/s of full training steps (model + loss + optimizer step) on one batch repeated:
  a real batch (``TrainTransform`` over the dataset images) or, without data, random faces on
  noise. Our variants run ``utils.train_utils.train_one_epoch`` itself (device preprocessing,
  ``pad_targets``, autocast, batched ``MultiBoxLoss``, GradScaler, scheduler, on-device loss
  meter) over that batch, in the form the training DataLoader delivers it (targets padded,
  pinned on CUDA: ``loader_batch``). Variants: ``fp32`` (PyTorch's
  default cuDNN TF32), ``bf16`` / ``fp16`` autocast; modifiers ``nchw`` / ``cl`` (memory format,
  default channels_last on CUDA as train.py does), ``compile`` (``torch.compile`` of the model) and
  ``cuda_graphs`` (``train.py --cuda_graphs true``: the network's forward and backward passes
  replayed from CUDA graphs, ``utils.graphed_training``; CUDA only). ``train_one_epoch`` prepares
  each batch on the main stream when its step starts, as train.py does; ``ahead`` prepares it on a
  side stream during the step before (``utils.train_data.prepared_batches``, train.py's way from
  2026-11-27 to 2026-11-28; a real-row variant rated against its variant's fixed batches;
  ``copy_ahead`` runs only its host-to-device copies there; ``inline`` names the default explicitly).
* ``fixed, CUDA graph`` (variants with ``+graph``, fp32 / bf16, CUDA only): the same step
  (``training_step``) captured once in a CUDA graph and replayed: what a step costs when the host
  launches nothing. train.py does not run this way; the row measures the headroom of doing so,
  and stays out of the summary and the targets.
* ``public``: the public Pytorch_Retinaface training step written from its protocol: float32
  input prepared on the host (as its DataLoader delivers it) copied per step, targets copied per
  image, fp32 NCHW, the loss with a per-image ``match`` (Python loop over faces; each image's
  targets copied into host tensors, the batch's then copied back to the device), hard-negative
  mining by two sorts, host syncs (``max(num_pos.sum(), 1)``, ``.item()`` of the three losses for
  the per-iteration log line). Same model, optimizer (SGD 0.9, wd 5e-4) and batch as ours. Not
  reproduced: the public ResNet-50 config (``ngpu: 4``) wraps the model in ``nn.DataParallel``
  even on one GPU, a little host time per step that would only slow the public side.
* ``real``: the same steps fed by the real pipeline (``WiderFaceDataset`` + ``TrainTransform`` +
  DataLoader with ``--workers`` workers, pinned memory, non-blocking copies; built like
  ``train_data.build_train_loader``; the dataset is repeated to fill the steps) for
  ``--real_variants``; reported with its ratio to the same variant's fixed-batch img/s, and the
  loader alone (no training) for comparison; with it, ``preparation``: what preparing one of the
  loader's last batches for a step costs the device when nothing else runs (the host-to-device copy
  with the padded targets, then ``images_to_network_input``, with ``--augment_on device`` the
  augmentation: the work ``train_data.prepared_batches`` adds to each step; there also a profile
  of one batch's augmentation, ``pixels_profile``). ``--augment_on`` modes: ``workers``, ``device``
  and ``device+compile`` (train.py ``--augment_on device --compile_augment true``; the first
  warm-up steps compile). Their warm-up is ``--warmup`` + 4 x workers steps,
  so that batches prefetched during the warm-up (prefetch_factor 4) do not flatter the window,
  and they time ``--real_iters`` steps (at least 60 on CUDA: 15 mobilenet0.25 steps last a third
  of a second, where one late batch weighs). ``data_wait_share``: the part of the window the
  training loop spent waiting for the next batch.
* ``fixed, busy processes`` (``--busy_processes N``, default: the worker count on CUDA): the last
  fixed-batch variant again while N processes keep the cores busy, as the real pipeline's workers
  do. A step paced by the host (kernel launches) slows down with busy cores even when no batch is
  late; its ratio to the fixed-batch figure separates that from a loader that cannot keep up.
* ``fixed, N batches in turn`` (``--fixed_batches N``, default 8): the last fixed-batch variant
  over N different real batches in turn. Their most faces per image differ (18 to 218 over 60
  batches of 32 of the sample at 640), so the matching tensors change shape from step to step,
  as in the real pipeline, but no loader is involved: slower than one repeated batch means the
  shape variety costs (allocator, chunk count), not the data loading.
* ``max_memory_allocated`` per variant (CUDA), host syncs of one step (CUDA sync debug mode,
  counted per source line), and the loss of the public-style step against ``MultiBoxLoss`` on
  the same outputs (equal up to rounding when the public step's one protocol difference, faces
  with best IoU < 0.2 still re-assigning their best anchor, is switched off).
* ``--profile``: ``torch.profiler`` table of the top ops of a few steps of the last fixed
  variant without ``compile`` (stderr, ``--profile_out``, and the top rows in the JSON), then of
  one step per batch of the ``batches in turn`` row; each with the device's busy time per step
  (CPU time on the CPU). The ``batches in turn`` row also counts its host syncs over one round
  of its batches on CUDA.

Timing: after ``--warmup`` steps the device is synchronised and the clock starts; after
``--iters`` more steps it is synchronised again: img/s = batch * iters / elapsed (no per-step
syncs, as in training). ``step_ms`` is the median host interval between steps (steady state).
Prints ONE JSON line; ``--out FILE`` appends it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from config import non_negative_int, positive_int  # noqa: E402
from layers.multibox_loss import MultiBoxLoss, PaddedTargets, box_iou_batched, pad_targets  # noqa: E402
from layers.prior_box import prior_boxes  # noqa: E402
from models.detector import StageClock  # noqa: E402
from models.retinaface import RetinaFace  # noqa: E402
from tools.benchmark_inference import (  # noqa: E402
    MODELS, SHARED, finish_report, record_failure, release, report_header, rnd, setup_device, stats, sync_sites,
    synchronize,
)
from utils.box_utils import VARIANCES, encode, encode_landm, point_form  # noqa: E402

DEFAULT_CONFIGS = "mobilenet0.25:32:640,resnet50:24:840,resnet50_cascade:24:840"
DEFAULT_DATASET = SHARED / "data" / "widerface_sample"
#: img/s of the public Pytorch_Retinaface training (fixed batches) quoted by the issue, measured on
#: an H200 with torch 2.11; the target is >= 2.5x these.
PUBLIC_REFERENCE_IMG_PER_S = {"mobilenet0.25:32:640": 303.0, "resnet50:24:840": 99.0}
TARGET_RATIO = 2.5


# ------------------------------------------------------------------------------------------------
# Public-style loss (the public protocol, per image)
# ------------------------------------------------------------------------------------------------
def public_match(truths: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor, landms: torch.Tensor,
                 threshold: float, variances: tuple[float, float], claim_invalid: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The public ``match`` for one image: IoU of faces (K, 4) with anchors (N, 4) cx,cy,w,h;
    faces whose best IoU is >= 0.2 force their best anchor; a Python loop assigns every face
    (``claim_invalid=False``: every valid face, the protocol of ``layers/multibox_loss.py``) to its
    best anchor. Returns (loc_t (N, 4), conf_t (N,) in {0, 1, -1}, landm_t (N, 10)), or None
    when no face is valid (the image then has no positives)."""
    overlaps = box_iou_batched(truths[None], point_form(anchors))[0]  # (K, N)
    best_prior_overlap, best_prior_idx = overlaps.max(1)
    valid_gt = best_prior_overlap >= 0.2
    best_prior_idx_filter = best_prior_idx[valid_gt]
    if best_prior_idx_filter.shape[0] <= 0:  # host sync, as in the public code
        return None
    best_truth_overlap, best_truth_idx = overlaps.max(0)
    best_truth_overlap.index_fill_(0, best_prior_idx_filter, 2)
    for j in range(best_prior_idx.size(0)):  # one small kernel (and a sync for the check) per face
        if claim_invalid or bool(valid_gt[j]):
            best_truth_idx[best_prior_idx[j]] = j
    matches = truths[best_truth_idx]
    conf = labels[best_truth_idx].clone()
    conf[best_truth_overlap < threshold] = 0
    return encode(matches, anchors, variances), conf, encode_landm(landms[best_truth_idx], anchors, variances)


class PublicStyleLoss:
    """The public ``MultiBoxLoss`` (loc weight applied by the caller) for every stage of a model:
    per-image :func:`public_match`, hard negatives by a double sort, host-side denominators.

    Returns per stage summed ``(loss_l, loss_c, loss_landm)``. Targets: list of (K_i, 15) pixel
    tensors (the IoU and the offsets are scale-free, so pixels give the public normalised values).
    """

    def __init__(self, threshold: float = 0.35, neg_pos_ratio: int = 7, variances=VARIANCES,
                 claim_invalid: bool = True) -> None:
        self.threshold = threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.variances = variances
        self.claim_invalid = claim_invalid

    def __call__(self, model, outputs, priors: torch.Tensor, targets: Sequence[torch.Tensor]):
        model = getattr(model, "module", model)
        total = [0.0, 0.0, 0.0]
        for stage in model.stage_predictions(outputs, priors):
            for i, value in enumerate(self._stage(stage, targets)):
                total[i] = total[i] + value
        return tuple(total)

    def _stage(self, stage, targets):
        loc_data, conf_data, landm_data = stage.loc.float(), stage.conf.float(), stage.landm.float()
        num, num_priors = loc_data.shape[:2]
        device = loc_data.device
        # as the public code: the targets are gathered in host tensors, each image's matched on the
        # device and copied into them, then the whole batch is copied back to the device
        loc_t = torch.empty(num, num_priors, 4)
        conf_t = torch.empty(num, num_priors, dtype=torch.long)
        landm_t = torch.empty(num, num_priors, 10)
        anchors = stage.anchors.float()
        for idx in range(num):
            truths = targets[idx]
            image_anchors = anchors if anchors.dim() == 2 else anchors[idx].detach()
            matched = None
            if truths.shape[0]:
                matched = public_match(truths[:, :4], image_anchors, truths[:, 14].long(), truths[:, 4:14],
                                       self.threshold, self.variances, self.claim_invalid)
            if matched is not None:
                loc_t[idx], conf_t[idx], landm_t[idx] = matched
            else:
                loc_t[idx], conf_t[idx], landm_t[idx] = 0, 0, 0
        loc_t, conf_t, landm_t = loc_t.to(device), conf_t.to(device), landm_t.to(device)

        zeros = torch.tensor(0, device=device)
        pos1 = conf_t > zeros
        num_pos_landm = pos1.long().sum(1, keepdim=True)
        n1 = max(num_pos_landm.data.sum().float(), 1)  # host sync
        pos_idx1 = pos1.unsqueeze(pos1.dim()).expand_as(landm_data)
        loss_landm = F.smooth_l1_loss(landm_data[pos_idx1].view(-1, 10), landm_t[pos_idx1].view(-1, 10),
                                      reduction="sum")
        pos = conf_t != zeros
        conf_t[pos] = 1
        pos_idx = pos.unsqueeze(pos.dim()).expand_as(loc_data)
        loss_l = F.smooth_l1_loss(loc_data[pos_idx].view(-1, 4), loc_t[pos_idx].view(-1, 4), reduction="sum")

        batch_conf = conf_data.view(-1, 2)
        x_max = batch_conf.data.max()
        log_sum_exp = torch.log(torch.sum(torch.exp(batch_conf - x_max), 1, keepdim=True)) + x_max
        loss_c = log_sum_exp - batch_conf.gather(1, conf_t.view(-1, 1))
        loss_c[pos.view(-1, 1)] = 0
        loss_c = loss_c.view(num, -1)
        _, loss_idx = loss_c.sort(1, descending=True)
        _, idx_rank = loss_idx.sort(1)
        num_pos = pos.long().sum(1, keepdim=True)
        num_neg = torch.clamp(self.neg_pos_ratio * num_pos, max=pos.size(1) - 1)
        neg = idx_rank < num_neg.expand_as(idx_rank)
        pos_idx = pos.unsqueeze(2).expand_as(conf_data)
        neg_idx = neg.unsqueeze(2).expand_as(conf_data)
        conf_p = conf_data[(pos_idx + neg_idx).gt(0)].view(-1, 2)
        targets_weighted = conf_t[(pos + neg).gt(0)]
        loss_c = F.cross_entropy(conf_p, targets_weighted, reduction="sum")
        n = max(num_pos.data.sum().float(), 1)  # host sync
        return loss_l / n, loss_c / n, loss_landm / n1


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class RepeatDataset(Dataset):
    """``dataset`` cycled to ``length`` items; exposes its ``transform`` (for ``EpochSeededDataset``)."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        self.dataset = dataset
        self.length = int(length)

    @property
    def transform(self):
        return getattr(self.dataset, "transform", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


#: ``--augment_on`` modes of the real pipeline: train.py's ``--augment_on`` (and ``--compile_augment``)
AUGMENT_MODES = {"workers": ("workers", False), "device": ("device", False), "device+compile": ("device", True)}


def training_dataset(root: Path, split: str, size: int, seed: int, augment_on: str = "workers"):
    """The training set with ``TrainTransform`` (``augment_on="workers"``) or
    ``DeferredTrainTransform`` (``"device"``, ``"device+compile"``), as
    ``train_data.build_train_loader`` builds it."""
    from utils.data_loaders import dataset_from_root
    from utils.train_data import train_transform
    return dataset_from_root(root, split, train_transform(size, seed, AUGMENT_MODES[augment_on][0]))


def real_batch(dataset, batch: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from utils.data_loaders import detection_collate
    return detection_collate([dataset[i % len(dataset)] for i in range(batch)])


def loader_batch(images: torch.Tensor, targets: Sequence[torch.Tensor], device: torch.device
                 ) -> tuple[torch.Tensor, PaddedTargets]:
    """A fixed batch in the form the training DataLoader delivers it: the targets padded (as its
    workers do, ``train_data.collate_with_report``), everything pinned on CUDA."""
    padded = pad_targets(targets)
    if device.type != "cuda":
        return images, padded
    return images.pin_memory(), PaddedTargets(padded.targets.pin_memory(), padded.valid.pin_memory())


def synthetic_batch(batch: int, size: int, seed: int, faces: int = 12) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Noise images with random faces (boxes 8..size/3 px, landmarks inside, half with landmarks)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    targets = []
    for _ in range(batch):
        side = torch.exp(torch.rand(faces, 1, generator=generator) * np.log(size / 24.0)) * 8.0
        corner = torch.rand(faces, 2, generator=generator) * (size - side)
        boxes = torch.cat([corner, corner + side], dim=1)
        points = corner.repeat(1, 5) + torch.rand(faces, 10, generator=generator) * side
        flag = torch.where(torch.rand(faces, 1, generator=generator) < 0.5, 1.0, -1.0)
        targets.append(torch.cat([boxes, torch.where(flag > 0, points, -1.0), flag], dim=1))
    return images, targets


class ForkSafeLoader:
    """Iterates a DataLoader through ``utils.image_loader.start_loader``: this process has used
    OpenCV (the fixed batch) before the workers are forked, and OpenCV's thread pool must not be
    running at the fork."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator:
        from utils.image_loader import start_loader
        return start_loader(self.loader)


def real_loader(dataset, batch: int, steps: int, workers: int, seed: int, device: torch.device) -> ForkSafeLoader:
    """The DataLoader of ``train_data.build_train_loader`` (same sampler, seeding and options)
    over ``dataset`` repeated to ``steps`` batches."""
    from utils.train_data import TRAIN_PREFETCH_FACTOR, EpochSeededDataset, ResumableSampler, TrainBatchCollate
    repeated = RepeatDataset(dataset, batch * steps)
    sampler = ResumableSampler(len(repeated), 1, 0, shuffle=True, seed=seed)
    return ForkSafeLoader(DataLoader(
        EpochSeededDataset(repeated, seed, report=True), batch_size=batch, sampler=sampler, num_workers=workers,
        collate_fn=TrainBatchCollate(), pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=TRAIN_PREFETCH_FACTOR if workers > 0 else None))


class StepClock:
    """Wraps the batches of a training loop and opens a measurement window over the steps
    ``[warmup, warmup + iters)``: the device is synchronised and the clock started before batch
    ``warmup`` is fetched, and synchronised and stopped before batch ``warmup + iters`` is fetched
    (or when the loop ends or breaks, as ``train_one_epoch`` does at ``max_iters``). ``enter`` /
    ``exit`` run at the window's edges (sync debug mode, profiler). Set ``source`` before use."""

    def __init__(self, warmup: int, iters: int, device: torch.device, enter=None, exit=None) -> None:
        self.source: Iterable | None = None
        self.warmup, self.iters, self.device = warmup, iters, device
        self.enter, self.exit = enter, exit
        self.start: float | None = None
        self.end: float | None = None
        self.stamps: list[float] = []
        self.waits: list[float] = []  # seconds inside the source's __next__, per windowed step

    def _open(self) -> None:
        synchronize(self.device)
        if self.enter is not None:
            self.enter()
        self.start = time.perf_counter()

    def _close(self) -> None:
        if self.start is None or self.end is not None:
            return
        if self.exit is not None:
            self.exit()
        synchronize(self.device)
        self.end = time.perf_counter()

    def __iter__(self) -> Iterator:
        iterator = iter(self.source)
        index = 0
        try:
            while True:
                if index == self.warmup:
                    self._open()
                if index == self.warmup + self.iters:
                    self._close()
                fetched = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                if self.start is not None and self.end is None:
                    self.stamps.append(fetched)
                    self.waits.append(time.perf_counter() - fetched)
                yield item
                index += 1
        finally:
            self._close()

    def result(self, batch: int) -> dict[str, Any]:
        self._close()
        if self.start is None:
            raise RuntimeError(f"the loop ended before its {self.warmup} warm-up steps")
        elapsed = self.end - self.start
        steps = len(self.stamps)
        intervals = np.diff(self.stamps + [self.end]).tolist()
        return {"img_per_s": rnd(batch * steps / elapsed), "steps": steps, "elapsed_s": rnd(elapsed),
                "step_ms": stats(intervals), "data_wait_share": rnd(sum(self.waits) / elapsed) if elapsed else None}


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextlib.contextmanager
def busy_cores(count: int):
    """``count`` processes spinning on the CPU inside the block: the load that DataLoader workers
    put on the cores, without their data. Shows how much a training step that the host paces
    (kernel launches) slows down when every core is busy."""
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    processes = [context.Process(target=_spin, args=(stop,), daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    try:
        yield
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()


class Cycle:
    """``items`` in turn, ``n`` in all: a fixed-batch "loader" (one batch repeated, or batches of
    several shapes)."""

    def __init__(self, items: Sequence, n: int) -> None:
        self.items, self.n = list(items), n

    def __iter__(self):
        for index in range(self.n):
            yield self.items[index % len(self.items)]


# ------------------------------------------------------------------------------------------------
# Variants and runs
# ------------------------------------------------------------------------------------------------
#: Variant modifiers that choose how real batches are prepared (not a fixed-batch variant of their own).
PREPARATION_TOKENS = frozenset({"ahead", "copy_ahead", "inline"})


def parse_variant(text: str, device: torch.device) -> SimpleNamespace:
    tokens = [t for t in text.strip().lower().split("+") if t]
    cuda = device.type == "cuda"
    if tokens == ["public"]:
        return SimpleNamespace(name="public", public=True, precision="fp32", channels_last=False, compile=False,
                               graph=False, cuda_graphs=False, prepare_ahead=False, copy_ahead=False,
                               fixed_name="public")
    if not tokens or tokens[0] not in ("fp32", "bf16", "fp16"):
        raise SystemExit(f"train variant {text!r}: 'public' or fp32/bf16/fp16 [+nchw|+cl] [+compile|+cuda_graphs] "
                         "[+graph] [+ahead|+copy_ahead|+inline]")
    variant = SimpleNamespace(name=text.strip(), public=False, precision=tokens[0], channels_last=cuda, compile=False,
                              graph=False, cuda_graphs=False, prepare_ahead=False, copy_ahead=False,
                              fixed_name="+".join(t for t in text.strip().split("+")
                                                  if t.lower() not in PREPARATION_TOKENS))
    for token in tokens[1:]:
        if token in ("nchw", "cl"):
            variant.channels_last = token == "cl"
        elif token == "compile":
            variant.compile = True
        elif token == "graph":
            variant.graph = True
        elif token == "cuda_graphs":
            variant.cuda_graphs = True
        elif token in PREPARATION_TOKENS:  # ahead / copy_ahead: on a side stream during the step before
            variant.prepare_ahead, variant.copy_ahead = token == "ahead", token == "copy_ahead"
        else:
            raise SystemExit(f"train variant {text!r}: unknown modifier {token!r}")
    if len(PREPARATION_TOKENS & set(tokens)) > 1:
        raise SystemExit(f"train variant {text!r}: ahead, copy_ahead and inline are alternatives (inline is the "
                         "default)")
    if variant.graph and (variant.precision == "fp16" or variant.compile or variant.cuda_graphs):
        raise SystemExit(f"train variant {text!r}: graph is for fp32 / bf16 without compile (the whole-step "
                         "graph leaves fp16's loss scaler out)")
    if variant.cuda_graphs and variant.compile:
        raise SystemExit(f"train variant {text!r}: cuda_graphs and compile are alternatives (as in train.py)")
    return variant


def build_training(config, variant, device: torch.device, seed: int, public: bool = False):
    """Fresh model (same init for every variant), wrapped like train.py; optimizer (``public``:
    plain ``torch.optim.SGD`` as the public code builds it, not our fused one); scaler."""
    from utils.distributed import DistInfo
    from utils.train_utils import autocast_settings, build_optimizer, wrap_model
    torch.manual_seed(seed)
    model = RetinaFace(config)
    if variant.compile:
        # each model compiled afresh: the same forward code compiled for another model counts as a
        # recompilation, which torch.compile answers with a dynamic-shape graph (slower, and it
        # took the rest of a 240 s step on the H100, 2026-11-26)
        torch._dynamo.reset()
    runner = wrap_model(model, DistInfo(device=device), channels_last=variant.channels_last,
                        compile_backend="inductor" if variant.compile else None)
    hyper = SimpleNamespace(lr=1e-3, momentum=0.9, weight_decay=5e-4)
    # train.py's own choice (--amp, --amp_dtype): no autocast on the CPU, a GradScaler for fp16
    amp = variant.precision != "fp32"
    dtype, scaler = autocast_settings(device, amp, variant.precision if amp else "auto")
    optimizer = (torch.optim.SGD(model.parameters(), lr=hyper.lr, momentum=hyper.momentum,
                                 weight_decay=hyper.weight_decay) if public
                 else build_optimizer(model, hyper))
    return model, runner, optimizer, scaler, dtype


def run_ours(config, variant, device: torch.device, batches: Iterable, steps: int, batch: int, size: int,
             seed: int, clock: StepClock | None = None, compile_augment: bool = False) -> dict[str, Any]:
    """``steps`` optimizer steps of ``train_one_epoch`` over ``batches`` (wrapped in ``clock``;
    ``compile_augment``: train.py ``--compile_augment``)."""
    from utils.distributed import DistInfo
    from utils.train_utils import TrainContext, train_one_epoch
    model, runner, optimizer, scaler, dtype = build_training(config, variant, device, seed)
    if variant.cuda_graphs:
        from utils.graphed_training import GraphedTrainingNetwork
        runner = GraphedTrainingNetwork(runner, (batch, 3, size, size), variant.channels_last, dtype)
    args = SimpleNamespace(batch_size=batch, max_iters=steps, log_every=1 << 30, save_every=0)
    # rank 1 of a non-distributed run: train_one_epoch then draws no progress bar and logs nothing
    # (is_main is False); everything else it does is the same
    info = DistInfo(rank=1, device=device)
    ctx = TrainContext(args=args, info=info, model=runner, raw_model=model,
                       criterion=MultiBoxLoss(config), optimizer=optimizer,
                       scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), scaler=scaler,
                       loader=clock if clock is not None else batches, sampler=SimpleNamespace(set_epoch=lambda *a: None),
                       priors=prior_boxes((size, size), config.num_anchor, device), iters_per_epoch=steps, epochs=1,
                       seed=seed, autocast_dtype=dtype, channels_last=variant.channels_last,
                       prepare_ahead=variant.prepare_ahead, copy_ahead=variant.copy_ahead,
                       compile_augment=compile_augment)
    if clock is not None:
        clock.source = batches
    train_one_epoch(ctx, 0)
    result = clock.result(batch) if clock is not None else {}
    # train_one_epoch logs once here (log_every above): the mean loss of every step, warm-up included
    result["mean_loss"] = rnd(ctx.loss_history[-1][1]) if ctx.loss_history else None
    return result


def training_step(config, variant, device: torch.device, images: torch.Tensor, targets: Sequence[torch.Tensor],
                  size: int, seed: int):
    """``(step, optimizer)``: ``step()`` is one training step of ``train_one_epoch`` (device
    preprocessing, autocast, ``MultiBoxLoss``, backward, SGD) on the fixed batch ``images`` (uint8
    ``(B, 3, S, S)``) / ``targets``, with every tensor it reads already on ``device`` and gradients
    left for the caller to clear, so that it can be captured in a CUDA graph. Returns the loss
    (a device tensor)."""
    from utils.data_loaders import images_to_network_input

    _, runner, optimizer, _, dtype = build_training(config, variant, device, seed)
    runner.train()
    criterion = MultiBoxLoss(config)
    priors = prior_boxes((size, size), config.num_anchor, device)
    static_images = images.to(device)
    padded = pad_targets(targets, device)
    autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None
                else contextlib.nullcontext())

    def step() -> torch.Tensor:
        inputs = images_to_network_input(static_images)
        if variant.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            outputs = runner(inputs)
        loss = criterion(runner, outputs, priors, padded)["total"]
        loss.backward()
        optimizer.step()
        return loss

    return step, optimizer


def run_graphed(config, variant, device: torch.device, images: torch.Tensor, targets: Sequence[torch.Tensor],
                steps: int, batch: int, size: int, seed: int, clock: StepClock) -> dict[str, Any]:
    """``steps`` replays of one CUDA graph holding a whole training step on the fixed batch: what
    the step costs when the host launches nothing (``graph`` variants; CUDA only)."""
    step, optimizer = training_step(config, variant, device, images, targets, size, seed)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream: momentum buffers, autotuning
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the captured backward then writes the gradients afresh
    current = torch.cuda.current_stream(device)
    try:
        with torch.cuda.graph(graph):
            loss = step()
    finally:
        torch.cuda.set_stream(current)  # a capture that fails on exit leaves its capture stream current
    clock.source = Cycle([None], steps)
    for _ in clock:
        graph.replay()
    result = clock.result(batch)
    result["final_loss"] = rnd(float(loss.detach()))
    return result


def public_steps(config, device: torch.device, images_f32: torch.Tensor, targets: list[torch.Tensor],
                 size: int, seed: int, clock: StepClock, steps: int) -> dict:
    """``steps`` iterations of the public training loop body over one host batch (module doc)."""
    variant = SimpleNamespace(channels_last=False, precision="fp32", compile=False)
    raw, net, optimizer, _, _ = build_training(config, variant, device, seed, public=True)
    net.train()
    criterion = PublicStyleLoss()
    priors = prior_boxes((size, size), config.num_anchor, device)
    totals = []
    clock.source = Cycle([(images_f32, targets)], steps)
    for images, anno in clock:
        images = images.to(device)
        anno = [t.to(device) for t in anno]
        out = net(images)
        optimizer.zero_grad()
        loss_l, loss_c, loss_landm = criterion(net, out, priors, anno)
        loss = 2.0 * loss_l + loss_c + loss_landm
        loss.backward()
        optimizer.step()
        last = (loss_l.item(), loss_c.item(), loss_landm.item())  # the per-iteration log line
        totals.append(2.0 * last[0] + last[1] + last[2])
    result = clock.result(images_f32.shape[0])
    # final: the last step's loss; mean: of every step, as our variants report it (same steps)
    result["final_loss"] = rnd(totals[-1]) if totals else None
    result["mean_loss"] = rnd(sum(totals) / len(totals)) if totals else None
    del raw, net, optimizer
    return result


def loss_agreement(config, device: torch.device, images: torch.Tensor, targets: list[torch.Tensor], size: int,
                   seed: int) -> dict[str, Any]:
    """Public-style loss vs ``MultiBoxLoss`` on the same outputs (fp32, train-mode forward)."""
    from utils.data_loaders import images_to_network_input
    torch.manual_seed(seed)
    model = RetinaFace(config).to(device).train()
    priors = prior_boxes((size, size), config.num_anchor, device)
    device_targets = [t.to(device) for t in targets]
    with torch.no_grad():
        outputs = model(images_to_network_input(images, device=device))
        ours = MultiBoxLoss(config)(model, outputs, priors, device_targets)
        ours_total = float(ours["total"])
        agreement = {"multibox_total": rnd(ours_total, 6)}
        for claim_invalid, key in ((False, "protocol"), (True, "public_exact")):
            loss_l, loss_c, loss_landm = PublicStyleLoss(claim_invalid=claim_invalid)(model, outputs, priors,
                                                                                     device_targets)
            public_total = float(2.0 * loss_l + loss_c + loss_landm)
            agreement[f"{key}_total"] = rnd(public_total, 6)
            agreement[f"{key}_rel_diff"] = rnd(abs(public_total - ours_total) / max(abs(ours_total), 1e-12), 3)
    if config.model_version == "tina":
        agreement["note"] = "tina IoU term has no public counterpart"
    return agreement


def sync_debug_clock(device: torch.device, steps: int = 1) -> StepClock:
    """A clock whose window is ``steps`` steps after the first one, with CUDA sync debug mode on
    (the run must make ``1 + steps`` steps at least)."""
    return StepClock(1, steps, device, enter=lambda: torch.cuda.set_sync_debug_mode("warn"),
                     exit=lambda: torch.cuda.set_sync_debug_mode(0))


def profile_run(run, device: torch.device, steps: int, rows: int = 25
                ) -> tuple[str, list[dict[str, Any]], float]:
    """``torch.profiler`` over ``steps`` steady-state steps: ``run(clock)`` must run ``1 + steps``
    steps through ``clock``. Returns the table (sorted by self device time on CUDA, self CPU
    time on the CPU), its top rows and the self device time of all ops per step in ms (CPU
    time on the CPU): against the step time, what the device was busy for."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    run(StepClock(1, steps, device, enter=prof.start, exit=prof.stop))
    averages = prof.key_averages()

    def device_time(event) -> float:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0

    cuda = device.type == "cuda"
    table = None
    for sort_by in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:
            table = averages.table(sort_by=sort_by, row_limit=rows)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    ordered = sorted(averages, key=lambda e: device_time(e) if cuda else e.self_cpu_time_total, reverse=True)
    top = [{"name": e.key, "calls": e.count, "self_device_ms": rnd(device_time(e) / 1000.0),
            "self_cpu_ms": rnd(e.self_cpu_time_total / 1000.0)} for e in ordered[:rows]]
    if cuda:  # the kernels' and copies' own events, as the table's "Self CUDA time total" (ops' rows repeat them)
        from torch.autograd import DeviceType
        busy_us = sum(device_time(e) for e in averages
                      if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
    else:
        busy_us = sum(e.self_cpu_time_total for e in averages)
    busy_ms = busy_us / 1000.0 / steps
    return table or str(averages), top, busy_ms


def wall_since(started: float) -> float:
    """Wall seconds since ``started`` (``time.perf_counter()``), to 0.1 s: the ``wall_s`` fields."""
    return round(time.perf_counter() - started, 1)


def summarise_config(entry: dict[str, Any]) -> None:
    """Set ``entry["summary"]`` from the rows measured so far (also for a run interrupted mid-config):
    the fastest fixed-batch variant of ours (``+cuda_graphs`` included, as train.py can train so; the
    whole-step ``fixed, CUDA graph`` rows stay out), its ratio to the public-style step and to the
    public code's H200 figure, and the real pipeline's ratio to it (rows named ``+ahead``,
    ``+copy_ahead`` or ``+inline`` stay out: the plain rows are train.py's way, in reports before
    2026-11-28 the side stream, since then each batch when its step starts)."""
    rows = entry.get("variants", [])
    ours = [v for v in rows if v["mode"] == "fixed" and v["variant"] != "public" and "img_per_s" in v]
    if not ours:
        return
    public_ips = next((v["img_per_s"] for v in rows
                       if v["mode"] == "fixed" and v["variant"] == "public" and "img_per_s" in v), None)
    best = max(ours, key=lambda v: v["img_per_s"])
    summary: dict[str, Any] = {"best_fixed_variant": best["variant"], "best_fixed_img_per_s": best["img_per_s"],
                               "public_style_img_per_s": public_ips,
                               "speedup_vs_public_style": rnd(best["img_per_s"] / public_ips) if public_ips else None}
    reference = PUBLIC_REFERENCE_IMG_PER_S.get(entry.get("config", ""))
    if reference:
        summary.update(public_reference_img_per_s=reference, public_reference_device="NVIDIA H200, torch 2.11",
                       ratio_vs_public_reference=rnd(best["img_per_s"] / reference), target_ratio=TARGET_RATIO)
    # the fastest real-pipeline row of each --augment_on against the fastest fixed batches, whichever
    # variants they are (fp16 may win the fixed batches while only bf16 variants run the real pipeline)
    real: dict[str, float] = {}
    for v in rows:
        if v["mode"] == "real" and "img_per_s" in v and not PREPARATION_TOKENS & set(v["variant"].lower().split("+")):
            real[v["augment_on"]] = max(real.get(v["augment_on"], 0.0), rnd(v["img_per_s"] / best["img_per_s"]))
    if real:
        summary["real_ratio_to_fixed"] = real
    entry["summary"] = summary


def measure_config(spec: str, args: argparse.Namespace, device: torch.device, errors: list[str],
                   notes: list[str], entry: dict[str, Any]) -> None:
    """Fill ``entry`` for one ``MODEL:BATCH:SIZE`` config (as measurements finish)."""
    from utils.data_loaders import images_to_network_input
    name, batch, size = spec.split(":")
    batch, size = int(batch), int(size)
    config = MODELS[name]
    entry.update({"config": spec, "model": name, "batch": batch, "size": size, "variants": []})
    # wall seconds per part, set-up included (a step cap cut run 7 where the rows' own timings did not say)
    config_started = time.perf_counter()
    dataset = None
    if args.dataset and (Path(args.dataset) / args.split / "label.txt").is_file():
        dataset = training_dataset(Path(args.dataset), args.split, size, args.seed)
    if args.fixed_batch == "real" and dataset is not None:
        images, targets = real_batch(dataset, batch)
        entry["fixed_batch"] = f"real: TrainTransform({size}) of {args.dataset}/{args.split}, {len(dataset)} images"
    else:
        images, targets = synthetic_batch(batch, size, args.seed)
        entry["fixed_batch"] = "synthetic: noise images, 12 random faces each"
    entry["faces_per_image"] = rnd(float(np.mean([len(t) for t in targets])))
    try:
        entry["loss_check"] = loss_agreement(config, device, images, targets, size, args.seed)
    except Exception as error:
        errors.append(f"{spec} loss check: {type(error).__name__}: {error}")
        traceback.print_exc()
    release(device)
    pinned_images, pinned_targets = loader_batch(images, targets, device)
    entry["setup_wall_s"] = wall_since(config_started)
    fixed_img_per_s: dict[str, float] = {}
    profiled_variant = None
    graphed = []

    def our_syncs(variant, batches: Sequence) -> dict[str, Any] | None:
        """Host syncs per step of ``variant`` over one round of ``batches`` after a first step (CUDA
        sync debug mode; None without CUDA). A shape-dependent sync shows only over several batches."""
        rounds = len(batches)
        counted = sync_sites(lambda: run_ours(
            config, variant, device, Cycle(batches, 1 + rounds), 1 + rounds, batch, size, args.seed,
            sync_debug_clock(device, rounds)), toggle=False)
        if counted is None or rounds == 1:
            return counted
        return {**counted, "count": rnd(counted["count"] / rounds), "steps": rounds}

    for text in args.variants:
        variant = parse_variant(text, device)
        if variant.public and config.model_version == "tina":
            notes.append(f"{spec}: public variant skipped (tina IoU head has no public loss)")
            continue
        if (variant.compile or variant.graph or variant.cuda_graphs) and device.type != "cuda":
            notes.append(f"{spec} {variant.name}: skipped on the CPU (torch.compile and CUDA graphs are measured on "
                         "CUDA only)")
            continue
        if variant.graph:  # measured last: a failed capture must not cost the other rows
            graphed.append(variant)
            continue
        result: dict[str, Any] = {"variant": variant.name, "mode": "fixed", "precision": variant.precision,
                                  "channels_last": variant.channels_last, "compile": variant.compile}
        row_started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            clock = StepClock(args.warmup, args.iters, device)
            steps = args.warmup + args.iters
            if variant.public:
                host_f32 = images_to_network_input(images).contiguous()  # the public loader: NCHW float32
                result.update(public_steps(config, device, host_f32, list(targets), size, args.seed, clock, steps))
            else:
                fixed = Cycle([(pinned_images, pinned_targets)], steps)
                result.update(run_ours(config, variant, device, fixed, steps, batch, size, args.seed, clock))
                fixed_img_per_s[variant.name] = result["img_per_s"]
                if not variant.compile:  # a second model would be compiled again (minutes)
                    profiled_variant = variant
            if device.type == "cuda":
                result["max_memory_allocated_mib"] = rnd(torch.cuda.max_memory_allocated(device) / 2 ** 20)
                if variant.public:
                    result["syncs_per_step"] = sync_sites(lambda: public_steps(
                        config, device, host_f32, list(targets), size, args.seed, sync_debug_clock(device), 3),
                        toggle=False)
                elif not (variant.compile or variant.graph or variant.cuda_graphs):  # set-up would count
                    result["syncs_per_step"] = our_syncs(variant, [(pinned_images, pinned_targets)])
        except Exception as error:
            record_failure(result, errors, f"{spec} {variant.name}", error)
        release(device)
        result["wall_s"] = wall_since(row_started)
        entry["variants"].append(result)
        print(f"[train] {spec} {variant.name} fixed: {result.get('img_per_s', '-')} img/s ({result['wall_s']} s)",
              file=sys.stderr, flush=True)

    # the fixed batches again with the cores busy (the real pipeline's workers load them so)
    last = next((v for v in reversed(entry["variants"]) if v["mode"] == "fixed" and v["variant"] in fixed_img_per_s),
                None)
    last_variant = parse_variant(last["variant"], device) if last is not None else None

    def run_last(batches: Sequence) -> dict[str, Any]:
        """The last fixed variant over ``batches`` in turn (the extra rows below)."""
        steps = args.warmup + args.iters
        return run_ours(config, last_variant, device, Cycle(batches, steps), steps, batch, size, args.seed,
                        StepClock(args.warmup, args.iters, device))

    if args.busy_processes > 0 and last_variant is not None:
        def busy_run() -> dict[str, Any]:
            with busy_cores(args.busy_processes):
                return run_last([(pinned_images, pinned_targets)])
        extra_fixed_row(spec, last_variant, "fixed, busy processes", busy_run, fixed_img_per_s.get(last_variant.name),
                        device, errors, entry, busy_processes=args.busy_processes)

    # several fixed batches in turn: real batches differ in their most faces per image, so the
    # matching tensors change shape every step; this row has that variety without a loader
    several: list = []
    if args.fixed_batches > 1 and last_variant is not None and dataset is not None and args.fixed_batch == "real":
        several = [real_batch(dataset, batch) for _ in range(args.fixed_batches)]
        most_faces = [max(len(t) for t in targets_i) for _, targets_i in several]
        several = [loader_batch(images_i, targets_i, device) for images_i, targets_i in several]
        extra_fixed_row(spec, last_variant, f"fixed, {len(several)} batches in turn", lambda: run_last(several),
                        fixed_img_per_s.get(last_variant.name), device, errors, entry, most_faces_per_batch=most_faces)
        if device.type == "cuda" and not last_variant.compile and "error" not in entry["variants"][-1]:
            entry["variants"][-1]["syncs_per_step"] = our_syncs(last_variant, several)

    # the real data pipeline, with the augmentation's pixel work in the workers and on the device
    if dataset is not None and args.real_variants:
        for augment_on in args.augment_on:
            measure_real_pipeline(spec, args, device, config, batch, size, augment_on, fixed_img_per_s, errors, entry)
    elif args.real_variants:
        notes.append(f"{spec}: real data pipeline skipped (no {args.dataset}/{args.split}/label.txt)")

    # a whole training step replayed from one CUDA graph (not what train.py runs: kept out of the summary)
    for variant in graphed:
        extra_fixed_row(spec, variant, "fixed, CUDA graph", lambda: run_graphed(
            config, variant, device, images, targets, args.warmup + args.iters, batch, size, args.seed,
            StepClock(args.warmup, args.iters, device)), fixed_img_per_s.get(variant.name.replace("+graph", "")),
            device, errors, entry)

    summarise_config(entry)

    if args.profile and profiled_variant is not None:
        profile_started = time.perf_counter()
        # one repeated batch, then (when that row ran) the batches in turn over as many steps as
        # there are batches: device time per step against step time tells a bigger device
        # workload from a host that cannot keep the device busy
        runs = [("profile", "fixed-batch steps", [(pinned_images, pinned_targets)], args.profile_steps)]
        if several and args.profile_steps > 0:
            runs.append(("profile_batches_in_turn", f"steps over {len(several)} batches in turn", several,
                         max(args.profile_steps, len(several))))
        for key, what, batches, steps in runs:
            try:
                table, top, busy_ms = profile_run(lambda clock: run_ours(
                    config, profiled_variant, device, Cycle(batches, steps + 1), steps + 1, batch, size, args.seed,
                    clock), device, steps)
                header = f"== profile {spec} {profiled_variant.name}: {steps} {what} after 1 warm-up step =="
                print(header + "\n" + table, file=sys.stderr, flush=True)
                if args.profile_out:
                    with open(args.profile_out, "a", encoding="utf-8") as handle:
                        handle.write(header + "\n" + table + "\n")
                entry[key] = {"variant": profiled_variant.name, "steps": steps, "busy_ms_per_step": rnd(busy_ms),
                              "top_ops": top}
            except Exception as error:
                errors.append(f"{spec} {key}: {type(error).__name__}: {error}")
                traceback.print_exc()
            release(device)
        entry["profile_wall_s"] = wall_since(profile_started)
    entry["wall_s"] = wall_since(config_started)


def extra_fixed_row(spec: str, variant, mode: str, measure: Callable[[], dict[str, Any]], fixed: float | None,
                    device: torch.device, errors: list[str], entry: dict[str, Any], **fields: Any) -> None:
    """Append one more fixed-batch row (busy cores, CUDA graph) to ``entry``: ``measure()``'s clock
    result, peak memory and the ratio to ``fixed`` (the plain fixed-batch img/s of the variant)."""
    result = {"variant": variant.name, "mode": mode, "precision": variant.precision,
              "channels_last": variant.channels_last, "compile": variant.compile, **fields}
    row_started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result.update(measure())
        if device.type == "cuda":
            result["max_memory_allocated_mib"] = rnd(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        if fixed:
            result["ratio_to_fixed"] = rnd(result["img_per_s"] / fixed)
    except Exception as error:
        record_failure(result, errors, f"{spec} {variant.name} ({mode})", error)
    release(device)
    result["wall_s"] = wall_since(row_started)
    entry["variants"].append(result)
    print(f"[train] {spec} {variant.name} {mode}: {result.get('img_per_s', '-')} img/s "
          f"(x{result.get('ratio_to_fixed', '-')} of fixed; {result['wall_s']} s)", file=sys.stderr, flush=True)


PREPARATION_BATCHES = 8


def preparation_times(batches: Sequence[Sequence[Any]], device: torch.device, compile_augment: bool = False
                      ) -> dict[str, Any]:
    """What preparing each of the loader's ``batches`` (``(images, PaddedTargets, ...)``, pinned on
    CUDA) for a training step costs the device, one batch at a time with nothing else running:
    ``copy_ms`` the host-to-device copy of the images and the padded targets, ``pixels_ms``
    :func:`~utils.data_loaders.images_to_network_input` of the copied batch (float conversion and
    mean, and with ``--augment_on device`` the augmentation), ``mb_per_batch`` the bytes copied.
    Times from CUDA events (wall clock on the CPU); stats over the batches, in ms.
    ``pixels_issue_ms`` is the host's share of ``pixels_ms``: the wall time until the host has
    launched that work, without waiting for it. Near ``pixels_ms`` the device waited for the
    launches (fewer kernels would help); far below it, the device work itself sets the time.
    With the augmentation on the device, ``pixels_profile`` is ``torch.profiler``'s view of the
    last batch's ``pixels`` work: the device's busy time (CPU time on the CPU) and the top ops.
    The network input is channels_last on CUDA, as training takes it. ``compile_augment``: the
    compiled kernels, compiled for every batch's cases before the timing."""
    from utils.data_loaders import images_to_network_input
    from utils.device_augment import DeferredBatch

    def network_input(images):
        return images_to_network_input(images, channels_last=device.type == "cuda", compile_augment=compile_augment)

    if compile_augment:
        for images, *_ in batches:
            network_input(images.to(device))
    copy_s, pixels_s, issue_s, megabytes = [], [], [], []
    moved = None
    for images, targets, *_ in batches:
        synchronize(device)
        clock = StageClock(device.type == "cuda")
        clock.mark()
        moved = images.to(device, non_blocking=True)
        pad_targets(targets, device)
        clock.mark("copy")
        issued = time.perf_counter()
        network_input(moved)
        issue_s.append(time.perf_counter() - issued)
        clock.mark("pixels")
        copy, pixels = clock.seconds()
        copy_s.append(copy)
        pixels_s.append(pixels)
        megabytes.append((images.nbytes + sum(t.nbytes for t in targets if t is not None)) / 2 ** 20)
    result = {"batches": len(copy_s), "copy_ms": stats(copy_s), "pixels_ms": stats(pixels_s),
              "pixels_issue_ms": stats(issue_s),
              "mb_per_batch": rnd(float(np.median(megabytes))) if megabytes else None}
    if isinstance(moved, DeferredBatch):
        def run(clock: StepClock) -> None:
            clock.source = [moved, moved]
            for batch in clock:
                network_input(batch)

        _, top, busy_ms = profile_run(run, device, steps=1, rows=12)
        result["pixels_profile"] = {"busy_ms": rnd(busy_ms), "top": top}
    return result


def measure_real_pipeline(spec: str, args: argparse.Namespace, device: torch.device, config, batch: int, size: int,
                          augment_on: str, fixed_img_per_s: dict[str, float], errors: list[str],
                          entry: dict[str, Any]) -> None:
    """The loader alone and ``args.real_variants`` fed by it, for one ``--augment_on`` mode
    (appended to ``entry``). With ``device`` the loader alone measures only the workers' share;
    the pixel work is inside the training steps."""
    dataset = training_dataset(Path(args.dataset), args.split, size, args.seed, augment_on)
    loader = None
    # the window opens once the prefetch queue (workers x prefetch_factor batches) could have been
    # drained, so that it measures the steady state, not batches prepared during the warm-up
    warmup = args.warmup + 4 * args.workers
    steps = warmup + args.real_iters
    row_started = time.perf_counter()
    try:
        loader = real_loader(dataset, batch, steps + 1, args.workers, args.seed, device)
        clock = StepClock(warmup, args.real_iters, device)
        clock.source = loader
        last_batches = collections.deque(clock, maxlen=PREPARATION_BATCHES)
        compile_augment = AUGMENT_MODES[augment_on][1]
        preparation = preparation_times(list(last_batches), device, compile_augment)
        entry.setdefault("loader_only", {})[augment_on] = {**clock.result(batch), "workers": args.workers,
                                                           "warmup_steps": warmup, "preparation": preparation,
                                                           "wall_s": wall_since(row_started)}
        del last_batches
        for text in args.real_variants:
            variant = parse_variant(text, device)
            if variant.public or variant.graph or ((variant.compile or variant.cuda_graphs) and device.type != "cuda"):
                continue
            result = {"variant": variant.name, "mode": "real", "augment_on": augment_on,
                      "precision": variant.precision, "channels_last": variant.channels_last,
                      "compile": variant.compile, "workers": args.workers, "warmup_steps": warmup}
            row_started = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                clock = StepClock(warmup, args.real_iters, device)
                result.update(run_ours(config, variant, device, loader, steps, batch, size, args.seed, clock,
                                       compile_augment))
                if variant.fixed_name in fixed_img_per_s:  # +ahead: against the fixed batches of its variant
                    result["ratio_to_fixed"] = rnd(result["img_per_s"] / fixed_img_per_s[variant.fixed_name])
                if device.type == "cuda":
                    result["max_memory_allocated_mib"] = rnd(torch.cuda.max_memory_allocated(device) / 2 ** 20)
            except Exception as error:
                record_failure(result, errors, f"{spec} real ({augment_on}) {variant.name}", error)
            release(device)
            result["wall_s"] = wall_since(row_started)
            entry["variants"].append(result)
            print(f"[train] {spec} {variant.name} real, augmentation on {augment_on}: "
                  f"{result.get('img_per_s', '-')} img/s (x{result.get('ratio_to_fixed', '-')} of fixed; "
                  f"{result['wall_s']} s)", file=sys.stderr, flush=True)
    except Exception as error:
        errors.append(f"{spec} real data pipeline ({augment_on}): {type(error).__name__}: {error}")
        traceback.print_exc()
    finally:
        del loader


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated MODEL:BATCH:SIZE")
    parser.add_argument("--variants", default=None,
                        help="fixed-batch variants (default CUDA: public,fp32,bf16,bf16+cuda_graphs, the last "
                             "being train.py's default there; CPU: public,fp32)")
    parser.add_argument("--real_variants", default=None,
                        help="variants fed by the real data pipeline (default: the last of --variants; '' = none)")
    parser.add_argument("--iters", type=positive_int, default=None, help="timed steps (default 20 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help="untimed steps first (default 5 CUDA, 1 CPU)")
    parser.add_argument("--real_iters", type=positive_int, default=None,
                        help="timed steps of the real data pipeline (default: --iters, at least 60 on CUDA: "
                             "short windows make the loader's occasional waits noise)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="DataLoader workers of the real pipeline (default CUDA: cores - 2, at most 14; CPU: 0)")
    parser.add_argument("--busy_processes", type=non_negative_int, default=None,
                        help="time the fixed batches of the last variant again with this many processes keeping "
                             "the cores busy, as the real pipeline's workers do (default: --workers on CUDA, 0 on "
                             "the CPU; 0 = skip)")
    parser.add_argument("--fixed_batches", type=non_negative_int, default=8,
                        help="time the last fixed variant again over this many different real batches in turn "
                             "(their face counts, hence the matching shapes, vary as in the real pipeline; "
                             "0 or 1 = skip)")
    parser.add_argument("--augment_on", default="workers,device",
                        help="real-pipeline modes, comma-separated: workers, device (train.py --augment_on) and "
                             "device+compile (--augment_on device --compile_augment true)")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="root with <split>/label.txt and images/")
    parser.add_argument("--split", default="val")
    parser.add_argument("--fixed_batch", choices=("real", "synthetic"), default="real",
                        help="the repeated batch: TrainTransform of dataset images, or noise with random faces")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the last fixed variant")
    parser.add_argument("--profile_steps", type=positive_int, default=3)
    parser.add_argument("--profile_out", default=None, help="append the profiler tables to this file")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads of the main process")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = setup_device(args.device, args.threads, args.out)
    cuda = device.type == "cuda"
    if cuda:
        from utils.train_utils import configure_backends
        configure_backends(device, deterministic=False)  # cudnn.benchmark and TF32, as train.py
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for spec in configs:
        parts = spec.split(":")
        if (len(parts) != 3 or parts[0] not in MODELS or not parts[1].isdigit() or not parts[2].isdigit()
                or int(parts[1]) < 1 or int(parts[2]) < 1):
            raise SystemExit(f"--configs {spec!r}: expected MODEL:BATCH:SIZE with MODEL in {sorted(MODELS)} and "
                             "BATCH, SIZE positive")
    default_variants = "public,fp32,bf16,bf16+cuda_graphs" if cuda else "public,fp32"
    args.variants = [v for v in (args.variants or default_variants).split(",") if v]
    if args.real_variants is None:
        ours = [v for v in args.variants if v != "public" and not parse_variant(v, device).graph]
        args.real_variants = ours[-1:] if ours else []
    else:
        args.real_variants = [v for v in args.real_variants.split(",") if v]
    args.augment_on = [m.strip() for m in args.augment_on.split(",") if m.strip()]
    if not set(args.augment_on) <= set(AUGMENT_MODES):
        raise SystemExit(f"--augment_on {args.augment_on}: choose from {', '.join(AUGMENT_MODES)}")
    args.iters = args.iters or (20 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.real_iters = args.real_iters or (max(args.iters, 60) if cuda else args.iters)
    if args.workers is None:
        args.workers = max(1, min(14, (os.cpu_count() or 2) - 2)) if cuda else 0
    if args.busy_processes is None:
        args.busy_processes = args.workers if cuda else 0

    notes: list[str] = []
    errors: list[str] = []
    if not cuda:
        notes.append("CPU run: no autocast (train_utils.autocast_settings uses none on the CPU), no torch.compile, "
                     "no GPU memory or sync counts")
    report = report_header("train", "tools/benchmark_train.py", argv, device)
    report["settings"] = {"configs": configs, "variants": args.variants, "real_variants": args.real_variants,
                          "iters": args.iters, "warmup": args.warmup, "real_iters": args.real_iters,
                          "workers": args.workers, "busy_processes": args.busy_processes,
                          "augment_on": args.augment_on,
                          "dataset": f"{args.dataset}/{args.split}", "fixed_batch": args.fixed_batch,
                          "optimizer": "SGD lr 1e-3 momentum 0.9 wd 5e-4", "cudnn_benchmark": cuda}
    started = time.perf_counter()
    report["configs"] = []
    try:
        for spec in configs:
            entry: dict[str, Any] = {}
            report["configs"].append(entry)
            measure_config(spec, args, device, errors, notes, entry)
            release(device)
    except KeyboardInterrupt:  # timeout --signal=INT in tools/gpu_check.sh: keep what was measured
        report["interrupted"] = True
        notes.append("interrupted (SIGINT): partial results")
        if report["configs"] and "summary" not in report["configs"][-1]:
            summarise_config(report["configs"][-1])  # the targets table reads it
    return finish_report(report, notes, errors, started, args.out)


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)  # a failed measurement is in the JSON and in the exit status
