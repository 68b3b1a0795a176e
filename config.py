"""The one command-line definition shared by train.py, test.py and inference.py.

Every option is declared once in ``OPTIONS`` together with the scripts that use it, so each
script's ``--help`` lists only its own options while names, types and help texts stay identical
across scripts. Flag names of the original project are kept (``--gpu_num``, ``--experiment_name``,
``--model_weight`` ...); booleans are written ``true``/``false``.

Architecture options (``--network``, ``--num_anchor``, ``--cascade``, ``--cascade_mode``,
``--model_version``) default to ``None``: a checkpoint that records its configuration wins, a
foreign checkpoint's architecture is inferred from its weight names, and a model trained from
scratch takes the defaults of :class:`models.retinaface.ModelConfig`.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Sequence

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


def bool_or_auto(value: str | bool | None) -> bool | None:
    """argparse type for ``auto``/``true``/``false`` settings: None for ``auto`` (the code picks)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        return str2bool(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}") from None


def _checked_int(value: str, accept: Callable[[int], bool], expected: str) -> int:
    """``int(value)`` when ``accept`` takes it, else an argparse error ``expected <expected>`` (also
    for text that is no integer, e.g. ``1.5``, which argparse would name by this function's name)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if not accept(number):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    return _checked_int(value, lambda n: n > 0, "a positive integer")


#: the smallest training image: one cell of the coarsest feature map (stride 32)
MIN_IM_SIZE = 32


def training_image_size(value: str) -> int:
    return _checked_int(value, lambda n: n >= MIN_IM_SIZE,
                        f"an integer >= {MIN_IM_SIZE} (the coarsest feature map has stride 32)")


def experiment_name(value: str) -> str:
    """argparse type for ``--experiment_name``: one folder name (``experiments/<name>/``, and the
    inference results file ``<name>_inference_results.txt``), so no path separators, not empty."""
    if not value or value != value.strip() or value in (".", "..") or "/" in value or "\\" in value:
        raise argparse.ArgumentTypeError(f"expected a folder name without '/' or surrounding spaces, got {value!r}")
    return value


def non_negative_int(value: str) -> int:
    return _checked_int(value, lambda n: n >= 0, "an integer >= 0")


def count_or_all(value: str) -> int:
    """argparse type of ``--top_k`` / ``--keep_top_k``: a count, or ``0`` / ``all`` for no limit
    (returned as 0; :func:`detection_limit` turns it into the detector's ``None``)."""
    return 0 if value.strip().lower() == "all" else _checked_int(value, lambda n: n >= 0, "an integer >= 0 or all")


def detection_limit(value: int | None) -> int | None:
    """A ``--top_k`` / ``--keep_top_k`` value as the detector takes it: 0 (all) and None -> None."""
    return value or None


def _checked_float(value: str, accept: Callable[[float], bool], expected: str, unparsable: str | None = None) -> float:
    """``float(value)`` when ``accept`` takes it, else an argparse error ``expected <expected>``
    (``<unparsable>`` when it is not a number at all)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {unparsable or expected}, got {value!r}") from None
    if not accept(number):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def non_negative_float(value: str) -> float:
    """argparse type for a finite number >= 0 (learning rate, weight decay, warm-up epochs)."""
    return _checked_float(value, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0", "a number >= 0")


def momentum_factor(value: str) -> float:
    """argparse type for an SGD momentum: a number in [0, 1) (nan is refused too)."""
    return _checked_float(value, lambda x: 0.0 <= x < 1.0, "a number in [0, 1)")


def epoch_list(value: str) -> str:
    """argparse type for ``--lr_steps``: comma-separated positive epochs, e.g. ``190,220``.
    Returns them sorted and comma-joined (a plain string, as checkpoints record the options)."""
    parts = [part.strip() for part in str(value).split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive epochs such as 190,220, got {value!r}")
    return ",".join(str(epoch) for epoch in sorted(int(part) for part in parts))


def parse_scales(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"500,800,1100"`` (or a sequence; spaces also separate) -> ``(500, 800, 1100)``; ``0``
    stands for the original image size. Raises ValueError when empty, with an empty item
    (``"500,,800"``) or not integers >= 0."""
    if isinstance(text, str):
        parts = re.split(r"\s*,\s*|\s+", text.strip())
        if "" in parts:
            raise ValueError(f"expected comma-separated integers >= 0, got {text!r}")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"expected comma-separated integers >= 0, got {text!r}") from None
    else:
        values = tuple(int(v) for v in text)
    if not values or any(v < 0 for v in values):
        raise ValueError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def scale_list(value: str) -> str:
    """argparse type for ``--tta_scales``: checked with :func:`parse_scales`, kept as written."""
    try:
        parse_scales(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def probability(value: str) -> float:
    return _checked_float(value, lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]")


def compile_backend(value: str | bool | None) -> str | None:
    """argparse type for ``--compile``: ``false`` -> None (eager), ``true`` -> ``"inductor"``, or
    the name of a ``torch.compile`` backend (checked when the model is compiled)."""
    if value is None or isinstance(value, bool):
        return "inductor" if value else None
    try:
        return "inductor" if str2bool(value) else None
    except argparse.ArgumentTypeError:
        name = value.strip()
        if not name.replace("_", "").isalnum():
            raise argparse.ArgumentTypeError(
                f"expected true, false or a torch.compile backend name, got {value!r}") from None
        return name


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
    _opt("--experiment_name", type=experiment_name, default="retinaface",
         help="experiment folder experiments/<name>/: train.py writes its checkpoints and logs there; "
              "test.py and inference.py take its checkpoint when no --weights is given, and inference.py "
              "names its <name>_inference_results.txt after it"),
    _opt("--gpu_num", type=non_negative_int, default=0,
         help="CUDA device index used when CUDA is available (default: 0)"),
    _opt("--device", type=device_name, default=None,
         help="cpu, cuda or cuda:N; overrides --gpu_num (default: cuda:<gpu_num> if available, else cpu)"),
    _opt("--batch_size", type=positive_int, default=1, defaults={TRAIN: 16},
         help="images per batch (train default 16, test/inference default 1)"),
    _opt("--workers", type=non_negative_int, default=2,
         help="DataLoader worker processes decoding images (training: and augmenting them)"),
    _opt("--half", type=str2bool, default=False, scripts={TEST, INFERENCE},
         help="run the network in fp16 autocast on CUDA (ignored on the CPU)"),
    _opt("--channels_last", type=bool_or_auto, default=None, metavar="{auto,true,false}", scripts={TEST, INFERENCE},
         help="memory format of the network: true NHWC, false NCHW; auto (default): NHWC, except NCHW on "
              "CUDA for mobilenet0.25, whose NHWC depthwise convolutions cost ~1 s per new image size "
              "(README, GPU benchmarks)"),
    _opt("--pad_to", type=non_negative_int, default=0, scripts={TEST, INFERENCE},
         help="batch images of different sizes (--batch_size per pass) on canvases rounded up to a "
              "multiple of this many pixels, grouped by canvas; exact: the network masks the padding. "
              "Few distinct batch shapes for cuDNN and CUDA graphs (for GPUs; slower on the CPU). "
              "0 (default): only same-size images share a pass"),
    _opt("--cuda_graphs", type=str2bool, default=True, scripts={TEST, INFERENCE},
         help="on CUDA, replay the network of image sizes seen before from CUDA graphs (the first 4 "
              "repeated sizes; false: always launch kernel by kernel)"),
    # --- weights ---------------------------------------------------------------------------
    _opt("--model_weight", type=str, default=None, scripts={TEST, INFERENCE},
         help="checkpoint file name inside experiments/<experiment_name>/ckpt/ (e.g. best.pth); without it "
              "and --weights: test.py takes last.pth, else best.pth; inference.py best.pth, else last.pth"),
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
    _opt("--top_k", type=count_or_all, default=5000, scripts={TEST, INFERENCE}, defaults={TEST: None},
         help="highest-scoring candidates per image entering NMS, 0 or all = no limit (inference default "
              "5000; test default: all, as the public test_widerface.py)"),
    _opt("--keep_top_k", type=count_or_all, default=750, scripts={TEST, INFERENCE}, defaults={TEST: None},
         help="detections kept per image after NMS, 0 or all = no limit (inference default 750; test "
              "default: all, as the public test_widerface.py; with --tta: merged boxes, default 750 as "
              "insightface)"),
    _opt("--max_size", type=positive_int, default=None, scripts={TEST, INFERENCE},
         help="cap the longer image side at this many pixels (boxes are mapped back); "
              "default: original scale"),
    # --- data ------------------------------------------------------------------------------
    _opt("--dataset", type=str, default="data/widerface", scripts={TRAIN, TEST},
         help="dataset root: train/images and train/label.txt (training), val/images/<event>/*.jpg "
              "(evaluation; val/label.txt, when present, lists the images) and ground_truth/"),
    # --- training --------------------------------------------------------------------------
    _opt("--epochs", type=positive_int, default=None, scripts={TRAIN},
         help="training epochs (default: 250 for mobilenet0.25, 100 for ResNets)"),
    _opt("--im_size", type=training_image_size, default=640, scripts={TRAIN},
         help=f"square training image size after augmentation (at least {MIN_IM_SIZE})"),
    _opt("--augment_on", type=str, choices=("workers", "device"), default="workers", scripts={TRAIN},
         help="where the pixel work of the augmentation runs: 'workers' (OpenCV in the DataLoader "
              "workers) or 'device' (workers only decode and crop; photometric distortion, flip and "
              "resize run batched on the training device; same random draws and targets, pixels within "
              "2 levels; for GPUs that the CPU cores cannot keep fed)"),
    _opt("--compile_augment", type=str2bool, default=False, scripts={TRAIN},
         help="with --augment_on device: torch.compile its pixel work into a few fused kernels (the same "
              "values on the CPU; on CUDA the float16 resize may differ by a level; each new case compiles "
              "when first met, a few per run); false (default): eager kernels"),
    _opt("--landmark_loss", type=str2bool, default=True, scripts={TRAIN},
         help="train the landmark head (true/false)"),
    _opt("--empty_image_negatives", type=non_negative_int, default=0, scripts={TRAIN},
         help="hard negatives mined in each training image without positive anchors (background "
              "images, images whose faces are all too small); 0 = none, as the public loss, so such "
              "images add no loss term"),
    _opt("--train_split", type=str, default="train", scripts={TRAIN},
         help="split folder of --dataset to train on (<dataset>/<split>/label.txt and images/)"),
    _opt("--lr", type=non_negative_float, default=1e-3, scripts={TRAIN},
         help="base learning rate of SGD (per process batch; not scaled with the GPU count)"),
    _opt("--momentum", type=momentum_factor, default=0.9, scripts={TRAIN}, help="SGD momentum, in [0, 1)"),
    _opt("--weight_decay", type=non_negative_float, default=5e-4, scripts={TRAIN}, help="SGD weight decay"),
    _opt("--lr_schedule", type=str, choices=("step", "cosine"), default="step", scripts={TRAIN},
         help="step: x0.1 at --lr_steps; cosine: cosine decay to 0 over all epochs (after warm-up)"),
    _opt("--lr_steps", type=epoch_list, default=None, scripts={TRAIN},
         help="comma-separated epochs of the x0.1 step decays (default: the reference points "
              "190,220 of 250 epochs for mobilenet0.25, 70,90 of 100 for ResNets, scaled to --epochs)"),
    _opt("--warmup_epochs", type=non_negative_float, default=1.0, scripts={TRAIN},
         help="linear learning-rate warm-up length in epochs (0 = none)"),
    _opt("--resume", type=str, default=None, scripts={TRAIN},
         help="continue a run from its checkpoint (e.g. experiments/<name>/ckpt/last.pth): weights, "
              "optimizer, LR schedule, AMP scaler, step, RNG states, best metric"),
    _opt("--init_weights", type=str, default=None, scripts={TRAIN},
         help="start from the weights of any detector checkpoint (fine-tuning), e.g. the published "
              "mobilenet0.25_Final.pth, or the names mobilenet0.25 / resnet50 (the published weights, "
              "downloaded once into the torch hub cache); its architecture is used unless overridden"),
    _opt("--pretrained", type=str2bool, default=True, scripts={TRAIN},
         help="initialise the backbone with ImageNet weights (ResNets: torchvision download; "
              "mobilenet0.25: --backbone_weights or weights/mobilenetV1X0.25_pretrain.tar)"),
    _opt("--backbone_weights", type=str, default=None, scripts={TRAIN},
         help="local ImageNet backbone file (mobilenetV1X0.25_pretrain.tar, or a torchvision "
              "ResNet state dict); refused with --pretrained false"),
    _opt("--val_dataset", type=str, default=None, scripts={TRAIN},
         help="dataset root with val/images (val/label.txt, when present, lists the images) for "
              "the periodic WIDER FACE AP (default: --dataset when it has a val/ split)"),
    _opt("--eval_every", type=non_negative_int, default=10, scripts={TRAIN},
         help="evaluate easy/medium/hard AP every N epochs and at the end (0 = never)"),
    _opt("--save_every", type=non_negative_int, default=0, scripts={TRAIN},
         help="also write last.pth every N iterations (0 = only at epoch ends and at the end)"),
    _opt("--max_iters", type=non_negative_int, default=0, scripts={TRAIN},
         help="stop after this many training iterations in total (0 = run all epochs)"),
    _opt("--seed", type=non_negative_int, default=42, scripts={TRAIN},
         help="seed of weight init, data order and augmentation (a resumed run keeps its own)"),
    _opt("--deterministic", type=str2bool, default=False, scripts={TRAIN},
         help="torch.use_deterministic_algorithms and no cudnn.benchmark (slower, reproducible)"),
    _opt("--compile", type=compile_backend, default=None, scripts={TRAIN},
         help="torch.compile the model for training: false (default), true (inductor) or a backend "
              "name; the first step compiles (a minute or more), evaluation runs uncompiled"),
    _opt("--cuda_graphs", type=bool_or_auto, default=None, metavar="{auto,true,false}", scripts={TRAIN},
         help="replay the network's forward and backward passes from CUDA graphs captured at start-up "
              "(the loss and the optimizer stay eager): the host launches two graphs instead of every "
              "kernel, which sets the pace of mobilenet0.25's step (README, Training). auto (default): on "
              "when one process trains on a CUDA GPU without --compile; "
              "true: required (not with --compile or several processes; ignored on the CPU); false: off"),
    _opt("--amp", type=str2bool, default=True, scripts={TRAIN},
         help="automatic mixed precision on CUDA (bf16 on GPUs of compute capability 8 or more, else fp16 "
              "with a GradScaler); ignored on the CPU"),
    _opt("--amp_dtype", type=str, choices=("auto", "bf16", "fp16"), default="auto", scripts={TRAIN},
         help="autocast type of --amp true: auto (bf16 from compute capability 8, else fp16), bf16, or "
              "fp16 with a GradScaler (PyTorch hands BatchNorm of fp16 inputs to cuDNN and of bf16 inputs to "
              "its own kernels; README, Training)"),
    _opt("--sync_bn", type=str2bool, default=False, scripts={TRAIN},
         help="SyncBatchNorm across processes in multi-GPU (CUDA) runs"),
    _opt("--log_every", type=positive_int, default=20, scripts={TRAIN},
         help="iterations between loss read-backs (progress bar, logs.txt, TensorBoard, NaN check)"),
    # --- evaluation ------------------------------------------------------------------------
    _opt("--gt_dir", type=str, default=None, scripts={TRAIN, TEST},
         help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat "
              "(default: <dataset>/ground_truth; training: <val_dataset>/ground_truth)"),
    _opt("--pred_dir", type=str, default=None, scripts={TEST},
         help="evaluate an existing folder of WIDER FACE prediction files (<event>/<image stem>.txt, e.g. "
              "<results>/widerface_txt); no model is run, model-run options are ignored with a warning"),
    _opt("--results_json", type=str, default=None, scripts={TEST},
         help="also write the AP results JSON to this path"),
    _opt("--target_size", type=positive_int, default=None, scripts={TEST},
         help="resize the shorter side to this size (e.g. 1600 with --max_size 2150)"),
    _opt("--tta", type=str2bool, default=False, scripts={TEST},
         help="multi-scale + horizontal-flip test-time augmentation as insightface's test_widerface.py: "
              "every --tta_scales pass, each also mirrored, the raw candidates of all passes merged by "
              "score-weighted box voting at the --nms_threshold IoU (--target_size, --max_size and --top_k "
              "do not apply)"),
    _opt("--tta_scales", type=scale_list, default="500,800,1100,1400,1700", scripts={TEST},
         help="comma-separated --tta pass sizes: the shorter side at a base scale that makes it 800 "
              "(the longer side 1200 where that is smaller), times size/800 (the RetinaFace paper's "
              "test scales; 0 = original size)"),
    _opt("--results_dir", type=str, default=None, scripts={TEST},
         help="folder for widerface_txt/ (prediction files), results.txt, results.json and "
              "pr_curves.png (default: experiments/<experiment_name>/results; with --pred_dir: "
              "<pred_dir>_eval beside the predictions)"),
    # --- inference -------------------------------------------------------------------------
    _opt("--inference_dir", type=str, default=None, scripts={INFERENCE},
         help="folder of images, searched recursively (jpg, jpeg, png, bmp, webp, any letter case); "
              "unreadable, truncated, empty and non-image files are skipped and listed (exit status 3)"),
    _opt("--inference_save_folder", type=str, default="inference_results", scripts={INFERENCE},
         help="output folder: <experiment_name>_inference_results.txt, detections.json, summary.json "
              "(+ result_images/, masks/, faces/, heads/, head_masks/, aligned/); a folder that already holds "
              "results is refused unless --exist_ok true"),
    _opt("--save_img", type=str2bool, default=False, scripts={INFERENCE},
         help="write images with boxes, scores and landmarks drawn to result_images/"),
    _opt("--mask", type=str2bool, default=False, scripts={INFERENCE},
         help="compute MediaPipe selfie-segmentation face and head masks (needs mediapipe)"),
    _opt("--save_mask", type=str2bool, default=False, scripts={INFERENCE},
         help="write face masks (masks/), face crops (faces/), head crops (heads/) and head masks "
              "(head_masks/) as <image stem>_<face index>.<ext>; implies --mask"),
    _opt("--save_aligned", type=str2bool, default=False, scripts={INFERENCE},
         help="write each face warped onto the ArcFace 5-landmark template to aligned/ as <image "
              "stem>_<face index>.<ext> (input crops for face recognition; no mediapipe needed)"),
    _opt("--aligned_size", type=positive_int, default=112, scripts={INFERENCE},
         help="side of the square aligned crops (the template is scaled from 112x112)"),
    _opt("--infer_imsize_same", type=str2bool, default=False, scripts={INFERENCE},
         help="group images of the same size into batches of --batch_size (one forward pass each)"),
    _opt("--exist_ok", type=str2bool, default=False, scripts={INFERENCE},
         help="allow writing into an output folder that already holds results (files are overwritten)"),
    _opt("--max_pixels", type=non_negative_int, default=36_000_000, scripts={INFERENCE},
         help="images with more pixels are downscaled to this many for the network, with a warning "
              "(boxes are mapped back to the original image); 0 = never"),
)


EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: the run finished, but some input was skipped (inference: files; training: unreadable training
#: images, or a periodic validation that failed)
EXIT_SKIPPED = 3


class UsageError(Exception):
    """An invalid command-line option, raised by parsers built with ``raise_usage_errors``."""


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` only where the help text does not already say the default and there
    is one; booleans are shown as written on the command line (``true``/``false``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = str(action.default).lower() if isinstance(action.default, bool) else "%(default)s"
        return f"{text} (default: {shown})"


def build_parser(script: str, description: str | None = None, epilog: str | None = None,
                 raise_usage_errors: bool = False) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` holding exactly the options that ``script`` uses.

    With ``raise_usage_errors`` an invalid option raises :class:`UsageError` instead of printing
    the usage and exiting, so :func:`run_command_line` can report it in one line.
    """
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; expected one of {SCRIPTS}")
    parser = argparse.ArgumentParser(
        prog=f"{script}.py", description=description, epilog=epilog, formatter_class=HelpFormatter)
    if raise_usage_errors:
        def error(message: str) -> NoReturn:
            raise UsageError(message)
        parser.error = error  # type: ignore[method-assign]
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


def add_architecture_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--network`` ... ``--model_version`` as the scripts declare them, for tools that load
    checkpoints (``tools/export_onnx.py``)."""
    for option in OPTIONS:
        if option.flags[0].removeprefix("--") in ARCHITECTURE_FLAGS:
            parser.add_argument(*option.flags, **option.kwargs)


def architecture_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture options given on the command line (those not left at ``None``)."""
    return {name: getattr(args, name) for name in ARCHITECTURE_FLAGS
            if getattr(args, name, None) is not None}


def _negative_value_hint(message: str, argv: Sequence[str]) -> str:
    """argparse takes a value such as ``-1e-3`` after an option for another option (only plain
    negative numbers like ``-1`` pass); say how to write it."""
    match = re.fullmatch(r"argument (--\w+): expected one argument", message)
    if match is None:
        return ""
    tokens = list(argv)
    for option, value in zip(tokens, tokens[1:]):
        if option == match.group(1) and value.startswith("-"):
            try:
                float(value)
            except ValueError:
                return ""
            return f" (a negative value is written {option}={value})"
    return ""


#: what an option of another script is called here (the usual mix-ups)
_OPTION_HERE = {(TRAIN, "--weights"): "--init_weights PATH fine-tunes a checkpoint, --resume PATH "
                                      "continues its run",
                (TRAIN, "--model_weight"): "--resume PATH continues a run from its checkpoint",
                (TEST, "--resume"): "--weights PATH or --model_weight FILE picks the checkpoint",
                (TEST, "--init_weights"): "--weights PATH or --model_weight FILE picks the checkpoint",
                (INFERENCE, "--resume"): "--weights PATH or --model_weight FILE picks the checkpoint",
                (INFERENCE, "--init_weights"): "--weights PATH or --model_weight FILE picks the checkpoint"}


#: options of the public Pytorch_Retinaface scripts (train.py, test_widerface.py, detect.py) and what
#: takes their place here, for users who bring their command lines
_PUBLIC_OPTIONS = {
    "--training_dataset": "--dataset DIR (the folder holding train/label.txt and train/images/, not the label file)",
    "--num_workers": "--workers N",
    "--resume_net": "--resume PATH (continues a run of this project exactly) or --init_weights PATH (fine-tunes "
                    "any checkpoint, the published ones included)",
    "--resume_epoch": "--resume PATH (the checkpoint holds its epoch and step)",
    "--gamma": "--lr_steps E1,E2 (the decay epochs; the factor is 0.1, as the public default)",
    "--save_folder": "--experiment_name NAME (train.py: experiments/NAME/; test.py: --results_dir DIR; "
                     "inference.py: --inference_save_folder DIR)",
    "--trained_model": "--weights PATH (or mobilenet0.25 / resnet50 for the published weights)",
    "--origin_size": "nothing: the original size is the default (test.py --target_size 1600 --max_size 2150 for the "
                     "other setting)",
    "--dataset_folder": "--dataset DIR (the folder holding val/images/ and val/label.txt)",
    "--cpu": "--device cpu",
    "--save_image": "--save_img true (inference.py)",
    "--vis_thres": "--confidence_threshold T (inference.py draws every face it keeps)",
}


def _other_script_hint(script: str, message: str) -> str:
    """For an unrecognized option that another script takes: which script, and what this one
    takes instead where the two are often confused (``train.py --weights``); for an option of the
    public Pytorch_Retinaface scripts, what takes its place here."""
    if "invalid choice: 'mobile0.25'" in message:
        return " (Pytorch_Retinaface's mobile0.25 is mobilenet0.25 here)"
    if not message.startswith("unrecognized arguments: "):
        return ""
    for token in message.split(": ", 1)[1].split():
        option = token.split("=", 1)[0]
        if not option.startswith("--"):
            continue
        if option in _PUBLIC_OPTIONS:
            return f" ({option} is Pytorch_Retinaface's; here: {_PUBLIC_OPTIONS[option]})"
        owners = [f"{name}.py" for name in SCRIPTS
                  if name != script and option in build_parser(name)._option_string_actions]
        if owners:
            instead = _OPTION_HERE.get((script, option))
            return f" ({option} is an option of {' and '.join(owners)}" + (f"; here {instead}" if instead else "") + ")"
    return ""


#: messages of checks that the command line makes before any work (exit 2) and the Python APIs
#: repeat for their own callers (utils.checkpoint.checkpoint_for_run, utils.inference_utils.run_inference)
WEIGHTS_CONFLICT = "give either --weights or --model_weight, not both"
NO_INFERENCE_INPUT = "no input: pass --inference_dir DIR (a folder of images, searched recursively, or one image)"
CUDA_GRAPHS_WITH_COMPILE = ("--cuda_graphs true and --compile are alternatives (each takes the kernel launches off "
                            "the host); choose one")


def moot_option_warnings(args: argparse.Namespace, device: Any,
                         needs: dict[str, str] | None = None) -> list[str]:
    """Warnings for options that do nothing in this run on ``device`` (a ``torch.device``):
    ``--half`` and ``--gpu_num`` on the CPU, and each option (a value of ``needs``) given without
    the switch it serves (its key)."""
    found = []
    if getattr(args, "half", False) and device.type != "cuda":
        found.append("--half is only used on CUDA; running in float32")
    if getattr(args, "gpu_num", 0) and device.type == "cpu" and getattr(args, "device", None) is None:
        found.append(f"--gpu_num {args.gpu_num} given, but CUDA is not available: running on the CPU "
                     "(--device cuda makes this an error)")
    for switch, option in (needs or {}).items():
        default = build_parser("inference").get_default(option)
        if not getattr(args, switch, False) and getattr(args, option, default) != default:
            found.append(f"--{option} is ignored without --{switch} true")
    return found


def check_option_combinations(script: str, args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` for options that are valid alone but not together, or a missing
    option a command-line run needs (the Python APIs fill in their own)."""
    if getattr(args, "weights", None) and getattr(args, "model_weight", None):
        raise UsageError(WEIGHTS_CONFLICT)
    if script == INFERENCE and not args.inference_dir:
        raise UsageError(NO_INFERENCE_INPUT)
    if script == TRAIN and args.cuda_graphs and args.compile:
        raise UsageError(CUDA_GRAPHS_WITH_COMPILE)
    if script == TRAIN and args.compile_augment and args.augment_on != "device":
        raise UsageError("--compile_augment true compiles the pixel work of --augment_on device; "
                         "add --augment_on device")
    if script == TRAIN and args.backbone_weights is not None and not args.pretrained:
        raise UsageError("--backbone_weights loads ImageNet weights and --pretrained false asks for none: give one "
                         "of them")
    # an empty path would otherwise mean "not given" (the default) to the code that reads it
    for flag in ("pred_dir", "gt_dir", "results_dir", "results_json", "dataset", "inference_dir",
                 "inference_save_folder", "weights", "model_weight", "resume", "init_weights", "backbone_weights",
                 "val_dataset", "train_split"):
        value = getattr(args, flag, None)
        if value is not None and not str(value).strip():
            raise UsageError(f"--{flag} is empty")


def run_command_line(script: str, argv: Sequence[str] | None, run: Callable[[argparse.Namespace], int],
                     expected_errors: tuple[type[BaseException], ...], description: str | None = None,
                     epilog: str | None = None) -> int:
    """Parse ``argv`` for ``script`` and call ``run(args)``; returns the exit status.

    Invalid options (:data:`EXIT_USAGE`) and ``expected_errors`` raised by ``run`` (missing files,
    bad weights, unusable device: :data:`EXIT_ERROR`) are reported as one line on stderr, without
    a traceback; Ctrl-C gives :data:`EXIT_INTERRUPTED`, SIGTERM where the script turns it into
    :class:`utils.errors.Terminated` 143.
    """
    parser = build_parser(script, description=description, epilog=epilog, raise_usage_errors=True)
    try:
        args = parser.parse_args(argv)
        check_option_combinations(script, args)
    except UsageError as error:
        hint = (_negative_value_hint(one_line(error), sys.argv[1:] if argv is None else argv)
                or _other_script_hint(script, one_line(error)))
        print(f"{parser.prog}: error: {one_line(error)}{hint} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as done:  # --help
        return int(done.code or 0)
    try:
        return run(args)
    except expected_errors as error:
        print(f"{parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as stop:  # Ctrl-C, or utils.errors.Terminated (SIGTERM), which says what it was
        print(f"{parser.prog}: {getattr(stop, 'what', 'interrupted')}", file=sys.stderr)
        return getattr(stop, "exit_status", EXIT_INTERRUPTED)
