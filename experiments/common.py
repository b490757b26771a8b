"""Shared set-up of the experiment scripts: data sets and models from the flags, and clean
error messages for the mistakes a user can fix."""
from __future__ import annotations

import sys
from functools import wraps

from data.cub import CUBDataset, DataError
from umr.nets import MeshNet, PretrainedWeightsMissing

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
