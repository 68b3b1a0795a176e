"""How much fp16 / bf16 autocast moves the detections, measured on the CPU.

Autocast rounds the same way on the CPU as on a GPU (the products are accumulated in float32
on both), so the effect of the 16-bit formats on the detections can be checked without a GPU.
For each format, FaceDetector runs the network under ``torch.autocast(dtype)`` and its
detections are compared with the float32 ones, image by image:

- ``moved``: float32 detections with score >= ``--min_score`` whose best-overlapping 16-bit
  detection has IoU < 0.98, and ``lowest_iou`` over all of them;
- ``max_score_diff`` / ``max_landmark_diff_px`` between each such detection and its best match;
- ``unmatched_both_ways``: the GPU benchmark's fidelity rule (``tools/fidelity.unmatched``, IoU
  >= 0.98, score within ``--score_tol``, landmarks within 1 px), counted in both directions.

``--sensitivity`` adds how strongly each network amplifies the 16-bit rounding: the median
absolute difference of the raw box offsets and class logits (every prior, both stages of a
cascade) between 16-bit and float32, divided by their float32 standard deviation, on crops of
the sample images, for the published mobilenet0.25 and for the randomly initialised ResNet-50
cascade that the GPU benchmark times (BatchNorm calibrated, 1 % face prior), and for any
``--sensitivity_weights`` checkpoint (e.g. a ResNet-50 cascade trained by
``tools/overfit_check.py --network resnet50 --cascade true --save FILE``). A random network has
no trained structure that keeps rounding errors small, so its fidelity verdicts say little about
a trained one.

    python tools/precision_check.py        # sample images and weights from $RETINAFACE_SHARED or ../shared
    python tools/precision_check.py --sensitivity [--sensitivity_weights trained.pth]

Prints one JSON object. Takes about 20 s on 2 cores (``--sensitivity``: about 40 s more).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from config import HelpFormatter  # noqa: E402
from models.detector import Detections, FaceDetector  # noqa: E402
from tools import shared_root  # noqa: E402
from tools.fidelity import as_rows, unmatched  # noqa: E402
from utils.image_io import IMAGE_EXTENSIONS, read_image  # noqa: E402

FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compare(reference: Detections, other: Detections, min_score: float, score_tol: float) -> dict:
    """Statistics of one image (see the module docstring)."""
    keep = reference.scores >= min_score
    boxes, scores, landmarks = reference.boxes[keep], reference.scores[keep], reference.landmarks[keep]
    stats = {"detections": int(keep.sum()), "moved": 0, "lowest_iou": 1.0, "max_score_diff": 0.0,
             "max_landmark_diff_px": 0.0}
    if len(boxes) and len(other):
        iou = box_iou(torch.from_numpy(boxes).double(), torch.from_numpy(other.boxes).double()).numpy()
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(len(boxes)), best]
        stats.update(moved=int((best_iou < 0.98).sum()), lowest_iou=float(best_iou.min()),
                     max_score_diff=float(np.abs(other.scores[best] - scores).max()),
                     max_landmark_diff_px=float(np.abs(other.landmarks[best] - landmarks).max()))
    elif len(boxes):
        stats.update(moved=len(boxes), lowest_iou=0.0)
    rows = [as_rows(d.boxes, d.scores, d.landmarks) for d in (reference, other)]
    stats["unmatched_both_ways"] = (len(unmatched(rows[0], rows[1], min_score, max_score_diff=score_tol))
                                    + len(unmatched(rows[1], rows[0], min_score, max_score_diff=score_tol)))
    return stats


@torch.no_grad()
def output_sensitivity(model: torch.nn.Module, images_u8: torch.Tensor) -> dict:
    """Per 16-bit format: median |16-bit - float32| / float32 std of the box offsets and class
    logits of ``model`` on uint8 (B, H, W, 3) BGR ``images_u8`` (CPU autocast)."""
    from models.retinaface import preprocess

    inputs = preprocess(images_u8)
    reference = model(inputs)
    result = {}
    for name, dtype in FORMATS.items():
        with torch.autocast("cpu", dtype=dtype):
            rounded = model(inputs)
        result[name] = {}
        for field in ("loc", "conf"):
            exact = torch.cat([getattr(stage, field).float().flatten() for stage in reference])
            low = torch.cat([getattr(stage, field).float().flatten() for stage in rounded])
            key = "box_offsets" if field == "loc" else "class_logits"
            result[name][key] = round(float((low - exact).abs().median() / exact.std()), 5)
    return result


def sensitivity_report(weights: str, arrays: list[np.ndarray], size: tuple[int, int], count: int,
                       extra: Sequence[str] = ()) -> dict:
    """``output_sensitivity`` of the published mobilenet0.25, of the GPU benchmark's random
    ResNet-50 cascade and of the checkpoints ``extra`` (keyed by file name) on ``count`` crops of
    ``arrays`` at ``size`` (width, height)."""
    from tools.benchmark_inference import load_benchmark_model, synthetic_batches
    from utils.checkpoint import load_model

    width, height = size
    crops = torch.from_numpy(synthetic_batches(count, width, height, "sample", arrays, 1, seed=7)[0])
    calibration = torch.from_numpy(synthetic_batches(8, width, height, "sample", arrays, 1, seed=99)[0])
    cpu = torch.device("cpu")
    report = {"images": count, "size": [width, height]}
    for name, source in (("mobilenet0.25", weights), ("resnet50_cascade", "random")):
        model, note = load_benchmark_model(name, source, cpu, calibration if source == "random" else None)
        report[name] = {"weights": note, **output_sensitivity(model, crops)}
    for path in extra:
        model = load_model(path).eval()
        report[Path(path).name] = {"weights": str(path), "model": str(model.config), **output_sensitivity(model, crops)}
    return report


def main(argv=None) -> int:
    shared = shared_root()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--weights", default=str(shared / "weights/mobilenet0.25_Final.pth"))
    parser.add_argument("--images", default=str(shared / "data/widerface_sample/val/images"))
    parser.add_argument("--min_score", type=float, default=0.5, help="float32 detections compared")
    parser.add_argument("--score_tol", type=float, default=0.01, help="score tolerance of the fidelity rule")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sensitivity", action="store_true",
                        help="also the rounding sensitivity of mobilenet0.25 and the random ResNet-50 cascade")
    parser.add_argument("--sensitivity_size", default="640x480", help="WIDTHxHEIGHT of its crops")
    parser.add_argument("--sensitivity_images", type=int, default=4, help="crops in its batch")
    parser.add_argument("--sensitivity_weights", action="append", default=[], metavar="CHECKPOINT",
                        help="also the sensitivity of this checkpoint (repeatable), e.g. a trained ResNet-50 cascade")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        parser.error(f"no images in {args.images}")
    images = [read_image(p) for p in paths]
    # candidates down to 0.3 so that a detection near --min_score still finds its counterpart
    detector = FaceDetector(args.weights, device="cpu", confidence_threshold=0.3)
    expected = [detector.detect(image) for image in images]
    report = {"images": len(images), "weights": args.weights, "torch": torch.__version__}
    for name, dtype in FORMATS.items():
        detector.dense.autocast_dtype = dtype  # autocast on the CPU (the public option is CUDA-only)
        per_image = [compare(e, detector.detect(image), args.min_score, args.score_tol)
                     for e, image in zip(expected, images)]
        report[name] = {"detections": sum(s["detections"] for s in per_image),
                        "moved": sum(s["moved"] for s in per_image),
                        "lowest_iou": round(min(s["lowest_iou"] for s in per_image), 4),
                        "max_score_diff": round(max(s["max_score_diff"] for s in per_image), 4),
                        "max_landmark_diff_px": round(max(s["max_landmark_diff_px"] for s in per_image), 3),
                        "unmatched_both_ways": sum(s["unmatched_both_ways"] for s in per_image)}
    if args.sensitivity:
        detector = None  # frees the folded copy before the ResNet-50 runs
        size = tuple(int(v) for v in args.sensitivity_size.lower().split("x"))
        report["sensitivity"] = sensitivity_report(args.weights, images, size, args.sensitivity_images,
                                                   args.sensitivity_weights)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
