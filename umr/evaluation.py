"""Evaluation measures (docs/method.md §14) and 3-D measures for the synthetic set.

Everything is batched over images (or image pairs) and follows the inputs' device. Coordinates
are UMR's normalised image frame (x right, y down, [-1, 1]²).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from umr.category import BIRDS
from umr.conventions import ALIGN_CORNERS, to_pixels
from umr.geometry import matrix_to_quat, orthographic_proj, orthographic_proj_withz, quat_geodesic_angle, quat_to_matrix
from umr.losses import soft_iou
from umr.renderer import face_pixel_centers, point_visibility

__all__ = [
    "keypoint_heatmaps",
    "identity_grid",
    "transfer_by_flow",
    "transfer_by_camera",
    "PCKAccumulator",
    "mask_iou",
    "align_rotations",
    "sample_surface",
    "chamfer_fscore",
    "oracle_texture_flow",
    "view_space",
    "rotation_of",
    "predict",
    "with_render",
    "transfer_keypoints",
    "sample_surfaces",
    "surface_distances",
    "Validator",
]


def keypoint_heatmaps(kp: torch.Tensor, size: int, sigma: float = 3.0) -> torch.Tensor:
    """Unnormalised Gaussian heat maps (N, K, size, size) of keypoints (N, K, 2) in [-1, 1].

    As the original: a (6σ+1)² patch, peak 1, pasted per axis from ``int(p − 3σ)`` up to (not
    including) ``int(p + 3σ + 1)`` of the pixel position ``p = (k + 1)/2 · size``, both truncated
    towards zero on their own, clipped to the image. The peak lands at ``int(p − 3σ) + 3σ``;
    where ``p − 3σ`` is negative and not whole the two truncations round in opposite directions
    and the patch loses its last row (or column).
    """
    radius = int(3 * sigma)
    pix = to_pixels(kp, size, "edge")
    corner = torch.trunc(pix - radius)  # Python int() semantics
    end = torch.trunc(pix + radius + 1)
    centre = corner + radius  # where the patch's peak lands
    coords = torch.arange(size, device=kp.device, dtype=kp.dtype)

    def profile(axis):  # (N, K, size): the patch's row (or column) profile along one axis
        d = coords - centre[..., axis : axis + 1]
        inside = (d.abs() <= radius) & (coords < end[..., axis : axis + 1])
        return torch.exp(-d**2 / (2 * sigma**2)) * inside

    return profile(1)[..., :, None] * profile(0)[..., None, :]


def identity_grid(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 2, size, size) image whose pixel (r, c) holds its own ``affine_grid`` position
    (x, y) with ``align_corners=True``."""
    theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], device=device, dtype=dtype)
    return F.affine_grid(theta, (1, 2, size, size), align_corners=ALIGN_CORNERS).permute(0, 3, 1, 2)


def _face_locations(flow: torch.Tensor, size: int) -> torch.Tensor:
    """(N, F, 2): per face, the mean of the identity grid sampled at its flow samples."""
    n, num_faces = flow.shape[:2]
    grid = identity_grid(size, flow.device, flow.dtype).expand(n, -1, -1, -1)
    samples = F.grid_sample(grid, flow.reshape(n, num_faces, -1, 2), align_corners=ALIGN_CORNERS)  # (N, 2, F, S)
    return samples.mean(-1).permute(0, 2, 1)


def transfer_by_flow(flow_src: torch.Tensor, flow_tgt: torch.Tensor, kp_src: torch.Tensor, size: int,
                     sigma: float = 3.0, visible_src=None) -> torch.Tensor:
    """Keypoint transfer through the texture flows (docs/method.md §14.1, flow mode).

    Args:
        flow_src, flow_tgt: (N, F, T, T, 2) texture flows of the source and target images.
        kp_src: (N, K, 2) source keypoints. size: image size in pixels.
        visible_src: optional (N, F) faces visible in the source; only they can carry a keypoint
            (the original considered all faces: a hidden face whose flow samples the same pixels
            could win).
    Returns:
        (N, K, 2): for each keypoint, the target location of the face whose source flow samples
        its heat map most.
    """
    n, num_faces = flow_src.shape[:2]
    heat = keypoint_heatmaps(kp_src, size, sigma)  # (N, K, H, W)
    score = F.grid_sample(heat, flow_src.reshape(n, num_faces, -1, 2), align_corners=ALIGN_CORNERS).mean(-1)  # (N, K, F)
    if visible_src is not None:
        usable = visible_src | ~visible_src.any(1, keepdim=True)  # no visible face: all count
        score = torch.where(usable[:, None, :], score, -math.inf)
    best = score.argmax(-1)  # (N, K)
    locations = _face_locations(flow_tgt, size)  # (N, F, 2)
    return torch.gather(locations, 1, best[..., None].expand(-1, -1, 2))


