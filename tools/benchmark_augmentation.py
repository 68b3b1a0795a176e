"""Time the training augmentation on one CPU core against a reconstruction of the public one.

Usage (from the repository root)::

    python tools/benchmark_augmentation.py [--dataset ../shared/data/widerface_sample] [--split val]
                                          [--rounds 20] [--im_size 640] [--seed 0]

Both implementations run in the same process, interleaved round by round over the same decoded
images (decoding is not timed), with ``torch.set_num_threads(1)`` and ``cv2.setNumThreads(1)``.

* ``ours``: :class:`utils.data_transformer.TrainTransform` (uint8 output; float conversion and
  mean subtraction happen later on the device).
* ``ours_with_cpu_conversion``: the same plus that conversion done on this core
  (:func:`models.retinaface.preprocess` of the one image, CHW float32 minus the mean), for a
  comparison in which both sides do the same work on the CPU (CPU training; on a GPU the
  conversion runs batched there). The public side does it in NumPy per image: its ``image -=
  (104, 117, 123)`` (a float64 tuple into a float32 array) is most of its cost.
* ``public``: :class:`PublicPreprocReconstruction`, written here from the description of the
  public Pytorch_Retinaface ``preproc``: per-trial Python crop search with an intersection-over-
  face test, float64 brightness/contrast/saturation with clipping, an unconditional
  BGR->HSV->BGR round trip, top-left pad to square, mirror with landmark swap, resize with a
  random interpolation, float32 conversion, mean subtraction, CHW transpose and coordinate
  normalisation by the square side.

A second measurement, also interleaved, times what one DataLoader worker does per image in
the two modes of ``train.py --augment_on`` (same one core): decoding (``read_image``), the
transform and :func:`utils.data_loaders.detection_collate` of batches of 32 —
``TrainTransform`` (``workers``: the whole augmentation) against ``DeferredTrainTransform``
(``device``: crop and geometry only; the pixel work then runs batched on the training device).
The workers' share bounds the images/s a loader delivers: about ``1000 / ms`` per worker process.

A third measurement times the other half of ``device`` on this core: :func:`utils.device_augment.photometric`
and the whole :func:`utils.device_augment.augment` of one batch of 32 (the images listed in turn),
and ``augment`` by its compiled kernels (``augment_compiled``, ``train.py --compile_augment``;
compiled before the timing: ``first_compiled_call_s``, shorter with inductor's on-disk cache filled,
``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)`` empties it), ms per batch (``device_batch_ms``; on a GPU
they run there, where ``tools/benchmark_train.py`` times them). ``compiled_vs_eager`` counts the
network-input values in which the compiled kernels differ from the eager ones, over that batch and
``--compare_batches`` - 1 more batches of 32 drawn with other seeds.

Prints one JSON line: ms/img of both (median over rounds), their ratio and the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import positive_int  # noqa: E402
from tools import shared_root  # noqa: E402
from utils.data_loaders import dataset_from_root, detection_collate  # noqa: E402
from utils.image_io import read_image  # noqa: E402
from models.retinaface import preprocess  # noqa: E402
from utils.data_transformer import RGB_MEAN_BGR, TrainTransform  # noqa: E402
from utils.device_augment import DeferredTrainTransform, augment, photometric  # noqa: E402

DEFAULT_DATASET = shared_root() / "data" / "widerface_sample"


class PublicPreprocReconstruction:
    """The public per-image preprocessing, reconstructed for timing (float pipeline).

    Input: uint8 BGR image and float targets ``(K, 15)`` in pixels (public layout: box, 10
    landmark values, label). Output: float32 ``(3, S, S)`` mean-subtracted image and targets
    normalised to ``[0, 1]``. Randomness comes from a private :class:`random.Random`.
    """

    SCALES = (0.3, 0.45, 0.6, 0.8, 1.0)
    INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)

    def __init__(self, im_size: int = 640, mean: tuple[int, int, int] = RGB_MEAN_BGR, seed: int = 0) -> None:
        self.size = im_size
        self.mean = mean
        self.random = random.Random(seed)

    # -- crop: one candidate per Python iteration, box-inside test via intersection over box area
    @staticmethod
    def _intersection_over_box(boxes: np.ndarray, roi: np.ndarray) -> np.ndarray:
        top_left = np.maximum(boxes[:, :2], roi[:2])
        bottom_right = np.minimum(boxes[:, 2:], roi[2:])
        overlap = np.prod(bottom_right - top_left, axis=1) * (top_left < bottom_right).all(axis=1)
        area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
        return overlap / np.maximum(area, 1)

    def _crop(self, image, boxes, labels, landmarks):
        height, width = image.shape[:2]
        for _ in range(250):
            side = int(self.random.choice(self.SCALES) * min(width, height))
            left = 0 if width == side else self.random.randrange(width - side)
            top = 0 if height == side else self.random.randrange(height - side)
            roi = np.array((left, top, left + side, top + side))
            if not (self._intersection_over_box(boxes, roi) >= 1).any():
                continue
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = np.logical_and(roi[:2] < centres, centres < roi[2:]).all(axis=1)
            kept_boxes = boxes[inside].copy()
            kept_labels = labels[inside].copy()
            kept_landmarks = landmarks[inside].copy().reshape(-1, 5, 2)
            if kept_boxes.shape[0] == 0:
                continue
            cropped = image[roi[1]:roi[3], roi[0]:roi[2]]
            kept_boxes[:, :2] = np.maximum(kept_boxes[:, :2], roi[:2]) - roi[:2]
            kept_boxes[:, 2:] = np.minimum(kept_boxes[:, 2:], roi[2:]) - roi[:2]
            kept_landmarks = np.clip(kept_landmarks - roi[:2], 0, side).reshape(-1, 10)
            widths = (kept_boxes[:, 2] - kept_boxes[:, 0] + 1) / side * self.size
            heights = (kept_boxes[:, 3] - kept_boxes[:, 1] + 1) / side * self.size
            big_enough = np.minimum(widths, heights) > 0.0
            kept_boxes, kept_labels, kept_landmarks = (
                kept_boxes[big_enough], kept_labels[big_enough], kept_landmarks[big_enough])
            if kept_boxes.shape[0] == 0:
                continue
            return cropped, kept_boxes, kept_labels, kept_landmarks, False
        return image, boxes, labels, landmarks, True

    # -- photometric distortion in float64 with clipping, HSV round trip always done
    @staticmethod
    def _affine_inplace(channel_view: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> None:
        values = channel_view.astype(float) * alpha + beta
        values[values < 0] = 0
        values[values > 255] = 255
        channel_view[:] = values

    def _hsv_ops(self, image: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        if self.random.randrange(2):
            self._affine_inplace(hsv[:, :, 1], alpha=self.random.uniform(0.5, 1.5))
        if self.random.randrange(2):
            hue = hsv[:, :, 0].astype(int) + self.random.randint(-18, 18)
            hsv[:, :, 0] = hue % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)

    def _distort(self, image: np.ndarray) -> np.ndarray:
        image = image.copy()
        contrast_first = self.random.randrange(2)
        if self.random.randrange(2):
            self._affine_inplace(image, beta=self.random.uniform(-32, 32))
        if contrast_first:
            if self.random.randrange(2):
                self._affine_inplace(image, alpha=self.random.uniform(0.5, 1.5))
            image = self._hsv_ops(image)
        else:
            image = self._hsv_ops(image)
            if self.random.randrange(2):
                self._affine_inplace(image, alpha=self.random.uniform(0.5, 1.5))
        return image

    def _pad_square(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        side = max(height, width)
        square = np.empty((side, side, 3), dtype=image.dtype)
        square[:, :] = self.mean
        square[:height, :width] = image
        return square

    def _mirror(self, image, boxes, landmarks):
        width = image.shape[1]
        if self.random.randrange(2):
            image = image[:, ::-1]
            boxes = boxes.copy()
            boxes[:, 0::2] = width - boxes[:, 2::-2]
            landmarks = landmarks.copy().reshape(-1, 5, 2)
            landmarks[:, :, 0] = width - landmarks[:, :, 0]
            landmarks = landmarks[:, [1, 0, 2, 4, 3], :].reshape(-1, 10)
        return image, boxes, landmarks

    def __call__(self, image: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes = targets[:, :4].astype(np.float64)
        labels = targets[:, -1].astype(np.float64)
        landmarks = targets[:, 4:-1].astype(np.float64)
        image, boxes, labels, landmarks, pad = self._crop(image, boxes, labels, landmarks)
        image = self._distort(image)
        if pad:
            image = self._pad_square(image)
        image, boxes, landmarks = self._mirror(image, boxes, landmarks)
        height, width = image.shape[:2]
        interpolation = self.INTERPOLATIONS[self.random.randrange(5)]
        image = cv2.resize(image, (self.size, self.size), interpolation=interpolation)
        image = image.astype(np.float32)
        image -= self.mean
        image = image.transpose(2, 0, 1)
        boxes[:, 0::2] /= width
        boxes[:, 1::2] /= height
        landmarks[:, 0::2] /= width
        landmarks[:, 1::2] /= height
        return image, np.hstack((boxes, landmarks, labels[:, None]))


def _time_worker(transform, paths_and_targets, batch: int = 32) -> float:
    """ms/img of decode + transform + collate, as one DataLoader worker runs them."""
    start = time.perf_counter()
    items = []
    for path, targets in paths_and_targets:
        items.append(transform(read_image(path), targets))
        if len(items) == batch:
            detection_collate(items)
            items = []
    if items:
        detection_collate(items)
    return (time.perf_counter() - start) * 1000.0 / len(paths_and_targets)


def _time_one(fn, samples) -> float:
    start = time.perf_counter()
    for image, targets in samples:
        fn(image, targets)
    return (time.perf_counter() - start) * 1000.0 / len(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="dataset root with <split>/label.txt and <split>/images (default: %(default)s)")
    parser.add_argument("--split", default="val", help="split folder inside --dataset (default: val)")
    parser.add_argument("--rounds", type=positive_int, default=20,
                        help="timed passes over the images per implementation")
    parser.add_argument("--im_size", type=positive_int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare_batches", type=positive_int, default=1,
                        help="batches of 32 on which the compiled augmentation is compared with the eager one")
    args = parser.parse_args(argv)
    if not (args.dataset / args.split / "label.txt").is_file():
        parser.error(f"--dataset: no {args.split}/label.txt in {args.dataset}")

    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    dataset = dataset_from_root(args.dataset, args.split)
    samples = [(read_image(dataset.image_path(i)), dataset.targets(i)) for i in range(len(dataset))]
    samples = [(img, t) for img, t in samples if len(t)]  # the public code cannot take empty images

    ours = TrainTransform(args.im_size, rng=args.seed)
    public = PublicPreprocReconstruction(args.im_size, seed=args.seed)

    def ours_converted(image: np.ndarray, targets: np.ndarray) -> torch.Tensor:
        augmented, _ = ours(image, targets)
        return preprocess(torch.from_numpy(augmented)[None])

    for image, targets in samples:  # warm-up (allocations, OpenCV dispatch)
        ours_converted(image, targets)
        public(image, targets)

    ours_ms, converted_ms, public_ms = [], [], []
    for _ in range(args.rounds):
        ours_ms.append(_time_one(ours, samples))
        converted_ms.append(_time_one(ours_converted, samples))
        public_ms.append(_time_one(public, samples))
    ours_med, public_med = statistics.median(ours_ms), statistics.median(public_ms)
    converted_med = statistics.median(converted_ms)

    # one worker's share per image: 64 images (the sample repeated) per round, batches of 32
    files = [(dataset.image_path(i), dataset.targets(i)) for i in range(len(dataset))]
    files = [files[i % len(files)] for i in range(64)]
    worker_modes = {"workers": TrainTransform(args.im_size, rng=args.seed),
                    "device": DeferredTrainTransform(args.im_size, rng=args.seed)}
    worker_ms: dict[str, list[float]] = {mode: [] for mode in worker_modes}
    for _ in range(max(1, args.rounds // 4)):
        for mode, transform in worker_modes.items():
            worker_ms[mode].append(_time_worker(transform, files))
    worker_med = {mode: statistics.median(values) for mode, values in worker_ms.items()}

    deferred = DeferredTrainTransform(args.im_size, rng=args.seed)
    batch, _ = detection_collate([deferred(read_image(path), targets) for path, targets in files[:32]])
    photometric(batch)  # the first call on a device builds the HSV conversion tables (about 0.7 s on one core)

    def augment_compiled(batch):
        return augment(batch, compiled=True)

    started = time.perf_counter()
    augment_compiled(batch)  # compiles (what inductor's on-disk cache holds shortens it)
    first_compiled_s = time.perf_counter() - started
    compared = {"batches": args.compare_batches, "values": 0, "differing": 0, "max_difference": 0.0}
    for k in range(args.compare_batches):  # one batch's difference in memory at a time (about 270 MB at 840 px)
        one = batch if k == 0 else detection_collate([DeferredTrainTransform(args.im_size, rng=args.seed + k)(
            read_image(path), targets) for path, targets in files[:32]])[0]
        difference = (augment_compiled(one) - augment(one)).abs()
        compared["values"] += difference.numel()
        compared["differing"] += int((difference > 0).sum())
        compared["max_difference"] = max(compared["max_difference"], float(difference.max()))
    steps = {"photometric": photometric, "augment": augment, "augment_compiled": augment_compiled}
    device_ms: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(1, args.rounds // 4)):
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            device_ms[name].append((time.perf_counter() - start) * 1000.0)

    result = {
        "benchmark": "augmentation_ms_per_img_one_core",
        "images": len(samples),
        "rounds": args.rounds,
        "im_size": args.im_size,
        "ours_ms_per_img": round(ours_med, 3),
        "public_reconstruction_ms_per_img": round(public_med, 3),
        "speedup": round(public_med / ours_med, 2),
        "ours_with_cpu_conversion_ms_per_img": round(converted_med, 3),
        "speedup_with_conversion_on_both_sides": round(public_med / converted_med, 2),
        "ours_ms_min_round": round(min(ours_ms), 3),
        "public_ms_min_round": round(min(public_ms), 3),
        "worker_ms_per_img": {mode: round(value, 3) for mode, value in worker_med.items()},
        "worker_images_per_s": {mode: round(1000.0 / value, 1) for mode, value in worker_med.items()},
        "worker_speedup_device_vs_workers": round(worker_med["workers"] / worker_med["device"], 2),
        "device_batch_ms": {**{name: round(statistics.median(values), 1) for name, values in device_ms.items()},
                            "images": len(batch), "pixels": batch.pixels.numel() // 3},
        "first_compiled_call_s": round(first_compiled_s, 2),
        "compiled_vs_eager": compared,
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cv2": cv2.__version__,
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "cv2_threads": cv2.getNumThreads(),
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
