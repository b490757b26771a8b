// CPU kernel of the soft rasterizer: binned, parallel over (image, tile) with at::parallel_for.
// Inside a tile the loop is face-major (ascending face index, so every pixel still sees its
// faces in order) and visits only the pixels of the face's expanded bounding box; per-face
// sums (p2f, vertex gradients) are kept locally and added once per (tile, face). With
// RasterConfig::vectorize a face is evaluated on a row's pixels W at a time (rasterize_lanes.h);
// otherwise one pixel at a time. Both run the per-pixel math of rasterize_math.h, the CUDA
// kernel's too, and the binning and culling of rasterize_tiles.h, as the CUDA kernel does.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <atomic>

#include "rasterize.h"
#include "rasterize_lanes.h"
#include "rasterize_tiles.h"

namespace umr {
namespace {

// Adds to a per-face sum. A face's sums are only touched by the tiles of its own image, so a
// task that holds all of an image's tiles owns them and adds without an atomic.
template <typename T>
inline void add_face_sum(T* address, T value, bool exclusive) {
  if (exclusive)
    *address += value;
  else
    std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}

// Does the task of tiles [begin, end) hold every tile of image b?
inline bool owns_image(int64_t b, int64_t tiles_per_image, int64_t begin, int64_t end) {
  return b * tiles_per_image >= begin && (b + 1) * tiles_per_image <= end;
}

template <typename T>
void setup_faces(const T* face_vertices, int64_t count, T margin, int S, bool binning, T* info, int* ranges) {
  at::parallel_for(0, count, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      setup_face(face_vertices + 9 * i, info + kFaceInfoSize * i);
      face_pixel_range(info + kFaceInfoSize * i, margin, S, binning, ranges + 4 * i);
    }
  });
}

// CSR lists of the faces (ascending) whose range reaches each tile, tiles ordered (b, ty, tx).
std::vector<at::Tensor> bin_faces(const at::Tensor& ranges_t, int64_t B, int64_t F, int64_t nt) {
  const int* ranges = ranges_t.data_ptr<int>();
  const int64_t tiles = nt * nt;
  auto offsets_t = at::zeros({B * tiles + 1}, ranges_t.options().dtype(at::kLong));
  int64_t* offsets = offsets_t.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) bin_image<false>(ranges + 4 * b * F, F, nt, offsets + b * tiles + 1, nullptr);
  });
  for (int64_t i = 0; i < B * tiles; ++i) offsets[i + 1] += offsets[i];
  auto faces_t = at::empty({offsets[B * tiles]}, ranges_t.options().dtype(at::kInt));
  int32_t* faces = faces_t.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      std::vector<int64_t> cursor(offsets + b * tiles, offsets + (b + 1) * tiles);
      bin_image<true>(ranges + 4 * b * F, F, nt, cursor.data(), faces);
    }
  });
  return {offsets_t, faces_t};
}

// Pixel-centre coordinates of a tile's columns and rows (computed once per tile, not per pair
// or per face); the columns run on past the tile so that a row's last vector of lanes reads
// finite values. x(c), y(r) as TilePixels (rasterize_tiles.h).
template <typename T>
struct TileCoords {
  T xs[kTileSize + lanes::kMaxLanes], ys[kTileSize];
  TileCoords(const TileBox& box, int S) {
    for (int i = 0; i < kTileSize + lanes::kMaxLanes; ++i) xs[i] = pixel_x<T>(box.c0 + i, S);
    for (int i = 0; i < kTileSize; ++i) ys[i] = pixel_y<T>(box.r0 + i, S);
  }
  T x(int c) const { return xs[c]; }
  T y(int r) const { return ys[r]; }
};

// Calls visit_row(r, c_lo, c_hi) for each tile row r a face can reach, with the inclusive
// tile-relative columns its cull leaves (rasterize_tiles.h).
template <typename T, typename Visit>
inline void for_each_face_row(const T* finfo, const int* range, const TileBox& box, const TileCoords<T>& xy,
                              const Settings<T>& s, Visit&& visit_row) {
  const FaceTileCull<T, TileCoords<T>> cull(finfo, range, box, xy, s);
  for (int r = cull.r0; r <= cull.r1; ++r) {
    int c_lo, c_hi;
    cull.columns(r, c_lo, c_hi);
    visit_row(r, c_lo, c_hi);
  }
}

