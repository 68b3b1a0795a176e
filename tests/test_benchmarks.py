"""Smoke tests of the speed benchmarks on the CPU with tiny settings.

tools/benchmark_inference.py and tools/benchmark_train.py run in-process (each well under 20 s
with one thread); their JSON lines are checked for the fields the speed table and the GPU run
rely on, and for the fidelity checks between the fast and the reference paths. The CUDA-only
paths (graphs, compile, autocast, sync counts, memory) run only on a GPU (tools/gpu_check.sh).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from layers.multibox_loss import MultiBoxLoss
from layers.prior_box import prior_boxes
from models.retinaface import ModelConfig, RetinaFace, preprocess
from tools import benchmark_inference as bi
from tools import benchmark_train as bt
from tools import speed_table
from utils.box_utils import point_form

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


#: a guard against hangs only: the two slowest tests here take 200-230 s on a loaded 2-core machine
SLOW_SUBPROCESS_TIMEOUT = 900


def run_main(main, argv):
    """Run a benchmark ``main`` in-process; returns (report, the one line it printed)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        report = main(argv)
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1, "a benchmark prints exactly one JSON line on stdout"
    return report, lines[0]


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory, mobilenet_weights, widerface_sample):
    out = tmp_path_factory.mktemp("bench") / "inference.jsonl"
    argv = ["--device", "cpu", "--threads", "1", "--models", "mobilenet0.25", "--batch_sizes", "1,2",
            "--iters", "2", "--warmup", "1", "--weights", f"mobilenet0.25={mobilenet_weights}",
            "--sample_images", str(widerface_sample / "val" / "images"), "--sample_weights", str(mobilenet_weights),
            "--sample_limit", "2", "--sample_iters", "1", "--sample_warmup", "0", "--out", str(out)]
    report, line = run_main(bi.main, argv)
    return report, line, out


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, widerface_sample):
    out = tmp_path_factory.mktemp("bench") / "train.jsonl"
    argv = ["--device", "cpu", "--threads", "1", "--configs", "mobilenet0.25:2:128", "--iters", "2",
            "--warmup", "1", "--workers", "1", "--busy_processes", "1", "--fixed_batches", "3",
            "--variants", "public,fp32+cuda_graphs,fp32", "--real_variants", "fp32,fp32+ahead",
            "--augment_on", "workers,device,device+compile", "--dataset", str(widerface_sample),
            "--split", "val", "--profile", "--profile_steps", "1", "--out", str(out)]
    report, line = run_main(bt.main, argv)
    return report, line, out


def check_header(report, name):
    assert report["benchmark"] == name
    assert report["env"]["device_type"] == "cpu" and report["env"]["torch"] == torch.__version__
    assert report["date"][:2] == "20" and report["command"].startswith(f"python tools/benchmark_{name}")
    assert report["errors"] == [] and not report.get("interrupted")


# ------------------------------------------------------------------------------------------------
# Inference benchmark
# ------------------------------------------------------------------------------------------------
def test_inference_benchmark_cpu_smoke(inference_run):
    report, line, out = inference_run
    assert json.loads(line) == json.loads(out.read_text().strip())
    check_header(report, "inference")
    assert any("CUDA graphs" in note for note in report["notes"])
    entries = {(e["batch"], e["variant"]): e for e in report["synthetic"]}
    assert set(entries) == {(1, "ref"), (1, "fp32"), (2, "ref"), (2, "fp32")}
    for (batch, variant), e in entries.items():
        assert e["model"] == "mobilenet0.25" and e["size"] == [640, 480]
        assert e["latency_ms"]["median"] > 0 and e["latency_ms"]["n"] == 2
        assert math.isclose(e["images_per_s"], batch * 1000 / e["latency_ms"]["median"], rel_tol=1e-2)
        assert set(e["stages_ms"]) == {"h2d", "network", "postprocess"}
        if variant == "fp32":  # fused BN, same device: must give the reference's detections
            assert e["fuse_bn"] and e["fidelity"]["passed"], e["fidelity"]
        else:
            assert not e["fuse_bn"] and "fidelity" not in e
    assert entries[(2, "fp32")]["fidelity"]["compared"] > 0  # real image content: a non-vacuous check
    dense = entries[(2, "fp32")]["dense_fidelity"]  # fused BN against plain, prior by prior before NMS
    assert dense["passed"] and dense["priors"] > 0 and dense["min_iou"] > 0.999, dense
    assert report["fidelity_passed"] is True
    assert {s["batch"] for s in report["summary"]} == {1, 2}


def test_inference_benchmark_sample_images_against_public_pipeline(inference_run):
    sample = inference_run[0]["sample"]
    assert sample["images"] == 2 and sample["confidence_threshold"] == 0.02
    assert sample["public_style"]["ms_per_img"] > 0 and sample["read_image_ms_per_img"] > 0
    assert set(sample["public_style"]["steps_ms_per_img"]) == {"forward", "priors", "decode", "nms"}
    assert sample["fidelity_reference_vs_public"]["passed"] and sample["fidelity_reference_vs_public"]["compared"] > 0
    variants = {v["variant"]: v for v in sample["variants"]}
    assert set(variants) == {"ref", "fp32"}
    assert variants["fp32"]["fidelity"]["passed"] and variants["fp32"]["speedup_vs_public"] > 0
    # where a pass's time goes, summed over its batches (one timed pass: the stages lie inside its wall time)
    stages, ms = variants["fp32"]["stages_ms_per_img"], variants["fp32"]["ms_per_img"]
    assert {"h2d", "network", "postprocess"} <= set(stages) and 0.5 * ms < sum(stages.values()) <= ms * 1.001
    apis = [sample["face_detector_api"], sample["face_detector_api_padded"]]
    assert all(api["fidelity"]["passed"] and api["fidelity"]["compared"] > 0 for api in apis)
    assert "pad_batches=True" in apis[1]["settings"]  # exact padding: the same detections as the reference
    for api in apis:  # FaceDetector's own stage split of a pass, inside its wall time
        assert set(api["stages_ms_per_img"]) == {"preprocess", "forward", "postprocess"}
        assert 0.3 * api["ms_per_img"] < sum(api["stages_ms_per_img"].values()) <= api["ms_per_img"] * 1.001
    # passes queued ahead (the _streamed rows) only on CUDA: on the CPU submit runs the network at once
    assert not [key for key in sample if key.endswith("_streamed")]
    candidates = list(variants.values()) + [{**api, "variant": api["settings"]} for api in apis]
    assert sample["best"]["variant"] == min(candidates, key=lambda v: v["ms_per_img"])["variant"]
    fresh = sample["new_sizes"]
    assert fresh["passes"] == 1 and fresh["images_per_pass"] == 2 and fresh["public_style"]["cudnn_benchmark"]
    # on the CPU only the float32 pipelines without autotuning (the others are the same there)
    expected = [name for name, (_, autotune, _, cuda_only) in bi.NEW_SIZE_PIPELINES.items() if not cuda_only]
    assert [o["pipeline"] for o in fresh["ours"]] == expected and len(expected) == 4
    assert all(o["ms_per_img"] > 0 and o["speedup_vs_public"] > 0 and not o["cudnn_benchmark"] for o in fresh["ours"])
    # the layout each pipeline ran: auto is NHWC on the CPU
    assert [o["channels_last"] for o in fresh["ours"]] == [True, True, False, False]
    assert "other_models" not in fresh  # none on the CPU by default


def test_passes_submitted_ahead_are_finished_in_order_after_the_next_is_queued():
    """The _streamed rows' loop: pass i+1 is submitted before pass i is finished (as test.py queues
    its batches), every pass is finished once, and each pass's own detections come back."""
    from models.detector import Detections

    calls = []

    class Handle:
        def __init__(self, index):
            self.index = index

        def result(self):
            calls.append(("result", self.index))
            box = np.array([[self.index, 0, 10, 10]], np.float32)
            return [Detections(box, np.ones(1, np.float32), np.zeros((1, 5, 2), np.float32))]

    class Detector:
        def submit(self, images):
            calls.append(("submit", sum(1 for c in calls if c[0] == "submit")))
            return Handle(calls[-1][1])

    passes = bi.submitted_ahead(Detector(), [np.zeros((8, 8, 3), np.uint8)], 3)
    assert calls == [("submit", 0), ("submit", 1), ("result", 0), ("submit", 2), ("result", 1), ("result", 2)]
    assert [rows[0][0, 0] for rows in passes] == [0, 1, 2] and passes[0][0].shape == (1, 15)


def test_new_size_pass_of_other_models_times_both_layouts():
    import argparse
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, 64, 3), dtype=np.uint8) for h in (48, 40)]
    args = argparse.Namespace(sample_new_size_passes=1, sample_confidence_threshold=0.02, width=64, height=48,
                              seed=0, sample_new_size_models=["resnet50", "mobilenet0.25"])
    seen = {a.shape[:2] for a in arrays}
    errors: list[str] = []
    results = bi.measure_new_size_models(args, torch.device("cpu"), arrays, seen, errors)
    assert errors == [] and [r["model"] for r in results] == ["resnet50", "mobilenet0.25"]
    for result in results:
        assert result["weights"].startswith("random") and "public_style" not in result
        on_cpu = [name for name in bi.NEW_SIZE_LAYOUT_PIPELINES if not bi.NEW_SIZE_PIPELINES[name][3]]
        assert [o["pipeline"] for o in result["ours"]] == on_cpu and len(on_cpu) == 3
        assert [o["channels_last"] for o in result["ours"]] == [True, True, False]
        assert all(o["ms_per_img"] > 0 and "speedup_vs_public" not in o for o in result["ours"])
    # every pipeline of every model ran sizes of its own, after one untimed pass per model
    assert len(seen) == 2 + 2 * (3 + 1) * 2


