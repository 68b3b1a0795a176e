"""The augmentation's pixel work on the device (utils/device_augment.py) against OpenCV and
against TrainTransform on the sample images."""
from __future__ import annotations

import dataclasses
import warnings

import cv2
import numpy as np
import pytest
import torch

from utils.data_loaders import dataset_from_root, detection_collate, images_to_network_input
from utils.data_transformer import (
    INTERPOLATIONS, AugmentParams, PhotometricParams, TrainTransform, empty_targets, photometric_distort,
)
from utils.device_augment import DeferredBatch, DeferredTrainTransform, augment, photometric, resize_taps

INTERPOLATION_NAMES = {cv2.INTER_LINEAR: "linear", cv2.INTER_CUBIC: "cubic", cv2.INTER_AREA: "area",
                       cv2.INTER_NEAREST: "nearest", cv2.INTER_LANCZOS4: "lanczos4"}


@pytest.fixture(scope="module")
def sample_image(widerface_sample) -> np.ndarray:
    path = sorted((widerface_sample / "val" / "images").rglob("*.jpg"))[0]
    return cv2.imread(str(path))


def _resize_with_taps(image: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    index, weight = resize_taps(image.shape[0], size, interpolation)
    matrix = np.zeros((size, image.shape[0]))
    np.add.at(matrix, (np.repeat(np.arange(size), index.shape[1]), index.ravel()), weight.ravel())
    planes = [matrix @ image[..., c].astype(np.float64) @ matrix.T for c in range(3)]
    return np.clip(np.round(np.stack(planes, axis=-1)), 0, 255)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS, ids=lambda i: INTERPOLATION_NAMES[i])
@pytest.mark.parametrize("src", [37, 96, 150, 192, 500])
def test_resize_taps_reproduce_cv2_resize(sample_image, interpolation, src):
    image = np.ascontiguousarray(sample_image[100:100 + src, 200:200 + src])
    expected = cv2.resize(image, (96, 96), interpolation=interpolation).astype(np.float64)
    ours = _resize_with_taps(image, 96, interpolation)
    difference = np.abs(ours - expected)
    # OpenCV computes in fixed point: a pixel may differ by one level, rarely
    assert difference.max() <= 1, (difference.max(), difference.mean())
    assert difference.mean() < 0.2


def test_resize_taps_reject_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        resize_taps(0, 10, cv2.INTER_LINEAR)
    with pytest.raises(ValueError, match="unsupported"):
        resize_taps(20, 10, 99)


