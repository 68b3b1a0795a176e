"""Tests for utils/metric.py (official WIDER FACE evaluation, vectorised).

The oracle is tools/reference_widerface_eval.py, a loop implementation written from the protocol
text (per-image greedy loop, 1000 thresholds scanned one at a time, as the public tool does).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tools.reference_widerface_eval import (
    load_reference_gt,
    reference_evaluate,
    reference_gt_from_records,
)
from utils.metric import (
    NUM_VAL_IMAGES,
    SETTINGS,
    WiderFaceGroundTruth,
    bbox_overlaps_plus1,
    boxes_xyxy_to_xywh,
    evaluate,
    load_ground_truth,
    normalize_scores,
    plot_pr_curves,
    read_prediction_dir,
    read_prediction_file,
    voc_ap,
    write_prediction_file,
)

ALL = {"easy": [1], "medium": [1], "hard": [1]}


def _keep_all(k: int) -> dict[str, list[int]]:
    return {s: list(range(1, k + 1)) for s in SETTINGS}


def _gt(records) -> WiderFaceGroundTruth:
    return WiderFaceGroundTruth.from_records(records)


def _pred(*rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _nan_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-12))


def _assert_matches_reference(preds, records, **kw) -> None:
    ours = evaluate(preds, _gt(records), **kw)
    ref_kw = {k: v for k, v in kw.items() if k in ("iou_threshold", "images", "sort_predictions", "thresh_num")}
    if kw.get("subset"):
        ref_kw["images"] = [f"{e}/{s}" for e, per in preds.items() for s in per]
    ref = reference_evaluate(preds, reference_gt_from_records(records), **ref_kw)
    for s in SETTINGS:
        a, b = ours.aps[s], float(ref[s]["ap"])
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9, (s, a, b)
        assert _nan_equal(ours.curves[s].precision, ref[s]["precision"]), s
        assert _nan_equal(ours.curves[s].recall, ref[s]["recall"]), s


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------
def test_bbox_overlaps_plus1_known_values():
    a = np.array([[0.0, 0.0, 9.0, 9.0]])  # 10 x 10 pixels with the +1 convention
    b = np.array([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0], [10.0, 0.0, 19.0, 9.0], [9.0, 9.0, 20.0, 20.0]])
    iou = bbox_overlaps_plus1(a, b)
    # identical: 1; half shifted: 50 / (100 + 100 - 50); touching at x=10: iw = 9 - 10 + 1 = 0 -> 0;
    # corner pixel shared: 1 / (100 + 144 - 1)
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0, 1 / 243]], rtol=0, atol=1e-15)


def test_normalize_scores_public_quirks():
    np.testing.assert_allclose(normalize_scores(np.array([0.2, 0.6])), [0.0, 1.0])
    # lo starts at 1 and hi at 0: scores inside [0, 1] but not spanning it are still stretched...
    np.testing.assert_allclose(normalize_scores(np.array([3.0, 5.0])), [0.5, 1.0])  # lo = min(1, 3) = 1
    np.testing.assert_allclose(normalize_scores(np.array([-3.0, -1.0])), [0.0, 2 / 3])  # hi = max(0, -1) = 0
    with np.errstate(invalid="ignore"):
        assert np.isnan(normalize_scores(np.array([0.5, 0.5]))).all()  # hi == lo -> 0/0


def test_voc_ap_envelope_and_nan_prefix():
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    # envelope: precision 0.5 at recall 0.5 is lifted to the 2/3 reached later
    assert voc_ap(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 2 / 3])) == pytest.approx(2 / 3)
    # nan precision where nothing is proposed yet (recall 0) does not reach the area
    assert voc_ap(np.array([0.0, 0.0, 1.0]), np.array([np.nan, np.nan, 1.0])) == pytest.approx(1.0)


def test_xyxy_to_xywh():
    out = boxes_xyxy_to_xywh(np.array([[10.0, 20.0, 30.0, 60.0, 0.9]]))
    np.testing.assert_array_equal(out, [[10.0, 20.0, 20.0, 40.0, 0.9]])


# ----------------------------------------------------------------------------------------------
# hand-built cases with known AP
# ----------------------------------------------------------------------------------------------
FACES = np.array([[10, 10, 20, 20], [100, 10, 20, 20], [200, 10, 20, 20]], dtype=np.float64)


def test_perfect_detections_ap_one():
    records = [("e", "a", FACES, _keep_all(3))]
    preds = {"e": {"a": np.column_stack([FACES, [0.9, 0.8, 0.7]])}}
    r = evaluate(preds, _gt(records))
    assert r.aps == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    assert r.num_images == 1 and r.num_images_matched == 1 and not r.subset
    _assert_matches_reference(preds, records)


def test_false_positive_above_all_true_positives():
    # Two faces; detections: a false positive (raw 1.0), face 1 (0.5), face 2 (0.0).
    # Normalised over the set: lo = 0, hi = 1 -> unchanged (chosen to be exact in floats).
    # Thresholds 1 - (t+1)/1000:  th > 0.5 -> only FP passes: P = 0/1, R = 0
    #                             0 < th <= 0.5 -> FP, TP1:   P = 1/2, R = 1/2
    #                             th = 0 (t = 999) -> all:    P = 2/3, R = 1
    # Envelope from the right: 2/3 everywhere, so AP = 0.5 * 2/3 + 0.5 * 2/3 = 2/3.
    records = [("e", "a", FACES[:2], _keep_all(2))]
    preds = {"e": {"a": _pred([400, 300, 30, 30, 1.0], [*FACES[0], 0.5], [*FACES[1], 0.0])}}
    r = evaluate(preds, _gt(records))
    for s in SETTINGS:
        assert r.aps[s] == pytest.approx(2 / 3, abs=1e-12)
    c = r.curves["hard"]
    assert c.proposals[0] == 1 and c.recalled[0] == 0
    assert c.proposals[499] == 2 and c.recalled[499] == 1  # th_499 = 0.5 exactly
    assert c.proposals[-1] == 3 and c.recalled[-1] == 2
    _assert_matches_reference(preds, records)


def test_iou_equal_to_the_threshold_is_a_hit():
    """A detection matches its face from IoU ``>= iou_threshold`` (the public ``max_overlap >=
    iou_thresh``): a 10x20 px box over a 10x10 px face sharing its top half has +1-pixel IoU
    exactly 100 / 200 = 0.5, so with a perfect detection of a second face the AP is 1."""
    faces = np.array([[0, 0, 9, 9], [100, 0, 9, 9]], dtype=np.float64)  # x y w h: 10x10 pixels each
    tall = [0, 0, 9, 19]  # 10x20 pixels over face 0
    # at the origin the x y w h rows are also their x1 y1 x2 y2 corners
    assert bbox_overlaps_plus1(np.array([tall], np.float64), faces[:1])[0, 0] == 0.5
    records = [("e", "a", faces, _keep_all(2))]
    for first_score in (1.0, 0.0):  # the tie ranked above and below the exact detection
        preds = {"e": {"a": _pred([*tall, first_score], [*faces[1], 1.0 - first_score])}}
        assert evaluate(preds, _gt(records)).aps == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
        _assert_matches_reference(preds, records)
    preds = {"e": {"a": _pred([*tall, 1.0], [*faces[1], 0.0])}}
    assert evaluate(preds, _gt(records), iou_threshold=0.5 + 1e-9).hard < 1.0  # just above: a false positive


def test_touching_zero_area_boxes_have_iou_zero_not_nan():
    """As in the Cython kernel, a pair with ``iw <= 0`` or ``ih <= 0`` has IoU 0 and is never divided:
    a zero-area face (w = -1: x2 = x1 - 1) and an identical prediction touch with iw = 0 and
    union 0 + 0 - 0 = 0, so their IoU is 0, not 0/0 = nan. With iou_threshold 0 (0 >= 0) the
    prediction therefore matches its best-overlap face, the first one, and recalls it: with the
    exact detection of face 2 below it, AP 1."""
    faces = np.array([[0, 0, -1, 5], [100, 0, 9, 9]], dtype=np.float64)
    records = [("e", "a", faces, _keep_all(2))]
    preds = {"e": {"a": _pred([0, 0, -1, 5, 1.0], [100, 0, 9, 9, 0.0])}}
    r = evaluate(preds, _gt(records), iou_threshold=0.0)
    assert r.curves["hard"].recalled[0] == 1 and r.hard == 1.0
    _assert_matches_reference(preds, records, iou_threshold=0.0)


def test_second_detection_of_recalled_face_is_false_positive():
    # face 1 detected twice (0.9, 0.5), face 2 once (0.1): lo 0.1, hi 0.9 -> 1.0, 0.5, 0.0.
    # th in (0.5, 1]: P 1/1 R 1/2; th in (0, 0.5]: P 1/2 R 1/2; th 0: P 2/3 R 1 -> AP = 0.5 + 0.5 * 2/3
    records = [("e", "a", FACES[:2], _keep_all(2))]
    preds = {"e": {"a": _pred([*FACES[0], 0.9], [*FACES[0], 0.5], [*FACES[1], 0.1])}}
    r = evaluate(preds, _gt(records))
    assert r.hard == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    _assert_matches_reference(preds, records)


def test_ignored_faces_change_nothing():
    # easy keeps face 1 only, medium faces 1-2, hard all three.
    keep = {"easy": [1], "medium": [1, 2], "hard": [1, 2, 3]}
    records = [("e", "a", FACES, keep)]
    base = _pred([*FACES[0], 0.9], [*FACES[1], 0.1])
    with_ignored = _pred([*FACES[0], 0.9], [*FACES[2], 0.5], [*FACES[1], 0.1])
    r0 = evaluate({"e": {"a": base}}, _gt(records))
    r1 = evaluate({"e": {"a": with_ignored}}, _gt(records))
    # face 3 is ignored in easy and medium: its detection is neither a TP nor an FP there
    assert r0.easy == r1.easy == 1.0 and r0.medium == r1.medium == 1.0
    assert r1.curves["easy"].proposals[-1] == 1  # face-2 detection: ignored too in easy
    assert r1.curves["medium"].proposals[-1] == 2
    assert r1.curves["easy"].num_faces == 1 and r1.curves["hard"].num_faces == 3
    assert r0.hard < 1.0 and r1.hard == 1.0
    # a detection on an ignored face that also overlaps nothing else, scoring above everything
    top_ignored = _pred([*FACES[2], 0.95], [*FACES[0], 0.9], [*FACES[1], 0.1])
    r2 = evaluate({"e": {"a": top_ignored}}, _gt(records))
    assert r2.easy == 1.0 and r2.medium == 1.0
    for p in (base, with_ignored, top_ignored):
        _assert_matches_reference({"e": {"a": p}}, records)


def test_a_detection_never_matches_a_face_of_another_image():
    """Matching is per image. Image a has 3 faces and a false positive exactly on the spot where
    image b has its only face; b's face is found by b's own detection. Scores: a's faces 1, 0.75,
    0.5, a's FP 0.25, b's detection 0 (lo 0, hi 1: unchanged by the normalisation). Every
    detection but the FP is a hit, so the curve ends at 4 of 4 faces with 4 of 5 proposals and,
    with precision 1 until the FP, AP = 3/4 * 1 + 1/4 * 4/5 = 0.95."""
    spot = [400, 300, 30, 30]
    records = [("e", "a", FACES, _keep_all(3)), ("e", "b", np.array([spot], dtype=np.float64), _keep_all(1))]
    preds = {"e": {"a": np.vstack([np.column_stack([FACES, [1.0, 0.75, 0.5]]), [*spot, 0.25]]),
                   "b": _pred([*spot, 0.0])}}
    r = evaluate(preds, _gt(records))
    c = r.curves["hard"]
    assert c.proposals[-1] == 5 and c.recalled[-1] == 4 and c.num_faces == 4
    assert c.recalled[499] == 3 and c.proposals[749] == 4 and c.recalled[749] == 3
    assert r.hard == pytest.approx(0.95, abs=1e-12)
    _assert_matches_reference(preds, records)


def test_empty_images():
    records = [
        ("e", "a", FACES[:1], _keep_all(1)),
        ("e", "no_gt", np.zeros((0, 4)), {}),
        ("e", "no_pred", FACES[1:2], _keep_all(1)),
    ]
    a = _pred([*FACES[0], 0.9], [400, 300, 30, 30, 0.2])
    # image without faces, predictions inside the score range: skipped entirely
    p1 = {"e": {"a": a, "no_gt": _pred([10, 10, 20, 20, 0.5]), "no_pred": np.zeros((0, 5))}}
    p0 = {"e": {"a": a, "no_gt": np.zeros((0, 5)), "no_pred": np.zeros((0, 5))}}
    r1, r0 = evaluate(p1, _gt(records)), evaluate(p0, _gt(records))
    assert r1.aps == r0.aps
    assert r1.num_images == 3 and r1.num_images_matched == 1
    # the face of 'no_pred' counts: recall stops at 1/2 with precision 1 -> AP 0.5
    assert r1.hard == pytest.approx(0.5, abs=1e-12)
    # counting only image 'a' gives AP 1
    r_sub = evaluate(p1, _gt(records), images=["e/a"])
    assert r_sub.hard == 1.0 and r_sub.num_images == 1 and r_sub.subset
    for p in (p0, p1):
        _assert_matches_reference(p, records)


def test_no_faces_in_setting_gives_nan():
    records = [("e", "a", FACES[:1], {"hard": [1]})]
    preds = {"e": {"a": _pred([*FACES[0], 0.9], [0, 0, 5, 5, 0.1])}}
    with np.errstate(invalid="ignore", divide="ignore"):
        r = evaluate(preds, _gt(records))
    assert math.isnan(r.easy) and math.isnan(r.medium) and r.hard == 1.0  # 0/0 recall, as numpy


def test_ties_and_order():
    # Tied scores pass every threshold together, so the order among ties cannot change the
    # counts; the stable sort makes the visiting order (and hence which duplicate claims a face)
    # deterministic: the earlier row in the input wins.
    records = [("e", "a", FACES[:2], _keep_all(2))]
    rows = [[*FACES[0], 0.9], [400, 300, 30, 30, 0.5], [*FACES[1], 0.5], [*(FACES[1] + 1), 0.5]]
    # lo 0.5, hi 0.9 -> 1, 0, 0, 0: th > 0: P 1 R 1/2; th = 0: P 2/4, R 1 -> AP = 0.5 + 0.5 * 0.5
    ap = evaluate({"e": {"a": _pred(*rows)}}, _gt(records)).hard
    assert ap == pytest.approx(0.75, abs=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):
        perm = rng.permutation(len(rows))
        p = {"e": {"a": _pred(*[rows[i] for i in perm])}}
        assert evaluate(p, _gt(records)).hard == ap  # sorted internally, ties irrelevant
        _assert_matches_reference(p, records)
        _assert_matches_reference(p, records, sort_predictions=False)


def test_file_order_matters_without_sorting():
    # The public tool never sorts; with an unsorted file the result depends on the order.
    records = [("e", "a", FACES[:2], _keep_all(2))]
    p = {"e": {"a": _pred([*FACES[1], 0.1], [400, 300, 30, 30, 0.5], [*FACES[0], 0.9])}}
    sorted_ap = evaluate(p, _gt(records)).hard
    file_ap = evaluate(p, _gt(records), sort_predictions=False).hard
    assert sorted_ap != file_ap
    _assert_matches_reference(p, records)
    _assert_matches_reference(p, records, sort_predictions=False)


def test_all_scores_equal_gives_zero_ap():
    records = [("e", "a", FACES, _keep_all(3))]
    preds = {"e": {"a": np.column_stack([FACES, [0.7, 0.7, 0.7]])}}
    r = evaluate(preds, _gt(records))  # normalisation 0/0 -> nan -> nothing passes any threshold
    assert r.aps == {"easy": 0.0, "medium": 0.0, "hard": 0.0}
    _assert_matches_reference(preds, records)


@pytest.mark.parametrize("raw, counts", [
    # all scores above 1: lo = min(1, 3) = 1, hi = 5 -> (s - 1) / 4 = 1.0 (face 1), 0.75 (FP), 0.5 (face 2)
    ([5.0, 4.0, 3.0], {"proposals": ([1, 2, 3], [249, 250, 501]), "recalled": ([1, 1, 2], [249, 250, 501])}),
    # all scores below 0: lo = -4, hi = max(0, -1) = 0 -> (s + 4) / 4 = 0.75 (face 1), 0.5 (FP), 0.0 (face 2)
    ([-1.0, -2.0, -4.0], {"proposals": ([0, 1, 2, 3], [249, 250, 500, 1]),
                          "recalled": ([0, 1, 1, 2], [249, 250, 500, 1])}),
])
def test_evaluate_normalises_scores_with_the_public_quirk(raw, counts):
    """evaluate() normalises the scores as the public ``norm_score`` (lo starts at 1, hi at 0), not by
    plain min-max, so scores that all lie above 1 or below 0 are not stretched to [0, 1]; the PR
    curve shows it. Face 1, a false positive and face 2 score ``raw``; a detection passes
    th_t = 1 - (t + 1) / 1000 from th 0.75 on at t = 249, from 0.5 at t = 499, and 0.0 only at
    t = 999 (plain min-max would give face 1 the score 1 and face 2 the score 0)."""
    records = [("e", "a", FACES[:2], _keep_all(2))]
    preds = {"e": {"a": _pred([*FACES[0], raw[0]], [400, 300, 30, 30, raw[1]], [*FACES[1], raw[2]])}}
    c = evaluate(preds, _gt(records)).curves["hard"]
    for name, (values, lengths) in counts.items():
        assert sum(lengths) == 1000
        np.testing.assert_array_equal(getattr(c, name), np.repeat(values, lengths), err_msg=name)
    _assert_matches_reference(preds, records)


def test_evaluate_errors():
    records = [("e", "a", FACES, _keep_all(3)), ("e", "b", FACES, _keep_all(3))]
    gt = _gt(records)
    good = np.column_stack([FACES, [0.9, 0.8, 0.7]])
    with pytest.raises(ValueError, match="missing for 1"):
        evaluate({"e": {"a": good}}, gt)
    assert evaluate({"e": {"a": good}}, gt, subset=True).num_images == 1
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate({"e": {"a": good, "b": good, "zzz": good}}, gt)
    with pytest.raises(ValueError, match=r"e/b must be \(N, 5\)"):
        evaluate({"e": {"a": good, "b": good[:, :4]}}, gt)
    with pytest.raises(ValueError, match="nan"):
        evaluate({"e": {"a": good, "b": np.full((1, 5), np.nan)}}, gt)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate({"e": {"a": good, "b": good}}, gt, images=["e/nope"])


# ----------------------------------------------------------------------------------------------
# randomised agreement with the loop reference
# ----------------------------------------------------------------------------------------------
def _random_case(seed: int, n_images: int = 24):
    rng = np.random.default_rng(seed)
    records, preds = [], {}
    for i in range(n_images):
        event = f"{i % 3}--ev{i % 3}"
        k = int(rng.integers(0, 12)) if rng.random() > 0.1 else 0
        xy = rng.uniform(0, 300, (k, 2))
        wh = rng.uniform(2, 60, (k, 2))
        if k and rng.random() < 0.3:
            wh[0] = [0, -2]  # degenerate boxes exist in the real ground truth
        if k > 2 and rng.random() < 0.3:
            xy[1], wh[1] = xy[2], wh[2]  # two identical faces: argmax picks the first
        boxes = np.round(np.column_stack([xy, wh]))
        hard = [j + 1 for j in range(k) if rng.random() < 0.8]
        medium = [j for j in hard if rng.random() < 0.6]
        easy = [j for j in medium if rng.random() < 0.6]
        records.append((event, f"img{i}", boxes, {"easy": easy, "medium": medium, "hard": hard}))
        rows = []
        for b in boxes:
            for _ in range(int(rng.integers(0, 3))):  # missed, found, or duplicated
                j = b + np.r_[rng.normal(0, 2, 2), rng.normal(0, 2, 2)]
                rows.append([*j, rng.random()])
        for _ in range(int(rng.poisson(3))):
            rows.append([*rng.uniform(0, 300, 2), *rng.uniform(2, 60, 2), rng.random()])
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        arr[:, 4] = np.round(arr[:, 4], 1)  # lots of ties
        if rng.random() < 0.1:
            arr = arr[:0]
        preds.setdefault(event, {})[f"img{i}"] = arr
    return records, preds


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_agreement_sorted(seed):
    records, preds = _random_case(seed)
    _assert_matches_reference(preds, records)


@pytest.mark.parametrize("seed", [4, 5])
def test_random_agreement_file_order_and_options(seed):
    records, preds = _random_case(seed)
    _assert_matches_reference(preds, records, sort_predictions=False)
    _assert_matches_reference(preds, records, iou_threshold=0.3, thresh_num=200)
    some = [f"{e}/{s}" for e, s, _, _ in records[::3]]
    _assert_matches_reference(preds, records, images=some)


def test_random_agreement_subset_flag():
    records, preds = _random_case(6)
    part = {e: dict(list(per.items())[::2]) for e, per in preds.items()}
    r = evaluate(part, _gt(records), subset=True)
    assert r.subset and r.num_images == sum(len(v) for v in part.values()) < len(records)
    _assert_matches_reference(part, records, subset=True)


# ----------------------------------------------------------------------------------------------
# real ground truth
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_gt(widerface_gt_dir) -> WiderFaceGroundTruth:
    return load_ground_truth(widerface_gt_dir)


@pytest.fixture(scope="module")
def real_ref_gt(widerface_gt_dir):
    return load_reference_gt(widerface_gt_dir)


def _read_label_txt(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, list[list[float]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            current = line[1:].strip()
            out[current] = []
        elif line.strip():
            out[current].append([float(v) for v in line.split()[:4]])
    return {k: np.asarray(v).reshape(-1, 4) for k, v in out.items()}


def test_load_ground_truth(real_gt, real_ref_gt):
    gt = real_gt
    assert gt.num_images == NUM_VAL_IMAGES == 3226
    assert len(gt.events) == 61 and gt.boxes_xywh.shape == (39708, 4)
    assert {s: gt.num_faces(s) for s in SETTINGS} == {"easy": 7211, "medium": 13319, "hard": 31958}
    # cross-check against the reference's independent nested-cell reader
    ref = real_ref_gt
    assert len(ref) == gt.num_images
    for i, im in enumerate(ref):
        assert gt.events[gt.image_event[i]] == im.event and gt.image_stems[i] == im.stem
        np.testing.assert_array_equal(gt.image_boxes(i), im.boxes.reshape(-1, 4))
        for s in SETTINGS:
            mask = np.zeros(len(im.boxes), dtype=bool)
            mask[im.keep[s] - 1] = True
            np.testing.assert_array_equal(gt.image_keep(i, s), mask)
            assert gt.keep_counts[s][i] == len(im.keep[s])


def test_sample_label_txt_matches_ground_truth(real_gt, widerface_sample):
    labels = _read_label_txt(widerface_sample / "val" / "label.txt")
    assert len(labels) == 10 and sum(len(v) for v in labels.values()) == 507
    for key, boxes in labels.items():
        event, name = key.split("/")
        i = real_gt.index_of(event, name[: -len(".jpg")])
        assert len(real_gt.image_boxes(i)) == len(boxes), key
        np.testing.assert_array_equal(real_gt.image_boxes(i), boxes)


def test_missing_gt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="wider_face_val.mat"):
        load_ground_truth(tmp_path)


def test_sample_subset_perfect_and_reference_detections(real_gt, real_ref_gt, widerface_sample):
    import json

    labels = _read_label_txt(widerface_sample / "val" / "label.txt")
    rng = np.random.default_rng(0)
    preds: dict[str, dict[str, np.ndarray]] = {}
    for key, boxes in labels.items():
        event, name = key.split("/")
        preds.setdefault(event, {})[name[:-4]] = np.column_stack([boxes, rng.uniform(0.5, 1.0, len(boxes))])
    r = evaluate(preds, real_gt, subset=True)
    assert r.subset and r.num_images == 10 and r.num_gt_images == 3226
    for s in SETTINGS:
        assert r.aps[s] == pytest.approx(1.0, abs=1e-12)  # voc_ap's float sum may end at 1 - 1ulp
    # public pipeline detections on two sample images: agreement with the reference
    data = json.loads((widerface_sample / "reference_detections_mobilenet0.25.json").read_text())
    det = {}
    for key, rows in data["detections"].items():
        event, name = key.split("/")
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 15)[:, :5]
        det.setdefault(event, {})[name[:-4]] = boxes_xyxy_to_xywh(arr)
    ours = evaluate(det, real_gt, subset=True)
    keys = [f"{e}/{s}" for e, per in det.items() for s in per]
    ref = reference_evaluate(det, real_ref_gt, images=keys)
    for s in SETTINGS:
        assert 0.0 < ours.aps[s] <= 1.0
        assert abs(ours.aps[s] - float(ref[s]["ap"])) <= 1e-9


def test_real_gt_synthetic_predictions_agree(real_gt, real_ref_gt):
    from tools.benchmark_metric import make_synthetic_predictions

    rng = np.random.default_rng(123)
    idx = np.sort(rng.choice(real_gt.num_images, 120, replace=False))
    preds = make_synthetic_predictions(real_gt, seed=3, image_indices=idx)
    ours = evaluate(preds, real_gt, subset=True)
    assert ours.num_images == 120 and ours.num_predictions > 1000
    ref = reference_evaluate(preds, real_ref_gt, images=[f"{e}/{s}" for e, per in preds.items() for s in per])
    for s in SETTINGS:
        assert abs(ours.aps[s] - float(ref[s]["ap"])) <= 1e-9, s
        assert _nan_equal(ours.curves[s].precision, ref[s]["precision"])


# ----------------------------------------------------------------------------------------------
# prediction files and plotting
# ----------------------------------------------------------------------------------------------
def test_prediction_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    preds = {
        "0--Parade": {"0_Parade_a_1": rng.uniform(0, 500, (4, 5)), "0_Parade_b_2": np.zeros((0, 5))},
        "1--Handshaking": {"1_Hand_c_3": rng.uniform(0, 500, (1, 5))},
    }
    for event, per in preds.items():
        for stem, arr in per.items():
            write_prediction_file(tmp_path / event / f"{stem}.txt", stem, arr)
    (tmp_path / "notes.md").write_text("not an event folder")
    back = read_prediction_dir(tmp_path)
    assert back.keys() == preds.keys()
    for event, per in preds.items():
        assert back[event].keys() == per.keys()
        for stem, arr in per.items():
            np.testing.assert_array_equal(back[event][stem], arr.reshape(-1, 5))  # bit-exact
    text = (tmp_path / "0--Parade" / "0_Parade_a_1.txt").read_text().splitlines()
    assert text[0] == "0_Parade_a_1" and text[1] == "4" and len(text[2].split()) == 5


def test_prediction_file_errors(tmp_path):
    bad = tmp_path / "ev" / "x.txt"
    bad.parent.mkdir()
    bad.write_text("x\n2\n1 2 3 4 0.5\n1 2 three 4 0.5\n")
    with pytest.raises(ValueError, match=r"x\.txt:4"):
        read_prediction_file(bad)
    bad.write_text("x\n2\n1 2 3 4 0.5\n")  # MATLAB fails on the file, the Python tool reads 1: neither is safe
    with pytest.raises(ValueError, match=r"x\.txt:2: the count line says 2 boxes but 1 box lines follow \(the "
                                         r"official MATLAB tool would look for 2 box lines and fail on the file, "
                                         r"the public Python tool read 1\)"):
        read_prediction_file(bad)
    bad.write_text("x\n1\n1 2 3 4 0.5\n5 6 7 8 0.4\n")  # MATLAB reads the first box, the Python tool both
    with pytest.raises(ValueError, match=r"\(the official MATLAB tool would read the first 1, the public Python "
                                         r"tool read 2\)"):
        read_prediction_file(bad)
    bad.write_text("x\n1\n1 2 3 4\n")
    with pytest.raises(ValueError, match=r"x\.txt:3"):
        read_prediction_dir(tmp_path)
    bad.write_text("x.jpg\n1\n1 2 3 4 0.5 \n\n")  # RetinaFace writes a trailing space
    assert read_prediction_file(bad)[0] == "x"
    with pytest.raises(FileNotFoundError):
        read_prediction_dir(tmp_path / "missing")
    with pytest.raises(ValueError):
        write_prediction_file(tmp_path / "y.txt", "y", np.zeros((2, 4)))


def test_prediction_dir_with_a_problem_list_skips_and_names_every_bad_file(tmp_path):
    """With ``problems`` a folder is read in one pass: each malformed file, unreadable file or
    second file of an image is skipped and named (file:line), the good files are returned."""
    write_prediction_file(tmp_path / "ev" / "a.txt", "a", _pred([1, 2, 3, 4, 0.5]))
    write_prediction_file(tmp_path / "ev" / "b.txt", "b", np.zeros((0, 5)))
    (tmp_path / "ev" / "c.txt").write_text("c\n1\n1 2 3 4 nan\n")
    (tmp_path / "ev" / "d.txt").write_text("a\n0\n")  # claims image a, read already
    (tmp_path / "ev" / "b (copy).txt").write_text("b\n0\n")  # read before b.txt, which is named after b
    (tmp_path / "ev" / "g.txt").write_text("unknown\n0\n")
    (tmp_path / "other" / "e.txt").parent.mkdir()
    (tmp_path / "other" / "e.txt").write_bytes(b"e\n1\n\xfe 2 3 4 0.5\n")
    (tmp_path / "other" / "f.txt").mkdir()  # not a file: cannot be read
    problems: list[str] = []
    back = read_prediction_dir(tmp_path, problems, known_image=lambda event, stem: stem != "unknown")
    assert {e: sorted(per) for e, per in back.items()} == {"ev": ["a", "b"], "other": []}
    np.testing.assert_array_equal(back["ev"]["a"], _pred([1, 2, 3, 4, 0.5]))
    assert problems == [f"{tmp_path / 'ev' / 'b (copy).txt'}:1: image ev/b is read from b.txt instead",
                        f"{tmp_path / 'ev' / 'c.txt'}:3: non-finite value in '1 2 3 4 nan'",
                        f"{tmp_path / 'ev' / 'd.txt'}:1: image ev/a is read from a.txt instead",
                        f"{tmp_path / 'ev' / 'g.txt'}:1: names image ev/unknown, which the ground truth does not have",
                        f"{tmp_path / 'other' / 'e.txt'}:3: not UTF-8 text (byte 0xfe at column 1)",
                        f"{tmp_path / 'other' / 'f.txt'}: Is a directory"]
    with pytest.raises(ValueError, match=r"b \(copy\)\.txt:1: image ev/b is read from b\.txt"):  # no list: raises
        read_prediction_dir(tmp_path)


def test_plot_pr_curves(tmp_path):
    records, preds = _random_case(7)
    r = evaluate(preds, _gt(records))
    out = plot_pr_curves(r, tmp_path / "pr.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_val_set_runs_and_subset_of_everything_is_identical(real_gt):
    from tools.benchmark_metric import make_synthetic_predictions

    preds = make_synthetic_predictions(real_gt, seed=0)
    full = evaluate(preds, real_gt)
    assert full.num_images == full.num_gt_images == 3226 and not full.subset
    assert full.num_predictions > 60000
    every = evaluate(preds, real_gt, images=real_gt.image_keys())
    assert every.aps == full.aps and every.subset
    for s in SETTINGS:
        assert 0.3 < full.aps[s] < 0.9


def test_benchmark_writes_its_synthetic_predictions_as_a_prediction_folder(widerface_gt_dir, real_gt, tmp_path, capsys):
    from tools.benchmark_metric import main

    record = main(["--gt_dir", str(widerface_gt_dir), "--skip_reference", "--repeats", "1", "--fp_per_image", "2",
                   "--write_predictions", str(tmp_path)])
    capsys.readouterr()
    back = read_prediction_dir(tmp_path)
    assert sum(len(per) for per in back.values()) == 3226
    assert sum(len(rows) for per in back.values() for rows in per.values()) == record["num_boxes"]
    assert evaluate(back, real_gt).aps == record["ap_ours"]


def test_prediction_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    bad = tmp_path / "0--Parade" / "0_Parade_marchingband_1_465.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"0_Parade_marchingband_1_465\n2\n1 2 3 4 0.5\n1 2 3 4 \xff0.5\n")
    with pytest.raises(ValueError, match=r"0_Parade_marchingband_1_465\.txt:4: not UTF-8 text \(byte 0xff"):
        read_prediction_file(bad)
    with pytest.raises(ValueError, match=r"0_Parade_marchingband_1_465\.txt:4"):
        read_prediction_dir(tmp_path)
    bad.write_bytes("0_Parade_marchingband_1_465\n1\n1 2 3 4 0.5\n".encode("utf-8"))
    assert read_prediction_file(bad)[1].shape == (1, 5)  # the same content in UTF-8 reads


@pytest.fixture()
def gt_copy(tmp_path):
    """A writable copy of the sample's four ground-truth .mat files."""
    import shutil

    from tests.conftest import require_shared

    source = require_shared("data/widerface_sample/ground_truth")
    target = tmp_path / "gt"
    target.mkdir()
    for mat in source.glob("*.mat"):
        shutil.copyfile(mat, target / mat.name)
    return target


