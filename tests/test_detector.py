import math

import numpy as np
import pytest
import torch

from models.detector import Detections, FaceDetector, resize_scale, resolve_device
from models.retinaface import ModelConfig, RetinaFace
from tools.fidelity import as_rows, load_reference, unmatched


@pytest.fixture(scope="module")
def detector(mobilenet_weights):
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))  # at most 2, and no more than a pytest-xdist worker's share
    yield FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.02, nms_threshold=0.4)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference(widerface_sample):
    return load_reference(widerface_sample / "reference_detections_mobilenet0.25.json")


def test_matches_public_pipeline_both_ways(detector, reference, widerface_sample):
    assert len(reference) == 2
    for name, expected in reference.items():
        found = detector.detect(widerface_sample / "val" / "images" / name)
        ours = as_rows(found.boxes, found.scores, found.landmarks)
        assert (expected[:, 4] >= 0.5).sum() >= 5
        assert unmatched(expected, ours) == [], name
        assert unmatched(ours, expected) == [], name
        # the reference holds every public detection down to score 0.1 (0.11 leaves a margin at its edge)
        assert unmatched(expected, ours, min_score=0.1) == [], name
        assert unmatched(ours, expected, min_score=0.11) == [], name


def test_detections_are_sorted_and_thresholded(detector, widerface_sample):
    image = next((widerface_sample / "val" / "images").rglob("*.jpg"))
    found = detector.detect(image)
    assert isinstance(found, Detections) and len(found) > 0
    assert (np.diff(found.scores) <= 0).all() and (found.scores > 0.02).all()
    assert found.boxes.dtype == np.float32 and found.landmarks.shape == (len(found), 5, 2)


def test_batch_of_same_size_images_equals_single_images(detector, widerface_sample):
    import cv2
    path = widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"
    image = cv2.imread(str(path))
    flipped = np.ascontiguousarray(image[:, ::-1])
    batched = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.3, batch_size=2)
    passes = []
    batched.dense.network.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    together = batched.detect([image, flipped])
    assert passes == [2] and len(together) == 2 and min(len(found) for found in together) >= 5
    for single_image, result in zip([image, flipped], together):
        single = batched.detect(single_image)
        np.testing.assert_allclose(result.boxes, single.boxes, atol=1e-3)
        np.testing.assert_allclose(result.scores, single.scores, atol=1e-5)


def test_submitted_batches_finished_later_equal_detect_batch(detector, widerface_sample):
    """``submit`` queues the forward passes and ``result()`` post-processes them later (test.py
    keeps one batch in flight): batches submitted ahead, same-size groups and padded passes
    included, give what ``detect_batch`` gives, in the order of the images."""
    import cv2
    paths = sorted((widerface_sample / "val" / "images").rglob("*.jpg"))[:4]
    images = [cv2.imread(str(p)) for p in paths]
    flipped = np.ascontiguousarray(images[0][:, ::-1])
    batches = [[images[0], flipped, images[1]], [images[2], images[3]]]
    for options in ({}, {"pad_to": 256}):
        ahead = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.3, **options)
        expected = [ahead.detect_batch(batch) for batch in batches]
        handles = [ahead.submit(batch) for batch in batches]  # both queued before either is finished
        for handle, want in zip(reversed(handles), reversed(expected)):
            got = handle.result()
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert len(g) == len(w) > 0
                np.testing.assert_array_equal(g.boxes, w.boxes)
                np.testing.assert_array_equal(g.scores, w.scores)
        with pytest.raises(RuntimeError, match="already taken"):
            handles[0].result()
    assert set(ahead.timings) == {"preprocess", "forward", "postprocess"}


def test_size_groups_post_processed_together_equal_images_alone(detector, widerface_sample, monkeypatch):
    """One ``detect_batch`` of images in three sizes post-processes its size groups together (on
    CUDA by default; forced here): every image gets the detections it gets alone, in its order."""
    import cv2
    import utils.postprocess as postprocess_module

    original = postprocess_module.postprocess_groups_to_host
    merged = []

    def merging(groups, *args, **kwargs):
        merged.append(len(groups))
        return original(groups, *args, **kwargs, merge=True)

    monkeypatch.setattr(postprocess_module, "postprocess_groups_to_host", merging)
    paths = sorted((widerface_sample / "val" / "images").rglob("*.jpg"))[:3]
    images = [cv2.imread(str(p)) for p in paths]
    batch = [images[0], images[1], np.ascontiguousarray(images[0][:, ::-1]), images[2]]
    assert len({im.shape for im in batch}) == 3
    found = detector.detect_batch(batch)
    assert merged == [3]
    for image, got in zip(batch, found):
        alone = detector.detect(image)
        assert len(got) == len(alone) > 0
        np.testing.assert_array_equal(got.boxes, alone.boxes)
        np.testing.assert_array_equal(got.scores, alone.scores)
        np.testing.assert_array_equal(got.landmarks, alone.landmarks)


