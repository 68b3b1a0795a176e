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

    python tools/precision_check.py        # sample images and weights from $RETINAFACE_SHARED or ../shared

Prints one JSON object. Takes about 20 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from models.detector import Detections, FaceDetector  # noqa: E402
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


def main(argv=None) -> int:
    shared = Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", default=str(shared / "weights/mobilenet0.25_Final.pth"))
    parser.add_argument("--images", default=str(shared / "data/widerface_sample/val/images"))
    parser.add_argument("--min_score", type=float, default=0.5, help="float32 detections compared")
    parser.add_argument("--score_tol", type=float, default=0.01, help="score tolerance of the fidelity rule")
    parser.add_argument("--threads", type=int, default=2)
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
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