@pytest.mark.parametrize("damage", ["cut_10", "cut_100", "cut_127", "cut_200", "cut_half", "garbage",
                                    "no_variable", "wrong_shape"])
@pytest.mark.parametrize("name", ["wider_face_val.mat", "wider_hard_val.mat"])
def test_damaged_ground_truth_file_is_a_value_error_naming_it(gt_copy, damage, name):
    """Truncated/corrupt .mat files make scipy raise MatReadError, OSError, IndexError, TypeError
    ... depending on where they are cut; the loader turns each into one ValueError naming the file."""
    from scipy.io import savemat

    path = gt_copy / name
    data = path.read_bytes()
    if damage.startswith("cut_"):
        size = len(data) // 2 if damage == "cut_half" else int(damage[4:])
        path.write_bytes(data[:size])
    elif damage == "garbage":
        path.write_bytes(b"this is not a MATLAB file at all" * 10)
    elif damage == "no_variable":
        savemat(str(path), {"something_else": np.zeros(3)})
    else:  # the right variable names holding plain numbers instead of cell arrays
        savemat(str(path), {"gt_list": np.zeros(3), "event_list": np.zeros(3), "file_list": np.zeros(3),
                            "face_bbx_list": np.zeros(3)})
    with pytest.raises(ValueError) as raised:
        load_ground_truth(gt_copy)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message, message
    if damage == "no_variable":
        assert "missing variable" in message
