"""Export a RetinaFace checkpoint to ONNX and check the exported model with onnxruntime.

    python tools/export_onnx.py --weights mobilenet0.25|resnet50|PATH [--output FILE.onnx]
        [--check_images DIR] [--opset 18] [--network ... architecture options for bare state dicts]

The graph holds the whole fixed-shape part of detection, as ``models/dense_path.py`` runs it:
mean subtraction, the network with BatchNorm folded into the convolutions, the prior boxes of
the input size, box and landmark decoding and the face score (cascade models: the last stage;
``tina`` models: sqrt(class probability * predicted IoU)). Batch, height and width are dynamic.

- input ``images``: uint8 (B, H, W, 3), BGR (the channel order of ``cv2.imread``), any H and W;
- outputs, float32, one row per prior (N = 2 or 3 anchors x the cells of the stride 8/16/32 grids,
  each ``ceil(H / stride) x ceil(W / stride)``):
  ``boxes`` (B, N, 4) x1y1x2y2 in input pixels, ``scores`` (B, N) face scores in [0, 1],
  ``landmarks`` (B, N, 10) five (x, y) points in input pixels (eyes, nose, mouth corners).

Score threshold and NMS have data-dependent shapes and stay outside the graph:
:func:`utils.postprocess.postprocess` on the outputs gives the detections of :class:`FaceDetector`
(NMS IoU > threshold suppresses; areas with the public +1 pixel convention).

After exporting, the model is run with onnxruntime and compared with PyTorch: the decoded outputs
of every prior on a synthetic image of an odd size, and, with ``--check_images``, the final
detections on real images (score >= 0.5, both ways: IoU >= 0.98, score within 0.005, landmarks
within 1 px). The exit status is 1 when the check fails, 3 when it passes but some of the
``--check_images`` could not be read (each named on stderr). Needs ``pip install -r
requirements-export.txt`` (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from config import HelpFormatter, add_architecture_options, architecture_overrides, one_line, str2bool  # noqa: E402
from layers.prior_box import make_priors  # noqa: E402
from models.detector import FaceDetector, postprocess_settings  # noqa: E402
from models.net import fuse_conv_bn  # noqa: E402
from models.retinaface import BGR_MEAN, RetinaFace, preprocess  # noqa: E402
from tools.fidelity import as_rows, unmatched  # noqa: E402
from utils.atomic_file import atomic_path  # noqa: E402
from utils.checkpoint import CheckpointError, load_model, resolve_weights  # noqa: E402
from utils.image_io import ImageReadError  # noqa: E402
from utils.image_loader import find_images, image_as_bgr_uint8, read_complete_image  # noqa: E402
from utils.postprocess import postprocess  # noqa: E402

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "landmarks")
DEFAULT_OPSET = 18
#: the lowest opset the exporter writes this graph in: below it, onnxscript's version converter has
#: no adapter for Resize (the FPN's upsampling) and the file came out at 18 anyway
MIN_OPSET = 18


def opset_version(text: str) -> int:
    """``--opset``: a whole number from :data:`MIN_OPSET` (the newest the installed onnx knows is
    checked before the export)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < MIN_OPSET:
        raise argparse.ArgumentTypeError(f"{value}: the exporter writes this model in opset {MIN_OPSET} or later (its "
                                         "Resize cannot be converted to older opsets); onnxruntime 1.14 and later run "
                                         "opset 18")
    return value
#: the detection settings of the check on real images (the public WIDER FACE test's)
CHECK_CONFIDENCE, CHECK_NMS = 0.02, 0.4
MAX_CHECK_IMAGES = 20
EXPORT_PACKAGES = "pip install -r requirements-export.txt (onnx, onnxscript, onnxruntime)"


class ExportError(RuntimeError):
    """A missing package, a failed export or a failed check, reported in one line."""


