"""Training on bad input: unreadable and truncated training images are skipped, reported once and
replaced reproducibly; ground-truth problems stop the run at start-up; a failed periodic
validation is logged and training goes on; bad weight files and label files give one line.

Tiny CPU runs (64 px, mobilenet0.25 from scratch) on copies of the 10-image sample set in which
the test breaks some files.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
import utils.train_data as train_data

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def image_names(split_dir: Path) -> list[str]:
    return [line[1:].strip() for line in (split_dir / "label.txt").read_text().splitlines() if line.startswith("#")]


def make_dataset(root: Path, sample: Path, with_val: bool = False) -> Path:
    """``root/train`` (and ``root/val`` + ``root/ground_truth``) copied from the sample set."""
    shutil.copytree(sample / "val", root / "train")
    if with_val:
        shutil.copytree(sample / "val", root / "val")
        shutil.copytree(sample / "ground_truth", root / "ground_truth")
    return root


def break_images(split_dir: Path) -> dict[str, str]:
    """Three broken files among the images of ``split_dir``: {absolute path: expected reason}."""
    names = image_names(split_dir)
    broken = {}
    empty = split_dir / "images" / names[1]
    empty.write_bytes(b"")
    broken[str(empty)] = "empty file"
    text = split_dir / "images" / names[4]
    text.write_text("this is not a JPEG\n")
    broken[str(text)] = "not a readable image"
    cut = split_dir / "images" / names[7]
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])  # OpenCV decodes this with grey fill, without complaint
    broken[str(cut)] = "truncated JPEG"
    return broken


def run_args(root: Path, name: str, *extra: str) -> list[str]:
    return ["--dataset", str(root), "--experiment_name", name, "--network", "mobilenet0.25", "--pretrained", "false",
            "--cascade", "false", "--im_size", "64", "--batch_size", "2", "--workers", "0", "--eval_every", "0",
            "--warmup_epochs", "0", "--device", "cpu", "--log_every", "1", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Unreadable training images
# ---------------------------------------------------------------------------------------------
def test_replacement_depends_only_on_seed_epoch_and_index(widerface_sample, tmp_path):
    from utils.data_loaders import dataset_from_root
    from utils.data_transformer import TrainTransform

    root = make_dataset(tmp_path / "ds", widerface_sample)
    broken = break_images(root / "train")
    dataset = dataset_from_root(root, "train", TrainTransform(64, rng=0))
    bad = [i for i in range(len(dataset)) if str(dataset.image_path(i)) in broken]
    assert len(bad) == 3
    first = train_data.EpochSeededDataset(dataset, 7, report=True)
    second = train_data.EpochSeededDataset(dataset, 7, report=True)
    for index in bad:
        second[(bad[0], 1)]  # another history of known-bad files in this process changes nothing
        image, targets, report = first[(index, 1)]
        again, again_targets, _ = second[(index, 1)]
        np.testing.assert_array_equal(image, again)
        np.testing.assert_array_equal(targets, again_targets)
        assert image.shape == (64, 64, 3) and report.replaced == 1 and not report.fatal
        path, reason = report.skipped[0]
        assert path == str(dataset.image_path(index)) and broken[path] in reason
        assert {path for path, _ in report.skipped} <= set(broken)  # only broken files were passed over
    good = next(i for i in range(len(dataset)) if i not in bad)
    image, _, report = first[(good, 1)]
    assert report == train_data.LoadReport()
    assert len(train_data.EpochSeededDataset(dataset, 7)[(bad[0], 1)]) == 2  # without report: plain samples


class _InMemoryImages(torch.utils.data.Dataset):
    """``count`` distinct 40 x 48 images with one face each; the indices in ``unreadable`` raise
    ImageReadError as a broken file does. ``loaded`` records the indices actually read."""

    def __init__(self, count: int, unreadable: set[int], transform) -> None:
        from utils.data_transformer import TrainTransform

        assert isinstance(transform, TrainTransform)
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(count)]
        self.targets = [np.array([[4 + i, 6, 30 + i, 34, *[-1.0] * 10, -1.0]], np.float32) for i in range(count)]
        self.unreadable, self.transform, self.loaded = unreadable, transform, []

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> str:
        return f"img{index}.jpg"

    def __getitem__(self, index: int):
        from utils.image_io import ImageReadError

        if index in self.unreadable:
            raise ImageReadError(f"img{index}.jpg: not a readable image")
        self.loaded.append(index)
        return self.transform(self.images[index], self.targets[index])


def test_a_replacement_image_is_augmented_with_the_seed_of_the_slot_it_fills():
    """The docstring's rule: the replacement is augmented with ``[seed, epoch, index]`` of the
    unreadable image's slot, not with the replacement's own index (which would repeat the draws of
    that image's own slot in the same epoch)."""
    from utils.data_transformer import TrainTransform

    dataset = _InMemoryImages(8, {5}, TrainTransform(32, rng=0))
    wrapped = train_data.EpochSeededDataset(dataset, 7, report=True)
    for epoch in range(3):
        dataset.loaded.clear()
        image, targets, report = wrapped[(5, epoch)]
        (used,) = dataset.loaded
        assert used != 5 and report.replaced == 1
        expected_image, expected_targets = TrainTransform(32, rng=[7, epoch, 5])(dataset.images[used],
                                                                               dataset.targets[used])
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(targets, expected_targets)
        own_slot, _ = TrainTransform(32, rng=[7, epoch, used])(dataset.images[used], dataset.targets[used])
        assert not np.array_equal(image, own_slot)


def test_the_replacement_of_an_unreadable_image_changes_from_epoch_to_epoch():
    """The scan for a replacement starts at an offset drawn from ``[seed, epoch, index]``: over ten
    epochs one unreadable image of eight is not always replaced by the same image (chance of
    that with a fresh draw each epoch: 7 * (1/7)^10)."""
    from utils.data_transformer import TrainTransform

    dataset = _InMemoryImages(8, {2}, TrainTransform(32, rng=0))
    wrapped = train_data.EpochSeededDataset(dataset, 7, report=True)
    used = []
    for epoch in range(10):
        dataset.loaded.clear()
        wrapped[(2, epoch)]
        used.extend(dataset.loaded)
    assert len(used) == 10 and 2 not in used
    assert len(set(used)) > 1, used


def test_unreadable_training_images_are_skipped_reported_once_and_resume_stays_exact(
        widerface_sample, tmp_path, monkeypatch, capsys):
    root = make_dataset(tmp_path / "ds", widerface_sample)
    broken = break_images(root / "train")
    monkeypatch.chdir(tmp_path)
    common = ("--epochs", "2", "--lr", "0.005", "--deterministic", "true")
    assert train.main(run_args(root, "full", *common)) == 3  # finished, but files were skipped
    console = capsys.readouterr().err
    log = (tmp_path / "experiments/full/log/logs.txt").read_text()
    for path, reason in broken.items():
        lines = [line for line in log.splitlines() if f"skipped unreadable training image {path}: " in line]
        assert len(lines) == 1 and reason in lines[0], (path, lines)  # once, although met in both epochs
        assert console.count(f"skipped unreadable training image {path}: ") == 1
    assert "3 unreadable training image(s) skipped" in log
    full = torch.load(tmp_path / "experiments/full/ckpt/last.pth", weights_only=True)
    assert full["step"] == 10

    # interrupted after 3 steps, resumed with a worker process: the same replacements, the same weights
    assert train.main(run_args(root, "part", *common, "--max_iters", "3")) in (0, 3)
    assert train.main(["--resume", "experiments/part/ckpt/last.pth", "--workers", "1", "--device", "cpu"]) == 3
    resumed = torch.load(tmp_path / "experiments/part/ckpt/last.pth", weights_only=True)
    assert resumed["step"] == 10
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_every_training_image_unreadable_stops_with_one_line(widerface_sample, tmp_path, monkeypatch, capsys):
    root = make_dataset(tmp_path / "ds", widerface_sample)
    for name in image_names(root / "train"):
        (root / "train/images" / name).write_text("no image here\n")
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "none", "--epochs", "1")) == 1
    message = error_line(capsys)
    assert message.startswith("train.py: error: none of the 10 training images listed in "), message
    assert "not a readable image" in message


