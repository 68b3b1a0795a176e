"""The public recipe's training length and learning-rate schedule: epochs and x0.1 decay epochs per
backbone, the per-iteration schedule (linear warm-up, then step decay or cosine) and the notes a run
logs where it leaves the recipe."""
from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

import torch

from utils.errors import TrainingSetupError

__all__ = ["REFERENCE_SCHEDULES", "REFERENCE_BATCH_AND_SIZE", "reference_schedule", "recipe_differences",
           "resolve_epochs_and_steps", "decay_epoch_notes", "warmup_notes", "LRSchedule", "build_scheduler"]

#: Reference schedules of the public recipe: (epochs, epochs of the x0.1 decays).
REFERENCE_SCHEDULES = {"mobilenet0.25": (250, (190, 220)), "resnet": (100, (70, 90))}
#: (batch size over all GPUs, training image size) of the public recipes (data/config.py there)
REFERENCE_BATCH_AND_SIZE = {"mobilenet0.25": (32, 640), "resnet": (24, 840)}


def reference_schedule(network: str) -> tuple[int, tuple[int, ...]]:
    """(epochs, decay epochs) of the public recipe: mobilenet0.25 250 epochs, x0.1 at 190 and
    220; ResNets (the ResNet-50 recipe) 100 epochs, x0.1 at 70 and 90."""
    return REFERENCE_SCHEDULES["mobilenet0.25" if network == "mobilenet0.25" else "resnet"]


def recipe_differences(args: argparse.Namespace, config: Any, world_size: int = 1) -> str | None:
    """A log line naming where this run leaves the public recipe of its backbone (batch size,
    image size, cascade), or None."""
    family = "mobilenet0.25" if config.network == "mobilenet0.25" else "resnet"
    batch, size = REFERENCE_BATCH_AND_SIZE[family]
    differences = []
    if args.batch_size * world_size != batch:
        differences.append(f"batch {args.batch_size * world_size} (public {batch}: --batch_size {batch // world_size}"
                           + (f" with {world_size} processes" if world_size > 1 else "") + ")")
    if args.im_size != size:
        differences.append(f"image size {args.im_size} (public {size}: --im_size {size})")
    if config.cascade:  # a resume keeps the checkpoint's architecture: no option to suggest then
        differences.append("cascade stage on (the published models are single-stage"
                           + ("" if getattr(args, "resume", None) else ": --cascade false") + ")")
    if not differences:
        return None
    name = "mobilenet0.25" if family == "mobilenet0.25" else "ResNet"
    return f"note: differs from the public {name} recipe in " + "; ".join(differences)


def resolve_epochs_and_steps(args: argparse.Namespace, network: str) -> tuple[int, list[int]]:
    """``--epochs`` (default: reference) and the decay epochs: ``--lr_steps`` or the reference
    points scaled to ``--epochs``."""
    ref_epochs, ref_steps = reference_schedule(network)
    epochs = args.epochs or ref_epochs
    if getattr(args, "lr_steps", None):
        try:
            steps = sorted(int(v) for v in str(args.lr_steps).split(",") if v.strip())
        except ValueError:
            raise TrainingSetupError(f"--lr_steps must be comma-separated epochs, got {args.lr_steps!r}") from None
    else:
        steps = [int(round(s * epochs / ref_epochs)) for s in ref_steps]
    return epochs, steps


def decay_epoch_notes(steps: Sequence[int], epochs: int, given: bool) -> list[str]:
    """Log notes on step-decay epochs that do not act as ``x0.1`` each: some fall at or after the
    end of the run (never applied), or several coincide (one drop of more than x0.1). ``given``:
    they come from ``--lr_steps`` (else from the recipe scaled to ``epochs``)."""
    origin = "--lr_steps" if given else f"the recipe's, scaled to {epochs} epochs; --lr_steps sets them"
    notes = []
    late = [s for s in steps if s >= epochs]
    if late:
        notes.append(f"note: decay epoch(s) {late} ({origin}) fall at or after the end of the {epochs}-epoch run: "
                     "never applied")
    applied = [s for s in steps if s < epochs]
    if len(set(applied)) < len(applied):
        notes.append(f"note: decay epochs {applied} coincide ({origin}): the lr drops by more than x0.1 at once")
    return notes


def warmup_notes(warmup_epochs: float, epochs: int, kind: str, steps: Sequence[int] = ()) -> list[str]:
    """Log notes on a warm-up that swallows part of the schedule: it lasts the whole run (the lr
    never reaches ``--lr``), or step-decay epochs fall inside it (the warm-up ignores them, as the
    public recipe's does: the lr rises to ``--lr``, then drops by all of them at once)."""
    if warmup_epochs <= 0:
        return []
    if warmup_epochs >= epochs:
        reached = ("reaches --lr only at the last step" if warmup_epochs == epochs else
                   f"ends at {epochs / warmup_epochs:.0%} of --lr")
        return [f"note: the warm-up (--warmup_epochs {warmup_epochs:g}) lasts the whole {epochs}-epoch run: the lr "
                f"{reached}" + ("; the cosine decay never starts" if kind == "cosine" else "")]
    inside = [s for s in steps if s < warmup_epochs] if kind == "step" else []
    if inside:
        return [f"note: decay epoch(s) {inside} fall inside the {warmup_epochs:g}-epoch warm-up (--warmup_epochs): "
                "the lr rises to --lr until the warm-up ends, then drops by them at once"]
    return []


class LRSchedule:
    """Learning-rate factor of iteration ``step`` (0-based), used through ``LambdaLR``.

    Linear warm-up ``(step + 1) / warmup_iters`` for the first ``warmup_iters`` iterations, then
    ``step``: ``gamma ** (number of decay iterations <= step)``, or ``cosine``:
    ``0.5 * (1 + cos(pi * t))`` with ``t`` going from 0 after the warm-up to 1 at ``total_iters``.
    Only plain numbers are stored, so the scheduler state loads with ``weights_only=True``.
    """

    def __init__(self, kind: str, total_iters: int, warmup_iters: int = 0,
                 milestones: list[int] | tuple[int, ...] = (), gamma: float = 0.1) -> None:
        if kind not in ("step", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.kind = kind
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_iters:
            return (step + 1) / self.warmup_iters
        if self.kind == "step":
            return self.gamma ** sum(1 for m in self.milestones if step >= m)
        span = max(self.total_iters - self.warmup_iters, 1)
        t = min(max(step - self.warmup_iters, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, iters_per_epoch: int,
                    network: str) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration ``LambdaLR`` with :class:`LRSchedule` (step it after every optimizer step)."""
    epochs, steps = resolve_epochs_and_steps(args, network)
    schedule = LRSchedule(args.lr_schedule, total_iters=epochs * iters_per_epoch,
                          warmup_iters=int(round(args.warmup_epochs * iters_per_epoch)),
                          milestones=[s * iters_per_epoch for s in steps])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
