"""Comparison of detections with the public Pytorch_Retinaface reference outputs."""
from __future__ import annotations

if __name__ == "__main__":  # before the imports, which need the repository root on the path
    raise SystemExit(f"{__file__}: a module (the detection comparison used by the tests and tools/benchmark_*.py), "
                     "not a command; see README, Layout")

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from utils.nms import PUBLIC_PIXEL_OFFSET, with_pixel_offset


def load_reference(path: Path) -> dict[str, np.ndarray]:
    """{relative image path: (K, 15) [x1, y1, x2, y2, score, 10 landmark values]}."""
    detections = json.loads(Path(path).read_text())["detections"]
    return {name: np.asarray(rows, dtype=np.float64).reshape(-1, 15) for name, rows in detections.items()}


def unmatched(expected: np.ndarray, actual: np.ndarray, min_score: float = 0.5, min_iou: float = 0.98,
              max_score_diff: float = 0.005, max_landmark_diff: float = 1.0) -> list[str]:
    """Rows of ``expected`` with score >= min_score that have no counterpart in ``actual``.

    Both are (K, 15) rows as in :func:`load_reference`. A counterpart overlaps with IoU >= min_iou,
    differs in score by <= max_score_diff and in every landmark coordinate by <= max_landmark_diff.
    """
    problems = []
    for index, best, best_iou in _unmatched_rows(expected, actual, min_score, min_iou, max_score_diff,
                                                 max_landmark_diff):
        row = expected[index]
        if best is None:
            problems.append(f"no detection for {row[:5].round(2).tolist()}")
        else:
            problems.append(f"{row[:5].round(3).tolist()}: best IoU {best_iou:.4f}, score {actual[best, 4]:.4f}")
    return problems


def _unmatched_rows(expected: np.ndarray, actual: np.ndarray, min_score: float, min_iou: float,
                    max_score_diff: float, max_landmark_diff: float) -> list[tuple[int, int | None, float]]:
    """(row of ``expected``, row of ``actual`` overlapping it most or None, that IoU) for every row
    of :func:`unmatched`."""
    wanted = np.where(expected[:, 4] >= min_score)[0]
    if len(wanted) == 0:
        return []
    if len(actual) == 0:
        return [(int(i), None, 0.0) for i in wanted]
    iou = box_iou(torch.from_numpy(np.asarray(expected[wanted, :4], np.float64)),
                  torch.from_numpy(np.asarray(actual[:, :4], np.float64))).numpy()
    rows = []
    for index, overlaps in zip(wanted, iou):
        candidates = np.where(overlaps >= min_iou)[0]
        good = [c for c in candidates if abs(actual[c, 4] - expected[index, 4]) <= max_score_diff
                and np.abs(actual[c, 5:15] - expected[index, 5:15]).max() <= max_landmark_diff]
        if not good:
            best = int(overlaps.argmax())
            rows.append((int(index), best, float(overlaps[best])))
    return rows


def nms_near_ties(reference_rows: Sequence[np.ndarray], candidate_rows: Sequence[np.ndarray],
                  reference_dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  candidate_dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor], max_score_diff: float,
                  max_landmark_diff: float, min_score: float = 0.5, min_iou: float = 0.98,
                  nms_threshold: float = 0.4, overlap_margin: float = 0.02,
                  pixel_offset: float = PUBLIC_PIXEL_OFFSET) -> dict:
    """Which detections without a counterpart (:func:`unmatched`, both ways, per image) an NMS
    near-tie explains.

    ``*_rows``: the two pipelines' detections per image, (K, 15) rows; ``*_dense``: their decoded
    outputs of every prior before NMS for the same batch, as in :func:`dense_disagreement`. A
    detection is explained when (1) it is the output of one prior, (2) that prior agrees on the
    other side (IoU >= ``min_iou``, scores within ``max_score_diff``, landmarks within
    ``max_landmark_diff``), and (3) the other side's NMS suppressed it in favour of a kept detection
    that overlaps it above ``nms_threshold`` ("+1 pixel" IoU as :func:`utils.nms.nms`) and either
    outscores it by at most ``max_score_diff`` (the order of two near-equal candidates flipped) or
    overlaps it by at most ``nms_threshold + overlap_margin`` (an overlap at the threshold). Such a
    difference comes from the rounding of two near-equal values, not from a moved detection.

    Returns ``{"unmatched": n, "near_ties": m, "unexplained": [up to 3 descriptions]}``."""
    sides = [[t.detach().double().cpu().numpy() for t in dense] for dense in (reference_dense, candidate_dense)]
    total, ties, unexplained = 0, 0, []
    for own_rows, other_rows, own, other in ((reference_rows, candidate_rows, sides[0], sides[1]),
                                             (candidate_rows, reference_rows, sides[1], sides[0])):
        for image, (mine, theirs) in enumerate(zip(own_rows, other_rows)):
            mine = np.asarray(mine, np.float64).reshape(-1, 15)
            theirs = np.asarray(theirs, np.float64).reshape(-1, 15)
            for index, _, _ in _unmatched_rows(mine, theirs, min_score, min_iou, max_score_diff, max_landmark_diff):
                total += 1
                reason = _near_tie_reason(mine[index], theirs, [t[image] for t in own], [t[image] for t in other],
                                          max_score_diff, max_landmark_diff, min_iou, nms_threshold,
                                          overlap_margin, pixel_offset)
                if reason is None:
                    ties += 1
                elif len(unexplained) < 3:
                    unexplained.append(f"{mine[index, :5].round(3).tolist()}: {reason}")
    return {"unmatched": total, "near_ties": ties, "unexplained": unexplained}


