"""Detect faces in a folder of images; optionally draw them, cut MediaPipe face/head masks and
write aligned face crops.

    python inference.py --weights mobilenet0.25 --inference_dir photos/ \\
        --inference_save_folder out/ --save_img true [--mask true --save_mask true]

Options are declared in ``config.py`` (``python inference.py --help``); the work is done by
:func:`utils.inference_utils.run_inference`, :mod:`utils.face_mask` and :mod:`utils.face_align`.
Exit codes: 0 all images processed, 3 finished but some files (or unreadable folders) were
skipped (listed in the summary and in ``OUT/summary.json``), 1 nothing run (no images, missing
weights, unavailable device, output folder already holds results or cannot be written ...),
2 bad option, 130 interrupted (143 for SIGTERM; both write the results of the images done).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from config import run_command_line
from utils.errors import CheckpointError, InferenceError, check_input

DESCRIPTION = ("Detect faces in every image under --inference_dir (recursively) and write "
               "<experiment>_inference_results.txt, detections.json and summary.json to "
               "--inference_save_folder; --save_img draws them, --mask/--save_mask add MediaPipe "
               "face and head masks, --save_aligned writes aligned face crops.")
EPILOG = ("exit status: 0 all images processed; 3 finished, but some files were skipped "
          "(unreadable, truncated, empty, not an image, or in a folder that cannot be read; listed in "
          "the summary and summary.json); 1 nothing was run (no images, none of them processed, input "
          "not found or not readable, missing weights, unavailable device, output folder already holds "
          "results without --exist_ok or cannot be created or written); 2 invalid option; 130 interrupted "
          "(Ctrl-C), 143 terminated (SIGTERM): the results of the images done are written.")

MASKS_NOT_WRITTEN = ("inference.py: warning: --mask true computes the masks but only --save_mask true writes them "
                     "(the Python inference() returns them)")


def inference(args: argparse.Namespace):
    """Run inference as configured by ``args`` and return the original project's 5-tuple.

    Writes the outputs described in ``utils/inference_utils.py`` and returns
    ``(result_bboxes, face_bboxes, face_masks, head_bboxes, head_masks)``, one entry per
    processed image, in the order of the sorted relative paths (skipped files have no entry; the
    names are the keys of ``OUT/detections.json`` in the same order):

    - ``result_bboxes[i]``: ``np.ndarray`` (K_i, 4) int, face boxes ``x1, y1, x2, y2`` in pixels
      of image i (truncated to integers; float boxes, scores and landmarks are in
      ``detections.json``). Unlike the original, images without faces get an empty (0, 4) array
      instead of no entry, so the list stays aligned with the images.
    - With ``--mask`` (else these four are empty lists ``[]``), for face k of image i:
      ``face_bboxes[i][k]``: ``[x1, y1, x2, y2]`` ints, the face box in head-crop coordinates;
      ``face_masks[i][k]``: ``np.ndarray`` (h, w, 3) uint8 0/255, the face mask (size of the
      face crop ``head_crop[y1:y2, x1:x2]``);
      ``head_bboxes[i][k]``: ``[x1, y1, x2, y2]`` ints, the head box (face box x4 about its
      centre, clipped) in image coordinates;
      ``head_masks[i][k]``: ``np.ndarray`` (H, W, 3) uint8 0/255, the head-crop mask.

    Raises :class:`utils.inference_utils.InferenceError` or
    :class:`utils.checkpoint.CheckpointError` when the run cannot start, and ``InferenceError``
    when none of the files found could be processed (the command line's exit status 1; the
    summary, printed first, lists each file with its reason).
    """
    from utils.inference_utils import format_summary, legacy_outputs, run_inference  # noqa: PLC0415 (torch)

    run = run_inference(args, collect=True)
    print(format_summary(run.summary))
    if run.summary.error:  # the run ended without an exception yet failed: no file could be read
        raise InferenceError(run.summary.error)
    return legacy_outputs(run)


def _run(args: argparse.Namespace) -> int:
    check_input(args.inference_dir)  # a missing input answers before torch is imported (seconds)
    # imported once the options are checked: --help and option errors answer without loading torch
    from utils.inference_utils import format_summary, run_inference  # noqa: PLC0415

    if args.mask and not args.save_mask:
        print(MASKS_NOT_WRITTEN, file=sys.stderr)
    run = run_inference(args, collect=False)
    print(format_summary(run.summary))
    if run.summary.error:  # a run that ended without an exception yet failed: none of its files could be read
        print(f"inference.py: error: {run.summary.error}", file=sys.stderr)
    return run.summary.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see ``--help``)."""
    return run_command_line("inference", argv, _run, (InferenceError, CheckpointError, OSError),
                            description=DESCRIPTION, epilog=EPILOG)


if __name__ == "__main__":
    sys.exit(main())