// Adds face f to the pixels [c_lo, c_hi] of tile row r, W lanes at a time.
template <typename T>
void forward_row_lanes(const T* finfo, const T* ftex, int f, const TileBox& box, const TileCoords<T>& xy, int r,
                       int c_lo, int c_hi, const Settings<T>& s, bool return_p2f, lanes::TileState<T>& state,
                       T* p2f_sum) {
  using V = lanes::Vec<T>;
  using Bt = Batch<V>;
  constexpr int W = lanes::VecTraits<T>::W;
  for (int c = c_lo; c <= c_hi; c += W) {
    const int i = r * kTileSize + c;
    PixelState<V> pixels;
    state.load_inert_fields(i, pixels);
    MaskOf<V> mask = lanes::first_lanes<T>(c_hi - c + 1) & ~face_is_inert(finfo, s, pixels);
    if (!Bt::any(mask)) continue;
    Coverage<V> cov;
    mask &= eval_coverage(finfo, lanes::load(xy.xs + c), xy.ys[r], s, cov);
    if (!Bt::any(mask)) continue;
    state.load_other_fields(i, pixels);
    const V u = update_pixel(finfo, ftex, f, cov, mask, s, pixels);
    state.store_lanes(i, pixels);
    if (!return_p2f) continue;
    for (int j = 0; j < W; ++j) {
      if (u[j] == T(0)) continue;
      T g[2];
      p2f_grid(box.r0 + r, box.c0 + c + j, s, g);
      p2f_sum[0] += u[j] * g[0];
      p2f_sum[1] += u[j] * g[1];
      p2f_sum[2] += u[j];
    }
  }
}

template <typename T>
void forward_tiles(const T* tex, const T* info, const int* ranges, const int64_t* offsets, const int32_t* bins,
                   int64_t B, int64_t F, const Settings<T>& s, bool return_p2f, bool vectorize, T* image,
                   int64_t* face_index, T* depth, T* softmax_sum, T* softmax_max, T* p2f) {
  const int S = s.image_size;
  const int64_t nt = num_tiles(S), plane = int64_t(S) * S;
  at::parallel_for(0, B * nt * nt, 1, [&](int64_t begin, int64_t end) {
    lanes::TileState<T> state;
    for (int64_t item = begin; item < end; ++item) {
      const TileBox box = tile_box(item, nt, S);
      const TileCoords<T> xy(box, S);
      const bool exclusive = owns_image(box.b, nt * nt, begin, end);
      state.init(s);
      for (int64_t k = offsets[item]; k < offsets[item + 1]; ++k) {
        const int f = bins[k];
        const int64_t face = box.b * F + f;
        const T* finfo = info + kFaceInfoSize * face;
        const T* ftex = tex + int64_t(s.texels) * 3 * face;
        T p2f_sum[3] = {T(0), T(0), T(0)};
        for_each_face_row(finfo, ranges + 4 * face, box, xy, s, [&](int r, int c_lo, int c_hi) {
          if (vectorize) {
            forward_row_lanes(finfo, ftex, f, box, xy, r, c_lo, c_hi, s, return_p2f, state, p2f_sum);
            return;
          }
          for (int c = c_lo; c <= c_hi; ++c) {
            PixelState<T> pixel = state.get(r * kTileSize + c);
            if (face_is_inert(finfo, s, pixel)) continue;
            Coverage<T> cov;
            if (!eval_coverage(finfo, xy.xs[c], xy.ys[r], s, cov)) continue;
            const T u = update_pixel(finfo, ftex, f, cov, true, s, pixel);
            state.set(r * kTileSize + c, pixel);
            if (return_p2f && u != T(0)) {
              T g[2];
              p2f_grid(box.r0 + r, box.c0 + c, s, g);
              p2f_sum[0] += u * g[0];
              p2f_sum[1] += u * g[1];
              p2f_sum[2] += u;
            }
          }
        });
        if (p2f_sum[2] != T(0))
          for (int j = 0; j < 3; ++j) add_face_sum(p2f + 3 * face + j, p2f_sum[j], exclusive);
      }
      for (int r = box.r0; r < box.r1; ++r) {
        for (int c = box.c0; c < box.c1; ++c) {
          const PixelState<T> p = state.get((r - box.r0) * kTileSize + (c - box.c0));
          const int64_t pix = int64_t(r) * S + c;
          T rgba[4];
          finish_pixel(p, s, rgba);
          for (int j = 0; j < 4; ++j) image[(box.b * 4 + j) * plane + pix] = rgba[j];
          face_index[box.b * plane + pix] = p.fbest;
          depth[box.b * plane + pix] = p.fbest >= 0 ? p.zbest : T(INFINITY);
          if (s.aggr_rgb == RGB_SOFTMAX) {
            softmax_sum[box.b * plane + pix] = p.ssum;
            softmax_max[box.b * plane + pix] = p.smax;
          }
        }
      }
    }
  });
}

