// CUDA kernel of the soft rasterizer: the per-pixel math of rasterize_math.h and the binning
// and culling of rasterize_tiles.h, the CPU kernel's own. One 16 x 16 block per tile, one
// thread per pixel; all threads of a block walk the tile's face list (ascending index) in
// chunks of kTileSize faces (for_each_tile_face): first each thread computes one (face, tile
// row) cull span of the chunk into shared memory, then each pixel visits the chunk's faces
// whose span holds it.
// Bins are built on the device by bin_image, one thread per image. p2f sums and gradients are
// added with atomics (the CPU kernel sums per tile first: it has few threads, and its tiles of
// one image are often one task's, so it adds without atomics).
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers,
// which a plain CUDA toolkit (nvcc only) need not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "rasterize.h"
#include "rasterize_tiles.h"

namespace umr {
namespace {

template <typename T>
__global__ void setup_faces_kernel(const T* __restrict__ face_vertices, int64_t count, T margin, int S, bool binning,
                                   T* __restrict__ info, int* __restrict__ ranges) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  setup_face(face_vertices + 9 * i, info + kFaceInfoSize * i);
  face_pixel_range(info + kFaceInfoSize * i, margin, S, binning, ranges + 4 * i);
}

// One thread per image: bin_image's count pass (slot = the image's counts) or fill pass
// (slot = the image's cursors, starting at its tiles' offsets).
template <bool fill>
__global__ void bin_kernel(const int* __restrict__ ranges, int64_t B, int64_t F, int64_t nt, int64_t* __restrict__ slot,
                           int32_t* __restrict__ faces) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  bin_image<fill>(ranges + 4 * b * F, F, nt, slot + b * nt * nt, faces);
}

// The cull spans of faces [k0, k0 + kTileSize) of the tile's list: thread (row, j) of the block
// computes face j's columns in tile row `row`.
template <typename T>
__device__ void load_spans(const T* info, const int* ranges, const int32_t* bins, int64_t k0, int64_t end, int64_t F,
                           const TileBox& box, const Settings<T>& s, int (*lo)[kTileSize], int (*hi)[kTileSize]) {
  const int j = threadIdx.x, row = threadIdx.y;
  if (k0 + j >= end) return;
  const int64_t face = box.b * F + bins[k0 + j];
  const TilePixels<T> pixels(box, s.image_size);
  const FaceTileCull<T, TilePixels<T>> cull(info + kFaceInfoSize * face, ranges + 4 * face, box, pixels, s);
  cull.columns(row, lo[j][row], hi[j][row]);
}

