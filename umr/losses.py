"""UMR's losses (docs/method.md §8), each with its formula and reduction.

The default follows the paper where the original's code departs from it; the
:class:`umr.quirks.Quirks` switch named in a loss's notes restores the original there.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from umr.category import BIRDS, CategorySpec
from umr.conventions import ALIGN_CORNERS, pixel_positions
from umr.geometry import sample_textures
from umr.quirks import Quirks
from umr.renderer import Renderer, face_pixel_centers, project_points

__all__ = [
    "neg_iou",
    "soft_iou",
    "mask_loss",
    "multi_mask_loss",
    "hypothesis_neg_iou",
    "hypothesis_choice_loss",
    "camera_entropy",
    "deform_loss",
    "orientation_loss",
    "texture_dt_loss",
    "texture_cycle_loss",
    "PerceptualDistance",
    "L1Distance",
    "make_texture_distance",
    "gan_loss",
    "PartMatchingLoss",
    "vertex_correspondence_loss",
    "vertex_correspondence_terms",
    "SemanticTemplate",
    "SemanticTemplateError",
    "check_part_vertices",
    "face_sample_labels",
    "normalise_part_maps",
    "cycle_target",
]


def soft_iou(alpha: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Per image ``Σ(Â·M) / (Σ(Â + M − Â·M) + eps)`` of soft masks, no thresholding: (N, H, W) x2 → (N,)."""
    inter = (alpha * mask).flatten(1).sum(1)
    union = (alpha + mask - alpha * mask).flatten(1).sum(1)
    return inter / (union + eps)


