"""Comparison of detections with the public Pytorch_Retinaface reference outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou


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
    wanted = expected[expected[:, 4] >= min_score]
    if len(wanted) == 0:
        return []
    if len(actual) == 0:
        return [f"no detection for {row[:5].round(2).tolist()}" for row in wanted]
    iou = box_iou(torch.from_numpy(wanted[:, :4]), torch.from_numpy(np.asarray(actual[:, :4], np.float64))).numpy()
    problems = []
    for row, overlaps in zip(wanted, iou):
        candidates = np.where(overlaps >= min_iou)[0]
        good = [c for c in candidates if abs(actual[c, 4] - row[4]) <= max_score_diff
                and np.abs(actual[c, 5:15] - row[5:15]).max() <= max_landmark_diff]
        if not good:
            best = int(overlaps.argmax())
            problems.append(f"{row[:5].round(3).tolist()}: best IoU {overlaps[best]:.4f}, "
                            f"score {actual[best, 4]:.4f}")
    return problems


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