class DetectionGraph(nn.Module):
    """The exported function: uint8 BGR images (B, H, W, 3) -> ``boxes`` (B, N, 4) x1y1x2y2
    pixels, ``scores`` (B, N), ``landmarks`` (B, N, 10) pixels, for every prior of an H x W input.

    Runs a BatchNorm-folded eval copy of ``model``; ``model`` itself is not modified.
    """

    def __init__(self, model: RetinaFace) -> None:
        super().__init__()
        self.network = fuse_conv_bn(model)
        # a buffer, not bgr_mean()'s cached tensor: a cache first filled while exporting would keep a fake tensor
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # priors from the (symbolic) input size: built in the graph, so any size runs
        priors = make_priors(images.shape[1], images.shape[2], self.network.config.min_sizes, device=images.device)
        return self.network.decode_detections(self.network(preprocess(images, mean=self.mean)), priors)


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when all its tensors are on the CPU, else a CPU copy: exporting and checking
    leave a caller's CUDA model where it is (``nn.Module.cpu`` would move it in place)."""
    if all(tensor.device.type == "cpu" for tensor in itertools.chain(model.parameters(), model.buffers())):
        return model
    return copy.deepcopy(model).cpu()


def _require_packages() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"missing {', '.join(missing)}: {EXPORT_PACKAGES}")


def _newest_opset() -> int:
    import onnx  # noqa: PLC0415 (an export package, checked by _require_packages)

    return int(onnx.defs.onnx_opset_version())


