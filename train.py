"""Train a RetinaFace detector (see the README's training section).

    python train.py --gpu_num=0 --experiment_name=r50 --dataset data/widerface
    python train.py --experiment_name mnet --network mobilenet0.25 --cascade false \\
        --backbone_weights weights/mobilenetV1X0.25_pretrain.tar --dataset data/widerface
    torchrun --nproc_per_node=4 train.py ...        # one process per GPU (DDP)

All logic lives in ``utils/train_utils.py`` and the modules it builds on (``utils/train_data.py``,
``utils/lr_schedule.py``, ``utils/train_state.py``, ``utils/distributed.py``); this file only
parses the options. Exit status: 0 done; 3 finished, but some training images were unreadable
(each skipped and named in the log) or a periodic validation failed (logged; training went on);
1 the run could not start or the loss diverged (one line on stderr); 2 bad option; 130
interrupted (Ctrl-C; a one-process run first saves ``last.pth`` at the step reached); 143 the
same for SIGTERM (a batch scheduler's time limit or pre-emption).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from config import EXIT_OK, EXIT_SKIPPED, parse_args, run_command_line

DESCRIPTION = ("Train a RetinaFace detector on a WIDER FACE-style dataset (--dataset with train/ and val/ "
               "folders): checkpoints, logs.txt and TensorBoard events go to experiments/<experiment_name>/, "
               "the official WIDER FACE AP is computed every --eval_every epochs; --resume continues a run "
               "exactly. Several GPUs: torchrun --nproc_per_node=N train.py ...")
EPILOG = ("exit status: 0 done; 3 finished, but some training images were unreadable (skipped, named in "
          "logs.txt) or a periodic validation failed (logged, training went on); 1 the run could not start "
          "or the loss diverged (one line on stderr); 2 invalid option; 130 interrupted (Ctrl-C); 143 terminated "
          "(SIGTERM); both save last.pth at the step reached first (one process)")


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and train; returns the run summary (step, epoch,
    metrics, checkpoint paths, loss history). Raises ``TrainingSetupError`` when the run cannot
    start and ``TrainingDivergedError`` when the loss becomes NaN/inf."""
    return _train(parse_args("train", argv), argv)


def _train(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    from utils.train_utils import explicit_options, train  # noqa: PLC0415

    return train(args, explicit=explicit_options(list(sys.argv[1:] if argv is None else argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from utils.errors import CheckpointError, TrainingDivergedError, TrainingSetupError  # noqa: PLC0415

    def run_and_report(args: argparse.Namespace) -> int:
        summary = _train(args, argv)
        # under torchrun only rank 0 says so: a rank that exits non-zero makes torchrun stop the
        # others, and rank 0 may still be closing its logs (every rank knows the same problems)
        problems = summary.get("unreadable_images") or summary.get("failed_validations")
        return EXIT_SKIPPED if problems and summary.get("rank", 0) == 0 else EXIT_OK

    return run_command_line("train", argv, run_and_report,
                            (TrainingSetupError, TrainingDivergedError, CheckpointError, OSError),
                            description=DESCRIPTION, epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(main())