def test_max_size_maps_boxes_back_to_the_original_image(detector, widerface_sample):
    path = widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"
    full = detector.detect(path)
    capped = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.02, max_size=640).detect(path)
    best_full, best_capped = full.boxes[0], capped.boxes[0]
    from torchvision.ops import box_iou
    iou = box_iou(torch.from_numpy(best_full[None]), torch.from_numpy(capped.boxes)).max().item()
    assert iou > 0.8, (best_full, best_capped)
    assert capped.boxes[:, 2].max() > 640  # coordinates are in the original (1024 px wide) image


def test_max_size_maps_landmarks_back_to_the_original_image_too(detector, widerface_sample):
    """Downscaled for the network (max_size), the landmarks come back in original pixels like the
    boxes: the five points of each confident face centre inside its box, and match the points
    found at full size on the same face."""
    path = widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"
    full = detector.detect(path)
    capped = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.5, max_size=640).detect(path)
    assert len(capped) >= 3 and capped.boxes[:, 2].max() > 640
    from torchvision.ops import box_iou
    iou = box_iou(torch.from_numpy(capped.boxes), torch.from_numpy(full.boxes)).numpy()
    for box, points, overlaps in zip(capped.boxes, capped.landmarks, iou):
        x1, y1, x2, y2 = box
        centre_x, centre_y = points.mean(axis=0)  # (a profile's far eye may lie just outside its box)
        assert x1 < centre_x < x2 and y1 < centre_y < y2
        match = int(np.argmax(overlaps))
        if overlaps[match] > 0.8:
            assert np.abs(points - full.landmarks[match]).max() < 0.15 * (x2 - x1)


def test_rescaled_divides_x_by_scale_x_and_y_by_scale_y():
    """``rescaled(sx, sy)`` maps detections of an image resized by (sx, sy) back to the
    original: x coordinates divided by sx, y coordinates by sy (unequal for inference.py's
    --max_pixels downscale, whose sides are rounded separately)."""
    found = Detections(np.array([[10.0, 20.0, 30.0, 60.0]], np.float32), np.array([0.9], np.float32),
                       np.array([[[12.0, 24.0], [28.0, 24.0], [20.0, 36.0], [14.0, 48.0], [26.0, 48.0]]], np.float32))
    back = found.rescaled(0.5, 0.25)
    np.testing.assert_allclose(back.boxes, [[20.0, 80.0, 60.0, 240.0]])
    np.testing.assert_allclose(back.landmarks, [[[24.0, 96.0], [56.0, 96.0], [40.0, 144.0], [28.0, 192.0],
                                                 [52.0, 192.0]]])
    np.testing.assert_array_equal(back.scores, found.scores)
    np.testing.assert_allclose(found.rescaled(0.5).boxes, [[20.0, 40.0, 60.0, 120.0]])


def test_no_nms_returns_every_candidate_above_the_threshold(detector, widerface_sample):
    """nms_threshold=None: all candidates over the confidence threshold, by score, which NMS
    (torchvision, +1 pixel areas) reduces to the usual detections."""
    from torchvision import ops
    path = widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"
    raw = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.02, nms_threshold=None,
                       top_k=None, keep_top_k=None).detect(path)
    found = detector.detect(path)
    assert len(raw) > 5 * len(found) > 50
    assert (raw.scores > 0.02).all() and (np.diff(raw.scores) <= 0).all()
    shifted = torch.from_numpy(raw.boxes).clone()
    shifted[:, 2:] += 1
    keep = ops.nms(shifted, torch.from_numpy(raw.scores), 0.4).numpy()
    np.testing.assert_array_equal(raw.boxes[keep], found.boxes)
    np.testing.assert_array_equal(raw.landmarks[keep], found.landmarks)


