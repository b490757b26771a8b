"""The per-sample image pipeline shared by UMR's loaders (docs/method.md §9.2–9.5).

A sample goes: bbox padding (+ jitter on the train split) → square box → crop (white image /
empty mask outside the photo) → resize to ``img_size`` → optional horizontal mirror → keypoints
and sfm pose normalised to [-1, 1]. SCOPS part maps that come as full-image maps go through the
same crop, resize and mirror (the original used fixed per-crop maps, misaligned under jitter:
quirk Q11).

Pixel conventions (docs/conventions.md §3): keypoints and sfm translation use ``x_n = 2·x/W − 1`` on 0-based
pixel indices; mirroring maps column c to ``W − 1 − c``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

from umr.category import BIRDS, CategorySpec
from umr.conventions import to_normalised

__all__ = [
    "SamplePipeline",
    "perturb_bbox",
    "square_bbox",
    "crop",
    "mirror_sample",
    "part_centre_and_points",
    "barrier_distance_transform",
]



def perturb_bbox(bbox: np.ndarray, pf: float, jf: float, rng: np.random.Generator) -> np.ndarray:
    """Pad the box by ``pf`` of its size on each side and jitter each side by up to ``jf``."""
    x1, y1, x2, y2 = bbox.astype(np.float64)
    w, h = x2 - x1 + 1, y2 - y1 + 1
    u = rng.random(4)
    return np.array(
        [
            x1 - pf * w - (1 - 2 * u[0]) * jf * w,
            y1 - pf * h - (1 - 2 * u[1]) * jf * h,
            x2 + pf * w + (1 - 2 * u[2]) * jf * w,
            y2 + pf * h + (1 - 2 * u[3]) * jf * h,
        ]
    )


def square_bbox(bbox: np.ndarray) -> np.ndarray:
    """Integer square box: grow the shorter side symmetrically to the longer one."""
    x1, y1, x2, y2 = np.round(bbox).astype(np.int64)
    width, height = x2 - x1 + 1, y2 - y1 + 1
    side = max(width, height)
    x1 -= int(np.round((side - width) / 2))
    y1 -= int(np.round((side - height) / 2))
    return np.array([x1, y1, x1 + side - 1, y1 + side - 1])


def crop(image: np.ndarray, bbox: np.ndarray, fill) -> np.ndarray:
    """Crop the inclusive integer box; the part outside the image is ``fill`` (a scalar, or one
    value per channel)."""
    x1, y1, x2, y2 = (int(v) for v in bbox)
    height, width = image.shape[:2]
    out = np.full((y2 - y1 + 1, x2 - x1 + 1) + image.shape[2:], fill, dtype=image.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
    if sx1 <= sx2 and sy1 <= sy2:
        out[sy1 - y1 : sy2 - y1 + 1, sx1 - x1 : sx2 - x1 + 1] = image[sy1 : sy2 + 1, sx1 : sx2 + 1]
    return out


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize (cv2) to size x size, keeping a channel axis if there was one."""
    out = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return out.reshape(size, size, *image.shape[2:])


@dataclass
class Sample:
    """One sample in pixel units, before normalisation (image size W = H = img_size).

    ``kp`` (15, 3): 0-based pixel (x, y) and visibility; ``sfm_rot`` (3, 3); ``sfm_scale`` and
    ``sfm_trans`` (2,) such that ``kp ≈ sfm_scale · (R X)_xy + sfm_trans`` for 3-D keypoints X.
    """

    image: np.ndarray  # (H, W, 3) float
    mask: np.ndarray  # (H, W) float in [0, 1]
    kp: np.ndarray
    sfm_scale: float
    sfm_trans: np.ndarray
    sfm_rot: np.ndarray
    parts: Optional[np.ndarray] = None  # (H, W, 5)
    mirrored: bool = False


def mirror_sample(sample: Sample, category: CategorySpec = BIRDS) -> Sample:
    """Horizontal mirror: image columns c → W − 1 − c, keypoint left/right labels swapped (the
    category's ``keypoint_mirror``), sfm rotation ``D R D`` with D = diag(−1, 1, 1). Applying it
    twice gives the sample back."""
    width = sample.image.shape[1]
    kp = sample.kp.copy()
    kp[:, 0] = width - 1 - kp[:, 0]
    flip = np.diag([-1.0, 1.0, 1.0])
    return Sample(
        image=sample.image[:, ::-1].copy(),
        mask=sample.mask[:, ::-1].copy(),
        kp=kp[category.keypoint_mirror_array],
        sfm_scale=sample.sfm_scale,
        sfm_trans=np.array([width - 1 - sample.sfm_trans[0], sample.sfm_trans[1]]),
        sfm_rot=flip @ sample.sfm_rot @ flip,
        parts=None if sample.parts is None else sample.parts[:, ::-1].copy(),
        mirrored=not sample.mirrored,
    )


