"""Shared set-up of the experiment scripts: data sets and models from the flags, evaluation
predictions, and clean error messages for the mistakes a user can fix."""
from __future__ import annotations

import json
import math
import os
import sys
from functools import wraps
from pathlib import Path

import numpy as np
import torch

from umr.data import DATASETS, dataset_spec
from umr.data.cub import DataError
from umr import distributed as D
from umr.checkpoints import ARCHITECTURE_FLAGS, CheckpointError, ModelCheckpoint, load_weights, read_model_checkpoint
from umr.evaluation import Validator, oracle_texture_flow, predict, with_render
from umr.losses import SemanticTemplateError
from umr.nets import MeshNet, PretrainedWeightsMissing
from umr.quirks import Quirks
from umr.renderer import make_renderer
from umr.trainer import Interrupted, RunError, unwritable

USER_ERRORS = (DataError, PretrainedWeightsMissing, FileNotFoundError, SemanticTemplateError, CheckpointError,
               RunError, D.DeviceError)


def _message(err: Exception) -> str:
    """An error's message; for one re-raised from a DataLoader worker (whose message is the
    worker's traceback), the worker's own last line without the exception's class name."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name = type(err).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text


def user_errors_exit(main):
    """Print a user-fixable error as one line (no traceback) and exit with status 2; a run
    stopped by Ctrl-C says where its checkpoint is and exits with status 130."""

    @wraps(main)
    def wrapper(argv):
        try:
            return main(argv)
        except USER_ERRORS as err:
            print(f"error: {_message(err)}", file=sys.stderr)
            sys.exit(2)
        except Interrupted as err:
            print(str(err), file=sys.stderr)
            sys.exit(130)

    return wrapper


def check_sizes(flags) -> None:
    if flags.img_size != flags.image_size:
        raise DataError(f"--img_size ({flags.img_size}) and --image_size ({flags.image_size}) must be equal")
    if flags.img_size % 64:
        raise DataError(f"--img_size must be a multiple of 64, got {flags.img_size}")


def setup_evaluation(flags):
    """Common start of the test scripts: reads the checkpoint (not with ``--oracle``) and takes
    its architecture and image size into the flags, checks the sizes, picks the device, fixes
    the seed. Returns (distributed context, the unaugmented data set of ``--split``, the
    :class:`umr.checkpoints.ModelCheckpoint` or None)."""
    checkpoint = None if flags.oracle else resolve_checkpoint(flags)
    check_sizes(flags)
    ctx = D.setup(flags.device)
    torch.manual_seed(0)
    check_results_folder(flags)
    dataset = build_dataset(flags, flags.split, use_scops=False, train=False)
    if len(dataset) == 0:
        raise DataError(f"the {flags.split} split has no images ({dataset.anno_path}); nothing to evaluate "
                        "(check --split and --cub_cache_dir)")
    return ctx, dataset, checkpoint


def run_training(script: str, trainer, dataset, ctx) -> None:
    """Announce the run (main process), train, and release the process group even on a crash.
    A split with fewer images than one batch is an error (no batch could be trained on)."""
    if len(dataset) < trainer.s.batch_size:
        raise DataError(f"the {dataset.split} split has {len(dataset)} image(s) ({dataset.anno_path}), fewer than "
                        f"--batch_size {trainer.s.batch_size}: there is no batch to train on (check --cub_cache_dir, "
                        "--split or --batch_size)")
    if ctx.is_main:
        print(f"{script}: {len(dataset)} images, {ctx.world_size} process(es) on {ctx.device}; "
              f"checkpoints in {trainer.run_dir}, visuals in {trainer.vis_dir}")
    try:
        trainer.run()
    finally:
        D.cleanup()


def build_dataset(flags, split: str, use_scops: bool, train: bool = True):
    """The loader of ``--dataset`` (umr.data.DATASETS); ``train`` = the training split's augmentation
    (jitter and mirroring; the test loaders use neither, unless the quirk q13_shuffled_test_loaders)."""
    spec = dataset_spec(flags.dataset)
    return spec.loader(
        flags.cub_dir,
        flags.cub_cache_dir,
        split=split,
        img_size=flags.img_size,
        padding_frac=flags.padding_frac,
        jitter_frac=flags.jitter_frac,
        mirror=True if (train or Quirks.from_flags(flags).q13_shuffled_test_loaders) else False,
        scops_path=flags.scops_path if use_scops else None,
        seed=flags.data_seed,
        category=spec.category,
    )


def build_validator(flags, device) -> "Validator | None":
    """The training-time validator of the flags (None with ``--val_freq 0``): the first
    ``--val_images`` images of ``--val_split`` (unaugmented), ``--val_pairs`` fixed image pairs,
    and the synthetic set's 3-D truth when the split has one."""
    if not flags.val_freq:
        return None
    try:
        dataset = build_dataset(flags, flags.val_split, use_scops=False, train=False)
    except DataError as err:
        raise DataError(f"{err} -- validation reads --val_split {flags.val_split}; pick another split or "
                        "turn validation off with --val_freq 0") from err
    count = min(flags.val_images, len(dataset))
    if count < 2:
        raise DataError(f"--val_split {flags.val_split} has {len(dataset)} image(s); validation needs at least 2 "
                        "(or --val_freq 0)")
    samples = [dataset[i] for i in range(count)]
    items = {k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in samples]))
             for k in ("img", "mask", "kp", "sfm_pose", "inds")}
    rng = np.random.RandomState(0)
    first = rng.randint(count, size=flags.val_pairs)
    second = (first + 1 + rng.randint(count - 1, size=flags.val_pairs)) % count  # never the same image
    truth = None
    path = truth_path(flags, flags.val_split, required=False)
    if path is not None:
        gt = np.load(path)
        truth = {"cam": truth_camera(flags, items["sfm_pose"]),
                 "surface_points": torch.from_numpy(gt["surface_points"][items["inds"].numpy()]).float()}
    renderer = make_renderer(flags.image_size)
    return Validator(items, torch.from_numpy(np.stack([first, second], 1)), renderer, truth,
                     padding_frac=flags.padding_frac)


