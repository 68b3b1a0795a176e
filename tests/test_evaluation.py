"""test.py, utils/evaluation.py and utils/tta.py: WIDER FACE evaluation of a detector.

The end-to-end run uses the 10-image sample and the published mobilenet0.25 weights (skipped
without the shared folder); everything else is synthetic.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
from models.detector import Detections
from utils.evaluation import (EvaluationError, evaluate_predictions, format_aps, list_val_images, load_gt,
                              prediction_rows, predict_widerface, subset_note)
from utils.metric import read_prediction_dir, read_prediction_file
from tests.conftest import QueueingDetector
from config import EXIT_SKIPPED, parse_scales
from utils.tta import TTAConfig, TTADetector, box_voting, flip_detections, pyramid_scale

SAMPLE_IMAGES = 10


def load_test_script():
    """The repository's test.py as a module (the name ``test`` is a standard-library package)."""
    spec = importlib.util.spec_from_file_location("retinaface_test_script", REPO_ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def test_script():
    return load_test_script()


def run_cli(script, argv, cwd: Path, capsys) -> tuple[int, str, str]:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = script.main([str(a) for a in argv])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def parse_ap_line(out: str) -> dict[str, float]:
    line = next(line for line in out.splitlines() if line.startswith("Easy AP: "))
    parts = line.replace("AP:", "").split()
    return {"easy": float(parts[1]), "medium": float(parts[3]), "hard": float(parts[5])}


def small_dataset(tmp: Path, sample: Path, keys: list[str]) -> Path:
    """A --dataset root holding some sample images (symbolic links) and their label lines."""
    root = tmp / "dataset"
    for key in keys:
        target = root / "val" / "images" / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(sample / "val" / "images" / key)
    (root / "val" / "label.txt").write_text("".join(f"# {key}\n" for key in keys))
    return root


# --------------------------------------------------------------------------------------------
# Box voting, flips, prediction-file convention (synthetic)
# --------------------------------------------------------------------------------------------
def loop_box_vote(dets: np.ndarray, threshold: float, insightface: bool = False) -> np.ndarray:
    """Greedy loop reference: the top remaining box takes every remaining box with IoU >= t
    (+1 areas); the group becomes its score-weighted mean box with the top score. Rows: box,
    score, number of boxes. ``insightface``: its ``bbox_vote`` as its steps read: a group of one
    box is dropped unless it empties the pool, and the first 750 groups are kept."""
    dets = dets[np.argsort(-dets[:, 4], kind="stable")]
    out = []
    while len(dets):
        area = (dets[:, 2] - dets[:, 0] + 1) * (dets[:, 3] - dets[:, 1] + 1)
        iw = np.maximum(0, np.minimum(dets[0, 2], dets[:, 2]) - np.maximum(dets[0, 0], dets[:, 0]) + 1)
        ih = np.maximum(0, np.minimum(dets[0, 3], dets[:, 3]) - np.maximum(dets[0, 1], dets[:, 1]) + 1)
        group = iw * ih / (area[0] + area - iw * ih) >= threshold
        taken, dets = dets[group], dets[~group]
        if insightface and len(taken) == 1 and len(dets):
            continue
        w = taken[:, 4:5]
        out.append(np.concatenate([(taken[:, :4] * w).sum(0) / w.sum(), [taken[0, 4]], [len(taken)]]))
    out = np.array(out).reshape(-1, 6)
    return out[:750] if insightface else out


def test_box_voting_tiny_case():
    boxes = torch.tensor([[10., 10., 29., 29.],     # top box
                          [12., 10., 31., 29.],     # IoU 18*20/(2*400-360) = 0.818 -> merged
                          [0., 0., 9., 9.],         # disjoint: its own group
                          [10., 10., 29., 49.]])    # IoU 400/800 = 0.5 exactly -> merged (>=)
    scores = torch.tensor([0.9, 0.6, 0.3, 0.5])
    landmarks = torch.arange(40, dtype=torch.float32).reshape(4, 10)
    out_boxes, out_scores, out_landmarks, votes = box_voting(boxes, scores, 0.5, landmarks)
    weights = torch.tensor([0.9, 0.6, 0.5])
    expected = (boxes[[0, 1, 3]] * weights[:, None]).sum(0) / weights.sum()
    assert torch.allclose(out_boxes[0], expected)
    assert torch.equal(out_boxes[1], boxes[2])
    assert out_scores.tolist() == pytest.approx([0.9, 0.3])
    assert votes.tolist() == [3, 1]
    assert torch.allclose(out_landmarks[0], (landmarks[[0, 1, 3]] * weights[:, None]).sum(0) / weights.sum())
    # min_votes=2 drops the single-box group (the voting scripts' behaviour) unless it is the
    # last group and keep_last is set (insightface); keep_top_k cuts
    assert box_voting(boxes, scores, 0.5, min_votes=2)[3].tolist() == [3]
    assert box_voting(boxes, scores, 0.5, min_votes=2, keep_last=True)[3].tolist() == [3, 1]
    first_alone = torch.tensor([0.95, 0.9, 0.6])  # the disjoint box leads: dropped, not last
    assert box_voting(boxes[[2, 0, 1]], first_alone, 0.5, min_votes=2, keep_last=True)[3].tolist() == [2]
    assert len(box_voting(boxes, scores, 0.5, keep_top_k=1)[0]) == 1
    empty = box_voting(torch.zeros(0, 4), torch.zeros(0), 0.4)
    assert empty[0].shape == (0, 4) and empty[2] is None
    # a box that is not finite is left out; the others keep their groups (the lone top box is
    # not joined by the pair below it)
    pair = torch.tensor([[100., 100., 110., 110.], [0., 0., 10., 10.], [0., 0., 10., 11.]])
    broken = torch.cat([pair, torch.tensor([[50., 50., float("nan"), 60.], [0., 0., float("inf"), 5.]])])
    merged = box_voting(broken, torch.tensor([0.95, 0.9, 0.8, 0.5, 0.4]), 0.4)
    assert merged[3].tolist() == [1, 2] and merged[0][0].tolist() == [100., 100., 110., 110.]


def test_box_voting_matches_greedy_loop_on_random_boxes():
    # clusters of jittered boxes, like detections pooled over passes
    dets = random_clusters(np.random.default_rng(0), 15)
    expected = loop_box_vote(dets, 0.4)
    boxes, scores, _, votes = box_voting(torch.from_numpy(dets[:, :4]), torch.from_numpy(dets[:, 4]), 0.4)
    assert votes.tolist() == expected[:, 5].astype(int).tolist()
    np.testing.assert_allclose(scores.numpy(), expected[:, 4], rtol=1e-6)
    np.testing.assert_allclose(boxes.numpy(), expected[:, :4], rtol=1e-5, atol=1e-3)


def random_clusters(rng: np.random.Generator, clusters: int, extent: float = 300) -> np.ndarray:
    """(N, 5) jittered boxes around ``clusters`` random centres, 1 to 7 per centre, with scores."""
    dets = []
    for cx, cy in rng.uniform(0, extent, (clusters, 2)):
        size = rng.uniform(8, 60)
        for _ in range(rng.integers(1, 8)):
            c = np.array([cx, cy]) + rng.normal(0, size * 0.1, 2)
            s = size * rng.uniform(0.85, 1.15)
            dets.append([c[0] - s / 2, c[1] - s / 2, c[0] + s / 2, c[1] + s / 2, rng.uniform(0.02, 1)])
    return np.array(dets, dtype=np.float32).astype(np.float64)


@pytest.mark.parametrize("seed", range(4))
def test_box_voting_follows_insightface_bbox_vote(seed):
    """min_votes=2 + keep_last + keep_top_k=750 is insightface's merge: singletons dropped except
    the last group, at most 750 groups (seed 3: 2,000 clusters in a wide image, more than 750)."""
    rng = np.random.default_rng(seed)
    dets = random_clusters(rng, 2000, extent=6000) if seed == 3 else random_clusters(rng, 15 + 20 * seed)
    expected = loop_box_vote(dets, 0.4, insightface=True)
    boxes, scores, _, votes = box_voting(torch.from_numpy(dets[:, :4]), torch.from_numpy(dets[:, 4]), 0.4,
                                         min_votes=2, keep_last=True, keep_top_k=750)
    assert (len(expected) == 750) == (seed == 3)
    np.testing.assert_allclose(scores.numpy(), expected[:, 4], rtol=1e-6)
    np.testing.assert_allclose(boxes.numpy(), expected[:, :4], rtol=1e-5, atol=1e-3)
    assert (votes[:-1] >= 2).all()


def test_tta_merge_without_a_voting_iou_keeps_every_candidate():
    """A voting IoU of 0 turns voting off, as in insightface: the pooled candidates by score
    (not one box averaged over the whole image)."""
    from types import SimpleNamespace

    def detections(boxes, scores):
        return Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.zeros((len(scores), 5, 2),
                                                                                             np.float32))

    parts = [detections([[0, 0, 10, 10], [50, 50, 70, 70]], [0.5, 0.9]), detections([[1, 1, 11, 11]], [0.7])]
    for threshold, expected in ((0.0, [0.9, 0.7, 0.5]), (0.4, [0.9, 0.7])):
        tta = TTADetector(SimpleNamespace(nms_threshold=threshold), TTAConfig(min_votes=1))
        merged = tta.merge(parts)
        np.testing.assert_array_equal(merged.scores, np.float32(expected))
    np.testing.assert_allclose(merged.boxes[1], np.array([0, 0, 10, 10]) + 0.7 / 1.2, rtol=1e-6)  # weighted mean


