"""Benchmark of ``utils.metric.evaluate`` against the loop reference on the full WIDER FACE val set.

Builds a synthetic prediction set from the real ground truth (jittered copies of most faces,
some duplicates, random false positives, scores rounded to 3 decimals so that ties occur, a few
images without detections), then times

* (a) ground-truth loading (``load_ground_truth``),
* (b) ``evaluate`` (best of ``--repeats``),
* (c) the loop reference ``tools/reference_widerface_eval.py`` (once; public-tool style),

checks that the APs agree to 1e-6 and prints ONE JSON line. Usage (from the repo root)::

    python tools/benchmark_metric.py [--gt_dir ../shared/data/widerface_sample/ground_truth]

``--write_predictions DIR`` also writes the synthetic set as a WIDER FACE prediction folder
(``DIR/<event>/<stem>.txt``), to time ``test.py --pred_dir DIR``; ``--fp_per_image`` sets the
mean number of false positives per image (15; about 168 gives the ~560,000 boxes that
confidence 0.02 leaves on the full val set).

(default: ``$RETINAFACE_SHARED/data/widerface_sample/ground_truth``, ``$RETINAFACE_SHARED``
defaulting to ``../shared`` beside the checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from utils.metric import (SETTINGS, WiderFaceGroundTruth, evaluate, load_ground_truth,  # noqa: E402
                          write_prediction_file)


def make_synthetic_predictions(
    gt: WiderFaceGroundTruth,
    seed: int = 0,
    image_indices: np.ndarray | None = None,
    detect_prob: float = 0.8,
    fp_per_image: float = 15.0,
    empty_prob: float = 0.01,
    score_decimals: int | None = 3,
) -> dict[str, dict[str, np.ndarray]]:
    """``{event: {stem: (N, 5) x y w h score}}`` for ``image_indices`` (default: all images).

    Faces are detected with a probability growing with their size (``detect_prob`` for large
    faces), jittered by ~10% of their size, scored high; 5% of detections are duplicated with a
    second jitter; ``Poisson(fp_per_image)`` false positives with low-ish scores are added per
    image; ``empty_prob`` of the images get no detection at all. Rows are written in descending
    score order like a detector's output, except that equal scores keep generation order.
    """
    rng = np.random.default_rng(seed)
    idx = np.arange(gt.num_images) if image_indices is None else np.asarray(image_indices)
    out: dict[str, dict[str, np.ndarray]] = {}
    for i in idx:
        event, stem = gt.events[gt.image_event[i]], gt.image_stems[i]
        per = out.setdefault(event, {})
        if rng.random() < empty_prob:
            per[stem] = np.zeros((0, 5))
            continue
        boxes = gt.image_boxes(int(i))
        size = np.sqrt(np.clip(boxes[:, 2], 1, None) * np.clip(boxes[:, 3], 1, None))
        p_det = detect_prob * np.clip(size / 30.0, 0.15, 1.0)
        det = boxes[rng.random(len(boxes)) < p_det]
        dup = det[rng.random(len(det)) < 0.05]
        det = np.concatenate([det, dup])
        scale = np.maximum(det[:, 2:4], 2.0)
        jit = det.copy()
        jit[:, 0:2] += rng.normal(0, 0.08, (len(det), 2)) * scale
        jit[:, 2:4] = np.maximum(1.0, det[:, 2:4] * np.exp(rng.normal(0, 0.1, (len(det), 2))))
        s_det = np.clip(rng.beta(5, 1.5, len(det)), 0.02, 1.0)
        extent = np.maximum(boxes[:, :2].max(0) + boxes[:, 2:].max(0), 64.0) if len(boxes) else np.array([1024.0, 768.0])
        n_fp = rng.poisson(fp_per_image)
        wh = np.exp(rng.uniform(np.log(4), np.log(200), (n_fp, 2)))
        xy = rng.uniform(0, 1, (n_fp, 2)) * extent
        s_fp = np.clip(rng.beta(1.2, 4, n_fp), 0.02, 1.0)
        rows = np.concatenate([np.column_stack([jit, s_det]), np.column_stack([xy, wh, s_fp])])
        if score_decimals is not None:
            rows[:, 4] = np.round(rows[:, 4], score_decimals)
            rows[:, :4] = np.round(rows[:, :4], 1)
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        per[stem] = rows
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from tools import shared_root  # noqa: PLC0415

    shared = shared_root()
    parser.add_argument("--gt_dir", default=str(shared / "data/widerface_sample/ground_truth"),
                        help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_reference", action="store_true", help="do not run the slow loop reference")
    parser.add_argument("--fp_per_image", type=float, default=15.0, help="mean false positives per image")
    parser.add_argument("--write_predictions", default=None, metavar="DIR",
                        help="also write the synthetic predictions as a WIDER FACE prediction folder")
    args = parser.parse_args(argv)
    if not Path(args.gt_dir).is_dir():
        parser.error(f"--gt_dir: folder not found: {args.gt_dir}")

    import torch

    t0 = time.perf_counter()
    gt = load_ground_truth(args.gt_dir)
    load_s = time.perf_counter() - t0

    preds = make_synthetic_predictions(gt, seed=args.seed, fp_per_image=args.fp_per_image)
    num_boxes = sum(len(a) for per in preds.values() for a in per.values())
    if args.write_predictions:
        for event, per_image in preds.items():
            for stem, rows in per_image.items():
                write_prediction_file(Path(args.write_predictions) / event / f"{stem}.txt", stem, rows)

    times = []
    result = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = evaluate(preds, gt)
        times.append(time.perf_counter() - t0)
    assert result is not None
    ours_s = min(times)
    record: dict[str, object] = {
        "benchmark": "widerface_metric",
        "num_images": result.num_images,
        "num_gt_images": result.num_gt_images,
        "num_boxes": num_boxes,
        "gt_load_s": round(load_s, 4),
        "evaluate_s_best": round(ours_s, 4),
        "evaluate_s_all": [round(t, 4) for t in times],
        "ap_ours": {s: result.aps[s] for s in SETTINGS},
    }
    if not args.skip_reference:
        from tools.reference_widerface_eval import load_reference_gt, reference_evaluate

        ref_gt = load_reference_gt(args.gt_dir)
        t0 = time.perf_counter()
        ref = reference_evaluate(preds, ref_gt)
        ref_s = time.perf_counter() - t0
        diffs = {s: abs(float(ref[s]["ap"]) - result.aps[s]) for s in SETTINGS}
        record.update(
            {
                "reference_s": round(ref_s, 3),
                "speedup": round(ref_s / ours_s, 1),
                "ap_reference": {s: float(ref[s]["ap"]) for s in SETTINGS},
                "max_abs_ap_diff": max(diffs.values()),
                "agree_1e-6": max(diffs.values()) <= 1e-6,
            }
        )
    record.update(
        {
            "numpy": np.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        }
    )
    print(json.dumps(record))
    if not args.skip_reference and not record["agree_1e-6"]:
        raise SystemExit("APs disagree with the reference by more than 1e-6")
    return record


if __name__ == "__main__":
    main()
