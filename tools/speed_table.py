"""Markdown speed tables from the JSON lines of tools/benchmark_inference.py,
tools/benchmark_train.py and tools/benchmark_cli.py (for the README's GPU benchmarks section).

    python tools/speed_table.py bench_out/inference.jsonl bench_out/train.jsonl bench_out/cli.jsonl [--latest] [--out FILE]

Every line becomes a section with its device, torch version, date and command; ``--latest``
keeps only the last line of each benchmark. A final table checks the issue's targets against
the numbers found (fastest variant whose fidelity check passed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]

#: The issue's targets (H200, torch 2.11).
TARGETS = {
    "resnet50_cascade_bs32_img_per_s": 1500.0,
    "mobilenet_img_per_s": 5000.0,
    "resnet50_cascade_bs1_latency_ms": 4.0,
    "sample_speedup_vs_public": 50.0,
    "train_ratio_vs_public_reference": 2.5,
    "real_ratio_to_fixed": 0.9,
}


def read_reports(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The benchmark reports of JSON-lines files (``-``: stdin), each tagged with its file as ``_file``."""
    reports = []
    for path in paths:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise SystemExit(f"speed_table.py: error: cannot read {path}: {error.strerror or error}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:  # e.g. a line cut by a killed process: the others still count
                print(f"speed_table.py: warning: {path}:{number}: not a JSON line, left out ({error})", file=sys.stderr)
                continue
            if isinstance(record, dict) and record.get("benchmark") in SECTIONS:
                reports.append({**record, "_file": path})
    for report in (r for r in reports if r["benchmark"] == "train"):
        unsummarised = [c for c in report.get("configs", []) if "summary" not in c]
        if unsummarised:  # a config cut short by an interruption, from before benchmark_train summarised those
            if str(REPO) not in sys.path:
                sys.path.insert(0, str(REPO))
            from tools.benchmark_train import summarise_config
            for config in unsummarised:
                summarise_config(config)
    return reports


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, (int, float)):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1 or value == 0:
            return f"{value:.{digits}f}"
        return f"{value:.{digits + 1}f}" if abs(value) >= 0.01 else f"{value:.2g}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |" for row in rows]
    return lines


def heading(report: dict[str, Any], title: str) -> list[str]:
    env = report.get("env", {})
    device = env.get("device", "?")
    facts = [f"device **{device}**", f"torch {env.get('torch', '?')}"]
    if env.get("cuda"):
        facts.append(f"CUDA {env['cuda']}, cuDNN {env.get('cudnn')}")
    if env.get("cuda_alloc_conf"):
        facts.append(f"PYTORCH_CUDA_ALLOC_CONF={env['cuda_alloc_conf']}")
    facts.append(f"date {report.get('date', '?')}")
    lines = [f"### {title}", "", ", ".join(facts), "", f"`{report.get('command', '')}`", ""]
    if report.get("notes"):
        lines += [f"- note: {n}" for n in report["notes"]] + [""]
    if report.get("errors"):
        lines += [f"- **error**: {e}" for e in report["errors"]] + [""]
    return lines


def fidelity_cell(entry: dict[str, Any]) -> str:
    fid = entry.get("fidelity")
    if not fid:
        return "reference" if entry.get("variant") == "ref" else "–"
    bad = fid["unmatched_reference"] + fid["unmatched_candidate"]
    ties = fid.get("nms_near_ties")  # reports since 2026-11-27: how many of them NMS near-ties explain
    explained = f", {ties['near_ties']} of them NMS near-ties" if ties else ""
    cell = f"{'ok' if fid['passed'] else '**FAIL**'} ({bad}/{fid['compared']} unmatched{explained})"
    dense = entry.get("dense_fidelity")
    if dense:  # before NMS, prior by prior (reports since 2026-11-26 evening)
        cell += f"; per prior {'ok' if dense['passed'] else 'FAIL'} ({dense['disagreeing']}/{dense['priors']})"
    return cell