def test_pyramid_scale_follows_insightface_rule():
    """Shorter side 800 unless the longer side then rounds to more than 1200, times size/800."""
    assert pyramid_scale(683, 1024, 800) == 800 / 683          # 1024 * 800/683 = 1199.4 -> 1199
    assert pyramid_scale(681, 1024, 800) == 1200 / 1024        # 1202.9 -> 1203 > 1200
    assert pyramid_scale(1024, 681, 1700) == 1700 / 800 * (1200 / 1024)
    assert pyramid_scale(400, 300, 500) == 500 / 800 * (800 / 300)  # 1066.7: shorter side rules
    assert pyramid_scale(681, 1024, 0) == 1.0
    # a 521 x 1024 image no longer repeats a pass: every size gives its own scale
    assert len({pyramid_scale(521, 1024, s) for s in (500, 800, 1100, 1400, 1700)}) == 5


def test_pyramid_scale_compares_the_rounded_longer_side_with_1200():
    """insightface compares ``np.round(im_scale * im_size_max)`` with 1200: a longer side of
    1200.4994 rounds to 1200, not more, so the shorter-side rule (800) still holds."""
    longer = 1202 * 800 / 801
    assert 1200 < longer < 1200.5 and round(longer) == 1200
    assert pyramid_scale(801, 1202, 800) == 800 / 801
    assert pyramid_scale(1202, 801, 1700) == 1700 / 800 * (800 / 801)


def test_tta_defaults_are_the_insightface_protocol():
    """The paper's TTA: five pyramid sizes 500 ... 1700, each with its mirror image: ten passes;
    votes need two boxes except the last one kept, at most 750 merged boxes."""
    config = TTAConfig()
    assert config.scales == (500, 800, 1100, 1400, 1700)
    assert config.flip and config.num_passes == 10
    assert (config.min_votes, config.keep_last, config.keep_top_k) == (2, True, 750)


def test_flip_detections_maps_back_and_swaps_landmarks():
    width = 100
    found = Detections(np.array([[10., 20., 30., 50.]], np.float32), np.array([0.9], np.float32),
                       np.array([[[15, 30], [25, 30], [20, 35], [16, 45], [24, 45]]], np.float32))
    mirrored = flip_detections(found, width)
    np.testing.assert_array_equal(mirrored.boxes, [[70., 20., 90., 50.]])
    np.testing.assert_array_equal(mirrored.landmarks[0], [[75, 30], [85, 30], [80, 35], [76, 45], [84, 45]])
    back = flip_detections(mirrored, width)
    np.testing.assert_array_equal(back.boxes, found.boxes)
    np.testing.assert_array_equal(back.landmarks, found.landmarks)


def test_parse_scales():
    assert parse_scales("500,800, 1100") == (500, 800, 1100)
    assert parse_scales(" 500 800 ") == (500, 800)
    assert parse_scales("0,1600") == (0, 1600)
    for bad in ("", "a,b", "-5", "500,,800", "500,", ","):
        with pytest.raises(ValueError):
            parse_scales(bad)


def test_scale_description_names_scale_0_original(test_script):
    args = test_script.build_parser("test").parse_args(["--tta", "true", "--tta_scales", "0,500"])
    assert test_script.scale_description(args).startswith("TTA: passes original, 500 (each x size/800 of the base")


def test_prediction_rows_follow_the_public_convention():
    # public test_widerface.py: x = int(x1), y = int(y1), w = int(x2) - int(x1), h = int(y2) - int(y1),
    # score = str(float32)
    found = Detections(np.array([[10.9, 20.2, 30.1, 50.99], [-0.7, 3.5, 4.2, 9.0]], np.float32),
                       np.array([0.87654321, 0.0213], np.float32), np.zeros((2, 5, 2), np.float32))
    rows, lines = prediction_rows(found)
    assert lines == ["10 20 20 30 0.8765432", "0 3 4 6 0.0213"]
    np.testing.assert_array_equal(rows, [[10, 20, 20, 30, 0.8765432], [0, 3, 4, 6, 0.0213]])
    assert prediction_rows(Detections.empty())[0].shape == (0, 5)