def test_max_size_keeps_a_side_that_would_round_to_zero_at_one_pixel(detector, widerface_sample):
    import cv2
    from models.detector import resize_image
    image = cv2.imread(str(widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"))
    banner = np.full((1, 3000, 3), 128, np.uint8)  # 1000 / 3000 would make it 0 pixels high
    assert resize_image(banner, 1000 / 3000).shape == (1, 1000, 3)
    # the usual path is OpenCV's own fx / fy resize, unchanged
    expected = cv2.resize(np.float32(image), None, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_image(image, 0.5), expected)
    capped = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.3, max_size=1000)
    banner_found, image_found = capped.detect([banner, image])
    assert len(banner_found) == 0 and len(image_found) >= 5
    assert len(FaceDetector(model=detector.model, device="cpu", max_size=1).detect(image)) == 0


def test_grayscale_rgba_and_tiny_inputs(detector, widerface_sample):
    import cv2
    image = cv2.imread(str(widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"))
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    alpha = np.random.default_rng(0).integers(0, 256, image.shape[:2] + (1,), dtype=np.uint8)
    bgra = np.concatenate([image, alpha], axis=2)
    tiny = np.zeros((1, 1, 3), np.uint8)
    results = detector.detect([gray, bgra, tiny, image, np.repeat(gray[:, :, None], 3, axis=2)])
    gray_found, bgra_found, tiny_found, colour_found, gray_as_bgr_found = results
    assert len(colour_found) >= 5 and len(gray_found) >= 5 and len(tiny_found) == 0
    # grayscale is read as its three-channel copy; the alpha channel is dropped, not blended
    for found, same_as in ((gray_found, gray_as_bgr_found), (bgra_found, colour_found)):
        np.testing.assert_array_equal(found.boxes, same_as.boxes)
        np.testing.assert_array_equal(found.scores, same_as.scores)


def test_resize_scale():
    assert resize_scale(480, 640) == 1.0
    assert resize_scale(480, 640, max_size=320) == 0.5
    assert resize_scale(1000, 500, target_size=1600, max_size=2150) == 2150 / 1000
    assert resize_scale(500, 600, target_size=1600, max_size=2150) == 1600 / 500


def test_resize_scale_lets_the_long_side_reach_max_size_exactly():
    """The public test_widerface.py rule: the target-size scale is kept unless the rounded long
    side would be *more than* max_size. 1343 * 1.6 = 2148.8 rounds to 2149: a max_size of 2149
    keeps 1.6, one of 2148 caps the long side."""
    assert resize_scale(1000, 1343, target_size=1600, max_size=2149) == 1.6
    assert resize_scale(1343, 1000, target_size=1600, max_size=2149) == 1.6
    assert resize_scale(1000, 1343, target_size=1600, max_size=2148) == 2148 / 1343


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")


def test_needs_exactly_one_source():
    with pytest.raises(ValueError):
        FaceDetector()
    with pytest.raises(ValueError):
        FaceDetector("x.pth", model=RetinaFace(ModelConfig(network="mobilenet0.25")))


@pytest.mark.parametrize("option,value,message", [
    ("batch_size", 0, "batch_size must be a positive whole number of images, got 0"),
    ("batch_size", -3, "batch_size must be a positive whole number of images, got -3"),
    ("batch_size", 1.5, "batch_size must be a positive whole number of images, got 1.5"),
    ("pad_to", 0, "pad_to must be a positive whole number of pixels, got 0"),
    ("pad_to", 2.5, "pad_to must be a positive whole number of pixels, got 2.5"),
    ("confidence_threshold", 2, "confidence_threshold must be a number in [0, 1] (0 keeps every candidate), got 2"),
    ("confidence_threshold", "0.5",
     "confidence_threshold must be a number in [0, 1] (0 keeps every candidate), got '0.5'"),
    # None is no NMS for nms_threshold, but no confidence threshold is not a threshold: it failed inside detect()
    ("confidence_threshold", None, "confidence_threshold must be a number in [0, 1] (0 keeps every candidate), "
                                   "got None"),
    ("nms_threshold", -0.1, "nms_threshold must be a number in [0, 1] (or None), got -0.1"),
    ("top_k", -5, "top_k must be a positive whole number of detections (or None / 0: no limit), got -5"),
    ("keep_top_k", 2.5, "keep_top_k must be a positive whole number of detections (or None / 0: no limit), got 2.5"),
    ("max_size", 0, "max_size must be a positive whole number of pixels (or None), got 0"),
    ("target_size", -10, "target_size must be a positive whole number of pixels (or None), got -10"),
    ("channels_last", "yes", "channels_last must be True or False (or None), got 'yes'"),
    ("precision", "fp8", "precision must be one of ['bf16', 'fp16', 'fp32'], got 'fp8'"),
])
def test_out_of_range_options_are_refused_when_built_and_when_set(option, value, message, recwarn):
    # before: batch_size -3 returned no detections, 0 failed later in range(), 1.5 failed in detect(), a
    # threshold of 2 found nothing, max_size 0 divided by zero, top_k -5 failed in torch.topk
    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))
    with pytest.raises(ValueError) as info:
        FaceDetector(model=model, device="cpu", **{option: value})
    assert str(info.value) == message
    assert not recwarn.list  # fp8 on the CPU: refused, not first warned about as a half precision
    if option in ("pad_to", "channels_last", "precision"):
        return
    detector = FaceDetector(model=model, device="cpu")
    with pytest.raises(ValueError) as info:  # changed after construction: the same check
        setattr(detector, option, value)
    assert str(info.value) == message


def test_a_detection_limit_of_zero_means_no_limit_as_on_the_command_line(detector, widerface_sample):
    import copy

    image = str(widerface_sample / "val/images/12--Group/12_Group_Large_Group_12_Group_Large_Group_12_228.jpg")
    unlimited = copy.copy(detector)
    unlimited.top_k, unlimited.keep_top_k = None, None
    zero = copy.copy(detector)
    zero.top_k, zero.keep_top_k = np.int64(0), torch.tensor(0)  # numpy and torch scalars as Python numbers
    zero.confidence_threshold = np.float32(detector.confidence_threshold)
    assert (zero.top_k, zero.keep_top_k) == (None, None)
    expected, found = unlimited.detect(image), zero.detect(image)
    assert len(found) == len(expected) > 0
    np.testing.assert_array_equal(found.boxes, expected.boxes)


def test_api_misuse_is_named_instead_of_running_something_else(detector, widerface_sample):
    import cv2

    path = widerface_sample / "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"
    image = cv2.imread(str(path))
    # one image where a list is expected: its rows (or a path's characters) would run as images
    for one in (image, str(path), path):
        with pytest.raises(TypeError, match=r"submit\(\) takes a list of images .*for one image use detect"):
            detector.submit(one)
        with pytest.raises(TypeError, match=r"takes a list of images"):
            detector.detect_batch(one)
    assert [len(d) for d in detector.detect_batch(np.stack([image, image]))] == [len(detector.detect(image))] * 2
    assert len(detector.detect_batch(one for one in [image])) == 1  # any iterable of images, as before
    with pytest.raises(TypeError, match="cv2.imread returns None"):
        detector.detect(None)
    with pytest.raises(TypeError, match="cv2.imread returns None"):
        detector.detect([image, None])
    with pytest.raises(TypeError, match="encoded image bytes are not decoded here"):
        detector.detect(path.read_bytes())
    with pytest.raises(TypeError, match=r"detect\(\) takes one image .* or a list of them, got int"):
        detector.detect(3)
    # a float image of 0..255 values (np.float32 of a uint8 image) would read as white: refused
    with pytest.raises(ValueError, match=r"values in \[0, 1\], this one reaches 255; for 0..255 values pass"):
        detector.detect(image.astype(np.float32))
    scaled = image.astype(np.float32) / 255.0
    np.testing.assert_array_equal(detector.detect(scaled).boxes, detector.detect(image).boxes)
    overshoot = cv2.resize(scaled, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LANCZOS4)
    assert overshoot.max() > 1.0 and len(detector.detect(overshoot)) > 0  # a resized [0, 1] image: clipped
    scaled[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="holds NaN"):
        detector.detect(scaled)


# ---------------------------------------------------------------------------------------------
# The dense path (preprocess, forward, decode) shared by FaceDetector and the benchmarks
# ---------------------------------------------------------------------------------------------
def _reference_decode(model, images):
    from layers.prior_box import prior_boxes
    from models.retinaface import preprocess

    model.eval()
    with torch.inference_mode():
        priors = prior_boxes(tuple(images.shape[1:3]), model.config.num_anchor)
        return model.decode_detections(model(preprocess(images)), priors)


@pytest.mark.parametrize("config", [ModelConfig(network="mobilenet0.25", cascade=False),
                                    ModelConfig(network="mobilenet0.25", cascade=True, model_version="tina")])
def test_dense_path_equals_model_forward_and_decode(config):
    from models.dense_path import DensePath

    torch.manual_seed(0)
    model = RetinaFace(config)
    for module in model.modules():  # BatchNorm statistics that folding has to get right
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    model.train()
    images = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8)
    expected = _reference_decode(_copy_eval(model), images)
    for fuse_bn, channels_last in [(False, False), (True, False), (True, True)]:
        dense = DensePath(model, torch.device("cpu"), fuse_bn=fuse_bn, channels_last=channels_last,
                          cuda_graphs=True)
        assert not dense.cuda_graphs  # CPU: no graphs, silently
        for got, want in zip(dense(images), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert model.training  # the path runs an eval-mode copy; the model is not touched
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_path_runs_the_layout_it_is_given(channels_last):
    # the uint8 batch arrives (B, H, W, 3): without an explicit layout its permuted view reached
    # NCHW weights with NHWC strides, and the convolutions ran in NHWC even with channels_last=False
    from models.dense_path import DensePath

    # and a model in the other layout (train.py keeps NHWC weights on CUDA) is converted
    layout = torch.channels_last if channels_last else torch.contiguous_format
    other = torch.contiguous_format if channels_last else torch.channels_last
    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)).to(memory_format=other)
    dense = DensePath(model, torch.device("cpu"), channels_last=channels_last)
    seen = []
    first_conv = next(m for m in dense.network.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.append(
        (args[0].is_contiguous(memory_format=layout), module.weight.is_contiguous(memory_format=layout))))
    dense(torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8))
    assert seen == [(True, True)]


