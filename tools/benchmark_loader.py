"""What taking the training DataLoader's batches costs the training process's other threads.

Usage (from the repository root)::

    python tools/benchmark_loader.py [--dataset ../shared/data/widerface_sample] [--split val]
                                     [--batch_size 32] [--batches 16] [--workers 2] [--im_size 640]
                                     [--rounds 3] [--pin_memory auto|true|false|copy] [--seed 0]
                                     [--out FILE]

Every tensor a DataLoader worker returns reaches the training process as a shared-memory file
that the receiving thread opens, maps and later unmaps. On CUDA that thread is the pin-memory
thread, running beside the thread that launches the training step's kernels; a small network's
step is paced by those launches, so whatever the receiving thread does under the GIL is time the
step loses (on the 2-core CPU machine the main thread lost about as much time as the receiving
thread spent). Three ways of batching the same samples are compared in the same run, alternating
round by round:

* ``padded_kept``: :class:`utils.train_data.TrainBatchCollate`, what ``train.py`` uses: the
  workers pad the targets, so a batch is three objects (uint8 images, one padded target tensor
  and its mask, the load report), and keep their image batches alive until the training process
  is done with them, so that unmapping the shared memory falls to them (``keep`` here covers
  every batch a worker prepares in a round, as ``TRAIN_PREFETCH_FACTOR`` + 2 does in training;
  the workers' own unmapping then happens when the round ends, outside the timed window: in
  training it happens in the workers, on their own cores where the machine has one per worker);
* ``padded``: :func:`utils.train_data.collate_with_report`, the same batches without keeping;
* ``per_image``: the same images and report, the targets left as one tensor per image (how
  training batches were built before, and what the public code's collate returns).

For each, the workers first prepare every batch (nothing below waits for decoding or
augmentation); then a second thread takes them from the loader while the main thread runs a loop
of small tensor operations, a stand-in for launching a step's kernels. With ``--pin_memory``
(default: when CUDA is available, as train.py) the receiving thread also copies each batch into
pinned memory, as the pin-memory thread does. Reported per batch (median
over rounds): the receiving thread's CPU time and the main thread's lost time, the drain's wall
time minus the loop iterations done during it divided by the loop's idle rate.

Prints one JSON line (``--out``: also appended to a file; ``tools/speed_table.py`` renders it).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tools import check_inputs, shared_root  # noqa: E402
from tools.benchmark_train import RepeatDataset  # noqa: E402
from utils.data_loaders import dataset_from_root  # noqa: E402
from utils.image_loader import start_loader  # noqa: E402
from utils.train_data import (  # noqa: E402
    EpochSeededDataset, LoadReport, ResumableSampler, TrainBatchCollate, collate_with_report, train_transform,
)

DEFAULT_DATASET = shared_root() / "data" / "widerface_sample"
#: The batchings compared (module doc), train.py's first.
COLLATES = ("padded_kept", "padded", "per_image")
#: Small-operation loop iterations between two looks at the receiving thread.
_LOOP_CHUNK = 50


def collate_per_image(batch: list) -> tuple[Any, list[torch.Tensor], LoadReport]:
    """:func:`collate_with_report` with the targets left as a list of ``(K_i, 15)`` tensors."""
    from utils.data_loaders import detection_collate

    images, targets = detection_collate([(image, target) for image, target, _ in batch])
    return images, targets, LoadReport.merge([report for _, _, report in batch])


class CountedSamples(Dataset):
    """``dataset`` that counts the samples its workers have finished (a counter shared with the
    forked workers), so that the caller can wait until every batch is prepared."""

    def __init__(self, dataset: Dataset, counter) -> None:
        self.dataset, self.counter = dataset, counter

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        with self.counter.get_lock():
            self.counter.value += 1
        return sample


def pinned(batch: Any, copy_only: bool = False) -> Any:
    """``batch`` with its tensors copied to pinned memory, as the DataLoader's pin-memory thread
    does (tuples, named tuples and lists are rebuilt; objects with ``pin_memory``, such as
    ``DeferredBatch``, pin themselves). ``copy_only``: plain copies (``clone``), the same memory
    traffic without CUDA, for a CPU-only machine."""
    if isinstance(batch, torch.Tensor):
        return batch.clone() if copy_only else batch.pin_memory()
    if hasattr(batch, "pin_memory") and not copy_only:
        return batch.pin_memory()
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(pinned(item, copy_only) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(pinned(item, copy_only) for item in batch)
    return batch


def small_operations(tensor: torch.Tensor, until: Callable[[], bool]) -> int:
    """Run in-place operations on ``tensor`` until ``until()``; returns how many ran."""
    count = 0
    while not until():
        for _ in range(_LOOP_CHUNK):
            tensor.add_(1.0).mul_(0.5)
        count += 2 * _LOOP_CHUNK
    return count


def idle_rate(seconds: float = 1.0) -> float:
    """Small operations per second of the main thread with nothing else running."""
    tensor = torch.zeros(16)
    start = time.perf_counter()
    count = small_operations(tensor, lambda: time.perf_counter() - start >= seconds)
    return count / (time.perf_counter() - start)


def measure(dataset: Dataset, collate_name: str, args: argparse.Namespace, rate: float) -> dict[str, float]:
    """One round: prepare every batch, then drain them in a thread beside the small-operation loop."""
    counter = multiprocessing.Value("q", 0)
    total = args.batch_size * args.batches
    per_worker = math.ceil(args.batches / args.workers)
    collate = {"padded_kept": TrainBatchCollate(keep=per_worker + 2), "padded": collate_with_report,
               "per_image": collate_per_image}[collate_name]
    sampler = ResumableSampler(total, 1, 0, shuffle=True, seed=args.seed)
    loader = DataLoader(CountedSamples(EpochSeededDataset(RepeatDataset(dataset, total), args.seed, report=True),
                                       counter),
                        batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=collate,
                        drop_last=True, prefetch_factor=per_worker + 1)
    iterator = start_loader(loader)
    deadline = time.perf_counter() + 600
    while counter.value < total:
        if time.perf_counter() > deadline:
            raise SystemExit("benchmark_loader: the workers did not prepare the batches within 600 s")
        time.sleep(0.05)
    time.sleep(1.0)  # the last batches' collate and hand-over to the queue

    received = []
    cpu = {}

    def drain() -> None:
        start = time.thread_time()
        for batch in iterator:
            if args.pin_memory:
                batch = pinned(batch, copy_only=args.pin_memory == "copy")
            received.append(len(batch[0]))
            del batch  # the receiving thread's reference ends here, as in the pin-memory thread
        cpu["seconds"] = time.thread_time() - start

    thread = threading.Thread(target=drain)
    tensor = torch.zeros(16)
    start = time.perf_counter()
    thread.start()
    count = small_operations(tensor, lambda: not thread.is_alive())
    wall = time.perf_counter() - start
    thread.join()
    if len(received) != args.batches:
        raise SystemExit(f"benchmark_loader: received {len(received)} batches, expected {args.batches}")
    return {"receiving_thread_cpu_ms_per_batch": cpu["seconds"] * 1000 / args.batches,
            "main_thread_lost_ms_per_batch": (wall - count / rate) * 1000 / args.batches,
            "drain_ms_per_batch": wall * 1000 / args.batches}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="dataset root with <split>/label.txt and <split>/images (default: %(default)s)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=16, help="batches per round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--im_size", type=int, default=640)
    parser.add_argument("--augment_on", choices=("workers", "device"), default="workers")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per collate, alternating")
    parser.add_argument("--pin_memory", choices=("auto", "true", "false", "copy"), default="auto",
                        help="pin the batches in the receiving thread (auto: when CUDA is available, as train.py; "
                             "copy: plain copies instead, the same memory traffic without CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    check_inputs("benchmark_loader.py", out=args.out)
    if args.workers < 1 or args.batches < 1 or args.batch_size < 1 or args.rounds < 1:
        parser.error("--workers, --batches, --batch_size and --rounds must be at least 1")
    if not (args.dataset / args.split / "label.txt").is_file():
        parser.error(f"no {args.dataset / args.split / 'label.txt'} (--dataset, --split)")
    if args.pin_memory == "auto":
        args.pin_memory = torch.cuda.is_available()
    elif args.pin_memory != "copy":
        args.pin_memory = args.pin_memory == "true"
    if args.pin_memory is True and not torch.cuda.is_available():
        parser.error("--pin_memory true needs CUDA (--pin_memory copy: the same copies without it)")
    torch.set_num_threads(1)

    dataset = dataset_from_root(args.dataset, args.split, train_transform(args.im_size, args.seed, args.augment_on))
    rate = idle_rate()
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in COLLATES}
    for _ in range(args.rounds):
        for name in COLLATES:
            rounds[name].append(measure(dataset, name, args, rate))
    results = {name: {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
               for name, runs in rounds.items()}
    lost = {name: results[name]["main_thread_lost_ms_per_batch"] for name in results}
    report = {
        "benchmark": "loader",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python tools/benchmark_loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "env": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.machine(),
                "cpu_count": multiprocessing.cpu_count(),
                "device": f"host of {torch.cuda.get_device_name(0)}, {multiprocessing.cpu_count()} cores"
                          if torch.cuda.is_available() else f"cpu ({platform.machine()}, "
                                                            f"{multiprocessing.cpu_count()} cores)"},
        "settings": {"dataset": str(args.dataset / args.split), "batch_size": args.batch_size,
                     "batches": args.batches, "workers": args.workers, "im_size": args.im_size,
                     "augment_on": args.augment_on, "rounds": args.rounds, "pin_memory": args.pin_memory,
                     "idle_small_ops_per_s": round(rate)},
        "results": results,
        "main_thread_lost_ratio_per_image_to_padded_kept": round(lost["per_image"] / max(lost["padded_kept"], 1e-9), 2),
        "main_thread_lost_ratio_padded_to_padded_kept": round(lost["padded"] / max(lost["padded_kept"], 1e-9), 2),
    }
    line = json.dumps(report)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return report


if __name__ == "__main__":
    main()
