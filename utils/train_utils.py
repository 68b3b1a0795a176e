"""The RetinaFace training pipeline as importable pieces (``train.py`` only parses and calls them).

Entry point: :func:`train` (``args`` from ``config.parse_args('train', argv)``), built from

- :func:`utils.distributed.setup_distributed` / ``cleanup_distributed``: single process, or one
  process per GPU under ``torchrun`` (DDP; NCCL on CUDA, gloo on the CPU; rank 0 logs and saves);
- :func:`build_model`: architecture from the options / ``--init_weights`` / ``--resume``,
  ImageNet backbone (``--pretrained``, ``--backbone_weights``);
- :func:`build_optimizer` (SGD) and :func:`utils.lr_schedule.build_scheduler` (per-iteration linear
  warm-up, then x0.1 steps at the reference epochs or cosine);
- :func:`utils.train_data.build_train_loader`: augmentation whose randomness depends only on
  ``(seed, epoch, image index)`` and a sampler that can skip the first batches of an epoch, so
  ``--resume`` from any iteration continues exactly (any ``--workers``);
- :func:`train_one_epoch`: autocast (bf16, or fp16 + GradScaler) on CUDA, losses read back
  only every ``--log_every`` iterations (NaN/inf check, logs, TensorBoard, progress bar);
- :func:`evaluate_widerface`: official easy/medium/hard AP of the images of a val split;
- :func:`utils.train_state.save_training_state` / ``load_training_state``: ``last.pth`` /
  ``best.pth`` with everything ``--resume`` needs, loadable with ``torch.load(weights_only=True)``.

Outputs go to ``experiments/<experiment_name>/`` (relative to the working directory; a ``--resume``
without ``--experiment_name`` continues in the folder of its checkpoint, see :func:`run_folder`):
``ckpt/last.pth``, ``ckpt/best.pth``, ``log/logs.txt`` and TensorBoard event files in ``log/``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from config import CUDA_GRAPHS_WITH_COMPILE, architecture_overrides, one_line
from layers.multibox_loss import LOSS_TERMS, MultiBoxLoss
from layers.prior_box import prior_boxes
from models.retinaface import ModelConfig, RetinaFace, unwrap_model
from utils.checkpoint import (
    CheckpointError,
    infer_model_config,
    load_state_dict_strict,
    read_checkpoint,
    resolve_weights,
    split_checkpoint,
)
from utils.distributed import DistInfo, check_ranks_agree, cleanup_distributed, setup_distributed
from utils.errors import Terminated, TrainingDivergedError, TrainingSetupError, sigterm_raises_terminated
from utils.evaluation import EvaluationError
from utils.image_io import ImageReadError
from utils.lr_schedule import (build_scheduler, decay_epoch_notes, recipe_differences, resolve_epochs_and_steps,
                               warmup_notes)
from utils.progress import progress_bar
from utils.train_data import LoadReport, ResumableSampler, build_train_loader, loader_notes, prepared_batches
from utils.train_state import (
    REPORTED_ON_LOAD, load_training_state, plain_value, save_training_state, zero_missing_momentum_buffers,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MOBILENET_BACKBONE = REPO_ROOT / "weights" / "mobilenetV1X0.25_pretrain.tar"

__all__ = [
    "seed_everything", "configure_backends", "model_config_from_args", "build_model", "wrap_model",
    "graph_training_network", "build_optimizer", "describe_amp", "AMP_DTYPES", "autocast_settings", "TrainContext",
    "train_one_epoch", "evaluate_widerface", "check_no_run_overwritten", "create_run_folders", "train",
]


# --------------------------------------------------------------------------------------------
# Seeding, backends
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch (same on every rank: identical initial weights) and numpy/python (per rank)."""
    torch.manual_seed(seed)
    np.random.seed((seed + rank) % (2 ** 32))
    random.seed(seed + rank)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cudnn.benchmark on CUDA (unless ``deterministic``); TF32 matmuls; deterministic algorithms
    when asked (warn-only on CUDA, where nearest-upsampling backward has no deterministic kernel)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
def model_config_from_args(args: argparse.Namespace, base: ModelConfig | None = None) -> ModelConfig:
    """``base`` (a checkpoint's architecture, else the ModelConfig defaults) with the
    architecture options given on the command line applied."""
    return (base or ModelConfig()).replace(**architecture_overrides(args))


def _backbone_weights(args: argparse.Namespace, network: str) -> tuple[bool, str | None]:
    """(pretrained, backbone_weights) for RetinaFace(); clear errors for missing files."""
    path = getattr(args, "backbone_weights", None)
    if path is not None:
        if not Path(path).is_file():
            raise TrainingSetupError(f"--backbone_weights {path}: file not found")
        return True, str(path)
    if not getattr(args, "pretrained", False):
        return False, None
    if network == "mobilenet0.25":
        if DEFAULT_MOBILENET_BACKBONE.is_file():
            return True, str(DEFAULT_MOBILENET_BACKBONE)
        raise TrainingSetupError(
            "mobilenet0.25 needs its ImageNet backbone file: pass --backbone_weights "
            "path/to/mobilenetV1X0.25_pretrain.tar, or put it at "
            f"{DEFAULT_MOBILENET_BACKBONE}, or train from scratch with --pretrained false")
    return True, None