def inference_section(report: dict[str, Any]) -> list[str]:
    lines = heading(report, "Inference (tools/benchmark_inference.py)")
    settings = report.get("settings", {})
    size = settings.get("size", ["?", "?"])
    lines += [f"End to end at {size[0]}×{size[1]} ({settings.get('content', '?')} content, confidence "
              f"{settings.get('confidence_threshold')}): pinned uint8 batch → device copy → preprocess → forward → "
              f"decode → NMS → detections on the host; median of {settings.get('iters')} synchronised batches.", ""]
    rows = []
    for e in report.get("synthetic", []):
        if "error" in e:
            rows.append([e["model"], str(e["batch"]), e["variant"], "error", "", "", "", e["error"][:60]])
            continue
        if "latency_ms" not in e:
            continue
        st = e.get("stages_ms", {})
        syncs = e.get("syncs_per_batch")
        stages = " / ".join(fmt(st.get(k), 2) for k in ("h2d", "network", "postprocess"))
        streamed = e.get("stream_images_per_s")
        if e.get("stream_serial_images_per_s") is not None:  # runs since 2026-11-27: queued ahead, then serial
            streamed = f"{fmt(streamed)} (serial {fmt(e['stream_serial_images_per_s'])})"
        rows.append([e["model"], str(e["batch"]), e["variant"], e["images_per_s"], streamed,
                     f"{fmt(e['latency_ms']['median'], 2)} / {fmt(e['latency_ms']['p90'], 2)}",
                     stages + (f" ({syncs['count']} syncs)" if syncs else ""), fidelity_cell(e)])
    lines += table(["model", "batch", "variant", "img/s", "img/s streamed", "latency ms (median / p90)",
                    "h2d / network / post ms", "fidelity vs fp32 ref"], rows) + [""]
    sample = report.get("sample")
    if sample:
        lines += [f"Sample WIDER images ({sample['images']} images, {sample['distinct_sizes']} sizes, original size, "
                  f"published mobilenet0.25, confidence {sample['confidence_threshold']}); decoded images in, disk "
                  f"reading {fmt(sample.get('read_image_ms_per_img'), 2)} ms/img not included.", ""]
        public = sample.get("public_style", {})
        steps = ", ".join(f"{k} {fmt(v, 2)}" for k, v in public.get("steps_ms_per_img", {}).items())
        rows = [["public-style per image", public.get("ms_per_img"), public.get("images_per_s"), 1.0, steps]]
        def with_stages(row: dict[str, Any]) -> str:
            stages = ", ".join(f"{k} {fmt(ms, 2)}" for k, ms in (row.get("stages_ms_per_img") or {}).items())
            return fidelity_cell(row) + (f" / {stages}" if stages else "")

        for v in sample.get("variants", []):
            rows.append([f"ours {v['variant']}", v.get("ms_per_img"), v.get("images_per_s"),
                         v.get("speedup_vs_public"), v.get("error") or with_stages(v)])
        for key, api in sample.items():  # face_detector_api, _padded, and their _nhwc rows where measured
            if key.startswith("face_detector_api") and api:
                call = f"FaceDetector.{'submit, queued ahead' if api.get('mode') else 'detect'}"
                rows.append([f"{call} ({api['settings']})", api["ms_per_img"], api["images_per_s"],
                             api["speedup_vs_public"], with_stages(api)])
        lines += table(["pipeline", "ms/img", "img/s", "× public-style", "fidelity vs fp32 ref / steps ms"], rows)
        ref_public = sample.get("fidelity_reference_vs_public")
        if ref_public:
            lines += ["", f"fp32 reference vs public-style pipeline: {fidelity_cell({'fidelity': ref_public})}."]
        fresh = sample.get("new_sizes")
        if fresh:
            lines += ["", f"Sizes not run before ({fresh['images_per_pass']} images per pass, {fresh['passes']} pass(es), "
                          "each image a few rows shorter than any size run so far): the public-style pipeline "
                          "with cuDNN autotuning, as its test_widerface.py; FaceDetector in the settings of each "
                          "row (cuDNN autotuning off unless the row says so).", ""]
            rows = [["public-style per image (autotuning each new size)", "NCHW", fresh["public_style"]["ms_per_img"],
                     1.0]]
            rows += [[f"FaceDetector, {o['pipeline']}" + (f" (first pass, CUDA graphs captured: "
                                                            f"{o['first_pass_ms_per_img']} ms/img)"
                                                            if "first_pass_ms_per_img" in o else ""),
                      layout_cell(o), o["ms_per_img"], o["speedup_vs_public"]]
                     for o in fresh["ours"]]
            lines += table(["pipeline, new sizes", "layout", "ms/img", "× public-style"], rows)
            others = fresh.get("other_models") or []
            if others:
                lines += ["", "The same pass for other networks (random weights, timing only):", ""]
                rows = [[o["model"], f"FaceDetector, {p['pipeline']}", layout_cell(p), p["ms_per_img"]]
                        for o in others for p in o.get("ours", [])]
                rows += [[o["model"], "–", "–", o["error"]] for o in others if o.get("error")]
                lines += table(["model", "pipeline, new sizes", "layout", "ms/img"], rows)
        lines.append("")
    return lines


