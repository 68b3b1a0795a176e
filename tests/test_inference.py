"""inference.py: outputs, fidelity to the public pipeline, mask stage, bad inputs, CLI errors.

Runs on the CPU with the published mobilenet0.25 weights and the shared sample images.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import config
import inference
from tests.conftest import QueueingDetector, require_installed
from utils import face_mask as fm
from utils import image_loader
from utils import inference_utils as iu
from utils.image_io import ImageReadError
from utils.names import escape_name, unescape_name

REPO = Path(__file__).resolve().parents[1]
GREETING = "49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"


def run_main(argv, capsys):
    code = inference.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def box_iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_matching(ours: list[dict], reference: list[tuple], min_score=0.5, iou=0.98, score_tol=0.005, px=1.0):
    """Every detection (score >= min_score) of each side has a partner on the other side."""
    ref = [(list(b), float(s), np.asarray(p, float).reshape(5, 2)) for b, s, p in reference]
    mine = [(d["box"], d["score"], np.asarray(d["landmarks"], float)) for d in ours]
    for side, other in ((ref, mine), (mine, ref)):
        for box, score, points in side:
            if score < min_score:
                continue
            best = max(other, key=lambda o: box_iou(box, o[0]))
            assert box_iou(box, best[0]) >= iou, (box, score, best)
            assert abs(score - best[1]) <= score_tol, (box, score, best)
            assert np.abs(points - best[2]).max() <= px, (box, points, best)


def link_images(folder: Path, sources: dict[str, Path]) -> Path:
    for name, source in sources.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    return folder


# ------------------------------------------------------------------------------------------
# End to end on the WIDER FACE sample
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def widerface_run(widerface_sample, mobilenet_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("wider") / "out"
    code = inference.main(["--weights", str(mobilenet_weights), "--experiment_name", "sample",
                           "--inference_dir", str(widerface_sample / "val/images"),
                           "--inference_save_folder", str(out), "--save_img", "true"])
    return code, out, widerface_sample / "val/images"


def test_end_to_end_outputs_agree(widerface_run):
    code, out, images = widerface_run
    assert code == config.EXIT_OK
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(detections) == names

    lines = (out / "sample_inference_results.txt").read_text().splitlines()
    parsed, current = {}, None
    for line in lines:
        fields = line.split()
        if len(fields) == 5 and current is not None and all(f.lstrip("-").replace(".", "").isdigit() for f in fields):
            parsed[current].append((tuple(int(v) for v in fields[:4]), float(fields[4])))
        else:
            current = line
            parsed[current] = []
    assert sorted(parsed) == names
    total = 0
    for name in names:
        faces = detections[name]
        total += len(faces)
        assert len(parsed[name]) == len(faces)
        for (box, score), face in zip(parsed[name], faces):
            assert box == tuple(int(v) for v in face["box"])
            assert score == pytest.approx(face["score"], abs=1e-6)
            assert face["score"] > 0.5 and len(face["landmarks"]) == 5
        assert [f["score"] for f in faces] == sorted((f["score"] for f in faces), reverse=True)
        drawn = cv2.imread(str(out / "result_images" / name))
        assert drawn is not None and drawn.shape == cv2.imread(str(images / name)).shape
    assert total > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == len(names) and summary["faces"] == total and summary["skipped"] == []
    assert summary["exit_code"] == 0 and set(summary["ms_per_image"]) >= {"load", "forward", "postprocess", "masks"}


def test_experiment_checkpoint_choice_is_reported(mobilenet_weights, photos_dir, tmp_path, monkeypatch, capsys):
    """Without --weights, experiments/<name>/ckpt/best.pth is run (else last.pth); the run says which."""
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "experiments" / "mine" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pth").symlink_to(mobilenet_weights)
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.jpg").symlink_to(sorted(photos_dir.glob("*.jpg"))[0])
    for expected in ("last.pth", "best.pth"):
        if expected == "best.pth":
            (ckpt / "best.pth").symlink_to(mobilenet_weights)
        out = tmp_path / f"out_{expected}"
        code, _, err = run_main(["--experiment_name", "mine", "--inference_dir", images,
                                 "--inference_save_folder", out], capsys)
        assert code == config.EXIT_OK, err
        used = json.loads((out / "summary.json").read_text())["weights"]
        assert Path(used).name == expected and f"weights: {used}" in err


def test_refuses_to_overwrite_results(widerface_run, capsys):
    _, out, images = widerface_run
    before = (out / "detections.json").read_text()
    code, _, err = run_main(["--weights", "mobilenet0.25", "--inference_dir", images,
                             "--inference_save_folder", out], capsys)
    assert code == config.EXIT_ERROR
    assert len(err.strip().splitlines()) == 1 and "already holds results" in err and "--exist_ok" in err
    assert (out / "detections.json").read_text() == before
    from utils.inference_utils import InferenceError, run_inference
    with pytest.raises(InferenceError, match=r"already holds results .*\(from Python: exist_ok=True\)"):
        run_inference({"weights": "mobilenet0.25", "inference_dir": images, "inference_save_folder": out})
    assert (out / "detections.json").read_text() == before


def test_output_folder_that_is_the_input_folder_does_not_read_its_own_results(widerface_sample, mobilenet_weights,
                                                                              tmp_path, capsys):
    folder = link_images(tmp_path / "in", {"a.jpg": widerface_sample / "val/images" / GREETING})
    argv = ["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", folder,
            "--save_img", "true", "--exist_ok", "true", "--workers", "0"]
    for _ in range(2):  # the second run finds result_images/a.jpg of the first beside its input
        code, _, err = run_main(argv, capsys)
        assert code == config.EXIT_OK, err
        assert sorted(json.loads((folder / "detections.json").read_text())) == ["a.jpg"]
    assert (folder / "result_images" / "a.jpg").is_file()
    assert not (folder / "result_images" / "result_images").exists()
    # a later run reading that folder into another output folder: the first run's drawn images are
    # outputs too (its detections.json is in the input folder itself, not in result_images/)
    code, stdout, _ = run_main(argv[:5] + [tmp_path / "later"] + argv[6:], capsys)
    assert code == config.EXIT_OK
    assert sorted(json.loads((tmp_path / "later" / "detections.json").read_text())) == ["a.jpg"]
    assert f"  note result_images/: {iu.EARLIER_OUTPUTS_NOTE}" in stdout.splitlines()


def test_fidelity_to_public_pipeline(widerface_sample, mobilenet_weights, tmp_path, capsys):
    """The fidelity command of the issue against the public Pytorch_Retinaface reference."""
    reference = json.loads((widerface_sample / "reference_detections_mobilenet0.25.json").read_text())["detections"]
    folder = link_images(tmp_path / "in", {name: widerface_sample / "val/images" / name for name in reference})
    out = tmp_path / "out"
    code, _, _ = run_main(["--weights", mobilenet_weights, "--inference_dir", folder,
                           "--inference_save_folder", out, "--confidence_threshold", "0.02",
                           "--nms_threshold", "0.4"], capsys)
    assert code == config.EXIT_OK
    ours = json.loads((out / "detections.json").read_text())
    assert sorted(ours) == sorted(reference)
    for name, rows in reference.items():
        assert sum(r[4] >= 0.5 for r in rows) > 0
        assert_matching(ours[name], [(r[:4], r[4], r[5:]) for r in rows])
        assert min(d["score"] for d in ours[name]) > 0.02


def test_same_size_and_padded_batching_match_single_images(widerface_sample, mobilenet_weights, tmp_path, capsys,
                                                           monkeypatch):
    from models.detector import FaceDetector

    passes = []
    original = FaceDetector._launch
    monkeypatch.setattr(FaceDetector, "_launch",
                        lambda self, images, scales: passes.append(len(images)) or original(self, images, scales))
    image = cv2.imread(str(widerface_sample / "val/images" / GREETING))
    folder = tmp_path / "in"
    for name, scale in (("a/x.jpg", 0.5), ("a/y.jpg", 0.5), ("b/z.jpg", 0.5), ("b/w.jpg", 0.4)):  # w: another size
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    results, forward_passes = {}, {}
    # one per image; same-size pairs; the four (two sizes) in one exactly padded pass, with or without grouping
    for setting in (("--infer_imsize_same", "false", "--batch_size", "1"),
                    ("--infer_imsize_same", "true", "--batch_size", "2"),
                    ("--pad_to", "512", "--batch_size", "4"),
                    ("--infer_imsize_same", "true", "--pad_to", "512", "--batch_size", "4")):
        out = tmp_path / f"out_{len(results)}"
        passes.clear()
        code, _, _ = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder",
                               out, *setting, "--workers", "1"], capsys)
        assert code == config.EXIT_OK
        results[setting] = json.loads((out / "detections.json").read_text())
        forward_passes[setting] = sorted(passes)
    single, *batched = results
    assert list(forward_passes.values()) == [[1, 1, 1, 1], [1, 1, 2], [4], [4]]
    assert list(results[batched[0]]) == ["a/x.jpg", "a/y.jpg", "b/w.jpg", "b/z.jpg"]
    for name, faces in results[single].items():
        assert len(faces) > 0
        for setting in batched:
            assert_matching(results[setting][name], [(f["box"], f["score"], f["landmarks"]) for f in faces],
                            min_score=0.0, iou=0.999, score_tol=1e-3, px=0.1)


# ------------------------------------------------------------------------------------------
# Mask stage
# ------------------------------------------------------------------------------------------

def test_masks_on_rgba_portraits(sample_mask_images, mobilenet_weights, tmp_path, capsys):
    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    out = tmp_path / "masks_out"
    args = argparse.Namespace(weights=str(mobilenet_weights), inference_dir=str(sample_mask_images),
                              inference_save_folder=str(out), mask=True, save_mask=True)
    result_bboxes, face_bboxes, face_masks, head_bboxes, head_masks = inference.inference(args)
    capsys.readouterr()
    images = sorted(sample_mask_images.glob("*.png"))
    assert len(result_bboxes) == len(face_bboxes) == len(face_masks) == len(head_bboxes) == len(head_masks) == len(images)
    faces = 0
    for path, boxes, fboxes, fmasks, hboxes, hmasks in zip(images, result_bboxes, face_bboxes, face_masks,
                                                           head_bboxes, head_masks):
        height, width = cv2.imread(str(path)).shape[:2]
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(fboxes) == len(fmasks) >= 1
        for k, (fbox, fmask, hbox, hmask) in enumerate(zip(fboxes, fmasks, hboxes, hmasks)):
            faces += 1
            hx1, hy1, hx2, hy2 = hbox
            assert 0 <= hx1 < hx2 <= width and 0 <= hy1 < hy2 <= height
            assert hmask.shape == (hy2 - hy1, hx2 - hx1, 3) and hmask.dtype == np.uint8
            fx1, fy1, fx2, fy2 = fbox
            assert fmask.shape == (fy2 - fy1, fx2 - fx1, 3)
            assert np.array_equal(fmask, hmask[fy1:fy2, fx1:fx2])
            stem = f"{path.stem}_{k}"
            saved = {kind: cv2.imread(str(out / kind / f"{stem}{ext}"), cv2.IMREAD_UNCHANGED)
                     for kind, ext in (("masks", ".png"), ("faces", ".png"), ("heads", ".png"), ("head_masks", ".png"))}
            assert all(image is not None for image in saved.values()), stem
            assert saved["masks"].ndim == 2 and saved["masks"].shape == saved["faces"].shape[:2]
            assert saved["head_masks"].ndim == 2 and saved["head_masks"].shape == saved["heads"].shape[:2]
            assert saved["heads"].shape[:2] == (hy2 - hy1, hx2 - hx1)
            for kind in ("masks", "head_masks"):
                assert set(np.unique(saved[kind])) <= {0, 255}
                assert saved[kind].max() == 255, f"{kind}/{stem}.png is empty"
            assert np.array_equal(saved["masks"], fmask[:, :, 0])
    assert faces >= len(images)


def test_native_stderr_filter_drops_only_the_harmless_lines(capfd):
    harmless = fm.MEDIAPIPE_START_UP_LINES
    with pytest.raises(RuntimeError, match="inside"):
        with fm.native_stderr_filtered(harmless):
            os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
            print("from python", file=sys.stderr)
            os.write(2, b"E0000 a native error\n")
            raise RuntimeError("inside")
    os.write(2, b"after the block\n")
    err = capfd.readouterr().err
    assert "XNNPACK" not in err
    assert err.splitlines() == ["from python", "E0000 a native error", "after the block"]


def test_captured_native_stderr_nests_and_starts_empty_after_an_error(capfd):
    from utils.native_stderr import captured_native_stderr

    with captured_native_stderr() as outer:
        os.write(2, b"outer 1\n")
        with captured_native_stderr() as inner:
            os.write(2, b"inner\n")
        os.write(2, b"outer 2\n")
    assert outer == ["outer 1", "outer 2"] and inner == ["inner"]
    with pytest.raises(RuntimeError):
        with captured_native_stderr() as failed:
            os.write(2, b"before the error\n")
            raise RuntimeError("inside")
    with captured_native_stderr() as after:
        pass
    assert failed == ["before the error"] and after == []
    assert capfd.readouterr().err == ""


def test_captured_native_stderr_from_several_threads_keeps_each_threads_lines_and_restores_stderr(capfd):
    """Captures in two threads at once (e.g. a user decoding with read_complete_image in a thread
    pool) take turns: each gets only its own lines, and file descriptor 2 is restored afterwards
    (interleaved redirections would leave it pointing at a capture file for good)."""
    import threading
    import time

    from utils.native_stderr import captured_native_stderr

    before = os.fstat(2)
    captured: dict[str, list[str]] = {"a": [], "b": []}

    def capture(name: str) -> None:
        for i in range(30):
            with captured_native_stderr() as lines:
                os.write(2, f"{name} {i}\n".encode())
                time.sleep(0.001)
            captured[name] += lines

    threads = [threading.Thread(target=capture, args=(name,)) for name in captured]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    for name, lines in captured.items():
        assert lines == [f"{name} {i}" for i in range(30)], name
    os.write(2, b"after the threads\n")
    assert capfd.readouterr().err == "after the threads\n"


def test_mask_stage_start_up_writes_nothing_to_stderr():
    """MediaPipe's native start-up lines (written by a graph's first run, below Python) are filtered
    out; a fresh process, since some of them come once per process."""
    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    script = ("import numpy as np; from utils.face_mask import HeadSegmenter, SegmenterPool\n"
              "with HeadSegmenter() as segmenter:\n"
              "    mask = segmenter.segment(np.full((64, 48, 3), 128, np.uint8))\n"
              "with SegmenterPool(2) as pool:  # more graphs, run on threads of their own\n"
              "    masks = pool.segment_all([np.full((32, 40, 3), 128, np.uint8)] * 3)\n"
              "print(mask.shape, [m.shape for m in masks])\n")
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "(64, 48) [(32, 40), (32, 40), (32, 40)]"
    assert completed.stderr == ""


def test_a_mask_does_not_depend_on_the_images_segmented_before_it(sample_mask_images, photos_dir):
    """What makes the blank first pass of HeadSegmenter harmless: no state from frame to frame."""
    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    paths = sorted(sample_mask_images.glob("*.png"))[:2] + sorted(photos_dir.glob("*"))[:1]
    images = [cv2.imread(str(path)) for path in paths]
    with fm.HeadSegmenter() as forward, fm.HeadSegmenter() as backward:
        in_order = [forward.probabilities(image) for image in images]
        reversed_order = [backward.probabilities(image) for image in images[::-1]][::-1]
    for first, second in zip(in_order, reversed_order):
        assert first.shape == second.shape and first.max() > 0.5
        assert np.array_equal(first, second)


def test_segmenter_pool_gives_one_graphs_masks_on_several_threads(photos_dir, mobilenet_weights, monkeypatch):
    """The mask stage's SegmenterPool shares an image's head crops out between its graphs: the masks
    and boxes equal those of one HeadSegmenter, in the faces' order, and more than one thread
    segmented them."""
    import threading

    from models.detector import FaceDetector

    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    detector = FaceDetector(str(mobilenet_weights), device="cpu", confidence_threshold=0.5)
    images = [cv2.imread(str(path)) for path in sorted(photos_dir.glob("*"))[:3]]
    detections = [detector.detect_batch([image])[0] for image in images]
    assert sum(len(found) for found in detections) >= 10
    threads = set()
    segment = fm.HeadSegmenter.segment

    def recorded(self, image):
        threads.add(threading.current_thread().name)
        return segment(self, image)

    with fm.HeadSegmenter() as one:
        expected = [fm.masks_of_faces(image, found.boxes, one) for image, found in zip(images, detections)]
        # from Python: the image's Detections and its path (or a float image) work as boxes and arrays do
        path = sorted(photos_dir.glob("*"))[0]
        for image, boxes in ((path, detections[0]), (images[0].astype(np.float32) / 255, detections[0].boxes)):
            again = fm.masks_of_faces(image, boxes, one)
            assert [p["head_box"] for p in again] == [p["head_box"] for p in expected[0]]
            assert all(np.array_equal(a["head_mask"], b["head_mask"]) for a, b in zip(again, expected[0]))
    monkeypatch.setattr(fm.HeadSegmenter, "segment", recorded)
    with fm.SegmenterPool(3) as pool:
        assert pool.threads == 3 and fm.masks_of_faces(images[0], np.zeros((0, 4)), pool) == []
        for image, found, want in zip(images, detections, expected):
            got = fm.masks_of_faces(image, found.boxes, pool)
            assert len(got) == len(want) == len(found)
            for parts, reference in zip(got, want):
                assert parts["head_box"] == reference["head_box"] and parts["face_box"] == reference["face_box"]
                assert np.array_equal(parts["head_mask"], reference["head_mask"])
                assert np.array_equal(parts["face_mask"], reference["face_mask"])
    assert len([name for name in threads if name.startswith("mask")]) >= 2, threads
    with pytest.raises(RuntimeError, match="closed"):
        pool.segment_all([images[0]])


def test_mask_stage_segments_several_images_at_once_with_one_graphs_masks(sample_mask_images, mobilenet_weights,
                                                                          tmp_path, monkeypatch):
    """On the CPU each image's masks are finished before the next image; overlapping the network
    (as on CUDA), two of the portraits' head crops (one face each) are segmented at once: images
    are handed to the pool while earlier ones are still being segmented. The
    masks equal one graph's on each image alone; a segmentation error stops the run, naming the image."""
    import threading
    import time

    from models.detector import FaceDetector

    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    paths = sorted(sample_mask_images.glob("*.png"))
    detector = FaceDetector(str(mobilenet_weights), device="cpu")
    with fm.HeadSegmenter() as one:
        expected = {}
        for path in paths:
            image = cv2.imread(str(path))
            expected[path.name] = fm.masks_of_faces(image, detector.detect(image).boxes, one)
    segment, lock = fm.HeadSegmenter.segment, threading.Lock()
    running, most = [0], [0]

    def recorded(self, image):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # longer than the network's pass over a portrait: the next image arrives meanwhile
        try:
            return segment(self, image)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(fm, "mask_threads", lambda: 2)
    monkeypatch.setattr(fm.HeadSegmenter, "segment", recorded)
    args = argparse.Namespace(weights=str(mobilenet_weights), inference_dir=str(sample_mask_images),
                              inference_save_folder=str(tmp_path / "cpu"), mask=True, save_mask=False, workers=0)
    assert len(iu.run_inference(args, progress=False).results) == len(paths)
    assert most[0] == 1  # on the CPU each image's masks are waited for
    monkeypatch.setattr(iu, "masks_overlap_network", lambda device: True)  # as on CUDA
    args.inference_save_folder = str(tmp_path / "overlapped")
    run = iu.run_inference(args, progress=False)
    assert len(run.results) == len(paths) and most[0] == 2  # two images' crops segmented at once
    for result in run.results:
        want = expected[result.name]
        assert len(result.masks) == len(want) >= 1
        for got, reference in zip(result.masks, want):
            assert got.head_box == reference["head_box"] and np.array_equal(got.head_mask, reference["head_mask"])
            assert np.array_equal(got.face_mask, reference["face_mask"])

    def failing(self, image):
        raise RuntimeError("segmentation failed")

    monkeypatch.setattr(fm.HeadSegmenter, "segment", failing)
    for overlap in (True, False):
        monkeypatch.setattr(iu, "masks_overlap_network", lambda device, overlap=overlap: overlap)
        args.inference_save_folder = str(tmp_path / f"failed_{overlap}")
        with pytest.raises(RuntimeError, match=f"mask stage failed on {paths[0].name}: segmentation failed"):
            iu.run_inference(args, progress=False)
        summary = json.loads((tmp_path / f"failed_{overlap}" / iu.SUMMARY_JSON).read_text())
        assert summary["error"].startswith("RuntimeError: mask stage failed on ") and summary["processed"] == 0


