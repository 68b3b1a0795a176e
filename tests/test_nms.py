import numpy as np
import pytest
import torch

from utils.nms import nms, nms_numpy
from utils.postprocess import postprocess


def random_detections(seed, n):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (n, 2))
    wh = rng.uniform(2, 80, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    # clusters of overlapping boxes make NMS do real work
    boxes[n // 2:] = boxes[: n - n // 2] + rng.normal(0, 3, (n - n // 2, 4)).astype(np.float32)
    return boxes, rng.uniform(0, 1, n).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.4, 0.7])
@pytest.mark.parametrize("pixel_offset", [0.0, 1.0])
def test_numpy_and_torchvision_nms_agree(seed, threshold, pixel_offset):
    boxes, scores = random_detections(seed, 400)
    expected = nms_numpy(boxes, scores, threshold, pixel_offset)
    got = nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold, pixel_offset).numpy()
    np.testing.assert_array_equal(got, expected)
    assert 0 < len(expected) < len(boxes)


def test_plus_one_pixel_convention_changes_the_decision():
    # Two 10x10 boxes overlapping by 4 columns: continuous IoU 40/160 = 0.25,
    # inclusive-pixel IoU 5*11/(2*121 - 55) = 0.294; a 0.27 threshold separates them.
    boxes = np.array([[0, 0, 10, 10], [6, 0, 16, 10]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert nms_numpy(boxes, scores, 0.27, pixel_offset=0.0).tolist() == [0, 1]
    assert nms_numpy(boxes, scores, 0.27, pixel_offset=1.0).tolist() == [0]
    assert nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.27, 1.0).tolist() == [0]


def test_an_iou_equal_to_the_threshold_does_not_suppress():
    """A box is suppressed only when its IoU *exceeds* the threshold (the public ``ovr <= thresh``
    keep rule): 10x10 and 10x20 pixel boxes sharing their top 10x10 have +1-pixel IoU exactly
    100 / 200 = 0.5, so at 0.5 every NMS path keeps both, and just under 0.5 drops the second."""
    from utils.nms import batched_nms

    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 19]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    width, height = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    intersection = np.float32(10 * 10)
    assert intersection / ((width * height).sum() - intersection) == 0.5  # exact, in float32 and float64
    one_image = torch.zeros(2, dtype=torch.long)
    for threshold, expected in ((0.5, [0, 1]), (0.49, [0])):
        assert nms_numpy(boxes, scores, threshold).tolist() == expected, threshold
        assert nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).tolist() == expected, threshold
        kept = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), one_image, threshold)
        assert kept.tolist() == expected, threshold


@pytest.mark.parametrize("merge", [None, True])
def test_a_score_equal_to_the_confidence_threshold_is_dropped(merge):
    """Candidates need a score *above* the threshold (the public ``scores > confidence_threshold``):
    a score of exactly 0.5 (exact in float32) is dropped at 0.5 and kept just under it, on the
    per-batch path and on the merged path that CUDA takes for batches of different sizes."""
    from utils.postprocess import postprocess_groups_to_host

    # far apart boxes: NMS suppresses nothing; image 0 scores 0.5 / 0.75, image 1 (another size) 0.5
    first = (torch.tensor([[[0.0, 0, 10, 10], [50, 50, 60, 60]]]), torch.tensor([[0.5, 0.75]]), torch.zeros(1, 2, 10))
    second = (torch.tensor([[[0.0, 0, 10, 10]]]), torch.tensor([[0.5]]), torch.zeros(1, 1, 10))
    assert torch.tensor(0.5, dtype=torch.float32).item() == 0.5
    for threshold, expected_counts in ((0.5, [1, 0]), (0.4999, [2, 1])):
        rows, counts = postprocess_groups_to_host([first, second], threshold, 0.4, merge=merge)
        assert counts == expected_counts, threshold
        assert (rows[:, 4] > threshold).all()
    found = postprocess(*first, confidence_threshold=0.5, nms_threshold=0.4)
    assert found.counts == [1] and found.scores.tolist() == [0.75]