def transfer_by_camera(verts_src, cam_src, verts_tgt, cam_tgt, mask_tgt, kp_src, visible_src=None) -> torch.Tensor:
    """Keypoint transfer through the cameras (docs/method.md §14.1, cam mode).

    Each source keypoint goes to its nearest vertex as projected by the source camera; that
    vertex, projected by the target camera, goes to its nearest foreground pixel of the target
    (predicted) mask, whose ``affine_grid`` position is the answer.

    Args:
        verts_src, verts_tgt: (N, V, 3) corresponding vertices (UMR: both the template T̄).
        cam_src, cam_tgt: (N, 7). mask_tgt: (N, H, W), foreground where > 0. kp_src: (N, K, 2).
        visible_src: optional (N, V) vertices visible in the source; only they can carry a
            keypoint (the original used all: a hidden vertex behind the keypoint could win).
    Returns:
        (N, K, 2); a target with an empty mask gives (0, 0).
    """
    n, size = mask_tgt.shape[0], mask_tgt.shape[-1]
    proj_src = orthographic_proj(verts_src, cam_src)
    proj_tgt = orthographic_proj(verts_tgt, cam_tgt)
    dist = torch.cdist(kp_src, proj_src)  # (N, K, V)
    if visible_src is not None:
        usable = visible_src | ~visible_src.any(1, keepdim=True)  # no visible vertex: all count
        dist = torch.where(usable[:, None, :], dist, math.inf)
    vertex = dist.argmin(-1)  # (N, K)
    chosen = torch.gather(proj_tgt, 1, vertex[..., None].expand(-1, -1, 2))  # (N, K, 2)
    grid = identity_grid(size, mask_tgt.device, proj_tgt.dtype).reshape(2, -1).t()  # (H*W, 2)
    foreground = mask_tgt.reshape(n, 1, -1) > 0  # (N, 1, H*W)
    to_pixels = torch.cdist(chosen, grid[None].expand(n, -1, -1)).masked_fill(~foreground, math.inf)
    out = grid[to_pixels.argmin(-1)].to(kp_src.dtype)  # (N, K, 2)
    return out.masked_fill(~foreground.any(-1, keepdim=True), 0.0)


class PCKAccumulator:
    """PCK per keypoint: a transfer counts where the keypoint is visible in both images; the
    error (normalised units) is scaled by ``(1 + 2·padding_frac)/2`` to a fraction of the tight
    bounding box's longer side (docs/method.md §14.1)."""

    def __init__(self, num_kps: int = BIRDS.num_keypoints, alphas=(0.1, 0.15), padding_frac: float = 0.05):
        self.alphas = alphas
        self.scale = (1 + 2 * padding_frac) / 2
        self.hits = np.zeros((len(alphas), num_kps))
        self.counts = np.zeros(num_kps)

    def add(self, pred: torch.Tensor, kp_tgt: torch.Tensor, vis_src: torch.Tensor) -> None:
        """pred (N, K, 2); kp_tgt (N, K, 3) with visibility; vis_src (N, K)."""
        both = ((vis_src > 0) & (kp_tgt[..., 2] > 0)).cpu().numpy()
        err = ((pred - kp_tgt[..., :2]).norm(dim=-1) * self.scale).cpu().numpy()
        self.counts += both.sum(0)
        for a, alpha in enumerate(self.alphas):
            self.hits[a] += ((err < alpha) & both).sum(0)

    def result(self) -> dict:
        with np.errstate(invalid="ignore", divide="ignore"):
            per_kp = self.hits / self.counts  # NaN for keypoints never visible in both
        out = {f"PCK.{str(alpha)[2:]}": float(np.nanmean(per_kp[a])) for a, alpha in enumerate(self.alphas)}
        out["per_keypoint"] = {f"{alpha}": [None if math.isnan(v) else float(v) for v in per_kp[a]]
                               for a, alpha in enumerate(self.alphas)}
        out["counts"] = self.counts.astype(int).tolist()
        return out