def test_prediction_rows_of_boxes_beyond_int64_stay_finite_and_ordered():
    """An untrained network's boxes reach 1e20 px (finite in float32, beyond int64): no invalid
    cast (a warning and INT64_MIN), the rows stay far outside the image with x2 >= x1."""
    import warnings
    found = Detections(np.array([[-3e20, 5.0, 2e20, 1e19], [1.0, 2.0, 3.0, 4.0]], np.float32),
                       np.array([0.5, 0.4], np.float32), np.zeros((2, 5, 2), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, lines = prediction_rows(found)
    assert np.isfinite(rows).all() and rows[0, 0] <= -1e14 and rows[0, 2] > 0 and rows[0, 3] > 1e14
    assert lines[1] == "1 2 2 2 0.4"


def test_prediction_rows_truncate_the_float32_corners_of_float64_boxes():
    """The public script truncates float32 corners: a float64 corner within float32 rounding of
    the next integer (10.99999999 and 30.99999999 round to 11.0 and 31.0 in float32, whose
    spacing there is about 1e-6) is written as that integer, x = 11, w = 31 - 11 = 20."""
    found = Detections(np.array([[10.99999999, 20.0, 30.99999999, 40.5]], np.float64),
                       np.array([0.5], np.float32), np.zeros((1, 5, 2), np.float32))
    assert np.float32(10.99999999) == 11.0 and np.float32(30.99999999) == 31.0
    rows, lines = prediction_rows(found)
    assert lines == ["11 20 20 20 0.5"]
    np.testing.assert_array_equal(rows, [[11, 20, 20, 20, 0.5]])


# --------------------------------------------------------------------------------------------
# --pred_dir (no model) and errors
# --------------------------------------------------------------------------------------------
def write_synthetic_predictions(folder: Path, gt, keys: list[str], seed: int = 0) -> None:
    """Ground-truth boxes jittered, with decreasing scores, plus random false positives."""
    rng = np.random.default_rng(seed)
    for key in keys:
        event, stem = key.split("/")
        boxes = gt.image_boxes(gt.index_of(event, stem)).astype(np.float64)
        found = boxes[rng.random(len(boxes)) < 0.8]
        found = found + rng.normal(0, 1.5, found.shape)
        noise = np.column_stack([rng.uniform(0, 900, (5, 2)), rng.uniform(10, 60, (5, 2))])
        rows = np.concatenate([np.column_stack([found, rng.uniform(0.3, 1.0, len(found))]),
                               np.column_stack([noise, rng.uniform(0.02, 0.6, 5)])])
        rows = rows[np.argsort(-rows[:, 4])]
        lines = [stem, str(len(rows))] + [f"{x:.1f} {y:.1f} {w:.1f} {h:.1f} {s:.6f}" for x, y, w, h, s in rows]
        path = folder / event / f"{stem}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def test_pred_dir_mode_needs_no_model(test_script, widerface_gt_dir, tmp_path, capsys):
    from tools.reference_widerface_eval import load_reference_gt, reference_evaluate

    gt = load_gt(widerface_gt_dir)
    keys = gt.image_keys()[::400][:8]
    write_synthetic_predictions(tmp_path / "pred", gt, keys)
    code, out, err = run_cli(test_script, ["--pred_dir", tmp_path / "pred", "--gt_dir", widerface_gt_dir,
                                           "--results_json", tmp_path / "ap.json", "--results_dir",
                                           tmp_path / "res"], tmp_path, capsys)
    assert code == 0, err
    assert f"subset: {len(keys)} of 3226 images, not comparable with full-val numbers" in out
    aps = parse_ap_line(out)
    data = json.loads((tmp_path / "ap.json").read_text())
    assert set(data) == {"easy", "medium", "hard", "num_images", "subset", "seconds", "fps", "unreadable_files"}
    assert data["num_images"] == len(keys) and data["subset"] is True and data["seconds"] is None
    assert data["unreadable_files"] == []
    assert json.loads((tmp_path / "res" / "results.json").read_text()) == data
    assert (tmp_path / "res" / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "experiments").exists()
    reference = reference_evaluate(read_prediction_dir(tmp_path / "pred"), load_reference_gt(widerface_gt_dir),
                                   images=keys)
    for setting, value in aps.items():
        ref = reference[setting]["ap"]
        stored = np.nan if data[setting] is None else data[setting]  # JSON has no NaN: null
        assert (np.isnan(ref) and np.isnan(stored)) or stored == pytest.approx(ref, abs=1e-12)
        assert value == pytest.approx(ref, abs=1e-6) or (np.isnan(ref) and np.isnan(value))


def test_pred_dir_mode_does_not_import_torch(widerface_gt_dir, tmp_path):
    """Scoring prediction files needs NumPy and SciPy only (fast start, no GPU stack)."""
    import subprocess
    import sys

    write_synthetic_predictions(tmp_path / "pred", load_gt(widerface_gt_dir), load_gt(widerface_gt_dir).image_keys()[:3])
    program = ("import sys, test; status = test.main(sys.argv[1:]); "
               "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", program, "--pred_dir", str(tmp_path / "pred"), "--gt_dir",
                           str(widerface_gt_dir), "--results_dir", str(tmp_path / "results")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no torch", done.stdout


def test_nan_ap_of_an_empty_setting_is_printed_not_fatal(test_script, widerface_gt_dir, tmp_path, capsys):
    gt = load_gt(widerface_gt_dir)
    # an image whose easy keep list is empty: easy AP of that subset is nan
    index = next(i for i in range(gt.num_images) if gt.keep_counts["easy"][i] == 0 and gt.keep_counts["hard"][i] > 0)
    key = gt.image_keys()[index]
    write_synthetic_predictions(tmp_path / "pred", gt, [key])
    code, out, err = run_cli(test_script, ["--pred_dir", tmp_path / "pred", "--gt_dir", widerface_gt_dir,
                                           "--results_dir", tmp_path / "res"], tmp_path, capsys)
    assert code == 0, err
    assert "Easy AP: nan" in out
    assert json.loads((tmp_path / "res" / "results.json").read_text())["easy"] is None


def test_pred_dir_evaluates_the_good_files_and_names_every_bad_one(test_script, widerface_gt_dir, tmp_path, capsys):
    """Batch rule: malformed prediction files (bad line, not UTF-8, count line disagreeing with the
    box lines) are each named with file:line on stderr and left out; the good files are evaluated
    as a subset, the results list the bad files, exit status 3. None readable: one clear error, 1."""
    gt = load_gt(widerface_gt_dir)
    keys = gt.image_keys()[::400][:5]
    pred = tmp_path / "pred"
    write_synthetic_predictions(pred, gt, keys)
    good = {}
    for key in keys[:2]:
        event, stem = key.split("/")
        good.setdefault(event, {})[stem] = read_prediction_dir(pred)[event][stem]
    bad = [pred / f"{key}.txt" for key in keys[2:]]
    stems = [path.stem for path in bad]
    bad[0].write_text(f"{stems[0]}\n2\n1 2 3 4 0.5\n1 2 3\n")
    bad[1].write_bytes(f"{stems[1]}\n1\n1 2 3 4 ".encode() + b"\xff0.5\n")
    bad[2].write_text(f"{stems[2]}\n3\n1 2 3 4 0.5\n")
    code, out, err = run_cli(test_script, ["--pred_dir", pred, "--gt_dir", widerface_gt_dir, "--results_dir",
                                           tmp_path / "res", "--results_json", tmp_path / "ap.json"], tmp_path, capsys)
    assert code == EXIT_SKIPPED and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[:3] == [f"test.py: error: skipped {bad[0]}:4: expected 'x y w h score', got '1 2 3'",
                         f"test.py: error: skipped {bad[1]}:3: not UTF-8 text (byte 0xff at column 9)",
                         f"test.py: error: skipped {bad[2]}:2: the count line says 3 boxes but 1 box lines follow "
                         f"(the official MATLAB tool would look for 3 box lines and fail on the file, the "
                         f"public Python tool read 1)"], err
    assert lines[3:] == ["test.py: error: 3 of 5 prediction files could not be read (named above, listed in "
                         "results.json): the APs cover the other 2 only"]
    assert "subset: 2 of 3226 images, not comparable with full-val numbers" in out
    expected = evaluate_predictions(good, gt)
    assert parse_ap_line(out) == {k: pytest.approx(v, abs=1e-6) for k, v in expected.aps.items()}
    data = json.loads((tmp_path / "ap.json").read_text())
    assert data["num_images"] == 2 and data["subset"] is True
    assert [entry.split(":")[0] for entry in data["unreadable_files"]] == [str(path) for path in bad]
    assert json.loads((tmp_path / "res" / "results.json").read_text()) == data
    assert "unreadable files (not evaluated): 3\n  " in (tmp_path / "res" / "results.txt").read_text()
    # no readable file left: one clear error after the per-file lines, no results
    for key in keys[:2]:
        (pred / f"{key}.txt").unlink()
    code, out, err = run_cli(test_script, ["--pred_dir", pred, "--gt_dir", widerface_gt_dir, "--results_dir",
                                           tmp_path / "none"], tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 4 and all(f"skipped {path}:" in line for path, line in zip(bad, lines)), err
    assert lines[3] == f"test.py: error: none of the 3 prediction files in {pred} could be read"
    assert not (tmp_path / "none").exists()


def test_pred_dir_skips_files_naming_images_the_ground_truth_lacks(test_script, widerface_gt_dir, tmp_path,
                                                                  capsys):
    """The image of a prediction file is the one its first line names (as the public Python tool
    reads it). A file naming an image the ground truth lacks (a wrong first line, an extra file) is
    skipped with file:1 like any bad file; the others are evaluated, exit status 3."""
    gt = load_gt(widerface_gt_dir)
    keys = gt.image_keys()[::500][:3]
    pred = tmp_path / "pred"
    write_synthetic_predictions(pred, gt, keys)
    wrong_name = pred / f"{keys[0]}.txt"
    wrong_name.write_text("something_else\n" + wrong_name.read_text().split("\n", 1)[1])
    extra = pred / "99--Nothing" / "foo.txt"
    extra.parent.mkdir()
    extra.write_text("foo\n0\n")
    code, out, err = run_cli(test_script, ["--pred_dir", pred, "--gt_dir", widerface_gt_dir, "--results_dir",
                                           tmp_path / "res"], tmp_path, capsys)
    event = keys[0].split("/")[0]
    assert code == EXIT_SKIPPED and err.strip().splitlines() == [
        f"test.py: error: skipped {wrong_name}:1: names image {event}/something_else, which the ground truth "
        "does not have",
        f"test.py: error: skipped {extra}:1: names image 99--Nothing/foo, which the ground truth does not have",
        "test.py: error: 2 of 4 prediction files could not be read (named above, listed in results.json): the APs "
        "cover the other 2 only"], err
    good: dict[str, dict[str, np.ndarray]] = {}
    for key in keys[1:]:
        event, stem = key.split("/")
        good.setdefault(event, {})[stem] = read_prediction_file(pred / f"{key}.txt")[1]
    expected = evaluate_predictions(good, gt)
    assert expected.num_images == 2
    assert parse_ap_line(out) == {k: pytest.approx(v, abs=1e-6) for k, v in expected.aps.items()}


def test_pred_dir_of_a_results_folder_that_holds_an_eval_folder_still_gets_the_hint(test_script, widerface_gt_dir,
                                                                                     tmp_path, capsys):
    """The results folder after a --pred_dir evaluation holds widerface_txt/ and widerface_txt_eval/
    (results.txt ...): given as --pred_dir, the result files are skipped as malformed and the
    message still points at widerface_txt/."""
    results = tmp_path / "results"
    write_synthetic_predictions(results / "widerface_txt", load_gt(widerface_gt_dir),
                                ["0--Parade/0_Parade_marchingband_1_465"])
    (results / "widerface_txt_eval").mkdir()
    (results / "widerface_txt_eval" / "results.txt").write_text("test images: 1\nEasy AP: 1.0\n")
    code, _, err = run_cli(test_script, ["--pred_dir", results, "--gt_dir", widerface_gt_dir], tmp_path, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err, err
    assert last.startswith(f"test.py: error: none of the 1 prediction files in {results} could be read")
    assert last.endswith(f"use --pred_dir {results / 'widerface_txt'}"), last


def test_pred_dir_warns_once_about_every_model_run_option_it_ignores(test_script, widerface_gt_dir,
                                                                    widerface_sample, tmp_path, capsys):
    """--pred_dir runs no model: each model-run option set to a non-default value is named in one
    warning line; options left at (or given with) their default are not; --dataset only when
    --gt_dir is given (without it, it locates the ground truth)."""
    import re

    write_synthetic_predictions(tmp_path / "pred", load_gt(widerface_gt_dir), ["0--Parade/0_Parade_marchingband_1_465"])
    base = ["--pred_dir", tmp_path / "pred", "--results_dir", tmp_path / "res"]
    changed = {"--weights": "w.pth", "--confidence_threshold": 0.5, "--max_size": 1000, "--top_k": 100,
               "--keep_top_k": 50, "--tta_scales": 500, "--batch_size": 4, "--half": "true", "--pad_to": 32,
               "--channels_last": "false", "--workers": 3, "--tta": "true", "--target_size": 800,
               "--experiment_name": "other", "--dataset": tmp_path / "elsewhere"}
    given_at_default = {"--nms_threshold": 0.4, "--cuda_graphs": "true", "--gpu_num": 0}
    argv = base + ["--gt_dir", widerface_gt_dir] + [v for item in {**changed, **given_at_default}.items() for v in item]
    code, out, err = run_cli(test_script, argv, tmp_path, capsys)
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("warning: ") and err.strip().endswith(
        " ignored with --pred_dir (no model is run)"), err
    assert set(re.findall(r"--\w+", err.split(" ignored with")[0])) == set(changed)
    code, out, err = run_cli(test_script, base + ["--dataset", widerface_sample], tmp_path, capsys)
    assert code == 0 and err == "", err  # --dataset gave the ground truth: nothing ignored


@pytest.mark.parametrize("case", ["missing_pred_dir", "missing_gt", "gt_dir_is_file",
                                  "pred_dir_one_level_too_high", "pred_dir_one_level_too_high_after_an_evaluation",
                                  "pred_dir_is_an_event_folder",
                                  "truncated_gt", "truncated_gt_with_model", "gt_without_variable",
                                  "missing_dataset", "missing_weights", "missing_model_weight", "bad_option",
                                  "results_dir_is_a_file", "prediction_folder_is_a_file",
                                  "results_json_parent_is_a_file", "results_json_is_a_folder",
                                  "pred_dir_results_dir_is_a_file"])
def test_errors_are_one_line_without_traceback(case, test_script, widerface_gt_dir, widerface_sample,
                                               tmp_path, capsys):
    pred = tmp_path / "pred"
    argv = ["--pred_dir", pred, "--gt_dir", widerface_gt_dir, "--results_dir", tmp_path / "res"]
    # a model run whose weights do not exist: an output error must come before they are looked at
    model_run = ["--weights", tmp_path / "w.pth", "--dataset", widerface_sample, "--gt_dir", widerface_gt_dir]
    expected_code, message = 1, None
    if case in ("truncated_gt", "truncated_gt_with_model", "gt_without_variable"):
        # scipy raises MatReadError("Mat file appears to be truncated") for the first cut
        import shutil

        from scipy.io import savemat
        gt = tmp_path / "gt"
        shutil.copytree(widerface_gt_dir, gt)
        damaged = gt / "wider_medium_val.mat"
        damaged.chmod(0o644)
        if case == "gt_without_variable":
            savemat(str(damaged), {"other": np.zeros(2)})
        else:
            damaged.write_bytes(damaged.read_bytes()[:10])
        argv[argv.index("--gt_dir") + 1] = gt
        if case == "truncated_gt_with_model":
            argv = ["--weights", tmp_path / "w.pth", "--dataset", widerface_sample, "--gt_dir", gt,
                    "--results_dir", tmp_path / "res"]
        message = f"{damaged}: " + ("missing variable 'gt_list'" if case == "gt_without_variable"
                                    else "not a readable MATLAB .mat file")
    elif case == "missing_pred_dir":
        message = "prediction folder not found"
    elif case == "missing_gt":
        argv = ["--pred_dir", pred, "--gt_dir", tmp_path / "no_gt"]
        message = "ground-truth folder not found"
    elif case == "gt_dir_is_file":
        argv = ["--pred_dir", pred, "--gt_dir", widerface_gt_dir / "wider_face_val.mat"]
        message = (f"--gt_dir {widerface_gt_dir / 'wider_face_val.mat'} is a file; --gt_dir is the folder holding "
                   f"wider_face_val.mat, wider_easy_val.mat, wider_medium_val.mat, wider_hard_val.mat (did you "
                   f"mean its folder {widerface_gt_dir}?)")
    elif case.startswith("pred_dir_one_level_too_high") or case == "pred_dir_is_an_event_folder":
        write_synthetic_predictions(pred / "widerface_txt", load_gt(widerface_gt_dir),
                                    ["0--Parade/0_Parade_marchingband_1_465"])
        hint = f"{pred / 'widerface_txt'} holds event folders with .txt files: use --pred_dir {pred / 'widerface_txt'}"
        if case == "pred_dir_one_level_too_high":  # the results folder instead of its widerface_txt
            message = f"no prediction files in {pred} (expected <event>/<image stem>.txt); {hint}"
        elif case == "pred_dir_one_level_too_high_after_an_evaluation":  # where --pred_dir runs put their results
            (pred / "widerface_txt_eval").mkdir()
            (pred / "widerface_txt_eval" / "results.txt").write_text("predictions: somewhere\nEasy AP: 0.5\n")
            message = f"none of the 1 prediction files in {pred} could be read; {hint}"
        else:
            argv[1] = pred / "widerface_txt" / "0--Parade"
            message = f"looks like one event folder: use --pred_dir {pred / 'widerface_txt'}"
    elif case == "missing_dataset":
        argv = ["--weights", tmp_path / "w.pth", "--dataset", tmp_path / "nothing"]
        message = "dataset folder not found"
    elif case == "missing_weights":
        argv = ["--weights", tmp_path / "w.pth", "--dataset", widerface_sample, "--results_dir", tmp_path / "r"]
        message = "w.pth"
    elif case == "missing_model_weight":
        argv = ["--experiment_name", "exp", "--model_weight", "best.pth", "--dataset", widerface_sample]
        message = "weights file not found"
    elif case in ("results_dir_is_a_file", "pred_dir_results_dir_is_a_file"):
        (tmp_path / "res").write_text("a file\n")
        if case == "results_dir_is_a_file":
            argv = model_run + ["--results_dir", tmp_path / "res"]
        else:
            write_synthetic_predictions(pred, load_gt(widerface_gt_dir), ["0--Parade/0_Parade_marchingband_1_465"])
        message = f"--results_dir {tmp_path / 'res'} is a file, not a folder"
    elif case == "prediction_folder_is_a_file":  # the default results folder of --experiment_name
        results = tmp_path / "experiments" / "retinaface" / "results"
        results.mkdir(parents=True)
        (results / "widerface_txt").write_text("a file\n")
        argv = model_run
        message = f"results folder {Path('experiments/retinaface/results/widerface_txt')} is a file, not a folder"
    elif case == "results_json_parent_is_a_file":
        (tmp_path / "out").write_text("a file\n")
        argv = model_run + ["--results_json", tmp_path / "out" / "sub" / "ap.json"]
        message = f"--results_json {tmp_path / 'out' / 'sub' / 'ap.json'}: {tmp_path / 'out'} is a file, not a folder"
    elif case == "results_json_is_a_folder":
        (tmp_path / "ap").mkdir()
        argv = model_run + ["--results_json", tmp_path / "ap"]
        message = f"--results_json {tmp_path / 'ap'} is a folder; give a file path"
    else:
        argv = ["--tta", "maybe"]
        expected_code, message = 2, "expected true or false"
    code, out, err = run_cli(test_script, argv, tmp_path, capsys)
    assert code == expected_code
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("test.py: error:") and message in err, err
    assert not (tmp_path / "res").is_dir() or not any((tmp_path / "res").iterdir())  # nothing written


def test_evaluate_predictions_rejects_empty_and_list_val_images_errors(widerface_gt_dir, tmp_path):
    with pytest.raises(EvaluationError, match="no predictions"):
        evaluate_predictions({}, widerface_gt_dir)
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "label.txt").write_text("# 0--Parade/missing.jpg\n")
    with pytest.raises(EvaluationError, match="missing"):
        list_val_images(tmp_path)
    (tmp_path / "val" / "label.txt").write_bytes(b"# 0--Parade/a.jpg\n1 2 3 4\n# 0--Parade/\xe9.jpg\n")
    with pytest.raises(EvaluationError, match=r"label\.txt:3: not UTF-8 text \(byte 0xe9 at column 13\)"):
        list_val_images(tmp_path)


def _two_image_gt():
    from utils.metric import WiderFaceGroundTruth

    face = np.array([[0, 0, 9, 9]], dtype=np.float64)  # x y w h: 10 x 10 pixels
    keep = {"easy": [1], "medium": [1], "hard": [1]}
    return WiderFaceGroundTruth.from_records([("e", "a", face, keep), ("e", "b", face, keep)])


def test_evaluate_predictions_of_every_image_is_the_official_protocol_not_a_subset():
    """Predictions for every ground-truth image: the official protocol (no subset flag, no
    "not comparable" note); one image missing: a subset of 1 of 2 images."""
    gt = _two_image_gt()
    exact = np.array([[0, 0, 9, 9, 0.9]])
    full = evaluate_predictions({"e": {"a": exact, "b": exact * [1, 1, 1, 1, 0.5]}}, gt)
    assert full.num_images == 2 and not full.subset and subset_note(full) is None
    assert full.aps == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    part = evaluate_predictions({"e": {"a": exact}}, gt)
    assert part.num_images == 1 and part.subset
    assert subset_note(part) == "subset: 1 of 2 images, not comparable with full-val numbers"


def test_evaluate_predictions_applies_its_iou_threshold():
    """A 10 x 25 px detection over a 10 x 10 px face sharing its top-left corner has +1-pixel IoU
    100 / (250 + 100 - 100) = 0.4: a false positive at the default 0.5 (precision 0: AP 0), a
    match at 0.3 (both faces found, precision 1: AP 1)."""
    gt = _two_image_gt()
    preds = {"e": {"a": np.array([[0, 0, 9, 24, 0.9]]), "b": np.array([[0, 0, 9, 24, 0.6]])}}
    assert evaluate_predictions(preds, gt).aps == {"easy": 0.0, "medium": 0.0, "hard": 0.0}
    assert evaluate_predictions(preds, gt, iou_threshold=0.3).aps == {"easy": 1.0, "medium": 1.0, "hard": 1.0}


def test_results_txt_gives_the_aps_with_six_decimals(tmp_path):
    """results.txt reports each AP as format_aps prints it, six decimals. Image a: a false positive
    (raw score 1.0) above the face (0.5); image b: its face (0.0). Thresholds above 0.5: P 0/1;
    down to 0.5: P 1/2, R 1/2; at 0: P 2/3, R 1 -> AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3 = 0.666667."""
    from utils.evaluation import write_results

    gt = _two_image_gt()
    preds = {"e": {"a": np.array([[400, 300, 30, 30, 1.0], [0, 0, 9, 9, 0.5]]), "b": np.array([[0, 0, 9, 9, 0.0]])}}
    result = evaluate_predictions(preds, gt)
    assert result.hard == pytest.approx(2 / 3, abs=1e-12) and not result.subset
    write_results(tmp_path, result, plot=False)
    lines = (tmp_path / "results.txt").read_text().splitlines()
    assert [line for line in lines if " AP: " in line] == ["Easy AP: 0.666667", "Medium AP: 0.666667",
                                                          "Hard AP: 0.666667"]
    assert format_aps(result) == "Easy AP: 0.666667  Medium AP: 0.666667  Hard AP: 0.666667"


# --------------------------------------------------------------------------------------------
# End to end on the 10-image sample (published mobilenet0.25)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, widerface_sample, widerface_gt_dir, mobilenet_weights):
    """``python test.py --weights ... --dataset sample --gt_dir ...`` run in a temporary folder."""
    script = load_test_script()
    cwd = tmp_path_factory.mktemp("sample_run")
    old = os.getcwd()
    os.chdir(cwd)
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = script.main(["--weights", str(mobilenet_weights), "--dataset", str(widerface_sample),
                                "--gt_dir", str(widerface_gt_dir), "--experiment_name", "sample",
                                "--workers", "1", "--results_json", str(cwd / "copy.json")])
    finally:
        os.chdir(old)
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "cwd": cwd,
            "results": cwd / "experiments" / "sample" / "results", "seconds": time.perf_counter() - started}


def test_sample_run_writes_files_and_subset_aps(sample_run):
    assert sample_run["code"] == 0, sample_run["err"]
    out, results = sample_run["out"], sample_run["results"]
    assert "subset: 10 of 3226 images, not comparable with full-val numbers" in out
    aps = parse_ap_line(out)
    assert all(0 < v <= 1 for v in aps.values()), aps
    files = sorted((results / "widerface_txt").glob("*/*.txt"))
    assert len(files) == SAMPLE_IMAGES
    for path in files:  # stem line, count line, count "x y w h score" lines
        lines = path.read_text().splitlines()
        assert lines[0] == path.stem and int(lines[1]) == len(lines) - 2 > 0
        assert all(len(line.split()) == 5 for line in lines[2:])
    data = json.loads((results / "results.json").read_text())
    assert set(data) == {"easy", "medium", "hard", "num_images", "subset", "seconds", "fps", "unreadable_files"}
    assert data["num_images"] == SAMPLE_IMAGES and data["subset"] is True and data["seconds"] > 0
    assert data["unreadable_files"] == [] and "unreadable" not in (results / "results.txt").read_text()
    assert {k: round(data[k], 6) for k in aps} == aps
    assert json.loads((sample_run["cwd"] / "copy.json").read_text()) == data
    text = (results / "results.txt").read_text()
    for needle in ("test images: 10", "total time:", "time per image:", "fps:", "Easy AP:", "Medium AP:", "Hard AP:"):
        assert needle in text
    assert (results / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_pred_dir_of_the_written_folder_gives_identical_aps(sample_run, test_script, widerface_gt_dir,
                                                           tmp_path, capsys):
    code, out, err = run_cli(test_script, ["--pred_dir", sample_run["results"] / "widerface_txt", "--gt_dir",
                                           widerface_gt_dir, "--results_dir", tmp_path / "again"], tmp_path, capsys)
    assert code == 0, err
    assert parse_ap_line(out) == parse_ap_line(sample_run["out"])
    first = json.loads((sample_run["results"] / "results.json").read_text())
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [again[k] for k in ("easy", "medium", "hard")] == [first[k] for k in ("easy", "medium", "hard")]


def test_channels_last_false_runs_nchw_with_the_same_aps(sample_run, test_script, widerface_sample,
                                                         widerface_gt_dir, mobilenet_weights, tmp_path, capsys,
                                                         detector_layouts, monkeypatch):
    """``--channels_last false`` (the NCHW layout) reaches the detector and detects the same faces."""
    import utils.progress

    monkeypatch.setattr(utils.progress, "LOG_INTERVAL", 1e9)  # no time-driven lines on a slow machine
    code, out, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", widerface_sample,
                                           "--gt_dir", widerface_gt_dir, "--workers", "0", "--channels_last", "false",
                                           "--results_dir", tmp_path / "nchw"], tmp_path, capsys)
    assert code == 0, err
    assert detector_layouts == [False]
    # stderr is not a terminal here: the progress bar is a line at the start and one at the end (and
    # one every LOG_INTERVAL seconds), not carriage-return redraws
    assert "\r" not in err
    progress = [line for line in err.splitlines() if line.startswith("test:")]
    assert len(progress) == 2 and " 0/10 " in progress[0] and "100%" in progress[1] and " 10/10 " in progress[1], err
    nchw, nhwc = parse_ap_line(out), parse_ap_line(sample_run["out"])
    assert nchw.keys() == nhwc.keys() and all(abs(nchw[k] - nhwc[k]) < 1e-4 for k in nhwc), (nchw, nhwc)


def test_pad_to_batches_images_of_different_sizes_with_the_same_aps(sample_run, test_script, widerface_sample,
                                                                    widerface_gt_dir, mobilenet_weights, tmp_path,
                                                                    capsys, monkeypatch):
    """``--pad_to 1024 --batch_size 4``: the 10 sample images (8 sizes, all within 1024x1024) run
    in 1024x1024 batches of 4, 4 and 2, and every image keeps its detections."""
    from models.detector import FaceDetector

    canvases = []
    original = FaceDetector._launch

    def recording(self, images, scales):
        found = original(self, images, scales)
        canvases.append((len(images), self.pad_to))
        return found

    monkeypatch.setattr(FaceDetector, "_launch", recording)
    code, out, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", widerface_sample,
                                           "--gt_dir", widerface_gt_dir, "--workers", "0", "--pad_to", "1024",
                                           "--batch_size", "4", "--results_dir", tmp_path / "padded"], tmp_path, capsys)
    assert code == 0, err
    assert canvases == [(4, 1024), (4, 1024), (2, 1024)]
    padded, alone = parse_ap_line(out), parse_ap_line(sample_run["out"])
    assert padded.keys() == alone.keys() and all(abs(padded[k] - alone[k]) < 1e-4 for k in alone), (padded, alone)