def test_interrupted_mask_stage_keeps_the_finished_images_and_waits_for_no_other(sample_mask_images,
                                                                                mobilenet_weights, tmp_path,
                                                                                monkeypatch):
    """Ctrl-C while images wait for their masks (overlapping the network, as on CUDA): the run
    ends at once as interrupted, the images finished before are kept and summary.json is written;
    the queued images are given up, their crops not segmented."""
    import threading
    import time

    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    segment, calls, lock = fm.HeadSegmenter.segment, [0], threading.Lock()

    def interrupted_third(self, image):
        with lock:
            calls[0] += 1
            call = calls[0]
        if call == 3:
            raise KeyboardInterrupt
        if call > 3:
            time.sleep(0.2)
        return segment(self, image)

    monkeypatch.setattr(fm, "mask_threads", lambda: 1)
    monkeypatch.setattr(iu, "masks_overlap_network", lambda device: True)
    monkeypatch.setattr(fm.HeadSegmenter, "segment", interrupted_third)
    args = argparse.Namespace(weights=str(mobilenet_weights), inference_dir=str(sample_mask_images),
                              inference_save_folder=str(tmp_path / "out"), mask=True, save_mask=False, workers=0)
    run = iu.run_inference(args, progress=False)
    summary = json.loads((tmp_path / "out" / iu.SUMMARY_JSON).read_text())
    assert run.summary.interrupted and summary["interrupted"] and summary["processed"] == 2
    assert [len(result.masks) for result in run.results] == [1, 1]
    assert calls[0] < 10  # the images queued behind the interrupted one were not all segmented


