"""CUB-200-2011 with the CMR annotation cache and SCOPS part maps (docs/formats.md §1).

Files (``cub_dir`` = CUB root, ``cub_cache_dir`` = CMR cache):

* ``<cub_dir>/images/<rel_path>``: the photos;
* ``<cub_cache_dir>/data/<split>_cub_cleaned.mat``: variable ``images``, one struct per image with
  ``rel_path``, ``mask`` (full-image 0/1), ``bbox`` (``x1 y1 x2 y2``, 1-based inclusive) and
  ``parts`` (3 x 15: x, y 1-based, visibility);
* ``<cub_cache_dir>/sfm/anno_<split>.mat``: variable ``sfm_anno``, structs with ``scale``,
  ``trans`` (2,), ``rot`` (3 x 3), aligned with ``images``;
* SCOPS part probabilities (channels background, head, neck, back, belly) under ``scops_path``,
  either as the original's per-crop ``<parent>/<stem>_<index>.npy`` (``img_size`` x ``img_size``
  x 5, already in the loader's crop frame) or as full-image maps ``<parent>/<stem>.npy`` /
  ``<stem>.npz`` (array ``prob``; H x W x 5, float in [0, 1] or uint8 0..255), which are
  cropped, resized and mirrored together with the photo.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.io
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from umr.data.base import SamplePipeline, barrier_distance_transform, part_centre_and_points
from umr.category import BIRDS, CategorySpec
from umr.geometry import matrix_to_quat

__all__ = ["CUBDataset", "KeypointPairs", "make_loader", "DataError", "DataWarning", "read_image", "image_has_alpha"]

SPLITS = ("train", "val", "test", "all")
_IMAGE_FIELDS = ("rel_path", "mask", "bbox", "parts")
_SFM_FIELDS = ("scale", "trans", "rot")


class DataError(ValueError):
    """A data file or directory is missing or malformed; the message names it and the flag to fix."""


class DataWarning(UserWarning):
    """A data file that loads but is suspect (e.g. an empty mask); the message names it."""


def _load_mat(path: Path, variable: str, flag: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path} (check --{flag}; it must be the CMR cache directory)")
    try:
        content = scipy.io.loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except Exception as err:  # scipy raises several types for corrupt files
        raise DataError(f"could not read {path}: {err} (check --{flag})") from err
    if variable not in content:
        raise DataError(f"{path} has no variable '{variable}' (expected the CMR cache format; check --{flag})")
    return np.atleast_1d(content[variable])


def _check_fields(entries: np.ndarray, fields, path: Path, flag: str) -> None:
    for i, entry in enumerate(entries):
        missing = [f for f in fields if not hasattr(entry, f)]
        if missing:
            raise DataError(
                f"{path}: entry {i} has no field(s) {missing}; expected {list(fields)} (CMR cache format, --{flag})"
            )


def image_has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def read_image(path: Path, hint: str = "check --cub_dir; images are read from <cub_dir>/images/") -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1]. Grayscale is replicated; 16- and 32-bit grayscale is
    scaled from its full range (65535), not clipped at 255; transparent pixels are composited
    over white (:func:`image_has_alpha` tells whether there were any). ``hint`` ends the error
    message of a missing or unreadable file."""
    if not path.is_file():
        raise DataError(f"image not found: {path} ({hint})")
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float grayscale
                gray = np.asarray(im, dtype=np.float32)
                gray = gray / (65535.0 if im.mode != "F" else max(1.0, float(gray.max())))
                return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=-1)
            if image_has_alpha(im):
                rgba = np.asarray(im.convert("RGBA")).astype(np.float32) / 255.0
                alpha = rgba[..., 3:]
                return rgba[..., :3] * alpha + (1 - alpha)
            array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"could not read image {path}: {err} ({hint})") from err
    return array.astype(np.float32) / 255.0