def test_pred_dir_results_default_to_beside_the_predictions(sample_run, test_script, widerface_gt_dir,
                                                             tmp_path, capsys):
    """Evaluating a run's prediction folder again must not replace that run's results."""
    import shutil

    run_results = tmp_path / "experiments" / "retinaface" / "results"
    shutil.copytree(sample_run["results"] / "widerface_txt", run_results / "widerface_txt")
    (run_results / "results.txt").write_text("weights: the model run\n")
    code, out, err = run_cli(test_script, ["--pred_dir", run_results / "widerface_txt", "--gt_dir",
                                           widerface_gt_dir], tmp_path, capsys)
    assert code == 0, err
    assert (run_results / "results.txt").read_text() == "weights: the model run\n"
    assert not (run_results / "results.json").exists()
    evaluated = json.loads((run_results / "widerface_txt_eval" / "results.json").read_text())
    printed = parse_ap_line(sample_run["out"])
    assert all(evaluated[k] == pytest.approx(printed[k], abs=1e-6) for k in ("easy", "medium", "hard"))


def test_sample_aps_equal_the_loop_reference_evaluation(sample_run, widerface_gt_dir):
    from tools.reference_widerface_eval import load_reference_gt, reference_evaluate

    predictions = read_prediction_dir(sample_run["results"] / "widerface_txt")
    keys = [f"{e}/{s}" for e, per in predictions.items() for s in per]
    reference = reference_evaluate(predictions, load_reference_gt(widerface_gt_dir), images=keys)
    ours = json.loads((sample_run["results"] / "results.json").read_text())
    for setting in ("easy", "medium", "hard"):
        assert ours[setting] == pytest.approx(reference[setting]["ap"], abs=1e-9)