def test_crop_names_stay_unique_when_images_share_a_stem():
    names = ["face.jpg", "face.png", "face_jpg.png", "x/a.jpg", "a.jpg"]
    stems = iu.crop_stems(names)
    assert stems == {"face.jpg": "face_jpg_2", "face.png": "face_png", "face_jpg.png": "face_jpg",
                     "x/a.jpg": "x/a", "a.jpg": "a"}


def test_crop_names_of_very_long_file_names_fit_a_file_name():
    """A 251-byte name would give 255+ byte crop names (``<stem>_<i>.jpg``), which no file system takes."""
    long_ascii, long_utf8 = "y" * 251 + ".jpg", "\u00e9" * 126 + ".png"   # 255 and 256 bytes
    names = [f"d/{long_ascii}", long_utf8, "y" * 251 + ".png", "short.jpg"]
    stems = iu.crop_stems(names)
    assert stems["short.jpg"] == "short"
    cut = [stems[name] for name in names[:3]]
    assert cut[0].startswith("d/y") and len(set(cut)) == 3
    for stem in cut:
        last = stem.rpartition("/")[2]
        assert len(os.fsencode(last + "_9999.jpeg")) <= 255, last
        assert len(os.fsencode(last)) >= 255 - 16 - 1  # cut only as far as needed (a 2-byte character may not fit)


def test_head_box_scaling_and_clipping():
    assert fm.head_box((40, 40, 60, 60), (200, 200)) == (10, 10, 90, 90)
    assert fm.head_box((0, 0, 20, 20), (100, 100)) == (0, 0, 50, 50)
    assert fm.head_box((85, 90, 100, 100), (100, 100)) == (62, 75, 100, 100)
    assert fm.head_box((-5, -5, 15, 15), (100, 120)) == (0, 0, 45, 45)
    assert fm.head_box((10.5, 10.5, 10.5, 10.5), (50, 50)) == (10, 10, 11, 11)  # never empty
    rng = np.random.default_rng(0)
    for _ in range(200):  # the head box always contains the face's pixels
        h, w = rng.integers(1, 300, size=2)
        x1, y1 = rng.uniform(-20, w), rng.uniform(-20, h)
        box = (x1, y1, x1 + rng.uniform(0, 80), y1 + rng.uniform(0, 80))
        head = fm.head_box(box, (h, w))
        face = fm.pixel_box(box, (h, w))
        assert 0 <= head[0] <= face[0] < face[2] <= head[2] <= w
        assert 0 <= head[1] <= face[1] < face[3] <= head[3] <= h


@pytest.mark.parametrize("face_box, image_shape", [
    ((0, 0, 20, 20), (100, 100)),         # top-left corner: head clipped left and top
    ((85, 90, 100, 100), (100, 100)),     # bottom-right corner
    ((-6.5, 30.2, 14.7, 52.9), (80, 60)),  # partly outside on the left
    ((40, 40, 60, 60), (200, 200)),       # centred: no clipping
])
def test_face_mask_cut_at_the_real_offset(face_box, image_shape):
    head = fm.head_box(face_box, image_shape)
    hx1, hy1, hx2, hy2 = head
    image_mask = np.arange(image_shape[0] * image_shape[1], dtype=np.int64).reshape(image_shape)
    head_mask = image_mask[hy1:hy2, hx1:hx2]  # a "segmentation" whose values encode the position
    face = fm.face_mask_from_head_mask(head_mask, face_box, head)
    x1, y1, x2, y2 = fm.pixel_box(face_box, image_shape)
    assert np.array_equal(face, image_mask[y1:y2, x1:x2])
    fx1, fy1, fx2, fy2 = fm.face_box_in_head(face_box, head)
    assert (fx1 + hx1, fy1 + hy1, fx2 + hx1, fy2 + hy1) == (x1, y1, x2, y2)
    with pytest.raises(ValueError):
        fm.face_mask_from_head_mask(head_mask[1:], face_box, head)


def test_corner_face_is_not_assumed_centred():
    """The original code cut the centre of the head crop; at a border that is the wrong place."""
    head_mask = np.zeros((50, 50), np.uint8)
    head_mask[0:20, 0:20] = 255  # the face region of a face box (0, 0, 20, 20) in a 100x100 image
    head = fm.head_box((0, 0, 20, 20), (100, 100))
    assert head == (0, 0, 50, 50)
    face = fm.face_mask_from_head_mask(head_mask, (0, 0, 20, 20), head)
    assert face.shape == (20, 20) and (face == 255).all()  # a centred cut, [15:35, 15:35], would be mostly empty


def test_face_mask_cut_when_the_head_box_starts_at_different_x_and_y():
    """A face near the top of a wide image: its head box is clipped at the top only (hy1 = 0,
    hx1 > 0), so the face's offset inside the head crop differs in x and y."""
    image_shape = (200, 300)
    face_box = (140.3, 40.6, 170.2, 70.5)
    head = fm.head_box(face_box, image_shape)
    hx1, hy1, hx2, hy2 = head
    assert hy1 == 0 and hx1 > 50 and hy2 > 71
    image_mask = np.arange(image_shape[0] * image_shape[1], dtype=np.int64).reshape(image_shape)
    face = fm.face_mask_from_head_mask(image_mask[hy1:hy2, hx1:hx2], face_box, head)
    assert np.array_equal(face, image_mask[40:71, 140:171])  # floor / ceil of the face box
    assert fm.face_box_in_head(face_box, head) == (140 - hx1, 40 - hy1, 171 - hx1, 71 - hy1)


def test_pixel_box_of_a_box_at_or_past_the_far_edges_is_the_last_pixel():
    """pixel_box is never empty and lies inside the image, also for a box that starts on or
    beyond the right or bottom border: it shrinks to the last column / row."""
    image = np.arange(100 * 120).reshape(100, 120)
    for box, expected in [((120.0, 10.0, 130.0, 20.0), (119, 10, 120, 20)),
                          ((150.5, 110.2, 170.0, 130.0), (119, 99, 120, 100)),
                          ((5.0, 100.0, 15.0, 100.0), (5, 99, 15, 100))]:
        x1, y1, x2, y2 = fm.pixel_box(box, image.shape)
        assert (x1, y1, x2, y2) == expected, box
        assert image[y1:y2, x1:x2].size > 0


