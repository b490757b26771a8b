r"""Synthetic birds with 3-D ground truth, written in the CUB + CMR-cache + SCOPS layout.

    python -m umr.data.synth_birds --out cachedir/synth_birds --num_train 1000 --num_val 100 \
        --num_test 200 --seed 0 [--preview] [--workers 2]

Each bird is a union of ellipsoids in a canonical frame (x forward, y left, z up; left/right
symmetric about y = 0, UMR's axis 1): body, head, beak, tail, two folded wings, with per-instance
proportions, a head turn and a tail pitch. It is coloured per part with procedural patterns,
shaded, and rendered (hard z-buffer, 2x supersampled) by an orthographic camera of the kind CUB
has (mostly side views, elevation −20..60°, small roll, some front and back views) into a larger
photo with a varied background, off-centre. Written under ``--out``:

* ``CUB_200_2011/images/<class>/<name>.jpg`` — the photos (``--cub_dir``);
* ``cachedir/cub/data/<split>_cub_cleaned.mat`` and ``cachedir/cub/sfm/anno_<split>.mat`` —
  the CMR cache (``--cub_cache_dir``): 1-based bbox and keypoints (visibility from the depth
  test), full-image masks, sfm scale / translation / rotation of the true camera;
* ``scops/<class>/<stem>.npz`` — SCOPS-like part probabilities (background, head, neck, back,
  belly) as full-image uint8 maps: the true part map blurred, shifted and perturbed
  (``--scops_path``); with ``--scops_format crop`` the original's per-crop
  ``<stem>_<index>.npy`` files instead;
* ``gt/<split>.npz`` — 3-D truth per image: ``verts`` (N, V, 3) in the canonical frame,
  ``faces``, ``face_parts``, ``kp3d`` (N, 15, 3), ``cam_rot`` (N, 3, 3) canonical → camera,
  ``surface_points`` (N, 2048, 3) uniform on the outer surface (for Chamfer distances), and
  ``sfm_to_canonical`` (the fixed rotation between the sfm frame, symmetric about x as CMR's,
  and the canonical frame).

Keypoint projection: ``x_pix = scale · (rot · X_sfm)_xy + trans`` in 0-based photo pixels, with
``X_sfm = sfm_to_canonicalᵀ · X_canonical``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import scipy.io
import torch
from PIL import Image

from umr import mesh as M
from umr.category import BIRDS
from umr.conventions import to_pixels
from umr.evaluation import sample_surface
from umr.geometry import matrix_to_quat
from umr.renderer import make_renderer, point_visibility

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
NUM_SPECIES = 12
# X_canonical = SFM_TO_CANONICAL @ X_sfm: the sfm frame's x axis (its symmetry axis, as in
# CMR's annotations) is the canonical y axis (UMR's symmetry axis).
SFM_TO_CANONICAL = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def canonical_camera(sfm_pose) -> torch.Tensor:
    """UMR camera(s) (..., 7) of the canonical frame from loader sfm poses (..., 7).

    The loader's normalised sfm pose projects the sfm-frame keypoints; the same scale and
    translation with rotation ``R_sfm · SFM_TO_CANONICALᵀ`` project the canonical mesh.
    """
    from umr.geometry import quat_to_matrix

    sfm_pose = torch.as_tensor(sfm_pose)
    rot = quat_to_matrix(sfm_pose[..., 3:].double()) @ torch.from_numpy(SFM_TO_CANONICAL.T)
    quat = matrix_to_quat(rot).to(sfm_pose.dtype)
    return torch.cat([sfm_pose[..., :3], quat], dim=-1)


@dataclass
class Ellipsoid:
    centre: np.ndarray
    radii: np.ndarray
    rot: np.ndarray  # local -> canonical

    def point(self, direction) -> np.ndarray:
        u = np.asarray(direction, dtype=np.float64)
        return self.centre + self.rot @ (self.radii * u / np.linalg.norm(u))

    def normal(self, direction) -> np.ndarray:
        """Outward unit normal at :meth:`point` of the same direction."""
        u = np.asarray(direction, dtype=np.float64)
        n = self.rot @ (u / np.linalg.norm(u) / self.radii)
        return n / np.linalg.norm(n)

    def inside(self, points: np.ndarray) -> np.ndarray:
        local = (points - self.centre) @ self.rot / self.radii
        return (local**2).sum(-1) < 1


@lru_cache(maxsize=None)
def _unit_sphere(level: int):
    verts, faces = M.icosphere(level)
    return verts, faces


PRIMITIVE_LEVELS = {"body": 3, "head": 3, "beak": 2, "tail": 2, "wing_l": 2, "wing_r": 2}


def bird_shape(rng: np.random.Generator) -> dict:
    """Ellipsoids of one bird: proportions, head turn and tail pitch vary per instance."""
    a, b, c = rng.uniform(0.85, 1.1), rng.uniform(0.42, 0.55), rng.uniform(0.45, 0.6)
    q_body = rot_y(-math.radians(rng.uniform(5, 25)))  # nose up
    body = Ellipsoid(np.zeros(3), np.array([a, b, c]), q_body)
    neck = q_body @ np.array([0.8 * a, 0.0, 0.5 * c])
    r_head = rng.uniform(0.26, 0.36)
    turn = rot_z(math.radians(float(np.clip(rng.normal(0, 12), -30, 30))))  # the articulation
    q_head = turn @ rot_y(-math.radians(rng.uniform(0, 15)))
    head_centre = neck + turn @ (np.array([0.12, 0.0, 0.17]) * rng.uniform(0.8, 1.2))
    head = Ellipsoid(head_centre, r_head * np.array([1.12, 1.0, 1.0]), q_head)
    length, width = rng.uniform(0.18, 0.5), rng.uniform(0.045, 0.09)
    q_beak = q_head @ rot_y(math.radians(rng.uniform(0, 25)))
    beak = Ellipsoid(head_centre + q_beak @ np.array([r_head * 0.95 + length / 2, 0, 0]), np.array([length / 2, width, 0.9 * width]), q_beak)
    tail_len = rng.uniform(0.35, 0.7)
    q_tail = q_body @ rot_y(math.radians(rng.uniform(-25, 20)))  # tail pitch
    attach = q_body @ np.array([-0.85 * a, 0.0, 0.1 * c])
    tail = Ellipsoid(attach + q_tail @ np.array([-0.45 * tail_len, 0, 0]), np.array([tail_len / 2, rng.uniform(0.15, 0.3), rng.uniform(0.04, 0.06)]), q_tail)
    wing_len, wing_h = 0.65 * a * rng.uniform(0.9, 1.15), 0.3 * c * rng.uniform(0.9, 1.2)
    wings = {}
    for name, side in (("wing_l", 1.0), ("wing_r", -1.0)):
        q = q_body @ rot_x(side * math.radians(15)) @ rot_y(-math.radians(10))
        wings[name] = Ellipsoid(q_body @ np.array([-0.15 * a, side * 0.85 * b, 0.2 * c]), np.array([wing_len, 0.09, wing_h]), q)
    return {"body": body, "head": head, "beak": beak, "tail": tail, **wings}


PART = {name: label for label, name in enumerate(BIRDS.part_labels)}  # part name -> SCOPS channel
CHANNELS = len(PART)  # of a part map: the background and the parts
KEYPOINT_ANCHORS = (  # (primitive, local direction), in BIRDS.keypoint_names' order
    ("body", (-0.35, 0, 1)), ("beak", (1, 0, 0)), ("body", (-0.1, 0, -1)), ("body", (0.75, 0, -0.45)),
    ("head", (0, 0, 1)), ("head", (0.7, 0, 0.7)), ("head", (0.55, 0.72, 0.35)), ("body", (0.05, 0.35, -1)),
    ("wing_l", (0, 1, 0.3)), ("head", (-0.75, 0, 0.55)), ("head", (0.55, -0.72, 0.35)), ("body", (0.05, -0.35, -1)),
    ("wing_r", (0, -1, 0.3)), ("tail", (-1, 0, 0)), ("head", (0.35, 0, -0.9)),
)


def species_palette(seed: int, species: int) -> dict:
    rng = np.random.default_rng([seed, 999, species])

    def colour(sat=(0.3, 0.9), val=(0.3, 0.95)):
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]], dtype=np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] / 255.0

    return {
        "head": colour(), "neck": colour(), "back": colour(), "belly": colour(val=(0.55, 1.0)),
        "wing": colour(), "tail": colour(), "beak": colour(sat=(0.2, 0.9), val=(0.1, 0.9)),
        "stripes": int(rng.integers(2, 7)), "eye_stripe": bool(rng.random() < 0.5),
    }


def build_bird(rng: np.random.Generator, palette: dict, light: np.ndarray):
    """Mesh (verts, faces), shaded vertex colours, per-face part labels, 3-D keypoints, and the
    ellipsoids with each face's ellipsoid index."""
    prims = bird_shape(rng)
    verts, faces, colours, parts, face_prim = [], [], [], [], []
    offset = 0
    jitter = rng.uniform(0.9, 1.1)
    noise_freq = rng.uniform(4, 9, size=(3, 3))
    noise_phase = rng.uniform(0, 2 * math.pi, size=3)
    eyes = [prims["head"].point(KEYPOINT_ANCHORS[i][1]) for i in map(BIRDS.keypoint_names.index, ("LEye", "REye"))]
    for name, level in PRIMITIVE_LEVELS.items():
        e = prims[name]
        unit, tri = _unit_sphere(level)
        pts = e.centre + (unit * e.radii) @ e.rot.T
        normals = (unit / e.radii) @ e.rot.T
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        if name == "body":
            region = np.where(unit[:, 0] > 0.55, "neck", np.where(unit[:, 2] >= -0.05, "back", "belly"))
            col = np.stack([palette[r] for r in region])
            speckle = sum(np.sin(pts @ noise_freq[k] + noise_phase[k]) for k in range(3)) / 3
            col = col * (0.85 + 0.15 * np.sign(speckle)[:, None])
            label = np.select([region == "neck", region == "back"], [PART["neck"], PART["back"]], PART["belly"])
        elif name == "head":
            col = np.tile(palette["head"], (len(pts), 1))
            if palette["eye_stripe"]:
                col[(np.abs(unit[:, 2] - 0.35) < 0.12) & (unit[:, 0] > 0)] *= 0.35
            for eye in eyes:
                col[np.linalg.norm(pts - eye, axis=1) < 0.07] = 0.05
            label = np.full(len(pts), PART["head"])
        elif name == "beak":
            col, label = np.tile(palette["beak"], (len(pts), 1)), np.full(len(pts), PART["head"])
        elif name == "tail":
            col, label = np.tile(palette["tail"], (len(pts), 1)), np.full(len(pts), PART["back"])
        else:  # wings: stripes along the wing
            col = np.tile(palette["wing"], (len(pts), 1))
            col = col * (0.72 + 0.28 * (np.sin(palette["stripes"] * math.pi * unit[:, 0]) > 0))[:, None]
            label = np.full(len(pts), PART["back"])
        shade = 0.45 + 0.55 * np.clip(normals @ light, 0, None)
        verts.append(pts)
        faces.append(tri + offset)
        colours.append(np.clip(col * jitter * shade[:, None], 0, 1))
        # a face takes the most common label of its vertices
        face_labels = label[tri]
        parts.append(np.where(face_labels[:, 1] == face_labels[:, 2], face_labels[:, 1], face_labels[:, 0]))
        face_prim.append(np.full(len(tri), len(face_prim)))
        offset += len(pts)
    kp3d = np.stack([prims[name].point(direction) for name, direction in KEYPOINT_ANCHORS])
    kp_normals = np.stack([prims[name].normal(direction) for name, direction in KEYPOINT_ANCHORS])
    return (np.concatenate(verts), np.concatenate(faces), np.concatenate(colours), np.concatenate(parts), kp3d,
            kp_normals, list(prims.values()), np.concatenate(face_prim))