def mask_iou(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image ``Σ(M·Â) / Σ(M + Â − M·Â)`` with soft masks, no thresholding (docs/method.md §14.2); 0 for
    two empty masks."""
    return soft_iou(alpha, mask, 1e-12)


def align_rotations(pred: torch.Tensor, true: torch.Tensor):
    """Rotation errors after the best global alignment of the two canonical frames.

    A learned model fixes its own canonical frame, so predicted camera rotations equal the true
    ones only up to one fixed rotation G (``R_pred · G ≈ R_true``). G is the orthogonal
    Procrustes solution over the whole set; the error of image i is the geodesic angle between
    ``R_pred,i · G`` and ``R_true,i``.

    Args: pred, true: (N, 3, 3) rotation matrices (object → camera).
    Returns: (errors in degrees (N,), G (3, 3)).
    """
    m = (pred.transpose(1, 2) @ true).sum(0).double()
    u, _, vt = torch.linalg.svd(m)
    d = torch.sign(torch.det(u @ vt))
    g = (u @ torch.diag(torch.tensor([1.0, 1.0, float(d)], dtype=m.dtype)) @ vt).to(pred.dtype)
    aligned = pred @ g
    err = quat_geodesic_angle(matrix_to_quat(aligned), matrix_to_quat(true))
    return torch.rad2deg(err), g


def sample_surface(verts: torch.Tensor, faces: torch.Tensor, num: int, seed: int = 0, return_faces: bool = False):
    """``num`` points (num, 3) uniformly on the surface of one mesh (area-weighted, seeded);
    with ``return_faces`` also the index (num,) of the face each point lies on."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tri = verts[faces]  # (F, 3, 3)
    areas = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
    idx = torch.multinomial(areas.cpu().double() + 1e-20, num, replacement=True, generator=g).to(verts.device)
    u = torch.rand(num, 2, generator=g, dtype=verts.dtype).to(verts.device)
    flip = u.sum(1) > 1
    u[flip] = 1 - u[flip]
    t = tri[idx]
    points = t[:, 0] + u[:, :1] * (t[:, 1] - t[:, 0]) + u[:, 1:] * (t[:, 2] - t[:, 0])
    return (points, idx) if return_faces else points


def chamfer_fscore(a: torch.Tensor, b: torch.Tensor, tau: float):
    """Chamfer-L2 (mean squared nearest distance, both directions, summed) and F-score at ``tau``
    between point sets a (N, 3) and b (M, 3)."""
    d = torch.cdist(a[None].double(), b[None].double())[0]
    ab, ba = d.min(1).values, d.min(0).values
    precision = (ab < tau).double().mean()
    recall = (ba < tau).double().mean()
    fscore = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float((ab**2).mean() + (ba**2).mean()), float(fscore)


def view_space(verts: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Vertices (N, V, 3) in the image's view frame (normalised image units, x right, y down),
    depth centred: orthographic projection cannot observe a depth offset."""
    view = orthographic_proj_withz(verts, cam)
    depth_mean = view[..., 2:].mean(1, keepdim=True)
    return view - torch.cat([torch.zeros_like(depth_mean).expand(-1, -1, 2), depth_mean], dim=-1)


def oracle_texture_flow(verts: torch.Tensor, faces: torch.Tensor, cam: torch.Tensor, tex_size: int = 6) -> torch.Tensor:
    """The texture flow (N, F, T, T, 2) a perfect model would predict: each sample's projection.
    Sample (i, j) of face (v0, v1, v2) sits at barycentric weights (i/(T−1), j/(T−1), rest)
    (docs/method.md §1.3)."""
    proj = orthographic_proj(verts, cam)  # (N, V, 2)
    tri = proj[:, faces]  # (N, F, 3, 2)
    w = torch.arange(tex_size, device=verts.device, dtype=verts.dtype) / (tex_size - 1)
    alpha, beta = torch.meshgrid(w, w, indexing="ij")
    p0, p1, p2 = (tri[:, :, k, None, None, :] for k in range(3))
    return alpha[..., None] * p0 + beta[..., None] * p1 + (1 - alpha - beta)[..., None] * p2


def rotation_of(cam: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotation matrices of cameras (N, 7)."""
    return quat_to_matrix(torch.nn.functional.normalize(cam[:, 3:], dim=-1))


# --------------------------------------------------------------------------------------------
# Predictions and validation


@torch.no_grad()
def predict(model, img: torch.Tensor, renderer) -> dict:
    """What the evaluations need from a model (stage 1 or 2, in its current mode) for images
    (B, 3, S, S): ``verts`` (B, V, 3), ``cam`` (B, 7), ``tex_flow`` (B, F, T, T, 2), ``template``
    (B, V, 3: the template T̄ that cam-mode keypoint transfer projects), and from one render of
    the prediction ``alpha`` (B, S, S), ``face_index`` and ``depth`` (B, 2S, 2S; camera depth, the renderer's offset removed)."""
    out = model(img)
    template = model.get_mean_shape()[None].expand(len(img), -1, -1)
    pred = {"verts": out["verts"], "cam": out["cam"], "tex_flow": out["tex_flow"], "template": template}
    return with_render(pred, model.faces, renderer)


def with_render(pred: dict, faces: torch.Tensor, renderer) -> dict:
    """Adds ``alpha``, ``face_index`` and ``depth`` of the render of ``pred['verts']`` at
    ``pred['cam']`` (an ambient-only renderer suffices: only alpha and the z-buffer are read)."""
    render = renderer(pred["verts"], faces, pred["cam"])
    # depth as the camera's (orthographic_proj_withz without offset): independent of the renderer
    return {**pred, "alpha": render.image[:, 3], "face_index": render.face_index,
            "depth": render.depth - renderer.depth_offset}


def transfer_keypoints(pred_src: dict, pred_tgt: dict, kp_src: torch.Tensor, mode: str, img_size: int,
                       sigma: float = 3.0, visible_only: bool = True) -> torch.Tensor:
    """Keypoint transfer (docs/method.md §14.1) from source to target predictions (dicts of :func:`predict`,
    N images each): ``mode`` 'flow' (texture flows) or 'cam' (cameras and template).
    ``visible_only``: only faces / vertices the source render shows can carry a keypoint.
    kp_src (N, K, 2) → (N, K, 2)."""
    if mode == "flow":
        visible = None
        if visible_only:
            visible = face_pixel_centers(pred_src["face_index"], pred_src["tex_flow"].shape[1])[1]
        return transfer_by_flow(pred_src["tex_flow"], pred_tgt["tex_flow"], kp_src, img_size, sigma, visible)
    if mode == "cam":
        visible = (point_visibility(pred_src["verts"], pred_src["cam"], pred_src["depth"], z_offset=0.0)
                   if visible_only else None)
        return transfer_by_camera(pred_src["template"], pred_src["cam"], pred_tgt["template"], pred_tgt["cam"],
                                  pred_tgt["alpha"], kp_src, visible)
    raise ValueError(f"keypoint transfer mode must be 'flow' or 'cam', got {mode!r}")


def sample_surfaces(verts: torch.Tensor, faces: torch.Tensor, num: int, seeds) -> torch.Tensor:
    """(N, num, 3) points on each of the meshes (N, V, 3), seeded per mesh (:func:`sample_surface`)."""
    return torch.stack([sample_surface(v, faces, num, seed=int(s)) for v, s in zip(verts, seeds)])


def surface_distances(points: torch.Tensor, cam: torch.Tensor, true_points: torch.Tensor, true_cam: torch.Tensor,
                      tau: float) -> tuple:
    """Chamfer-L2 and F-score at ``tau`` (lists, one per image) between predicted and true
    surface points (N, P, 3), each set placed in its image's view frame by its own camera (N, 7)
    and depth-centred (:func:`view_space`)."""
    pred_view = view_space(points, cam).cpu()
    true_view = view_space(true_points.to(cam), true_cam.to(cam)).cpu()
    chamfers, fscores = zip(*(chamfer_fscore(p, t, tau) for p, t in zip(pred_view, true_view)))
    return list(chamfers), list(fscores)


class Validator:
    """Validation measures of a model on a fixed held-out set, cheap enough to run during training.

    Args:
        items: the set's samples stacked into tensors: ``img`` (N, 3, S, S), ``mask`` (N, S, S),
            ``kp`` (N, K, 3) and ``inds`` (N,).
        pairs: (P, 2) index pairs into the N images for keypoint transfer (both directions count).
        truth: optional 3-D truth of the synthetic set, aligned with the items: ``cam`` (N, 7) the
            true cameras of the model's frame convention and ``surface_points`` (N, M, 3).
        renderer: an ambient-only renderer of size S (alpha and z-buffer are read).
        padding_frac: the loader's box padding (PCK's scale).

    Calling it on a model returns ``mask_iou``, ``pck_flow`` and ``pck_cam`` (PCK@0.1), and with
    truth ``rot_err_median`` / ``rot_err_mean`` (degrees, after the best global alignment of the
    frames), ``chamfer_l2`` and ``fscore``. The model runs in eval mode; its mode is restored.
    """

    def __init__(self, items: dict, pairs: torch.Tensor, renderer, truth: Optional[dict] = None,
                 padding_frac: float = 0.05, batch_size: int = 32, fscore_tau: float = 0.05, sigma: float = 3.0):
        self.items, self.pairs, self.truth = items, pairs.long(), truth
        self.renderer, self.padding_frac = renderer, padding_frac
        self.batch_size, self.fscore_tau, self.sigma = batch_size, fscore_tau, sigma

    def __len__(self) -> int:
        return len(self.items["img"])

    def predictions(self, model) -> dict:
        """Predictions (:func:`predict`) for every image, on the model's device."""
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        renderer = self.renderer.to(device)
        was_training = model.training
        model.eval()
        try:
            chunks = [predict(model, self.items["img"][i : i + self.batch_size].to(device, dtype), renderer)
                      for i in range(0, len(self), self.batch_size)]
        finally:
            model.train(was_training)
        joined = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        return {k: v.float() if v.is_floating_point() else v for k, v in joined.items()}  # float64 models too

    def __call__(self, model) -> dict:
        pred = self.predictions(model)
        device = pred["cam"].device
        results = {"mask_iou": float(mask_iou(pred["alpha"], self.items["mask"].to(device)).mean())}
        kp = self.items["kp"].to(device)
        img_size = self.items["img"].shape[-1]
        for mode in ("flow", "cam"):
            pck = PCKAccumulator(alphas=(0.1,), padding_frac=self.padding_frac)
            for src, tgt in ((0, 1), (1, 0)):
                a, b = self.pairs[:, src].to(device), self.pairs[:, tgt].to(device)
                moved = transfer_keypoints({k: v[a] for k, v in pred.items()}, {k: v[b] for k, v in pred.items()},
                                           kp[a, :, :2], mode, img_size, self.sigma)
                pck.add(moved, kp[b], kp[a, :, 2])
            results[f"pck_{mode}"] = pck.result()["PCK.1"]
        if self.truth is not None:
            true_cam = self.truth["cam"].to(device)
            errors, _ = align_rotations(rotation_of(pred["cam"]).cpu(), rotation_of(true_cam).cpu())
            true_points = self.truth["surface_points"]
            points = sample_surfaces(pred["verts"], model.faces.to(device), true_points.shape[1],
                                     self.items["inds"].tolist())
            chamfers, fscores = surface_distances(points, pred["cam"], true_points, true_cam, self.fscore_tau)
            results.update(rot_err_median=float(errors.median()), rot_err_mean=float(errors.mean()),
                           chamfer_l2=float(np.mean(chamfers)), fscore=float(np.mean(fscores)))
        return results