def neg_iou(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image ``1 − IoU`` with the training loss's epsilon 1e-6: (N, H, W) x2 → (N,)."""
    return 1 - soft_iou(alpha, mask, 1e-6)


def mask_loss(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stage 1: ``1 − mean_b IoU_b`` (= mean negIoU)."""
    return neg_iou(alpha, mask).mean()


def hypothesis_neg_iou(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """negIoU (B, K) of every hypothesis' silhouette: alphas (B, K, H, W), mask (B, H, W)."""
    B, K = alphas.shape[:2]
    return neg_iou(alphas.flatten(0, 1), mask[:, None].expand(-1, K, -1, -1).flatten(0, 1)).view(B, K)


def multi_mask_loss(alphas: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Stage 2: ``mean_b Σ_k p_bk · negIoU(A_bk, M_b)``; alphas (B, K, H, W), probs (B, K) not
    detached (this is what trains the probability logits)."""
    return (probs * hypothesis_neg_iou(alphas, mask)).sum(1).mean()


def hypothesis_choice_loss(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``mean_b −log p_b,k*`` of the probabilities (B, K) to each row's
    hypothesis with the lowest score (B, K): ``k* = argmin_k scores_bk`` (no gradient through
    the scores or the choice)."""
    target = scores.detach().argmin(1, keepdim=True)
    return -torch.log(probs.gather(1, target).squeeze(1) + 1e-9).mean()


def camera_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``mean_b [−Σ_k p log(p + 1e-9)]``. UMR adds it with a positive weight, i.e. the entropy is
    minimised (confident hypotheses) although its flag calls it a diversity loss (Q18)."""
    return -(probs * torch.log(probs + 1e-9)).sum(1).mean()


def deform_loss(delta: torch.Tensor) -> torch.Tensor:
    """Mean over (b, vertex) of the Euclidean norm of the half-mesh offsets."""
    return delta.norm(dim=-1).mean()


def orientation_loss(verts: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Stage 1's ``mean |V_axis|`` (pulls vertices to the symmetry plane early in training)."""
    return verts[..., axis].abs().mean()


def texture_dt_loss(tex_flow: torch.Tensor, mask_dt: torch.Tensor) -> torch.Tensor:
    """Mean of the barrier distance transform (B, H, W) sampled at every flow point (B, F, T, T, 2):
    penalises flow that samples outside the silhouette."""
    return sample_textures(tex_flow, mask_dt[:, None]).mean()


def texture_cycle_loss(tex_flow: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``(1 / (B·F·2)) Σ_bf m_bf ‖mean_s flow_bfs − target_bf‖²`` (docs/method.md §8.7).

    Args:
        tex_flow: (B, F, T, T, 2); target: (B, F, 2) (detached); visible: (B, F) bool.
    """
    avg_flow = tex_flow.flatten(2, 3).mean(2)
    return ((avg_flow - target) ** 2 * visible[..., None]).mean()


def cycle_target(face_index: torch.Tensor, num_faces: int, p2f: Optional[torch.Tensor], stage: int,
                 quirks: Quirks = Quirks()):
    """Target (B, F, 2) and visibility (B, F) of the texture-cycle loss from a render's z-buffer
    (B, H, W).

    Default (the paper's intent): the mean image position of each face's visible pixels
    (:func:`umr.renderer.face_pixel_centers`), for visible faces. Quirks: ``q2_softras_p2f``,
    stage 1 uses SoftRas' p2f (running-max softmax weights); ``q1_zero_cycle_target``, stage 2
    a zero target (the original took p2f from the hard renderer, which never fills it);
    ``q9_last_face_visible``, face F−1 counts as visible wherever the z-buffer shows background
    (the original indexed with the background's −1).
    """
    target, visible = face_pixel_centers(face_index, num_faces, align_corners=ALIGN_CORNERS, dtype=torch.float32)
    if quirks.q9_last_face_visible:
        visible = visible.clone()
        visible[:, -1] |= (face_index < 0).flatten(1).any(1)
    if stage == 1 and quirks.q2_softras_p2f:
        target = p2f.detach()
    elif stage == 2 and quirks.q1_zero_cycle_target:
        target = torch.zeros_like(target)
    return target, visible


# --------------------------------------------------------------------------------------------
# Texture distances


class PerceptualDistance(nn.Module):
    """UMR's perceptual distance: per image the sum over AlexNet's five ReLU layers of
    ``1 − mean_pixels cos(f(x), f(y))`` (the uncalibrated "net" variant of the 2018 perceptual
    similarity code; not lpips' own linear-calibrated or squared-difference score). Inputs in
    [0, 1], (N, 3, H, W) → (N,). The AlexNet and input scaling come from the ``lpips`` package;
    the ImageNet weights must be on this machine (torchvision's hub cache)."""

    def __init__(self):
        super().__init__()
        import lpips
        import torchvision

        from umr.nets import imagenet_weights

        path = imagenet_weights(torchvision.models.AlexNet_Weights.IMAGENET1K_V1, "the perceptual loss's AlexNet",
                                "--texture_loss l1")
        self.scaling = lpips.ScalingLayer()
        with warnings.catch_warnings():  # lpips still uses torchvision's deprecated `pretrained`
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.pn.alexnet(pretrained=False, requires_grad=False)
        alexnet = torchvision.models.alexnet(weights=None)
        alexnet.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        features = alexnet.features
        for slice_, (start, end) in zip(
            (self.net.slice1, self.net.slice2, self.net.slice3, self.net.slice4, self.net.slice5),
            ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)),
        ):
            for index in range(start, end):
                slice_._modules[str(index)].load_state_dict(features[index].state_dict())
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen, always in eval mode

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net(self.scaling(2 * x - 1))
        fy = self.net(self.scaling(2 * y - 1))
        total = 0
        for a, b in zip(fx, fy):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (1 - (a * b).sum(1).mean((1, 2)))
        return total


class L1Distance(nn.Module):
    """Offline alternative to the perceptual distance: per-image mean absolute difference."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().flatten(1).mean(1)


def make_texture_distance(kind: str) -> nn.Module:
    """'perceptual' (UMR's, needs AlexNet's ImageNet weights) or 'l1'."""
    if kind == "perceptual":
        return PerceptualDistance()
    if kind == "l1":
        return L1Distance()
    raise ValueError(f"--texture_loss must be 'perceptual' or 'l1', got {kind!r}")


def gan_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``BCEWithLogits(D([real; fake]), [1…1; 0…0])`` averaged over 2B logits. The discriminator
    starts with a gradient reversal layer, so the generator path gets the reversed gradient."""
    logits = discriminator(torch.cat([real, fake]))
    labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, labels)


# --------------------------------------------------------------------------------------------
# Semantic consistency (docs/method.md §8.8, 8.9)


class SemanticTemplateError(ValueError):
    """A semantic template that cannot carry the semantic losses (a part empty or too small)."""


def check_part_vertices(part_vertices: dict, num_vertices: int, min_share: float, source) -> dict:
    """Refuse a semantic template in which a part owns fewer than ``min_share`` of the template's
    vertices (every part of a bird covers several percent of it: on the synthetic birds' truth,
    head 16 %, neck 12 %, back 49 %, belly 23 % of the surface). Returns the counts per part."""
    counts = {p: int(len(v)) for p, v in part_vertices.items()}
    small = {p: n for p, n in counts.items() if n < min_share * num_vertices}
    if small:
        listed = ", ".join(f"{p} {n}" for p, n in small.items())
        raise SemanticTemplateError(
            f"semantic template {source}: part(s) with too few of the {num_vertices} template vertices ({listed}; "
            f"all parts: {counts}; at least {min_share:.0%} each is expected). The semantic losses would not see "
            "these parts. The stage-1 model's texture flow is probably not trained enough yet (train stage 1 "
            "longer, or run avg_uv --uv_source render, which reads the parts through the mesh and camera "
            "instead), or the SCOPS maps lack the part (check --scops_path); --min_part_share 0 accepts it anyway."
        )
    return counts


class SemanticTemplate:
    """The files ``avg_uv`` writes and stage 2 reads from ``--stemp_path`` (docs/method.md §11):
    ``mean_v.pth`` (half template, 337 x 3), ``semantic_seg.png`` (UV label image 128 x 256,
    labels 0..P, background 0) and ``vertices_idx/<part>_vertices.npy`` (vertex indices per part of
    ``category``)."""

    def __init__(self, stemp_path, category: CategorySpec = BIRDS):
        from PIL import Image

        root = Path(stemp_path)
        if not root.is_dir():
            raise FileNotFoundError(f"semantic template directory not found: {root} (set --stemp_path to the output of avg_uv)")
        files = {"mean_v.pth": root / "mean_v.pth", "semantic_seg.png": root / "semantic_seg.png"}
        files.update({f"vertices_idx/{p}_vertices.npy": root / "vertices_idx" / f"{p}_vertices.npy" for p in category.part_names})
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"semantic template {root} lacks {missing} (set --stemp_path to the output of avg_uv)")
        self.mean_v = torch.load(files["mean_v.pth"], map_location="cpu", weights_only=True)
        self.seg = np.asarray(Image.open(files["semantic_seg.png"]).convert("L"))
        self.vertices = {p: torch.from_numpy(np.load(files[f"vertices_idx/{p}_vertices.npy"]).astype(np.int64))
                         for p in category.part_names}


class PartMatchingLoss(nn.Module):
    """Part (probability-based semantic) loss of stage 2 (docs/method.md §8.8).

    Renders the mesh with the semantic template's part textures, and compares the soft part maps
    with the SCOPS maps: per-channel max-normalised squared difference weighted by the category's
    ``part_loss_weights`` (birds: 0, 5, 0, 0, 5) plus the squared distance of the part centres,
    ``(L_pix + L_ctr) / 4``.
    """

    def __init__(self, face_labels: torch.Tensor, renderer: Renderer, category: CategorySpec = BIRDS):
        """face_labels: (F, T*T) part label (0..P) of every texture sample of every face (see
        :func:`face_sample_labels`); renderer: ambient-only softmax renderer, black background."""
        super().__init__()
        P = category.num_parts
        onehot = F.one_hot(face_labels.long().clamp(0, P), P + 1).float()  # (F, T*T, P + 1)
        # parts 1..P three at a time in the RGB channels of one render (the last group's channel
        # repeated to fill it): the softmax aggregation is linear per channel, so this equals
        # one grey render per part
        self.groups = [(start, min(start + 3, P + 1)) for start in range(1, P + 1, 3)]
        for i, (start, stop) in enumerate(self.groups):
            group = onehot[..., start:stop]
            group = torch.cat([group, group[..., -1:].expand(-1, -1, 3 - group.shape[-1])], -1)
            self.register_buffer(f"texture_{i}", group.contiguous(), persistent=False)  # from the labels
        self.renderer = renderer
        self.register_buffer("part_weights", torch.tensor(category.part_weight_vector()), persistent=False)

    def render_parts(self, verts: torch.Tensor, faces: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        """Soft part maps (B, P, H, W) of parts 1..P."""
        B = verts.shape[0]
        maps = []
        for i, (start, stop) in enumerate(self.groups):
            texture = getattr(self, f"texture_{i}")[None].expand(B, -1, -1, -1)
            maps.append(self.renderer(verts, faces, cams, texture).image[:, : stop - start])
        return torch.cat(maps, dim=1)

    def centres(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, P, 2) centres of channels 1..P of softmax(maps) (P + 1 channels), x = 2·col/W − 1."""
        probs = torch.softmax(maps, dim=1)[:, 1:] + 1e-3
        probs = probs / probs.sum((2, 3), keepdim=True)
        H, W = maps.shape[-2:]
        xs = pixel_positions(W, "edge", maps.device, maps.dtype)
        ys = pixel_positions(H, "edge", maps.device, maps.dtype)
        return torch.stack([(probs.sum(2) * xs).sum(-1), (probs.sum(3) * ys).sum(-1)], dim=-1)

    def per_image(self, verts, faces, cams, part_maps, part_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) the loss of every image; ``part_weights`` (P + 1,) replaces the category's pixel
        weights. Arguments as :meth:`forward`."""
        weights = self.part_weights if part_weights is None else part_weights.to(self.part_weights)
        rendered = self.render_parts(verts, faces, cams.detach())
        pred = torch.cat([torch.full_like(rendered[:, :1], 0.1), rendered], dim=1)
        loss_ctr = ((self.centres(pred) - self.centres(part_maps)) ** 2).mean((1, 2))
        pred_n = pred / pred.flatten(2).max(-1).values.clamp_min(1e-5)[..., None, None]
        target_n = part_maps / part_maps.flatten(2).max(-1).values.clamp_min(1e-5)[..., None, None]
        loss_pix = (weights[None, :, None, None] * (pred_n - target_n) ** 2).mean((1, 2, 3))
        return (loss_pix + loss_ctr) / 4

    def forward(self, verts, faces, cams, part_maps) -> torch.Tensor:
        """verts (B, V, 3) (gradients flow here), cams (B, 7) (detached here), part_maps
        (B, P + 1, H, W): the loader's SCOPS maps normalised per image and channel."""
        return self.per_image(verts, faces, cams, part_maps).mean()


def face_sample_labels(seg: np.ndarray, uv_sampler: torch.Tensor, mesh, rounded: bool = False) -> torch.Tensor:
    """(F, T*T) part labels of the template's texture samples from the UV label image (H, W).

    Nearest sampling (``rounded``, quirk ``q10_rounded_labels``: bilinear interpolation then
    rounding, which can invent labels between non-adjacent ones); left faces copy their right
    twins.
    """
    label_image = torch.from_numpy(np.asarray(seg, dtype=np.float32))[None, None]
    grid = uv_sampler[None].float().cpu()  # (1, F_half, T*T, 2)
    mode = "bilinear" if rounded else "nearest"
    labels = F.grid_sample(label_image, grid, mode=mode, align_corners=ALIGN_CORNERS)[0, 0]
    labels = labels.round().long() if rounded else labels.long()
    return mesh.symmetrize_faces(labels[None])[0]


def normalise_part_maps(part_prob: torch.Tensor, mask: torch.Tensor, no_epsilon: bool = False) -> torch.Tensor:
    """``P̃_c = (P_c ⊙ M) / max_pixels(P_c ⊙ M)`` per image and channel (docs/method.md §12.1).
    ``no_epsilon`` (quirk ``q17_no_epsilon``): an absent part divides by zero (NaN)."""
    masked = part_prob * mask[:, None]
    peak = masked.flatten(2).max(-1).values[..., None, None]
    return masked / (peak if no_epsilon else peak.clamp_min(1e-6))


def vertex_correspondence_loss(
    template: torch.Tensor,
    part_vertices: dict,
    hypotheses: torch.Tensor,
    probs: torch.Tensor,
    part_points: dict,
    weights: Optional[dict] = None,
    train_probs: bool = True,
    visible: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Chamfer from projected template part vertices to the sampled part points (docs/method.md §8.9):
    ``mean_b Σ_k p_bk ℓ_bk`` with ℓ from :func:`vertex_correspondence_terms` (the arguments'
    meaning is there).

    train_probs: the probabilities get this loss's gradient, so semantic consistency also
    chooses among the hypotheses (as the silhouette loss does), not only moves them; False
    detaches them, as the original (the probabilities then see silhouettes only).
    """
    per_row = vertex_correspondence_terms(template, part_vertices, hypotheses, part_points, weights, visible)
    return ((probs if train_probs else probs.detach()) * per_row).sum(1).mean()


def vertex_correspondence_terms(
    template: torch.Tensor,
    part_vertices: dict,
    hypotheses: torch.Tensor,
    part_points: dict,
    weights: Optional[dict] = None,
    visible: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The vertex correspondence loss ℓ (B, K) of every camera hypothesis.

    Args:
        template: (V, 3) the template T̄ (not the deformed mesh).
        part_vertices: {part: (n_part,) vertex indices}.
        hypotheses: (B, K, 7) cameras (gradients flow to them).
        part_points: {part: (B, m_part, 2)} sampled image points.
        weights: per part (a part not named weighs 0); default the birds' ``vertex_loss_weights``
            (head 1, belly 1, neck 0, back 0). Points are matched by part name (the original passed neck and back swapped, harmless with these weights: Q26).
        visible: None (UMR's loss), or (B, K, V) bool: which vertices each hypothesis' render
            shows. Then only those count: each part's term is the mean over its visible
            vertices (over all of them where the hypothesis hides the whole part, so hiding a
            part earns nothing), and the parts' terms are averaged with ``weights``. Without
            it, every vertex counts, and under orthographic projection a camera and its mirror
            image through the image plane (seen from above / from below, from the front / from
            behind) project a mirror-symmetric template's parts identically: the loss cannot
            tell them apart (docs/method.md §8.9).
    Returns:
        UMR: ``ℓ_bk = Σ_parts w Σ_vertices min_point d² / Σ_parts n``; with ``visible``:
        ``ℓ_bk = Σ_parts w mean_visible min_point d² / Σ_parts w``.
    """
    weights = BIRDS.vertex_loss_weights if weights is None else weights
    B, K = hypotheses.shape[:2]
    cams = hypotheses.reshape(B * K, 7)
    total, count = hypotheses.new_zeros(B * K), 0
    for part, index in part_vertices.items():
        weight = weights.get(part, 0.0)
        count += len(index) if visible is None else weight
        if weight == 0 or len(index) == 0:
            continue
        index = index.to(template.device)
        verts = template[index][None].expand(B * K, -1, -1)
        projected = project_points(verts, cams)  # (BK, n, 2)
        points = part_points[part].repeat_interleave(K, dim=0)  # (BK, m, 2)
        d2 = torch.cdist(projected, points).pow(2).min(-1).values  # (BK, n)
        if visible is None:
            total = total + weight * d2.sum(-1)
        else:
            shown = visible.reshape(B * K, -1)[:, index].to(d2.dtype)
            shown = torch.where(shown.sum(-1, keepdim=True) > 0, shown, torch.ones_like(shown))
            total = total + weight * (d2 * shown).sum(-1) / shown.sum(-1)
    return (total / (count if count > 0 else 1)).view(B, K)
