"""Training forward and backward passes replayed from CUDA graphs (``train.py --cuda_graphs true``).

mobilenet0.25's eager training step is paced by the host launching its kernels, not by the GPU: on
the H100 of 2026-11-27 a bf16 step of 32 images at 640 px took 27.8 ms while its kernels kept the
device busy for 17.6 ms, and the same step replayed from one CUDA graph took 16.9 ms (README, GPU
benchmarks). :func:`torch.cuda.make_graphed_callables` captures the network's forward pass and
its backward pass once, for the training batch shape; each step then replays two graphs instead
of launching every kernel. The loss (anchor matching, whose tensors change shape with the faces of
each batch) and the optimizer step stay eager.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from models.retinaface import RetinaFace, StageOutput

__all__ = ["GraphedTrainingNetwork"]


class _FlatOutputs(nn.Module):
    """``network`` with its outputs as one flat tuple of tensors (a graphed callable returns
    tensors only; a :class:`StageOutput` without an IoU head holds ``None``)."""

    def __init__(self, network: RetinaFace) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for stage in self.network(images) for t in stage if t is not None)


class GraphedTrainingNetwork(nn.Module):
    """``network`` for the training loop: in training mode its forward pass and, through autograd,
    its backward pass replay CUDA graphs captured for input batches of ``input_shape``
    ``(B, 3, H, W)``; in eval mode it runs eagerly. ``module`` is the network itself (where
    :func:`utils.train_utils.unwrap` and the loss look for it); saving, evaluation and the
    optimizer use the network's own parameters, which the graphs read and whose gradients they
    write.

    Capturing runs the network a few times on random input (cuDNN set-up, then the captures): the
    BatchNorm statistics it changes are put back, so training with graphs follows the same
    trajectory as training without. Single process, CUDA only; ``autocast_dtype`` is the training
    autocast (None: float32), recorded into the graphs."""

    def __init__(self, network: RetinaFace, input_shape: Sequence[int], channels_last: bool,
                 autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.module = network
        self.input_shape = tuple(int(size) for size in input_shape)
        device = next(network.parameters()).device
        # its own generator: capturing leaves the training's random streams as they were
        sample = torch.randn(self.input_shape, device=device, generator=torch.Generator(device).manual_seed(0))
        if channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        # make_graphed_callables requires the autocast cache off
        autocast = (torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False)
                    if autocast_dtype is not None else nullcontext())
        saved = [buffer.detach().clone() for buffer in network.buffers()]
        was_training = network.training
        network.train()
        # make_graphed_callables captures on the current GPU: the network's, whatever is current
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext(), autocast:
            with torch.no_grad():  # which outputs exist; no activations kept for a backward pass
                self._present = [[t is not None for t in stage] for stage in network(sample)]
            graphed = torch.cuda.make_graphed_callables(_FlatOutputs(network), (sample,), allow_unused_input=True)
        with torch.no_grad():
            for buffer, value in zip(network.buffers(), saved):
                buffer.copy_(value)
        network.train(was_training)
        # not a registered child: its parameters are the network's, and it stays in training mode
        # (the graphs were captured in training mode; eval mode takes the eager path below)
        object.__setattr__(self, "_graphed", graphed)

    def forward(self, images: torch.Tensor) -> list[StageOutput]:
        """Outputs as :meth:`RetinaFace.forward` returns them (one :class:`StageOutput` per stage)."""
        if not self.training:
            return self.module(images)
        if tuple(images.shape) != self.input_shape:
            raise ValueError(f"CUDA-graph training was captured for batches of shape {self.input_shape}, "
                             f"got {tuple(images.shape)}")
        flat = iter(self._graphed(images))
        return [StageOutput(*(next(flat) if present else None for present in stage)) for stage in self._present]
