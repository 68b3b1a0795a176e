"""``FaceDetector``: a RetinaFace checkpoint turned into a callable face detector.

    detector = FaceDetector("mobilenet0.25", device="cuda", confidence_threshold=0.5)
    faces = detector.detect("group.jpg")            # one image -> Detections
    batch = detector.detect([img1, img2, "x.png"])  # list -> list[Detections]

Images are BGR uint8 arrays (H, W, 3) (``channel_order="rgb"`` for RGB ones), PIL images or
paths. Results are in pixels of the original image: boxes (K, 4) x1, y1, x2, y2, continuous
coordinates not clipped to the image (a face at the border may reach past it; see
:meth:`Detections.clipped`); scores (K,); landmarks (K, 5, 2) as (x, y) in the order eye on the
image's left (the person's right), the other eye, nose, mouth corner on the image's left, the
other corner (the RetinaFace label order).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence, Union

import cv2
import numpy as np
import torch

from models.dense_path import PRECISIONS, DensePath
from models.padding_mask import padded_size
from models.retinaface import BGR_MEAN, ModelConfig, RetinaFace, unwrap_model
from utils.checkpoint import load_model
from utils.image_io import NONE_IMAGE
from utils.image_loader import check_channel_order, image_as_bgr_uint8, is_pil_image
from utils.nms import PUBLIC_PIXEL_OFFSET
from utils.postprocess import DeferredPostprocess, Finish

ImageInput = Union[np.ndarray, str, Path, Any]  # Any: a PIL image


class Face(NamedTuple):
    """One detection: ``box`` (4,) x1, y1, x2, y2, ``score``, ``landmarks`` (5, 2) (x, y)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray


@dataclass(eq=False)  # arrays: == would be ambiguous; compare the fields with numpy
class Detections:
    """Faces found in one image, sorted by decreasing score, in original-image pixels."""

    boxes: np.ndarray      # (K, 4) float32 x1, y1, x2, y2
    scores: np.ndarray     # (K,) float32
    landmarks: np.ndarray  # (K, 5, 2) float32 (x, y)

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: Any) -> "Face | Detections":
        """``faces[i]``: one :class:`Face`; a slice, index array or boolean mask (``faces[faces.scores
        > 0.9]``): the :class:`Detections` it selects."""
        if isinstance(index, numbers.Integral) or (isinstance(index, np.ndarray) and index.ndim == 0
                                                    and index.dtype.kind in "iu"):
            index = int(index)
            return Face(self.boxes[index], float(self.scores[index]), self.landmarks[index])
        return Detections(self.boxes[index], self.scores[index], self.landmarks[index])

    def __iter__(self) -> Iterator[Face]:
        return (self[i] for i in range(len(self)))

    def clipped(self, height: int, width: int) -> "Detections":
        """The boxes clipped to an image of ``height`` x ``width`` pixels (x to [0, width], y to
        [0, height]); the landmarks stay as found. For crops: ``image[int(y1):int(y2), ...]`` of an
        unclipped box that starts above the image would be empty."""
        limits = np.array([width, height, width, height], dtype=np.float32)
        return Detections(np.clip(self.boxes, 0, limits).astype(np.float32), self.scores, self.landmarks)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))

    def rescaled(self, scale_x: float, scale_y: float | None = None) -> "Detections":
        """These detections, found on an image resized by (scale_x, scale_y), in the pixels of the
        original image (``scale_y`` defaults to ``scale_x``)."""
        scale_y = scale_x if scale_y is None else scale_y
        if (scale_x, scale_y) == (1.0, 1.0) or len(self) == 0:
            return self
        factor = np.array([scale_x, scale_y], dtype=np.float32)
        boxes = (self.boxes.reshape(-1, 2, 2) / factor).reshape(-1, 4)
        return Detections(boxes.astype(np.float32), self.scores, (self.landmarks / factor).astype(np.float32))

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready ``[{"box": [x1, y1, x2, y2], "score": s, "landmarks": [[x, y] * 5]}, ...]``."""
        return [{"box": box.tolist(), "score": float(score), "landmarks": points.tolist()}
                for box, score, points in zip(self.boxes, self.scores, self.landmarks)]


def resize_scale(height: int, width: int, target_size: int | None = None, max_size: int | None = None) -> float:
    """Scale applied to an image before the network (1.0 = original size).

    ``target_size``: the shorter side becomes ``target_size``, unless the longer side would then
    exceed ``max_size`` (the published "1600/2150" test setting). Without ``target_size``,
    ``max_size`` only caps the longer side.
    """
    long_side, short_side = max(height, width), min(height, width)
    if target_size is not None:
        scale = target_size / short_side
        if max_size is not None and np.round(scale * long_side) > max_size:
            scale = max_size / long_side
        return scale
    if max_size is not None and long_side > max_size:
        return max_size / long_side
    return 1.0


def resize_image(image: np.ndarray, scale: float, *, to_float: bool = True) -> np.ndarray:
    """``image`` (H, W, 3) resized by ``scale`` to float32, as the public test_widerface.py does
    (``cv2.resize`` with ``fx = fy = scale``, bilinear, no rounding to uint8 levels); with
    ``to_float=False`` in the image's own type (uint8: rounded, as insightface's evaluation
    resizes). A side that would round to 0 pixels (a 1-pixel-high banner under ``max_size``) is
    kept at 1 pixel."""
    height, width = image.shape[:2]
    source = np.float32(image) if to_float else image
    if round(height * scale) >= 1 and round(width * scale) >= 1:
        return cv2.resize(source, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(source, size, interpolation=cv2.INTER_LINEAR)


def same_size_groups(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of the images grouped by (height, width), in first-seen order: the images that can
    share a forward pass without padding."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(index)
    return list(groups.values())


def _check_positive_integer(name: str, value: Any, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive whole {unit}, got {value!r}")


def _scalar(value: Any) -> Any:
    """A 0-d numpy array or torch tensor as its Python number (other values as they are)."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def _fraction_or_none(name: str, value: Any, none_means: str = "or None") -> float | None:
    value = _scalar(value)
    if value is None and none_means == "or None":
        return None
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] ({none_means}), got {value!r}")
    return float(value)