def _looked_up(table: torch.Tensor, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) ``image`` through a (2^24,) int32 colour table."""
    codes = torch.from_numpy(np.pad(image, ((0, 0), (0, 0), (0, 1)))).view(torch.int32).view(-1)
    looked_up = table.index_select(0, codes).view(torch.uint8).view(*image.shape[:2], 4)
    assert not looked_up[..., 3].any()
    return looked_up[..., :3].numpy()


def test_colour_tables_give_opencvs_conversions():
    """On rows that OpenCV converts with its vectorised code alone (a multiple of 32 pixels wide)
    the tables give its result for every pixel; in the last ``width % 32`` pixels of a row its
    scalar code rounds HSV->BGR where the vectorised code truncates, and the tables differ there."""
    from utils.device_augment import _hsv_conversion_tables

    to_hsv, to_bgr = _hsv_conversion_tables(torch.device("cpu"))
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (100, 640, 3), dtype=np.uint8)
    colours[0, :8] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                      [1, 0, 0], [0, 1, 1]]
    np.testing.assert_array_equal(_looked_up(to_hsv, colours), cv2.cvtColor(colours, cv2.COLOR_BGR2HSV))
    colours[..., 0] %= 180  # a valid hue for the HSV -> BGR direction
    np.testing.assert_array_equal(_looked_up(to_bgr, colours), cv2.cvtColor(colours, cv2.COLOR_HSV2BGR))
    narrow = np.ascontiguousarray(colours[:, :20])
    differs = _looked_up(to_bgr, narrow) != cv2.cvtColor(narrow, cv2.COLOR_HSV2BGR)
    assert 0.2 < differs.mean() < 0.5  # OpenCV's scalar path: each fractional channel rounded


def test_photometric_step_matches_opencv_on_the_sample(widerface_sample):
    """The photometric step of whole sample images against TrainTransform's (OpenCV LUT and
    cvtColor): no bias, and differences only in the last ``width % 32`` pixels of a row (see
    above). The HSV->BGR formula that rounds was 0.2-0.3 levels too bright on average."""
    paths = sorted((widerface_sample / "val" / "images").rglob("*.jpg"))[:4]
    settings = [PhotometricParams(True, brightness=-10.0, contrast=0.7, saturation=1.4, hue=-12),
                PhotometricParams(False, brightness=20.5, contrast=1.3, saturation=0.6, hue=17),
                PhotometricParams(False, saturation=1.2)]
    transform = DeferredTrainTransform(64)
    for path in paths:
        image = cv2.imread(str(path))
        height, width = image.shape[:2]
        for params in settings:
            deferred, _ = transform.apply(image, empty_targets(), AugmentParams(None, params))
            batch, _ = detection_collate([(deferred, empty_targets())])
            ours = photometric(batch)[:, :3].reshape(height, width, 3).numpy().astype(int)
            difference = ours - photometric_distort(image, params).astype(int)
            tail = width % 32
            assert not difference[:, :width - tail].any(), (path.name, params)
            assert np.abs(difference).max() <= 1 and abs(difference.mean()) < 0.01, (path.name, params)


def test_photometric_step_of_a_mixed_batch_equals_each_image_alone(sample_image, monkeypatch):
    """The batch keeps the images that make the HSV round trip first, those with a table after it
    leading, and runs those steps on their pixels only: each image's colours equal those it gets
    alone, in every mix of the steps, also when the batch is cut into several chunks."""
    import utils.device_augment as device_augment

    settings = [PhotometricParams(False, brightness=20.5, contrast=1.3),              # no HSV
                PhotometricParams(True, brightness=-10.0, contrast=0.7, saturation=1.4, hue=-12),  # HSV, after
                PhotometricParams(False, saturation=0.6, hue=17),                     # HSV, no after
                PhotometricParams(),                                                  # identity
                PhotometricParams(True, contrast=1.2, hue=5)]                         # HSV, after
    transform = DeferredTrainTransform(64)
    crops = [(0, 0, 40 + 7 * i) for i in range(2 * len(settings))]
    images = [transform.apply(sample_image, empty_targets(), AugmentParams(crop, settings[i % len(settings)]))[0]
              for i, crop in enumerate(crops)]
    # a table after the step without the HSV round trip (the recipe never draws one): it still runs
    darker = dataclasses.replace(images[0], tables=images[0].tables.copy())
    darker.tables[3] = (np.arange(256) * 0.8).astype(np.uint8)
    images.append(darker)
    uses_hsv = [settings[i % len(settings)].saturation is not None or settings[i % len(settings)].hue is not None
                for i in range(len(crops))] + [False]
    alone = []
    for image in images:
        single, _ = detection_collate([(image, empty_targets())])
        alone.append(photometric(single))
    batch, _ = detection_collate([(image, empty_targets()) for image in images])
    assert batch.hsv_images == sum(uses_hsv) == 6 and batch.after_images == 7
    order = batch.photometric_order_list
    assert all(uses_hsv[i] for i in order[:6]) and not any(uses_hsv[i] for i in order[6:])
    assert order[6] == len(images) - 1  # the one without HSV but with an after table leads the others
    # one chunk; about one image per chunk; two or three images per chunk (chunks across both boundaries)
    for chunk_pixels in (device_augment.MAX_PHOTOMETRIC_PIXELS, 3000, 12000):
        monkeypatch.setattr(device_augment, "MAX_PHOTOMETRIC_PIXELS", chunk_pixels)
        colours = photometric(batch)
        for image, (start, stop) in enumerate(batch.pixel_spans()):
            assert torch.equal(colours[start:stop], alone[image]), (chunk_pixels, image)


def _forced_params():
    """Every branch of the pixel path: crop or pad, flip or not, down- and upscaling, every
    interpolation, with and without the HSV step, both photometric orders."""
    photometric = [PhotometricParams(),
                   PhotometricParams(False, brightness=20.5, contrast=1.3),
                   PhotometricParams(True, brightness=-10.0, contrast=0.7, saturation=1.4, hue=-12),
                   PhotometricParams(False, saturation=0.6, hue=17)]
    crops = [(10, 20, 60), (0, 0, 200), None]  # side 60 <= 96 < 200; None: whole image padded
    for i, interpolation in enumerate(INTERPOLATIONS):
        for j, crop in enumerate(crops):
            yield AugmentParams(crop, photometric[(i + j) % len(photometric)], flip=(i + j) % 2 == 0,
                                interpolation=interpolation)
            yield AugmentParams(crop, photometric[(i + j + 1) % len(photometric)], flip=(i + j) % 2 == 1,
                                interpolation=interpolation)


def test_deferred_pixels_match_train_transform_for_every_branch(sample_image):
    image = np.ascontiguousarray(sample_image[:230, :210])  # not square: the pad path pads the width
    targets = np.array([[20, 30, 60, 80, 25, 40, 50, 40, 40, 55, 30, 65, 50, 65, 1.0],
                        [100, 120, 150, 190, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1.0]], np.float32)
    cpu = TrainTransform(96)
    device = DeferredTrainTransform(96)
    samples, expected_images = [], []
    for params in _forced_params():
        expected_image, expected_targets = cpu.apply(image, targets, params)
        deferred, deferred_targets = device.apply(image, targets, params)
        np.testing.assert_array_equal(deferred_targets, expected_targets)
        samples.append((deferred, deferred_targets))
        expected_images.append(expected_image)
    batch, _ = detection_collate(samples)
    assert isinstance(batch, DeferredBatch) and len(batch) == len(expected_images)
    ours = images_to_network_input(batch)
    reference = images_to_network_input(detection_collate([(im, np.zeros((0, 15))) for im in expected_images])[0])
    assert ours.shape == reference.shape == (len(expected_images), 3, 96, 96)
    difference = ours - reference
    per_image = difference.abs().flatten(1).amax(1)
    assert per_image.max() <= 2, per_image.tolist()  # a level from the HSV round trip, one from the resize
    # no bias: with OpenCV's rounding HSV formula in place of its vectorised code, 0.12 and +0.11
    assert difference.abs().mean() < 0.08 and abs(difference.mean()) < 0.05


def test_deferred_transform_matches_train_transform_on_the_sample(widerface_sample):
    for seed in range(2):
        cpu = dataset_from_root(widerface_sample, "val", TrainTransform(96, rng=seed))
        device = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(96, rng=seed))
        images, targets = detection_collate([cpu[i] for i in range(len(cpu))])
        batch, deferred_targets = detection_collate([device[i] for i in range(len(device))])
        for expected, ours in zip(targets, deferred_targets):  # same random draws, same geometry
            assert torch.equal(expected, ours)
        difference = images_to_network_input(batch) - images_to_network_input(images)
        # before the colour tables came from OpenCV: up to 3 levels, 0.27 on average, all of it too bright
        assert difference.abs().max() <= 2 and difference.abs().mean() < 0.1, (difference.abs().max(), difference)
        assert abs(difference.mean()) < 0.05, difference.mean()


def test_float16_resize_stays_within_a_level(widerface_sample):
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=3))
    batch, _ = detection_collate([dataset[i] for i in range(4)])
    exact = augment(batch, resize_dtype=torch.float32)
    half = augment(batch, resize_dtype=torch.float16)
    assert (exact - half).abs().max() <= 1


def test_augmentation_ignores_the_callers_autocast(widerface_sample):
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=4))
    batch, _ = detection_collate([dataset[i] for i in range(3)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = augment(batch)
    assert inside.dtype == torch.float32 and torch.equal(inside, augment(batch))


def test_deferred_batch_moves_all_its_tensors(widerface_sample):
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=0))
    batch, _ = detection_collate([dataset[i] for i in range(3)])
    assert batch.image_size == 64 and batch.pixels.dtype == torch.uint8
    assert batch.pixels.numel() == sum(h * w * 3 for h, w in batch.sizes)
    # the meta device shows a tensor left behind (moving to the CPU would not)
    moved = batch.to("meta")
    tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    assert len(tensors) >= 6  # pixels, shapes, tables, resize_slots, tap_index, tap_weight
    for name, tensor in tensors.items():
        copy = getattr(moved, name)
        assert copy.device.type == "meta" and copy.shape == tensor.shape and copy.dtype == tensor.dtype, name
    assert moved.sizes == batch.sizes and moved.use_hsv_list == batch.use_hsv_list
    assert torch.equal(images_to_network_input(batch.to("cpu"), "cpu"), images_to_network_input(batch))


@pytest.mark.parametrize("compile_augment", [False, True])
def test_training_with_device_augmentation(widerface_sample, tmp_path, monkeypatch, compile_augment):
    """--augment_on device trains, and its batches are augmented in the main process (the device),
    by the compiled kernels with --compile_augment true."""
    import train

    augmented = []
    network_input = DeferredBatch.network_input

    def counted(batch, *args, **kwargs):
        augmented.append((len(batch.sizes), kwargs.get("compiled")))
        return network_input(batch, *args, **kwargs)

    monkeypatch.setattr(DeferredBatch, "network_input", counted)
    monkeypatch.chdir(tmp_path)
    summary = train.run(["--dataset", str(widerface_sample), "--train_split", "val", "--experiment_name", "dev",
                         "--network", "mobilenet0.25", "--pretrained", "false", "--im_size", "96",
                         "--batch_size", "2", "--workers", "1", "--eval_every", "0", "--device", "cpu",
                         "--augment_on", "device", "--max_iters", "3", "--log_every", "1",
                         "--compile_augment", str(compile_augment)])
    assert summary["step"] == 3 and augmented == [(2, compile_augment)] * 3
    log = (tmp_path / "experiments/dev/log/logs.txt").read_text()
    assert ("--compile_augment: the augmentation's kernels compile" in log) == compile_augment
    assert (tmp_path / "experiments/dev/ckpt/last.pth").is_file()


@pytest.fixture
def fresh_compiler(monkeypatch):
    """torch.compile's caches emptied before and after the test: the compiled cases of other tests
    (other image sizes) neither count here nor stay behind; no recompile-limit warning given yet."""
    import torch._dynamo

    import utils.device_augment as device_augment

    torch._dynamo.reset()
    monkeypatch.setattr(device_augment, "_RECOMPILE_LIMIT_WARNED", [])
    yield device_augment
    torch._dynamo.reset()


def _compiled_cases(device_augment) -> dict[str, int]:
    """How many compiled versions each compiled kernel of the device augmentation holds."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    kernels = (device_augment._colour_codes, device_augment._canvas_and_weights, device_augment._finish)
    return {kernel.__name__: len(_debug_get_cache_entry_list(kernel.__code__)) for kernel in kernels}


