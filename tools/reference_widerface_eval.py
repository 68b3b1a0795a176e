"""Straightforward, loop-based WIDER FACE evaluation used as a test oracle and benchmark baseline.

Written from the protocol description in ``utils/metric.py`` (not from the vectorised code): it
walks the images one by one, matches each image's predictions greedily in a python loop and
scans the 1000 score thresholds one at a time, the way the public ``evaluation.py`` does. It is
deliberately slow (~tens of seconds on the full validation set) and lives outside ``utils/``
because it is not part of the library.

Ground truth is a list of :class:`RefImage`; :func:`load_reference_gt` reads the official
``.mat`` files with its own nested-cell walk so that the library loader is cross-checked too.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports, which need the repository root on the path
    raise SystemExit(f"{__file__}: a module (the loop-based WIDER FACE evaluation the tests use as an oracle), "
                     "not a command; see README, Layout")

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SETTINGS = ("easy", "medium", "hard")


@dataclass
class RefImage:
    """One ground-truth image: ``boxes`` ``(k, 4)`` float64 ``x y w h``; ``keep`` setting -> 1-based indices."""

    event: str
    stem: str
    boxes: np.ndarray
    keep: dict[str, np.ndarray]


def load_reference_gt(gt_dir: str | os.PathLike[str]) -> list[RefImage]:
    """Read ``wider_face_val.mat`` + ``wider_{easy,medium,hard}_val.mat`` into :class:`RefImage` s."""
    from scipy.io import loadmat

    main = loadmat(os.path.join(gt_dir, "wider_face_val.mat"))
    lists = {s: loadmat(os.path.join(gt_dir, f"wider_{s}_val.mat"))["gt_list"] for s in SETTINGS}
    out: list[RefImage] = []
    for e in range(main["event_list"].shape[0]):
        event = str(main["event_list"][e, 0][0])
        files = main["file_list"][e, 0]
        boxes = main["face_bbx_list"][e, 0]
        for j in range(files.shape[0]):
            keep = {s: np.asarray(lists[s][e, 0][j, 0], dtype=np.int64).ravel() for s in SETTINGS}
            out.append(RefImage(event, str(files[j, 0][0]), np.asarray(boxes[j, 0], dtype=np.float64), keep))
    return out


def reference_gt_from_records(
    records: Iterable[tuple[str, str, np.ndarray, Mapping[str, np.ndarray]]]
) -> list[RefImage]:
    """Same records format as ``WiderFaceGroundTruth.from_records``."""
    return [
        RefImage(
            event,
            stem,
            np.asarray(b, dtype=np.float64).reshape(-1, 4),
            {s: np.asarray(keep.get(s, ()), dtype=np.int64).ravel() for s in SETTINGS},
        )
        for event, stem, b, keep in records
    ]


def _iou_plus1(pred_xyxy: np.ndarray, gt_xyxy: np.ndarray) -> np.ndarray:
    """IoU (+1 pixel areas), one face at a time over all predictions (the Cython loop order)."""
    n, k = len(pred_xyxy), len(gt_xyxy)
    out = np.zeros((n, k))
    pa = (pred_xyxy[:, 2] - pred_xyxy[:, 0] + 1) * (pred_xyxy[:, 3] - pred_xyxy[:, 1] + 1)
    for j in range(k):
        gx1, gy1, gx2, gy2 = gt_xyxy[j]
        garea = (gx2 - gx1 + 1) * (gy2 - gy1 + 1)
        iw = np.minimum(pred_xyxy[:, 2], gx2) - np.maximum(pred_xyxy[:, 0], gx1) + 1
        ih = np.minimum(pred_xyxy[:, 3], gy2) - np.maximum(pred_xyxy[:, 1], gy1) + 1
        ok = (iw > 0) & (ih > 0)
        union = pa[ok] + garea - iw[ok] * ih[ok]
        out[ok, j] = iw[ok] * ih[ok] / union
    return out


def _match_image(pred: np.ndarray, boxes: np.ndarray, kept: np.ndarray, iou_thr: float) -> tuple[list[int], list[int]]:
    """Greedy matching of one image -> (recalled-so-far after each prediction, proposal flag 1/-1)."""
    p = pred[:, :4].copy()
    p[:, 2] += p[:, 0]
    p[:, 3] += p[:, 1]
    g = boxes.copy()
    g[:, 2] += g[:, 0]
    g[:, 3] += g[:, 1]
    ov = _iou_plus1(p, g)
    state = [0] * len(boxes)  # 0 untouched, 1 recalled, -1 hit while ignored
    recalled_so_far: list[int] = []
    flags: list[int] = []
    n_recalled = 0
    for h in range(len(pred)):
        j = int(np.argmax(ov[h]))
        flag = 1
        if ov[h, j] >= iou_thr:
            if not kept[j]:
                state[j] = -1
                flag = -1
            elif state[j] == 0:
                state[j] = 1
                n_recalled += 1
        recalled_so_far.append(n_recalled)
        flags.append(flag)
    return recalled_so_far, flags


def reference_evaluate(
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    gt: Sequence[RefImage],
    iou_threshold: float = 0.5,
    images: Iterable[str] | None = None,
    sort_predictions: bool = True,
    thresh_num: int = 1000,
) -> dict[str, dict[str, object]]:
    """Loop implementation. ``images``: ``"event/stem"`` keys to count (None: every image, each of
    which must have an entry in ``predictions``). Returns ``{setting: {"ap", "precision", "recall"}}``."""
    # Copy, optionally stable-sort by raw score (python's sort is stable), then normalise.
    preds: dict[str, dict[str, np.ndarray]] = {}
    for event, per in predictions.items():
        preds[event] = {}
        for stem, arr in per.items():
            a = np.array(arr, dtype=np.float64).reshape(-1, 5)
            if sort_predictions:
                order = sorted(range(len(a)), key=lambda r: -a[r, 4])
                a = a[order] if order else a
            preds[event][stem] = a
    lo, hi = 1.0, 0.0
    for per in preds.values():
        for a in per.values():
            if len(a):
                lo = min(lo, float(np.min(a[:, 4])))
                hi = max(hi, float(np.max(a[:, 4])))
    spread = np.float64(hi - lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        for per in preds.values():
            for a in per.values():
                if len(a):
                    a[:, 4] = (a[:, 4] - lo) / spread

    wanted = None if images is None else {k[:-4] if k.endswith(".jpg") else k for k in images}
    results: dict[str, dict[str, object]] = {}
    for setting in SETTINGS:
        faces = 0
        curve = np.zeros((thresh_num, 2))
        for im in gt:
            if wanted is not None and f"{im.event}/{im.stem}" not in wanted:
                continue
            pred = preds[im.event][im.stem]
            keep = im.keep[setting]
            faces += len(keep)
            if len(im.boxes) == 0 or len(pred) == 0:
                continue
            kept = np.zeros(len(im.boxes), dtype=bool)
            kept[keep - 1] = True
            recalled_so_far, flags = _match_image(pred, im.boxes, kept, iou_threshold)
            for t in range(thresh_num):
                th = 1 - (t + 1) / thresh_num
                passing = np.nonzero(pred[:, 4] >= th)[0]
                if len(passing) == 0:
                    continue
                last = int(passing[-1])
                curve[t, 0] += sum(1 for f in flags[: last + 1] if f == 1)
                curve[t, 1] += recalled_so_far[last]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = curve[:, 1] / curve[:, 0]
            recall = curve[:, 1] / np.float64(faces)
        results[setting] = {"ap": _voc_ap_loop(recall, precision), "precision": precision, "recall": recall}
    return results


def _voc_ap_loop(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])  # np.maximum: nan propagates
    area = 0.0
    steps = []
    for i in range(len(mrec) - 1):
        if mrec[i + 1] != mrec[i]:
            steps.append((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    if steps:
        area = float(np.sum(np.array(steps)))
    return area
