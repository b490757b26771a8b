"""Shared set-up of the experiment scripts: data sets and models from the flags, evaluation
predictions, and clean error messages for the mistakes a user can fix."""
from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path

import numpy as np
import torch

from data.cub import CUBDataset, DataError
from data.synth_birds import canonical_camera
from umr import distributed as D
from umr.evaluation import oracle_texture_flow
from umr.nets import MeshNet, PretrainedWeightsMissing, load_original_checkpoint
from umr.renderer import SoftRenderer

USER_ERRORS = (DataError, PretrainedWeightsMissing, FileNotFoundError)


def user_errors_exit(main):
    """Print a user-fixable error as one line (no traceback) and exit with status 2."""

    @wraps(main)
    def wrapper(argv):
        try:
            return main(argv)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def check_sizes(flags) -> None:
    if flags.img_size != flags.image_size:
        raise DataError(f"--img_size ({flags.img_size}) and --image_size ({flags.image_size}) must be equal")
    if flags.img_size % 64:
        raise DataError(f"--img_size must be a multiple of 64, got {flags.img_size}")


def setup_evaluation(flags):
    """Common start of the test scripts: checks the sizes, picks the device, fixes the seed.
    Returns (distributed context, the unaugmented data set of ``--split``)."""
    check_sizes(flags)
    ctx = D.setup(flags.device)
    torch.manual_seed(0)
    return ctx, build_dataset(flags, flags.split, use_scops=False, train=False)


def run_training(script: str, trainer, dataset, ctx) -> None:
    """Announce the run (main process), train, and release the process group even on a crash."""
    if ctx.is_main:
        print(f"{script}: {len(dataset)} images, {ctx.world_size} process(es) on {ctx.device}; "
              f"checkpoints in {trainer.run_dir}, visuals in {trainer.vis_dir}")
    try:
        trainer.run()
    finally:
        D.cleanup()


def build_dataset(flags, split: str, use_scops: bool, train: bool = True) -> CUBDataset:
    """The CUB loader of the flags; ``train`` = the training split's augmentation (jitter and
    mirroring; the test loaders use neither unless --compat, quirk Q13)."""
    return CUBDataset(
        flags.cub_dir,
        flags.cub_cache_dir,
        split=split,
        img_size=flags.img_size,
        padding_frac=flags.padding_frac,
        jitter_frac=flags.jitter_frac,
        mirror=True if (train or flags.compat) else False,
        scops_path=flags.scops_path if use_scops else None,
        seed=flags.data_seed,
    )


def build_model(flags, stage: int, mean_shape=None, pretrained=None) -> MeshNet:
    return MeshNet(
        stage=stage,
        img_size=flags.img_size,
        nz_feat=flags.nz_feat,
        z_dim=flags.z_dim,
        num_hypo_cams=flags.num_hypo_cams,
        tex_size=flags.tex_size,
        subdivide=flags.subdivide,
        axis=flags.axis,
        pretrained_encoder=flags.pretrained_encoder if pretrained is None else pretrained,
        mean_shape=mean_shape,
        compat=flags.compat,
    )


def load_trained_model(flags, device) -> MeshNet:
    """A stage-2 model from ``--model_path`` (ours or the original's), in eval mode."""
    model = build_model(flags, stage=2, pretrained=False)
    load_original_checkpoint(model, flags.model_path)
    return model.to(device).eval()


class Predictor:
    """Predictions for evaluation batches: the model's, or with ``--oracle`` the synthetic set's
    truth (true meshes and cameras through the same evaluation code).

    Calling it on a batch returns ``verts`` (B, V, 3), ``cam`` (B, 7), ``tex_flow``
    (B, F, T, T, 2), ``template`` (B, V, 3: the mesh cam-mode keypoint transfer projects; the
    model's template T̄, or the true mesh), ``alpha`` (B, S, S), the rendered soft silhouette,
    and the render's z-buffer ``face_index`` and ``depth`` (B, 2S, 2S).
    """

    def __init__(self, flags, device, split: str):
        self.flags, self.device = flags, device
        self.renderer = SoftRenderer(flags.image_size).ambient_light_only().to(device)  # alpha and z-buffer only
        self.model = None
        if flags.oracle:
            if flags.compat:
                raise DataError("--oracle cannot be combined with --compat (mirrored test images have no truth)")
            gt = np.load(truth_path(flags, split))
            self.true_verts = torch.from_numpy(gt["verts"]).float()
            self.faces = torch.from_numpy(gt["faces"]).to(device)
        else:
            self.model = load_trained_model(flags, device)
            self.faces = self.model.faces

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        img = batch["img"].to(self.device)
        if self.model is None:
            verts = self.true_verts[batch["inds"]].to(self.device)
            cam = canonical_camera(batch["sfm_pose"]).float().to(self.device)
            out = {"verts": verts, "cam": cam, "template": verts,
                   "tex_flow": oracle_texture_flow(verts, self.faces, cam, self.flags.tex_size)}
        else:
            pred = self.model(img)
            template = self.model.get_mean_shape()[None].expand(len(img), -1, -1)
            out = {"verts": pred["verts"], "cam": pred["cam"], "tex_flow": pred["tex_flow"], "template": template}
        render = self.renderer(out["verts"], self.faces, out["cam"])
        out.update(alpha=render.image[:, 3], face_index=render.face_index, depth=render.depth)
        return out


def truth_path(flags, split: str) -> Path:
    """The synthetic set's 3-D truth of a split (``--gt_dir``, default <cub_cache_dir>/../../gt)."""
    gt_dir = Path(flags.gt_dir) if flags.gt_dir else Path(flags.cub_cache_dir).resolve().parent.parent / "gt"
    path = gt_dir / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"the synthetic set's 3-D truth {path} is missing (set --gt_dir; CUB has none)")
    return path


def write_results(flags, name: str, results: dict) -> Path:
    """Write an evaluation's numbers as JSON next to the checkpoint (``--oracle``: under
    ``<results_eval_dir>/<name>``) and return the path."""
    folder = Path(flags.results_eval_dir) / flags.name if flags.oracle else Path(flags.model_path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