def load_init_weights(model: RetinaFace, state_dict: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load detector weights for fine-tuning. Strict when the architectures agree; otherwise
    every tensor whose name and shape match is loaded (all backbone tensors must), the rest
    (e.g. a new cascade stage or IoU head) keeps its initialisation. Returns notes for the log."""
    expected = model.state_dict()
    if set(expected) == set(state_dict) and all(expected[k].shape == state_dict[k].shape for k in expected):
        load_state_dict_strict(model, state_dict, source)
        return [f"initial weights: {source} (all {len(expected)} tensors)"]
    usable = {k: v for k, v in state_dict.items() if k in expected and expected[k].shape == v.shape}
    body_missing = [k for k in expected if k.startswith("body.") and k not in usable]
    if body_missing:
        raise TrainingSetupError(f"--init_weights {source}: its backbone does not match {model.config} "
                                 f"(missing or mis-shaped {body_missing[:4]} ...)")
    model.load_state_dict(usable, strict=False)
    new = [k for k in expected if k not in usable]
    dropped = [k for k in state_dict if k not in usable]
    return [f"initial weights: {source}: loaded {len(usable)} of {len(expected)} tensors; "
            + (f"{len(new)} newly initialised (e.g. {new[:3]})" if new else "none newly initialised")
            + (f", {len(dropped)} unused (e.g. {dropped[:3]})" if dropped else ", none unused")]


def build_model(args: argparse.Namespace, resume_checkpoint: Mapping[str, Any] | None = None
                ) -> tuple[RetinaFace, list[str]]:
    """Build the (unwrapped, CPU) model for training and return it with notes for the log.

    - ``resume_checkpoint``: the run's recorded architecture and weights (options that disagree
      are ignored with a warning);
    - ``--init_weights``: architecture of that checkpoint (recorded, or inferred from the keys of
      foreign files such as the published Pytorch_Retinaface weights) with command-line
      overrides, and its weights (see :func:`load_init_weights`);
    - otherwise the options over the ModelConfig defaults, with ImageNet backbone weights when
      ``--pretrained true`` (torchvision download for ResNets; mobilenet0.25 needs the local
      ``mobilenetV1X0.25_pretrain.tar``).
    """
    notes: list[str] = []
    if resume_checkpoint is not None:
        state, recorded = split_checkpoint(resume_checkpoint)
        config = recorded or infer_model_config(state)
        conflicts = {k: v for k, v in architecture_overrides(args).items() if getattr(config, k) != v}
        if conflicts:
            notes.append(f"resuming: the checkpoint records its architecture; ignoring {conflicts}")
        model = RetinaFace(config)
        load_state_dict_strict(model, state, "resume checkpoint")
        return model, notes
    init_state = None
    base = None
    if getattr(args, "init_weights", None):
        try:
            path = resolve_weights(args.init_weights)
            init_state, recorded = split_checkpoint(read_checkpoint(path))
            base = recorded or infer_model_config(init_state)
        except CheckpointError as error:
            raise TrainingSetupError(f"--init_weights: {error}") from None
    try:
        config = model_config_from_args(args, base)
    except ValueError as error:
        raise TrainingSetupError(str(error)) from None
    if init_state is not None:
        model = RetinaFace(config)
        notes += load_init_weights(model, init_state, str(args.init_weights))
        if getattr(args, "backbone_weights", None):
            notes.append("note: --backbone_weights ignored: the --init_weights checkpoint holds the backbone")
        return model, notes
    pretrained, backbone_weights = _backbone_weights(args, config.network)
    try:
        model = RetinaFace(config, pretrained=pretrained, backbone_weights=backbone_weights)
    except CheckpointError as error:  # a file that is not a state dict of tensors (names the file)
        raise TrainingSetupError(f"backbone weights: {error}") from None
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        if backbone_weights is None and pretrained:
            raise TrainingSetupError(
                f"could not get the torchvision ImageNet weights of {config.network} ({error}); "
                "without internet use --pretrained false or --backbone_weights PATH "
                "(a torchvision state dict of the backbone)") from None
        raise TrainingSetupError(f"--backbone_weights: {one_line(error)}") from None
    notes.append(f"backbone: {'ImageNet weights ' + (backbone_weights or '(torchvision)') if pretrained else 'random init'}")
    return model, notes


def wrap_model(model: RetinaFace, info: DistInfo, sync_bn: bool = False, channels_last: bool = False,
               compile_backend: str | None = None) -> nn.Module:
    """Move to the device (channels_last on CUDA), wrap in DDP when distributed, then
    ``torch.compile`` the result with ``compile_backend`` (None: eager). The compiled module runs
    the training forward passes; :func:`unwrap` gives the eager model (same parameters) for
    saving and evaluation."""
    if compile_backend is not None:
        from torch import _dynamo  # a local `import torch._dynamo` would make `torch` local to this function

        backends = _dynamo.list_backends(exclude_tags=())
        if compile_backend not in backends:
            raise TrainingSetupError(f"--compile {compile_backend}: not a torch.compile backend of this PyTorch "
                                     f"(choose true or one of {', '.join(backends)})")
    if info.distributed and sync_bn:
        if info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            warnings.warn("--sync_bn is only used on CUDA; keeping per-process BatchNorm", stacklevel=2)
    model = model.to(info.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # BatchNorm statistics are broadcast from rank 0 at every forward: DDP's default, not named
        # here because the argument for it changed name (broadcast_buffers, forward_sync_buffers)
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile_backend is not None:
        model = torch.compile(model, backend=compile_backend)
    return model


def compile_augment_notes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The log note of ``--compile_augment true``, or :class:`TrainingSetupError` where it cannot
    run: on CUDA torch.compile's kernels are Triton's, which some PyTorch installations lack."""
    if not getattr(args, "compile_augment", False):
        return []
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise TrainingSetupError("--compile_augment true: torch.compile needs Triton on CUDA, and this Python has none "
                                 "(pip install triton, or train with --compile_augment false)")
    return ["--compile_augment: the augmentation's kernels compile (torch.compile) for each new case they meet, most "
            "in the first batches"]


def graph_training_network(ctx: TrainContext, args: argparse.Namespace, autocast_dtype: torch.dtype | None
                           ) -> list[str]:
    """``--cuda_graphs``: make ``ctx.model`` a :class:`utils.graphed_training.GraphedTrainingNetwork`
    of the network (captured for batches of ``--batch_size`` at ``--im_size``). ``auto`` (None) does
    so when one process trains on a CUDA GPU without ``--compile`` (bf16, fp16 with loss scaling or
    float32), and leaves the model as it is otherwise; ``false`` never. Returns notes for the log;
    ``true`` raises :class:`TrainingSetupError` with ``--compile`` (which the command line refuses
    too, but a resume can inherit) or several processes."""
    from utils.graphed_training import GraphedTrainingNetwork

    info = ctx.info
    requested = getattr(args, "cuda_graphs", None)  # None: auto, which skips silently what true refuses
    if requested is False:
        return []
    if info.device.type != "cuda":
        return [] if requested is None else ["note: --cuda_graphs true ignored on the CPU (CUDA graphs need a GPU)"]
    refusal = (CUDA_GRAPHS_WITH_COMPILE if getattr(args, "compile", None) else
               "--cuda_graphs true trains one process on one GPU: leave it false under torchrun with several "
               "processes" if info.distributed else None)
    if refusal is not None:
        if requested is None:
            return []
        raise TrainingSetupError(refusal)
    shape = (args.batch_size, 3, args.im_size, args.im_size)
    started = time.perf_counter()
    ctx.model = GraphedTrainingNetwork(ctx.model, shape, ctx.channels_last, autocast_dtype)
    return [f"CUDA graphs: the network's forward and backward passes replay graphs captured for batches of "
            f"{args.batch_size} at {args.im_size} px ({time.perf_counter() - started:.1f} s)"]


#: the :class:`RetinaFace` inside what :func:`wrap_model` returns (torch.compile, DDP)
unwrap = unwrap_model


