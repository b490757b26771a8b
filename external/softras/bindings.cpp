// Python bindings of the soft rasterizer (module umr._C): argument checks and device dispatch.
// Tensors run on the device they live on; nothing is copied between devices.
#include <torch/extension.h>

#include <string>

#include "rasterize.h"
#include "rasterize_lanes.h"

namespace umr {
namespace {

RasterConfig make_config(int64_t image_size, const std::vector<double>& background, double near, double far,
                         double eps, double sigma, double gamma, double dist_eps, int64_t dist_func,
                         int64_t aggr_rgb, int64_t aggr_alpha, int64_t texture_type, bool double_side,
                         bool return_p2f, bool p2f_align_corners, bool binning, bool vectorize,
                         bool rgb_geometry_grad = true) {
  TORCH_CHECK(image_size >= 1 && image_size <= 16384, "umr rasterizer: image_size must be in [1, 16384], got ",
              image_size);
  TORCH_CHECK(background.size() == 3, "umr rasterizer: background must have 3 values (RGB), got ",
              background.size());
  TORCH_CHECK(far > near, "umr rasterizer: far (", far, ") must be greater than near (", near, ")");
  TORCH_CHECK(sigma > 0 && gamma > 0, "umr rasterizer: sigma and gamma must be positive, got ", sigma, " and ",
              gamma);
  TORCH_CHECK(dist_eps > 0 && dist_eps < 0.5, "umr rasterizer: dist_eps must be in (0, 0.5), got ", dist_eps);
  TORCH_CHECK(dist_func >= 0 && dist_func <= 2, "umr rasterizer: bad dist_func code ", dist_func);
  TORCH_CHECK(aggr_rgb >= 0 && aggr_rgb <= 1, "umr rasterizer: bad aggr_rgb code ", aggr_rgb);
  TORCH_CHECK(aggr_alpha >= 0 && aggr_alpha <= 2, "umr rasterizer: bad aggr_alpha code ", aggr_alpha);
  TORCH_CHECK(texture_type >= 0 && texture_type <= 1, "umr rasterizer: bad texture_type code ", texture_type);
  RasterConfig cfg;
  cfg.image_size = image_size;
  for (int k = 0; k < 3; ++k) cfg.background[k] = background[k];
  cfg.near = near;
  cfg.far = far;
  cfg.eps = eps;
  cfg.sigma = sigma;
  cfg.gamma = gamma;
  cfg.dist_eps = dist_eps;
  cfg.dist_func = int(dist_func);
  cfg.aggr_rgb = int(aggr_rgb);
  cfg.aggr_alpha = int(aggr_alpha);
  cfg.texture_type = int(texture_type);
  cfg.double_side = double_side;
  cfg.return_p2f = return_p2f;
  cfg.p2f_align_corners = p2f_align_corners;
  cfg.binning = binning;
  cfg.vectorize = vectorize;
  cfg.rgb_geometry_grad = rgb_geometry_grad;
  return cfg;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "umr rasterizer: ", name, " is on ", t.device(),
              " but face_vertices is on ", like.device(), "; move both to the same device");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "umr rasterizer: ", name, " has dtype ", t.scalar_type(),
              " but face_vertices has ", like.scalar_type(), "; use the same floating dtype");
  TORCH_CHECK(t.is_contiguous(), "umr rasterizer: ", name, " must be contiguous (call .contiguous())");
}

void check_inputs(const at::Tensor& face_vertices, const at::Tensor& textures, int64_t texture_type) {
  TORCH_CHECK(face_vertices.dim() == 4 && face_vertices.size(2) == 3 && face_vertices.size(3) == 3,
              "umr rasterizer: face_vertices must be (B, F, 3, 3), got ", face_vertices.sizes());
  TORCH_CHECK(face_vertices.scalar_type() == at::kFloat || face_vertices.scalar_type() == at::kDouble,
              "umr rasterizer: face_vertices must be float32 or float64, got ", face_vertices.scalar_type());
  TORCH_CHECK(face_vertices.is_contiguous(), "umr rasterizer: face_vertices must be contiguous (call .contiguous())");
  TORCH_CHECK(face_vertices.size(1) > 0 && face_vertices.size(1) < (int64_t(1) << 31),
              "umr rasterizer: need between 1 and 2^31 - 1 faces, got ", face_vertices.size(1));
  check_tensor(textures, "textures", face_vertices);
  TORCH_CHECK(textures.dim() == 4 && textures.size(0) == face_vertices.size(0) &&
                  textures.size(1) == face_vertices.size(1) && textures.size(3) == 3,
              "umr rasterizer: textures must be (B, F, texels, 3) with B, F of face_vertices ",
              face_vertices.sizes(), ", got ", textures.sizes());
  const int64_t texels = textures.size(2);
  if (texture_type == TEX_SURFACE) {
    const auto res = int64_t(std::lround(std::sqrt(double(texels))));
    TORCH_CHECK(texels >= 1 && res * res == texels,
                "umr rasterizer: surface textures need R*R texels per face, got ", texels);
  } else {
    TORCH_CHECK(texels == 3, "umr rasterizer: vertex colours need 3 colours per face, got ", texels);
  }
}

