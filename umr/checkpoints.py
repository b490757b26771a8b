"""Checkpoints: written atomically, read safely, and recognised by what they hold.

Every file is read with ``torch.load(..., weights_only=True)``: only tensors and plain
containers load, so a checkpoint from a shared drive can never run code. Three kinds of model
checkpoint are recognised:

* ``umr``: a training checkpoint of this code (``pred_net_latest.pth``). It records the model's
  architecture and the quirks that change what its weights compute
  (:data:`umr.quirks.MODEL_QUIRKS`), so a model is rebuilt from the file alone.
* ``original``: a state dict of the original UMR code (e.g. the authors' released
  ``pred_net_latest.pth``), stage 1 or stage 2, recognised by its key layout. Its weights were
  trained with the original's forward pass, so it is loaded with
  :data:`umr.quirks.ORIGINAL_MODEL_QUIRKS` (camera biases unused, stage-1 slope 1, free centre
  vertices).
* ``state``: a bare state dict in this code's layout (``torch.save(model.state_dict())``); it
  records nothing, so the architecture and quirks come from the caller.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from umr.nets import ArchitectureConfig
from umr.quirks import ORIGINAL_MODEL_QUIRKS

__all__ = [
    "CHECKPOINT_FORMAT",
    "ARCHITECTURE_FLAGS",
    "CheckpointError",
    "ModelCheckpoint",
    "load_file",
    "save_atomic",
    "read_model_checkpoint",
    "load_weights",
    "model_config",
    "numpy_rng_state",
    "set_numpy_rng_state",
]

CHECKPOINT_FORMAT = "umr-train-1"
# MeshNet's arguments (and training flags) that shape the network, besides its stage
ARCHITECTURE_FLAGS = tuple(f.name for f in dataclasses.fields(ArchitectureConfig))

# Parameters the original created but never used (docs/method.md §5.4): in its stage-2 checkpoints only.
ORIGINAL_DEAD_KEYS = tuple(
    f"cam_predictor.{name}"
    for name in (
        "scale_predictor.pred_layer.weight", "scale_predictor.pred_layer.bias",
        "trans_predictor.pred_layer.weight", "trans_predictor.pred_layer.bias",
        "quat_predictor.pred_layer.weight", "quat_predictor.pred_layer.bias",
        "prob_predictor.weight", "prob_predictor.bias",
    )
)
# Saved buffers whose values are not used: the UV sampler (batch-sized in the original's
# files; recomputed from the mesh) and stage 1's unused noise buffer.
SKIPPED_KEYS = ("uv_sampler", "texture_predictor.uv_sampler", "noise")
# The original's stage-1 layout → ours: its shape MLP is ``pred_layer``, its single camera's
# heads sit at the top level.
ORIGINAL_STAGE1_PREFIXES = (
    ("shape_predictor.pred_layer.", "shape_predictor.mlp."),
    ("quat_predictor.pred_layer.", "cam_predictor.quat_predictor."),
    ("scale_predictor.pred_layer.", "cam_predictor.scale_predictor."),
    ("trans_predictor.pred_layer.", "cam_predictor.trans_predictor."),
)


class CheckpointError(RuntimeError):
    """A file that is not a usable checkpoint; the message names it and says why."""


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash mid-write never
    leaves a truncated file under ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_file(path, flag: str = "--model_path") -> dict:
    """The dict a checkpoint file holds, read with ``weights_only=True``.

    Raises FileNotFoundError (missing file) or :class:`CheckpointError` (one line naming the
    file: not a PyTorch file, truncated, holding objects other than tensors and plain containers,
    or not a dict); ``flag`` names the command-line flag that gave the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (check {flag})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{flag} {path}: refused, the file holds Python objects other than tensors and plain containers "
                "(loading it could run code); only checkpoints of weights are read") from None
        reason = str(err).split("WeightsUnpickler error:")[-1]
        raise CheckpointError(f"{flag} {path} is not a PyTorch checkpoint ({_first_line(reason)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{flag} {path} is not a readable PyTorch checkpoint, or it is truncated "
                              f"({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{flag} {path} holds a {type(state).__name__}, not a checkpoint's dict")
    return state


