"""Where a training process runs: one process, or one per GPU under ``torchrun`` (DDP; NCCL on
CUDA, gloo on the CPU; any number of nodes). :func:`setup_distributed` is the one set-up helper."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import TrainingSetupError

__all__ = ["DistInfo", "setup_distributed", "check_ranks_agree", "cleanup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: ``rank``/``world_size`` (1 when not distributed), ``local_rank``
    (GPU index on this node), ``device``, ``distributed`` (a process group was initialised)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None, gpu_num: int = 0) -> DistInfo:
    """The one distributed set-up helper.

    Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment; works across nodes) it joins the
    process group: NCCL with one GPU per process (``cuda:<LOCAL_RANK>``) when CUDA is available
    and ``device`` is not ``cpu``, otherwise gloo on the CPU. Without ``torchrun`` it only
    resolves ``device`` (``cpu``, ``cuda``, ``cuda:N``; default CUDA ``gpu_num`` when available) and
    makes it the current GPU: what works on the current GPU (CUDA-graph capture, streams, events)
    then works on the training one.
    """
    from models.detector import resolve_device, use_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        try:
            run_device = resolve_device(device, gpu_num)
        except ValueError as error:
            raise TrainingSetupError(str(error)) from None
        use_device(run_device)
        return DistInfo(device=run_device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise TrainingSetupError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on "
                                     f"this node: lower --nproc_per_node")
        run_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(run_device)
        backend = "nccl"
    else:
        if device is not None and device.startswith("cuda"):
            raise TrainingSetupError(f"--device {device} requested but CUDA is not available")
        run_device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": run_device} if use_cuda else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=run_device, distributed=True)


def check_ranks_agree(info: DistInfo, evaluates: bool, dataset_size: int) -> None:
    """Every rank must evaluate (or not) and see the same training set: otherwise their
    collectives mismatch and the job hangs (e.g. a node without the val set)."""
    values = torch.tensor([int(evaluates), 1 - int(evaluates), dataset_size, -dataset_size], device=info.device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    every, none, smallest, largest = values[0].item(), values[1].item(), values[2].item(), -values[3].item()
    if not (every or none):
        raise TrainingSetupError("the val set or its ground truth is visible to some processes only: every node "
                                 "needs --val_dataset and --gt_dir at the same paths (or use --eval_every 0)")
    if smallest != largest:
        raise TrainingSetupError(f"the processes see different training sets ({smallest} to {largest} images): "
                                 "every node needs the same --dataset")


def cleanup_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