def test_default_layout_is_nchw_only_for_depthwise_networks_on_cuda():
    from models.dense_path import DensePath, default_channels_last, has_depthwise_convolutions

    mobilenet = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))
    resnet = RetinaFace(ModelConfig(network="resnet18", cascade=False))
    assert has_depthwise_convolutions(mobilenet) and not has_depthwise_convolutions(resnet)
    # grouped but not depthwise (2 groups of 2 channels): cuDNN's NHWC grouped path is not the one at issue
    assert not has_depthwise_convolutions(torch.nn.Conv2d(4, 4, 3, groups=2))
    assert has_depthwise_convolutions(torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=4)))
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert default_channels_last(mobilenet, cuda) is False
    assert default_channels_last(resnet, cuda) is True
    assert default_channels_last(mobilenet, "cpu") is True and default_channels_last(resnet, "cpu") is True
    assert DensePath(mobilenet, torch.device("cpu")).channels_last  # None: the rule above, on the CPU NHWC


def _copy_eval(model):
    import copy
    return copy.deepcopy(model).eval()


def test_dense_path_rejects_unknown_precision():
    from models.dense_path import DensePath

    with pytest.raises(ValueError, match="precision"):
        DensePath(RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)), torch.device("cpu"),
                  precision="int8")


def test_detector_records_stage_times(detector, widerface_sample):
    detector.timings.clear()
    detector.detect(next((widerface_sample / "val" / "images").rglob("*.jpg")))
    assert set(detector.timings) == {"preprocess", "forward", "postprocess"}
    assert all(seconds > 0 for seconds in detector.timings.values())