def outer_surface_points(rng, verts, faces, prims, face_prim, count: int = 2048) -> np.ndarray:
    """``count`` points uniformly on the bird's outer surface: area-weighted samples of the
    ellipsoid meshes, without those inside another ellipsoid (the union's hidden parts)."""
    pts, idx = sample_surface(torch.from_numpy(verts), torch.from_numpy(faces).long(), 4 * count,
                              seed=int(rng.integers(2**62)), return_faces=True)
    pts, idx = pts.numpy(), idx.numpy()
    hidden = np.zeros(len(pts), dtype=bool)
    for k, e in enumerate(prims):
        hidden |= (face_prim[idx] != k) & e.inside(pts)
    outer = pts[~hidden]
    return outer[rng.choice(len(outer), size=count, replace=len(outer) < count)]


def sample_view(rng: np.random.Generator) -> np.ndarray:
    """Rotation canonical → camera (x right, y down, z away from the viewer)."""
    # side view: bird forward -> image right, bird up -> image up, bird y -> depth
    base = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])
    kind = rng.random()
    if kind < 0.75:
        azimuth = rng.uniform(-50, 50) + (180 if rng.random() < 0.5 else 0)
    elif kind < 0.9:
        azimuth = rng.uniform(-120, -60)  # from the front
    else:
        azimuth = rng.uniform(60, 120)  # from behind
    elevation = rng.uniform(-20, 60)
    roll = float(np.clip(rng.normal(0, 6), -15, 15))
    # positive elevation tilts the bird's top towards the camera: seen from above
    return rot_z(math.radians(roll)) @ rot_x(math.radians(elevation)) @ base @ rot_z(math.radians(azimuth))


