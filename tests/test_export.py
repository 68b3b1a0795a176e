"""ONNX export (tools/export_onnx.py): the exported graph, run by onnxruntime, detects what the
public Pytorch_Retinaface pipeline and our PyTorch path detect, at any batch size and image size."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import require_installed

for _package in ("onnx", "onnxscript", "onnxruntime"):
    require_installed(_package, "ONNX export needs onnx, onnxscript and onnxruntime (requirements-export.txt)")

from layers.prior_box import num_priors, prior_boxes  # noqa: E402
from models.retinaface import ModelConfig, RetinaFace, preprocess  # noqa: E402
from tools.export_onnx import export_onnx, main, onnx_detections, onnx_session, run_onnx  # noqa: E402
from tools.fidelity import load_reference, unmatched  # noqa: E402

GREETING = "49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"


@pytest.fixture(scope="module")
def published_onnx_file(tmp_path_factory, mobilenet_weights, widerface_sample):
    """The published mobilenet0.25 exported by the command line, with its check on the sample images."""
    path = tmp_path_factory.mktemp("onnx") / "mobilenet0.25.onnx"
    status = main(["--weights", str(mobilenet_weights), "--output", str(path),
                   "--check_images", str(widerface_sample / "val" / "images")])
    assert status == 0 and path.is_file()
    return path


@pytest.fixture(scope="module")
def published_onnx(published_onnx_file):
    return onnx_session(published_onnx_file, threads=2)


def test_exported_model_matches_the_public_pipeline(published_onnx, widerface_sample):
    reference = load_reference(widerface_sample / "reference_detections_mobilenet0.25.json")
    assert len(reference) == 2
    for name, expected in reference.items():
        image = cv2.imread(str(widerface_sample / "val" / "images" / name))
        exported = onnx_detections(published_onnx, image, confidence_threshold=0.02, nms_threshold=0.4)
        # the reference holds every public detection with score >= 0.1
        assert (expected[:, 4] >= 0.1).sum() >= 8
        assert unmatched(expected, exported, min_score=0.1) == [], name
        assert unmatched(exported, expected, min_score=0.11) == [], name


def test_exported_model_takes_any_batch_and_size(published_onnx, widerface_sample):
    image = cv2.imread(str(widerface_sample / "val" / "images" / GREETING))
    odd = np.ascontiguousarray(image[:301, :479])
    boxes, scores, landmarks = run_onnx(published_onnx, odd[None])
    assert boxes.shape == (1, num_priors((301, 479)), 4) and scores.shape == boxes.shape[:2]
    assert landmarks.shape == boxes.shape[:2] + (10,)

    pair = np.stack([image, np.ascontiguousarray(image[:, ::-1])])
    together = run_onnx(published_onnx, pair)
    for index in range(2):
        alone = run_onnx(published_onnx, pair[index:index + 1])
        for joint, single in zip(together, alone):
            np.testing.assert_allclose(joint[index], single[0], atol=1e-3)
    assert (together[1][0] > 0.5).sum() >= 5  # real faces, not an empty comparison


def test_onnx_detections_take_images_as_face_detector_does(published_onnx, widerface_sample):
    """A path, grayscale, BGRA and float-in-[0, 1] images are converted as FaceDetector converts
    them (before: a float image was cast to uint8 zeros, grayscale failed inside onnxruntime)."""
    path = widerface_sample / "val" / "images" / GREETING
    image = cv2.imread(str(path))
    expected = onnx_detections(published_onnx, image)
    assert len(expected) >= 5
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    for same in (str(path), path, image.astype(np.float32) / 255.0, cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)):
        np.testing.assert_array_equal(onnx_detections(published_onnx, same), expected)
    np.testing.assert_array_equal(onnx_detections(published_onnx, gray),
                                  onnx_detections(published_onnx, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        onnx_detections(published_onnx, image.astype(np.float32))


def test_onnx_detections_take_the_model_file_in_place_of_a_session(published_onnx, published_onnx_file,
                                                                   widerface_sample):
    image = cv2.imread(str(widerface_sample / "val" / "images" / GREETING))
    expected = onnx_detections(published_onnx, image)
    assert len(expected) >= 5
    for file in (published_onnx_file, str(published_onnx_file)):
        np.testing.assert_array_equal(onnx_detections(file, image), expected)


def test_onnx_detections_take_the_settings_as_face_detector_does(published_onnx, widerface_sample, mobilenet_weights):
    """0 is no limit for top_k / keep_top_k (it kept nothing), and settings out of range are refused (a
    confidence threshold of -1 returned 750 rows, an NMS threshold of 2 kept overlapping boxes)."""
    from models.detector import FaceDetector

    path = widerface_sample / "val/images/12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg"
    unlimited = onnx_detections(published_onnx, path, confidence_threshold=0.3, top_k=None, keep_top_k=None)
    assert len(unlimited) > 10  # 0 kept none of them
    np.testing.assert_array_equal(onnx_detections(published_onnx, path, confidence_threshold=0.3, top_k=0,
                                                  keep_top_k=0), unlimited)
    ours = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.3, top_k=0, keep_top_k=0).detect(path)
    assert len(ours) == len(unlimited)
    for settings, name in (({"confidence_threshold": -1}, "confidence_threshold"), ({"nms_threshold": 2}, "nms_threshold"),
                           ({"keep_top_k": -3}, "keep_top_k")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            onnx_detections(published_onnx, path, **settings)


def test_cascade_and_iou_head_export_equal_the_pytorch_model(tmp_path):
    """Stage-2 residual offsets, the IoU head, 3 anchors and folded BatchNorm, against the plain
    (unfolded) model decoded with the cached priors."""
    torch.manual_seed(0)
    model = RetinaFace(ModelConfig(network="mobilenet0.25", num_anchor=3, cascade=True, cascade_mode="residual",
                                   model_version="tina"))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = export_onnx(model, tmp_path / "tina.onnx")
    generator = np.random.default_rng(1)
    images = cv2.resize(generator.integers(0, 256, (12, 20, 3), dtype=np.uint8), (203, 117))
    batch = np.stack([images, images[::-1]])
    with torch.inference_mode():
        inputs = torch.from_numpy(batch)
        expected = model.decode_detections(model(preprocess(inputs)), prior_boxes((117, 203), num_anchor=3))
    got = run_onnx(onnx_session(path), batch)
    assert got[0].shape == (2, num_priors((117, 203), num_anchor=3), 4)
    for name, g, e, atol in zip(("boxes", "scores", "landmarks"), got, expected, (0.01, 1e-4, 0.01)):
        np.testing.assert_allclose(g, e.numpy(), atol=atol, rtol=1e-4, err_msg=name)
    assert expected[1].std() > 1e-3  # scores vary over the priors: the comparison is not of constants


def test_check_images_that_cannot_be_read_are_named_and_left_out(published_onnx_file, mobilenet_weights,
                                                                 widerface_sample, tmp_path):
    from tools.export_onnx import check_export
    from utils.checkpoint import load_model

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    report = check_export(published_onnx_file, load_model(str(mobilenet_weights), {}),
                          [empty, widerface_sample / "val/images" / GREETING])
    assert report["images"]["unreadable"] == [f"{empty}: empty file"]
    assert report["images"]["checked"] == 1 and report["images"]["detections_compared"] > 0
    assert report["passed"]


def test_command_line_errors_are_one_line(tmp_path, capsys, mobilenet_weights, monkeypatch):
    import tools.export_onnx

    def must_not_export(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(tools.export_onnx, "export_onnx", must_not_export)
    assert main(["--weights", str(tmp_path / "missing.pth")]) == 1
    assert main(["--weights", "mobilenet0.25", "--check_images", str(tmp_path / "none")]) == 1
    # an --output that cannot be written is found before the export's seconds
    assert main(["--weights", str(mobilenet_weights), "--output", str(tmp_path)]) == 1
    (tmp_path / "file").write_text("")
    assert main(["--weights", str(mobilenet_weights), "--output", str(tmp_path / "file" / "m.onnx")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("export_onnx.py: error:") for line in lines), lines
    assert "weights file not found" in lines[0] and "no images found" in lines[1]
    assert lines[2].endswith(f"--output {tmp_path} is a folder; give a file path (e.g. {tmp_path / 'model.onnx'})")
    assert lines[3].startswith(f"export_onnx.py: error: cannot write --output {tmp_path / 'file' / 'm.onnx'}: ")
    # an opset the exporter cannot write this graph in: it printed a converter traceback, wrote opset 18 and exited 0
    with pytest.raises(SystemExit) as stopped:
        main(["--weights", str(mobilenet_weights), "--opset", "11"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "export_onnx.py: error: argument --opset: 11: the exporter writes this model in opset 18 or later (its Resize "
        "cannot be converted to older opsets); onnxruntime 1.14 and later run opset 18")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    assert main(["--weights", str(mobilenet_weights), "--opset", str(newest + 1)]) == 2
    assert capsys.readouterr().err.strip() == (f"export_onnx.py: error: --opset {newest + 1}: the installed onnx knows "
                                               f"opsets up to {newest}")


def test_cpu_benchmark_times_the_exported_model_in_the_same_rounds(published_onnx_file, mobilenet_weights,
                                                                  widerface_sample, tmp_path, capsys):
    from tools import benchmark_cpu

    images = tmp_path / "images"
    images.mkdir()
    for name in ("12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg", GREETING):
        (images / Path(name).name).symlink_to(widerface_sample / "val" / "images" / name)
    out = tmp_path / "cpu.jsonl"
    argv = ["--weights", str(mobilenet_weights), "--images", str(images), "--repeats", "1",
            "--onnx", str(published_onnx_file), "--nchw", "--out", str(out)]
    report = benchmark_cpu.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert [json.loads(line) for line in out.read_text().splitlines()] == [report]  # --out appends the same line
    assert report["command"].startswith("python tools/benchmark_cpu.py --weights ") and report["date"][:2] == "20"
    assert (report["weights"], report["images_folder"]) == (str(mobilenet_weights), str(images))
    assert report["ours_detections_score_ge_0.5"] > 0 and benchmark_cpu.disagreements(
        report, report["ours_detections_score_ge_0.5"]) == []
    assert report["images"] == 2 and report["onnx_ms_per_img"] > 0 and report["ours_ms_per_img"] > 0
    assert report["onnx_detections_score_ge_0.5_unmatched_vs_ours"] == 0
    assert report["detections_score_ge_0.5_unmatched_between_pipelines"] == 0
    assert report["nchw_ms_per_img"] > 0 and report["nchw_detections_score_ge_0.5_unmatched_vs_ours"] == 0


@pytest.mark.parametrize("failure", [RuntimeError("unsupported operator"), KeyboardInterrupt()],
                         ids=["error", "ctrl_c"])
def test_a_failed_or_interrupted_export_leaves_no_partial_file(tmp_path, monkeypatch, failure):
    """The file is written under a .partial name and renamed when complete; an error (ExportError)
    or a Ctrl-C in the middle removes it, and no earlier file of that name is touched."""
    from tools.export_onnx import ExportError

    def export_that_stops(graph, args, path, **options):
        Path(path).write_bytes(b"half an onnx file")
        raise failure

    monkeypatch.setattr(torch.onnx, "export", export_that_stops)
    output = tmp_path / "model.onnx"
    output.write_bytes(b"earlier export")
    with pytest.raises(ExportError if isinstance(failure, Exception) else KeyboardInterrupt):
        export_onnx(RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)), output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert output.read_bytes() == b"earlier export"


def test_export_and_check_leave_the_callers_model_where_it_is(published_onnx_file, mobilenet_weights, monkeypatch):
    """Exporting works on a CPU copy of a model on another device; ``nn.Module.cpu`` (in place)
    is never called on the caller's model. Here the model is on the CPU already, so any call is an
    unneeded in-place move; tests/test_cuda.py checks a CUDA model."""
    from tools.export_onnx import check_export
    from utils.checkpoint import load_model

    def moved(*args, **kwargs):
        raise AssertionError("the caller's model was moved in place")

    def export(graph, args, path, **options):
        Path(path).write_bytes(b"graph")

    model = load_model(str(mobilenet_weights), {})
    monkeypatch.setattr(model, "cpu", moved)
    with monkeypatch.context() as patch:
        patch.setattr(torch.onnx, "export", export)  # the graph is built, not traced
        assert export_onnx(model, published_onnx_file.with_name("unused.onnx")).read_bytes() == b"graph"
    assert check_export(published_onnx_file, model)["passed"]