@pytest.mark.parametrize("options", [{"pad_batches": True}, {"pad_batches": True, "pad_to": 64}, {"pad_to": 128}])
def test_padded_batches_give_every_image_its_detections_alone(detector, widerface_sample, options):
    """Exact padding: faces next to the padding included (plain mean padding moved some to IoU
    0.97 of their boxes alone), at the AP setting's threshold 0.02."""
    import cv2

    paths = sorted((widerface_sample / "val" / "images").rglob("*.jpg"))[:3]
    images = [cv2.imread(str(path)) for path in paths]
    image = images[1]
    images.append(np.ascontiguousarray(image[: image.shape[0] // 2 + 37, : image.shape[1] // 2 + 51]))
    assert len({im.shape for im in images}) >= 3
    padded = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.02, nms_threshold=0.4,
                          batch_size=len(images), **options)
    assert padded._groups(images) == [[0, 1, 2, 3]]  # one pass (pad_to implies pad_batches)
    assert padded.detect_batch([]) == []  # as without padding (an empty group used to fail in max())
    for together, alone in zip(padded.detect(images), [detector.detect(im) for im in images]):
        a = as_rows(alone.boxes, alone.scores, alone.landmarks)
        b = as_rows(together.boxes, together.scores, together.landmarks)
        assert (a[:, 4] >= 0.5).sum() >= 3
        assert unmatched(a, b, min_score=0.05, min_iou=0.999, max_score_diff=1e-4, max_landmark_diff=0.01) == []
        assert unmatched(b, a, min_score=0.05, min_iou=0.999, max_score_diff=1e-4, max_landmark_diff=0.01) == []


@pytest.mark.parametrize("max_size", [None, 60])  # 60: both images resized, float32 canvases
def test_padded_canvas_holds_each_image_and_the_mean_around_it(detector, max_size, monkeypatch):
    from models.dense_path import DensePath
    from models.retinaface import BGR_MEAN

    images = [np.full((40, 70, 3), 7, np.uint8), np.full((64, 50, 3), 9, np.uint8)]
    padded = FaceDetector(model=detector.model, device="cpu", pad_to=32, batch_size=2, max_size=max_size)
    canvases = []
    network = DensePath.__call__

    def recording(self, images, *args, **kwargs):
        canvases.append(images.clone())
        return network(self, images, *args, **kwargs)
    monkeypatch.setattr(DensePath, "__call__", recording)
    padded.detect(images)
    (canvas,) = canvases
    resized = [(40, 70), (64, 50)] if not max_size else [(34, 60), (60, 47)]
    assert canvas.shape == (2, 64, 64 if max_size else 96, 3)
    assert canvas.dtype == (torch.float32 if max_size else torch.uint8)
    mean = torch.tensor(BGR_MEAN, dtype=canvas.dtype)
    for slot, (rows, cols), value in zip(canvas, resized, (7, 9)):
        assert (slot[:rows, :cols] == value).all()
        assert (slot[rows:] == mean).all() and (slot[:rows, cols:] == mean).all()


def test_pad_to_rounds_canvases_and_batcher_fills_batches_with_smaller_canvases():
    from types import SimpleNamespace

    from models.detector import same_size_groups
    from models.padding_mask import padded_size
    from utils.image_loader import SameSizeBatcher

    assert padded_size(481, 640, 64) == (512, 640) and padded_size(481, 640) == (481, 640)
    shapes = [(481, 640, 3), (512, 600, 3), (480, 640, 3), (513, 640, 3), (100, 100, 3), (700, 700, 3)]
    images = [np.zeros(shape, np.uint8) for shape in shapes]
    assert same_size_groups(images) == [[0], [1], [2], [3], [4], [5]]
    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))
    assert FaceDetector(model=model, device="cpu", pad_to=64)._groups(images) == [[0, 1, 2, 3, 4, 5]]
    assert FaceDetector(model=model, device="cpu")._groups(images[:3]) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="pad_to"):
        FaceDetector(model=model, device="cpu", pad_to=0)

    def record(index):
        return SimpleNamespace(index=index, net_image=images[index])

    def indices(batches):
        return [[r.index for r in batch] for batch in batches]

    exact = SameSizeBatcher(batch_size=3)
    assert indices(exact.add(record(0)) + exact.add(record(2))) == [] and indices(exact.flush()) == [[0], [2]]
    padded = SameSizeBatcher(batch_size=3, pad_to=64)
    # 0, 1 and 2 share the 512x640 canvas: a full batch as soon as the third arrives
    assert indices(padded.add(record(0)) + padded.add(record(1)) + padded.add(record(2))) == [[0, 1, 2]]
    for index in (3, 4, 5):
        assert padded.add(record(index)) == []
    # the end: the largest canvas first (704x704, image 5), topped up with the waiting canvases that fit inside
    # it, largest first (576x640, image 3; 128x128, image 4)
    assert indices(padded.flush()) == [[5, 3, 4]]
    assert padded.pending == 0 and not padded.groups
    # beyond max_pending: the largest canvas leaves, topped up (not the small image that came first)
    crowded = SameSizeBatcher(batch_size=2, max_pending=2, pad_to=64)
    assert indices(crowded.add(record(4)) + crowded.add(record(0))) == []
    assert indices(crowded.add(record(3))) == [[3, 0]]
    assert indices(crowded.flush()) == [[4]]