def test_sample_predictions_match_the_public_style_pipeline(sample_run, widerface_sample, widerface_gt_dir,
                                                            mobilenet_weights):
    """Public pipeline (tools/public_pipeline.py: float32 image, NumPy NMS; no top-k cuts, as the
    public test_widerface.py) + the public file convention gives the same APs as test.py."""
    from tools.public_pipeline import public_style_detect
    from utils.checkpoint import load_model
    from utils.image_io import read_image

    model = load_model(mobilenet_weights).eval()
    predictions: dict[str, dict[str, np.ndarray]] = {}
    for image in list_val_images(widerface_sample):
        dets = public_style_detect(model, read_image(image.path), 0.02, 0.4, top_k=None, keep_top_k=None)
        found = Detections(dets[:, :4], dets[:, 4], dets[:, 5:15].reshape(-1, 5, 2))
        predictions.setdefault(image.event, {})[image.stem] = prediction_rows(found)[0]
    public = evaluate_predictions(predictions, widerface_gt_dir)
    ours = json.loads((sample_run["results"] / "results.json").read_text())
    for setting in ("easy", "medium", "hard"):
        assert ours[setting] == pytest.approx(public.aps[setting], abs=1e-6)


def test_default_checkpoint_is_last_and_ctrl_c_keeps_the_files_written(test_script, widerface_sample,
                                                                       widerface_gt_dir, mobilenet_weights,
                                                                       tmp_path, capsys, detection_fails_on_call):
    keys = ["49--Greeting/49_Greeting_peoplegreeting_49_56.jpg",
            "12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"]
    dataset = small_dataset(tmp_path, widerface_sample, keys)
    ckpt = tmp_path / "experiments" / "exp" / "ckpt"
    ckpt.mkdir(parents=True)
    for name in ("best.pth", "last.pth"):
        (ckpt / name).symlink_to(mobilenet_weights)
    detection_fails_on_call(2, KeyboardInterrupt())
    code, out, err = run_cli(test_script, ["--experiment_name", "exp", "--dataset", dataset, "--gt_dir",
                                           widerface_gt_dir, "--workers", 0], tmp_path, capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "test.py: interrupted" and "Traceback" not in err
    assert f"weights: {Path('experiments/exp/ckpt/last.pth')}" in out  # the end-of-schedule model, not best.pth
    written = sorted(p.relative_to(tmp_path / "experiments/exp/results/widerface_txt").as_posix()
                     for p in (tmp_path / "experiments/exp/results/widerface_txt").rglob("*.txt"))
    assert written == [keys[0].replace(".jpg", ".txt")]  # the image done before the interrupt
    assert not (tmp_path / "experiments/exp/results/results.json").exists()


def test_sigterm_ends_the_run_with_one_line_and_143(test_script, widerface_sample, widerface_gt_dir,
                                                   mobilenet_weights, tmp_path, capsys, detection_fails_on_call):
    """SIGTERM (a batch job's time limit) ended test.py without a word (Python's default); it now
    ends as Ctrl-C does: the prediction files of the images done stay, one line, status 143."""
    import signal

    detection_fails_on_call(2, signal.SIGTERM)
    keys = ["49--Greeting/49_Greeting_peoplegreeting_49_56.jpg",
            "12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"]
    dataset = small_dataset(tmp_path, widerface_sample, keys)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", dataset, "--gt_dir",
                                           widerface_gt_dir, "--workers", 0, "--results_dir", tmp_path / "res"],
                             tmp_path, capsys)
    assert code == 143 and err.strip().splitlines()[-1] == "test.py: terminated (SIGTERM)" and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before
    written = sorted(p.relative_to(tmp_path / "res/widerface_txt").as_posix()
                     for p in (tmp_path / "res/widerface_txt").rglob("*.txt"))
    assert written == [keys[0].replace(".jpg", ".txt")] and not (tmp_path / "res/results.json").exists()


