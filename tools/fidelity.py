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


def as_rows(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes.reshape(-1, 4), scores.reshape(-1, 1), landmarks.reshape(-1, 10)], axis=1)