// Adds a pixel's texture gradient (TextureGrad) to the tile's per-face accumulator; touched
// lists the texels to flush.
template <typename T>
inline void add_texture_grad(const TextureGrad<T>& tg, const T* g, std::vector<T>& tex_acc, std::vector<int>& touched) {
  for (int i = 0; i < tg.count; ++i) {
    T* acc = tex_acc.data() + 3 * tg.index[i];
    if (acc[0] == T(0) && acc[1] == T(0) && acc[2] == T(0)) touched.push_back(tg.index[i]);
    for (int j = 0; j < 3; ++j) acc[j] += tg.weight[i] * g[j];
  }
}

// Gradients of face f at the pixels [c_lo, c_hi] of tile row r, W lanes at a time; the geometry
// gradient is summed per lane in grad.
template <typename T>
void backward_row_lanes(const T* finfo, const T* ftex, int f, const TileCoords<T>& xy, int r, int c_lo, int c_hi,
                        const Settings<T>& s, const lanes::TileSaved<T>& saved, lanes::Vec<T>* grad,
                        std::vector<T>& tex_acc, std::vector<int>& touched) {
  using V = lanes::Vec<T>;
  using Bt = Batch<V>;
  constexpr int W = lanes::VecTraits<T>::W;
  for (int c = c_lo; c <= c_hi; c += W) {
    const int i = r * kTileSize + c;
    MaskOf<V> mask = lanes::first_lanes<T>(c_hi - c + 1) & (lanes::load(saved.any_grad + i) != T(0));
    if (!Bt::any(mask)) continue;
    const PixelSaved<V> pixels = saved.load_lanes(i);
    mask &= ~pair_is_inert(finfo, f, s, pixels);
    if (!Bt::any(mask)) continue;
    Coverage<V> cov;
    mask &= eval_coverage(finfo, lanes::load(xy.xs + c), xy.ys[r], s, cov);
    if (!Bt::any(mask)) continue;
    V wb[3], tex_weight;
    IntOf<V> texel{};
    backward_pair(finfo, ftex, f, cov, mask, s, pixels, grad, wb, tex_weight, texel);
    T weight[W], bary[3][W];  // through memory: cheaper than extracting lane by lane
    lanes::IntOf<T> lane_texel[W];
    lanes::store(weight, tex_weight);
    for (int v = 0; v < 3; ++v) lanes::store(bary[v], wb[v]);
    lanes::store_ints<T>(lane_texel, texel);
    for (int j = 0; j < W; ++j) {
      if (weight[j] == T(0)) continue;
      const T g[3] = {saved.g[0][i + j], saved.g[1][i + j], saved.g[2][i + j]};
      const T lane_bary[3] = {bary[0][j], bary[1][j], bary[2][j]};
      add_texture_grad(texture_grad(s, weight[j], lane_bary, int(lane_texel[j])), g, tex_acc, touched);
    }
  }
}