def test_interrupted_run_leaves_only_its_own_prediction_files_and_no_results(test_script, widerface_sample,
                                                                            widerface_gt_dir, mobilenet_weights,
                                                                            tmp_path, capsys, detection_fails_on_call):
    """A run that stops part-way must not leave files of an earlier run beside its own (--pred_dir
    on the folder would give APs of neither run), nor the earlier run's results."""
    keys = ["49--Greeting/49_Greeting_peoplegreeting_49_56.jpg",
            "12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"]
    dataset = small_dataset(tmp_path, widerface_sample, keys)
    results = tmp_path / "res"
    txt = results / "widerface_txt"
    earlier = {txt / "0--Parade" / "0_Parade_marchingband_1_465.txt": "0_Parade_marchingband_1_465\n0\n",
               **{txt / key.replace(".jpg", ".txt"): f"{Path(key).stem}\n1\n1 2 3 4 0.9\n" for key in keys}}
    for path, text in {**earlier, results / "results.txt": "earlier\n", results / "results.json": "{}\n",
                       results / "pr_curves.png": "png", tmp_path / "ap.json": "{}\n"}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    detection_fails_on_call(2, KeyboardInterrupt())
    code, out, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", dataset, "--gt_dir",
                                           widerface_gt_dir, "--workers", 0, "--results_dir", results,
                                           "--results_json", tmp_path / "ap.json"], tmp_path, capsys)
    assert code == 130 and "Traceback" not in err, err
    first = txt / keys[0].replace(".jpg", ".txt")
    assert sorted(txt.rglob("*.txt")) == [first]  # the image done before Ctrl-C, written by this run
    assert first.read_text() != earlier[first] and int(first.read_text().splitlines()[1]) > 1
    assert not [name for name in ("results.txt", "results.json", "pr_curves.png") if (results / name).exists()]
    assert not (tmp_path / "ap.json").exists()


def _break_images(dataset: Path, keys: list[str]) -> list[Path]:
    """Replace the images of ``keys`` in a :func:`small_dataset` by unreadable files: text, empty,
    a truncated JPEG, in turn. Returns their paths."""
    broken = []
    for n, key in enumerate(keys):
        path = dataset / "val" / "images" / key
        data = path.read_bytes()
        path.unlink()
        path.write_bytes([b"not an image\n", b"", data[: len(data) // 2]][n % 3])
        broken.append(path)
    return broken


def test_unreadable_val_images_are_named_and_the_others_evaluated(test_script, widerface_sample, widerface_gt_dir,
                                                                 mobilenet_weights, tmp_path, capsys):
    """Batch rule: the run goes past unreadable images, names each on stderr, evaluates the images
    read (subset), lists the unreadable ones in the results and exits 3 (files skipped)."""
    keys = ["0--Parade/0_Parade_marchingband_1_311.jpg", "12--Group/12_Group_Group_12_Group_Group_12_935.jpg",
            "49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"]
    dataset = small_dataset(tmp_path, widerface_sample, keys)
    broken = _break_images(dataset, keys[:2])
    stale = tmp_path / "res" / "widerface_txt" / keys[0].replace(".jpg", ".txt")  # of an earlier run
    stale.parent.mkdir(parents=True)
    stale.write_text(f"{stale.stem}\n0\n")
    code, out, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", dataset, "--gt_dir",
                                           widerface_gt_dir, "--workers", 1, "--results_dir", tmp_path / "res"],
                             tmp_path, capsys)
    assert code == EXIT_SKIPPED and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("test.py: ")]
    assert len(lines) == 3 and [line.startswith(f"test.py: error: cannot read {path}: ")
                                for path, line in zip(broken, lines)] == [True, True], err
    assert lines[2] == ("test.py: error: 2 of 3 val images could not be read (named above, listed in results.json): "
                        "the APs cover the other 1 only")
    assert "subset: 1 of 3226 images, not comparable with full-val numbers" in out
    txt = tmp_path / "res" / "widerface_txt"
    assert sorted(txt.rglob("*.txt")) == [txt / keys[2].replace(".jpg", ".txt")]  # none for the broken images
    again = evaluate_predictions(read_prediction_dir(txt), widerface_gt_dir)
    assert parse_ap_line(out) == {k: pytest.approx(v, abs=1e-6) for k, v in again.aps.items()}
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    assert data["num_images"] == 1 and data["subset"] is True
    assert [entry.split(": ")[0] for entry in data["unreadable_files"]] == [str(path) for path in broken]
    text = (tmp_path / "res" / "results.txt").read_text()
    assert "unreadable files (not evaluated): 2\n  " in text and str(broken[1]) in text


def test_evaluate_model_raises_after_the_pass_naming_the_unreadable_images(widerface_sample, widerface_gt_dir,
                                                                          tmp_path):
    """The Python API promises official-protocol numbers: unreadable images raise, after every
    other image has been run (prediction files written), naming the count and the first three."""
    from utils.evaluation import evaluate_model

    keys = [line[2:] for line in (widerface_sample / "val" / "label.txt").read_text().splitlines()
            if line.startswith("# ")][:5]
    dataset = small_dataset(tmp_path, widerface_sample, keys)
    broken = _break_images(dataset, keys[:4])  # the readable image is the last one
    detector = _MemoryHungryDetector(failures=0)
    run = predict_widerface(detector, images=list_val_images(dataset), workers=2, progress=False)
    assert [path for path, _ in run.unreadable] == [str(path) for path in broken] and run.num_images == 1
    assert all(reason for _, reason in run.unreadable) and sum(map(len, run.predictions.values())) == 1
    with pytest.raises(EvaluationError) as raised:
        evaluate_model(detector, dataset, widerface_gt_dir, out_dir=tmp_path / "txt")
    message = str(raised.value)
    assert message.startswith(f"cannot read {broken[0]}: ") and str(broken[2]) in message
    assert str(broken[3]) not in message and message.endswith(
        " and 1 more (4 of 5 val images unreadable; every val image counts in the AP)")
    assert len(list((tmp_path / "txt").rglob("*.txt"))) == 1  # the pass went on to the last image


def test_target_size_1600_maps_boxes_back_and_model_weight_path(sample_run, test_script, widerface_sample,
                                                                widerface_gt_dir, mobilenet_weights, tmp_path,
                                                                capsys):
    keys = ["49--Greeting/49_Greeting_peoplegreeting_49_56.jpg",
            "12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"]
    dataset = small_dataset(tmp_path, widerface_sample, keys)
    ckpt = tmp_path / "experiments" / "big" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "best.pth").symlink_to(mobilenet_weights)
    code, out, err = run_cli(test_script, ["--experiment_name", "big", "--model_weight", "best.pth", "--dataset",
                                           dataset, "--gt_dir", widerface_gt_dir, "--target_size", 1600,
                                           "--max_size", 2150, "--workers", 0, "--tta_scales", 500], tmp_path,
                             capsys)
    assert code == 0, err
    assert "subset: 2 of 3226 images" in out and "shorter side 1600, longer side <= 2150" in out
    assert "warning: --tta_scales is ignored without --tta true" in err
    big = read_prediction_dir(tmp_path / "experiments" / "big" / "results" / "widerface_txt")
    original = read_prediction_dir(sample_run["results"] / "widerface_txt")
    for key in keys:
        event, stem = key[:-4].split("/")
        rows, reference = big[event][stem], original[event][stem]
        assert rows[:, 0].max() < 1024 and (rows[:, 0] + rows[:, 2]).max() <= 1030  # original pixels
        confident = rows[rows[:, 4] > 0.9]
        assert len(confident) >= 3
        for x, y, w, h, _ in confident:  # each confident face was found at original scale too
            ix = np.minimum(x + w, reference[:, 0] + reference[:, 2]) - np.maximum(x, reference[:, 0])
            iy = np.minimum(y + h, reference[:, 1] + reference[:, 3]) - np.maximum(y, reference[:, 1])
            inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
            iou = inter / (w * h + reference[:, 2] * reference[:, 3] - inter)
            assert iou.max() > 0.6


