"""Reading and writing detector checkpoints.

Our checkpoints are dicts ``{'format': 'retinaface-toolkit', 'model_config': {...}, 'model':
state_dict, ...training state}`` so that test.py and inference.py rebuild the right model from
the file alone. Foreign files load too:

- published Pytorch_Retinaface / facexlib files: a raw state dict, possibly with a ``module.``
  prefix, or ``{'state_dict': ...}``;
- the original project's files: ``{'network': state_dict}`` whose cascade layout (``ssh1_k``,
  ``ssh2_k``, ``ClassHead_1/2`` ..., unused ``fpn.output0/4`` and ``fpn.merge0/3``) is mapped onto
  ours, with ``cascade_mode='residual'``.

The architecture of a foreign file is inferred from its keys. Loading is always strict: any
missing or unexpected key raises :class:`CheckpointError` naming them.
"""
from __future__ import annotations

import pickle
import re
import urllib.error
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from config import WEIGHTS_CONFLICT
from models.retinaface import ModelConfig, RetinaFace
from utils.atomic_file import atomic_path
from utils.errors import CheckpointError

CHECKPOINT_FORMAT = "retinaface-toolkit"
FORMAT_VERSION = 1

# Published Pytorch_Retinaface weights as hosted by the facexlib project (release v0.1.0).
_RELEASE = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
PUBLISHED_WEIGHTS: dict[str, tuple[str, ModelConfig]] = {
    "mobilenet0.25": (_RELEASE + "detection_mobilenet0.25_Final.pth",
                      ModelConfig(network="mobilenet0.25", num_anchor=2, cascade=False)),
    "resnet50": (_RELEASE + "detection_Resnet50_Final.pth",
                 ModelConfig(network="resnet50", num_anchor=2, cascade=False)),
}


def save_checkpoint(path: str | Path, model: torch.nn.Module, **extra: Any) -> Path:
    """Write ``model``'s configuration and weights (plus ``extra`` training state) atomically.

    The file is written to a temporary name in the same folder and renamed, so an interrupted
    save never leaves a truncated checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
               "model_config": model.config.to_dict(), "model": model.state_dict(), **extra}
    with atomic_path(path, suffix=".tmp") as partial:
        torch.save(payload, partial)
    return path


_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch.save < 1.6
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save >= 1.6 writes a zip archive holding <name>/data.pkl


def _looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts like a file written by ``torch.save`` (legacy pickle magic number, or
    a zip archive that holds a ``data.pkl`` or cannot be listed, e.g. cut short)."""
    import zipfile  # noqa: PLC0415

    with path.open("rb") as handle:
        head = handle.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return True
    if not head.startswith(_ZIP_MAGIC):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return True  # a torch zip archive without its central directory (truncated)


