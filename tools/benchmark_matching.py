"""Anchor matching of real training batches: the loss's matching against a padded-batch baseline.

Usage (from the repository root)::

    python tools/benchmark_matching.py [--dataset ../shared/data/widerface_sample] [--split val]
                                       [--batch 32] [--size 640] [--batches 8] [--iters 3]
                                       [--per_image_anchors] [--device cuda] [--out FILE]

``layers.multibox_loss.match_anchors`` computes the IoU of the batch's real faces only, all
images' faces in one ``(F, N)`` tensor reduced per image by scatter operations. The baseline,
``padded_match`` below (how this project matched before), computes it for the padded
``(B, Kmax, N)`` batch, in groups of images of at most ``2**25`` elements: a batch with one
crowded image costs ``B`` times its face count. Both run on the same real batches (``TrainTransform``
of the sample images at ``--size``; their most faces per image vary from batch to batch as in
training) and must give identical results. ``--per_image_anchors``: jittered anchors per image,
like stage 2 of the refine cascade. Times include moving the padded batch to the device, as the
training step does (``pad_targets``; ours also builds the face index there).

Prints one JSON line (``--out``: also appended to a file; ``tools/speed_table.py`` renders it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from layers.multibox_loss import MatchResult, PaddedTargets, box_iou_batched, match_anchors, pad_targets  # noqa: E402
from config import positive_int  # noqa: E402
from layers.prior_box import prior_boxes  # noqa: E402
from tools import check_inputs, shared_root  # noqa: E402
from tools.benchmark_inference import finish_report, report_header, rnd, setup_device, stats, timed  # noqa: E402
from tools.benchmark_train import training_dataset  # noqa: E402
from utils.box_utils import point_form  # noqa: E402

PADDED_GROUP_ELEMENTS = 1 << 25


def padded_match(boxes: torch.Tensor, valid: torch.Tensor, anchors: torch.Tensor, threshold: float = 0.35,
                 force_min_iou: float = 0.2) -> MatchResult:
    """The baseline: the same protocol on the padded ``(B, Kmax, N)`` IoU tensor, in groups of
    images of at most ``PADDED_GROUP_ELEMENTS`` elements."""
    anchors_xyxy = point_form(anchors.float())
    batch, kmax = valid.shape
    num_anchors = anchors.shape[-2]
    group = max(1, min(batch, PADDED_GROUP_ELEMENTS // max(kmax * num_anchors, 1)))
    parts = []
    for start in range(0, batch, group):
        images = slice(start, start + group)
        image_anchors = anchors_xyxy[images] if anchors_xyxy.dim() == 3 else anchors_xyxy
        iou = box_iou_batched(boxes[images].float(), image_anchors).masked_fill_(~valid[images].unsqueeze(-1), -1.0)
        best_anchor_iou, best_anchor = iou.max(dim=2)
        overlap, face_index = iou.max(dim=1)
        claims = valid[images] & (best_anchor_iou >= force_min_iou)
        face_ids = torch.arange(kmax, device=iou.device).expand_as(claims)
        claimed_by = torch.full_like(face_index, -1)
        claimed_by.scatter_reduce_(1, best_anchor, torch.where(claims, face_ids, -1), reduce="amax")
        is_claimed = claimed_by >= 0
        face_index = torch.where(is_claimed, claimed_by, face_index)
        overlap = torch.where(is_claimed, torch.full_like(overlap, 2.0), overlap)
        parts.append(MatchResult(face_index, overlap >= threshold, overlap))
    return MatchResult(*(torch.cat(items) for items in zip(*parts)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=str(shared_root() / "data" / "widerface_sample"),
                        help="data set root (default: the shared sample)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--size", type=positive_int, default=640, help="training input side (--im_size)")
    parser.add_argument("--batches", type=positive_int, default=8, help="different real batches")
    parser.add_argument("--iters", type=positive_int, default=3, help="timed runs per batch (after one warm-up)")
    parser.add_argument("--per_image_anchors", action="store_true",
                        help="jittered anchors per image (stage 2 of the refine cascade)")
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    return parser


def mean_seconds(fn, iters: int, device: torch.device) -> tuple[Any, float]:
    """The result of a first (warm-up) run of ``fn``, and the mean seconds of ``iters`` timed runs."""
    result = fn()
    return result, statistics.fmean(timed(fn, 0, iters, device)[0])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    check_inputs("benchmark_matching.py", paths={"--dataset": args.dataset})
    device = setup_device(args.device, args.threads, args.out)
    report = report_header("matching", "tools/benchmark_matching.py", argv, device)
    dataset = training_dataset(Path(args.dataset), args.split, args.size, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    priors = prior_boxes((args.size, args.size), 2, device)
    anchor_generator = torch.Generator(device=device).manual_seed(args.seed)
    errors: list[str] = []
    rows = []
    for number in range(args.batches):
        picks = torch.randint(len(dataset), (args.batch,), generator=generator).tolist()
        faces = [torch.as_tensor(dataset[index][1], dtype=torch.float32) for index in picks]
        host = pad_targets(faces)
        if device.type == "cuda":  # pinned, as the training DataLoader delivers it
            host = PaddedTargets(host.targets.pin_memory(), host.valid.pin_memory())
        anchors = priors
        if args.per_image_anchors:
            anchors = priors.expand(args.batch, -1, -1).clone()
            anchors[..., :2] += torch.randn(anchors[..., :2].shape, generator=anchor_generator, device=device) * 3
            anchors[..., 2:] *= torch.exp(torch.randn(anchors[..., 2:].shape, generator=anchor_generator,
                                                      device=device) * 0.2)

        def ours() -> MatchResult:
            moved = pad_targets(host, device)
            return match_anchors(moved.targets[..., :4], moved.valid, anchors, faces=moved.faces)

        def baseline() -> MatchResult:
            moved = pad_targets(host, device)
            return padded_match(moved.targets[..., :4], moved.valid, anchors)

        ours_result, ours_s = mean_seconds(ours, args.iters, device)
        baseline_result, baseline_s = mean_seconds(baseline, args.iters, device)
        identical = all(torch.equal(a, b) for a, b in zip(ours_result, baseline_result))
        if not identical:
            errors.append(f"batch {number}: matching differs from the padded baseline")
        counts = host.valid.sum(dim=1)
        rows.append({"faces": int(counts.sum()), "most_faces_per_image": int(counts.max()),
                     "ours_ms": rnd(ours_s * 1e3), "padded_ms": rnd(baseline_s * 1e3),
                     "speedup": rnd(baseline_s / ours_s), "identical": identical})
    report["settings"] = {"dataset": args.dataset, "split": args.split, "batch": args.batch, "size": args.size,
                          "batches": args.batches, "iters": args.iters, "per_image_anchors": args.per_image_anchors,
                          "anchors": int(priors.shape[0]), "seed": args.seed}
    report["batches"] = rows
    report["summary"] = {"ours_ms": stats([r["ours_ms"] for r in rows], 1.0),
                         "padded_ms": stats([r["padded_ms"] for r in rows], 1.0),
                         "total_speedup": rnd(sum(r["padded_ms"] for r in rows) / sum(r["ours_ms"] for r in rows))}
    notes = ["ms per batch: mean of --iters runs after one warm-up, moving the padded batch to the device included"]
    return finish_report(report, notes, errors, started, args.out)


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["errors"] else 0)