def test_target_size_1600_equals_the_public_test_script(widerface_sample, mobilenet_weights):
    """At 1600/2150 the public test_widerface.py resizes the float32 image and runs NMS on boxes
    mapped back to original pixels, with no top-k cuts: every detection down to score 0.02 is the
    same (NMS at input scale or a uint8 resize left 3-35 of them unmatched per image)."""
    from models.detector import FaceDetector, resize_scale
    from tools.fidelity import unmatched
    from tools.public_pipeline import public_style_detect
    from utils.checkpoint import load_model
    from utils.image_io import read_image

    model = load_model(mobilenet_weights).eval()
    detector = FaceDetector(model=model, device="cpu", confidence_threshold=0.02, nms_threshold=0.4, top_k=None,
                            keep_top_k=None, target_size=1600, max_size=2150)
    for image in list_val_images(widerface_sample)[:2]:
        pixels = read_image(image.path)
        scale = resize_scale(pixels.shape[0], pixels.shape[1], 1600, 2150)
        assert scale != 1.0
        public = public_style_detect(model, pixels, 0.02, 0.4, top_k=None, keep_top_k=None,
                                     resize=scale).astype(np.float64)
        found = detector.detect(pixels)
        ours = np.concatenate([found.boxes, found.scores[:, None], found.landmarks.reshape(-1, 10)], 1)
        assert len(ours) == len(public)
        for a, b in ((public, ours.astype(np.float64)), (ours.astype(np.float64), public)):
            assert unmatched(a, b, min_score=0.02, max_score_diff=0.001, max_landmark_diff=0.5) == []


def test_evaluate_model_api_and_batching(sample_run, widerface_sample, widerface_gt_dir, mobilenet_weights,
                                         tmp_path):
    """train.py's entry point gives the APs of the CLI's predictions on the same images; two
    same-size images in one batch give the same files as one at a time."""
    from models.detector import FaceDetector
    from utils.checkpoint import load_model
    from utils.evaluation import evaluate_model

    keys = ["10--People_Marching/10_People_Marching_People_Marching_10_People_Marching_People_Marching_10_848.jpg",
            "12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"]  # both 1024 x 682
    dataset = small_dataset(tmp_path, widerface_sample, keys)
    model = load_model(mobilenet_weights)
    model.train()
    result = evaluate_model(model, dataset, widerface_gt_dir, "cpu", batch_size=2, out_dir=tmp_path / "txt")
    assert model.training  # left as it was
    original = read_prediction_dir(sample_run["results"] / "widerface_txt")
    subset = {k[:-4].split("/")[0]: {} for k in keys}
    for key in keys:
        event, stem = key[:-4].split("/")
        subset[event][stem] = original[event][stem]
    expected = evaluate_predictions(subset, widerface_gt_dir)
    assert result.subset and result.num_images == 2
    np.testing.assert_allclose([result.aps[s] for s in ("easy", "medium", "hard")],
                               [expected.aps[s] for s in ("easy", "medium", "hard")], atol=1e-3)
    assert subset_note(result) == "subset: 2 of 3226 images, not comparable with full-val numbers"
    assert format_aps(result).startswith("Easy AP: ")
    # stale prediction files of other images are removed from a reused prediction folder; files
    # that are not prediction files (first line: their stem) are left alone
    stale = tmp_path / "txt" / "0--Parade" / "old.txt"
    stale.parent.mkdir()
    stale.write_text("old\n0\n")
    # the first line as other tools write it (event folder and .jpg, CRLF, a BOM): as --pred_dir reads it
    others = {"jpg.txt": "0--Parade/jpg.jpg\r\n0\r\n", "bom.txt": "\ufeffbom\n0\n"}
    for name, text in others.items():
        (stale.parent / name).write_bytes(text.encode())
    kept = tmp_path / "txt" / "mine" / "todo.txt"
    kept.parent.mkdir()
    kept.write_text("my own notes\n")
    detector = FaceDetector(model=model, device="cpu", confidence_threshold=0.02, nms_threshold=0.4)
    run = predict_widerface(detector, dataset, tmp_path / "txt", batch_size=1, workers=0, progress=False)
    assert not stale.exists() and run.num_images == 2 and run.seconds > 0
    assert not any((stale.parent / name).exists() for name in others)
    assert kept.read_text() == "my own notes\n"


def test_model_evaluation_defaults_are_the_public_protocol_of_test_py(widerface_sample, widerface_gt_dir,
                                                                      mobilenet_weights, tmp_path):
    """train.py's evaluation (evaluate_model, protocol_detector), told no thresholds, runs the
    public test_widerface.py protocol that test.py's defaults also follow: score > 0.02, NMS IoU
    0.4, no top-k cuts. On a crowded sample image its prediction file is the one of a detector
    built with test.py's default options, and differs from the inference default NMS 0.3."""
    from config import parse_args
    from models.detector import FaceDetector
    from utils.checkpoint import load_model
    from utils.evaluation import evaluate_model, protocol_detector

    cli = parse_args("test", [])
    assert (cli.confidence_threshold, cli.nms_threshold, cli.top_k, cli.keep_top_k) == (0.02, 0.4, None, None)
    model = load_model(mobilenet_weights)
    detector = protocol_detector(model, "cpu")
    assert (detector.confidence_threshold, detector.nms_threshold, detector.top_k, detector.keep_top_k) == \
        (0.02, 0.4, None, None)
    key = "12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"
    dataset = small_dataset(tmp_path, widerface_sample, [key])
    event, stem = key[:-4].split("/")

    def cli_rows(nms_threshold: float) -> np.ndarray:
        out = tmp_path / f"nms{nms_threshold}"
        run_detector = FaceDetector(model=model, device="cpu", confidence_threshold=cli.confidence_threshold,
                                    nms_threshold=nms_threshold, top_k=cli.top_k, keep_top_k=cli.keep_top_k)
        predict_widerface(run_detector, dataset, out, batch_size=1, workers=0, progress=False)
        return read_prediction_dir(out)[event][stem]

    evaluate_model(model, dataset, widerface_gt_dir, "cpu", out_dir=tmp_path / "evaluate_model")
    rows = read_prediction_dir(tmp_path / "evaluate_model")[event][stem]
    np.testing.assert_array_equal(rows, cli_rows(cli.nms_threshold))
    looser = cli_rows(0.3)
    assert len(looser) != len(rows) or not np.array_equal(looser, rows)


