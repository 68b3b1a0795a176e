"""Batched post-processing of decoded detections: score threshold, top-k, NMS, keep-top-k.

Runs on the tensors' device for the whole batch at once; only the final detections leave it
(:func:`postprocess_to_host`: in one copy, as FaceDetector and the benchmarks use it).
Semantics follow the public RetinaFace pipeline: keep scores ``> confidence_threshold``, the
``top_k`` best of those enter NMS (IoU ``> nms_threshold`` suppresses, +1 pixel areas), and the
``keep_top_k`` best survivors are returned (``None``: no limit, as the public WIDER FACE test).
``nms_threshold=None`` skips NMS: every candidate above the threshold is returned (the raw
candidates that test-time augmentation pools, ``utils/tta.py``).
A box that is not finite (the exp of an untrained or diverged network's offsets overflows) is
dropped before top-k, as if its score were under the threshold: it cannot be drawn, written or
evaluated, and must not take the place of a real candidate.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.nms import PUBLIC_PIXEL_OFFSET, batched_nms


class BatchDetections(NamedTuple):
    """Detections of a batch, concatenated over images and sorted by image then score.

    image_index (K,) int64; boxes (K, 4) x1y1x2y2; scores (K,); landmarks (K, 10); counts (B,)
    number of detections per image (a Python list, read back from the device).
    """

    image_index: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    counts: list[int]


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor,
                confidence_threshold: float, nms_threshold: float | None, top_k: int | None = 5000,
                keep_top_k: int | None = 750, pixel_offset: float = PUBLIC_PIXEL_OFFSET,
                nms_chunk: int | None = None) -> BatchDetections:
    """Select the final detections of each image.

    ``boxes`` (B, N, 4) x1y1x2y2, ``scores`` (B, N), ``landmarks`` (B, N, 10), in pixels (of
    the original images, for the public NMS convention: its +1 is one pixel of the original).
    ``nms_chunk``: candidates per NMS call (:func:`utils.nms.batched_nms`; same result; default:
    :func:`utils.nms.nms_chunk` of the device).
    """
    batch = scores.shape[0]
    image_index, boxes, scores, landmarks = _survivors(boxes, scores, landmarks, confidence_threshold,
                                                       nms_threshold, top_k, pixel_offset, nms_chunk)
    counts = _counts(image_index, batch)
    count_list = counts.tolist()
    if keep_top_k is not None and max(count_list, default=0) > keep_top_k:
        keep = _rank_in_image(image_index, counts) < keep_top_k
        image_index, boxes, scores, landmarks = image_index[keep], boxes[keep], scores[keep], landmarks[keep]
        count_list = [min(count, keep_top_k) for count in count_list]
    return BatchDetections(image_index, boxes, scores, landmarks, count_list)


def postprocess_to_host(boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor,
                        confidence_threshold: float, nms_threshold: float | None, top_k: int | None = 5000,
                        keep_top_k: int | None = 750, pixel_offset: float = PUBLIC_PIXEL_OFFSET,
                        nms_chunk: int | None = None) -> tuple[np.ndarray, list[int]]:
    """:func:`postprocess` with the detections brought to the host in one copy: (K, 15) float32
    rows ``[x1, y1, x2, y2, score, 10 landmark coordinates]`` by image then score, and the number of
    rows of each image. The keep-top-k cut and the counts are made on the host, so on CUDA the
    device is waited for twice (candidates, the copy) instead of three times."""
    survivors = _survivors(boxes, scores, landmarks, confidence_threshold, nms_threshold, top_k, pixel_offset,
                           nms_chunk)
    return _to_host(*survivors, batch=scores.shape[0], keep_top_k=keep_top_k)


def postprocess_groups_to_host(groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                               confidence_threshold: float, nms_threshold: float | None, top_k: int | None = 5000,
                               keep_top_k: int | None = 750, pixel_offset: float = PUBLIC_PIXEL_OFFSET,
                               nms_chunk: int | None = None, merge: bool | None = None
                               ) -> tuple[np.ndarray, list[int]]:
    """:func:`postprocess_to_host` of several batches, whose images differ in size (so in their
    number of priors): ``groups`` of (boxes (B_g, N_g, 4), scores (B_g, N_g), landmarks (B_g, N_g,
    10)) on one device. Rows and counts are those of the batches' images in order, the same as one
    call per batch gives.

    ``merge`` (default: on CUDA) runs the threshold, NMS and copy to the host once for all the
    batches: the device is waited for twice in all instead of twice per batch (H100 run 7: one
    call for ten sample images took 4.0 ms, eight calls for the same images by size 13.3 ms).
    On the CPU, with nothing to wait for, the gathers and padding that merging adds cost more than
    they save (3.6-4.0 against 3.0-3.6 ms per sample image, three runs), so each batch runs alone.
    """
    if merge is None:
        merge = bool(groups) and groups[0][1].device.type == "cuda"
    if len(groups) == 1:
        return postprocess_to_host(*groups[0], confidence_threshold, nms_threshold, top_k, keep_top_k, pixel_offset,
                                   nms_chunk)
    if not merge:
        parts = [postprocess_to_host(*group, confidence_threshold, nms_threshold, top_k, keep_top_k, pixel_offset,
                                     nms_chunk) for group in groups]
        rows = [part_rows for part_rows, _ in parts] or [np.zeros((0, 15), dtype=np.float32)]
        return np.concatenate(rows), [count for _, counts in parts for count in counts]
    tops = []  # per batch: (B_g, k_g) sorted scores, their (B_g, k_g, 4) boxes and (B_g, k_g, 10) landmarks
    for boxes, scores, landmarks in groups:
        scores_k, index_k = _top_candidates(boxes, scores, top_k)
        tops.append((scores_k, _take(boxes, index_k), _take(landmarks, index_k)))
    width = max(scores_k.shape[1] for scores_k, _, _ in tops)
    # every batch's candidates padded to the widest top-k; a padded score is -inf, under any threshold
    top_scores = torch.cat([F.pad(t, (0, width - t.shape[1]), value=float("-inf")) for t, _, _ in tops])
    top_boxes = torch.cat([F.pad(b, (0, 0, 0, width - b.shape[1])) for _, b, _ in tops])
    top_landmarks = torch.cat([F.pad(m, (0, 0, 0, width - m.shape[1])) for _, _, m in tops])
    image_index, rank = torch.nonzero(top_scores > confidence_threshold, as_tuple=True)
    survivors = _nms_survivors(image_index, top_boxes[image_index, rank], top_scores[image_index, rank],
                               top_landmarks[image_index, rank], nms_threshold, pixel_offset, nms_chunk)
    return _to_host(*survivors, batch=top_scores.shape[0], keep_top_k=keep_top_k)


def _to_host(image_index: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor,
             batch: int, keep_top_k: int | None) -> tuple[np.ndarray, list[int]]:
    """Survivors (sorted by image then score) -> (K, 15) host rows after the keep-top-k cut, and
    the rows of each of the ``batch`` images, in one copy."""
    # image index and rank travel as float32 columns: exact below 2^24
    columns = [boxes.float(), scores.float()[:, None], landmarks.float(), image_index.float()[:, None]]
    if keep_top_k is not None:
        columns.append(_rank_in_image(image_index, _counts(image_index, batch)).float()[:, None])
    host = torch.cat(columns, dim=1).cpu().numpy()
    if keep_top_k is not None:
        host = host[host[:, 16] < keep_top_k]
    counts = np.bincount(host[:, 15].astype(np.int64), minlength=batch).tolist()
    return np.ascontiguousarray(host[:, :15]), counts


#: ``finish(mark=None)`` of :meth:`DeferredPostprocess.defer`: the (K, 15) rows and counts of
#: :func:`postprocess_to_host`; ``mark(name)`` is called where the post-processing starts and ends.
Finish = Callable[..., tuple[np.ndarray, list[int]]]


class DeferredPostprocess:
    """:func:`postprocess_to_host` of a batch run later, so that the device computes the next
    batch while the host post-processes this one.

    A caller queues batch ``i + 1``'s network before it calls ``finish()`` of batch ``i``. On CUDA
    :meth:`defer` copies the dense outputs on the current stream (a CUDA graph writes the next
    batch into the same output buffers) and records an event; ``finish()`` post-processes on a
    side stream that waits for that event only, so its host synchronisations (the candidates'
    count, NMS, the copy to the host) do not also wait for the network queued after it. On the
    CPU ``finish()`` simply runs the post-processing. Same results either way.
    """

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def defer(self, boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor, **options) -> Finish:
        """``boxes`` (B, N, 4), ``scores`` (B, N), ``landmarks`` (B, N, 10) as for :func:`postprocess`;
        ``options``: :func:`postprocess_to_host`'s other arguments."""
        return self.defer_groups([(boxes, scores, landmarks)], **options)

    def defer_groups(self, groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], **options) -> Finish:
        """:meth:`defer` of several batches of different image sizes, post-processed together by
        :func:`postprocess_groups_to_host` (their images' rows and counts in order)."""
        stream = self.stream
        if stream is not None:
            groups = [tuple(t.clone() for t in group) for group in groups]
            ready = torch.cuda.Event()
            ready.record()

        @torch.inference_mode()
        def finish(mark: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[int]]:
            mark = mark or (lambda name: None)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if stream is not None:
                    stream.wait_event(ready)
                mark("start")
                # the last step copies to the host and waits for this stream: every tensor above
                # is free to reuse once it returns
                result = postprocess_groups_to_host(groups, **options)
                mark("postprocess")
            return result

        return finish