def _short_reason(error: BaseException, limit: int = 120) -> str:
    """The gist of a ``torch.load`` error on one line: PyTorch's advice about ``weights_only`` and
    corrupted files dropped, bare values (``KeyError: 101``) prefixed with the error type."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        text = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    text = " ".join(text.split())
    for cut in (" This is an internal miniz error", " The file might be corrupted"):
        text = text.split(cut)[0]
    text = text.rstrip(". ")
    if not text or not any(c.isalpha() for c in text):
        text = f"{type(error).__name__} {text}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a file with ``weights_only=True`` onto the CPU, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # torch.load raises many types for corrupt files (struct.error, KeyError ...)
        reason = _short_reason(error)
        if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in reason:
            raise CheckpointError(f"{path} holds Python objects that are not loaded for safety "
                                  f"(torch.load weights_only=True); re-save its state_dict: {reason}") from None
        if isinstance(error, OSError) and error.filename is not None:
            raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or reason}") from None
        if _looks_like_torch_file(path):
            raise CheckpointError(f"{path} is a damaged or truncated PyTorch checkpoint (torch.load: {reason})") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint file (torch.load: {reason})") from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(checkpoint).__name__})")
    return dict(checkpoint)


def split_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[OrderedDict, ModelConfig | None]:
    """The model state dict (our key layout, ``module.`` stripped) and recorded configuration.

    For the original project's cascade files the returned configuration is the inferred one
    with ``cascade_mode='residual'``; for other foreign files it is ``None``.
    """
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        return OrderedDict(checkpoint["model"]), ModelConfig.from_dict(checkpoint["model_config"])
    for key in ("state_dict", "network", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            state_dict = checkpoint[key]
            break
    else:
        state_dict = checkpoint
    state_dict = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v)
                             for k, v in state_dict.items())
    if _is_original_cascade_layout(state_dict):
        state_dict = _remap_original_cascade(state_dict)
        return state_dict, infer_model_config(state_dict).replace(cascade_mode="residual")
    return state_dict, None


def _is_original_cascade_layout(state_dict: Mapping[str, Any]) -> bool:
    return any(key.startswith("ssh1_1.") for key in state_dict)


_UNUSED_ORIGINAL_FPN = re.compile(r"^fpn\.(output0|output4|merge0|merge3)\.")
_ORIGINAL_RENAMES = (
    (re.compile(r"^ssh1_([123])\."), lambda m: f"ssh{m.group(1)}."),
    (re.compile(r"^ssh2_([123])\."), lambda m: f"cascade.ssh.{int(m.group(1)) - 1}."),
    (re.compile(r"^(ClassHead|BboxHead|LandmarkHead|IoUHead)_1\."), lambda m: f"{m.group(1)}."),
    (re.compile(r"^(ClassHead|BboxHead|LandmarkHead|IoUHead)_2\."), lambda m: f"cascade.{m.group(1)}."),
)


def _remap_original_cascade(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict:
    """Map the original project's cascade key names onto ours; drop its FPN layers that its
    forward pass never used (output0, output4, merge0, merge3)."""
    remapped = OrderedDict()
    for key, value in state_dict.items():
        if _UNUSED_ORIGINAL_FPN.match(key):
            continue
        for pattern, replacement in _ORIGINAL_RENAMES:
            key = pattern.sub(replacement, key, count=1)
        remapped[key] = value
    return remapped


_RESNET_BY_BLOCKS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50",
                     (True, 23): "resnet101", (True, 36): "resnet152"}


def infer_model_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Architecture of a state dict in our key layout, read from its key names and shapes."""
    # by prefix, not by one key: a file missing any single key then reaches the strict load, which names it
    if any(key.startswith("body.stage1.") for key in state_dict):
        network = "mobilenet0.25"
    elif any(key.startswith("body.layer1.") for key in state_dict):
        bottleneck = any(key.startswith("body.layer1.0.conv3.") for key in state_dict)
        blocks = len({key.split(".")[2] for key in state_dict if key.startswith("body.layer3.")})
        network = _RESNET_BY_BLOCKS.get((bottleneck, blocks))
        if network is None:
            raise CheckpointError(f"unrecognised ResNet backbone ({blocks} blocks in layer3, "
                                  f"{'bottleneck' if bottleneck else 'basic'} blocks)")
    else:
        raise CheckpointError("not a RetinaFace state dict: no 'body.stage1.*' (mobilenet0.25) or "
                              "'body.layer1.*' (ResNet) backbone keys; first keys: "
                              f"{list(state_dict)[:5]}")
    try:
        num_anchor = state_dict["ClassHead.0.conv1x1.weight"].shape[0] // 2
        out_channels = state_dict["fpn.output1.0.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"not a RetinaFace state dict: missing key {error}") from None
    default_channels = ModelConfig(network=network, cascade=False).fpn_channels
    return ModelConfig(
        network=network, num_anchor=num_anchor,
        cascade=any(key.startswith("cascade.") for key in state_dict),
        model_version="tina" if any(key.startswith("IoUHead.") for key in state_dict) else "retina",
        out_channels=None if out_channels == default_channels else out_channels,
    )


def resolve_weights(weights: str | Path) -> Path:
    """Path of a checkpoint: ``mobilenet0.25``/``resnet50`` name the published weights, fetched once
    into the torch hub cache (``$TORCH_HOME/hub/checkpoints``); anything else is a path."""
    name = str(weights)
    if name not in PUBLISHED_WEIGHTS:
        path = Path(name).expanduser()
        if path.is_dir():
            raise CheckpointError(f"weights {path} is a folder, not a checkpoint file")
        if not path.is_file():
            raise CheckpointError(f"weights file not found: {path} (use 'mobilenet0.25' or 'resnet50' for "
                                  f"the published models, or a path to a checkpoint)")
        return path
    url = PUBLISHED_WEIGHTS[name][0]
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=True)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise CheckpointError(f"could not download the published {name} weights ({error}); "
                                  f"download {url} and put it at {target}") from None
    return target


CHECKPOINT_CANDIDATES = ("best.pth", "last.pth")