def test_compiled_augmentation_equals_the_eager_kernels(sample_image, widerface_sample, monkeypatch, fresh_compiler):
    """``augment(compiled=True)`` (``--compile_augment``, inductor on the CPU here) gives the eager
    kernels' values exactly in float32: every mix of the photometric steps (the mixed batch of
    the test above), a batch of one image, all-nearest taps (one tap per output pixel), several
    resize groups, whole (not square) images padded, both memory formats."""
    import utils.device_augment as device_augment

    transform = DeferredTrainTransform(64)
    settings = [PhotometricParams(False, brightness=20.5, contrast=1.3),
                PhotometricParams(True, brightness=-10.0, contrast=0.7, saturation=1.4, hue=-12),
                PhotometricParams(False, saturation=0.6, hue=17), PhotometricParams()]
    mixed = [transform.apply(sample_image, empty_targets(),
                             AugmentParams((i, 2 * i, 40 + 9 * i), settings[i % 4], flip=i % 3 == 0,
                                           interpolation=INTERPOLATIONS[i % len(INTERPOLATIONS)]))[0]
             for i in range(8)]
    darker = dataclasses.replace(mixed[0], tables=mixed[0].tables.copy())
    darker.tables[3] = (np.arange(256) * 0.8).astype(np.uint8)  # after table without the HSV round trip
    nearest = [transform.apply(sample_image, empty_targets(),
                               AugmentParams((0, 0, 50 + i), settings[1], interpolation=cv2.INTER_NEAREST))[0]
               for i in range(2)]
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=7))
    # whole images padded to a square: below a wide one, right of a tall one (area averaging reads
    # every row and column next to the padding)
    wide = transform.apply(sample_image, empty_targets(),
                           AugmentParams(None, settings[1], flip=True, interpolation=cv2.INTER_AREA))[0]
    tall = transform.apply(np.ascontiguousarray(sample_image[:, :300]), empty_targets(),
                           AugmentParams(None, interpolation=cv2.INTER_AREA))[0]
    assert wide.pixels.shape[1] > wide.pixels.shape[0] and tall.pixels.shape[0] > tall.pixels.shape[1]
    batches = [mixed + [darker], mixed[1:2], nearest, [wide, tall, mixed[2]],
               [dataset[i][0] for i in range(len(dataset))]]
    monkeypatch.setattr(device_augment, "MAX_CANVAS_PIXELS", 3 * 80 ** 2)  # several groups in the mixed batch
    for index, images in enumerate(batches):
        batch, _ = detection_collate([(image, empty_targets()) for image in images])
        eager = augment(batch, resize_dtype=torch.float32)
        channels_last = index % 2 == 0
        compiled = augment(batch, resize_dtype=torch.float32, compiled=True, channels_last=channels_last)
        assert compiled.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(compiled, eager), (index, (compiled - eager).abs().max())
    assert len(device_augment.resize_groups(sorted(max(image.pixels.shape[:2]) for image in mixed + [darker]), 64)) > 1
    # compiled, not the eager fallback: every kernel holds compiled versions, and no limit was met
    assert min(_compiled_cases(device_augment).values()) >= 1 and not device_augment._RECOMPILE_LIMIT_WARNED


