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
unless ``--results_dir``); a model run first deletes those of an earlier run. Options are declared
in ``config.py``; the work is done by :mod:`utils.evaluation` and :mod:`utils.tta`.

Bad input does not stop the batch: a val image that cannot be read (or, with ``--pred_dir``, a
malformed prediction file) is named on stderr, the other images are evaluated (as a subset), the
results say how many files were left out, and the exit status is 3 (as train.py's and
inference.py's). Exit status: 0 done, 3 finished with files left out, 1 error (one line on
stderr), 2 bad option, 130 interrupted (143 for SIGTERM; the prediction files of the images done stay,
no results are written).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from config import (EXIT_OK, EXIT_SKIPPED, architecture_overrides, build_parser, detection_limit, moot_option_warnings,
                    parse_scales, run_command_line)

PROG = "test.py"

DESCRIPTION = ("Evaluate a RetinaFace checkpoint on WIDER FACE val (easy/medium/hard AP, official "
               "protocol), or an existing prediction folder with --pred_dir.")
EPILOG = ("exit status: 0 done; 3 finished, but some val images / prediction files could not be read (each "
          "is named, the others are evaluated as a subset); 1 error (missing dataset, ground truth or weights, "
          "results folder not writable, no file readable); 2 invalid option; 130 interrupted (143: SIGTERM). A val "
          "set with only part of the 3226 images is evaluated on those images only (reported as a subset).")
#: the options that --pred_dir uses (--dataset too when it locates the ground truth); the others
#: only matter when a model is run
PRED_DIR_OPTIONS = frozenset({"pred_dir", "gt_dir", "results_dir", "results_json"})


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
    from utils.tta import BASE_MAX_SIZE, BASE_SIZE  # noqa: PLC0415

    if args.tta:
        scales = ", ".join(str(s) if s else "original" for s in parse_scales(args.tta_scales))
        return (f"TTA: passes {scales} (each x size/{BASE_SIZE} of the base scale: shorter side {BASE_SIZE}, or "
                f"longer side {BASE_MAX_SIZE} where that is smaller) + horizontal flips, box voting at IoU "
                f"{args.nms_threshold}")
    if args.target_size:
        cap = f", longer side <= {args.max_size}" if args.max_size else ""
        return f"shorter side {args.target_size}{cap}"
    if args.max_size:
        return f"original size, longer side <= {args.max_size}"
    return "original size"