# --------------------------------------------------------------------------------------------
# Optimizer and mixed precision
# --------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with ``--momentum`` and ``--weight_decay`` on every parameter (defaults 0.9 and 5e-4, the
    public recipe); the fused CUDA kernel when the parameters are on a GPU (one launch for all of
    them), with its momentum buffers created as zeros here.

    Why zeros first: on its first step the fused kernel allocates the buffers and writes them in
    the update, so a first step that fp16's GradScaler skips (inf in a gradient) leaves them
    uninitialised and the next step reads that memory (the CPU kernel of torch 2.14 does so, see
    tests/test_train.py; fp16 training went NaN within 33 steps on an H200, torch 2.11, 2026-11-27,
    most likely this way). With the buffers present every step is the kernel's later-step update,
    ``buffer = momentum * buffer + gradient``, which gives the first step the same ``buffer =
    gradient`` and which a skipped step leaves alone. The scaler then hands its overflow flag to the
    kernel, so fp16 steps never wait for the host."""
    params = list(model.parameters())
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                fused=fused or None)
    zero_missing_momentum_buffers(optimizer)
    return optimizer


def describe_amp(dtype: torch.dtype | None, device: torch.device, amp: bool) -> str:
    """The mixed precision in use for the start-up line: ``bfloat16``, ``float16 with loss
    scaling``, ``off`` or ``off (CPU)`` (``--amp true`` is a CUDA feature)."""
    if dtype is None:
        return "off (CPU)" if amp and device.type != "cuda" else "off"
    name = str(dtype).removeprefix("torch.")
    return f"{name} with loss scaling" if dtype == torch.float16 else name


#: ``--amp_dtype`` values; None: chosen by the GPU.
AMP_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_settings(device: torch.device, amp: bool, amp_dtype: str = "auto"
                      ) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """Autocast dtype (``amp_dtype``: ``auto`` is bf16 on GPUs of compute capability 8 or more,
    where cuDNN has bf16 kernels, else fp16; ``bf16``; ``fp16``; ``None`` on the CPU or without
    ``amp``) and a GradScaler that is enabled only for fp16."""
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    if amp and device.type == "cuda":
        # not torch.cuda.is_bf16_supported(): it also says yes where bf16 is only emulated (V100,
        # T4), and it asks the current GPU, not necessarily the training one
        dtype = AMP_DTYPES[amp_dtype]
        if dtype is None:
            dtype = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return None, torch.amp.GradScaler(device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------
@dataclass
class TrainContext:
    """Everything the loop needs; ``model`` is what runs forward (DDP wrapper or the model),
    ``raw_model`` the :class:`RetinaFace` inside."""

    args: argparse.Namespace
    info: DistInfo
    model: nn.Module
    raw_model: RetinaFace
    criterion: MultiBoxLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: DataLoader
    sampler: ResumableSampler
    priors: torch.Tensor
    iters_per_epoch: int
    epochs: int
    seed: int
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    # CUDA: each batch copied and augmented on a side stream during the step before (measured slower than
    # preparing it when its step starts for mobilenet0.25 in two H200 leases; README, Training)
    prepare_ahead: bool = False
    copy_ahead: bool = False  # CUDA: only the host-to-device copies on a side stream, during the step before
    compile_augment: bool = False  # --compile_augment: the device augmentation's compiled kernels
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    validated_step: int | None = None  # the step of the last validation run (or failed); saved in checkpoints
    exp_dir: Path = Path("experiments/retinaface")
    logger: logging.Logger | None = None
    writer: Any = None
    last_saved_step: int | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, mean total loss) per read-back
    loader_hint_given: bool = False
    unreadable: dict[str, str] = field(default_factory=dict)  # training images skipped: path -> reason
    pending_unreadable: dict[str, str] = field(default_factory=dict)  # not yet shared with the other ranks
    replaced_samples: int = 0  # samples of this process that an unreadable image handed to another image
    failed_validations: list[str] = field(default_factory=list)  # one line per periodic validation that failed
    interrupt: "StopRequest | None" = None  # Ctrl-C: stop at the next step boundary (single-process runs)
    tensorboard_offset: int = 0  # TensorBoard's step minus global_step (a resume that converted the step)

    @property
    def schedule_steps(self) -> int:
        """Optimizer steps of the whole schedule (all epochs)."""
        return self.epochs * self.iters_per_epoch

    @property
    def total_steps(self) -> int:
        """Optimizer steps of this run (``--max_iters`` when it comes first)."""
        total = self.schedule_steps
        return min(total, self.args.max_iters) if self.args.max_iters else total

    @property
    def tensorboard_step(self) -> int:
        """The step TensorBoard events are logged at: optimizer steps taken in the whole run, which
        differs from ``global_step`` once a resume converted it (another batch size)."""
        return self.global_step + self.tensorboard_offset

    @property
    def stop_requested(self) -> bool:
        return self.interrupt is not None and self.interrupt.requested

    @property
    def ckpt_dir(self) -> Path:
        return self.exp_dir / "ckpt"

    def log(self, message: str) -> None:
        if self.logger is not None:
            self.logger.info(message)

    def note_load_report(self, report: "LoadReport") -> None:
        """Record the unreadable training images of a batch: each new file is logged once (in a
        distributed run once the ranks have shared them, see :meth:`share_unreadable`); a batch
        that found no readable image at all stops the run."""
        if report.fatal:
            dataset = getattr(getattr(self.loader, "dataset", None), "dataset", None)
            listed = (f"{len(dataset)} training images listed in {dataset.label_file}"
                      if hasattr(dataset, "label_file") else "training images")
            path, reason = report.skipped[0]
            raise TrainingSetupError(f"none of the {listed} can be read (e.g. {path}: {reason})")
        self.replaced_samples += report.replaced
        for path, reason in report.skipped:
            if path in self.unreadable or path in self.pending_unreadable:
                continue
            if self.info.distributed:
                self.pending_unreadable[path] = reason
            else:
                self._add_unreadable(path, reason)

    def _add_unreadable(self, path: str, reason: str) -> None:
        self.unreadable[path] = reason
        self.log(f"skipped unreadable training image {path}: {reason} (its samples are replaced by other "
                 f"images; {len(self.unreadable)} unreadable so far)")

    def share_unreadable(self, pending_total: int) -> None:
        """Distributed: gather the unreadable images found by every rank (``pending_total``, the
        sum of their pending counts, was all-reduced with the losses) so that rank 0 logs them all."""
        if self.info.distributed and pending_total > 0:
            shares: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(shares, dict(self.pending_unreadable))
            for share in shares:
                for path, reason in share.items():
                    if path not in self.unreadable:
                        self._add_unreadable(path, reason)
        self.pending_unreadable.clear()

    def position(self) -> str:
        """``epoch E/N iter I/M`` of the last step done (1-based, as the progress lines say; the
        start of epoch 1 before any step)."""
        epoch, done = divmod(self.global_step - 1, self.iters_per_epoch) if self.global_step else (0, -1)
        return f"epoch {epoch + 1}/{self.epochs} iter {done + 1}/{self.iters_per_epoch}"

    def save_last(self) -> None:
        if self.info.is_main:
            path = save_training_state(self.ckpt_dir / "last.pth", self)
            self.log(f"saved checkpoint {path} ({self.position()}, step {self.global_step})")
        self.last_saved_step = self.global_step


class StopRequest:
    """Context manager that turns the first Ctrl-C (SIGINT) or SIGTERM (a batch scheduler's time
    limit or pre-emption: SLURM sends it, then SIGKILL 30 s later by default) into a request,
    ``requested``, that the training loop honours at the next step boundary, so that ``last.pth``
    can be saved with a consistent state (a validation, ``during == "validation"``, ends after the
    images in progress); a second signal acts at once (the handlers before it are back in place).
    ``signal_name`` says which signal came (``None`` before). Only installed from the main thread
    (``signal`` allows no other)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.during = "step"  # or "validation": what the first Ctrl-C stops (its message says so)
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._on_signal) for number in self.SIGNALS}
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self._restore()
        doing = ("stopping the validation (last.pth was saved before it; --resume runs it first)"
                 if self.during == "validation" else "stopping after this step to save last.pth")
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
        print(f"\ntrain.py: {self.signal_name}: {doing} ({again} stops at once)", file=sys.stderr, flush=True)

    def interruption(self) -> KeyboardInterrupt:
        """What the run raises once it stopped: KeyboardInterrupt (exit status 130), or
        :class:`utils.errors.Terminated` for SIGTERM (143)."""
        return Terminated() if self.signal_name == "SIGTERM" else KeyboardInterrupt()

    def _restore(self) -> None:
        for number, previous in self._previous.items():  # None: a handler not set from Python, the default then
            default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
            signal.signal(number, previous if previous is not None else default)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def read_checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint file holds, or None (no file, unreadable)."""
    try:
        return int(read_checkpoint(path)["step"]) if path.is_file() else None
    except (CheckpointError, KeyError, ValueError, TypeError):
        return None


def _format_duration(seconds: float) -> str:
    """``1d 02:03:04``, ``02:03:04`` or ``03:04`` (minutes and seconds)."""
    seconds = max(int(round(seconds)), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours or days else f"{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def _kept_checkpoint_message(ctx: TrainContext) -> str:
    """What a diverged run leaves behind. Not called good: its loss was finite, but its weights
    may already have been on the way to the overflow."""
    path = ctx.ckpt_dir / "last.pth"
    if path.is_file():
        step = read_checkpoint_step(path)
        return f"the last checkpoint saved before that, {path}{'' if step is None else f' (step {step})'}, was kept"
    return "no checkpoint had been written yet"


def _step_span(first: int, last: int) -> str:
    """``at step 3``, or ``between step 1 and step 5`` for a window of several steps."""
    return f"at step {last}" if first == last else f"between step {first} and step {last}"


class _LossMeter:
    """Running sums of the loss terms on the device; read back (one sync) by :meth:`flush`."""

    KEYS = ("total", *LOSS_TERMS)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.KEYS), device=self.device, dtype=torch.float64)
        self.bad = torch.zeros((), device=self.device, dtype=torch.float64)
        self.count = 0

    def add(self, losses: Mapping[str, torch.Tensor]) -> None:
        values = torch.stack([losses[k].detach().double() for k in self.KEYS])
        self.bad += (~torch.isfinite(values)).any().double()
        self.sums += torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        self.count += 1

    def flush(self, info: DistInfo, pending: int = 0) -> tuple[dict[str, float], bool, int]:
        """Mean losses since the last flush (averaged over processes), whether any was non-finite,
        and ``pending`` summed over the processes (their count of unreported unreadable images,
        carried by the same all-reduce)."""
        extra = torch.tensor([float(pending)], device=self.device, dtype=torch.float64)
        packed = torch.cat([self.sums / max(self.count, 1), self.bad.view(1), extra])
        if info.distributed:
            dist.all_reduce(packed)
            packed[:-2] /= info.world_size
        host = packed.cpu().tolist()
        self.reset()
        return dict(zip(self.KEYS, host[:-2])), host[-2] > 0, int(round(host[-1]))


#: share of the wall time spent waiting for batches above which a CUDA run says that the data
#: pipeline, not the GPU, sets the speed
LOADER_BOUND_SHARE = 0.2


def cores_per_process() -> int:
    """CPU cores this process may use, shared with the other training processes of its node
    (``LOCAL_WORLD_SIZE`` under torchrun)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def loader_hint(data_share: float, workers: int, augment_on: str, cpu_count: int | None) -> str | None:
    """Advice when ``data_share`` (waiting for the DataLoader / wall time) shows a data-bound run;
    ``cpu_count``: the cores of this process (:func:`cores_per_process`)."""
    if data_share <= LOADER_BOUND_SHARE:
        return None
    advice = []
    if cpu_count and workers < cpu_count - 1:
        advice.append(f"raise --workers (now {workers}; {cpu_count} CPU cores per process)")
    if augment_on != "device":
        advice.append("try --augment_on device (workers then only decode and crop)")
    remedy = " or ".join(advice) or "use faster storage or fewer, larger images"
    return (f"the data pipeline limits the training speed: {data_share:.0%} of the time went to waiting "
            f"for batches; {remedy}")