def test_batcher_keeps_small_images_off_a_huge_canvas():
    """A 36-megapixel canvas topped up with thumbnails would run each of them at 36 megapixels."""
    from types import SimpleNamespace

    from utils.image_loader import TOP_UP_FREE_PIXELS, TOP_UP_MAX_WASTE, SameSizeBatcher

    def record(index, height, width):  # only the shape is read: no pixels allocated
        return SimpleNamespace(index=index, net_image=SimpleNamespace(shape=(height, width, 3)))

    huge, quarter, small = (5184, 6912), (2592, 3456), (480, 640)
    assert huge[0] * huge[1] > TOP_UP_FREE_PIXELS and quarter[0] * quarter[1] * TOP_UP_MAX_WASTE == huge[0] * huge[1]
    batcher = SameSizeBatcher(batch_size=4, pad_to=64)
    for index, size in enumerate((small, huge, quarter, small)):
        assert batcher.add(record(index, *size)) == []
    # the huge canvas takes the quarter-size image (a quarter of its pixels) but not the small ones
    assert [[r.index for r in batch] for batch in batcher.flush()] == [[1, 2], [0, 3]]


def test_compiled_dense_path_equals_eager(mobilenet_weights):
    """torch.compile of preprocess + network + decode (CPU inductor here; CUDA in tools/gpu_check.sh)."""
    from torch._dynamo.utils import counters

    from models.dense_path import DensePath
    from utils.checkpoint import load_model

    model = load_model(mobilenet_weights)
    images = torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    compiled = DensePath(model, torch.device("cpu"), compile=True)
    eager = DensePath(model, torch.device("cpu"))
    counters.clear()
    for got, want in zip(compiled(images), eager(images)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path did go through torch.compile
    sizes = torch.tensor([[64, 96], [41, 77]])  # a padded batch: the masking hooks run inside the compiled code
    padded_got, padded_want = compiled(images, sizes=sizes), eager(images, sizes=sizes)
    assert torch.isinf(padded_want[1][1]).sum() > 0  # the second image's padding priors are left out
    for got, want in zip(padded_got, padded_want):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The Python API as a notebook user calls it (a user review: each of these ran wrongly or
# failed without a word before)
# ---------------------------------------------------------------------------------------------
GREETING = "val/images/49--Greeting/49_Greeting_peoplegreeting_49_56.jpg"


def _same(a: Detections, b: Detections) -> bool:
    return (len(a) == len(b) and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.landmarks, b.landmarks))


def test_detector_follows_its_model_when_the_weights_change(mobilenet_weights, widerface_sample):
    """The detector runs an inference copy of its model: an in-place change (as load_state_dict or
    a non-fused optimizer step makes) is seen by the next call; one made through ``.data`` is not,
    until refresh(); a model set anew is used at once. Copies made by with_settings share the
    rebuilt network (one rebuild for all), and a copy given a model of its own leaves the others."""
    detector = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.5)
    image = widerface_sample / GREETING
    before = detector.detect(image)
    assert len(before) >= 5
    strict = detector.with_settings(confidence_threshold=0.9)
    kept = detector.dense
    detector.detect(image)
    assert detector.dense is kept  # nothing changed: the inference copy is kept
    biases = [head.conv1x1.bias for head in detector.model.ClassHead]
    saved = [bias.detach().clone() for bias in biases]
    with torch.no_grad():
        for bias in biases:
            bias[1::2] -= 20.0  # the face logit of every anchor: every score near 0
    assert len(strict.detect(image)) == 0 and strict.dense is not kept
    rebuilt = strict.dense
    assert len(detector.detect(image)) == 0 and detector.dense is rebuilt  # rebuilt once, for both
    for bias, values in zip(biases, saved):
        bias.data.copy_(values)  # through .data: no version counter moves
    assert len(detector.detect(image)) == 0
    detector.refresh()
    assert _same(detector.detect(image), before) and _same(strict.detect(image), before[before.scores > 0.9])
    other = strict.with_settings()
    other.model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))  # random weights: its own
    assert detector.dense is strict.dense is not other.dense and _same(detector.detect(image), before)
    with pytest.raises(TypeError, match="model must be a RetinaFace .* got a state dict .*load_state_dict"):
        detector.model = torch.load(mobilenet_weights, map_location="cpu")


def test_copies_and_pickles_of_a_detector_run_without_a_rebuild(detector, widerface_sample):
    import copy
    import pickle

    image = str(widerface_sample / GREETING)
    expected = detector.detect(image)
    for twin in (copy.deepcopy(detector), pickle.loads(pickle.dumps(detector))):
        kept = twin.dense
        assert _same(twin.detect(image), expected) and twin.dense is kept


def test_a_compiled_or_wrapped_model_is_unwrapped(detector, widerface_sample):
    image = str(widerface_sample / GREETING)
    expected = detector.detect(image)
    for wrapped in (torch.compile(detector.model), torch.nn.DataParallel(detector.model)):
        again = FaceDetector(model=wrapped, device="cpu", confidence_threshold=0.02)
        assert again.model is detector.model and _same(again.detect(image), expected)