def cli_section(report: dict[str, Any]) -> list[str]:
    lines = heading(report, "Command line in fresh processes (tools/benchmark_cli.py)")
    lines += [f"One pass over {report.get('dataset')} per process, every image size new to the process: the "
              "public-style pipeline (cuDNN autotuning on, as its test_widerface.py) and test.py per "
              "setting (--channels_last, padded batches); ms/img of the pass after loading the model (each "
              "the fastest of its rounds), process s the whole process.", ""]
    public = report.get("public_style") or {}
    rows = [["public-style one pass", public.get("ms_per_img"), 1.0, public.get("process_s"), "–"]] if public else []
    rows += [[t["pipeline"], t["ms_per_img"], t.get("speedup_vs_public"), t["process_s"],
              " / ".join(f"{t['aps'][k]:.4f}" for k in ("easy", "medium", "hard"))] for t in report.get("test_py", [])]
    lines += table(["pipeline", "ms/img", "× public-style", "process s", "AP easy / medium / hard"], rows)
    lines += [f"- error: {e}" for e in report.get("errors", [])]
    lines.append("")
    return lines


def nms_section(report: dict[str, Any]) -> list[str]:
    lines = heading(report, "Post-processing per NMS chunk size (tools/benchmark_nms.py)")
    settings = report.get("settings", {})
    size = "×".join(str(v) for v in settings.get("size", []))
    lines += [f"{settings.get('model')} ({settings.get('weights')}), one batch of {settings.get('batch')} "
              f"sample-content images at {size}: threshold, top-k, NMS, keep-top-k and the copy of the detections "
              f"to the host; median of {settings.get('iters')}.", ""]
    rows = [[case["threshold"], case["candidates"], case["candidates_max_image"], case.get("detections"),
             entry["chunk"] or "one call", entry["ms"].get("median"), "yes" if entry["same_detections"] else "**no**"]
            for case in report.get("cases", []) for entry in case["chunks"]]
    lines += table(["confidence", "candidates", "max per image", "detections", "chunk", "ms", "same detections"],
                   rows)
    lines.append("")
    return lines


def matching_section(report: dict[str, Any]) -> list[str]:
    lines = heading(report, "Anchor matching of real training batches (tools/benchmark_matching.py)")
    settings = report.get("settings", {})
    anchors = ("jittered anchors per image (refine cascade, stage 2)" if settings.get("per_image_anchors")
               else "anchors (the priors)")
    lines += [f"{settings.get('batches')} real batches of {settings.get('batch')} at {settings.get('size')} px "
              f"against {settings.get('anchors')} {anchors}: the faces' IoU in one (faces, anchors) tensor (ours) against "
              f"the padded (batch, most faces, anchors) tensor; ms per batch, mean of {settings.get('iters')}.", ""]
    rows = [[str(r["faces"]), str(r["most_faces_per_image"]), r["ours_ms"], r["padded_ms"], f"{fmt(r['speedup'])}×",
             fmt(r["identical"])] for r in report.get("batches", [])]
    lines += table(["faces", "most per image", "ours ms", "padded ms", "speed-up", "identical"], rows)
    summary = report.get("summary") or {}
    lines += ["", f"All batches: {fmt(summary.get('total_speedup'))}× (sum of padded times over sum of ours).", ""]
    return lines


PINNING = {True: "yes", False: "no", "copy": "plain copies instead"}