def test_compiled_augmentation_compiles_a_few_cases_for_varied_batches(widerface_sample, fresh_compiler):
    """Random batches of 1 to 12 sample crops (every interpolation, flips, photometric draws): the
    compiled kernels hold 2, 2 and 4 versions at most (one image against several; the last also
    per memory format), below torch.compile's limit of 8. A group's slice of the batch's tensors
    (its offset, its strides) and one-tap resizes made 3-4 versions of the canvas kernel here."""
    device_augment = fresh_compiler
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=11))
    rng = np.random.default_rng(0)
    for step in range(24):
        batch, _ = detection_collate([dataset[int(i)] for i in rng.integers(0, len(dataset), int(rng.integers(1, 13)))])
        compiled = augment(batch, compiled=True, channels_last=step % 2 == 1)
        assert torch.equal(compiled, augment(batch)), step
    cases = _compiled_cases(device_augment)
    assert min(cases.values()) >= 1, cases
    assert cases["_colour_codes"] <= 2 and cases["_canvas_and_weights"] <= 2 and cases["_finish"] <= 4, cases
    assert not device_augment._RECOMPILE_LIMIT_WARNED


def test_compiled_augmentation_runs_the_eager_kernels_past_the_recompile_limit(widerface_sample, monkeypatch,
                                                                              fresh_compiler):
    """A case beyond torch.compile's recompile limit runs the eager kernels (the same values, one
    warning), not the compiled formulations eagerly (canvas-sized index tensors): met in the first
    kernel (a batch of one image) or after it (a resize group of one image, once the photometric
    kernel has run)."""
    import torch._dynamo

    device_augment = fresh_compiler
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=2))
    several, _ = detection_collate([dataset[i] for i in range(4)])
    single, _ = detection_collate([dataset[5]])  # one image: a case of its own for the photometric kernel
    with monkeypatch.context() as one_group:  # every image in one resize group: no group of one image yet
        one_group.setattr(device_augment, "GROUP_SAVING", 10.0)
        assert torch.equal(augment(several, compiled=True), augment(several))
    assert _compiled_cases(device_augment) == {"_colour_codes": 1, "_canvas_and_weights": 1, "_finish": 1}
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    # a group per image: the photometric kernel runs compiled, the canvas kernel meets a new case
    with monkeypatch.context() as own_groups:
        own_groups.setattr(device_augment, "MAX_CANVAS_PIXELS", 1)
        with pytest.warns(RuntimeWarning, match="recompile limit"):
            assert torch.equal(augment(several, compiled=True), augment(several))
    monkeypatch.setattr(device_augment, "_RECOMPILE_LIMIT_WARNED", [])
    expected = augment(single)
    eager_kernels, eager_runs = device_augment._augment, []

    def counted(*args):
        eager_runs.append(len(args[0]))
        return eager_kernels(*args)

    monkeypatch.setattr(device_augment, "_augment", counted)
    with pytest.warns(RuntimeWarning, match="recompile limit"):
        out = augment(single, compiled=True)
    assert eager_runs == [1] and torch.equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert torch.equal(augment(single, compiled=True), expected)
    assert eager_runs == [1, 1]


