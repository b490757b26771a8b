"""Quaternions, the UMR weak-perspective camera and texture sampling.

Conventions (docs/conventions.md §1, docs/method.md §2):

* Quaternions are ``(w, x, y, z)``, w first, Hamilton product. A rotation acts as
  ``q ⊗ (0, X) ⊗ q̄`` and the quaternion is *not* renormalised inside (the networks output
  unit quaternions); for a non-unit ``q`` the result is scaled by ``|q|²``.
* A camera is the 7-vector ``[s, tx, ty, qw, qx, qy, qz]``. A point X goes to the normalised
  image frame (x right, y **down**, [-1, 1]²) as ``x = s·(R X)_x + tx``, ``y = s·(R X)_y + ty``;
  its depth is ``s·(R X)_z`` (smaller = nearer).

Every function is batched, differentiable and follows its inputs' device and dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from umr.conventions import ALIGN_CORNERS

__all__ = [
    "hamilton_product",
    "quat_conjugate",
    "quat_rotate",
    "quat_to_matrix",
    "matrix_to_quat",
    "axis_angle_to_quat",
    "quat_geodesic_angle",
    "orthographic_proj",
    "orthographic_proj_withz",
    "rotate_cam",
    "mirror_cam",
    "sample_textures",
]


def hamilton_product(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``qa ⊗ qb`` of quaternions (..., 4), broadcasting over leading dims."""
    aw, ax, ay, az = qa.unbind(-1)
    bw, bx, by, bz = qb.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        dim=-1,
    )


def quat_conjugate(q: torch.Tensor) -> torch.Tensor:
    """Conjugate ``(w, -x, -y, -z)`` of quaternions (..., 4)."""
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def quat_rotate(points: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotate points by quaternions: ``vec(q ⊗ (0, X) ⊗ q̄)``.

    Args:
        points: (B, N, 3).
        q: (B, 4), one quaternion per batch element (not renormalised).
    Returns:
        (B, N, 3).
    """
    q = q[:, None, :]
    x_quat = F.pad(points, (1, 0))  # (0, X)
    return hamilton_product(hamilton_product(q, x_quat), quat_conjugate(q))[..., 1:]


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) with ``R X == quat_rotate(X, q)``.

    The homogeneous form is used, so the identity also holds for non-unit ``q`` (then
    ``R = |q|² × rotation``), exactly like :func:`quat_rotate`.
    """
    w, x, y, z = q.unbind(-1)
    ww, xx, yy, zz = w * w, x * x, y * y, z * z
    rows = (
        (ww + xx - yy - zz, 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), ww - xx + yy - zz, 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), ww - xx - yy + zz),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (..., 4) with ``w ≥ 0`` from rotation matrices (..., 3, 3).

    Each of the four algebraically equivalent formulas (led by w, x, y or z) is evaluated and
    the best-conditioned one (largest leading component) is kept per matrix, so the result is
    accurate for every rotation, including 180° ones.
    """
    m = matrix
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # 4·(w², x², y², z²) from the diagonal; clamped so sqrt stays real (and differentiable).
    four_sq = torch.stack(
        (
            1 + m00 + m11 + m22,
            1 + m00 - m11 - m22,
            1 - m00 + m11 - m22,
            1 - m00 - m11 + m22,
        ),
        dim=-1,
    )
    lead = 0.5 * torch.sqrt(four_sq.clamp_min(1e-12))  # |w|, |x|, |y|, |z|
    # Candidate k: component k is `lead[k]`, the others from the off-diagonal sums.
    cands = torch.stack(
        (
            torch.stack((4 * lead[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01), dim=-1),
            torch.stack((m21 - m12, 4 * lead[..., 1] ** 2, m10 + m01, m02 + m20), dim=-1),
            torch.stack((m02 - m20, m10 + m01, 4 * lead[..., 2] ** 2, m12 + m21), dim=-1),
            torch.stack((m10 - m01, m20 + m02, m21 + m12, 4 * lead[..., 3] ** 2), dim=-1),
        ),
        dim=-2,
    ) / (4 * lead[..., :, None])
    best = four_sq.argmax(dim=-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def axis_angle_to_quat(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Quaternion ``(cos(a/2), n·sin(a/2))`` of a rotation by ``angle`` (radians) about ``axis``.

    Args:
        axis: (..., 3), normalised here (so any non-zero length works).
        angle: (...), radians; broadcast against ``axis[..., 0]``.
    Returns:
        (..., 4) unit quaternions.
    """
    axis = F.normalize(axis, dim=-1)
    half = 0.5 * angle
    axis, half = torch.broadcast_tensors(axis, half[..., None])
    return torch.cat((torch.cos(half[..., :1]), axis * torch.sin(half)), dim=-1)