def loader_section(report: dict[str, Any]) -> list[str]:
    lines = heading(report, "Taking batches from the training DataLoader (tools/benchmark_loader.py)")
    settings = report.get("settings", {})
    pinning = PINNING.get(settings.get("pin_memory"), "no")
    lines += [f"{settings.get('batches')} prepared batches of {settings.get('batch_size')} at "
              f"{settings.get('im_size')} px from {settings.get('workers')} workers (pinned: {pinning}), taken by a "
              "second thread while the main thread runs small tensor operations; ms per batch, median of "
              f"{settings.get('rounds')} rounds.", ""]
    names = {"padded_kept": "targets padded, image batches kept by the workers (train.py)",
             "padded": "targets padded in the workers", "per_image": "one target tensor per image"}
    rows = [[names.get(name, name), r.get("main_thread_lost_ms_per_batch"), r.get("receiving_thread_cpu_ms_per_batch"),
             r.get("drain_ms_per_batch")] for name, r in report.get("results", {}).items()]
    lines += table(["batches", "main thread lost", "receiving thread CPU", "drain wall"], rows)
    lines.append("")
    return lines


def layout_cell(pipeline: dict[str, Any]) -> str:
    """NHWC / NCHW of a new-size pipeline entry ("–" for results recorded before the field)."""
    value = pipeline.get("channels_last")
    return "–" if value is None else ("NHWC" if value else "NCHW")


def augment_place(mode: str) -> str:
    """A benchmark_train ``--augment_on`` mode in words: ``device+compile`` -> ``device, compiled``."""
    return "device, compiled" if mode == "device+compile" else mode


def issue_note(preparation: dict[str, Any]) -> str:
    """How long the host took to launch the pixel work of a prepared batch (reports before
    2026-11-27 lack it)."""
    median = (preparation.get("pixels_issue_ms") or {}).get("median")
    return "" if median is None else f", launched by the host in {fmt(median)} ms"


def train_section(report: dict[str, Any]) -> list[str]:
    lines = heading(report, "Training (tools/benchmark_train.py)")
    settings = report.get("settings", {})
    lines += [f"Model + loss + optimizer step; {settings.get('iters')} timed steps after {settings.get('warmup')} "
              f"warm-up steps; real pipeline with {settings.get('workers')} workers on {settings.get('dataset')}"
              + (f", {settings['real_iters']} timed steps after the loader's queue is drained" if settings.get("real_iters")
                 else "") + ".", ""]
    rows = []
    for config in report.get("configs", []):
        summary = config.get("summary", {})
        public = summary.get("public_style_img_per_s")
        for v in config.get("variants", []):
            if "error" in v:
                rows.append([config["config"], v["variant"], v["mode"], "error", "", "", "", "", v["error"][:60]])
                continue
            mem = v.get("max_memory_allocated_mib")
            syncs = v.get("syncs_per_step")
            mode = (f"real, augment on {augment_place(v['augment_on'])}" if v["mode"] == "real" and "augment_on" in v
                    else v["mode"])
            if v.get("busy_processes"):
                mode = f"fixed, {v['busy_processes']} busy CPU processes"
            if v.get("most_faces_per_batch"):
                mode += f" (most faces per image {min(v['most_faces_per_batch'])}–{max(v['most_faces_per_batch'])})"
            if v["mode"] == "real" and v.get("data_wait_share") is not None:
                mode += f" (waits for data {100 * v['data_wait_share']:.0f} % of the time)"
            rows.append([config["config"], v["variant"], mode, v.get("img_per_s"),
                         v.get("step_ms", {}).get("median"), mem / 1024 if mem else None,
                         v["img_per_s"] / public if public and v.get("img_per_s") else None,
                         v.get("ratio_to_fixed"), syncs["count"] if syncs else "–"])
        for augment_on, loader in (config.get("loader_only") or {}).items():
            share = "decode + crop" if augment_on.startswith("device") else "decode + augmentation"
            rows.append([config["config"], "loader only", f"{loader.get('workers')} workers: {share}",
                         loader.get("img_per_s"), loader.get("step_ms", {}).get("median"), None, None, None, "–"])
    lines += table(["config", "variant", "mode", "img/s", "step ms", "peak GiB", "× public-style",
                    "× fixed batches", "syncs/step"], rows) + [""]
    checks = [f"- {c['config']}: public-style loss vs MultiBoxLoss relative difference "
              f"{fmt(c['loss_check'].get('protocol_rel_diff'), 2)} (protocol), "
              f"{fmt(c['loss_check'].get('public_exact_rel_diff'), 2)} (public exact)"
              for c in report.get("configs", []) if c.get("loss_check")]
    for c in report.get("configs", []):
        busy = [f"{fmt(c[key]['busy_ms_per_step'])} ms per step over {what}"
                for key, what in (("profile", "one repeated batch"), ("profile_batches_in_turn", "batches in turn"))
                if c.get(key, {}).get("busy_ms_per_step") is not None]
        if busy:
            unit = "device" if report.get("env", {}).get("device_type") == "cuda" else "CPU"
            checks.append(f"- {c['config']} {c['profile']['variant']}, profiled ({unit} time of all ops, "
                          f"against the step ms above): " + "; ".join(busy))
        preparation = [f"augmentation on {augment_place(augment_on)}: copy {fmt(prep['copy_ms'].get('median'))} ms + "
                       f"{'augmentation' if augment_on.startswith('device') else 'conversion'} "
                       f"{fmt(prep['pixels_ms'].get('median'))} ms{issue_note(prep)} "
                       f"({fmt(prep.get('mb_per_batch'))} MB copied)"
                       for augment_on, loader in (c.get("loader_only") or {}).items()
                       if (prep := loader.get("preparation")) and prep.get("batches")]
        if preparation:
            checks.append(f"- {c['config']}, preparing one loader batch for a step on an otherwise idle device "
                          "(median over the last batches of the loader-only pass; against the step ms above): "
                          + "; ".join(preparation))
    return lines + checks + ([""] if checks else [])