def per_image_reference(boxes, scores, landmarks, conf, iou, top_k, keep_top_k):
    """The public pipeline's steps for one image: threshold, top-k, NumPy NMS, keep-top-k."""
    inds = np.where(scores > conf)[0]
    order = inds[np.argsort(-scores[inds], kind="stable")][:top_k]
    keep = nms_numpy(boxes[order], scores[order], iou)[:keep_top_k]
    return boxes[order][keep], scores[order][keep], landmarks[order][keep]


@pytest.mark.parametrize("nms_threshold", [0.3, 0.4, 0.7])  # the CLI default, the WIDER protocol's, a loose one
def test_batched_postprocess_equals_per_image_pipeline(nms_threshold):
    batch, n = 4, 600
    rng = np.random.default_rng(7)
    all_boxes, all_scores = zip(*(random_detections(s, n) for s in range(batch)))
    boxes = np.stack(all_boxes)
    scores = np.stack(all_scores)
    scores[2] = 0.01  # an image with no candidate above the threshold
    landmarks = rng.uniform(0, 300, (batch, n, 10)).astype(np.float32)
    found = postprocess(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(landmarks),
                        confidence_threshold=0.3, nms_threshold=nms_threshold, top_k=300, keep_top_k=40)
    assert len(found.counts) == batch and found.counts[2] == 0
    start = 0
    for image in range(batch):
        ref_boxes, ref_scores, ref_landmarks = per_image_reference(
            boxes[image], scores[image], landmarks[image], 0.3, nms_threshold, 300, 40)
        stop = start + found.counts[image]
        assert (found.image_index[start:stop] == image).all()
        np.testing.assert_array_equal(found.boxes[start:stop].numpy(), ref_boxes)
        np.testing.assert_array_equal(found.scores[start:stop].numpy(), ref_scores)
        np.testing.assert_array_equal(found.landmarks[start:stop].numpy(), ref_landmarks)
        start = stop
    assert max(found.counts) == 40  # keep_top_k is reached on the busy images


def test_top_k_cuts_the_candidates_before_nms():
    """Only the ``top_k`` best candidates above the threshold enter NMS: three far-apart boxes
    (none suppresses another) with top_k=2 give the two best, as sorting, cutting and NMS-ing
    them by hand does."""
    boxes = np.array([[0, 0, 10, 10], [100, 100, 120, 120], [200, 0, 230, 30]], np.float32)
    scores = np.array([0.7, 0.9, 0.8], np.float32)
    landmarks = np.arange(30, dtype=np.float32).reshape(3, 10)
    order = np.argsort(-scores, kind="stable")[:2]  # the public steps: sort by score, cut at top_k ...
    keep = order[nms_numpy(boxes[order], scores[order], 0.4)]  # ... then NMS (suppresses nothing here)
    assert keep.tolist() == [1, 2]
    for keep_top_k in (None, 750):
        found = postprocess(torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None],
                            torch.from_numpy(landmarks)[None], confidence_threshold=0.5, nms_threshold=0.4,
                            top_k=2, keep_top_k=keep_top_k)
        assert found.counts == [2]
        np.testing.assert_array_equal(found.boxes.numpy(), boxes[keep])
        np.testing.assert_array_equal(found.scores.numpy(), scores[keep])
        np.testing.assert_array_equal(found.landmarks.numpy(), landmarks[keep])
    everything = postprocess(torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None],
                             torch.from_numpy(landmarks)[None], confidence_threshold=0.5, nms_threshold=0.4, top_k=None)
    assert everything.counts == [3]  # the boxes really are far apart: the cut, not NMS, dropped one