def _fraction(name: str, value: Any) -> float:
    """A threshold that must be given (the confidence threshold: None has no meaning there)."""
    return _fraction_or_none(name, value, none_means="0 keeps every candidate")


def _limit_or_none(name: str, value: Any) -> int | None:
    """A detection count limit: a positive whole number, or None / 0 for no limit (the command
    line's ``all`` / ``0``)."""
    value = _scalar(value)
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == 0):
        return None
    _check_positive_integer(name, value, "number of detections (or None / 0: no limit)")
    return int(value)


def postprocess_settings(confidence_threshold: Any, nms_threshold: Any, top_k: Any, keep_top_k: Any
                         ) -> tuple[float, float | None, int | None, int | None]:
    """The four post-processing settings checked and normalised as :class:`FaceDetector` takes
    them (thresholds in [0, 1], the NMS one also None: no NMS; limits positive, or None / 0 for no
    limit; numpy and torch scalars accepted); ``ValueError`` names the one out of range."""
    return (_fraction("confidence_threshold", confidence_threshold),
            _fraction_or_none("nms_threshold", nms_threshold),
            _limit_or_none("top_k", top_k), _limit_or_none("keep_top_k", keep_top_k))


def _pixels_or_none(name: str, value: Any) -> int | None:
    value = _scalar(value)
    if value is None:
        return None
    _check_positive_integer(name, value, "number of pixels (or None)")
    return int(value)


def _positive_count(name: str, value: Any) -> int:
    value = _scalar(value)
    _check_positive_integer(name, value, "number of images")
    return int(value)