def _throughput(row: dict[str, Any]) -> float:
    return max(row["images_per_s"], row.get("stream_images_per_s") or 0.0)


def _best(rows: list[dict[str, Any]], key: str, lowest: bool = False):
    """Fastest row whose fidelity check passed (throughput: the better of synchronous and streamed)."""
    rows = [r for r in rows if key in r and r.get("fidelity", {}).get("passed", True)]
    if not rows:
        return None
    if key == "latency_ms":
        return min(rows, key=lambda r: r[key]["median"])
    return max(rows, key=_throughput)


def _faster_unfaithful(rows: list[dict[str, Any]], faithful: dict[str, Any] | None) -> str:
    """``; faster but unfaithful: N (variant), fidelity FAIL (...)`` when a variant that failed its
    fidelity check is faster than the fastest faithful one (empty otherwise)."""
    failed = [r for r in rows if "images_per_s" in r and not r.get("fidelity", {}).get("passed", True)]
    if not failed:
        return ""
    fastest = max(failed, key=_throughput)
    if faithful is not None and _throughput(fastest) <= _throughput(faithful):
        return ""
    return f"; faster but unfaithful: {_throughput_cell(fastest)}, fidelity {fidelity_cell(fastest)}"


def _throughput_cell(row: dict[str, Any], with_batch: bool = False) -> str:
    streamed = (row.get("stream_images_per_s") or 0.0) > row["images_per_s"]
    where = f"bs{row['batch']} " if with_batch else ""
    weights = str(row.get("weights") or "random")
    # several reports count (random, published, trained weights): say which weights made the figure
    weights = "random weights" if weights.startswith("random") else f"weights {Path(weights).name}"
    return f"{fmt(_throughput(row))} ({where}{row['variant']}{', streamed' if streamed else ''}; {weights})"


def sample_best(sample: dict[str, Any]) -> dict[str, Any] | None:
    """The sample section's fastest faithful pipeline: its ``best``, or, for a report interrupted
    before the benchmark wrote it, ``benchmark_inference.fastest_faithful`` of its timings."""
    if sample.get("best") or not sample:
        return sample.get("best")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tools.benchmark_inference import fastest_faithful
    return fastest_faithful(sample)


