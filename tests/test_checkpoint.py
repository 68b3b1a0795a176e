import re
import urllib.error
from collections import OrderedDict

import pytest
import torch

from models.retinaface import ModelConfig, RetinaFace
from utils import checkpoint as ckpt
from utils.checkpoint import (CheckpointError, infer_model_config, load_model, resolve_weights, save_checkpoint,
                              split_checkpoint)


def outputs_equal(a, b, x):
    with torch.no_grad():
        for stage_a, stage_b in zip(a(x), b(x)):
            for ta, tb in zip(stage_a, stage_b):
                if ta is not None:
                    torch.testing.assert_close(ta, tb)


def test_published_mobilenet_loads_strictly_with_inferred_architecture(mobilenet_weights):
    model = load_model(mobilenet_weights)
    assert model.config == ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=False)
    assert not model.training


@pytest.mark.parametrize("wrap", ["module_prefix", "state_dict_key", "no_batch_counters"])
def test_published_file_wrappers(tmp_path, mobilenet_weights, wrap):
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    if wrap == "module_prefix":
        payload = OrderedDict(("module." + k, v) for k, v in state.items())
    elif wrap == "no_batch_counters":  # files of PyTorch < 0.4.1 have no num_batches_tracked
        payload = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
        assert len(payload) < len(state)
    else:
        payload = {"state_dict": state, "epoch": 3}
    torch.save(payload, tmp_path / "wrapped.pth")
    reference = load_model(mobilenet_weights)
    outputs_equal(load_model(tmp_path / "wrapped.pth"), reference, torch.randn(1, 3, 64, 64))


