"""Wavefront OBJ writing and reading, with UMR's per-face textures baked into a texture atlas.

A UMR texture is (F, T, T, 3): sample ``(i, j)`` of a face (v0, v1, v2) was taken at
barycentric weights ``(i/(T−1), j/(T−1), 1 − i/(T−1) − j/(T−1))`` (docs/method.md §1.3).
Each face gets a T x T block of texels (plus a 1-texel replicated border) in one PNG; its three texture
coordinates sit on the centres of texels (T−1, 0), (0, T−1) and (0, 0) of the block, so a
viewer's bilinear lookup interpolates the samples exactly as NMR did. The OBJ records
``tex_size`` in a comment so :func:`load_obj` can recover the (F, T, T, 3) array.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["save_obj", "load_obj"]

_TEX_SIZE_TAG = "# umr tex_size"


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _atlas_layout(num_faces: int, tex_size: int) -> tuple[int, int, int]:
    """(blocks per row, atlas height, atlas width) in texels."""
    block = tex_size + 2
    per_row = math.ceil(math.sqrt(num_faces))
    rows = math.ceil(num_faces / per_row)
    return per_row, rows * block, per_row * block


def _corner_texels(num_faces: int, tex_size: int) -> np.ndarray:
    """(F, 3, 2) (row, col) texel centres of each face's corners v0, v1, v2 in the atlas."""
    per_row, _, _ = _atlas_layout(num_faces, tex_size)
    block = tex_size + 2
    face = np.arange(num_faces)
    origin = np.stack([(face // per_row) * block + 1, (face % per_row) * block + 1], axis=-1)  # texel (0, 0)
    last = tex_size - 1
    offsets = np.array([[last, 0], [0, last], [0, 0]])  # v0: i = T-1; v1: j = T-1; v2: i = j = 0
    return origin[:, None, :] + offsets[None]


def save_obj(path, verts, faces, face_textures=None, vertex_colors=None) -> None:
    """Write a mesh as OBJ; with textures also ``<stem>.mtl`` and ``<stem>.png`` beside it.

    Args:
        path: output ``.obj`` path (its directory is created).
        verts: (V, 3) float array or tensor.
        faces: (F, 3) int array or tensor, 0-based.
        face_textures: optional (F, T, T, 3) colours in [0, 1] (UMR sampler order).
        vertex_colors: optional (V, 3) colours in [0, 1], written as ``v x y z r g b``
            (MeshLab, Blender and trimesh read them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    verts = _as_numpy(verts).astype(np.float64)
    faces = _as_numpy(faces).astype(np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"save_obj: verts must be (V, 3), got {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"save_obj: faces must be (F, 3), got {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError(f"save_obj: face indices must lie in [0, {len(verts)}), got [{faces.min()}, {faces.max()}]")

    lines = []
    if face_textures is not None:
        tex = _as_numpy(face_textures).astype(np.float64)
        if tex.ndim != 4 or tex.shape[0] != len(faces) or tex.shape[1] != tex.shape[2] or tex.shape[3] != 3:
            raise ValueError(f"save_obj: face_textures must be (F={len(faces)}, T, T, 3), got {tex.shape}")
        tex_size = tex.shape[1]
        if tex_size < 2:
            raise ValueError("save_obj: face_textures need T >= 2 samples per side")
        lines += [f"{_TEX_SIZE_TAG} {tex_size}", f"mtllib {path.stem}.mtl"]
    if vertex_colors is not None:
        colors = np.clip(_as_numpy(vertex_colors).astype(np.float64), 0, 1)
        if colors.shape != verts.shape:
            raise ValueError(f"save_obj: vertex_colors must be (V={len(verts)}, 3), got {colors.shape}")
        lines += [f"v {x:.9g} {y:.9g} {z:.9g} {r:.4g} {g:.4g} {b:.4g}" for (x, y, z), (r, g, b) in zip(verts, colors)]
    else:
        lines += [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in verts]
    if face_textures is None:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    else:
        _write_texture(path, tex)
        _, height, width = _atlas_layout(len(faces), tex_size)
        corners = _corner_texels(len(faces), tex_size).reshape(-1, 2)
        lines += [f"vt {(c + 0.5) / width:.9g} {1 - (r + 0.5) / height:.9g}" for r, c in corners]
        lines.append("usemtl material_0")
        lines += [
            f"f {a + 1}/{3 * i + 1} {b + 1}/{3 * i + 2} {c + 1}/{3 * i + 3}" for i, (a, b, c) in enumerate(faces)
        ]
    _atomic_write_text(path, "\n".join(lines) + "\n")


def _write_texture(obj_path: Path, tex: np.ndarray) -> None:
    num_faces, tex_size = tex.shape[:2]
    per_row, height, width = _atlas_layout(num_faces, tex_size)
    block = tex_size + 2
    padded = np.pad(np.clip(tex, 0, 1), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    atlas = np.zeros((height // block, per_row, block, block, 3))
    atlas.reshape(-1, block, block, 3)[:num_faces] = padded
    atlas = atlas.transpose(0, 2, 1, 3, 4).reshape(height, width, 3)
    Image.fromarray(np.round(atlas * 255).astype(np.uint8)).save(obj_path.with_suffix(".png"))
    mtl = "\n".join(
        ["newmtl material_0", "Ka 1 1 1", "Kd 1 1 1", "Ks 0 0 0", "illum 1", f"map_Kd {obj_path.stem}.png", ""]
    )
    _atomic_write_text(obj_path.with_suffix(".mtl"), mtl)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_obj(path) -> dict:
    """Read a triangle OBJ.

    Returns a dict with ``verts`` (V, 3) float64 and ``faces`` (F, 3) int64 (0-based), with
    ``vertex_colors`` (V, 3) when the file has them, and, for files written by
    :func:`save_obj` with textures, ``face_textures`` (F, T, T, 3) in [0, 1] read back from the
    atlas (8-bit precision).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_obj: no such file {path}")
    verts, uvs, faces, face_uvs, colors = [], [], [], [], []
    tex_size, mtllib = None, None
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(_TEX_SIZE_TAG):
            tex_size = int(line.split()[-1])
            continue
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
            if len(parts) >= 7:
                colors.append([float(x) for x in parts[4:7]])
        elif parts[0] == "vt":
            uvs.append([float(x) for x in parts[1:3]])
        elif parts[0] == "f":
            if len(parts) != 4:
                raise ValueError(f"load_obj: {path}:{line_no}: only triangles are supported")
            corners = [p.split("/") for p in parts[1:]]
            faces.append([int(c[0]) - 1 for c in corners])
            if all(len(c) > 1 and c[1] for c in corners):
                face_uvs.append([int(c[1]) - 1 for c in corners])
        elif parts[0] == "mtllib":
            mtllib = path.parent / parts[1]
    out = {"verts": np.array(verts, dtype=np.float64).reshape(-1, 3), "faces": np.array(faces, dtype=np.int64).reshape(-1, 3)}
    if colors and len(colors) == len(verts):
        out["vertex_colors"] = np.array(colors)
    if tex_size is not None and mtllib is not None and len(face_uvs) == len(faces):
        out["face_textures"] = _read_face_textures(mtllib, np.array(uvs)[np.array(face_uvs)], tex_size)
    return out


def _read_face_textures(mtl_path: Path, corner_uvs: np.ndarray, tex_size: int) -> np.ndarray:
    """Sample the atlas at each face's T x T sample positions (nearest texel)."""
    texture_file = None
    for line in mtl_path.read_text().splitlines():
        if line.startswith("map_Kd"):
            texture_file = mtl_path.parent / line.split(maxsplit=1)[1].strip()
    if texture_file is None:
        raise ValueError(f"load_obj: {mtl_path} names no map_Kd texture")
    atlas = np.asarray(Image.open(texture_file).convert("RGB"), dtype=np.float64) / 255
    height, width = atlas.shape[:2]
    # corner_uvs (F, 3, 2) -> texel (row, col) coordinates of v0, v1, v2
    rows = (1 - corner_uvs[..., 1]) * height - 0.5
    cols = corner_uvs[..., 0] * width - 0.5
    corners = np.stack([rows, cols], axis=-1)
    w = np.arange(tex_size) / (tex_size - 1)
    alpha, beta = np.meshgrid(w, w, indexing="ij")
    p0, p1, p2 = (corners[:, k, None, None, :] for k in range(3))
    pos = p2 + alpha[..., None] * (p0 - p2) + beta[..., None] * (p1 - p2)
    r = np.clip(np.round(pos[..., 0]).astype(np.int64), 0, height - 1)
    c = np.clip(np.round(pos[..., 1]).astype(np.int64), 0, width - 1)
    return atlas[r, c]