def test_weights_may_be_a_state_dict_as_torch_load_gives_it(mobilenet_weights, widerface_sample):
    image = widerface_sample / GREETING
    from_file = FaceDetector(mobilenet_weights, device="cpu").detect(image)
    from_dict = FaceDetector(torch.load(mobilenet_weights, map_location="cpu"), device="cpu").detect(image)
    assert len(from_file) >= 5 and _same(from_dict, from_file)
    with pytest.raises(TypeError, match=r"model must be a RetinaFace .* got a state dict \(pass it as weights\)"):
        FaceDetector(model=torch.load(mobilenet_weights, map_location="cpu"))
    with pytest.raises(TypeError, match="model must be a RetinaFace .* got Conv2d"):
        FaceDetector(model=torch.nn.Conv2d(3, 3, 1))
    import io
    with pytest.raises(TypeError, match="weights must be a checkpoint path, .* or a state dict, got BytesIO"):
        FaceDetector(io.BytesIO(b"x"))


def test_rgb_arrays_and_pil_images_give_the_detections_of_the_bgr_image(detector, widerface_sample, tmp_path):
    import cv2
    from PIL import Image

    bgr = cv2.imread(str(widerface_sample / GREETING))
    expected = detector.detect(bgr)
    rgb = bgr[:, :, ::-1]  # as np.asarray(PIL image) or matplotlib give it
    assert not _same(detector.detect(np.ascontiguousarray(rgb)), expected)  # taken as BGR: other detections
    assert _same(detector.with_settings(channel_order="rgb").detect(rgb), expected)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert _same(FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.02,
                              channel_order="rgb").detect(rgba), expected)
    png = tmp_path / "greeting.png"  # lossless: PIL and OpenCV decode the same pixels
    cv2.imwrite(str(png), bgr)
    with Image.open(png) as pil:
        assert _same(detector.detect(pil), expected)
        assert all(_same(found, expected) for found in detector.detect([pil, str(png)]))
        readonly = np.asarray(pil)  # read-only: torch warned about sharing it
    with _no_warnings():
        assert _same(detector.with_settings(channel_order="rgb").detect(readonly), expected)
    gray16 = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257  # 16-bit: convert("RGB") clipped it white
    for pil in (Image.fromarray(gray16), Image.fromarray(gray16.astype(np.float32) / 65535)):  # I;16 and F
        assert pil.mode in ("I;16", "F")
        assert _same(detector.detect(pil), detector.detect(gray16))
    assert _same(detector.detect(Image.fromarray(gray16.astype(np.int32))), detector.detect(gray16))  # mode I
    with pytest.raises(ValueError, match="channel_order must be 'bgr' .* or 'rgb'"):
        FaceDetector(model=detector.model, device="cpu", channel_order="BGR")


class _no_warnings:  # noqa: N801 - a context manager
    def __enter__(self):
        import warnings
        self._catcher = warnings.catch_warnings(record=True)
        self.caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        assert not [str(w.message) for w in self.caught]


def test_images_that_would_read_wrongly_are_refused(detector, widerface_sample):
    import cv2

    image = cv2.imread(str(widerface_sample / GREETING))
    with pytest.raises(ValueError, match=r"goes down to -1 \(a normalised image\?"):
        detector.detect((image.astype(np.float32) - 127.5) / 127.5)
    with pytest.raises(ValueError, match="all of this one's are below 256 .* image.astype"):
        detector.detect(image.astype(np.uint16))  # 8-bit data in a uint16 array: black after >> 8
    assert len(detector.detect(np.zeros((64, 64, 3), np.uint16))) == 0  # a black frame is no mistake
    np.testing.assert_array_equal(detector.detect(image.astype(np.uint16) * 257).boxes, detector.detect(image).boxes)
    with pytest.raises(TypeError, match=r"got Tensor; for a tensor pass tensor.permute\(1, 2, 0\)"):
        detector.detect(torch.from_numpy(image).permute(2, 0, 1))
    with pytest.raises(ValueError, match="expected an .* BGR image") as info:
        detector.detect([image, image, image[:, :, :2]])
    assert info.value.image_index == 2 and "(image 2 of the list)" in info.value.__notes__
    single = FaceDetector(model=detector.model, device="cpu", confidence_threshold=0.02)  # batch_size 1
    with pytest.raises(TypeError, match="cv2.imread returns None") as info:
        single.detect([image, image, None, image])
    assert info.value.__notes__ == ["(image 2 of the list)"]


def test_a_4d_array_given_to_detect_is_a_batch(detector, widerface_sample):
    import cv2

    image = cv2.imread(str(widerface_sample / GREETING))
    found = detector.detect(np.stack([image, image[:, ::-1]]))
    assert isinstance(found, list) and len(found) == 2
    assert _same(found[0], detector.detect(image)) and len(found[1]) >= 5