def test_our_checkpoint_round_trip_rebuilds_the_architecture(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(network="resnet18", num_anchor=3, cascade=True, cascade_mode="residual",
                         model_version="tina", out_channels=128)
    model = RetinaFace(config).eval()
    path = save_checkpoint(tmp_path / "ckpt" / "last.pth", model, epoch=4)
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_model(path)
    assert loaded.config == config
    outputs_equal(loaded, model, torch.randn(1, 3, 64, 64))
    assert torch.load(path, weights_only=True)["epoch"] == 4


def test_overrides_are_ignored_for_a_recorded_architecture_with_a_warning_only_when_they_differ(tmp_path):
    """A checkpoint of ours records its architecture: overrides that say the same load silently,
    overrides that contradict it are ignored and named in a warning."""
    import warnings

    config = ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=False)
    path = save_checkpoint(tmp_path / "last.pth", RetinaFace(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(path, overrides={"network": "mobilenet0.25", "cascade": False}).config == config
    with pytest.warns(UserWarning, match=r"ignoring \{'num_anchor': 3\}"):
        loaded = load_model(path, overrides={"network": "mobilenet0.25", "num_anchor": 3})
    assert loaded.config == config


def test_bare_state_dict_with_a_non_default_width_loads_with_that_width(tmp_path):
    """A foreign file (a bare state dict, no recorded configuration) of a model whose FPN/SSH
    width is not its backbone's default: the width is read from the weights' shapes."""
    torch.manual_seed(0)
    config = ModelConfig(network="mobilenet0.25", cascade=False, out_channels=32)
    assert config.fpn_channels != ModelConfig(network="mobilenet0.25", cascade=False).fpn_channels
    model = RetinaFace(config).eval()
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded = load_model(tmp_path / "bare.pth")
    assert loaded.config.fpn_channels == 32 and loaded.fpn.output1[0].out_channels == 32
    outputs_equal(loaded, model, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_follow_the_umask_like_other_outputs(tmp_path, umask):
    import os
    import stat

    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "last.pth", RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False)))
        log = tmp_path / "logs.txt"
        log.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(log.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("config", [
    ModelConfig(network="resnet18", num_anchor=3, cascade=False),
    ModelConfig(network="resnet34", num_anchor=2, cascade=True, model_version="tina"),
    ModelConfig(network="resnet50", num_anchor=2, cascade=False),
    ModelConfig(network="mobilenet0.25", num_anchor=3, cascade=True),
])
def test_architecture_inferred_from_raw_state_dict(config):
    assert infer_model_config(RetinaFace(config).state_dict()) == config


def to_original_layout(state):
    """Our residual-cascade ResNet-50 state dict written in the original project's key layout."""
    renames = [(r"^ssh([123])\.", lambda m: f"ssh1_{m.group(1)}."),
               (r"^cascade\.ssh\.([012])\.", lambda m: f"ssh2_{int(m.group(1)) + 1}."),
               (r"^cascade\.(ClassHead|BboxHead|LandmarkHead)\.", lambda m: f"{m.group(1)}_2."),
               (r"^(ClassHead|BboxHead|LandmarkHead)\.", lambda m: f"{m.group(1)}_1.")]
    original = OrderedDict()
    for key, value in state.items():
        for pattern, replacement in renames:
            key, hits = re.subn(pattern, replacement, key, count=1)
            if hits:
                break
        original[key] = value
    for index, channels in enumerate([256, 512, 1024, 2048, 4096]):  # output0..4; 0 and 4 unused
        if index in (0, 4):
            original[f"fpn.output{index}.0.weight"] = torch.randn(256, channels, 1, 1)
            for name in ("weight", "bias", "running_mean", "running_var"):
                original[f"fpn.output{index}.1.{name}"] = torch.rand(256)
    for index in (0, 3):  # merge0..3; 0 and 3 unused
        original[f"fpn.merge{index}.0.weight"] = torch.randn(256, 256, 3, 3)
        for name in ("weight", "bias", "running_mean", "running_var"):
            original[f"fpn.merge{index}.1.{name}"] = torch.rand(256)
    return original


def test_original_project_cascade_checkpoint_loads_as_residual(tmp_path):
    torch.manual_seed(0)
    model = RetinaFace(ModelConfig(network="resnet50", cascade=True, cascade_mode="residual")).eval()
    original = to_original_layout(model.state_dict())
    assert "ssh1_1.conv3X3.0.weight" in original and "ClassHead_2.0.conv1x1.weight" in original
    torch.save({"network": original}, tmp_path / "original.pth")
    loaded = load_model(tmp_path / "original.pth")
    assert loaded.config.cascade and loaded.config.cascade_mode == "residual"
    outputs_equal(loaded, model, torch.randn(1, 3, 64, 64))


def test_mismatch_names_the_keys(tmp_path, mobilenet_weights):
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    del state["ssh2.conv3X3.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 \['ssh2.conv3X3.0.weight'\].*unexpected 1 \['extra.weight'\]"):
        load_model(tmp_path / "broken.pth")
    # also the backbone's first key: named as missing, the architecture still recognised from the others
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    del state["body.stage1.0.0.weight"]
    torch.save(state, tmp_path / "no_first_key.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 \['body.stage1.0.0.weight'\]"):
        load_model(tmp_path / "no_first_key.pth")
    # a flag that contradicts the weights is a clear error, not a partial load
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(mobilenet_weights, overrides={"num_anchor": 3})


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "short.pth").write_bytes(b"junk")
    # other files say what they are not, with torch.load's reason kept short at the end
    for name in ("short.pth", "garbage.pth"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a PyTorch checkpoint file \(torch.load: [^\n]+\)$"):
            load_model(tmp_path / name)
    torch.save({"weights": {"a": torch.zeros(1)}, "object": ModelConfig()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "pickled.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a RetinaFace state dict"):
        load_model(tmp_path / "other.pth")


def test_published_name_offline_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as error:
        resolve_weights("resnet50")
    message = str(error.value)
    assert "detection_Resnet50_Final.pth" in message and str(tmp_path) in message and "\n" not in message


def test_weights_path_that_is_missing_or_a_folder_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match="weights file not found"):
        resolve_weights(tmp_path / "absent.pth")
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        resolve_weights(tmp_path / "folder.pth")


def test_published_name_uses_the_hub_cache(tmp_path, monkeypatch, mobilenet_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "detection_mobilenet0.25_Final.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(mobilenet_weights)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("downloaded although the file is cached"))
    assert resolve_weights("mobilenet0.25") == cached
    assert load_model("mobilenet0.25").config.network == "mobilenet0.25"


def test_split_checkpoint_of_our_format_returns_recorded_config():
    model = RetinaFace(ModelConfig(network="mobilenet0.25", cascade=False))
    checkpoint = {"format": ckpt.CHECKPOINT_FORMAT, "model_config": model.config.to_dict(),
                  "model": model.state_dict()}
    state, config = split_checkpoint(checkpoint)
    assert config == model.config and list(state) == list(model.state_dict())


def test_damaged_torch_files_and_foreign_files_are_told_apart(tmp_path, mobilenet_weights):
    """A cut-short checkpoint (legacy or zip format) is called damaged; a text file or another
    pickle is "not a PyTorch checkpoint file"; neither message is a bare number like ': 101'."""
    legacy = mobilenet_weights.read_bytes()
    (tmp_path / "legacy_cut.pth").write_bytes(legacy[: len(legacy) // 20])
    torch.save({"a": torch.zeros(1000)}, tmp_path / "zip.pth")
    archive = (tmp_path / "zip.pth").read_bytes()
    (tmp_path / "zip_cut.pth").write_bytes(archive[: len(archive) // 2])
    for name in ("legacy_cut.pth", "zip_cut.pth"):
        with pytest.raises(CheckpointError, match=rf"{name} is a damaged or truncated PyTorch checkpoint \(torch.load: "):
            ckpt.read_checkpoint(tmp_path / name)
    (tmp_path / "notes.pth").write_text("hello world\n")
    import pickle
    (tmp_path / "plain_pickle.pth").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    for name in ("notes.pth", "plain_pickle.pth"):
        with pytest.raises(CheckpointError) as raised:
            ckpt.read_checkpoint(tmp_path / name)
        message = str(raised.value)
        assert f"{name} is not a PyTorch checkpoint file (torch.load: " in message and "\n" not in message
        assert re.search(r"\(torch.load: [A-Za-z]", message), message  # a word, not a bare key number
        assert len(message) < len(str(tmp_path / name)) + 160