def test_binarize_threshold():
    assert fm.binarize(np.array([[0.0, 0.1, 0.11, 1.0]], np.float32)).tolist() == [[0, 0, 255, 255]]


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------

@pytest.fixture()
def mixed_folder(widerface_sample, tmp_path) -> Path:
    folder = tmp_path / "mixed"
    (folder / "sub" / "deeper").mkdir(parents=True)
    original = cv2.imread(str(widerface_sample / "val/images" / GREETING))
    cv2.imwrite(str(folder / "good.jpg"), cv2.resize(original, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    image = cv2.imread(str(folder / "good.jpg"))  # the same pixels in every format below
    (folder / "zero.jpg").write_bytes(b"")
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "damaged.jpg").write_bytes(data[: len(data) // 2] + b"\xff\xd9")  # end marker appended
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image extension\n")
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "sub" / "deep16.png"), image.astype(np.uint16) * 257)
    rgba = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 128
    cv2.imwrite(str(folder / "sub" / "rgba.png"), rgba)
    cv2.imwrite(str(folder / "tiny.bmp"), np.full((1, 1, 3), 200, np.uint8))
    (folder / "sub" / "deeper" / "UPPER.JPG").write_bytes(data)
    return folder


def test_mixed_folder_skips_bad_files(mixed_folder, mobilenet_weights, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_main(["--weights", mobilenet_weights, "--inference_dir", mixed_folder,
                                  "--inference_save_folder", out, "--save_img", "true"], capsys)
    assert code == iu.EXIT_SKIPPED == 3
    good = ["gray.png", "good.jpg", "sub/deep16.png", "sub/deeper/UPPER.JPG", "sub/rgba.png", "tiny.bmp"]
    bad = {"zero.jpg": "empty", "truncated.jpg": "truncated", "text.png": "not a readable image",
           "damaged.jpg": "corrupt JPEG data"}
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(detections) == sorted(good)
    reference = detections["good.jpg"]
    assert len(reference) >= 3 and detections["tiny.bmp"] == []
    for name in ("sub/deeper/UPPER.JPG", "sub/rgba.png", "sub/deep16.png"):
        assert detections[name] == reference  # same pixels: 16-bit reduced, alpha dropped
    assert len(detections["gray.png"]) >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 3 and summary["processed"] == len(good)
    assert {s["file"] for s in summary["skipped"]} == set(bad)
    for entry in summary["skipped"]:
        assert bad[entry["file"]] in entry["reason"]
        assert f"skipped {entry['file']}" in stdout and f"skipped {entry['file']}" in err
    assert "Traceback" not in err
    for name in good:
        assert (out / "result_images" / name).is_file()


def test_a_folder_of_unreadable_files_only_fails_with_one_line(mobilenet_weights, tmp_path, capsys):
    """Nothing processed is not a partial success (3): status 1, one error line naming a file,
    each file still listed in the summary."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "text.png").write_text("not an image")
    (folder / "zero.jpg").write_bytes(b"")
    out = tmp_path / "out"
    code, stdout, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder,
                                  "--inference_save_folder", out], capsys)
    assert code == iu.EXIT_ERROR == 1
    assert err.strip().splitlines()[-1].startswith(
        "inference.py: error: none of the 2 files found could be processed (e.g. text.png: ")
    assert "images: 0 done, 2 skipped of 2" in stdout and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["error"].startswith("none of the 2 files found could be processed")
    assert {s["file"] for s in summary["skipped"]} == {"text.png", "zero.jpg"}
    # the Python entry point fails as the command line does (it returned five empty lists)
    with pytest.raises(iu.InferenceError, match="none of the 2 files found could be processed"):
        inference.inference({"weights": mobilenet_weights, "inference_dir": folder,
                             "inference_save_folder": tmp_path / "out2"})


def test_drawing_takes_boxes_far_outside_the_image_and_non_finite_ones():
    """A barely trained model's boxes can lie billions of pixels away (beyond OpenCV's int32 points)
    or be NaN: --save_img draws what lies inside the image, as it would for the same box ending
    just outside it, and does not fail."""
    from models.detector import Detections

    image = np.full((120, 160, 3), 90, np.uint8)

    def drawn(boxes, landmarks):
        count = len(boxes)
        return iu.draw_detections(image, Detections(np.array(boxes, np.float32), np.full(count, 0.9, np.float32),
                                                    np.array(landmarks, np.float32).reshape(count, 5, 2)))

    far = drawn([[-3e9, 20, 50, 6.5e9], [40, 30, 90, 80]], [[-1e10] * 10, [50, 40] * 5])
    near = drawn([[-30, 20, 50, 150], [40, 30, 90, 80]], [[-30] * 10, [50, 40] * 5])
    assert np.array_equal(far, near) and not np.array_equal(far, image)
    broken = drawn([[np.nan, np.inf, -np.inf, 10]], [[np.nan] * 10])
    assert broken.shape == image.shape


def test_channels_last_option_reaches_the_detector(widerface_sample, mobilenet_weights, tmp_path, capsys,
                                                   detector_layouts):
    folder = tmp_path / "in"
    _small_face_image(widerface_sample, folder / "a.jpg")
    results = {}
    for value in ("true", "false", None):  # None: the default, auto (NHWC on the CPU)
        out = tmp_path / str(value)
        layout = ["--channels_last", value] if value else []
        code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder,
                                 "--inference_save_folder", out, *layout], capsys)
        assert code == 0, err
        results[value] = json.loads((out / "detections.json").read_text())["a.jpg"]
    assert detector_layouts == [True, False, True]
    assert len(results["true"]) == len(results["false"]) >= 1
    for nhwc, nchw in zip(results["true"], results["false"]):
        assert np.allclose(nhwc["box"], nchw["box"], atol=0.05) and abs(nhwc["score"] - nchw["score"]) < 1e-4


def test_too_many_pixels_are_downscaled(widerface_sample, mobilenet_weights, tmp_path, capsys):
    images = widerface_sample / "val/images"
    folder = link_images(tmp_path / "in", {"big.jpg": images / GREETING})
    full = tmp_path / "full"
    small = tmp_path / "small"
    height, width = cv2.imread(str(images / GREETING)).shape[:2]
    assert run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", full,
                     "--workers", "0"], capsys)[0] == 0
    code, stdout, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder,
                                  "--inference_save_folder", small, "--workers", "0",
                                  "--max_pixels", str(height * width // 2)], capsys)
    assert code == config.EXIT_OK and "more than" in err and "more than" in stdout
    assert "--max_pixels 0 turns this off" in err and "--max_size" not in err
    faces = json.loads((small / "detections.json").read_text())["big.jpg"]
    reference = json.loads((full / "detections.json").read_text())["big.jpg"]
    assert len(faces) >= 3
    big = [f for f in reference if (f["box"][2] - f["box"][0]) > 40]
    assert big
    for face in big:  # large faces are found again, in original-image coordinates
        assert max(box_iou(face["box"], f["box"]) for f in faces) > 0.8


def test_truncation_checks(widerface_sample, tmp_path):
    data = (widerface_sample / "val/images" / GREETING).read_bytes()
    assert image_loader.jpeg_is_complete(data)
    assert image_loader.jpeg_is_complete(data + b"\x00" * 100 + b"trailing video data")
    assert not image_loader.jpeg_is_complete(data[:-2])
    assert not image_loader.jpeg_is_complete(data[: len(data) // 3])
    assert image_loader.truncation_reason(data[:-2]) == "truncated JPEG (no end-of-image marker)"
    garbage = b"\xff\xd8" + bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)) + b"\xff\xd9"
    assert image_loader.truncation_reason(garbage).startswith("corrupt JPEG")
    assert image_loader.truncation_reason(data) is None
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    assert image_loader.png_is_complete(png.read_bytes()) and image_loader.truncation_reason(png.read_bytes()) is None
    png.write_bytes(png.read_bytes()[:-12])
    assert not image_loader.png_is_complete(png.read_bytes())
    assert image_loader.truncation_reason(png.read_bytes()) == "truncated PNG (no IEND chunk)"


def test_damaged_jpeg_data_is_refused_and_harmless_warnings_name_the_file(widerface_sample, tmp_path, capfd):
    """A JPEG whose segments reach the end marker but whose scan data stops short (cut, with the
    marker appended) decodes in OpenCV with grey fill and only a libjpeg warning on stderr: it is
    refused naming the warning. Another warning (extraneous bytes before the end marker) keeps the
    image and is passed on naming the file."""
    data = (widerface_sample / "val/images" / GREETING).read_bytes()
    damaged = data[: len(data) // 2] + b"\xff\xd9"
    path = tmp_path / "cut.jpg"
    path.write_bytes(damaged)
    assert image_loader.truncation_reason(damaged) is None  # the segments look whole
    with pytest.raises(ImageReadError, match=rf"^{re.escape(str(path))}: corrupt JPEG data \(libjpeg: Corrupt JPEG "
                                             r"data: premature end of data segment; the rest would be grey\)$"):
        image_loader.read_complete_image(path)
    capfd.readouterr()
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    encoded = cv2.imencode(".jpg", noise)[1].tobytes()
    extra = tmp_path / "extra.jpg"
    extra.write_bytes(encoded[:-2] + b"\x5a" * 64 + b"\xff\xd9")  # bytes after the scan data, before the end marker
    np.testing.assert_array_equal(image_loader.read_complete_image(extra),
                                  cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR))
    assert re.fullmatch(rf"warning: {re.escape(str(extra))}: Corrupt JPEG data: \d+ extraneous bytes before marker "
                        r"0xd9\n", capfd.readouterr().err)
    odd = tmp_path / "two\nlines.jpg"  # the warning stays one line, the name escaped as in the results files
    odd.write_bytes(extra.read_bytes())
    image_loader.read_complete_image(odd)
    assert re.fullmatch(rf"warning: {re.escape(escape_name(str(odd)))}: Corrupt JPEG data: \d+ extraneous bytes "
                        r"before marker 0xd9\n", capfd.readouterr().err)


def test_image_loader_workers_ignore_ctrl_c_and_deliver_every_image(widerface_sample, tmp_path):
    """Ctrl-C reaches the DataLoader workers too (one process group): they ignore it, so the main
    process decides (inference.py stops at once, and the loader's shutdown does not wait on
    workers that stopped with images in their queue)."""
    import multiprocessing
    import signal
    import time

    files = sorted((widerface_sample / "val/images").glob("*/*.jpg"))[:4]
    loader = image_loader.make_loader(image_loader.ImageFolderDataset(files), batch_size=1, workers=1)
    batches = image_loader.start_loader(loader)
    names = [record.path for record in next(batches)]
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    names += [record.path for batch in batches for record in batch]
    assert names == [str(f) for f in files]


@pytest.mark.parametrize("argv,status", [(["--help"], 0), (["--inference_dir", "x", "--batch_size", "0"], 2),
                                         (["--inference_dir", "/nonexistent/photos"], 1)],
                         ids=["help", "bad_option", "missing_input"])
def test_help_and_option_errors_answer_without_importing_torch(argv, status):
    """Fail fast: the options, and that the input exists, are checked before the detector's modules (torch) are
    imported (seconds on a small machine)."""
    program = ("import sys, inference; status = inference.main(sys.argv[1:]); "
               "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", program, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no torch", done.stdout


def test_output_folders_of_earlier_runs_inside_the_input_are_not_searched(widerface_sample, mobilenet_weights, tmp_path,
                                                                          capsys):
    folder = tmp_path / "photos"
    _small_face_image(widerface_sample, folder / "a.jpg")
    first = ["--weights", mobilenet_weights, "--inference_dir", folder, "--save_img", "true", "--workers", 0]
    assert run_main([*first, "--inference_save_folder", folder / "out_v1"], capsys)[0] == 0
    assert (folder / "out_v1" / "result_images" / "a.jpg").is_file()
    code, stdout, err = run_main([*first, "--inference_save_folder", folder / "out_v2"], capsys)
    assert code == 0, err
    assert list(json.loads((folder / "out_v2" / "detections.json").read_text())) == ["a.jpg"]
    summary = json.loads((folder / "out_v2" / "summary.json").read_text())
    assert summary["notes"] == [{"file": "out_v1/", "note": iu.EARLIER_RESULTS_NOTE}]
    assert f"out_v1/: {iu.EARLIER_RESULTS_NOTE}" in err


def test_find_images_recursive_any_case(tmp_path):
    for name in ("a.JPG", "b.jpeg", "c.Png", "d.bmp", "e.WEBP", "f.txt", "sub/g.jpg", "out/h.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [image_loader.relative_name(p, tmp_path) for p in image_loader.find_images(tmp_path, exclude=[tmp_path / "out"])]
    assert found == ["a.JPG", "b.jpeg", "c.Png", "d.bmp", "e.WEBP", "sub/g.jpg"]


def test_find_images_leaves_out_hidden_files_and_folders(tmp_path):
    """macOS resource forks (``._IMG_1.jpg``) are not images; thumbnail folders are not the user's photos."""
    root = tmp_path / ".photos"  # the input folder itself may be hidden
    for name in ("a.jpg", "._a.jpg", ".x.png", ".thumbnails/t.jpg", "sub/b.jpg", "sub/.cache/c.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    assert [image_loader.relative_name(p, root) for p in image_loader.find_images(root)] == ["a.jpg", "sub/b.jpg"]
    assert image_loader.find_images(root / "._a.jpg") == [root / "._a.jpg"]  # named: taken


def test_find_images_follows_linked_folders_and_notes_loops(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    for name in ("elsewhere/b.jpg", "in/a.jpg", "in/sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    root = tmp_path / "in"
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)  # would walk forever
    (root / "out").symlink_to(elsewhere, target_is_directory=True)  # excluded: the output folder
    unreadable: list[tuple[str, str]] = []
    loops: list[str] = []
    found = image_loader.find_images(root, exclude=[elsewhere / "never"], unreadable=unreadable, loops=loops)
    assert [image_loader.relative_name(p, root) for p in found] == [
        "a.jpg", "linked/b.jpg", "out/b.jpg", "sub/c.png"]
    # a loop loses no image (they are found where it leads back to): noted, not a skipped folder
    assert unreadable == [] and loops == ["sub/back/"]
    found = image_loader.find_images(root, exclude=[elsewhere])  # the output folder is skipped wherever it is linked
    assert [image_loader.relative_name(p, root) for p in found] == ["a.jpg", "sub/c.png"]


class _SilentBar:
    def update(self, n):
        pass

    def write(self, *a, **k):
        pass


def _one_face_each(images):
    from models.detector import Detections

    return [Detections(np.array([[10, 10, 20, 20]], np.float32), np.array([0.9], np.float32),
                       np.full((1, 5, 2), 15, np.float32)) for _ in images]


def _runner_on_blank_images(detector, tmp_path, names):
    """An inference main loop around ``detector`` and 300x300 records named ``names``."""
    args = argparse.Namespace(mask=False, save_mask=False, save_img=False, save_aligned=False)
    summary = iu.InferenceSummary(output_folder=str(tmp_path))
    runner = iu._Runner(args, detector, tmp_path, names, True, summary, _SilentBar())
    image = np.zeros((300, 300, 3), np.uint8)
    records = [image_loader.ImageRecord(index=i, name=n, path=n, image=image, net_image=image)
               for i, n in enumerate(names)]
    return runner, summary, records


def test_out_of_memory_retries_downscaled(tmp_path):
    class FakeDetector:
        device = None

        def detect_batch(self, images):
            if any(im.shape[0] * im.shape[1] > 100 * 100 for im in images):
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            return _one_face_each(images)

    runner, summary, records = _runner_on_blank_images(FakeDetector(), tmp_path, ["big.png"])
    runner.detect(records)
    result = runner.results[0]
    assert summary.processed == 1 and not summary.skipped and summary.notes
    assert np.allclose(result.detections.boxes, [[40, 40, 80, 80]])  # found at 1/4 scale, mapped back


def test_out_of_memory_once_retries_at_full_size_after_freeing(tmp_path):
    # a pass that failed for lack of memory (e.g. held by cached graphs) is retried at the same
    # size once memory is freed, outside the except block that kept the failed pass alive
    class FlakyDetector:
        device = None
        calls = []

        def detect_batch(self, images):
            self.calls.append(len(images))
            if len(self.calls) <= 2:  # the batch of 2, then the first single image
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return _one_face_each(images)

    detector = FlakyDetector()
    runner, summary, records = _runner_on_blank_images(detector, tmp_path, ["a.png", "b.png"])
    runner.detect(records)
    assert detector.calls == [2, 1, 1, 1]
    assert summary.processed == 2 and not summary.skipped and not summary.notes
    for index in (0, 1):
        assert np.allclose(runner.results[index].detections.boxes, [[10, 10, 20, 20]])  # full size


def test_one_batch_in_flight_and_a_post_processing_out_of_memory_reruns_that_batch(tmp_path):
    """The main loop queues batch n + 1 (``submit``) before it finishes batch n; a batch whose
    ``result()`` runs out of memory goes through ``detect`` and its fallbacks."""
    detector = QueueingDetector(_one_face_each, oom_result=2)
    runner, summary, records = _runner_on_blank_images(detector, tmp_path, ["a.png", "b.png", "c.png"])
    for record in records:
        runner.detect_queued([record])
        assert summary.processed == record.index  # the batch before it is finished, this one is in flight
    runner.finish_queued()
    assert detector.events == [("submit", 1), ("submit", 2), ("result", 1), ("submit", 3), ("result", 2),
                               ("detect_batch", 1), ("result", 3)]
    assert detector.releases == 1 and summary.processed == 3 and not summary.skipped
    assert all(np.allclose(runner.results[i].detections.boxes, [[10, 10, 20, 20]]) for i in range(3))


def test_ctrl_c_mid_run_writes_partial_results_and_exits_130(widerface_sample, mobilenet_weights, tmp_path,
                                                              monkeypatch, capsys, detection_fails_on_call):
    from models.detector import FaceDetector

    original = detection_fails_on_call(3, KeyboardInterrupt())
    folder = link_images(tmp_path / "in", {f"{i}.jpg": p for i, p in enumerate(
        sorted((widerface_sample / "val/images").rglob("*.jpg"))[:4])})
    out = tmp_path / "out"
    code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", out,
                             "--workers", "0", "--device", "cpu"], capsys)
    assert code == config.EXIT_INTERRUPTED and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 130 and summary["processed"] == 2
    assert list(json.loads((out / "detections.json").read_text())) == ["0.jpg", "1.jpg"]
    # a rerun into the same folder continues only with --exist_ok, and then rewrites every output
    code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", out,
                             "--workers", "0", "--device", "cpu"], capsys)
    assert code == config.EXIT_ERROR and "--exist_ok" in err
    monkeypatch.setattr(FaceDetector, "submit", original)
    code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", out,
                             "--workers", "0", "--device", "cpu", "--exist_ok", "true"], capsys)
    assert code == config.EXIT_OK, err
    assert list(json.loads((out / "detections.json").read_text())) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert json.loads((out / "summary.json").read_text())["interrupted"] is False