def part_centre_and_points(prob: np.ndarray, mask: np.ndarray, num_points: int, rng: np.random.Generator):
    """Centre (2,) and ``num_points`` sampled points (n, 2) of one part map, normalised
    ``2·v/size − 1`` (docs/method.md §9.4).

    pdf = prob ⊙ mask / Σ; the points are the ``num_points`` of ⌊1.5 n⌋ pixels drawn without
    replacement from the pdf that lie closest to the centre. A part with no mass inside the mask
    gives centre (0, 0) and all points there (the original divided by zero: quirk Q17).
    """
    height, width = prob.shape
    mass = prob * mask
    total = mass.sum()
    if not total > 1e-12:
        return np.zeros(2), np.zeros((num_points, 2))
    pdf = (mass / total).reshape(-1)
    rows, cols = np.mgrid[0:height, 0:width]
    xs, ys = to_normalised(cols.reshape(-1), width, "edge"), to_normalised(rows.reshape(-1), height, "edge")
    centre = np.array([(pdf * xs).sum(), (pdf * ys).sum()])
    draws = int(1.5 * num_points)
    support = np.count_nonzero(pdf)
    picked = rng.choice(pdf.size, size=draws, replace=support < draws, p=pdf)
    points = np.stack([xs[picked], ys[picked]], axis=1)
    nearest = np.argsort(((points - centre) ** 2).sum(1), kind="stable")[:num_points]
    return centre, points[nearest]


def barrier_distance_transform(mask: np.ndarray, k: float = 50.0) -> np.ndarray:
    """``sigmoid(k · (d_out − d_in) / max(H, W))`` (docs/method.md §9.5): ≈0 deep inside, 0.5 on the boundary,
    → 1 outside. ``d_out``: distance of pixels with mask ≠ 1 to the nearest mask == 1 pixel;
    ``d_in``: distance of pixels with mask ≠ 0 to the nearest mask == 0 pixel."""
    d_out = distance_transform_edt(mask != 1) if np.any(mask == 1) else np.full(mask.shape, float(max(mask.shape)))
    d_in = distance_transform_edt(mask != 0) if np.any(mask == 0) else np.full(mask.shape, float(max(mask.shape)))
    return 1 / (1 + np.exp(-k * (d_out - d_in) / max(mask.shape)))


@dataclass
class SamplePipeline:
    """Crop/resize/mirror/normalise as the loaders do (docs/method.md §9.2)."""

    img_size: int = 256
    padding_frac: float = 0.05
    jitter_frac: float = 0.0
    mirror: bool = False
    category: CategorySpec = BIRDS

    def crop_box(self, bbox0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Square integer crop box (0-based, inclusive) for a 0-based bbox."""
        return square_bbox(perturb_bbox(bbox0, self.padding_frac, self.jitter_frac, rng))

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        bbox0: np.ndarray,
        kp0: np.ndarray,
        sfm: tuple,
        rng: np.random.Generator,
        parts: Optional[np.ndarray] = None,
        crop_parts: bool = True,
    ) -> Sample:
        """Args: image (H, W, 3) float in [0, 1], mask (H, W), bbox0 0-based [x1, y1, x2, y2],
        kp0 (15, 3) 0-based, sfm (scale, trans (2,), rot (3, 3)) in 0-based pixels, parts: a
        full-image (H, W, 5) map (``crop_parts``) or one already in the crop frame."""
        box = self.crop_box(bbox0, rng)
        scale, trans, rot = sfm
        vis = kp0[:, 2] > 0
        kp = kp0.astype(np.float64).copy()
        kp[vis, :2] -= box[:2]
        trans = np.asarray(trans, dtype=np.float64) - box[:2]
        side = box[2] - box[0] + 1
        factor = self.img_size / side
        kp[vis, :2] *= factor
        sample = Sample(
            image=_resize(crop(image, box, 1.0), self.img_size),
            mask=_resize(crop(mask.astype(np.float64), box, 0.0), self.img_size),
            kp=kp,
            sfm_scale=float(scale) * factor,
            sfm_trans=trans * factor,
            sfm_rot=np.asarray(rot, dtype=np.float64),
        )
        if parts is not None:
            # outside the photo a part map is background (channel 0)
            background = np.eye(parts.shape[-1], dtype=parts.dtype)[0]
            sample.parts = _resize(crop(parts, box, background), self.img_size) if crop_parts else parts
        if self.mirror and rng.random() > 0.5:
            sample = mirror_sample(sample, self.category)
        return sample

    def normalise(self, sample: Sample):
        """(kp (15, 3), sfm scale, sfm trans (2,)) in the normalised frame; invisible keypoints → 0."""
        kp = sample.kp.copy()
        kp[:, :2] = to_normalised(kp[:, :2], self.img_size, "edge")
        kp *= kp[:, 2:3] > 0
        scale = sample.sfm_scale * 2 / self.img_size
        trans = to_normalised(sample.sfm_trans, self.img_size, "edge")
        return kp, scale, trans