std::vector<at::Tensor> forward(const at::Tensor& face_vertices, const at::Tensor& textures, int64_t image_size,
                                const std::vector<double>& background, double near, double far, double eps,
                                double sigma, double gamma, double dist_eps, int64_t dist_func, int64_t aggr_rgb,
                                int64_t aggr_alpha, int64_t texture_type, bool double_side, bool return_p2f,
                                bool p2f_align_corners, bool binning, bool vectorize) {
  check_inputs(face_vertices, textures, texture_type);
  const RasterConfig cfg = make_config(image_size, background, near, far, eps, sigma, gamma, dist_eps, dist_func,
                                       aggr_rgb, aggr_alpha, texture_type, double_side, return_p2f,
                                       p2f_align_corners, binning, vectorize);
  if (face_vertices.is_cuda()) {
#ifdef UMR_WITH_CUDA
    return forward_cuda(face_vertices, textures, cfg);
#else
    TORCH_CHECK(false, "umr rasterizer: tensors are on ", face_vertices.device(),
                " but umr._C was built without CUDA; rebuild with FORCE_CUDA=1 bash install.sh");
#endif
  }
  TORCH_CHECK(face_vertices.is_cpu(), "umr rasterizer: unsupported device ", face_vertices.device());
  return forward_cpu(face_vertices, textures, cfg);
}

std::vector<at::Tensor> backward(const at::Tensor& grad_image, const at::Tensor& textures, const at::Tensor& image,
                                 const at::Tensor& face_index, const at::Tensor& softmax_sum,
                                 const at::Tensor& softmax_max, const at::Tensor& face_info,
                                 const at::Tensor& face_ranges, const at::Tensor& bin_offsets,
                                 const at::Tensor& bin_faces, int64_t image_size,
                                 const std::vector<double>& background, double near, double far, double eps,
                                 double sigma, double gamma, double dist_eps, int64_t dist_func, int64_t aggr_rgb,
                                 int64_t aggr_alpha, int64_t texture_type, bool double_side, bool p2f_align_corners,
                                 bool binning, bool vectorize, bool rgb_geometry_grad) {
  const RasterConfig cfg = make_config(image_size, background, near, far, eps, sigma, gamma, dist_eps, dist_func,
                                       aggr_rgb, aggr_alpha, texture_type, double_side, false, p2f_align_corners,
                                       binning, vectorize, rgb_geometry_grad);
  TORCH_CHECK(grad_image.sizes() == image.sizes(), "umr rasterizer: grad_image must have the image's shape ",
              image.sizes(), ", got ", grad_image.sizes());
  check_tensor(grad_image, "grad_image", face_info);
  check_tensor(textures, "textures", face_info);
  check_tensor(image, "image", face_info);
  if (face_info.is_cuda()) {
#ifdef UMR_WITH_CUDA
    return backward_cuda(grad_image, textures, image, face_index, softmax_sum, softmax_max, face_info, face_ranges,
                         bin_offsets, bin_faces, cfg);
#else
    TORCH_CHECK(false, "umr rasterizer: umr._C was built without CUDA");
#endif
  }
  return backward_cpu(grad_image, textures, image, face_index, softmax_sum, softmax_max, face_info, face_ranges,
                      bin_offsets, bin_faces, cfg);
}

at::Tensor visited_pairs(const at::Tensor& face_info, const at::Tensor& face_ranges, const at::Tensor& bin_offsets,
                         const at::Tensor& bin_faces, int64_t image_size, const std::vector<double>& background,
                         double near, double far, double eps, double sigma, double gamma, double dist_eps,
                         int64_t dist_func, int64_t aggr_rgb, int64_t aggr_alpha, int64_t texture_type,
                         bool double_side) {
  for (const at::Tensor* t : {&face_info, &face_ranges, &bin_offsets, &bin_faces})
    TORCH_CHECK(t->is_cpu() && t->is_contiguous(), "umr visited_pairs: needs contiguous CPU tensors");
  const RasterConfig cfg = make_config(image_size, background, near, far, eps, sigma, gamma, dist_eps, dist_func,
                                       aggr_rgb, aggr_alpha, texture_type, double_side, false, true, true, true);
  return visited_pairs_cpu(face_info, face_ranges, bin_offsets, bin_faces, cfg);
}

// exp of a CPU tensor through the CPU kernel's vector lanes (for the tests: the one function of
// rasterize_lanes.h that does not round exactly as the scalar math).
at::Tensor lanes_exp(const at::Tensor& x) {
  TORCH_CHECK(x.is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "umr lanes_exp: needs a float32 or float64 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "umr_lanes_exp", [&] {
    constexpr int W = lanes::VecTraits<scalar_t>::W;
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < in.numel(); i += W) {
      scalar_t buf[W] = {};
      const int64_t n = std::min<int64_t>(W, in.numel() - i);
      std::copy(src + i, src + i + n, buf);
      lanes::store(buf, lanes::vector_exp(lanes::load(buf)));
      std::copy(buf, buf + n, dst + i);
    }
  });
  return out;
}

std::vector<std::string> available_devices() {
#ifdef UMR_WITH_CUDA
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

}  // namespace
}  // namespace umr

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "umr soft rasterizer kernels (use umr.renderer, not this module, from Python code)";
  m.def("forward", &umr::forward, "Soft rasterizer forward (see umr.renderer.soft_rasterize)");
  m.def("backward", &umr::backward, "Soft rasterizer backward");
  m.def("available_devices", &umr::available_devices, "Devices this build supports");
  m.def("visited_pairs", &umr::visited_pairs,
        "(face, pixel) pairs the kernels' shared binning and cull visit, from forward's bins (for tests)");
  m.def("lanes_exp", &umr::lanes_exp, "exp through the CPU kernel's SIMD lanes (for tests)");
  m.attr("cpu_simd") = umr::lanes::kAvailable;  // does RasterSettings.vectorize take effect here
  m.attr("tile_size") = umr::kTileSize;
}
