"""Template mesh: icosphere, left/right symmetry, UV sampler and mesh regularisers.

The vertex and face order produced here equals the original's (docs/method.md §1.1–1.3): it is
baked into released checkpoints (``mean_v``) and
semantic templates (``vertices_idx/*.npy``), so it must not change.

Mesh construction runs once, in numpy float64; the regularisers are torch modules that
follow their input's device and dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch
from torch import nn

__all__ = [
    "icosphere",
    "SymmetricMesh",
    "make_symmetric",
    "symmetric_template",
    "compute_uv_sampler",
    "uv_image_size",
    "unique_edges",
    "vertex_adjacency",
    "laplacian_matrix",
    "LaplacianLoss",
    "FlattenLoss",
]


# --------------------------------------------------------------------------------------------
# Icosphere (meshzoo 0.4.3's iso_sphere, re-derived from its published algorithm; docs/method.md §1.1)

_T = (1.0 + np.sqrt(5.0)) / 2.0
_ICOSAHEDRON_VERTS = np.array(
    [
        [-1, _T, 0], [1, _T, 0], [-1, -_T, 0], [1, -_T, 0],
        [0, -1, _T], [0, 1, _T], [0, -1, -_T], [0, 1, -_T],
        [_T, 0, -1], [_T, 0, 1], [-_T, 0, -1], [-_T, 0, 1],
    ],
    dtype=np.float64,
)
_ICOSAHEDRON_FACES = np.array(
    [
        [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
        [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
        [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
        [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
    ],
    dtype=np.int64,
)


def _initial_edges(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge table of a mesh: slot k of a face is the edge opposite its local vertex k."""
    slots = np.stack([faces[:, [1, 2]], faces[:, [2, 0]], faces[:, [0, 1]]], axis=1)  # F x 3 x 2
    edges, inverse = np.unique(np.sort(slots, axis=-1).reshape(-1, 2), axis=0, return_inverse=True)
    return edges, inverse.reshape(-1, 3)


def _refine(nodes: list, faces: np.ndarray, edges: np.ndarray, face_edges: np.ndarray):
    """One 1-to-4 subdivision step with the original's exact numbering (docs/method.md §1.1)."""
    new_edges: list[tuple[int, int]] = []
    new_faces: list[tuple[int, int, int]] = []
    new_face_edges: list[tuple[int, int, int]] = []
    midpoint = {}  # old edge id -> (midpoint node id, (id of [a, m], id of [m, b]))
    for face, slots in zip(faces.tolist(), face_edges.tolist()):
        slot_midpoints = []
        nbr_midpoints: list[list[int]] = [[], [], []]
        nbr_halfedges: list[list[int]] = [[], [], []]
        for edge_id in slots:
            a, b = edges[edge_id]
            if edge_id not in midpoint:
                nodes.append(0.5 * (nodes[a] + nodes[b]))
                m = len(nodes) - 1
                new_edges += [(a, m), (m, b)]
                midpoint[edge_id] = (m, (len(new_edges) - 2, len(new_edges) - 1))
            m, (half_a, half_b) = midpoint[edge_id]
            slot_midpoints.append(m)
            nbr_midpoints[face.index(a)].append(m)
            nbr_halfedges[face.index(a)].append(half_a)
            nbr_midpoints[face.index(b)].append(m)
            nbr_halfedges[face.index(b)].append(half_b)
        interior = []
        for k in range(3):
            new_edges.append(tuple(nbr_midpoints[k]))
            interior.append(len(new_edges) - 1)
        new_faces.append(tuple(slot_midpoints))
        new_face_edges.append(tuple(interior))
        for k in range(3):
            new_faces.append((face[k], *nbr_midpoints[k]))
            new_face_edges.append((interior[k], *nbr_halfedges[k]))
    return nodes, np.array(new_faces), np.array(new_edges), np.array(new_face_edges)


