"""Fine-tuning sanity check: the published mobilenet0.25 keeps its AP when trained a little more.

The published Pytorch_Retinaface mobilenet0.25 is evaluated on the sample set (official WIDER
FACE metric, easy/medium/hard, original scale, confidence 0.02, NMS 0.4), fine-tuned with
``train.py --init_weights`` on the same images for ``--iters`` iterations at ``--lr`` (1e-4), and
evaluated again. If our anchor matching, box/landmark encoding or loss disagreed with how those
weights were trained, even a short fine-tuning would move the detector away and the AP would
drop (and the training loss would start high: the first 10 iterations average about 2.5 with the
right targets); the check passes when every AP stays within ``--tolerance`` (0.02) of its start.

    python tools/finetune_check.py                   # shared/ found via $RETINAFACE_SHARED or ../shared
    python tools/finetune_check.py --iters 50 --lr 1e-4 --batch_size 8 --im_size 640

Prints one JSON object (before/after APs, differences, pass) and exits 1 when the check fails.
Runs on the CPU in a few minutes (``--device cuda`` when available).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from config import HelpFormatter, non_negative_int, positive_int  # noqa: E402
from tools import check_inputs, shared_root  # noqa: E402


@contextlib.contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def window_mean(history, after: int, upto: int) -> float | None:
    """Mean of the logged training losses of the steps in ``(after, upto]``."""
    values = [loss for step, loss in history if after < step <= upto]
    return round(sum(values) / len(values), 4) if values else None


def parse(argv=None) -> argparse.Namespace:
    shared = shared_root()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--weights", default=str(shared / "weights/mobilenet0.25_Final.pth"))
    parser.add_argument("--dataset", default=str(shared / "data/widerface_sample"),
                        help="root with val/images and val/label.txt (trained and evaluated on)")
    parser.add_argument("--gt_dir", default=None, help="default: <dataset>/ground_truth")
    parser.add_argument("--iters", type=positive_int, default=50)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--im_size", type=positive_int, default=640)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--workdir", default=None, help="where experiments/ is written (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    opts = parse(argv)
    import torch

    import train
    from utils.checkpoint import load_model
    from utils.metric import load_ground_truth
    from utils.train_utils import evaluate_widerface

    dataset = str(Path(opts.dataset).resolve())
    gt_dir = str(Path(opts.gt_dir or Path(opts.dataset) / "ground_truth").resolve())
    weights = str(Path(opts.weights).resolve())
    check_inputs("finetune_check.py", opts.device, {"--weights": weights, "--dataset": dataset, "--gt_dir": gt_dir})
    gt = load_ground_truth(gt_dir)
    device = torch.device(opts.device)

    started = time.perf_counter()
    before = evaluate_widerface(load_model(weights), dataset, gt, device)
    with contextlib.ExitStack() as stack:
        workdir = Path(opts.workdir) if opts.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        argv_train = ["--experiment_name", "finetune_check", "--init_weights", weights, "--dataset", dataset,
                      "--train_split", "val", "--lr", str(opts.lr), "--warmup_epochs", "0",
                      "--max_iters", str(opts.iters), "--epochs", "1000", "--batch_size", str(opts.batch_size),
                      "--im_size", str(opts.im_size), "--workers", str(opts.workers), "--eval_every", "0",
                      "--device", opts.device, "--seed", str(opts.seed), "--log_every", "10"]
        with working_directory(workdir):
            Path("experiments/finetune_check/ckpt/last.pth").unlink(missing_ok=True)  # a fresh run each time
            summary = train.run(argv_train)
            tuned = load_model(Path(summary["last"]).resolve())
        after = evaluate_widerface(tuned, dataset, gt, device)
    diff = {k: after[k] - before[k] for k in before}
    passed = all(abs(v) <= opts.tolerance for v in diff.values())
    report = {
        "check": "fine-tune published mobilenet0.25 on the sample set keeps its AP",
        "command": "python tools/finetune_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_args": " ".join(argv_train),
        "before": before, "after": after, "difference": diff, "tolerance": opts.tolerance,
        "iterations": summary["step"],
        "train_loss_first_10_iters": window_mean(summary["loss_history"], 0, 10),
        "train_loss_last_10_iters": window_mean(summary["loss_history"], summary["step"] - 10, summary["step"]),
        "passed": passed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    if not passed:
        print("finetune_check.py: failed: AP moved by " + ", ".join(f"{k} {v:+.4f}" for k, v in diff.items())
              + f", beyond --tolerance {opts.tolerance}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
