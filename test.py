"""WIDER FACE validation: run a checkpoint over the val images and compute easy/medium/hard AP.

    # an experiment's checkpoint (experiments/<name>/ckpt/last.pth; --model_weight FILE for
    # another one), original image scale
    python test.py --experiment_name my_run --dataset data/widerface
    # any checkpoint file; the published "1600/2150" scale; multi-scale + flip TTA
    python test.py --weights mobilenet0.25_Final.pth --target_size 1600 --max_size 2150
    python test.py --weights mobilenet0.25_Final.pth --tta true
    # evaluate an existing folder of prediction files (no model)
    python test.py --pred_dir experiments/my_run/results/widerface_txt --gt_dir data/widerface/ground_truth

Prediction files go to ``<results>/widerface_txt/<event>/<stem>.txt`` and ``results.txt``,
``results.json`` and ``pr_curves.png`` to ``<results>`` (``experiments/<experiment_name>/results``
unless ``--results_dir``). Options are declared in ``config.py``; the work is done by
:mod:`utils.evaluation` and :mod:`utils.tta`. Exit status: 0 done, 1 error (one line on
stderr), 2 bad option, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from config import architecture_overrides, parse_scales, run_command_line

DESCRIPTION = ("Evaluate a RetinaFace checkpoint on WIDER FACE val (easy/medium/hard AP, official "
               "protocol), or an existing prediction folder with --pred_dir.")
EPILOG = ("exit status: 0 done; 1 error (missing dataset, ground truth or weights, bad prediction "
          "files); 2 invalid option; 130 interrupted. A val set with only part of the 3226 images "
          "is evaluated on those images only (reported as a subset).")


def results_folder(args: argparse.Namespace) -> Path:
    """``--results_dir``; else, with ``--pred_dir``, ``<pred_dir>_eval`` beside the predictions (the
    results of the model run that wrote them are never replaced); else
    ``experiments/<experiment_name>/results``."""
    if args.results_dir:
        return Path(args.results_dir)
    if args.pred_dir:
        predictions = Path(args.pred_dir).resolve()
        return predictions.with_name(predictions.name + "_eval")
    return Path("experiments") / args.experiment_name / "results"


def scale_description(args: argparse.Namespace) -> str:
    from utils.tta import DEFAULT_MAX_SIZE  # noqa: PLC0415

    if args.tta:
        scales = ", ".join(str(s) for s in parse_scales(args.tta_scales))
        return (f"TTA: shorter side {scales} (longer side <= {args.max_size or DEFAULT_MAX_SIZE}) + horizontal "
                f"flips, box voting at IoU {args.nms_threshold}")
    if args.target_size:
        cap = f", longer side <= {args.max_size}" if args.max_size else ""
        return f"shorter side {args.target_size}{cap}"
    if args.max_size:
        return f"original size, longer side <= {args.max_size}"
    return "original size"


def _report(result, results_dir: Path, args: argparse.Namespace, *, seconds: float | None,
            num_images: int | None, details: list[str]) -> None:
    from utils.evaluation import format_aps, subset_note, write_results  # noqa: PLC0415

    note = subset_note(result)
    if note:
        print(note)
    print(format_aps(result))
    write_results(results_dir, result, seconds=seconds, num_images=num_images, details=details,
                  json_path=args.results_json)
    print(f"results: {results_dir}/ (results.txt, results.json, pr_curves.png)"
          + (f" and {args.results_json}" if args.results_json else ""))


def evaluate_folder(args: argparse.Namespace) -> int:
    """``--pred_dir``: evaluate existing prediction files, no model."""
    from utils.evaluation import default_gt_dir, evaluate_prediction_dir, load_gt  # noqa: PLC0415

    ignored = [flag for flag, value in (("--weights", args.weights), ("--model_weight", args.model_weight),
                                        ("--tta", args.tta), ("--target_size", args.target_size)) if value]
    if ignored:
        print(f"warning: {', '.join(ignored)} ignored with --pred_dir (no model is run)", file=sys.stderr)
    gt = load_gt(args.gt_dir or default_gt_dir(args.dataset))
    started = time.perf_counter()
    result = evaluate_prediction_dir(args.pred_dir, gt)
    seconds = time.perf_counter() - started
    print(f"evaluated {result.num_images} images of {args.pred_dir} in {seconds:.2f} s")
    _report(result, results_folder(args), args, seconds=None, num_images=None,
            details=[f"predictions: {args.pred_dir}", f"evaluation time: {seconds:.3f} s"])
    return 0


def test(args: argparse.Namespace) -> int:
    """Run the checkpoint over the val images, write the prediction files, evaluate."""
    from models.detector import FaceDetector, resolve_device, use_device  # noqa: PLC0415
    from utils.checkpoint import checkpoint_for_run  # noqa: PLC0415
    from utils.evaluation import (PREDICTION_FOLDER, check_images_in_gt, default_gt_dir,  # noqa: PLC0415
                                  evaluate_predictions, list_val_images, load_gt, predict_widerface)
    from utils.tta import DEFAULT_MAX_SIZE, TTAConfig, TTADetector  # noqa: PLC0415

    images = list_val_images(args.dataset)
    gt = load_gt(args.gt_dir or default_gt_dir(args.dataset))
    check_images_in_gt(images, gt)
    # the end-of-schedule model by default, as the public code reports: best.pth was chosen by
    # hard AP on this same val set, so its AP is optimistic
    weights = checkpoint_for_run(args.weights, args.model_weight, args.experiment_name,
                                 candidates=("last.pth", "best.pth"))
    device = resolve_device(args.device, args.gpu_num)
    use_device(device)
    tta_scales = parse_scales(args.tta_scales) if args.tta else ()
    if args.tta and args.target_size:
        print("warning: --target_size is ignored with --tta (see --tta_scales)", file=sys.stderr)
    detector = FaceDetector(weights, device=device, overrides=architecture_overrides(args),
                            confidence_threshold=args.confidence_threshold, nms_threshold=args.nms_threshold,
                            top_k=args.top_k, keep_top_k=args.keep_top_k, target_size=args.target_size,
                            max_size=args.max_size, batch_size=args.batch_size,
                            half=args.half and device.type == "cuda", channels_last=args.channels_last,
                            cuda_graphs=args.cuda_graphs, pad_to=max(1, args.pad_to))
    if args.tta:
        detector = TTADetector(detector, TTAConfig(scales=tta_scales, max_size=args.max_size or DEFAULT_MAX_SIZE))
    setting = scale_description(args)
    results_dir = results_folder(args)
    print(f"weights: {weights}  device: {device}  scale: {setting}  confidence > {args.confidence_threshold}  "
          f"NMS IoU {args.nms_threshold}  images: {len(images)}")
    run = predict_widerface(detector, images=images, out_dir=results_dir / PREDICTION_FOLDER,
                            batch_size=args.batch_size, workers=args.workers, progress=True)
    result = evaluate_predictions(run.predictions, gt)
    print(f"{run.num_images} images in {run.seconds:.2f} s ({run.fps:.2f} fps), {run.num_detections} "
          f"detections -> {run.out_dir}/")
    stages = ", ".join(f"{k} {v:.3f} s" for k, v in run.timings.items())
    details = [f"weights: {weights}", f"device: {device}", f"scale: {setting}",
               f"confidence threshold: {args.confidence_threshold}", f"NMS threshold: {args.nms_threshold}",
               f"top-k before / after NMS: {args.top_k or 'all'} / {args.keep_top_k or 'all'}",
               f"predictions: {run.out_dir}"] + ([f"detector time: {stages}"] if stages else [])
    _report(result, results_dir, args, seconds=run.seconds, num_images=run.num_images, details=details)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from utils.errors import CheckpointError  # noqa: PLC0415
    from utils.evaluation import EvaluationError  # noqa: PLC0415

    return run_command_line("test", argv, lambda args: evaluate_folder(args) if args.pred_dir else test(args),
                            (EvaluationError, CheckpointError, OSError, ValueError),
                            description=DESCRIPTION, epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(main())
