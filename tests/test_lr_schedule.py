"""The learning-rate schedule and what a resume restores (utils/lr_schedule.py, utils/train_state.py).

Small objects only (one parameter, SGD): no model, no data.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from config import parse_args
from utils.lr_schedule import build_scheduler
from utils.train_state import capture_rng_state, load_training_state, restore_rng_state


def _scheduled_lrs(args, iters_per_epoch: int, base_lr: float = 0.1) -> list[float]:
    """The lr of every iteration of a run of ``args``, as train.py steps its scheduler: once per
    optimizer step, the lr of iteration ``i`` set before it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_scheduler(optimizer, args, iters_per_epoch, "mobilenet0.25")
    lrs = []
    for _ in range(args.epochs * iters_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_step_decay_starts_with_the_first_iteration_of_its_epoch():
    """``--lr_steps 2,3``: x0.1 from the first iteration of epoch 2 (0-based; iteration 10 at 5
    iterations per epoch), x0.01 from epoch 3; not an iteration or an epoch earlier."""
    args = parse_args("train", ["--epochs", "4", "--lr_steps", "2,3", "--warmup_epochs", "0"])
    iters_per_epoch, base_lr = 5, 0.1
    lrs = _scheduled_lrs(args, iters_per_epoch, base_lr)
    expected = [base_lr * 0.1 ** sum(iteration // iters_per_epoch >= epoch for epoch in (2, 3))
                for iteration in range(4 * iters_per_epoch)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[9] == pytest.approx(base_lr) and lrs[10] == pytest.approx(0.1 * base_lr)
    assert lrs[14] == pytest.approx(0.1 * base_lr) and lrs[15] == pytest.approx(0.01 * base_lr)


def _resume_context(iters_per_epoch: int, args) -> SimpleNamespace:
    """The parts of a TrainContext that load_training_state touches (no checkpoint options: no
    scaler state, no recorded arguments)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return SimpleNamespace(optimizer=optimizer, scheduler=build_scheduler(optimizer, args, iters_per_epoch,
                                                                          "mobilenet0.25"),
                           iters_per_epoch=iters_per_epoch, args=args, global_step=0, validated_step=None)


@pytest.mark.parametrize("saved_step", [3, 8])
def test_resume_with_more_iterations_per_epoch_goes_to_the_nearest_point_of_the_epoch(saved_step):
    """Step 3 of 5 per epoch is 3/5 = 0.6 of the way through epoch 0; at 8 per epoch the nearest
    step is 5 (5/8 = 0.625; 4/8 = 0.5 is further), not 4.8 cut down to 4. Step 8 is the same point
    of epoch 1: 8 + 5. The learning rate follows the converted step."""
    args = parse_args("train", ["--epochs", "4", "--lr_steps", "1,3", "--warmup_epochs", "0"])
    saved = _resume_context(5, args)
    for _ in range(saved_step):
        saved.optimizer.step()
        saved.scheduler.step()
    checkpoint = {"optimizer": saved.optimizer.state_dict(), "scheduler": saved.scheduler.state_dict(),
                  "step": saved_step, "iters_per_epoch": 5}
    epoch, done = divmod(saved_step, 5)
    nearest = min(range(8), key=lambda k: abs(k / 8 - done / 5))
    expected = epoch * 8 + nearest
    assert expected == {3: 5, 8: 13}[saved_step]

    resumed = _resume_context(8, args)
    notes = load_training_state(resumed, checkpoint)
    assert resumed.global_step == expected and resumed.scheduler.last_epoch == expected
    assert any(f"step {saved_step} of the checkpoint is step {expected} here" in note for note in notes)
    decays = sum(expected >= 8 * step for step in (1, 3))
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1 ** decays)


def test_restoring_a_captured_rng_state_repeats_every_generator():
    """What a resume restores: after ``restore_rng_state(capture_rng_state())`` torch, NumPy and
    Python's global generators draw the same numbers again, the normal samples they hold cached
    included."""
    np.random.randn(1)  # each now holds the second normal sample of a pair
    random.gauss(0.0, 1.0)
    state = capture_rng_state()

    def draw():
        return (torch.rand(4).tolist(), torch.randn(3).tolist(), np.random.randn(3).tolist(),
                np.random.rand(4).tolist(), [random.gauss(0.0, 1.0) for _ in range(3)], random.random())

    first = draw()
    restore_rng_state(state)
    assert draw() == first
    restore_rng_state(state)
    assert draw() == first
