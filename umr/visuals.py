"""Training and evaluation pictures: image grids of inputs, silhouettes, textured renders,
UV flow and part projections."""
from __future__ import annotations

import numpy as np
import torch

from umr.geometry import sample_textures
from umr.renderer import SoftRenderer

__all__ = ["flow_to_rgb", "training_grid", "to_uint8"]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (H, W) in [0, 1] → (H, W, 3) uint8."""
    image = image.detach().float().cpu().clamp(0, 1)
    if image.dim() == 2:
        image = image[None].expand(3, -1, -1)
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def flow_to_rgb(flow: torch.Tensor) -> torch.Tensor:
    """A flow field (2, H, W) in [-1, 1] as colours: x → red, y → green, blue constant."""
    return torch.cat([(flow + 1) / 2, torch.full_like(flow[:1], 0.5)], dim=0)


@torch.no_grad()
def training_grid(out: dict, batch: dict, faces: torch.Tensor, renderer: SoftRenderer, max_rows: int = 4) -> np.ndarray:
    """Rows of [input | mask | predicted silhouette | textured render | shaded render | UV flow]."""
    rows = []
    n = min(max_rows, batch["img"].shape[0])
    img, verts, cam = batch["img"][:n], out["verts"][:n].detach(), out["cam"][:n].detach()
    textures = sample_textures(out["tex_flow"][:n].detach(), img)
    textured = renderer(verts, faces, cam, textures).image
    shaded = renderer(verts, faces, cam).image
    size = img.shape[-1]
    for b in range(n):
        uv = torch.nn.functional.interpolate(flow_to_rgb(out["uvimage_pred"][b].detach())[None], size=(size, 2 * size))[0]
        tiles = [
            to_uint8(img[b]),
            to_uint8(batch["mask"][b]),
            to_uint8(textured[b, 3]),
            to_uint8(textured[b, :3] + (1 - textured[b, 3:]) * img[b] * 0.3),
            to_uint8(shaded[b, :3]),
            to_uint8(uv),
        ]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