def report_error(message: str) -> None:
    """One ``test.py: error: ...`` line on stderr (a problem that does not stop the run)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)


def check_outputs(args: argparse.Namespace, results_dir: Path, *, model_run: bool) -> None:
    """Fail before any work when the results folder (with ``widerface_txt/`` for a model run) or
    ``--results_json`` cannot be written: one line naming the option (nothing is created)."""
    from utils.evaluation import PREDICTION_FOLDER, check_output_path  # noqa: PLC0415

    option = "--results_dir" if args.results_dir else "results folder"
    check_output_path(results_dir, option)
    if model_run:
        check_output_path(results_dir / PREDICTION_FOLDER, option)
    if args.results_json:
        check_output_path(args.results_json, "--results_json", is_file=True)


def ignored_with_pred_dir(args: argparse.Namespace) -> list[str]:
    """The model-run options set to something other than their default (``--pred_dir`` runs no
    model, so they change nothing); ``--dataset`` counts only when ``--gt_dir`` is given."""
    defaults = vars(build_parser("test").parse_args([]))
    used = PRED_DIR_OPTIONS if args.gt_dir else PRED_DIR_OPTIONS | {"dataset"}
    return [f"--{name}" for name, default in defaults.items()
            if name not in used and getattr(args, name) != default]


def _report(result, results_dir: Path, args: argparse.Namespace, *, seconds: float | None,
            num_images: int | None, details: list[str], unreadable: list[str], inputs: str) -> int:
    """Print the APs, write the result files; returns the exit status: 3 (finished, files skipped,
    as train.py and inference.py) when ``unreadable`` (one line per ``inputs`` file left out, e.g.
    "val images") is not empty."""
    from utils.evaluation import format_aps, subset_note, write_results  # noqa: PLC0415

    note = subset_note(result)
    if note:
        print(note)
    print(format_aps(result))
    write_results(results_dir, result, seconds=seconds, num_images=num_images, details=details,
                  json_path=args.results_json, unreadable=unreadable)
    print(f"results: {results_dir}/ (results.txt, results.json, pr_curves.png)"
          + (f" and {args.results_json}" if args.results_json else ""))
    if not unreadable:
        return EXIT_OK
    report_error(f"{len(unreadable)} of {len(unreadable) + result.num_images} {inputs} could not be read "
                 f"(named above, listed in results.json): the APs cover the other {result.num_images} only")
    return EXIT_SKIPPED


def evaluate_folder(args: argparse.Namespace) -> int:
    """``--pred_dir``: evaluate existing prediction files, no model."""
    from utils.evaluation import default_gt_dir, evaluate_prediction_dir, load_gt  # noqa: PLC0415

    ignored = ignored_with_pred_dir(args)
    if ignored:
        print(f"warning: {', '.join(ignored)} ignored with --pred_dir (no model is run)", file=sys.stderr)
    results_dir = results_folder(args)
    check_outputs(args, results_dir, model_run=False)
    gt = load_gt(args.gt_dir or default_gt_dir(args.dataset))
    started = time.perf_counter()
    problems: list[str] = []
    try:
        result = evaluate_prediction_dir(args.pred_dir, gt, problems=problems)
    finally:
        for problem in problems:
            report_error(f"skipped {problem}")
    seconds = time.perf_counter() - started
    print(f"evaluated {result.num_images} images of {args.pred_dir} in {seconds:.2f} s")
    return _report(result, results_dir, args, seconds=None, num_images=None,
                   details=[f"predictions: {args.pred_dir}", f"evaluation time: {seconds:.3f} s"],
                   unreadable=problems, inputs="prediction files")


def test(args: argparse.Namespace) -> int:
    """Run the checkpoint over the val images, write the prediction files, evaluate."""
    from models.detector import FaceDetector, resolve_device, use_device  # noqa: PLC0415
    from utils.checkpoint import checkpoint_for_run  # noqa: PLC0415
    from utils.evaluation import (PREDICTION_FOLDER, EvaluationError, check_images_in_gt,  # noqa: PLC0415
                                  default_gt_dir, evaluate_predictions, list_val_images, load_gt,
                                  predict_widerface, remove_results)
    from utils.tta import TTAConfig, TTADetector, merged_box_limit  # noqa: PLC0415

    results_dir = results_folder(args)
    check_outputs(args, results_dir, model_run=True)
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
    for option in ("target_size", "max_size", "top_k"):
        if args.tta and getattr(args, option) is not None:
            print(f"warning: --{option} is ignored with --tta (see --tta_scales)", file=sys.stderr)
    if not args.tta and args.tta_scales != build_parser("test").get_default("tta_scales"):
        print("warning: --tta_scales is ignored without --tta true", file=sys.stderr)
    for warning in moot_option_warnings(args, device):
        print(f"warning: {warning}", file=sys.stderr)
    detector = FaceDetector(weights, device=device, overrides=architecture_overrides(args),
                            confidence_threshold=args.confidence_threshold, nms_threshold=args.nms_threshold,
                            top_k=detection_limit(args.top_k), keep_top_k=detection_limit(args.keep_top_k),
                            target_size=args.target_size,
                            max_size=args.max_size, batch_size=args.batch_size,
                            half=args.half and device.type == "cuda", channels_last=args.channels_last,
                            cuda_graphs=args.cuda_graphs, pad_to=max(1, args.pad_to))
    if args.tta:
        detector = TTADetector(detector, TTAConfig(scales=tta_scales, keep_top_k=merged_box_limit(args.keep_top_k)))
    setting = scale_description(args)
    print(f"weights: {weights}  device: {device}  scale: {setting}  confidence > {args.confidence_threshold}  "
          f"{'vote' if args.tta else 'NMS'} IoU {args.nms_threshold}  images: {len(images)}")
    remove_results(results_dir, args.results_json)  # a run that stops part-way leaves no stale numbers
    run = predict_widerface(detector, images=images, out_dir=results_dir / PREDICTION_FOLDER,
                            batch_size=args.batch_size, workers=args.workers, progress=True)
    for path, reason in run.unreadable:
        report_error(f"cannot read {path}: {reason}")
    if not run.predictions:
        raise EvaluationError(f"none of the {len(run.unreadable)} val images could be read")
    result = evaluate_predictions(run.predictions, gt)
    print(f"{run.num_images} images in {run.seconds:.2f} s ({run.fps:.2f} fps), {run.num_detections} "
          f"detections -> {run.out_dir}/")
    stages = ", ".join(f"{k} {v:.3f} s" for k, v in run.timings.items())
    details = [f"weights: {weights}", f"device: {device}", f"scale: {setting}",
               f"confidence threshold: {args.confidence_threshold}",
               f"{'box-voting IoU' if args.tta else 'NMS threshold'}: {args.nms_threshold}",
               (f"merged boxes kept per image: {merged_box_limit(args.keep_top_k) or 'all'}" if args.tta else
                f"top-k before / after NMS: {args.top_k or 'all'} / {args.keep_top_k or 'all'}"),
               f"predictions: {run.out_dir}"] + ([f"detector time: {stages}"] if stages else [])
    return _report(result, results_dir, args, seconds=run.seconds, num_images=run.num_images, details=details,
                   unreadable=[f"{path}: {reason}" for path, reason in run.unreadable], inputs="val images")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from utils.errors import CheckpointError, sigterm_raises_terminated  # noqa: PLC0415
    from utils.evaluation import EvaluationError  # noqa: PLC0415

    def run(args: argparse.Namespace) -> int:
        with sigterm_raises_terminated():  # a batch job's time limit: a line and 143, as Ctrl-C gives 130
            return evaluate_folder(args) if args.pred_dir else test(args)

    return run_command_line("test", argv, run, (EvaluationError, CheckpointError, OSError, ValueError),
                            description=DESCRIPTION, epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(main())