def as_image_list(images: Any, method: str, single_allowed: bool = False) -> list[ImageInput]:
    """``images`` (a list, tuple, generator ... of images, a (B, H, W, 3) array or a 1-D object
    array of images) as a list, or a ``TypeError`` naming the mistake: None (a failed
    ``cv2.imread``), encoded bytes, one image where ``method`` takes several, or no iterable."""
    if images is None:
        raise TypeError(NONE_IMAGE)
    if isinstance(images, (bytes, bytearray)):
        raise TypeError("encoded image bytes are not decoded here: pass the file's path, or decode them first "
                        "(cv2.imdecode)")
    if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim != 4
                                           and not (images.ndim == 1 and images.dtype == object)):
        raise TypeError(f"{method}() takes a list of images (or a (B, H, W, 3) array); for one image use "
                        "detect(image)")
    if not isinstance(images, Iterable):
        kinds = "one image (a BGR numpy array or a path) or a list of them" if single_allowed else "a list of images"
        raise TypeError(f"{method}() takes {kinds}, got {type(images).__name__}")
    return list(images)


def detect_in_batches(detector: Any, images: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
    """``detect`` of :class:`FaceDetector` and :class:`utils.tta.TTADetector`: one image ->
    :class:`Detections`; a list -> a list, run ``detector.batch_size`` images per ``detect_batch``."""
    if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim != 4) or is_pil_image(images):
        return detector.detect_batch([images])[0]
    images = as_image_list(images, "detect", single_allowed=True)
    size, found = detector.batch_size, []
    for start in range(0, len(images), size):
        try:
            found += detector.detect_batch(images[start:start + size])
        except (TypeError, ValueError) as error:
            if hasattr(error, "image_index"):  # the index in this call's list, not in its chunk
                error.image_index += start
                error.add_note(f"(image {error.image_index} of the list)")
            raise
    return found


def images_as_bgr_uint8(images: Sequence[ImageInput], channel_order: str = "bgr") -> list[np.ndarray]:
    """Each image read or converted (:func:`utils.image_loader.image_as_bgr_uint8`); an image that
    cannot be is named by its index in the error's ``image_index`` (``detect`` makes that the
    index in its whole list and adds it as a note to the error)."""
    arrays = []
    for index, image in enumerate(images):
        try:
            arrays.append(image_as_bgr_uint8(image, channel_order))
        except (TypeError, ValueError) as error:
            error.image_index = index
            raise
    return arrays


class _Checked:
    """A :class:`FaceDetector` setting checked by ``check(name, value)`` whenever it is set, in
    ``__init__`` and after (``detector.confidence_threshold = 0.3`` is allowed; 1.5 is refused)."""

    def __init__(self, check: Any) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else getattr(instance, self.slot)

    def __set__(self, instance: Any, value: Any) -> None:
        setattr(instance, self.slot, self.check(self.name, value))


def resolve_device(device: str | torch.device | None = None, gpu_num: int = 0) -> torch.device:
    """``device`` if given (``cpu``, ``cuda``, ``cuda:N``), else ``cuda:<gpu_num>`` when CUDA is
    available, else the CPU. Raises ``ValueError`` for a CUDA device that does not exist."""
    if device is None:
        return torch.device(f"cuda:{gpu_num}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        index = device.index if device.index is not None else gpu_num
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} requested but only {torch.cuda.device_count()} GPU(s) exist")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {device}; use cpu, cuda or cuda:N")
    return device


def use_device(device: torch.device) -> None:
    """Make ``device`` the current GPU of a process that works on one (the command-line
    scripts), so that nothing opens a context, stream or event on ``cuda:0`` behind it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool):
    """``torch.backends.cudnn.benchmark`` set to ``enabled`` inside the block (restored after)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def _retinaface(model: Any, hint: str) -> RetinaFace:
    """``model`` as a :class:`RetinaFace`: one wrapped by ``torch.compile``, DataParallel or
    DistributedDataParallel is unwrapped (:func:`~models.retinaface.unwrap_model`; the detector
    compiles its own copy with ``compile=True``); anything else raises ``TypeError`` (``hint`` for
    a state dict)."""
    model = unwrap_model(model)
    if not isinstance(model, RetinaFace):
        kind = f"a state dict ({hint})" if isinstance(model, Mapping) else type(model).__name__
        raise TypeError(f"model must be a RetinaFace (models.retinaface), got {kind}")
    return model


