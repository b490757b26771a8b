"""Dense plain-PyTorch reference of the soft rasterizer (docs/rasterizer.md §2–4, 5.4).

Every pixel is tested against every face (O(B·S²·F), chunked over pixels), with the same
float operations in the same order as the kernels' math header (including its precomputed
reciprocals: ``x * (1/σ)`` where the formulas read ``x / σ``), so the two agree to rounding.
Built as a *gradient-equivalent surrogate* (docs/rasterizer.md §5.4): discrete choices (culling, closest
point coefficients, clipped barycentrics, texel indices, the softmax maximum) are detached, so
autograd through this function gives exactly the kernels' analytic gradient. Each chunk is
checkpointed, so memory stays O(chunk) with gradients too. Use it for tests and benchmarks,
not for training.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from umr.conventions import to_normalised
from umr.renderer import RasterOutput, RasterSettings, _prepare_textures

__all__ = ["kept_pairs_reference", "soft_rasterize_reference"]

_EMPTY_DEPTH = 1e7


def _face_setup(face_vertices: torch.Tensor):
    x, y = face_vertices[..., 0], face_vertices[..., 1]  # (B, F, 3)
    x0, x1, x2 = x.unbind(-1)
    y0, y1, y2 = y.unbind(-1)
    det = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    detc = torch.where(det > 0, det.clamp_min(1e-10), det.clamp_max(-1e-10))
    rows = [
        ((y1 - y2) / detc, (x2 - x1) / detc, (x1 * y2 - x2 * y1) / detc),
        ((y2 - y0) / detc, (x0 - x2) / detc, (x2 * y0 - x0 * y2) / detc),
        ((y0 - y1) / detc, (x1 - x0) / detc, (x0 * y1 - x1 * y0) / detc),
    ]
    A = torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)  # (B, F, 3, 3)
    bbox = (x.min(-1).values, x.max(-1).values, y.min(-1).values, y.max(-1).values)
    return A, bbox, det < 0


class _ProdAlpha(torch.autograd.Function):
    """alpha = 1 − Π_f (1 − D_f) over the last dim, with the kernels' gradient
    (1 − alpha) / max(1 − D_f, 1e-6) (docs/rasterizer.md §5.2(a); exact unless D_f > 1 − 1e-6)."""

    @staticmethod
    def forward(ctx, D):
        alpha = 1 - torch.prod(1 - D, dim=-1)
        ctx.save_for_backward(D, alpha)
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha):
        D, alpha = ctx.saved_tensors
        return grad_alpha[..., None] * (1 - alpha)[..., None] / (1 - D).clamp_min(1e-6)


def _sigmoid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The kernel's 1 / (1 + exp(-x)) on valid pairs, 0 elsewhere (masked first: no inf/NaN gradients)."""
    x = torch.where(valid, x, torch.zeros_like(x))
    return torch.where(valid, 1 / (1 + torch.exp(-x)), torch.zeros_like(x))


def _coverage(face_vertices, px, py, s: RasterSettings, threshold, margin):
    """Coverage of the pixels (px, py) (P,) by every face: barycentrics w (B, P, F, 3), the
    closed inside test and the pairs the cull keeps (B, P, F), and the coverage D (B, P, F)."""
    dtype = face_vertices.dtype
    A, (xmin, xmax, ymin, ymax), front = _face_setup(face_vertices)
    X = px[None, :, None]  # (1, P, 1)
    Y = py[None, :, None]
    inbox = ~(
        (X > (xmax + margin)[:, None]) | (X < (xmin - margin)[:, None]) | (Y > (ymax + margin)[:, None]) | (Y < (ymin - margin)[:, None])
    )  # (B, P, F)
    inbox = inbox & torch.isfinite(face_vertices).flatten(2).all(-1)[:, None]  # as the kernels: never rasterized
    w = torch.stack([A[:, None, :, k, 0] * X + A[:, None, :, k, 1] * Y + A[:, None, :, k, 2] for k in range(3)], -1)
    inside = ((w >= 0) & (w <= 1)).all(-1)

    if s.dist_func == "hard":
        valid = inbox & inside
        D = valid.to(dtype)
    elif s.dist_func == "barycentric":
        wd = w.detach()
        m = torch.where(
            wd[..., 0] > wd[..., 1],
            torch.where(wd[..., 1] > wd[..., 2], 2, 1),
            torch.where(wd[..., 0] > wd[..., 2], 2, 0),
        )
        wm = torch.gather(w, -1, m[..., None])[..., 0]
        delta = torch.where(wm.detach() > 0, wm * wm, -(wm * wm))
        valid = inbox & ~(-delta.detach() >= threshold)
        D = _sigmoid(delta * (1.0 / s.sigma_val), valid)
    else:
        strictly = ((w > 0) & (w < 1)).all(-1)
        sign = torch.where(strictly, 1.0, -1.0).to(dtype)
        fx, fy = face_vertices[..., 0][:, None], face_vertices[..., 1][:, None]  # (B, 1, F, 3)
        d2_edges = []
        for k in range(3):
            a, b = k, (k + 1) % 3
            with torch.no_grad():
                ex, ey = fx[..., a] - fx[..., b], fy[..., a] - fy[..., b]
                len2 = ex * ex + ey * ey
                inv_len2 = torch.where(len2 > 0, 1 / len2, 0.0)
                t = (((X - fx[..., b]) * ex + (Y - fy[..., b]) * ey) * inv_len2).clamp(0, 1)
            qx = fx[..., b] + t * (fx[..., a] - fx[..., b]) - X
            qy = fy[..., b] + t * (fy[..., a] - fy[..., b]) - Y
            d2_edges.append(qx * qx + qy * qy)
        d2_edges = torch.stack(d2_edges, -1)
        nearest = d2_edges.detach().argmin(-1, keepdim=True)  # first minimum: ties keep the lower edge
        d2 = torch.gather(d2_edges, -1, nearest)[..., 0]
        valid = inbox & ~((sign < 0) & (d2.detach() >= threshold))
        D = _sigmoid(sign * d2 * (1.0 / s.sigma_val), valid)

    return w, inside, valid, D, front