class _WaitClock:
    """Host time spent in ``next()`` of an iterable (waiting for the DataLoader)."""

    def __init__(self, iterable) -> None:
        self.iterator = iter(iterable)
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - started


def train_one_epoch(ctx: TrainContext, epoch: int, skip_batches: int = 0) -> bool:
    """Train ``epoch`` (0-based) from its batch ``skip_batches``; returns True when
    ``--max_iters`` was reached or a stop was requested (Ctrl-C). Raises
    :class:`TrainingDivergedError` on a NaN/inf loss."""
    from utils.image_loader import start_loader

    args, info = ctx.args, ctx.info
    ctx.model.train()
    ctx.sampler.set_epoch(epoch, skip_batches * args.batch_size)
    meter = _LossMeter(info.device)
    autocast = (torch.autocast("cuda", dtype=ctx.autocast_dtype) if ctx.autocast_dtype is not None
                else nullcontext())
    # not drawn in a log file: the loop logs its own progress lines there
    progress = progress_bar(ctx.iters_per_epoch, f"epoch {epoch + 1}/{ctx.epochs}", info.is_main, unit="it",
                            in_logs=False, initial=skip_batches, leave=False)
    window_start = ctx.global_step
    stop = False
    started = time.perf_counter()
    try:
        # start_loader: workers forked without OpenCV's thread pool, so each decodes and augments
        # on one thread (no cores x workers threads) and cannot inherit a locked pool mutex
        batches = _WaitClock(start_loader(ctx.loader) if isinstance(ctx.loader, DataLoader) else ctx.loader)
        window_wall, window_wait = time.perf_counter(), 0.0
        prepared = prepared_batches(batches, info.device, ctx.channels_last, ahead=ctx.prepare_ahead,
                                    compile_augment=ctx.compile_augment, copy_ahead=ctx.copy_ahead)
        for batch_index, (inputs, padded, report) in enumerate(prepared, start=skip_batches):
            if report is not None:  # the LoadReport of build_train_loader's batches
                ctx.note_load_report(report)
            with autocast:
                outputs = ctx.model(inputs)
            losses = ctx.criterion(ctx.model, outputs, ctx.priors, padded)
            lr = ctx.optimizer.param_groups[0]["lr"]  # the rate of this step (host float, no sync)
            ctx.optimizer.zero_grad(set_to_none=True)
            ctx.scaler.scale(losses["total"]).backward()
            ctx.scaler.step(ctx.optimizer)
            ctx.scaler.update()
            ctx.scheduler.step()
            ctx.global_step += 1
            meter.add(losses)
            progress.update(1)

            last_of_epoch = batch_index + 1 == ctx.iters_per_epoch
            stop_now = (bool(args.max_iters) and ctx.global_step >= args.max_iters) or ctx.stop_requested
            save_now = bool(args.save_every) and ctx.global_step % args.save_every == 0
            if ctx.global_step % args.log_every == 0 or last_of_epoch or stop_now or save_now:
                means, bad, pending = meter.flush(info, len(ctx.pending_unreadable))
                ctx.share_unreadable(pending)
                if bad:
                    raise TrainingDivergedError(
                        f"loss became NaN/inf {_step_span(window_start + 1, ctx.global_step)} "
                        f"(epoch {epoch + 1}); training stopped and {_kept_checkpoint_message(ctx)}. "
                        f"Try a lower --lr, a longer --warmup_epochs, or --amp false.")
                ctx.loss_history.append((ctx.global_step, means["total"]))
                now = time.perf_counter()  # the read-back above waited for the device: a true wall time
                data_share = (batches.seconds - window_wait) / max(now - window_wall, 1e-9)
                eta = _format_duration((now - window_wall) / (ctx.global_step - window_start)
                                       * (ctx.total_steps - ctx.global_step))
                window_start = ctx.global_step
                window_wall, window_wait = now, batches.seconds
                if info.is_main:
                    progress.set_postfix(loss=f"{means['total']:.4f}", lr=f"{lr:.2e}", run_eta=eta)
                    speed = (now - started) / max(batch_index + 1 - skip_batches, 1)
                    ctx.log(f"{ctx.position()} step {ctx.global_step} lr {lr:.3e} "
                            + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                            + f" ({speed:.3f} s/iter, data wait {data_share:.0%}, run ETA {eta})")
                    if ctx.writer is not None:
                        for key, value in means.items():
                            ctx.writer.add_scalar(f"train/{key}", value, ctx.tensorboard_step)
                        ctx.writer.add_scalar("train/lr", lr, ctx.tensorboard_step)
                        ctx.writer.add_scalar("train/data_wait_share", data_share, ctx.tensorboard_step)
                    # judged after the first epoch's first windows (worker start-up is not the steady state)
                    if (info.device.type == "cuda" and not ctx.loader_hint_given
                            and ctx.global_step >= 3 * args.log_every):
                        hint = loader_hint(data_share, getattr(args, "workers", 0),
                                           getattr(args, "augment_on", "workers"), cores_per_process())
                        if hint:
                            ctx.log("note: " + hint)
                            ctx.loader_hint_given = True
                if save_now:
                    ctx.save_last()
            if stop_now:
                stop = True
                break
    finally:
        progress.close()
    return stop


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def evaluate_widerface(model: nn.Module, val_root: str | Path, gt: Any, device: torch.device | str,
                       confidence_threshold: float = 0.02, nms_threshold: float = 0.4,
                       info: DistInfo | None = None, progress: bool | None = False,
                       stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Official WIDER FACE easy/medium/hard AP of ``model`` on the images of ``<val_root>/val``.

    Detection at original scale (confidence 0.02, NMS 0.4, no top-k cuts, the public
    prediction-file convention, as :func:`utils.evaluation.evaluate_model`), counting only the
    images present; a val image that cannot be read raises :class:`EvaluationError` (an AP
    without it would not be the official one).
    ``gt``: ``utils.metric.load_ground_truth(gt_dir)``. The model keeps its weights and train mode,
    except that in a distributed run the BatchNorm statistics of rank 0 are first copied to the
    other ranks, so that every rank evaluates the same model.
    Distributed (``info``): every rank detects its share of the images, rank 0 gathers them and
    returns the APs; the other ranks return None (no rank waits for one to do all the work).
    ``progress``: a "validation" bar of this rank's images (see :func:`predict_widerface`).
    ``stop``: asked after every image; True ends the validation with
    :class:`utils.evaluation.PredictionStopped` (single-process runs only: the ranks would wait
    for each other).
    """
    from models.detector import cudnn_autotuning
    from utils.evaluation import evaluate_predictions, list_val_images, predict_widerface, protocol_detector

    rank, world = (info.rank, info.world_size) if info is not None and info.distributed else (0, 1)
    if world > 1:
        # each rank's BatchNorm running statistics last saw its own batch (DDP broadcasts
        # buffers before a forward pass, not after): evaluate rank 0's model, the one saved
        with torch.no_grad():
            for buffer in unwrap(model).buffers():
                dist.broadcast(buffer, src=0)
    failure = None
    try:
        with cudnn_autotuning(False):  # every image has its own size: no per-shape autotuning
            detector = protocol_detector(unwrap(model), device, confidence_threshold=confidence_threshold,
                                         nms_threshold=nms_threshold)
            images = list_val_images(val_root)[rank::world]
            predictions = predict_widerface(detector, images=images, workers=0, progress=progress,
                                            progress_label="validation" if world == 1 else
                                            f"validation (rank {rank}'s share: 1/{world} of the images)",
                                            stop=stop if world == 1 else None).complete_predictions()
    except VALIDATION_ERRORS as error:
        if world == 1:
            raise
        failure, predictions = one_line(error), {}  # still join the gather: the other ranks wait in it
    if world > 1:
        shares = [None] * world if rank == 0 else None
        dist.gather_object((failure, dict(predictions)), shares, dst=0)
        if rank != 0:
            return None
        failures = [failed for failed, _ in shares if failed]
        if failures:
            raise EvaluationError(failures[0])
        predictions = {}
        for _, share in shares:
            for event, stems in share.items():
                predictions.setdefault(event, {}).update(stems)
    return {k: float(v) for k, v in evaluate_predictions(predictions, gt).aps.items()}


def load_validation_ground_truth(val_root: str | Path, gt_dir: str | Path) -> Any:
    """The WIDER FACE ground truth of ``gt_dir``, checked against the images of
    ``<val_root>/val``, for the periodic validation. Raises :class:`TrainingSetupError` (one line
    naming the folder) when a ``.mat`` file cannot be read or does not hold the ground truth
    (corrupt, wrong file, missing variable), the images are not in it or one is not an image file or
    cut short (:func:`utils.evaluation.check_image_files`): at start-up, not at the first validation
    epochs later."""
    from utils.evaluation import check_image_files, check_images_in_gt, list_val_images
    from utils.metric import load_ground_truth

    try:
        gt = load_ground_truth(gt_dir)  # ValueError names the .mat file that is damaged or wrong
    except (OSError, ValueError) as error:
        raise TrainingSetupError(f"cannot use the WIDER FACE ground truth in {gt_dir} for the validation: "
                                 f"{one_line(error)} (fix --gt_dir, or --eval_every 0)") from None
    try:
        images = list_val_images(val_root)
        check_images_in_gt(images, gt)
        check_image_files(images)
    except (EvaluationError, OSError, ValueError) as error:
        raise TrainingSetupError(f"{Path(val_root) / 'val'}: {one_line(error)}") from None
    return gt


def ignored_option_notes(args: argparse.Namespace, explicit: set[str] | None) -> list[str]:
    """Log notes for options given on the command line that other options of the run make moot."""
    moot = [("lr_steps", args.lr_schedule != "step", f"--lr_schedule {args.lr_schedule} has no decay epochs"),
            ("amp_dtype", not args.amp, "--amp false trains in float32"),
            ("val_dataset", not args.eval_every, "--eval_every 0 turns validation off"),
            ("gt_dir", not args.eval_every, "--eval_every 0 turns validation off")]
    return [f"note: --{name} ignored: {reason}" for name, ignored, reason in moot
            if explicit and name in explicit and ignored]


def _resolve_validation(args: argparse.Namespace) -> tuple[str | None, Path | None, str]:
    """(val root, gt dir, reason when evaluation is off)."""
    if not args.eval_every:
        return None, None, "--eval_every 0"
    val_root = args.val_dataset or args.dataset
    if not (Path(val_root) / "val" / "images").is_dir():
        if args.val_dataset:
            raise TrainingSetupError(f"--val_dataset {val_root}: no val/images/ folder (expected "
                                     f"val/images/<event>/*.jpg, see data/README.md)")
        return None, None, f"no {Path(val_root) / 'val' / 'images'}/ folder (set --val_dataset)"
    from utils.evaluation import default_gt_dir

    gt_dir = Path(args.gt_dir) if args.gt_dir else default_gt_dir(val_root)
    if not (gt_dir / "wider_face_val.mat").is_file():
        if args.gt_dir or args.val_dataset:
            raise TrainingSetupError(f"WIDER FACE ground truth not found in {gt_dir} (wider_face_val.mat, "
                                     f"wider_easy/medium/hard_val.mat): set --gt_dir")
        return None, None, f"no ground truth in {gt_dir} (set --gt_dir)"
    return val_root, gt_dir, ""


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------
class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            import sys

            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never break training
            self.handleError(record)


def _training_progress(checkpoint: Mapping[str, Any]) -> float:
    """Epochs of training a checkpoint holds (its step in units of its own iterations per epoch,
    which a resume with another batch size changes)."""
    return int(checkpoint["step"]) / int(checkpoint.get("iters_per_epoch") or 1)


def check_no_run_overwritten(exp_dir: Path, resume: str | None, resume_checkpoint: Mapping[str, Any] | None
                             ) -> list[str]:
    """Refuse (:class:`TrainingSetupError`) a start whose saves would overwrite ``<exp_dir>/ckpt/last.pth``
    while it holds work this run does not continue:

    - a new run (no ``resume``) in a folder that already holds a run;
    - a resume from a checkpoint outside ``<exp_dir>/ckpt`` (another run's, or a copy) into it;
    - a resume from another checkpoint of that folder (e.g. ``best.pth``) behind its ``last.pth``.

    Returns notes for the log (a ``last.pth`` that cannot be read is replaced: nothing to keep)."""
    last = exp_dir / "ckpt" / "last.pth"
    if not last.is_file():
        return []
    if resume is None or resume_checkpoint is None:
        raise TrainingSetupError(f"{exp_dir} already holds a run ({last}): continue it with --resume "
                                 f"{last}, or choose another --experiment_name (or delete {exp_dir})")
    if Path(resume).resolve().parent != last.parent.resolve():
        raise TrainingSetupError(f"{exp_dir} already holds a run ({last}) and --resume {resume} is not one of its "
                                 f"checkpoints: continuing it there would overwrite that run; give a new "
                                 f"--experiment_name (or delete {exp_dir})")
    if last.samefile(resume):
        return []
    try:
        latest = read_checkpoint(last)
        ahead = _training_progress(latest) > _training_progress(resume_checkpoint)
    except (CheckpointError, KeyError, TypeError, ValueError) as error:
        return [f"note: {last} cannot be read ({one_line(error)}); this run's first save replaces it"]
    if ahead:
        raise TrainingSetupError(
            f"{last} is at step {int(latest['step'])}, ahead of the step-{int(resume_checkpoint['step'])} checkpoint "
            f"being resumed ({resume}): resuming would overwrite it; continue from {resume} under a new "
            f"--experiment_name to branch off, or resume {last}")
    return []


def branch_notes(ctx: TrainContext, resume: str) -> list[str]:
    """A note for a resume into another run folder (a branch): the best AP it carries on is the
    resumed run's, whose ``best.pth`` stays in that run's folder."""
    source = Path(resume).resolve().parent
    if source == ctx.ckpt_dir.resolve() or ctx.best_metric is None:
        return []
    return [f"note: the best hard AP so far, {ctx.best_metric:.4f} (epoch {ctx.best_epoch}), is the resumed run's; "
            f"its best.pth stays in {source}, and {ctx.ckpt_dir / 'best.pth'} is written when a validation here "
            "beats it"]


def create_run_folders(exp_dir: Path) -> None:
    """Create ``<exp_dir>/ckpt`` and ``<exp_dir>/log`` and write (and remove) a file in each, so that an
    unusable folder stops the run at start-up with :class:`TrainingSetupError`, not at the first save
    an epoch later."""
    for folder in (exp_dir / "ckpt", exp_dir / "log"):
        probe = folder / f".write_test_{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            reason = ("it exists and is not a folder" if folder.exists() and not folder.is_dir()
                      else error.strerror or one_line(error))
            raise TrainingSetupError(f"cannot write the run's files to {folder}: {reason} (choose another "
                                     "--experiment_name or fix that path)") from None


def _make_logger(exp_dir: Path, is_main: bool) -> logging.Logger:
    logger = logging.getLogger(f"retinaface.train.{exp_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if is_main:
        (exp_dir / "log").mkdir(parents=True, exist_ok=True)
        formatter = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        file_handler = logging.FileHandler(exp_dir / "log" / "logs.txt", encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
        console = _TqdmHandler()
        console.setFormatter(formatter)
        logger.addHandler(console)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def _close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _evaluation_due(args: argparse.Namespace, epoch: int, val_root: str | None, final: bool) -> bool:
    """Whether the validation runs after epoch ``epoch`` (0-based)."""
    return val_root is not None and ((epoch + 1) % args.eval_every == 0 or final)


def pending_validation(ctx: TrainContext, val_root: str | None) -> int | None:
    """The epoch (0-based) whose end-of-epoch validation is due at ``ctx.global_step`` but has not
    run: the run stopped in between (Ctrl-C in the epoch's last step, a process killed while
    validating). ``last.pth`` is saved before the validation, so a resume finds it here."""
    epoch, done = divmod(ctx.global_step, ctx.iters_per_epoch)
    if ctx.global_step == 0 or done or epoch > ctx.epochs or ctx.validated_step == ctx.global_step:
        return None
    return epoch - 1 if _evaluation_due(ctx.args, epoch - 1, val_root, final=epoch == ctx.epochs) else None


def _validate_and_save(ctx: TrainContext, epoch: int, val_root: str, gt: Any) -> None:
    """The validation after epoch ``epoch`` (0-based), then ``last.pth`` with its metrics, and
    ``best.pth`` when the hard AP improved."""
    improved = _evaluate(ctx, epoch, val_root, gt)
    if improved is None:  # stopped by Ctrl-C: last.pth, saved before it, says it is still due
        return
    ctx.save_last()
    if improved and ctx.info.is_main:
        save_training_state(ctx.ckpt_dir / "best.pth", ctx)
        ctx.log(f"saved {ctx.ckpt_dir / 'best.pth'} (hard AP {ctx.best_metric:.4f})")


def _evaluate(ctx: TrainContext, epoch: int, val_root: str, gt: Any) -> bool | None:
    """Validation AP after epoch ``epoch`` (0-based); returns True when the best improved, None
    when Ctrl-C stopped it (it stays due: a resumed run runs it first, :func:`pending_validation`).

    A validation that fails (an unreadable val image, out of memory, ...; see
    :data:`VALIDATION_ERRORS`) is logged as one line and recorded in ``ctx.failed_validations``
    on every rank; training continues (this epoch has no AP and cannot become ``best.pth``)."""
    from utils.evaluation import PredictionStopped

    improved = False
    started = time.perf_counter()
    validated_before, ctx.validated_step = ctx.validated_step, ctx.global_step  # a failed validation counts as run
    if ctx.interrupt is not None:
        ctx.interrupt.during = "validation"
    try:
        aps = evaluate_widerface(ctx.model, val_root, gt, ctx.info.device, info=ctx.info,
                                 progress=ctx.info.is_main, stop=lambda: ctx.stop_requested)
        failure = None
    except VALIDATION_ERRORS as error:
        aps, failure = None, one_line(error)
    except PredictionStopped:
        ctx.validated_step = validated_before
        ctx.model.train()
        return None
    finally:
        if ctx.interrupt is not None:
            ctx.interrupt.during = "step"
    if ctx.info.distributed:  # rank 0 holds the outcome (the others only detected their share)
        flag = torch.tensor([int(failure is not None)], device=ctx.info.device)
        dist.broadcast(flag, src=0)
        failure = (failure or "see the log of rank 0") if flag.item() else None
    if failure is not None:
        ctx.model.train()
        message = (f"validation after epoch {epoch + 1} (step {ctx.global_step}) failed: {failure}; training "
                   "continues without an AP for this epoch")
        ctx.failed_validations.append(message)
        ctx.log(message)
        if ctx.info.distributed:
            dist.barrier()
        return False
    if ctx.info.is_main:
        ctx.last_metrics = aps
        improved = ctx.best_metric is None or aps["hard"] > ctx.best_metric
        if improved:
            ctx.best_metric, ctx.best_epoch = aps["hard"], epoch + 1
        ctx.log(f"val AP after epoch {epoch + 1} (step {ctx.global_step}): easy {aps['easy']:.4f} "
                f"medium {aps['medium']:.4f} hard {aps['hard']:.4f} (best hard {ctx.best_metric:.4f} at "
                f"epoch {ctx.best_epoch}; {time.perf_counter() - started:.1f} s)")
        if ctx.writer is not None:
            for key, value in aps.items():
                ctx.writer.add_scalar(f"val/AP_{key}", value, ctx.tensorboard_step)
    if ctx.info.distributed:
        dist.barrier()
    return improved


#: What a periodic validation may fail with without stopping the training (an unreadable or
#: truncated val image, out of memory on one, an image the ground truth lacks ...)
VALIDATION_ERRORS: tuple[type[BaseException], ...] = (EvaluationError, ImageReadError, OSError, ValueError)


#: Options a resumed run never takes from its checkpoint (machine- or invocation-specific).
_NOT_INHERITED = frozenset({"resume", "init_weights", "pretrained", "backbone_weights", "max_iters", "device",
                            "gpu_num", "workers"})


def explicit_options(argv: list[str] | None) -> set[str]:
    """Names of the training options given explicitly in ``argv``."""
    from config import build_parser

    parser = build_parser("train")
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def inherit_resume_options(args: argparse.Namespace, recorded: Mapping[str, Any], explicit: set[str]) -> list[str]:
    """Take the options of the resumed run (``recorded``, the checkpoint's ``args``) for every
    option not given explicitly, except those in ``_NOT_INHERITED``. Returns the names taken."""
    taken = []
    for name, value in recorded.items():
        if name in explicit or name in _NOT_INHERITED or not hasattr(args, name):
            continue
        if getattr(args, name) != value:
            setattr(args, name, value)
            taken.append(name)
    return taken


#: options a resume ignores, besides the architecture and the seed: the run keeps its weights
_RUN_ORIGIN_OPTIONS = ("init_weights", "pretrained", "backbone_weights")


def keep_run_options(args: argparse.Namespace, recorded: Mapping[str, Any], config: ModelConfig, seed: int) -> None:
    """After a resume, set the options it ignores back to the run's own: the architecture of the
    checkpoint (``config``), the run's ``seed`` and the weights it started from (``recorded``, the
    checkpoint's ``args``). The checkpoints written next and the logged options then describe the
    run, and a later resume does not report those options as ignored again."""
    for name in architecture_overrides(args):
        setattr(args, name, getattr(config, name))
    args.seed = seed
    for name in _RUN_ORIGIN_OPTIONS:
        if name in recorded and hasattr(args, name):
            setattr(args, name, recorded[name])


#: options that change how fast a run goes or what it logs, not what it computes
_SPEED_AND_LOGGING = frozenset({"log_every", "save_every", "cuda_graphs", "compile", "compile_augment", "augment_on"})


def other_option_changes(args: argparse.Namespace, recorded: Mapping[str, Any], explicit: set[str]) -> list[str]:
    """``--name old -> new`` for the options given with a resume that change what the run computes
    (its data, image size, loss, precision ...), other than those of the schedule (reported with
    the checkpoint's loading), the session's (``--device``, ``--workers`` ...), speed and logging
    options and those a resume ignores; call it after :func:`keep_run_options`. Paths are compared
    normalised (``./data/x/`` is ``data/x``)."""
    ignored = (set(_NOT_INHERITED) | REPORTED_ON_LOAD | set(architecture_overrides(args))
               | _SPEED_AND_LOGGING | {"seed", "experiment_name"})

    def normal(value: Any) -> Any:
        return os.path.normpath(value) if isinstance(value, str) else value

    def written(value: Any) -> str:  # as on the command line
        return "default" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return [f"--{name} {written(recorded[name])} -> {written(getattr(args, name))}"
            for name in sorted(explicit - ignored)
            if name in recorded and hasattr(args, name) and normal(recorded[name]) != normal(getattr(args, name))]


def run_folder(experiment_name: str, resume: str | None, explicit: set[str] | None) -> Path:
    """The folder of this run's outputs: ``experiments/<experiment_name>`` (relative to the working
    directory), except for a ``--resume`` of a ``<run>/ckpt/<file>`` checkpoint without an explicit
    ``--experiment_name``, which continues in ``<run>`` wherever it is started from."""
    if resume and explicit is not None and "experiment_name" not in explicit:
        checkpoint_dir = Path(resume).parent
        if checkpoint_dir.name == "ckpt":
            return checkpoint_dir.parent
    return Path("experiments") / experiment_name


def _run_summary(ctx: TrainContext, rank: int) -> dict[str, Any]:
    """What :func:`train` returns (see there)."""
    best_path = ctx.ckpt_dir / "best.pth"
    return {"step": ctx.global_step, "epoch": ctx.global_step // ctx.iters_per_epoch,
            "best_metric": ctx.best_metric, "metrics": dict(ctx.last_metrics),
            "last": str(ctx.ckpt_dir / "last.pth"), "best": str(best_path) if best_path.is_file() else None,
            "loss_history": list(ctx.loss_history), "rank": rank, "unreadable_images": dict(ctx.unreadable),
            "replaced_samples": ctx.replaced_samples, "failed_validations": list(ctx.failed_validations)}


def train(args: argparse.Namespace, explicit: set[str] | None = None) -> dict[str, Any]:
    """Run training as configured by ``args`` (see ``config.py`` and the README's Training section).

    With ``--resume`` and ``explicit`` (the option names given on the command line, see
    :func:`explicit_options`), options not given are taken from the resumed run, so
    ``train.py --resume experiments/x/ckpt/last.pth`` alone continues that run.

    Returns a summary ``{"step", "epoch", "best_metric", "metrics", "last", "best", "loss_history",
    "rank", "unreadable_images", "replaced_samples", "failed_validations"}`` (``loss_history``:
    ``(step, mean total loss since the previous read-back)`` pairs of this invocation, one per
    ``--log_every`` window; ``unreadable_images``: ``{path: reason}`` of the training images
    skipped by this invocation; ``failed_validations``: one line per periodic validation that
    failed). Raises
    :class:`TrainingSetupError` for unusable options, data or run folder (also for a start that would
    overwrite a run's checkpoints, see :func:`check_no_run_overwritten`) and :class:`TrainingDivergedError`
    when the loss becomes NaN/inf (after closing everything; the last checkpoint saved before is kept).
    """
    started = time.perf_counter()
    info = setup_distributed(args.device, args.gpu_num)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    logger = None
    writer = None
    ctx = wrapped = None
    inherited: list[str] = []
    try:
        resume_ckpt = None
        if args.resume:
            try:
                resume_ckpt = read_checkpoint(args.resume)
            except CheckpointError as error:
                raise TrainingSetupError(f"--resume: {error}") from None
            for key in ("optimizer", "scheduler", "step"):
                if key not in resume_ckpt:
                    raise TrainingSetupError(f"--resume {args.resume}: not a training checkpoint (no {key!r}); "
                                             "use --init_weights to fine-tune from plain weights")
            inherited = (inherit_resume_options(args, resume_ckpt.get("args") or {}, explicit)
                         if explicit is not None else [])
        seed = int(resume_ckpt.get("seed", args.seed)) if resume_ckpt is not None else int(args.seed)
        # data and ground truth first: a wrong path fails before any download or model build
        try:
            loader, sampler, dataset = build_train_loader(args, info, seed)
        except TrainingSetupError as error:
            dataset = Path(args.dataset)
            if "dataset" not in inherited or dataset.is_absolute() or dataset.exists():
                raise
            raise TrainingSetupError(f"{error} (--dataset {args.dataset} was taken from the checkpoint, relative to "
                                     "the folder that run started in: give --dataset)") from None
        val_root, gt_dir, no_eval_reason = _resolve_validation(args)
        gt = None
        if val_root is not None:  # checked on every rank so that a bad set-up stops all of them
            gt = load_validation_ground_truth(val_root, gt_dir)
        if info.distributed:
            check_ranks_agree(info, val_root is not None, len(dataset))
        exp_dir = run_folder(args.experiment_name, args.resume, explicit)
        run_folder_notes = check_no_run_overwritten(exp_dir, args.resume, resume_ckpt)
        if info.is_main:
            create_run_folders(exp_dir)
        logger = _make_logger(exp_dir, info.is_main)
        configure_backends(info.device, args.deterministic)
        seed_everything(seed, info.rank)

        if info.distributed and info.local_rank != 0:
            dist.barrier()  # local rank 0 of each node fills the torch hub cache first: one download per node
        model, notes = build_model(args, resume_ckpt)
        if info.distributed and info.local_rank == 0:
            dist.barrier()
        config = model.config
        cuda = info.device.type == "cuda"
        autocast_dtype, scaler = autocast_settings(info.device, args.amp, args.amp_dtype)
        wrapped = wrap_model(model, info, sync_bn=args.sync_bn, channels_last=cuda, compile_backend=args.compile)
        if args.compile:
            notes.append(f"torch.compile (backend {args.compile}): the first training step compiles the model; "
                         "evaluation runs it uncompiled")
        notes += compile_augment_notes(args, info.device)
        raw_model = unwrap(wrapped)
        iters_per_epoch = len(sampler) // args.batch_size
        epochs, steps = resolve_epochs_and_steps(args, config.network)
        optimizer = build_optimizer(raw_model, args)
        scheduler = build_scheduler(optimizer, args, iters_per_epoch, config.network)
        criterion = MultiBoxLoss(config, landmark_loss=args.landmark_loss,
                                 empty_image_negatives=args.empty_image_negatives)
        priors = prior_boxes((args.im_size, args.im_size), config.num_anchor, info.device)
        ctx = TrainContext(args=args, info=info, model=wrapped, raw_model=raw_model, criterion=criterion,
                           optimizer=optimizer, scheduler=scheduler, scaler=scaler, loader=loader,
                           sampler=sampler, priors=priors, iters_per_epoch=iters_per_epoch, epochs=epochs,
                           seed=seed, autocast_dtype=autocast_dtype, channels_last=cuda, exp_dir=exp_dir,
                           logger=logger, compile_augment=getattr(args, "compile_augment", False))
        if resume_ckpt is not None:
            notes += load_training_state(ctx, resume_ckpt)
            notes += branch_notes(ctx, args.resume)
        if resume_ckpt is not None and explicit:
            ignored = [f"--{name}" for name in ("seed", "init_weights") if name in explicit]
            if ignored:
                notes.append(f"note: {' and '.join(ignored)} ignored when resuming (the run keeps its seed {seed} "
                             "and its weights)")
        if resume_ckpt is not None:
            keep_run_options(args, resume_ckpt.get("args") or {}, config, seed)
            changed = other_option_changes(args, resume_ckpt.get("args") or {}, explicit or set())
            if changed:
                notes.append(f"resuming with other options than the checkpoint's: {', '.join(changed)} (from step "
                             f"{ctx.global_step} on)")
            if ctx.global_step >= ctx.total_steps and pending_validation(ctx, val_root) is None:
                for note in notes:  # e.g. the step converted to this run's iterations per epoch
                    ctx.log(note)
                where = "at" if ctx.global_step == ctx.total_steps else "past"
                ctx.log(f"nothing to train: {args.resume} is at step {ctx.global_step}, "
                        + (f"{where} --max_iters {args.max_iters}; give a larger --max_iters, or leave it out for "
                           "the whole schedule" if ctx.total_steps < ctx.schedule_steps else
                           f"{where} the end of its {epochs} epoch{'s' * (epochs != 1)}; give a larger --epochs to "
                           "train on"))
                return _run_summary(ctx, info.rank)
        notes += graph_training_network(ctx, args, autocast_dtype)
        if args.lr_schedule == "step":
            notes += decay_epoch_notes(steps, epochs, given=bool(getattr(args, "lr_steps", None)))
        notes += warmup_notes(args.warmup_epochs, epochs, args.lr_schedule, steps)
        notes += ignored_option_notes(args, explicit)
        if info.device.type == "cpu" and explicit and "gpu_num" in explicit and not args.device:
            notes.append(f"note: --gpu_num {args.gpu_num} given, but CUDA is not available: training on the CPU "
                         "(--device cuda makes this an error)")
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter
            # a resume drops the events the stopped run logged after last.pth (TensorBoard hides events
            # of steps >= purge_step written before this writer's start): one value per step
            writer = SummaryWriter(log_dir=str(exp_dir / "log"),
                                   purge_step=ctx.tensorboard_step + 1 if resume_ckpt is not None else None)
            ctx.writer = writer
            ctx.log(f"training {config} on {info.device} x{info.world_size} process(es); "
                    f"{len(dataset)} images ({dataset.num_faces} faces), {iters_per_epoch} iterations/epoch of "
                    f"{args.batch_size} per process, "
                    f"{epochs} epoch{'s' * (epochs != 1)}, {args.lr_schedule} schedule"
                    + (f" (x0.1 at epochs {steps})" if args.lr_schedule == "step" else "")
                    + f", lr {args.lr}, warm-up {args.warmup_epochs} epochs, "
                    f"amp {describe_amp(autocast_dtype, info.device, args.amp)}, seed {seed}")
            recipe = recipe_differences(args, config, info.world_size)
            for note in run_folder_notes + notes + ([recipe] if recipe else []):
                ctx.log(note)
            ctx.log("options: " + json.dumps({k: plain_value(v) for k, v in vars(args).items()}, sort_keys=True))
            if resume_ckpt is not None:
                ctx.log(f"resumed from {args.resume} at step {ctx.global_step}"
                        + (f"; options of the resumed run: {', '.join(inherited)}" if inherited else ""))
            if val_root is None:
                ctx.log(f"no validation AP ({no_eval_reason})")
            for note in loader_notes(loader, dataset):
                ctx.log(note)

        start_epoch, skip = divmod(ctx.global_step, iters_per_epoch)
        stopped = bool(args.max_iters) and ctx.global_step >= args.max_iters
        epoch = start_epoch
        # under torchrun the ranks would not stop at the same step: Ctrl-C and SIGTERM stop them at once
        ctx.interrupt = None if info.distributed else StopRequest()
        with ctx.interrupt or sigterm_raises_terminated():
            missed = pending_validation(ctx, val_root) if resume_ckpt is not None else None
            if missed is not None:
                ctx.log(f"the validation after epoch {missed + 1} (step {ctx.global_step}) did not run before the "
                        "run stopped: running it first")
                _validate_and_save(ctx, missed, val_root, gt)
            while not stopped and epoch < epochs and not ctx.stop_requested:
                stopped = train_one_epoch(ctx, epoch, skip)
                skip = 0
                epoch_done = ctx.global_step % iters_per_epoch == 0
                if epoch_done:
                    if ctx.last_saved_step != ctx.global_step:  # --save_every may have saved this step
                        ctx.save_last()  # first: a run that dies while evaluating keeps this epoch
                    if (_evaluation_due(args, epoch, val_root, final=epoch + 1 == epochs)
                            and not ctx.stop_requested):
                        _validate_and_save(ctx, epoch, val_root, gt)
                epoch += 1
            if ctx.last_saved_step != ctx.global_step:
                ctx.save_last()
        skipped_validation = pending_validation(ctx, val_root)
        # not when the last step and its validation were done anyway
        if ctx.stop_requested and (ctx.global_step < ctx.total_steps or skipped_validation is not None):
            ctx.log(f"interrupted ({ctx.interrupt.signal_name}) at step {ctx.global_step}"
                    + (f", before the validation after epoch {skipped_validation + 1}"
                       if skipped_validation is not None else "")
                    + f": continue with --resume {ctx.ckpt_dir / 'last.pth'}")
            stop = ctx.interrupt.interruption()
            stop.logged = True
            raise stop
        if info.distributed:
            dist.barrier()
        problems = []
        if ctx.unreadable:
            problems.append(f"{len(ctx.unreadable)} unreadable training image(s) skipped (listed above)")
        if ctx.failed_validations:
            problems.append(f"{len(ctx.failed_validations)} validation(s) failed (listed above)")
        early = (f" of {ctx.schedule_steps} (--max_iters; --resume {ctx.ckpt_dir / 'last.pth'} continues the "
                 "schedule)" if ctx.global_step < ctx.schedule_steps else "")
        ctx.log(f"finished at step {ctx.global_step}{early} after {_format_duration(time.perf_counter() - started)}; "
                f"checkpoints in {ctx.ckpt_dir}"
                + (f"; but {' and '.join(problems)}" if problems else ""))
        return _run_summary(ctx, info.rank)
    except KeyboardInterrupt as stop:
        if ctx is not None and not getattr(stop, "logged", False) and ctx.info.is_main:
            # stopped at once (torchrun, a second Ctrl-C): logs.txt would otherwise just end
            saved = read_checkpoint_step(ctx.ckpt_dir / "last.pth")
            ctx.log(f"{getattr(stop, 'what', 'interrupted (Ctrl-C)')} after step {ctx.global_step}, stopped at once; "
                    + (f"last.pth holds step {saved}: continue with --resume {ctx.ckpt_dir / 'last.pth'}"
                       if saved is not None else "no checkpoint was saved yet"))
        raise
    except (TrainingDivergedError, TrainingSetupError) as error:
        if logger is not None:  # into logs.txt only: the console gets train.py's one-line error
            record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, f"error: {error}", None, None)
            for handler in logger.handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.handle(record)
        raise
    finally:
        if writer is not None:
            writer.close()
        if logger is not None:
            _close_logger(logger)
        torch.use_deterministic_algorithms(previous_deterministic)
        if info.distributed:
            # DDP's reducer holds the process group. Freed after the group is destroyed, it drops the
            # group's last reference itself, with the GIL held, and the gloo destructor joins its
            # threads, one of which may wait for the GIL to free a finished work's tensors: a hang
            # at exit (seen once in a 2-process run, torch 2.11). Freed here first, it cannot.
            ctx = wrapped = None
            gc.collect()
        cleanup_distributed(info)
