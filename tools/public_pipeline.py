"""A per-image detection pipeline built like the public Pytorch_Retinaface ``detect.py``.

Used as the baseline of the speed benchmarks (the ratio comes from one run on one machine) and
as an independent reference in tests. Steps, as in the public code: float32 mean subtraction
on the CPU, forward with a softmax, priors from a Python loop (normalised cx, cy, w, h), decode
on the CPU, NumPy threshold/argsort/NMS with +1 pixel areas (a loop over kept boxes), keep-top-k.
"""
from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import torch

from utils.box_utils import decode, decode_landm
from utils.nms import nms_numpy


def python_loop_priors(height: int, width: int, min_sizes, steps=(8, 16, 32)) -> torch.Tensor:
    """Priors (N, 4) normalised (cx, cy, w, h) in level -> row -> column -> size order."""
    anchors = []
    for step, sizes in zip(steps, min_sizes):
        for row, col in itertools.product(range(math.ceil(height / step)), range(math.ceil(width / step))):
            for size in sizes:
                anchors += [(col + 0.5) * step / width, (row + 0.5) * step / height, size / width, size / height]
    return torch.tensor(anchors, dtype=torch.float32).view(-1, 4)


def public_style_detect(model: torch.nn.Module, image_bgr: np.ndarray, confidence_threshold: float = 0.02,
                        nms_threshold: float = 0.4, top_k: int | None = 5000, keep_top_k: int | None = 750,
                        timings: dict[str, float] | None = None,
                        device: torch.device | str | None = None, resize: float = 1.0) -> np.ndarray:
    """Detections (K, 15): x1, y1, x2, y2, score, 10 landmark values, original-image pixels.

    ``model`` is a single-stage :class:`models.retinaface.RetinaFace` in eval mode, on ``device``
    (default: the CPU). As in the public ``detect.py``, the input is prepared on the host and
    copied, the priors are built on the host and copied, decoding runs on the device and
    everything after it in NumPy. ``timings``, when given, accumulates seconds per step
    (forward, priors, decode, nms). ``top_k`` / ``keep_top_k`` ``None``: no cut (the public
    ``test_widerface.py``). ``resize`` != 1: as ``test_widerface.py`` at 1600/2150, the float32
    image is resized (bilinear) and the boxes are divided by ``resize`` before NMS.
    """
    import time

    device = torch.device(device or "cpu")

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    clock = time.perf_counter
    started = clock()
    image = np.float32(image_bgr)
    if resize != 1.0:
        image = cv2.resize(image, None, None, fx=resize, fy=resize, interpolation=cv2.INTER_LINEAR)
    height, width, _ = image.shape
    image -= (104, 117, 123)
    tensor = torch.from_numpy(image.transpose(2, 0, 1)).unsqueeze(0).to(device)
    with torch.no_grad():
        stage = model(tensor)[0]
        loc, conf, landmarks = stage.loc, torch.softmax(stage.conf, dim=-1), stage.landm
        synchronize()
        after_forward = clock()
        priors = python_loop_priors(height, width, model.config.min_sizes).to(device)
        after_priors = clock()
        scale = torch.tensor([width, height] * 2, dtype=torch.float32, device=device)
        boxes = (decode(loc.squeeze(0), priors) * scale / resize).cpu().numpy()
        scores = conf.squeeze(0).cpu().numpy()[:, 1]
        scale_landmarks = torch.tensor([width, height] * 5, dtype=torch.float32, device=device)
        points = (decode_landm(landmarks.squeeze(0), priors) * scale_landmarks / resize).cpu().numpy()
    after_decode = clock()
    inds = np.where(scores > confidence_threshold)[0]
    boxes, points, scores = boxes[inds], points[inds], scores[inds]
    order = scores.argsort()[::-1][:top_k]
    boxes, points, scores = boxes[order], points[order], scores[order]
    dets = np.hstack((boxes, scores[:, np.newaxis])).astype(np.float32, copy=False)
    keep = nms_numpy(dets[:, :4], dets[:, 4], nms_threshold)
    result = np.concatenate((dets[keep], points[keep]), axis=1)[:keep_top_k]
    if timings is not None:
        for name, seconds in (("forward", after_forward - started), ("priors", after_priors - after_forward),
                              ("decode", after_decode - after_priors), ("nms", clock() - after_decode)):
            timings[name] = timings.get(name, 0.0) + seconds
    return result
