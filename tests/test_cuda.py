"""The CUDA code paths: CUDA graphs, 16-bit autocast, pinned copies, device augmentation and a
training run on the GPU. Skipped without CUDA (CI and the development machines have none);
``tools/gpu_check.sh`` runs this file first on a lent GPU."""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by tools/gpu_check.sh)")

CUDA = torch.device("cuda")


def _sample_images(widerface_sample: Path) -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in sorted((widerface_sample / "val" / "images").rglob("*.jpg"))]


def test_cuda_graph_replay_equals_eager_and_follows_the_capture_policy(mobilenet_weights):
    from models.dense_path import DensePath
    from utils.checkpoint import load_model

    model = load_model(mobilenet_weights).to(CUDA)
    images = torch.randint(0, 256, (4, 480, 640, 3), dtype=torch.uint8).pin_memory()
    eager = DensePath(model, CUDA, precision="fp16", cuda_graphs=False)
    graphs = DensePath(model, CUDA, precision="fp16", cuda_graphs=True, max_graphs=1)
    expected = [t.clone() for t in eager(images)]
    first = [t.clone() for t in graphs(images)]
    assert graphs.graph_shapes == []                     # first sighting: eager
    second = [t.clone() for t in graphs(images)]
    assert graphs.graph_shapes == [tuple(images.shape)]  # second: captured and replayed
    third = graphs(images)
    for outputs in (first, second, third):
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    # the graph keeps its priors: evicting the prior cache and reusing that memory changes nothing
    from layers.prior_box import _priors_cached
    _priors_cached.cache_clear()
    garbage = [torch.full((20000, 4), 1e6, device=CUDA) for _ in range(8)]
    for got, want in zip(graphs(images), expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    del garbage
    other = images[:2].clone().pin_memory()
    graphs(other)
    graphs(other)
    assert graphs.graph_shapes == [tuple(images.shape)]  # max_graphs=1: later shapes stay eager
    torch.testing.assert_close(graphs(other)[1], eager(other)[1], rtol=1e-3, atol=1e-2)


def test_graph_replay_makes_no_host_synchronisation(mobilenet_weights):
    from models.dense_path import DensePath
    from utils.checkpoint import load_model

    dense = DensePath(load_model(mobilenet_weights).to(CUDA), CUDA, precision="fp16", cuda_graphs=True)
    images = torch.randint(0, 256, (8, 480, 640, 3), dtype=torch.uint8).pin_memory()
    dense.prepare(images)
    torch.cuda.set_sync_debug_mode("error")
    try:
        dense(images)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_face_detector_fp16_graphs_match_cpu_fp32(mobilenet_weights, widerface_sample):
    from models.detector import FaceDetector
    from tools.fidelity import as_rows, unmatched

    images = _sample_images(widerface_sample)
    cpu = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.3)
    references = [cpu.detect(image) for image in images]
    for channels_last in (None, True):  # the CUDA default for mobilenet0.25 (NCHW), and NHWC
        gpu = FaceDetector(mobilenet_weights, device="cuda", confidence_threshold=0.3, half=True,
                           channels_last=channels_last)
        assert gpu.dense.channels_last is bool(channels_last)
        for _ in range(3):  # eager, capture, replay
            found = gpu.detect(images)
        for reference, ours in zip(references, found):
            expected = as_rows(reference.boxes, reference.scores, reference.landmarks)
            actual = as_rows(ours.boxes, ours.scores, ours.landmarks)
            assert unmatched(expected, actual, max_score_diff=0.01) == []
            assert unmatched(actual, expected, max_score_diff=0.01) == []
        assert gpu.dense.cuda_graphs and gpu.dense.graph_shapes