# ---------------------------------------------------------------------------------------------
# Validation: ground truth at start-up, failures of a periodic validation
# ---------------------------------------------------------------------------------------------
def _break_text(gt: Path) -> str:
    (gt / "wider_face_val.mat").write_text("not a MATLAB file\n")
    return "wider_face_val.mat"


def _break_variable(gt: Path) -> str:
    from scipy.io import savemat
    savemat(gt / "wider_hard_val.mat", {"something_else": np.zeros(3)})
    return "wider_hard_val.mat"


def _break_empty(gt: Path) -> str:
    (gt / "wider_easy_val.mat").write_bytes(b"")
    return "wider_easy_val.mat"


@pytest.mark.parametrize("corrupt", [_break_text, _break_variable, _break_empty], ids=["text", "variable", "empty"])
def test_bad_ground_truth_stops_at_start_up_with_one_line(widerface_sample, tmp_path, monkeypatch, capsys, corrupt):
    root = make_dataset(tmp_path / "ds", widerface_sample, with_val=True)
    name = corrupt(root / "ground_truth")
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "gt", "--epochs", "1", "--eval_every", "1")) == 1
    message = error_line(capsys)
    assert message.startswith("train.py: error: ") and name in message and "--gt_dir" in message, message
    assert not (tmp_path / "experiments/gt/ckpt").exists()  # nothing was trained


