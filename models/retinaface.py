"""RetinaFace (Deng et al., CVPR 2020) with optional cascade stage and TinaFace-style IoU head.

Input: float tensor (B, 3, H, W), BGR channel order, minus the mean (104, 117, 123), no scaling
(see :func:`preprocess`). Output: one :class:`StageOutput` per detection stage with per-anchor
class logits, box offsets and landmark offsets, concatenated over FPN levels in prior order
(see ``layers/prior_box.py``).

With ``cascade=False`` parameter names and shapes equal the published Pytorch_Retinaface models
(``body.*``, ``fpn.*``, ``ssh1-3.*``, ``ClassHead/BboxHead/LandmarkHead.{0,1,2}``), so their
checkpoints load strictly. The cascade stage lives under ``cascade.*``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from layers.prior_box import STEPS, anchor_sizes
from models import NETWORKS
from models.net import FPN, SSH, backbone_channels, build_backbone
from utils.box_utils import VARIANCES, center_size, decode, decode_landm

BGR_MEAN = (104.0, 117.0, 123.0)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a RetinaFace model; defaults: the original project's best configuration
    (ResNet-50, 2 anchors, cascade on), with the ``refine`` cascade formulation.

    - ``network``: backbone, ``mobilenet0.25`` or ``resnet18/34/50/101/152``.
    - ``num_anchor``: anchors per location, 2 (sizes 16-512) or 3 (sizes 8-512).
    - ``cascade``: add a second detection stage on the same FPN features.
    - ``cascade_mode``: ``refine`` - stage 2 regresses boxes and landmarks from the (detached)
      stage-1 decoded boxes and is classified against them; ``residual`` - the original
      project's formulation: stage-2 box offsets are added to stage-1 box offsets, both relative
      to the anchors; stage-2 landmark offsets are its own (relative to the anchors).
    - ``model_version``: ``retina``, or ``tina`` with a per-anchor IoU head; the face score is
      then sqrt(class probability * predicted IoU).
    - ``out_channels``: FPN/SSH width; ``None`` = 64 for mobilenet0.25, 256 for ResNets.
    """

    network: str = "resnet50"
    num_anchor: int = 2
    cascade: bool = True
    cascade_mode: str = "refine"
    model_version: str = "retina"
    out_channels: int | None = None

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {self.network!r}")
        anchor_sizes(self.num_anchor)
        if self.cascade_mode not in ("refine", "residual"):
            raise ValueError(f"cascade_mode must be 'refine' or 'residual', got {self.cascade_mode!r}")
        if self.model_version not in ("retina", "tina"):
            raise ValueError(f"model_version must be 'retina' or 'tina', got {self.model_version!r}")
        if self.out_channels is not None and (self.out_channels <= 0 or self.out_channels % 4):
            raise ValueError(f"out_channels must be a positive multiple of 4, got {self.out_channels}")

    @property
    def fpn_channels(self) -> int:
        if self.out_channels is not None:
            return self.out_channels
        return 64 if self.network == "mobilenet0.25" else 256

    @property
    def num_stages(self) -> int:
        return 2 if self.cascade else 1

    @property
    def min_sizes(self) -> tuple[tuple[int, ...], ...]:
        return anchor_sizes(self.num_anchor)

    @property
    def steps(self) -> tuple[int, ...]:
        return STEPS

    @property
    def variances(self) -> tuple[float, float]:
        return VARIANCES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model configuration keys: {sorted(unknown)}")
        return cls(**values)

    def replace(self, **overrides: Any) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **overrides})


class StageOutput(NamedTuple):
    """Raw outputs of one detection stage, N = number of priors.

    loc (B, N, 4) box offsets; conf (B, N, 2) class logits (background, face); landm (B, N, 10)
    landmark offsets; iou (B, N, 1) IoU logits for ``tina`` models, else ``None``.
    """

    loc: torch.Tensor
    conf: torch.Tensor
    landm: torch.Tensor
    iou: torch.Tensor | None


class StagePrediction(NamedTuple):
    """A stage's offsets together with the anchors they are relative to.

    anchors: (N, 4) or (B, N, 4) (cx, cy, w, h) in the units of the priors given to
    :meth:`RetinaFace.stage_predictions`; the other fields as in :class:`StageOutput`.
    """

    anchors: torch.Tensor
    loc: torch.Tensor
    conf: torch.Tensor
    landm: torch.Tensor
    iou: torch.Tensor | None


class _Head(nn.Module):
    """1x1 conv predicting ``values_per_anchor`` numbers per anchor: (B, C, H, W) -> (B, H*W*A, V)."""

    def __init__(self, in_channels: int, num_anchors: int, values_per_anchor: int) -> None:
        super().__init__()
        self.values_per_anchor = values_per_anchor
        self.conv1x1 = nn.Conv2d(in_channels, num_anchors * values_per_anchor, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values_per_anchor)


def _heads(in_channels: int, num_anchors: int, values_per_anchor: int, levels: int = 3) -> nn.ModuleList:
    return nn.ModuleList(_Head(in_channels, num_anchors, values_per_anchor) for _ in range(levels))