def test_padded_batches_replay_from_one_graph_with_each_batch_s_sizes(mobilenet_weights, widerface_sample):
    """Exact padding under CUDA graphs: the image sizes are a static input copied before each replay."""
    from models.detector import FaceDetector
    from tools.fidelity import as_rows, unmatched

    images = _sample_images(widerface_sample)  # 1024 wide, 521 to 1024 high: one 1024x1024 canvas
    cpu = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.3)
    gpu = FaceDetector(mobilenet_weights, device="cuda", confidence_threshold=0.3, half=True, pad_to=1024,
                       batch_size=2)
    found = gpu.detect(images)  # five batches of two: eager, capture, then replays with other sizes
    assert gpu.dense.graph_shapes == [(2, 1024, 1024, 3, 1)]
    batch = torch.full((2, 1024, 1024, 3), 117, dtype=torch.uint8).pin_memory()
    sizes = torch.tensor([[700, 1024], [1024, 999]]).pin_memory()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.dense(batch, sizes=sizes)  # a replay
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for image, ours in zip(images, found):
        reference = cpu.detect(image)
        expected = as_rows(reference.boxes, reference.scores, reference.landmarks)
        actual = as_rows(ours.boxes, ours.scores, ours.landmarks)
        assert unmatched(expected, actual, max_score_diff=0.01) == []
        assert unmatched(actual, expected, max_score_diff=0.01) == []


def test_batches_submitted_ahead_keep_their_own_detections_under_graph_replay(mobilenet_weights, widerface_sample):
    """``submit`` ahead (test.py keeps one batch in flight): batch B replays the same CUDA graph, into
    the same output buffers, before batch A is post-processed on the side stream; A must still get
    its own detections (DeferredPostprocess copies the outputs first)."""
    from models.detector import FaceDetector

    images = _sample_images(widerface_sample)
    first, second = [images[0]] * 2, [np.ascontiguousarray(images[0][::-1])] * 2  # one shape, other content
    gpu = FaceDetector(mobilenet_weights, device="cuda", confidence_threshold=0.3, half=True)
    for _ in range(2):  # eager, capture
        expected = [gpu.detect_batch(first), gpu.detect_batch(second)]
    assert gpu.dense.graph_shapes == [(2, *images[0].shape)]
    for _ in range(3):
        handles = [gpu.submit(first), gpu.submit(second)]
        for handle, want in zip(handles, expected):
            for got, ref in zip(handle.result(), want):
                np.testing.assert_array_equal(got.boxes, ref.boxes)
                np.testing.assert_array_equal(got.scores, ref.scores)
    assert not np.array_equal(expected[0][0].boxes, expected[1][0].boxes)  # the two batches do differ


def test_device_augmentation_on_cuda_matches_the_cpu(widerface_sample):
    from utils.data_loaders import dataset_from_root, detection_collate, images_to_network_input
    from utils.device_augment import DeferredTrainTransform, augment

    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(640, rng=0))
    batch, _ = detection_collate([dataset[i] for i in range(len(dataset))])
    expected = augment(batch, resize_dtype=torch.float32)
    pinned = batch.pin_memory()
    images_to_network_input(pinned, CUDA)  # per-device constants are made once, on the first batch
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours = images_to_network_input(pinned, CUDA)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ours.device.type == "cuda"
    difference = (ours.cpu() - expected).abs()
    # float16 resize products (a level at most; the colour steps are the same table lookups on both)
    assert difference.max() <= 2 and difference.mean() < 0.05


