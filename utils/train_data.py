"""The training data pipeline: the DataLoader of ``train.py`` and how its batches reach the device.

- :class:`EpochSeededDataset`: augmentation drawn from ``(seed, epoch, image index)`` only, unreadable
  images replaced reproducibly and reported (:class:`LoadReport`);
- :class:`ResumableSampler`: distributed, seeded shuffling that can start an epoch after its first
  samples, so ``--resume`` from any iteration continues exactly (any ``--workers``);
- :class:`TrainBatchCollate`: targets padded in the workers, image batches kept alive there;
  :func:`shared_memory_keep` checks that ``/dev/shm`` has room for them;
- :func:`build_train_loader`: all of the above for ``--dataset``/``--train_split``;
- :func:`prepared_batches`: host-to-device copies and the network input (with ``--augment_on
  device`` the augmentation), each batch when its step starts (or, on CUDA, one batch ahead on a
  side stream).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
from collections import deque
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from layers.multibox_loss import PaddedTargets, pad_targets
from utils.ahead import launched_one_ahead
from utils.distributed import DistInfo
from utils.errors import TrainingSetupError
from utils.image_io import ImageReadError
from utils.image_loader import ignore_interrupts_in_worker

__all__ = ["LoadReport", "EpochSeededDataset", "collate_with_report", "TRAIN_PREFETCH_FACTOR", "TRAIN_KEPT_BATCHES",
           "SHARED_MEMORY_DIR", "TrainBatchCollate", "ResumableSampler", "shared_memory_keep", "train_transform",
           "build_train_loader", "loader_notes", "ignore_interrupts_in_worker", "PreparedBatch",
           "prepared_batches"]


class LoadReport(NamedTuple):
    """What loading a sample (or a batch) ran into: ``skipped`` ``(path, reason)`` of every
    unreadable image met (the replaced one and any unreadable candidates tried after it),
    ``replaced`` how many samples were replaced, ``fatal`` when no image of the dataset could be
    read (the sample is then a blank placeholder)."""

    skipped: tuple[tuple[str, str], ...] = ()
    replaced: int = 0
    fatal: bool = False

    @classmethod
    def merge(cls, reports: Sequence["LoadReport"]) -> "LoadReport":
        """One report for a batch of samples' reports."""
        return cls(tuple(item for report in reports for item in report.skipped),
                   sum(report.replaced for report in reports), any(report.fatal for report in reports))


class EpochSeededDataset(Dataset):
    """Wraps a dataset whose ``transform`` has ``reseed`` (``TrainTransform``): item
    ``(index, epoch)`` reseeds the transform with ``[seed, epoch, index]`` before loading, so
    each sample's augmentation depends only on these three numbers (not on worker count,
    worker scheduling or where a run was resumed).

    An image that cannot be read (:class:`~utils.image_io.ImageReadError`: missing, empty, not an
    image, truncated) is replaced by the first readable image in a scan of the dataset that starts
    at an offset drawn from ``[seed, epoch, index]``, augmented with the slot's own seed: the
    replacement too depends only on these numbers (and on which files are unreadable), so
    ``--resume`` stays exact. Known unreadable indices are remembered per process, so each file
    is read once. With ``report=True`` items are ``(image, targets, LoadReport)`` (batch them
    with :func:`collate_with_report`); otherwise ``(image, targets)``.
    """

    _MAX_FATAL_EXAMPLES = 3

    def __init__(self, dataset: Dataset, seed: int, report: bool = False) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.report = report
        self._unreadable: dict[int, str] = {}  # index -> reason, known in this process

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int, epoch: int, slot: int):
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "reseed"):
            transform.reseed([self.seed, int(epoch), int(slot)])
        return self.dataset[index]

    def _path(self, index: int) -> str:
        path = getattr(self.dataset, "image_path", None)
        return str(path(index)) if path is not None else f"image {index}"

    def _candidates(self, index: int, epoch: int) -> Iterator[int]:
        """``index``, then every other index once, from an offset drawn from ``[seed, epoch, index]``."""
        yield index
        size = len(self.dataset)
        if size > 1:
            offset = int(np.random.default_rng([self.seed, epoch, index, 1]).integers(size - 1))
            for j in range(size - 1):
                yield (index + 1 + (offset + j) % (size - 1)) % size

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = int(key[0]), int(key[1])
        skipped: list[tuple[str, str]] = []
        for attempt, candidate in enumerate(self._candidates(index, epoch)):
            problem = self._unreadable.get(candidate)
            if problem is None:
                try:
                    sample = self._load(candidate, epoch, index)
                except ImageReadError as error:
                    path, message = self._path(candidate), str(error)
                    problem = message.removeprefix(f"{path}: ")
                    self._unreadable[candidate] = problem
                else:
                    return (*sample, LoadReport(tuple(skipped), int(attempt > 0))) if self.report else sample
            skipped.append((self._path(candidate), problem))
        return self._placeholder(skipped)

    def _placeholder(self, skipped: list[tuple[str, str]]):
        """No image of the dataset can be read: a blank sample flagged ``fatal`` (the training
        loop stops with one line), or, without ``report``, the error."""
        from utils.data_transformer import empty_targets

        if not self.report:
            raise ImageReadError(f"none of the {len(self.dataset)} images can be read, e.g. "
                                 f"{skipped[0][0]}: {skipped[0][1]}")
        blank = np.zeros((8, 8, 3), dtype=np.uint8)
        transform = getattr(self.dataset, "transform", None)
        sample = transform(blank, empty_targets()) if transform is not None else (blank, empty_targets())
        return (*sample, LoadReport(tuple(skipped[:self._MAX_FATAL_EXAMPLES]), 1, fatal=True))


