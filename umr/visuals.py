"""Training and evaluation pictures: image grids of inputs, silhouettes, textured renders,
UV flow and part projections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from umr.geometry import sample_textures
from umr.renderer import SoftRenderer

__all__ = ["flow_to_rgb", "training_grid", "to_uint8", "read_log", "plot_curves"]


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


# Validation measures drawn by plot_curves, with their axis labels (others are drawn too).
CURVE_LABELS = {
    "val/mask_iou": "mask IoU (higher is better)",
    "val/rot_err_median": "rotation error, median (deg)",
    "val/rot_err_mean": "rotation error, mean (deg)",
    "val/pck_flow": "PCK@0.1 by texture flow",
    "val/pck_cam": "PCK@0.1 by camera",
    "val/chamfer_l2": "Chamfer-L2",
    "val/fscore": "F-score",
}


def read_log(path) -> list:
    """The records of a run's ``loss_log.jsonl`` (a truncated last line is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(log_path, out_path, title: str = "", smooth: int = 5) -> None:
    """Draw a run's curves into a PNG: the weighted training loss terms (moving average over
    ``smooth`` records, log scale) and every validation measure against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if "total" in r]
    val = [r for r in records if any(k.startswith("val/") for k in r)]
    val_keys = [k for k in CURVE_LABELS if any(k in r for r in val)]
    val_keys += sorted({k for r in val for k in r if k.startswith("val/") and k not in CURVE_LABELS and k not in val_keys})
    panels = 1 + len(val_keys)
    cols = min(panels, 4)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    ax = axes[0, 0]
    skip = {"epoch", "iteration", "step", "lr", "time"}
    names = sorted({k for r in train for k, v in r.items() if k not in skip and isinstance(v, (int, float))})
    for name in names:
        steps = np.array([r["step"] for r in train if name in r])
        values = np.array([r[name] for r in train if name in r], dtype=np.float64)
        if len(values) == 0 or not np.all(np.isfinite(values)) or values.max() <= 0:
            continue
        if len(values) >= smooth > 1:
            values = np.convolve(values, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1 :]
        ax.plot(steps, np.maximum(values, 1e-6), label=name, lw=2.0 if name == "total" else 1.0)
    ax.set_yscale("log")
    ax.set_title("training losses (weighted)")
    ax.set_xlabel("iteration")
    if names:
        ax.legend(fontsize=6, ncol=2)
    for i, key in enumerate(val_keys, start=1):
        ax = axes[i // cols, i % cols]
        points = [(r["step"], r[key]) for r in val if key in r]
        ax.plot(*zip(*points), "o-", ms=3)
        ax.set_title(CURVE_LABELS.get(key, key))
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for j in range(panels, rows * cols):
        axes[j // cols, j % cols].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_path)