def test_validation_without_a_val_label_file_uses_every_val_image(widerface_sample, tmp_path, monkeypatch, capsys):
    """val/label.txt is optional for the periodic validation as for test.py: without it every
    val/images/<event>/*.jpg is detected (here the two left), with a progress line on stderr
    (not a terminal here)."""
    root = make_dataset(tmp_path / "ds", widerface_sample, with_val=True)
    (root / "val/label.txt").unlink()
    for name in image_names(root / "train")[2:]:
        (root / "val/images" / name).unlink()
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "nolabel", "--epochs", "1", "--eval_every", "1")) == 0
    log = (tmp_path / "experiments/nolabel/log/logs.txt").read_text()
    assert "no validation AP" not in log and "val AP after epoch 1 (step 5)" in log, log
    assert (tmp_path / "experiments/nolabel/ckpt/best.pth").is_file()
    assert re.search(r"^validation: 100%.* 2/2 ", capsys.readouterr().err, re.MULTILINE)


def damage_scan_data(path: Path) -> Path:
    """Cut a JPEG's compressed data in half and end it properly: whole to a reading of its bytes, damaged
    to the decoder (libjpeg warns, OpenCV fills the rest grey)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    return path


def test_val_images_that_are_not_images_stop_the_run_at_start_up(widerface_sample, tmp_path, monkeypatch, capsys):
    """Found by reading the files' bytes before training, not at the first validation (--eval_every 10: ten
    epochs later), after which every validation would fail."""
    root = make_dataset(tmp_path / "ds", widerface_sample, with_val=True)
    names = image_names(root / "val")
    (root / "val/images" / names[0]).write_text("<html>not an image</html>\n")
    cut = root / "val/images" / names[1]
    cut.write_bytes(cut.read_bytes()[:1000])
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "valcheck", "--epochs", "1", "--eval_every", "1")) == 1
    message = error_line(capsys)
    assert message.startswith("train.py: error: ") and "2 of " in message, message
    assert "validation images cannot be read" in message
    assert f"{root / 'val/images' / names[0]}: not a JPEG, PNG, BMP or WebP image" in message, message
    assert not (tmp_path / "experiments/valcheck/ckpt").exists()  # nothing was trained


def test_failed_validation_is_logged_and_training_continues(widerface_sample, tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds", widerface_sample, with_val=True)
    bad = damage_scan_data(root / "val/images" / image_names(root / "val")[0])  # found only when decoded
    monkeypatch.chdir(tmp_path)
    argv = run_args(root, "val", "--epochs", "2", "--eval_every", "1")
    assert train.main(argv) == 3  # finished, but a validation failed
    log = (tmp_path / "experiments/val/log/logs.txt").read_text()
    failures = re.findall(r"validation after epoch (\d) \(step (\d+)\) failed: cannot read (\S+): corrupt JPEG data",
                          log)
    assert failures == [("1", "5", str(bad)), ("2", "10", str(bad))], log
    assert "2 validation(s) failed" in log
    saved = torch.load(tmp_path / "experiments/val/ckpt/last.pth", weights_only=True)
    assert saved["step"] == 10 and saved["best_metric"] is None
    assert not (tmp_path / "experiments/val/ckpt/best.pth").exists()


def test_two_processes_share_skipped_images_and_validation_failures(widerface_sample, tmp_path):
    root = make_dataset(tmp_path / "ds", widerface_sample, with_val=True)
    broken = break_images(root / "train")  # images 1, 4 (drawn by rank 0 in epoch 1) and 7
    names = image_names(root / "train")
    only_rank1 = root / "train/images" / names[8]  # drawn by rank 1 only (seed 42: ranks 0/1 draw 2,1,4,0 / 6,8,5,9)
    only_rank1.write_text("not an image\n")
    drawn = {str(root / "train/images" / names[i]) for i in (1, 4, 8)}
    # the second val image is detected by rank 1 (images are shared out round-robin): its failure
    # reaches rank 0 through the gather instead of leaving rank 0 waiting
    bad_val = damage_scan_data(root / "val/images" / image_names(root / "val")[1])
    lines = (root / "val/label.txt").read_text().splitlines()
    third = [i for i, line in enumerate(lines) if line.startswith("#")][2]
    (root / "val/label.txt").write_text("\n".join(lines[:third]) + "\n")  # two val images: one per rank
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO_ROOT / "train.py"), *run_args(root, "ddp", "--epochs", "1", "--eval_every", "1")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert "exitcode  : 3" in done.stderr, done.stdout[-3000:] + done.stderr[-3000:]  # rank 0's status
    log = (tmp_path / "experiments/ddp/log/logs.txt").read_text()
    logged = re.findall(r"skipped unreadable training image (\S+): ", log)
    assert len(logged) == len(set(logged)) and drawn <= set(logged) <= set(broken) | {str(only_rank1)}, log
    assert f"validation after epoch 1 (step 2) failed: cannot read {bad_val}" in log
    assert "finished at step 2" in log
    assert torch.load(tmp_path / "experiments/ddp/ckpt/last.pth", weights_only=True)["step"] == 2


# ---------------------------------------------------------------------------------------------
# Set-up: weights and label files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["text", "tensor"])
def test_backbone_weights_that_are_no_state_dict_give_one_line(widerface_sample, tmp_path, monkeypatch, capsys,
                                                               content):
    weights = tmp_path / "backbone.tar"
    if content == "text":
        weights.write_text("hello, I am a text file\n")
    else:
        torch.save(torch.zeros(3), weights)
    monkeypatch.chdir(tmp_path)
    argv = [*run_args(widerface_sample, "bw", "--train_split", "val", "--pretrained", "true"),
            "--backbone_weights", str(weights)]
    assert train.main(argv) == 1
    message = error_line(capsys)
    assert message.startswith("train.py: error: backbone weights: ") and str(weights) in message, message


def test_degenerate_boxes_are_counted_in_the_log(widerface_sample, tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds", widerface_sample)
    label = root / "train/label.txt"
    lines = label.read_text().splitlines()
    lines[1:1] = ["10 10 0 5", "10 10 4 -1"]  # two faces of the first image with w or h <= 0
    label.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "degenerate", "--max_iters", "1")) == 0
    log = (tmp_path / "experiments/degenerate/log/logs.txt").read_text()
    assert f"dropped 2 degenerate face box(es) (w or h <= 0) in {label}" in log
    faces = sum(1 for line in lines if not line.startswith("#")) - 2
    assert f" 10 images ({faces} faces), 5 iterations/epoch" in log  # the start-up line counts the kept faces


def test_label_file_that_is_not_utf8_gives_one_line_naming_file_and_line(widerface_sample, tmp_path, monkeypatch,
                                                                          capsys):
    root = make_dataset(tmp_path / "ds", widerface_sample)
    label = root / "train/label.txt"
    data = label.read_bytes()
    line = data.count(b"\n", 0, 2042) + 1
    label.write_bytes(data[:2042] + b"\xff" + data[2043:])  # one byte that is not UTF-8
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "labels")) == 1
    message = error_line(capsys)
    assert f"{label}:{line}: not UTF-8 text (byte 0xff" in message, message


def test_empty_label_file_says_it_lists_no_images(widerface_sample, tmp_path, monkeypatch, capsys):
    root = make_dataset(tmp_path / "ds", widerface_sample)
    label = root / "train/label.txt"
    label.write_text("")
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "labels")) == 1
    message = error_line(capsys)
    assert f"{label} lists no images" in message and "--batch_size" not in message, message


@pytest.mark.parametrize("faces", ["none", "degenerate"])
def test_labels_without_any_face_stop_at_start_up_with_one_line(widerface_sample, tmp_path, monkeypatch, capsys,
                                                                faces):
    root = make_dataset(tmp_path / "ds", widerface_sample)
    label = root / "train/label.txt"
    face_line = "10 10 0 5" if faces == "degenerate" else None  # a box of width 0 is dropped: no face is left
    label.write_text("".join(f"# {name}\n" + (f"{face_line}\n" if face_line else "")
                             for name in image_names(root / "train")))
    monkeypatch.chdir(tmp_path)
    assert train.main(run_args(root, "nofaces", "--max_iters", "1")) == 1
    dropped = "; 10 degenerate box(es) dropped" if face_line else ""
    assert error_line(capsys) == (f"train.py: error: training data: the labels in {label} hold no faces (10 images"
                                  f"{dropped}): images without faces are valid samples, but a training set needs "
                                  "faces in some of them")
    assert not (tmp_path / "experiments/nofaces").exists()  # stopped before anything was created


def test_a_validation_missed_by_a_stop_runs_when_the_run_is_resumed(widerface_sample, tmp_path, monkeypatch,
                                                                     capsys, after_training_step):
    """last.pth is saved before an epoch's validation: a Ctrl-C in the last step of the run (or a
    process killed while validating) leaves that validation undone. The stop says so (exit 130,
    not "finished"), and the resume runs it before anything else, even with no step left to train."""
    import signal

    root = make_dataset(tmp_path / "ds", widerface_sample, with_val=True)
    (root / "val/label.txt").unlink()
    for name in image_names(root / "train")[2:]:
        (root / "val/images" / name).unlink()  # two val images: a short validation
    monkeypatch.chdir(tmp_path)
    restore = after_training_step(10, lambda: signal.raise_signal(signal.SIGINT))  # the last step of epoch 2
    assert train.main(run_args(root, "cut", "--epochs", "2", "--eval_every", "1")) == 130
    restore()
    log_file = tmp_path / "experiments/cut/log/logs.txt"
    log = log_file.read_text()
    assert "val AP after epoch 1 (step 5)" in log and "val AP after epoch 2" not in log
    assert ("interrupted (Ctrl-C) at step 10, before the validation after epoch 2: continue with --resume "
            "experiments/cut/ckpt/last.pth") in log
    saved = torch.load(tmp_path / "experiments/cut/ckpt/last.pth", weights_only=True)
    assert (saved["step"], saved["validated_step"]) == (10, 5)

    assert train.main(["--resume", "experiments/cut/ckpt/last.pth", "--device", "cpu"]) == 0
    resumed = log_file.read_text()[len(log):]
    assert ("the validation after epoch 2 (step 10) did not run before the run stopped: running it first"
            in resumed) and "val AP after epoch 2 (step 10)" in resumed and "nothing to train" not in resumed
    saved = torch.load(tmp_path / "experiments/cut/ckpt/last.pth", weights_only=True)
    assert (saved["step"], saved["validated_step"]) == (10, 10) and saved["metrics"]
    # done now: another resume has nothing to do
    capsys.readouterr()
    assert train.main(["--resume", "experiments/cut/ckpt/last.pth", "--device", "cpu"]) == 0
    assert "nothing to train" in log_file.read_text().splitlines()[-1]


def test_ctrl_c_during_a_validation_stops_it_and_the_resume_runs_it_first(widerface_sample, tmp_path, monkeypatch,
                                                                          capfd):
    """The first Ctrl-C while a validation runs ends it after the images in progress, not after the
    whole val set (minutes to hours on the full one): last.pth was saved before it, so the stop
    loses nothing, and the resumed run validates first."""
    import signal

    import utils.evaluation

    root = make_dataset(tmp_path / "ds", widerface_sample, with_val=True)
    (root / "val/label.txt").unlink()
    for name in image_names(root / "train")[3:]:
        (root / "val/images" / name).unlink()  # three val images
    monkeypatch.chdir(tmp_path)
    written = []
    original = utils.evaluation.format_prediction_file

    def ctrl_c_at_the_first_image(*args):
        written.append(args[0])
        if len(written) == 1:
            signal.raise_signal(signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(utils.evaluation, "format_prediction_file", ctrl_c_at_the_first_image)
    assert train.main(run_args(root, "cutval", "--epochs", "2", "--eval_every", "1")) == 130
    assert len(written) < 3  # the image already queued behind the first one is finished, the third is not run
    assert "train.py: Ctrl-C: stopping the validation (last.pth was saved before it" in capfd.readouterr().err
    log_file = tmp_path / "experiments/cutval/log/logs.txt"
    log = log_file.read_text()
    assert "val AP after epoch 1" not in log
    assert ("interrupted (Ctrl-C) at step 5, before the validation after epoch 1: continue with --resume "
            "experiments/cutval/ckpt/last.pth") in log
    saved = torch.load(tmp_path / "experiments/cutval/ckpt/last.pth", weights_only=True)
    assert saved["step"] == 5 and saved["validated_step"] != 5 and not saved["metrics"]

    # the resume runs the missed validation first: Ctrl-C there stops it the same way
    written.clear()
    resume = ["--resume", "experiments/cutval/ckpt/last.pth", "--device", "cpu", "--max_iters", "5"]
    assert train.main(resume) == 130 and len(written) < 3
    assert log_file.read_text().count("interrupted (Ctrl-C) at step 5, before the validation after epoch 1") == 2
    log = log_file.read_text()
    monkeypatch.setattr(utils.evaluation, "format_prediction_file", original)
    assert train.main(resume) == 0
    resumed = log_file.read_text()[len(log):]
    assert ("the validation after epoch 1 (step 5) did not run before the run stopped: running it first"
            in resumed) and "val AP after epoch 1 (step 5)" in resumed
