"""Pixels ↔ normalised image coordinates, and the render-size rule: the one home of both.

The normalised image frame has x to the right and **y downwards**, ``[-1, 1]²`` the square crop
(docs/conventions.md §2). Three pixel grids coexist, because the original's numbers depend on
all three (docs/conventions.md §3 has the table); each is named here and everything else calls
these functions instead of re-deriving the arithmetic. For a column ``c`` of a ``W``-pixel image
(rows alike):

* ``"edge"``: ``x = 2c / W − 1``. Keypoints, SfM cameras, part centres and sampled part points
  (the loaders' CMR rule); pixel ``c`` is named by its left edge.
* ``"corners"``: ``x = −1 + 2c / (W − 1)``, ``grid_sample``'s ``align_corners=True``: texture
  flows, UV maps, ``p2f`` and every sampling grid (:data:`ALIGN_CORNERS`).
* ``"centre"``: ``x = (2c + 1) / W − 1``, the pixel's centre: the rasterizer's pixels (its own
  y-up screen frame is the kernel's business, ``umr/rasterizer_reference.py``), and so where a
  projected point appears in a render, and the synthetic generator's keypoints.

Functions work on numpy arrays, tensors and floats alike (plain arithmetic, same operation
order at every call site, so results are bitwise those of the code they replaced).
"""
from __future__ import annotations

import torch

__all__ = ["ALIGN_CORNERS", "RASTER_SCALE", "PIXEL_GRIDS", "to_normalised", "to_pixels", "pixel_positions",
           "raster_size", "pixel_index"]

PIXEL_GRIDS = ("edge", "corners", "centre")

# Every grid_sample / affine_grid / interpolate of a coordinate field in umr uses this.
ALIGN_CORNERS = True

# SoftRenderer rasterizes at this multiple of the output size and average-pools (anti-aliasing);
# face_index, depth and p2f stay at the raster size.
RASTER_SCALE = 2


def _check(grid: str):
    if grid not in PIXEL_GRIDS:
        raise ValueError(f"pixel grid must be one of {PIXEL_GRIDS}, got {grid!r}")


def to_normalised(pixels, size: int, grid: str):
    """Normalised coordinates of pixel coordinates ``pixels`` (any shape) of a ``size``-pixel axis."""
    _check(grid)
    if grid == "edge":
        return 2 * pixels / size - 1
    if grid == "corners":
        return -1 + 2 * pixels / max(size - 1, 1)
    return (2 * pixels + 1) / size - 1


def to_pixels(normalised, size: int, grid: str):
    """Inverse of :func:`to_normalised`: (fractional) pixel coordinates of ``normalised``."""
    _check(grid)
    if grid == "edge":
        return (normalised + 1) / 2 * size
    if grid == "corners":
        return (normalised + 1) * max(size - 1, 1) / 2
    return (normalised + 1) * size / 2 - 0.5


def pixel_positions(size: int, grid: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """(size,) normalised position of each pixel index 0..size−1 of an axis."""
    return to_normalised(torch.arange(size, device=device, dtype=dtype), size, grid)


def pixel_index(normalised: torch.Tensor, size: int) -> torch.Tensor:
    """Index (long, clamped to the image) of the raster pixel whose centre is nearest to each
    normalised coordinate: where a projected point lands in a ``size``-pixel render or z-buffer."""
    return to_pixels(normalised, size, "centre").round().long().clamp(0, size - 1)


def raster_size(image_size: int, anti_aliasing: bool = True) -> int:
    """Size of the raster (and of its face-index / depth maps) behind an ``image_size`` render."""
    return image_size * (RASTER_SCALE if anti_aliasing else 1)
