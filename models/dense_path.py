"""The fixed-shape part of detection: uint8 images -> network input -> forward -> decoded boxes.

Everything from the uint8 batch to the decoded boxes, scores and landmarks of every prior has
shapes that depend only on the input shape (images of different sizes padded to one canvas
included: their sizes are a tensor input, see ``models/padding_mask.py``), so on CUDA it can be
replayed from a CUDA graph: one launch instead of a few hundred kernel launches, which is what
bounds small batches (a ResNet-50 cascade forward pass is ~300 kernels). Post-processing
(threshold, NMS) has data-dependent shapes and stays eager (``utils/postprocess.py``).

Graph policy: a shape is captured the second time it is seen (the first, eager run has done
cuDNN's autotuning and lazy initialisation), so a folder of photos of all different sizes never
pays for a capture, while repeated sizes (video frames, a resized dataset, benchmark batches)
run from the graph. Graphs are made for the first ``max_graphs`` repeated shapes only and kept
(each holds the activation memory of its shape; replacing them could capture again and again on
a stream of alternating sizes, like WIDER FACE's). A capture that fails switches graphs off with
a warning.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from typing import Callable, NamedTuple

import torch

from layers.prior_box import prior_boxes
from models.net import fuse_conv_bn
from models.padding_mask import PaddingMask, valid_priors
from models.retinaface import RetinaFace, bgr_mean, preprocess

#: autocast precisions by name; ``fp32`` runs without autocast.
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

Decoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _Graph(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    static_input: torch.Tensor
    static_sizes: torch.Tensor | None  # (B, 2) image sizes of a padded batch
    static_output: Decoded
    priors: torch.Tensor  # read by every replay: held here, the prior cache may evict its copy


def has_depthwise_convolutions(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a convolution with one group per input channel (MobileNet's)."""
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def default_channels_last(model: torch.nn.Module, device: torch.device | str) -> bool:
    """The layout :class:`DensePath` runs when none is given: NHWC (channels_last), except on CUDA
    for networks with depthwise convolutions (mobilenet0.25), which run NCHW.

    NHWC is faster with cuDNN and oneDNN (e.g. 38 against 58 ms per sample image for
    mobilenet0.25 on 2 CPU cores). But PyTorch hands every NHWC depthwise convolution to cuDNN,
    whose recent versions build (compile) an execution plan for each new input shape, while NCHW
    float32 depthwise convolutions run PyTorch's own kernel. On an H100 (cuDNN 9.19) each image
    size not run before cost mobilenet0.25 about half a second in NHWC: 546 ms per image for a
    pass over new sizes, against 62 ms for the public NCHW pipeline (README, GPU benchmarks), and
    on a size already run at batch 1 without CUDA graphs the NCHW float32 reference took 4.2 ms
    per 640x480 image against 4.6 ms for NHWC fp16. Data sets of many image sizes (WIDER FACE,
    folders of photos) meet new sizes all the time. Pass ``channels_last=True`` for a stream of
    one size (the 5,594 img/s of mobilenet0.25 at batch 32 on that H100 were measured in NHWC).
    """
    return not (torch.device(device).type == "cuda" and has_depthwise_convolutions(model))