def quat_geodesic_angle(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Angle in radians, in [0, π], of the rotation taking ``q1`` to ``q2`` (both (..., 4)).

    Sign-invariant (q and -q are the same rotation) and accurate for small angles:
    ``2·atan2(|vec(q̄1 ⊗ q2)|, |w(q̄1 ⊗ q2)|)`` on the normalised quaternions.
    """
    rel = hamilton_product(quat_conjugate(F.normalize(q1, dim=-1)), F.normalize(q2, dim=-1))
    return 2 * torch.atan2(rel[..., 1:].norm(dim=-1), rel[..., 0].abs())


def orthographic_proj_withz(points: torch.Tensor, cam: torch.Tensor, offset_z: float = 0.0) -> torch.Tensor:
    """Project points with UMR cameras, keeping depth.

    Args:
        points: (B, N, 3) in the object frame.
        cam: (B, 7) ``[s, tx, ty, qw, qx, qy, qz]``.
        offset_z: added to the (scaled) depth; the renderer uses 5.
    Returns:
        (B, N, 3): ``(s·(RX)_x + tx, s·(RX)_y + ty, s·(RX)_z + offset_z)``, x right, y down.
    """
    scale, trans, quat = cam[:, None, 0:1], cam[:, None, 1:3], cam[:, 3:7]
    rotated = scale * quat_rotate(points, quat)
    return torch.cat((rotated[..., :2] + trans, rotated[..., 2:] + offset_z), dim=-1)


def orthographic_proj(points: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Image positions (B, N, 2) of points (B, N, 3) under cameras (B, 7); see above."""
    return orthographic_proj_withz(points, cam)[..., :2]


def rotate_cam(cam: torch.Tensor, angles_deg: torch.Tensor, axis=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """Rotate cameras about a fixed axis of the camera frame by per-sample angles.

    The new rotation is applied *after* the camera's own (``R' = R_axis(θ) · R(q)``), i.e. the
    object turns about the image's vertical axis for the default y axis; scale and translation
    are kept. Used for the GAN's novel views and the demo's turntable.

    Args:
        cam: (B, 7).
        angles_deg: (B,) or scalar, degrees.
        axis: 3 numbers or a tensor (3,) / (B, 3).
    Returns:
        (B, 7) with quaternion ``q_axis(θ) ⊗ q``.
    """
    angles = torch.as_tensor(angles_deg, dtype=cam.dtype, device=cam.device) * (math.pi / 180.0)
    angles = angles.expand(cam.shape[0])
    axis = torch.as_tensor(axis, dtype=cam.dtype, device=cam.device).expand(cam.shape[0], 3)
    quat = hamilton_product(axis_angle_to_quat(axis, angles), cam[:, 3:7])
    return torch.cat((cam[:, :3], quat), dim=-1)


def mirror_cam(cam: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """The camera that draws a shape symmetric under ``X_axis → −X_axis`` (the template's
    bilateral symmetry, ``--axis``) as the horizontal mirror image of what ``cam`` draws: the
    same view of the object facing the other way.

    With F = diag(−1, 1, 1) the image mirror and S the object mirror, the rotation is
    ``F R S = R_x(π) R R_axis(π)`` (a proper rotation: F = −R_x(π), S = −R_axis(π)) and tx → −tx;
    depths are kept, so the same faces are seen (mirror twins). Applying it twice gives ``cam``
    back (the quaternion up to sign).

    Args:
        cam: (B, 7).
    Returns:
        (B, 7).
    """
    half_turn_x = cam.new_tensor([0.0, 1.0, 0.0, 0.0]).expand(cam.shape[0], 4)
    half_turn_axis = torch.zeros(4, dtype=cam.dtype, device=cam.device)
    half_turn_axis[1 + axis] = 1.0
    quat = hamilton_product(hamilton_product(half_turn_x, cam[:, 3:7]), half_turn_axis.expand(cam.shape[0], 4))
    return torch.cat((cam[:, :1], -cam[:, 1:2], cam[:, 2:3], quat), dim=-1)


def sample_textures(flow: torch.Tensor, image: torch.Tensor, align_corners: bool = ALIGN_CORNERS) -> torch.Tensor:
    """Bilinearly sample per-face texture colours from an image at texture-flow positions.

    Args:
        flow: (B, F, T, T, 2) positions ``(x, y)`` in the normalised image frame [-1, 1]².
        image: (B, C, H, W).
        align_corners: ``grid_sample`` convention. ``True`` (default) is what the original
            (PyTorch 1.1) computed: -1 and +1 are the centres of the first and last pixel.
            Zero padding outside the image.
    Returns:
        (B, F, T, T, C).
    """
    batch, num_faces, tex_size = flow.shape[:3]
    grid = flow.reshape(batch, num_faces, tex_size * tex_size, 2)
    samples = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    return samples.permute(0, 2, 3, 1).reshape(batch, num_faces, tex_size, tex_size, image.shape[1])