class _Network:
    """A :class:`FaceDetector`'s model and the inference copy it runs (:class:`DensePath`), shared
    by the detector's :meth:`~FaceDetector.with_settings` copies, so that a rebuild serves them all.

    :meth:`follow_changes` rebuilds the copy when the version counters of the model's parameters
    and buffers moved (each autograd-visible in-place change raises one; fused optimizer kernels
    and ``.data`` edits do not)."""

    def __init__(self, model: RetinaFace, device: torch.device, options: Mapping[str, Any]) -> None:
        self.model, self.device, self.options = model, device, dict(options)
        self.tensors = list(itertools.chain(model.parameters(), model.buffers()))
        self.rebuild()
        if self.version is None:
            warnings.warn("the model's tensors were made under torch.inference_mode and have no version counter: "
                          "the detector cannot see changes to them; call detector.refresh() after any", stacklevel=3)

    def _version(self) -> int | None:
        try:
            return sum(tensor._version for tensor in self.tensors)
        except RuntimeError:  # inference tensors: no version counter
            return None

    def rebuild(self) -> None:
        # the earlier copy is let go, not cleared: a pending batch may still read its graph outputs
        self.version = self._version()
        self.dense = DensePath(self.model, self.device, **self.options)

    def follow_changes(self) -> None:
        if self.version is not None and self._version() != self.version:
            self.rebuild()

    def __setstate__(self, state: dict[str, Any]) -> None:  # copy.deepcopy, pickle: new tensors, new counters
        self.__dict__.update(state)
        self.version = self._version()


