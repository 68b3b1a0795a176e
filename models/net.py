"""Building blocks of RetinaFace: MobileNetV1x0.25, FPN and SSH context modules, backbones.

Module and parameter names follow biubug6/Pytorch_Retinaface exactly, so its published
checkpoints load with ``strict=True``. Facts of that model kept here: LeakyReLU(0.1) in FPN/SSH
when ``out_channels <= 64`` else ReLU (LeakyReLU with slope 0); nearest-neighbour upsampling to
the finer level's size.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import models as tv_models
from torchvision.models._utils import IntermediateLayerGetter


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    """3x3 conv (no bias) + BN + LeakyReLU(leaky); ``leaky=0`` is a ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
    )


def conv_bn1x1(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, stride, padding=0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    """Depthwise-separable conv: 3x3 depthwise + BN + act, 1x1 pointwise + BN + act."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _leaky_slope(out_channels: int) -> float:
    return 0.1 if out_channels <= 64 else 0.0


class MobileNetV1(nn.Module):
    """MobileNetV1 with width 0.25 as used by RetinaFace (stages of stride 8, 16, 32)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1),
            conv_dw(8, 16, 1),
            conv_dw(16, 32, 2),
            conv_dw(32, 32, 1),
            conv_dw(32, 64, 2),
            conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            conv_dw(64, 128, 2),
            *[conv_dw(128, 128, 1) for _ in range(5)],
        )
        self.stage3 = nn.Sequential(
            conv_dw(128, 256, 2),
            conv_dw(256, 256, 1),
        )
        self.avg = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.avg(x), 1))