// Calls visit(f, face) for every face of tile `item`'s list (ascending f; face = b * F + f) whose
// cull span holds this thread's pixel, in chunks of kTileSize faces whose spans the block first
// computes together (load_spans). Every thread of the block must call it: it synchronises.
// active: whether this thread's pixel takes part (threads past the raster's edge only help).
template <typename T, typename Visit>
__device__ void for_each_tile_face(const T* info, const int* ranges, const int64_t* offsets, const int32_t* bins,
                                   int64_t item, int64_t F, const TileBox& box, const Settings<T>& s, bool active,
                                   Visit&& visit) {
  __shared__ int span_lo[kTileSize][kTileSize], span_hi[kTileSize][kTileSize];  // [face of chunk][row]
  const int tr = threadIdx.y, tc = threadIdx.x;
  const int64_t begin = offsets[item], end = offsets[item + 1];
  for (int64_t k0 = begin; k0 < end; k0 += kTileSize) {
    load_spans(info, ranges, bins, k0, end, F, box, s, span_lo, span_hi);
    __syncthreads();
    const int n = int(end - k0 < kTileSize ? end - k0 : kTileSize);
    for (int j = 0; j < n && active; ++j) {
      if (tc < span_lo[j][tr] || tc > span_hi[j][tr]) continue;
      const int f = bins[k0 + j];
      visit(f, box.b * F + f);
    }
    __syncthreads();  // the spans are rewritten next
  }
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ tex, const T* __restrict__ info, const int* __restrict__ ranges,
                               const int64_t* __restrict__ offsets, const int32_t* __restrict__ bins, int64_t F,
                               int64_t nt, Settings<T> s, bool return_p2f, T* __restrict__ image,
                               int64_t* __restrict__ face_index, T* __restrict__ depth, T* __restrict__ softmax_sum,
                               T* __restrict__ softmax_max, T* __restrict__ p2f) {
  const int S = s.image_size;
  const int64_t item = (int64_t(blockIdx.z) * nt + blockIdx.y) * nt + blockIdx.x;
  const TileBox box = tile_box(item, nt, S);
  const int r = box.r0 + int(threadIdx.y), c = box.c0 + int(threadIdx.x);
  const bool on_raster = r < S && c < S;
  const T px = pixel_x<T>(c, S), py = pixel_y<T>(r, S);
  PixelState<T> state;
  init_pixel(s, state);
  T grid[2];
  p2f_grid(r, c, s, grid);
  for_each_tile_face(info, ranges, offsets, bins, item, F, box, s, on_raster, [&](int f, int64_t face) {
    const T* finfo = info + kFaceInfoSize * face;
    if (face_is_inert(finfo, s, state)) return;
    Coverage<T> cov;
    if (!eval_coverage(finfo, px, py, s, cov)) return;
    const T u = update_pixel(finfo, tex + int64_t(s.texels) * 3 * face, f, cov, true, s, state);
    if (return_p2f && u != T(0)) {
      atomicAdd(p2f + 3 * face, u * grid[0]);
      atomicAdd(p2f + 3 * face + 1, u * grid[1]);
      atomicAdd(p2f + 3 * face + 2, u);
    }
  });
  if (!on_raster) return;
  const int64_t b = box.b, plane = int64_t(S) * S, pix = int64_t(r) * S + c;
  T rgba[4];
  finish_pixel(state, s, rgba);
  for (int j = 0; j < 4; ++j) image[(b * 4 + j) * plane + pix] = rgba[j];
  face_index[b * plane + pix] = state.fbest;
  depth[b * plane + pix] = state.fbest >= 0 ? state.zbest : T(INFINITY);
  if (s.aggr_rgb == RGB_SOFTMAX) {
    softmax_sum[b * plane + pix] = state.ssum;
    softmax_max[b * plane + pix] = state.smax;
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad_image, const T* __restrict__ tex,
                                const T* __restrict__ image, const int64_t* __restrict__ face_index,
                                const T* __restrict__ softmax_sum, const T* __restrict__ softmax_max,
                                const T* __restrict__ info, const int* __restrict__ ranges,
                                const int64_t* __restrict__ offsets, const int32_t* __restrict__ bins, int64_t F,
                                int64_t nt, Settings<T> s, T* __restrict__ grad_fv, T* __restrict__ grad_tex) {
  const int S = s.image_size;
  const int64_t item = (int64_t(blockIdx.z) * nt + blockIdx.y) * nt + blockIdx.x;
  const TileBox box = tile_box(item, nt, S);
  const int r = box.r0 + int(threadIdx.y), c = box.c0 + int(threadIdx.x);
  const int64_t b = box.b, plane = int64_t(S) * S, pix = int64_t(r) * S + c;
  const bool softmax = s.aggr_rgb == RGB_SOFTMAX;
  PixelSaved<T> saved;
  bool has_grad = false;
  if (r < S && c < S) {
    for (int j = 0; j < 4; ++j) {
      saved.g[j] = grad_image[(b * 4 + j) * plane + pix];
      saved.rgba[j] = image[(b * 4 + j) * plane + pix];
      has_grad = has_grad || saved.g[j] != T(0);
    }
    saved.ssum = softmax ? softmax_sum[b * plane + pix] : T(1);
    saved.smax = softmax ? softmax_max[b * plane + pix] : T(0);
    saved.fbest = int(face_index[b * plane + pix]);
  }
  const T px = pixel_x<T>(c, S), py = pixel_y<T>(r, S);
  for_each_tile_face(info, ranges, offsets, bins, item, F, box, s, has_grad, [&](int f, int64_t face) {
    const T* finfo = info + kFaceInfoSize * face;
    if (pair_is_inert(finfo, f, s, saved)) return;
    Coverage<T> cov;
    if (!eval_coverage(finfo, px, py, s, cov)) return;
    T grad_face[9] = {}, wb[3], tex_weight;
    int texel = 0;
    backward_pair(finfo, tex + int64_t(s.texels) * 3 * face, f, cov, true, s, saved, grad_face, wb, tex_weight, texel);
    for (int q = 0; q < 9; ++q)
      if (grad_face[q] != T(0)) atomicAdd(grad_fv + 9 * face + q, grad_face[q]);
    const TextureGrad<T> tg = texture_grad(s, tex_weight, wb, texel);
    T* gtex = grad_tex + int64_t(s.texels) * 3 * face;
    for (int i = 0; i < tg.count; ++i)
      for (int q = 0; q < 3; ++q) atomicAdd(gtex + 3 * tg.index[i] + q, tg.weight[i] * saved.g[q]);
  });
}

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

}  // namespace