def test_sigterm_mid_run_writes_partial_results_and_exits_143(widerface_sample, mobilenet_weights, tmp_path,
                                                              detection_fails_on_call, capsys):
    """SIGTERM (a batch job's time limit, docker stop) ended the run without writing the results of the images done."""
    import signal

    detection_fails_on_call(3, signal.SIGTERM)
    folder = link_images(tmp_path / "in", {f"{i}.jpg": p for i, p in enumerate(
        sorted((widerface_sample / "val/images").rglob("*.jpg"))[:4])})
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    code, stdout, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder",
                                  out, "--workers", "0", "--device", "cpu"], capsys)
    assert code == 143 and "Traceback" not in err, err
    assert "images: 2 done, 0 skipped of 4; faces found: " in stdout and "  [terminated (SIGTERM)]" in stdout
    assert signal.getsignal(signal.SIGTERM) is before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 143 and summary["processed"] == 2
    assert list(json.loads((out / "detections.json").read_text())) == ["0.jpg", "1.jpg"]


@pytest.mark.parametrize("options,message", [
    ({"batch_sise": 4}, "unknown inference option(s): batch_sise (did you mean batch_size?)"),
    ({"confidence_threshold": 5.0}, "confidence_threshold=5.0: expected a number in [0, 1], got '5.0'"),
    ({"num_anchor": 4}, "num_anchor=4: expected one of 2, 3"),
    ({"weights": "a.pth", "model_weight": "best.pth"}, config.WEIGHTS_CONFLICT),
    ({"inference_dir": None}, config.NO_INFERENCE_INPUT),
], ids=["typo", "out_of_range", "choice", "conflict", "no_input"])
def test_python_api_checks_options_as_the_command_line_does(tmp_path, options, message):
    """A hand-made namespace gets the command line's checks: a misspelt option would otherwise be
    ignored silently and a value out of range would run."""
    args = argparse.Namespace(**{"inference_dir": str(tmp_path), **options})
    with pytest.raises(iu.InferenceError) as info:
        iu.run_inference(args, collect=False, progress=False)
    assert str(info.value) == message
    converted = iu.complete_args(argparse.Namespace(inference_dir=str(tmp_path), batch_size="4", channels_last="auto"))
    assert converted.batch_size == 4 and converted.channels_last is None  # strings converted as on the command line
    defaults = iu.complete_args(argparse.Namespace(inference_dir=str(tmp_path), batch_size=None,
                                                   confidence_threshold=None))
    assert defaults.batch_size == 1 and defaults.confidence_threshold == 0.5  # None: not given
    as_dict = iu.complete_args({"inference_dir": str(tmp_path), "batch_size": "4", "half": 1})
    assert as_dict.batch_size == 4 and as_dict.inference_dir == str(tmp_path) and as_dict.half is True
    with pytest.raises(iu.InferenceError, match="expected an argparse.Namespace or a dict of options, got list"):
        iu.complete_args([str(tmp_path)])