class DensePath:
    """uint8 (or float32) BGR images ``(B, H, W, 3)`` (host, ideally pinned, or device) -> decoded ``boxes``
    ``(B, N, 4)`` x1y1x2y2 pixels, ``scores`` ``(B, N)``, ``landmarks`` ``(B, N, 10)`` (float32,
    on the device; N = priors of an ``H x W`` input).

    Args:
        model: the detector; it is not modified (``fuse_bn`` runs a folded copy).
        device: where to run.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast; 16-bit only on CUDA).
        channels_last: NHWC memory format; off runs NCHW, the reference layout. Default
            (None): :func:`default_channels_last`.
        fuse_bn: fold BatchNorm into the convolutions (either way the path runs an eval-mode copy).
        cuda_graphs: replay repeated shapes from CUDA graphs (CUDA only; see the module doc).
        compile: ``torch.compile`` the dense function (recompiles per input shape: for fixed sizes).
        capture_after: eager runs of a shape before its graph is captured.
        max_graphs: at most this many shapes get a graph; later shapes run eagerly.

    Outputs of a graph replay live in the graph's static buffers: they are valid until the next
    call with the same shape (consume them, e.g. post-process, before calling again).
    """

    def __init__(self, model: RetinaFace, device: torch.device, *, precision: str = "fp32",
                 channels_last: bool | None = None, fuse_bn: bool = True, cuda_graphs: bool = False,
                 compile: bool = False, compile_mode: str | None = None, capture_after: int = 1,
                 max_graphs: int = 4) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.model = model
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.autocast_dtype = PRECISIONS[precision] if cuda else None
        self.channels_last = (default_channels_last(model, self.device) if channels_last is None
                              else channels_last)
        network = fuse_conv_bn(model) if fuse_bn else copy.deepcopy(model).eval()
        # both ways: a model trained in channels_last (train.py on CUDA) keeps NHWC weights, and
        # cuDNN runs a convolution in NHWC when its weight is, whatever the input's layout
        self.network = network.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.padding_mask = PaddingMask(self.network)
        self.cuda_graphs = cuda_graphs and cuda
        self.capture_after = max(0, int(capture_after))
        self.max_graphs = max(1, int(max_graphs))
        self._dense: Callable[..., Decoded] = self._dense_eager
        if compile:
            self._dense = torch.compile(self._dense_eager, dynamic=False, mode=compile_mode)
        self._graphs: dict[tuple[int, ...], _Graph] = {}  # key: input shape, + (1,) for padded batches
        self._seen: dict[tuple[int, ...], int] = {}
        self._mean = bgr_mean(self.device)  # made here: no tensor creation inside graphs or compiled code

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        # no weight-cast cache: one forward pass casts each weight once anyway, and a cache filled
        # during graph capture would keep the capture's casts
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _dense_eager(self, images: torch.Tensor, priors: torch.Tensor, sizes: torch.Tensor | None = None) -> Decoded:
        inputs = preprocess(images, mean=self._mean)
        # the permuted uint8 batch has NHWC strides, and cuDNN / oneDNN run a convolution in NHWC
        # when its input is: without this, channels_last=False would still compute in NHWC
        inputs = inputs.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        canvas = (images.shape[1], images.shape[2])
        masked = self.padding_mask.active(sizes, canvas) if sizes is not None else nullcontext()
        with self._autocast(), masked:
            outputs = self.network(inputs)
        boxes, scores, landmarks = self.model.decode_detections(outputs, priors)
        if sizes is not None:
            inside = valid_priors(sizes, canvas, self.model.config.num_anchor)
            scores = scores.masked_fill(~inside, float("-inf"))
        return boxes, scores, landmarks

    def priors(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The pixel priors of a ``(B, H, W, 3)`` batch shape (cached, on the device)."""
        return prior_boxes((shape[1], shape[2]), self.model.config.num_anchor, self.device)

    def device_scope(self):
        """Makes this path's GPU the current one (streams, graph capture and events use the
        current device: without it, cuda:1 would be captured on cuda:0's stream)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def __call__(self, images: torch.Tensor, mark: Callable[[str], None] | None = None,
                 sizes: torch.Tensor | None = None) -> Decoded:
        """Decoded detections of every prior; ``mark("h2d")`` is called once the input copy is queued.

        ``sizes``: (B, 2) int64 (height, width) of the images of a batch padded at the bottom and
        right, on the host (checked there; pinned, it is copied asynchronously). Each image then
        gets the outputs it gets alone (``models/padding_mask.py``), and the priors outside it
        (in its padding) score ``-inf``. ``None``: every image fills the batch's ``H x W``.
        """
        with self.device_scope():
            return self._run(images, mark, sizes)

    @torch.inference_mode()
    def _run(self, images: torch.Tensor, mark: Callable[[str], None] | None,
             sizes: torch.Tensor | None = None) -> Decoded:
        shape = tuple(images.shape)
        if sizes is not None and sizes.device.type == "cpu":  # checked where it costs no device sync
            canvas = torch.tensor(shape[1:3])
            if sizes.shape != (shape[0], 2) or bool(((sizes < 1) | (sizes > canvas)).any()):
                raise ValueError(f"sizes must be (batch, 2) heights and widths within {shape[1:3]}, "
                                 f"got {sizes.tolist()}")
            if bool((sizes == canvas).all()):
                sizes = None  # nothing is padded
        key = shape if sizes is None else (*shape, 1)
        # float32 input (images resized in float, test-time scales) runs eagerly
        graph = self._graph(key, images, sizes) if self.cuda_graphs and images.dtype == torch.uint8 else None
        if graph is not None:
            graph.static_input.copy_(images, non_blocking=True)
            if graph.static_sizes is not None:
                graph.static_sizes.copy_(sizes, non_blocking=True)
            if mark is not None:
                mark("h2d")
            graph.graph.replay()
            return graph.static_output
        images = images.to(self.device, non_blocking=True)
        if sizes is not None:
            sizes = sizes.to(self.device, non_blocking=True)
        if mark is not None:
            mark("h2d")
        return self._dense(images, self.priors(shape), sizes)

    @torch.inference_mode()
    def prepare(self, images: torch.Tensor) -> None:
        """Capture (and compile) for the shape of ``images`` now, e.g. before a timed loop."""
        with self.device_scope():
            self._prepare(images)

    def _prepare(self, images: torch.Tensor) -> None:
        if self.cuda_graphs:
            self._seen[tuple(images.shape)] = self.capture_after
            self._graph(tuple(images.shape), images, None)
        else:
            self(images)

    def _graph(self, key: tuple[int, ...], example: torch.Tensor, sizes: torch.Tensor | None) -> _Graph | None:
        if key in self._graphs:
            return self._graphs[key]
        if len(self._graphs) >= self.max_graphs:
            return None
        seen = self._seen.get(key, 0)
        self._seen[key] = seen + 1
        if seen < self.capture_after:
            return None
        try:
            graph = self._capture(example, sizes)
        except Exception as error:  # a model or build that cannot be captured: run eagerly
            warnings.warn(f"CUDA graph capture failed ({type(error).__name__}: {error}); running without "
                          "CUDA graphs", RuntimeWarning, stacklevel=3)
            self.cuda_graphs = False
            self._graphs.clear()
            return None
        self._graphs[key] = graph
        return graph

    def _capture(self, example: torch.Tensor, sizes: torch.Tensor | None) -> _Graph:
        static_input = torch.empty(example.shape, dtype=torch.uint8, device=self.device)
        static_input.copy_(example)
        static_sizes = None if sizes is None else sizes.to(self.device, dtype=torch.int64, copy=True)
        priors = self.priors(example.shape)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up off the capture stream (autotuning, lazy init, compile)
            for _ in range(2):
                self._dense(static_input, priors, static_sizes)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_output = self._dense(static_input, priors, static_sizes)
        finally:
            # a capture that fails inside torch.cuda.graph's exit leaves its capture stream current
            torch.cuda.set_stream(current)
        return _Graph(graph, static_input, static_sizes, static_output, priors)

    def drop_graphs(self) -> None:
        """Free the captured graphs (their memory pools) and run eagerly from now on, e.g. after
        the device ran out of memory."""
        self._graphs.clear()
        self.cuda_graphs = False

    @property
    def graph_shapes(self) -> list[tuple[int, ...]]:
        """Input shapes that replay from a graph, in capture order (padded batches: the shape
        followed by 1)."""
        return list(self._graphs)