def icosphere(subdivisions: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: (V, 3) float64 vertices and (F, 3) int64 faces.

    ``subdivisions`` 3 gives 642 / 1280, 4 gives 2562 / 5120. Midpoints are plain averages of
    the unnormalised coordinates and all nodes are normalised once at the end, so mirror-image
    vertices are bitwise mirror images (``make_symmetric`` relies on exact equality).
    Face winding is not consistent (centre faces are wound opposite to corner faces), as in
    the original; renderers draw both sides.
    """
    if subdivisions < 0:
        raise ValueError(f"subdivisions must be >= 0, got {subdivisions}")
    nodes = list(_ICOSAHEDRON_VERTS)
    faces = _ICOSAHEDRON_FACES
    edges, face_edges = _initial_edges(faces)
    for _ in range(subdivisions):
        nodes, faces, edges, face_edges = _refine(nodes, faces, edges, face_edges)
    verts = np.array(nodes)
    return verts / np.linalg.norm(verts, axis=1, keepdims=True), faces.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Left/right symmetry (docs/method.md §1.2)


@dataclass(frozen=True)
class SymmetricMesh:
    """A mesh reordered for left/right symmetry about coordinate ``axis``.

    Vertices are ordered ``[centre (num_indept), right (num_sym), left (num_sym)]`` with left
    vertex ``num_indept + num_sym + i`` the mirror image of right vertex ``num_indept + i``.
    Faces are ordered ``[independent (num_indept_faces), right (num_sym_faces), left
    (num_sym_faces)]``; left row i is the mirror of right row i with corresponding vertex order.
    """

    verts: np.ndarray  # (V, 3) float64
    faces: np.ndarray  # (F, 3) int64
    axis: int
    num_indept: int
    num_sym: int
    num_indept_faces: int
    num_sym_faces: int

    @property
    def num_output(self) -> int:
        """Vertices of the independent half: centre + right (337 for the level-3 sphere)."""
        return self.num_indept + self.num_sym

    @property
    def num_half_faces(self) -> int:
        """Faces that carry their own texture: independent + right (656 for level 3)."""
        return self.num_indept_faces + self.num_sym_faces

    def symmetrize(self, half: torch.Tensor) -> torch.Tensor:
        """Full (..., V, 3) array from a half (..., num_output, 3): mirror the right block."""
        mirrored = half[..., self.num_indept :, :] * half.new_tensor(_mirror_vector(self.axis))
        return torch.cat((half, mirrored), dim=-2)

    def symmetrize_faces(self, half: torch.Tensor) -> torch.Tensor:
        """Per-face data (B, F, ...) from (B, num_half_faces, ...): left faces copy the right ones.

        Copied unchanged (a texture flow keeps pointing at the same image location), as the
        original does for the texture flow.
        """
        return torch.cat((half, half[:, self.num_indept_faces :]), dim=1)

    @cached_property
    def vertex_mirror_index(self) -> np.ndarray:
        """(V,) index of each vertex's mirror image (centre vertices map to themselves)."""
        i, s = self.num_indept, self.num_sym
        return np.concatenate([np.arange(i), np.arange(i + s, i + 2 * s), np.arange(i, i + s)])


def _mirror_vector(axis: int) -> list[float]:
    vec = [1.0, 1.0, 1.0]
    vec[axis] = -1.0
    return vec


def make_symmetric(verts: np.ndarray, faces: np.ndarray, axis: int = 1) -> SymmetricMesh:
    """Reorder a mirror-symmetric mesh as :class:`SymmetricMesh` (exactly as the original).

    Raises ``ValueError`` when a vertex or face has no exact mirror image.
    """
    coord = verts[:, axis]
    centre = np.flatnonzero(coord == 0)
    left = np.flatnonzero(coord < 0)
    right = np.flatnonzero(coord > 0)
    mirror = verts * np.array(_mirror_vector(axis))
    left_by_bytes = {verts[i].tobytes(): i for i in left}
    try:
        paired_left = np.array([left_by_bytes[mirror[i].tobytes()] for i in right], dtype=np.int64)
    except KeyError:
        raise ValueError("make_symmetric: a vertex with no exact mirror image; the mesh is not symmetric") from None
    if len(paired_left) != len(left):
        raise ValueError("make_symmetric: left and right vertex counts differ")
    order = np.concatenate([centre, right, paired_left])
    new_id = np.empty(len(verts), dtype=np.int64)
    new_id[order] = np.arange(len(order))
    new_verts = verts[order]
    new_faces = new_id[faces]

    num_indept, num_sym = len(centre), len(right)
    sigma = np.concatenate(
        [np.arange(num_indept), np.arange(num_sym) + num_indept + num_sym, np.arange(num_sym) + num_indept]
    )
    face_by_set = {}
    for idx, face in enumerate(new_faces):
        face_by_set.setdefault(frozenset(face.tolist()), idx)
    done = np.zeros(len(new_faces), dtype=bool)
    independent, right_faces, left_faces = [], [], []
    for idx, face in enumerate(new_faces):
        if done[idx]:
            continue
        mirrored = sigma[face]
        if set(mirrored.tolist()) == set(face.tolist()):
            independent.append(face)
            done[idx] = True
            continue
        partner = face_by_set.get(frozenset(mirrored.tolist()))
        if partner is None:
            raise ValueError(f"make_symmetric: face {idx} has no mirror face; the mesh is not symmetric")
        # Which of the pair is "left": the original compares sorted ids but applies the mask to
        # the stored vertex order (docs/method.md §1.2); this mis-sides 18 of 624 pairs at level 3 and is
        # kept for the exact face order of released checkpoints.
        selected = np.sort(face) != np.sort(mirrored)
        face_is_left = bool(np.all(new_verts[face[selected], axis] < new_verts[mirrored[selected], axis]))
        if face_is_left:
            left_faces.append(face)
            right_faces.append(mirrored)
        else:
            left_faces.append(mirrored)
            right_faces.append(face)
        done[idx] = done[partner] = True
    ordered = np.array(independent + right_faces + left_faces, dtype=np.int64).reshape(-1, 3)
    return SymmetricMesh(
        verts=new_verts,
        faces=ordered,
        axis=axis,
        num_indept=num_indept,
        num_sym=num_sym,
        num_indept_faces=len(independent),
        num_sym_faces=len(right_faces),
    )


@lru_cache(maxsize=None)
def symmetric_template(subdivisions: int = 3, axis: int = 1) -> SymmetricMesh:
    """The UMR template: an icosphere made symmetric about ``axis`` (UMR: level 3, axis 1).
    Cached: treat the returned arrays as read-only."""
    return make_symmetric(*icosphere(subdivisions), axis=axis)


# --------------------------------------------------------------------------------------------
# UV parameterisation (docs/method.md §1.3)


def compute_uv_sampler(verts: np.ndarray, faces: np.ndarray, tex_size: int = 6) -> np.ndarray:
    """Spherical UV coordinates of T x T sample points per face.

    Sample ``(i, j)`` of face (v0, v1, v2) is ``X = (α (v0 − v2) + β (v1 − v2)) + v2`` with
    ``α = i/(T−1)``, ``β = j/(T−1)`` (points with α + β > 1 lie on the point-reflected copy of
    the triangle and are used anyway, as in the original). Then ``u = atan2(X_y, X_x)/π``
    (UV-image column) and ``v = 2·arccos(X_z/|X|)/π − 1`` (UV-image row), both in [-1, 1].

    The sum is formed in that order, as the original does: every sample on the seam (y = 0,
    x < 0) then has y exactly 0 and u = +1 (φ ∈ (−π, π]). The algebraically equal
    ``α v0 + β v1 + (1 − α − β) v2`` rounds y to about −6e-18 at three samples (faces 0, 325,
    341), which gives u = −1 there: the other border of the UV image.

    Args:
        verts: (V, 3), normally the unit-sphere template.
        faces: (F, 3), normally the first ``num_half_faces`` faces of the template.
    Returns:
        (F, T, T, 2) float64 ``(u, v)``, ready as a ``grid_sample`` grid.
    """
    weights = np.arange(tex_size) / (tex_size - 1)
    alpha, beta = np.meshgrid(weights, weights, indexing="ij")  # i (alpha) is the slow index
    v0, v1, v2 = (verts[faces[:, k]][:, None, None, :] for k in range(3))
    points = (alpha[..., None] * (v0 - v2) + beta[..., None] * (v1 - v2)) + v2
    radius = np.linalg.norm(points, axis=-1)
    theta = np.arccos(np.clip(points[..., 2] / radius, -1.0, 1.0))
    phi = np.arctan2(points[..., 1], points[..., 0])
    return np.stack([phi / np.pi, 2 * theta / np.pi - 1], axis=-1)


def uv_image_size(num_faces: int, tex_size: int) -> tuple[int, int]:
    """(H, W) of the predicted UV image: ``H = 2^⌊log2(√F · T)⌋``, ``W = 2H`` (128 x 256 for UMR)."""
    height = 2 ** int(np.floor(np.log2(np.sqrt(num_faces) * tex_size)))
    return height, 2 * height


# --------------------------------------------------------------------------------------------
# Connectivity and regularisers (SoftRas losses, docs/rasterizer.md §6)


def unique_edges(faces: np.ndarray) -> np.ndarray:
    """(E, 2) sorted, unique undirected edges (lower id first) of a triangle mesh."""
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(pairs, axis=1), axis=0)