def test_a_compiler_that_fails_is_one_setup_error_line(widerface_sample, monkeypatch):
    """inductor failing to build its kernels (no C compiler, a Triton error) stops train.py with one
    line naming --compile_augment, not a compiler traceback."""
    import torch._inductor.exc

    import utils.device_augment as device_augment
    from utils.errors import TrainingSetupError

    def failing(function):
        def run(*args, **kwargs):
            raise torch._inductor.exc.InductorError(RuntimeError("gcc: not found\nmore detail"), None)
        return run

    monkeypatch.setattr(device_augment, "_compiled", failing)
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=2))
    batch, _ = detection_collate([dataset[i] for i in range(2)])
    with pytest.raises(TrainingSetupError) as info:
        augment(batch, compiled=True)
    assert str(info.value) == ("--compile_augment: torch.compile could not compile the augmentation's kernels "
                               "(InductorError: RuntimeError: gcc: not found); train without --compile_augment, or "
                               "fix the compiler set-up (a C compiler and Python headers for inductor)")


def test_compile_augment_on_cuda_without_triton_is_a_setup_error(monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    from utils.errors import TrainingSetupError
    from utils.train_utils import compile_augment_notes

    args = SimpleNamespace(compile_augment=True)
    assert compile_augment_notes(SimpleNamespace(compile_augment=False), torch.device("cuda")) == []
    assert compile_augment_notes(args, torch.device("cpu"))  # the CPU's kernels are C++, no Triton needed
    real_find_spec = importlib.util.find_spec

    def without_triton(name, *args):
        return None if name == "triton" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_triton)
    with pytest.raises(TrainingSetupError, match="needs Triton on CUDA"):
        compile_augment_notes(args, torch.device("cuda"))