def export_onnx(model: RetinaFace, output: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` as an ONNX file (see the module docstring for inputs and outputs) and
    return its path. The file is written next to ``output`` first and renamed when complete."""
    _require_packages()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    graph = DetectionGraph(on_cpu(model)).eval()
    # distinct example sizes, none of them 1: torch.export gives equal or unit sizes one symbol / a constant
    example = torch.zeros(2, 96, 128, 3, dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("height", min=2),
            2: torch.export.Dim("width", min=2)}
    try:
        with atomic_path(output) as partial:  # removed after a failure or Ctrl-C
            torch.onnx.export(graph, (example,), str(partial), dynamo=True, input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), dynamic_shapes=(dims,), opset_version=opset,
                              external_data=False, verbose=False)
    except Exception as error:
        raise ExportError(f"ONNX export failed: {one_line(error)[:500]}") from error
    return output


def written_opset(path: str | Path) -> int:
    """The default-domain opset version an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of an exported model."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_output_file(output: Path) -> None:
    """Raise :class:`ExportError` when ``output`` cannot be written (a folder, a read-only place),
    before the export's seconds are spent: a probe file of a new name is created beside it and removed."""
    if output.is_dir():
        raise ExportError(f"--output {output} is a folder; give a file path (e.g. {output / 'model.onnx'})")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise ExportError(f"cannot write --output {output}: {error.strerror or error}") from None


def run_onnx(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``boxes``, ``scores``, ``landmarks`` of a uint8 BGR batch (B, H, W, 3)."""
    return tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)}))


def onnx_detections(session, image: np.ndarray | str | Path, confidence_threshold: float = 0.5,
                    nms_threshold: float = 0.4, top_k: int | None = 5000, keep_top_k: int | None = 750) -> np.ndarray:
    """Final detections of one image from an exported model, as (K, 15) rows ``x1, y1, x2, y2,
    score, 10 landmark values`` (pixels), with :class:`FaceDetector`'s post-processing. ``image``:
    a path, or an array as :class:`FaceDetector` takes it (BGR uint8 (H, W, 3); grayscale, BGRA,
    uint16 and float in [0, 1] are converted the same way). The settings are checked as
    ``FaceDetector`` checks them (``ValueError``); ``top_k`` / ``keep_top_k`` 0 or None: no cut.
    ``session``: an :func:`onnx_session`, or the ``.onnx`` file's path (a session is then made for
    this one call: for several images make it once)."""
    settings = postprocess_settings(confidence_threshold, nms_threshold, top_k, keep_top_k)
    if isinstance(session, (str, Path)):
        session = onnx_session(session)
    image = image_as_bgr_uint8(image)
    boxes, scores, landmarks = (torch.from_numpy(a) for a in run_onnx(session, image[None]))
    found = postprocess(boxes, scores, landmarks, *settings)
    return as_rows(found.boxes.numpy(), found.scores.numpy(), found.landmarks.numpy())


def check_export(path: str | Path, model: RetinaFace, images: Sequence[Path] = (), seed: int = 0) -> dict[str, Any]:
    """Compare the exported model with PyTorch; returns a report whose ``passed`` says all agree.

    - ``outputs``: the decoded outputs of every prior for a batch of two synthetic 173x259 images
      (not a multiple of any stride), against :class:`DetectionGraph` in PyTorch: largest absolute
      differences (pixels for boxes/landmarks); passes within 0.05 px + 0.1 % of the coordinate
      (float32 rounding grows with the coordinates in deep untrained networks) and 1e-4 in score.
    - ``images``: final detections on real images against :class:`FaceDetector` (confidence 0.02,
      NMS 0.4), both ways, as :func:`tools.fidelity.unmatched` counts them; an image that cannot
      be read is listed in ``unreadable`` (``path: reason``) and left out.
    """
    session = onnx_session(path)
    model = on_cpu(model)
    generator = np.random.default_rng(seed)
    # smooth random content: a noise image scaled up, so the network sees edges and blobs
    small = generator.integers(0, 256, size=(2, 22, 33, 3), dtype=np.uint8)
    synthetic = np.stack([np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(im).permute(2, 0, 1)[None].float(), size=(173, 259), mode="bilinear")[0]
        .permute(1, 2, 0).round().to(torch.uint8)) for im in small])
    with torch.inference_mode():
        expected = DetectionGraph(model).eval()(torch.from_numpy(synthetic))
    got = run_onnx(session, synthetic)
    expected = [e.numpy() for e in expected]
    same_shapes = all(g.shape == e.shape for g, e in zip(got, expected))
    differences = {name: float(np.abs(g - e).max()) if same_shapes else float("nan")
                   for name, g, e in zip(OUTPUT_NAMES, got, expected)}
    # float32 rounding differs between the two runtimes; in deep untrained networks (exploding
    # activations, boxes of 1e35 px) it grows with the coordinates, hence the relative part
    tolerances = {"boxes": (0.05, 1e-3), "scores": (1e-4, 0.0), "landmarks": (0.05, 1e-3)}
    outputs_ok = same_shapes and all(np.allclose(g, e, atol=tolerances[name][0], rtol=tolerances[name][1])
                                     for name, g, e in zip(OUTPUT_NAMES, got, expected))
    report: dict[str, Any] = {"outputs": {"shape": list(synthetic.shape), "max_abs_difference": differences,
                                          "passed": outputs_ok}}
    if images:
        detector = FaceDetector(model=model, device="cpu", confidence_threshold=CHECK_CONFIDENCE,
                                nms_threshold=CHECK_NMS)
        compared, problems, unreadable = 0, {}, []
        for image_path in images:
            try:
                image = read_complete_image(image_path)
            except ImageReadError as error:
                unreadable.append(one_line(error))
                continue
            found = detector.detect(image)
            ours = as_rows(found.boxes, found.scores, found.landmarks)
            exported = onnx_detections(session, image, CHECK_CONFIDENCE, CHECK_NMS)
            compared += int((ours[:, 4] >= 0.5).sum())
            issues = unmatched(ours, exported) + unmatched(exported, ours)
            if issues:
                problems[str(image_path)] = issues[:3]
        report["images"] = {"checked": len(images) - len(unreadable), "detections_compared": compared,
                            "mismatches": problems, "unreadable": unreadable, "passed": not problems}
    report["passed"] = outputs_ok and report.get("images", {}).get("passed", True)
    return report


def default_output(weights: str) -> Path:
    """``best.pth`` -> ``best.onnx`` beside it; a published name -> ``<file name>.onnx`` here."""
    path = Path(weights)
    return path.with_suffix(".onnx") if path.is_file() else Path(resolve_weights(weights).stem + ".onnx")


def check_image_paths(folder: str | Path | None) -> list[Path]:
    if folder is None:
        return []
    folder = Path(folder)
    paths = [folder] if folder.is_file() else find_images(folder) if folder.is_dir() else None
    if not paths:
        raise ExportError(f"--check_images: no images found at {folder}")
    return paths[:MAX_CHECK_IMAGES]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export_onnx.py", description=__doc__.split("\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="'mobilenet0.25' or 'resnet50' (published weights) or a checkpoint path")
    parser.add_argument("--output", default=None,
                        help="ONNX file to write (default: the checkpoint's path with .onnx; for a published "
                             "name, <file name>.onnx in the current folder)")
    parser.add_argument("--opset", type=opset_version, default=DEFAULT_OPSET,
                        help=f"ONNX opset version, {MIN_OPSET} or later (up to the newest the installed onnx knows)")
    parser.add_argument("--check_images", default=None,
                        help=f"image file or folder: also compare final detections with PyTorch (first "
                             f"{MAX_CHECK_IMAGES} images)")
    parser.add_argument("--check", type=str2bool, default=True,
                        help="run the onnxruntime check after exporting (true/false)")
    add_architecture_options(parser)
    args = parser.parse_args(argv)
    try:
        _require_packages()
        newest = _newest_opset()
        if args.opset > newest:
            print(f"export_onnx.py: error: --opset {args.opset}: the installed onnx knows opsets up to {newest}",
                  file=sys.stderr)
            return 2
        check_images = check_image_paths(args.check_images)
        model = load_model(args.weights, architecture_overrides(args))
        output = Path(args.output) if args.output else default_output(args.weights)
        check_output_file(output)
        started = time.perf_counter()
        print(f"exporting {args.weights} to {output} (opset {args.opset}) ...", flush=True)
        export_onnx(model, output, opset=args.opset)
        size_mb = output.stat().st_size / 2**20
        opset = written_opset(output)
        print(f"wrote {output} ({size_mb:.1f} MB, opset {opset}, {model.config}) in "
              f"{time.perf_counter() - started:.0f} s")
        if opset != args.opset:
            print(f"  note: opset {args.opset} was asked for, but the exporter could not convert the graph to it "
                  f"and wrote opset {opset}", file=sys.stderr)
        print(f"  input  {INPUT_NAME}: uint8 (batch, height, width, 3) BGR")
        print("  output boxes (batch, N, 4) x1y1x2y2 px, scores (batch, N), landmarks (batch, N, 10) px")
        if not args.check:
            return 0
        print("checking it with onnxruntime against PyTorch ...", flush=True)
        report = check_export(output, model, check_images)
    except (ExportError, CheckpointError, ImageReadError, OSError) as error:
        print(f"export_onnx.py: error: {one_line(error)}", file=sys.stderr)
        return 1
    outputs = report["outputs"]
    print(f"check, every prior of a {outputs['shape']} batch vs PyTorch: max |difference| "
          + ", ".join(f"{k} {v:.2g}" for k, v in outputs["max_abs_difference"].items())
          + (" - ok" if outputs["passed"] else " - FAILED"))
    if "images" in report:
        images = report["images"]
        print(f"check, detections on {images['checked']} images vs FaceDetector: "
              f"{images['detections_compared']} with score >= 0.5 compared, "
              f"{len(images['mismatches'])} images with mismatches" + (" - ok" if images["passed"] else " - FAILED"))
        for name, issues in images["mismatches"].items():
            print(f"  {name}: {'; '.join(issues)}")
        for problem in images["unreadable"]:
            print(f"export_onnx.py: warning: skipped {problem}", file=sys.stderr)
    if not report["passed"]:
        return 1
    return 3 if report.get("images", {}).get("unreadable") else 0


if __name__ == "__main__":
    sys.exit(main())
