"""CPU benchmark: our full detection pipeline vs a public-style per-image pipeline, one run.

    python tools/benchmark_cpu.py [--weights W] [--images DIR] [--threads 2] [--repeats 3] [--onnx FILE]

Both pipelines read every image from disk and run the published mobilenet0.25 detector at
original scale (confidence 0.02, NMS 0.4); the public-style one is tools/public_pipeline.py. The
rounds alternate between the two and the best round of each is reported, so the ratio comes
from the same machine state. The detections of both are compared (score >= 0.5, both ways).
``--onnx FILE`` (the same weights exported by ``tools/export_onnx.py``) adds a third pipeline in
the same rounds: onnxruntime on the CPU with the same threads and post-processing. ``--nchw``
adds our pipeline with the network in the NCHW layout (``FaceDetector(channels_last=False)``),
to show what the channels_last default gains. ``--pad_to N`` adds our pipeline with padded batches
(``FaceDetector(pad_to=N, batch_size=--pad_batch)``, test.py's ``--pad_to``), to show what padding
costs on the CPU.
Prints one JSON line (with the date, the command and the inputs; ``--out FILE`` also appends it there).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import non_negative_int, one_line, positive_int  # noqa: E402
from models.detector import FaceDetector  # noqa: E402
from tools.fidelity import as_rows, unmatched  # noqa: E402
from tools import check_inputs, shared_root  # noqa: E402
from tools.benchmark_inference import emit  # noqa: E402
from tools.public_pipeline import public_style_detect  # noqa: E402
from utils.checkpoint import PUBLISHED_WEIGHTS  # noqa: E402
from utils.image_io import IMAGE_EXTENSIONS, read_image  # noqa: E402

SHARED = shared_root()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(SHARED / "weights/mobilenet0.25_Final.pth"),
                        help="detector checkpoint (default: the shared published mobilenet0.25)")
    parser.add_argument("--images", default=str(SHARED / "data/widerface_sample/val/images"),
                        help="folder of images (default: the shared sample WIDER FACE images)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch and OpenCV threads (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="alternating timing rounds, best kept (default 3)")
    parser.add_argument("--onnx", default=None, help="the same weights exported by tools/export_onnx.py")
    parser.add_argument("--nchw", action="store_true", help="also time our pipeline with the network in NCHW")
    parser.add_argument("--pad_to", type=non_negative_int, default=0,
                        help="also time our pipeline with --pad_to N canvases")
    parser.add_argument("--pad_batch", type=positive_int, default=1, help="images per padded batch (with --pad_to)")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    check_inputs("benchmark_cpu.py", out=args.out)
    for option, path in (("--weights", args.weights), ("--onnx", args.onnx)):
        published = option == "--weights" and path in PUBLISHED_WEIGHTS  # FaceDetector fetches those by name
        if path is not None and not published and not Path(path).is_file():
            parser.error(f"{option}: file not found: {path}")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"benchmark_cpu.py: error: no images under {args.images}")

    detector = FaceDetector(args.weights, device="cpu", confidence_threshold=0.02, nms_threshold=0.4)
    model = detector.model.eval()

    def detect_all(face_detector: FaceDetector) -> list[np.ndarray]:
        return [as_rows(d.boxes, d.scores, d.landmarks) for d in (face_detector.detect(p) for p in paths)]

    def public(timings: dict | None = None) -> list[np.ndarray]:
        return [public_style_detect(model, cv2.imread(str(p), cv2.IMREAD_COLOR), timings=timings) for p in paths]

    pipelines = {"ours": lambda steps: detect_all(detector), "public": public}
    detectors = {"ours": detector}
    if args.nchw:
        detectors["nchw"] = FaceDetector(args.weights, device="cpu", confidence_threshold=0.02, nms_threshold=0.4,
                                         channels_last=False)
        pipelines["nchw"] = lambda steps: detect_all(detectors["nchw"])
    if args.pad_to:
        detectors["padded"] = FaceDetector(args.weights, device="cpu", confidence_threshold=0.02, nms_threshold=0.4,
                                           pad_to=args.pad_to, batch_size=args.pad_batch)
        pipelines["padded"] = lambda steps: [as_rows(d.boxes, d.scores, d.landmarks)
                                             for d in detectors["padded"].detect(list(paths))]
    if args.onnx:
        from tools.export_onnx import onnx_detections, onnx_session

        try:
            session = onnx_session(args.onnx, threads=args.threads)
        except Exception as error:  # noqa: BLE001 - onnxruntime's own error types (InvalidProtobuf ...)
            raise SystemExit(f"benchmark_cpu.py: error: --onnx {args.onnx}: onnxruntime cannot load it "
                             f"({one_line(error)[:200]})") from None
        pipelines["onnx"] = lambda steps: [onnx_detections(session, read_image(p), 0.02, 0.4) for p in paths]
    for run in pipelines.values():  # warm-up (allocations, caches)
        run({})
    best = dict.fromkeys(pipelines, float("inf"))
    results_of: dict[str, list[np.ndarray]] = {}
    public_steps: dict[str, float] = {}
    detector_steps: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name, run in pipelines.items():
            for face_detector in detectors.values():
                face_detector.timings.clear()
            steps: dict[str, float] = {}
            started = time.perf_counter()
            results = run(steps)
            elapsed = time.perf_counter() - started
            if elapsed < best[name]:
                best[name] = elapsed
                results_of[name] = results
                if name in detectors:
                    detector_steps[name] = dict(detectors[name].timings)
                elif name == "public":
                    public_steps = steps
    started = time.perf_counter()
    for p in paths:
        read_image(p)
    read_seconds = time.perf_counter() - started

    def mismatches(first: str, second: str) -> int:
        return sum(len(unmatched(a, b)) + len(unmatched(b, a)) for a, b in zip(results_of[first], results_of[second]))

    n = len(paths)
    report = {
        "benchmark": "cpu_pipeline_mobilenet0.25_original_scale",
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "command": shlex.join(["python", "tools/benchmark_cpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "weights": args.weights, "images_folder": args.images,
        "images": n, "threads": args.threads, "repeats": args.repeats,
        "ours_detections_score_ge_0.5": int(sum((rows[:, 4] >= 0.5).sum() for rows in results_of["ours"])),
        "ours_ms_per_img": round(best["ours"] / n * 1000, 2),
        "public_style_ms_per_img": round(best["public"] / n * 1000, 2),
        "ratio_ours_over_public": round(best["ours"] / best["public"], 3),
        "ours_steps_ms_per_img": {k: round(v / n * 1000, 2) for k, v in detector_steps["ours"].items()},
        "public_steps_ms_per_img": {k: round(v / n * 1000, 2) for k, v in public_steps.items()},
        "read_image_ms_per_img": round(read_seconds / n * 1000, 2),
        "detections_score_ge_0.5_unmatched_between_pipelines": mismatches("ours", "public"),
        "env": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "cv2": cv2.__version__, "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count()},
    }
    if args.nchw:
        report.update({"nchw_ms_per_img": round(best["nchw"] / n * 1000, 2),
                       "nchw_steps_ms_per_img": {k: round(v / n * 1000, 2) for k, v in detector_steps["nchw"].items()},
                       "nchw_detections_score_ge_0.5_unmatched_vs_ours": mismatches("nchw", "ours")})
    if args.pad_to:
        report.update({"padded": f"pad_to={args.pad_to}, batch_size={args.pad_batch}",
                       "padded_ms_per_img": round(best["padded"] / n * 1000, 2),
                       "padded_steps_ms_per_img": {k: round(v / n * 1000, 2)
                                                   for k, v in detector_steps["padded"].items()},
                       "padded_detections_score_ge_0.5_unmatched_vs_ours": mismatches("padded", "ours")})
    if args.onnx:
        report.update({"onnx": args.onnx, "onnx_ms_per_img": round(best["onnx"] / n * 1000, 2),
                       "ratio_onnx_over_ours": round(best["onnx"] / best["ours"], 3),
                       "onnx_detections_score_ge_0.5_unmatched_vs_ours": mismatches("onnx", "ours")})
        import onnxruntime

        report["env"]["onnxruntime"] = onnxruntime.__version__
    emit(report, args.out)
    return report


#: unmatched detections (score >= 0.5, both ways) above this share of ours: the pipelines do not run the same
#: model (e.g. an --onnx export of other weights), and their times are no comparison
MAX_UNMATCHED_SHARE = 0.01


def disagreements(report: dict, ours_detections: int) -> list[str]:
    """The report's ``*_unmatched*`` counts above :data:`MAX_UNMATCHED_SHARE` of ``ours_detections``."""
    limit = MAX_UNMATCHED_SHARE * max(ours_detections, 1)
    return [f"{key} = {value}" for key, value in report.items() if "unmatched" in key and value > limit]


if __name__ == "__main__":
    result = main()
    wrong = disagreements(result, result["ours_detections_score_ge_0.5"])
    if wrong:
        print(f"benchmark_cpu.py: error: the pipelines disagree ({', '.join(wrong)}, of "
              f"{result['ours_detections_score_ge_0.5']} detections of ours), so their times are no comparison"
              + ("; do --weights and --onnx hold the same model?" if any("onnx" in w for w in wrong) else
                 " (random weights score many near-ties: use trained ones)"), file=sys.stderr)
        sys.exit(1)
