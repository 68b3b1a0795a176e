"""Post-processing of one real batch (score threshold, top-k, NMS, keep-top-k) per NMS chunk size.

``utils.postprocess`` runs NMS for a whole batch through ``utils.nms.batched_nms``. torchvision's
CUDA NMS copies an N x N/64 bit mask to the host, N the candidates of the call, so one call per
batch grows with the square of the batch's candidates; ``batched_nms`` therefore splits them into
calls of at most ``utils.nms.nms_chunk(device)`` candidates (whole images). This benchmark times
``postprocess_to_host`` (post-processing and the copy of the detections to the host, as the
inference pipeline and FaceDetector run it) on the dense outputs of one batch of sample-content
images, for several chunk sizes and confidence thresholds (0.5: a demo; 0.02: the WIDER FACE
evaluation), checks that every chunk size gives the detections of one call, and reports the
candidate counts that decide the cost.

    python tools/benchmark_nms.py --device cuda                      # published mobilenet0.25
    python tools/benchmark_nms.py --model resnet50_cascade --weights trained.pth

Prints ONE JSON line (``--out FILE`` appends it); ``tools/speed_table.py`` renders it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.dense_path import DensePath  # noqa: E402
from tools.benchmark_inference import (MODELS, SAMPLE_IMAGES, default_weights, finish_report,  # noqa: E402
                                       load_benchmark_model, load_sample_arrays, pinned,
                                       report_header, setup_device, stats, synchronize, synthetic_batches)
from utils.nms import nms_chunk  # noqa: E402
from utils.postprocess import postprocess_to_host  # noqa: E402

ONE_CALL = 0  # --chunks value: the whole batch in one NMS call


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--model", default="mobilenet0.25", choices=sorted(MODELS))
    parser.add_argument("--weights", default=None,
                        help="detector checkpoint, or 'random' (default: the published mobilenet0.25 for it)")
    parser.add_argument("--sample_images", default=str(SAMPLE_IMAGES), help="folder of the images to crop from")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", default="640x480", help="WxH of the batch")
    parser.add_argument("--thresholds", default="0.5,0.02", help="confidence thresholds")
    parser.add_argument("--chunks", default=f"{ONE_CALL},1024,2048,4096",
                        help=f"candidates per NMS call ({ONE_CALL}: one call per batch)")
    parser.add_argument("--nms_threshold", type=float, default=0.4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    return parser


def numbers(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"benchmark_nms.py: error: {option} {text!r}: comma-separated numbers expected") from None
    if not values or min(values) < 0:
        raise SystemExit(f"benchmark_nms.py: error: {option} {text!r}: non-negative numbers expected")
    return values


@torch.inference_mode()
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    thresholds = numbers(args.thresholds, float, "--thresholds")
    chunks = numbers(args.chunks, int, "--chunks")
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"benchmark_nms.py: error: --size {args.size!r}: WxH expected") from None
    device = setup_device(args.device, args.threads, args.out)
    _, arrays = load_sample_arrays(Path(args.sample_images), None)
    if not arrays:
        raise SystemExit(f"benchmark_nms.py: error: no images in {args.sample_images}")
    report = report_header("nms", "tools/benchmark_nms.py", argv, device)
    weights = args.weights or default_weights(args.model)
    batch = synthetic_batches(args.batch, width, height, "sample", arrays, 1, args.seed)[0]
    model, weights_note = load_benchmark_model(args.model, weights, device,
                                               torch.from_numpy(batch[: min(8, args.batch)]), args.seed)
    boxes, scores, landmarks = DensePath(model, device)(pinned(batch, device))  # fp32, eager
    report["settings"] = {"model": args.model, "weights": weights_note, "batch": args.batch, "size": [width, height],
                          "nms_threshold": args.nms_threshold, "iters": args.iters, "warmup": args.warmup,
                          "default_chunk": nms_chunk(device)}
    cases = []
    for threshold in thresholds:
        per_image = (scores > threshold).sum(dim=1)
        case: dict[str, Any] = {"threshold": threshold, "candidates": int(per_image.sum()),
                                "candidates_max_image": int(per_image.max()), "chunks": []}
        reference = None
        for chunk in chunks:
            def run():
                return postprocess_to_host(boxes, scores, landmarks, threshold, args.nms_threshold,
                                           nms_chunk=chunk if chunk != ONE_CALL else scores.numel())

            for _ in range(args.warmup):
                run()
            times = []
            for _ in range(args.iters):
                synchronize(device)
                t0 = time.perf_counter()
                rows, counts = run()
                times.append(time.perf_counter() - t0)
            if reference is None:
                reference = (rows, counts)
                case["detections"] = len(rows)
            same = counts == reference[1] and np.array_equal(rows, reference[0])
            case["chunks"].append({"chunk": chunk, "ms": stats(times), "same_detections": same})
        cases.append(case)
    report["cases"] = cases
    notes = [f"{ONE_CALL} = the whole batch in one NMS call; default chunk on {device.type} {nms_chunk(device)}"]
    errors = [f"threshold {c['threshold']} chunk {e['chunk']}: detections differ from chunk {chunks[0]}"
              for c in cases for e in c["chunks"] if not e["same_detections"]]
    return finish_report(report, notes, errors, started, args.out)


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["errors"] else 0)