def test_padded_new_size_pipelines_report_their_capturing_pass_apart(monkeypatch):
    """A padded pipeline's first timed pass meets the set-up pass's canvases a second time (on CUDA
    FaceDetector captures their graphs then): it is reported apart, and ms_per_img is the pass after."""
    import argparse
    padded = "as test.py, --pad_to 128 --batch_size 8"
    options, autotune, tf32, _ = bi.NEW_SIZE_PIPELINES[padded]
    monkeypatch.setitem(bi.NEW_SIZE_PIPELINES, padded, (options, autotune, tf32, False))  # CUDA-only: let it run
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, 64, 3), dtype=np.uint8) for h in (48, 40, 44)]
    args = argparse.Namespace(sample_new_size_passes=2, sample_confidence_threshold=0.02)
    model = RetinaFace(ModelConfig(network="mobilenet0.25"), pretrained=False).eval()
    seen = {a.shape[:2] for a in arrays}
    defaults = "test.py defaults (fp32, layout auto, BN folded, batch 1)"
    result = bi.measure_new_sizes(args, torch.device("cpu"), model, arrays, seen, (defaults, padded), public=False)
    rows = {o["pipeline"]: o for o in result["ours"]}
    assert result["passes"] == 2 and set(rows) == {defaults, padded}
    assert "first_pass_ms_per_img" not in rows[defaults]
    assert rows[padded]["first_pass_ms_per_img"] > 0 and rows[padded]["ms_per_img"] > 0
    # both in ms: on the CPU (no graphs to capture) the passes take about as long (the H200 report of
    # 2026-11-28 gave the first one in seconds)
    assert 0.1 < rows[padded]["first_pass_ms_per_img"] / rows[padded]["ms_per_img"] < 10
    # sizes of their own for the untimed pass, 2 passes of each pipeline and the padded one's extra pass
    assert len(seen) == 3 + 3 * (1 + 2 * 2 + 1)
    report = {"benchmark": "inference", "env": {"device": "cpu", "torch": "2.14"}, "synthetic": [],
              "sample": {"images": 3, "distinct_sizes": 3, "confidence_threshold": 0.02, "variants": [],
                         "public_style": {"ms_per_img": 40.0, "images_per_s": 25.0},
                         "new_sizes": {**result, "public_style": {"ms_per_img": 40.0},
                                       "ours": [{**o, "speedup_vs_public": 1.0} for o in result["ours"]]}}}
    rendered = speed_table.render([report])
    assert f"first pass, CUDA graphs captured: {rows[padded]['first_pass_ms_per_img']} ms/img" in rendered


def test_sample_section_times_face_detector_in_nhwc_where_its_default_is_nchw():
    """mobilenet0.25 on CUDA runs NCHW by default (new sizes); sizes run before are the NHWC case,
    so the sample section times FaceDetector both ways there, and the table lists every row."""
    mobilenet, resnet = (RetinaFace(ModelConfig(network=name), pretrained=False) for name in ("mobilenet0.25",
                                                                                              "resnet18"))
    cuda_settings = bi.api_settings_for(mobilenet, torch.device("cuda"))  # layout choice only: no GPU needed
    assert list(cuda_settings) == ["face_detector_api", "face_detector_api_padded", "face_detector_api_nhwc",
                                   "face_detector_api_padded_nhwc"]
    assert cuda_settings["face_detector_api_padded_nhwc"] == {"pad_batches": True, "pad_to": 128, "channels_last": True}
    assert cuda_settings["face_detector_api_nhwc"] == {"channels_last": True}
    for model, device in ((mobilenet, "cpu"), (resnet, "cuda"), (resnet, "cpu")):  # NHWC already
        assert list(bi.api_settings_for(model, torch.device(device))) == ["face_detector_api",
                                                                         "face_detector_api_padded"]
    rows = {key: {"settings": f"FaceDetector({key})", "ms_per_img": ms, "images_per_s": 1000 / ms,
                  "speedup_vs_public": 40 / ms, "fidelity": {"passed": True, "compared": 5, "unmatched_reference": 0,
                                                             "unmatched_candidate": 0}}
            for key, ms in zip(cuda_settings, (4.0, 3.0, 2.0, 1.0))}
    report = {"benchmark": "inference", "env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11"}, "synthetic": [],
              "sample": {"images": 10, "distinct_sizes": 8, "confidence_threshold": 0.02,
                         "public_style": {"ms_per_img": 40.0, "images_per_s": 25.0}, "variants": [], **rows}}
    rendered = speed_table.render([report])
    for key in cuda_settings:
        assert f"FaceDetector.detect (FaceDetector({key}))" in rendered


def test_new_size_copies_never_repeat_a_size():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 30), (41, 30), (40, 30), (9, 8))]
    seen = {a.shape[:2] for a in arrays}
    sizes = []
    for _ in range(3):
        copies = bi.new_size_copies(arrays, seen)
        for original, copy in zip(arrays, copies):
            height = copy.shape[0]
            assert copy.shape[1:] == original.shape[1:] and height < original.shape[0]
            np.testing.assert_array_equal(copy, original[:height])  # the top rows, unchanged
            assert copy.flags["C_CONTIGUOUS"]
        sizes += [c.shape[:2] for c in copies]
    assert len(set(sizes)) == len(sizes) == 12  # every image of every pass has a size of its own
    assert not set(sizes) & {a.shape[:2] for a in arrays}
    assert set(sizes) <= seen


def test_inference_benchmark_random_weights_and_noise(tmp_path):
    report, _ = run_main(bi.main, ["--device", "cpu", "--threads", "1", "--models", "mobilenet0.25",
                                   "--weights", "mobilenet0.25=random", "--content", "noise", "--size", "160x128",
                                   "--batch_sizes", "2", "--iters", "1", "--sample_images", "",
                                   "--variants", "ref,fp32,fp16+graph"])
    assert report["errors"] == [] and report["sample"] is None
    assert report["synthetic"][0]["weights"].startswith("random")
    assert [e["variant"] for e in report["synthetic"]] == ["ref", "fp32"]
    assert any("fp16+graph: skipped" in note for note in report["notes"])


def test_variant_parsing():
    ref, note = bi.parse_variant("ref", CPU)
    assert note is None and ref.is_reference and not ref.channels_last and not ref.fuse_bn
    fp16, _ = bi.parse_variant("fp16+cl", CPU)
    assert fp16.autocast_dtype == torch.float16 and fp16.channels_last and fp16.fuse_bn
    skipped, note = bi.parse_variant("bf16+graph", CPU)
    assert skipped is None and "CUDA" in note
    with pytest.raises(ValueError):
        bi.parse_variant("int8", CPU)
    with pytest.raises(ValueError):
        bi.parse_variant("fp32+fast", CPU)
    assert "fp16+graph" in bi.default_variants(torch.device("cuda"), compile_=False, graphs=True)
    assert bi.default_variants(CPU, compile_=True, graphs=True) == ["ref", "fp32"]


def test_random_model_calibration_gives_a_face_prior():
    generator = torch.Generator().manual_seed(0)
    model, note = bi.load_benchmark_model("mobilenet0.25", "random", CPU,
                                          torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=generator))
    assert note.startswith("random") and not model.training
    with torch.inference_mode():
        images = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=generator)
        _, scores, _ = model.decode_detections(model(preprocess(images)), prior_boxes((64, 64), 2))
    assert float(scores.mean()) < 0.1  # ~1 % face prior, not coin flips