class DetectionStage(nn.Module):
    """SSH context module per FPN level followed by class/box/landmark(/IoU) heads."""

    def __init__(self, channels: int, num_anchors: int, iou_head: bool) -> None:
        super().__init__()
        self.ssh = nn.ModuleList(SSH(channels, channels) for _ in range(3))
        self.ClassHead = _heads(channels, num_anchors, 2)
        self.BboxHead = _heads(channels, num_anchors, 4)
        self.LandmarkHead = _heads(channels, num_anchors, 10)
        self.IoUHead = _heads(channels, num_anchors, 1) if iou_head else None

    def forward(self, fpn_features: list[torch.Tensor]) -> StageOutput:
        return _apply_heads([ssh(f) for ssh, f in zip(self.ssh, fpn_features)],
                            self.ClassHead, self.BboxHead, self.LandmarkHead, self.IoUHead)


def _apply_heads(features: list[torch.Tensor], class_head: nn.ModuleList, bbox_head: nn.ModuleList,
                 landmark_head: nn.ModuleList, iou_head: nn.ModuleList | None) -> StageOutput:
    def run(heads: nn.ModuleList) -> torch.Tensor:
        return torch.cat([head(f) for head, f in zip(heads, features)], dim=1)

    return StageOutput(loc=run(bbox_head), conf=run(class_head), landm=run(landmark_head),
                       iou=run(iou_head) if iou_head is not None else None)


class RetinaFace(nn.Module):
    """RetinaFace detector; see the module docstring for inputs, outputs and parameter names."""

    def __init__(self, config: ModelConfig | None = None, pretrained: bool = False,
                 backbone_weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        channels = self.config.fpn_channels
        num_anchors = self.config.num_anchor
        tina = self.config.model_version == "tina"
        self.body = build_backbone(self.config.network, pretrained=pretrained, backbone_weights=backbone_weights)
        self.fpn = FPN(backbone_channels(self.config.network), channels)
        # Stage 1 keeps the flat Pytorch_Retinaface names so published checkpoints load strictly.
        self.ssh1 = SSH(channels, channels)
        self.ssh2 = SSH(channels, channels)
        self.ssh3 = SSH(channels, channels)
        self.ClassHead = _heads(channels, num_anchors, 2)
        self.BboxHead = _heads(channels, num_anchors, 4)
        self.LandmarkHead = _heads(channels, num_anchors, 10)
        self.IoUHead = _heads(channels, num_anchors, 1) if tina else None
        self.cascade = DetectionStage(channels, num_anchors, iou_head=tina) if self.config.cascade else None

    def forward(self, images: torch.Tensor) -> list[StageOutput]:
        fpn = self.fpn(list(self.body(images).values()))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        outputs = [_apply_heads(features, self.ClassHead, self.BboxHead, self.LandmarkHead, self.IoUHead)]
        if self.cascade is not None:
            outputs.append(self.cascade(fpn))
        return outputs

    def stage_predictions(self, outputs: list[StageOutput], priors: torch.Tensor) -> list[StagePrediction]:
        """Pair each stage's offsets with the anchors they are relative to (the cascade semantics,
        shared by the loss and by decoding). ``priors`` (N, 4) are (cx, cy, w, h)."""
        first = outputs[0]
        predictions = [StagePrediction(priors, *first)]
        if len(outputs) > 1:
            second = outputs[1]
            if self.config.cascade_mode == "refine":
                refined = center_size(decode(first.loc.detach().float(), priors, self.config.variances))
                predictions.append(StagePrediction(refined, *second))
            else:  # the original project adds the box offsets only: its stage-2 landmarks stand alone
                predictions.append(StagePrediction(priors, first.loc + second.loc, second.conf, second.landm,
                                                   second.iou))
        return predictions

    def decode_detections(self, outputs: list[StageOutput], priors: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode the last stage: boxes (B, N, 4) x1y1x2y2, face scores (B, N) and landmarks
        (B, N, 10), in the units of ``priors`` (pixels for pixel priors)."""
        last = self.stage_predictions(outputs, priors)[-1]
        loc, landm, conf = last.loc.float(), last.landm.float(), last.conf.float()
        boxes = decode(loc, last.anchors, self.config.variances)
        landmarks = decode_landm(landm, last.anchors, self.config.variances)
        scores = torch.softmax(conf, dim=-1)[..., 1]
        if last.iou is not None:
            scores = torch.sqrt(scores * torch.sigmoid(last.iou.float()[..., 0]))
        return boxes, scores, landmarks


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside ``torch.compile``'s wrapper and then inside DistributedDataParallel,
    DataParallel or the graphed-training wrapper (their ``module``); other modules as they are."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def preprocess(images: torch.Tensor, channels_last_input: bool = True, mean: torch.Tensor | None = None
               ) -> torch.Tensor:
    """uint8 BGR images -> float32 network input (B, 3, H, W) minus the BGR mean.

    ``images`` is (B, H, W, 3) when ``channels_last_input`` else (B, 3, H, W); works on any device.
    ``mean``: :func:`bgr_mean` of the device, for callers that hold it (compiled or captured code).
    """
    if channels_last_input:
        images = images.permute(0, 3, 1, 2)
    return images.float() - (bgr_mean(images.device) if mean is None else mean)


@lru_cache(maxsize=None)
def bgr_mean(device: torch.device) -> torch.Tensor:
    """The mean as a (1, 3, 1, 1) tensor, made once per device (a new one per batch would be a
    blocking host-to-device copy on CUDA); a normal tensor even when first made under
    ``torch.inference_mode``, so training can use it too."""
    with torch.inference_mode(False):
        return torch.tensor(BGR_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