def collate_with_report(batch: list) -> tuple[Any, PaddedTargets, LoadReport]:
    """Batch ``(image, targets, LoadReport)`` samples into ``(images, PaddedTargets, LoadReport)``:
    the images as :func:`~utils.data_loaders.detection_collate` stacks them, the targets padded
    (:func:`~layers.multibox_loss.pad_targets`) and the reports of the samples merged.

    Padding here, in the DataLoader worker, sends the main process two target tensors per batch
    instead of one per image: every tensor a worker returns is a shared-memory file the receiving
    thread (the pin-memory thread, beside the training loop) opens and maps, and the loop loses
    about that time (``tools/benchmark_loader.py``).
    """
    from utils.data_loaders import detection_collate

    images, targets = detection_collate([(image, target) for image, target, _ in batch])
    return images, pad_targets(targets), LoadReport.merge([report for _, _, report in batch])


#: Batches each training DataLoader worker prepares ahead (the DataLoader's ``prefetch_factor``).
TRAIN_PREFETCH_FACTOR = 4
#: Image batches each worker keeps (:class:`TrainBatchCollate`) when shared memory has room.
TRAIN_KEPT_BATCHES = TRAIN_PREFETCH_FACTOR + 2
#: Where DataLoader workers hand their batches over on Linux (a tmpfs; Docker gives it 64 MB unless
#: the container is started with ``--shm-size``).
SHARED_MEMORY_DIR = "/dev/shm"


class TrainBatchCollate:
    """:func:`collate_with_report` for the training DataLoader, whose workers keep their last
    ``keep`` image batches alive.

    A batch's images travel in a shared-memory segment, and the process that drops the last
    reference to it unmaps it and hands its pages back to the system: 6 ms for a batch of 32 at
    640 px on the 2-core CPU machine, time the training loop loses when that process is the
    training process (its pin-memory thread, beside the loop). A worker that still holds the
    batch when the training process is done with it does that work instead, on its own core. So
    ``keep`` should exceed the batches of one worker in flight (``TRAIN_PREFETCH_FACTOR`` + 2); a
    smaller ``keep`` only moves less of the work. The cost: shared memory holds up to ``keep``
    image batches per worker instead of ``TRAIN_PREFETCH_FACTOR``. Outside a worker (``--workers
    0``) nothing is kept.
    """

    def __init__(self, keep: int = TRAIN_KEPT_BATCHES) -> None:
        self.keep = keep
        self._recent: deque = deque(maxlen=max(keep, 1))

    def __call__(self, batch: list) -> tuple[Any, PaddedTargets, LoadReport]:
        images, targets, report = collate_with_report(batch)
        if self.keep > 0 and get_worker_info() is not None:
            self._recent.append(images)
        return images, targets, report


