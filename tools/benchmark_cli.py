"""test.py end to end in fresh processes, as a user meets a data set, against the public-style pipeline.

    python tools/benchmark_cli.py --device cuda [--dataset DIR] [--weights FILE] [--layouts auto,true,false]
                                  [--extra "--pad_to 128 --batch_size 8"] [--out bench_out/cli.jsonl]

A data set of many image sizes (WIDER val) reaches a fresh process size after size, so every
cold-start cost (CUDA context, cuDNN plans or autotuning per new input shape, graph capture) is
paid inside the pass. This benchmark runs, each in a new process, one pass of the public-style
pipeline (``tools/public_pipeline.py``: cuDNN autotuning on, as the public ``test_widerface.py``
sets it) and ``test.py`` on the same images for each ``--channels_last`` setting and each
``--extra`` set of options (default: ``--pad_to 128 --batch_size 8``, padded batches of few canvas
shapes, so that fewer shapes are new to the process). The public pass times decoding and
detection after the model is loaded; test.py's ``seconds`` is its own pass (decoding in workers,
detection, writing the prediction files), also after loading. ``process_s`` is each process's
whole wall time, start-up and evaluation included. Process timings are noisy: ``--rounds``
(default 2) runs the public pass and the settings again in reverse order (the public pass first,
then last: a cold page cache or GPU start falls on each side once), and each of them, the public
pass included, reports its fastest round (all rounds are kept in ``rounds_ms_per_img``). An
interrupt (tools/gpu_check.sh's time limit) still prints what was measured.

Prints ONE JSON line (device, torch version, date, command, the measurements); ``--out FILE``
appends it to FILE; ``tools/speed_table.py`` renders it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.benchmark_inference import (MOBILENET_WEIGHTS, SHARED, finish_report, report_header,  # noqa: E402
                                       rnd, setup_device)

DATASET = SHARED / "data" / "widerface_sample"


def run_process(command: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """``command`` run from the repository root; its result and wall seconds. Its output is passed
    through to this process's stderr (tools/gpu_check.sh keeps it in the log)."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
    return result, seconds


def measure_public(args: argparse.Namespace) -> dict[str, Any]:
    result, seconds = run_process([sys.executable, "tools/public_pipeline.py", args.weights, args.dataset,
                                   args.device], args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"tools/public_pipeline.py exited {result.returncode}: {result.stderr.strip()[-300:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "process_s": rnd(seconds)}


def fastest_rounds(runs: list[dict[str, Any]], public_ms: float | None) -> list[dict[str, Any]]:
    """One entry per pipeline (first-seen order): its fastest round, with every round's ms/img
    and its speed-up over ``public_ms`` (None without it)."""
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        kept = best.setdefault(run["pipeline"], {**run, "rounds_ms_per_img": []})
        kept["rounds_ms_per_img"].append(run["ms_per_img"])
        if run["ms_per_img"] < kept["ms_per_img"]:
            best[run["pipeline"]] = {**run, "rounds_ms_per_img": kept["rounds_ms_per_img"]}
    for entry in best.values():
        entry["speedup_vs_public"] = rnd(public_ms / entry["ms_per_img"]) if public_ms else None
    return list(best.values())


def settings(args: argparse.Namespace) -> list[list[str]]:
    """The test.py options of each setting: one per ``--layouts`` value, then one per ``--extra``."""
    layouts = [["--channels_last", value.strip()] for value in args.layouts.split(",") if value.strip()]
    return layouts + [shlex.split(extra) for extra in args.extra if extra.strip()]


def measure_test_py(args: argparse.Namespace, options: list[str], results_dir: Path) -> dict[str, Any]:
    pipeline = shlex.join(["test.py", *options])
    result, seconds = run_process([sys.executable, "test.py", "--weights", args.weights, "--dataset", args.dataset,
                                   "--gt_dir", args.gt_dir, "--device", args.device, "--workers", str(args.workers),
                                   *options, "--results_dir", str(results_dir)], args.timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{pipeline} exited {result.returncode}: {result.stderr.strip()[-300:]}")
    found = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    images = found["num_images"]
    layout = options[options.index("--channels_last") + 1] if "--channels_last" in options else "auto"
    return {"pipeline": pipeline, "channels_last": layout, "images": images,
            "seconds": rnd(found["seconds"]), "ms_per_img": rnd(found["seconds"] / images * 1000),
            "process_s": rnd(seconds), "aps": {k: rnd(found[k]) for k in ("easy", "medium", "hard")}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default cuda)")
    parser.add_argument("--dataset", default=str(DATASET), help="folder with val/images and val/label.txt")
    parser.add_argument("--gt_dir", default=None, help="official ground truth (default <dataset>/ground_truth)")
    parser.add_argument("--weights", default=str(MOBILENET_WEIGHTS), help="checkpoint (default: published mobilenet0.25)")
    parser.add_argument("--layouts", default="auto,true,false", help="--channels_last settings, one process each")
    parser.add_argument("--extra", action="append", default=None,
                        help="another setting: test.py options in one string (repeatable; default "
                             "'--pad_to 128 --batch_size 8'; '' for none)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the settings (every other one reversed)")
    parser.add_argument("--workers", type=int, default=2, help="test.py --workers")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per process")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (Path(args.dataset) / "val" / "images").is_dir():
        parser.error(f"--dataset: no val/images/ folder in {args.dataset}")
    # the child processes run in the repository root: paths as the caller meant them
    args.dataset = str(Path(args.dataset).resolve())
    args.weights = str(Path(args.weights).resolve())
    args.gt_dir = str(Path(args.gt_dir or Path(args.dataset) / "ground_truth").resolve())
    if args.extra is None:
        args.extra = ["--pad_to 128 --batch_size 8"]
    device = setup_device(args.device, None, args.out)  # the header's device facts; the work runs in child processes
    report = report_header("cli", "tools/benchmark_cli.py", argv, device)
    report.update(weights=args.weights, dataset=args.dataset, rounds=args.rounds, public_style=None, test_py=[])
    notes: list[str] = []
    errors: list[str] = []
    runs: list[dict[str, Any]] = []
    public_runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            order: list[tuple[int, list[str] | None]] = [(-1, None)] + list(enumerate(settings(args)))
            for round_index in range(args.rounds):
                for index, options in order if round_index % 2 == 0 else order[::-1]:
                    try:
                        if options is None:
                            public_runs.append(measure_public(args))
                        else:
                            runs.append(measure_test_py(args, options, Path(scratch) / f"{index}_{round_index}"))
                    except Exception as error:
                        name = "public-style" if options is None else shlex.join(["test.py", *options])
                        errors.append(f"{name}: {type(error).__name__}: {error}")
    except KeyboardInterrupt:  # timeout --signal=INT in tools/gpu_check.sh: keep what was measured
        report["interrupted"] = True
        notes.append("interrupted (SIGINT): partial results")
    public = fastest_rounds(public_runs, None)
    report["public_style"] = {k: v for k, v in public[0].items() if k != "speedup_vs_public"} if public else None
    report["test_py"] = fastest_rounds(runs, (report["public_style"] or {}).get("ms_per_img"))
    return finish_report(report, notes, errors, started, args.out)


if __name__ == "__main__":
    report = main()
    sys.exit(1 if report["errors"] or report.get("interrupted") else 0)