def _first_line(err) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def numpy_rng_state() -> dict:
    """numpy's global RNG state in types that ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


@dataclass
class ModelCheckpoint:
    """A model checkpoint, recognised (:func:`read_model_checkpoint`).

    ``state``: the model weights in this code's layout (prefixes stripped, original stage-1 keys
    renamed); ``arch``: the architecture it records ({} if none: ``original`` and ``state``);
    ``model_quirks``: {quirk: bool} of :data:`MODEL_QUIRKS` its weights need (None if it does not
    say: ``state``); ``flags``: the training flags it records.
    """

    path: str
    kind: str
    stage: int
    state: dict
    arch: dict = field(default_factory=dict)
    model_quirks: Optional[dict] = None
    flags: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "original":
            return (f"{self.path}: a stage-{self.stage} checkpoint of the original UMR code, loaded with the "
                    "original's forward pass (camera biases unused, stage-1 shape MLP affine, centre vertices free)")
        if self.kind == "state":
            return f"{self.path}: a bare stage-{self.stage} state dict (architecture and quirks from the flags)"
        on = [k for k, v in (self.model_quirks or {}).items() if v]
        return (f"{self.path}: a umr stage-{self.stage} checkpoint ({self.arch.get('img_size')} px; model quirks: "
                f"{', '.join(on) if on else 'none'})")


def _is_state_dict(state: dict) -> bool:
    return bool(state) and all(isinstance(k, str) for k in state) and all(
        isinstance(v, torch.Tensor) for v in state.values())


def read_model_checkpoint(path_or_state, flag: str = "--model_path") -> ModelCheckpoint:
    """Read and recognise a model checkpoint (a path, or a dict already loaded)."""
    if isinstance(path_or_state, dict):
        raw, path = path_or_state, "<state dict>"
    else:
        raw, path = load_file(path_or_state, flag), str(path_or_state)
    if raw.get("format") == CHECKPOINT_FORMAT and isinstance(raw.get("model"), dict):
        flags = raw.get("flags") if isinstance(raw.get("flags"), dict) else {}
        config = raw.get("model_config")
        stage = config.get("stage") if isinstance(config, dict) else None
        if stage not in (1, 2):
            raise CheckpointError(f"{flag} {path}: a umr training checkpoint without its model's configuration")
        arch = {k: v for k, v in config.items() if k != "quirks"}
        quirks = dict(config.get("quirks") or {})
        return ModelCheckpoint(path, "umr", int(stage), _strip(raw["model"]), arch, quirks, flags)
    state = _strip(raw["model"] if isinstance(raw.get("model"), dict) else raw)
    if not _is_state_dict(state):
        raise CheckpointError(f"{flag} {path} is neither a umr checkpoint nor a model state dict "
                              f"(its keys: {', '.join(map(str, list(raw)[:6]))})")
    if any(k.startswith("shape_predictor.pred_layer.0.") for k in state):  # the original's stage 1
        renamed = {}
        for key, value in state.items():
            for old, new in ORIGINAL_STAGE1_PREFIXES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            renamed[key] = value
        return ModelCheckpoint(path, "original", 1, renamed, model_quirks=dict(ORIGINAL_MODEL_QUIRKS))
    if any(k.startswith("cam_predictor.camera_predictor.") for k in state):
        if any(k in state for k in ORIGINAL_DEAD_KEYS):
            return ModelCheckpoint(path, "original", 2, state, model_quirks=dict(ORIGINAL_MODEL_QUIRKS))
        return ModelCheckpoint(path, "state", 2, state)
    if any(k.startswith("shape_predictor.mlp.") for k in state):
        return ModelCheckpoint(path, "state", 1, state)
    raise CheckpointError(f"{flag} {path} holds neither a stage-1 nor a stage-2 UMR model")


def _strip(state: dict) -> dict:
    return {(k.removeprefix("module.") if isinstance(k, str) else k): v for k, v in state.items()}


def load_weights(model: torch.nn.Module, checkpoint: ModelCheckpoint) -> None:
    """Load a checkpoint's weights into ``model`` strictly: every key but the original's dead
    camera layers and the recomputed buffers must match by name and shape."""
    state = {k: v for k, v in checkpoint.state.items() if k not in ORIGINAL_DEAD_KEYS and k not in SKIPPED_KEYS}
    own = model.state_dict()
    for key in SKIPPED_KEYS:
        if key in own:
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{checkpoint.path} does not match the model: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"wrong shape {wrong[:8]} (is it a stage-{getattr(model, 'stage', '?')} model with the same flags?)"
        )
    model.load_state_dict(state)


def model_config(model) -> dict:
    """What a checkpoint records of a :class:`umr.nets.MeshNet`: its architecture and model quirks."""
    return {**model.arch, "quirks": model.quirks.model_quirks()}