def _chunk(face_vertices, textures, px, py, rows, cols, s: RasterSettings, threshold, margin):
    """Outputs for the pixels (px, py) (P,): image (B, 4, P), face_index, depth (B, P), p2f sums (B, F, 3)."""
    dtype = face_vertices.dtype
    B, F = face_vertices.shape[:2]
    w, inside, valid, D, front = _coverage(face_vertices, px, py, s, threshold, margin)

    if s.aggr_func_alpha == "prod":
        alpha = _ProdAlpha.apply(D)
    elif s.aggr_func_alpha == "sum":
        alpha = D.sum(-1) / F
    else:
        alpha = (valid & (D > 0.5)).any(-1).to(dtype)  # not differentiable (intended, docs/rasterizer.md §5.2(a))

    with torch.no_grad():
        wb = w.clamp(1e-5, 1 - 1e-5)
        wb = wb * (1 / (wb[..., 0] + wb[..., 1] + wb[..., 2]).clamp_min(1e-5))[..., None]  # kernel's order
    inv_z = 1 / face_vertices[..., 2][:, None]  # (B, 1, F, 3)
    zp = 1 / (wb[..., 0] * inv_z[..., 0] + wb[..., 1] * inv_z[..., 1] + wb[..., 2] * inv_z[..., 2])
    depth_ok = (zp.detach() >= s.near) & (zp.detach() <= s.far)
    facing = torch.ones_like(front) if s.double_side else front
    rgb_ok = valid & depth_ok & facing[:, None]

    if s.texture_type == "surface":
        R = math.isqrt(textures.shape[2])
        with torch.no_grad():
            u, v = wb[..., 0], wb[..., 1]
            i = (u * R).to(torch.int64).clamp(0, R - 1)
            j = (v * R).to(torch.int64).clamp(0, R - 1)
            lam = (u + v) * R - i.to(dtype) - j.to(dtype)
            texel = torch.where(lam <= 1, j * R + i, (R - 1 - j) * R + (R - 1 - i))  # (B, P, F)
        face_ids = torch.arange(F, device=texel.device)[None, None, :].expand_as(texel)
        color = textures[torch.arange(B, device=texel.device)[:, None, None], face_ids, texel]  # (B, P, F, 3)
    else:
        c = textures[:, None]  # (B, 1, F, 3 vertices, 3 channels)
        color = wb[..., 0:1] * c[..., 0, :] + wb[..., 1:2] * c[..., 1, :] + wb[..., 2:3] * c[..., 2, :]

    # z-buffer: first face (ascending index) with the smallest depth among pixel-containing ones
    with torch.no_grad():
        candidate = rgb_ok & inside & (zp < _EMPTY_DEPTH)
        zmasked = torch.where(candidate, zp, torch.full_like(zp, math.inf))
        zbest, fbest = zmasked.min(-1)
        found = candidate.any(-1)
        face_index = torch.where(found, fbest, -1)
        depth = torch.where(found, zbest, math.inf)

    bg = torch.tensor(s.background_color, dtype=dtype, device=px.device)
    p2f = None
    if s.aggr_func_rgb == "hard":
        winner = torch.gather(color, 2, fbest[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
        rgb = torch.where(found[..., None], winner, bg)
    else:
        zeta = (s.far - zp) * (1.0 / (s.far - s.near))
        if not s.rgb_geometry_grad:  # RGB as if the geometry were detached; alpha keeps its gradient
            zeta, D = zeta.detach(), D.detach()
        with torch.no_grad():
            zeta_ok = torch.where(rgb_ok, zeta, torch.full_like(zeta, -math.inf))
            smax = zeta_ok.max(-1).values.clamp_min(s.eps)  # (B, P)
        exponent = torch.where(rgb_ok, (zeta - smax[..., None]) * (1.0 / s.gamma_val), -math.inf)
        weight = torch.exp(exponent) * D
        bg_weight = torch.exp((2 * s.eps - smax) / s.gamma_val)  # background: closeness 2·eps (rasterizer.md §3.8)
        ssum = bg_weight + weight.sum(-1)
        rgb = (bg_weight[..., None] * bg + (weight[..., None] * color).sum(-2)) / ssum[..., None]
        if s.return_p2f:
            with torch.no_grad():
                running = torch.cummax(zeta_ok, dim=-1).values.clamp_min(s.eps)
                u = torch.where(rgb_ok, torch.exp((zeta - running) * (1.0 / s.gamma_val)) * D, torch.zeros_like(D))
                S = s.image_size
                if s.p2f_align_corners:
                    gx, gy = (to_normalised(cols.to(dtype), S, "corners"), to_normalised(rows.to(dtype), S, "corners"))
                    if S == 1:
                        gx, gy = torch.zeros_like(gx), torch.zeros_like(gy)
                else:
                    gx, gy = to_normalised(cols.to(dtype), S, "centre"), to_normalised(rows.to(dtype), S, "centre")
                p2f = torch.stack(
                    [(u * gx[None, :, None]).sum(1), (u * gy[None, :, None]).sum(1), u.sum(1)], dim=-1
                )  # (B, F, 3)
    image = torch.cat([rgb, alpha[..., None]], dim=-1).permute(0, 2, 1)  # (B, 4, P)
    if p2f is None:
        p2f = torch.zeros(B, F, 3, dtype=dtype, device=px.device)
    return image, face_index, depth, p2f


def _cull_radius(s: RasterSettings, dtype):
    """tau = ln(1/dist_eps - 1) * sigma on the squared distance, in the kernels' precision, and
    the bounding-box margin sqrt(tau)."""
    threshold = torch.tensor(math.log(1 / s.dist_eps - 1), dtype=dtype) * torch.tensor(s.sigma_val, dtype=dtype)
    return threshold.item(), torch.sqrt(threshold).item()


def _pixel_grid(S: int, dtype, device):
    """Row, column and screen coordinates (x right, y up) of the S x S pixel centres, row-major."""
    pixel = torch.arange(S * S, device=device)
    rows, cols = pixel // S, pixel % S
    return rows, cols, (2 * cols + 1 - S).to(dtype) / S, (S - 1 - 2 * rows).to(dtype) / S


@torch.no_grad()
def kept_pairs_reference(face_vertices: torch.Tensor, settings: RasterSettings = RasterSettings()) -> torch.Tensor:
    """(B, F, S, S) bool: the (face, pixel) pairs the coverage test keeps (the others are culled:
    no alpha, RGB or gradient), computed densely. Any binning and culling must visit all of them."""
    S = settings.image_size
    threshold, margin = _cull_radius(settings, face_vertices.dtype)
    _, _, px, py = _pixel_grid(S, face_vertices.dtype, face_vertices.device)
    valid = _coverage(face_vertices, px, py, settings, threshold, margin)[2]  # (B, P, F)
    return valid.permute(0, 2, 1).reshape(*face_vertices.shape[:2], S, S)


def soft_rasterize_reference(
    face_vertices: torch.Tensor,
    textures: Optional[torch.Tensor] = None,
    settings: RasterSettings = RasterSettings(),
    max_pairs_per_chunk: int = 2**21,
) -> RasterOutput:
    """Same contract as :func:`umr.renderer.soft_rasterize`, computed densely in PyTorch."""
    s = settings
    textures = _prepare_textures(face_vertices, textures, s)
    dtype, device = face_vertices.dtype, face_vertices.device
    B, F = face_vertices.shape[:2]
    S = s.image_size
    threshold, margin = _cull_radius(s, dtype)
    rows, cols, px, py = _pixel_grid(S, dtype, device)
    chunk = max(1, max_pairs_per_chunk // max(1, B * F))
    needs_grad = torch.is_grad_enabled() and (face_vertices.requires_grad or textures.requires_grad)
    images, indices, depths = [], [], []
    p2f_sum = torch.zeros(B, F, 3, dtype=dtype, device=device)
    for start in range(0, S * S, chunk):
        sl = slice(start, start + chunk)
        args = (face_vertices, textures, px[sl], py[sl], rows[sl], cols[sl], s, threshold, margin)
        if needs_grad:
            out = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            out = _chunk(*args)
        images.append(out[0])
        indices.append(out[1])
        depths.append(out[2])
        p2f_sum = p2f_sum + out[3]
    image = torch.cat(images, dim=-1).reshape(B, 4, S, S)
    face_index = torch.cat(indices, dim=-1).reshape(B, S, S)
    depth = torch.cat(depths, dim=-1).reshape(B, S, S)
    p2f = p2f_sum[..., :2] / p2f_sum[..., 2:].clamp_min(1e-12) if s.return_p2f else None
    return RasterOutput(image, face_index, depth, p2f)
