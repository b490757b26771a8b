// Binning and culling of the soft rasterizer, shared by the CPU kernel (rasterize_cpu.cpp) and
// the CUDA kernel (rasterize_cuda.cu): which tiles a face reaches, the per-tile face lists, and
// the rows and per-row columns of a tile where a face's pixels can lie. Both kernels call these
// routines, so the CPU tests exercise the GPU's binning and culling too.
#pragma once

#include <cstdint>

#include "rasterize_math.h"

namespace umr {

// Inclusive tile rectangle [tx0, tx1] x [ty0, ty1] that a face's pixel range (face_pixel_range)
// reaches; empty (tx0 > tx1) when the range is.
struct TileRect {
  int tx0, tx1, ty0, ty1;
};

UMR_HD TileRect face_tiles(const int* range) {
  if (range[0] > range[1] || range[2] > range[3]) return TileRect{0, -1, 0, -1};
  return TileRect{range[0] / kTileSize, range[1] / kTileSize, range[2] / kTileSize, range[3] / kTileSize};
}

// The per-tile face lists of one image, in two passes over its faces (ascending, so every list
// is ascending without a sort). Tiles are numbered ty * nt + tx within the image.
//   count (fill = false): slot[tile] += 1 for every face that reaches the tile;
//   fill (fill = true):   faces[slot[tile]++] = f, slot starting at the tile's list offset.
// Each kernel runs it once per image (the CPU over images in parallel, CUDA one thread per
// image): O(faces x tiles per face) per image, a small share of a render.
template <bool fill>
UMR_HD void bin_image(const int* ranges, int64_t F, int64_t nt, int64_t* slot, int32_t* faces) {
  for (int64_t f = 0; f < F; ++f) {
    const TileRect t = face_tiles(ranges + 4 * f);
    for (int ty = t.ty0; ty <= t.ty1; ++ty)
      for (int tx = t.tx0; tx <= t.tx1; ++tx) {
        if (fill)
          faces[slot[ty * nt + tx]++] = int32_t(f);
        else
          ++slot[ty * nt + tx];
      }
  }
}

// Pixel box of tile `item` (tiles numbered (b, ty, tx)): image b, rows [r0, r1), columns [c0, c1).
struct TileBox {
  int64_t b;
  int r0, r1, c0, c1;
};

UMR_HD TileBox tile_box(int64_t item, int64_t nt, int S) {
  const int64_t t = item % (nt * nt);
  TileBox box;
  box.b = item / (nt * nt);
  box.r0 = int(t / nt) * kTileSize;
  box.c0 = int(t % nt) * kTileSize;
  box.r1 = umr_min(box.r0 + kTileSize, S);
  box.c1 = umr_min(box.c0 + kTileSize, S);
  return box;
}

// Per row, the columns a face's pixels can occupy after the cull: coverage_halfplanes as
// intervals in x, widened by one column, so skipping the rest changes no output. Most of a small
// face's bounding box lies outside its margin band; this saves testing those pixels one by one.
template <typename T>
struct RowClipper {
  bool active;
  double a[3], b[3], c[3], lim[3];
  UMR_HD RowClipper(const T* info, const Settings<T>& s) {
    active = coverage_halfplanes(info, s, lim);
    for (int k = 0; k < 3 && active; ++k) {
      a[k] = double(info[9 + 3 * k]);
      b[k] = double(info[10 + 3 * k]);
      c[k] = double(info[11 + 3 * k]);
    }
  }
  // Narrows the tile-relative inclusive columns [c_lo, c_hi] of the row at height y.
  UMR_HD void clip(T y, int col0, int S, int& c_lo, int& c_hi) const {
    if (!active) return;
    double x_lo = -INFINITY, x_hi = INFINITY;
    for (int k = 0; k < 3; ++k) {
      const double rhs = -lim[k] - (b[k] * double(y) + c[k]);  // need a x >= rhs
      if (a[k] > 0.0) {
        x_lo = umr_max(x_lo, rhs / a[k]);
      } else if (a[k] < 0.0) {
        x_hi = umr_min(x_hi, rhs / a[k]);
      } else if (rhs > 0.0) {
        c_hi = c_lo - 1;
        return;
      }
    }
    // column C has x = (2C + 1 - S) / S; clamp before converting so huge bounds cannot overflow
    const double lo = ceil((x_lo * S + S - 1) / 2.0) - 1.0 - col0;
    const double hi = floor((x_hi * S + S - 1) / 2.0) + 1.0 - col0;
    if (lo > double(c_lo)) c_lo = int(umr_min(lo, double(kTileSize)));
    if (hi < double(c_hi)) c_hi = int(umr_max(hi, -1.0));
  }
};

// Pixel-centre coordinates of a tile's rows and columns, computed on demand (the CPU kernel
// keeps a table per tile instead; both give pixel_x / pixel_y).
template <typename T>
struct TilePixels {
  int r0, c0, S;
  UMR_HD TilePixels(const TileBox& box, int S_) : r0(box.r0), c0(box.c0), S(S_) {}
  UMR_HD T x(int c) const { return pixel_x<T>(c0 + c, S); }  // tile-relative column c
  UMR_HD T y(int r) const { return pixel_y<T>(r0 + r, S); }  // tile-relative row r
};

// One face in one tile: the tile-relative rows [r0, r1] and, per row, the inclusive columns
// where the face passes its pixel range, the exact bounding-box test (docs/rasterizer.md §3.1: separable, so it is
// applied once per row and column instead of per pixel) and the row clip. Every pixel outside
// them is culled by eval_coverage for certain, so the kernels visit only the pixels inside.
// Pixels: the tile's pixel coordinates (TilePixels or a table with the same x(c) and y(r)).
template <typename T, typename Pixels>
struct FaceTileCull {
  int r0, r1, c0, c1;  // tile-relative, inclusive
  RowClipper<T> rows;
  const Pixels& xy;
  int col0, S;  // the tile's first pixel column, the raster size

  UMR_HD FaceTileCull(const T* info, const int* range, const TileBox& box, const Pixels& pixels, const Settings<T>& s)
      : rows(info, s), xy(pixels), col0(box.c0), S(s.image_size) {
    r0 = umr_max(range[2], box.r0) - box.r0;
    r1 = umr_min(range[3], box.r1 - 1) - box.r0;
    c0 = umr_max(range[0], box.c0) - box.c0;
    c1 = umr_min(range[1], box.c1 - 1) - box.c0;
    while (r0 <= r1 && !in_y_box(info, xy.y(r0), s)) ++r0;
    while (r1 >= r0 && !in_y_box(info, xy.y(r1), s)) --r1;
    while (c0 <= c1 && !in_x_box(info, xy.x(c0), s)) ++c0;
    while (c1 >= c0 && !in_x_box(info, xy.x(c1), s)) --c1;
  }
  // The columns [c_lo, c_hi] of tile row r (empty, c_lo > c_hi, if the face cannot reach it).
  UMR_HD void columns(int r, int& c_lo, int& c_hi) const {
    c_lo = c0;
    c_hi = c1;
    if (r < r0 || r > r1) {
      c_hi = c_lo - 1;
      return;
    }
    rows.clip(xy.y(r), col0, S, c_lo, c_hi);
  }
};

}  // namespace umr