def vertex_adjacency(faces: np.ndarray, num_verts: int) -> np.ndarray:
    """(V, V) boolean adjacency matrix (symmetric, no self loops)."""
    adjacency = np.zeros((num_verts, num_verts), dtype=bool)
    edges = unique_edges(faces)
    adjacency[edges[:, 0], edges[:, 1]] = adjacency[edges[:, 1], edges[:, 0]] = True
    return adjacency


def laplacian_matrix(faces: np.ndarray, num_verts: int) -> np.ndarray:
    """Uniform Laplacian (V, V): 1 on the diagonal, −1/deg(i) for the neighbours of i.

    Raises ``ValueError`` for a vertex used by no face (its row would be 0/0).
    """
    adjacency = vertex_adjacency(faces, num_verts).astype(np.float64)
    degree = adjacency.sum(axis=1)
    if np.any(degree == 0):
        raise ValueError(f"laplacian_matrix: vertex {int(np.argmin(degree))} belongs to no face")
    return np.eye(num_verts) - adjacency / degree[:, None]


class LaplacianLoss(nn.Module):
    """Per-mesh ``Σ_i ‖V_i − mean_{j ∈ N(i)} V_j‖²`` (uniform weights).

    Forward: vertices (B, V, 3) → (B,) losses (UMR takes their mean).
    """

    def __init__(self, faces: np.ndarray, num_verts: int):
        super().__init__()
        # derived from the mesh (not state): kept out of state_dict
        self.register_buffer("laplacian", torch.from_numpy(laplacian_matrix(np.asarray(faces), num_verts)).float(),
                             persistent=False)

    def forward(self, verts: torch.Tensor) -> torch.Tensor:
        lap = self.laplacian.to(verts.dtype)
        return torch.matmul(lap, verts).pow(2).sum(dim=(1, 2))