@pytest.mark.parametrize("mode", ["ahead", "copy_ahead"])
def test_batches_prepared_ahead_on_a_side_stream_equal_batches_prepared_inline(widerface_sample, monkeypatch, mode):
    """train_one_epoch's batches (``prepared_batches``) with augmentation on the device: prepared
    (``ahead``) or copied (``copy_ahead``) on a side stream during the step before, without host
    syncs, they equal the batches prepared on the main stream. The side stream is held up before
    each batch's work, so a main stream that did not wait for it would read unfinished inputs."""
    import utils.data_loaders
    import utils.train_data
    from layers.multibox_loss import PaddedTargets, pad_targets
    from utils.data_loaders import dataset_from_root, detection_collate
    from utils.device_augment import DeferredTrainTransform
    from utils.train_data import prepared_batches

    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(640, rng=0))
    batches = []
    for start in range(0, len(dataset), 2):
        images, targets = detection_collate([dataset[i] for i in range(start, start + 2)])
        padded = pad_targets(targets)
        batches.append((images.pin_memory(), PaddedTargets(padded.targets.pin_memory(), padded.valid.pin_memory())))

    def on_host(prepared) -> list[torch.Tensor]:
        return [t.cpu() for t in (prepared.inputs, *prepared.targets) if t is not None]

    inline = [on_host(prepared) for prepared in prepared_batches(batches, CUDA, True, ahead=False)]
    main = torch.cuda.current_stream(CUDA)
    # the first step on the side stream: the augmentation (ahead) or the targets' copy (copy_ahead)
    module, name = ((utils.data_loaders, "images_to_network_input") if mode == "ahead"
                    else (utils.train_data, "pad_targets"))
    original = getattr(module, name)

    def held_up(*args, **options):
        if torch.cuda.current_stream(CUDA) != main:
            torch.cuda._sleep(20_000_000)  # tens of milliseconds on the stream the batch is prepared on
        return original(*args, **options)

    monkeypatch.setattr(module, name, held_up)
    ahead = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for prepared in prepared_batches(batches, CUDA, True, ahead=mode == "ahead", copy_ahead=mode == "copy_ahead"):
            assert prepared.inputs.is_contiguous(memory_format=torch.channels_last)
            ahead.append([t.clone() for t in (prepared.inputs, *prepared.targets) if t is not None])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(ahead) == len(inline) == 5
    for got, want in zip(ahead, inline):
        assert len(got) == len(want) == 4  # inputs, targets, valid, faces
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-3)


@pytest.mark.parametrize(("augment_on", "amp_dtype", "cuda_graphs"),
                         [("workers", "auto", "auto"), ("device", "fp16", "auto"), ("workers", "fp16", "false")])
def test_training_runs_on_cuda(widerface_sample, tmp_path, monkeypatch, augment_on, amp_dtype, cuda_graphs):
    import train

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12: fork() of a threaded process
        summary = train.run(["--dataset", str(widerface_sample), "--train_split", "val", "--experiment_name", "gpu",
                             "--network", "mobilenet0.25", "--pretrained", "false", "--batch_size", "4",
                             "--workers", "2", "--eval_every", "0", "--device", "cuda", "--max_iters", "6",
                             "--log_every", "2", "--augment_on", augment_on.split("+")[0], "--amp_dtype",
                             amp_dtype, "--cuda_graphs", cuda_graphs,
                             "--compile_augment", str(augment_on.endswith("+compile"))])
    assert summary["step"] == 6
    assert all(np.isfinite(loss) for _, loss in summary["loss_history"])
    assert (tmp_path / "experiments/gpu/ckpt/last.pth").is_file()
    log = (tmp_path / "experiments/gpu/log/logs.txt").read_text()
    assert ("amp float16 with loss scaling" in log) == (amp_dtype == "fp16")
    # auto graphs every precision since fp16 with graphs passed here (H200, 2026-11-28)
    assert ("CUDA graphs:" in log) == (cuda_graphs != "false")
    assert ("--compile_augment: the augmentation's kernels compile" in log) == augment_on.endswith("+compile")


def test_fp16_training_skips_overflow_steps_without_touching_the_optimizer():
    """fp16's GradScaler skips a step whose gradients overflow; the fused SGD train.py builds must
    leave weights and momentum alone then (torch's fused kernel alone leaves the momentum buffers of
    a skipped first step unwritten, most likely why the H200 benchmark's fp16 training went NaN
    within 33 steps, 2026-11-27; build_optimizer creates them zeroed). The scaled steps, skipped or
    not, never wait for the host."""
    from types import SimpleNamespace

    from models.retinaface import ModelConfig, RetinaFace
    from utils.train_utils import autocast_settings, build_optimizer

    torch.manual_seed(0)
    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)).to(CUDA)
    dtype, scaler = autocast_settings(CUDA, True, "fp16")
    assert dtype == torch.float16 and scaler.is_enabled()
    optimizer = build_optimizer(model, SimpleNamespace(lr=1e-3, momentum=0.9, weight_decay=5e-4))
    assert optimizer.param_groups[0]["fused"]
    before = {name: value.detach().clone() for name, value in model.named_parameters()}

    def scaled_step(overflow: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            outputs = model(torch.randn(2, 3, 128, 128, device=CUDA))
        # a mean: summed logits give fp16 gradients beyond 65504 at the scale of 2^15 (an overflow step)
        scaler.scale(sum(stage.conf.float().mean() for stage in outputs)).backward()
        if overflow:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(optimizer)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(0)

    scaled_step(overflow=True)
    assert scaler.get_scale() == 2.0 ** 15
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name]), name
        assert not optimizer.state[value]["momentum_buffer"].any(), name
    scaled_step(overflow=False)
    assert scaler.get_scale() == 2.0 ** 15
    moved = [name for name, value in model.named_parameters() if not torch.equal(value, before[name])]
    assert moved and all(torch.isfinite(value).all() for value in model.parameters())
    assert all(torch.isfinite(buffer["momentum_buffer"]).all() for buffer in optimizer.state.values())


