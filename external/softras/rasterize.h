// Declarations shared by the bindings and the CPU / CUDA kernels of the soft rasterizer.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "rasterize_math.h"

namespace umr {

// Everything the kernels need besides the tensors; validated by the bindings.
// Hidden visibility, as pybind11's own types: the bindings expose it as umr._C.RasterConfig.
struct __attribute__((visibility("hidden"))) RasterConfig {
  int64_t image_size;
  double background[3];
  double near, far, eps, sigma, gamma, dist_eps;
  int dist_func, aggr_rgb, aggr_alpha, texture_type;
  bool double_side, return_p2f, p2f_align_corners;
  bool binning;  // false: every tile lists every face (the unbinned reference computation)
  bool vectorize;  // CPU: W pixels of a row at once (rasterize_lanes.h); false: the scalar math
  bool rgb_geometry_grad;  // backward only, see rasterize_math.h
};

template <typename T>
Settings<T> make_settings(const RasterConfig& cfg, int num_faces, int texels) {
  Settings<T> s;
  s.image_size = int(cfg.image_size);
  s.num_faces = num_faces;
  s.texels = texels;
  s.tex_res = int(std::lround(std::sqrt(double(texels))));
  s.dist_func = cfg.dist_func;
  s.aggr_rgb = cfg.aggr_rgb;
  s.aggr_alpha = cfg.aggr_alpha;
  s.texture_type = cfg.texture_type;
  s.double_side = cfg.double_side;
  s.p2f_align_corners = cfg.p2f_align_corners;
  s.rgb_geometry_grad = cfg.rgb_geometry_grad;
  s.near = T(cfg.near);
  s.far = T(cfg.far);
  s.eps = T(cfg.eps);
  s.sigma = T(cfg.sigma);
  s.gamma = T(cfg.gamma);
  s.inv_sigma = T(1.0 / cfg.sigma);
  s.inv_gamma = T(1.0 / cfg.gamma);
  s.inv_depth_range = T(1.0 / (cfg.far - cfg.near));
  // ln(1/eps_d - 1) in double, then the product in the kernel's precision (docs/rasterizer.md §0)
  s.threshold = T(std::log(1.0 / cfg.dist_eps - 1.0)) * s.sigma;
  s.margin = std::sqrt(s.threshold);
  for (int k = 0; k < 3; ++k) s.bg[k] = T(cfg.background[k]);
  return s;
}

inline int64_t num_tiles(int64_t image_size) { return (image_size + kTileSize - 1) / kTileSize; }

// forward returns {image (B,4,S,S), face_index (B,S,S) int64, depth (B,S,S),
//                  softmax_sum (B,S,S) or empty, softmax_max (B,S,S) or empty,
//                  p2f (B,F,3) weighted sums (x, y, weight) or empty,
//                  face_info (B,F,24), face_ranges (B,F,4) int32, bin_offsets (B*T*T+1) int64,
//                  bin_faces int32}, in the order of kForwardOutputs (the names Python sees);
// backward returns {grad_face_vertices (B,F,3,3), grad_textures (B,F,texels,3)} (kBackwardOutputs).
inline constexpr const char* kForwardOutputs[] = {"image",       "face_index", "depth",      "softmax_sum",
                                                  "softmax_max", "p2f",        "face_info",  "face_ranges",
                                                  "bin_offsets", "bin_faces"};
inline constexpr const char* kBackwardOutputs[] = {"grad_face_vertices", "grad_textures"};
std::vector<at::Tensor> forward_cpu(const at::Tensor& face_vertices, const at::Tensor& textures,
                                    const RasterConfig& cfg);
std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_image, const at::Tensor& textures,
                                     const at::Tensor& image, const at::Tensor& face_index,
                                     const at::Tensor& softmax_sum, const at::Tensor& softmax_max,
                                     const at::Tensor& face_info, const at::Tensor& face_ranges,
                                     const at::Tensor& bin_offsets, const at::Tensor& bin_faces,
                                     const RasterConfig& cfg);
// For the tests: (B, F, S, S) bool, the (face, pixel) pairs a kernel visits given its bins
// (bin_offsets, bin_faces) and the shared cull of rasterize_tiles.h, in the CUDA kernel's form
// (coordinates computed on demand). CPU tensors.
at::Tensor visited_pairs_cpu(const at::Tensor& face_info, const at::Tensor& face_ranges, const at::Tensor& bin_offsets,
                             const at::Tensor& bin_faces, const RasterConfig& cfg);
#ifdef UMR_WITH_CUDA
std::vector<at::Tensor> forward_cuda(const at::Tensor& face_vertices, const at::Tensor& textures,
                                     const RasterConfig& cfg);
std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_image, const at::Tensor& textures,
                                      const at::Tensor& image, const at::Tensor& face_index,
                                      const at::Tensor& softmax_sum, const at::Tensor& softmax_max,
                                      const at::Tensor& face_info, const at::Tensor& face_ranges,
                                      const at::Tensor& bin_offsets, const at::Tensor& bin_faces,
                                      const RasterConfig& cfg);
#endif

}  // namespace umr