# ------------------------------------------------------------------------------------------------
# Training benchmark
# ------------------------------------------------------------------------------------------------
def test_train_benchmark_cpu_smoke(train_run):
    report, line, out = train_run
    assert json.loads(line) == json.loads(out.read_text().strip())
    check_header(report, "train")
    (config,) = report["configs"]
    assert config["config"] == "mobilenet0.25:2:128" and config["fixed_batch"].startswith("real")
    modes = {(v["variant"], v["mode"]): v for v in config["variants"]}
    assert set(modes) == {("public", "fixed"), ("fp32", "fixed"), ("fp32", "fixed, busy processes"),
                          ("fp32", "fixed, 3 batches in turn"), ("fp32", "real"), ("fp32+ahead", "real")}
    assert modes[("fp32+ahead", "real")]["ratio_to_fixed"] > 0  # rated against its variant's fixed batches
    # +ahead: batches prepared on a side stream during the step before; plain variants and +inline
    # prepare each batch when its step starts, as train.py
    ahead = bt.parse_variant("bf16+cuda_graphs+ahead", torch.device("cuda"))
    assert ahead.prepare_ahead and ahead.cuda_graphs and ahead.fixed_name == "bf16+cuda_graphs"
    assert not bt.parse_variant("bf16+cuda_graphs", torch.device("cuda")).prepare_ahead
    inline = bt.parse_variant("bf16+cuda_graphs+inline", torch.device("cuda"))
    assert not inline.prepare_ahead and inline.fixed_name == "bf16+cuda_graphs"
    copies = bt.parse_variant("fp16+cuda_graphs+copy_ahead", torch.device("cuda"))
    assert copies.copy_ahead and not copies.prepare_ahead and copies.fixed_name == "fp16+cuda_graphs"
    # train.py --cuda_graphs true as a variant: CUDA only, skipped with a note here
    assert any(n.startswith("mobilenet0.25:2:128 fp32+cuda_graphs: skipped on the CPU") for n in report["notes"])
    assert bt.parse_variant("bf16+cuda_graphs", torch.device("cuda")).cuda_graphs
    for conflicting in ("bf16+cuda_graphs+compile", "bf16+cuda_graphs+graph", "bf16+cuda_graphs+ahead+inline",
                        "bf16+cuda_graphs+copy_ahead+ahead"):
        with pytest.raises(SystemExit):
            bt.parse_variant(conflicting, torch.device("cuda"))
    busy = modes[("fp32", "fixed, busy processes")]
    assert busy["busy_processes"] == 1 and busy["ratio_to_fixed"] > 0
    several = modes[("fp32", "fixed, 3 batches in turn")]
    # three different random crops: their most faces per image differ (the point of the row)
    assert len(several["most_faces_per_batch"]) == 3 and len(set(several["most_faces_per_batch"])) > 1
    assert several["ratio_to_fixed"] > 0 and several["data_wait_share"] < 0.05
    real = [v for v in config["variants"] if v["mode"] == "real"]
    assert sorted(v["augment_on"] for v in real) == ["device", "device", "device+compile", "device+compile",
                                                     "workers", "workers"]
    assert all(0 <= v["data_wait_share"] < 1 for v in real)
    assert modes[("fp32", "fixed")]["data_wait_share"] < 0.05  # a repeated batch is never waited for
    for v in config["variants"]:
        assert v["img_per_s"] > 0 and v["steps"] == 2 and math.isfinite(v["mean_loss"])
        assert v["step_ms"]["n"] == 2
    assert all(v["ratio_to_fixed"] > 0 and v["workers"] == 1 for v in real)
    assert config["loader_only"]["workers"]["img_per_s"] > 0 and config["loader_only"]["device"]["img_per_s"] > 0
    # what preparing a loader batch costs the device: with augmentation on the workers the copy holds the
    # two uint8 128 px images (and the padded targets); on the device it holds the crops, whose sides
    # are at least 0.3 of the sample images' short sides (>= 521 px), so more bytes
    preparation = {mode: config["loader_only"][mode]["preparation"] for mode in ("workers", "device", "device+compile")}
    for prep in preparation.values():
        assert 1 <= prep["batches"] == prep["copy_ms"]["n"] == prep["pixels_ms"]["n"] <= bt.PREPARATION_BATCHES
        assert prep["copy_ms"]["median"] > 0 and prep["pixels_ms"]["median"] > 0
        # on the CPU launching is doing: the host's share lies inside the wall time of the same stage
        assert prep["pixels_issue_ms"]["n"] == prep["batches"]
        assert 0 < prep["pixels_issue_ms"]["median"] <= prep["pixels_ms"]["median"]
    images_mb = 2 * 3 * 128 * 128 / 2 ** 20
    assert images_mb <= preparation["workers"]["mb_per_batch"] < images_mb + 0.05
    assert preparation["device"]["mb_per_batch"] > 2 * 3 * 156 * 156 / 2 ** 20
    # the device augmentation of a batch, profiled: the resize products are among its ops (eager in
    # the compiled mode too)
    assert "pixels_profile" not in preparation["workers"]
    for mode in ("device", "device+compile"):
        pixels_profile = preparation[mode]["pixels_profile"]
        assert 0 < pixels_profile["busy_ms"] and any(op["name"] == "aten::bmm" for op in pixels_profile["top"])
    # the public-style step computes the same loss as MultiBoxLoss (protocol difference off)
    assert config["loss_check"]["protocol_rel_diff"] < 1e-5
    summary = config["summary"]
    assert summary["best_fixed_variant"] == "fp32" and summary["speedup_vs_public_style"] > 0
    assert set(summary["real_ratio_to_fixed"]) == {"workers", "device", "device+compile"}
    assert config["profile"]["top_ops"] and config["profile"]["variant"] == "fp32"
    # the batches in turn are profiled too, one step per batch at least: busy time per step
    # (CPU time here) is positive and of the order of the step time
    in_turn = config["profile_batches_in_turn"]
    assert in_turn["steps"] == 3 and in_turn["top_ops"]
    for profiled in (config["profile"], in_turn):
        assert 0 < profiled["busy_ms_per_step"] < 10 * several["step_ms"]["median"]
    # wall seconds per part, set-up included: each row at least its timed window, the parts within the config's
    for v in config["variants"]:
        assert v["wall_s"] >= round(v["elapsed_s"], 1) - 0.05, v
    parts = (config["setup_wall_s"] + config["profile_wall_s"] + sum(v["wall_s"] for v in config["variants"])
             + sum(v["wall_s"] for v in config["loader_only"].values()))
    assert 0 < parts <= config["wall_s"] + 0.5


def test_graphable_training_step_is_the_train_one_epoch_step(widerface_sample):
    """``training_step`` (what the ``+graph`` variants capture on CUDA) trains exactly as
    ``train_one_epoch``: the same losses over three steps from the same initialisation."""
    dataset = bt.training_dataset(widerface_sample, "val", 128, 0)
    images, targets = bt.real_batch(dataset, 2)
    config, variant = bt.MODELS["mobilenet0.25"], bt.parse_variant("fp32", CPU)
    step, optimizer = bt.training_step(config, variant, CPU, images, targets, 128, seed=0)
    losses = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(step().detach()))
    assert losses[2] < losses[0]
    # train_one_epoch reports the mean loss of its window (rounded to 4 significant digits)
    reference = bt.run_ours(config, variant, CPU, bt.Cycle([(images, targets)], 3), 3, 2, 128, 0)["mean_loss"]
    assert abs(reference - sum(losses) / 3) < 0.01, (reference, losses)
    with pytest.raises(SystemExit, match="graph"):
        bt.parse_variant("fp16+graph", CPU)


@pytest.mark.parametrize("cascade", [False, True])
def test_public_style_loss_equals_multibox_loss(cascade):
    """The per-image public protocol (hard faces not claiming anchors) = the batched loss, also for
    the refine cascade whose stage 2 matches against per-image anchors."""
    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", cascade=cascade)
    model = RetinaFace(config).train()
    images, targets = bt.synthetic_batch(3, 96, seed=1, faces=6)
    targets[1] = targets[1][:0]  # an image without faces
    priors = prior_boxes((96, 96), config.num_anchor)
    with torch.no_grad():
        outputs = model(images.float() - 117.0)
        ours = MultiBoxLoss(config)(model, outputs, priors, targets)
        loss_l, loss_c, loss_landm = bt.PublicStyleLoss(claim_invalid=False)(model, outputs, priors, targets)
    assert math.isclose(float(2.0 * loss_l + loss_c + loss_landm), float(ours["total"]), rel_tol=1e-5)
    assert math.isclose(float(loss_l), float(ours["loss_box"]), rel_tol=1e-5)
    assert math.isclose(float(loss_landm), float(ours["loss_landm"]), rel_tol=1e-5)


def test_matching_on_augmented_sample_images_equals_the_public_match(widerface_sample):
    """Real faces after the training augmentation: the batched matching gives the positives of the
    public per-image ``match``, and each positive the same face, except where the public code lets
    a face whose best IoU is below 0.2 take over its best anchor (the documented difference)."""
    from layers.multibox_loss import match_anchors, pad_targets
    from utils.box_utils import VARIANCES, encode

    priors = prior_boxes((640, 640), 2)
    images = positives = taken_over = 0
    for seed in range(3):
        dataset = bt.training_dataset(widerface_sample, "val", 640, seed=seed)
        for index in range(len(dataset)):
            faces = torch.from_numpy(dataset[index][1]).float()
            if len(faces) == 0:
                continue
            images += 1
            padded, valid, _ = pad_targets([faces])
            ours = match_anchors(padded[..., :4], valid, priors)
            public = bt.public_match(faces[:, :4], priors, faces[:, 14].long(), faces[:, 4:14], 0.35, VARIANCES)
            public_positive = public[1] != 0
            assert torch.equal(ours.positive[0], public_positive), (seed, index)
            positive = ours.positive[0]
            our_offsets = encode(faces[ours.face_index[0], :4], priors, VARIANCES)[positive]
            same_face = torch.isclose(our_offsets, public[0][positive], atol=1e-5).all(dim=1)
            # anchors the public code gave to a hard face: that face's best anchor
            iou = box_iou(faces[:, :4], point_form(priors))
            best_iou, best_anchor = iou.max(dim=1)
            hard_best = set(best_anchor[best_iou < 0.2].tolist())
            differing = set(positive.nonzero().flatten()[~same_face].tolist())
            assert differing <= hard_best, (seed, index)
            positives += int(positive.sum())
            taken_over += len(differing)
    assert images >= 25 and positives > 3000
    assert taken_over <= 0.01 * positives


