"""Batched post-processing of decoded detections: score threshold, top-k, NMS, keep-top-k.

Runs on the tensors' device for the whole batch at once; only the final detections leave it
(:func:`postprocess_to_host`: in one copy, as FaceDetector and the benchmarks use it).
Semantics follow the public RetinaFace pipeline: keep scores ``> confidence_threshold``, the
``top_k`` best of those enter NMS (IoU ``> nms_threshold`` suppresses, +1 pixel areas), and the
``keep_top_k`` best survivors are returned (``None``: no limit, as the public WIDER FACE test).
A box that is not finite (the exp of an untrained or diverged network's offsets overflows) is
dropped before top-k, as if its score were under the threshold: it cannot be drawn, written or
evaluated, and must not take the place of a real candidate.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import numpy as np
import torch

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
                confidence_threshold: float, nms_threshold: float, top_k: int | None = 5000,
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
                        confidence_threshold: float, nms_threshold: float, top_k: int | None = 5000,
                        keep_top_k: int | None = 750, pixel_offset: float = PUBLIC_PIXEL_OFFSET,
                        nms_chunk: int | None = None) -> tuple[np.ndarray, list[int]]:
    """:func:`postprocess` with the detections brought to the host in one copy: (K, 15) float32
    rows ``[x1, y1, x2, y2, score, 10 landmark coordinates]`` by image then score, and the number of
    rows of each image. The keep-top-k cut and the counts are made on the host, so on CUDA the
    device is waited for twice (candidates, the copy) instead of three times."""
    batch = scores.shape[0]
    image_index, boxes, scores, landmarks = _survivors(boxes, scores, landmarks, confidence_threshold,
                                                       nms_threshold, top_k, pixel_offset, nms_chunk)
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
    CPU ``finish()`` simply runs :func:`postprocess_to_host`. Same results either way.
    """

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def defer(self, boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor, **options) -> Finish:
        """``boxes`` (B, N, 4), ``scores`` (B, N), ``landmarks`` (B, N, 10) as for :func:`postprocess`;
        ``options``: :func:`postprocess_to_host`'s other arguments."""
        stream = self.stream
        if stream is not None:
            boxes, scores, landmarks = boxes.clone(), scores.clone(), landmarks.clone()
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
                result = postprocess_to_host(boxes, scores, landmarks, **options)
                mark("postprocess")
            return result

        return finish


def _survivors(boxes: torch.Tensor, scores: torch.Tensor, landmarks: torch.Tensor, confidence_threshold: float,
               nms_threshold: float, top_k: int | None, pixel_offset: float, nms_chunk: int | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold, top-k and NMS on the device: (image_index (K,), boxes (K, 4), scores (K,),
    landmarks (K, 10)) of the survivors, by image then decreasing score."""
    num_priors = scores.shape[1]
    k = num_priors if top_k is None else min(top_k, num_priors)
    # a box that is not finite, or a NaN score (topk ranks NaN first), takes no top-k place
    scores = scores.masked_fill(~torch.isfinite(boxes).all(dim=2) | scores.isnan(), float("-inf"))
    top_scores, top_index = scores.topk(k, dim=1, sorted=True)              # (B, k)
    image_index, rank = torch.nonzero(top_scores > confidence_threshold, as_tuple=True)
    prior_index = top_index[image_index, rank]
    candidate_scores = top_scores[image_index, rank]
    candidate_boxes = boxes[image_index, prior_index]
    candidate_landmarks = landmarks[image_index, prior_index]

    keep = batched_nms(candidate_boxes, candidate_scores, image_index, nms_threshold, pixel_offset, nms_chunk)
    # keep is sorted by score over the whole batch; regroup by image (stable keeps score order).
    keep = keep[torch.sort(image_index[keep], stable=True).indices]
    return image_index[keep], candidate_boxes[keep], candidate_scores[keep], candidate_landmarks[keep]


def _counts(image_index: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) detections per image, on the device. Not torch.bincount: on CUDA it reads the largest
    index back to the host (two host syncs per batch at H100 run 5's sync sites)."""
    return torch.zeros(batch, dtype=torch.long, device=image_index.device).index_add_(
        0, image_index, torch.ones_like(image_index))


def _rank_in_image(image_index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(K,) position of each detection within its image (detections sorted by image)."""
    first_of_image = torch.cumsum(counts, 0) - counts
    return torch.arange(image_index.numel(), device=image_index.device) - first_of_image[image_index]