@lru_cache(maxsize=None)
def _sample_photos():
    import skimage.data as samples

    names = ["astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
             "immunohistochemistry", "moon", "rocket", "retina"]
    photos = []
    for name in names:
        img = getattr(samples, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(img[..., :3].astype(np.float32) / 255)
    return photos


def _smooth_noise(rng, height, width, cells, channels=1):
    grid = rng.random((cells, max(2, int(cells * width / height)), channels)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)


def make_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = rng.random()
    if kind < 0.35:  # a crop of a sample photo, tinted and blurred
        photo = _sample_photos()[rng.integers(len(_sample_photos()))]
        ph, pw = photo.shape[:2]
        ch, cw = int(ph * rng.uniform(0.5, 1.0)), int(pw * rng.uniform(0.5, 1.0))
        y0, x0 = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
        bg = cv2.resize(photo[y0 : y0 + ch, x0 : x0 + cw], (width, height), interpolation=cv2.INTER_LINEAR)
        bg = bg * rng.uniform(0.6, 1.2, size=3).astype(np.float32)
    elif kind < 0.65:  # a gradient (sky, water) with soft noise
        c0, c1 = rng.random(3), rng.random(3)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
        t = (xs * math.cos(angle) + ys * math.sin(angle))
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        bg = (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)
        bg += 0.15 * (_smooth_noise(rng, height, width, 6) - 0.5)
    else:  # foliage-like value noise
        noise = sum(_smooth_noise(rng, height, width, cells) / (i + 1) for i, cells in enumerate((4, 12, 36)))
        noise = (noise - noise.min()) / max(noise.max() - noise.min(), 1e-6)
        dark = np.array([0.1, 0.25, 0.05]) * rng.uniform(0.5, 1.5, 3)
        light = np.array([0.5, 0.7, 0.3]) * rng.uniform(0.6, 1.4, 3)
        bg = (dark * (1 - noise) + light * noise).astype(np.float32)
    blur = rng.uniform(0, 3)
    if blur > 0.3:
        bg = cv2.GaussianBlur(bg, (0, 0), blur)
    return np.clip(bg + rng.normal(0, 0.01, bg.shape), 0, 1).astype(np.float32)


def perturb_parts(rng: np.random.Generator, parts: np.ndarray) -> np.ndarray:
    """Make a true (L, L, C) part map as imperfect as SCOPS: blurred, shifted, noisy."""
    size = parts.shape[0]
    out = np.empty_like(parts)
    for ch in range(CHANNELS):
        shift = rng.normal(0, 1.5, 2) * size / 128 if ch > 0 else np.zeros(2)
        moved = cv2.warpAffine(parts[..., ch], np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (size, size),
                               borderMode=cv2.BORDER_CONSTANT, borderValue=1.0 if ch == 0 else 0.0)
        out[..., ch] = cv2.GaussianBlur(moved, (0, 0), rng.uniform(1.0, 2.5) * size / 128)
    out *= np.exp(0.6 * (_smooth_noise(rng, size, size, 5, channels=CHANNELS) - 0.5))
    return out / np.maximum(out.sum(-1, keepdims=True), 1e-6)


def generate_one(task: tuple) -> dict:
    """Render one photo and its annotations (runs in a worker process)."""
    seed, split, index, photo_size, out_dir, scops_format, crop_size, mat_index = task
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    species = int(rng.integers(NUM_SPECIES))
    palette = species_palette(seed, species)
    rot = sample_view(rng)
    light_cam = np.array([rng.uniform(-0.5, 0.5), -0.8, -0.6])  # from above, towards the viewer
    verts, faces, colours, face_parts, kp3d, kp_normals, prims, face_prim = build_bird(
        rng, palette, rot.T @ (light_cam / np.linalg.norm(light_cam)))
    # its own generator, so the truth's sampling does not change the photos of a seed
    surface = outer_surface_points(np.random.default_rng([seed, SPLIT_IDS[split], index, 1]), verts, faces, prims,
                                   face_prim)

    width = photo_size
    height = int(round(photo_size * rng.uniform(0.7, 1.0)))
    projected = verts @ rot.T
    lo, hi = projected[:, :2].min(0), projected[:, :2].max(0)
    extent = float((hi - lo).max())
    bird_px = rng.uniform(0.4, 0.8) * min(height, width)
    window = int(min(math.ceil(bird_px * 1.1) + 2, min(height, width)))
    scale_px = bird_px / extent
    scale_n = 2 * scale_px / window
    trans_n = -scale_n * (lo + hi) / 2
    ox, oy = int(rng.integers(0, width - window + 1)), int(rng.integers(0, height - window + 1))
    quat = matrix_to_quat(torch.from_numpy(rot)).float()
    cam = torch.cat([torch.tensor([scale_n], dtype=torch.float32), torch.from_numpy(trans_n).float(), quat])[None]
    with torch.no_grad():
        renderer = make_renderer(window, "labels")
        out = renderer(torch.from_numpy(verts).float()[None], torch.from_numpy(faces), cam,
                       torch.from_numpy(colours).float()[None])
    rgba = out.image[0].permute(1, 2, 0).numpy()
    face_index = out.face_index[0].numpy()
    labels = np.where(face_index >= 0, face_parts[np.maximum(face_index, 0)], 0)
    onehot = (labels[..., None] == np.arange(CHANNELS)).astype(np.float32)
    window_parts = onehot.reshape(window, 2, window, 2, CHANNELS).mean((1, 3))

    photo = make_background(rng, height, width)
    region = photo[oy : oy + window, ox : ox + window]
    alpha = rgba[..., 3:4]
    photo[oy : oy + window, ox : ox + window] = rgba[..., :3] * alpha + region * (1 - alpha)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[oy : oy + window, ox : ox + window] = alpha[..., 0] > 0.5

    # keypoints: photo pixel (0-based) and visibility by the z-buffer
    cam_pts = kp3d @ rot.T
    x_n = scale_n * cam_pts[:, 0] + trans_n[0]
    y_n = scale_n * cam_pts[:, 1] + trans_n[1]
    # visible: facing the camera and not behind other parts (the depth tolerance absorbs the steep
    # depth change next to the silhouette's edge, where the facing test does the work)
    facing = (kp_normals @ rot.T)[:, 2] < 0.25  # near the silhouette edge (e.g. a beak tip seen side-on) counts
    visible = facing & point_visibility(torch.from_numpy(kp3d).float()[None], cam, out.depth,
                                        renderer.depth_offset, tol=0.1)[0].numpy()
    kp_x = ox + to_pixels(x_n, window, "centre")
    kp_y = oy + to_pixels(y_n, window, "centre")
    visible &= (kp_x >= 0) & (kp_x <= width - 1) & (kp_y >= 0) & (kp_y <= height - 1)
    parts_row = np.where(visible, 1.0, 0.0)
    kp_rows = np.stack([np.where(visible, kp_x + 1, 0), np.where(visible, kp_y + 1, 0), parts_row])

    class_dir = f"{species + 1:03d}.Synthetic_species_{species + 1}"
    stem = f"Synthetic_{split}_{index:05d}"
    rel_path = f"{class_dir}/{stem}.jpg"
    image_path = Path(out_dir) / "CUB_200_2011" / "images" / rel_path
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(image_path, quality=92)

    scops = perturb_parts(rng, window_parts)
    scops_dir = Path(out_dir) / "scops" / class_dir
    scops_dir.mkdir(parents=True, exist_ok=True)
    full = np.zeros((height, width, CHANNELS), dtype=np.float32)
    full[..., 0] = 1
    full[oy : oy + window, ox : ox + window] = scops
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (1, 1, width, height)
    if scops_format == "full":
        np.savez_compressed(scops_dir / f"{stem}.npz", prob=np.round(full * 255).astype(np.uint8))
    else:  # the original's per-crop files, in the loader's un-jittered crop frame
        from umr.data.base import SamplePipeline

        box = SamplePipeline(img_size=crop_size).crop_box(np.array(bbox, dtype=np.float64) - 1, np.random.default_rng(0))
        from umr.data.base import crop as crop_box

        crop = cv2.resize(crop_box(full, box, np.eye(CHANNELS, dtype=np.float32)[0]), (crop_size, crop_size), interpolation=cv2.INTER_LINEAR)
        np.save(scops_dir / f"{stem}_{mat_index}.npy", crop.astype(np.float32))

    sfm_rot = rot @ SFM_TO_CANONICAL
    return {
        "rel_path": rel_path,
        "mask": mask,
        "bbox": bbox,
        "parts": kp_rows,
        "class_id": species + 1,
        "sfm_scale": scale_px,
        "sfm_trans": np.array([ox + to_pixels(trans_n[0], window, "centre"), oy + to_pixels(trans_n[1], window, "centre")]),
        "sfm_rot": sfm_rot,
        "verts": verts.astype(np.float32),
        "faces": faces,
        "face_parts": face_parts,
        "kp3d": kp3d,
        "cam_rot": rot,
        "surface_points": surface.astype(np.float32),
    }


def write_split(out_dir: Path, split: str, records: list) -> None:
    cache = out_dir / "cachedir" / "cub"
    (cache / "data").mkdir(parents=True, exist_ok=True)
    (cache / "sfm").mkdir(parents=True, exist_ok=True)
    (out_dir / "gt").mkdir(parents=True, exist_ok=True)
    images = np.empty(len(records), dtype=[("rel_path", "O"), ("mask", "O"), ("bbox", "O"), ("parts", "O"), ("class_id", "O")])
    sfm = np.empty(len(records), dtype=[("scale", "O"), ("trans", "O"), ("rot", "O")])
    for i, r in enumerate(records):
        x1, y1, x2, y2 = r["bbox"]
        images[i] = (r["rel_path"], r["mask"], {"x1": x1, "y1": y1, "x2": x2, "y2": y2}, r["parts"], r["class_id"])
        sfm[i] = (float(r["sfm_scale"]), r["sfm_trans"], r["sfm_rot"])
    scipy.io.savemat(cache / "data" / f"{split}_cub_cleaned.mat", {"images": images}, do_compression=True)
    anno = {"sfm_anno": sfm}
    kp_sfm = np.stack([r["kp3d"] for r in records]) @ SFM_TO_CANONICAL if records else np.zeros((0, BIRDS.num_keypoints, 3))
    if split == "train" and records:
        anno["S"] = kp_sfm.mean(0).T  # 3 x 15 mean 3-D keypoints (in the sfm frame)
    scipy.io.savemat(cache / "sfm" / f"anno_{split}.mat", anno, do_compression=True)
    np.savez_compressed(
        out_dir / "gt" / f"{split}.npz",
        verts=np.stack([r["verts"] for r in records]) if records else np.zeros((0, 0, 3), np.float32),
        faces=records[0]["faces"] if records else np.zeros((0, 3), np.int64),
        face_parts=records[0]["face_parts"] if records else np.zeros(0, np.int64),
        kp3d=np.stack([r["kp3d"] for r in records]) if records else np.zeros((0, BIRDS.num_keypoints, 3)),
        kp3d_sfm=kp_sfm,
        cam_rot=np.stack([r["cam_rot"] for r in records]) if records else np.zeros((0, 3, 3)),
        surface_points=np.stack([r["surface_points"] for r in records]) if records else np.zeros((0, 2048, 3), np.float32),
        sfm_to_canonical=SFM_TO_CANONICAL,
        part_labels=np.array(BIRDS.part_labels),
        keypoint_names=np.array(BIRDS.keypoint_names),
    )


def generate(out_dir, num_train=1000, num_val=100, num_test=200, seed=0, photo_size=400, workers=None,
             scops_format="full", crop_size=256, progress=True) -> dict:
    """Generate the data set; returns {split: number of images}. See the module docstring."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if scops_format not in ("full", "crop"):
        raise ValueError(f"--scops_format must be 'full' or 'crop', got {scops_format!r}")
    if photo_size < 64:
        raise ValueError(f"--photo_size must be at least 64 pixels, got {photo_size}")
    counts = {"train": num_train, "val": num_val, "test": num_test}
    tasks = [(seed, split, i, photo_size, str(out_dir), scops_format, crop_size, i)
             for split, n in counts.items() for i in range(n)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    bar = tqdm(total=len(tasks), desc="synthetic birds", unit="img", disable=not progress)
    results = []
    if workers == 1:
        for task in tasks:
            results.append(generate_one(task))
            bar.update()
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for record in pool.map(generate_one, tasks, chunksize=4):
                results.append(record)
                bar.update()
    bar.close()
    start = 0
    for split, n in counts.items():
        write_split(out_dir, split, results[start : start + n])
        start += n
    (out_dir / "README.txt").write_text(
        "Synthetic birds (umr). Use with:\n"
        f"  --dataset synth_birds --cub_dir {out_dir / 'CUB_200_2011'} --cub_cache_dir {out_dir / 'cachedir' / 'cub'} --scops_path {out_dir / 'scops'}\n"
        f"generated with: {json.dumps(dict(counts, seed=seed, photo_size=photo_size, scops_format=scops_format))}\n"
    )
    return counts


def truth_template(gt_path, out_dir, num_birds: int = 100, smoothing: int = 10, uv_size=(128, 256)) -> dict:
    """A semantic template made from the 3-D truth, in avg_uv's format (``--stemp_path``), to see
    what a good template looks like and to train stage 2 without stage 1.

    The template's vertices (directions of the unit icosphere, in the canonical frame: x forward,
    y left, z up) are pushed to the mean outer surface of ``num_birds`` true birds of the split
    (mean radius of the surface points around each direction), smoothed by ``smoothing`` steps
    of uniform Laplacian smoothing (stage 2's smoothness priors penalise a bumpy template);
    each vertex takes the part of the nearest true vertex, by majority over the birds. Writes
    ``mean_v.pth``, ``semantic_seg.png`` and ``vertices_idx/`` under ``out_dir`` and returns
    the number of vertices per part.
    """
    from umr.mesh import laplacian_matrix, symmetric_template

    gt = np.load(gt_path)
    mesh = symmetric_template()
    dirs = mesh.verts / np.linalg.norm(mesh.verts, axis=1, keepdims=True)
    vertex_part = np.zeros(gt["verts"].shape[1], dtype=np.int64)
    for k in range(3):
        vertex_part[gt["faces"][:, k]] = gt["face_parts"]
    radii, votes = [], []
    for verts, points in zip(gt["verts"][:num_birds], gt["surface_points"][:num_birds]):
        dist = np.linalg.norm(points, axis=1)
        weight = np.exp((dirs @ (points / dist[:, None]).T - 1) / 0.02)  # a soft cone around each direction
        radius = (weight * dist).sum(1) / weight.sum(1)
        radii.append(radius)
        nearest = ((dirs[:, None] * radius[:, None, None] - verts[None]) ** 2).sum(-1).argmin(1)
        votes.append(vertex_part[nearest])
    template = dirs * np.mean(radii, 0)[:, None]
    smooth = np.eye(len(template)) - laplacian_matrix(mesh.faces, len(template))  # neighbour mean
    for _ in range(smoothing):
        template = 0.5 * template + 0.5 * smooth @ template
    half = template[: mesh.num_output].copy()
    half[: mesh.num_indept, mesh.axis] = 0
    votes = np.stack(votes)
    labels = np.array([np.bincount(column, minlength=BIRDS.num_parts + 1).argmax() for column in votes.T])
    right = slice(mesh.num_indept, mesh.num_output)
    labels[mesh.num_output :] = labels[right]  # exactly symmetric: left vertices copy their right twins
    out_dir = Path(out_dir)
    (out_dir / "vertices_idx").mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(half).float(), out_dir / "mean_v.pth")
    counts = {}
    for k, part in enumerate(BIRDS.part_names, start=1):
        np.save(out_dir / "vertices_idx" / f"{part}_vertices.npy", np.flatnonzero(labels == k).astype(np.int64))
        counts[part] = int((labels == k).sum())
    height, width = uv_size
    u, v = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    phi, theta = u * np.pi, (v + 1) * np.pi / 2  # the UV sampler's parameterisation (umr.mesh)
    texel_dirs = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    seg = labels[(texel_dirs.reshape(-1, 3) @ dirs.T).argmax(1)].reshape(height, width)
    Image.fromarray(seg.astype(np.uint8)).save(out_dir / "semantic_seg.png")
    return counts


def draw_preview(out_dir, path, count: int = 12, img_size: int = 160) -> None:
    """A grid of training crops: the photo with mask outline and visible keypoints, and beside it
    the SCOPS-like part map (head red, neck yellow, back blue, belly green)."""
    from umr.data.cub import CUBDataset

    dataset = CUBDataset(Path(out_dir) / "CUB_200_2011", Path(out_dir) / "cachedir" / "cub", split="train",
                         img_size=img_size, mirror=False, jitter_frac=0.0, scops_path=Path(out_dir) / "scops")
    part_colours = BIRDS.part_colour_array.astype(np.float32)
    tiles = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        photo = np.round(item["img"].transpose(1, 2, 0) * 255).astype(np.uint8).copy()
        contours, _ = cv2.findContours((item["mask"] > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(photo, contours, -1, (255, 255, 255), 1)
        for k, (x, y, v) in enumerate(item["kp"]):
            if v > 0:
                colour = tuple(int(c) for c in cv2.cvtColor(np.uint8([[[k * 12, 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0])
                cv2.circle(photo, (int(to_pixels(x, img_size, "edge")), int(to_pixels(y, img_size, "edge"))), 3, colour, -1)
        parts = item["part_prob"].transpose(1, 2, 0) @ part_colours
        tiles.append(np.concatenate([photo, np.round(np.clip(parts, 0, 1) * 255).astype(np.uint8)], axis=1))
    cols = 3
    rows = math.ceil(len(tiles) / cols)
    grid = np.full((rows * img_size, cols * 2 * img_size, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * img_size : (r + 1) * img_size, c * 2 * img_size : (c + 1) * 2 * img_size] = tile
    Image.fromarray(grid).save(path)


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_string("out", "cachedir/synth_birds", "Output directory (created).")
    flags.DEFINE_integer("num_train", 1000, "Training images.")
    flags.DEFINE_integer("num_val", 100, "Validation images.")
    flags.DEFINE_integer("num_test", 200, "Test images.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same data set.")
    flags.DEFINE_integer("photo_size", 400, "Width of the photos in pixels (height 70-100 % of it).")
    flags.DEFINE_integer("workers", None, "Processes (default: all CPU cores).")
    flags.DEFINE_enum("scops_format", "full", ["full", "crop"],
                      "SCOPS maps as full-image uint8 .npz (default) or the original's per-crop .npy.")
    flags.DEFINE_integer("crop_size", 256, "img_size of the per-crop SCOPS files (--scops_format crop).")
    flags.DEFINE_boolean("preview", False, "Also write <out>/preview.png with samples, masks, keypoints and parts.")
    flags.DEFINE_boolean("truth_template", False,
                         "Also write <out>/truth_template/: a semantic template made from the training split's 3-D "
                         "truth, in avg_uv's format (train_s2 --stemp_path), to see stage 2 alone.")
    FLAGS = flags.FLAGS

    def run(_):
        start = time.time()
        counts = generate(FLAGS.out, FLAGS.num_train, FLAGS.num_val, FLAGS.num_test, FLAGS.seed, FLAGS.photo_size,
                          FLAGS.workers, FLAGS.scops_format, FLAGS.crop_size)
        elapsed = time.time() - start
        print(f"wrote {sum(counts.values())} images ({counts}) to {FLAGS.out} in {elapsed:.1f} s")
        if FLAGS.preview:
            draw_preview(FLAGS.out, Path(FLAGS.out) / "preview.png")
            print(f"preview: {Path(FLAGS.out) / 'preview.png'}")
        if FLAGS.truth_template and FLAGS.num_train:
            counts = truth_template(Path(FLAGS.out) / "gt" / "train.npz", Path(FLAGS.out) / "truth_template")
            print(f"truth template: {Path(FLAGS.out) / 'truth_template'} (vertices per part: {counts})")
        print((Path(FLAGS.out) / "README.txt").read_text(), end="")

    app.run(run, argv=argv)


if __name__ == "__main__":
    main(sys.argv)