def test_step_clock_window():
    clock = bt.StepClock(warmup=2, iters=3, device=CPU)
    clock.source = range(10)
    seen = []
    for item in clock:
        seen.append(item)
        if item == 6:
            break
    result = clock.result(batch=4)
    assert seen == list(range(7)) and result["steps"] == 3 and result["img_per_s"] > 0


def test_step_clock_data_wait_share(monkeypatch):
    """The share of the window spent waiting for the source: a slow source against slow steps, on
    a fake clock (real sleeps would measure the machine's scheduling too)."""
    import types

    now = [0.0]
    monkeypatch.setattr(bt, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def slow_source():
        for item in range(8):
            now[0] += 0.03  # fetching a batch
            yield item

    clock = bt.StepClock(warmup=1, iters=6, device=CPU)
    clock.source = slow_source()
    for _ in clock:
        now[0] += 0.01  # the "training step"
    result = clock.result(batch=1)
    assert result["steps"] == 6 and result["elapsed_s"] == pytest.approx(0.24)
    assert result["data_wait_share"] == pytest.approx(0.75, abs=1e-3)  # 30 ms of every 40 ms step


# ------------------------------------------------------------------------------------------------
# Speed table, GPU script, imports
# ------------------------------------------------------------------------------------------------
def test_speed_table_renders_both_benchmarks(inference_run, train_run, tmp_path):
    out = tmp_path / "speed.md"
    text = speed_table.main([str(inference_run[2]), str(train_run[2]), "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    for expected in ("### Inference", "### Training", "### Targets of the issue", torch.__version__,
                     "python tools/benchmark_inference.py", "python tools/benchmark_train.py", "public-style",
                     "mobilenet0.25:2:128", "– (CPU run)", "preparing one loader batch for a step",
                     "augmentation on workers: copy ", "augmentation on device: copy ", "launched by the host in ",
                     "augmentation on device, compiled: copy ", "real, augment on device, compiled"):
        assert expected in text, expected
    tables, current = [], []
    for row in text.splitlines() + [""]:
        if row.startswith("|"):
            current.append(row.count("|"))
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 4 and all(len(set(t)) == 1 for t in tables)  # every row as wide as its header


def test_reports_name_the_cuda_allocator_settings(monkeypatch):
    """PYTORCH_CUDA_ALLOC_CONF changes the timings (expandable segments, say): a report run with it
    says so in its header and in the table's heading."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert "cuda_alloc_conf" not in bi.environment(CPU)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    report = {"env": bi.environment(CPU), "date": "2026-11-28", "command": "python tools/benchmark_train.py"}
    assert report["env"]["cuda_alloc_conf"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in "\n".join(speed_table.heading(report, "Training"))


def test_dense_disagreement_finds_what_nms_hides():
    """Two near-equal candidates of one face: a tiny score change flips which one NMS keeps (the
    final detections differ), while prior by prior the outputs agree; a moved box is caught."""
    from tools.fidelity import dense_disagreement, unmatched
    from utils.postprocess import postprocess

    boxes = torch.tensor([[[10.0, 10.0, 40.0, 40.0], [10.0, 10.0, 40.0, 41.6], [100.0, 100.0, 130.0, 130.0],
                           [200.0, 200.0, 210.0, 210.0]]])
    scores = torch.tensor([[0.99990, 0.99989, 0.9, 0.1]])
    landmarks = torch.zeros(1, 4, 10)
    flipped = scores.clone()
    flipped[0, 1] = 0.99991  # within any score tolerance, but now first for NMS
    rows = []
    for s in (scores, flipped):
        found = postprocess(boxes, s, landmarks, 0.5, 0.4)
        rows.append(torch.cat([found.boxes, found.scores[:, None], found.landmarks], dim=1).numpy())
    assert unmatched(rows[0], rows[1]) and unmatched(rows[1], rows[0])  # final detections differ
    same = dense_disagreement((boxes, scores, landmarks), (boxes, flipped, landmarks))
    assert same["passed"] and same["priors"] == 3 and same["disagreeing"] == 0
    moved = boxes.clone()
    moved[0, 2] += 2.0  # the face at 100 px moved 2 px right and down: IoU 0.77
    moved[0, 3] += 50.0  # under the score threshold in both: not compared
    off = dense_disagreement((boxes, scores, landmarks), (moved, scores, landmarks))
    assert not off["passed"] and off["disagreeing"] == 1 and off["min_iou"] < 0.9


def test_nms_near_ties_explain_flipped_choices_and_threshold_overlaps_but_not_moved_faces():
    """Per image, the detections without a counterpart are sorted out: two near-equal candidates of
    one face whose order flips, and a box whose "+1 pixel" overlap with a kept one crosses the NMS
    threshold (0.403 against 0.397), are NMS near-ties; a face moved by 3 px is not."""
    from tools.fidelity import nms_near_ties, unmatched
    from utils.postprocess import postprocess_to_host

    def iou_plus_one_offset(target: float) -> float:  # x shift of a 100 x 100 box for a "+1 pixel" IoU
        return 101 * (1 - target) / (1 + target)

    reference = torch.tensor([[[100.0, 100.0, 120.0, 125.0], [102.0, 101.0, 122.0, 126.0],  # one face, two priors
                               [300.0, 300.0, 330.0, 340.0],                               # the face that moves
                               [500.0, 0.0, 600.0, 100.0], [500.0 + iou_plus_one_offset(0.403), 0.0,
                                                             600.0 + iou_plus_one_offset(0.403), 100.0],
                               [50.0, 400.0, 80.0, 440.0], [0.0, 0.0, 5.0, 5.0]]])
    candidate = reference.clone()
    candidate[0, 2] += 3.0
    candidate[0, 4, 0::2] = reference[0, 3, 0::2] + iou_plus_one_offset(0.397)
    ref_scores = torch.tensor([[0.9822, 0.9821, 0.8, 0.95, 0.70, 0.9, 0.01]])
    cand_scores = torch.tensor([[0.9820, 0.9823, 0.8, 0.95, 0.70, 0.9, 0.01]])
    landmarks = torch.zeros(1, 7, 10)
    dense = [(reference, ref_scores, landmarks), (candidate, cand_scores, landmarks)]
    rows = [[postprocess_to_host(*outputs, 0.3, 0.4)[0]] for outputs in dense]
    assert len(rows[0][0]) == 4 and len(rows[1][0]) == 5  # the reference suppressed the box at IoU 0.403
    assert len(unmatched(rows[0][0], rows[1][0], max_score_diff=0.005)) == 2   # the first face's prior, the moved face
    assert len(unmatched(rows[1][0], rows[0][0], max_score_diff=0.005)) == 3   # its other prior, moved, the 0.397 box

    found = nms_near_ties(rows[0], rows[1], dense[0], dense[1], max_score_diff=0.005, max_landmark_diff=1.0)
    assert found["unmatched"] == 5 and found["near_ties"] == 3
    assert sorted(u.split(",")[0] for u in found["unexplained"]) == ["[300.0", "[303.0"]  # the moved face, both ways
    assert all("its prior differs on the other side" in u for u in found["unexplained"])
    # a clear winner is no near-tie: a box suppressed at IoU 0.6 by one scoring 0.95 in the reference is
    # kept by the candidate, where its suppressor moved away
    boxes = torch.tensor([[[0.0, 0.0, 100.0, 100.0], [25.0, 0.0, 125.0, 100.0]]])
    moved = boxes.clone()
    moved[0, 0] += 300.0
    scores, landmarks = torch.tensor([[0.95, 0.70]]), torch.zeros(1, 2, 10)
    dense = [(boxes, scores, landmarks), (moved, scores, landmarks)]
    rows = [[postprocess_to_host(*outputs, 0.3, 0.4)[0]] for outputs in dense]
    clear = nms_near_ties(rows[0], rows[1], dense[0], dense[1], max_score_diff=0.005, max_landmark_diff=1.0)
    assert clear["unmatched"] == 3 and clear["near_ties"] == 0
    assert any("[25.0, 0.0, 125.0, 100.0, 0.7]: suppressed by a detection scoring 0.9500 at IoU 0.6" in u
               for u in clear["unexplained"])


def test_failed_fidelity_rows_say_how_many_differences_nms_near_ties_explain(monkeypatch, mobilenet_weights, tmp_path):
    """The benchmark sorts the differences of a variant that fails the fidelity rule (here every
    comparison is marked failed, so the sorting runs on identical outputs: nothing to explain), and
    the speed table prints the count."""
    from tools import speed_table

    real_compare = bi.compare

    def failing(*args, **kwargs):
        return {**real_compare(*args, **kwargs), "passed": False}

    monkeypatch.setattr(bi, "compare", failing)
    argv = ["--device", "cpu", "--threads", "1", "--models", "mobilenet0.25", "--batch_sizes", "1",
            "--variants", "ref,fp32", "--iters", "1", "--warmup", "0", "--weights", f"mobilenet0.25={mobilenet_weights}",
            "--sample_images", "", "--out", str(tmp_path / "inference.jsonl")]
    report, _ = run_main(bi.main, argv)
    (row,) = [e for e in report["synthetic"] if e["variant"] == "fp32"]
    assert row["fidelity"]["nms_near_ties"] == {"unmatched": 0, "near_ties": 0, "unexplained": []}
    cell = speed_table.fidelity_cell({"fidelity": {**row["fidelity"], "unmatched_reference": 1,
                                                   "unmatched_candidate": 1, "compared": 750,
                                                   "nms_near_ties": {"unmatched": 2, "near_ties": 2}}})
    assert cell.startswith("**FAIL** (2/750 unmatched, 2 of them NMS near-ties)")


def test_nms_benchmark_chunks_give_the_detections_of_one_call(mobilenet_weights, widerface_sample, tmp_path):
    """tools/benchmark_nms.py: the published mobilenet0.25 at the evaluation threshold gives more
    candidates than the chunk, so the chunked calls really run; their detections equal one call's."""
    from tools import benchmark_nms

    out = tmp_path / "nms.jsonl"
    argv = ["--device", "cpu", "--threads", "1", "--weights", str(mobilenet_weights), "--batch", "4",
            "--size", "320x240", "--thresholds", "0.02,0.5", "--chunks", "0,300", "--iters", "1", "--warmup", "0",
            "--sample_images", str(widerface_sample / "val" / "images"), "--out", str(out)]
    report, _ = run_main(benchmark_nms.main, argv)
    check_header(report, "nms")
    evaluation, demo = report["cases"]
    assert evaluation["candidates"] > 300 > evaluation["candidates_max_image"] > 0
    assert evaluation["detections"] > demo["detections"] > 0
    assert [entry["chunk"] for entry in evaluation["chunks"]] == [0, 300]
    assert all(entry["same_detections"] and entry["ms"]["median"] > 0 for entry in evaluation["chunks"])
    rendered = speed_table.render(speed_table.read_reports([str(out)]))
    assert "| 0.02 | " in rendered and "| one call | " in rendered and "**no**" not in rendered


@pytest.mark.parametrize("per_image_anchors", [False, True])
def test_matching_benchmark_checks_ours_against_the_padded_baseline(widerface_sample, tmp_path, monkeypatch,
                                                                     per_image_anchors):
    """tools/benchmark_matching.py on real batches: both matchings agree and are timed; a matching
    that disagrees is reported as an error."""
    from layers.multibox_loss import MatchResult
    from tools import benchmark_matching

    out = tmp_path / "matching.jsonl"
    argv = ["--device", "cpu", "--threads", "1", "--dataset", str(widerface_sample), "--batch", "4", "--size", "160",
            "--batches", "2", "--iters", "1"] + (["--per_image_anchors"] if per_image_anchors else [])
    report, _ = run_main(benchmark_matching.main, argv + ["--out", str(out)])
    check_header(report, "matching")
    assert report["errors"] == [] and len(report["batches"]) == 2
    for row in report["batches"]:
        assert row["identical"] and row["faces"] >= row["most_faces_per_image"] > 0
        assert row["ours_ms"] > 0 and row["padded_ms"] > 0
    rendered = speed_table.render(speed_table.read_reports([str(out)]))
    assert "### Anchor matching" in rendered and "**no**" not in rendered

    real_match = benchmark_matching.match_anchors

    def wrong_match(*args, **kwargs) -> MatchResult:
        result = real_match(*args, **kwargs)
        positive = result.positive.clone()
        positive[0, 0] = ~positive[0, 0]
        return result._replace(positive=positive)

    monkeypatch.setattr(benchmark_matching, "match_anchors", wrong_match)
    report, _ = run_main(benchmark_matching.main, argv)
    assert len(report["errors"]) == 2 and not any(row["identical"] for row in report["batches"])


def test_speed_table_latest_keeps_the_last_report_of_each_file(inference_run, tmp_path, capsys):
    line = inference_run[2].read_text().splitlines()[-1]
    first, second = tmp_path / "inference.jsonl", tmp_path / "inference_compile.jsonl"
    first.write_text(line + "\n" + line + "\n")  # two runs appended to one file
    second.write_text(line + "\n")
    reports = speed_table.read_reports([str(first), str(second)])
    assert len(reports) == 3
    one = speed_table.render(reports[:1])
    both = speed_table.render(reports, latest=True)
    assert both.count("### Inference") == 2 == 2 * one.count("### Inference")
    with pytest.raises(SystemExit, match="cannot read .*missing.jsonl"):
        speed_table.main([str(tmp_path / "missing.jsonl")])
    speed_table.main([str(second), "--out", str(tmp_path / "new" / "speed.md")])
    assert (tmp_path / "new" / "speed.md").is_file()


def test_speed_table_target_verdicts():
    """Targets use the fastest variant whose fidelity passed; status only for GPU runs."""
    env = {"device": "NVIDIA H200", "device_type": "cuda", "torch": "2.11.0"}

    def entry(model, batch, variant, ips, ms, passed=True):
        return {"model": model, "batch": batch, "variant": variant, "images_per_s": ips,
                "latency_ms": {"median": ms, "p90": ms}, "stages_ms": {},
                "fidelity": {"passed": passed, "compared": 10, "unmatched_reference": 0 if passed else 3,
                             "unmatched_candidate": 0}}
    inference = {"benchmark": "inference", "env": env, "date": "2026-01-01", "command": "python x",
                 "synthetic": [{**entry("resnet50_cascade", 32, "fp16+graph", 1600.0, 20.0),
                                "weights": "/tmp/trained/resnet50_cascade.pth"},
                               entry("resnet50_cascade", 32, "bf16+graph", 9999.0, 3.2, passed=False),
                               entry("resnet50_cascade", 1, "fp16+graph", 300.0, 3.3),
                               entry("mobilenet0.25", 32, "fp16+graph", 4000.0, 8.0)],
                 "sample": {"images": 10, "distinct_sizes": 8, "confidence_threshold": 0.02, "variants": [],
                            "public_style": {}, "best": {"variant": "fp16+graph", "speedup_vs_public": 60.0}}}
    train = {"benchmark": "train", "env": env, "date": "2026-01-01", "command": "python y", "configs": [
        {"config": "mobilenet0.25:32:640", "variants": [],
         "summary": {"best_fixed_img_per_s": 800.0, "best_fixed_variant": "bf16", "speedup_vs_public_style": 3.0,
                     "real_ratio_to_fixed": {"workers": 0.8, "device": 0.85}}}]}
    rows = {row[0]: row for row in speed_table.target_rows([inference, train])}
    assert rows["ResNet-50 cascade 640×480 bs32 end to end"][3] == "met"
    # which weights made the figure (several reports count: random, published, trained weights)
    assert rows["ResNet-50 cascade 640×480 bs32 end to end"][2].startswith(
        "1,600 (fp16+graph; weights resnet50_cascade.pth)")
    # the faster variant that failed its fidelity check is shown, and does not count
    assert ("unfaithful: 9,999 (bf16+graph; random weights), fidelity **FAIL**"
            in rows["ResNet-50 cascade 640×480 bs32 end to end"][2])
    assert rows["mobilenet0.25 640×480 end to end"][3] == "**not met**"
    assert "unfaithful" not in rows["mobilenet0.25 640×480 end to end"][2]
    # streamed with the next network queued ahead: the target counts it, the table shows the serial run beside
    inference["synthetic"][3].update(stream_images_per_s=5200.0, stream_serial_images_per_s=4100.0)
    rows = {row[0]: row for row in speed_table.target_rows([inference, train])}
    assert rows["mobilenet0.25 640×480 end to end"][3] == "met"
    assert "| 4,000 | 5,200 (serial 4,100) |" in speed_table.render([inference, train])
    del inference["synthetic"][3]["stream_images_per_s"], inference["synthetic"][3]["stream_serial_images_per_s"]
    assert rows["ResNet-50 cascade batch-1 latency"][3] == "met"
    assert rows["sample WIDER images vs public-style pipeline, sizes seen before"][3] == "met"
    assert not any("new sizes" in name for name in rows)  # not measured: no row
    assert rows["mobilenet0.25 bs32@640 fixed batches"][3] == "met"
    assert rows["resnet50 bs24@840 fixed batches"][3] == "not measured"
    assert rows["mobilenet0.25:32:640 real data pipeline vs fixed batches"][3] == "**not met**"
    assert "Targets" in speed_table.render([inference, train])

    # on another GPU the training goal (2.5 x an H200 figure) falls back to the same-run ratio
    h100 = {**env, "device": "NVIDIA H100 80GB HBM3"}
    inference["sample"]["new_sizes"] = {"passes": 1, "images_per_pass": 10, "public_style": {"ms_per_img": 60.0},
                                        "ours": [{"pipeline": "a", "ms_per_img": 300.0, "speedup_vs_public": 0.2},
                                                 {"pipeline": "b", "ms_per_img": 1.0, "speedup_vs_public": 60.0}]}
    train["env"] = h100
    train["configs"].append({"config": "resnet50:24:840", "variants": [], "summary": {
        "best_fixed_img_per_s": 222.0, "best_fixed_variant": "bf16", "speedup_vs_public_style": 2.8}})
    rows = {row[0]: row for row in speed_table.target_rows([inference, train])}
    assert rows["resnet50 bs24@840 fixed batches"][3].startswith("same-run ratio met (2.8×")
    train["configs"][-1]["summary"]["speedup_vs_public_style"] = 2.2
    rows = {row[0]: row for row in speed_table.target_rows([inference, train])}
    assert rows["resnet50 bs24@840 fixed batches"][3] == "**not met**"
    fresh = rows["sample WIDER images vs public-style pipeline, new sizes (one pass over a data set)"]
    assert fresh[2] == "60.0× (FaceDetector, b)" and fresh[3] == "met"
    assert "| FaceDetector, a | – | 300 | 0.20 |" in speed_table.render([inference, train])
    inference["sample"]["new_sizes"]["ours"][0]["channels_last"] = True
    inference["sample"]["new_sizes"]["other_models"] = [
        {"model": "resnet50_cascade", "ours": [{"pipeline": "c", "ms_per_img": 20.0, "channels_last": False}]},
        {"model": "resnet50", "error": "RuntimeError: out of memory"}]
    rendered = speed_table.render([inference, train])
    assert "| FaceDetector, a | NHWC | 300 | 0.20 |" in rendered
    assert "| resnet50_cascade | FaceDetector, c | NCHW | 20.0 |" in rendered
    assert "| resnet50 | – | – | RuntimeError: out of memory |" in rendered

    # a second training report (gpu_check's train_compile step: fixed batches only) counts where it
    # is faster, and the real-pipeline ratios of the first report stay
    compiled = {"benchmark": "train", "env": h100, "date": "2026-01-01", "command": "python z", "configs": [
        {"config": "resnet50:24:840", "variants": [], "summary": {
            "best_fixed_img_per_s": 300.0, "best_fixed_variant": "bf16+compile", "speedup_vs_public_style": 3.8}},
        {"config": "mobilenet0.25:32:640", "variants": [], "summary": {
            "best_fixed_img_per_s": 700.0, "best_fixed_variant": "bf16+compile", "speedup_vs_public_style": 2.6}}]}
    rows = {row[0]: row for row in speed_table.target_rows([inference, train, compiled])}
    assert rows["resnet50 bs24@840 fixed batches"][2].startswith("300 (bf16+compile; 3.8×")
    assert rows["resnet50 bs24@840 fixed batches"][3] == "met"
    assert rows["mobilenet0.25 bs32@640 fixed batches"][2].startswith("800 (bf16; 3.0×")
    assert rows["mobilenet0.25:32:640 real data pipeline vs fixed batches"][2].startswith("0.85")
    assert "resnet50:24:840 real data pipeline vs fixed batches" in rows  # measured nowhere: shown as such
    assert rows["resnet50:24:840 real data pipeline vs fixed batches"][3] == "not measured"


def test_interrupted_training_config_still_gets_its_targets(tmp_path, monkeypatch):
    """Run 7: the step limit interrupted benchmark_train inside the ResNet-50 config, whose rows were
    then missing from the targets table. The summary comes from the rows measured; rows replayed from
    a CUDA graph stay out (train.py does not train that way)."""
    from tools.benchmark_train import summarise_config

    def row(variant, mode, ips, **extra):
        return {"variant": variant, "mode": mode, "img_per_s": ips, **extra}
    entry = {"config": "resnet50:24:840", "variants": [
        row("public", "fixed", 70.0), row("bf16", "fixed", 230.0), row("fp32", "fixed", 120.0),
        row("bf16", "fixed, busy processes", 260.0), row("bf16+graph", "fixed, CUDA graph", 400.0),
        row("bf16", "real", 207.0, augment_on="workers", ratio_to_fixed=0.9),
        {"variant": "fp16", "mode": "fixed", "error": "RuntimeError: boom"}]}
    summarise_config(entry)
    assert entry["summary"] == {
        "best_fixed_variant": "bf16", "best_fixed_img_per_s": 230.0, "public_style_img_per_s": 70.0,
        "speedup_vs_public_style": 3.286, "public_reference_img_per_s": 99.0,
        "public_reference_device": "NVIDIA H200, torch 2.11", "ratio_vs_public_reference": 2.323,
        "target_ratio": 2.5, "real_ratio_to_fixed": {"workers": 0.9}}
    from tools import benchmark_train

    def interrupted(spec, args, device, errors, notes, entry):
        entry.update(config=spec, variants=[row("bf16", "fixed", 230.0)])
        raise KeyboardInterrupt
    monkeypatch.setattr(benchmark_train, "measure_config", interrupted)
    report = benchmark_train.main(["--device", "cpu", "--configs", "resnet50:24:840", "--out", str(tmp_path / "t.jsonl")])
    assert report["interrupted"] and report["configs"][0]["summary"]["best_fixed_img_per_s"] == 230.0
    nothing = {"config": "resnet50:24:840", "variants": [row("public", "fixed", 70.0)]}
    summarise_config(nothing)
    assert "summary" not in nothing

    # a report written before benchmark_train summarised interrupted configs (run 7's)
    env = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "torch": "2.11.0"}
    old = {"benchmark": "train", "env": env, "date": "2026-11-27", "command": "python x", "interrupted": True,
           "configs": [{"config": "mobilenet0.25:32:640", "variants": [], "summary": {
                           "best_fixed_img_per_s": 1110.0, "best_fixed_variant": "bf16", "speedup_vs_public_style": 4.7}},
                       {"config": "resnet50:24:840", "variants": entry["variants"]}]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(old) + "\n")
    rows = {r[0]: r for r in speed_table.target_rows(speed_table.read_reports([str(path)]))}
    assert rows["resnet50 bs24@840 fixed batches"][2] == "230 (bf16; 3.3× public-style here)"
    assert rows["resnet50:24:840 real data pipeline vs fixed batches"][2] == "0.900"
    assert rows["mobilenet0.25 bs32@640 fixed batches"][2].startswith("1,110 (bf16")


def test_public_style_folder_pass_finds_what_face_detector_finds(widerface_sample, mobilenet_weights, tmp_path,
                                                                 one_cpu_thread):
    """The baseline of gpu_check's cli step: one public-style pass over a folder, run as a script,
    counts the detections our detector makes at test.py's settings (confidence 0.02, no top-k cut)."""
    from models.detector import FaceDetector
    from utils.image_io import read_image

    sources = sorted((widerface_sample / "val/images").rglob("*.jpg"))[:2]
    (tmp_path / "val/images/event").mkdir(parents=True)  # no label.txt: every val/images/<event>/*.jpg
    for source in sources:
        (tmp_path / "val/images/event" / source.name).symlink_to(source)
    result = subprocess.run([sys.executable, "tools/public_pipeline.py", mobilenet_weights, str(tmp_path), "cpu"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    timing = json.loads(result.stdout)
    assert timing["images"] == 2 and timing["ms_per_img"] > 0
    detector = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.02, top_k=None, keep_top_k=None)
    assert timing["detections"] == sum(len(detector.detect(read_image(p)).scores) for p in sources) > 100
    usage = subprocess.run([sys.executable, "tools/public_pipeline.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert usage.returncode != 0 and "usage:" in usage.stderr


def test_cli_benchmark_times_test_py_against_the_public_pass(widerface_sample, mobilenet_weights, tmp_path):
    """tools/benchmark_cli.py: fresh test.py processes per setting and round against one public-style
    pass, one JSON line that speed_table renders; a failing process is an error, not a crash."""
    (tmp_path / "ds").symlink_to(widerface_sample)  # a path relative to where the command runs
    out = tmp_path / "cli.jsonl"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools/benchmark_cli.py"), "--device", "cpu",
                             "--dataset", "ds", "--weights", mobilenet_weights, "--layouts", "false",
                             "--extra", "--pad_to 1024 --batch_size 4", "--rounds", "2", "--workers", "0",
                             "--out", "cli.jsonl"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=SLOW_SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "cli" and report["errors"] == [] and report["rounds"] == 2
    public = report["public_style"]
    assert public["images"] == 10 and public["sizes"] == 8 and public["ms_per_img"] > 0
    assert len(public["rounds_ms_per_img"]) == 2 and public["ms_per_img"] == min(public["rounds_ms_per_img"])
    runs = {t["pipeline"]: t for t in report["test_py"]}
    # two settings, not three (two fresh processes fewer: ~30 s of CI's 2 cores); --channels_last auto
    # is test.py's default, run in tests/test_evaluation.py
    assert list(runs) == ["test.py --channels_last false", "test.py --pad_to 1024 --batch_size 4"]
    for run in runs.values():
        assert run["images"] == 10 and run["process_s"] > run["seconds"] > 0
        assert len(run["rounds_ms_per_img"]) == 2 and run["ms_per_img"] == min(run["rounds_ms_per_img"])
        assert run["speedup_vs_public"] == pytest.approx(public["ms_per_img"] / run["ms_per_img"], rel=1e-3)
    aps = [run["aps"] for run in runs.values()]
    assert aps[0]["easy"] > 0.9 and all(run == aps[0] for run in aps)  # NCHW and exact padding (NHWC) move no AP
    rendered = speed_table.render(speed_table.read_reports([str(out)]))
    assert "| test.py --channels_last false |" in rendered and "test.py in a fresh process" in rendered

    broken = subprocess.run([sys.executable, "tools/benchmark_cli.py", "--device", "cpu", "--dataset",
                             str(widerface_sample), "--weights", str(tmp_path / "missing.pth"), "--layouts", "auto",
                             "--extra", "", "--rounds", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1
    errors = json.loads(broken.stdout.strip().splitlines()[-1])["errors"]
    assert len(errors) == 2 and errors[0].startswith("public-style") and "test.py --channels_last auto" in errors[1]


def test_cli_benchmark_interrupted_still_writes_what_it_measured(monkeypatch, tmp_path, capsys):
    """gpu_check's step limit interrupts with SIGINT: the rounds done so far are kept."""
    from tools import benchmark_cli

    done = []

    def measure(args, options, results_dir):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(options)
        return {"pipeline": " ".join(["test.py", *options]), "channels_last": options[-1], "ms_per_img": 10.0}

    monkeypatch.setattr(benchmark_cli, "measure_public", lambda args: {"pipeline": "public-style", "ms_per_img": 40.0})
    monkeypatch.setattr(benchmark_cli, "measure_test_py", measure)
    out = tmp_path / "cli.jsonl"
    report = benchmark_cli.main(["--device", "cpu", "--layouts", "auto,true,false", "--out", str(out)])
    assert report["interrupted"] and json.loads(out.read_text())["interrupted"]
    assert [t["channels_last"] for t in report["test_py"]] == ["auto", "true"]
    assert report["test_py"][0]["speedup_vs_public"] == 4.0


def test_cli_benchmark_keeps_the_fastest_round():
    from tools.benchmark_cli import fastest_rounds

    runs = [{"pipeline": "auto", "ms_per_img": 50.0}, {"pipeline": "true", "ms_per_img": 40.0},
            {"pipeline": "true", "ms_per_img": 30.0}, {"pipeline": "auto", "ms_per_img": 70.0}]
    kept = fastest_rounds(runs, public_ms=60.0)
    assert [(k["pipeline"], k["ms_per_img"], k["rounds_ms_per_img"], k["speedup_vs_public"]) for k in kept] == [
        ("auto", 50.0, [50.0, 70.0], 1.2), ("true", 30.0, [40.0, 30.0], 2.0)]
    assert fastest_rounds(runs[:1], public_ms=None)[0]["speedup_vs_public"] is None


def test_gpu_check_script_smoke(tmp_path, widerface_sample, mobilenet_weights):
    """tools/gpu_check.sh --smoke: the GPU session's one command, with tiny CPU settings."""
    shared = widerface_sample.parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RETINAFACE_SHARED": str(shared), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=SLOW_SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"gpu_check.log", "inference.jsonl", "cli.jsonl", "train.jsonl", "speed_table.md",
            "train_profile.txt"} <= files
    assert len(files) <= 8  # the GPU tool brings back at most 8 files
    assert "### Targets" in (tmp_path / "out" / "speed_table.md").read_text()
    # the train step's augmentation modes, the compiled kernels among them (the first rows of a lease)
    reports = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    (train,) = [report for report in reports if report["benchmark"] == "train"]  # matching, loader: their own
    assert set(train["configs"][0]["loader_only"]) == {"workers", "device+compile"} and not train["errors"]


def test_gpu_check_deadline_cuts_step_caps_and_skips_what_no_longer_fits(tmp_path, widerface_sample,
                                                                        mobilenet_weights):
    """GPU_CHECK_DEADLINE: run 7's call was stopped by the device call's limit before its table; with a
    deadline every step's cap shrinks to what is left (30 s kept for the table), a step that no longer
    fits is skipped and logged, and the exit status says the call was incomplete.

    The train step is made to run until its cut cap (its benchmark, then a sleep), so that the loader
    step is skipped however fast or loaded this machine is."""
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\n"{sys.executable}" "$@" || exit $?\n'
                      'case " $* " in *benchmark_train.py*) exec sleep 600 ;; esac\n')
    python.chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RETINAFACE_SHARED": str(widerface_sample.parents[1]),
           "PYTHON": str(python), "GPU_CHECK_STEPS": "train loader table", "GPU_CHECK_DEADLINE": "80"}
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=200)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert result.returncode == 1, log[-3000:]
    assert re.search(r"== train: cap cut from 120 to \d+ s by GPU_CHECK_DEADLINE=80", log), log[-3000:]
    assert re.search(r"== loader: skipped, -?\d+ s left before GPU_CHECK_DEADLINE=80", log), log[-3000:]
    assert "tools/benchmark_loader.py" not in log
    assert "### Training" in (tmp_path / "out" / "speed_table.md").read_text()


def test_gpu_check_refuses_to_run_without_the_shared_data(tmp_path):
    """On a GPU lease, missing sample data would turn most CUDA tests into skips and the benchmarks
    into noise measurements that still exit 0: the script stops first."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RETINAFACE_SHARED": str(tmp_path / "missing"),
           "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ERROR: no " in result.stdout and "carry .gpu_shared" in result.stdout
    assert "cuda_tests" not in (tmp_path / "out" / "gpu_check.log").read_text()


def test_gpu_check_refuses_unknown_arguments_and_steps_and_a_machine_without_cuda(tmp_path, widerface_sample,
                                                                                 mobilenet_weights):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RETINAFACE_SHARED": str(widerface_sample.parents[1]),
           "PYTHON": sys.executable}

    def run(*args, steps=None):
        extra = {"GPU_CHECK_STEPS": steps} if steps else {}
        return subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=REPO_ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=120)

    result = run("--smoke", steps="trian table")  # a typo used to run nothing and report success
    assert result.returncode == 2 and "unknown step 'trian'" in result.stderr
    result = run("--smok")
    assert result.returncode == 2 and "unknown arguments: --smok" in result.stderr
    for deadline in ("9m", "30"):
        result = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120, env={**env, "GPU_CHECK_DEADLINE": deadline})
        assert result.returncode == 2 and f"at least 60 (got '{deadline}')" in result.stderr
    # a leading zero is decimal (bash arithmetic would read 0540 as octal 352, and 090 as an error)
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env={**env, "GPU_CHECK_DEADLINE": "090", "GPU_CHECK_STEPS": "table"})
    assert "(deadline 90 s)" in result.stdout and "error" not in result.stderr, result.stdout + result.stderr
    assert run("--help").returncode == 0
    if not torch.cuda.is_available():  # the benchmarks would only record errors
        result = run()
        assert result.returncode == 2 and "CUDA is not available" in result.stdout


def test_precision_check_on_sample_images(widerface_sample, mobilenet_weights, tmp_path, capsys, one_cpu_thread):
    from tools import precision_check

    images = sorted((widerface_sample / "val/images").rglob("*.jpg"))[:2]
    for path in images:
        (tmp_path / path.name).symlink_to(path)
    assert precision_check.main(["--weights", str(mobilenet_weights), "--images", str(tmp_path), "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and report["fp16"]["detections"] == report["bf16"]["detections"] > 10
    # fp16 keeps every detection (as on the GPU path the inference default uses); bf16 moves some
    assert report["fp16"]["moved"] == 0 and report["fp16"]["max_score_diff"] < 0.01
    assert report["bf16"]["max_score_diff"] > report["fp16"]["max_score_diff"]


def test_random_resnet_amplifies_rounding_more_than_the_published_mobilenet(widerface_sample, mobilenet_weights,
                                                                           one_cpu_thread):
    """Why the GPU benchmark's fidelity verdicts on the random ResNet-50 cascade say little: it turns
    16-bit rounding into output differences many times larger (relative to its outputs' spread)
    than the trained mobilenet0.25 does."""
    from tools import precision_check

    _, arrays = bi.load_sample_arrays(widerface_sample / "val" / "images", 3)
    report = precision_check.sensitivity_report(str(mobilenet_weights), arrays, (320, 240), 2,
                                                extra=[str(mobilenet_weights)])
    published, random = report["mobilenet0.25"], report["resnet50_cascade"]
    # --sensitivity_weights: any checkpoint, measured the same way (here the published one again)
    extra = report[Path(mobilenet_weights).name]
    assert {k: extra[k] for k in ("fp16", "bf16")} == {k: published[k] for k in ("fp16", "bf16")}
    assert random["weights"].startswith("random")
    for fmt in ("fp16", "bf16"):
        for output in ("box_offsets", "class_logits"):
            assert 0 < published[fmt][output] and 5 * published[fmt][output] < random[fmt][output], report
    assert published["fp16"]["box_offsets"] < 0.005  # the trained network: a fraction of a percent


def test_benchmarks_do_not_import_mediapipe():
    code = ("import sys; import tools.benchmark_inference, tools.benchmark_train, tools.speed_table, "
            "models.detector; bad = [m for m in sys.modules if m.startswith('mediapipe')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


def test_augmentation_benchmark_smoke(widerface_sample, one_cpu_thread, capsys):
    from tools import benchmark_augmentation

    result = benchmark_augmentation.main(["--dataset", str(widerface_sample), "--rounds", "4", "--im_size", "128",
                                          "--compare_batches", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["ours_ms_per_img"] > 0 and result["public_reconstruction_ms_per_img"] > 0
    assert result["ours_with_cpu_conversion_ms_per_img"] > 0
    assert result["speedup_with_conversion_on_both_sides"] == pytest.approx(
        result["public_reconstruction_ms_per_img"] / result["ours_with_cpu_conversion_ms_per_img"], abs=0.01)
    assert set(result["worker_ms_per_img"]) == {"workers", "device"}
    assert all(v > 0 for v in result["worker_images_per_s"].values())
    device = result["device_batch_ms"]  # the device half of --augment_on device, timed on this core
    assert device["images"] == 32 and device["pixels"] > 32 * 100
    assert device["photometric"] > 0 and device["augment"] > 0 and device["augment_compiled"] > 0
    assert result["first_compiled_call_s"] > 0
    compared = result["compiled_vs_eager"]  # rare one-level differences (dense weights summed in another order)
    assert compared["batches"] == 2 and compared["values"] == 2 * 32 * 3 * 128 * 128
    assert compared["differing"] <= compared["values"] * 1e-6 and compared["max_difference"] <= 1


def test_loader_benchmark_smoke(widerface_sample, one_cpu_thread, capsys):
    """Both collates deliver every batch (the tool stops otherwise) and the JSON line is printed."""
    from tools import benchmark_loader

    result = benchmark_loader.main(["--dataset", str(widerface_sample), "--batch_size", "4", "--batches", "3",
                                    "--workers", "1", "--im_size", "96", "--rounds", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert set(result["results"]) == {"padded_kept", "padded", "per_image"}
    for figures in result["results"].values():
        assert figures["receiving_thread_cpu_ms_per_batch"] > 0 and figures["drain_ms_per_batch"] > 0
    from tools import speed_table

    markdown = speed_table.render([result])
    assert "tools/benchmark_loader.py" in markdown and "one target tensor per image" in markdown


def test_per_image_collate_of_the_loader_benchmark_keeps_what_training_batches_hold(widerface_sample):
    """The baseline batches the same images and reports as train.py's collate; only the targets'
    form differs (one tensor per image against one padded tensor)."""
    from layers.multibox_loss import pad_targets
    from tools.benchmark_loader import collate_per_image
    from utils.data_loaders import dataset_from_root
    from utils.train_data import EpochSeededDataset, collate_with_report, train_transform

    dataset = EpochSeededDataset(dataset_from_root(widerface_sample, "val", train_transform(96, 0)), 0, report=True)
    samples = [dataset[(index, 0)] for index in range(4)]
    images, per_image, report = collate_per_image(samples)
    padded_images, padded, padded_report = collate_with_report(samples)
    assert torch.equal(images, padded_images) and report == padded_report
    assert isinstance(per_image, list) and len(per_image) == 4
    from_list = pad_targets(per_image)
    assert torch.equal(from_list.targets, padded.targets) and torch.equal(from_list.valid, padded.valid)


def test_benchmark_cpu_takes_a_published_weights_name(tmp_path):
    """``--weights mobilenet0.25`` is a name FaceDetector fetches, not a missing file: the run gets
    past the argument check (to the empty image folder here)."""
    from tools import benchmark_cpu

    with pytest.raises(SystemExit, match=f"no images under {tmp_path}"):
        benchmark_cpu.main(["--weights", "mobilenet0.25", "--images", str(tmp_path)])


@pytest.mark.parametrize("module,argv,message", [
    ("benchmark_cpu", ["--weights", "/nonexistent.pth"], "--weights: file not found: /nonexistent.pth"),
    ("benchmark_cpu", ["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    ("benchmark_cpu", ["--onnx", "/nonexistent.onnx"], "--onnx: file not found: /nonexistent.onnx"),
    ("benchmark_cpu", ["--pad_to", "128", "--pad_batch", "0"],
     "argument --pad_batch: expected a positive integer, got '0'"),
    ("benchmark_metric", ["--gt_dir", "/nonexistent"], "--gt_dir: folder not found: /nonexistent"),
    ("benchmark_augmentation", ["--dataset", "/nonexistent"], "--dataset: no val/label.txt in /nonexistent"),
    ("benchmark_inference", ["--device", "cpu", "--batch_sizes", "0"],
     "--batch_sizes '0': expected comma-separated positive integers"),
    ("benchmark_inference", ["--device", "cpu", "--batch_sizes", "1,²"],
     "--batch_sizes '1,²': expected comma-separated positive integers"),
    ("benchmark_cli", ["--device", "cpu", "--dataset", "/nonexistent"],
     "--dataset: no val/images/ folder in /nonexistent"),
    # these gave a traceback (after loading the models, for the variants)
    ("benchmark_inference", ["--device", "cpu", "--size", "640"],
     "--size '640': expected WIDTHxHEIGHT in pixels, e.g. 640x480"),
    ("benchmark_inference", ["--device", "cpu", "--variants", "fp99"],
     "variant 'fp99': start with one of ('fp32', 'tf32', 'bf16', 'fp16') or 'ref'"),
    ("benchmark_inference", ["--device", "cpu", "--iters", "0"], "--iters 0: expected at least 1 timed batch"),
    ("tta_check", ["--weights", "w.pth", "--dataset", "d", "--scales", "abc"],
     "argument --scales: expected comma-separated integers >= 0, got 'abc'"),
])
def test_benchmark_argument_errors_are_one_line_before_any_work(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as info:
        importlib.import_module(f"tools.{module}").main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f": error: {message}"), err  # after the program name (argv[0])


@pytest.mark.parametrize("module,argv", [
    ("benchmark_inference", ["--device", "cpu", "--models", "mobilenet0.25", "--batch_sizes", "1"]),
    ("benchmark_nms", ["--device", "cpu"]),
    ("benchmark_train", ["--device", "cpu"]),
])
def test_an_out_file_that_cannot_be_written_stops_the_benchmark_before_it_runs(module, argv, tmp_path, capsys,
                                                                                monkeypatch):
    """The report was appended after the whole run (minutes of a GPU lease), then failed with a traceback."""
    import importlib

    benchmark = importlib.import_module(f"tools.{module}")
    with pytest.raises(SystemExit) as info:
        benchmark.main([*argv, "--out", str(tmp_path)])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: --out {tmp_path}: Is a directory")


def test_cpu_benchmark_calls_pipelines_that_disagree_no_comparison():
    from tools.benchmark_cpu import MAX_UNMATCHED_SHARE, disagreements

    report = {"images": 2, "onnx_detections_score_ge_0.5_unmatched_vs_ours": 30,
              "detections_score_ge_0.5_unmatched_between_pipelines": 0}
    assert MAX_UNMATCHED_SHARE * 1000 < 30 < MAX_UNMATCHED_SHARE * 4000
    assert disagreements(report, 1000) == ["onnx_detections_score_ge_0.5_unmatched_vs_ours = 30"]
    assert disagreements(report, 4000) == []  # 30 of 4000: within the near-ties of float differences


def test_speed_table_survives_cut_reports(tmp_path, capsys):
    """What an interrupted or killed GPU step leaves: a cut JSON line (left out with a warning, the
    rest rendered), a sample section without its "best" (taken from the timed faithful variants),
    and a training config whose fastest fixed variant (fp16) has no real-pipeline row of its own."""
    env = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "torch": "2.11.0"}
    sample = {"images": 10, "distinct_sizes": 8, "confidence_threshold": 0.02, "public_style": {"ms_per_img": 400.0},
              "variants": [{"variant": "ref", "ms_per_img": 40.0, "speedup_vs_public": 10.0,
                            "fidelity": {"passed": True}},
                           {"variant": "fp16+graph", "ms_per_img": 8.0, "speedup_vs_public": 50.0,
                            "fidelity": {"passed": True}},
                           {"variant": "bf16+graph", "ms_per_img": 4.0, "speedup_vs_public": 100.0,
                            "fidelity": {"passed": False}}],
              "face_detector_api": {"settings": "FaceDetector()", "ms_per_img": 10.0, "speedup_vs_public": 40.0,
                                    "fidelity": {"passed": True}}}
    inference = {"benchmark": "inference", "env": env, "date": "2026-01-01", "command": "x", "synthetic": [],
                 "sample": sample}
    train_entry = {"config": "resnet50:24:840", "variants": [
        {"variant": "public", "mode": "fixed", "img_per_s": 80.0},
        {"variant": "fp16", "mode": "fixed", "img_per_s": 260.0},
        {"variant": "bf16+cuda_graphs", "mode": "fixed", "img_per_s": 237.0},
        {"variant": "bf16+cuda_graphs", "mode": "real", "augment_on": "workers", "img_per_s": 234.0},
        {"variant": "bf16+cuda_graphs+ahead", "mode": "real", "augment_on": "workers", "img_per_s": 250.0},
        {"variant": "bf16+cuda_graphs+inline", "mode": "real", "augment_on": "workers", "img_per_s": 255.0}]}
    bt.summarise_config(train_entry)
    assert train_entry["summary"]["best_fixed_variant"] == "fp16"
    # 234 / 260: the faster +ahead / +inline rows are the alternatives, the plain row is train.py's way
    assert train_entry["summary"]["real_ratio_to_fixed"] == {"workers": pytest.approx(0.9, abs=0.001)}
    train = {"benchmark": "train", "env": env, "date": "2026-01-01", "command": "y", "configs": [train_entry]}
    path = tmp_path / "gpu.jsonl"
    path.write_text(json.dumps(inference) + "\n" + json.dumps(train)[:200] + "\n")
    reports = speed_table.read_reports([str(path)])
    assert [r["benchmark"] for r in reports] == ["inference"]
    assert f"{path}:2: not a JSON line, left out" in capsys.readouterr().err
    rows = {row[0]: row for row in speed_table.target_rows(reports + [train])}
    assert rows["sample WIDER images vs public-style pipeline, sizes seen before"][2] == "50.0× (fp16+graph)"
    assert rows["resnet50:24:840 real data pipeline vs fixed batches"][2] == "0.900"