class CUBDataset(Dataset):
    """CUB samples cropped around the bird (docs/method.md §9.2).

    Args:
        cub_dir, cub_cache_dir: see the module docstring.
        split: 'train' | 'val' | 'test' | 'all'.
        img_size, padding_frac: crop size and box padding.
        jitter_frac: box jitter, applied on the train split only (as the original).
        mirror: random horizontal mirroring. The original mirrored in every loader, test ones
            included (quirk Q13); ``None`` (default) mirrors only the train split.
        scops_path: directory of SCOPS part maps; None to load none.
        seed: augmentation (jitter, mirroring, part-point sampling) is a function of
            ``(seed, epoch, index)`` only — the same in any DataLoader worker and after a resume;
            :meth:`set_epoch` varies it between epochs.

    Each item is a dict of numpy arrays with the keys, shapes and dtypes of the sample contract,
    ``umr.data.SAMPLE_FIELDS`` (the part keys only with SCOPS).
    """

    def __init__(
        self,
        cub_dir,
        cub_cache_dir,
        split: str = "train",
        img_size: int = 256,
        padding_frac: float = 0.05,
        jitter_frac: float = 0.05,
        mirror: Optional[bool] = None,
        scops_path=None,
        seed: int = 0,
        category: CategorySpec = BIRDS,
    ):
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}' (--split must be one of {SPLITS})")
        self.cub_dir, self.cache_dir = Path(cub_dir), Path(cub_cache_dir)
        if not (self.cub_dir / "images").is_dir():
            raise DataError(f"CUB image directory not found: {self.cub_dir / 'images'} (set --cub_dir to the CUB_200_2011 folder)")
        if not self.cache_dir.is_dir():
            raise DataError(f"CMR cache directory not found: {self.cache_dir} (set --cub_cache_dir)")
        self.split = split
        anno_path = self.cache_dir / "data" / f"{split}_cub_cleaned.mat"
        sfm_path = self.cache_dir / "sfm" / f"anno_{split}.mat"
        self.anno_path = anno_path
        self.anno = _load_mat(anno_path, "images", "cub_cache_dir")
        self.sfm = _load_mat(sfm_path, "sfm_anno", "cub_cache_dir")
        _check_fields(self.anno, _IMAGE_FIELDS, anno_path, "cub_cache_dir")
        _check_fields(self.sfm, _SFM_FIELDS, sfm_path, "cub_cache_dir")
        if len(self.anno) != len(self.sfm):
            raise DataError(f"{anno_path} has {len(self.anno)} images but {sfm_path} has {len(self.sfm)} sfm entries")
        self.scops_path = None if scops_path is None else Path(scops_path)
        if self.scops_path is not None and not self.scops_path.is_dir():
            raise DataError(f"SCOPS directory not found: {self.scops_path} (set --scops_path, or train without SCOPS)")
        self.seed, self.epoch = int(seed), 0
        self.pipeline = SamplePipeline(
            img_size=img_size,
            padding_frac=padding_frac,
            jitter_frac=jitter_frac if split == "train" else 0.0,
            mirror=(split == "train") if mirror is None else mirror,
            category=category,
        )
        self.category = category

    def __len__(self) -> int:
        return len(self.anno)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentations of this epoch (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def image_path(self, index: int) -> Path:
        return self.cub_dir / "images" / str(self.anno[index].rel_path)

    def _part_file(self, index: int):
        """(path, is_per_crop) of the SCOPS map of an image."""
        rel = Path(str(self.anno[index].rel_path))
        stem = rel.name.split(".")[0]
        folder = self.scops_path / rel.parent
        candidates = [(folder / f"{stem}_{index}.npy", True), (folder / f"{stem}.npy", False), (folder / f"{stem}.npz", False)]
        for path, per_crop in candidates:
            if path.is_file():
                return path, per_crop
        names = ", ".join(str(p) for p, _ in candidates)
        raise DataError(f"no SCOPS part map for image {index} ({rel}); looked for {names} (check --scops_path)")

    def _load_parts(self, index: int, image_shape) -> tuple:
        path, per_crop = self._part_file(index)
        try:
            prob = np.load(path)
            if isinstance(prob, np.lib.npyio.NpzFile):
                prob = prob["prob"]
        except Exception as err:
            raise DataError(f"could not read SCOPS file {path}: {err}") from err
        if prob.dtype == np.uint8:
            prob = prob.astype(np.float32) / 255.0
        elif prob.dtype == np.uint16:
            prob = prob.astype(np.float32) / 65535.0
        elif not np.issubdtype(prob.dtype, np.floating):
            raise DataError(f"SCOPS file {path} holds {prob.dtype} values; expected probabilities as float in [0, 1], "
                            "uint8 (0..255) or uint16 (0..65535)")
        else:
            if not np.isfinite(prob).all():
                raise DataError(f"SCOPS file {path} holds NaN or infinite values")
            low, high = float(prob.min(initial=0.0)), float(prob.max(initial=0.0))
            if low < -1e-3 or high > 1 + 1e-3:
                raise DataError(f"SCOPS file {path} holds values from {low:g} to {high:g}; float part maps must be "
                                "probabilities in [0, 1] (store 0..255 maps as uint8)")
        size, channels = self.pipeline.img_size, len(self.category.part_labels)
        expected = (size, size, channels) if per_crop else (image_shape[0], image_shape[1], channels)
        if prob.shape != expected:
            kind = "a per-crop map" if per_crop else "a full-image map of this photo"
            raise DataError(f"SCOPS file {path} has shape {prob.shape}; as {kind} it must be {expected} (channels {', '.join(self.category.part_labels)})")
        return prob.astype(np.float32), per_crop

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        entry, sfm = self.anno[index], self.sfm[index]
        image = read_image(self.image_path(index))
        mask = np.asarray(entry.mask, dtype=np.float32)
        if mask.shape != image.shape[:2]:
            raise DataError(f"image {index} ({entry.rel_path}): mask is {mask.shape} but the photo is {image.shape[:2]}")
        if not mask.any():
            warnings.warn(f"image {index} ({entry.rel_path}) of {self.anno_path} has an empty mask: it gives no "
                          "silhouette to learn from", DataWarning, stacklevel=2)
        b = entry.bbox
        bbox0 = np.array([b.x1, b.y1, b.x2, b.y2], dtype=np.float64) - 1
        kp0 = np.asarray(entry.parts, dtype=np.float64).T.copy()
        vis = kp0[:, 2] > 0
        kp0[vis, :2] -= 1
        parts, per_crop = (None, False) if self.scops_path is None else self._load_parts(index, image.shape)
        sample = self.pipeline(
            image,
            mask,
            bbox0,
            kp0,
            (float(sfm.scale), np.asarray(sfm.trans, dtype=np.float64), np.asarray(sfm.rot, dtype=np.float64)),
            rng,
            parts=parts,
            crop_parts=not per_crop,
        )
        kp, scale, trans = self.pipeline.normalise(sample)
        quat = matrix_to_quat(torch.from_numpy(sample.sfm_rot)).numpy()
        item = {
            "img": np.ascontiguousarray(sample.image.transpose(2, 0, 1), dtype=np.float32),
            "mask": sample.mask.astype(np.float32),
            "mask_dt": barrier_distance_transform(sample.mask).astype(np.float32),
            "kp": kp.astype(np.float32),
            "sfm_pose": np.concatenate([[scale], trans, quat]).astype(np.float32),
            "inds": index,
            "img_path": str(self.image_path(index)),
            "mirrored": sample.mirrored,
        }
        if sample.parts is not None:
            item["part_prob"] = np.ascontiguousarray(sample.parts.transpose(2, 0, 1), dtype=np.float32)
            for channel, name in enumerate(self.category.part_names, start=1):
                centre, points = part_centre_and_points(sample.parts[..., channel], sample.mask,
                                                        self.category.part_points[name], rng)
                item[f"{name}_center"] = centre.astype(np.float32)
                item[f"{name}_points"] = points.astype(np.float32)
        return item


class KeypointPairs(Dataset):
    """Image pairs for keypoint transfer (``test_kp``, docs/method.md §14.1).

    ``number_pairs`` pairs drawn with replacement by ``np.random.RandomState(seed)``
    (seed default: the dataset length, as the original): first all first images, then all
    second images. Item n holds both images stacked: ``img`` (2, 3, S, S), ``kp`` (2, 15, 3), ...
    """

    def __init__(self, dataset: CUBDataset, number_pairs: int, seed: Optional[int] = None):
        self.dataset = dataset
        distinct = len(dataset) * (len(dataset) - 1)
        if number_pairs > distinct:
            raise DataError(f"--number_pairs {number_pairs} is more than the {distinct} distinct ordered pairs of the "
                            f"split's {len(dataset)} images (pairs would repeat or pair an image with itself)")
        rng = np.random.RandomState(len(dataset) if seed is None else seed)
        self.first = rng.randint(len(dataset), size=number_pairs)
        self.second = rng.randint(len(dataset), size=number_pairs)

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, n: int) -> dict:
        a, b = self.dataset[int(self.first[n])], self.dataset[int(self.second[n])]
        return {
            key: np.stack([a[key], b[key]]) if isinstance(a[key], np.ndarray) else [a[key], b[key]]
            for key in a
        }


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, num_workers: int = 4) -> DataLoader:
    """A DataLoader whose worker errors surface in the main process (never a silent hang)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=False,
        # a worker that dies without an exception is reported after this many seconds
        timeout=600 if num_workers > 0 else 0,
    )