def test_large_batches_are_augmented_in_chunks_with_the_same_result(widerface_sample, monkeypatch):
    import utils.device_augment as device_augment

    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=5))
    batch, _ = detection_collate([dataset[i] for i in range(6)])
    whole = augment(batch)
    largest = max(max(size) for size in batch.sizes)
    monkeypatch.setattr(device_augment, "MAX_CANVAS_PIXELS", 2 * largest ** 2)  # two images per group at most
    monkeypatch.setattr(device_augment, "MAX_PHOTOMETRIC_PIXELS", largest ** 2)  # an image per chunk or so
    assert sum(h * w for h, w in batch.sizes) > 2 * largest ** 2  # so three photometric chunks at least
    assert len(device_augment.resize_groups([max(batch.sizes[i]) for i in batch.resize_order_list], 64)) >= 3
    assert (augment(batch) - whole).abs().max() <= 1  # the canvas size only changes float summation order


def _partition_cost(sides: list[int], groups: list[tuple[int, int]], size: int, penalty: float) -> float:
    return sum((stop - first) * (size * sides[stop - 1] ** 2 + size ** 2 * sides[stop - 1]) + penalty
               for first, stop in groups)


def test_resize_groups_are_the_cheapest_partition(monkeypatch):
    import itertools
    import utils.device_augment as device_augment
    from utils.device_augment import resize_groups

    rng = np.random.default_rng(0)
    for trial in range(30):
        sides = sorted(rng.integers(20, 300, rng.integers(1, 9)).tolist())
        bound = 3 * max(sides) ** 2 if trial % 3 == 0 else 48 << 20  # some partitions forced by the bound
        monkeypatch.setattr(device_augment, "MAX_CANVAS_PIXELS", bound)
        penalty = device_augment.GROUP_SAVING * _partition_cost(sides, [(0, len(sides))], 96, 0.0)
        groups = resize_groups(sides, 96)
        assert groups[0][0] == 0 and groups[-1][1] == len(sides)
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        allowed = []  # every partition into consecutive runs that respects the canvas bound
        for cuts in itertools.product([False, True], repeat=len(sides) - 1):
            bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(sides)]
            partition = list(zip(bounds, bounds[1:]))
            if all(stop - first == 1 or (stop - first) * sides[stop - 1] ** 2 <= bound for first, stop in partition):
                allowed.append(partition)
        assert groups in allowed
        cheapest = min(_partition_cost(sides, p, 96, penalty) for p in allowed)
        assert _partition_cost(sides, groups, 96, penalty) == pytest.approx(cheapest)
    assert resize_groups([50] * 8, 96) == [(0, 8)]  # equal sides: one canvas
    assert len(resize_groups([40] * 8 + [400] * 8, 96)) == 2


