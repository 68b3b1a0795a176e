"""Mask stage of inference.py: each image's masks finished before the next image (what the CPU
runs) against masks overlapping the network (what CUDA runs), in alternating rounds.

    python tools/benchmark_masks.py --inference_dir ../shared/data/photos \\
        --weights ../shared/weights/mobilenet0.25_Final.pth [--network_threads 1 --mask_threads 1]

The lent GPU machines have no mediapipe, so the overlap cannot be timed where it is used. With
``--network_threads 1 --mask_threads 1`` on a 2-core machine the network keeps one core and the
segmentation graph the other, as on a GPU host where the network leaves the cores to the masks.
Prints one line per run: images/s and the summary's ms/img.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from utils import face_mask, inference_utils  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inference_dir", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--network_threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--mask_threads", type=int, default=None, help="segmentation graphs (default: one per core)")
    args = parser.parse_args(argv)
    if args.network_threads:
        torch.set_num_threads(args.network_threads)
    if args.mask_threads:
        face_mask.mask_threads = lambda: args.mask_threads
    for _ in range(args.rounds):
        for overlap in (False, True):
            inference_utils.masks_overlap_network = lambda device, overlap=overlap: overlap
            with tempfile.TemporaryDirectory() as out:
                options = argparse.Namespace(weights=args.weights, inference_dir=args.inference_dir,
                                             inference_save_folder=out, mask=True, save_mask=False)
                summary = inference_utils.run_inference(options, collect=False, progress=False).summary
            ms = {key: round(value, 1) for key, value in summary.ms_per_image().items()}
            print(f"{'overlapped' if overlap else 'image by image':15s} {summary.images_per_s:7.2f} images/s  "
                  f"{summary.processed} images  ms/img {ms}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