class ResumableSampler(Sampler):
    """Distributed, seeded shuffling that can start an epoch after its first samples.

    Every epoch a permutation of the dataset is drawn from ``seed + epoch`` (identical on all
    ranks), padded by repetition to a multiple of ``num_replicas`` and split round-robin like
    ``DistributedSampler``. :meth:`set_epoch` ``(epoch, skip)`` drops the first ``skip``
    samples of this rank (used by ``--resume`` mid-epoch). Yields ``(index, epoch)`` pairs for
    :class:`EpochSeededDataset`.
    """

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        self.dataset_size = int(dataset_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.skip = 0
        self.num_samples = math.ceil(self.dataset_size / self.num_replicas)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = int(epoch)
        self.skip = int(skip)

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.num_samples * self.num_replicas
        while len(order) < total:
            order += order[:total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices()[self.skip:]:
            yield index, self.epoch

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


def shared_memory_keep(args: argparse.Namespace, processes_on_node: int = 1, folder: str | None = None) -> int:
    """How many image batches each training DataLoader worker may keep (:class:`TrainBatchCollate`).

    Every worker of the ``processes_on_node`` training processes of this machine has up to
    ``TRAIN_PREFETCH_FACTOR`` + 1 uint8 batches (``--batch_size`` x 3 x ``--im_size``^2 bytes)
    in ``folder``, or ``TRAIN_KEPT_BATCHES`` when it keeps them. Returns ``TRAIN_KEPT_BATCHES``
    when those fit in the free space, 0 when only the prefetched batches fit, and the keeping
    when ``folder`` (default ``SHARED_MEMORY_DIR``) does not exist (not Linux) or there are no
    workers.

    Raises:
        TrainingSetupError: not even the prefetched batches fit; the workers would die of a bus
            error in the middle of the first epoch.
    """
    folder = folder or SHARED_MEMORY_DIR
    if args.workers <= 0 or not os.path.isdir(folder):
        return TRAIN_KEPT_BATCHES
    batch_bytes = args.batch_size * 3 * args.im_size ** 2
    free = shutil.disk_usage(folder).free
    workers = processes_on_node * args.workers
    if free >= workers * TRAIN_KEPT_BATCHES * batch_bytes:
        return TRAIN_KEPT_BATCHES
    in_flight = TRAIN_PREFETCH_FACTOR + 1
    if free >= workers * in_flight * batch_bytes:
        return 0
    fit = free // (processes_on_node * in_flight * batch_bytes)
    processes = f"{processes_on_node} processes x " if processes_on_node > 1 else ""
    remedy = (f"lower --workers (at most {fit} fit)" if fit else
              "use --workers 0 (the training process loads the data) or a smaller --batch_size or --im_size")
    raise TrainingSetupError(
        f"{folder} has {_mib(free)} free, but {processes}--workers {args.workers} x {in_flight} batches of "
        f"{_mib(batch_bytes)} (--batch_size {args.batch_size} at --im_size {args.im_size}) need "
        f"{_mib(workers * in_flight * batch_bytes)} there: {remedy}, or give it more room (Docker: "
        f"--shm-size={math.ceil(workers * in_flight * batch_bytes / 2 ** 30) + 1}g)")


def _mib(size: int) -> str:
    mib = size / 2 ** 20
    return f"{mib:,.0f} MiB" if mib >= 10 else f"{mib:.2g} MiB"


def train_transform(im_size: int, seed: int, augment_on: str = "workers"):
    """The training augmentation of ``--augment_on``: ``TrainTransform`` (``workers``: all of it in
    the DataLoader workers) or ``DeferredTrainTransform`` (``device``: pixel work on the device)."""
    from utils.data_transformer import TrainTransform
    from utils.device_augment import DeferredTrainTransform

    if augment_on not in ("workers", "device"):
        raise ValueError(f"augment_on must be 'workers' or 'device', got {augment_on!r}")
    return (DeferredTrainTransform if augment_on == "device" else TrainTransform)(im_size, rng=seed)


def build_train_loader(args: argparse.Namespace, info: DistInfo, seed: int
                       ) -> tuple[DataLoader, ResumableSampler, Dataset]:
    """DataLoader over ``<dataset>/<train_split>`` with ``TrainTransform(im_size)`` (or its
    ``DeferredTrainTransform`` with ``--augment_on device``): drop-last batches of
    ``--batch_size`` per process, pinned memory on CUDA, persistent workers when ``--workers`` > 0.
    Batches are ``(images, PaddedTargets, LoadReport)`` (:class:`TrainBatchCollate`): unreadable
    images are replaced (see :class:`EpochSeededDataset`) and reported to the training loop.
    Raises :class:`TrainingSetupError` for missing data, a label file without images or faces,
    and fewer images per process than ``--batch_size``."""
    from utils.data_loaders import dataset_from_root

    try:
        dataset = dataset_from_root(args.dataset, args.train_split,
                                    train_transform(args.im_size, seed, getattr(args, "augment_on", "workers")))
    except (FileNotFoundError, ValueError) as error:
        raise TrainingSetupError(f"training data: {error}") from None
    if len(dataset) == 0:
        raise TrainingSetupError(f"training data: {dataset.label_file} lists no images (expected '# <event>/<name>.jpg' "
                                 "headers, each followed by its face lines; see data/README.md)")
    if dataset.num_faces == 0:
        dropped = [f"{count} {what} dropped" for count, what in ((dataset.num_degenerate, "degenerate box(es)"),
                                                                 (dataset.num_invalid, "flagged invalid"))
                   if count]
        raise TrainingSetupError(
            f"training data: the labels in {dataset.label_file} hold no faces ({len(dataset)} images"
            + (f"; {', '.join(dropped)}" if dropped else "") + "): images without faces are valid samples, "
            "but a training set needs faces in some of them")
    sampler = ResumableSampler(len(dataset), info.world_size, info.rank, shuffle=True, seed=seed)
    if sampler.num_samples < args.batch_size:
        raise TrainingSetupError(
            f"{len(dataset)} training images give {sampler.num_samples} per process, fewer than "
            f"--batch_size {args.batch_size}: lower --batch_size")
    keep = shared_memory_keep(args, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cuda = info.device.type == "cuda"
    loader = DataLoader(EpochSeededDataset(dataset, seed, report=True), batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.workers, collate_fn=TrainBatchCollate(keep), pin_memory=cuda,
                        drop_last=True, persistent_workers=args.workers > 0,
                        worker_init_fn=ignore_interrupts_in_worker if args.workers > 0 else None,
                        prefetch_factor=TRAIN_PREFETCH_FACTOR if args.workers > 0 else None)
    return loader, sampler, dataset


def loader_notes(loader: DataLoader, dataset: Dataset) -> list[str]:
    """Log lines about the loader of :func:`build_train_loader`: what parsing the training label file
    dropped (degenerate boxes, faces flagged invalid in the official format), and workers that keep
    no batches for lack of shared memory (:func:`shared_memory_keep`)."""
    label = getattr(dataset, "label_file", "the label file")
    notes = []
    if getattr(dataset, "num_degenerate", 0):
        notes.append(f"dropped {dataset.num_degenerate} degenerate face box(es) (w or h <= 0) in {label}")
    if getattr(dataset, "num_invalid", 0):
        notes.append(f"dropped {dataset.num_invalid} face(s) flagged invalid in {label}")
    if loader.num_workers > 0 and not getattr(loader.collate_fn, "keep", True):
        notes.append(f"note: little room in {SHARED_MEMORY_DIR}: the DataLoader workers do not keep their batches, "
                     "so the training process unmaps them (slower on a fast GPU; README, Training)")
    return notes


class PreparedBatch(NamedTuple):
    """A training batch on the device: ``inputs`` float32 ``(B, 3, S, S)`` network input (BGR minus
    the mean, channels_last when asked), ``targets`` its padded faces, ``report`` the loader's
    :class:`LoadReport` (None for batches without one)."""

    inputs: torch.Tensor
    targets: PaddedTargets
    report: LoadReport | None


def prepared_batches(batches: Any, device: torch.device, channels_last: bool, ahead: bool = False,
                     compile_augment: bool = False, copy_ahead: bool = False) -> Iterator[PreparedBatch]:
    """The loader's ``(images, targets[, LoadReport])`` batches as :class:`PreparedBatch` on ``device``:
    host-to-device copies, :func:`~utils.data_loaders.images_to_network_input` (with ``--augment_on
    device`` the photometric distortion, padding, flip and resize; compiled with ``compile_augment``)
    and :func:`pad_targets`.

    By default (and always on the CPU) each batch is prepared on the main stream when its step
    starts: what train.py does. With ``ahead`` on CUDA, batch N+1 is prepared on a side stream before
    batch N is handed out, so its copies and augmentation can run on the GPU while step N's kernels
    do; the main stream waits only for that batch's event. On an H200 that was slower for
    mobilenet0.25 (README, Training: Augmentation on the device); the benchmark keeps it as a
    variant. With ``copy_ahead`` on CUDA only the host-to-device copies of batch N+1 run on the
    side stream (the copy engine, no kernels), the rest when its step starts. Either way the
    batches and their values are the same."""
    from utils.data_loaders import images_to_network_input

    def prepare(batch) -> PreparedBatch:
        inputs = images_to_network_input(batch[0], device=device, channels_last=channels_last,
                                         compile_augment=compile_augment)
        return PreparedBatch(inputs, pad_targets(batch[1], device), batch[2] if len(batch) > 2 else None)

    def copy(batch) -> tuple:
        targets = pad_targets(batch[1], device)
        return (batch[0].to(device, non_blocking=True), targets, *batch[2:])

    if not ((ahead or copy_ahead) and device.type == "cuda"):
        for batch in batches:
            yield prepare(batch)
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)  # what the main stream made before (weights, cached constants) comes first

    def launch(batch) -> tuple[Any, torch.cuda.Event]:
        with torch.cuda.stream(side):
            made = prepare(batch) if ahead else copy(batch)
        return made, side.record_event()

    def hand_out(launched: tuple[Any, torch.cuda.Event]) -> PreparedBatch:
        made, ready = launched
        main.wait_event(ready)
        # made on the side stream, used on the main one: the allocator must not reuse them before
        # the main stream is done with them
        images, targets = made[:2]
        images.record_stream(main)  # a tensor, or a DeferredBatch's tensors
        for tensor in targets:
            if tensor is not None:
                tensor.record_stream(main)
        return made if ahead else prepare(made)

    for launched in launched_one_ahead(batches, launch):
        yield hand_out(launched)
