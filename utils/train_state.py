"""What ``--resume`` needs: RNG states as plain values and the training state of a checkpoint
(``last.pth`` / ``best.pth``, written atomically, loadable with ``torch.load(weights_only=True)``)."""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from utils.checkpoint import save_checkpoint
from utils.errors import TrainingSetupError
from utils.lr_schedule import resolve_epochs_and_steps

if TYPE_CHECKING:
    from utils.train_utils import TrainContext

__all__ = ["capture_rng_state", "restore_rng_state", "plain_value", "save_training_state", "load_training_state",
           "zero_missing_momentum_buffers", "REPORTED_ON_LOAD"]

#: options of the schedule and the optimizer whose change :func:`load_training_state` reports
SCHEDULE_OPTIONS = ("lr", "lr_schedule", "warmup_epochs", "momentum", "weight_decay")
#: every option whose change a resume reports there: those, the epochs and decay epochs it resolves,
#: and the batch size (a converted step)
REPORTED_ON_LOAD = frozenset(SCHEDULE_OPTIONS) | {"epochs", "lr_steps", "batch_size"}


def capture_rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors, lists and numbers only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal], gauss_next],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def plain_value(value: Any) -> Any:
    """Options as plain values (weights_only-loadable)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save_training_state(path: Path, ctx: "TrainContext") -> Path:
    """Write ``path`` atomically: model config + weights, ``optimizer``, ``scheduler``,
    ``scaler``, ``epoch`` (epoch in progress, 0-based), ``step`` (optimizer steps done),
    ``iters_per_epoch``, ``seed``, ``rng_state``, ``best_metric`` (best val hard AP or None),
    ``best_epoch``, ``metrics`` (latest val APs), ``validated_step`` (the step of the last
    validation, or None), ``tensorboard_offset`` (TensorBoard's step minus ``step``: nonzero once a
    resume converted the step), ``args``."""
    return save_checkpoint(
        path, ctx.raw_model,
        optimizer=ctx.optimizer.state_dict(), scheduler=ctx.scheduler.state_dict(),
        scaler=ctx.scaler.state_dict(), epoch=ctx.global_step // ctx.iters_per_epoch,
        step=ctx.global_step, iters_per_epoch=ctx.iters_per_epoch, seed=ctx.seed,
        rng_state=capture_rng_state(), best_metric=ctx.best_metric, best_epoch=ctx.best_epoch,
        metrics=dict(ctx.last_metrics), validated_step=ctx.validated_step,
        tensorboard_offset=ctx.tensorboard_offset, args={k: plain_value(v) for k, v in vars(ctx.args).items()})


def zero_missing_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of a fused SGD group with momentum a momentum buffer, zeros where it has
    none (:func:`utils.train_utils.build_optimizer` says why). Also after a resume:
    ``load_state_dict`` replaces the state with the checkpoint's, which has no buffers after a
    ``--momentum 0`` run and none for parameters that never had a gradient; the fused kernel would
    then take its first-step path again, or fail on a mix of buffers and none."""
    for group in optimizer.param_groups:
        if group.get("fused") and group["momentum"]:
            for param in group["params"]:
                state = optimizer.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def load_training_state(ctx: "TrainContext", checkpoint: Mapping[str, Any]) -> list[str]:
    """Restore optimizer, scheduler, scaler, step, best metric and RNG states from ``checkpoint``
    (the model weights are loaded by :func:`~utils.train_utils.build_model`); returns notes for the log.

    The schedule and the optimizer's hyper-parameters stay those of this run's options (the
    checkpoint's unless given on the command line), so ``--epochs``, ``--lr``, ``--lr_steps`` ...
    given with ``--resume`` take effect from the step reached; unchanged options continue the run
    exactly. When the iterations per epoch changed (batch size, data or process count), the step
    is converted so that the run continues at the same point of its epochs."""
    notes = []
    scheduler, optimizer = ctx.scheduler, ctx.optimizer
    # load_state_dict replaces whole param groups and the schedule's fields: keep this run's
    # (a CPU checkpoint would otherwise also turn the fused CUDA step off, and the AMP scaler
    # would then hand its fused-only arguments to the plain step)
    kept = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    schedules = [dict(vars(schedule)) for schedule in scheduler.lr_lambdas]
    base_lrs = list(scheduler.base_lrs)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    for group, value in zip(optimizer.param_groups, kept):
        group.update(value)  # lr is set below, from the schedule
    zero_missing_momentum_buffers(optimizer)
    for schedule, fields in zip(scheduler.lr_lambdas, schedules):
        vars(schedule).update(fields)
    scheduler.base_lrs = base_lrs
    if checkpoint.get("scaler"):
        ctx.scaler.load_state_dict(checkpoint["scaler"])
    step = int(checkpoint["step"])
    ctx.tensorboard_offset = int(checkpoint.get("tensorboard_offset") or 0)
    # checkpoints written before validated_step was saved: as if the validation due at their step had run
    validated_here = checkpoint.get("validated_step", step) == step
    saved_iters = int(checkpoint.get("iters_per_epoch", ctx.iters_per_epoch))
    if saved_iters != ctx.iters_per_epoch:
        epoch, done = divmod(step, saved_iters)
        converted = epoch * ctx.iters_per_epoch + min(round(done * ctx.iters_per_epoch / saved_iters),
                                                      ctx.iters_per_epoch - 1)
        notes.append(f"resuming with {ctx.iters_per_epoch} iterations per epoch instead of {saved_iters} (batch "
                     f"size, data or process count changed): step {step} of the checkpoint is step {converted} here, "
                     f"the {'start' if done == 0 else 'same point'} of epoch {epoch + 1}; the data order does not "
                     "continue exactly; TensorBoard's steps go on from the checkpoint's")
        # TensorBoard keeps counting the steps taken: the curves logged up to the checkpoint stay,
        # and this run's go on after them (its own steps would go back and replace theirs)
        ctx.tensorboard_offset += step - converted
        step = converted
    ctx.global_step = step
    ctx.validated_step = step if validated_here else None
    scheduler.last_epoch = step
    for group, base, schedule in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    changed = _schedule_changes(checkpoint.get("args"), ctx)
    if changed:
        notes.append("resuming with options that differ from the checkpoint's: " + ", ".join(changed)
                     + f"; from step {step} the learning rate follows this run's schedule")
    ctx.best_metric = checkpoint.get("best_metric")
    ctx.best_epoch = checkpoint.get("best_epoch")
    ctx.last_metrics = dict(checkpoint.get("metrics") or {})
    if checkpoint.get("rng_state"):
        restore_rng_state(checkpoint["rng_state"])
    return notes


def _schedule_changes(saved: Mapping[str, Any] | None, ctx: "TrainContext") -> list[str]:
    """``--name old -> new`` for each option of the schedule or the optimizer that differs
    between a checkpoint's recorded options and this run's (epochs and decay epochs resolved)."""
    if not saved:
        return []
    args, network = ctx.args, ctx.raw_model.config.network
    saved_args = argparse.Namespace(**{**vars(args), **saved})
    changed = [f"--{name} {getattr(saved_args, name)} -> {getattr(args, name)}"
               for name in SCHEDULE_OPTIONS
               if getattr(saved_args, name) != getattr(args, name)]
    try:
        before, after = resolve_epochs_and_steps(saved_args, network), resolve_epochs_and_steps(args, network)
    except TrainingSetupError:
        return changed
    if before[0] != after[0]:
        changed.append(f"--epochs {before[0]} -> {after[0]}")
    if before[1] != after[1] and args.lr_schedule == "step":
        changed.append(f"decay epochs {before[1]} -> {after[1]}")
    return changed
