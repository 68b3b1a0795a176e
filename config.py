"""The one command-line definition shared by train.py, test.py and inference.py.

Every option is declared once in ``OPTIONS`` together with the scripts that use it, so each
script's ``--help`` lists only its own options while names, types and help texts stay identical
across scripts. Flag names of the original project are kept (``--gpu_num``, ``--experiment_name``,
``--model_weight`` ...); booleans are written ``true``/``false``.

Architecture options (``--network``, ``--num_anchor``, ``--cascade``, ``--cascade_mode``,
``--model_version``) default to ``None``: a checkpoint that records its configuration wins, and
otherwise the defaults of :class:`models.retinaface.ModelConfig` apply.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Sequence

from models import NETWORKS

SCRIPTS = ("train", "test", "inference")
TRAIN, TEST, INFERENCE = SCRIPTS
ALL = frozenset(SCRIPTS)


def str2bool(value: str | bool) -> bool:
    """argparse type for ``true``/``false`` flags (also yes/no, 1/0, any letter case)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "t", "y"):
        return True
    if lowered in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def probability(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return number


def device_name(value: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; availability is checked when the device is used."""
    lowered = value.strip().lower()
    if lowered in ("cpu", "cuda") or (lowered.startswith("cuda:") and lowered[5:].isdigit()):
        return lowered
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")


@dataclass(frozen=True)
class Option:
    """One command-line option: its flags, the scripts that use it and argparse keywords.

    ``defaults`` overrides ``kwargs['default']`` for particular scripts (for example the
    confidence threshold is 0.02 for evaluation but 0.5 for inference).
    """

    flags: tuple[str, ...]
    scripts: frozenset[str]
    kwargs: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)


def _opt(*flags: str, scripts=ALL, defaults: dict[str, Any] | None = None, **kwargs: Any) -> Option:
    return Option(tuple(flags), frozenset(scripts), kwargs, defaults or {})


OPTIONS: tuple[Option, ...] = (
    # --- run and device -------------------------------------------------------------------
    _opt("--experiment_name", type=str, default="retinaface",
         help="experiment folder experiments/<name>/ (checkpoints, logs, results)"),
    _opt("--gpu_num", type=non_negative_int, default=0,
         help="CUDA device index used when CUDA is available (default: 0)"),
    _opt("--device", type=device_name, default=None,
         help="cpu, cuda or cuda:N; overrides --gpu_num (default: cuda:<gpu_num> if available, else cpu)"),
    _opt("--batch_size", type=positive_int, default=1, defaults={TRAIN: 16},
         help="images per batch (train default 16, test/inference default 1)"),
    _opt("--workers", type=non_negative_int, default=2,
         help="DataLoader worker processes for image decoding and augmentation"),
    _opt("--half", type=str2bool, default=False, scripts={TEST, INFERENCE},
         help="run the network in reduced precision on CUDA (bf16 where supported, else fp16)"),
    # --- weights ---------------------------------------------------------------------------
    _opt("--model_weight", type=str, default=None, scripts={TEST, INFERENCE},
         help="checkpoint file name inside experiments/<experiment_name>/ckpt/ (e.g. best.pth)"),
    _opt("--weights", type=str, default=None, scripts={TEST, INFERENCE},
         help="'mobilenet0.25' or 'resnet50' for the published Pytorch_Retinaface weights "
              "(downloaded once into the torch hub cache), or a path to any checkpoint"),
    # --- architecture (checkpoint configuration wins when it records one) ------------------
    _opt("--network", type=str, choices=NETWORKS, default=None,
         help="backbone (default: from the checkpoint, else resnet50)"),
    _opt("--num_anchor", type=int, choices=(2, 3), default=None,
         help="anchors per feature-map location (default: from the checkpoint, else 2)"),
    _opt("--cascade", type=str2bool, default=None,
         help="second (cascade) detection stage, true/false (default: from the checkpoint, else true)"),
    _opt("--cascade_mode", type=str, choices=("refine", "residual"), default=None,
         help="refine: stage 2 regresses from stage-1 boxes; residual: the original project's "
              "stage-2 offsets added to stage-1 offsets (default: from the checkpoint, else refine)"),
    _opt("--model_version", type=str, choices=("retina", "tina"), default=None,
         help="retina, or tina (adds an IoU head; score = sqrt(class prob * IoU)) "
              "(default: from the checkpoint, else retina)"),
    # --- detection thresholds -------------------------------------------------------------
    _opt("--confidence_threshold", type=probability, default=0.5, scripts={TEST, INFERENCE},
         defaults={TEST: 0.02},
         help="minimum face score kept (test default 0.02 for AP, inference default 0.5)"),
    _opt("--nms_threshold", type=probability, default=0.3, scripts={TEST, INFERENCE},
         defaults={TEST: 0.4},
         help="NMS IoU threshold (test default 0.4, inference default 0.3)"),
    _opt("--top_k", type=positive_int, default=5000, scripts={TEST, INFERENCE},
         help="highest-scoring candidates per image entering NMS"),
    _opt("--keep_top_k", type=positive_int, default=750, scripts={TEST, INFERENCE},
         help="detections kept per image after NMS"),
    _opt("--max_size", type=positive_int, default=None, scripts={TEST, INFERENCE},
         help="cap the longer image side at this many pixels (boxes are mapped back); "
              "default: original scale"),
    # --- data ------------------------------------------------------------------------------
    _opt("--dataset", type=str, default="data/widerface", scripts={TRAIN, TEST},
         help="dataset root holding train/images, train/label.txt, val/images, val/label.txt"),
    # --- training --------------------------------------------------------------------------
    _opt("--epochs", type=positive_int, default=None, scripts={TRAIN},
         help="training epochs (default: 250 for mobilenet0.25, 100 for ResNets)"),
    _opt("--im_size", type=positive_int, default=640, scripts={TRAIN},
         help="square training image size after augmentation"),
    _opt("--landmark_loss", type=str2bool, default=True, scripts={TRAIN},
         help="train the landmark head (true/false)"),
    # --- evaluation ------------------------------------------------------------------------
    _opt("--gt_dir", type=str, default=None, scripts={TEST},
         help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat "
              "(default: <dataset>/ground_truth)"),
    _opt("--pred_dir", type=str, default=None, scripts={TEST},
         help="evaluate an existing folder of WIDER FACE prediction files; no model is run"),
    _opt("--results_json", type=str, default=None, scripts={TEST},
         help="also write the AP results JSON to this path"),
    _opt("--target_size", type=positive_int, default=None, scripts={TEST},
         help="resize the shorter side to this size (e.g. 1600 with --max_size 2150)"),
    _opt("--tta", type=str2bool, default=False, scripts={TEST},
         help="multi-scale + horizontal-flip test-time augmentation"),
    # --- inference -------------------------------------------------------------------------
    _opt("--inference_dir", type=str, default=None, scripts={INFERENCE},
         help="folder of images (searched recursively; jpg, jpeg, png, bmp, webp)"),
    _opt("--inference_save_folder", type=str, default="inference_results", scripts={INFERENCE},
         help="output folder"),
    _opt("--save_img", type=str2bool, default=False, scripts={INFERENCE},
         help="write images with boxes, scores and landmarks drawn"),
    _opt("--mask", type=str2bool, default=False, scripts={INFERENCE},
         help="compute MediaPipe face and head masks"),
    _opt("--save_mask", type=str2bool, default=False, scripts={INFERENCE},
         help="write face/head crops and masks"),
    _opt("--infer_imsize_same", type=str2bool, default=False, scripts={INFERENCE},
         help="batch images of the same size together"),
    _opt("--exist_ok", type=str2bool, default=False, scripts={INFERENCE},
         help="allow writing into an output folder that already holds results"),
)


def build_parser(script: str, description: str | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` holding exactly the options that ``script`` uses."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; expected one of {SCRIPTS}")
    parser = argparse.ArgumentParser(
        prog=f"{script}.py", description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for option in OPTIONS:
        if script not in option.scripts:
            continue
        kwargs = dict(option.kwargs)
        if script in option.defaults:
            kwargs["default"] = option.defaults[script]
        parser.add_argument(*option.flags, **kwargs)
    return parser


def parse_args(script: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with the parser of ``script``."""
    return build_parser(script).parse_args(argv)


ARCHITECTURE_FLAGS = ("network", "num_anchor", "cascade", "cascade_mode", "model_version")


def architecture_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture options given on the command line (those not left at ``None``)."""
    return {name: getattr(args, name) for name in ARCHITECTURE_FLAGS
            if getattr(args, name, None) is not None}