def test_tta_merge_on_the_gpu_equals_the_cpu(mobilenet_weights, widerface_sample):
    """TTA votes on the detector's device: the GPU merge of the same raw candidates is the CPU's."""
    from models.detector import FaceDetector
    from utils.tta import TTAConfig, TTADetector

    image = cv2.imread(str(widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"))
    options = dict(confidence_threshold=0.02, nms_threshold=0.4)
    cpu = TTADetector(FaceDetector(mobilenet_weights, device="cpu", **options), TTAConfig(scales=(500, 800)))
    gpu = TTADetector(FaceDetector(mobilenet_weights, device=CUDA, **options), TTAConfig(scales=(500, 800)))
    parts = [found for _, _, found in cpu.run_passes([image])[0]]
    want, got = cpu.merge(parts), gpu.merge(parts)
    assert len(want) > 20 and len(got) == len(want)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-5, atol=1e-3)
    assert len(gpu.detect(image)) > 20  # the whole pipeline runs on the GPU


def test_priors_built_on_the_gpu_equal_the_cpu_ones():
    from layers.prior_box import prior_boxes

    for size, anchors in (((480, 640), 2), ((757, 1023), 3)):
        torch.testing.assert_close(prior_boxes(size, anchors, CUDA).cpu(), prior_boxes(size, anchors), rtol=0, atol=0)
        torch.testing.assert_close(prior_boxes(size, anchors, CUDA, normalized=True).cpu(),
                                   prior_boxes(size, anchors, normalized=True), rtol=0, atol=0)


def test_export_works_on_a_cpu_copy_of_a_cuda_model():
    from models.retinaface import ModelConfig, RetinaFace
    from tools.export_onnx import on_cpu

    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)).to(CUDA)
    copy = on_cpu(model)
    assert next(model.parameters()).is_cuda and not next(copy.parameters()).is_cuda
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(mine.cpu(), theirs), name


def test_postprocess_waits_for_the_device_only_for_candidates_and_counts():
    """Post-processing of a batch on CUDA reads back two things: the candidates above the
    threshold (nonzero) and the per-image counts (``postprocess``) or the detections with their
    image index (``postprocess_to_host``, the copy included); both equal the CPU's. (torch.bincount
    read the largest image index back too: two more waits per batch.)"""
    from utils.nms import nms_chunk
    from utils.postprocess import postprocess, postprocess_to_host

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(4, 2000, 2, generator=generator) * 600
    boxes = torch.cat([corners, corners + 8 + torch.rand(4, 2000, 2, generator=generator) * 60], dim=2)
    scores = torch.rand(4, 2000, generator=generator)
    landmarks = torch.rand(4, 2000, 10, generator=generator) * 600
    assert int((scores > 0.6).sum()) < nms_chunk(CUDA)  # one NMS call (a split reads group sizes back)
    expected = postprocess(boxes, scores, landmarks, 0.6, 0.4)
    expected_rows, expected_counts = postprocess_to_host(boxes, scores, landmarks, 0.6, 0.4)
    on_device = [t.to(CUDA) for t in (boxes, scores, landmarks)]
    torch.cuda.synchronize()
    for run in (postprocess, postprocess_to_host):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                found = run(*on_device, 0.6, 0.4)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        assert len(syncs) <= 2, (run.__name__, [f"{w.filename}:{w.lineno}" for w in syncs])
    rows, counts = found
    assert counts == expected_counts == expected.counts and sum(counts) > 100
    np.testing.assert_allclose(rows, expected_rows, rtol=0, atol=1e-3)


