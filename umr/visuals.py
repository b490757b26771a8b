"""Training and evaluation pictures: image grids of inputs, silhouettes, textured renders,
UV flow and part projections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from umr.category import BIRDS, CategorySpec
from umr.geometry import rotate_cam, sample_textures
from umr.renderer import SoftRenderer

__all__ = ["flow_to_rgb", "training_grid", "to_uint8", "read_log", "plot_curves", "reconstruction_rows",
           "template_views"]



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


@torch.no_grad()
def reconstruction_rows(model, images: torch.Tensor, renderer: SoftRenderer, angles=(90, 180, 270)) -> np.ndarray:
    """One row per image (N, 3, S, S): [input | render at the predicted camera | overlay on the
    input | the textured mesh turned about the image's vertical axis by each of ``angles``]. The
    model runs in eval mode (its mode is restored); ``renderer``: S pixels, white background."""
    was_training = model.training
    model.eval()
    try:
        out = model(images)
    finally:
        model.train(was_training)
    textures = sample_textures(out["tex_flow"], images)
    render = renderer(out["verts"], model.faces, out["cam"], textures).image
    turned = [renderer(out["verts"], model.faces, rotate_cam(out["cam"], images.new_full((len(images),), float(a))),
                       textures).image for a in angles]
    rows = []
    for b in range(len(images)):
        alpha = render[b, 3:].clamp(0, 1)
        tiles = [images[b], render[b, :3], render[b, :3] * alpha + images[b] * (1 - alpha)] + [t[b, :3] for t in turned]
        rows.append(np.concatenate([to_uint8(t) for t in tiles], axis=1))
    return np.concatenate(rows, axis=0)


@torch.no_grad()
def template_views(verts: torch.Tensor, faces: torch.Tensor, face_labels, renderer: SoftRenderer,
                   scale: float = 0.8, category: CategorySpec = BIRDS) -> np.ndarray:
    """The template (V, 3) with its faces coloured by part label (F,) (``category.part_colours``),
    seen from the side (the first camera hypothesis' view), from 45 degrees, from the front and
    from above, in a row."""
    from umr.nets import camera_biases

    side = camera_biases(1)[0]
    cam = torch.cat([verts.new_tensor([scale, 0.0, 0.0]), side.to(verts)])[None]
    colours = torch.as_tensor(category.part_colour_array[np.asarray(face_labels)], dtype=verts.dtype)[None, :, None, None, :]
    views = [cam, rotate_cam(cam, verts.new_tensor([45.0])), rotate_cam(cam, verts.new_tensor([90.0])),
             rotate_cam(cam, verts.new_tensor([90.0]), (1.0, 0.0, 0.0))]
    tiles = [renderer(verts[None], faces, view, colours).image[0, :3] for view in views]
    return np.concatenate([to_uint8(t) for t in tiles], axis=1)
