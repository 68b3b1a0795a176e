"""A per-image detection pipeline built like the public Pytorch_Retinaface ``detect.py``.

Used as the baseline of the speed benchmarks (the ratio comes from one run on one machine) and
as an independent reference in tests. Steps, as in the public code: float32 mean subtraction
on the CPU, forward with a softmax, priors from a Python loop (normalised cx, cy, w, h), decode
on the CPU, NumPy threshold/argsort/NMS with +1 pixel areas (a loop over kept boxes), keep-top-k.

Apart from the network it shares no code with the toolkit (priors, decoding and NMS are written
here again, the public way), so tests that compare the two can catch a decoding or NMS bug.

``python tools/public_pipeline.py WEIGHTS DATASET [DEVICE]`` times one pass over a data set's val
images in a fresh process (:func:`time_folder`; one JSON line): the baseline of ``tools/benchmark_cli.py``,
which times ``test.py`` the same way.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import cv2
import numpy as np
import torch

VARIANCES = (0.1, 0.2)


def python_loop_priors(height: int, width: int, min_sizes, steps=(8, 16, 32)) -> torch.Tensor:
    """Priors (N, 4) normalised (cx, cy, w, h) in level -> row -> column -> size order.

    Built the way the public ``PriorBox.forward`` builds them, because its cost is part of the
    baseline: per anchor, the size terms, a one-element list for each centre coordinate and a
    product over the two. A leaner loop giving the same values (one list extension per anchor)
    ran 2.4-2.8x faster per sample WIDER image on a 2-core CPU, which understated the public time."""
    feature_maps = [(math.ceil(height / step), math.ceil(width / step)) for step in steps]
    anchors = []
    for level, (rows, cols) in enumerate(feature_maps):
        step = steps[level]
        for row, col in itertools.product(range(rows), range(cols)):
            for size in min_sizes[level]:
                size_x, size_y = size / width, size / height
                centres_x = [x * step / width for x in [col + 0.5]]
                centres_y = [y * step / height for y in [row + 0.5]]
                for cy, cx in itertools.product(centres_y, centres_x):
                    anchors += [cx, cy, size_x, size_y]
    return torch.Tensor(anchors).view(-1, 4)


def public_decode(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets (N, 4) -> x1y1x2y2 in the units of ``priors`` (N, 4) (cx, cy, w, h): centre and
    size first, then the corner, with the far corner as corner + size (the public order of operations)."""
    boxes = torch.cat((priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:],
                       priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def public_decode_landm(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Landmark offsets (N, 10) -> five (x, y) points (N, 10) in the units of ``priors``."""
    return torch.cat([priors[:, :2] + offsets[:, 2 * i:2 * i + 2] * VARIANCES[0] * priors[:, 2:]
                      for i in range(5)], dim=1)


def py_cpu_nms(dets: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS of float32 ``dets`` (N, 5) x1, y1, x2, y2, score, +1 pixel areas; a box is
    dropped when its IoU with a kept one exceeds ``threshold``. Kept row indices, best first."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        best = order[0]
        keep.append(int(best))
        width = np.maximum(0.0, np.minimum(x2[best], x2[order[1:]]) - np.maximum(x1[best], x1[order[1:]]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[order[1:]]) - np.maximum(y1[best], y1[order[1:]]) + 1)
        overlap = width * height
        iou = overlap / (areas[best] + areas[order[1:]] - overlap)
        order = order[np.where(iou <= threshold)[0] + 1]
    return keep


def public_style_detect(model: torch.nn.Module, image_bgr: np.ndarray, confidence_threshold: float = 0.02,
                        nms_threshold: float = 0.4, top_k: int | None = 5000, keep_top_k: int | None = 750,
                        timings: dict[str, float] | None = None,
                        device: torch.device | str | None = None, resize: float = 1.0) -> np.ndarray:
    """Detections (K, 15): x1, y1, x2, y2, score, 10 landmark values, original-image pixels.

    ``model`` is a single-stage :class:`models.retinaface.RetinaFace` in eval mode, on ``device``
    (default: the CPU). As in the public ``detect.py``, the input is prepared on the host and
    copied, the priors are built on the host and copied, decoding runs on the device and
    everything after it in NumPy. ``timings``, when given, accumulates seconds per step
    (forward, priors, decode, nms); on CUDA it waits for the forward pass to end the "forward"
    step, which the public code does not (its Python prior loop overlaps the GPU's work), so
    timed passes leave it out. ``top_k`` / ``keep_top_k`` ``None``: no cut (the public
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
        if timings is not None:  # only to split the time: the public code builds its priors while the GPU works
            synchronize()
        after_forward = clock()
        priors = python_loop_priors(height, width, model.config.min_sizes).to(device)
        after_priors = clock()
        scale = torch.tensor([width, height] * 2, dtype=torch.float32, device=device)
        boxes = (public_decode(loc.squeeze(0), priors) * scale / resize).cpu().numpy()
        scores = conf.squeeze(0).cpu().numpy()[:, 1]
        scale_landmarks = torch.tensor([width, height] * 5, dtype=torch.float32, device=device)
        points = (public_decode_landm(landmarks.squeeze(0), priors) * scale_landmarks / resize).cpu().numpy()
    after_decode = clock()
    inds = np.where(scores > confidence_threshold)[0]
    boxes, points, scores = boxes[inds], points[inds], scores[inds]
    order = scores.argsort()[::-1][:top_k]
    boxes, points, scores = boxes[order], points[order], scores[order]
    dets = np.hstack((boxes, scores[:, np.newaxis])).astype(np.float32, copy=False)
    keep = py_cpu_nms(dets, nms_threshold)
    result = np.concatenate((dets[keep], points[keep]), axis=1)[:keep_top_k]
    if timings is not None:
        for name, seconds in (("forward", after_forward - started), ("priors", after_priors - after_forward),
                              ("decode", after_decode - after_priors), ("nms", clock() - after_decode)):
            timings[name] = timings.get(name, 0.0) + seconds
    return result


def time_folder(weights: str, dataset: str, device: str, autotune: bool = True) -> dict[str, object]:
    """One pass of :func:`public_style_detect` over the val images of the ``dataset`` root (the
    ones test.py reads: ``utils.evaluation.list_val_images``) in this process, as the public
    ``test_widerface.py`` runs a data set: cuDNN autotuning on (its ``cudnn.benchmark = True``),
    every image at original size, confidence 0.02, no top-k cut, each size met for the first time
    when the process is fresh. Times the pass after loading the model, disk reading included."""
    import time

    from models.detector import cudnn_autotuning
    from utils.checkpoint import load_model
    from utils.evaluation import list_val_images
    from utils.image_io import read_image

    paths = [image.path for image in list_val_images(dataset)]
    model = load_model(weights).to(device).eval()
    sizes, found = set(), 0
    with cudnn_autotuning(autotune):
        started = time.perf_counter()
        for path in paths:
            image = read_image(path)
            sizes.add(image.shape[:2])
            found += len(public_style_detect(model, image, 0.02, top_k=None, keep_top_k=None, device=device))
        seconds = time.perf_counter() - started
    return {"pipeline": "public-style, one pass in a fresh process", "device": str(device), "images": len(paths),
            "sizes": len(sizes), "seconds": round(seconds, 3), "ms_per_img": round(seconds / len(paths) * 1000, 2),
            "detections": found, "cudnn_benchmark": autotune}


if __name__ == "__main__":  # python tools/public_pipeline.py WEIGHTS DATASET [DEVICE]
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python tools/public_pipeline.py WEIGHTS DATASET [DEVICE] (DATASET: the folder "
                         "holding val/images and val/label.txt)")
    print(json.dumps(time_folder(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "cpu")))
