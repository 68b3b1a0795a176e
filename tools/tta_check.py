"""Measure what test-time augmentation buys: AP of single scale vs multi-scale + flip variants.

    python tools/tta_check.py --weights /path/mobilenet0.25_Final.pth \\
        --dataset data/widerface_sample [--gt_dir ...] [--scales 0,500,800,1100,1400,1700]

Every (scale, flip) pass is run once per image and keeps its raw candidates (no NMS); the
variants below are merged from those cached passes with :class:`utils.tta.TTADetector`'s merge
(insightface's box voting, or plain NMS for comparison) and evaluated with the official protocol
(a subset when the val set is partial). Prints one row per variant: APs, hard-AP gain over single
scale, and the network seconds its passes cost. The first row is ``test.py``'s default (original
size, NMS; here on boxes clipped to the image); the ``paper`` row is what ``test.py --tta true``
computes with its default scales.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.detector import Detections  # noqa: E402
from utils.errors import CheckpointError  # noqa: E402
from utils.evaluation import (EvaluationError, check_images_in_gt, default_gt_dir,  # noqa: E402
                              evaluate_predictions, list_val_images, load_gt, prediction_rows,
                              protocol_detector)
from utils.image_io import ImageReadError, read_image  # noqa: E402
from utils.nms import nms  # noqa: E402
from config import one_line, parse_scales  # noqa: E402
from utils.tta import DEFAULT_SCALES, TTAConfig, TTADetector  # noqa: E402


def variants(all_scales: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], bool, str, int]]:
    """name -> (scales, flip, merge ('vote' or 'nms'), min_votes), restricted to measured scales."""
    paper = DEFAULT_SCALES
    table = {
        "single (original size), NMS": ((0,), False, "nms", 2),
        "original + flip": ((0,), True, "vote", 2),
        "paper (500..1700) + flip [--tta]": (paper, True, "vote", 2),
        "paper, no flip": (paper, False, "vote", 2),
        "paper + flip, NMS merge": (paper, True, "nms", 2),
        "paper + flip, single-box groups kept": (paper, True, "vote", 1),
        "paper + original + flip": ((0,) + paper, True, "vote", 2),
        "500,800,1100 + flip": ((500, 800, 1100), True, "vote", 2),
        "original,1100,1400 + flip": ((0, 1100, 1400), True, "vote", 2),
    }
    return {name: v for name, v in table.items() if set(v[0]) <= set(all_scales)}


def nms_merge(parts: list[Detections], threshold: float, keep_top_k: int | None) -> Detections:
    boxes = np.concatenate([p.boxes for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    landmarks = np.concatenate([p.landmarks for p in parts])
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()[:keep_top_k]  # +1 areas
    return Detections(boxes[keep], scores[keep], landmarks[keep])


def _scales(text: str) -> tuple[int, ...]:
    try:
        return parse_scales(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tta_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--gt_dir", default=None)
    parser.add_argument("--scales", type=_scales, default="0," + ",".join(map(str, DEFAULT_SCALES)),
                        help="pass sizes to measure (see test.py --tta_scales; 0 = original size)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        return measure(args)
    except (EvaluationError, CheckpointError, ImageReadError, OSError) as error:
        print(f"tta_check.py: error: {one_line(error)}", file=sys.stderr)
        return 1


def measure(args: argparse.Namespace) -> int:
    """Run every pass on every image, then print the table (see the module docstring)."""
    images = list_val_images(args.dataset)
    gt = load_gt(args.gt_dir or default_gt_dir(args.dataset))
    check_images_in_gt(images, gt)
    detector = protocol_detector(args.weights, args.device)  # test.py's protocol
    scales = args.scales
    # passes[(scale, flipped)][image index] -> Detections; seconds[scale] for both flips
    passes: dict[tuple[int, bool], list[Detections]] = defaultdict(list)
    seconds: dict[int, float] = defaultdict(float)
    runners = {s: TTADetector(detector, TTAConfig(scales=(s,))) for s in scales}
    for n, image in enumerate(images, 1):
        array = read_image(image.path)
        for scale, runner in runners.items():
            started = time.perf_counter()
            for size, flipped, found in runner.run_passes([array])[0]:
                passes[(size, flipped)].append(found)
            seconds[scale] += time.perf_counter() - started
        print(f"\r{n}/{len(images)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    merger = TTADetector(detector, TTAConfig(scales=(0,)))
    print(f"{len(images)} images, thresholds: confidence 0.02, NMS/vote IoU 0.4")
    print(f"{'variant':38s} {'easy':>8s} {'medium':>8s} {'hard':>8s} {'d hard':>8s} {'seconds':>8s}")
    base_hard = None
    for name, (chosen, flip, merge, min_votes) in variants(scales).items():
        keys = [(s, f) for s in chosen for f in ((False, True) if flip else (False,))]
        merger.config = TTAConfig(scales=chosen, flip=flip, min_votes=min_votes)
        predictions: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        for i, image in enumerate(images):
            parts = [passes[k][i] for k in keys]
            if merge == "nms":
                merged = nms_merge(parts, 0.4, detector.keep_top_k)
            else:
                merged = merger.merge(parts)
            predictions[image.event][image.stem] = prediction_rows(merged)[0]
        result = evaluate_predictions(predictions, gt)
        base_hard = result.hard if base_hard is None else base_hard
        cost = sum(seconds[s] for s in chosen) / (1 if flip else 2)
        print(f"{name:38s} {result.easy:8.4f} {result.medium:8.4f} {result.hard:8.4f} "
              f"{result.hard - base_hard:+8.4f} {cost:8.1f}")
    if len(images) < gt.num_images:
        print(f"subset: {len(images)} of {gt.num_images} images, not comparable with full-val numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