def test_detections_index_iterate_and_clip(detector, widerface_sample):
    import cv2

    image = cv2.imread(str(widerface_sample / GREETING))
    found = detector.detect(image)
    faces = list(found)
    assert len(faces) == len(found) >= 5
    first = found[0]
    assert first.score == pytest.approx(float(found.scores[0])) and isinstance(first.score, float)
    np.testing.assert_array_equal(first.box, found.boxes[0])
    np.testing.assert_array_equal(first.landmarks, found.landmarks[0])
    confident = found[found.scores > 0.5]
    assert isinstance(confident, Detections) and len(confident) == int((found.scores > 0.5).sum())
    np.testing.assert_array_equal(found[1:3].boxes, found.boxes[1:3])
    for index in (np.int64(1), np.array(1)):
        assert found[index].score == float(found.scores[1])
    # a face cut by the top edge of a crop: its box starts above it, the clipped one at row 0
    top = int(found.boxes[0, 1] + found.boxes[0, 3]) // 2
    cut = detector.detect(image[top:])
    assert cut.boxes[:, 1].min() < 0
    height, width = image.shape[0] - top, image.shape[1]
    clipped = cut.clipped(height, width)
    assert clipped.boxes[:, [0, 1]].min() >= 0 and (clipped.boxes[:, [0, 2]] <= width).all()
    assert (clipped.boxes[:, [1, 3]] <= height).all()
    inside = (cut.boxes[:, 0] >= 0) & (cut.boxes[:, 1] >= 0) & (cut.boxes[:, 2] <= width) & (cut.boxes[:, 3] <= height)
    np.testing.assert_array_equal(clipped.boxes[inside], cut.boxes[inside])
    np.testing.assert_array_equal(clipped.scores, cut.scores)
    outside = np.flatnonzero(cut.boxes[:, 1] < 0)[0]
    assert clipped.boxes[outside, 1] == 0 and clipped.boxes[outside, 3] == cut.boxes[outside, 3]


def test_fixed_options_and_unknown_names_cannot_be_set_silently(detector, widerface_sample):
    for name in ("pad_to", "device", "pad_batches", "pixel_offset", "channel_order", "half", "precision",
                 "cuda_graphs"):
        with pytest.raises(AttributeError, match=f"{name} is fixed when the detector is built"):
            setattr(detector, name, getattr(detector, name, True))
    for typo in ("confidence", "nms", "dense"):  # would have been ignored without a word
        with pytest.raises(AttributeError, match=f"no setting '{typo}' .*confidence_threshold, nms_threshold"):
            setattr(detector, typo, 0.9)
    image = str(widerface_sample / GREETING)
    strict = detector.with_settings(confidence_threshold=0.9, keep_top_k=3)
    assert detector.confidence_threshold == 0.02 and strict.confidence_threshold == 0.9
    found = strict.detect(image)
    everything = detector.detect(image)
    assert 1 <= len(found) <= 3 and _same(found, everything[everything.scores > 0.9][:3])
    with pytest.raises(ValueError, match=r"confidence_threshold must be a number in \[0, 1\]"):
        detector.with_settings(confidence_threshold=2)
    with pytest.raises(TypeError, match="with_settings\\(\\) takes the settings .* not 'pad_to'"):
        detector.with_settings(pad_to=32)


def test_tta_uses_the_detectors_settings_of_the_moment(mobilenet_weights, widerface_sample):
    from utils.tta import TTAConfig, TTADetector

    image = str(widerface_sample / GREETING)
    detector = FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.02)
    tta = TTADetector(detector, TTAConfig(scales=(0,)))
    loose = tta.detect(image)
    assert loose.scores.min() < 0.5
    detector.confidence_threshold = 0.5
    strict = tta.detect(image)
    assert strict.scores.min() > 0.5
    assert _same(strict, TTADetector(FaceDetector(mobilenet_weights, device="cpu", confidence_threshold=0.5),
                                     TTAConfig(scales=(0,))).detect(image))


def test_max_pixels_scales_a_large_image_down_and_maps_the_boxes_back(detector, widerface_sample):
    """The command line's --max_pixels guard, in the API: an image with more pixels reaches the
    network at about that many, its faces come back in original pixels; a smaller image is untouched."""
    import cv2
    from torchvision.ops import box_iou

    image = cv2.imread(str(widerface_sample / GREETING))
    height, width = image.shape[:2]
    full = detector.detect(image)
    capped = detector.with_settings(max_pixels=height * width // 2)
    seen = []
    hook = capped.dense.network.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2:]))
    try:
        found = capped.detect(image)
        assert _same(detector.with_settings(max_pixels=height * width).detect(image), full)
    finally:
        hook.remove()
    assert 0.45 * height * width < seen[0][0] * seen[0][1] <= height * width // 2 + height + width  # rounded sides
    assert seen[0][0] == round(height * math.sqrt(0.5))
    big = full[(full.scores > 0.5) & ((full.boxes[:, 2] - full.boxes[:, 0]) > 40)]  # large, confident faces
    assert len(big) >= 3 and found.boxes[:, 2].max() > width * 0.71 + 40  # original, not network pixels
    iou = box_iou(torch.from_numpy(big.boxes), torch.from_numpy(found.boxes)).numpy()
    assert (iou.max(axis=1) > 0.8).all()
    with pytest.raises(ValueError, match="max_pixels must be a positive whole number of pixels"):
        detector.with_settings(max_pixels=0)