class FaceDetector:
    """Face detector built once from a checkpoint (see ``utils/checkpoint.py`` for formats).

    Args:
        weights: checkpoint path, or ``mobilenet0.25``/``resnet50`` for the published models.
        model: an already built :class:`RetinaFace` instead of ``weights``.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when available).
        overrides: architecture options for checkpoints that do not record them.
        confidence_threshold, nms_threshold, top_k, keep_top_k: post-processing (see
            ``utils/postprocess.py``; ``None``: no limit, and for ``nms_threshold`` no NMS; ``0``
            for ``top_k`` / ``keep_top_k``: no limit, as on the command line); the defaults are the
            public demo's except the threshold. NMS runs in original-image pixels.
        target_size, max_size: test-time resize (see :func:`resize_scale`); default original size.
        max_pixels: an image that would reach the network with more pixels is scaled down to about
            this many (boxes mapped back), as ``inference.py --max_pixels`` does (36 MP there); the
            default None never (one 8.5 MP image raised a process's peak memory by 0.37 GB with
            mobilenet0.25 on the CPU).
        batch_size: images per :meth:`detect_batch` call made by :meth:`detect` (``detect_batch``
            itself runs all the images it is given, one forward pass per size group).
        pad_batches: run all the images of a :meth:`detect_batch` call in one forward pass,
            padded at the bottom and right to the largest height and width; otherwise only images
            of one size share a pass. Padding is exact: the network masks it
            (``models/padding_mask.py``), so each image gets the detections it gets alone.
        pad_to: round the canvas of every forward pass up to a multiple of ``pad_to`` pixels
            (1: no rounding); above 1 it implies ``pad_batches`` (the caller chooses which images
            share a call: ``utils.image_loader.SameSizeBatcher`` groups them by canvas). A data
            set of many image sizes then runs a few canvas shapes, which on CUDA reuse their
            cuDNN plans and CUDA graphs, at the cost of computing the padding.
        half: fp16 autocast on CUDA; ignored (with a warning) on the CPU.
        precision: ``fp32``, ``fp16`` or ``bf16`` autocast on CUDA (overrides ``half``). fp16 is
            the fast choice: bf16's 8-bit mantissa moved some boxes of the published
            mobilenet0.25 below IoU 0.98 of the fp32 result on the sample images, fp16 did not.
        channels_last: NHWC memory format (True) or NCHW (False); default: NHWC, except NCHW
            on CUDA for networks with depthwise convolutions (mobilenet0.25), whose NHWC
            path costs about a second per image size not run before
            (``models.dense_path.default_channels_last``).
        fuse_bn: run a copy of the model with BatchNorm folded into the convolutions (same
            outputs up to float rounding, fewer operations). ``self.model`` keeps its weights and
            train/eval mode; a ``model`` passed in is moved to ``device`` (``nn.Module.to``, in place).
        pixel_offset: added to box widths and heights in NMS's area and overlap (1, the public
            ``py_cpu_nms`` convention, see ``utils/nms.py``).
        cuda_graphs: on CUDA, replay the network and decoding of input shapes seen before from
            CUDA graphs (default on; see ``models/dense_path.py``).
        compile: ``torch.compile`` the network and decoding (compiles once per input shape: for
            inputs of fixed size, e.g. with ``target_size`` and equal aspect ratios).

        channel_order: ``"bgr"`` (cv2.imread's order, the default) or ``"rgb"`` for numpy arrays
            in RGB order (PIL, matplotlib, torchvision.io). Paths and PIL images are converted
            whatever it says. The network was trained on BGR: RGB given as BGR finds fewer faces.

    The post-processing and resize settings and ``batch_size`` may be changed after construction
    (they are checked again); a :meth:`submit` uses the values of the moment it is called. The
    other options are fixed when the detector is built; setting them (or a name that is no
    setting) raises ``AttributeError``. The detector runs an inference copy of ``model`` made
    when it is built or ``model`` is set: after changing the model's weights call
    :meth:`refresh`. A change made in place through autograd-visible operations
    (``load_state_dict``, ``param.mul_(...)``, an optimizer without ``fused=True``) is also seen
    by the next call, which then rebuilds the copy; fused optimizers (``SGD(fused=True)``, as
    ``train.py`` uses on CUDA), edits through ``.data`` and replaced tensors are not.

    A detector and its :meth:`with_settings` copies share one network and its CUDA graphs: call
    them from one thread at a time (a lock around ``detect``), or build a detector per thread.
    """

    #: what may be set after construction besides the checked settings and ``model``
    _STATE = frozenset({"deferred", "timings"})
    #: the constructor's options that are fixed once the detector is built
    _FIXED = ("device", "pad_to", "pad_batches", "pixel_offset", "channel_order", "weights", "overrides", "half",
              "precision", "channels_last", "fuse_bn", "cuda_graphs", "compile")

    confidence_threshold = _Checked(_fraction)
    nms_threshold = _Checked(_fraction_or_none)
    top_k = _Checked(_limit_or_none)
    keep_top_k = _Checked(_limit_or_none)
    target_size = _Checked(_pixels_or_none)
    max_size = _Checked(_pixels_or_none)
    max_pixels = _Checked(_pixels_or_none)
    batch_size = _Checked(_positive_count)

    def __init__(self, weights: str | Path | Mapping[str, Any] | None = None, *, model: RetinaFace | None = None,
                 device: str | torch.device | None = None, overrides: Mapping[str, Any] | None = None,
                 confidence_threshold: float = 0.5, nms_threshold: float | None = 0.4, top_k: int | None = 5000,
                 keep_top_k: int | None = 750, target_size: int | None = None, max_size: int | None = None,
                 max_pixels: int | None = None, batch_size: int = 1, pad_batches: bool = False, pad_to: int = 1, half: bool = False,
                 precision: str | None = None, channels_last: bool | None = None, fuse_bn: bool = True,
                 cuda_graphs: bool = True, compile: bool = False,
                 pixel_offset: float = PUBLIC_PIXEL_OFFSET, channel_order: str = "bgr") -> None:
        if (weights is None) == (model is None):
            raise ValueError("give exactly one of weights or model")
        model = None if model is None else _retinaface(model, hint="pass it as weights")
        self.confidence_threshold = confidence_threshold  # each checked (_Checked) before any loading
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.keep_top_k = keep_top_k
        self.target_size = target_size
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        _check_positive_integer("pad_to", pad_to, "number of pixels")
        precision = precision or ("fp16" if half else "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        for name, flag in (("channels_last", channels_last), ("half", half), ("pad_batches", pad_batches)):
            if flag is not None and not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False{' (or None)' if name == 'channels_last' else ''}, "
                                 f"got {flag!r}")
        fixed = {"device": resolve_device(device), "pad_to": int(pad_to),
                 "pad_batches": bool(pad_batches) or int(pad_to) > 1, "pixel_offset": pixel_offset,
                 "channel_order": check_channel_order(channel_order)}
        for name, value in fixed.items():
            object.__setattr__(self, f"_{name}", value)
        if precision != "fp32" and self.device.type != "cuda":
            warnings.warn(f"half precision is only used on CUDA; running in float32, not {precision}", stacklevel=2)
        self._dense_options = {"precision": precision, "channels_last": channels_last, "fuse_bn": fuse_bn,
                               "cuda_graphs": cuda_graphs, "compile": compile}
        self.model = model if model is not None else load_model(weights, overrides)  # builds the network
        with self.dense.device_scope():
            self.deferred = DeferredPostprocess(self.device)
        self.timings: dict[str, float] = defaultdict(float)  # seconds: preprocess, forward, postprocess

    device = property(lambda self: self._device)
    pad_to = property(lambda self: self._pad_to)
    pad_batches = property(lambda self: self._pad_batches)
    pixel_offset = property(lambda self: self._pixel_offset)
    channel_order = property(lambda self: self._channel_order)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._FIXED:
            hint = " or detector.with_settings(channel_order=...)" if name == "channel_order" else ""
            raise AttributeError(f"{name} is fixed when the detector is built: FaceDetector(..., {name}=...){hint}")
        settable = name.startswith("_") or name in self._STATE or name == "model" or name in self._changeable()
        if not settable:
            raise AttributeError(f"FaceDetector has no setting {name!r} (those that can change after construction: "
                                 f"{', '.join(self._changeable())}, model)")
        object.__setattr__(self, name, value)

    @property
    def model(self) -> RetinaFace:
        """The network; the detector runs an inference copy of it (``fuse_bn``: BatchNorm folded)."""
        return self._network.model

    @model.setter
    def model(self, model: RetinaFace) -> None:
        # a network of its own: copies made by with_settings before keep the one they share
        self._network = _Network(_retinaface(model, hint="to load weights use detector.model.load_state_dict(...)"
                                             ).to(self.device), self.device, self._dense_options)

    @property
    def dense(self) -> DensePath:
        """The inference copy of ``model`` (pre-processing, network, decoding; CUDA graphs)."""
        return self._network.dense

    def refresh(self) -> None:
        """Rebuild the inference copy of ``model`` from its weights of now (for this detector and
        the :meth:`with_settings` copies that share its network)."""
        self._network.rebuild()

    def with_settings(self, **settings: Any) -> "FaceDetector":
        """A shallow copy with other post-processing / resize settings or ``batch_size`` (checked as
        when set), or another ``channel_order``, sharing this detector's network, CUDA graphs and
        ``timings``: ``detector.with_settings(confidence_threshold=0.9)(image)`` leaves
        ``detector`` as it is."""
        other = copy.copy(self)
        for name, value in settings.items():
            if name == "channel_order":
                object.__setattr__(other, "_channel_order", check_channel_order(value))
            elif name in self._changeable():
                setattr(other, name, value)
            else:
                raise TypeError(f"with_settings() takes the settings that can change ({', '.join(self._changeable())})"
                                f" and channel_order, not {name!r}")
        return other

    @classmethod
    def _changeable(cls) -> list[str]:
        return [name for klass in reversed(cls.__mro__) for name, value in vars(klass).items()
                if isinstance(value, _Checked)]

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def release_memory(self) -> None:
        """After running out of device memory: free the CUDA graphs (their memory pools are
        not returned by ``empty_cache``; later batches run without graphs) and the cached blocks."""
        self.dense.drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def detect(self, images: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        """Detect faces in one image (returns :class:`Detections`) or a list (returns a list)."""
        return detect_in_batches(self, images)

    __call__ = detect

    def detect_batch(self, images: Sequence[ImageInput]) -> list[Detections]:
        """Detect faces in ``images`` with as few forward passes as the sizes allow."""
        return self.submit(images).result()

    def submit(self, images: Sequence[ImageInput]) -> "PendingDetections":
        """:meth:`detect_batch` in two halves: reads and pre-processes ``images`` and queues their
        forward passes now; ``result()`` of the returned handle post-processes them. Submitting the
        next batch before taking this one's result lets a GPU run the next network while the
        host post-processes (``utils.postprocess.DeferredPostprocess``); the results are the same.
        ``images``: a list (or a (B, H, W, 3) array); one image alone is refused (:meth:`detect`
        takes it), as iterating it would run its rows or characters as images."""
        images = as_image_list(images, "submit")
        self._network.follow_changes()
        started = time.perf_counter()
        arrays = images_as_bgr_uint8(images, self.channel_order)
        scales = [self._scale(*a.shape[:2]) for a in arrays]
        inputs = [a if s == 1.0 else resize_image(a, s) for a, s in zip(arrays, scales)]
        self.timings["preprocess"] += time.perf_counter() - started
        groups = self._groups(inputs)
        with self.dense.device_scope():  # pinned buffers, events and NMS on this detector's GPU
            launched = [self._launch([inputs[i] for i in group], [scales[i] for i in group]) for group in groups]
            # the groups' post-processing runs as one: one threshold, NMS and copy to the host for
            # all their images (on CUDA the device is waited for twice in all, not twice per group)
            finish = self.deferred.defer_groups([outputs for outputs, _ in launched],
                                                confidence_threshold=self.confidence_threshold,
                                                nms_threshold=self.nms_threshold, top_k=self.top_k,
                                                keep_top_k=self.keep_top_k, pixel_offset=self.pixel_offset)
        return PendingDetections(self, len(inputs), [i for group in groups for i in group], finish,
                                 [clock for _, clock in launched])

    def _scale(self, height: int, width: int) -> float:
        """The resize of an image before the network: :func:`resize_scale`, then down to
        ``max_pixels`` where the result would have more."""
        scale = resize_scale(height, width, self.target_size, self.max_size)
        if self.max_pixels is not None and height * width * scale * scale > self.max_pixels:
            scale = math.sqrt(self.max_pixels / (height * width))
        return scale

    def _groups(self, inputs: Sequence[np.ndarray]) -> list[list[int]]:
        return [list(range(len(inputs)))] if self.pad_batches and inputs else same_size_groups(inputs)

    @torch.inference_mode()
    def _launch(self, images: list[np.ndarray], scales: list[float]
                ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], StageClock]:
        """Queue one forward pass of ``images`` (resized by ``scales`` from the originals, all on
        one canvas); returns its dense outputs in original pixels (boxes (B, N, 4), scores (B, N),
        landmarks (B, N, 10)) and the clock that marks the pass."""
        started = time.perf_counter()
        height, width = padded_size(max(im.shape[0] for im in images), max(im.shape[1] for im in images),
                                    self.pad_to)
        cuda = self.device.type == "cuda"
        shape = (len(images), height, width, 3)
        dtype = np.result_type(*images)  # uint8, or float32 for resized images
        sizes = None  # (B, 2) image sizes when some image is padded: the network masks the padding
        if any(im.shape[:2] != (height, width) for im in images):
            sizes = torch.tensor([im.shape[:2] for im in images], dtype=torch.int64)
            sizes = sizes.pin_memory() if cuda else sizes
        if len(images) == 1 and sizes is None and not cuda:
            image = np.ascontiguousarray(images[0])
            # a read-only array (np.asarray of a PIL image) is copied: torch warns about sharing it
            tensor = torch.from_numpy(image if image.flags.writeable else image.copy())[None]
        else:  # on CUDA assembled straight in page-locked memory: the copy to the GPU is asynchronous
            tensor = torch.empty(shape, dtype=torch.float32 if dtype == np.float32 else torch.uint8, pin_memory=cuda)
            # the padding (any finite value would do: it is masked) from one mean row: assigning the
            # 3-value mean itself broadcasts pixel by pixel, 30x slower (~7 ms for half a 1024 x 1408 canvas)
            mean_row = np.empty((width, 3), dtype=dtype)
            mean_row[:] = np.asarray(BGR_MEAN, dtype=dtype)
            for slot, image in zip(tensor.numpy(), images):
                rows, cols = image.shape[:2]
                slot[:rows, :cols] = image
                slot[rows:] = mean_row
                slot[:rows, cols:] = mean_row[cols:]
        forward = StageClock(cuda)
        self.timings["preprocess"] += time.perf_counter() - started
        forward.mark()
        boxes, scores, landmarks = self.dense(tensor, sizes=sizes)
        if any(scale != 1.0 for scale in scales):
            # back to original pixels before NMS, whose +1 is one pixel of the original image (as
            # the public test_widerface.py does at 1600/2150)
            inverse = torch.tensor([1.0 / scale for scale in scales], pin_memory=boxes.is_cuda)
            # from pinned memory without blocking: the host does not wait for the forward pass it queued
            inverse = inverse.to(boxes.device, non_blocking=True)[:, None, None]
            boxes, landmarks = boxes * inverse, landmarks * inverse
        forward.mark()
        return (boxes, scores, landmarks), forward