template <typename T>
void backward_tiles(const T* grad_image, const T* tex, const T* image, const int64_t* face_index,
                    const T* softmax_sum, const T* softmax_max, const T* info, const int* ranges, const int64_t* offsets,
                    const int32_t* bins, int64_t B, int64_t F, const Settings<T>& s, bool vectorize, T* grad_fv,
                    T* grad_tex) {
  const int S = s.image_size;
  const int64_t nt = num_tiles(S), plane = int64_t(S) * S;
  const bool softmax = s.aggr_rgb == RGB_SOFTMAX;
  at::parallel_for(0, B * nt * nt, 1, [&](int64_t begin, int64_t end) {
    // what the backward needs of each pixel, gathered once per tile; the padding has no gradient
    lanes::TileSaved<T> saved{};
    // a face's texture gradient within a tile, added to the shared one once (fewer atomics)
    std::vector<T> tex_acc(size_t(s.texels) * 3, T(0));
    std::vector<int> touched;
    touched.reserve(s.texels);
    for (int64_t item = begin; item < end; ++item) {
      if (offsets[item] == offsets[item + 1]) continue;  // no face reaches the tile: no gradient
      const TileBox box = tile_box(item, nt, S);
      const TileCoords<T> xy(box, S);
      const bool exclusive = owns_image(box.b, nt * nt, begin, end);
      for (int i = 0; i < kTileSize * kTileSize; ++i) saved.any_grad[i] = T(0);
      for (int r = box.r0; r < box.r1; ++r) {
        for (int c = box.c0; c < box.c1; ++c) {
          const int i = (r - box.r0) * kTileSize + (c - box.c0);
          const int64_t pix = int64_t(r) * S + c;
          bool any_grad = false;
          for (int j = 0; j < 4; ++j) {
            saved.g[j][i] = grad_image[(box.b * 4 + j) * plane + pix];
            saved.rgba[j][i] = image[(box.b * 4 + j) * plane + pix];
            any_grad = any_grad || saved.g[j][i] != T(0);
          }
          saved.any_grad[i] = any_grad ? T(1) : T(0);
          saved.ssum[i] = softmax ? softmax_sum[box.b * plane + pix] : T(1);
          saved.smax[i] = softmax ? softmax_max[box.b * plane + pix] : T(0);
          saved.fbest[i] = lanes::IntOf<T>(face_index[box.b * plane + pix]);
        }
      }
      for (int64_t k = offsets[item]; k < offsets[item + 1]; ++k) {
        const int f = bins[k];
        const int64_t face = box.b * F + f;
        const T* finfo = info + kFaceInfoSize * face;
        const T* ftex = tex + int64_t(s.texels) * 3 * face;
        T* gtex = grad_tex + int64_t(s.texels) * 3 * face;
        T grad_face[9] = {};
        lanes::Vec<T> grad_lanes[9] = {};
        for_each_face_row(finfo, ranges + 4 * face, box, xy, s, [&](int r, int c_lo, int c_hi) {
          if (vectorize) {
            backward_row_lanes(finfo, ftex, f, xy, r, c_lo, c_hi, s, saved, grad_lanes, tex_acc, touched);
            return;
          }
          for (int c = c_lo; c <= c_hi; ++c) {
            const int i = r * kTileSize + c;
            if (saved.any_grad[i] == T(0)) continue;
            const PixelSaved<T> pixel = saved.get(i);
            if (pair_is_inert(finfo, f, s, pixel)) continue;
            Coverage<T> cov;
            if (!eval_coverage(finfo, xy.xs[c], xy.ys[r], s, cov)) continue;
            T wb[3], tex_weight;
            int texel = 0;
            backward_pair(finfo, ftex, f, cov, true, s, pixel, grad_face, wb, tex_weight, texel);
            add_texture_grad(texture_grad(s, tex_weight, wb, texel), pixel.g, tex_acc, touched);
          }
        });
        if (vectorize)
          for (int j = 0; j < 9; ++j) grad_face[j] += lanes::sum_lanes(grad_lanes[j]);
        for (const int texel : touched) {
          for (int j = 0; j < 3; ++j) {
            T& acc = tex_acc[3 * texel + j];
            if (acc != T(0)) add_face_sum(gtex + 3 * texel + j, acc, exclusive);
            acc = T(0);
          }
        }
        touched.clear();
        for (int j = 0; j < 9; ++j)
          if (grad_face[j] != T(0)) add_face_sum(grad_fv + 9 * face + j, grad_face[j], exclusive);
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> forward_cpu(const at::Tensor& face_vertices, const at::Tensor& textures,
                                    const RasterConfig& cfg) {
  const int64_t B = face_vertices.size(0), F = face_vertices.size(1), texels = textures.size(2);
  const int64_t S = cfg.image_size, nt = num_tiles(S);
  const auto opts = face_vertices.options();
  auto info = at::empty({B, F, kFaceInfoSize}, opts);
  auto ranges = at::empty({B, F, 4}, opts.dtype(at::kInt));
  auto image = at::empty({B, 4, S, S}, opts);
  auto face_index = at::empty({B, S, S}, opts.dtype(at::kLong));
  auto depth = at::empty({B, S, S}, opts);
  const bool softmax = cfg.aggr_rgb == RGB_SOFTMAX;
  auto softmax_sum = softmax ? at::empty({B, S, S}, opts) : at::empty({0}, opts);
  auto softmax_max = softmax ? at::empty({B, S, S}, opts) : at::empty({0}, opts);
  auto p2f = cfg.return_p2f ? at::zeros({B, F, 3}, opts) : at::empty({0}, opts);
  std::vector<at::Tensor> bins;
  AT_DISPATCH_FLOATING_TYPES(face_vertices.scalar_type(), "umr_rasterize_forward_cpu", [&] {
    const Settings<scalar_t> s = make_settings<scalar_t>(cfg, int(F), int(texels));
    setup_faces(face_vertices.data_ptr<scalar_t>(), B * F, s.margin, int(S), cfg.binning, info.data_ptr<scalar_t>(),
                ranges.data_ptr<int>());
    bins = bin_faces(ranges, B, F, nt);
    forward_tiles(textures.data_ptr<scalar_t>(), info.data_ptr<scalar_t>(), ranges.data_ptr<int>(),
                  bins[0].data_ptr<int64_t>(), bins[1].data_ptr<int32_t>(), B, F, s, cfg.return_p2f,
                  cfg.vectorize && lanes::kAvailable, image.data_ptr<scalar_t>(), face_index.data_ptr<int64_t>(), depth.data_ptr<scalar_t>(),
                  softmax ? softmax_sum.data_ptr<scalar_t>() : nullptr,
                  softmax ? softmax_max.data_ptr<scalar_t>() : nullptr,
                  cfg.return_p2f ? p2f.data_ptr<scalar_t>() : nullptr);
  });
  return {image, face_index, depth, softmax_sum, softmax_max, p2f, info, ranges, bins[0], bins[1]};
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_image, const at::Tensor& textures,
                                     const at::Tensor& image, const at::Tensor& face_index,
                                     const at::Tensor& softmax_sum, const at::Tensor& softmax_max,
                                     const at::Tensor& face_info, const at::Tensor& face_ranges,
                                     const at::Tensor& bin_offsets, const at::Tensor& bin_faces,
                                     const RasterConfig& cfg) {
  const int64_t B = face_info.size(0), F = face_info.size(1), texels = textures.size(2);
  auto grad_fv = at::zeros({B, F, 3, 3}, face_info.options());
  auto grad_tex = at::zeros_like(textures);
  const bool softmax = cfg.aggr_rgb == RGB_SOFTMAX;
  AT_DISPATCH_FLOATING_TYPES(face_info.scalar_type(), "umr_rasterize_backward_cpu", [&] {
    const Settings<scalar_t> s = make_settings<scalar_t>(cfg, int(F), int(texels));
    backward_tiles(grad_image.data_ptr<scalar_t>(), textures.data_ptr<scalar_t>(), image.data_ptr<scalar_t>(),
                   face_index.data_ptr<int64_t>(), softmax ? softmax_sum.data_ptr<scalar_t>() : nullptr,
                   softmax ? softmax_max.data_ptr<scalar_t>() : nullptr, face_info.data_ptr<scalar_t>(),
                   face_ranges.data_ptr<int>(), bin_offsets.data_ptr<int64_t>(), bin_faces.data_ptr<int32_t>(), B, F, s,
                   cfg.vectorize && lanes::kAvailable, grad_fv.data_ptr<scalar_t>(), grad_tex.data_ptr<scalar_t>());
  });
  return {grad_fv, grad_tex};
}

at::Tensor visited_pairs_cpu(const at::Tensor& face_info, const at::Tensor& face_ranges, const at::Tensor& bin_offsets,
                             const at::Tensor& bin_faces, const RasterConfig& cfg) {
  const int64_t B = face_info.size(0), F = face_info.size(1), S = cfg.image_size, nt = num_tiles(S);
  auto visited = at::zeros({B, F, S, S}, face_info.options().dtype(at::kBool));
  bool* out = visited.data_ptr<bool>();
  const int* ranges = face_ranges.data_ptr<int>();
  const int64_t* offsets = bin_offsets.data_ptr<int64_t>();
  const int32_t* bins = bin_faces.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(face_info.scalar_type(), "umr_visited_pairs", [&] {
    const Settings<scalar_t> s = make_settings<scalar_t>(cfg, int(F), 1);
    const scalar_t* info = face_info.data_ptr<scalar_t>();
    for (int64_t item = 0; item < B * nt * nt; ++item) {
      const TileBox box = tile_box(item, nt, int(S));
      const TilePixels<scalar_t> pixels(box, int(S));
      for (int64_t k = offsets[item]; k < offsets[item + 1]; ++k) {
        const int64_t face = box.b * F + bins[k];
        const FaceTileCull<scalar_t, TilePixels<scalar_t>> cull(info + kFaceInfoSize * face, ranges + 4 * face, box,
                                                                 pixels, s);
        for (int r = 0; r < box.r1 - box.r0; ++r) {
          int c_lo, c_hi;
          cull.columns(r, c_lo, c_hi);
          for (int c = c_lo; c <= c_hi; ++c) out[(face * S + box.r0 + r) * S + box.c0 + c] = true;
        }
      }
    }
  });
  return visited;
}

}  // namespace umr