def test_batches_of_different_sizes_are_post_processed_together_with_two_waits():
    """postprocess_groups_to_host on CUDA merges the batches by default: three batches of
    different prior counts wait for the device twice in all (the candidates, the copy), and give
    the CPU's rows and counts of one call per batch."""
    from utils.postprocess import postprocess_groups_to_host, postprocess_to_host

    generator = torch.Generator().manual_seed(1)
    groups = []
    for batch, priors in ((2, 1500), (1, 700), (3, 1100)):
        corners = torch.rand(batch, priors, 2, generator=generator) * 600
        boxes = torch.cat([corners, corners + 8 + torch.rand(batch, priors, 2, generator=generator) * 60], dim=2)
        groups.append((boxes, torch.rand(batch, priors, generator=generator),
                       torch.rand(batch, priors, 10, generator=generator) * 600))
    expected = [postprocess_to_host(*group, 0.6, 0.4) for group in groups]
    on_device = [tuple(t.to(CUDA) for t in group) for group in groups]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            rows, counts = postprocess_groups_to_host(on_device, 0.6, 0.4)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 2, [f"{w.filename}:{w.lineno}" for w in syncs]
    assert counts == [count for _, group_counts in expected for count in group_counts] and sum(counts) > 100
    np.testing.assert_allclose(rows, np.concatenate([group_rows for group_rows, _ in expected]), rtol=0, atol=1e-3)


def _train_pair(common: list[str], name: str) -> dict[str, dict]:
    """train.py with ``common`` options, once launching every kernel and once with --cuda_graphs true."""
    import train

    return {graphs: train.run([*common, "--experiment_name", f"{name}_{graphs}", "--cuda_graphs", graphs])
            for graphs in ("false", "true")}


@pytest.mark.parametrize(("precision", "tolerance", "update_share"), [("fp32", 1e-3, 0.05), ("fp16", 1e-2, 0.1)])
def test_training_with_cuda_graphs_follows_eager_training(widerface_sample, mobilenet_weights, tmp_path, monkeypatch,
                                                          precision, tolerance, update_share):
    """train.py --cuda_graphs true (forward and backward replayed from graphs) against the same run
    launching every kernel, in fp32 and in fp16 with loss scaling (what --cuda_graphs auto graphs
    since 2026-11-28), from the published mobilenet0.25: same losses, parameter updates and
    BatchNorm statistics after 6 steps up to float rounding (cuDNN may pick other algorithms for the
    capture; fp16 rounds ten times coarser here). A step the scaler skips in one run only would put
    the updates a whole step apart, about a sixth of their norm.

    From the published weights, not from random ones: a randomly initialised network's trajectory
    is not a function of the code alone. On the CPU (2026-11-27) the same eager run with oneDNN's
    convolutions on and off, a rounding difference only, gave step-1 gradients up to 7 % apart and
    losses 1.3 % apart at step 3 (3 % at step 4 with the cascade, whose stage-2 anchors are stage 1's
    predicted boxes); the H100 run 9 of the former random-weight version of this test failed that way
    (3.4 % at step 4 after three steps within 0.1 %). From the published weights (lr 1e-3) the same
    perturbation kept the losses within 1e-5 and the parameter updates within 4e-4 of their norm."""
    from utils.checkpoint import load_model

    monkeypatch.chdir(tmp_path)
    common = ["--dataset", str(widerface_sample), "--train_split", "val", "--network", "mobilenet0.25",
              "--cascade", "false", "--init_weights", str(mobilenet_weights), "--batch_size", "4",
              "--im_size", "320", "--workers", "0", "--eval_every", "0", "--device", "cuda", "--max_iters", "6",
              "--log_every", "1", *(["--amp", "false"] if precision == "fp32" else ["--amp_dtype", precision])]
    runs = _train_pair(common, "published")
    eager, graphed = ([loss for _, loss in runs[g]["loss_history"]] for g in ("false", "true"))
    assert len(eager) == len(graphed) == 6
    np.testing.assert_allclose(graphed, eager, rtol=tolerance)
    start = load_model(mobilenet_weights).state_dict()
    final = {g: torch.load(tmp_path / f"experiments/published_{g}/ckpt/last.pth", weights_only=True)["model"]
             for g in ("false", "true")}
    parameters = [name for name, value in start.items() if value.is_floating_point() and "running_" not in name]
    updates = {g: torch.cat([(final[g][name].float().cpu() - start[name].float()).flatten() for name in parameters])
               for g in final}
    assert float(updates["false"].norm()) > 1e-3  # the run did train
    # a graph reading stale weights or losing gradients would be off by the whole update
    assert float((updates["true"] - updates["false"]).norm()) <= update_share * float(updates["false"].norm())
    for name in (name for name in start if "running_" in name):
        torch.testing.assert_close(final["true"][name].float(), final["false"][name].float(), rtol=tolerance,
                                   atol=tolerance / 10, msg=name)
    log = (tmp_path / "experiments/published_true/log/logs.txt").read_text()
    assert "CUDA graphs: the network's forward and backward passes replay graphs captured for batches of 4 at 320 px" in log