def _fastest_vs_public(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry with the highest ``speedup_vs_public`` (None when no entry has one)."""
    timed = [e for e in entries if e.get("speedup_vs_public")]
    return max(timed, key=lambda e: e["speedup_vs_public"]) if timed else None


def target_rows(reports: list[dict[str, Any]]) -> list[list[Any]]:
    inference = [r for r in reports if r["benchmark"] == "inference"]
    train = [r for r in reports if r["benchmark"] == "train"]
    rows: list[list[Any]] = []

    def status(value, goal, higher=True):
        if value is None:
            return "not measured"
        if not on_gpu:
            return "– (CPU run)"
        return "met" if (value >= goal if higher else value <= goal) else "**not met**"

    on_gpu = True
    if inference:
        report = inference[-1]
        device = report["env"].get("device")
        on_gpu = report["env"].get("device_type") == "cuda"
        # every inference report of the run counts (e.g. a separate torch.compile run)
        synthetic = [e for r in inference for e in r.get("synthetic", []) if "images_per_s" in e
                     and (e.get("size") in (None, [640, 480]))]
        candidates = [e for e in synthetic if e["model"] == "resnet50_cascade" and e["batch"] == 32]
        r50_32 = _best(candidates, "images_per_s")
        value = _throughput(r50_32) if r50_32 else None
        rows.append(["ResNet-50 cascade 640×480 bs32 end to end", "≥ 1500 img/s",
                     (_throughput_cell(r50_32) if r50_32 else "–") + _faster_unfaithful(candidates, r50_32),
                     status(value, TARGETS["resnet50_cascade_bs32_img_per_s"]), device])
        candidates = [e for e in synthetic if e["model"] == "mobilenet0.25"]
        mobile = _best(candidates, "images_per_s")
        value = _throughput(mobile) if mobile else None
        rows.append(["mobilenet0.25 640×480 end to end", "≥ 5000 img/s",
                     (_throughput_cell(mobile, with_batch=True) if mobile else "–")
                     + _faster_unfaithful(candidates, mobile),
                     status(value, TARGETS["mobilenet_img_per_s"]), device])
        r50_1 = _best([e for e in synthetic if e["model"] == "resnet50_cascade" and e["batch"] == 1], "latency_ms",
                      lowest=True)
        value = r50_1["latency_ms"]["median"] if r50_1 else None
        rows.append(["ResNet-50 cascade batch-1 latency", "≤ 4 ms", f"{fmt(value, 2)} ms ({r50_1['variant']})"
                     if r50_1 else "–", status(value, TARGETS["resnet50_cascade_bs1_latency_ms"], higher=False), device])
        bests = [best for r in inference for best in [sample_best(r.get("sample") or {})]
                 if best and best.get("speedup_vs_public")]
        best = max(bests, key=lambda b: b["speedup_vs_public"]) if bests else None
        value = best["speedup_vs_public"] if best else None
        rows.append(["sample WIDER images vs public-style pipeline, sizes seen before", "≥ 50×",
                     f"{fmt(value)}× ({best['variant']})" if best else "–",
                     status(value, TARGETS["sample_speedup_vs_public"]), device])
        best = _fastest_vs_public(
            [o for r in inference for o in ((r.get("sample") or {}).get("new_sizes") or {}).get("ours", [])])
        if best:
            value = best["speedup_vs_public"]
            rows.append(["sample WIDER images vs public-style pipeline, new sizes (one pass over a data set)",
                         "≥ 50×", f"{fmt(value)}× (FaceDetector, {best['pipeline']})",
                         status(value, TARGETS["sample_speedup_vs_public"]), device])
    cli = [r for r in reports if r["benchmark"] == "cli"]
    if cli:
        report = cli[-1]
        device = report["env"].get("device")
        on_gpu = report["env"].get("device_type") == "cuda"
        best = _fastest_vs_public(report.get("test_py", []))
        value = best["speedup_vs_public"] if best else None
        rows.append(["sample WIDER images, test.py in a fresh process vs the public-style pass", "≥ 50×",
                     f"{fmt(value)}× ({best['pipeline']})" if best else "–",
                     status(value, TARGETS["sample_speedup_vs_public"]), device])
    if train:
        report = train[-1]
        device = report["env"].get("device")
        on_gpu = report["env"].get("device_type") == "cuda"
        # every training report of the run counts (e.g. a separate torch.compile run): per config
        # the report with the fastest fixed batches, and the real-pipeline ratios where measured
        configs: dict[str, dict[str, Any]] = {}
        real_ratios: dict[str, dict[str, float]] = {}
        for c in (c for r in train for c in r.get("configs", [])):
            summary, spec = c.get("summary") or {}, c["config"]
            if spec not in configs or (summary.get("best_fixed_img_per_s") or 0.0) > (
                    (configs[spec].get("summary") or {}).get("best_fixed_img_per_s") or 0.0):
                configs[spec] = c
            if summary.get("real_ratio_to_fixed") or spec not in real_ratios:
                real_ratios[spec] = summary.get("real_ratio_to_fixed") or {}
        for spec, reference in (("mobilenet0.25:32:640", 303.0), ("resnet50:24:840", 99.0),
                                ("resnet50_cascade:24:840", 99.0)):
            summary = configs.get(spec, {}).get("summary")
            if spec == "resnet50_cascade:24:840" and "resnet50:24:840" in configs:
                label = "ResNet-50 cascade bs24@840 fixed batches (informative: the 99 img/s is the plain ResNet-50)"
            else:
                label = f"{spec.split(':')[0]} bs{spec.split(':')[1]}@{spec.split(':')[2]} fixed batches"
            if summary is None and spec == "resnet50_cascade:24:840":
                continue
            value = summary["best_fixed_img_per_s"] if summary else None
            goal = TARGETS["train_ratio_vs_public_reference"] * reference
            verdict = status(value, goal)
            ratio = (summary or {}).get("speedup_vs_public_style")
            if (verdict == "**not met**" and ratio is not None and "H200" not in str(device)
                    and ratio >= TARGETS["train_ratio_vs_public_reference"]):
                # the goal is 2.5 x an H200 figure: on another GPU the ratio to the public-style
                # step timed in the same run is the comparison that holds
                verdict = (f"same-run ratio met ({fmt(ratio)}× ≥ 2.5×); the absolute goal is an H200 figure, "
                           "not checked here")
            rows.append([label, f"≥ {goal:.0f} img/s (2.5 × {reference:.0f}, the public code on an H200)",
                         f"{fmt(value)} ({summary['best_fixed_variant']}; {fmt(ratio)}× "
                         f"public-style here)" if summary else "–", verdict, device])
        for spec, ratios in real_ratios.items():
            value = max(ratios.values()) if ratios else None
            where = f" (augmentation on {augment_place(max(ratios, key=ratios.get))})" if len(ratios) > 1 else ""
            rows.append([f"{spec} real data pipeline vs fixed batches", "≥ 0.90 ×", fmt(value, 2) + where,
                         status(value, TARGETS["real_ratio_to_fixed"]), device])
    return rows


#: The table section of each benchmark's reports (reports of other benchmarks are not read).
SECTIONS = {"inference": inference_section, "train": train_section, "cli": cli_section, "nms": nms_section,
            "loader": loader_section, "matching": matching_section}


def render(reports: list[dict[str, Any]], latest: bool = False) -> str:
    if latest:  # the last report of each benchmark in each file (inference.jsonl beside inference_compile.jsonl)
        last = {}
        for r in reports:
            last[(r.get("_file"), r["benchmark"])] = r
        reports = list(last.values())
    lines = ["## Speed", ""]
    for report in reports:
        lines += SECTIONS[report["benchmark"]](report)
    rows = target_rows(reports)
    if rows:
        lines += ["### Targets of the issue (defined on an H200 with torch 2.11)", ""]
        lines += table(["target", "goal", "measured", "status", "device"], rows) + [""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("files", nargs="+", help="JSON-lines files ('-' = stdin)")
    parser.add_argument("--latest", action="store_true", help="only the last report of each benchmark in each file")
    parser.add_argument("--out", default=None, help="write the Markdown here too")
    args = parser.parse_args(argv)
    reports = read_reports(args.files)
    if not reports:
        raise SystemExit("no benchmark JSON lines found in " + ", ".join(args.files))
    text = render(reports, args.latest)
    print(text)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        except OSError as error:
            raise SystemExit(f"speed_table.py: error: --out {args.out}: {error.strerror or error}") from None
    return text


if __name__ == "__main__":
    main()