def test_unexpected_error_mid_run_keeps_outputs_and_reports_it(widerface_sample, mobilenet_weights, tmp_path,
                                                             detection_fails_on_call):
    # e.g. a CUDA error or a killed decoding worker: the error propagates (exit status 1), and
    # summary.json says so instead of claiming a clean run
    detection_fails_on_call(2, RuntimeError("CUDA error: an illegal memory access was encountered"))
    folder = link_images(tmp_path / "in", {f"{i}.jpg": p for i, p in enumerate(
        sorted((widerface_sample / "val/images").rglob("*.jpg"))[:3])})
    out = tmp_path / "out"
    # a hand-made namespace with a few options: run_inference gives the others their defaults
    args = argparse.Namespace(weights=str(mobilenet_weights), inference_dir=str(folder),
                              inference_save_folder=str(out), workers=0, device="cpu")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        iu.run_inference(args, collect=False, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 1 and "illegal memory access" in summary["error"]
    assert summary["processed"] == 1 and list(json.loads((out / "detections.json").read_text())) == ["0.jpg"]


def test_a_write_that_fails_after_the_last_image_still_leaves_the_results(widerface_sample, mobilenet_weights,
                                                                           tmp_path, capsys):
    # the drawn images are written on threads: with few images every write is still pending when
    # the loop ends, so the failure surfaces while closing; the results must be written all the same
    folder = link_images(tmp_path / "in", {f"sub/{i}.jpg": p for i, p in enumerate(
        sorted((widerface_sample / "val/images").rglob("*.jpg"))[:2])})
    out = tmp_path / "out"
    (out / "result_images").mkdir(parents=True)
    (out / "result_images" / "sub").write_text("a file where the folder for sub/ should be")
    code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", out,
                             "--workers", "0", "--device", "cpu", "--save_img", "true", "--exist_ok", "true"], capsys)
    assert code == config.EXIT_ERROR and "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "inference.py: error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("inference.py: error:"), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 1 and "result_images/sub" in summary["error"] and summary["processed"] == 2
    assert list(json.loads((out / "detections.json").read_text())) == ["sub/0.jpg", "sub/1.jpg"]


# ------------------------------------------------------------------------------------------
# Command-line errors: one clear line, non-zero exit, no traceback
# ------------------------------------------------------------------------------------------

def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(["--weights", "mobilenet0.25", "--inference_dir", tmp_path / "empty",
                             "--inference_save_folder", tmp_path / "out"], capsys)
    assert code == config.EXIT_ERROR and len(err.strip().splitlines()) == 1 and "no images" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes.txt").write_text("not an image")
    code, _, err = run_main(["--weights", "mobilenet0.25", "--inference_dir", tmp_path / "notes.txt",
                             "--inference_save_folder", tmp_path / "out"], capsys)
    assert code == config.EXIT_ERROR and err.strip() == (
        f"inference.py: error: --inference_dir {tmp_path / 'notes.txt'} is a file but not an image "
        "(jpg, jpeg, png, bmp, webp); give an image or a folder")


def test_missing_weights(sample_mask_images, tmp_path, capsys):
    code, _, err = run_main(["--weights", tmp_path / "nope.pth", "--inference_dir", sample_mask_images,
                             "--inference_save_folder", tmp_path / "out"], capsys)
    assert code == config.EXIT_ERROR and len(err.strip().splitlines()) == 1 and "not found" in err
    code, _, err = run_main(["--experiment_name", "no_such_experiment", "--model_weight", "best.pth",
                             "--inference_dir", sample_mask_images, "--inference_save_folder", tmp_path / "out"], capsys)
    assert code == config.EXIT_ERROR and len(err.strip().splitlines()) == 1 and "not found" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, expected_code", [("tpu", config.EXIT_USAGE), ("cuda:9", config.EXIT_ERROR)])
def test_unknown_device(device, expected_code, sample_mask_images, mobilenet_weights, tmp_path, capsys):
    code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", sample_mask_images,
                             "--inference_save_folder", tmp_path / "out", "--device", device], capsys)
    assert code == expected_code and len(err.strip().splitlines()) == 1 and "device" in err