def build_model(flags, stage: int, mean_shape=None) -> MeshNet:
    """The network to train, from the flags."""
    arch = {k: getattr(flags, k) for k in ARCHITECTURE_FLAGS}
    return MeshNet(
        stage=stage,
        img_size=flags.img_size,
        **arch,
        pretrained_encoder=flags.pretrained_encoder,
        mean_shape=mean_shape,
        quirks=Quirks.from_flags(flags),
        logvar_init=flags.logvar_init,
        side_view_init=getattr(flags, "side_view_init", False),
    )


def init_from_checkpoint(model: MeshNet, path, parts=("encoder", "texture_predictor")) -> list:
    """Copy the weights of ``parts`` (module names) from a checkpoint of another model, e.g. the
    encoder and texture-flow predictor of the stage-1 model into a new stage-2 model; returns
    the parts copied. The two models must agree on those parts' shapes (same --img_size, ...)."""
    state = read_model_checkpoint(path, "--init_from").state
    own = model.state_dict()
    copied = {}
    for part in parts:
        keys = [k for k in own if k.startswith(part + ".") and not k.endswith("uv_sampler")]
        missing = [k for k in keys if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
        if missing:
            raise DataError(f"--init_from {path}: its '{part}' does not match this model ({missing[0]} differs; "
                            "same --img_size and network flags are needed)")
        copied.update({k: state[k] for k in keys})
    model.load_state_dict(copied, strict=False)
    return list(parts)


def _given(flags, name: str) -> bool:
    """Whether ``--name`` was given on the command line (absl flags; False for other objects)."""
    try:
        return bool(flags[name].present)
    except (KeyError, TypeError, AttributeError):
        return False


def resolve_checkpoint(flags) -> ModelCheckpoint:
    """Read ``--model_path`` and make the flags agree with it: the architecture and image size
    that it records replace the flags' defaults (``--img_size`` and ``--image_size`` both); a
    flag given on the command line that contradicts it is an error naming both values. Says on
    stdout what kind of checkpoint it is."""
    checkpoint = read_model_checkpoint(flags.model_path)
    for name, value in checkpoint.arch.items():
        for flag in (name, "image_size") if name == "img_size" else (name,):
            if not hasattr(flags, flag):
                continue
            if _given(flags, flag) and getattr(flags, flag) != value:
                raise DataError(f"--{flag} {getattr(flags, flag)} contradicts --model_path {flags.model_path}, whose model "
                                f"has {name} {value}; drop --{flag} (the checkpoint's value is used)")
            setattr(flags, flag, value)
    print(f"model: {checkpoint.describe()}")
    return checkpoint


def load_model(checkpoint, device, quirks: Quirks = Quirks(), arch=None) -> MeshNet:
    """The stage-1 or stage-2 model of a checkpoint (a path or a
    :class:`umr.checkpoints.ModelCheckpoint`; ours or the original's), in eval mode.

    The architecture is the checkpoint's where it records one (ours), else ``arch``
    ({MeshNet argument: value}, e.g. the flags') or MeshNet's defaults. The model quirks
    (:data:`umr.quirks.MODEL_QUIRKS`) are the checkpoint's where it says (ours: as trained; the
    original's: all on), the rest (e.g. the test-time choices of latent and camera) come from
    ``quirks``.
    """
    if not isinstance(checkpoint, ModelCheckpoint):
        checkpoint = read_model_checkpoint(checkpoint)
    kwargs = {**(arch or {}), **checkpoint.arch, "stage": checkpoint.stage}
    if checkpoint.model_quirks is not None:
        quirks = quirks.with_model_quirks(checkpoint.model_quirks)
    model = MeshNet(pretrained_encoder=False, quirks=quirks, **kwargs)
    load_weights(model, checkpoint)
    return model.to(device).eval()


def load_trained_model(flags, device, checkpoint=None) -> MeshNet:
    """The model of ``--model_path`` (or of ``checkpoint``, already read; see :func:`load_model`)."""
    arch = {k: getattr(flags, k) for k in ARCHITECTURE_FLAGS + ("img_size",)}
    return load_model(checkpoint or flags.model_path, device, Quirks.from_flags(flags), arch)


class Predictor:
    """Predictions for evaluation batches: the model's, or with ``--oracle`` the synthetic set's
    truth (true meshes and cameras through the same evaluation code).

    Calling it on a batch returns ``verts`` (B, V, 3), ``cam`` (B, 7), ``tex_flow``
    (B, F, T, T, 2), ``template`` (B, V, 3: the mesh cam-mode keypoint transfer projects; the
    model's template T̄, or the true mesh), ``alpha`` (B, S, S), the rendered soft silhouette,
    and the render's z-buffer ``face_index`` and ``depth`` (B, 2S, 2S).
    """

    def __init__(self, flags, device, split: str, checkpoint: "ModelCheckpoint | None" = None):
        self.flags, self.device = flags, device
        self.renderer = make_renderer(flags.image_size)  # alpha and z-buffer are read
        self.model = None
        if flags.oracle:
            if Quirks.from_flags(flags).q13_shuffled_test_loaders:
                raise DataError("--oracle cannot be combined with the quirk q13_shuffled_test_loaders (--compat): "
                                "mirrored test images have no truth")
            gt = np.load(truth_path(flags, split))
            self.true_verts = torch.from_numpy(gt["verts"]).float()
            self.faces = torch.from_numpy(gt["faces"]).to(device)
        else:
            self.model = load_trained_model(flags, device, checkpoint)
            self.faces = self.model.faces

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        if self.model is not None:
            return predict(self.model, batch["img"].to(self.device), self.renderer)
        verts = self.true_verts[batch["inds"]].to(self.device)
        cam = truth_camera(self.flags, batch["sfm_pose"]).to(self.device)
        out = {"verts": verts, "cam": cam, "template": verts,
               "tex_flow": oracle_texture_flow(verts, self.faces, cam, self.flags.tex_size)}
        return with_render(out, self.faces, self.renderer)


def truth_path(flags, split: str, required: bool = True):
    """The 3-D truth of a split of a ``--dataset`` that has one (``--gt_dir``, default
    <cub_cache_dir>/../../gt); None when there is none and it is not ``required``."""
    spec = dataset_spec(flags.dataset)
    if not spec.has_truth:
        if not required:
            return None
        with_truth = sorted(name for name, s in DATASETS.items() if s.has_truth)
        raise DataError(f"--dataset {spec.name} has no 3-D truth; evaluate on a data set with one "
                        f"(--dataset {' or '.join(with_truth)})")
    gt_dir = Path(flags.gt_dir) if getattr(flags, "gt_dir", "") else Path(flags.cub_cache_dir).resolve().parent.parent / "gt"
    path = gt_dir / f"{split}.npz"
    if not path.is_file():
        if not required:
            return None
        raise DataError(f"the synthetic set's 3-D truth {path} is missing (set --gt_dir; CUB has none)")
    return path


def truth_camera(flags, sfm_pose) -> torch.Tensor:
    """Float cameras (..., 7) that project the 3-D truth, from the loader's ``sfm_pose`` (..., 7)."""
    return dataset_spec(flags.dataset).truth_camera(sfm_pose).float()


def results_folder(flags) -> Path:
    """Where an evaluation writes its JSON: ``--results_dir``, else next to the checkpoint (with
    ``--oracle``: ``<results_eval_dir>/<name>``)."""
    if getattr(flags, "results_dir", ""):
        return Path(flags.results_dir)
    return Path(flags.results_eval_dir) / flags.name if flags.oracle else Path(flags.model_path).resolve().parent


def check_writable(folder, flag: str, what: str = "outputs") -> None:
    """Fail before the work when ``folder`` (given by ``flag``) cannot be written."""
    why = unwritable(Path(folder))
    if why:
        raise DataError(f"cannot write the {what} to {folder} ({why}); pass {flag} with a writable folder")


def check_results_folder(flags) -> None:
    check_writable(results_folder(flags), "--results_dir", "evaluation's results")


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_results(flags, name: str, results: dict, summary: str) -> Path:
    """Print ``summary``, then write the evaluation's numbers as strict JSON (a number that is
    not finite becomes null) with what was evaluated (``evaluated``: checkpoint, data, split,
    image size, batch limit, quirks) to ``<results folder>/<name>.json``; returns the path."""
    print(summary, flush=True)
    record = {**results, "evaluated": {
        "model_path": None if flags.oracle else str(Path(flags.model_path).resolve()),
        "oracle": bool(flags.oracle),
        "cub_dir": str(Path(flags.cub_dir).resolve()),
        "cub_cache_dir": str(Path(flags.cub_cache_dir).resolve()),
        "split": flags.split,
        "img_size": flags.img_size,
        "max_eval_iter": flags.max_eval_iter,
        "quirks": Quirks.from_flags(flags).enabled(),
    }}
    folder = results_folder(flags)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite_or_none(record), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    print(f"  -> {path}")
    return path