def test_cascade_training_with_cuda_graphs_starts_as_eager_training(widerface_sample, tmp_path, monkeypatch):
    """The cascade's two stages through the graphs: from the same random weights and batch, the first
    step's loss equals the eager one (the forward pass; later steps drift apart from rounding alone,
    see the test above); then a bf16 run, the training default, stays finite."""
    import train

    monkeypatch.chdir(tmp_path)
    common = ["--dataset", str(widerface_sample), "--train_split", "val", "--network", "mobilenet0.25",
              "--pretrained", "false", "--cascade", "true", "--batch_size", "4", "--im_size", "320",
              "--workers", "0", "--eval_every", "0", "--device", "cuda", "--max_iters", "2", "--log_every", "1"]
    runs = _train_pair([*common, "--amp", "false"], "cascade")
    first = [runs[g]["loss_history"][0] for g in ("false", "true")]
    assert first[0][0] == first[1][0] == 1
    np.testing.assert_allclose(first[1][1], first[0][1], rtol=1e-4)
    bf16 = train.run([*common, "--experiment_name", "cascade_bf16", "--cuda_graphs", "true"])
    assert len(bf16["loss_history"]) == 2 and all(np.isfinite(loss) for _, loss in bf16["loss_history"])


# torch.compile last: its first compilations are the file's slowest steps, and tools/gpu_check.sh's
# cap on this file cuts its end first
def test_compiled_device_augmentation_on_cuda_equals_the_eager_kernels(widerface_sample):
    """``--compile_augment``: the inductor kernels give the eager kernels' network input (float16
    products on both; the dense weights summed in another order may move a pixel by a level), in
    channels_last, without host syncs once compiled."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    import utils.device_augment as device_augment
    from utils.data_loaders import dataset_from_root, detection_collate, images_to_network_input
    from utils.device_augment import DeferredTrainTransform

    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(640, rng=1))
    batches = [detection_collate([dataset[(start + i) % len(dataset)] for i in range(count)])[0].pin_memory()
               for start, count in ((0, 10), (3, 7), (5, 1))]
    for batch in batches:  # compiles (and makes the per-device constants)
        images_to_network_input(batch, CUDA, channels_last=True, compile_augment=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled = [images_to_network_input(batch, CUDA, channels_last=True, compile_augment=True)
                    for batch in batches]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # compiled (each kernel holds versions), not the eager kernels of the recompile-limit fallback
    for kernel in (device_augment._colour_codes, device_augment._canvas_and_weights, device_augment._finish):
        assert _debug_get_cache_entry_list(kernel.__code__), kernel.__name__
    assert not device_augment._RECOMPILE_LIMIT_WARNED
    for batch, ours in zip(batches, compiled):
        eager = images_to_network_input(batch, CUDA)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        difference = (ours - eager).abs()
        assert difference.max() <= 1 and difference.mean() < 1e-3, (len(batch), difference.max(), difference.mean())


def test_training_with_compiled_augmentation_runs_on_cuda(widerface_sample, tmp_path, monkeypatch):
    """train.py --augment_on device --compile_augment true (the kernels compiled by the test above
    are reused: same process)."""
    test_training_runs_on_cuda(widerface_sample, tmp_path, monkeypatch, "device+compile", "auto", "auto")