std::vector<at::Tensor> forward_cuda(const at::Tensor& face_vertices, const at::Tensor& textures,
                                     const RasterConfig& cfg) {
  const c10::cuda::CUDAGuard device_guard(face_vertices.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
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
  auto offsets = at::zeros({B * nt * nt + 1}, opts.dtype(at::kLong));
  at::Tensor bins;
  AT_DISPATCH_FLOATING_TYPES(face_vertices.scalar_type(), "umr_rasterize_forward_cuda", [&] {
    const Settings<scalar_t> s = make_settings<scalar_t>(cfg, int(F), int(texels));
    setup_faces_kernel<scalar_t><<<blocks_for(B * F), kThreads, 0, stream>>>(
        face_vertices.data_ptr<scalar_t>(), B * F, s.margin, int(S), cfg.binning, info.data_ptr<scalar_t>(),
        ranges.data_ptr<int>());
    const int64_t tiles = nt * nt;
    bin_kernel<false><<<blocks_for(B), kThreads, 0, stream>>>(ranges.data_ptr<int>(), B, F, nt,
                                                              offsets.data_ptr<int64_t>() + 1, nullptr);
    offsets = offsets.cumsum(0);
    bins = at::empty({offsets[-1].item<int64_t>()}, opts.dtype(at::kInt));
    auto cursor = offsets.narrow(0, 0, B * tiles).clone();
    bin_kernel<true><<<blocks_for(B), kThreads, 0, stream>>>(ranges.data_ptr<int>(), B, F, nt,
                                                             cursor.data_ptr<int64_t>(), bins.data_ptr<int32_t>());
    const dim3 grid(static_cast<unsigned>(nt), static_cast<unsigned>(nt), static_cast<unsigned>(B));
    const dim3 block(kTileSize, kTileSize);
    forward_kernel<scalar_t><<<grid, block, 0, stream>>>(
        textures.data_ptr<scalar_t>(), info.data_ptr<scalar_t>(), ranges.data_ptr<int>(), offsets.data_ptr<int64_t>(),
        bins.data_ptr<int32_t>(), F, nt, s, cfg.return_p2f, image.data_ptr<scalar_t>(),
        face_index.data_ptr<int64_t>(), depth.data_ptr<scalar_t>(),
        softmax ? softmax_sum.data_ptr<scalar_t>() : nullptr, softmax ? softmax_max.data_ptr<scalar_t>() : nullptr,
        cfg.return_p2f ? p2f.data_ptr<scalar_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {image, face_index, depth, softmax_sum, softmax_max, p2f, info, ranges, offsets, bins};
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_image, const at::Tensor& textures,
                                      const at::Tensor& image, const at::Tensor& face_index,
                                      const at::Tensor& softmax_sum, const at::Tensor& softmax_max,
                                      const at::Tensor& face_info, const at::Tensor& face_ranges,
                                      const at::Tensor& bin_offsets, const at::Tensor& bin_faces,
                                      const RasterConfig& cfg) {
  const c10::cuda::CUDAGuard device_guard(face_info.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = face_info.size(0), F = face_info.size(1), texels = textures.size(2);
  const int64_t S = cfg.image_size, nt = num_tiles(S);
  auto grad_fv = at::zeros({B, F, 3, 3}, face_info.options());
  auto grad_tex = at::zeros_like(textures);
  const bool softmax = cfg.aggr_rgb == RGB_SOFTMAX;
  AT_DISPATCH_FLOATING_TYPES(face_info.scalar_type(), "umr_rasterize_backward_cuda", [&] {
    const Settings<scalar_t> s = make_settings<scalar_t>(cfg, int(F), int(texels));
    const dim3 grid(static_cast<unsigned>(nt), static_cast<unsigned>(nt), static_cast<unsigned>(B));
    const dim3 block(kTileSize, kTileSize);
    backward_kernel<scalar_t><<<grid, block, 0, stream>>>(
        grad_image.data_ptr<scalar_t>(), textures.data_ptr<scalar_t>(), image.data_ptr<scalar_t>(),
        face_index.data_ptr<int64_t>(), softmax ? softmax_sum.data_ptr<scalar_t>() : nullptr,
        softmax ? softmax_max.data_ptr<scalar_t>() : nullptr, face_info.data_ptr<scalar_t>(),
        face_ranges.data_ptr<int>(), bin_offsets.data_ptr<int64_t>(), bin_faces.data_ptr<int32_t>(), F, nt, s, grad_fv.data_ptr<scalar_t>(),
        grad_tex.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_fv, grad_tex};
}

}  // namespace umr