def test_a_group_may_fill_the_canvas_limit_exactly():
    """MAX_CANVAS_PIXELS is an upper bound a group may reach: three 4096-pixel images make
    3 * 4096^2 = 48 MiPx = the default limit, one canvas (one canvas is also the cheapest: the
    same product work, fewer groups)."""
    import utils.device_augment as device_augment
    from utils.device_augment import resize_groups

    assert 3 * 4096 ** 2 == 48 * 2 ** 20 == device_augment.MAX_CANVAS_PIXELS
    assert resize_groups([4096] * 3, 640) == [(0, 3)]
    assert resize_groups([4096] * 3 + [4097], 640) == [(0, 3), (3, 4)]  # one pixel more: a fourth does not fit


def test_eager_augmentation_returns_channels_last_when_asked(widerface_sample):
    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(64, rng=5))
    batch, _ = detection_collate([dataset[i] for i in range(2)])
    default = augment(batch)
    assert default.is_contiguous()
    out = augment(batch, channels_last=True)  # compiled=False: the eager kernels
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, default)


def test_grouped_resize_equals_one_canvas(widerface_sample, monkeypatch):
    import utils.device_augment as device_augment

    dataset = dataset_from_root(widerface_sample, "val", DeferredTrainTransform(80, rng=7))
    batch, _ = detection_collate([dataset[i] for i in range(len(dataset))])
    sides = [max(batch.sizes[i]) for i in batch.resize_order_list]
    assert sides == sorted(sides) and sorted(batch.resize_order_list) == list(range(len(batch)))
    monkeypatch.setattr(device_augment, "GROUP_SAVING", 0.0)
    assert len(device_augment.resize_groups(sides, 80)) > 1
    grouped = augment(batch)
    monkeypatch.setattr(device_augment, "GROUP_SAVING", 1e9)
    assert device_augment.resize_groups(sides, 80) == [(0, len(batch))]
    difference = (augment(batch) - grouped).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-4
