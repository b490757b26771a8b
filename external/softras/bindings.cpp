// Python bindings of the soft rasterizer (module umr._C): argument checks and device dispatch.
// Tensors run on the device they live on; nothing is copied between devices.
#include <torch/extension.h>

#include <iterator>
#include <map>
#include <string>

#include "rasterize.h"
#include "rasterize_lanes.h"

namespace umr {
namespace {

// The Python side (umr.renderer.RasterSettings) fills a RasterConfig by field name; every value is
// checked here, once per call, before a kernel sees it.
void check_config(const RasterConfig& cfg) {
  TORCH_CHECK(cfg.image_size >= 1 && cfg.image_size <= 16384,
              "umr rasterizer: image_size must be in [1, 16384], got ", cfg.image_size);
  TORCH_CHECK(cfg.far > cfg.near, "umr rasterizer: far (", cfg.far, ") must be greater than near (", cfg.near, ")");
  TORCH_CHECK(cfg.sigma > 0 && cfg.gamma > 0, "umr rasterizer: sigma and gamma must be positive, got ", cfg.sigma,
              " and ", cfg.gamma);
  TORCH_CHECK(cfg.dist_eps > 0 && cfg.dist_eps < 0.5, "umr rasterizer: dist_eps must be in (0, 0.5), got ",
              cfg.dist_eps);
  TORCH_CHECK(cfg.dist_func >= 0 && cfg.dist_func <= 2, "umr rasterizer: bad dist_func code ", cfg.dist_func);
  TORCH_CHECK(cfg.aggr_rgb >= 0 && cfg.aggr_rgb <= 1, "umr rasterizer: bad aggr_rgb code ", cfg.aggr_rgb);
  TORCH_CHECK(cfg.aggr_alpha >= 0 && cfg.aggr_alpha <= 2, "umr rasterizer: bad aggr_alpha code ", cfg.aggr_alpha);
  TORCH_CHECK(cfg.texture_type >= 0 && cfg.texture_type <= 1, "umr rasterizer: bad texture_type code ",
              cfg.texture_type);
}

using NamedTensors = std::map<std::string, at::Tensor>;

NamedTensors name_outputs(const std::vector<at::Tensor>& tensors, const char* const* names, size_t count) {
  TORCH_CHECK(tensors.size() == count, "umr rasterizer: a kernel returned ", tensors.size(), " tensors, expected ",
              count);
  NamedTensors out;
  for (size_t i = 0; i < count; ++i) out.emplace(names[i], tensors[i]);
  return out;
}

const at::Tensor& named(const NamedTensors& tensors, const char* name) {
  const auto it = tensors.find(name);
  TORCH_CHECK(it != tensors.end(), "umr rasterizer: missing tensor '", name,
              "' (pass forward's outputs and the textures by name)");
  return it->second;
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

NamedTensors forward(const at::Tensor& face_vertices, const at::Tensor& textures, const RasterConfig& cfg) {
  check_config(cfg);
  check_inputs(face_vertices, textures, cfg.texture_type);
  std::vector<at::Tensor> out;
  if (face_vertices.is_cuda()) {
#ifdef UMR_WITH_CUDA
    out = forward_cuda(face_vertices, textures, cfg);
#else
    TORCH_CHECK(false, "umr rasterizer: tensors are on ", face_vertices.device(),
                " but umr._C was built without CUDA; rebuild with FORCE_CUDA=1 bash install.sh");
#endif
  } else {
    TORCH_CHECK(face_vertices.is_cpu(), "umr rasterizer: unsupported device ", face_vertices.device());
    out = forward_cpu(face_vertices, textures, cfg);
  }
  return name_outputs(out, kForwardOutputs, std::size(kForwardOutputs));
}

// saved: forward's outputs by name (p2f and depth may be left out) and "textures".
NamedTensors backward(const at::Tensor& grad_image, const NamedTensors& saved, const RasterConfig& cfg) {
  check_config(cfg);
  const at::Tensor& textures = named(saved, "textures");
  const at::Tensor& image = named(saved, "image");
  const at::Tensor& face_info = named(saved, "face_info");
  TORCH_CHECK(grad_image.sizes() == image.sizes(), "umr rasterizer: grad_image must have the image's shape ",
              image.sizes(), ", got ", grad_image.sizes());
  check_tensor(grad_image, "grad_image", face_info);
  check_tensor(textures, "textures", face_info);
  check_tensor(image, "image", face_info);
  const at::Tensor &face_index = named(saved, "face_index"), &softmax_sum = named(saved, "softmax_sum"),
                   &softmax_max = named(saved, "softmax_max"), &face_ranges = named(saved, "face_ranges"),
                   &bin_offsets = named(saved, "bin_offsets"), &bin_faces = named(saved, "bin_faces");
  std::vector<at::Tensor> out;
  if (face_info.is_cuda()) {
#ifdef UMR_WITH_CUDA
    out = backward_cuda(grad_image, textures, image, face_index, softmax_sum, softmax_max, face_info, face_ranges,
                        bin_offsets, bin_faces, cfg);
#else
    TORCH_CHECK(false, "umr rasterizer: umr._C was built without CUDA");
#endif
  } else {
    out = backward_cpu(grad_image, textures, image, face_index, softmax_sum, softmax_max, face_info, face_ranges,
                       bin_offsets, bin_faces, cfg);
  }
  return name_outputs(out, kBackwardOutputs, std::size(kBackwardOutputs));
}

// forward_outputs: what forward returned (CPU tensors); cfg: the settings it ran with.
at::Tensor visited_pairs(const NamedTensors& forward_outputs, const RasterConfig& cfg) {
  check_config(cfg);
  const at::Tensor &face_info = named(forward_outputs, "face_info"), &face_ranges = named(forward_outputs, "face_ranges"),
                   &bin_offsets = named(forward_outputs, "bin_offsets"), &bin_faces = named(forward_outputs, "bin_faces");
  for (const at::Tensor* t : {&face_info, &face_ranges, &bin_offsets, &bin_faces})
    TORCH_CHECK(t->is_cpu() && t->is_contiguous(), "umr visited_pairs: needs contiguous CPU tensors");
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
  namespace py = pybind11;
  using umr::RasterConfig;
  m.doc() = "umr soft rasterizer kernels (use umr.renderer, not this module, from Python code)";
  // Fields are set by name (an unknown name is an AttributeError); see umr.renderer.RasterSettings.
  py::class_<RasterConfig>(m, "RasterConfig")
      .def(py::init([] { return RasterConfig{}; }))
      .def_readwrite("image_size", &RasterConfig::image_size)
      .def_property(
          "background", [](const RasterConfig& c) { return std::vector<double>(c.background, c.background + 3); },
          [](RasterConfig& c, const std::vector<double>& rgb) {
            TORCH_CHECK(rgb.size() == 3, "umr rasterizer: background must have 3 values (RGB), got ", rgb.size());
            std::copy(rgb.begin(), rgb.end(), c.background);
          })
      .def_readwrite("near", &RasterConfig::near)
      .def_readwrite("far", &RasterConfig::far)
      .def_readwrite("eps", &RasterConfig::eps)
      .def_readwrite("sigma", &RasterConfig::sigma)
      .def_readwrite("gamma", &RasterConfig::gamma)
      .def_readwrite("dist_eps", &RasterConfig::dist_eps)
      .def_readwrite("dist_func", &RasterConfig::dist_func)
      .def_readwrite("aggr_rgb", &RasterConfig::aggr_rgb)
      .def_readwrite("aggr_alpha", &RasterConfig::aggr_alpha)
      .def_readwrite("texture_type", &RasterConfig::texture_type)
      .def_readwrite("double_side", &RasterConfig::double_side)
      .def_readwrite("return_p2f", &RasterConfig::return_p2f)
      .def_readwrite("p2f_align_corners", &RasterConfig::p2f_align_corners)
      .def_readwrite("binning", &RasterConfig::binning)
      .def_readwrite("vectorize", &RasterConfig::vectorize)
      .def_readwrite("rgb_geometry_grad", &RasterConfig::rgb_geometry_grad);
  m.def("forward", &umr::forward, py::arg("face_vertices"), py::arg("textures"), py::arg("config"),
        "Soft rasterizer forward (see umr.renderer.soft_rasterize): a dict of named tensors");
  m.def("backward", &umr::backward, py::arg("grad_image"), py::arg("saved"), py::arg("config"),
        "Soft rasterizer backward: saved = forward's outputs by name plus 'textures'; returns "
        "{'grad_face_vertices', 'grad_textures'}");
  m.def("available_devices", &umr::available_devices, "Devices this build supports");
  m.def("visited_pairs", &umr::visited_pairs, py::arg("forward_outputs"), py::arg("config"),
        "(face, pixel) pairs the kernels' shared binning and cull visit, from forward's bins (for tests)");
  m.def("lanes_exp", &umr::lanes_exp, "exp through the CPU kernel's SIMD lanes (for tests)");
  m.attr("cpu_simd") = umr::lanes::kAvailable;  // does RasterSettings.vectorize take effect here
  m.attr("tile_size") = umr::kTileSize;
}