def test_tta_detector_follows_insightface_pipeline(widerface_sample, mobilenet_weights):
    """TTA of one sample image at two small pass sizes against insightface's steps written out
    here: its scale rule; each pass resizes the uint8 image, mirrors the resized one, keeps the
    raw candidates (no NMS) clipped to the resized image, flips the mirrored ones back in resized
    pixels, divides by the scale; all pooled, sorted by score and merged by its bbox_vote loop
    (coordinates continuous: x -> w - x and [0, w] where insightface has w - 1 - x and [0, w - 1])."""
    from models.detector import FaceDetector
    from torchvision import ops
    from utils.image_io import read_image

    image = read_image(widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg")
    height, width = image.shape[:2]
    detector = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.02, nms_threshold=0.4)
    raw = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.02, nms_threshold=None, top_k=None,
                       keep_top_k=None)
    sizes = (301, 499)  # resized widths 451.5 -> 452 and 748.5 -> 748 (rounded half to even)
    tta = TTADetector(detector, TTAConfig(scales=sizes))
    passes = tta.run_passes([image])[0]
    assert [(s, f) for s, f, _ in passes] == [(301, False), (301, True), (499, False), (499, True)]

    pooled = []
    for size in sizes:
        base = 800 / min(height, width)
        if np.round(base * max(height, width)) > 1200:
            base = 1200 / max(height, width)
        scale = size / 800 * base
        resized = cv2.resize(image, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        resized_height, resized_width = resized.shape[:2]
        for flipped, found in zip((False, True), raw.detect_batch([resized, resized[:, ::-1].copy()])):
            boxes = np.clip(found.boxes, 0, [resized_width, resized_height] * 2)
            if flipped:
                boxes[:, [0, 2]] = resized_width - boxes[:, [2, 0]]
            pooled.append(np.hstack([boxes / scale, found.scores[:, None]]))
    pooled = np.concatenate(pooled).astype(np.float64)
    assert sum(len(found) for _, _, found in passes) == len(pooled) > 1000
    expected = loop_box_vote(pooled, 0.4, insightface=True)
    merged = tta.detect(image)
    assert 20 < len(merged) < len(pooled)
    np.testing.assert_allclose(merged.scores, expected[:, 4], rtol=1e-6)
    np.testing.assert_allclose(merged.boxes, expected[:, :4], rtol=1e-5, atol=2e-3)
    # the mirrored passes' landmarks come back left/right swapped: the confident merged faces'
    # landmarks lie where the single-scale detector puts them (measured: 0.053 of the box width
    # on average; 0.129 without the swap)
    plain = detector.detect(image)
    confident = merged.scores > 0.9
    iou = ops.box_iou(torch.from_numpy(merged.boxes[confident]), torch.from_numpy(plain.boxes)).numpy()
    assert confident.sum() >= 5 and (iou.max(axis=1) > 0.8).all()
    error = np.linalg.norm(merged.landmarks[confident] - plain.landmarks[iou.argmax(axis=1)], axis=2).mean(axis=1)
    assert (error / (merged.boxes[confident, 2] - merged.boxes[confident, 0])).mean() < 0.08
    # the raw candidates of the original-size pass are what NMS then reduces to the plain detection
    single = TTADetector(detector, TTAConfig(scales=(0,), flip=False)).run_passes([image])[0][0][2]
    shifted = torch.from_numpy(single.boxes).clone()
    shifted[:, 2:] += 1
    keep = ops.nms(shifted, torch.from_numpy(single.scores), 0.4).numpy()
    np.testing.assert_allclose(np.clip(plain.boxes, 0, [width, height] * 2), single.boxes[keep], atol=1e-4)


def test_tta_on_images_without_faces_writes_count_zero_files(widerface_sample, mobilenet_weights, tmp_path):
    """When no pass of an image finds a face, the merge is empty (the WIDER FACE file still says 0),
    and the images around it keep their faces."""
    from models.detector import FaceDetector

    merged = box_voting(torch.zeros(0, 4), torch.zeros(0), 0.4, torch.zeros(0, 10))
    assert [tuple(t.shape) for t in merged] == [(0, 4), (0,), (0, 10), (0,)]
    key = "49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"
    root = small_dataset(tmp_path, widerface_sample, [key])
    for name, image in (("blank", np.full((200, 300, 3), 128, np.uint8)), ("dot", np.zeros((1, 1, 3), np.uint8))):
        assert cv2.imwrite(str(root / "val/images/49--Greeting" / f"{name}.png"), image)
    with open(root / "val/label.txt", "a") as labels:
        labels.write("# 49--Greeting/blank.png\n# 49--Greeting/dot.png\n")
    detector = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.02, nms_threshold=0.4)
    tta = TTADetector(detector, TTAConfig(scales=(300, 0)))
    run = predict_widerface(tta, root, tmp_path / "txt", batch_size=2, workers=0, progress=False)
    assert run.num_images == 3
    folder = tmp_path / "txt" / "49--Greeting"
    for name in ("blank", "dot"):
        assert (folder / f"{name}.txt").read_text() == f"{name}\n0\n"
    assert int((folder / "49_Greeting_peoplegreeting_49_56.txt").read_text().splitlines()[1]) > 10


def test_tta_check_names_an_unreadable_image_in_one_line(widerface_sample, widerface_gt_dir, mobilenet_weights,
                                                        tmp_path, capsys):
    from tools import tta_check

    keys = ["49--Greeting/49_Greeting_peoplegreeting_49_56.jpg",
            "12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"]
    root = small_dataset(tmp_path, widerface_sample, keys)
    broken = root / "val/images" / keys[0]
    broken.unlink()
    broken.write_bytes(b"")
    argv = ["--weights", str(mobilenet_weights), "--dataset", str(root), "--gt_dir", str(widerface_gt_dir),
            "--scales", "0", "--device", "cpu"]
    assert tta_check.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tta_check.py: error: {broken}: empty file"
    assert tta_check.main(argv[:2] + ["--dataset", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.startswith("tta_check.py: error: ")


def test_tta_raises_sample_hard_ap(sample_run, test_script, widerface_sample, widerface_gt_dir, mobilenet_weights,
                                   tmp_path, capsys):
    """--tta true (default scales 500..1700 + flips, box voting) beats single scale on hard AP
    (measured: 0.9773 vs 0.9427 on the sample; ~21 s on 2 idle CPU cores)."""
    code, out, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", widerface_sample,
                                           "--gt_dir", widerface_gt_dir, "--tta", "true", "--workers", 1,
                                           "--max_size", 600, "--top_k", 10, "--results_dir", tmp_path / "tta"],
                             tmp_path, capsys)
    assert code == 0, err
    for option in ("max_size", "top_k"):  # insightface's protocol has neither
        assert f"warning: --{option} is ignored with --tta (see --tta_scales)" in err
    assert "TTA: passes 500, 800, 1100, 1400, 1700 (each x size/800 of the base scale: shorter side 800" in out
    tta, single = parse_ap_line(out), parse_ap_line(sample_run["out"])
    assert tta["hard"] > single["hard"] + 0.02, (tta, single)
    assert tta["easy"] > 0.95 and tta["medium"] > 0.9
    assert len(list((tmp_path / "tta" / "widerface_txt").glob("*/*.txt"))) == SAMPLE_IMAGES


class _MemoryHungryDetector:
    """Runs out of memory on its first ``failures`` calls; counts ``release_memory`` calls."""

    batch_size = 4
    timings: dict = {}

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.releases = failures, 0, 0

    def detect_batch(self, images):
        self.calls += 1
        if self.calls <= self.failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return [Detections.empty() for _ in images]

    def release_memory(self):
        self.releases += 1


def test_prediction_retries_after_out_of_memory_and_fails_clearly_when_an_image_cannot_fit(widerface_sample):
    images = list_val_images(widerface_sample)[:3]
    flaky = _MemoryHungryDetector(failures=1)
    run = predict_widerface(flaky, images=images, workers=0, progress=False)
    assert sum(len(stems) for stems in run.predictions.values()) == 3 and flaky.releases >= 1
    hopeless = _MemoryHungryDetector(failures=10 ** 6)
    with pytest.raises(EvaluationError, match=r"out of memory on .*\.jpg \(\d+x\d+\) even alone"):
        predict_widerface(hopeless, images=images, workers=0, progress=False)
    assert hopeless.releases == 2  # once for the batch, once more for the image that still failed


def test_prediction_keeps_one_batch_in_flight_and_reruns_one_whose_post_processing_ran_out_of_memory(
        widerface_sample):
    images = list_val_images(widerface_sample)[:3]
    def one_box_each(batch):
        return [Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.9], np.float32),
                           np.zeros((1, 5, 2), np.float32)) for _ in batch]

    queueing = QueueingDetector(one_box_each, oom_result=2)
    run = predict_widerface(queueing, images=images, workers=0, progress=False)
    # batch n + 1 is submitted before batch n is finished; batch 2 again through detect_batch
    assert queueing.events == [("submit", 1), ("submit", 2), ("result", 1), ("submit", 3), ("result", 2),
                               ("detect_batch", 1), ("result", 3)]
    assert [len(run.predictions[im.event][im.stem]) for im in images] == [1, 1, 1]


def test_host_out_of_memory_in_opencv_stops_with_one_line_naming_the_image(test_script, widerface_sample,
                                                                          widerface_gt_dir, mobilenet_weights,
                                                                          tmp_path, capsys):
    """--target_size 1000000 makes cv2.resize ask for terabytes: cv2.error (-4:Insufficient memory)
    is an out-of-memory error like torch's (retried alone, then one line naming the image)."""
    key = "0--Parade/0_Parade_marchingband_1_311.jpg"
    dataset = small_dataset(tmp_path, widerface_sample, [key])
    code, _, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", dataset, "--gt_dir",
                                         widerface_gt_dir, "--results_dir", tmp_path / "res", "--workers", "0",
                                         "--target_size", "1000000"], tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.startswith("test.py")]
    assert code == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("test.py: error: out of memory on ")
    assert key.split("/")[1] in lines[0] and "even alone" in lines[0]


def test_opencv_allocation_failure_counts_as_out_of_memory():
    import cv2

    from utils.errors import is_out_of_memory, unless_out_of_memory

    with pytest.raises(cv2.error) as raised:  # a real OpenCV allocation failure (17 TB)
        cv2.resize(np.zeros((4, 4, 3), np.float32), None, fx=300000, fy=300000)
    assert is_out_of_memory(raised.value)
    assert unless_out_of_memory(cv2.resize, np.zeros((4, 4, 3), np.float32), None, None, 300000, 300000) is None
    with pytest.raises(cv2.error) as other:  # other OpenCV errors are not memory errors
        cv2.cvtColor(np.zeros((4, 4, 2), np.uint8), cv2.COLOR_BGR2GRAY)
    assert not is_out_of_memory(other.value)
    with pytest.raises(cv2.error):
        unless_out_of_memory(cv2.cvtColor, np.zeros((4, 4, 2), np.uint8), cv2.COLOR_BGR2GRAY)


def test_half_on_the_cpu_is_named_as_unused(test_script, widerface_sample, mobilenet_weights, tmp_path, capsys):
    code, _, err = run_cli(test_script, ["--weights", mobilenet_weights, "--dataset", widerface_sample, "--device",
                                         "cpu", "--half", "true", "--workers", 0, "--target_size", 160, "--max_size",
                                         160, "--results_dir", tmp_path / "res"], tmp_path, capsys)
    assert code == 0 and "warning: --half is only used on CUDA; running in float32" in err.splitlines(), err
