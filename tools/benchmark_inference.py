"""End-to-end inference benchmark: images/s and latency of the batched device pipeline, fidelity
of its fast paths, and the public-style per-image pipeline timed in the same run.

    python tools/benchmark_inference.py [--device cuda] [--models mobilenet0.25,resnet50_cascade]
        [--batch_sizes 1,8,32] [--size 640x480] [--variants ref,tf32,fp16,bf16,fp16+graph,bf16+graph]
        [--compile] [--iters 30] [--warmup 5] [--weights MODEL=PATH] [--out FILE]

What one run measures
---------------------
*synthetic*: for every model, batch size and variant, ``iters`` end-to-end batches at a fixed
size (default 640x480): a pinned host uint8 BGR batch (B, H, W, 3) -> device copy -> float
conversion and mean subtraction on the device -> forward -> decode -> batched post-processing
(threshold, top-k, NMS, keep-top-k; ``utils/postprocess.py``) -> detections on the host. Every
iteration is synchronised; the JSON has the median / p10 / p90 latency, images/s = batch /
median latency, and the per-stage split (h2d, network = preprocess + forward + decode,
postprocess) from CUDA events (host clock on the CPU). On CUDA ``stream_images_per_s``
(batch > 1) is the throughput of up to 20 batches run back to back, the next batch's
host-to-device copy overlapping the current batch on a side stream and its network queued before
the current batch is post-processed on another (as ``FaceDetector.submit`` / test.py);
``stream_serial_images_per_s`` the same with each batch post-processed before the next is queued
(how runs 1-8 streamed). ``--stream off`` skips both.
The images are crops of the sample WIDER images (real content, so post-processing sees real
detections) or uniform noise (``--content noise``). Models without ``--weights`` get random weights with BatchNorm statistics
calibrated on the benchmark images and a 1 % face prior on the class heads, so their score
distribution (and the post-processing load) looks like a detector's, not like coin flips.

*sample*: the sample WIDER images at original size with the published mobilenet0.25 weights
(confidence 0.02, NMS 0.4, like tools/benchmark_cpu.py; both sides keep the public ``detect.py``'s
top 5000 candidates and 750 detections, which the public ``test_widerface.py`` does not cut: on
the busiest sample image that halves the public-style NMS time): our pipeline (images of one size batched
together, as ``FaceDetector`` does), ``FaceDetector.detect`` itself (one call at a time, and its
``_streamed`` rows, on CUDA: passes submitted ahead, as test.py runs its batches), and the public-style per-image
pipeline (tools/public_pipeline.py: CPU mean subtraction, forward, Python prior loop, decode,
NumPy NMS; on CUDA the forward and decode run on the GPU like the public detect.py, timed in
PyTorch's default precision as the public scripts run: cuDNN TF32 on). All start from decoded
images; disk reading (``read_image``) is timed separately. The speed-up is public ms/img over
ours, from this one run. These passes repeat sizes already run, so cuDNN
autotuning and CUDA graphs are warm. *new sizes* (``--sample_new_size_passes``) times one pass
over images of sizes not run before (the sample images minus a few bottom rows), as a single pass
over a data set of many sizes meets them: the public-style pipeline with cuDNN autotuning on, as the public
``test_widerface.py`` sets it (every new size is autotuned), ``FaceDetector`` in the settings of
``NEW_SIZE_PIPELINES`` (test.py's defaults first: autotuning off), then the models of
``--sample_new_size_models`` (default on CUDA: the ResNet-50 cascade, random weights) in NHWC and
NCHW: the check of ``--channels_last auto``.

Variants (``--variants``, names joined by ``+``)
-------------------------------------------------
precision ``fp32`` (IEEE float32: TF32 off), ``tf32`` (float32 with TF32 convolutions and
matmuls), ``bf16`` / ``fp16`` (autocast); modifiers ``nchw`` / ``cl`` (memory format; default
channels_last for every model: ``FaceDetector``'s default is NCHW on CUDA for mobilenet0.25,
see ``models.dense_path.default_channels_last``), ``nofuse`` (keep BatchNorm; default: folded), ``graph``
(CUDA graph of preprocess + forward + decode per input shape; post-processing has data-dependent
shapes and stays eager), ``compile`` (``torch.compile`` of the same region). ``ref`` =
``fp32+nchw+nofuse``: the reference path. ``graph`` / ``compile`` variants are skipped with a note
on the CPU. ``--compile`` adds ``fp16+compile+graph`` (off by default: compiling every shape of
the ResNet-50 cascade costs minutes). fp16 rather than bf16 is the fast default: on the sample
images bf16 autocast moves 8 of 376 detections (score >= 0.5) below IoU 0.98 against fp32 (min
IoU 0.92, score differences up to 0.04), fp16 none (score differences <= 0.004, landmarks
<= 0.1 px; ``tools/precision_check.py``, CPU autocast, whose rounding is the same). Both are in the
default CUDA variants; on the CPU, DensePath runs every precision in float32 (as FaceDetector does).

Fidelity: every variant's detections on the first batch (and on the sample images) are compared
with the reference path's, both ways, with ``tools/fidelity.py: unmatched`` (a reference detection
with score >= 0.5 needs a counterpart with IoU >= 0.98, score within ``--score_tol`` and landmarks
within ``--landmark_tol`` px; the comparison pass uses confidence 0.3 so that a score just under
0.5 on one side is still found). 16-bit variants use ``--score_tol_16`` / ``--landmark_tol_16``.
Summaries and "best" pick the fastest variant whose fidelity check passed.

Prints ONE JSON line (device, torch version, date, command, every measurement); ``--out FILE``
appends it to FILE. ``tools/speed_table.py`` renders such lines as Markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.dense_path import DensePath, default_channels_last  # noqa: E402
from models.detector import StageClock, cudnn_autotuning, resolve_device, same_size_groups  # noqa: E402
from models.retinaface import ModelConfig, RetinaFace, preprocess  # noqa: E402
from tools import check_inputs, shared_root  # noqa: E402
from tools.fidelity import as_rows, dense_disagreement, nms_near_ties, unmatched  # noqa: E402
from tools.public_pipeline import public_style_detect  # noqa: E402
from utils.ahead import launched_one_ahead  # noqa: E402
from utils.image_io import IMAGE_EXTENSIONS, read_image  # noqa: E402
from utils.postprocess import DeferredPostprocess, postprocess_to_host  # noqa: E402

SHARED = shared_root()
SAMPLE_IMAGES = SHARED / "data" / "widerface_sample" / "val" / "images"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet0.25_Final.pth"

#: Benchmark model names -> architectures. ``resnet50_cascade`` is ``ModelConfig()``, the default.
MODELS: dict[str, ModelConfig] = {
    "mobilenet0.25": ModelConfig(network="mobilenet0.25", cascade=False),
    "resnet50_cascade": ModelConfig(),
    "resnet50": ModelConfig(network="resnet50", cascade=False),
}
FACE_PRIOR = 0.01          # class-head face probability of the random-weight models
FIDELITY_CONFIDENCE = 0.3  # confidence of the fidelity pass (compared at score >= 0.5)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


# ------------------------------------------------------------------------------------------------
# Shared helpers (also used by tools/benchmark_train.py)
# ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions and host facts for the JSON header."""
    env: dict[str, Any] = {
        "device_type": device.type, "torch": torch.__version__, "python": platform.python_version(),
        "numpy": np.__version__, "cv2": cv2.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):  # the caching allocator's settings change the timings
        env["cuda_alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count)
    else:
        env["device"] = f"cpu ({env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    return env


def report_header(name: str, script: str, argv: Sequence[str], device: torch.device) -> dict[str, Any]:
    return {"benchmark": name,
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "command": shlex.join(["python", script, *argv]), "env": environment(device)}


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print the report as one JSON line; append it to ``out`` when given."""
    line = json.dumps(report, default=str)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def finish_report(report: dict[str, Any], notes: list[str], errors: list[str], started: float,
                  out: str | None) -> dict[str, Any]:
    """Add the notes, errors and total time to ``report`` and :func:`emit` it."""
    report["notes"] = notes
    report["errors"] = errors
    report["total_s"] = rnd(time.perf_counter() - started)
    emit(report, out)
    return report


def record_failure(result: dict[str, Any], errors: list[str], label: str, error: BaseException) -> None:
    """A failed measurement keeps the others' numbers: its error goes into ``result`` and ``errors``."""
    result["error"] = f"{type(error).__name__}: {error}"
    errors.append(f"{label}: {result['error']}")
    traceback.print_exc()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(seconds: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """median / p10 / p90 / min / mean of ``seconds`` times ``scale`` (ms by default)."""
    values = sorted(v * scale for v in seconds)
    if not values:
        return {}

    def pick(q: float) -> float:
        return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]

    return {"median": rnd(statistics.median(values)), "p10": rnd(pick(0.1)), "p90": rnd(pick(0.9)),
            "min": rnd(values[0]), "mean": rnd(statistics.fmean(values)), "n": len(values)}


def rnd(value: float | None, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (JSON readability)."""
    if value is None or not math.isfinite(value) or value == 0:
        return value
    return round(value, max(0, digits - 1 - int(math.floor(math.log10(abs(value))))))


@contextlib.contextmanager
def tf32_flags(device: torch.device, convolutions: bool, matmuls: bool):
    """TF32 for cuDNN convolutions and for matmuls on or off inside the block (CUDA only;
    restored after)."""
    if device.type != "cuda":
        yield
        return
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = convolutions, matmuls
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def tf32_mode(device: torch.device, enabled: bool):
    """TF32 convolutions and matmuls on or off inside the block (CUDA only; restored after)."""
    return tf32_flags(device, enabled, enabled)


def public_precision(device: torch.device):
    """PyTorch's default float32 settings inside the block, whatever they are outside: cuDNN
    convolutions in TF32, matmuls in full float32. The public scripts set neither, so this is how
    they run on a GPU."""
    return tf32_flags(device, True, False)


def release(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync_sites(fn: Callable[[], Any], toggle: bool = True) -> dict[str, Any] | None:
    """Host synchronisations (``.item()``, ``.cpu()``, boolean indexing, pageable copies ...) made
    while ``fn()`` runs, counted per source line with CUDA's sync debug mode; ``toggle=False`` when
    ``fn`` switches the mode on and off itself. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    import warnings
    from collections import Counter
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if toggle:
                torch.cuda.set_sync_debug_mode("warn")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    def site(w) -> str:
        path = Path(w.filename)
        try:
            path = path.resolve().relative_to(REPO)
        except ValueError:
            path = Path(path.name)
        return f"{path}:{w.lineno}"

    sites = Counter(site(w) for w in caught if "synchroniz" in str(w.message).lower())
    return {"count": sum(sites.values()), "sites": dict(sites.most_common(12))}


# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    precision: str = "fp32"
    channels_last: bool = False
    fuse_bn: bool = True
    graph: bool = False
    compile: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def is_reference(self) -> bool:
        return self.precision == "fp32" and not self.channels_last and not self.fuse_bn and not (self.graph or self.compile)


def parse_variant(text: str, device: torch.device) -> tuple[Variant | None, str | None]:
    """``"bf16+graph"`` -> Variant; returns ``(None, note)`` when it cannot run on ``device``."""
    tokens = [t for t in text.strip().lower().split("+") if t]
    if tokens == ["ref"]:
        tokens = ["fp32", "nchw", "nofuse"]
    if not tokens or tokens[0] not in PRECISIONS:
        raise ValueError(f"variant {text!r}: start with one of {PRECISIONS} or 'ref'")
    cuda = device.type == "cuda"
    fields: dict[str, Any] = {"precision": tokens[0], "channels_last": True}
    for token in tokens[1:]:
        if token in ("nchw", "cl"):
            fields["channels_last"] = token == "cl"
        elif token == "nofuse":
            fields["fuse_bn"] = False
        elif token in ("graph", "compile"):
            fields[token] = True
        else:
            raise ValueError(f"variant {text!r}: unknown modifier {token!r} (nchw, cl, nofuse, graph, compile)")
    if not cuda and (fields.get("graph") or fields.get("compile")):
        return None, f"{text}: skipped on {device.type} (CUDA graphs / torch.compile are measured on CUDA only)"
    return Variant(name=text.strip(), **fields), None


def default_variants(device: torch.device, compile_: bool, graphs: bool) -> list[str]:
    if device.type != "cuda":
        return ["ref", "fp32"]
    names = ["ref", "tf32", "fp16", "bf16"]
    if graphs:
        names += ["fp16+graph", "bf16+graph"]
    if compile_:
        names += ["fp16+compile+graph" if graphs else "fp16+compile"]
    return names


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def parse_weights(items: Sequence[str]) -> dict[str, str]:
    weights = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            raise SystemExit(f"--weights {item!r}: expected MODEL=PATH (or MODEL=random) with MODEL in {sorted(MODELS)}")
        if path != "random" and not Path(path).is_file():
            raise SystemExit(f"--weights {item!r}: {path} not found")
        weights[name] = path
    return weights


def default_weights(name: str) -> str:
    return str(MOBILENET_WEIGHTS) if name == "mobilenet0.25" and MOBILENET_WEIGHTS.is_file() else "random"


def load_benchmark_model(name: str, weights: str, device: torch.device, calibration: torch.Tensor | None,
                         seed: int = 0) -> tuple[RetinaFace, str]:
    """The model ``name`` in eval mode on ``device`` and a description of its weights."""
    config = MODELS[name]
    if weights != "random":
        from utils.checkpoint import load_model
        model = load_model(weights)
        if model.config != config:
            print(f"note: {weights} holds {model.config}, not the {name} benchmark architecture {config}",
                  file=sys.stderr)
        return model.to(device).eval(), weights
    torch.manual_seed(seed)
    model = RetinaFace(config).to(device)
    calibrate_random_model(model, calibration)
    return model.eval(), "random (BN calibrated, 1% face prior)"


@torch.no_grad()
def calibrate_random_model(model: RetinaFace, images_u8: torch.Tensor | None) -> None:
    """Make a randomly initialised model behave like a detector numerically: BatchNorm running
    statistics from a few forward passes over ``images_u8`` (B, H, W, 3) in train mode, and class
    heads biased to a 1 % face probability."""
    if images_u8 is not None:
        batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        model.train()
        device = next(model.parameters()).device
        for chunk in images_u8.split(4):
            model(preprocess(chunk.to(device)))
    model.eval()
    bias = math.log(FACE_PRIOR / (1.0 - FACE_PRIOR))
    heads = list(model.ClassHead) + (list(model.cascade.ClassHead) if model.cascade is not None else [])
    for head in heads:
        head.conv1x1.bias[1::2] += bias  # channel a * 2 + 1 is the face logit of anchor a


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------
class Engine:
    """The batched device pipeline of one variant for uint8 (B, H, W, 3) host batches: the
    product's ``models.dense_path.DensePath`` (preprocess, forward, decode: eager, compiled or
    replayed from a CUDA graph per input shape, exactly as ``FaceDetector`` runs it) followed by
    ``utils.postprocess`` (eager)."""

    def __init__(self, model: RetinaFace, variant: Variant, device: torch.device, nms_threshold: float = 0.4,
                 top_k: int = 5000, keep_top_k: int = 750, compile_mode: str | None = None,
                 max_graphs: int = 4) -> None:
        self.variant = variant
        self.device = device
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.keep_top_k = keep_top_k
        precision = "fp32" if variant.precision == "tf32" else variant.precision
        self.dense = DensePath(model, device, precision=precision, channels_last=variant.channels_last,
                               fuse_bn=variant.fuse_bn, cuda_graphs=variant.graph, compile=variant.compile,
                               compile_mode=compile_mode, max_graphs=max_graphs)

    @torch.inference_mode()
    def prepare(self, host_batch: torch.Tensor) -> None:
        """Build what a shape needs (graph capture, compilation) outside the timed region."""
        if self.variant.graph or self.variant.compile:
            with tf32_mode(self.device, self.variant.precision != "fp32"):
                self.dense.prepare(host_batch)
                if self.variant.graph and not self.dense.cuda_graphs:
                    raise RuntimeError("CUDA graph capture failed (see the warning above)")

    @torch.inference_mode()
    def detect(self, host_batch: torch.Tensor, confidence_threshold: float,
               marks: StageClock | None = None) -> list[np.ndarray]:
        """Detections per image as (K, 15) float32 rows [x1, y1, x2, y2, score, 10 landmarks]."""
        mark = marks.mark if marks is not None else (lambda name: None)
        with tf32_mode(self.device, self.variant.precision != "fp32"):
            mark("start")
            outputs = self.dense(host_batch, mark)
            mark("network")
            detections = self.per_image(outputs, confidence_threshold)
            mark("postprocess")
        return detections

    def per_image(self, outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  confidence_threshold: float) -> list[np.ndarray]:
        """Post-processing of dense ``outputs`` (boxes, scores, landmarks): rows per image."""
        rows, counts = self._postprocess(*outputs, confidence_threshold)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        return [rows[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    @torch.inference_mode()
    def dense_outputs(self, host_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded boxes, scores and landmarks of every prior (float32 copies: a graph reuses its
        output buffers), for the comparison before NMS."""
        with tf32_mode(self.device, self.variant.precision != "fp32"):
            boxes, scores, landmarks = self.dense(host_batch)
            return boxes.float().clone(), scores.float().clone(), landmarks.float().clone()

    def _postprocess(self, boxes, scores, landmarks, confidence_threshold: float) -> tuple[np.ndarray, list[int]]:
        return postprocess_to_host(boxes, scores, landmarks, confidence_threshold, self.nms_threshold, self.top_k,
                                   self.keep_top_k)

    @torch.inference_mode()
    def stream(self, host_batches: Sequence[torch.Tensor], confidence_threshold: float,
               queue_ahead: bool = True) -> int:
        """Process same-shape pinned batches back to back, copying batch i+1 to the device on a
        side stream while batch i computes (double-buffered); returns the number of detections.
        ``queue_ahead``: batch i+1's network is queued before batch i is post-processed (on a side
        stream, ``utils.postprocess.DeferredPostprocess``, as ``FaceDetector.submit`` and test.py
        do); otherwise each batch is post-processed before the next is queued (runs 1-8).
        On the CPU the batches simply run one after the other."""
        if self.device.type != "cuda":
            return sum(len(r) for b in host_batches for r in self.detect(b, confidence_threshold))
        main = torch.cuda.current_stream(self.device)
        copier = torch.cuda.Stream(self.device)
        shape = tuple(host_batches[0].shape)
        staging = [torch.empty(shape, dtype=torch.uint8, device=self.device) for _ in range(2)]
        ready = [torch.cuda.Event() for _ in range(2)]
        consumed = [torch.cuda.Event() for _ in range(2)]
        for event in consumed:
            event.record(main)

        def prefetch(i: int) -> None:
            slot = i % 2
            with torch.cuda.stream(copier):
                copier.wait_event(consumed[slot])  # batch i - 2 has been read from this slot
                staging[slot].copy_(host_batches[i], non_blocking=True)
                ready[slot].record(copier)

        deferred = DeferredPostprocess(self.device)
        options = dict(confidence_threshold=confidence_threshold, nms_threshold=self.nms_threshold,
                       top_k=self.top_k, keep_top_k=self.keep_top_k)
        in_flight = None
        detections = 0
        with tf32_mode(self.device, self.variant.precision != "fp32"):
            prefetch(0)
            for i in range(len(host_batches)):
                if i + 1 < len(host_batches):
                    prefetch(i + 1)
                slot = i % 2
                main.wait_event(ready[slot])
                # a graph copies the slot into its own input first; eager reads it in place
                boxes, scores, landmarks = self.dense(staging[slot])
                consumed[slot].record(main)
                if not queue_ahead:
                    detections += self._postprocess(boxes, scores, landmarks, confidence_threshold)[0].shape[0]
                    continue
                finish = deferred.defer(boxes, scores, landmarks, **options)
                if in_flight is not None:
                    detections += in_flight()[0].shape[0]
                in_flight = finish
            if in_flight is not None:
                detections += in_flight()[0].shape[0]
        return detections


def pinned(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if device.type == "cuda" else tensor


def detect_images(engine: Engine, arrays: Sequence[np.ndarray], confidence_threshold: float,
                  marks: StageClock | None = None) -> list[np.ndarray]:
    """Our pipeline over decoded images of any sizes: one batch per size. With ``marks``, the
    stages of every batch (the stage ending at ``start``: the host work between two batches,
    stacking and pinning)."""
    results: list[np.ndarray | None] = [None] * len(arrays)
    for group in same_size_groups(arrays):
        batch = pinned(np.stack([arrays[i] for i in group]), engine.device)
        for index, rows in zip(group, engine.detect(batch, confidence_threshold, marks)):
            results[index] = rows
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Fidelity
# ------------------------------------------------------------------------------------------------
def compare(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], score_tol: float,
            landmark_tol: float) -> dict[str, Any]:
    """Unmatched detections (score >= 0.5, IoU >= 0.98) both ways over a list of images."""
    if reference is None:  # the reference path itself failed (its error is reported)
        return {"compared": 0, "unmatched_reference": 0, "unmatched_candidate": 0, "score_tol": score_tol,
                "landmark_tol_px": landmark_tol, "passed": False, "examples": ["no reference detections"]}
    missing, extra, compared = [], [], 0
    for ref, cand in zip(reference, candidate):
        ref, cand = np.asarray(ref, np.float64).reshape(-1, 15), np.asarray(cand, np.float64).reshape(-1, 15)
        compared += int((ref[:, 4] >= 0.5).sum())
        missing += unmatched(ref, cand, max_score_diff=score_tol, max_landmark_diff=landmark_tol)
        extra += unmatched(cand, ref, max_score_diff=score_tol, max_landmark_diff=landmark_tol)
    return {"compared": compared, "unmatched_reference": len(missing), "unmatched_candidate": len(extra),
            "score_tol": score_tol, "landmark_tol_px": landmark_tol, "passed": not missing and not extra,
            "examples": (missing + extra)[:3]}


def tolerances(variant: Variant, args: argparse.Namespace) -> tuple[float, float]:
    if variant.autocast_dtype is not None:
        return args.score_tol_16, args.landmark_tol_16
    return args.score_tol, args.landmark_tol


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device,
          with_marks: bool = False) -> tuple[list[float], dict[str, list[float]]]:
    """Run ``fn`` (``fn(marks)`` with ``with_marks``) ``warmup`` times, then ``iters`` synchronised
    timed times; returns the wall seconds and the per-stage seconds."""
    for _ in range(warmup):
        fn(None) if with_marks else fn()
    synchronize(device)
    wall: list[float] = []
    stages: dict[str, list[float]] = {}
    for _ in range(iters):
        marks = StageClock(device.type == "cuda") if with_marks else None
        started = time.perf_counter()
        fn(marks) if with_marks else fn()
        synchronize(device)
        wall.append(time.perf_counter() - started)
        if marks is not None:
            for name, seconds in marks.durations().items():
                stages.setdefault(name, []).append(seconds)
    return wall, stages


def load_sample_arrays(folder: Path, limit: int | None) -> tuple[list[Path], list[np.ndarray]]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
    paths = paths[:limit] if limit else paths
    return paths, [read_image(p) for p in paths]


def synthetic_batches(batch: int, width: int, height: int, content: str, sample_arrays: Sequence[np.ndarray],
                      count: int, seed: int) -> list[np.ndarray]:
    """``count`` uint8 (B, H, W, 3) batches: random crops/resizes of the sample images (``sample``)
    or uniform noise (``noise``)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        if content == "sample" and sample_arrays:
            images = []
            for _ in range(batch):
                source = sample_arrays[rng.integers(len(sample_arrays))]
                h, w = source.shape[:2]
                scale = max(width / w, height / h) * rng.uniform(1.0, 1.6)
                resized = cv2.resize(source, (max(width, round(w * scale)), max(height, round(h * scale))),
                                     interpolation=cv2.INTER_LINEAR)
                top = rng.integers(resized.shape[0] - height + 1)
                left = rng.integers(resized.shape[1] - width + 1)
                crop = resized[top:top + height, left:left + width]
                images.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
            batches.append(np.ascontiguousarray(np.stack(images)))
        else:
            batches.append(rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8))
    return batches


def measure_synthetic(args: argparse.Namespace, device: torch.device, variants: list[Variant],
                      sample_arrays: list[np.ndarray], errors: list[str], results: list[dict[str, Any]]) -> None:
    """Append one entry per model, batch size and variant to ``results`` (as they finish)."""
    width, height = args.width, args.height
    reference_variant = parse_variant("ref", device)[0]
    for name in args.models:
        calibration = None
        weights = args.weights.get(name, default_weights(name))
        if weights == "random":
            calibration = torch.from_numpy(synthetic_batches(8, width, height, args.content, sample_arrays, 1,
                                                             args.seed + 99)[0])
        model, weights_note = load_benchmark_model(name, weights, device, calibration, args.seed)
        for batch in args.batch_sizes:
            host = [pinned(b, device) for b in synthetic_batches(batch, width, height, args.content, sample_arrays,
                                                                 2, args.seed + batch)]
            reference_rows = reference_dense = None
            time_reference = any(v.is_reference for v in variants)
            for variant in [reference_variant] + [v for v in variants if not v.is_reference]:
                entry: dict[str, Any] = {"model": name, "weights": weights_note, "batch": batch,
                                         "size": [width, height], "variant": variant.name,
                                         "precision": variant.precision, "channels_last": variant.channels_last,
                                         "fuse_bn": variant.fuse_bn, "graph": variant.graph,
                                         "compile": variant.compile}
                engine = None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    started = time.perf_counter()
                    engine = Engine(model, variant, device, compile_mode=args.compile_mode)
                    engine.prepare(host[0])
                    dense_outputs = engine.dense_outputs(host[0])  # one pass: NMS'd rows and the priors
                    fidelity_rows = engine.per_image(dense_outputs, FIDELITY_CONFIDENCE)
                    synchronize(device)
                    entry["setup_s"] = rnd(time.perf_counter() - started)
                    if variant.is_reference:
                        reference_rows, reference_dense = fidelity_rows, dense_outputs
                        if not time_reference:
                            continue  # fidelity reference only
                    else:
                        score_tol, landmark_tol = tolerances(variant, args)
                        entry["fidelity"] = compare(reference_rows, fidelity_rows, score_tol, landmark_tol)
                        entry["dense_fidelity"] = (
                            dense_disagreement(reference_dense, dense_outputs, max_score_diff=score_tol,
                                               max_landmark_diff=landmark_tol)
                            if reference_dense is not None else None)
                        if not entry["fidelity"]["passed"] and reference_dense is not None:
                            entry["fidelity"]["nms_near_ties"] = nms_near_ties(
                                reference_rows, fidelity_rows, reference_dense, dense_outputs,
                                max_score_diff=score_tol, max_landmark_diff=landmark_tol,
                                nms_threshold=engine.nms_threshold)
                    counter = iter(range(1 << 30))

                    def run(marks):  # reads `engine` when called: `engine = None` below frees it
                        return engine.detect(host[next(counter) % len(host)], args.confidence_threshold, marks)

                    wall, stages = timed(run, args.warmup, args.iters, device, with_marks=True)
                    latency = stats(wall)
                    entry.update(latency_ms=latency, images_per_s=rnd(batch / (latency["median"] / 1000.0)),
                                 stages_ms={k: stats(v)["median"] for k, v in stages.items()},
                                 detections_per_image=rnd(float(np.mean([len(r) for r in fidelity_rows]))))
                    if args.stream and device.type == "cuda" and batch > 1:
                        sequence = [host[i % len(host)] for i in range(min(args.iters, 20))]
                        counts = {}
                        for key, ahead in (("stream_images_per_s", True), ("stream_serial_images_per_s", False)):
                            wall, _ = timed(lambda: counts.setdefault(key, engine.stream(
                                sequence, args.confidence_threshold, queue_ahead=ahead)), 0, 3, device)
                            entry[key] = rnd(batch * len(sequence) / stats(wall, 1.0)["median"])
                        if counts["stream_images_per_s"] != counts["stream_serial_images_per_s"]:
                            raise RuntimeError(f"queued-ahead stream found {counts['stream_images_per_s']} "
                                               f"detections, the serial one {counts['stream_serial_images_per_s']}")
                    if device.type == "cuda":
                        entry["max_memory_allocated_mib"] = rnd(torch.cuda.max_memory_allocated(device) / 2 ** 20)
                        entry["syncs_per_batch"] = sync_sites(
                            lambda: engine.detect(host[0], args.confidence_threshold))
                except Exception as error:  # a failed variant must not lose the others' numbers
                    record_failure(entry, errors, f"{name} bs{batch} {variant.name}", error)
                finally:
                    engine = None  # noqa: F841 (frees the variant's graphs before the next one)
                    release(device)
                results.append(entry)
                print(f"[inference] {name} bs{batch} {variant.name}: "
                      f"{entry.get('images_per_s', '-')} img/s, {entry.get('latency_ms', {}).get('median', '-')} ms",
                      file=sys.stderr, flush=True)
        del model
        release(device)


def measure_sample(args: argparse.Namespace, device: torch.device, variants: list[Variant],
                   paths: list[Path], arrays: list[np.ndarray], errors: list[str], report: dict[str, Any]) -> None:
    """Fill ``report["sample"]`` (as measurements finish; stays None without images or weights)."""
    weights = args.sample_weights
    if not arrays or not weights or not Path(weights).is_file():
        return
    from models.detector import FaceDetector
    from utils.checkpoint import load_model

    model = load_model(weights).to(device).eval()
    conf = args.sample_confidence_threshold
    sizes = sorted({a.shape[:2] for a in arrays})
    section: dict[str, Any] = {"images": len(arrays), "distinct_sizes": len(sizes), "weights": str(weights),
                               "model": str(model.config), "confidence_threshold": conf, "nms_threshold": 0.4,
                               "iters": args.sample_iters, "variants": []}
    report["sample"] = section
    n = len(arrays)

    def read_all():
        for p in paths:
            read_image(p)
    wall, _ = timed(read_all, 1, max(1, min(args.sample_iters, 5)), device)
    section["read_image_ms_per_img"] = rnd(stats(wall)["median"] / n)

    public_steps: dict[str, float] = {}
    public_rows: list[np.ndarray] = []

    def public(timings: dict[str, float] | None = None):  # in PyTorch's default precision, as the public scripts
        with public_precision(device):
            for a in arrays:
                public_style_detect(model, a, conf, timings=timings, device=device)
    # the public-style pipeline takes ~0.4 s per image on a GPU (issue figure): 3 timed passes are
    # plenty for a median and keep tools/gpu_check.sh inside its time budget
    public_iters = min(args.sample_iters, 3)
    wall, _ = timed(public, 1, public_iters, device)
    public(public_steps)  # the split by step: a pass of its own (it waits for the GPU after the forward pass)
    with tf32_mode(device, False):  # the arithmetic of "ref", for fidelity_reference_vs_public
        public_rows[:] = [public_style_detect(model, a, conf, device=device) for a in arrays]
    public_ms = stats(wall)["median"] / n
    section["public_style"] = {"ms_per_img": rnd(public_ms), "images_per_s": rnd(1000.0 / public_ms),
                               "passes": public_iters,
                               "steps_ms_per_img": {k: rnd(v / n * 1000) for k, v in public_steps.items()},
                               "device": "cpu" if device.type == "cpu" else f"{device.type} forward/decode, "
                                                                             "CPU priors/NMS"}
    reference_variant = parse_variant("ref", device)[0]
    reference_rows = None
    for variant in [reference_variant] + [v for v in variants if not v.is_reference]:
        entry: dict[str, Any] = {"variant": variant.name}
        engine = None
        try:
            # a graph for every sample size (FaceDetector's default keeps 4): what "graph" says
            engine = Engine(model, variant, device, compile_mode=args.compile_mode, max_graphs=len(sizes))
            # warm-up first, so the fidelity pass runs what is timed (graphs are captured on the
            # second sight of a size)
            for _ in range(max(args.sample_warmup, 2 if variant.graph else 0)):
                detect_images(engine, arrays, conf)
            rows = detect_images(engine, arrays, conf)
            if variant.graph:
                entry["graph_shapes"] = len(engine.dense.graph_shapes)
            if variant.is_reference:
                reference_rows = rows
                section["fidelity_reference_vs_public"] = compare(public_rows, rows, args.score_tol, args.landmark_tol)
            else:
                entry["fidelity"] = compare(reference_rows, rows, *tolerances(variant, args))
            wall, stages = timed(lambda marks: detect_images(engine, arrays, conf, marks), 0, args.sample_iters,
                                 device, with_marks=True)
            ms = stats(wall)["median"] / n
            entry.update(ms_per_img=rnd(ms), images_per_s=rnd(1000.0 / ms), speedup_vs_public=rnd(public_ms / ms),
                         stages_ms_per_img={("between_batches" if k == "start" else k): rnd(stats(v)["median"] / n)
                                            for k, v in stages.items()})
        except Exception as error:
            record_failure(entry, errors, f"sample {variant.name}", error)
        finally:
            engine = None  # noqa: F841
            release(device)
        section["variants"].append(entry)
        print(f"[inference] sample {variant.name}: {entry.get('ms_per_img', '-')} ms/img "
              f"({entry.get('speedup_vs_public', '-')}x public)", file=sys.stderr, flush=True)

    # FaceDetector itself (the public API: numpy in, Detections out; fp16 autocast and CUDA graphs on
    # CUDA): one forward pass per size, and all the images in one exactly padded batch (--pad_to)
    cuda = device.type == "cuda"
    api_settings = api_settings_for(model, device)
    for key, options in api_settings.items():
        try:
            detector = FaceDetector(model=model, device=device, confidence_threshold=conf, nms_threshold=0.4,
                                    batch_size=n, half=cuda, **options)
            api_rows: list[np.ndarray] = []
            api_stages: list[dict[str, float]] = []  # detector.timings of every pass (seconds)

            def api():
                detector.timings.clear()
                api_rows[:] = [as_rows(d.boxes, d.scores, d.landmarks) for d in detector.detect(list(arrays))]
                api_stages.append(dict(detector.timings))
            wall, _ = timed(api, args.sample_warmup, args.sample_iters, device)
            ms = stats(wall)["median"] / n
            timed_stages = api_stages[-args.sample_iters:]
            api_variant = Variant("api", precision="fp16" if cuda else "fp32")
            listed = "".join(f", {name}={value}" for name, value in options.items() if name != "channels_last")
            settings = (f"FaceDetector(batch_size={n}, half={cuda}, channels_last={detector.dense.channels_last}, "
                        f"fuse_bn=True, cuda_graphs={cuda}{listed})")
            section[key] = {
                "settings": settings,
                "ms_per_img": rnd(ms), "images_per_s": rnd(1000.0 / ms), "speedup_vs_public": rnd(public_ms / ms),
                # FaceDetector's own split (detector.timings: CUDA events, no extra syncs), median per pass
                "stages_ms_per_img": {name: rnd(stats([t.get(name, 0.0) for t in timed_stages])["median"] / n)
                                      for name in timed_stages[-1]},
                "fidelity": compare(reference_rows, api_rows, *tolerances(api_variant, args))}
            if cuda:  # on the CPU submit runs the network at once: nothing overlaps, the row would be noise
                passes = max(3, args.sample_iters)
                wall, _ = timed(lambda: submitted_ahead(detector, arrays, passes), 1, 1, device)
                ms = wall[0] * 1000.0 / (passes * n)
                # every pass of the timed run: a pass finished while the next was queued must keep its detections
                checks = [compare(reference_rows, rows, *tolerances(api_variant, args))
                          for rows in submitted_ahead(detector, arrays, passes)]
                section[f"{key}_streamed"] = {
                    "settings": settings, "mode": f"submit, {passes} passes queued ahead (as test.py runs its batches)",
                    "ms_per_img": rnd(ms), "images_per_s": rnd(1000.0 / ms), "speedup_vs_public": rnd(public_ms / ms),
                    "fidelity": next((c for c in checks if not c["passed"]), checks[0])}
        except Exception as error:
            errors.append(f"sample {key}: {type(error).__name__}: {error}")
            traceback.print_exc()
        detector = None
    seen = {a.shape[:2] for a in arrays} | {(args.height, args.width)}
    try:
        section["new_sizes"] = measure_new_sizes(args, device, model, arrays, seen)
    except Exception as error:
        errors.append(f"sample new sizes: {type(error).__name__}: {error}")
        traceback.print_exc()
    if section.get("new_sizes") and args.sample_new_size_models:
        section["new_sizes"]["other_models"] = measure_new_size_models(args, device, arrays, seen, errors)
    best = fastest_faithful(section)
    if best is not None:
        section["best"] = best
    model = None  # noqa: F841 (frees the GPU memory before the caller releases)
    release(device)


def submitted_ahead(detector: Any, arrays: Sequence[np.ndarray], passes: int) -> list[list[np.ndarray]]:
    """``passes`` passes over ``arrays``, each submitted (``FaceDetector.submit``) before the one
    before it is finished, as test.py and inference.py queue their batches (one call per batch
    there; here a pass of all the images is one call): the host prepares the next pass while the
    device runs this one. Returns each pass's detections, rows (K, 15) per image."""
    handles = launched_one_ahead(range(passes), lambda _: detector.submit(list(arrays)))
    return [[as_rows(d.boxes, d.scores, d.landmarks) for d in handle.result()] for handle in handles]


def fastest_faithful(section: dict[str, Any]) -> dict[str, Any] | None:
    """The sample section's fastest pipeline whose detections passed the fidelity check, among its
    timed variants and FaceDetector settings (``face_detector_api*``): ``{"variant",
    "ms_per_img", "speedup_vs_public"}``, or None. tools/speed_table.py takes it from a report
    interrupted before the section's ``best`` was written."""
    timed = [v for v in section.get("variants", []) if "ms_per_img" in v and v.get("fidelity", {}).get("passed", True)]
    timed += [{**entry, "variant": entry["settings"] + (f", {entry['mode']}" if entry.get("mode") else "")}
              for key, entry in section.items()
              if key.startswith("face_detector_api") and isinstance(entry, dict) and "ms_per_img" in entry
              and entry.get("fidelity", {}).get("passed")]
    if not timed:
        return None
    best = min(timed, key=lambda v: v["ms_per_img"])
    return {"variant": best["variant"], "ms_per_img": best["ms_per_img"],
            "speedup_vs_public": best.get("speedup_vs_public")}


def api_settings_for(model: RetinaFace, device: torch.device) -> dict[str, dict[str, Any]]:
    """The FaceDetector settings the sample section times, by report key: one forward pass per size
    and one padded pass in the default layout, and where that layout is NCHW (mobilenet0.25 on
    CUDA, chosen for sizes never run before) both again in NHWC, the layout for sizes run before
    (their cuDNN plans are built in the warm-up passes; the padded pass has a single canvas)."""
    settings: dict[str, dict[str, Any]] = {"face_detector_api": {},
                                           "face_detector_api_padded": {"pad_batches": True, "pad_to": 128}}
    if not default_channels_last(model, device):
        settings.update({f"{key}_nhwc": {**options, "channels_last": True} for key, options in settings.items()})
    return settings


def new_size_copies(arrays: Sequence[np.ndarray], seen: set[tuple[int, int]]) -> list[np.ndarray]:
    """Each image with the fewest bottom rows removed that give a (height, width) not in ``seen``
    (added to it): images of sizes this process has not run yet."""
    copies = []
    for array in arrays:
        height, width = array.shape[:2]
        cut = 1
        while (height - cut, width) in seen:
            cut += 1
        seen.add((height - cut, width))
        copies.append(np.ascontiguousarray(array[:height - cut]))
    return copies


#: Pipelines of the new-size pass: name -> (FaceDetector options, cuDNN autotuning, TF32 (None:
#: PyTorch's defaults, as test.py runs), CUDA only). test.py's defaults first (the layout ``auto``:
#: NCHW on CUDA for mobilenet0.25); the others vary one setting at a time, to find what a new size
#: costs. ``batch_size`` None: all the images in one ``detect`` batch (FaceDetector runs one forward
#: pass per size); default 1, as test.py.
NEW_SIZE_PIPELINES: dict[str, tuple[dict[str, Any], bool, bool | None, bool]] = {
    "test.py defaults (fp32, layout auto, BN folded, batch 1)": ({}, False, None, False),
    "fp32, channels_last, BN folded, batch 1": ({"channels_last": True}, False, None, False),
    "fp32, NCHW, BN folded, batch 1": ({"channels_last": False}, False, None, False),
    "fp32, NCHW, BN kept, batch 1, TF32 off": ({"channels_last": False, "fuse_bn": False}, False, False, False),
    "as test.py, cuDNN autotuning on": ({}, True, None, True),
    "fp32, NCHW, BN kept, batch 1, autotuning on (the public settings)":
        ({"channels_last": False, "fuse_bn": False}, True, None, True),
    "fp16, channels_last, batch per size": ({"half": True, "channels_last": True, "batch_size": None}, False, None, True),
    "fp16, NCHW, batch per size": ({"half": True, "channels_last": False, "batch_size": None}, False, None, True),
    # padded batches (--pad_to): new sizes fall into canvases the set-up pass has run, as after the
    # first images of a data set of many sizes
    "as test.py, --pad_to 128 --batch_size 8": ({"pad_to": 128, "batch_size": 8}, False, None, True),
    "fp16, layout auto, --pad_to 128 --batch_size 8": ({"half": True, "pad_to": 128, "batch_size": 8}, False, None, True),
    "fp16, channels_last, --pad_to 128 --batch_size 8":
        ({"half": True, "channels_last": True, "pad_to": 128, "batch_size": 8}, False, None, True),
}
#: The pipelines timed for the models of ``--sample_new_size_models`` (random weights): whether a
#: new size costs those networks more in NHWC than in NCHW, and test.py with padded batches (CUDA).
NEW_SIZE_LAYOUT_PIPELINES = ("test.py defaults (fp32, layout auto, BN folded, batch 1)",
                             "fp32, channels_last, BN folded, batch 1", "fp32, NCHW, BN folded, batch 1",
                             "as test.py, --pad_to 128 --batch_size 8")


def tf32_setting(device: torch.device, enabled: bool | None):
    """``tf32_mode`` for True / False; None leaves PyTorch's settings as they are."""
    return contextlib.nullcontext() if enabled is None else tf32_mode(device, enabled)


def measure_new_sizes(args: argparse.Namespace, device: torch.device, model: RetinaFace,
                      arrays: Sequence[np.ndarray], seen: set[tuple[int, int]],
                      names: Sequence[str] = tuple(NEW_SIZE_PIPELINES), public: bool = True) -> dict[str, Any] | None:
    """Passes over images whose sizes the process has not run yet, as a single pass over a data
    set of many image sizes (WIDER val) meets them. Every pipeline and pass gets sizes of its own
    (the images minus a few bottom rows; ``seen`` holds the sizes run so far and is updated), after
    one untimed pass at new sizes of the first pipeline. The
    public-style pipeline (``public``) runs with cuDNN autotuning on, as the public
    ``test_widerface.py`` sets (``cudnn.benchmark = True``): each new size is autotuned. Ours
    (``FaceDetector``) runs in the settings of ``NEW_SIZE_PIPELINES`` named in ``names``, test.py's
    first (autotuning off, PyTorch's default); on the CPU only the float32 ones without autotuning
    (the others are the same there). None when ``--sample_new_size_passes`` is 0.

    Pipelines with padded batches meet the set-up pass's canvases again in their first timed
    pass, and FaceDetector captures a shape's CUDA graph the second time it sees it: that pass is
    reported apart (``first_pass_ms_per_img``) and followed by the ones of ``ms_per_img``, in which
    the canvases replay their graphs, as they do after the first images of a long data set."""
    from models.detector import FaceDetector

    passes = args.sample_new_size_passes
    if passes <= 0:
        return None
    conf = args.sample_confidence_threshold
    cuda = device.type == "cuda"
    pipelines = {}
    for name in names:
        options, autotune, tf32, cuda_only = NEW_SIZE_PIPELINES[name]
        if cuda_only and not cuda:
            continue
        options = {"batch_size": 1, **options}
        options["batch_size"] = options["batch_size"] or len(arrays)
        detector = FaceDetector(model=model, device=device, confidence_threshold=conf, nms_threshold=0.4, **options)
        with cudnn_autotuning(autotune), tf32_setting(device, tf32):
            detector.detect(list(arrays))  # one-off set-up (BatchNorm folding, buffers) outside the clock
        pipelines[name] = (detector, autotune, tf32)
    if pipelines:
        # one untimed pass at new sizes: whichever pipeline was timed first paid a one-off cost of
        # the process's first new sizes (H100 run 5: test.py's defaults 54 ms/img for the ResNet-50
        # cascade, the same settings timed next 15 ms/img)
        detector, autotune, tf32 = next(iter(pipelines.values()))
        with cudnn_autotuning(autotune), tf32_setting(device, tf32):
            detector.detect(new_size_copies(arrays, seen))
    public_walls: list[float] = []
    walls: dict[str, list[float]] = {name: [] for name in pipelines}
    first_walls: dict[str, float] = {}
    for pass_index in range(passes):
        if public:
            images = new_size_copies(arrays, seen)
            with cudnn_autotuning(True), public_precision(device):
                synchronize(device)
                started = time.perf_counter()
                for image in images:
                    public_style_detect(model, image, conf, device=device)
                synchronize(device)
                public_walls.append(time.perf_counter() - started)
        for name, (detector, autotune, tf32) in pipelines.items():
            first_pass = pass_index == 0 and detector.pad_batches
            for timed_pass in range(2 if first_pass else 1):
                images = new_size_copies(arrays, seen)
                with cudnn_autotuning(autotune), tf32_setting(device, tf32):
                    synchronize(device)
                    started = time.perf_counter()
                    detector.detect(list(images))
                    synchronize(device)
                    wall = time.perf_counter() - started
                if first_pass and timed_pass == 0:
                    first_walls[name] = wall
                else:
                    walls[name].append(wall)
    n = len(arrays)
    public_ms = stats(public_walls)["median"] / n if public else None
    ours = []
    for name, wall in walls.items():
        ms = stats(wall)["median"] / n
        detector, autotune, tf32 = pipelines[name]
        entry = {"pipeline": name, "ms_per_img": rnd(ms), "channels_last": detector.dense.channels_last,
                 "cudnn_benchmark": autotune, "tf32": "PyTorch default" if tf32 is None else tf32 and cuda}
        if name in first_walls:
            entry["first_pass_ms_per_img"] = rnd(first_walls[name] * 1000.0 / n)
        versus = ""
        if public:
            entry["speedup_vs_public"] = rnd(public_ms / ms)
            versus = f" ({rnd(public_ms / ms)}x public-style at {rnd(public_ms)} ms/img)"
        ours.append(entry)
        print(f"[inference] new sizes, {model.config.network}, {name}: {rnd(ms)} ms/img{versus}",
              file=sys.stderr, flush=True)
    result: dict[str, Any] = {"passes": passes, "images_per_pass": n, "ours": ours}
    if public:
        result["public_style"] = {"ms_per_img": rnd(public_ms), "cudnn_benchmark": True, "tf32": "PyTorch default"}
    return result


def measure_new_size_models(args: argparse.Namespace, device: torch.device, arrays: Sequence[np.ndarray],
                            seen: set[tuple[int, int]], errors: list[str]) -> list[dict[str, Any]]:
    """The new-size pass of ``NEW_SIZE_LAYOUT_PIPELINES`` for each model of
    ``--sample_new_size_models``, with random weights (timing only: their detections mean
    nothing): whether the layout rule that fits mobilenet0.25 fits them too."""
    results = []
    for name in args.sample_new_size_models:
        entry: dict[str, Any] = {"model": name}
        try:
            calibration = torch.from_numpy(synthetic_batches(8, args.width, args.height, "sample", arrays, 1,
                                                             args.seed + 99)[0])
            model, entry["weights"] = load_benchmark_model(name, "random", device, calibration, args.seed)
            entry.update(measure_new_sizes(args, device, model, arrays, seen, NEW_SIZE_LAYOUT_PIPELINES,
                                           public=False) or {})
        except Exception as error:
            record_failure(entry, errors, f"new sizes {name}", error)
        finally:
            model = None  # noqa: F841
            release(device)
        results.append(entry)
    return results


def summarize(synthetic: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best variant per model and batch size, with its speed-up over the reference path."""
    summary = []
    keys = sorted({(e["model"], e["batch"]) for e in synthetic}, key=lambda k: (k[0], k[1]))
    for model, batch in keys:
        rows = [e for e in synthetic if e["model"] == model and e["batch"] == batch and "images_per_s" in e]
        faithful = [e for e in rows if e.get("fidelity", {}).get("passed", True)]
        if not faithful:
            continue
        best = max(faithful, key=lambda e: e["images_per_s"])
        fastest = max(rows, key=lambda e: e["images_per_s"])
        ref = next((e for e in rows if e["variant"] == "ref"), None)
        summary.append({"model": model, "batch": batch, "best_variant": best["variant"],
                        "images_per_s": best["images_per_s"], "latency_ms": best["latency_ms"]["median"],
                        "stream_images_per_s": best.get("stream_images_per_s"),
                        "speedup_vs_ref": rnd(best["images_per_s"] / ref["images_per_s"]) if ref else None,
                        "fastest_variant": fastest["variant"], "fastest_images_per_s": fastest["images_per_s"],
                        "fastest_fidelity_passed": fastest.get("fidelity", {}).get("passed", True)})
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--models", default="mobilenet0.25,resnet50_cascade",
                        help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the synthetic batches")
    parser.add_argument("--content", choices=("sample", "noise"), default="sample",
                        help="synthetic image content: crops of the sample images (noise when absent) or noise")
    parser.add_argument("--variants", default=None, help="comma-separated variants (see the module doc); "
                        "default CUDA: ref,tf32,fp16,bf16,fp16+graph,bf16+graph; CPU: ref,fp32")
    parser.add_argument("--graphs", choices=("on", "off"), default="on", help="default variants with CUDA graphs")
    parser.add_argument("--compile", action="store_true", help="add fp16+compile(+graph) to the default variants")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode (default: inductor default)")
    parser.add_argument("--weights", action="append", default=[], metavar="MODEL=PATH",
                        help="weights per model (repeatable); MODEL=random for random weights. Default: the "
                             "published mobilenet0.25 file from the shared folder, random for the others")
    parser.add_argument("--confidence_threshold", type=float, default=0.5, help="synthetic runs")
    parser.add_argument("--stream", choices=("on", "off"), default="on",
                        help="also measure streamed throughput on CUDA: --iters batches back to back, the next "
                             "batch's host-to-device copy overlapping the current batch (stream_images_per_s)")
    parser.add_argument("--iters", type=int, default=None, help="timed batches (default 30 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches (default 5 CUDA, 1 CPU)")
    parser.add_argument("--sample_images", default=str(SAMPLE_IMAGES),
                        help="folder of sample images ('' = none: noise content, no sample section)")
    parser.add_argument("--sample_weights", default=str(MOBILENET_WEIGHTS),
                        help="weights of the sample-image section ('' = skip that section, keep the images as "
                             "synthetic content)")
    parser.add_argument("--sample_limit", type=int, default=None, help="use only the first N sample images")
    parser.add_argument("--sample_confidence_threshold", type=float, default=0.02)
    parser.add_argument("--sample_variants", default=None,
                        help="default: the --variants default without compile")
    parser.add_argument("--sample_iters", type=int, default=None, help="timed passes (default 10 CUDA, 2 CPU)")
    parser.add_argument("--sample_warmup", type=int, default=None, help="default 3 CUDA, 1 CPU")
    parser.add_argument("--sample_new_size_passes", type=int, default=1,
                        help="passes over the sample images cut to sizes not run before (the public-style "
                             "pipeline with cuDNN autotuning, as its test_widerface.py; 0 = skip; default 1)")
    parser.add_argument("--sample_new_size_models", default=None,
                        help="comma-separated models (random weights) whose new-size pass is timed too, in "
                             "NHWC and NCHW; default resnet50_cascade on CUDA, none on the CPU")
    parser.add_argument("--score_tol", type=float, default=0.005, help="fidelity score tolerance, fp32/tf32")
    parser.add_argument("--landmark_tol", type=float, default=1.0, help="fidelity landmark tolerance (px), fp32/tf32")
    parser.add_argument("--score_tol_16", type=float, default=0.01, help="fidelity score tolerance, bf16/fp16")
    parser.add_argument("--landmark_tol_16", type=float, default=1.0, help="landmark tolerance (px), bf16/fp16")
    parser.add_argument("--threads", type=int, default=None, help="torch/cv2 CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    return parser


def model_names(text: str, option: str) -> list[str]:
    """The comma-separated benchmark model names of ``option``; exits naming the unknown ones."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"{option}: unknown {unknown}; choose from {sorted(MODELS)}")
    return names


def setup_device(name: str | None, threads: int | None, out: str | None = None) -> torch.device:
    """The benchmark device (see ``resolve_device``) with the CPU thread counts and, on CUDA, the
    current device and cuDNN autotuning set; an unusable ``name`` (or ``--out`` file) exits with one line."""
    check_inputs(Path(sys.argv[0]).name, name, out=out)
    device = resolve_device(name)
    if threads:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    batch_sizes = [b.strip() for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or not all(re.fullmatch(r"[0-9]+", b) and int(b) > 0 for b in batch_sizes):
        parser.error(f"--batch_sizes {args.batch_sizes!r}: expected comma-separated positive integers")
    device = setup_device(args.device, args.threads, args.out)
    cuda = device.type == "cuda"
    args.models = model_names(args.models, "--models")
    args.batch_sizes = [int(b) for b in batch_sizes]
    args.stream = args.stream == "on"
    size = re.fullmatch(r"([0-9]+)x([0-9]+)", args.size.strip().lower())
    if not size or not all(int(v) > 0 for v in size.groups()):
        parser.error(f"--size {args.size!r}: expected WIDTHxHEIGHT in pixels, e.g. 640x480")
    args.width, args.height = (int(v) for v in size.groups())
    if args.iters is not None and args.iters < 1:
        parser.error(f"--iters {args.iters}: expected at least 1 timed batch")
    args.weights = parse_weights(args.weights)
    args.iters = args.iters or (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.sample_iters = args.sample_iters or (10 if cuda else 2)
    args.sample_warmup = args.sample_warmup if args.sample_warmup is not None else (3 if cuda else 1)
    if args.sample_new_size_models is None:
        args.sample_new_size_models = "resnet50_cascade" if cuda else ""
    args.sample_new_size_models = model_names(args.sample_new_size_models, "--sample_new_size_models")

    notes: list[str] = []
    errors: list[str] = []

    def variants_from(text: str | None, default: list[str]) -> list[Variant]:
        chosen = []
        for name in (text.split(",") if text else default):
            variant, note = parse_variant(name, device)
            if note:
                notes.append(note)
            elif variant is not None:
                chosen.append(variant)
        return chosen

    default = default_variants(device, args.compile, args.graphs == "on")
    try:
        variants = variants_from(args.variants, default)
        sample_variants = variants_from(args.sample_variants, [v for v in default if "compile" not in v])
    except ValueError as error:  # a variant name that does not parse
        parser.error(str(error))
    if not cuda:
        notes.append("CPU run: CUDA graphs and torch.compile are measured on CUDA only; tf32 equals fp32 here")

    paths, arrays = load_sample_arrays(Path(args.sample_images), args.sample_limit) if args.sample_images else ([], [])
    if args.content == "sample" and not arrays:
        notes.append("no sample images found: synthetic batches are uniform noise")

    report = report_header("inference", "tools/benchmark_inference.py", argv, device)
    report["settings"] = {"models": args.models, "batch_sizes": args.batch_sizes, "size": [args.width, args.height],
                          "content": args.content if arrays else "noise", "iters": args.iters, "warmup": args.warmup,
                          "confidence_threshold": args.confidence_threshold, "nms_threshold": 0.4,
                          "variants": [v.name for v in variants], "cudnn_benchmark": cuda,
                          "fidelity": {"min_score": 0.5, "min_iou": 0.98, "pass_confidence": FIDELITY_CONFIDENCE,
                                       "score_tol": args.score_tol, "landmark_tol_px": args.landmark_tol,
                                       "score_tol_16bit": args.score_tol_16, "landmark_tol_16bit_px": args.landmark_tol_16}}
    started = time.perf_counter()
    synthetic: list[dict[str, Any]] = []
    report.update(synthetic=synthetic, summary=[], sample=None)
    try:
        measure_synthetic(args, device, variants, arrays, errors, synthetic)
        measure_sample(args, device, sample_variants, paths, arrays, errors, report)
        if report["sample"] is None:
            notes.append("sample-image section skipped (no sample images or weights)")
    except KeyboardInterrupt:  # timeout --signal=INT in tools/gpu_check.sh: keep what was measured
        report["interrupted"] = True
        notes.append("interrupted (SIGINT): partial results")
    report["summary"] = summarize(synthetic)
    fidelity = [e["fidelity"]["passed"] for e in synthetic if "fidelity" in e]
    if report["sample"]:
        fidelity += [v["fidelity"]["passed"] for v in report["sample"]["variants"] if "fidelity" in v]
    report["fidelity_passed"] = all(fidelity)
    return finish_report(report, notes, errors, started, args.out)


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)  # a failed measurement is in the JSON and in the exit status