def test_batched_postprocess_keeps_images_apart_with_negative_coordinates():
    # A face at the bottom-right corner of image 0 and a face cut off at the top-left of image 1
    # (negative decoded coordinates): offsetting groups by the largest coordinate alone would
    # make them overlap and suppress one another.
    boxes = torch.zeros(2, 1, 4)
    boxes[0, 0] = torch.tensor([900.0, 900.0, 1024.0, 1024.0])
    boxes[1, 0] = torch.tensor([-130.0, -130.0, 0.0, 0.0])
    scores = torch.tensor([[0.9], [0.8]])
    found = postprocess(boxes, scores, torch.zeros(2, 1, 10), confidence_threshold=0.5, nms_threshold=0.4)
    assert found.counts == [1, 1]
    assert found.image_index.tolist() == [0, 1]


def test_postprocess_drops_boxes_that_are_not_finite():
    # an untrained network's exp(offset) overflows: such a box must not reach the output, nor
    # upset the NMS of the other boxes and images (batched NMS offsets groups by coordinates)
    boxes = np.stack([random_detections(seed, 200)[0] for seed in (1, 2)])
    scores = np.stack([random_detections(seed, 200)[1] for seed in (1, 2)])
    landmarks = np.zeros((2, 200, 10), dtype=np.float32)
    broken = boxes.copy()
    broken[0, 5] = [10.0, 10.0, np.inf, np.inf]
    broken[0, 6] = [np.nan, 1.0, 2.0, 3.0]
    broken[1, 7] = [-np.inf, 0.0, 5.0, 5.0]
    scores[:, 5:8] = 0.99  # among the best candidates
    scores[1, 9] = np.nan  # ranked first by topk, if let through
    args = dict(confidence_threshold=0.3, nms_threshold=0.4, top_k=300, keep_top_k=None)
    found = postprocess(torch.from_numpy(broken), torch.from_numpy(scores), torch.from_numpy(landmarks), **args)
    assert torch.isfinite(found.boxes).all()
    without = scores.copy()
    without[0, 5:7] = 0.0
    without[1, 7] = 0.0
    without[1, 9] = 0.0
    expected = postprocess(torch.from_numpy(boxes), torch.from_numpy(without), torch.from_numpy(landmarks), **args)
    assert found.counts == expected.counts
    torch.testing.assert_close(found.boxes, expected.boxes, rtol=0, atol=0)
    torch.testing.assert_close(found.scores, expected.scores, rtol=0, atol=0)
    # nor do they take top-k places: with top_k 3 the three best finite candidates remain
    few = {**args, "top_k": 3}
    found = postprocess(torch.from_numpy(broken), torch.from_numpy(scores), torch.from_numpy(landmarks), **few)
    expected = postprocess(torch.from_numpy(boxes), torch.from_numpy(without), torch.from_numpy(landmarks), **few)
    assert found.counts == expected.counts and sum(found.counts) >= 2
    torch.testing.assert_close(found.boxes, expected.boxes, rtol=0, atol=0)