def test_cli_error_without_traceback_in_subprocess(sample_mask_images, tmp_path):
    missing = tmp_path / "missing.pth"
    completed = subprocess.run(
        [sys.executable, "inference.py", "--weights", str(missing), "--inference_dir", str(sample_mask_images),
         "--inference_save_folder", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == config.EXIT_ERROR
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in completed.stderr
    assert lines[0].startswith("inference.py: error:") and str(missing) in lines[0]


def test_detector_runs_without_mediapipe(sample_mask_images, mobilenet_weights, tmp_path):
    """GPU machines have no mediapipe: detection must work and --mask must fail with one line."""
    image = sample_mask_images / "sideface_0003.png"
    script = (
        "import sys; sys.modules['mediapipe'] = None  # any 'import mediapipe' now raises ImportError\n"
        "import inference\n"
        f"common = ['--weights', {str(mobilenet_weights)!r}, '--inference_dir', {str(image)!r}, '--workers', '0']\n"
        f"masked = inference.main(common + ['--inference_save_folder', {str(tmp_path / 'a')!r}, '--mask', 'true'])\n"
        f"plain = inference.main(common + ['--inference_save_folder', {str(tmp_path / 'b')!r}])\n"
        "print('codes', masked, plain)\n")
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert f"codes {config.EXIT_ERROR} {config.EXIT_OK}" in completed.stdout, completed.stderr
    assert "Traceback" not in completed.stderr and "needs mediapipe" in completed.stderr
    assert len(json.loads((tmp_path / "b" / "detections.json").read_text())["sideface_0003.png"]) == 1


def test_background_writer_writes_everything_and_reports_a_failed_write(tmp_path):
    timings = {"write": 0.0}
    writer = iu.BackgroundWriter(timings, threads=2, max_pending=2)
    image = np.full((40, 60, 3), 77, np.uint8)
    for i in range(5):
        writer.write(tmp_path / "out" / f"{i}.png", lambda: image)
    writer.close()
    assert all((cv2.imread(str(tmp_path / "out" / f"{i}.png")) == 77).all() for i in range(5))
    assert timings["write"] > 0
    (tmp_path / "blocker").write_text("a file where a folder should be")
    writer = iu.BackgroundWriter(timings)
    writer.write(tmp_path / "blocker" / "x.png", lambda: image)
    with pytest.raises(OSError):
        writer.close()


# ------------------------------------------------------------------------------------------
# Output folder that cannot take files, unreadable folders, links, huge images, odd names
# ------------------------------------------------------------------------------------------

def permissions_enforced() -> bool:
    """Whether this process is refused a folder without permissions (not as root with
    CAP_DAC_OVERRIDE, e.g. in a container; ``setpriv --inh-caps=-dac_override,-dac_read_search
    --bounding-set=-dac_override,-dac_read_search`` runs the tests without it)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        locked = Path(scratch) / "locked"
        locked.mkdir(mode=0)
        try:
            os.listdir(locked)
            return False
        except PermissionError:
            return True
        finally:
            locked.chmod(0o700)


#: as root (CI's containers) these skip; the tests beside them refuse access by mocks and run everywhere
needs_enforced_permissions = pytest.mark.skipif(not permissions_enforced(),
                                                reason="folder permissions are not enforced (root)")


def _count_model_use(monkeypatch):
    """Counts of FaceDetector constructions and detect_batch calls (the real ones still run)."""
    from models.detector import FaceDetector

    counts = {"models": 0, "batches": 0}
    init, detect = FaceDetector.__init__, FaceDetector.detect_batch

    def counting_init(self, *args, **kwargs):
        counts["models"] += 1
        init(self, *args, **kwargs)

    def counting_detect(self, images):
        counts["batches"] += 1
        return detect(self, images)

    monkeypatch.setattr(FaceDetector, "__init__", counting_init)
    monkeypatch.setattr(FaceDetector, "detect_batch", counting_detect)
    return counts


def _small_face_image(widerface_sample, path: Path) -> Path:
    image = cv2.imread(str(widerface_sample / "val/images" / GREETING))
    path.parent.mkdir(parents=True, exist_ok=True)
    # encoded here and written by Python: cv2.imwrite takes no name that is not UTF-8
    path.write_bytes(cv2.imencode(path.suffix, cv2.resize(image, None, fx=0.3, fy=0.3,
                                                          interpolation=cv2.INTER_AREA))[1].tobytes())
    return path


@pytest.mark.parametrize("case", ["read_only_folder", "read_only_result_images", "cannot_create"])
def test_output_folder_that_cannot_take_files_stops_before_any_image(case, widerface_sample, mobilenet_weights,
                                                                    tmp_path, monkeypatch, capsys):
    """Results are written at the end of a run: a folder that cannot take files must stop it at the
    start (one line, exit 1), not after every image was processed. Writing is refused by failing
    the temporary-file creation in that folder, as a read-only mount or permissions do (as root,
    permissions cannot be tested for real)."""
    import errno
    import tempfile

    folder = tmp_path / "in"
    for i in range(2):
        _small_face_image(widerface_sample, folder / f"{i}.jpg")
    out = tmp_path / "out"
    argv = ["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", out,
            "--workers", "0", "--save_img", "true"]
    if case == "cannot_create":
        (tmp_path / "a_file").write_text("a file where a folder is needed")
        out = tmp_path / "a_file" / "out"
        argv[argv.index("--inference_save_folder") + 1] = out
        expected = f"cannot create output folder {out}: not a directory"
    else:
        refused = out if case == "read_only_folder" else out / "result_images"
        refused.mkdir(parents=True)
        if case == "read_only_result_images":  # an earlier run's images, written into again
            (refused / "old.jpg").write_bytes(b"earlier result")
            argv += ["--exist_ok", "true"]
        real_mkstemp = tempfile.mkstemp

        def read_only(*args, **kwargs):
            if Path(kwargs.get("dir") or ".") == refused:
                raise OSError(errno.EROFS, "Read-only file system", str(refused))
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
        expected = f"output folder {refused} is not writable: read-only file system"
    counts = _count_model_use(monkeypatch)
    code, stdout, err = run_main(argv, capsys)
    assert code == config.EXIT_ERROR and err.strip() == f"inference.py: error: {expected}", err
    assert counts == {"models": 0, "batches": 0}  # failed before the model was even loaded
    assert not (out / "summary.json").exists() and "Traceback" not in err


@needs_enforced_permissions
def test_output_folder_without_write_permission(widerface_sample, mobilenet_weights, tmp_path, capsys):
    folder = tmp_path / "in"
    _small_face_image(widerface_sample, folder / "a.jpg")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder,
                                 "--inference_save_folder", out, "--workers", "0"], capsys)
    finally:
        out.chmod(0o755)
    assert code == config.EXIT_ERROR and "is not writable: permission denied" in err
    assert len(err.strip().splitlines()) == 1


def test_refused_output_folder_leaves_no_empty_folder_when_the_model_cannot_load(widerface_sample, tmp_path, capsys):
    folder = tmp_path / "in"
    _small_face_image(widerface_sample, folder / "a.jpg")
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    code, _, err = run_main(["--weights", tmp_path / "notes.pth", "--inference_dir", folder,
                             "--inference_save_folder", tmp_path / "new" / "out", "--workers", "0"], capsys)
    assert code == config.EXIT_ERROR and "is not a PyTorch checkpoint file" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def _refuse_listing(monkeypatch, refused: Path):
    """``os.scandir`` (what os.walk lists folders with) fails with EACCES for ``refused``, as for
    a folder without read permission (root can read every folder, so it is simulated)."""
    import errno

    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == refused:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_subfolder_is_reported_as_skipped(widerface_sample, mobilenet_weights, tmp_path, monkeypatch,
                                                     capsys):
    folder = tmp_path / "in"
    _small_face_image(widerface_sample, folder / "ok" / "a.jpg")
    _small_face_image(widerface_sample, folder / "locked" / "b.jpg")
    _refuse_listing(monkeypatch, folder / "locked")
    out = tmp_path / "out"
    code, stdout, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder,
                                  "--inference_save_folder", out, "--workers", "0"], capsys)
    assert code == iu.EXIT_SKIPPED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [{"file": "locked/", "reason": "folder not readable: permission denied"}]
    assert summary["processed"] == 1 and summary["files"] == 2 and summary["exit_code"] == 3
    assert "skipped locked/: folder not readable: permission denied" in stdout
    assert "skipped locked/" in err and list(json.loads((out / "detections.json").read_text())) == ["ok/a.jpg"]


def test_unreadable_input_folder_is_permission_denied_not_no_images(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _refuse_listing(monkeypatch, folder)
    code, _, err = run_main(["--weights", "mobilenet0.25", "--inference_dir", folder,
                             "--inference_save_folder", tmp_path / "out"], capsys)
    assert code == config.EXIT_ERROR
    assert err.strip() == f"inference.py: error: cannot read input folder {folder}: permission denied"


@needs_enforced_permissions
def test_folder_without_read_permission_is_listed(tmp_path):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "locked").chmod(0)
    try:
        unreadable = []
        found = image_loader.find_images(tmp_path, unreadable=unreadable)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert found == [tmp_path / "b.jpg"]
    assert unreadable == [("locked/", "folder not readable: permission denied")]


def _png_claiming(width: int, height: int) -> bytes:
    """A complete PNG whose header announces width x height (OpenCV checks the size first)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


def test_links_and_huge_images_get_readable_reasons(tmp_path):
    (tmp_path / "loop_a.jpg").symlink_to("loop_b.jpg")
    (tmp_path / "loop_b.jpg").symlink_to("loop_a.jpg")
    (tmp_path / "dangling.jpg").symlink_to("gone.jpg")
    (tmp_path / "huge.png").write_bytes(_png_claiming(40000, 40000))  # 1.6e9 pixels > 2^30
    reasons = {}
    for index, path in enumerate(image_loader.find_images(tmp_path)):
        record = image_loader.load_record(index, path, path.name)
        assert not record.ok and record.image is None
        reasons[path.name] = record.error
    assert reasons["loop_a.jpg"] == reasons["loop_b.jpg"] == "symbolic link loop"
    assert reasons["dangling.jpg"] == "broken symbolic link (its target gone.jpg does not exist)"
    assert reasons["huge.png"].startswith("image too large to decode: over OpenCV's limit of ")
    assert "\n" not in reasons["huge.png"] and "Assertion failed" not in reasons["huge.png"]


@pytest.mark.parametrize("kind", ["missing", "dangling", "loop"])
def test_input_that_does_not_exist_says_input_not_found(kind, tmp_path, capsys):
    path = tmp_path / "photo.jpg"
    if kind == "dangling":
        path.symlink_to(tmp_path / "gone.jpg")
    elif kind == "loop":
        path.symlink_to(path)
    code, _, err = run_main(["--weights", "mobilenet0.25", "--inference_dir", path,
                             "--inference_save_folder", tmp_path / "out"], capsys)
    expected = {"missing": f"input not found: {path}",
                "dangling": f"input not found: {path} (broken symbolic link to {tmp_path / 'gone.jpg'})",
                "loop": f"cannot read input {path}: symbolic link loop"}[kind]
    assert code == config.EXIT_ERROR and err.strip() == f"inference.py: error: {expected}"


def test_opencv_out_of_memory_in_the_detector_is_retried_downscaled(tmp_path):
    class OpenCVHungryDetector:
        device = None

        def detect_batch(self, images):
            if any(im.shape[0] * im.shape[1] > 100 * 100 for im in images):  # a real cv2.error (-4)
                cv2.resize(np.zeros((4, 4, 3), np.float32), None, fx=300000, fy=300000)
            return _one_face_each(images)

    runner, summary, records = _runner_on_blank_images(OpenCVHungryDetector(), tmp_path, ["big.png"])
    runner.detect(records)
    assert summary.processed == 1 and not summary.skipped and summary.notes
    assert np.allclose(runner.results[0].detections.boxes, [[40, 40, 80, 80]])


def test_text_results_truncate_coordinates_toward_zero_and_give_six_decimals_of_score():
    """format_results_txt's documented convention: ``x1 y1 x2 y2`` truncated to integers (the
    public writer's ``int()``: toward zero, so -1.5 -> -1, never rounded), the score as ``%f``."""
    import math

    from models.detector import Detections

    boxes = [(1.7, 2.2, 10.5, 3.9), (-1.5, -0.25, 7.999, 99.5)]
    scores = [0.1234567, 0.9]
    found = Detections(np.array(boxes, np.float64), np.array(scores, np.float64), np.zeros((2, 5, 2)))
    text = iu.format_results_txt([("a.jpg", found)])
    expected = ["a.jpg"] + [" ".join(str(math.trunc(v)) for v in box) + f" {score:.6f}"
                            for box, score in zip(boxes, scores)]
    assert text == "".join(line + "\n" for line in expected)
    assert text.splitlines()[1:] == ["1 2 10 3 0.123457", "-1 0 7 99 0.900000"]


def test_names_with_line_breaks_stay_one_line_in_the_text_results(widerface_sample, mobilenet_weights, tmp_path,
                                                                  capsys):
    folder = tmp_path / "in"
    odd = ["new\nline.jpg", "\\leading backslash.jpg", "plain\\inside.jpg"]
    for name in odd:
        _small_face_image(widerface_sample, folder / name)
    (folder / "bad\nempty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    code, stdout, err = run_main(["--weights", mobilenet_weights, "--experiment_name", "x", "--inference_dir",
                                  folder, "--inference_save_folder", out, "--workers", "0"], capsys)
    assert code == iu.EXIT_SKIPPED
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(detections) == sorted(odd)  # JSON keeps the real names
    lines = (out / "x_inference_results.txt").read_text().split("\n")[:-1]
    names = [line for line in lines if not line[:1].isdigit()]
    assert names == [escape_name(name) for name in sorted(odd)]
    assert names == ["\\\\\\leading backslash.jpg", "\\new\\nline.jpg", "plain\\inside.jpg"]
    assert [unescape_name(name) for name in names] == sorted(odd)
    assert len(lines) == len(odd) + sum(len(faces) for faces in detections.values())
    assert "  skipped \\bad\\nempty.jpg: empty file" in stdout.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [{"file": "bad\nempty.jpg", "reason": "empty file"}]


def test_names_that_are_not_utf8_and_too_long_for_crop_names_complete_the_run(widerface_sample, mobilenet_weights,
                                                                               tmp_path, capsys):
    """A Latin-1 file name (bytes that are not UTF-8) and a 251-byte one: every output is written
    (the text results with the name escaped, JSON with Python's surrogate escapes), crops included."""
    folder = tmp_path / "in"
    latin1 = os.fsdecode(b"caf\xe9.jpg")
    long_name = "y" * 247 + ".jpg"
    for name in (latin1, long_name):
        _small_face_image(widerface_sample, folder / name)
    out = tmp_path / "out"
    code, stdout, err = run_main(["--weights", mobilenet_weights, "--experiment_name", "x", "--inference_dir",
                                  folder, "--inference_save_folder", out, "--workers", "0",
                                  "--save_aligned", "true", "--save_img", "true"], capsys)
    assert code == iu.EXIT_OK, err
    detections = json.loads((out / "detections.json").read_text())
    assert sorted(detections) == sorted([latin1, long_name]) and all(detections.values())
    text = (out / "x_inference_results.txt").read_text(encoding="utf-8")   # UTF-8 throughout
    names = [line for line in text.splitlines() if not line[:1].isdigit()]
    assert sorted(unescape_name(name) for name in names) == sorted([latin1, long_name])
    assert (out / "result_images" / latin1).is_file()
    crops = sorted(path.name for path in (out / "aligned").iterdir())
    assert len(crops) == sum(len(faces) for faces in detections.values())
    assert any(name.startswith("caf") for name in crops) and any(name.startswith("yyy") for name in crops)


def test_progress_bar_draws_on_a_terminal_and_writes_lines_in_a_log(monkeypatch, capsys):
    import utils.progress as progress

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # a line per update, to count them
    bar = progress.progress_bar(3, "inference")  # capsys: stderr is not a terminal
    for _ in range(3):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == len(err.splitlines())
    assert [line.split("|")[0].strip() for line in err.splitlines()][-1] == "inference: 100%", err
    assert len(err.splitlines()) >= 2 and " 0/3 " in err.splitlines()[0]
    # drawn only on a terminal: None, and loops that log their own lines (training)
    assert progress.progress_bar(3, "x", None).disable and progress.progress_bar(3, "x", in_logs=False).disable
    assert progress.progress_bar(3, "x", False).disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    terminal = progress.progress_bar(3, "x", None)
    assert not terminal.disable and terminal.mininterval < 1
    terminal.close()


def test_a_results_file_that_cannot_be_written_does_not_cost_the_others(widerface_sample, mobilenet_weights,
                                                                         tmp_path, capsys):
    folder = link_images(tmp_path / "in", {f"{i}.jpg": p for i, p in enumerate(
        sorted((widerface_sample / "val/images").rglob("*.jpg"))[:2])})
    out = tmp_path / "out"
    blocked = out / iu.results_txt_name("retinaface")
    blocked.mkdir(parents=True)  # a folder where the results file goes
    code, _, err = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", out,
                             "--workers", "0", "--device", "cpu", "--exist_ok", "true"], capsys)
    assert code == config.EXIT_ERROR and "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "inference.py: error:" in line]
    assert len(error_lines) == 1 and blocked.name in error_lines[0], err
    assert list(json.loads((out / "detections.json").read_text())) == ["0.jpg", "1.jpg"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == 1 and f"cannot write {blocked}" in summary["error"] and summary["processed"] == 2


@pytest.mark.skipif(sys.platform == "win32", reason="needs resource.setrlimit (POSIX)")
def test_an_image_write_that_fails_part_way_leaves_the_earlier_file_whole(tmp_path):
    """A file size limit stands in for a full disk: the write of a large PNG stops part-way. The
    earlier file of that name stays whole, no partial file is left, and the error names the file.
    Run in a child process, so the limit does not reach pytest's own files."""
    target = tmp_path / "result_images" / "photo.png"
    target.parent.mkdir()
    earlier = np.full((8, 8, 3), 200, np.uint8)
    assert cv2.imwrite(str(target), earlier)
    limit = 64 * 1024
    script = f"""
import resource, sys
import numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from utils.inference_utils import write_image
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # about 480 KB as PNG
try:
    write_image({str(target)!r}, noise)
except OSError as error:
    print(error)
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == f"cannot write {target}: file too large"
    assert sorted(p.name for p in target.parent.iterdir()) == ["photo.png"]
    np.testing.assert_array_equal(cv2.imread(str(target)), earlier)


def test_mask_without_save_mask_on_the_command_line_warns_that_nothing_is_written(sample_mask_images,
                                                                                  mobilenet_weights, tmp_path, capsys):
    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    image = sample_mask_images / "sideface_0003.png"
    common = ["--weights", mobilenet_weights, "--inference_dir", image, "--workers", "0", "--device", "cpu"]
    code, _, err = run_main(common + ["--inference_save_folder", tmp_path / "a", "--mask", "true"], capsys)
    assert code == config.EXIT_OK and err.splitlines().count(inference.MASKS_NOT_WRITTEN) == 1
    assert not (tmp_path / "a" / "masks").exists()
    code, _, err = run_main(common + ["--inference_save_folder", tmp_path / "b", "--save_mask", "true"], capsys)
    assert code == config.EXIT_OK and "warning" not in err and (tmp_path / "b" / "masks").is_dir()


def test_masks_of_a_jpeg_are_saved_as_png(sample_mask_images, mobilenet_weights, tmp_path, capsys):
    """A binary mask must survive its file: masks are PNG (lossless, values 0 and 255 only)
    whatever the input's format; a JPEG mask would blur its edges into grey levels."""
    require_installed("mediapipe", "the mask stage needs mediapipe (absent on the GPU machines)")
    folder = tmp_path / "in"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "portrait.jpg"), cv2.imread(str(sample_mask_images / "sideface_0003.png")))
    out = tmp_path / "out"
    code, _, _ = run_main(["--weights", mobilenet_weights, "--inference_dir", folder, "--inference_save_folder", out,
                           "--save_mask", "true", "--workers", "0", "--device", "cpu"], capsys)
    assert code == config.EXIT_OK
    for kind in ("masks", "head_masks"):
        saved = list((out / kind).iterdir())
        assert saved and all(path.suffix == ".png" for path in saved), (kind, saved)
        mask = cv2.imread(str(out / kind / "portrait_0.png"), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.ndim == 2, kind
        assert set(np.unique(mask)) == {0, 255}, kind
    assert not list((out / "masks").glob("*.jpg"))


def test_options_that_do_nothing_in_a_run_are_named():
    import torch

    cpu = torch.device("cpu")
    moot = config.parse_args("inference", ["--inference_dir", "x", "--half", "true", "--gpu_num", "2",
                                           "--aligned_size", "64"])
    assert config.moot_option_warnings(moot, cpu, {"save_aligned": "aligned_size"}) == [
        "--half is only used on CUDA; running in float32",
        "--gpu_num 2 given, but CUDA is not available: running on the CPU (--device cuda makes this an error)",
        "--aligned_size is ignored without --save_aligned true"]
    used = config.parse_args("inference", ["--inference_dir", "x", "--save_aligned", "true", "--aligned_size", "64",
                                           "--device", "cpu", "--gpu_num", "2"])
    assert config.moot_option_warnings(used, cpu, {"save_aligned": "aligned_size"}) == []
    assert config.moot_option_warnings(used, torch.device("cuda", 2)) == []  # --half and --gpu_num in effect on a GPU