def _survivors(boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor, confidence_threshold: float,
               nms_threshold: float | None, top_k: int | None, pixel_offset: float, nms_chunk: int | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold, top-k and NMS on the device: (image_index (K,), boxes (K, 4), scores (K,),
    landmarks (K, 10)) of the survivors, by image then decreasing score."""
    top_scores, top_index = _top_candidates(boxes, scores, top_k)              # (B, k)
    image_index, rank = torch.nonzero(top_scores > confidence_threshold, as_tuple=True)
    prior_index = top_index[image_index, rank]
    return _nms_survivors(image_index, boxes[image_index, prior_index], top_scores[image_index, rank],
                          landmarks[image_index, prior_index], nms_threshold, pixel_offset, nms_chunk)


def _top_candidates(boxes: torch.Tensor, scores: torch.Tensor, top_k: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) best scores of each image, sorted, and their prior indices (k: ``top_k``, at most N)."""
    num_priors = scores.shape[1]
    k = num_priors if top_k is None else min(top_k, num_priors)
    # a box that is not finite, or a NaN score (topk ranks NaN first), takes no top-k place
    scores = scores.masked_fill(~torch.isfinite(boxes).all(dim=2) | scores.isnan(), float("-inf"))
    return scores.topk(k, dim=1, sorted=True)


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) ``values`` at the (B, k) prior ``index`` of each image -> (B, k, C)."""
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[2]))


def _nms_survivors(image_index: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor,
                   nms_threshold: float | None, pixel_offset: float, nms_chunk: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NMS within each image of the candidates (K,) / (K, 4) / (K,) / (K, 10), which are ordered by
    image then decreasing score; the survivors in the same order (``nms_threshold=None``: all)."""
    if nms_threshold is None:
        return image_index, boxes, scores, landmarks
    keep = batched_nms(boxes, scores, image_index, nms_threshold, pixel_offset, nms_chunk)
    # keep is sorted by score over the whole batch; regroup by image (stable keeps score order).
    keep = keep[torch.sort(image_index[keep], stable=True).indices]
    return image_index[keep], boxes[keep], scores[keep], landmarks[keep]


def _counts(image_index: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) detections per image, on the device. Not torch.bincount: on CUDA it reads the largest
    index back to the host (two host syncs per batch at H100 run 5's sync sites)."""
    return torch.zeros(batch, dtype=torch.long, device=image_index.device).index_add_(
        0, image_index, torch.ones_like(image_index))


def _rank_in_image(image_index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(K,) position of each detection within its image (detections sorted by image)."""
    first_of_image = torch.cumsum(counts, 0) - counts
    return torch.arange(image_index.numel(), device=image_index.device) - first_of_image[image_index]