class SSH(nn.Module):
    """Single Stage Headless context module: parallel 3x3, 5x5 (2x3x3) and 7x7 (3x3x3) branches
    with out_channels/2, /4, /4 channels, concatenated and ReLU'd."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"SSH out_channels must be a multiple of 4, got {out_channels}")
        leaky = _leaky_slope(out_channels)
        self.conv3X3 = conv_bn_no_relu(in_channels, out_channels // 2)
        self.conv5X5_1 = conv_bn(in_channels, out_channels // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn_no_relu(out_channels // 4, out_channels // 4)
        self.conv7X7_2 = conv_bn(out_channels // 4, out_channels // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn_no_relu(out_channels // 4, out_channels // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv3x3 = self.conv3X3(x)
        conv5x5_1 = self.conv5X5_1(x)
        conv5x5 = self.conv5X5_2(conv5x5_1)
        conv7x7 = self.conv7x7_3(self.conv7X7_2(conv5x5_1))
        return F.relu(torch.cat([conv3x3, conv5x5, conv7x7], dim=1))


class FPN(nn.Module):
    """Three-level feature pyramid (strides 8/16/32): 1x1 lateral convs, top-down nearest
    upsampling and 3x3 merge convs on the two finer levels."""

    def __init__(self, in_channels_list: list[int], out_channels: int) -> None:
        super().__init__()
        leaky = _leaky_slope(out_channels)
        self.output1 = conv_bn1x1(in_channels_list[0], out_channels, leaky=leaky)
        self.output2 = conv_bn1x1(in_channels_list[1], out_channels, leaky=leaky)
        self.output3 = conv_bn1x1(in_channels_list[2], out_channels, leaky=leaky)
        self.merge1 = conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        output1 = self.output1(features[0])
        output2 = self.output2(features[1])
        output3 = self.output3(features[2])
        up3 = F.interpolate(output3, size=output2.shape[-2:], mode="nearest")
        output2 = self.merge2(output2 + up3)
        up2 = F.interpolate(output2, size=output1.shape[-2:], mode="nearest")
        output1 = self.merge1(output1 + up2)
        return [output1, output2, output3]


RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


def backbone_channels(network: str) -> list[int]:
    """Channels of the three backbone outputs (strides 8, 16, 32) feeding the FPN."""
    if network == "mobilenet0.25":
        return [64, 128, 256]
    if network in ("resnet18", "resnet34"):
        return [128, 256, 512]
    if network in RESNET_DEPTHS:
        return [512, 1024, 2048]
    raise ValueError(f"unknown network {network!r}; expected mobilenet0.25 or one of {sorted(RESNET_DEPTHS)}")


def build_backbone(network: str, pretrained: bool = False,
                   backbone_weights: str | Path | None = None) -> IntermediateLayerGetter:
    """Backbone returning the stride-8/16/32 feature maps as an ordered dict.

    Nothing is downloaded unless ``pretrained=True`` for a ResNet (torchvision ImageNet weights,
    cached by torch hub). ``backbone_weights`` loads a local file instead: for mobilenet0.25 the
    published ``mobilenetV1X0.25_pretrain.tar`` (``{'state_dict': {'module.stage1...'}}``),
    for ResNets a torchvision-style state dict.
    """
    if network == "mobilenet0.25":
        backbone: nn.Module = MobileNetV1()
        return_layers = {"stage1": "1", "stage2": "2", "stage3": "3"}
        if pretrained and backbone_weights is None:
            raise ValueError("mobilenet0.25 has no downloadable ImageNet weights: pass "
                             "--backbone_weights path/to/mobilenetV1X0.25_pretrain.tar")
    elif network in RESNET_DEPTHS:
        weights = None
        if pretrained and backbone_weights is None:
            weights = tv_models.get_model_weights(network).IMAGENET1K_V1
        backbone = tv_models.get_model(network, weights=weights)
        return_layers = {"layer2": "1", "layer3": "2", "layer4": "3"}
    else:
        backbone_channels(network)  # raises the error naming the choices
        raise AssertionError("unreachable")
    if backbone_weights is not None:
        load_backbone_weights(backbone, backbone_weights)
    return IntermediateLayerGetter(backbone, return_layers)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from a local file into ``backbone`` (strictly, ``module.`` stripped).

    Raises :class:`~utils.errors.CheckpointError` (a ``RuntimeError``) naming ``path`` when the
    file is not a readable PyTorch state dict, ``RuntimeError`` (one line: how many tensors are
    missing, of another shape or unexpected) when its tensors are not exactly the backbone's.
    """
    from utils.checkpoint import key_mismatch, read_checkpoint, with_batchnorm_counters  # noqa: PLC0415 (cycle)
    from utils.errors import CheckpointError  # noqa: PLC0415

    checkpoint = read_checkpoint(path)  # one clear CheckpointError for text, truncated or foreign files
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state_dict = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v)
                             for k, v in state_dict.items())
    own = backbone.state_dict()
    state_dict = with_batchnorm_counters(state_dict, own)  # files of PyTorch < 0.4.1 (older downloads)
    missing, reshaped, unexpected = key_mismatch(state_dict, own)
    if missing or reshaped or unexpected:
        # counters are filled in when absent, so they are never missing: not counted among the tensors either
        needed = sum(not k.endswith(".num_batches_tracked") for k in own)
        found = [f"{len(missing)} of its {needed} tensors missing (e.g. {missing[0]})" if missing else "",
                 f"{len(reshaped)} of another shape (e.g. {reshaped[0]}: {tuple(state_dict[reshaped[0]].shape)} "
                 f"in the file, {tuple(own[reshaped[0]].shape)} here)" if reshaped else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""]
        detector = any(k.startswith(("body.", "fpn.", "ClassHead.")) for k in state_dict)
        raise RuntimeError(f"{path} does not hold {type(backbone).__name__} backbone weights: "
                           + ", ".join(part for part in found if part)
                           + ("; it looks like a detector checkpoint: fine-tune from it with --init_weights"
                              if detector else ""))
    backbone.load_state_dict(state_dict)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm (also SyncBatchNorm) folded into the
    convolution before it.

    Covers conv+BN pairs inside ``nn.Sequential`` (all RetinaFace blocks, ResNet downsampling) and
    the ``conv{i}``/``bn{i}`` attribute pairs of torchvision ResNets. The copy computes the same
    function with fewer operations; use it for inference only (its parameter names differ).
    """
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            children = list(module._modules)
            for first, second in zip(children, children[1:]):
                conv, bn = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                    module._modules[first] = fuse_conv_bn_eval(conv, bn)
                    module._modules[second] = nn.Identity()
        for index in (1, 2, 3):
            conv, bn = getattr(module, f"conv{index}", None), getattr(module, f"bn{index}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
                setattr(module, f"conv{index}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{index}", nn.Identity())
    return fused