def test_a_huge_finite_box_changes_no_other_detection():
    """An untrained network's box can be finite but 1e17 px and more (exp of a large offset): the
    batched NMS offsets images apart by the coordinate range, which such a box must not blow up
    (it made every other box zero-width: no suppression in its image or its neighbours)."""
    boxes = torch.zeros(2, 4, 4)
    boxes[0, :3] = torch.tensor([[10.0, 10.0, 50.0, 50.0], [11.0, 10.0, 51.0, 50.0], [300.0, 300.0, 340.0, 340.0]])
    boxes[1, :3] = torch.tensor([[20.0, 20.0, 60.0, 60.0], [21.0, 21.0, 61.0, 61.0], [22.0, 20.0, 62.0, 60.0]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.0], [0.9, 0.8, 0.7, 0.0]])
    landmarks = torch.zeros(2, 4, 10)
    args = dict(confidence_threshold=0.5, nms_threshold=0.4)
    expected = postprocess(boxes, scores, landmarks, **args)
    assert expected.counts == [2, 1]
    boxes[1, 3] = torch.tensor([-1e20, 0.0, 5.0, 40.0])
    scores[1, 3] = 0.6
    found = postprocess(boxes, scores, landmarks, **args)
    assert found.counts == [2, 2]  # the huge box is one more detection of its image, nothing else changes
    torch.testing.assert_close(found.boxes[:3], expected.boxes, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_equals_per_group_nms_with_negative_coordinates(seed):
    from utils.nms import batched_nms
    boxes, scores = random_detections(seed, 900)
    boxes = torch.from_numpy(boxes) - 150.0  # a third of the boxes reach negative coordinates
    scores = torch.from_numpy(scores)
    groups = torch.from_numpy(np.random.default_rng(seed).integers(0, 4, len(scores)))
    kept = set(batched_nms(boxes, scores, groups, 0.4).tolist())
    expected = set()
    for group in range(4):
        members = torch.nonzero(groups == group).flatten()
        expected |= set(members[nms(boxes[members], scores[members], 0.4)].tolist())
    assert kept == expected


@pytest.mark.parametrize("chunk", [1, 150, 400])
def test_batched_nms_in_chunks_equals_one_call(chunk):
    """Whole groups per call (a group larger than the chunk alone): the same kept boxes, by
    decreasing score, as one call over all groups and as NMS group by group."""
    from utils.nms import batched_nms
    boxes, scores = random_detections(7, 900)
    boxes, scores = torch.from_numpy(boxes) - 100.0, torch.from_numpy(scores)
    rng = np.random.default_rng(7)
    groups = torch.from_numpy(rng.choice(9, len(scores), p=[0.5] + [1 / 16] * 8))  # group 0: ~450 boxes
    one_call = batched_nms(boxes, scores, groups, 0.4, chunk=len(scores))
    chunked = batched_nms(boxes, scores, groups, 0.4, chunk=chunk)
    assert torch.equal(chunked, one_call)  # scores are distinct, so the order is unique
    expected = set()
    for group in range(9):
        members = torch.nonzero(groups == group).flatten()
        expected |= set(members[nms(boxes[members], scores[members], 0.4)].tolist())
    assert set(chunked.tolist()) == expected and len(expected) > 100


def test_batched_nms_default_chunk_follows_the_device(monkeypatch):
    """Without ``chunk``, the calls hold at most the boxes' device's chunk (utils.nms.NMS_CHUNKS,
    measured per device type): 900 boxes in 9 groups take several calls under a CPU chunk of 300,
    one call under a CPU chunk of 900 and under an unknown device type's fallback, the CPU's."""
    from torchvision import ops

    from utils import nms as nms_module
    assert nms_module.nms_chunk("cuda") == nms_module.NMS_CHUNKS["cuda"]
    assert nms_module.nms_chunk(torch.device("cpu")) == nms_module.NMS_CHUNKS["cpu"]
    assert nms_module.nms_chunk("meta") == nms_module.NMS_CHUNKS["cpu"]
    boxes, scores = random_detections(3, 900)
    boxes, scores = torch.from_numpy(boxes), torch.from_numpy(scores)
    groups = torch.arange(900) % 9
    calls = []
    real_nms = ops.nms
    monkeypatch.setattr(ops, "nms", lambda b, s, t: calls.append(len(s)) or real_nms(b, s, t))
    expected = nms_module.batched_nms(boxes, scores, groups, 0.4, chunk=900)
    assert calls == [900]
    for cpu_chunk, calls_expected in ((300, [300, 300, 300]), (900, [900])):
        monkeypatch.setitem(nms_module.NMS_CHUNKS, "cpu", cpu_chunk)
        calls.clear()
        assert torch.equal(nms_module.batched_nms(boxes, scores, groups, 0.4), expected)
        assert calls == calls_expected


@pytest.mark.parametrize("keep_top_k", [None, 750, 40])
def test_postprocess_to_host_equals_postprocess_and_a_copy(keep_top_k):
    """One copy with the keep-top-k cut and the counts made on the host: the same rows, in the
    same order, and the same counts as postprocess followed by its copy to the host, also when
    keep-top-k cuts images (40 of about 100 survivors each) and for an image without detections."""
    from utils.postprocess import postprocess_to_host

    rng = np.random.default_rng(5)
    per_image = [random_detections(seed, 600) for seed in range(3)]
    boxes = torch.from_numpy(np.stack([b for b, _ in per_image]))
    scores = torch.from_numpy(np.stack([s for _, s in per_image]))
    scores[1] = 0.0  # no candidate in image 1
    landmarks = torch.from_numpy(rng.uniform(0, 300, (3, 600, 10)).astype(np.float32))
    found = postprocess(boxes, scores, landmarks, 0.3, 0.4, keep_top_k=keep_top_k)
    expected = torch.cat([found.boxes, found.scores[:, None], found.landmarks], dim=1).numpy()
    rows, counts = postprocess_to_host(boxes, scores, landmarks, 0.3, 0.4, keep_top_k=keep_top_k)
    assert counts == found.counts and counts[1] == 0 and rows.dtype == np.float32
    np.testing.assert_array_equal(rows, expected)
    if keep_top_k == 40:
        assert counts == [40, 0, 40]
    else:
        assert min(counts[0], counts[2]) > 40


@pytest.mark.parametrize("top_k, keep_top_k", [(5000, 750), (None, None), (150, 40)])
def test_post_processing_batches_of_different_sizes_together_equals_one_call_per_batch(top_k, keep_top_k,
                                                                                      monkeypatch):
    """postprocess_groups_to_host with ``merge=True`` (its CUDA way, forced here): batches with
    different prior counts (so different top-k widths, and a batch narrower than ``top_k``), an
    image without candidates, a box that is not finite and negative coordinates give the rows and
    counts of one postprocess_to_host call per batch, in order; NMS runs in chunks across batches."""
    from utils.postprocess import postprocess_groups_to_host, postprocess_to_host

    rng = np.random.default_rng(11)
    groups = []
    for index, (batch, priors) in enumerate([(2, 600), (1, 120), (3, 900)]):
        per_image = [random_detections(10 * index + image, priors) for image in range(batch)]
        boxes = torch.from_numpy(np.stack([b for b, _ in per_image])) - 50.0
        scores = torch.from_numpy(np.stack([s for _, s in per_image]))
        landmarks = torch.from_numpy(rng.uniform(-50, 300, (batch, priors, 10)).astype(np.float32))
        groups.append((boxes, scores, landmarks))
    groups[2][1][1] = 0.0  # no candidate in the second image of the last batch
    groups[0][0][0, 3] = torch.tensor([1.0, 2.0, float("inf"), 4.0])
    groups[0][1][0, 3] = 0.99
    options = dict(confidence_threshold=0.3, nms_threshold=0.4, top_k=top_k, keep_top_k=keep_top_k, nms_chunk=700)
    expected_rows, expected_counts = [], []
    for group in groups:
        rows, counts = postprocess_to_host(*group, **options)
        expected_rows.append(rows)
        expected_counts += counts
    import utils.postprocess as module
    calls = []
    monkeypatch.setattr(module, "postprocess_to_host", lambda *a, **k: calls.append(1) or postprocess_to_host(*a, **k))
    for merge, per_batch_calls in ((True, 0), (False, 3)):
        calls.clear()
        rows, counts = postprocess_groups_to_host(groups, **options, merge=merge)
        assert len(calls) == per_batch_calls
        assert counts == expected_counts and counts[4] == 0 and len(counts) == 6
        np.testing.assert_array_equal(rows, np.concatenate(expected_rows))
    assert np.isfinite(rows).all() and (rows[:, :4] < 0).any()
    if keep_top_k == 40:
        assert max(counts) == 40
    single_rows, single_counts = postprocess_groups_to_host(groups[:1], **options, merge=True)
    assert single_counts == expected_counts[:2]
    np.testing.assert_array_equal(single_rows, expected_rows[0])
    empty_rows, empty_counts = postprocess_groups_to_host([], **options)
    assert empty_rows.shape == (0, 15) and empty_counts == []