class PendingDetections:
    """The detections of one :meth:`FaceDetector.submit` call, post-processed by :meth:`result`."""

    def __init__(self, detector: FaceDetector, count: int, order: list[int], finish: Finish,
                 forward_clocks: list[StageClock]) -> None:
        self.detector = detector
        self.count = count
        self.order = order  # the submitted index of each image, in the order of the finished rows
        self.finish: Finish | None = finish
        self.forward_clocks = forward_clocks

    def result(self) -> list[Detections]:
        """The detections of every submitted image, in order (call once)."""
        if self.finish is None:
            raise RuntimeError("result() was already taken")
        detector = self.detector
        with detector.dense.device_scope():
            post = StageClock(detector.device.type == "cuda")
            rows, counts = self.finish(post.mark)
            detector.timings["forward"] += sum(clock.seconds()[0] for clock in self.forward_clocks)
            detector.timings["postprocess"] += post.seconds()[0]
        self.finish = None  # the device tensors can go
        boxes, scores, landmarks = rows[:, :4], rows[:, 4], rows[:, 5:].reshape(-1, 5, 2)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        results: list[Detections | None] = [None] * self.count
        for index, start, stop in zip(self.order, offsets[:-1], offsets[1:]):
            results[index] = Detections(boxes[start:stop], scores[start:stop], landmarks[start:stop])
        return results  # type: ignore[return-value]


class StageClock:
    """Stage boundaries without host synchronisation: CUDA events on CUDA, the host clock on the
    CPU. ``mark(name)`` records a boundary; :meth:`seconds` (which waits for the marked work)
    gives the time between consecutive marks and :meth:`durations` the same keyed by the name of
    the mark that ends each stage."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.names: list[str] = []
        self.points: list = []

    def mark(self, name: str = "") -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())
        self.names.append(name)

    def seconds(self) -> list[float]:
        """Waits for the last marked device work (``elapsed_time`` refuses unfinished events)."""
        pairs = zip(self.points[:-1], self.points[1:])
        if self.cuda:
            if self.points:
                self.points[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in pairs]
        return [b - a for a, b in pairs]

    def durations(self) -> dict[str, float]:
        """Seconds per stage name, summed over the stages of that name (a pass of several batches
        marks each name once per batch)."""
        totals: dict[str, float] = {}
        for name, seconds in zip(self.names[1:], self.seconds()):
            totals[name] = totals.get(name, 0.0) + seconds
        return totals
