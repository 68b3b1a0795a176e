"""Overfitting check: mobilenet0.25 from its ImageNet backbone learns to find the sample faces.

Trains ``train.py`` (mobilenet0.25, no cascade, ImageNet backbone ``mobilenetV1X0.25_pretrain.tar``)
on the 10 sample images and evaluates the official WIDER FACE AP on the same images every
``--eval_every`` iterations (original scale, confidence 0.02, NMS 0.4). Training is done in
chunks that ``--resume`` the previous chunk's ``last.pth``, which is exact, so the curve is the
one of a single uninterrupted run.

    python tools/overfit_check.py                        # 300 iterations, AP every 50
    python tools/overfit_check.py --iters 400 --lr 5e-3 --im_size 640 --batch_size 8
    python tools/overfit_check.py --augment_on device   # the augmentation's pixel work in torch

Other networks train from scratch (``--network resnet50 --cascade true``: torchvision's ImageNet
weights need a download), e.g. to give the GPU benchmarks trained ResNet-50 cascade weights
(``--save FILE``; tools/gpu_check.sh's ``trained_r50`` step). ``--copies N`` trains on the sample
listed N times (symlinks), so an epoch has N times the iterations and train.py writes its
per-epoch checkpoint N times less often; the AP is still measured on the 10 images.

Prints one JSON object: the AP curve ``[{"iteration", "easy", "medium", "hard", "loss"...}]``, the
settings and whether the final hard AP reached ``--min_hard_ap``; exits 1 otherwise.
(``train_loss``: mean total loss of the last 10 iterations before the point.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from config import HelpFormatter, non_negative_int, positive_int  # noqa: E402
from tools import check_inputs, shared_root  # noqa: E402
from tools.finetune_check import window_mean, working_directory  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    shared = shared_root()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--network", default="mobilenet0.25", help="train.py --network")
    parser.add_argument("--cascade", choices=("true", "false"), default="false", help="train.py --cascade")
    parser.add_argument("--backbone_weights", default=str(shared / "weights/mobilenetV1X0.25_pretrain.tar"),
                        help="mobilenet0.25's ImageNet backbone; other networks train from scratch")
    parser.add_argument("--copies", type=positive_int, default=1, help="the sample listed this many times for training")
    parser.add_argument("--save", default=None, help="copy the checkpoint here after every segment (the final one last)")
    parser.add_argument("--dataset", default=str(shared / "data/widerface_sample"))
    parser.add_argument("--gt_dir", default=None, help="default: <dataset>/ground_truth")
    parser.add_argument("--iters", type=positive_int, default=300)
    parser.add_argument("--eval_every", type=positive_int, default=50, help="iterations between AP evaluations")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--warmup_iters", type=non_negative_int, default=20)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--im_size", type=positive_int, default=640)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--augment_on", choices=("workers", "device"), default="workers",
                        help="train.py --augment_on: where the augmentation's pixel work runs")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--min_hard_ap", type=float, default=0.5,
                        help="final hard AP required to pass (and above the untrained one); 0 = no requirement")
    parser.add_argument("--workdir", default=None, help="where experiments/ is written (default: a temp dir)")
    return parser.parse_args(argv)


def repeated_sample(dataset: Path, root: Path, copies: int) -> Path:
    """A data set at ``root`` whose ``val`` split lists the images of ``dataset/val`` ``copies``
    times (``images/copy<k>`` are symlinks to the sample's image folder); returns ``root``."""
    images = root / "val" / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = (dataset / "val" / "label.txt").read_text(encoding="utf-8").splitlines()
    listed = []
    for k in range(copies):
        link = images / f"copy{k}"
        if not link.exists():
            link.symlink_to((dataset / "val" / "images").resolve(), target_is_directory=True)
        listed += [f"# copy{k}/{line[1:].strip()}" if line.startswith("#") else line for line in lines]
    (root / "val" / "label.txt").write_text("\n".join(listed) + "\n", encoding="utf-8")
    return root


def main(argv=None) -> int:
    opts = parse(argv)
    import torch

    import train
    from config import parse_args
    from utils.checkpoint import load_model
    from utils.metric import load_ground_truth
    from utils.train_utils import build_model, evaluate_widerface, seed_everything

    dataset = str(Path(opts.dataset).resolve())
    gt_dir = Path(opts.gt_dir or Path(opts.dataset) / "ground_truth").resolve()
    inputs = {"--dataset": dataset, "--gt_dir": gt_dir}
    if opts.network == "mobilenet0.25":
        inputs["--backbone_weights"] = opts.backbone_weights
    check_inputs("overfit_check.py", opts.device, inputs)
    gt = load_ground_truth(gt_dir)
    device = torch.device(opts.device)
    save = Path(opts.save).resolve() if opts.save else None  # relative to where the command runs
    started = time.perf_counter()
    label_lines = (Path(dataset) / "val" / "label.txt").read_text(encoding="utf-8").splitlines()
    training_images = opts.copies * sum(1 for line in label_lines if line.startswith("#"))
    iters_per_epoch = training_images // opts.batch_size
    if iters_per_epoch < 1:
        raise SystemExit(f"--batch_size {opts.batch_size} is larger than the {training_images} training images")
    epochs = -(-opts.iters // iters_per_epoch)
    backbone = (["--backbone_weights", str(Path(opts.backbone_weights).resolve())] if opts.network == "mobilenet0.25"
                else ["--pretrained", "false"])
    curve = []
    with contextlib.ExitStack() as stack:
        workdir = Path(opts.workdir) if opts.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        training_set = repeated_sample(Path(dataset), workdir / "repeated", opts.copies) if opts.copies > 1 else dataset
        base = ["--experiment_name", "overfit_check", "--network", opts.network, "--cascade", opts.cascade,
                *backbone, "--dataset", str(training_set), "--train_split", "val", "--lr", str(opts.lr),
                "--lr_schedule", "cosine", "--warmup_epochs", str(opts.warmup_iters / iters_per_epoch),
                "--epochs", str(epochs), "--batch_size", str(opts.batch_size), "--im_size", str(opts.im_size),
                "--workers", str(opts.workers), "--augment_on", opts.augment_on,
                "--eval_every", "0", "--device", opts.device, "--seed", str(opts.seed), "--log_every", "10"]
        with working_directory(workdir):
            last = Path("experiments/overfit_check/ckpt/last.pth")
            if last.exists():
                last.unlink()
            targets = list(range(0, opts.iters + 1, opts.eval_every))
            if targets[-1] != opts.iters:
                targets.append(opts.iters)
            for step in targets:
                if step == 0:
                    # the model train.py starts from: same seed, ImageNet backbone, fresh FPN/SSH/heads
                    seed_everything(opts.seed)
                    model = build_model(parse_args("train", base))[0]
                    loss = None
                else:
                    resume = ["--resume", str(last)] if last.is_file() else []
                    summary = train.run(base + ["--max_iters", str(step)] + resume)
                    model = load_model(last)
                    if save is not None:  # after every segment: an interrupted run keeps the latest
                        save.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(last, save)
                    loss = window_mean(summary["loss_history"], step - 10, step)
                aps = evaluate_widerface(model, dataset, gt, device)
                point = {"iteration": step, **{k: round(v, 4) for k, v in aps.items()}, "train_loss": loss,
                         "elapsed_s": round(time.perf_counter() - started, 1)}
                curve.append(point)
                print(json.dumps(point), file=sys.stderr, flush=True)
    final = curve[-1]
    # --min_hard_ap 0 asks for nothing (a run that only produces weights, e.g. for tools/gpu_check.sh)
    passed = opts.min_hard_ap <= 0 or (final["hard"] >= opts.min_hard_ap and final["hard"] > curve[0]["hard"])
    start = "its ImageNet backbone" if opts.network == "mobilenet0.25" else "scratch"
    report = {
        "check": f"{opts.network}{' cascade' if opts.cascade == 'true' else ''} from {start} overfits the "
                 f"{training_images // opts.copies} images of {dataset}/val",
        "command": "python tools/overfit_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_args": " ".join(base),
        "curve": curve, "min_hard_ap": opts.min_hard_ap, "passed": passed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    if not passed:
        print(f"overfit_check.py: failed: final hard AP {final['hard']:.4f} "
              + (f"below --min_hard_ap {opts.min_hard_ap}" if final["hard"] < opts.min_hard_ap else
                 f"not above the first point's {curve[0]['hard']:.4f}"), file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
