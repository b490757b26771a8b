"""Data sets: the sample contract every loader meets, and the registry behind ``--dataset``.

A data set is one class (a ``torch.utils.data.Dataset`` whose items follow :data:`SAMPLE_FIELDS`)
and one :class:`DatasetSpec` entry in :data:`DATASETS`. The CUB layout (``umr.data.cub``) reads
CUB-200-2011 and the synthetic birds alike (the generator, ``umr.data.synth_birds``, writes that
layout); the synthetic entry adds what CUB lacks, the 3-D truth and its camera frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from umr.category import BIRDS, CategorySpec

__all__ = ["SampleField", "SAMPLE_FIELDS", "sample_fields", "check_sample", "DatasetSpec", "DATASETS",
           "dataset_spec"]


@dataclass(frozen=True)
class SampleField:
    """One key of a data set's items. ``shape`` names its axes: S = image size, K = keypoints,
    P = parts (the category's), n = that part's points; () a scalar. ``parts``: present only when
    the loader reads part maps; ``per_part``: one key per part name, ``<part>_<suffix>``."""

    name: str
    shape: tuple
    dtype: str
    help: str
    parts: bool = False
    per_part: bool = False


# The sample contract (numpy arrays per item; a DataLoader batches them along a new first axis).
SAMPLE_FIELDS = (
    SampleField("img", (3, "S", "S"), "float32", "RGB crop in [0, 1]"),
    SampleField("mask", ("S", "S"), "float32", "foreground mask in [0, 1]"),
    SampleField("mask_dt", ("S", "S"), "float32", "barrier distance transform of the mask (texture DT loss)"),
    SampleField("kp", ("K", 3), "float32", "keypoints (x, y, visibility), 'edge' grid of umr.conventions; "
                "invisible rows 0"),
    SampleField("sfm_pose", (7,), "float32", "SfM camera [s, tx, ty, qw, qx, qy, qz] of the crop"),
    SampleField("inds", (), "int", "index of the image in its split"),
    SampleField("img_path", (), "str", "the photo's path"),
    SampleField("mirrored", (), "bool", "the crop was mirrored (augmentation)"),
    SampleField("part_prob", ("P+1", "S", "S"), "float32", "part probabilities, channel 0 background", parts=True),
    SampleField("center", (2,), "float32", "the part's centre, 'edge' grid", parts=True, per_part=True),
    SampleField("points", ("n", 2), "float32", "points sampled in the part, 'edge' grid", parts=True, per_part=True),
)


def sample_fields(category: CategorySpec = BIRDS, parts: bool = True) -> dict:
    """{key: (shape, dtype)} of an item, per-part keys expanded and axes with their sizes where
    the category fixes them (K, P, n); S stays symbolic."""
    out = {}
    for f in SAMPLE_FIELDS:
        if f.parts and not parts:
            continue
        names = [(f"{p}_{f.name}", p) for p in category.part_names] if f.per_part else [(f.name, None)]
        for key, part in names:
            sizes = {"K": len(category.keypoint_names), "P+1": len(category.part_labels)}
            if part:
                sizes["n"] = category.part_points[part]
            out[key] = (tuple(sizes.get(a, a) for a in f.shape), f.dtype)
    return out


def check_sample(item: dict, img_size: int, category: CategorySpec = BIRDS, parts: Optional[bool] = None) -> None:
    """Raise ValueError naming the first key of ``item`` that breaks the contract (missing, or
    with the wrong shape or dtype). ``parts``: whether part keys are expected (None: if present)."""
    parts = "part_prob" in item if parts is None else parts
    for key, (shape, dtype) in sample_fields(category, parts).items():
        if key not in item:
            raise ValueError(f"sample has no {key!r} (the contract is umr.data.SAMPLE_FIELDS)")
        value = item[key]
        if dtype in ("str", "bool", "int"):
            continue
        expected = tuple(img_size if a == "S" else a for a in shape)
        if tuple(np.shape(value)) != expected or np.asarray(value).dtype != np.dtype(dtype):
            raise ValueError(f"sample {key!r} is {np.asarray(value).dtype}{tuple(np.shape(value))}, "
                             f"expected {dtype}{expected}")


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set.

    Attributes:
        name: its ``--dataset`` value.
        loader: the Dataset class, built as ``loader(cub_dir, cub_cache_dir, split=..., img_size=...,
            padding_frac=..., jitter_frac=..., mirror=..., scops_path=..., seed=..., category=...)``.
        category: what it shows (keypoints, parts).
        truth_camera: for sets with 3-D truth (``<gt_dir>/<split>.npz``), the map from a sample's
            ``sfm_pose`` (..., 7) to the camera (..., 7) that projects the truth; None: no truth.
        help: one line for ``--help``.
    """

    name: str
    loader: type
    category: CategorySpec
    truth_camera: Optional[Callable] = None
    help: str = ""

    @property
    def has_truth(self) -> bool:
        return self.truth_camera is not None


def _synthetic_truth_camera(sfm_pose):
    # imported on use: `python -m umr.data.synth_birds` must not find its module already loaded
    from umr.data.synth_birds import canonical_camera

    return canonical_camera(sfm_pose)


def _registry() -> dict:
    from umr.data.cub import CUBDataset

    return {
        "cub": DatasetSpec("cub", CUBDataset, BIRDS, help="CUB-200-2011 with the CMR cache and SCOPS maps"),
        "synth_birds": DatasetSpec("synth_birds", CUBDataset, BIRDS, _synthetic_truth_camera,
                                   help="the synthetic birds (python -m umr.data.synth_birds), with 3-D truth"),
    }


# name -> DatasetSpec; add a data set here
DATASETS = _registry()


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (--dataset must be one of {sorted(DATASETS)})")
    return DATASETS[name]