def _near_tie_reason(row: np.ndarray, other_rows: np.ndarray, own: list[np.ndarray], other: list[np.ndarray],
                     max_score_diff: float, max_landmark_diff: float, min_iou: float, nms_threshold: float,
                     overlap_margin: float, pixel_offset: float) -> str | None:
    """None when an NMS near-tie explains ``row`` (see :func:`nms_near_ties`), else why not."""
    own_boxes, own_scores, _ = own
    distance = np.abs(own_boxes - row[:4]).max(axis=1) + np.abs(own_scores - row[4])
    prior = int(distance.argmin())
    if distance[prior] > 1e-3:
        return "not the output of one prior"
    box, score, landmarks = other[0][prior], float(other[1][prior]), other[2][prior]
    agrees = (_iou(box, row[None, :4], 0.0)[0] >= min_iou and abs(score - row[4]) <= max_score_diff
              and np.abs(landmarks - row[5:15]).max() <= max_landmark_diff)
    if not agrees:
        return f"its prior differs on the other side (score {score:.4f})"
    if len(other_rows) == 0:
        return "the other side kept nothing"
    overlaps = _iou(box, other_rows[:, :4], pixel_offset)
    suppressors = (overlaps > nms_threshold) & (other_rows[:, 4] >= score - 1e-6)
    if not suppressors.any():
        return "its prior was not suppressed by NMS on the other side"
    near = suppressors & ((other_rows[:, 4] - score <= max_score_diff) | (overlaps <= nms_threshold + overlap_margin))
    if near.any():
        return None
    winner = int(np.where(suppressors)[0][0])
    return f"suppressed by a detection scoring {other_rows[winner, 4]:.4f} at IoU {overlaps[winner]:.3f}"


def _iou(box: np.ndarray, boxes: np.ndarray, pixel_offset: float) -> np.ndarray:
    """IoU of one x1y1x2y2 box with (K, 4) boxes; ``pixel_offset`` 1 for the "+1 pixel" areas."""
    one = with_pixel_offset(torch.from_numpy(np.asarray(box, np.float64).reshape(1, 4)), pixel_offset)
    many = with_pixel_offset(torch.from_numpy(np.asarray(boxes, np.float64).reshape(-1, 4)), pixel_offset)
    return box_iou(one, many).numpy()[0]


def dense_disagreement(reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor], min_score: float = 0.5,
                       min_iou: float = 0.98, max_score_diff: float = 0.005,
                       max_landmark_diff: float = 1.0) -> dict:
    """Prior-by-prior comparison of two pipelines' decoded outputs for the same input, before NMS.

    Each is (boxes (B, N, 4) x1y1x2y2 pixels, scores (B, N), landmarks (B, N, 10) pixels). Every
    prior scoring >= ``min_score`` in either must agree: IoU of its two boxes >= ``min_iou``, scores
    within ``max_score_diff``, every landmark coordinate within ``max_landmark_diff``. Unlike a
    comparison of final detections this does not depend on NMS, whose choice between two
    near-equal overlapping candidates of one face flips with any rounding.
    """
    ref_boxes, ref_scores, ref_landmarks = (t.detach().double().cpu() for t in reference)
    boxes, scores, landmarks = (t.detach().double().cpu() for t in candidate)
    considered = (ref_scores >= min_score) | (scores >= min_score)
    ref_boxes, boxes = ref_boxes[considered], boxes[considered]
    top_left = torch.maximum(ref_boxes[:, :2], boxes[:, :2])
    bottom_right = torch.minimum(ref_boxes[:, 2:], boxes[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = (ref_boxes[:, 2:] - ref_boxes[:, :2]).prod(dim=1) + (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    iou = intersection / (area - intersection)
    score_diff = (ref_scores[considered] - scores[considered]).abs()
    landmark_diff = (ref_landmarks[considered] - landmarks[considered]).abs().amax(dim=1)
    agree = (iou >= min_iou) & (score_diff <= max_score_diff) & (landmark_diff <= max_landmark_diff)
    count = int(considered.sum())
    return {"priors": count, "disagreeing": count - int(agree.sum()), "passed": bool(agree.all()),
            "min_iou": float(iou.min()) if count else None,
            "max_score_diff": float(score_diff.max()) if count else None,
            "max_landmark_diff_px": float(landmark_diff.max()) if count else None}


def as_rows(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes.reshape(-1, 4), scores.reshape(-1, 1), landmarks.reshape(-1, 10)], axis=1)