def checkpoint_for_run(weights: str | None, model_weight: str | None, experiment_name: str,
                       experiments_dir: str | Path = "experiments",
                       candidates: tuple[str, ...] = CHECKPOINT_CANDIDATES) -> str:
    """The checkpoint the command-line options name.

    ``--weights`` (published name or path) wins; else ``--model_weight``, a file name inside
    ``experiments/<experiment_name>/ckpt/``; else the first of ``candidates`` in that folder
    (default best.pth, then last.pth), or its only .pth.
    """
    if weights and model_weight:
        raise CheckpointError(WEIGHTS_CONFLICT)
    if weights:
        return str(weights)
    ckpt_dir = Path(experiments_dir) / experiment_name / "ckpt"
    if model_weight:
        path = ckpt_dir / model_weight
        if not path.is_file():
            raise CheckpointError(f"weights file not found: {path} (--model_weight is a file name inside "
                                  f"experiments/<experiment_name>/ckpt/; or use --weights NAME|PATH)")
        return str(path)
    for name in candidates:
        if (ckpt_dir / name).is_file():
            return str(ckpt_dir / name)
    available = sorted(p.name for p in ckpt_dir.glob("*.pth")) if ckpt_dir.is_dir() else []
    if len(available) == 1:
        return str(ckpt_dir / available[0])
    found = f" (found {', '.join(available)})" if available else ""
    raise CheckpointError(f"no weights given and no {'/'.join(candidates)} in {ckpt_dir}{found}: "
                          f"pass --weights mobilenet0.25|resnet50|PATH or --model_weight FILE")


def load_model(weights: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
               device: str | torch.device = "cpu") -> RetinaFace:
    """Build the model a checkpoint describes and load its weights strictly, in eval mode.

    ``weights``: a checkpoint file, ``mobilenet0.25``/``resnet50`` (the published models), or what
    ``torch.load`` gives for such a file (a state dict or a checkpoint dict). ``overrides``
    (architecture options from the command line) apply only where the file does not say: a
    recorded configuration wins, with a warning when an override disagrees.
    """
    if isinstance(weights, Mapping):
        name = source = "the state dict given"
        checkpoint = weights
    elif isinstance(weights, (str, Path)):
        path = resolve_weights(weights)
        name, source = path.name, str(path)
        checkpoint = read_checkpoint(path)
    else:
        raise TypeError(f"weights must be a checkpoint path, 'mobilenet0.25' / 'resnet50', or a state dict, got "
                        f"{type(weights).__name__}")
    state_dict, recorded = split_checkpoint(checkpoint)
    overrides = dict(overrides or {})
    if recorded is not None:
        config = recorded
        conflicts = {k: v for k, v in overrides.items() if getattr(recorded, k) != v}
        if conflicts:
            warnings.warn(f"{name} records its architecture; ignoring {conflicts}", stacklevel=2)
    else:
        try:
            config = infer_model_config(state_dict).replace(**overrides)
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from None
    model = RetinaFace(config)
    load_state_dict_strict(model, state_dict, source=source)
    return model.to(device).eval()


def with_batchnorm_counters(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                            ) -> Mapping[str, torch.Tensor]:
    """``state_dict`` with the BatchNorm ``num_batches_tracked`` counters of ``expected`` (a
    module's state dict) that it lacks added as 0: files of PyTorch < 0.4.1 have none, and
    ``nn.Module.load_state_dict`` fills them in the same way (they play no part in evaluation)."""
    counters = {k: torch.zeros((), dtype=torch.long) for k in expected
                if k.endswith(".num_batches_tracked") and k not in state_dict}
    return {**state_dict, **counters} if counters else state_dict


def key_mismatch(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                 ) -> tuple[list[str], list[str], list[str]]:
    """The keys that keep ``state_dict`` from loading strictly into a module whose state dict is
    ``expected``: ``(missing, mis_shaped, unexpected)``, each in its dict's order."""
    missing = [k for k in expected if k not in state_dict]
    mis_shaped = [k for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    unexpected = [k for k in state_dict if k not in expected]
    return missing, mis_shaped, unexpected


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming missing/unexpected/mis-shaped keys;
    missing BatchNorm counters are added (:func:`with_batchnorm_counters`)."""
    expected = model.state_dict()
    state_dict = with_batchnorm_counters(state_dict, expected)
    missing, mis_shaped_keys, unexpected = key_mismatch(state_dict, expected)
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in mis_shaped_keys]
    if missing or unexpected or mis_shaped:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:6]}{' ...' if len(keys) > 6 else ''}"
        raise CheckpointError(f"{source} does not match the model {getattr(model, 'config', type(model).__name__)}: missing {show(missing)}, "
                              f"unexpected {show(unexpected)}, shape mismatch {show(mis_shaped)}")
    model.load_state_dict(state_dict, strict=True)