class FlattenLoss(nn.Module):
    """Per-mesh ``Σ_edges (cos θ_e + 1)²``, θ_e the angle between the two faces' heights.

    As in SoftRas, the edge set is the unique pairs {f0, f1} and {f1, f2} of every face (the
    {f2, f0} pairs are not added: 1607 of 1920 edges on the UMR template). Requires a closed
    2-manifold. Forward: vertices (B, V, 3) → (B,) losses (UMR takes their mean).
    """

    eps = 1e-6

    def __init__(self, faces: np.ndarray):
        super().__init__()
        faces = np.asarray(faces)
        pairs = np.unique(np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]]), axis=1), axis=0)
        # For each edge the opposite vertices of the faces containing it, in face order.
        opposite: dict[tuple[int, int], list[int]] = {}
        for face in faces.tolist():
            for k in range(3):
                a, b = sorted((face[k], face[(k + 1) % 3]))
                opposite.setdefault((a, b), []).append(face[(k + 2) % 3])
        quads = []
        for a, b in pairs.tolist():
            opp = opposite[(a, b)]
            if len(opp) != 2:
                raise ValueError(f"FlattenLoss: edge ({a}, {b}) has {len(opp)} faces; a closed 2-manifold is required")
            quads.append((a, b, opp[0], opp[1]))
        self.register_buffer("quads", torch.tensor(quads, dtype=torch.long).reshape(-1, 4), persistent=False)

    @property
    def num_edges(self) -> int:
        return self.quads.shape[0]

    def forward(self, verts: torch.Tensor) -> torch.Tensor:
        eps = self.eps
        va, vb, vc, vd = (verts[:, self.quads[:, k]] for k in range(4))
        u, p, q = vb - va, vc - va, vd - va
        u_sq = (u * u).sum(-1)
        lu = torch.sqrt(u_sq + eps)
        lp = torch.sqrt((p * p).sum(-1) + eps)
        lq = torch.sqrt((q * q).sum(-1) + eps)
        up, uq = (u * p).sum(-1), (u * q).sum(-1)
        cos_p, cos_q = up / (lu * lp + eps), uq / (lu * lq + eps)
        sin_p, sin_q = torch.sqrt(1 - cos_p**2 + eps), torch.sqrt(1 - cos_q**2 + eps)
        h_p = p - u * (up / (u_sq + eps))[..., None]
        h_q = q - u * (uq / (u_sq + eps))[..., None]
        cos_theta = (h_p * h_q).sum(-1) / (lp * sin_p * lq * sin_q + eps)
        return (cos_theta + 1).pow(2).sum(dim=1)
